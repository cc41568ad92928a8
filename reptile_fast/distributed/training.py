"""Meta-training across the ranks of a torch.distributed job (also runs in one process).

``distributed_fit`` runs ``Reptile.fit`` — the one training loop — on every rank with three
plug-ins: the ``IndexedSampler`` (this rank's share of every meta-batch), a reducer (one
collective per meta-step; every rank gets the same mean update, so φ stays identical) and a
callback that lets the ranks agree on stopping after a signal.  Per meta-step on every rank:
draw the share → the backend's inner loops → per-task ``D_i = φ̃_i − φ`` → the reducer →
``φ ← φ + ε·mean_i D_i`` (core's ``OuterUpdate``).  Rank 0 alone shows progress and writes
checkpoints; every rank reads device values at the same meta-steps, so a non-finite step stops
every rank at the same read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from ..checkpoint import CHECKPOINT_NAME
from ..core import NonFiniteError
from ..loop import DEFAULT_LOG_EVERY, Callback
from ..signals import DEFAULT_SIGNALS, DeferredSignals, TrainingInterrupted, signal_name
from ..validation import check_bool, check_distinct_keys, check_int, check_loadable, check_optimizer_storable
from .context import DistContext, setup_from_env
from .reducers import make_reducer
from .sampler import DEFAULT_BLOCK_SIZE, IndexedSampler

__all__ = ["distributed_fit", "DEFAULT_STOP_CHECK_EVERY"]

#: meta-steps between the ranks' agreements on stopping after SIGINT/SIGTERM (a 2-float
#: all-reduce; only while checkpointing), at most.  torchrun gives workers 30 s after its SIGTERM.
DEFAULT_STOP_CHECK_EVERY = 10
#: ... and at most about this many seconds of meta-steps, as measured by the slowest rank: slow
#: meta-steps (a large model, a loaded machine) make the agreements more frequent, so that the
#: ranks stop, and rank 0 writes its checkpoint, well within torchrun's 30 s.
STOP_CHECK_SECONDS = 5.0


class _RankCallback(Callback):
    """What every rank adds to ``fit``'s callbacks.

    * reads at the checkpoint meta-steps on every rank (rank 0 reads there to save), so every
      rank reads — and sees a non-finite step — at the same meta-steps;
    * at most every ``stop_every`` meta-steps (fewer when meta-steps are slow: about
      ``STOP_CHECK_SECONDS`` of them), one all-reduce of "did this rank receive a signal" and of
      the seconds per meta-step since the last agreement: when any rank received a signal, every
      rank stops after that same meta-step.  The next agreement's meta-step is computed from the
      reduced (identical) values, so every rank enters it at the same meta-step.
    """

    def __init__(self, context: DistContext, signals: DeferredSignals, checkpoint_every: Optional[int],
                 stop_every: int, agree: bool, checkpointing: bool = False):
        self.context, self.signals = context, signals
        self.checkpoint_every, self.stop_every = checkpoint_every, stop_every
        # with a checkpoint_dir: rank 0's saves are exchanged (``_save_exchange``) at each due
        # checkpoint and at the end, where the other ranks enter the same collective
        self.exchange = _save_exchange(context) if checkpointing and context.is_distributed else None
        self._chunk_start = 0
        # Whether the ranks agree on stopping: the setting every rank compared at the start, not
        # ``signals.installed`` (False on a rank training outside the main thread, which would
        # then skip the all-reduce the others wait in)
        self.agree = agree
        self.stopped = False
        self.signum: Optional[int] = None  # the signal the ranks stopped on
        self.agreements = 0  # all-reduces made (tests count them)
        self._next = self._last_iteration = 0
        self._last_time = 0.0

    def on_start(self, loop) -> None:
        # the first agreement after one meta-step: it measures how long they take
        self._last_iteration, self._last_time = loop.iteration, time.monotonic()
        self._next = loop.iteration + 1
        self._chunk_start = loop.iteration  # the loop's start
        if self.exchange is not None and self.context.is_main:
            from ..callbacks import CheckpointCallback

            for cb in loop.callbacks:  # fit's checkpoint: its saves go through the exchange
                if isinstance(cb, CheckpointCallback) and cb.directory is not None:
                    cb.exchange = self.exchange

    def _exchange_due(self, loop) -> None:
        """The other ranks' side of rank 0's checkpoint exchange (``CheckpointCallback._due``'s
        schedule: a multiple of ``checkpoint_every`` reached within the chunk that ended)."""
        from ..callbacks import checkpoint_due

        start, self._chunk_start = self._chunk_start, loop.iteration
        if self.exchange is not None and not self.context.is_main \
                and checkpoint_due(start, loop.iteration, self.checkpoint_every):
            self.exchange(None)

    def wants_read(self, loop) -> bool:
        return self.checkpoint_every is not None and loop.iteration % self.checkpoint_every == 0

    def on_chunk_end(self, loop, read):
        self._agree(loop)
        self._exchange_due(loop)  # after the agreement, as rank 0's checkpoint callback comes after this one

    def _agree(self, loop) -> None:
        if not self.agree:
            return
        if not self.context.is_distributed:  # nobody to agree with: stop after this meta-step
            if self.signals.received is not None:
                self.signum, self.stopped = self.signals.received, True
                loop.stop()
            return
        if loop.iteration >= self._next:  # the same meta-steps on every rank
            # the largest signal number any rank received (0: none), so every rank reports the
            # same signal and exits with the same 128 + signal; the slowest rank's time per step
            steps = max(loop.iteration - self._last_iteration, 1)
            values = torch.tensor([float(self.signals.received or 0), (time.monotonic() - self._last_time) / steps],
                                  dtype=torch.float64, device=self.context.device)
            signum, per_step = self.context.all_reduce_(
                values, f"agreement on stopping after meta-step {loop.iteration}", op="max").tolist()
            self.agreements += 1
            if signum:
                self.signum, self.stopped = int(signum), True
                loop.stop()
                return
            self._next = loop.iteration + next_agreement_gap(per_step, self.stop_every)
            self._last_iteration, self._last_time = loop.iteration, time.monotonic()

    def on_end(self, loop) -> None:
        """One last agreement when the run ends on its own: a signal received after the last
        periodic one (up to ``stop_every`` meta-steps before the end) was dropped — the rank that
        got it returned normally, and a job under torchrun went on past the SIGTERM (the CLI to its
        evaluation).  Every rank ends the same fit here (a non-finite step raises before, on every
        rank alike), so all of them take part; a signal makes all of them raise."""
        if self.agree and not self.stopped and self.context.is_distributed:
            values = torch.tensor([float(self.signals.received or 0)], dtype=torch.float64, device=self.context.device)
            signum = self.context.all_reduce_(values, f"agreement on stopping after meta-step {loop.iteration} "
                                                      f"(the last)", op="max").item()
            self.agreements += 1
            if signum:
                self.signum, self.stopped = int(signum), True
        if self.exchange is not None and not self.context.is_main:
            self.exchange(None)  # rank 0's final checkpoint (CheckpointCallback.on_end), after this


def next_agreement_gap(seconds_per_step: float, at_most: int) -> int:
    """Meta-steps until the next stop agreement: ``at_most``, or fewer so that they take about
    ``STOP_CHECK_SECONDS`` at ``seconds_per_step``; at least 1."""
    if not seconds_per_step > 0:
        return at_most
    return max(1, min(at_most, int(STOP_CHECK_SECONDS / seconds_per_step)))


def _check_ranks_agree(ctx: DistContext, settings: Dict[str, Any]) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks were started with different
    settings (a mis-launch would otherwise train on a wrong split of tasks, or hang)."""
    every = ctx.all_gather_object(settings, "comparison of the ranks' settings")
    diffs = [f"{k}: {[s.get(k) for s in every]}" for k in settings if any(s.get(k) != settings[k] for s in every)]
    if diffs:
        raise ValueError("the ranks were started with different settings (listed by rank): " + "; ".join(diffs)
                         + ". Every rank must build the same trainer and call distributed_fit with the same arguments")


