"""Meta-steps/s of training across processes: 1 vs N ranks (gloo on the CPU, NCCL on GPUs).

    python -m bench.distributed_scaling [--ranks 1 2] [--meta-batch 32 256 1024] [--seconds 2]
        [--device cpu|cuda] [--out bench/results/distributed_cpu.json]

Each configuration runs ``distributed_fit`` (sine MLP 1-64-64-1, backend torch, 5 inner steps of
10 points, default reduction) in fresh processes, one thread per rank, for a few warm-up meta-steps
and then for about ``--seconds``; rank 0's wall time is reported, with the time spent drawing
tasks (``IndexedSampler.draw``) and in the reducer (the collective included, with any wait for a
slower rank), and every rank's CPU time per meta-step (the work, whatever the machine's load).  Also: one
process with as many threads as the ranks would use (the alternative on one machine), and the
indexed sampler's cost by block size against one generator stream.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import torch


def _worker(rank, world, port, device, meta_batch, seconds, threads, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from reptile_fast import MLP, Reptile, Sine
    from reptile_fast.distributed import distributed_fit, setup_from_env
    from reptile_fast.distributed import reducers as R
    from reptile_fast.distributed import sampler as S

    ctx = setup_from_env(device=device, timeout=120)
    timers = {"draw": 0.0, "reduce": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            timers[key] += time.perf_counter() - t0
            return out
        return wrapper

    S.IndexedSampler.draw = timed(S.IndexedSampler.draw, "draw")  # the loop calls draw(first, m)
    R.MeanReducer.__call__ = timed(R.MeanReducer.__call__, "reduce")
    torch.manual_seed(0)
    trainer = Reptile(MLP(1, 64, 1).to(ctx.device), backend="torch")
    sine = Sine()
    distributed_fit(trainer, sine, 3, meta_batch_size=meta_batch, seed=0, context=ctx, progress=False)
    # Checked before timed: φ is the same bits on every rank, and one process (the whole
    # meta-batch, same draws) reaches it within the fp32 tolerance.
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    same = all(torch.equal(f, flat) for f in ctx.all_gather(flat, "check of φ across ranks"))
    if ctx.is_main:
        from reptile_fast.distributed import DistContext

        torch.manual_seed(0)
        alone = Reptile(MLP(1, 64, 1).to(ctx.device), backend="torch")
        distributed_fit(alone, sine, 3, meta_batch_size=meta_batch, seed=0, context=DistContext.single(ctx.device),
                        progress=False)
        want = torch.cat([p.detach().reshape(-1) for p in alone.model.parameters()])
        close = bool(torch.allclose(flat, want, rtol=1e-5, atol=1e-6))
        if not (same and close):
            raise AssertionError(f"{world} ranks, meta-batch {meta_batch}: φ identical across ranks: {same}, "
                                 f"equal to one process within rtol 1e-5 / atol 1e-6: {close}")
    # Steps for about `seconds`, agreed by all ranks (rank 0's estimate).
    t0 = time.perf_counter()
    distributed_fit(trainer, sine, 6, meta_batch_size=meta_batch, seed=0, context=ctx, progress=False)
    per_step = (time.perf_counter() - t0) / 3
    steps = ctx.broadcast_object(max(5, int(seconds / per_step)), "steps")
    for k in timers:
        timers[k] = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    distributed_fit(trainer, sine, 6 + steps, meta_batch_size=meta_batch, seed=0, context=ctx, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds of every rank: the work a meta-step costs in all, whatever the machine's load.
    cpu_all = [float(t) for t in ctx.all_gather(torch.tensor([cpu], dtype=torch.float64), "cpu times")]
    if ctx.is_main:
        queue.put({"world_size": world, "threads_per_rank": threads, "meta_batch_size": meta_batch,
                   "steps": steps, "seconds": wall, "meta_steps_per_s": steps / wall,
                   "tasks_per_s": steps * meta_batch / wall, "checked": "after 3 meta-steps: phi bitwise "
                   "identical on every rank, and equal to one process within rtol 1e-5 / atol 1e-6", "draw_ms_per_step": 1e3 * timers["draw"] / steps,
                   "reduce_ms_per_step": 1e3 * timers["reduce"] / steps,
                   "cpu_ms_per_step_each_rank": [1e3 * c / steps for c in cpu_all],
                   "cpu_ms_per_step_all_ranks": 1e3 * sum(cpu_all) / steps})
    ctx.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world, device, meta_batch, seconds, threads):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, device, meta_batch, seconds, threads, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


def sampler_cost(meta_batch: int, repeats: int = 5):
    from reptile_fast import Sine, sample_indices
    from reptile_fast.distributed import IndexedSampler

    torch.set_num_threads(1)
    rows = []
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(repeats):
        tasks = Sine().sample(meta_batch, generator=g)
        sample_indices(meta_batch, 5, tasks.n_points, 10, generator=g)
    rows.append({"meta_batch_size": meta_batch, "block_size": "one generator stream (Reptile.fit)",
                 "ms_per_draw": 1e3 * (time.perf_counter() - t0) / repeats})
    for block in (1, 16, 64, 256):
        s = IndexedSampler(Sine(), meta_batch, seed=0, plan_rows=5, batch_size=10, block_size=block)
        s.draw_step(0)
        t0 = time.perf_counter()
        for t in range(repeats):
            s.draw_step(t)
        rows.append({"meta_batch_size": meta_batch, "block_size": block,
                     "ms_per_draw": 1e3 * (time.perf_counter() - t0) / repeats})
    return rows


def main() -> None:
    from bench.env import machine_stamp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--meta-batch", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat every configuration, interleaved; the median is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/distributed_cpu.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    configs = []
    for mb in args.meta_batch:
        configs += [(world, mb, 1) for world in args.ranks]
        if args.device == "cpu" and max(args.ranks) > 1:
            configs.append((1, mb, max(args.ranks)))  # one process using the same cores as threads
    samples = {c: [] for c in configs}
    for _ in range(args.rounds):  # interleaved, so that a burst of load hits every configuration
        for world, mb, threads in configs:
            r = run(world, args.device, mb, args.seconds, threads)
            samples[(world, mb, threads)].append(r)
            print(json.dumps(r), flush=True)
    results = []
    for c, rs in samples.items():
        rs = sorted(rs, key=lambda r: r["meta_steps_per_s"])
        med = dict(rs[len(rs) // 2])
        med["meta_steps_per_s_all"] = [r["meta_steps_per_s"] for r in rs]
        base = samples[(1, c[1], 1)]
        base_med = sorted(r["meta_steps_per_s"] for r in base)[len(base) // 2]
        med["speedup_vs_1_rank_1_thread"] = med["meta_steps_per_s"] / base_med
        results.append(med)
    samplers = sampler_cost(4096, repeats=3) + sampler_cost(256)
    report = {
        "what": "distributed_fit meta-steps/s, sine MLP 1-64-64-1, backend torch, 5 inner steps of 10 points, "
                "default reduction (rank-ordered sum of one all_gather per meta-step); rank 0's wall time; "
                "one thread per rank unless threads_per_rank says otherwise; plus the indexed sampler's cost",
        "device": args.device,
        "results": results,
        "sampler": samplers,
        "load_average_before_after": [load_before, os.getloadavg()],
        "machine": machine_stamp(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
