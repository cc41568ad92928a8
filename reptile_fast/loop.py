"""The training loop: the only one.  ``Reptile.fit``, the drop-in and the CLI jobs all run it.

Per chunk of ``m = stepper.chunk`` meta-steps it draws the tasks and plans (``sampler.draw``),
computes the outer steps ε, and calls ``stepper.run``; the per-step losses stay on the device.
Every ``log_every`` meta-steps, when a callback asks (a checkpoint is due) and at the end it
*reads*: ``stepper.check()`` (raises ``NonFiniteError`` for a skipped non-finite meta-step) and
the pending losses, which go to the callbacks' ``on_read``.  Between reads it reads nothing, so
on a GPU the meta-steps are queued back to back.

Callbacks (``Callback``) do everything else: the loss history, the progress bar, checkpoints,
signal handling; distributed synchronisation and periodic validation plug in the same way.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch

from .tasks.base import TaskBatch, check_minibatches, concat_draws, draw_plan

__all__ = ["Sampler", "StreamSampler", "PlanSampler", "CheckedDraws", "Callback", "HistoryCallback", "ProgressCallback",
           "FunctionCallback", "TrainingLoop", "DEFAULT_LOG_EVERY", "GRAPH_READ_CHUNKS", "default_log_every"]

#: meta-steps between reads of device values in ``fit`` (progress loss, history, finiteness)
DEFAULT_LOG_EVERY = 100
#: ``Reptile.fit``'s default read interval when its stepper replays CUDA graphs: this many chunks.
#: A read waits for every queued chunk, and the host draws the next chunk only after it, so each
#: read leaves the GPU idle for one chunk's host work (draws, copies, the replay's launch): once per
#: chunk at ``DEFAULT_LOG_EVERY`` = the default chunk of 100, once per ten chunks with this.
GRAPH_READ_CHUNKS = 10


class Sampler:
    """``draw(first_iteration, m) -> (tasks, plans)``: the ``m · T`` tasks and plans of meta-steps
    ``first_iteration … first_iteration + m − 1`` (1-based), meta-step-major.

    ``checked``: True when every draw's tasks went through the trainer's compatibility check and
    its plans lie in ``[0, points)`` by construction; ``Reptile.fit`` checks the draws of any
    other sampler itself (one read of the plan's range per draw), so backends never need to."""

    checked: bool = False

    def draw(self, first_iteration: int, m: int):
        raise NotImplementedError


class StreamSampler(Sampler):
    """Tasks from ``task_distribution.sample(T, generator=, device=)``, then their plans from
    ``sample_indices`` (``minibatches="epochs"``: ``epoch_indices``) with the same generator: one
    stream of draws, in meta-step order.

    A chunk of ``m`` meta-steps gets, by default, exactly the draws of ``m`` single meta-steps
    (meta-step by meta-step: tasks, then plans), so a stepper that runs chunks (backend
    "compiled", triton's fused graphs) trains on the same tasks and minibatches as one that runs
    one meta-step at a time, and results do not depend on the chunk size.

    Args:
        check: called on every drawn ``TaskBatch`` (the trainer's cached compatibility check).
        draw_chunks: draw a chunk's ``m · T`` tasks in one ``sample`` call and its plans in one
            ``sample_indices`` call instead: far fewer calls at small meta-batches, the same
            distribution, but another order of the generator's numbers, so the draws depend on
            the chunk size.

    A task distribution with ``sample_steps(m, T, rows, batch, *, generator, device)`` (``Sine``)
    makes a chunk's meta-step-by-meta-step draws in one go; others are called meta-step by
    meta-step (two calls per meta-step: at small meta-batches that can cost more than the
    compiled meta-step itself).
    """

    def __init__(self, task_distribution, meta_batch_size: int, rows: int, batch: int, *,
                 generator: Optional[torch.Generator], device, check=None, draw_chunks: bool = False,
                 minibatches: str = "fresh"):
        self.dist, self.T, self.rows, self.batch = task_distribution, meta_batch_size, rows, batch
        self.minibatches = check_minibatches(minibatches)
        self.generator, self.device, self.check = generator, device, check
        self.draw_chunks = bool(draw_chunks)
        self.checked = check is not None  # plans drawn here: in range by construction

    def _failed(self, what: str, exc: ValueError, settings: str) -> ValueError:
        """``exc`` from the task family's draw, the call first, then which of fit's settings its
        arguments came from (its own words name them: ``n_tasks`` is ``meta_batch_size``).  Not
        "meta_batch_size=...: ..." up front: the error may be about another argument
        (``batch_size``: inner_batch_size) or about nothing fit passed (a family's own check)."""
        return ValueError(f"{what} raised: {exc} (fit's arguments to it: {settings})")

    def _sample(self, n: int) -> TaskBatch:
        try:
            tasks = self.dist.sample(n, generator=self.generator, device=self.device)
        except ValueError as exc:
            if type(exc) is not ValueError:
                raise
            chunk = "" if n == self.T else f"{n // self.T} meta-steps drawn at once x "
            raise self._failed(f"task_distribution.sample({n}, ...)", exc,
                               f"n_tasks = {chunk}meta_batch_size={self.T}") from exc
        if isinstance(tasks, TaskBatch) and tasks.n_tasks != n:
            # the plans have n rows: more tasks would be dropped silently, fewer fail deep inside
            raise ValueError(f"task_distribution.sample({n}, ...) returned {tasks.n_tasks} tasks; "
                             f"it must return exactly {n}")
        return tasks

    def _plans(self, n: int, n_points: int) -> torch.Tensor:
        return draw_plan(self.minibatches, n, self.rows, n_points, self.batch, generator=self.generator,
                         device=self.device)

    def draw(self, first_iteration: int, m: int):
        if m == 1 or self.draw_chunks:
            tasks = self._sample(m * self.T)
            if self.check is not None:
                self.check(tasks)
            return tasks, self._plans(m * self.T, tasks.n_points)
        # (sample_steps draws "fresh" plans: other minibatches are drawn meta-step by meta-step)
        steps = getattr(self.dist, "sample_steps", None) if self.minibatches == "fresh" else None
        if callable(steps):  # the same draws, computed in one go (e.g. Sine)
            try:
                tasks, plans = steps(m, self.T, self.rows, self.batch, generator=self.generator, device=self.device)
            except ValueError as exc:
                if type(exc) is not ValueError:
                    raise
                raise self._failed(f"task_distribution.sample_steps({m}, {self.T}, {self.rows}, {self.batch}, ...)", exc,
                                   f"n_steps={m} meta-steps per chunk, n_tasks = meta_batch_size={self.T}, "
                                   f"plan_rows={self.rows} from inner_steps, batch_size = inner_batch_size="
                                   f"{self.batch}") from exc
            if self.check is not None:
                self.check(tasks)
            return tasks, plans
        parts = []
        for _ in range(m):
            tasks = self._sample(self.T)
            if self.check is not None:
                self.check(tasks)
            parts.append((tasks, self._plans(self.T, tasks.n_points)))
        tasks, plans = concat_draws(parts)
        return tasks, plans


class PlanSampler(StreamSampler):
    """Tasks drawn as ``StreamSampler`` does, plans taken from a fixed tensor.

    Args:
        indices: long ``[iterations, T, R, B]``; meta-step ``t`` (1-based, counted from
            ``offset + 1``) uses ``indices[t − offset − 1]``.  Their range is read once (at the
            first draw) and compared with every draw's number of points.
    """

    def __init__(self, task_distribution, indices: torch.Tensor, *, offset: int = 0, generator=None,
                 device=None, check=None, draw_chunks: bool = False):
        super().__init__(task_distribution, indices.shape[1], indices.shape[2], indices.shape[3],
                         generator=generator, device=device, check=check, draw_chunks=draw_chunks)
        self.indices, self.offset = indices, offset
        self._range: Optional[tuple] = None

    def draw(self, first_iteration: int, m: int):
        if m == 1 or self.draw_chunks:
            pieces = [self._sample(m * self.T)]
        else:  # as m single meta-steps draw them
            pieces = [self._sample(self.T) for _ in range(m)]
        if self.check is not None:
            for t in pieces:
                self.check(t)
        tasks = concat_draws([(t, None) for t in pieces])[0]
        if self._range is None:  # one read; the indices tensor is the caller's and fixed
            self._range = tuple(int(v) for v in torch.stack([self.indices.min(), self.indices.max()]).tolist())
        lo, hi = self._range
        if lo < 0 or hi >= tasks.n_points:
            raise ValueError(f"indices must lie in [0, {tasks.n_points}), got values in [{lo}, {hi}]")
        start = first_iteration - self.offset - 1
        plans = self.indices[start:start + m].reshape(m * self.T, self.rows, self.batch)
        return tasks, plans.to(tasks.device if isinstance(tasks, TaskBatch) else self.device)


class CheckedDraws(Sampler):
    """Another sampler's draws, each passed to ``check(tasks, plans)`` (which raises on a bad
    one) before the stepper sees it: how ``Reptile.fit`` guards a sampler that is not ``checked``."""

    checked = True

    def __init__(self, sampler: Sampler, check, per_step: Optional[int] = None):
        self.sampler, self.check, self.per_step = sampler, check, per_step

    def draw(self, first_iteration: int, m: int):
        drawn = self.sampler.draw(first_iteration, m)
        if not isinstance(drawn, (tuple, list)) or len(drawn) != 2:
            got = f"{type(drawn).__name__} of length {len(drawn)}" if isinstance(drawn, (tuple, list)) \
                else type(drawn).__name__
            raise TypeError(f"{type(self.sampler).__name__}.draw(first_iteration, m) must return (tasks, plans), "
                            f"got {got}")
        tasks, plans = drawn
        n = getattr(tasks, "n_tasks", None)
        if self.per_step is not None and n is not None and n != m * self.per_step:
            # the eager stepper took any count (a short draw trained fewer tasks per meta-step than
            # fit was given, silently); the compiled one refused it
            raise ValueError(f"{m} meta-step(s) of {self.per_step} tasks (fit's meta_batch_size) need "
                             f"{m * self.per_step} tasks, got {n}: a sampler's draw(first_iteration, m) must "
                             f"return m * meta_batch_size tasks and plans")
        try:
            self.check(tasks, plans)
        except (TypeError, ValueError) as exc:
            # (the check's own words, with the sampler named: the user's code made the draw)
            raise type(exc)(f"{type(self.sampler).__name__}.draw(first_iteration, m) returned a draw the trainer "
                            f"cannot take: {exc}") from None
        return tasks, plans


class Callback:
    """Hooks of ``TrainingLoop``; every method is optional."""

    def on_start(self, loop: "TrainingLoop") -> None:
        """Before the first meta-step."""

    def wants_read(self, loop: "TrainingLoop") -> bool:
        """Whether the loop must read after the chunk that just ended (e.g. a checkpoint is due)."""
        return False

    def on_read(self, loop: "TrainingLoop", losses: List[float]) -> None:
        """After a read: ``losses`` are the mean inner losses of the meta-steps since the last read."""

    def on_chunk_end(self, loop: "TrainingLoop", read: bool) -> None:
        """After every chunk (``read``: whether the loop just read); may call ``loop.stop()``."""

    def on_end(self, loop: "TrainingLoop") -> None:
        """After the last meta-step (also after ``stop()``), once the final read is done."""

    def on_abort(self, loop: "TrainingLoop", exc: BaseException) -> None:
        """When an exception (e.g. ``NonFiniteError``) ends the run; it is re-raised after."""


class HistoryCallback(Callback):
    """Keeps every meta-step's mean inner loss in ``history`` (a list of floats)."""

    def __init__(self, history: Optional[List[float]] = None):
        self.history = history if history is not None else []

    def on_read(self, loop, losses):
        self.history.extend(losses)


class ProgressCallback(Callback):
    """A tqdm bar: advanced after every chunk (no read needed), the loss shown at reads."""

    def __init__(self, enabled: bool = True, desc: str = "meta-train"):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def on_start(self, loop):
        from tqdm import tqdm

        self.bar = tqdm(total=max(loop.iterations, loop.start), initial=loop.start,
                        disable=not self.enabled, desc=self.desc)

    def on_read(self, loop, losses):
        if losses and self.bar is not None:
            self.bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)

    def on_chunk_end(self, loop, read):
        if self.bar is not None:
            self.bar.update(loop.iteration - self.bar.n)

    def on_end(self, loop):
        if self.bar is not None:
            self.bar.close()

    def on_abort(self, loop, exc):
        self.on_end(loop)