@dataclasses.dataclass(frozen=True)
class _TasksProbe:
    """What a rank's task distribution draws: compared by its class and ``digest``, not by its
    repr (which may hold a machine's own data path, e.g. ``MiniImageNet``'s root); ``shown``
    names it in the refusal."""
    digest: str  # the probe task's sha1, or what its draw raised
    kind: str  # the distribution's class
    shown: str = dataclasses.field(compare=False)

    def __repr__(self) -> str:
        return f"{self.shown} (probe task {self.digest[:12] if self.digest.isalnum() else self.digest})"


#: the probe's generator seed: any fixed value (the run's own streams are not touched)
_PROBE_SEED = 0x5EED


def _tasks_probe(task_distribution, device) -> _TasksProbe:
    """One task drawn from a fixed seed, hashed: the ranks compare it, so a rank whose task
    distribution is set up otherwise (another amplitude range or ``n_points`` for ``Sine``, another
    way / shot count, other data) is refused instead of training on other tasks than the rest
    (QA84: it trained without a word, and no longer what one process trains).  A draw that fails
    is recorded, not raised here (every rank must reach the comparison; training raises it)."""
    shown = repr(task_distribution) if type(task_distribution).__repr__ is not object.__repr__ \
        else type(task_distribution).__qualname__
    try:
        tasks = task_distribution.sample(1, generator=torch.Generator().manual_seed(_PROBE_SEED), device=device)
        h = hashlib.sha1()
        for t in (tasks.x, tasks.y):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)} {t.dtype};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
    except Exception as exc:  # noqa: BLE001 - reported by the first draw, on every rank
        digest = f"a draw that raised {type(exc).__name__}"  # (its message may hold an address)
    return _TasksProbe(digest, f"{type(task_distribution).__module__}.{type(task_distribution).__qualname__}", shown)


