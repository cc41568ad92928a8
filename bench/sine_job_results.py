"""The sine job (`reptile-fast sine`) measured end to end, default vs the fast preset.

    python -m bench.sine_job_results --seeds 0 1 2 --out bench/results/sine_job_cpu.json

Each configuration runs through ``reptile_fast.jobs.run_sine`` exactly as the CLI does, in a
temporary output directory; the post-adaptation MSE is over 200 held-out tasks, each adapted
with 160 SGD steps as the seed's demo does.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.env import machine_stamp
from reptile_fast.jobs import SineConfig, run_sine

CONFIGS = {
    # the CLI's default: the seed's experiment (meta-batch 1, ε 0.1, 30000 meta-steps), which on
    # the CPU runs on the compiled whole-meta-step path
    "default (seed's experiment, compiled path)": {},
    # the torch backend's fast preset (bench/results/torch_time_to_quality_cpu.json)
    "fast preset (torch, meta-batch 16, outer lr 1.5, 2500 steps)": dict(
        backend="torch", iterations=2500, meta_batch_size=16, outer_lr=1.5),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="bench/results/sine_job_cpu.json")
    args = p.parse_args()
    rows = []
    for name, overrides in CONFIGS.items():
        for seed in args.seeds:
            cfg = SineConfig(seed=seed, checkpoint_every=0, **overrides)
            with tempfile.TemporaryDirectory() as tmp:
                m = run_sine(cfg, tmp, progress=False)
            rows.append({"config": name, "seed": seed, **{k: m[k] for k in (
                "post_adaptation_mse", "train_seconds", "compile_seconds", "ms_per_iteration", "backend")},
                "iterations": cfg.iterations, "meta_batch_size": cfg.meta_batch_size, "outer_lr": cfg.outer_lr})
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({"runs": rows, **machine_stamp()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
