"""Every Triton launch the GPU check and the sweep make, compiled through Triton's own JIT path
for an H100/H200 (sm_90a) on a machine without a GPU: the exact specializations a GPU run builds.

    TRITON_CACHE_DIR=$(mktemp -d) python -m bench.jit_launches [--out bench/results/FILE.json] [--quick]

(a fresh cache: with a warm one every compile is a cache hit and ``compile_seconds`` says nothing)

``bench.triton_compile`` compiles each kernel from a signature written by hand (every int "i32",
no alignment attributes).  A real launch goes through ``JITFunction.run``, whose binder
specializes on the arguments: ints equal to 1 become constants, ints and pointers divisible by
16 get alignment attributes, and options such as ``maxnreg`` are parsed from the launch's
keywords.  This script runs the GPU check's launch sites (stage 3's correctness launches, stage
4's timed launchers at every T, the fused stepper's chunk program as ``Reptile.fit`` replays it,
the whole-meta-step graph, the sanitizer's and ncu's targets, the sweep's settings, the special
function kernel of the tests) with host tensors and a stand-in driver that says "device 0, an
sm_90 GPU", and with ``JITFunction.run`` made compile-only (``warmup=True``): nothing is
launched, every distinct specialization is compiled by Triton and ptxas for sm_90a.

For each compile it records the kernel, its constants and attributes, registers / spills
(``ptxas -v``, as ``bench.triton_compile``), shared memory, and the two load-time checks a
GPU makes before the first launch (``CompiledKernel._init_handles``): shared memory within the
device's limit, and ``num_warps`` x 32 threads within what the register count allows.  Host
arrays stand in for device memory, so nothing about results or timings comes out of this, only
whether each launch compiles and loads.  A record of one Triton version, never a test assertion.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

#: H100 / H200 SXM: SMs, the opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin),
#: the register file per SM (and per block), registers allocated per warp in units of 256
SMS = 132
MAX_SHARED = 232448
REGISTERS_PER_BLOCK = 65536


def max_threads(registers: int) -> int:
    """Threads per block a kernel of ``registers`` per thread can launch with (the driver's
    CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK): warps are allocated registers in units of 256."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(1024, REGISTERS_PER_BLOCK // per_warp * 32)


class _Driver:
    """What ``JITFunction.run`` and ``triton.compile`` ask the active driver, for one sm_90 GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaDriver

        self.target = GPUTarget("cuda", arch, 32)
        self.launcher_cls = CudaDriver  # never called: nothing launches
        self.utils = None

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


class Recorder:
    """Patches Triton's JIT to compile only, and records every compile."""

    def __init__(self, arch: int, log):
        self.arch, self.log, self.rows, self.site = arch, log, [], "?"

    @contextlib.contextmanager
    def installed(self):
        import triton
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        old_run, old_compile = JITFunction.run, JITFunction._do_compile
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            return old_run(fn, *args, grid=grid, warmup=True, **kwargs)

        def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            t0 = time.perf_counter()
            row = {"site": recorder.site, "kernel": fn.fn.__name__,
                   "constexprs": {fn.arg_names[k[0]]: _plain(v) for k, v in constexprs.items()
                                  if fn.params[k[0]].is_constexpr and fn.arg_names[k[0]] not in _BIG_CONSTANTS},
                   "specialized_to_constants": sorted(fn.arg_names[k[0]] for k in constexprs
                                                      if not fn.params[k[0]].is_constexpr),
                   "aligned_16": sorted(fn.arg_names[k[0]] for k, v in attrs.items()
                                        if any(a[0] == "tt.divisibility" for a in v)),
                   "num_warps": options.num_warps, "num_stages": options.num_stages,
                   "maxnreg": options.maxnreg}
            try:
                kernel = old_compile(fn, key, signature, device, constexprs, options, attrs, warmup)
                from bench.triton_compile import facts

                row.update(facts(kernel, recorder.arch))
                regs = row.get("registers")
                row["loads"] = (kernel.metadata.shared <= MAX_SHARED
                                and (regs is None or options.num_warps * 32 <= max_threads(regs)))
                if not row["loads"]:
                    row["load_error"] = (f"shared {kernel.metadata.shared} B (max {MAX_SHARED}), "
                                         f"{options.num_warps * 32} threads (max {max_threads(regs or 0)} "
                                         f"at {regs} registers)")
            except Exception as exc:  # noqa: BLE001 - recorded, then raised to the launch site
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                kernel = None
                raise
            finally:
                row["compile_seconds"] = round(time.perf_counter() - t0, 2)
                recorder.rows.append(row)
                recorder.log(line(row))
            return kernel

        driver.set_active(_Driver(self.arch))
        JITFunction.run, JITFunction._do_compile = run, do_compile
        try:
            yield self
        finally:
            JITFunction.run, JITFunction._do_compile = old_run, old_compile
            driver._active = None  # the default driver again on next use (none on a machine without a GPU)
            del triton

    @contextlib.contextmanager
    def at(self, site: str):
        self.site = site
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the next site still compiles
            self.rows.append({"site": site, "error": f"{type(exc).__name__}: {exc}"[:2000],
                              "traceback": traceback.format_exc()[-3000:]})
            self.log(f"  {site}: ERROR {type(exc).__name__}: {exc}")


