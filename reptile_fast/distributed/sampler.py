"""Tasks and minibatch plans drawn by global task index, so that N ranks train what one process does.

The meta-batch of meta-step ``t`` holds global tasks ``j = 0 … T-1``. They are cut into fixed blocks
of ``K = min(block_size, T)`` consecutive tasks (the last block may be shorter); block ``b`` is
drawn from a ``torch.Generator`` seeded with ``stream_seed(seed, t, b, n_blocks=⌈T/K⌉)`` (a
32-bit seed distinct for every block of the run: ``STREAMS``):
``task_distribution.sample(K_b, generator=g)`` then ``sample_indices(K_b, rows, N, B, generator=g)``
(``epoch_indices`` for ``minibatches="epochs"``). Task ``j``'s points and plan therefore depend only
on ``(seed, t, j)`` and the run's fixed ``T`` and ``K`` — never on the number of ranks or on which
rank draws it. Rank ``r`` of ``W`` takes the contiguous slice ``[r·T // W, (r+1)·T // W)`` (sizes
differ by at most one when ``W`` does not divide ``T``), drawing the blocks that overlap it.

Why blocks and not one generator per task: a task distribution's ``sample`` is called once per
block, and at meta-batch 4096 one call per task costs more than the inner loops
(``bench/results/distributed_cpu.json``).  ``block_size=1`` gives one stream per task.

The sampler's whole state is ``(seed, meta_batch_size, block_size)`` plus the iteration, so a run
resumes exactly from a checkpoint under any number of ranks.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..tasks.base import TaskBatch, _allocated, _check_device, check_minibatches, concat_draws, draw_plan
from ..validation import check_int

__all__ = ["IndexedSampler", "split_tasks", "stream_seed", "DEFAULT_BLOCK_SIZE", "SAMPLER_KIND", "STREAMS"]

DEFAULT_BLOCK_SIZE = 64
SAMPLER_KIND = "indexed"
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea, Flood 2014): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_MASK32 = (1 << 32) - 1
#: How stream seeds are made (stored in checkpoints as the sampler's ``"streams"``):
#: 1: a 64-bit SplitMix64 hash of ``(seed, t, b)`` — but torch's CPU generator (mt19937) keeps only
#:    the low 32 bits of a seed, so streams of one run repeated by the birthday bound (QA67: at
#:    meta-batch 1 and seed 0, meta-steps 18540 and 147296 drew the same task; 24 repeated blocks
#:    in 30000 meta-steps at meta-batch 1024); kept to resume such runs exactly;
#: 2: 32-bit seeds distinct within a run: stream ``k = t·n_blocks + b`` gets ``mix32(k + h)``,
#:    ``h`` the run seed's 32-bit hash and ``mix32`` a bijection of 32-bit words.
STREAMS = 2


def _mix32(x: int) -> int:
    """A bijective 32-bit mix (xorshift-multiply, C. Wellons' "lowbias32")."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stream_seed(seed: int, iteration: int, block: int, *, n_blocks: int = 1, streams: int = STREAMS) -> int:
    """The generator seed of block ``block`` (of ``n_blocks`` per meta-step) of meta-step ``iteration``.

    ``streams`` 2 (the default): a 32-bit seed, distinct for every ``(iteration, block)`` of a run
    while ``iteration·n_blocks + block < 2**32`` (a ``ValueError`` beyond: torch's CPU generator
    has no more distinct seeds); 1: the former 64-bit hash (``STREAMS``), for old checkpoints.

    ``TypeError``/``ValueError`` naming the argument for anything but ints (numpy's too) with
    ``0 <= seed < 2**64``, ``iteration >= 0``, ``n_blocks >= 1`` and ``0 <= block < n_blocks`` (with
    streams 2 a block beyond ``n_blocks`` is another meta-step's stream)."""
    # (checked here, not in ``_stream_seed``: the sampler calls that per block with checked values)
    seed = check_int("seed", seed, 0)
    if seed >= 2 ** 64:  # streams are seeded from its low 64 bits: seed 2**64 would be seed 0
        raise ValueError(f"seed must be < 2**64, got {seed}")
    iteration = check_int("iteration", iteration, 0)
    block = check_int("block", block, 0)
    n_blocks = check_int("n_blocks", n_blocks, 1)
    streams = check_int("streams", streams, 1)
    if streams == 2 and block >= n_blocks:
        raise ValueError(f"block must be < n_blocks ({n_blocks}), got {block}: its stream would be block "
                         f"{block % n_blocks} of meta-step {iteration + block // n_blocks}")
    return _stream_seed(seed, iteration, block, n_blocks=n_blocks, streams=streams)


def _stream_seed(seed: int, iteration: int, block: int, *, n_blocks: int = 1, streams: int = STREAMS) -> int:
    """``stream_seed`` without the checks of its arguments (Python ints in range)."""
    if streams == 1:
        return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ iteration) ^ block)
    if streams != 2:
        raise ValueError(f"streams must be 1 or 2, got {streams!r}")
    k = iteration * n_blocks + block
    if k > _MASK32:
        raise ValueError(f"meta-step {iteration + 1} needs random stream {k} of this run, beyond the 2**32 "
                         f"distinct seeds of torch's CPU generator: use fewer meta-steps, a larger block_size "
                         f"or a smaller meta-batch")
    return _mix32((k + (_splitmix64(seed & _MASK64) & _MASK32)) & _MASK32)


