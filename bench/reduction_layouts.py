"""Why kernel v2's launch settings agree to rounding on a GPU, not bit for bit: the register layouts
Triton chooses for each compiled variant's reductions (no GPU needed).

    python -m bench.reduction_layouts [--arch 90] [--out bench/results/FILE.json]

``preload`` (True / False / "prefetch") and ``num_warps`` change only how a task's rows reach a step
and how many threads share the work; the sums are the same.  Under the interpreter each op is
NumPy's on whole arrays, so every setting gives the same bits.  Compiled, each setting is its own
kernel, and Triton's layout passes pick, per kernel, which threads hold which elements of every
tensor -- and so the order in which a ``tl.sum`` adds its terms (within a thread, across lanes by
shuffles, across warps through shared memory).  This lists, for each variant, every ``tt.reduce``
in its TTGIR (axis, shape, layout) and which of them are laid out unlike the default setting's, plus the f32
multiply/add/FMA counts of its PTX and SASS (ptxas may fuse a multiply and an add into one FMA,
which rounds once instead of twice, wherever the code's shape allows).  Records of a compiler
version, never test assertions.  Run without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

#: (name, dims, activations, loss, batch, steps): tests/test_review_qa43.py's two MSE shapes (an H200
#: gave preload=False different bits there), tests/test_kernel_mlp_meta_step_v2.py's options case,
#: and the seed's MLP
CASES = [
    ("qa43-2-6-3-b3", (2, 6, 3), ("tanh", "identity"), "mse", 3, 5),
    ("qa43-1-8-1-b32", (1, 8, 1), ("tanh", "identity"), "mse", 32, 3),
    ("options-2-20-1-b4", (2, 20, 1), ("tanh", "identity"), "mse", 4, 3),
    ("sine-1-64-64-1-b10", (1, 64, 64, 1), ("tanh", "tanh", "identity"), "mse", 10, 5),
]
#: (name, V2Config keywords); the first is the default setting the others are compared with
VARIANTS = [("default", {}), ("preload-True", {"preload": True}), ("preload-False", {"preload": False}),
            ("prefetch", {"preload": "prefetch"}), ("warps-2", {"num_warps": 2}), ("warps-8", {"num_warps": 8})]


def reductions(ttgir: str) -> list:
    """Every ``tt.reduce`` of a TTGIR module in code order: "axis A of SHAPE in LAYOUT", with each
    ``#blockedN`` alias replaced by its definition (aliases are numbered per module)."""
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ttgir, flags=re.M))
    lines, out = ttgir.splitlines(), []
    for i, line in enumerate(lines):
        if '"tt.reduce"' not in line:
            continue
        axis = re.search(r"axis = (\d+)", line).group(1)
        j = next(k for k in range(i, len(lines)) if "}) : (tensor" in lines[k])
        shape, layout = re.search(r"\}\) : \(tensor<([^,]+), (.*?)>\) ->", lines[j]).groups()
        layout = re.sub(r"#blocked\d*", lambda m: aliases.get(m.group(0), m.group(0)), layout)
        out.append(f"axis {axis} of {shape} in {layout}")
    return out


def compare(base: list, other: list) -> dict:
    """``other``'s reductions against ``base``'s: aligned by (axis, shape) in code order (a
    preloaded plan adds the reductions that select a step's rows; the others lack them), then the
    aligned pairs whose layouts differ -- the same sum over the same elements, added in an order
    the layout sets."""
    import difflib

    key = lambda r: r.split(" in ", 1)[0]  # noqa: E731
    sm = difflib.SequenceMatcher(a=[key(r) for r in base], b=[key(r) for r in other], autojunk=False)
    pairs = [(base[i + k], other[j + k]) for i, j, n in sm.get_matching_blocks() for k in range(n)]
    return {"aligned": len(pairs), "only_in_default": len(base) - len(pairs), "only_here": len(other) - len(pairs),
            "aligned_with_other_layout": [f"{b} | default: {a.split(' in ', 1)[1]}" for a, b in pairs if a != b]}


def _sass_counts(cubin: bytes) -> dict:
    from bench.triton_compile import nvdisasm_path

    tool = nvdisasm_path()
    if tool is None or not cubin:
        return {}
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        sass = subprocess.run([str(tool), "-c", str(f)], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return {k: ops.count(k) for k in ("FFMA", "FMUL", "FADD", "SHFL", "BAR")}


def rows(arch: int = 90, cases=CASES, variants=VARIANTS, log=None) -> list:
    import triton

    from reptile_fast.kernels import mlp_meta_step_v2 as V

    out = []
    for name, dims, acts, loss, batch, steps in cases:
        first = None
        for variant, kw in variants:
            k = V.compile_for_target(dims, acts, loss=loss, batch=batch, steps=steps, config=V.V2Config(**kw),
                                     arch=arch, accumulate=False, write_adapted=True, write_losses=True)
            red, ptx = reductions(k.asm["ttgir"]), k.asm["ptx"]
            first = red if first is None else first
            row = {"case": name, "dims": list(dims), "batch": batch, "steps": steps, "variant": variant,
                   "config": kw, "mode": "adapt (inner_loop)", "arch": f"sm_{arch}a", "triton": triton.__version__,
                   "reductions_same_as_default": red == first, "vs_default": compare(first, red),
                   "n_reductions": len(red), "reductions": red,
                   "ptx_f32": {op: len(re.findall(rf"^\s*{op}(?:\.rn)?\.f32\b", ptx, flags=re.M))
                               for op in ("fma", "mul", "add", "sub")},
                   "sass": _sass_counts(k.asm.get("cubin"))}
            out.append(row)
            if log:
                vs = row["vs_default"]
                log(f"{name} {variant}: {len(red)} reductions ({vs['aligned']} aligned with the default's, "
                    f"{len(vs['aligned_with_other_layout'])} of them laid out differently), "
                    f"ptx {row['ptx_f32']}, sass {row['sass']}")
    return out


def main(argv=None) -> int:
    from bench.triton_compile import record_main

    return record_main("reduction_layouts", __doc__, rows, __doc__.split("\n\n")[2].replace("\n", " "), argv)


if __name__ == "__main__":
    raise SystemExit(main())
