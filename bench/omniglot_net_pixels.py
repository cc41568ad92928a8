"""The official net and the official pixels on the paper's 5-way Omniglot protocol: which one costs?

    python -m bench.omniglot_net_pixels --data ../shared/data/omniglot --out-dir runs/omniglot_net_pixels \\
        --iterations 800 --eval-tasks 200 --threads 1 --result bench/results/omniglot_net_pixels_cpu.json

Session 21 measured the official net and pixels together (with a carried Adam state) 8 points below
the defaults at 5-way 1-shot, one seed, and did not say which of the two changes it was.  This trains
the job four times from the same seed (``--net torch|official`` × ``--pixels area|official``; the
job's 5-way preset, ``epochs`` minibatches, a fresh inner Adam per task, validation off, a checkpoint
only at the end) and tests each model on the same episodes per K: the test images are drawn by index
from one generator seed (``seed + 1_000_003 + K``, as the job's final test), so the four cells of a
K see the same images — read with each model's own pixels — and the same adaptation plans.  Every
difference between two cells is therefore paired per task: its mean and 95 % interval
(1.96 · std / sqrt(T) of the per-task differences) are written to ``--result`` with the machine
stamp, beside each cell's accuracy.  The job's own test (``--job-eval-tasks`` episodes) is kept as a
check that this evaluation is the job's.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from bench.omniglot_pairs import ci_or_none, paired, protocol_arguments
from reptile_fast.checkpoint import atomic_write_json
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.fewshot_job import OmniglotConfig, load_trained, omniglot_preset, run_omniglot
from reptile_fast.tasks.omniglot import Omniglot, load_omniglot_images

WAYS = 5
NETS, PIXELS = ("torch", "official"), ("area", "official")


def main(argv=None) -> dict:
    p = protocol_arguments(__doc__.split("\n", 1)[0], result="bench/results/omniglot_net_pixels_cpu.json",
                           out_dir="runs/omniglot_net_pixels", out_dir_help="the runs go to OUT/<net>-<pixels>")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = Path(args.data)
    train, test = [str(data / "images_background_small1.zip")], str(data / "images_background_small2.zip")
    out_dir = Path(args.out_dir)
    combos = list(itertools.product(NETS, PIXELS))
    record = {**machine_stamp(), "machine_note": "2-core machine shared with other agents' jobs; one torch "
              "thread; timings are wall-clock under that load", "command": "python -m bench.omniglot_net_pixels "
              + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "training": {}, "cells": [], "paired_differences": [], "job_check": []}

    def save():
        atomic_write_json(args.result, record)

    # ---- training: the job, four times, from the same seed
    configs = {}
    for net, pixels in combos:
        name = f"{net}-{pixels}"
        settings = {**omniglot_preset(WAYS), "train": train, "test": test, "shots": args.shots,
                    "iterations": args.iterations, "eval_tasks": args.job_eval_tasks, "validate_every": 0,
                    "checkpoint_every": 0, "threads": args.threads, "seed": args.seed, "net": net, "pixels": pixels}
        if args.eval_steps is not None:
            settings["eval_steps"] = args.eval_steps
        cfg = configs[net, pixels] = OmniglotConfig(**settings)
        t0 = time.perf_counter()
        metrics = run_omniglot(cfg, out_dir / name, progress=False)
        record["training"][name] = {
            "config": json.loads(json.dumps(cfg.__dict__)), "out": str(out_dir / name),
            "train_seconds": metrics["train_seconds"], "ms_per_iteration": metrics["ms_per_iteration"],
            "final_inner_loss": metrics["final_inner_loss"], "backend": metrics["backend"],
            "job_wall_seconds": time.perf_counter() - t0, "job_test": metrics["results"],
            "command": f"reptile-fast omniglot --train {train[0]} --test {test} --ways {WAYS} "
                       f"--shots {' '.join(map(str, args.shots))} --iterations {args.iterations} "
                       f"--eval-tasks {args.job_eval_tasks} --eval-steps {cfg.eval_steps} --validate-every 0 "
                       f"--checkpoint-every 0 --threads {args.threads} --seed {args.seed} --net {net} "
                       f"--pixels {pixels} --no-progress --out {out_dir / name}"}
        print(f"trained {name}: {metrics['train_seconds']:.1f} s ({metrics['ms_per_iteration']:.0f} ms per "
              f"meta-step)", flush=True)
        save()
    torch.set_num_threads(args.threads)

    # ---- the test episodes, as the job draws them, once per pixel reading (the same image indices)
    train_alphabets = load_omniglot_images(train).alphabets
    cfg0 = configs[combos[0]]
    dists = {}
    for pixels in PIXELS:
        test_data = load_omniglot_images([test], pixels=pixels)
        test_alphabets = [a for a in test_data.alphabets if a not in set(train_alphabets)]
        for k in args.shots:
            dists[pixels, k] = Omniglot(test_data, ways=WAYS, shots=k, query_shots=cfg0.query_shots,
                                        alphabets=test_alphabets)
    trainers = {c: load_trained(out_dir / f"{c[0]}-{c[1]}")[1] for c in combos}

    def evaluate(combo, k: int, n: int):
        gen = torch.Generator().manual_seed(args.seed + 1_000_003 + k)
        episodes = dists[combo[1], k].sample_episodes(n, generator=gen)
        return evaluate_episodes(trainers[combo], episodes, steps=cfg0.eval_steps,
                                 batch_size=min(cfg0.eval_batch_size, episodes.support.n_points),
                                 transductive=cfg0.transductive, generator=gen, minibatches=cfg0.minibatches)

    for combo in combos:  # this evaluation is the job's own test
        for job_result in record["training"][f"{combo[0]}-{combo[1]}"]["job_test"]:
            k = job_result["shots"]
            mine = evaluate(combo, k, args.job_eval_tasks)
            record["job_check"].append({"net": combo[0], "pixels": combo[1], "shots": k,
                                        "n_tasks": args.job_eval_tasks, "job_accuracy": job_result["accuracy"],
                                        "here_accuracy": mine.accuracy,
                                        "equal": mine.accuracy == job_result["accuracy"]})
    save()

    per_task = {}
    for k in args.shots:
        for combo in combos:
            t0 = time.perf_counter()
            result = evaluate(combo, k, args.eval_tasks)
            per_task[(*combo, k)] = result.per_task
            record["cells"].append({"net": combo[0], "pixels": combo[1], "ways": WAYS, "shots": k,
                                    **result.as_dict(), "eval_seconds": time.perf_counter() - t0})
            c = record["cells"][-1]
            print(f"net {combo[0]:8s} pixels {combo[1]:8s} {k}-shot: {100 * c['accuracy']:.2f} % "
                  f"± {100 * (c['ci95'] or 0):.2f}", flush=True)
            save()

    pairs = [("official net - torch net, area pixels", ("official", "area"), ("torch", "area")),
             ("official net - torch net, official pixels", ("official", "official"), ("torch", "official")),
             ("official pixels - area pixels, torch net", ("torch", "official"), ("torch", "area")),
             ("official pixels - area pixels, official net", ("official", "official"), ("official", "area")),
             ("both official - both default", ("official", "official"), ("torch", "area"))]
    for k in args.shots:
        for what, a, b in pairs:
            record["paired_differences"].append({
                "what": what, "shots": k, "ways": WAYS, "a": {"net": a[0], "pixels": a[1]},
                "b": {"net": b[0], "pixels": b[1]}, **paired(per_task[(*a, k)], per_task[(*b, k)])})
            d = record["paired_differences"][-1]
            print(f"{k}-shot {what}: {100 * d['mean']:+.2f} ± {100 * (d['ci95'] or 0):.2f} points", flush=True)
    record["per_task_accuracy"] = {f"{n}-{px}/{k}-shot": v.tolist() for (n, px, k), v in per_task.items()}
    record["settings"] = {"ways": WAYS, "shots": args.shots, "iterations": args.iterations,
                          "eval_tasks": args.eval_tasks, "eval_steps": cfg0.eval_steps,
                          "eval_batch_size": cfg0.eval_batch_size, "query_shots": cfg0.query_shots,
                          "minibatches": cfg0.minibatches, "adam_state": cfg0.adam_state,
                          "transductive": cfg0.transductive, "seed": args.seed, "threads": args.threads,
                          "episode_seed": {str(k): args.seed + 1_000_003 + k for k in args.shots},
                          "ci95": "1.96 * std / sqrt(T) over tasks (normal approximation)"}
    record["wall_seconds"] = time.perf_counter() - t_start
    save()
    return record


if __name__ == "__main__":
    main()
