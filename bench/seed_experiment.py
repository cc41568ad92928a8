"""The seed's full experiment, measured: 30000 iterations of the seed's own loop, then the
post-adaptation MSE over held-out tasks adapted as the seed's demo does (32 epochs = 160 steps).

    python -m bench.seed_experiment --seeds 0 1 2 --out bench/results/seed_experiment_cpu.json

Uses ../shared/seed/seed_program.py when present, else reptile_fast.reference (bit-identical).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import torch

from bench.env import machine_stamp

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "seed_program.py"


def load_seed():
    if SEED.exists():
        spec = importlib.util.spec_from_file_location("seed_program", SEED)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod, str(SEED.name)
    from reptile_fast import reference

    return reference, "reptile_fast.reference"


def held_out_mse(mod, model, n_tasks: int, seed: int) -> float:
    """Mean over held-out tasks of the MSE on the task's 50 points after the demo's adaptation."""
    torch.manual_seed(seed)
    errs = []
    for _ in range(n_tasks):
        task = mod.sample_task()
        m = copy.deepcopy(model)
        mod.perform_k_training_steps(m, task, 32)
        x, y, _ = task
        with torch.no_grad():
            errs.append(float(((m(x.unsqueeze(-1)).squeeze(-1) - y) ** 2).mean()))
    return sum(errs) / len(errs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=30000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--out", default="bench/results/seed_experiment_cpu.json")
    args = p.parse_args()
    mod, source = load_seed()
    runs = []
    for s in args.seeds:
        torch.manual_seed(s)
        model = mod.MLP()
        t0 = time.perf_counter()
        mod.reptile(model, args.iterations, mod.sample_task, mod.perform_k_training_steps)
        train_s = time.perf_counter() - t0
        mse = held_out_mse(mod, model, args.eval_tasks, 10_000 + s)
        runs.append({"seed": s, "train_seconds": train_s, "ms_per_iteration": 1e3 * train_s / args.iterations,
                     "post_adaptation_mse": mse})
        print(runs[-1], flush=True)
    result = {"experiment": "seed", "source": source, "iterations": args.iterations,
              "eval_tasks": args.eval_tasks, "runs": runs, **machine_stamp()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
