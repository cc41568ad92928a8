"""Test a trained omniglot job's model at more shot counts, with the job's own protocol.

    python -m bench.omniglot_more_shots --model RUN_DIR --test OMNIGLOT_ZIP_OR_DIR --shots 5 \\
        --tasks 200 --out bench/results/FILE.json

``RUN_DIR`` is the ``--out`` of a ``reptile-fast omniglot`` run (its ``model.pt`` and config):
the same held-out alphabets (``--test``'s alphabets minus the run's training alphabets), the
same adaptation (eval steps, batch, inner Adam with fresh state per task, non-transductive unless
the run was), the same seed rule for the test draws (``seed + 1_000_003 + K``) and the pixel
1-NN baseline on the same episodes.  Nothing is trained.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.env import machine_stamp


def main(argv=None) -> int:
    from reptile_fast.fewshot import evaluate_episodes, nearest_neighbour_predictions, score_predictions
    from reptile_fast.fewshot_job import load_trained
    from reptile_fast.tasks.omniglot import Omniglot, load_omniglot_images

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the --out folder of a reptile-fast omniglot run")
    ap.add_argument("--test", required=True, help="Omniglot folder or zip to test on")
    ap.add_argument("--shots", type=int, nargs="+", required=True)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config, trainer = load_trained(args.model)
    metrics_path = Path(args.model) / "metrics.json"
    train_alphabets = json.loads(metrics_path.read_text())["train_alphabets"] if metrics_path.exists() else []
    data = load_omniglot_images([args.test], pixels=config.pixels)
    alphabets = [a for a in data.alphabets if a not in set(train_alphabets)]
    rows = []
    for k in args.shots:
        dist = Omniglot(data, ways=config.ways, shots=k, query_shots=config.query_shots, alphabets=alphabets)
        gen = torch.Generator().manual_seed(config.seed + 1_000_003 + k)
        t0 = time.perf_counter()
        episodes = dist.sample_episodes(args.tasks, generator=gen, device=trainer.device)
        result = evaluate_episodes(trainer, episodes, steps=config.eval_steps,
                                   batch_size=min(config.eval_batch_size, episodes.support.n_points),
                                   transductive=config.transductive, generator=gen)
        nn = score_predictions(nearest_neighbour_predictions(episodes), episodes.query.y)
        row = {"ways": config.ways, "shots": k, **result.as_dict(), "transductive": config.transductive,
               "nearest_neighbour_accuracy": nn.accuracy,
               "nearest_neighbour_ci95": None if math.isnan(nn.ci95) else nn.ci95,
               "eval_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{config.ways}-way {k}-shot: {100 * result.accuracy:.2f} % ± {100 * result.as_dict()['ci95']:.2f} "
              f"(pixel 1-NN {100 * nn.accuracy:.2f} %) over {args.tasks} tasks", flush=True)
    out = {"model": str(args.model), "model_config": {k: v for k, v in vars(config).items()},
           "test": args.test, "test_alphabets": alphabets, "results": rows, **machine_stamp(),
           "command": "python -m bench.omniglot_more_shots " + " ".join(argv if argv is not None else
                                                                       __import__("sys").argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
