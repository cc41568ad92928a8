"""What each process of the distributed tests runs (spawned; gloo over loopback, one thread each).

``run_job`` starts ``world_size`` processes that set torchrun's variables, call
``setup_from_env`` and run a list of scenarios one after another on the same process group;
each rank saves ``{params, history, error, seconds}`` per scenario to ``out/<name>.<rank>.pt``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import torch

BASE = dict(backend="torch", reduction="mean", iterations=4, meta_batch_size=7, seed=3, init_seed=0,
            outer_optimizer=False, algorithm="reptile", checkpoint_dir=None, checkpoint_every=None,
            resume_from=None, signal_at=None, die_at=None, hang_at=None, perturb=False, inner_lr=0.02,
            stop_check_every=10, meta_batch_size_last_rank=None, backend_options=None, adam_lr=0.01,
            adam_lr_last_rank=None, group_ranks=None, thread_last_rank=False, save_fails_at=None,
            hold_folder=False, tasks_last_rank=None, backend_options_last_rank=None, adam_stepped_last_rank=False)


def make_trainer(s):
    from reptile_fast import MLP, Reptile

    torch.manual_seed(s["init_seed"])
    model = MLP(1, 16, 1)
    if s.get("perturb_rank"):  # another starting φ on every rank but 0: fit must broadcast rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * s["perturb_rank"])
    kwargs = dict(backend=s["backend"], inner_steps=3, inner_batch_size=5, algorithm=s["algorithm"],
                  inner_lr=s["inner_lr"], backend_options=s["backend_options"])
    if s["outer_optimizer"]:
        kwargs["outer_optimizer"] = torch.optim.Adam(model.parameters(), lr=s.get("adam_lr", 0.01))
    else:
        kwargs["outer_lr"] = 0.5
    return Reptile(model, **kwargs)


_last_trainer = []


def train(s, context):
    """One scenario's training on this rank; returns (trainer, history)."""
    last = context.rank == context.world_size - 1
    trainer = make_trainer({**s, "perturb_rank": context.rank if s.get("perturb") else 0,
                            **({"adam_lr": s["adam_lr_last_rank"]} if last and s.get("adam_lr_last_rank") else {}),
                            **({"backend_options": s["backend_options_last_rank"]}
                               if last and s.get("backend_options_last_rank") is not None else {})})
    if last and s.get("adam_stepped_last_rank"):
        # this rank's outer optimizer holds state the others' do not (as one loaded on a rank alone)
        for p in trainer.model.parameters():
            p.grad = torch.ones_like(p)
        trainer.outer_optimizer.step()
        trainer.outer_optimizer.zero_grad(set_to_none=True)
    _last_trainer[:] = [trainer]

    def callback(iteration, _metrics):
        if context.rank == context.world_size - 1:
            if s["signal_at"] == iteration:
                os.kill(os.getpid(), s.get("signal", signal.SIGTERM))
            if s["die_at"] == iteration:
                os.kill(os.getpid(), signal.SIGKILL)
            if s["hang_at"] == iteration:
                time.sleep(120)

    meta_batch_size = s["meta_batch_size"]
    if s["meta_batch_size_last_rank"] is not None and context.rank == context.world_size - 1:
        meta_batch_size = s["meta_batch_size_last_rank"]  # a mis-launched rank
    if s.get("thread_last_rank") and last:  # this rank trains outside the main thread (no signal handlers)
        import threading

        box = {}

        def target():
            try:
                box["value"] = _fit(s, trainer, context, meta_batch_size, callback)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return trainer, box["value"]
    return trainer, _fit(s, trainer, context, meta_batch_size, callback)


def _fit(s, trainer, context, meta_batch_size, callback):
    from reptile_fast import Sine
    from reptile_fast.distributed import distributed_fit

    last = context is not None and context.rank == context.world_size - 1
    tasks = Sine(**s["tasks_last_rank"]) if last and s.get("tasks_last_rank") else Sine()
    return distributed_fit(trainer, tasks, s["iterations"], meta_batch_size=meta_batch_size,
                           seed=s["seed"], context=context, reduction=s["reduction"], progress=False,
                           # only where needed: a callback makes every rank read every meta-step
                           callback=callback if (s["signal_at"] or s["die_at"] or s["hang_at"]) else None,
                           checkpoint_dir=s["checkpoint_dir"],
                           checkpoint_every=s["checkpoint_every"], resume_from=s["resume_from"],
                           stop_check_every=s["stop_check_every"])


def synthetic_updates(lo: int, hi: int):
    """Per-task "deltas" ``[n, 3, 2]``, ``[n, 4]`` and losses ``[n, 3]`` (stored transposed, as the
    torch backend returns them) for global tasks ``lo … hi-1``: each task's from its own seed."""
    rows = [torch.randn(13, generator=torch.Generator().manual_seed(1000 + j)) for j in range(lo, hi)]
    full = torch.stack(rows)
    losses = full[:, 10:].t().contiguous().t()
    return [full[:, :6].reshape(-1, 3, 2).contiguous(), full[:, 6:10].contiguous()], losses