class FunctionCallback(Callback):
    """A user's ``callback(iteration, metrics)`` after every meta-step, with ``metrics =
    {"loss", "outer_lr", "iteration"}``.  It needs the values, so the loop reads after every
    chunk (every meta-step on the eager path) while one is installed."""

    def __init__(self, fn):
        self.fn = fn

    def wants_read(self, loop) -> bool:
        return True

    def on_read(self, loop, losses):
        first = loop.iteration - len(losses) + 1
        for k, (loss, eps) in enumerate(zip(losses, loop.read_outer_lrs)):
            self.fn(first + k, {"loss": loss, "outer_lr": eps, "iteration": first + k})


def default_log_every(stepper) -> int:
    """``Reptile.fit``'s read interval when the caller gives none: ``DEFAULT_LOG_EVERY``, or
    ``GRAPH_READ_CHUNKS`` chunks for a stepper that replays CUDA graphs (``stepper.cuda_graphs``:
    triton's fused stepper on CUDA), where each read costs an idle GPU for one chunk's host work."""
    if getattr(stepper, "cuda_graphs", False) is True:
        return max(DEFAULT_LOG_EVERY, GRAPH_READ_CHUNKS * int(stepper.chunk))
    return DEFAULT_LOG_EVERY


class TrainingLoop:
    """Runs meta-steps ``start + 1 … iterations`` of ``stepper`` on ``sampler``'s draws.

    Args:
        state: the object whose ``iteration`` attribute counts meta-steps (the trainer); set
            after every chunk, and to the last good meta-step when a non-finite one is found.
        stepper: a ``reptile_fast.steppers.Stepper``.
        sampler: a ``Sampler``.
        iterations: the total number of meta-steps (the run ends when ``state.iteration`` reaches it).
        outer_lr_at: ``iteration -> ε`` (0-based meta-step index: the schedule's argument).
        callbacks: ``Callback`` objects, called in order.
        log_every: read device values at most every this many meta-steps (and when a callback
            asks, and at the end).
    """

    def __init__(self, state, stepper, sampler: Sampler, iterations: int, *, outer_lr_at,
                 callbacks: Sequence[Callback] = (), log_every: int = DEFAULT_LOG_EVERY):
        self.state, self.stepper, self.sampler = state, stepper, sampler
        self.start = self.iteration = state.iteration
        self.iterations, self.outer_lr_at = iterations, outer_lr_at
        self.callbacks, self.log_every = list(callbacks), log_every
        self._pending: List[torch.Tensor] = []
        self._pending_eps: List[float] = []
        #: the outer steps of the meta-steps whose losses the latest read handed out
        self.read_outer_lrs: List[float] = []
        self._last_read = self.start
        self._stop = False
        self.train_seconds = 0.0

    def stop(self) -> None:
        """End the run after the current chunk (e.g. on a signal)."""
        self._stop = True

    def read(self) -> None:
        """Check finiteness and hand the pending losses to the callbacks (one host read)."""
        try:
            self.stepper.check()
        except Exception as exc:
            bad = getattr(exc, "iteration", None)
            if bad is not None:  # φ is as after the meta-step before the first bad one
                self.iteration = self.state.iteration = bad - 1
            self._pending, self._pending_eps = [], []
            raise
        losses = torch.cat(self._pending).tolist() if self._pending else []
        self.read_outer_lrs = self._pending_eps
        self._pending, self._pending_eps = [], []
        self._last_read = self.iteration
        for cb in self.callbacks:
            cb.on_read(self, losses)

    def run(self) -> "TrainingLoop":
        for cb in self.callbacks:
            cb.on_start(self)
        t0 = time.perf_counter()
        try:
            while self.iteration < self.iterations and not self._stop:
                m = min(self.stepper.chunk, self.iterations - self.iteration)
                first = self.iteration + 1
                tasks, plans = self.sampler.draw(first, m)
                eps = [self.outer_lr_at(self.iteration + k) for k in range(m)]
                try:
                    losses = self.stepper.run(tasks, plans, eps, first)
                except FloatingPointError as exc:  # NonFiniteError from a stepper that checks at once
                    bad = getattr(exc, "iteration", None)
                    if bad is not None:  # φ is as after the meta-step before the first bad one
                        self.iteration = self.state.iteration = bad - 1
                    self._pending, self._pending_eps = [], []
                    raise
                self._pending.append(losses)
                self._pending_eps.extend(eps)
                self.iteration = self.state.iteration = self.iteration + m
                due = (self.iteration - self._last_read >= self.log_every or self.iteration >= self.iterations
                       or any(cb.wants_read(self) for cb in self.callbacks))
                if due:
                    self.read()
                for cb in self.callbacks:
                    cb.on_chunk_end(self, due)
            if self._pending:
                self.read()
        except BaseException as exc:
            self.train_seconds = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_abort(self, exc)
            raise
        self.train_seconds = time.perf_counter() - t0
        for cb in self.callbacks:
            cb.on_end(self)
        return self
