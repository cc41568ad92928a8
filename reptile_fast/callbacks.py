"""Training-loop callbacks for checkpoints and signals (the loop itself is ``reptile_fast.loop``)."""
from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import torch

from .checkpoint import (CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint_path, restore_checkpoint,
                         save_checkpoint, validate_checkpoint)
from .core import NonFiniteError
from .loop import Callback
from .model_watch import check_followable, structure_key
from .signals import DeferredSignals, TrainingInterrupted, signal_name

__all__ = ["CheckpointCallback", "SignalCallback", "ModelWatchCallback", "checkpoint_due", "resume_for_fit"]


def checkpoint_due(chunk_start: int, iteration: int, every: Optional[int]) -> bool:
    """Whether a checkpoint is due after the chunk ``(chunk_start, iteration]``: a multiple of
    ``every`` reached within it (the one schedule of ``CheckpointCallback`` and of the other ranks'
    side of a distributed run's checkpoint exchange)."""
    return every is not None and iteration // every > chunk_start // every


def resume_for_fit(trainer, resume_from, generator, iterations: int, ckpt_dir: Optional[Path], *,
                   meta_batch_size: Optional[int] = None, one_stream: bool = False):
    """Restore ``trainer`` (and every RNG) from ``resume_from`` for ``fit``.

    Returns ``(loss history so far, whether resume_from is ckpt_dir's latest checkpoint, the
    checkpoint's trainer state)``; warns
    when an annealed run is resumed with another total than it was started with, and when the
    checkpoint's run drew another ``meta_batch_size`` (when both are known).  ``one_stream``: this
    fit draws its tasks from one generator stream; a checkpoint of a run that drew them by global
    task index (``distributed_fit``) is then refused before anything changes (it would continue
    silently with other tasks than the uninterrupted run).
    """
    # a dict (rank 0's checkpoint, sent to the other ranks) is checked as a file is: {"a": 1} failed
    # with KeyError 'extra'
    ckpt = validate_checkpoint(resume_from, "resume_from (a dict)") if isinstance(resume_from, Mapping) \
        else load_checkpoint(resume_from)
    sampler = ckpt["extra"].get("sampler")
    # "indexed": reptile_fast.distributed.sampler.SAMPLER_KIND (that package sits above this one)
    if one_stream and isinstance(sampler, Mapping) and sampler.get("kind") == "indexed":
        where = "" if isinstance(resume_from, Mapping) else f" {resume_from}"
        raise ValueError(f"the checkpoint{where} was written by distributed_fit, which draws task j of meta-step t "
                         f"from (seed, t, j) (seed {sampler.get('seed')!r}, meta_batch_size "
                         f"{sampler.get('meta_batch_size')!r}); Reptile.fit draws from one generator stream and "
                         f"would not continue the same run. Continue it with reptile_fast.distributed."
                         f"distributed_fit(..., seed={sampler.get('seed')!r}, meta_batch_size="
                         f"{sampler.get('meta_batch_size')!r}, resume_from=...) (any number of processes, one "
                         f"included) or the job's --resume")
    saved_iteration = ckpt["trainer"].get("iteration")
    if isinstance(saved_iteration, int) and not isinstance(saved_iteration, bool) and saved_iteration > iterations:
        # refused before restore_checkpoint: raised after it, the error left the trainer holding the
        # checkpoint's φ and iteration, and torch's global RNG moved to the checkpoint's state
        where = "" if isinstance(resume_from, Mapping) else f" {resume_from}"
        raise ValueError(f"the checkpoint{where} is at meta-step {saved_iteration}, beyond iterations={iterations} "
                         f"(the total number of meta-steps); pass a total of at least {saved_iteration}")
    ckpt = restore_checkpoint(trainer, ckpt, generator=generator,
                              name="state" if isinstance(resume_from, Mapping) else str(resume_from))
    history = [float(v) for v in ckpt["history"].get("loss", torch.zeros(0)).tolist()]
    saved_total = ckpt["trainer"]["total_iterations"]
    if (trainer.outer_lr_final is not None and trainer.outer_lr_final != trainer.outer_lr
            and saved_total is not None and saved_total != iterations):  # a flat schedule has no total
        warnings.warn(f"the checkpoint's run annealed the outer step over {saved_total} iterations, "
                      f"this fit over {iterations}: the result will differ from an uninterrupted run",
                      stacklevel=3)
    saved_batch = ckpt["trainer"].get("meta_batch_size")
    if meta_batch_size is not None and saved_batch is not None and saved_batch != meta_batch_size:
        warnings.warn(f"the checkpoint's run drew {saved_batch} tasks per meta-step, this fit {meta_batch_size}: "
                      f"the result will differ from an uninterrupted run", stacklevel=3)
    # (a dict is no file: resolve_checkpoint_path raised TypeError for it, after the restore)
    latest = None if ckpt_dir is None or isinstance(resume_from, Mapping) else ckpt_dir / CHECKPOINT_NAME
    is_latest = latest is not None and latest.exists() and \
        latest.resolve() == resolve_checkpoint_path(resume_from).resolve()
    return history, is_latest, ckpt["trainer"]


