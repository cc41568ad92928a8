"""Another revision's native C meta-step program against this tree's: bitwise the same results
first, then the speed of each, interleaved.

A change to the C generator (``reptile_fast/native_step.py``) should change speed, never numbers.
This script loads REV's generator from git beside this tree's, builds each program (this CPU's
flags, the library's on-disk cache), and

1. checks that both give **bitwise** the same φ and inner losses on the same inputs — the seed MLP
   1-64-64-1 (tanh) in fp32 and fp64, and 1-40-40-1 (relu, MSE), 2-32-16-3 (sigmoid,
   cross-entropy), at 1 and 3 tasks, 5 inner steps of 10 points, 2 meta-steps per call; a case
   that differs is reported and nothing is timed;
2. times the seed MLP's program (fp32, 5 steps of 10 points) at each meta-batch size in
   interleaved rounds (the two programs' order alternating, one thread; the best of 3 calls per
   program and round), with the round's sgemm rate measured beside them.

Reported per meta-batch: each program's median time per task, the median of the per-round ratios
old / new (> 1: this tree is faster) with its quartiles, and each program's useful FLOP/s
(``bench.flops.inner_loop_flops``) as a fraction of the same round's sgemm peak.

    python -m bench.native_generator_ab --rev 188c489 --rounds 15 \\
        --out bench/results/native_generator_ab_cpu_intel_avx512.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from bench.flops import inner_loop_flops, measure_matmul_peak
from reptile_fast import native_step
from reptile_fast.mlp_spec import MLPSpec

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 8, 32, 256, 1024)
STEPS, BATCH = 5, 10
SEED_MLP = ((1, 64, 64, 1), ("tanh", "tanh", "identity"))
#: (dims, activations, loss, dtype) checked bitwise
CHECKS = (
    (*SEED_MLP, "mse", torch.float32),
    (*SEED_MLP, "mse", torch.float64),
    ((1, 40, 40, 1), ("relu", "relu", "identity"), "mse", torch.float32),
    ((2, 32, 16, 3), ("sigmoid", "sigmoid", "identity"), "cross_entropy", torch.float32),
)


def generator_at(rev: str):
    """``reptile_fast/native_step.py`` as of git revision ``rev``, loaded as a module of this
    package (its relative imports resolve to this tree's modules)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:reptile_fast/native_step.py"],
                            capture_output=True, text=True, check=True).stdout
    name = f"reptile_fast.native_step_at_{rev.replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "reptile_fast"
    sys.modules[name] = module
    exec(compile(source, f"{rev}:reptile_fast/native_step.py", "exec"), module.__dict__)
    return module


def mlp_spec(dims, acts) -> MLPSpec:
    n = len(dims) - 1
    return MLPSpec(tuple(dims), tuple(acts), tuple(f"{i}.weight" for i in range(n)), tuple(f"{i}.bias" for i in range(n)))