#: constants too long for the record (scratch offsets, tiles): kept out of the row
_BIG_CONSTANTS = {f"{p}OFF{i}" for p in "WA" for i in range(5)} | {"GOFF", "TILE"}


def _plain(v):
    v = getattr(v, "value", v)
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def line(r: dict) -> str:
    head = f"  {r['site'][:34]:34s} {r.get('kernel', '-'):24s} w{r.get('num_warps')}"
    if "error" in r:
        return f"{head}: ERROR {r['error'][:300]}"
    consts = ",".join(r.get("specialized_to_constants", []))
    return (f"{head}: {r.get('registers')} regs, spill {r.get('spill_store_bytes')} B, shared "
            f"{r.get('shared_bytes')} B, loads {r.get('loads')}, {r['compile_seconds']} s"
            + (f", =1: {consts}" if consts else ""))


def _patch_host(monkey):
    """The host functions as on an H200: CPU tensors accepted, grids sized for 132 SMs."""
    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    monkey.append((K, "INTERPRETED", K.INTERPRETED))
    monkey.append((V, "INTERPRETED", V.INTERPRETED))
    monkey.append((V, "grid_size", V.grid_size))
    K.INTERPRETED = V.INTERPRETED = True

    def n_programs(T, device, config, dims=()):
        cap = config.max_programs if config.max_programs is not None else V.programs_per_sm_for(dims, config) * SMS
        return max(1, min(T, cap))

    V.grid_size = n_programs