def _optimizer_state_to_cpu(value):
    """An optimizer's ``state_dict()`` with its tensors on the CPU (sent by pickle: a rank must not
    unpickle rank 0's ``cuda:0`` tensors onto its own GPU 0)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _optimizer_state_to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_optimizer_state_to_cpu(v) for v in value)
    return value


def _on_main(ctx: DistContext, fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on rank 0, its result sent to every rank; an error it raises (a file or directory
    that cannot be read or written) is raised on every rank alike, so no rank is left waiting in
    a collective the others never reach.  An ``OSError`` with an errno is raised as
    ``OSError(errno, message, filename, None, filename2)``, the same kind on every rank (a read-only disk's plain
    ``OSError`` became a ``ValueError``), with the file it names (the OS's own errors, e.g.
    ``[Errno 13] Permission denied: 'path'``, carry the path there, not in their message)."""
    payload = None
    if ctx.is_main:
        try:
            payload = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - any kind: a rank left waiting would hang the job
            code = exc.errno if isinstance(exc, OSError) else None
            names = tuple(None if code is None or f is None else str(f)
                          for f in (getattr(exc, "filename", None), getattr(exc, "filename2", None)))
            payload = ("error", type(exc).__name__, exc.strerror if code is not None and exc.strerror else str(exc),
                       code, names, getattr(exc, "iteration", None) if isinstance(exc, NonFiniteError) else None)
    payload = ctx.broadcast_object(payload, what)
    if payload[0] == "error":
        _, name, message, code, (filename, filename2), iteration = payload
        if code is not None:  # FileNotFoundError, PermissionError, ... by errno
            raise OSError(code, message, filename, None, filename2)
        if name == "NonFiniteError":
            raise NonFiniteError(message, iteration=iteration)
        from ..checkpoint import DirectoryInUseError

        kind = {"FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError,
                "TypeError": TypeError, "NotADirectoryError": NotADirectoryError,
                "IsADirectoryError": IsADirectoryError, "DirectoryInUseError": DirectoryInUseError}.get(name, ValueError)
        raise kind(message)
    return payload[1]


def _save_exchange(ctx: DistContext) -> Callable[[Optional[Callable[[], None]]], None]:
    """``exchange(save)``: rank 0 runs ``save`` (its checkpoint; None: nothing due there) and every
    rank raises its error alike (``_on_main``), at meta-steps every rank knows: each due
    checkpoint and the end of the run.  A save that failed on rank 0 alone (a full disk, a
    permission) left the other ranks in the next meta-step's collective until the process
    group's timeout (300 s by default), then blaming a dead rank (QA63)."""
    def exchange(save: Optional[Callable[[], None]]) -> None:
        _on_main(ctx, save if save is not None and ctx.is_main else (lambda: None),
                 "broadcast of the checkpoint's outcome")
    return exchange


