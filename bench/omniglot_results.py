"""The few-shot Omniglot results: train on small1, test on small2's held-out alphabets and the 20 runs.

    python -m bench.omniglot_results --data ../shared/data/omniglot --out-dir runs/omniglot_bench \\
        --iterations-5 800 --iterations-20 350 --eval-tasks 200 --minibatches fresh \\
        --result bench/results/omniglot_cpu.json

(``--minibatches fresh``: the README's table was made before the job's default became "epochs".)

Runs the `reptile-fast omniglot` job twice through ``reptile_fast.fewshot_job`` exactly as the
CLI does (the paper's 5-way protocol, tested 5-way 1-shot and 5-shot; its 20-way protocol, tested
20-way 1-shot), then `reptile-fast omniglot-runs` on the 20-way model, plus the pixel
1-nearest-neighbour baseline on the same test episodes and on the runs (at 28×28, what the net
sees, and at the original 105×105).  Everything is written to ``--result`` with the machine stamp.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from reptile_fast.checkpoint import atomic_write_json
from reptile_fast.fewshot import nearest_neighbour_predictions, score_predictions
from reptile_fast.fewshot_job import OmniglotConfig, omniglot_preset, run_omniglot, run_omniglot_runs
from reptile_fast.tasks import MINIBATCHES
from reptile_fast.tasks.omniglot import load_official_runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data/omniglot")
    p.add_argument("--out-dir", default="runs/omniglot_bench")
    p.add_argument("--iterations-5", type=int, default=800)
    p.add_argument("--iterations-20", type=int, default=350)
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minibatches", choices=list(MINIBATCHES), default="fresh",
                   help="the jobs' inner minibatches (default fresh: as the README's table was made; the job's "
                        "own default is epochs)")
    p.add_argument("--result", default="bench/results/omniglot_cpu.json")
    args = p.parse_args()
    data = Path(args.data)
    train, test = [str(data / "images_background_small1.zip")], str(data / "images_background_small2.zip")
    runs = data / "all_runs.zip"
    out_dir = Path(args.out_dir)
    record = {**machine_stamp(), "machine_note": "2-core machine shared with 4 other agents' jobs; "
              "timings are wall-clock under that load", "runs": {}}

    def save():
        atomic_write_json(args.result, record)

    for ways, iterations, shots in ((5, args.iterations_5, [1, 5]), (20, args.iterations_20, [1])):
        cfg = OmniglotConfig(**{**omniglot_preset(ways), "train": train, "test": test, "shots": shots,
                                "iterations": iterations, "eval_tasks": args.eval_tasks,
                                "validate_every": max(1, iterations // 4), "validation_tasks": 20,
                                "threads": args.threads, "seed": args.seed,
                                "checkpoint_every": max(1, iterations // 4), "minibatches": args.minibatches})
        t0 = time.perf_counter()
        metrics = run_omniglot(cfg, out_dir / f"{ways}way", progress=False)
        record["runs"][f"{ways}-way"] = {"config": json.loads(json.dumps(cfg.__dict__)), "metrics": metrics,
                                         "wall_seconds": time.perf_counter() - t0,
                                         "command": f"reptile-fast omniglot --train {train[0]} --test {test} "
                                                    f"--ways {ways} --shots {' '.join(map(str, shots))} "
                                                    f"--iterations {iterations} --eval-tasks {args.eval_tasks} "
                                                    f"--validate-every {cfg.validate_every} --validation-tasks 20 "
                                                    f"--threads {args.threads} --seed {args.seed} "
                                                    f"--checkpoint-every {cfg.checkpoint_every} "
                                                    f"--minibatches {args.minibatches} "
                                                    f"--out {out_dir / f'{ways}way'}"}
        save()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    record["official_runs"] = run_omniglot_runs(runs, out_dir / "20way", seed=args.seed)
    record["official_runs"]["wall_seconds"] = time.perf_counter() - t0
    record["official_runs"]["command"] = f"reptile-fast omniglot-runs --runs {runs} --model {out_dir / '20way'}"
    for size in (28, 105):
        episodes, _ = load_official_runs(runs, image_size=size)
        nn = score_predictions(nearest_neighbour_predictions(episodes), episodes.query.y)
        record["official_runs"][f"nearest_neighbour_error_rate_{size}px"] = 1.0 - nn.accuracy
    save()
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
