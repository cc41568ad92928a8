"""Shared memory of forced kernel launches, as Triton's compiler allocates it (sm_90a, no GPU).

    python -m bench.triton_shared --out bench/results/triton-shared-sm90-triton3.8.json [--full N]
    python -m bench.triton_shared --kernel validate --out bench/results/triton-shared-sm90-validate-triton3.8.json
    python -m bench.triton_shared --kernel loss --out bench/results/triton-shared-sm90-loss-triton3.8.json
    python -m bench.triton_shared --kernel v2-preload --out bench/results/triton-v2-preload-sm90-triton3.8.json

A launch whose kernel needs more shared memory than a CUDA block may use (232,448 B on sm_90)
fails on a GPU with Triton's ``OutOfResources``; the interpreter has no such limit.  The number
Triton checks at launch is ``metadata.shared``, the ``ttg.shared`` attribute that the
``allocate_shared_memory_nv`` pass writes on the TritonGPU module at the start of ``make_llir``.
Nothing after that pass changes it, so this script compiles TTIR -> TTGIR as usual, runs the
passes of ``make_llir`` up to and including that allocation, and stops there: the same number
without the LLVM optimisation and ptxas runs, which take minutes for big FMA-dot blocks (one
16 x 256 x 256 compile took 219 s here).  ``--full N`` also runs the whole compile for the first N
grid rows whose fast number is below ``--full-below`` bytes, and ``--kernel validate`` does so
for ``VALIDATE_ROWS``, recording both numbers (``full_shared_bytes``): the check that the
shortcut is the compiler's number.

Rows: v1's tiled variant over block_m / block_n / block_k (one axis at a time from the default
and the corners), num_stages 1-3, num_warps 1-32, every precision; v1's registers variant at
its tile limit with stages / warps forced; v2's forced options (warps, stream, accumulate,
preload with many steps).  The model that the library refuses with
(``mlp_inner_loop.tiled_shared_bytes``) is compared with these rows by
``tests/test_review_qa36.py`` (a record test: no compile in CI).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path


class _SharedOnly(Exception):
    """Raised by the shortened ``llir`` stage with the allocated shared bytes."""

    def __init__(self, shared):
        super().__init__(shared)
        self.shared = shared


@contextlib.contextmanager
def _stop_after_shared_allocation():
    """Within: ``triton.compile`` for CUDA raises ``_SharedOnly(shared)`` right after the shared
    memory allocation (the first passes of ``CUDABackend.make_llir``, in its order)."""
    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.nvidia import compiler as NV

    orig = NV.CUDABackend.add_stages

    def add_stages(self, stages, options, language):
        orig(self, stages, options, language)
        capability = int(self._parse_arch(options.arch))

        def llir(src, metadata):
            ptx_version = NV.get_ptx_version_from_options(options, self.target.arch)
            pm = ir.pass_manager(src.context)
            passes.ttgpuir.add_combine_tensor_select_and_if(pm)
            try:
                passes.ttgpuir.add_allocate_warp_groups(pm, False)  # Triton >= 3.7: (pm, consan)
            except TypeError:
                passes.ttgpuir.add_allocate_warp_groups(pm)  # Triton 3.6
            passes.convert.add_scf_to_cf(pm)
            passes.gluon.add_inliner(pm)
            nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, capability, ptx_version)
            pm.run(src, "shared_only")
            raise _SharedOnly(src.get_int_attr("ttg.shared"))

        stages["llir"] = llir

    NV.CUDABackend.add_stages = add_stages
    try:
        yield
    finally:
        NV.CUDABackend.add_stages = orig


def shared_bytes(compile_fn) -> int:
    """``metadata.shared`` of the kernel ``compile_fn()`` would compile, without LLVM / ptxas."""
    with _stop_after_shared_allocation():
        try:
            kernel = compile_fn()
        except _SharedOnly as stop:
            return int(stop.shared or 0)
    return int(kernel.metadata.shared)  # a cache hit returns the whole compiled kernel


#: models compiled for v1: every dot site of the tiled kernel (forward, input gradient, weight
#: gradient) and a 256-wide loss tile (cross-entropy over 256 classes)
V1_MODELS = {
    "2-256-256-3": ((2, 256, 256, 3), ("tanh", "tanh", "identity"), "mse", 10),
    "ce-256-256-256": ((256, 256, 256), ("relu", "identity"), "cross_entropy", 64),
}
BLOCKS = (16, 32, 64, 128, 256)


def v1_tiled_grid():
    """(model, block_m, block_n, block_k, num_stages, num_warps, precision) of the v1 tiled rows."""
    default = (16, 64, 32)
    shapes = set()
    for axis in range(3):
        for v in BLOCKS:
            s = list(default)
            s[axis] = v
            shapes.add(tuple(s))
    # two axes at once, and the corners
    for a, b in ((16, 256), (32, 128), (64, 64), (128, 32), (256, 16), (64, 128), (128, 64), (128, 128),
                 (256, 64), (64, 256), (256, 256)):
        shapes |= {(16, a, b), (a, 16, b), (a, b, 16), (32, a, b)}
    shapes |= {(64, 128, 128), (128, 128, 128), (64, 256, 64), (256, 64, 64), (256, 256, 256),
               (128, 256, 64), (64, 64, 256), (32, 256, 128), (32, 128, 256)}
    rows = []
    for shape in sorted(shapes):
        for prec, stages in itertools.product(("ieee", "tf32x3", "tf32"), (1, 2, 3)):
            rows.append(("2-256-256-3", *shape, stages, 4, prec))
    # 4 stages, and 8 warps at every precision, on shapes near the limit
    for shape in ((16, 64, 128), (32, 64, 64), (64, 64, 64), (16, 128, 64)):
        for prec in ("ieee", "tf32x3", "tf32"):
            rows.append(("2-256-256-3", *shape, 4, 4, prec))
    for shape in ((16, 128, 128), (32, 128, 128), (64, 64, 256), (128, 256, 64), (64, 128, 128), (128, 64, 128)):
        for prec, stages in itertools.product(("ieee", "tf32x3", "tf32"), (1, 2, 3)):
            rows.append(("2-256-256-3", *shape, stages, 8, prec))
    # warps and the cross-entropy model on a few shapes
    for shape in ((16, 64, 32), (16, 256, 256), (64, 128, 64), (256, 256, 16), (128, 128, 128)):
        for nw in (1, 2, 8, 16, 32):
            rows.append(("2-256-256-3", *shape, 1, nw, "ieee"))
            rows.append(("2-256-256-3", *shape, 3, nw, "tf32"))
        for prec, stages in itertools.product(("ieee", "tf32"), (1, 3)):
            rows.append(("ce-256-256-256", *shape, stages, 4, prec))
    return rows


def v1_rows(log=print, full=0, full_below=120_000):
    import triton

    from reptile_fast.kernels import mlp_inner_loop as K

    out = []
    for model, bm, bn, bk, stages, nw, prec in v1_tiled_grid():
        dims, acts, loss, batch = V1_MODELS[model]
        config = K.LaunchConfig(mode="tiled", num_warps=nw, num_stages=stages, block_m=bm, block_n=bn, block_k=bk)
        row = {"kernel": "v1-tiled", "model": model, "dims": list(dims), "loss": loss, "batch": batch,
               "block_m": bm, "block_n": bn, "block_k": bk, "num_stages": stages, "num_warps": nw,
               "precision": prec, "arch": "sm_90a", "triton": triton.__version__}

        def build(dims=dims, acts=acts, loss=loss, batch=batch, prec=prec, config=config):
            return K.compile_for_target(dims, acts, loss=loss, batch=batch, precision=prec, config=config)
        out.append(_measure(row, build, log, full, full_below))
    # the registers variant at its tile limit (128 x 256), stages and warps forced
    for (dims, batch), stages, nw in itertools.product((((128, 256), 10), ((1, 64, 1), 512), ((1, 64, 64, 1), 10)),
                                                      (1, 2, 3), (4, 8, 16)):
        config = K.choose_launch_config(dims, batch, mode="registers", num_warps=nw, num_stages=stages)
        acts = ("tanh",) * (len(dims) - 2) + ("identity",)
        row = {"kernel": "v1-registers", "model": "-".join(map(str, dims)), "dims": list(dims), "loss": "mse",
               "batch": batch, "block_b": config.block_b, "num_stages": stages, "num_warps": nw,
               "precision": "ieee", "arch": "sm_90a", "triton": triton.__version__}

        def build(dims=dims, acts=acts, batch=batch, config=config):
            return K.compile_for_target(dims, acts, batch=batch, config=config)
        out.append(_measure(row, build, log, 0, 0))
    return out


#: v2 models at its limits (features <= 64, batch <= 32): (name, dims, activations, loss, batch)
V2_MODELS = (
    ("sine-1-64-64-1", (1, 64, 64, 1), ("tanh", "tanh", "identity"), "mse", 10),
    ("64x5-b32", (64,) * 6, ("tanh",) * 4 + ("identity",), "mse", 32),
    ("ce-64-64-64-b32", (64, 64, 64), ("relu", "identity"), "cross_entropy", 32),
)


def v2_rows(log=print):
    import triton

    from reptile_fast.kernels import mlp_meta_step_v2 as V

    out = []
    for (name, dims, acts, loss, batch), steps, nw, stream, acc, preload, prec in itertools.product(
            V2_MODELS, (5, 64), (1, 4, 16), (False, True), ("registers", "memory"), (False, True),
            ("ieee", "tf32x3")):
        if stream and prec != "ieee":
            continue  # streamed layers ignore the precision
        config = V.V2Config(num_warps=nw, stream=stream, accumulate=acc, preload=preload)
        row = {"kernel": "v2-stream" if stream else "v2", "model": name, "dims": list(dims), "loss": loss,
               "batch": batch, "steps": steps, "num_warps": nw, "accumulate": acc, "preload": preload,
               "precision": prec, "mode": "meta-step", "arch": "sm_90a", "triton": triton.__version__}

        def build(dims=dims, acts=acts, loss=loss, batch=batch, steps=steps, prec=prec, config=config):
            return V.compile_for_target(dims, acts, loss=loss, batch=batch, steps=steps, precision=prec,
                                        config=config)
        out.append(_measure(row, build, log, 0, 0))
    return out


#: ``--validate``: v1 tiled rows compiled twice, through the shortcut and whole (LLVM, ptxas):
#: every precision x stages at the default blocks, wgmma / mma.sync / FMA paths at bigger blocks
VALIDATE_ROWS = ([("2-256-256-3", 16, 64, 32, s, 4, p) for p in ("ieee", "tf32x3", "tf32") for s in (1, 2, 3)]
                 + [("2-256-256-3", 64, 64, 32, 3, 4, "tf32"), ("2-256-256-3", 64, 64, 32, 2, 4, "tf32x3"),
                    ("2-256-256-3", 64, 128, 16, 2, 4, "tf32"), ("2-256-256-3", 128, 128, 16, 3, 4, "ieee"),
                    ("2-256-256-3", 16, 64, 32, 3, 1, "tf32"), ("ce-256-256-256", 16, 64, 32, 1, 4, "ieee")])


def validate_rows(log=print):
    """``VALIDATE_ROWS`` with ``shared_bytes`` (shortcut) and ``full_shared_bytes`` (whole compile)."""
    import triton

    from reptile_fast.kernels import mlp_inner_loop as K

    out = []
    for model, bm, bn, bk, stages, nw, prec in VALIDATE_ROWS:
        dims, acts, loss, batch = V1_MODELS[model]
        config = K.LaunchConfig(mode="tiled", num_warps=nw, num_stages=stages, block_m=bm, block_n=bn, block_k=bk)
        row = {"kernel": "v1-tiled", "model": model, "dims": list(dims), "loss": loss, "batch": batch,
               "block_m": bm, "block_n": bn, "block_k": bk, "num_stages": stages, "num_warps": nw,
               "precision": prec, "arch": "sm_90a", "triton": triton.__version__}

        def build(dims=dims, acts=acts, loss=loss, batch=batch, prec=prec, config=config):
            return K.compile_for_target(dims, acts, loss=loss, batch=batch, precision=prec, config=config)
        out.append(_measure(row, build, log, 1 << 30, 1 << 30))
    return out


#: ``--kernel loss``: the loss tile ``[BLOCK_M, padded outputs]`` (up to 256 x 256) next to narrow
#: dot blocks, at a large runtime batch, for MSE and cross-entropy over 256 classes
LOSS_MODELS = (((256, 256, 256), ("relu", "identity"), "cross_entropy"), ((2, 256), ("sigmoid",), "mse"),
               ((256, 3, 256), ("tanh", "identity"), "cross_entropy"))


def loss_rows(log=print):
    import triton

    from reptile_fast.kernels import mlp_inner_loop as K

    out = []
    for (dims, acts, loss), (bm, bn, bk), prec in itertools.product(
            LOSS_MODELS, ((256, 16, 16), (128, 16, 16), (256, 32, 16), (64, 16, 16), (16, 16, 16)), ("ieee", "tf32")):
        config = K.LaunchConfig(mode="tiled", num_warps=4, block_m=bm, block_n=bn, block_k=bk)
        row = {"kernel": "v1-tiled", "model": "-".join(map(str, dims)) + f"-{loss}", "dims": list(dims), "loss": loss,
               "batch": 300, "block_m": bm, "block_n": bn, "block_k": bk, "num_stages": 1, "num_warps": 4,
               "precision": prec, "arch": "sm_90a", "triton": triton.__version__}

        def build(dims=dims, acts=acts, loss=loss, prec=prec, config=config):
            return K.compile_for_target(dims, acts, loss=loss, batch=300, precision=prec, config=config)
        out.append(_measure(row, build, log, 0, 0))
    return out


def v2_preload_rows(log=print):
    """``--kernel v2-preload``: kernel v2 with ``preload=True`` forced on a plan far beyond
    ``PRELOAD_LIMIT`` (64-64-64 at batch 32), compiled whole: registers, spills and the stack
    frame (per-thread local memory) from ptxas -v, and the compile time."""
    import triton

    from bench.triton_compile import facts
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    out = []
    for steps, nw in ((16, 4), (64, 4), (16, 1)):
        row = {"kernel": "v2", "model": "64-64-64-b32", "dims": [64, 64, 64], "loss": "mse", "batch": 32,
               "steps": steps, "num_warps": nw, "preload": True, "precision": "ieee", "mode": "meta-step",
               "arch": "sm_90a", "triton": triton.__version__}
        t0 = time.perf_counter()
        try:
            kernel = V.compile_for_target((64, 64, 64), ("relu", "identity"), batch=32, steps=steps,
                                          config=V.V2Config(num_warps=nw, preload=True))
            f = facts(kernel, 90)
            f.pop("ptx", None)
            row.update(f)
        except Exception as exc:  # noqa: BLE001 - recorded per row
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if log:
            log(row)
        out.append(row)
    return out


_full_done = [0]


def _measure(row, build, log, full, full_below):
    t0 = time.perf_counter()
    try:
        row["shared_bytes"] = shared_bytes(build)
    except Exception as exc:  # noqa: BLE001 - recorded per row
        row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    if "error" not in row and _full_done[0] < full and row["shared_bytes"] < full_below:
        _full_done[0] += 1
        t0 = time.perf_counter()
        row["full_shared_bytes"] = int(build().metadata.shared)
        row["full_seconds"] = round(time.perf_counter() - t0, 2)
    if log:
        keys = ("kernel", "model", "block_b", "block_m", "block_n", "block_k", "steps", "accumulate", "preload",
                "num_stages", "num_warps", "precision", "shared_bytes", "full_shared_bytes", "error")
        log(" ".join(f"{k}={row[k]}" for k in keys if k in row))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel", choices=("v1", "v2", "all", "validate", "loss", "v2-preload"), default="all",
                    help="validate: only VALIDATE_ROWS, each also compiled whole (full_shared_bytes); "
                         "loss: only the loss-tile rows (LOSS_MODELS); v2-preload: whole compiles of forced preloads")
    ap.add_argument("--full", type=int, default=0, help="whole compiles for the first N v1 rows (validation)")
    ap.add_argument("--full-below", type=int, default=120_000,
                    help="only rows whose shared bytes are below this get a whole compile (big ones take minutes)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the JIT kernels")
    from bench.env import command_line, machine_stamp

    stamp = {**machine_stamp(), "command": command_line("python", "-m", "bench.triton_shared",
                                                        *(argv if argv is not None else sys.argv[1:]))}
    rows = {"validate": validate_rows, "loss": loss_rows, "v2-preload": v2_preload_rows}.get(args.kernel, list)()
    if args.kernel in ("v1", "all"):
        rows += v1_rows(full=args.full, full_below=args.full_below)
    if args.kernel in ("v2", "all"):
        rows += v2_rows()
    Path(args.out).write_text(json.dumps({
        "stamp": stamp, "limit_bytes_sm90": 232448,
        "note": "shared_bytes: Triton's ttg.shared after its allocate_shared_memory_nv pass (what metadata.shared "
                "holds and the launch checks), for sm_90a; full_shared_bytes: the same from a whole compile",
        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
