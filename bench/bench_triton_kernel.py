"""The fused Triton inner loop: launch variants against each other and backend torch, plus
compile-only register checks.

    python -m pytest -q bench/bench_triton_kernel.py                 # CI: interpreter smoke + sm_90 compile
    REPTILE_BENCH=full python -m pytest -q bench/bench_triton_kernel.py --benchmark-enable \\
        --benchmark-json=bench/results/<gpu>-triton-kernel-<date>.json  # GPU sweep
    python -m bench.bench_triton_kernel --compile-report [--out bench/results/triton-compile-sm90.json]

On a GPU the sweep times the sine MLP 1-64-64-1, 5 inner steps of 10 points, at meta-batch 1, 32,
256, 4096 and 16384 (smoke mode: 32 only) for each variant: backend triton as chosen by default,
each kernel variant forced ("registers", "tiled"), tf32 dot inputs, CUDA-graph replay, and
backend torch.  Every variant is first checked against the reference on a few tasks (tf32: its
error against float64 is recorded instead), then on every task of every timed input set against
the float64 oracle (``_update_gate``).  ``extra_info`` holds tasks/s, FLOP/s (bench.flops'
convention) and the fraction of the fp32 matmul rate measured in the same session.

Without CUDA nothing is timed: one tiny interpreter run per variant checks correctness, and the
kernel is compiled ahead of time for sm_90a (no GPU needed) to catch compile errors and register
spills of the default configurations.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import MLP, Sine, sample_indices  # noqa: E402
from reptile_fast.backends import InnerConfig  # noqa: E402
from reptile_fast.backends.reference import ReferenceBackend  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
ROOT = Path(__file__).resolve().parents[1]
ON_CUDA = torch.cuda.is_available()
FULL = os.environ.get("REPTILE_BENCH", "smoke") == "full"
META_BATCHES = (1, 32, 256, 4096, 16384) if FULL else (32,)
SEED_DIMS = (1, 64, 64, 1)
STEPS, INNER_BATCH, N_POINTS, LR = 5, 10, 50, 0.02

#: variant -> (backend name, constructor options)
VARIANTS = {
    "triton": ("triton", {}),
    "triton-registers": ("triton", {"launch": {"mode": "registers"}}),
    "triton-tiled": ("triton", {"launch": {"mode": "tiled"}}),
    "triton-tf32": ("triton", {"precision": "tf32"}),
    "triton-graphs": ("triton", {"cuda_graphs": True}),
    "triton-v2": ("triton", {"kernel": "v2"}),
    "triton-v2-tf32x3": ("triton", {"kernel": "v2", "precision": "tf32x3"}),
    "torch": ("torch", {}),
}

#: Configurations compiled ahead of time: (dims, activation, loss, batch, forced mode or None).
COMPILE_CASES = [
    (SEED_DIMS, "tanh", "mse", 10, None),
    (SEED_DIMS, "tanh", "mse", 10, "tiled"),
    ((4, 64, 64, 5), "relu", "cross_entropy", 10, None),
    ((2, 256, 256, 3), "tanh", "mse", 10, None),
    ((1, 40, 40, 40, 40, 1), "sigmoid", "mse", 7, None),
    ((1, 40, 40, 40, 40, 1), "sigmoid", "mse", 7, "registers"),
]
#: Cases whose default configuration must compile without register spills.
NO_SPILL = {0, 3}


def _backend(variant):
    name, options = VARIANTS[variant]
    if name == "torch":
        module = pytest.importorskip("reptile_fast.backends.torch_func")
        return module.TorchBackend()
    from reptile_fast.backends.triton import TritonBackend

    return TritonBackend(**options)


def _problem(T, device, seed=0):
    torch.manual_seed(seed)
    model = MLP(1, 64, 1).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    tasks = Sine(n_points=N_POINTS).sample(T, generator=g)
    indices = sample_indices(T, STEPS, N_POINTS, INNER_BATCH, generator=g)
    return model, tasks.to(device), indices.to(device)


def _errors(result, model, tasks, indices, k=8):
    """Max |error| of the first k tasks against the fp32 reference and a float64 reference."""
    k = min(k, tasks.n_tasks)
    sub = tasks[0:k].to("cpu")
    idx = indices[:k].cpu()
    ref32 = ReferenceBackend().inner_loop(copy.deepcopy(model).cpu(), sub, idx, InnerConfig(lr=LR))
    ref64 = ReferenceBackend().inner_loop(copy.deepcopy(model).cpu().double(), sub.to(dtype=torch.float64),
                                          idx, InnerConfig(lr=LR))
    got = {n: v[:k].detach().cpu() for n, v in result.params.items()}
    ok32 = all(torch.allclose(got[n], ref32.params[n], rtol=RTOL, atol=ATOL) for n in got)
    err32 = max(float((got[n] - ref32.params[n]).abs().max()) for n in got)
    err64 = max(float((got[n].double() - ref64.params[n]).abs().max()) for n in got)
    return ok32, err32, err64


def _update_gate(backend, model, sets, precision: str):
    """Refuse (pytest.fail) unless, on every timed input set, every task's update φ̃ᵢ − φ is
    within the benchmark gate's bound of the float64 oracle's (``bench.providers``:
    ``float64_updates`` and ``update_error_bound``: K·(S·2⁻²⁴·‖φ‖/‖Δᵢ‖ + L·u·Aᵢ), u = 2⁻²⁴ for
    "fp32", 2⁻¹¹ for "tf32", Aᵢ the float64 path's length over ‖Δᵢ‖).  A variant returning φ or running at half the learning rate scores
    1 or 0.5 and is refused; so is one wrong on a single task, and one that ignores new inputs
    (each set is run and checked on its own)."""
    from bench.providers import GATE_CAP, float64_updates, update_error_bound

    point = type("P", (), {"steps": STEPS, "dims": SEED_DIMS})()
    phi = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    for k, (tasks, indices) in enumerate(sets):
        result = backend.inner_loop(model, tasks, indices, InnerConfig(lr=LR))
        oracle = float64_updates(model, tasks.x, tasks.y, indices, LR)
        got = torch.cat([result.params[n].reshape(tasks.n_tasks, -1).double().cpu() for n in names], 1) - phi
        want = torch.cat([oracle[n].reshape(tasks.n_tasks, -1) for n in names], 1)
        norm = want.norm(dim=1)
        rel = (got - want).norm(dim=1) / norm
        bound = update_error_bound(point, precision, phi.norm() / norm, path_ratio=oracle.path / norm)
        if bool((bound > GATE_CAP).any()):
            pytest.fail(f"input set {k}: the {precision} bound ({float(bound.max()):.3g}) is too loose to verify; not timed")
        if not bool((rel <= bound).all()):
            worst = int(torch.nan_to_num(rel / bound, nan=float("inf")).argmax())
            pytest.fail(f"input set {k}: task {worst}'s update is {float(rel[worst]):.3g} from float64, "
                        f"bound {float(bound[worst]):.3g} ({precision}), on {int((~(rel <= bound)).sum())} of "
                        f"{tasks.n_tasks} tasks; not timed")


# ----------------------------------------------------------------------------- CPU: interpreter smoke
@pytest.mark.skipif(ON_CUDA, reason="the CUDA runs are the timed sweep below")
@pytest.mark.parametrize("variant", ["triton", "triton-registers", "triton-tiled", "triton-tf32", "triton-v2"])
def test_interpreter_smoke(variant):
    """Each variant on 3 tiny sine tasks matches the reference (never timed: interpreter)."""
    from reptile_fast.kernels import mlp_inner_loop as K

    if not K.INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before the kernel module is imported")
    model, tasks, indices = _problem(3, "cpu")
    indices = indices[:, :2]
    result = _backend(variant).inner_loop(model, tasks, indices, InnerConfig(lr=LR))
    ok, err32, _ = _errors(result, model, tasks, indices)
    assert ok, f"{variant}: max |error| {err32:.3g} against the reference"


# ----------------------------------------------------------------------------- compile-only checks
def compile_report(cases=COMPILE_CASES, arch=90):
    """Compile each case for sm_<arch> and read registers / spills from ``ptxas -v``.

    Runs in this process, so the kernel module must be imported without TRITON_INTERPRET.
    Returns one dict per case.
    """
    import triton

    from reptile_fast.kernels import mlp_inner_loop as K

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    rows = []
    for dims, act, loss, batch, mode in cases:
        acts = (act,) * (len(dims) - 2) + ("identity",)
        config = K.choose_launch_config(dims, batch, mode=mode)
        row = {"dims": list(dims), "activation": act, "loss": loss, "batch": batch, "mode": config.mode,
               "num_warps": config.num_warps, "num_stages": config.num_stages, "arch": f"sm_{arch}a",
               "triton": triton.__version__}
        try:
            kernel = K.compile_for_target(dims, acts, loss=loss, batch=batch, config=config, arch=arch)
        except Exception as exc:  # noqa: BLE001 - reported per case
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rows.append(row)
            continue
        row["shared_bytes"] = kernel.metadata.shared
        # approximate special-function instructions (kernels/special_functions.py avoids them)
        row["approx"] = {op: kernel.asm["ptx"].count(op) for op in ("ex2.approx", "lg2.approx", "div.full")}
        if ptxas is not None:
            ptx = Path(os.environ.get("TMPDIR", "/tmp")) / f"reptile_fast_kernel_{os.getpid()}.ptx"
            ptx.write_text(kernel.asm["ptx"])
            out = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", os.devnull],
                                 capture_output=True, text=True).stderr
            ptx.unlink()
            regs = re.search(r"Used (\d+) registers", out)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
            row["registers"] = int(regs.group(1)) if regs else None
            row["spill_bytes"] = int(spill.group(1)) + int(spill.group(2)) if spill else None
        rows.append(row)
    return rows


def test_kernel_compiles_for_sm90():
    """Every configuration in COMPILE_CASES compiles for sm_90a on this Triton (no GPU needed).

    Registers and spills are a measurement of the compiler, not a correctness property: they are
    printed (and recorded by ``--compile-report --json`` into ``bench/results/``), never asserted."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia").exists():
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_triton_kernel", "--compile-report", "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{r['dims']} {r['mode']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "did not compile:\n" + "\n".join(failed)
    # v1's exp / log / tanh / sigmoid / divisions carry the same error bound on a GPU as under the
    # interpreter only if none lowers to an approximate instruction
    approx = [f"{r['dims']} {r['mode']}: {r['approx']}" for r in rows if any(r["approx"].values())]
    assert not approx, "kernel v1 uses approximate exp / log / division:\n" + "\n".join(approx)
    spills = [r for i, r in enumerate(rows) if i in NO_SPILL and r.get("spill_bytes")]
    if spills:
        print(f"note: register spills in default configurations with Triton {triton.__version__}: {spills}")


def test_v2_ieee_compiles_without_tensor_cores():
    """precision "ieee" must not reach a tf32 tensor-core instruction: Triton rewrites some
    broadcast-multiply-sums into tl.dot at its default (tf32) precision, which v2 avoids.  A
    correctness property of the compiled code (checked for sm_90a with this Triton, no GPU)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia").exists():
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from reptile_fast.kernels import mlp_meta_step_v2 as V\n"
            "for dims, acts in [((1, 64, 64, 1), ('tanh', 'tanh', 'identity')), ((4, 40, 3, 5), ('relu', 'relu', 'identity'))]:\n"
            "    for mode in ('meta', 'adapt'):\n"
            "        k = V.compile_for_target(dims, acts, precision='ieee', accumulate=mode == 'meta',\n"
            "                                 write_adapted=mode == 'adapt', write_losses=mode == 'adapt')\n"
            "        ptx = k.asm['ptx']\n"
            "        print(dims, mode, ptx.count('mma.sync') + ptx.count('wgmma.'), ptx.count('ex2.approx'), ptx.count('div.full'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.strip().splitlines():
        mma, ex2, div_full = (int(v) for v in line.split()[-3:])
        assert mma == 0, f"ieee kernel v2 uses tensor-core instructions: {line}"
        assert ex2 == 0 and div_full == 0, f"kernel v2 uses approximate exp / division: {line}"


# ----------------------------------------------------------------------------- GPU sweep
@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="timed on CUDA only (the interpreter is not a speed)")
@pytest.mark.parametrize("meta_batch", META_BATCHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_kernel_speed(benchmark, variant, meta_batch, fp32_peak):
    from bench.flops import inner_loop_flops

    if FULL and benchmark.disabled:
        pytest.fail("REPTILE_BENCH=full needs --benchmark-enable")
    backend = _backend(variant)
    device = torch.device("cuda")
    model, tasks, indices = _problem(meta_batch, device)
    config = InnerConfig(lr=LR)
    try:
        backend.check_supported(model, device, config)
    except Exception as exc:  # noqa: BLE001 - e.g. a forced mode that cannot run here
        pytest.skip(f"{variant}: {exc}")
    result = backend.inner_loop(model, tasks, indices, config)
    ok, err32, err64 = _errors(result, model, tasks, indices)
    exact = variant not in ("triton-tf32", "triton-v2-tf32x3")
    if exact and not ok:
        pytest.fail(f"{variant} at T={meta_batch} differs from the reference (max |error| {err32:.3g}); not timed")
    # Rotate a few input sets so that no call reuses the previous call's inputs; every one of them
    # is checked (every task's update vs float64, per precision) before anything is timed.
    sets = [_problem(meta_batch, device, seed=s)[1:] for s in range(1, 4)]
    _update_gate(backend, model, sets, "fp32" if exact else "tf32")
    counter = [0]

    def target():
        t, i = sets[counter[0] % len(sets)]
        counter[0] += 1
        out = backend.inner_loop(model, t, i, config)
        torch.cuda.synchronize()
        return out

    rounds, iterations = 1, 1
    if benchmark.enabled:
        import time

        target()
        t0 = time.perf_counter()
        target()
        single = max(time.perf_counter() - t0, 1e-6)
        iterations = max(1, min(1000, int(0.02 / single)))
        rounds = max(3, min(30, math.ceil(1.5 / (single * iterations))))
    flops = inner_loop_flops(SEED_DIMS, INNER_BATCH, STEPS, meta_batch)
    benchmark.extra_info.update(
        provider=variant, meta_batch=meta_batch, dims=list(SEED_DIMS), steps=STEPS, inner_batch=INNER_BATCH,
        flops=flops, device_name=torch.cuda.get_device_name(), peak=fp32_peak,
        max_abs_err_vs_fp32_reference=err32, max_abs_err_vs_fp64_reference=err64,
        timer="host clock around back-to-back calls, synchronized after each call")
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=1)
    if benchmark.enabled and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        info = benchmark.extra_info
        info["tasks_per_s"] = meta_batch / median
        info["flops_per_s"] = flops / median
        if fp32_peak:
            info["fraction_of_fp32_matmul_peak"] = info["flops_per_s"] / fp32_peak["matmul_flops_per_s"]


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-report", action="store_true", help="compile COMPILE_CASES for sm_90a")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    parser.add_argument("--out", help="also write the rows with a machine stamp to this file")
    args = parser.parse_args(argv)
    if not args.compile_report:
        parser.error("nothing to do: pass --compile-report (the sweep runs under pytest)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the JIT kernels")
    rows = compile_report(arch=args.arch)
    if args.out:
        from bench.env import machine_stamp

        stamp = {**machine_stamp(), "python_executable": sys.executable,
                 "command": " ".join([sys.executable, "-m", "bench.bench_triton_kernel", *sys.argv[1:]])}
        Path(args.out).write_text(json.dumps({"stamp": stamp, "note": "compile only (no GPU): registers and "
                                              "spills from ptxas -v", "rows": rows}, indent=1) + "\n")
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['triton']:6s} {str(r['dims']):26s} {r['loss']:13s} B{r['batch']:<3d} {r['mode']:9s} "
                  f"w{r['num_warps']}: " + (r.get("error") or f"{r.get('registers')} registers, "
                                            f"{r.get('spill_bytes')} B spilled, {r['shared_bytes']} B shared"))


if __name__ == "__main__":
    main()
