"""Meta-steps per second of ``Reptile.fit`` in two source trees, interleaved in one run.

Measures the training loop's cost before/after a change (e.g. the one-training-loop refactor):
the torch backend at meta-batch 1, 32 and 256 and the compiled path at meta-batch 1 (sine MLP
1-64-64-1, 5 inner steps of 10 points, one thread).  Each measurement runs in a fresh
subprocess with ``PYTHONPATH`` set to the tree, alternating trees round by round so that the
machine's load hits both alike; the compiled path is timed after its compilation (a warm-up fit
in the same process).

    python -m bench.loop_timing --tree before=/path/to/old/checkout --tree after=. \\
        --rounds 5 --json bench/results/loop_timing_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [("torch", 1, 3000), ("torch", 32, 600), ("torch", 256, 120), ("compiled", 1, 20000)]

_CHILD = r"""
import inspect, json, sys, time
import torch
torch.set_num_threads(1)
from reptile_fast import MLP, Reptile, Sine
backend, T, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
old_api = "compiled" in inspect.signature(Reptile.fit).parameters
def trainer():
    torch.manual_seed(0)
    name = "torch" if (backend == "compiled" and old_api) else backend
    return Reptile(MLP(), backend=name, outer_lr=0.1)
def fit(t, iterations):
    kw = {"compiled": True} if (backend == "compiled" and old_api) else {}
    t.fit(Sine(), iterations, meta_batch_size=T, generator=torch.Generator().manual_seed(1), progress=False, **kw)
warm = trainer(); fit(warm, 20 if backend != "compiled" else 1000)   # compile / first-sight checks
t = trainer(); phi0 = [p.detach().clone() for p in t.model.parameters()]
t0 = time.perf_counter(); fit(t, n); dt = time.perf_counter() - t0
# a time counts only for a fit that trained: finite parameters that moved, and a lower held-out loss
tasks = Sine().sample(64, generator=torch.Generator().manual_seed(99))
after = [p.detach() for p in t.model.parameters()]
if not all(bool(torch.isfinite(p).all()) for p in after) or all(torch.equal(a, b) for a, b in zip(after, phi0)):
    sys.exit("the timed fit left non-finite or unchanged parameters")
untrained = trainer()
g = lambda: torch.Generator().manual_seed(5)
if not float(t.evaluate(tasks, 5, generator=g()).mean()) < float(untrained.evaluate(tasks, 5, generator=g()).mean()):
    sys.exit("the timed fit did not lower the post-adaptation loss of held-out tasks")
print(json.dumps({"seconds": dt, "steps": n, "steps_per_s": n / dt}))
"""


def run_case(tree: str, backend: str, T: int, n: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, backend, str(T), str(n)], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{tree} {backend} T={T}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    results = {name: {f"{b}@{T}": [] for b, T, _ in CASES} for name in trees}
    for r in range(args.rounds):
        for backend, T, n in CASES:
            for name, path in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
                rate = run_case(path, backend, T, n)
                results[name][f"{backend}@{T}"].append(rate)
                print(f"round {r} {name:>8} {backend:>8} T={T:<4} {rate:9.1f} meta-steps/s", flush=True)
    summary = {name: {case: statistics.median(v) for case, v in cases.items()} for name, cases in results.items()}
    names = list(trees)
    if len(names) == 2:
        a, b = names
        summary[f"{b}/{a}"] = {case: summary[b][case] / summary[a][case] for case in summary[a]}
    import platform

    import torch

    record = {"what": "Reptile.fit meta-steps/s (sine MLP 1-64-64-1, 5 inner steps of 10 points, 1 thread), "
                      "median over rounds, trees interleaved",
              "command": "python -m bench.loop_timing " + " ".join(argv or sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "trees": trees, "rounds": args.rounds,
              "note": "shared 2-core machine; other processes ran at the same time",
              "samples": results, "median_steps_per_s": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