def _load_on_main(ctx: DistContext, source) -> Dict[str, Any]:
    """Rank 0 reads the checkpoint and sends it to every rank (other machines need no copy); a
    file that cannot be read raises the same error on every rank."""
    from ..checkpoint import load_checkpoint

    return _on_main(ctx, lambda: load_checkpoint(source), "broadcast of the checkpoint to resume from")


def _prepare_on_main(ctx: DistContext, checkpoint_dir, folder: contextlib.ExitStack) -> None:
    """Rank 0 (the one that writes) creates and checks ``checkpoint_dir`` before training, and
    takes the folder's lock (``checkpoint.directory_lock``, held by ``folder`` until the run ends):
    a bad folder, or one another run holds, raised on rank 0 alone inside ``fit`` while the other
    ranks entered the first meta-step's collective (they then reported a dead rank, or gloo
    aborted on mismatched collectives: QA73 for the lock)."""
    from ..checkpoint import directory_lock, prepare_checkpoint_directory, remove_stale_temporaries

    def check() -> None:
        if checkpoint_dir is not None:
            directory = prepare_checkpoint_directory(checkpoint_dir, "checkpoint_dir")
            folder.enter_context(directory_lock(directory))
            remove_stale_temporaries(directory)
    _on_main(ctx, check, "broadcast of the checkpoint directory's check")


