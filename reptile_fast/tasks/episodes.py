"""Few-shot episodes: a support set to adapt on and a query set to score, for ``T`` tasks at once.

``Episodes`` is what few-shot evaluation (``reptile_fast.fewshot``) consumes; ``draw_episode_plan``
is the class/image draw that the image task families (Omniglot, Mini-ImageNet) share.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Optional, Tuple

import torch

from .base import TaskBatch, _check_generator, _check_positive_int, uniform_keys

__all__ = ["Episodes", "draw_episode_plan", "check_ways", "images_needed"]


@dataclass(frozen=True)
class Episodes:
    """``T`` N-way few-shot tasks.

    Attributes:
        support: ``TaskBatch`` with x ``[T, N·K, *image]`` and long labels y ``[T, N·K]`` in
            ``[0, N)``: what the learner adapts on.
        query: ``TaskBatch`` with x ``[T, N·Q, *image]`` and labels y ``[T, N·Q]``: what it is
            scored on (never seen during adaptation).
        ways: N, the number of classes per task.
    """

    support: TaskBatch
    query: TaskBatch
    ways: int

    def __post_init__(self) -> None:
        for name in ("support", "query"):
            tb = getattr(self, name)
            if not isinstance(tb, TaskBatch):
                raise TypeError(f"Episodes.{name} must be a TaskBatch, got {type(tb).__name__}")
            if not tb.is_classification:
                raise TypeError(f"Episodes.{name}.y must be long class labels [tasks, points]")
        # frozen; numpy ints as ints; 1-way tasks refused as the task families refuse them (they score
        # 100 % whatever the model does: QA45)
        object.__setattr__(self, "ways", check_ways(self.ways))
        s, q = self.support, self.query
        if s.n_tasks != q.n_tasks:
            raise ValueError(f"support has {s.n_tasks} tasks but query has {q.n_tasks}")
        if tuple(s.x.shape[2:]) != tuple(q.x.shape[2:]):
            raise ValueError(f"support images {tuple(s.x.shape[2:])} and query images "
                             f"{tuple(q.x.shape[2:])} differ in shape")
        if s.device != q.device:
            raise ValueError(f"support is on {s.device} but query is on {q.device}")
        if s.x.dtype != q.x.dtype:
            raise TypeError(f"support dtype {s.x.dtype} differs from query dtype {q.x.dtype}")
        for name, tb in (("support", s), ("query", q)):
            if int(tb.y.max()) >= self.ways:
                raise ValueError(f"{name} label {int(tb.y.max())} out of range for {self.ways}-way tasks")
        # a query class its task's support set lacks is scored against a class the learner never
        # adapted on: the accuracy comes out lower with nothing said (a labelling slip, e.g. support
        # and query labelled by different class orders)
        shown = torch.zeros(s.n_tasks, self.ways, dtype=torch.bool, device=s.device)
        shown.scatter_(1, s.y, True)
        missing = ~shown.gather(1, q.y)
        if bool(missing.any()):
            task, point = (int(v) for v in missing.nonzero()[0])
            raise ValueError(f"query label {int(q.y[task, point])} of task {task} (point {point}) is no "
                             f"class of that task's support set (its labels: "
                             f"{sorted(set(s.y[task].tolist()))}): every query class needs support examples")

    @property
    def n_tasks(self) -> int:
        return self.support.n_tasks

    @property
    def device(self) -> torch.device:
        return self.support.device

    def to(self, device=None, dtype=None) -> "Episodes":
        """Move to ``device``; ``dtype`` casts the images (labels stay long), as ``TaskBatch.to``:
        a float64 model's episodes are ``episodes.to(dtype=torch.float64)``."""
        return Episodes(self.support.to(device, dtype), self.query.to(device, dtype), self.ways)

    def __getitem__(self, item) -> "Episodes":
        """Select tasks (keeps the task dimension), e.g. ``episodes[0:50]``."""
        return Episodes(self.support[item], self.query[item], self.ways)


def check_ways(ways) -> int:
    """An image task family's N: an int >= 2 (a 1-way "classification" task is scored 100 %
    whatever the model does)."""
    if isinstance(ways, bool) or not isinstance(ways, Integral):
        raise TypeError(f"ways must be an int, got {type(ways).__name__}")
    ways = int(ways)
    if ways < 2:
        raise ValueError(f"ways must be >= 2 (N-way classification needs at least 2 classes), got {ways}")
    return ways


def images_needed(shots: int, query_shots: int) -> str:
    """The images per class an image family's tasks need, in its settings' words, for its errors
    ("shots + query_shots = 5" read as the query set's fault where ``sample`` needs ``shots`` only)."""
    if not query_shots:
        return f"shots = {shots}"
    return f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots}"


def draw_episode_plan(counts: torch.Tensor, n_tasks: int, ways: int, per_class: int, *,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which classes and which of their images ``n_tasks`` episodes use.

    Args:
        counts: long ``[C]``: images available in each class.
        ways: classes per task, distinct within a task, in random order (position = label).
        per_class: distinct images drawn from each chosen class.
        generator: all randomness comes from it (on its device; CPU when None).

    Returns:
        ``classes`` long ``[T, ways]`` and ``picks`` long ``[T, ways, per_class]``: positions
        in ``range(counts[class])``, distinct and in random order.
    """
    n_tasks = _check_positive_int("n_tasks", n_tasks)
    ways = _check_positive_int("ways", ways)
    per_class = _check_positive_int("per_class", per_class)
    dev = _check_generator(generator)
    n_classes = counts.numel()
    if ways > n_classes:
        raise ValueError(f"{ways}-way tasks need {ways} classes, only {n_classes} are available")
    if int(counts.min()) < per_class:
        raise ValueError(f"every class needs {per_class} images per task, but one has only {int(counts.min())}")
    counts = counts.to(dev)
    # Uniform random subsets in random order: the smallest keys of i.i.d. uniforms (float64:
    # ties are negligible), as sample_indices draws minibatches.
    keys = uniform_keys("n_tasks x classes", n_tasks, n_classes, generator=generator, device=dev)
    classes = keys.topk(ways, dim=-1, largest=False, sorted=True).indices
    width = int(counts.max())
    keys = uniform_keys("n_tasks x ways x images", n_tasks, ways, width, generator=generator, device=dev)
    missing = torch.arange(width, device=dev) >= counts[classes].unsqueeze(-1)
    keys = keys.masked_fill(missing, 2.0)  # never among the smallest
    picks = keys.topk(per_class, dim=-1, largest=False, sorted=True).indices
    return classes.cpu(), picks.cpu()
