"""Meta-step speed of the Omniglot conv net: backend "torch" (vmap over tasks) vs "reference"
(the per-task loop), at the paper's 5-way and 20-way settings and a few meta-batch sizes.

    python -m bench.omniglot_meta_step_speed --threads 1 --repeats 5 --out bench/results/omniglot_meta_step_cpu.json

Both backends take the same tasks and minibatch plans; before timing, their adapted parameters are
checked to agree after one inner SGD step (rtol 1e-4 / atol 1e-5: conv summation order differs
between the batched and per-task paths; why not more steps: see the comment in ``main``).
The timed runs use the paper's inner Adam.  Providers are interleaved, median of ``--repeats``
rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.env import machine_stamp
from reptile_fast import OmniglotConvNet, Reptile, TaskBatch
from reptile_fast.checkpoint import atomic_write_json
from reptile_fast.tasks import sample_indices

SETTINGS = {5: dict(inner_steps=5, inner_batch_size=10, inner_lr=1e-3),
            20: dict(inner_steps=10, inner_batch_size=20, inner_lr=5e-4)}


def make(ways: int, backend: str, optimizer: str = "adam") -> Reptile:
    torch.manual_seed(0)
    s = SETTINGS[ways]
    return Reptile(OmniglotConvNet(ways), inner_lr=s["inner_lr"] if optimizer == "adam" else 0.01,
                   inner_steps=s["inner_steps"], inner_batch_size=s["inner_batch_size"], outer_lr=1.0,
                   loss="cross_entropy", inner_optimizer=optimizer, backend=backend)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--meta-batches", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    p.add_argument("--out", default="bench/results/omniglot_meta_step_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for ways in args.ways:
        s = SETTINGS[ways]
        for mb in args.meta_batches:
            g = torch.Generator().manual_seed(1)
            tasks = TaskBatch(torch.rand(mb, ways * 10, 1, 28, 28, generator=g),
                              torch.arange(ways).repeat_interleave(10).expand(mb, -1).contiguous())
            plan = sample_indices(mb, s["inner_steps"], ways * 10, s["inner_batch_size"], generator=g)
            # correctness first: one inner SGD step (lr 0.01) through both backends.  Over several
            # steps an elementwise comparison is ill-conditioned for this ReLU net: a pre-activation
            # within rounding of 0 can flip and the trajectories part (measured: a 1e-7 relative
            # input perturbation moves the fp32 reference 1.7e-5 away from its own float64 run after
            # 2 SGD steps at lr 0.05 in 1 of 6 draws); and under Adam (an update of about
            # lr·sign(g)) the elements whose gradient is rounding noise (the conv biases that
            # BatchNorm cancels) differ by up to ±lr per step.
            sgd = {b: make(ways, b, "sgd") for b in ("reference", "torch")}
            ref, got = (sgd[b].backend.inner_loop(sgd[b].model, tasks, plan[:, :1], sgd[b].config).params
                        for b in ("reference", "torch"))
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5)
            trainers = {b: make(ways, b) for b in ("reference", "torch")}
            times = {b: [] for b in trainers}
            for _ in range(args.repeats):
                for b, tr in trainers.items():
                    t0 = time.perf_counter()
                    tr.meta_step(tasks, plan)
                    times[b].append(time.perf_counter() - t0)
            row = {"ways": ways, "meta_batch": mb, **s}
            for b, ts in times.items():
                med = statistics.median(ts)
                row[f"{b}_ms_per_meta_step"] = 1e3 * med
                row[f"{b}_meta_steps_per_s"] = 1.0 / med
                row[f"{b}_tasks_per_s"] = mb / med
            row["torch_speedup_vs_reference"] = row["reference_ms_per_meta_step"] / row["torch_ms_per_meta_step"]
            print(row, flush=True)
            rows.append(row)
    atomic_write_json(args.out, {**machine_stamp(), "threads": args.threads, "repeats": args.repeats,
                                 "note": "2-core machine shared with other agents' jobs: wall-clock medians",
                                 "rows": rows})


if __name__ == "__main__":
    main()
