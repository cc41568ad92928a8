"""One inner step of the Omniglot conv net (forward + backward) in a few layouts, 1 thread:
what could make the conv-net inner loop faster on the CPU, measured without touching the backends.

    python -m bench.omniglot_step_layouts --out bench/results/omniglot_step_layouts_cpu.json

Providers (5-way: 5 tasks × a minibatch of 10 images, the paper's meta-batch):
  per-task, contiguous     five separate [10, 1, 28, 28] steps (the reference loop's work)
  per-task, channels-last  the same with the model and inputs in channels-last memory format
  tasks folded             vmap(grad) over the 5 tasks (batched conv = one grouped convolution)
  one batch of 50          a single [50, 1, 28, 28] step of one model (a lower bound: what
                           batching the images would cost if the tasks shared weights)
Each provider's gradients are checked against the contiguous per-task ones (rtol 1e-4 / atol 1e-5;
conv biases that BatchNorm cancels are skipped: their gradient is rounding noise).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from bench.env import machine_stamp
from reptile_fast import OmniglotConvNet
from reptile_fast.checkpoint import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--out", default="bench/results/omniglot_step_layouts_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = OmniglotConvNet(5)
    T, B = args.tasks, args.batch
    x = torch.rand(T, B, 1, 28, 28)
    y = torch.randint(0, 5, (T, B))
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    skip = {f"features.{i}.bias" for i in (0, 3, 6, 9)}

    def loss(p, b, xi, yi):
        return F.cross_entropy(functional_call(model, (p, {k: v.clone() for k, v in b.items()}), (xi,)), yi)

    g1 = grad(loss)
    cl_params = {n: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
                 for n, v in params.items()}
    x_cl = [x[t].contiguous(memory_format=torch.channels_last) for t in range(T)]
    stacked = {n: v.unsqueeze(0).expand(T, *v.shape).clone() for n, v in params.items()}
    sbuf = {n: b.unsqueeze(0).expand(T, *b.shape).clone() for n, b in buffers.items()}
    folded = vmap(grad(loss))

    providers = {
        "per-task, contiguous": lambda: [g1(params, buffers, x[t], y[t]) for t in range(T)],
        "per-task, channels-last": lambda: [g1(cl_params, buffers, x_cl[t], y[t]) for t in range(T)],
        "tasks folded (vmap, grouped conv)": lambda: folded(stacked, sbuf, x, y),
        "one batch of T*B (shared weights, lower bound)": lambda: g1(params, buffers, x.flatten(0, 1), y.flatten()),
    }
    base = providers["per-task, contiguous"]()
    for name in ("per-task, channels-last", "tasks folded (vmap, grouped conv)"):
        got = providers[name]()
        for t in range(T):
            for n in base[t]:
                if n in skip:
                    continue
                g = got[n][t] if isinstance(got, dict) else got[t][n]
                torch.testing.assert_close(g.contiguous(), base[t][n], rtol=1e-4, atol=1e-5)
    times = {k: [] for k in providers}
    for name, fn in providers.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = [{"provider": k, "ms_per_step_of_all_tasks": 1e3 * statistics.median(v)} for k, v in times.items()]
    ref = rows[0]["ms_per_step_of_all_tasks"]
    for r in rows:
        r["speedup_vs_per_task_contiguous"] = ref / r["ms_per_step_of_all_tasks"]
        print(r, flush=True)
    atomic_write_json(args.out, {**machine_stamp(), "tasks": T, "batch": B, "threads": 1,
                                 "repeats": args.repeats,
                                 "note": "2-core machine shared with other agents' jobs: medians of interleaved rounds",
                                 "rows": rows})


if __name__ == "__main__":
    main()