class CheckpointCallback(Callback):
    """Writes ``directory/checkpoint.pt`` every ``every`` meta-steps (if set) and at the end.

    Owns the last checkpoint's path and meta-step (``last_path``, ``last_saved``), so a failure
    can name the last good one.  Never writes parameters holding NaN/inf.

    Args:
        trainer: the ``Reptile`` whose ``state_dict()`` is saved.
        directory: a prepared directory, or None (then only ``describe`` is useful).
        every: meta-steps between checkpoints, or None for the end only.
        generator: the run's ``torch.Generator`` (its state is saved).
        history: the loss list to store (the ``HistoryCallback``'s, read at every checkpoint).
        extra: the caller's data stored under ``"extra"``.
    """

    def __init__(self, trainer, directory: Optional[Path], every: Optional[int], *,
                 generator: Optional[torch.Generator], history: List[float],
                 extra: Optional[Mapping[str, Any]] = None):
        self.trainer, self.directory, self.every = trainer, directory, every
        self.generator, self.history, self.extra = generator, history, extra
        self.last_path: Optional[str] = None
        self.last_saved: Optional[int] = None
        self._chunk_start: Optional[int] = None
        #: ``exchange(save_or_None)``: a collective every rank of a distributed run enters at the
        #: same meta-steps (each due checkpoint, and once at the end) that runs the save on rank 0
        #: and raises its error on every rank (``distributed_fit`` sets it); None: save alone
        self.exchange: Optional[Callable[[Optional[Callable[[], None]]], None]] = None

    def on_start(self, loop):
        self._chunk_start = loop.start

    def _due(self, loop) -> bool:
        """A multiple of ``every`` was reached within the chunk that just ended (a run that does not
        start on a multiple, e.g. after ``meta_step`` calls, still saves at every multiple it passes)."""
        if self.directory is None:
            return False
        return checkpoint_due(loop.start if self._chunk_start is None else self._chunk_start, loop.iteration,
                              self.every)

    def wants_read(self, loop) -> bool:
        return self._due(loop)

    def on_chunk_end(self, loop, read):
        if self._due(loop):
            if self.exchange is not None:
                self.exchange(self.save if self.last_saved != loop.iteration else None)
            elif self.last_saved != loop.iteration:
                self.save()
        self._chunk_start = loop.iteration

    def on_end(self, loop):
        due = self.directory is not None and self.last_saved != self.trainer.iteration
        if self.exchange is not None:  # every rank exchanges here, whether or not rank 0 saves
            self.exchange(self.save if due else None)
        elif due:
            self.save()

    def save(self) -> None:
        with torch.no_grad():
            for name, p in self.trainer.model.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    # fit names the last good checkpoint (``explain``) once, for every NonFiniteError
                    raise NonFiniteError(f"after meta-step {self.trainer.iteration}: parameter {name} holds "
                                         f"NaN/inf; no checkpoint was written.", iteration=self.trainer.iteration)
        self.last_path = str(save_checkpoint(self.directory, self.trainer, generator=self.generator,
                                             history={"loss": self.history}, extra=self.extra))
        self.last_saved = self.trainer.iteration

    def explain(self, exc: NonFiniteError) -> NonFiniteError:
        """``exc`` with the last good checkpoint named (``fit`` raises this one)."""
        if self.directory is None:
            where = "No checkpoint_dir was given, so no checkpoint exists."
        elif self.last_path is None:
            where = f"No checkpoint had been written to {self.directory} yet in this run."
        else:
            where = (f"The last good checkpoint, {self.last_path} (meta-step {self.last_saved}), was kept; "
                     f"resume from it with fit(..., resume_from={str(self.directory)!r}) after lowering "
                     f"inner_lr/outer_lr.")
        return NonFiniteError(f"{exc} {where}", iteration=exc.iteration, checkpoint=self.last_path,
                              checkpoint_iteration=self.last_saved)


