"""Large meta-batches at the speed of small ones: backend "torch" at meta-batch 256 and 4096 (with
and without task blocks) beside the JAX peer and this CPU's fp32 matmul peak, in one run.

Sine MLP 1-64-64-1, 5 inner SGD steps of 10 points (``bench.providers.Point``), one thread
(``torch.set_num_threads(1)``, XLA single-threaded), the providers of ``bench/providers.py``:

* ``torch``: backend "torch" as ``Reptile`` builds it (MLP fast path, ``task_block="auto"``);
* ``torch-unblocked``: the same with ``task_block=None`` (all tasks' weights at once: the
  behaviour before task blocks);
* ``jax``: ``bench/jax_peer.py`` (``jit(vmap(lax.scan))``), when JAX is importable.

Every provider is checked against the reference (``check_prepared``: rtol 1e-5 / atol 1e-6 on 16
tasks) before it is timed.  Timing: ``bench.flops.time_calls`` in interleaved rounds (every case
once per round, so a shared machine's load hits them alike); the peak (``measure_matmul_peak``,
1024² sgemm, best of repeats) and the inner loop's own bmm rate are measured in every round too.
Reports median tasks/s, % of the peak (FLOPs per task from ``bench.flops.inner_loop_flops``; against
the best peak of the run, and the median of each round's tasks/s over that round's peak) and the
median over rounds of meta-batch 4096's tasks/s over 256's (the issue's target: ≥ 0.9).

    PYTHONPATH=.:<jax site-packages> python -m bench.large_meta_batch --rounds 12 \\
        --out bench/results/large_meta_batch_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import torch  # noqa: E402

from bench.env import machine_stamp  # noqa: E402
from bench.flops import inner_loop_flops, measure_bmm_rate, measure_matmul_peak, time_calls  # noqa: E402
from bench.providers import BackendProvider, Point, check_prepared, get_provider, make_problem  # noqa: E402

SIZES = (256, 4096)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--min-time", type=float, default=0.25, help="seconds of calls per case and round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/large_meta_batch_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    providers = {"torch": get_provider("torch"),
                 "torch-unblocked": BackendProvider("torch-unblocked", "torch", {"task_block": None})}
    jax_provider = get_provider("jax")
    jax_reason = jax_provider.unavailable(device)
    if jax_reason is None:
        providers["jax"] = jax_provider
    cases, checks = {}, {}
    for T in SIZES:
        point = Point(meta_batch=T)
        problem = make_problem(point, device, rotations=2)
        for name, provider in providers.items():
            if name == "torch-unblocked" and T <= 256:
                continue  # the default does not block at 256 either (one block of ≤ 2 MB... same code)
            prepared = provider.prepare(problem)
            result, _ = check_prepared(provider, prepared, problem)
            checks[f"{name}-T{T}"] = result.as_dict()
            if not result.ok:
                raise SystemExit(f"{name} at T={T} is wrong, not timed: {result.message}")
            cases[f"{name}-T{T}"] = (T, prepared)
    flops_per_task = inner_loop_flops(Point(meta_batch=1).dims, 10, 5)
    series = {name: [] for name in cases}
    peaks, bmm = [], []
    for r in range(args.rounds):
        peaks.append(measure_matmul_peak(device)["flops_per_s"])
        bmm.append(measure_bmm_rate(device)["flops_per_s"])
        for name, (T, prepared) in cases.items():
            t = time_calls(prepared.run, device, sync=prepared.sync, min_time=args.min_time, repeats=3,
                           max_time=3 * args.min_time)
            series[name].append(T / t["median"])
        print(r, {k: round(v[-1]) for k, v in series.items()}, f"peak {peaks[-1] / 1e9:.1f} GFLOP/s",
              flush=True)
    peak = max(peaks)
    summary = {}
    for name, values in series.items():
        med = statistics.median(values)
        in_round = [v * flops_per_task / pk for v, pk in zip(values, peaks)]
        summary[name] = {"tasks_per_s_median": med, "tasks_per_s_best": max(values), "per_round": values,
                         "fraction_of_peak": med * flops_per_task / peak,
                         "fraction_of_peak_best": max(values) * flops_per_task / peak,
                         "fraction_of_round_peak_median": statistics.median(in_round)}
    ratios = {}
    per_round = lambda a, b: [x / y for x, y in zip(series[a], series[b])]  # noqa: E731
    for name in ("torch", "torch-unblocked", "jax"):
        if f"{name}-T4096" in series:
            base = "torch-T256" if name == "torch-unblocked" else f"{name}-T256"
            rr = per_round(f"{name}-T4096", base)
            ratios[f"{name}: T4096 / T256"] = {"median_of_rounds": statistics.median(rr), "per_round": rr}
    if "jax-T256" in series:
        for T in SIZES:
            rr = per_round(f"torch-T{T}", f"jax-T{T}")
            ratios[f"torch / jax at T{T}"] = {"median_of_rounds": statistics.median(rr), "per_round": rr}
    result = {
        "experiment": "backend torch (MLP path) at meta-batch 256 and 4096, blocked and unblocked, beside JAX; "
                      "sine MLP 1-64-64-1, 5 inner SGD steps of 10 points",
        "threads": args.threads, "rounds": args.rounds,
        "flops_per_task": flops_per_task,
        "peak_flops_per_s": {"best": peak, "median": statistics.median(peaks),
                             "what": "1024x1024 fp32 matmul, best of repeats, measured each round"},
        "bmm_flops_per_s": {"best": max(bmm), "median": statistics.median(bmm),
                            "shape": "[256,10,64]x[256,64,64]"},
        "cases": summary, "ratios": ratios, "checks": checks,
        "jax": None if jax_reason else sys.modules["jax"].__version__, "jax_unavailable": jax_reason,
        "targets": {"T4096_over_T256_min": 0.9, "fraction_of_peak_at_T256_goal": 0.6},
        "note": "the machine's 2 cores are shared with other jobs; every ratio is within a round",
        **machine_stamp(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()
                          if kk != "per_round"} for k, v in summary.items()}, indent=1))
    print(json.dumps({k: round(v["median_of_rounds"], 3) for k, v in ratios.items()}))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
