"""Ahead-of-time compile facts of the Triton kernels (no GPU needed): registers, spills, shared
memory, and what the PTX contains.

    python -m bench.triton_compile [--kernel v1|v2|all] [--arch 90] [--out bench/results/FILE.json]

Runs in a process where the kernel modules are imported *without* ``TRITON_INTERPRET=1``.
Registers and spills come from ``ptxas -v`` shipped inside the Triton wheel, for ``sm_<arch>a``;
PTX facts are instruction counts: ``mma`` (tensor-core ``mma.sync``), ``wgmma``, ``ex2.approx``
(fp32 ``tl.exp``'s lowering), ``lg2.approx``, ``div.full`` (fp32 ``/``: approximate),
``div.rn`` (IEEE division), ``ld.local`` / ``st.local`` (spilled or stack arrays).  These are
records of a compiler version, never test assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

SINE = ((1, 64, 64, 1), ("tanh", "tanh", "identity"))

#: v2 cases: (name, dims, activations, loss, batch, steps)
V2_CASES = [
    ("sine-1-64-64-1", *SINE, "mse", 10, 5),
    ("sine-1-40-40-1", (1, 40, 40, 1), ("tanh", "tanh", "identity"), "mse", 10, 5),
    ("sine-1-64-1", (1, 64, 1), ("tanh", "identity"), "mse", 10, 5),
    ("ce-4-64-64-5-relu", (4, 64, 64, 5), ("relu", "relu", "identity"), "cross_entropy", 10, 5),
]
V2_PRECISIONS = ("ieee", "tf32x3", "tf32")
#: v2 launch modes: the meta-step (partials, no per-task outputs) and adapt (per-task outputs); the
#: meta-step also as "meta-step-1" (one task, one program: it applies the update and the guard from its
#: registers, FINALIZE with ONE_TASK, as ``guarded_meta_step`` launches at T = 1)
V2_MODES = ("meta-step", "adapt")

#: v1 cases: (name, dims, activations, loss, batch, forced mode or None)
V1_CASES = [
    ("sine-1-64-64-1", *SINE, "mse", 10, None),
    ("sine-1-64-64-1-tiled", *SINE, "mse", 10, "tiled"),
    ("2-256-256-3", (2, 256, 256, 3), ("tanh", "tanh", "identity"), "mse", 10, None),
]

#: ``--cases grid``: configurations the public API can reach, beyond the records' sine cases:
#: (name, dims, activations, loss, batch, steps); feature sizes 1-64, depths 1-5, batch 1-32,
#: steps 0-16, every activation, MSE and cross-entropy with 2-64 classes
V2_GRID = [
    ("1-1", (1, 1), ("identity",), "mse", 1, 1),
    ("1-2-1", (1, 2, 1), ("tanh", "identity"), "mse", 2, 3),
    ("3-5-2-sigmoid", (3, 5, 2), ("sigmoid", "identity"), "mse", 5, 2),
    ("5-5", (5, 5), ("identity",), "mse", 1, 1),
    ("4x5-narrow-relu", (4, 4, 4, 4, 4, 4), ("relu",) * 4 + ("identity",), "mse", 32, 8),
    ("1-64-1", (1, 64, 1), ("tanh", "identity"), "mse", 10, 5),
    ("sine-1-64-64-1", *SINE, "mse", 10, 5),
    ("sine-b32-s1", *SINE, "mse", 32, 1),
    ("ce-2-16-3-relu", (2, 16, 3), ("relu", "identity"), "cross_entropy", 16, 4),
    ("64-64-sigmoid", (64, 64), ("sigmoid",), "mse", 17, 3),
    ("ce-17-33-64-7", (17, 33, 64, 7), ("tanh", "relu", "identity"), "cross_entropy", 7, 5),
    ("64x5-wide", (64,) * 6, ("tanh",) * 4 + ("identity",), "mse", 10, 5),
    ("1-8x4-1-sigmoid", (1, 8, 8, 8, 8, 1), ("sigmoid",) * 4 + ("identity",), "mse", 4, 2),
    ("64-1", (64, 1), ("identity",), "mse", 3, 2),
    ("1-64", (1, 64), ("identity",), "mse", 3, 2),
    ("ce-4-64-64-5-relu", (4, 64, 64, 5), ("relu", "relu", "identity"), "cross_entropy", 10, 5),
    ("ce-10-64-2", (10, 64, 2), ("relu", "identity"), "cross_entropy", 25, 6),
    ("ce-3-20-64-s0", (3, 20, 64), ("tanh", "identity"), "cross_entropy", 8, 0),
    ("64-3-64", (64, 3, 64), ("tanh", "identity"), "mse", 12, 2),
    ("16-16-16-sigmoid-b1-s16", (16, 16, 16), ("sigmoid", "sigmoid"), "mse", 1, 16),
    ("33-64-64-64-1", (33, 64, 64, 64, 1), ("relu", "tanh", "sigmoid", "identity"), "mse", 16, 5),
]

#: v1 ``--cases grid``: (name, dims, activations, loss, batch, precision[, forced mode]); feature
#: sizes to 256, either variant (chosen by ``choose_launch_config`` unless forced), any batch
V1_GRID = [
    ("1-1", (1, 1), ("identity",), "mse", 1, "ieee"),
    ("sine-1-64-64-1", *SINE, "mse", 10, "tf32x3"),
    ("3-5-2-sigmoid", (3, 5, 2), ("sigmoid", "identity"), "mse", 5, "tf32"),
    ("2-256-256-3", (2, 256, 256, 3), ("tanh", "tanh", "identity"), "mse", 10, "ieee"),
    ("256-256-b1", (256, 256), ("sigmoid",), "mse", 1, "tf32x3"),
    ("1-17-1-b100", (1, 17, 1), ("relu", "identity"), "mse", 100, "ieee"),
    ("ce-64-256", (64, 256), ("identity",), "cross_entropy", 20, "tf32"),
    ("64x5-wide", (64,) * 6, ("tanh",) * 4 + ("identity",), "mse", 10, "ieee"),
    ("ce-4-64-64-5-relu", (4, 64, 64, 5), ("relu", "relu", "identity"), "cross_entropy", 10, "ieee"),
    ("1-200-3-b33", (1, 200, 3), ("tanh", "identity"), "mse", 33, "tf32x3"),
    # the largest tile a forced registers variant may hold (mlp_inner_loop._REGISTERS_MAX_TILE)
    ("128-256-forced-registers", (128, 256), ("identity",), "mse", 10, "ieee", "registers"),
]

PTX_FACTS = {"mma": r"\bmma\.sync", "wgmma": r"\bwgmma\.", "ex2.approx": r"\bex2\.approx",
             "lg2.approx": r"\blg2\.approx", "div.full": r"\bdiv\.full", "div.rn": r"\bdiv\.rn",
             "ld.local": r"\bld\.local", "st.local": r"\bst\.local"}


def ptxas_path():
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)


def _ptxas(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.ptx"
        f.write_text(ptx)
        out = subprocess.run([str(ptxas_path()), f"-arch=sm_{arch}a", "-v", str(f), "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "stack_frame_bytes": int(stack.group(1)) if stack else None}


def nvdisasm_path():
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return p if p.exists() else None


#: SASS opcodes counted in the inner-step loop (``sass_loop_facts``)
SASS_COUNTED = ("BAR", "FFMA", "LDS", "STS", "SHFL", "LDL", "STL", "LDG", "STG", "MUFU", "HMMA", "HGMMA")


def sass_loop_facts(cubin: bytes) -> Optional[dict]:
    """Static counts of the kernel's SASS (nvdisasm from the Triton wheel) in its largest innermost
    loop — for kernel v2 with its weights in registers, the inner-step loop (streamed layers: one
    of their K-loops): instructions issued per step by each thread, barriers (``BAR``),
    shared-memory (``LDS``/``STS``), shuffles, spills (``LDL``/``STL``), global loads and stores,
    special-function (``MUFU``) and tensor-core (``HMMA``: mma.sync, ``HGMMA``: wgmma) instructions
    (a loop is a branch back to an earlier label, ``BRA`` with any modifier).  A one-warp-per-
    scheduler program (T = 1) waits out every barrier and dependent latency, so these counts are the
    latency proxy available without a GPU; ``loops``: the same counts for every loop, in code
    order; ``outside_loops``: for the code outside every loop.  None without nvdisasm."""
    tool = nvdisasm_path()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        sass = subprocess.run([str(tool), "-c", str(f)], capture_output=True, text=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(sass)
             if (m := re.search(r"\bBRA(?:\.[A-Z]+)*\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    innermost = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops if (c, d) != (a, b))]
    if not innermost:
        return {"loop": None}

    def ops(lines):
        return [m.group(2) for line in lines
                if (m := re.match(r"\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line))]

    def counts(lines):
        body = ops(lines)
        # shared-memory accesses by width (LDS = 32-bit, LDS.64, LDS.128): what a warp's access can
        # cost in wavefronts depends on it
        widths = [m.group(1) for line in lines
                  if (m := re.match(r"\s*/\*[0-9a-f]+\*/\s*(?:@!?U?P\w+\s+)?((?:LDS|STS)(?:\.U?(?:64|128))?)\b", line))]
        return {"instructions": len(body), **{k: body.count(k) for k in SASS_COUNTED},
                "shared_by_width": {w: widths.count(w) for w in sorted(set(widths))}}

    a, b = max(innermost, key=lambda ab: len(ops(sass[ab[0]:ab[1] + 1])))
    inside = set()
    for c, d in loops:
        inside.update(range(c, d + 1))
    # every loop (nested ones counted in each enclosing loop too) in code order, and the code outside
    # all loops (run once per program, or once per task in a task loop)
    return {"loop": counts(sass[a:b + 1]),
            "loops": [counts(sass[c:d + 1]) for c, d in sorted(set(loops))],
            "outside_loops": counts([line for i, line in enumerate(sass) if i not in inside]),
            "kernel_instructions": len(ops(sass))}


def facts(kernel, arch: int) -> dict:
    """Registers / spills (ptxas -v), shared bytes and PTX instruction counts of a CompiledKernel.

    A kernel compiled with a register cap (PTX ``.maxnreg``: v2's streamed variant) also gets
    ``maxnreg`` and ``uncapped``: ptxas -v of the same PTX without the cap (what ptxas would
    choose on its own)."""
    ptx = kernel.asm["ptx"]
    # global scratch: a kernel that needs it makes every launch call Triton's runtime allocator
    # (an error unless one is set; an allocation inside a CUDA-graph capture)
    row = {"shared_bytes": kernel.metadata.shared,
           "global_scratch_bytes": getattr(kernel.metadata, "global_scratch_size", None),
           "ptx": {k: len(re.findall(p, ptx)) for k, p in PTX_FACTS.items()}}
    if ptxas_path() is None:
        row["ptxas"] = "not found in the Triton wheel"
        return row
    row.update(_ptxas(ptx, arch))
    cubin = kernel.asm.get("cubin")
    if cubin:
        row["sass"] = sass_loop_facts(cubin)
    cap = re.search(r"^\.maxnreg (\d+)", ptx, flags=re.M)
    if cap:
        row["maxnreg"] = int(cap.group(1))
        row["uncapped"] = _ptxas(re.sub(r"^\.maxnreg \d+\n", "", ptx, flags=re.M), arch)
    return row


#: called with every finished row (``main`` rewrites ``--out`` with the rows so far)
_on_row = None


def _record(row: dict, compile_fn, arch: int, log) -> dict:
    """``row`` completed with ``facts`` of ``compile_fn()`` (or the error) and the compile time."""
    t0 = time.perf_counter()
    try:
        row.update(facts(compile_fn(), arch))
    except Exception as exc:  # noqa: BLE001 - recorded per case
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    row["compile_seconds"] = round(time.perf_counter() - t0, 2)
    if log:
        log(line(row))
    if _on_row is not None:
        _on_row(row)
    return row


def v2_rows(arch: int = 90, warps=(4, 8), cases=V2_CASES, precisions=V2_PRECISIONS, modes=V2_MODES,
            streams=(False, True), preloads=(None, "prefetch"), log=None):
    """Compile kernel v2 for every case x precision x mode x warps (and the streamed variant,
    whose wide layers ignore the precision: "ieee" only; and minibatches prefetched a step ahead,
    ``V2Config(preload="prefetch")``, in "ieee" meta-steps); one dict per compile."""
    import triton

    from reptile_fast.kernels import mlp_meta_step_v2 as V

    combos = [(prec, mode, nw, False, None) for prec in precisions for mode in modes for nw in warps]
    if True in streams:
        combos += [("ieee", mode, nw, True, None) for mode in modes for nw in warps]
    if "meta-step" in modes:  # one program finishing the meta-step itself (FINALIZE: meta-batch 1)
        combos += [("ieee", "meta-step-1", nw, stream, None) for stream in streams for nw in warps]
        combos += [("ieee", mode, nw, False, pre) for pre in preloads if pre is not None
                   for mode in ("meta-step", "meta-step-1") for nw in warps]
    rows = []
    for name, dims, acts, loss, batch, steps in cases:
        for prec, mode, nw, stream, pre in combos:
            kernel = "v2-stream" if stream else f"v2-{pre}" if pre else "v2"
            row = {"kernel": kernel, "case": name, "dims": list(dims),
                   "activations": list(acts), "loss": loss, "batch": batch, "steps": steps, "precision": prec,
                   "mode": mode, "num_warps": nw, "arch": f"sm_{arch}a", "triton": triton.__version__}

            def build(dims=dims, acts=acts, loss=loss, batch=batch, steps=steps, prec=prec, mode=mode, nw=nw,
                      stream=stream, pre=pre):
                return V.compile_for_target(dims, acts, loss=loss, batch=batch, steps=steps, precision=prec,
                                            config=V.V2Config(num_warps=nw, stream=stream, preload=pre), arch=arch,
                                            accumulate=mode.startswith("meta-step"), write_adapted=mode == "adapt",
                                            write_losses=mode == "adapt", finalize=mode == "meta-step-1",
                                            one_task=mode == "meta-step-1",
                                            ones=("n_tasks", "n_programs") if mode == "meta-step-1" else ())
            rows.append(_record(row, build, arch, log))
    return rows


def v1_rows(arch: int = 90, cases=V1_CASES, precisions=("ieee", "tf32x3", "tf32"), log=None):
    import triton

    from reptile_fast.kernels import mlp_inner_loop as K

    rows = []
    for name, dims, acts, loss, batch, mode in cases:
        for prec in precisions:
            config = K.choose_launch_config(dims, batch, mode=mode)
            row = {"kernel": "v1", "case": name, "dims": list(dims), "activations": list(acts), "loss": loss,
                   "batch": batch, "precision": prec, "mode": config.mode, "num_warps": config.num_warps,
                   "arch": f"sm_{arch}a", "triton": triton.__version__}
            rows.append(_record(row, lambda: K.compile_for_target(dims, acts, loss=loss, batch=batch, precision=prec,
                                                                  config=config, arch=arch), arch, log))
    return rows


def guard_rows(arch: int = 90, log=None):
    """The fused stepper's accept-or-skip kernel (``kernels/meta_step_guard.py``): one row."""
    import triton

    from reptile_fast.kernels import meta_step_guard as G

    row = {"kernel": "guard", "case": "accept_step", "precision": "-", "mode": "1 program", "num_warps": 4,
           "arch": f"sm_{arch}a", "triton": triton.__version__}
    return [_record(row, lambda: G.compile_for_target(arch), arch, log)]


def grid_rows(arch: int = 90, log=None):
    """The ``--cases grid`` compiles: every ``V2_GRID`` case as a meta-step ("ieee"), adapt
    ("tf32x3") and a one-program meta-step ("tf32", FINALIZE, compiled as the JIT compiles a
    meta-batch-1 launch: ``n_tasks`` and ``n_programs`` the constant 1, ``batch`` too when 1),
    plus the streamed variant of each when the model has a wide x wide layer; every ``V1_GRID``
    case at its precision; the guard."""
    import triton

    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    rows = []
    for name, dims, acts, loss, batch, steps in V2_GRID:
        combos = [("ieee", "meta-step", False), ("tf32x3", "adapt", False), ("tf32", "meta-step-1", False)]
        if any(V.uses_dot(dims)):
            combos += [("ieee", "meta-step", True), ("tf32", "adapt", True), ("ieee", "meta-step-1", True)]
        for prec, mode, stream in combos:
            config = V.V2Config(stream=stream)
            ones = (("n_tasks", "n_programs") if mode == "meta-step-1" else ()) + (("batch",) if batch == 1 else ())
            row = {"kernel": "v2-stream" if stream else "v2", "case": name, "dims": list(dims),
                   "activations": list(acts), "loss": loss, "batch": batch, "steps": steps, "precision": prec,
                   "mode": mode, "num_warps": V.num_warps_for(dims, config), "ones": list(ones), "arch": f"sm_{arch}a",
                   "triton": triton.__version__}

            def build(dims=dims, acts=acts, loss=loss, batch=batch, steps=steps, prec=prec, mode=mode,
                      config=config, ones=ones):
                return V.compile_for_target(dims, acts, loss=loss, batch=batch, steps=steps, precision=prec,
                                            config=config, arch=arch, accumulate=mode.startswith("meta-step"),
                                            write_adapted=mode == "adapt", write_losses=mode == "adapt",
                                            finalize=mode == "meta-step-1", one_task=mode == "meta-step-1",
                                            ones=ones)
            rows.append(_record(row, build, arch, log))
    for name, dims, acts, loss, batch, prec, *forced in V1_GRID:
        config = K.choose_launch_config(dims, batch, mode=forced[0] if forced else None)
        row = {"kernel": "v1", "case": name, "dims": list(dims), "activations": list(acts), "loss": loss,
               "batch": batch, "precision": prec, "mode": config.mode, "num_warps": config.num_warps,
               "arch": f"sm_{arch}a", "triton": triton.__version__}
        rows.append(_record(row, lambda dims=dims, acts=acts, loss=loss, batch=batch, prec=prec, config=config:
                            K.compile_for_target(dims, acts, loss=loss, batch=batch, precision=prec, config=config,
                                                 arch=arch), arch, log))
    return rows + guard_rows(arch, log=log)


def line(r: dict) -> str:
    head = f"{r['kernel']} {r['case']:22s} {r['precision']:6s} {r['mode']:9s} w{r['num_warps']}"
    if "error" in r:
        return f"{head}: ERROR {r['error'][:200]}"
    p = r.get("ptx", {})
    cap = (f" (cap {r['maxnreg']}; uncapped {r['uncapped']['registers']} regs, spill "
           f"{r['uncapped']['spill_store_bytes']}/{r['uncapped']['spill_load_bytes']} B)") if "maxnreg" in r else ""
    return (f"{head}: {r.get('registers')} regs, spill {r.get('spill_store_bytes')}/{r.get('spill_load_bytes')} B{cap}, "
            f"shared {r.get('shared_bytes')} B, mma {p.get('mma')} wgmma {p.get('wgmma')} "
            f"ex2.approx {p.get('ex2.approx')} div.full {p.get('div.full')} div.rn {p.get('div.rn')}{_sass_line(r)}")


def _sass_line(r: dict) -> str:
    loop = (r.get("sass") or {}).get("loop")
    if not loop:
        return ""
    return (f"; largest inner loop {loop['instructions']} instr, {loop['BAR']} BAR, {loop['FFMA']} FFMA, "
            f"{loop['LDS']}/{loop['STS']} LDS/STS, {loop['LDL']}/{loop['STL']} LDL/STL, {loop['LDG']} LDG")


def dot_operand_bytes(ttgir: str) -> list:
    """Per ``tt.dot`` of a kernel's TTGIR whose output has a blocked layout (Triton's fp32 FMA dot):
    its shape ``[M, K] x [K, N]``, the output layout's ``sizePerThread`` / ``threadsPerWarp`` /
    ``warpsPerCTA``, and ``operand_bytes``: the bytes of A and B the warps need from shared memory
    per product, each warp reading every element its output tile needs once -- Σ over warps of
    (its distinct rows + its distinct columns) x K x 4.  A layout fact (bank conflicts only add
    wavefronts on top; a GPU's profiler measures those).  A dim whose layout tile (size x threads x
    warps) exceeds the shape holds copies: a warp covers min(shape, size x threads) of it."""
    layouts = {}
    for m in re.finditer(r"^#(blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = "
                         r"\[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\]", ttgir, flags=re.M):
        layouts[m.group(1)] = [[int(v) for v in g.split(",")] for g in m.groups()[1:]]
    out = []
    for m in re.finditer(r"tt\.dot [^:\n]*: tensor<(\d+)x(\d+)xf32,[^\n]*?\*\s*tensor<(\d+)x(\d+)xf32,[^\n]*?->\s*"
                         r"tensor<(\d+)x(\d+)xf32, #(blocked\d*)>", ttgir):
        M, K, _, N = (int(v) for v in m.groups()[:4])
        lay = layouts.get(m.group(7))
        if lay is None:
            continue
        spt, tpw, wpc = lay
        per_warp = [shape // w if shape >= s * t * w else min(shape, s * t)
                    for shape, s, t, w in zip((M, N), spt, tpw, wpc)]
        warps = wpc[0] * wpc[1]
        out.append({"shape": [M, K, N], "sizePerThread": spt, "threadsPerWarp": tpw, "warpsPerCTA": wpc,
                    "operand_bytes": warps * (per_warp[0] + per_warp[1]) * K * 4})
    return out


#: SASS counts an option record keeps per variant (``option_rows``)
OPTION_COUNTS = ("instructions", "BAR", "LDS", "STS", "SHFL", "FFMA", "LDL", "STL", "shared_by_width")


def option_rows(option: str, variants, cases, arch: int = 90, log=None, default=None) -> list:
    """One row per case: kernel v2's fused meta-step compiled with ``V2Config(option=value)`` for each
    ``(label, value)`` of ``variants`` (value None: the kernel's own choice); per variant: registers,
    spill and the largest inner loop's ``OPTION_COUNTS`` (``sass_loop_facts``), or the error.

    cases: ``(name, dims, activations, loss, batch, steps, one_task, precision[, num_warps])``;
    ``one_task``: compiled as ``guarded_meta_step`` launches at T = 1 (one program, FINALIZE).
    default: ``(dims, batch, steps, precision) -> bool``, the kernel's choice, recorded per row."""
    import triton

    from reptile_fast.kernels import mlp_meta_step_v2 as V

    out = []
    for name, dims, acts, loss, batch, steps, one, precision, *warps in cases:
        nw = warps[0] if warps else None
        row = {"case": name, "dims": list(dims), "loss": loss, "batch": batch, "steps": steps, "precision": precision,
               "mode": "meta-step-1" if one else "meta-step", "num_warps": V.num_warps_for(dims, V.V2Config(num_warps=nw)),
               "arch": f"sm_{arch}a", "triton": triton.__version__}
        if default is not None:
            row[f"{option}_by_default"] = default(dims, batch, steps, precision)
        for label, value in variants:
            kw = dict(finalize=True, one_task=True, ones=("n_tasks", "n_programs")) if one else {}
            try:
                k = V.compile_for_target(dims, acts, loss=loss, batch=batch, steps=steps, precision=precision,
                                         config=V.V2Config(num_warps=nw, **{option: value}), accumulate=True, **kw)
                f = facts(k, arch)
                loop = (f.get("sass") or {}).get("loop") or {}
                dots = dot_operand_bytes(k.asm["ttgir"])
                row[label] = {"registers": f.get("registers"), "spill_store_bytes": f.get("spill_store_bytes"),
                              **{c: loop.get(c) for c in OPTION_COUNTS},
                              "dot_operand_bytes": sum(d["operand_bytes"] for d in dots), "dots": dots}
            except Exception as exc:  # noqa: BLE001 - recorded per case
                row[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        out.append(row)
        if log:
            log(f"{name} {precision} w{row['num_warps']}: " + "; ".join(
                f"{label} {r.get('instructions')} instr, {r.get('BAR')} BAR, {r.get('LDS')}/{r.get('STS')} LDS/STS, "
                f"{r.get('LDL')}/{r.get('STL')} LDL/STL, {r.get('registers')} regs, {r.get('spill_store_bytes')} B spill, "
                f"{r.get('dot_operand_bytes')} B dot operands"
                for label, r in ((lab, row[lab]) for lab, _ in variants)))
    return out


def record_main(module: str, doc: str, rows_fn, note: str, argv=None) -> int:
    """The command line of a compile-only record (``python -m bench.MODULE [--arch 90] [--out FILE]``):
    refuses ``TRITON_INTERPRET=1``, runs ``rows_fn(arch, log=print)`` and writes ``{stamp, note,
    rows}`` to ``--out`` atomically (a temporary file, then a rename)."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", help="write {stamp, note, rows} JSON here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the JIT kernels")
    result = rows_fn(args.arch, log=print)
    if args.out:
        from bench.env import machine_stamp

        stamp = {**machine_stamp(), "python_executable": sys.executable,
                 "command": " ".join([f"python -m bench.{module}", *(argv if argv is not None else sys.argv[1:])])}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "note": note, "rows": result}, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("v1", "v2", "all"), default="v2")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cases", choices=("all", "gpu", "smoke", "grid"), default="all",
                    help="all: every case (the records in bench/results); gpu: the sine MLP, every precision "
                         "and mode at 4 and 8 warps, plus v1 (the GPU check's stage 2); smoke: one compile each; "
                         "grid: V2_GRID / V1_GRID, the configurations the public API can reach (--kernel ignored)")
    ap.add_argument("--out", help="write {stamp, rows} JSON here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the JIT kernels")
    global _on_row
    rows, done = [], []
    stamp = None

    def write(rows):
        nonlocal stamp
        if stamp is None:
            from bench.env import machine_stamp

            stamp = {**machine_stamp(), "python_executable": sys.executable,
                     "command": " ".join(["python -m bench.triton_compile", *(argv if argv is not None else sys.argv[1:])]),
                     "ptxas": str(ptxas_path())}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "note": "compile only (no GPU): registers and spills from "
                                   "ptxas -v of the Triton wheel; PTX facts are instruction counts", "rows": rows},
                                  indent=1) + "\n")
        tmp.replace(args.out)

    if args.out:
        # rewritten after every compile: the GPU check kills this process at its stage's time cap
        # and reads the rows done by then
        _on_row = lambda row: (done.append(row), write(done))  # noqa: E731
    v2_kw = {"all": {}, "gpu": {"cases": V2_CASES[:1]},
             "smoke": {"cases": V2_CASES[:1], "precisions": ("ieee",), "modes": ("meta-step",), "warps": (8,),
                       "streams": (False,), "preloads": (None,)}}
    v1_kw = {"all": {}, "gpu": {"cases": V1_CASES[:1]}, "smoke": {"cases": V1_CASES[:1], "precisions": ("ieee",)}}
    if args.cases == "grid":
        rows += grid_rows(args.arch, log=print)
    elif args.kernel in ("v2", "all"):
        rows += v2_rows(args.arch, log=print, **v2_kw[args.cases])
        rows += guard_rows(args.arch, log=print)
    if args.kernel in ("v1", "all") and args.cases != "grid":
        rows += v1_rows(args.arch, log=print, **v1_kw[args.cases])
    _on_row = None
    if args.out:
        write(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
