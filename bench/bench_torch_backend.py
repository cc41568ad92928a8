"""Backend "torch" against the seed's own loop and this CPU's batched-matmul limit (issue 3).

    python -m pytest -q bench/bench_torch_backend.py                    # smoke (CI): tiny, untimed
    REPTILE_BENCH=full python -m pytest -q bench/bench_torch_backend.py --benchmark-enable \\
        --benchmark-json=bench/results/torch_backend_cpu_pytest.json    # the measurement

Sine MLP 1-64-64-1, 5 inner SGD steps of 10 points (lr 0.02), all in one pytest session:

- ``seed``: the seed's ``reptile()`` loop from ../shared/seed/seed_program.py (else the
  bit-identical ``reptile_fast.reference``): per task ``sample_task``, a deep copy, 5 SGD steps,
  the interpolation update.  Its tasks/s is the baseline.
- ``fit-<path>-T<n>``: ``Reptile(backend="torch")`` meta-steps of ``n`` tasks as ``fit`` runs them
  (sampling, inner loops, outer update), with the batched-MLP path (``fast``) or the generic
  ``torch.func`` path (``vmap``, ``TorchBackend(fast_mlp=False)``).
- ``inner-<path>-T<n>``: ``backend.inner_loop`` alone on fixed tasks and plan.
- ``bmm``: ``[256,10,64] @ [256,64,64]``, the inner loop's own product, best of repeats
  (``bench.flops.measure_bmm_rate``): the arithmetic limit quoted as a fraction below.
- ``compiled``: the batched-MLP inner loop under ``torch.compile`` (full runs only), for the record.
- ``speedup_interleaved``: the seed, ``fit`` at meta-batch 256 and the bmm timed back to back in
  rounds; the median of the per-round ratios is the headline speed-up (robust to the load that
  other jobs put on this shared 2-core machine, which makes separate medians drift).

The full run also writes ``bench/results/torch_throughput_cpu[_<n>thread].json``: tasks/s of
every case (median and best call), speed-ups over the seed, and the fraction of the bmm limit
reached (FLOPs per task from ``bench.flops.inner_loop_flops``), with the machine stamp, the load
average and the command.  ``REPTILE_BENCH_THREADS=1`` (bench/conftest.py) pins one thread.
"""
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from bench.env import machine_stamp
from bench.flops import inner_loop_flops, measure_bmm_rate
from bench.providers import bench_device, bench_mode
from reptile_fast import MLP, Reptile, Sine, sample_indices
from reptile_fast.backends.base import InnerConfig
from reptile_fast.backends.torch_func import TorchBackend

MODE = bench_mode()
DEVICE = bench_device()
SEED_PROGRAM = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "seed_program.py"
DIMS, STEPS, BATCH = (1, 64, 64, 1), 5, 10
SIZES = (1, 16, 256) if MODE == "full" else (4,)
PATHS = {"fast": True, "vmap": False}
_THREADS = os.environ.get("REPTILE_BENCH_THREADS")
RESULTS = Path(__file__).resolve().parent / "results" / (
    f"torch_throughput_{DEVICE.type}" + (f"_{_THREADS}thread" if _THREADS else "") + ".json")
#: case name -> tasks per second (filled by the timed tests, written at the end of a full run).
_MEASURED = {}


def _rounds(seconds_per_call: float, budget: float = 2.0) -> int:
    return max(3, min(50, int(budget / max(seconds_per_call, 1e-6))))


def _time(benchmark, fn, tasks_per_call: int, name: str):
    """Time ``fn`` with pytest-benchmark; record tasks/s (median and best call) for the summary."""
    t0 = time.perf_counter()
    fn()  # warm-up (and a rough duration for the number of rounds)
    rounds = _rounds(time.perf_counter() - t0)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None with --benchmark-disable (smoke)
        st = benchmark.stats.stats
        info = {"tasks_per_call": tasks_per_call, "tasks_per_s": tasks_per_call / st.median,
                "tasks_per_s_best": tasks_per_call / st.min, "loadavg_1min": os.getloadavg()[0]}
        benchmark.extra_info.update(info)
        _MEASURED[name] = info