def run_sites(rec: Recorder, quick: bool) -> None:
    import torch

    from bench import gpu_check as C
    from bench.gpu_sweep import settings
    from reptile_fast.kernels import meta_step_guard as G
    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    cpu = torch.device("cpu")
    dims = C.DIMS
    # stage 3: correctness at T = 64 (the calls stage_correctness makes)
    T = 64
    model, tasks, plan, params, phi = C.problem(T, cpu, seed=7, width=64)
    n = V.n_flat_params(dims)
    for name, kernel, prec, what in C.VARIANTS:
        with rec.at(f"stage3 {name} T=64"):
            if what == "inner":
                out = torch.full((T, n + 3), float("nan"))
                losses = torch.full((T, C.STEPS), float("nan"))
                if kernel == "v1":
                    K.mlp_inner_loop(tasks.x, tasks.y, plan, params, C.ACTS, lr=C.LR, precision=prec, out=out,
                                     out_losses=losses, scratch_fill=float("nan"))
                else:
                    V.inner_loop(tasks.x, tasks.y, plan, phi, dims, C.ACTS, lr=C.LR, precision=prec, out=out,
                                 out_losses=losses, config=C.v2_config(kernel))
            else:
                cfg = C.v2_config(kernel)
                V.meta_step(tasks.x, tasks.y, plan, phi, dims, C.ACTS, lr=C.LR, eps=C.EPS, precision=prec,
                            config=cfg, out=torch.full_like(phi, float("nan")))
                V.meta_step(tasks.x, tasks.y, plan, phi, dims, C.ACTS, lr=C.LR, eps=C.EPS, precision=prec,
                            config=cfg)
    with rec.at("bench_triton_kernel triton-tiled T=64"):  # v1's other mode (the GPU benchmarks force it)
        config = K.choose_launch_config(dims, C.BATCH, mode="tiled")
        K.mlp_inner_loop(tasks.x, tasks.y, plan, params, C.ACTS, lr=C.LR, config=config, check_values=False)
    with rec.at("stage3 v2-guarded-1 T=1"):
        _, t1, p1, _, phi1 = C.problem(1, cpu, seed=8, width=64)
        it = torch.ones(1, dtype=torch.int64)
        st_got, st_want = G.new_state(cpu), G.new_state(cpu)
        l_got, l_want = torch.full((1,), float("nan")), torch.full((1,), float("nan"))
        V.guarded_meta_step(t1.x, t1.y, p1, phi1.clone(), dims, C.ACTS, lr=C.LR, eps=C.EPS, state=st_got,
                            iteration=it, loss_out=l_got)
        want = phi1.clone()
        res = V.meta_step(t1.x, t1.y, p1, want, dims, C.ACTS, lr=C.LR, eps=C.EPS)
        G.accept_step(want, res.params, res.loss, st_want, it, l_want)
    with rec.at("stage3 special functions"):
        sys.path.insert(0, str(C.ROOT / "tests"))
        import importlib

        tmod = importlib.import_module("test_kernel_mlp_meta_step_v2")
        x = tmod._special_values()[:4096]
        for fn in ("exp", "tanh", "sigmoid", "log"):
            tmod._apply(fn, x, cpu)
    # stage 4: Reptile.fit's fused stepper (T = 1, chunks of 100 meta-steps replayed as graphs)
    with rec.at("stage4 fit fused stepper chunk 100"):
        _fused_stepper_chunk(C, cpu)
    # stage 4: every timed launcher at every T
    for T in ((1, 256) if quick else C.TIMED_T):
        model, tasks, plan, params, phi = C.problem(T, cpu, seed=11, width=64)
        for variant in C.VARIANTS:
            with rec.at(f"stage4 {variant[0]} T={T}"):
                C.launcher(variant, T, cpu, dims, tasks, plan, params, phi)()
        with rec.at(f"stage4 v2-meta-graph-full T={T}"):
            eps = torch.full((1,), C.EPS)
            x = torch.linspace(-5, 5, C.N_POINTS).expand(T, C.N_POINTS).unsqueeze(-1).contiguous()
            V.meta_step(x, tasks.y, plan, phi, dims, C.ACTS, lr=C.LR, eps=eps, out=torch.empty_like(phi),
                        check_values=False)
    # stage 5 (sanitizer: T = 16, every variant) and stage 6 (ncu: C.PROFILED)
    for variant in C.VARIANTS:
        model, tasks, plan, params, phi = C.problem(16, cpu, seed=3)
        with rec.at(f"target tiny {variant[0]} T=16"):
            C.launcher(variant, 16, cpu, dims, tasks, plan, params, phi)()
    for name, T in C.PROFILED:
        if quick and T > 256:
            continue
        with rec.at(f"target profile {name} T={T}"):
            C.profile_launch(name, T, cpu, C.problem(T, cpu, seed=3))()
    # the sweep (bench/gpu_sweep.py): guarded_meta_step at T = 1, meta_step at 4096 and 65536
    for T in ((1,) if quick else (1, 4096, 65536)):
        model, tasks, plan, _, phi = C.problem(T, cpu, seed=21, width=64)
        eps = torch.full((1,), C.EPS)
        it = torch.ones(1, dtype=torch.int64)
        for kw in settings(T, smoke=False):
            with rec.at(f"sweep T={T} {kw or 'default'}"):
                cfg = V.V2Config(**kw)
                if T == 1:
                    V.guarded_meta_step(tasks.x, tasks.y, plan, phi.clone(), dims, C.ACTS, lr=C.LR, eps=eps,
                                        state=G.new_state(cpu), iteration=it, loss_out=torch.empty(1), config=cfg,
                                        check_values=False)
                else:
                    V.meta_step(tasks.x, tasks.y, plan, phi, dims, C.ACTS, lr=C.LR, eps=eps, config=cfg,
                                out=torch.empty_like(phi), check_values=False)
    # the CLI job's evaluation: backend "triton", kernel v2, 160 adaptation steps per held-out task
    with rec.at("cli sine eval (v2 inner_loop, 160 steps)"):
        from reptile_fast import MLP, Sine, sample_indices

        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        T = 100
        tasks = Sine(n_points=C.N_POINTS).sample(T, generator=g)
        plan = sample_indices(T, 160, C.N_POINTS, C.BATCH, generator=g)
        phi = V.flat_params([p.detach() for p in MLP(1, 64, 1).parameters()])
        V.inner_loop(tasks.x, tasks.y, plan, phi, dims, C.ACTS, lr=C.LR, check_values=False)