def distributed_fit(trainer, task_distribution, iterations: int, *, meta_batch_size: int, seed: int,
                    context: Optional[DistContext] = None, reduction: str = "mean",
                    block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True,
                    callback: Optional[Callable[[int, Dict[str, Any]], None]] = None,
                    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                    checkpoint_every: Optional[int] = None,
                    resume_from: Optional[Union[str, os.PathLike]] = None,
                    checkpoint_extra: Optional[Mapping[str, Any]] = None,
                    handle_signals: bool = True, log_every: int = DEFAULT_LOG_EVERY,
                    stop_check_every: int = DEFAULT_STOP_CHECK_EVERY) -> Dict[str, list]:
    """Meta-train ``trainer`` for ``iterations`` meta-steps of ``meta_batch_size`` tasks split over the ranks.

    Args:
        trainer: a ``Reptile`` on this rank's device (``context.device``); every rank builds the
            same one (rank 0's φ and outer optimizer state are broadcast at the start, so the ranks
            begin identical).
        task_distribution: ``sample(n, *, generator, device) -> TaskBatch``, drawing from ``generator``
            alone; every rank's must draw the same tasks (one probe task is compared at the start).
        iterations: the total number of meta-steps (continues from ``trainer.iteration``).
        meta_batch_size: ``T``, the global number of tasks per meta-step (split over the ranks;
            uneven shares are fine; fewer tasks than ranks is refused).
        seed: task j of meta-step t is drawn from ``(seed, t, j)`` (``IndexedSampler``).
        context: the ``DistContext`` (default: ``setup_from_env(device=trainer.device)``).
        reduction: "mean" (one collective per meta-step; equal to one process within fp32
            rounding) or "ordered" (gather in task order: one process's reduction, bitwise).
        block_size: tasks per random stream (part of the run's definition, stored in checkpoints).
        callback: ``callback(iteration, {"loss", "outer_lr", "iteration"})`` after every
            meta-step, on every rank (it makes every rank read every meta-step).
        checkpoint_dir, checkpoint_every, checkpoint_extra, handle_signals, log_every: as
            ``Reptile.fit``; rank 0 alone writes.  Checkpoints also hold ``extra["sampler"]``
            and ``extra["world_size"]``.
        resume_from: a checkpoint written by an indexed run with any number of ranks (one
            process included); read by rank 0 and sent to every rank.
        stop_check_every: meta-steps between the ranks' agreements on stopping after a signal.

    Returns ``{"loss": [...]}`` (the global mean inner loss per meta-step; the same on every rank).
    Raises ``DistributedError`` when another rank dies or hangs (within the context's timeout),
    ``TrainingInterrupted`` on every rank after SIGINT/SIGTERM to any rank (all stop after the same
    meta-step; rank 0's checkpoint is complete before any rank raises), ``NonFiniteError`` on every
    rank for a NaN/inf meta-step (the same read on every rank).
    """
    # duck-typed (this package sits below the trainer): a model or a string reached ``trainer.device``
    # and failed there with an AttributeError
    if not all(hasattr(trainer, a) for a in ("fit", "hparams", "device", "model")):
        raise TypeError(f"trainer must be a reptile_fast.Reptile (wrap the model: Reptile(model, ...)), got "
                        f"{type(trainer).__name__}")
    iterations = check_int("iterations", iterations, 1)
    meta_batch_size = check_int("meta_batch_size", meta_batch_size, 1)
    stop_check_every = check_int("stop_check_every", stop_check_every, 1)
    # an int here (Reptile.fit's None, "its default", would reach the ranks' loops as None)
    log_every = check_int("log_every", log_every, 1)
    check_bool("progress", progress)
    check_bool("handle_signals", handle_signals)
    if checkpoint_every is not None:
        checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir: where should checkpoints go?")
    if checkpoint_extra is not None and not isinstance(checkpoint_extra, Mapping):
        raise TypeError(f"checkpoint_extra must be a dict, got {type(checkpoint_extra).__name__}")
    if checkpoint_extra is not None and checkpoint_dir is not None:
        # on every rank before any collective (rank 0 alone writes, and alone found it, at its first save)
        check_loadable({str(k): v for k, v in checkpoint_extra.items()}, "checkpoint_extra")
        # (fit refuses them on rank 0 alone, after the collectives began: the others reported a dead rank)
        check_distinct_keys(checkpoint_extra, "checkpoint_extra")
    if checkpoint_dir is not None:
        check_optimizer_storable(getattr(trainer, "outer_optimizer", None))
    ctx = context if context is not None else setup_from_env(device=trainer.device)
    if not isinstance(ctx, DistContext):
        raise TypeError(f"context must be a DistContext, got {type(ctx).__name__}")
    if ctx.device != trainer.device:
        raise ValueError(f"this rank trains on {ctx.device} but the model is on {trainer.device}: move the "
                         f"model to context.device before building the trainer")
    reducer = make_reducer(reduction, ctx)
    if ctx.is_distributed and getattr(trainer, "adam_state", "fresh") == "carried":
        # each task starts from the Adam state the task before it left: one chain, one process
        raise ValueError("adam_state='carried' runs every task after the one before it (one Adam state "
                         "carried along), which cannot be split across processes: train it in one process, "
                         "or use adam_state='fresh'")
    if ctx.is_distributed and trainer.compiled_options is not None:
        raise ValueError("backend 'compiled' applies its own outer update in one process; across processes "
                         "use an eager backend (auto, torch, reference, triton)")
    sampler = IndexedSampler(task_distribution, meta_batch_size, seed=seed,
                             plan_rows=trainer.plan_rows(trainer.inner_steps), batch_size=trainer.inner_batch_size,
                             device=trainer.device, rank=ctx.rank, world_size=ctx.world_size,
                             block_size=block_size,
                             check=lambda tasks: trainer.checker.tasks(tasks, trainer.inner_batch_size),
                             minibatches=getattr(trainer, "minibatches", "fresh"))
    _check_ranks_agree(ctx, {
        "iterations": iterations, "meta_batch_size": meta_batch_size, "seed": seed, "block_size": block_size,
        "reduction": reduction, "trainer": trainer.hparams(), "iteration": trainer.iteration,
        "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in trainer.model.named_parameters()],
        # hparams() names the outer optimizer's class only: ranks with another lr or betas would
        # apply other updates to the same mean, and φ would differ across ranks from the first step
        "outer_optimizer": None if trainer.outer_optimizer is None else
        repr([{k: v for k, v in sorted(g.items()) if k != "params"} for g in trainer.outer_optimizer.param_groups]),
        # settings of the named backend (triton's precision or kernel, torch's fast_tanh): they change
        # a rank's per-task bits, so its tasks' updates were not those one process computes (QA84)
        "backend_options": dict(getattr(trainer, "_backend_options", None) or {}),
        "tasks": _tasks_probe(task_distribution, trainer.device) if ctx.is_distributed else None,
        "resume": resume_from is not None, "checkpointing": checkpoint_dir is not None, "handle_signals": handle_signals,
        "log_every": log_every, "checkpoint_every": checkpoint_every, "stop_check_every": stop_check_every,
        "callback": callback is not None})
    with contextlib.ExitStack() as folder:  # rank 0: the checkpoint folder's lock, for the whole run
        _prepare_on_main(ctx, checkpoint_dir, folder)
        resume = None
        if resume_from is not None:
            ckpt = _load_on_main(ctx, resume_from)
            sampler.check_resumable(ckpt["extra"].get("sampler"), f"checkpoint {resume_from}")
            # Rank 0 resumes from the path (fit then knows whether it is the directory's latest
            # checkpoint); the others from the dict rank 0 sent.
            resume = resume_from if ctx.is_main else ckpt
        # Rank 0's φ and buffers everywhere: ranks built from other initial seeds start identical.
        ctx.broadcast_module(trainer.model, "broadcast of the initial parameters from rank 0")
        if ctx.is_distributed and trainer.outer_optimizer is not None and resume is None:
            # ... and its outer optimizer's state (Adam's moments and step count): with φ alone, ranks whose
            # optimizers held other state (one loaded or stepped on rank 0 alone) applied other updates to
            # the same mean, and φ differed across ranks from the first meta-step (QA84)
            state = ctx.broadcast_object(_optimizer_state_to_cpu(trainer.outer_optimizer.state_dict()) if ctx.is_main
                                         else None, "broadcast of the outer optimizer's state from rank 0")
            if not ctx.is_main:
                trainer.outer_optimizer.load_state_dict(state)
        extra = {**(checkpoint_extra or {}), "sampler": sampler.state_dict(), "world_size": ctx.world_size}
        main = ctx.is_main
        # as fit: SIGINT and SIGTERM deferred with a checkpoint_dir, SIGINT alone without one (a Ctrl-C
        # in the middle of a meta-step left φ one step ahead of trainer.iteration: QA63)
        deferred = DEFAULT_SIGNALS if checkpoint_dir is not None else (signal.SIGINT,)
        with DeferredSignals(deferred, enabled=handle_signals, checkpointing=checkpoint_dir is not None) as signals:
            ranks = _RankCallback(ctx, signals, checkpoint_every, stop_check_every, agree=handle_signals,
                                  checkpointing=checkpoint_dir is not None)
            history = trainer.fit(
                task_distribution, iterations, meta_batch_size=sampler.n_local, generator=None,
                progress=progress and main, callback=callback, checkpoint_dir=checkpoint_dir if main else None,
                checkpoint_every=checkpoint_every if main else None, resume_from=resume,
                checkpoint_extra=extra, handle_signals=False, log_every=log_every, sampler=sampler,
                reducer=reducer if ctx.is_distributed else None, callbacks=[ranks],
                _folder_held=main and checkpoint_dir is not None)
            # Nobody leaves before rank 0's last checkpoint is complete (a launcher stops every
            # rank when one exits with an error code, as an interrupted one does).
            ctx.barrier(f"barrier after the checkpoint of meta-step {trainer.iteration}")
            signals.acted_on = ranks.stopped  # raised below; a later signal is delivered as the scope ends
        if ranks.stopped and checkpoint_dir is None:
            raise TrainingInterrupted(
                f"training interrupted by {signal_name(ranks.signum)} after meta-step {trainer.iteration} of "
                f"{iterations} ({ctx.describe()}); no checkpoint_dir was given, so no checkpoint was written. The "
                f"model and trainer.iteration are as after meta-step {trainer.iteration} on every rank",
                signal_number=ranks.signum, iteration=trainer.iteration, checkpoint=None)
        if ranks.stopped:
            signum = ranks.signum
            path = os.path.join(str(checkpoint_dir), CHECKPOINT_NAME)
            raise TrainingInterrupted(
                f"training interrupted by {signal_name(signum)} after meta-step {trainer.iteration} of "
                f"{iterations} ({ctx.describe()}); rank 0 wrote the checkpoint {path}. Resume with "
                f"resume_from={str(checkpoint_dir)!r}, with any number of processes",
                signal_number=signum, iteration=trainer.iteration, checkpoint=path)
        return history
