"""Which part of the official Omniglot net costs accuracy early in training: padding, BatchNorm ε or init?

    python -m bench.omniglot_net_parts --data ../shared/data/omniglot --iterations 800 --eval-tasks 200 \\
        --threads 1 --result bench/results/omniglot_net_parts_cpu.json

``bench/omniglot_net_pixels.py`` found the official net (``OmniglotConvNet.official``: TensorFlow's
"same" padding, BatchNorm ε = 1e-3, Glorot initialisation) 10 points below the default net at
5-way 1-shot after 800 meta-steps.  This trains the default net, the default net with each one of
the three changes, and the official net, the way the ``reptile-fast omniglot`` job trains (its
5-way preset, ``epochs`` minibatches, a fresh inner Adam per task, area pixels, ``torch.manual_seed``
before the net is built, ``fit`` drawing from a generator seeded the same), through the Python API
(``Reptile``, ``Omniglot``, ``OmniglotConvNet``) since the job's ``--net`` has only the two ends.
Check first: the default and the official variants trained here equal, bitwise, the job's own
models for the same settings (``--check-runs``: the ``--out-dir`` of ``bench.omniglot_net_pixels``,
whose ``torch-area`` and ``official-area`` runs are those; skipped when absent).  Every model is
tested on the same episodes per K (seed ``seed + 1_000_003 + K``, as the job's final test) with the
same adaptation plans, so differences are paired per task (mean and 1.96 · std / sqrt(T)).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from bench.omniglot_pairs import ci_or_none, paired, protocol_arguments
from reptile_fast import OmniglotConvNet, Reptile
from reptile_fast.checkpoint import atomic_write_json
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.fewshot_job import OmniglotConfig, omniglot_preset
from reptile_fast.tasks.omniglot import ROTATIONS, Omniglot, load_omniglot_images

WAYS = 5
#: name -> OmniglotConvNet keyword arguments
VARIANTS = {"default": {}, "same padding": {"padding": "same"}, "bn eps 1e-3": {"bn_eps": 1e-3},
            "glorot init": {"init": "glorot"}, "official": {"padding": "same", "bn_eps": 1e-3, "init": "glorot"}}
#: the job's run (bench.omniglot_net_pixels --out-dir) each variant must equal, where one exists
JOB_RUNS = {"default": "torch-area", "official": "official-area"}


def main(argv=None) -> dict:
    p = protocol_arguments(__doc__.split("\n", 1)[0], result="bench/results/omniglot_net_parts_cpu.json",
                           job_check=False)
    p.add_argument("--check-runs", default="runs/omniglot_net_pixels",
                   help="bench.omniglot_net_pixels's --out-dir: its job models are the check")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = Path(args.data)
    train_data = load_omniglot_images([str(data / "images_background_small1.zip")])
    test_data = load_omniglot_images([str(data / "images_background_small2.zip")])
    cfg = OmniglotConfig(**{**omniglot_preset(WAYS), "train": ["-"], "test": "-", "shots": args.shots,
                            "iterations": args.iterations, "seed": args.seed})
    train_dist = Omniglot(train_data, ways=WAYS, shots=cfg.train_shots, query_shots=0, rotations=ROTATIONS)
    test_alphabets = [a for a in test_data.alphabets if a not in set(train_data.alphabets)]
    dists = {k: Omniglot(test_data, ways=WAYS, shots=k, query_shots=cfg.query_shots, alphabets=test_alphabets)
             for k in args.shots}
    record = {**machine_stamp(), "command": "python -m bench.omniglot_net_parts "
              + " ".join(sys.argv[1:] if argv is None else argv),
              "machine_note": "2-core machine shared with other agents' jobs; one torch thread",
              "training": {}, "job_check": {}, "cells": [], "paired_differences": []}

    def save():
        atomic_write_json(args.result, record)

    trainers = {}
    for name, kw in VARIANTS.items():
        torch.manual_seed(cfg.seed)  # as the job: the net's initialisation from the seed
        model = OmniglotConvNet(WAYS, **kw)
        trainer = Reptile(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                          inner_batch_size=cfg.inner_batch_size, outer_lr=cfg.outer_lr,
                          outer_lr_final=cfg.outer_lr_final, loss="cross_entropy", inner_optimizer="adam",
                          minibatches=cfg.minibatches, backend=cfg.backend)
        t0 = time.perf_counter()
        history = trainer.fit(train_dist, cfg.iterations, meta_batch_size=cfg.meta_batch_size,
                              generator=torch.Generator().manual_seed(cfg.seed), progress=False)
        seconds = time.perf_counter() - t0
        trainers[name] = trainer
        record["training"][name] = {"net": kw, "train_seconds": seconds,
                                    "ms_per_iteration": 1e3 * seconds / cfg.iterations,
                                    "final_inner_loss": float(history["loss"][-1]), "backend": trainer.backend.name}
        job = Path(args.check_runs) / JOB_RUNS.get(name, "-") / "model.pt"
        if job.is_file():
            saved = torch.load(job, weights_only=True)
            settings = {k: saved["config"].get(k) for k in ("iterations", "seed", "ways", "minibatches",
                                                            "adam_state", "pixels")}
            if settings == {"iterations": cfg.iterations, "seed": cfg.seed, "ways": WAYS,
                            "minibatches": cfg.minibatches, "adam_state": "fresh", "pixels": "area"}:
                same = all(torch.equal(v, model.state_dict()[k]) for k, v in saved["state_dict"].items())
                record["job_check"][name] = {"job_model": str(job), "bitwise_equal": bool(same)}
            else:
                record["job_check"][name] = {"job_model": str(job), "skipped": f"other settings: {settings}"}
        print(f"trained {name}: {seconds:.0f} s", flush=True)
        save()

    per_task = {}
    for k in args.shots:
        for name, trainer in trainers.items():
            gen = torch.Generator().manual_seed(args.seed + 1_000_003 + k)
            episodes = dists[k].sample_episodes(args.eval_tasks, generator=gen)
            result = evaluate_episodes(trainer, episodes, steps=cfg.eval_steps,
                                       batch_size=min(cfg.eval_batch_size, episodes.support.n_points),
                                       transductive=cfg.transductive, generator=gen, minibatches=cfg.minibatches)
            per_task[name, k] = result.per_task
            record["cells"].append({"variant": name, "ways": WAYS, "shots": k, **result.as_dict()})
            print(f"{name:14s} {k}-shot: {100 * result.accuracy:.2f} % ± {100 * (ci_or_none(result.ci95) or 0):.2f}",
                  flush=True)
            save()
    for k in args.shots:
        for name in VARIANTS:
            if name == "default":
                continue
            d = {"what": f"{name} - default", "shots": k, **paired(per_task[name, k], per_task["default", k])}
            record["paired_differences"].append(d)
            print(f"{k}-shot {name} - default: {100 * d['mean']:+.2f} ± {100 * (d['ci95'] or 0):.2f} points", flush=True)
    record["per_task_accuracy"] = {f"{n}/{k}-shot": v.tolist() for (n, k), v in per_task.items()}
    record["settings"] = {"ways": WAYS, "shots": args.shots, "iterations": args.iterations,
                          "eval_tasks": args.eval_tasks, "eval_steps": cfg.eval_steps, "seed": args.seed,
                          "minibatches": cfg.minibatches, "pixels": "area", "threads": args.threads,
                          "test_alphabets": test_alphabets,
                          "ci95": "1.96 * std / sqrt(T) over tasks (normal approximation)"}
    record["wall_seconds"] = time.perf_counter() - t_start
    save()
    return record


if __name__ == "__main__":
    main()