class SignalCallback(Callback):
    """Ends the run after the current chunk on SIGINT/SIGTERM (received by ``signals``) and,
    after the final checkpoint (put ``checkpoint`` before this callback), raises
    ``TrainingInterrupted`` naming it."""

    def __init__(self, signals: DeferredSignals, checkpoint: CheckpointCallback):
        self.signals, self.checkpoint = signals, checkpoint

    def wants_read(self, loop) -> bool:
        return self.signals.received is not None

    def on_chunk_end(self, loop, read):
        if self.signals.received is not None:
            loop.stop()

    def on_end(self, loop):
        if self.signals.received is None:
            return
        self.signals.acted_on = True
        directory = self.checkpoint.directory
        if directory is None:
            raise TrainingInterrupted(
                f"training interrupted by {signal_name(self.signals.received)} after meta-step {loop.iteration} "
                f"of {loop.iterations}; no checkpoint_dir was given, so no checkpoint was written. The model and "
                f"trainer.iteration are as after meta-step {loop.iteration}: fit(...) again continues from there",
                signal_number=self.signals.received, iteration=loop.iteration, checkpoint=None)
        raise TrainingInterrupted(
            f"training interrupted by {signal_name(self.signals.received)} after meta-step {loop.iteration} "
            f"of {loop.iterations}; checkpoint written to {self.checkpoint.last_path}. Resume with "
            f"Reptile.fit(..., resume_from={str(directory)!r}) "
            f"(or `reptile-fast sine --resume {shlex.quote(str(directory))}` for the CLI's job)",
            signal_number=self.signals.received, iteration=loop.iteration, checkpoint=self.checkpoint.last_path)


class ModelWatchCallback(Callback):
    """A model changed by a callback while ``fit`` runs (a layer swapped, a hook registered, an
    activation attribute reassigned): the eager steppers read the model every meta-step and follow
    it, but a program built when ``fit`` started (backend compiled's, triton's fused stepper) would
    go on computing the old model without a word (QA65) — so for those it is a ``ValueError`` at
    the end of the chunk in which it happened; parameters replaced, moved or renamed are refused on
    every backend (``model_watch.check_followable``).  ``fit`` adds it only after user callbacks
    (the only code that runs inside ``fit``), so plain runs pay nothing.

    Args:
        trainer: the ``Reptile``; ``built_for``: ``structure_key`` of the model the steppers were
            built for; ``follows``: whether the running stepper reads the model every meta-step.
    """

    def __init__(self, trainer, built_for: tuple, follows: bool, stepper_name: str):
        self.trainer, self.built_for, self.follows, self.stepper_name = trainer, built_for, follows, stepper_name

    def on_chunk_end(self, loop, read):
        now = structure_key(self.trainer.model)
        if now == self.built_for:
            return
        check_followable(self.built_for, now)
        if not self.follows:
            raise ValueError(f"the model changed during fit, before meta-step {loop.iteration + 1} (a layer swapped, "
                             f"a hook registered or a module attribute set, by a callback): the {self.stepper_name} "
                             f"program was built for the model as fit found it and cannot follow; change the model "
                             f"between fit calls (the next fit rebuilds it), or train on backend torch or reference")