def inputs(dims, loss, T, M, dtype, seed=0):
    """φ ``[W_0, b_0, …]``, ``xs [M, S, T, B, d_0]``, ``ys``, ``eps [M]``: uniform draws (float64,
    then rounded to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    xs = (torch.rand(M, STEPS, T, BATCH, dims[0], generator=g, dtype=torch.float64) * 10 - 5).to(dtype)
    if loss == "mse":
        ys = (torch.rand(M, STEPS, T, BATCH, dims[-1], generator=g, dtype=torch.float64) * 10 - 5).to(dtype)
    else:
        ys = torch.randint(0, dims[-1], (M, STEPS, T, BATCH), generator=g)
    params = []
    for l in range(len(dims) - 1):
        bound = dims[l] ** -0.5
        params.append(((torch.rand(dims[l + 1], dims[l], generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype))
        params.append(((torch.rand(dims[l + 1], generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype))
    return params, xs, ys, torch.full((M,), 0.1, dtype=dtype)


def program(module, dims, acts, loss, T, dtype):
    return module.NativeProgram(mlp_spec(dims, acts), lr=0.02, loss=loss, steps=STEPS, n_tasks=T, batch=BATCH,
                                dtype=dtype).build()


def bitwise_checks(old, new) -> list:
    rows = []
    for dims, acts, loss, dtype in CHECKS:
        for T in (1, 3):
            args = inputs(dims, loss, T, 2, dtype, seed=T)
            (phi_a, loss_a), (phi_b, loss_b) = (program(m, dims, acts, loss, T, dtype)(*args) for m in (old, new))
            same = all(torch.equal(a, b) for a, b in zip(phi_a, phi_b)) and torch.equal(loss_a, loss_b)
            moved = not all(torch.equal(a, p) for a, p in zip(phi_a, args[0]))
            rows.append({"dims": list(dims), "activations": list(acts), "loss": loss, "dtype": str(dtype),
                         "tasks": T, "bitwise": bool(same), "phi_moved": bool(moved)})
    return rows


def best_of(fn, args, calls=3) -> float:
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="git revision whose generator is 'old'")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="meta-batch sizes, comma-separated")
    parser.add_argument("--tasks-per-call", type=int, default=2048, help="M = max(1, this // T) meta-steps per call")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tasks_per_call < 1:
        parser.error("--rounds and --tasks-per-call must be >= 1")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1:
        parser.error("--sizes must name meta-batch sizes >= 1")
    torch.set_num_threads(1)
    old, new = generator_at(args.rev), native_step
    result = {"experiment": __doc__.split("\n\n")[0].replace("\n", " "), "rev_old": args.rev,
              "rev_new": "this tree (" + subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                        capture_output=True, text=True).stdout.strip() + " + working changes if any)",
              "stamp": machine_stamp(), "steps": STEPS, "batch": BATCH, "dims": list(SEED_MLP[0])}
    result["bitwise"] = checks = bitwise_checks(old, new)
    for row in checks:
        print(f"  bitwise {row['dims']} {row['loss']} {row['dtype']} T={row['tasks']}: {row['bitwise']}")
    if not all(r["bitwise"] and r["phi_moved"] for r in checks):
        print("the two generators' programs differ (or did not train): nothing timed")
        result["timed"] = False
    else:
        cases = {}
        for T in sizes:
            M = max(1, args.tasks_per_call // T)
            cases[T] = (M, inputs(SEED_MLP[0], "mse", T, M, torch.float32),
                        {k: program(m, *SEED_MLP, "mse", T, torch.float32) for k, m in (("old", old), ("new", new))})
        times = {T: {"old": [], "new": []} for T in sizes}
        peaks = []
        for r in range(args.rounds):
            peaks.append(measure_matmul_peak(torch.device("cpu"), min_time=0.1)["flops_per_s"])
            for T, (M, inp, progs) in cases.items():
                for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    times[T][k].append(best_of(progs[k], inp) / (M * T))
        result["timed"] = True
        result["peak_flops_per_s"] = {"median": statistics.median(peaks), "per_round": peaks}
        result["sizes"] = {}
        for T in sizes:
            ratios = sorted(a / b for a, b in zip(times[T]["old"], times[T]["new"]))
            flops = inner_loop_flops(SEED_MLP[0], BATCH, STEPS, 1)
            row = {"meta_steps_per_call": cases[T][0],
                   "us_per_task_median": {k: 1e6 * statistics.median(v) for k, v in times[T].items()},
                   "speedup_old_over_new_median": statistics.median(ratios),
                   "speedup_quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
                   "fraction_of_peak_median": {k: statistics.median(flops / t / p for t, p in zip(v, peaks))
                                               for k, v in times[T].items()}}
            result["sizes"][str(T)] = row
            print(f"  T={T:5d}: old {row['us_per_task_median']['old']:.2f} µs/task, new "
                  f"{row['us_per_task_median']['new']:.2f}; old/new {row['speedup_old_over_new_median']:.3f} "
                  f"(quartiles {row['speedup_quartiles'][0]:.3f}–{row['speedup_quartiles'][1]:.3f}); "
                  f"of sgemm peak: old {100 * row['fraction_of_peak_median']['old']:.1f} %, "
                  f"new {100 * row['fraction_of_peak_median']['new']:.1f} %")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    return 0 if all(r["bitwise"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