def split_tasks(meta_batch_size: int, world_size: int, rank: int) -> Tuple[int, int]:
    """Rank ``rank``'s global tasks ``[lo, hi)``: contiguous, sizes ``T // W`` or ``T // W + 1``.

    Raises ``ValueError`` when ``meta_batch_size < world_size``: a rank without a task would have
    nothing to run (use fewer processes or a larger meta-batch).
    """
    meta_batch_size = check_int("meta_batch_size", meta_batch_size, 1)
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} must be < world_size {world_size}")
    if meta_batch_size < world_size:
        raise ValueError(f"meta_batch_size ({meta_batch_size}) is smaller than the number of processes "
                         f"({world_size}): every rank needs at least one task; use a meta-batch of at least "
                         f"{world_size} or fewer processes")
    return rank * meta_batch_size // world_size, (rank + 1) * meta_batch_size // world_size


class IndexedSampler:
    """This rank's share of every meta-batch, drawn by global task index.

    Args:
        task_distribution: anything with ``sample(n, *, generator, device) -> TaskBatch``.
        meta_batch_size: ``T``, the global number of tasks per meta-step.
        seed: the run's seed (an int >= 0).
        plan_rows: rows of the minibatch plan (``inner_steps``, or ``inner_steps + 1`` for FOMAML).
        batch_size: points per inner minibatch.
        device: where tasks and plans go (the draws themselves happen on the CPU, so they are the
            same bits whatever the device).
        rank, world_size: this process's place (``split_tasks``).
        block_size: tasks per random stream (see the module docstring); a property of the run:
            changing it changes the draws.
        check: called on every ``TaskBatch`` drawn (the trainer's cached compatibility check).

    ``draw(first_iteration, m)`` is the training loop's ``Sampler`` protocol (1-based meta-step
    numbers, ``m`` meta-steps meta-step-major); ``draw_step(t)`` draws the 0-based meta-step ``t``.
    """

    def __init__(self, task_distribution, meta_batch_size: int, *, seed: int, plan_rows: int,
                 batch_size: int, device=None, rank: int = 0, world_size: int = 1,
                 block_size: int = DEFAULT_BLOCK_SIZE, check=None, minibatches: str = "fresh"):
        if not hasattr(task_distribution, "sample") or not callable(task_distribution.sample):
            raise TypeError("task_distribution must have a sample(n_tasks, *, generator, device) method")
        self.task_distribution = task_distribution
        self.minibatches = check_minibatches(minibatches)
        self.meta_batch_size = check_int("meta_batch_size", meta_batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        if self.seed >= 2 ** 64:  # streams are seeded from its low 64 bits: seed 2**64 would be seed 0
            raise ValueError(f"seed must be < 2**64, got {seed}")
        self.plan_rows = check_int("plan_rows", plan_rows, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.block_size = check_int("block_size", block_size, 1)
        self.device = _check_device(device) or torch.device("cpu")
        self.rank, self.world_size = rank, world_size
        self.lo, self.hi = split_tasks(self.meta_batch_size, world_size, rank)
        self._k = min(self.block_size, self.meta_batch_size)
        self._n_blocks = -(-self.meta_batch_size // self._k)
        #: how this run's stream seeds are made (``STREAMS``; a resumed run keeps its checkpoint's)
        self.streams = STREAMS
        self._fits = False  # _check_fits passed
        self._generator = torch.Generator()  # reseeded per block: cheaper than a new one
        if check is not None and not callable(check):
            raise TypeError(f"check must be callable, got {type(check).__name__}")
        self.check = check
        # loop.Sampler's flag: tasks checked, plans drawn in range by construction
        self.checked = check is not None

    @property
    def n_local(self) -> int:
        """Tasks this rank runs per meta-step."""
        return self.hi - self.lo

    def _draw_block(self, iteration: int, block: int) -> Tuple[TaskBatch, torch.Tensor]:
        start = block * self._k
        n = min(self._k, self.meta_batch_size - start)
        g = self._generator
        g.manual_seed(_stream_seed(self.seed, iteration, block, n_blocks=self._n_blocks, streams=self.streams))
        tasks = self.task_distribution.sample(n, generator=g, device=self.device)
        if not isinstance(tasks, TaskBatch) or tasks.n_tasks != n:
            raise TypeError(f"task_distribution.sample({n}) must return a TaskBatch of {n} tasks, got "
                            + (f"{tasks.n_tasks} tasks" if isinstance(tasks, TaskBatch) else type(tasks).__name__))
        plan = draw_plan(self.minibatches, n, self.plan_rows, tasks.n_points, self.batch_size, generator=g,
                         device=self.device)
        return tasks, plan

    def draw_step(self, iteration: int) -> Tuple[TaskBatch, torch.Tensor]:
        """This rank's tasks and plan of meta-step ``iteration`` (0-based).

        Returns a ``TaskBatch`` of ``n_local`` tasks and long ``[n_local, plan_rows, batch_size]``
        indices: global tasks ``lo … hi-1`` of that meta-step.
        """
        iteration = check_int("iteration", iteration, 0)
        first, last = self.lo // self._k, (self.hi - 1) // self._k
        parts = []
        for block in range(first, last + 1):
            tasks, plan = self._draw_block(iteration, block)
            if not self._fits and block == first:
                self._check_fits(tasks, plan)
            start = block * self._k
            a, b = max(self.lo - start, 0), min(self.hi - start, tasks.n_tasks)
            parts.append((tasks, plan) if (a, b) == (0, tasks.n_tasks) else (tasks[a:b], plan[a:b]))
        return concat_draws(parts)

    def _check_fits(self, tasks: TaskBatch, plan: torch.Tensor) -> None:
        """Once: whether this rank's share of a meta-step fits in memory, judged from its first block.
        Blocks are drawn one at a time and joined at the end, so a meta-batch far beyond memory
        (2**40 tasks) drew blocks for ever instead of failing as ``fit``'s one draw does (QA67)."""
        per_task = sum(t.numel() * t.element_size() for t in (tasks.x, tasks.y, plan)) // max(tasks.n_tasks, 1)
        probe = _allocated("meta_batch_size", (self.n_local, max(per_task, 1)),
                           lambda: torch.empty(self.n_local * max(per_task, 1), dtype=torch.uint8, device=self.device))
        del probe
        self._fits = True

    def draw(self, first_iteration: int, m: int = 1) -> Tuple[TaskBatch, torch.Tensor]:
        """Meta-steps ``first_iteration … first_iteration + m − 1`` (1-based, the training loop's
        ``Sampler`` protocol): ``m · n_local`` tasks and plans, meta-step-major."""
        first_iteration = check_int("first_iteration", first_iteration, 1)
        m = check_int("m", m, 1)
        tasks, plan = concat_draws([self.draw_step(first_iteration - 1 + k) for k in range(m)])
        if self.check is not None:
            self.check(tasks)
        return tasks, plan

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint stores: with the iteration, everything that decides the draws."""
        return {"kind": SAMPLER_KIND, "seed": self.seed, "meta_batch_size": self.meta_batch_size,
                "block_size": self.block_size, "streams": self.streams}

    def check_resumable(self, saved: Optional[Mapping[str, Any]], source="the checkpoint") -> None:
        """Raise ``ValueError`` unless ``saved`` (a ``state_dict()``) draws the same tasks as this sampler."""
        if not isinstance(saved, Mapping) or saved.get("kind") != SAMPLER_KIND:
            raise ValueError(f"{source} was written by a run that drew its tasks from one torch.Generator "
                             f"stream, not by global task index: a distributed (or indexed-sampler) run "
                             f"cannot continue it exactly; resume it in one process without torchrun")
        mine = self.state_dict()
        diffs = [f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in ("seed", "meta_batch_size", "block_size")
                 if saved.get(k) != mine[k]]
        if diffs:
            raise ValueError(f"{source} drew its tasks with other settings ({'; '.join(diffs)}): resuming "
                             f"would not continue the same run; use the saved values")
        # the run goes on drawing as it began: a checkpoint written before "streams" existed drew
        # from the former (64-bit, truncated) seeds
        streams = saved.get("streams", 1)
        if streams not in (1, 2):
            raise ValueError(f"{source} drew its tasks from random streams of kind {streams!r}, which this "
                             f"version does not know (1 or 2)")
        self.streams = streams