def _load_seed():
    if SEED_PROGRAM.exists():
        spec = importlib.util.spec_from_file_location("seed_program", SEED_PROGRAM)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod, SEED_PROGRAM.name
    from reptile_fast import reference

    return reference, "reptile_fast.reference"


def _seed_runner(n):
    mod, source = _load_seed()
    torch.manual_seed(0)
    model = mod.MLP()
    kwargs = {"progress": False} if source == "reptile_fast.reference" else {}
    return lambda: mod.reptile(model, n, mod.sample_task, mod.perform_k_training_steps, **kwargs), source


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the seed's loop is a CPU baseline")
def test_seed_loop(benchmark):
    """The seed's own ``reptile()``: one task per iteration (its tqdm bar goes to stderr)."""
    n = 100 if MODE == "full" else 2
    run, source = _seed_runner(n)
    benchmark.extra_info["source"] = source
    _time(benchmark, run, n, "seed")


def _check_against_reference(fast_mlp: bool, T: int) -> None:
    """A wrong fast answer is not a result: one meta-step of the timed configuration must leave
    the parameters the reference backend leaves (rtol 1e-5 / atol 1e-6, fp32) before timing."""
    import copy

    from reptile_fast import sample_indices

    torch.manual_seed(0)
    model = MLP().to(DEVICE)
    twin = copy.deepcopy(model)
    tasks = Sine().sample(T, generator=torch.Generator().manual_seed(1), device=DEVICE)
    idx = sample_indices(T, 5, tasks.n_points, 10, generator=torch.Generator().manual_seed(2), device=DEVICE)
    fast = Reptile(model, backend="torch", outer_lr=1.0, backend_options={"fast_mlp": fast_mlp})
    Reptile(twin, backend="reference", outer_lr=1.0).meta_step(tasks, idx)
    fast.meta_step(tasks, idx)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs from the reference")


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("path", list(PATHS))
def test_fit_throughput(benchmark, path, T):
    """Meta-steps as ``Reptile.fit`` runs them: sample T sine tasks and a plan, inner loops, update."""
    torch.manual_seed(0)
    model = MLP().to(DEVICE)
    trainer = Reptile(model, backend="torch", outer_lr=1.0)
    trainer.backend.fast_mlp = PATHS[path]
    assert trainer.backend.uses_fast_path(model, Sine().sample(1, device=DEVICE), trainer.config) == PATHS[path]
    _check_against_reference(PATHS[path], T)
    dist, gen = Sine(), torch.Generator().manual_seed(0)
    n = max(1, 64 // T) if MODE == "full" else 1

    def run():
        for _ in range(n):
            trainer.meta_step(dist.sample(T, generator=gen, device=DEVICE), generator=gen)

    _time(benchmark, run, n * T, f"fit-{path}-T{T}")


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("path", list(PATHS))
def test_inner_loop_throughput(benchmark, path, T):
    """``backend.inner_loop`` alone on fixed tasks and plan; checked against the reference first."""
    from reptile_fast.backends.reference import ReferenceBackend

    torch.manual_seed(0)
    model = MLP().to(DEVICE)
    tasks = Sine().sample(T, generator=torch.Generator().manual_seed(1), device=DEVICE)
    idx = sample_indices(T, STEPS, 50, BATCH, generator=torch.Generator().manual_seed(2), device=DEVICE)
    backend, config = TorchBackend(fast_mlp=PATHS[path]), InnerConfig(lr=0.02)
    got = backend.inner_loop(model, tasks, idx, config).params
    # Every task against the reference (not the first few: a fault at a task-block boundary or in
    # the tail of the batch would otherwise be timed); a wrong result is never timed.
    ref = ReferenceBackend().inner_loop(model, tasks, idx, config).params
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    _time(benchmark, lambda: backend.inner_loop(model, tasks, idx, config), T, f"inner-{path}-T{T}")


@pytest.mark.skipif(MODE != "full", reason="compiling takes 30-60 s per shape on 2 CPU cores")
@pytest.mark.parametrize("T", SIZES[1:])
def test_inner_loop_compiled(benchmark, T):
    """``torch.compile`` (inductor, static shapes) of the batched-MLP inner loop, for the record:
    the compile time and the steady-state tasks/s next to the eager ``inner-fast`` case."""
    from reptile_fast.backends.mlp_batched import (StackedMLP, default_fast_tanh, gather_minibatches,
                                                   mlp_inner_loop, stack_mlp_params)
    from reptile_fast.mlp_spec import extract_mlp_spec

    torch.manual_seed(0)
    model = MLP().to(DEVICE)
    spec = extract_mlp_spec(model)
    names = list(spec.weight_names + spec.bias_names)
    phi = [dict(model.named_parameters())[n].detach() for n in names]
    tasks = Sine().sample(T, generator=torch.Generator().manual_seed(1), device=DEVICE)
    idx = sample_indices(T, STEPS, 50, BATCH, generator=torch.Generator().manual_seed(2), device=DEVICE)
    fast_tanh = default_fast_tanh(DEVICE)

    def inner(x, y, plan, *phi):
        params = stack_mlp_params(spec, dict(zip(names, phi)), x.shape[0])
        xs, ys = gather_minibatches(x, y, plan)
        return mlp_inner_loop(spec, params, xs, ys, lr=0.02, loss="mse", fast_tanh=fast_tanh).params.flat

    torch._dynamo.reset()
    compiled = torch.compile(inner, dynamic=False, fullgraph=True)
    t0 = time.perf_counter()
    try:
        got = compiled(tasks.x, tasks.y, idx, *phi)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler: recorded, not a failure here
        pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
    compile_s = time.perf_counter() - t0
    # A wrong compiled answer is never timed: every task against the reference backend (not the
    # same code run eagerly, which would share its mistakes), fp32 rtol 1e-5 / atol 1e-6.
    from reptile_fast.backends.reference import ReferenceBackend

    ref = ReferenceBackend().inner_loop(model, tasks, idx, InnerConfig(lr=0.02)).params
    adapted = StackedMLP(spec, got, T).named()
    assert set(adapted) == set(ref)
    for n in ref:
        torch.testing.assert_close(adapted[n], ref[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    benchmark.extra_info["compile_seconds"] = compile_s
    _MEASURED[f"compile_seconds-T{T}"] = compile_s
    _time(benchmark, lambda: compiled(tasks.x, tasks.y, idx, *phi), T, f"inner-compiled-T{T}")


def test_bmm_rate(benchmark):
    """The limit: fp32 [256,10,64] @ [256,64,64] (best of repeats), in FLOP/s."""
    rate = measure_bmm_rate(DEVICE, min_time=0.5 if MODE == "full" else 0.01)
    benchmark.extra_info.update(rate)
    a, b = torch.randn(256, 10, 64, device=DEVICE), torch.randn(256, 64, 64, device=DEVICE)
    benchmark.pedantic(lambda: torch.bmm(a, b), rounds=20 if MODE == "full" else 1, iterations=5)
    _MEASURED["bmm_flops_per_s"] = rate["flops_per_s"]  # best of repeats: the limit


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the seed's loop is a CPU baseline")
def test_speedup_interleaved():
    """The headline ratio, robust to a shared machine's drifting load: rounds that each time the
    seed's loop, ``fit`` meta-steps of 256 tasks on the fast path, and the bmm, back to back; the
    per-round ratios' median is reported (and each series' median and best)."""
    full = MODE == "full"
    seed_n, rounds = (20, 15) if full else (1, 1)
    T = 256 if full else 4
    seed_run, source = _seed_runner(seed_n)
    _check_against_reference(True, T)
    torch.manual_seed(0)
    model = MLP().to(DEVICE)
    trainer = Reptile(model, backend="torch", outer_lr=1.0)
    dist, gen = Sine(), torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 10, 64), torch.randn(256, 64, 64)

    def fit_run():
        for _ in range(2):
            trainer.meta_step(dist.sample(T, generator=gen, device=DEVICE), generator=gen)

    def bmm_run():
        for _ in range(20):
            torch.bmm(a, b)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    seed_run(), fit_run(), bmm_run()  # warm-up
    series = {"seed": [], "fit": [], "bmm": []}
    for _ in range(rounds):
        series["seed"].append(seed_n / timed(seed_run))
        series["fit"].append(2 * T / timed(fit_run))
        series["bmm"].append(20 * 2.0 * 256 * 10 * 64 * 64 / timed(bmm_run))
    if full:
        ratios = sorted(f / s for f, s in zip(series["fit"], series["seed"]))
        _MEASURED["interleaved"] = {
            "rounds": rounds, "seed_source": source, "T": T,
            "seed_tasks_per_s": {"median": statistics.median(series["seed"]), "best": max(series["seed"])},
            "fit_fast_tasks_per_s": {"median": statistics.median(series["fit"]), "best": max(series["fit"])},
            "bmm_flops_per_s": {"median": statistics.median(series["bmm"]), "best": max(series["bmm"])},
            "speedup_median_of_rounds": statistics.median(ratios),
            "speedup_range": [ratios[0], ratios[-1]],
        }


def test_write_summary():
    """Last in the file: the derived figures of a full timed run, to bench/results/."""
    if "seed" not in _MEASURED or "bmm_flops_per_s" not in _MEASURED:
        pytest.skip("needs the timed cases (REPTILE_BENCH=full --benchmark-enable)")
    seed = _MEASURED["seed"]
    flops_per_task = inner_loop_flops(DIMS, BATCH, STEPS)
    bmm = _MEASURED["bmm_flops_per_s"]
    limit = bmm / flops_per_task  # tasks/s if every FLOP ran at the bmm rate
    cases = {}
    for name, info in _MEASURED.items():
        if not name.startswith(("fit-", "inner-")):
            continue
        cases[name] = {**info, "speedup_vs_seed": info["tasks_per_s"] / seed["tasks_per_s"],
                       "speedup_vs_seed_best": info["tasks_per_s_best"] / seed["tasks_per_s_best"],
                       "fraction_of_bmm_limit": info["tasks_per_s"] / limit,
                       "fraction_of_bmm_limit_best": info["tasks_per_s_best"] / limit}
    inter = _MEASURED.get("interleaved")
    if inter:
        inter["fraction_of_bmm_limit"] = (inter["fit_fast_tasks_per_s"]["median"] * flops_per_task
                                          / inter["bmm_flops_per_s"]["median"])
        inter["bmm_limit_speedup_vs_seed"] = (inter["bmm_flops_per_s"]["median"] / flops_per_task
                                              / inter["seed_tasks_per_s"]["median"])
    summary = {
        "experiment": "backend torch throughput, sine MLP 1-64-64-1, 5 inner SGD steps of 10 points",
        "note": "tasks/s from each case's median call (and its best call); the machine's 2 cores are "
                "shared, so 'interleaved' (seed, fit and bmm timed back to back in rounds) is the "
                "headline ratio",
        "seed": seed, "bmm_flops_per_s": bmm, "bmm_shape": "[256,10,64]x[256,64,64] (best of repeats)",
        "flops_per_task": flops_per_task, "bmm_limit_tasks_per_s": limit,
        "bmm_limit_speedup_vs_seed": limit / seed["tasks_per_s"], "interleaved": inter, "cases": cases,
        "compile_seconds": {k.split("-")[1]: v for k, v in _MEASURED.items() if k.startswith("compile_seconds")},
        "env": {k: os.environ[k] for k in ("REPTILE_BENCH", "REPTILE_BENCH_THREADS") if k in os.environ},
        **machine_stamp(), "loadavg_1min_at_end": os.getloadavg()[0],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
