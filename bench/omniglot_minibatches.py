"""The effect of ``minibatches="fresh"|"epochs"`` on the paper's 5-way Omniglot protocol, paired.

    python -m bench.omniglot_minibatches --data ../shared/data/omniglot --out-dir runs/omniglot_minibatches \\
        --iterations 800 --eval-tasks 200 --threads 1 --result bench/results/omniglot_minibatches_cpu.json

Trains two 5-way models from the same seed with the `reptile-fast omniglot` job (through
``reptile_fast.fewshot_job.run_omniglot``, the paper's 5-way preset, validation off, checkpoint only
at the end): one with ``minibatches="fresh"`` (each inner step's minibatch drawn anew, the
default), one with ``"epochs"`` (each task's shuffled images read in order, as the official code).
Then evaluates each model on the same test episodes of small2's held-out alphabets (5-way 1-shot
and 5-shot, ``--eval-tasks`` each, drawn as the job's final test draws them: generator seed
``seed + 1_000_003 + K``) under both evaluation settings, with the same generator seed for every
cell of a K: the cells of a K share their episodes, and cells with the same evaluation setting
also share their adaptation minibatches.  So every difference between two cells of a K is paired
per task; the file gives its mean and 95 % interval (1.96 · std / sqrt(T) of the per-task
differences).

With 1 shot (5 support images, minibatches of 5) both settings use the whole support set at
every step, in another order: they differ only by rounding there.

The job's own test (``--job-eval-tasks`` episodes, with the model's training setting) is kept
as a check: this script's evaluation of the same number of episodes must give its accuracy.
Everything is written to ``--result`` with the machine stamp.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from bench.omniglot_pairs import ci_or_none, paired, protocol_arguments
from reptile_fast.checkpoint import atomic_write_json
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.fewshot_job import OmniglotConfig, load_trained, omniglot_preset, run_omniglot
from reptile_fast.tasks import MINIBATCHES
from reptile_fast.tasks.omniglot import Omniglot, load_omniglot_images

WAYS = 5


def main(argv=None) -> dict:
    p = protocol_arguments(__doc__.split("\n", 1)[0], result="bench/results/omniglot_minibatches_cpu.json",
                           out_dir="runs/omniglot_minibatches", out_dir_help="the two job runs go to OUT/fresh, OUT/epochs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = Path(args.data)
    train, test = [str(data / "images_background_small1.zip")], str(data / "images_background_small2.zip")
    out_dir = Path(args.out_dir)
    record = {**machine_stamp(), "machine_note": "2-core machine shared with other agents' jobs; one torch "
              "thread; timings are wall-clock under that load", "training": {}, "cells": [],
              "paired_differences": [], "job_check": []}

    def save():
        atomic_write_json(args.result, record)

    # ---- training: the job, twice, from the same seed
    configs = {}
    for mb in MINIBATCHES:
        settings = {**omniglot_preset(WAYS), "train": train, "test": test, "shots": args.shots,
                    "iterations": args.iterations, "eval_tasks": args.job_eval_tasks, "validate_every": 0,
                    "checkpoint_every": 0, "threads": args.threads, "seed": args.seed, "minibatches": mb}
        if args.eval_steps is not None:
            settings["eval_steps"] = args.eval_steps
        cfg = OmniglotConfig(**settings)
        configs[mb] = cfg
        t0 = time.perf_counter()
        metrics = run_omniglot(cfg, out_dir / mb, progress=False)
        record["training"][mb] = {
            "config": json.loads(json.dumps(cfg.__dict__)), "out": str(out_dir / mb),
            "train_seconds": metrics["train_seconds"], "ms_per_iteration": metrics["ms_per_iteration"],
            "final_inner_loss": metrics["final_inner_loss"], "backend": metrics["backend"],
            "threads": metrics["threads"], "job_wall_seconds": time.perf_counter() - t0,
            "job_test": metrics["results"],
            "train_alphabets": metrics["train_alphabets"], "test_alphabets": metrics["test_alphabets"],
            "command": f"reptile-fast omniglot --train {train[0]} --test {test} --ways {WAYS} "
                       f"--shots {' '.join(map(str, args.shots))} --iterations {args.iterations} "
                       f"--eval-tasks {args.job_eval_tasks} --eval-steps {cfg.eval_steps} --validate-every 0 "
                       f"--checkpoint-every 0 --threads {args.threads} --seed {args.seed} --minibatches {mb} "
                       f"--no-progress --out {out_dir / mb}"}
        print(f"trained minibatches={mb}: {metrics['train_seconds']:.1f} s "
              f"({metrics['ms_per_iteration']:.0f} ms per meta-step)", flush=True)
        save()
    torch.set_num_threads(args.threads)

    # ---- the test episodes, as the job draws them (held-out alphabets of --test)
    train_alphabets = load_omniglot_images(train).alphabets
    test_data = load_omniglot_images([test])
    test_alphabets = [a for a in test_data.alphabets if a not in set(train_alphabets)]
    cfg0 = configs[MINIBATCHES[0]]
    dists = {k: Omniglot(test_data, ways=WAYS, shots=k, query_shots=cfg0.query_shots, alphabets=test_alphabets)
             for k in args.shots}
    trainers = {mb: load_trained(out_dir / mb)[1] for mb in MINIBATCHES}

    def evaluate(trainer, k: int, n: int, eval_mb: str):
        # the job's final test: one generator per K draws the episodes, then the adaptation plan
        gen = torch.Generator().manual_seed(args.seed + 1_000_003 + k)
        episodes = dists[k].sample_episodes(n, generator=gen)
        return evaluate_episodes(trainer, episodes, steps=cfg0.eval_steps,
                                 batch_size=min(cfg0.eval_batch_size, episodes.support.n_points),
                                 transductive=cfg0.transductive, generator=gen, minibatches=eval_mb)

    # ---- the check: this evaluation gives the job's own test result
    for mb in MINIBATCHES:
        for job_result in record["training"][mb]["job_test"]:
            k = job_result["shots"]
            mine = evaluate(trainers[mb], k, args.job_eval_tasks, mb)
            record["job_check"].append({"minibatches": mb, "shots": k, "n_tasks": args.job_eval_tasks,
                                        "job_accuracy": job_result["accuracy"], "here_accuracy": mine.accuracy,
                                        "equal": mine.accuracy == job_result["accuracy"]})
    save()

    # ---- the cells: training setting × evaluation setting × K, on the same episodes per K
    per_task = {}
    for k in args.shots:
        for train_mb in MINIBATCHES:
            for eval_mb in MINIBATCHES:
                t0 = time.perf_counter()
                result = evaluate(trainers[train_mb], k, args.eval_tasks, eval_mb)
                per_task[train_mb, eval_mb, k] = result.per_task
                record["cells"].append({"train_minibatches": train_mb, "eval_minibatches": eval_mb,
                                        "ways": WAYS, "shots": k, **result.as_dict(),
                                        "eval_seconds": time.perf_counter() - t0})
                c = record["cells"][-1]
                print(f"train {train_mb:6s} eval {eval_mb:6s} {k}-shot: {100 * c['accuracy']:.2f} % "
                      f"± {100 * (c['ci95'] or 0):.2f} ({c['eval_seconds']:.0f} s)", flush=True)
                save()

    # ---- paired differences (a - b), per K
    pairs = []
    for mb in MINIBATCHES:
        pairs.append(("evaluation epochs - fresh, same model", (mb, "epochs"), (mb, "fresh")))
    for mb in MINIBATCHES:
        pairs.append(("training epochs - fresh, same evaluation", ("epochs", mb), ("fresh", mb)))
    pairs.append(("official (epochs, epochs) - default (fresh, fresh)", ("epochs", "epochs"), ("fresh", "fresh")))
    for k in args.shots:
        for what, a, b in pairs:
            record["paired_differences"].append({
                "what": what, "shots": k, "ways": WAYS,
                "a": {"train_minibatches": a[0], "eval_minibatches": a[1]},
                "b": {"train_minibatches": b[0], "eval_minibatches": b[1]},
                "same_adaptation_minibatches": a[1] == b[1],
                **paired(per_task[(*a, k)], per_task[(*b, k)])})
            d = record["paired_differences"][-1]
            print(f"{k}-shot {what} [{a} - {b}]: {100 * d['mean']:+.2f} ± {100 * (d['ci95'] or 0):.2f} points",
                  flush=True)
    record["per_task_accuracy"] = {f"train_{t}/eval_{e}/{k}-shot": v.tolist() for (t, e, k), v in per_task.items()}
    record["settings"] = {"ways": WAYS, "shots": args.shots, "iterations": args.iterations,
                          "eval_tasks": args.eval_tasks, "eval_steps": cfg0.eval_steps,
                          "eval_batch_size": cfg0.eval_batch_size, "query_shots": cfg0.query_shots,
                          "transductive": cfg0.transductive, "seed": args.seed, "threads": args.threads,
                          "job_eval_tasks": args.job_eval_tasks, "test_alphabets": test_alphabets,
                          "episode_seed": {str(k): args.seed + 1_000_003 + k for k in args.shots},
                          "ci95": "1.96 * std / sqrt(T) over tasks (normal approximation)"}
    record["wall_seconds"] = time.perf_counter() - t_start
    save()
    return record


if __name__ == "__main__":
    main()
