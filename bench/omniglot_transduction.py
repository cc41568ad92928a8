"""Transductive evaluation of the models `bench.omniglot_results` trained, on the same test episodes.

    python -m bench.omniglot_transduction --models runs/omniglot_bench --data ../shared/data/omniglot \\
        --eval-tasks 200 --result bench/results/omniglot_transduction_cpu.json

The jobs evaluate non-transductively (each query image in a batch with the support set).  This
re-draws exactly the job's test episodes and adaptation minibatches (same generator seeds) and
predicts all of a task's query images in one batch instead, so the two numbers are paired; the
20 official runs likewise.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from reptile_fast.checkpoint import atomic_write_json
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.fewshot_job import load_trained, run_omniglot_runs
from reptile_fast.tasks.omniglot import Omniglot, load_omniglot_images


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="runs/omniglot_bench")
    p.add_argument("--data", default="../shared/data/omniglot")
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--result", default="bench/results/omniglot_transduction_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    record = {**machine_stamp(), "machine_note": "2-core machine shared with other agents' jobs",
              "results": []}
    for name in ("5way", "20way"):
        config, trainer = load_trained(Path(args.models) / name)
        train_alphabets = load_omniglot_images(config.train, pixels=config.pixels).alphabets
        test_data = load_omniglot_images([config.test], pixels=config.pixels)
        for k in config.shots:
            dist = Omniglot(test_data, ways=config.ways, shots=k, query_shots=config.query_shots,
                            exclude_alphabets=train_alphabets)
            # the job's generator for this K (fewshot_job._run: seed + 1_000_003 + k)
            gen = torch.Generator().manual_seed(config.seed + 1_000_003 + k)
            episodes = dist.sample_episodes(args.eval_tasks, generator=gen)
            t0 = time.perf_counter()
            result = evaluate_episodes(trainer, episodes, steps=config.eval_steps,
                                       batch_size=min(config.eval_batch_size, episodes.support.n_points),
                                       transductive=True, generator=gen)
            record["results"].append({"ways": config.ways, "shots": k, "transductive": True,
                                      **result.as_dict(), "seconds": time.perf_counter() - t0})
            print(record["results"][-1], flush=True)
    t0 = time.perf_counter()
    runs = run_omniglot_runs(Path(args.data) / "all_runs.zip", Path(args.models) / "20way",
                             Path(args.result).parent / "_runs_tmp", seed=config.seed, transductive=True)
    (Path(args.result).parent / "_runs_tmp" / "runs_metrics.json").unlink()
    (Path(args.result).parent / "_runs_tmp").rmdir()
    record["official_runs_transductive"] = {**runs, "seconds": time.perf_counter() - t0}
    atomic_write_json(args.result, record)


if __name__ == "__main__":
    main()