def check_reducers(s, context, out: Path) -> None:
    """The reducers on synthetic per-task updates of a meta-batch of ``s["meta_batch_size"]``."""
    from reptile_fast.distributed import DistContext, MeanReducer, OrderedGather, split_tasks

    # An already initialised default group, wrapped (not owned): what a user's own launcher gives.
    context = DistContext.from_group(timeout=context.timeout)
    assert not context.owns_group and context.world_size == s["world_size"], context
    lo, hi = split_tasks(s["meta_batch_size"], context.world_size, context.rank)
    deltas, losses = synthetic_updates(lo, hi)
    result = {name: reducer(deltas, losses) for name, reducer in
              (("ordered", OrderedGather(context)), ("mean", MeanReducer(context)),
               ("all_reduce", MeanReducer(context, collective="all_reduce")))}
    torch.save(result, out / f"{s['name']}.{context.rank}.pt")


def run_job_function(s, context, out: Path) -> None:
    """The omniglot job (``run_omniglot``) on this rank: it finds the initialised group itself."""
    from reptile_fast.fewshot_job import OmniglotConfig, run_omniglot

    result = {"error": None}
    try:
        value = run_omniglot(OmniglotConfig(**s["omniglot"]), s["out"], progress=False, log=lambda m: None)
        result["value"] = json.loads(json.dumps(value))  # plain types (torch.__version__ is a str subclass)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result["error"] = (type(exc).__name__, str(exc))
    torch.save(result, out / f"{s['name']}.{context.rank}.pt")


def run_scenario(s, context, out: Path) -> None:
    if s["name"].startswith("omniglot"):
        return run_job_function(s, context, out)
    s = {**BASE, **s}
    if s["group_ranks"] is not None and context is not None and context.is_distributed:
        # Train on a subgroup of the job (DistContext.from_group): every rank makes the group,
        # the ranks in it train, the others only save a marker.  Results are saved under the
        # rank in the group.
        import torch.distributed as dist
        from reptile_fast.distributed import DistContext

        group = dist.new_group(s["group_ranks"])
        if context.rank not in s["group_ranks"]:
            outside = {"error": None}
            try:
                DistContext.from_group(group, timeout=context.timeout)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                outside["error"] = (type(exc).__name__, str(exc))
            torch.save(outside, out / f"{s['name']}-outside.{context.rank}.pt")
            return
        context = DistContext.from_group(group, timeout=context.timeout)
    if s["name"].startswith("reducers"):
        return check_reducers({**s, "world_size": context.world_size}, context, out)
    t0 = time.perf_counter()
    result = {"params": None, "history": None, "error": None}
    restore = None
    if s["save_fails_at"] is not None and (context is None or context.is_main):
        # rank 0's disk fills up: its saves from meta-step save_fails_at on raise ENOSPC
        import errno

        import reptile_fast.callbacks as cb

        original, restore = cb.save_checkpoint, cb.save_checkpoint

        def full_disk(directory, trainer, **kw):
            if trainer.iteration >= s["save_fails_at"]:
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
            return original(directory, trainer, **kw)
        cb.save_checkpoint = full_disk
    held = None
    if s["hold_folder"] and (context is None or context.is_main):
        # another run holds the checkpoint folder (its lock), in rank 0's process
        from reptile_fast.checkpoint import directory_lock

        Path(s["checkpoint_dir"]).mkdir(parents=True, exist_ok=True)
        held = directory_lock(s["checkpoint_dir"])
        held.__enter__()
    try:
        trainer, history = train(s, context)
        result["params"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        result["history"] = history["loss"]
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result["error"] = (type(exc).__name__, str(exc))
        if isinstance(exc, FloatingPointError):  # NonFiniteError: φ as it was left
            result["params"] = {k: v.detach().clone() for k, v in _last_trainer[0].model.state_dict().items()}
        if isinstance(exc, OSError):
            result["errno"] = exc.errno
    finally:
        if restore is not None:
            import reptile_fast.callbacks as cb

            cb.save_checkpoint = restore
        if held is not None:
            held.__exit__(None, None, None)
    result["seconds"] = time.perf_counter() - t0
    rank = context.rank if context is not None else 0
    torch.save(result, out / f"{s['name']}.{rank}.pt")


def _worker(rank: int, world_size: int, port: int, out: str, scenarios, timeout: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from reptile_fast.distributed import setup_from_env

    context = setup_from_env(timeout=timeout)
    try:
        for s in scenarios:
            run_scenario(s, context, Path(out))
    finally:
        if not context.failed:
            context.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(world_size: int, out, scenarios, *, timeout: float = 60.0, wait: float = 120.0,
            grace: float = 30.0):
    """Start the ranks, wait for rank 0 (at most ``wait`` s) and then the others (``grace`` s
    more), kill stragglers; returns the exit codes.  ``timeout`` is the process group's: only a
    test of a dead or hung rank needs it short; elsewhere it only bounds a failure, and a short one
    fails a healthy job whose rank a loaded machine starves (pytest -n, QA59)."""
    # forkserver: one server process imports torch once, and every rank is a fork of it
    # (spawn would import torch per rank, ~2.5 s each; a fork of this process could inherit
    # its thread pools).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_dist_worker", "reptile_fast.distributed", "reptile_fast.backends.torch_func",
                                "reptile_fast.backends.reference",
                                "torch._dynamo"])  # torch.optim's first step imports it: ~3.5 s per rank
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, str(out), scenarios, timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    procs[0].join(wait)
    deadline = time.monotonic() + grace
    for p in procs[1:]:
        p.join(max(deadline - time.monotonic(), 0.1))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def single_process(s, out: Path) -> dict:
    """The scenario in this process (world size 1, one thread): the baseline."""
    from reptile_fast.distributed import DistContext

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_scenario(s, DistContext.single(), out)
    finally:
        torch.set_num_threads(threads)
    return torch.load(out / f"{s['name']}.0.pt")