def _fused_stepper_chunk(C, cpu) -> None:
    """``TritonFusedStepper.run`` on one chunk of 100 meta-steps of meta-batch 1, capture path."""
    import torch

    from reptile_fast import MLP
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.triton import TritonFusedStepper

    class _Graph:  # capture records the body (nothing launches: the JIT is compile-only)
        def __init__(self, body):
            self.body = body

        def replay(self):
            self.body()

    torch.manual_seed(0)
    model = MLP(1, 64, 1)
    config = InnerConfig(lr=C.LR)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # check_supported's CPU rule; the kernels stay compiled
    try:
        stepper = TritonFusedStepper(model, config, cuda_graphs=True, _capture=_Graph, validate=False)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    stepper.set_chunk(1)
    draws = C._FixedDraws(2 * stepper.chunk, cpu)
    for first in (1, 1 + stepper.chunk):
        tasks, plans = draws.draw(first, stepper.chunk)
        stepper.run(tasks, plans, [C.EPS] * stepper.chunk, first)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", help="write {stamp, rows} JSON here")
    ap.add_argument("--quick", action="store_true", help="T <= 256 only (fewer specializations)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: this compiles the kernels")
    from bench.env import machine_stamp

    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    cache_was_empty = not cache.is_dir() or not any(cache.iterdir())
    monkey = []
    rec = Recorder(args.arch, print)
    t0 = time.monotonic()
    try:
        _patch_host(monkey)
        with rec.installed():
            run_sites(rec, args.quick)
    finally:
        for mod, name, value in monkey:
            setattr(mod, name, value)
    errors = [r for r in rec.rows if "error" in r or r.get("loads") is False]
    print(f"{len(rec.rows)} records, {len(errors)} errors or load failures, {time.monotonic() - t0:.0f} s")
    if args.out:
        import triton

        stamp = {**machine_stamp(), "triton": triton.__version__, "python_executable": sys.executable,
                 "triton_cache": f"{cache} ({'empty' if cache_was_empty else 'warm: compile_seconds are cache hits'} "
                                 f"at the start)",
                 "command": "python -m bench.jit_launches " + " ".join(sys.argv[1:] if argv is None else argv)}
        Path(args.out).write_text(json.dumps({
            "stamp": stamp, "target": f"sm_{args.arch}a, {SMS} SMs (H100/H200)",
            "note": "Triton's JIT path with a stand-in driver, compile only (nothing launched); registers from "
                    "ptxas -v of the Triton wheel; 'loads': the shared-memory and threads-per-block checks a GPU "
                    "makes at the first launch",
            "rows": rec.rows}, indent=1, default=str) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
