"""The data every backend shares: a batch of tasks and the minibatch plan.

``TaskBatch`` holds the points of ``T`` tasks; ``sample_indices`` draws the plan of which points
each inner step uses.  Making the plan explicit is what lets every backend see exactly the same
minibatches, so equivalence tests can compare backends to the last float.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Tuple, runtime_checkable
import math
import numbers

import torch

from ..native_select import smallest_k
from ..validation import check_choice, check_device, check_int, out_of_memory_message

__all__ = ["TaskBatch", "TaskDistribution", "sample_indices", "epoch_indices", "draw_plan", "MINIBATCHES",
           "concat_draws"]

#: integer inputs a TaskBatch takes besides floats: ids for an ``nn.Embedding`` (any value; the
#: model's forward range-checks them)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class TaskBatch:
    """Points of ``T`` tasks with ``N`` points each.

    Attributes:
        x: float ``[T, N, *in_shape]`` inputs (``[T, N, in_features]`` for an MLP,
            ``[T, N, C, H, W]`` for a conv net).
        y: float ``[T, N, out_features]`` regression targets, or long ``[T, N]`` class labels.
        n_classes: for class labels, a bound: every label is ``< n_classes``.  Computed from
            ``y`` when not given (one read of ``y``), checked against ``y`` when given.

    Construction validates shapes, dtypes, devices, finiteness and label range, reading the
    values once: validation happens where data enters.  ``TaskBatch.trusted`` skips it, for
    the library's task families (which generate valid data) and for slices of a validated batch.
    """

    x: torch.Tensor
    y: torch.Tensor
    n_classes: Optional[int] = field(default=None, compare=False)

    @classmethod
    def trusted(cls, x: torch.Tensor, y: torch.Tensor, n_classes: Optional[int] = None) -> "TaskBatch":
        """A ``TaskBatch`` built without validation (no host read): for data known to be valid."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "x", x)
        object.__setattr__(obj, "y", y)
        object.__setattr__(obj, "n_classes", n_classes)
        return obj

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TaskBatch.x must be a torch.Tensor, got {type(x).__name__}")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"TaskBatch.y must be a torch.Tensor, got {type(y).__name__}")
        for name, t in (("x", x), ("y", y)):
            # a sparse / mkldnn tensor failed inside torch (NotImplementedError "Could not run
            # 'aten::ne.Scalar' ... 'SparseCPU'"), a meta one at the value read (RuntimeError)
            if t.layout != torch.strided:
                raise TypeError(f"TaskBatch.{name} must be a dense tensor, got layout {t.layout} (use .to_dense())")
            if t.is_meta:
                raise ValueError(f"TaskBatch.{name} is on the meta device (a tensor without data)")
        if not x.is_floating_point() and x.dtype not in INDEX_DTYPES:
            raise TypeError(f"TaskBatch.x must be a floating-point tensor (or integer ids, int32/int64, for "
                            f"an embedding), got dtype {x.dtype}")
        if x.dim() < 3:
            raise ValueError(
                f"TaskBatch.x must have shape [tasks, points, *features] (3 or more dims), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"TaskBatch.x needs at least one task and one point, got shape {tuple(x.shape)}")
        if any(d < 1 for d in x.shape[2:]):
            raise ValueError(f"TaskBatch.x has an empty feature dimension: shape {tuple(x.shape)}")
        if y.is_floating_point() and y.dim() == 3 and y.shape[2] < 1:
            raise ValueError(f"TaskBatch.y has no output features: shape {tuple(y.shape)}")
        if y.is_floating_point():
            if y.dim() != 3:
                raise ValueError(
                    f"TaskBatch.y (regression targets) must have shape [tasks, points, out_features], "
                    f"got shape {tuple(y.shape)}"
                )
            if x.is_floating_point() and y.dtype != x.dtype:
                raise TypeError(f"TaskBatch.y dtype {y.dtype} differs from TaskBatch.x dtype {x.dtype}")
        elif y.dtype == torch.long:
            if y.dim() != 2:
                raise ValueError(
                    f"TaskBatch.y (class labels) must have shape [tasks, points], got shape {tuple(y.shape)}"
                )
            lo, hi = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
            if lo < 0:
                raise ValueError("TaskBatch.y class labels must be non-negative")
            if isinstance(self.n_classes, numbers.Integral) and not isinstance(self.n_classes, bool):
                object.__setattr__(self, "n_classes", int(self.n_classes))  # numpy's too, stored as an int
            if self.n_classes is None:
                object.__setattr__(self, "n_classes", hi + 1)
            elif isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int) or hi >= self.n_classes:
                raise ValueError(f"TaskBatch.n_classes={self.n_classes!r} must be an int above every label "
                                 f"(the largest is {hi})")
        else:
            raise TypeError(
                f"TaskBatch.y must be float (regression) or torch.long (class labels), got dtype {y.dtype}"
            )
        if y.is_floating_point() and self.n_classes is not None:
            raise ValueError("TaskBatch.n_classes is for class labels; these targets are floats")
        if tuple(y.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(
                f"TaskBatch.x and TaskBatch.y disagree on [tasks, points]: "
                f"{tuple(x.shape[:2])} vs {tuple(y.shape[:2])}"
            )
        if x.device != y.device:
            raise ValueError(f"TaskBatch.x is on {x.device} but TaskBatch.y is on {y.device}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("TaskBatch.x contains NaN or infinite values")
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            raise ValueError("TaskBatch.y contains NaN or infinite values")

    @property
    def n_tasks(self) -> int:
        return self.x.shape[0]

    @property
    def n_points(self) -> int:
        return self.x.shape[1]

    @property
    def is_classification(self) -> bool:
        return self.y.dtype == torch.long

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """Move to ``device``; ``dtype`` casts the float inputs and float targets (integer ids and
        class labels keep theirs)."""
        device = _check_device(device)  # torch's RuntimeError listed every device type it knows
        if device is not None and torch.device(device).type == "meta":
            raise ValueError("TaskBatch.to: the meta device holds no data (tasks must hold their values)")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            # torch.long truncated float inputs into integer "ids" (QA45)
            raise TypeError(f"dtype must be a floating torch.dtype (it casts the float inputs and targets), "
                            f"got {dtype!r}")
        x = self.x.to(device=device, dtype=dtype if self.x.is_floating_point() else None)
        y = self.y.to(device=device, dtype=dtype if self.y.is_floating_point() else None)
        if dtype is None or (x.dtype == self.x.dtype and y.dtype == self.y.dtype):
            return TaskBatch.trusted(x, y, self.n_classes)  # the same values: already validated
        return TaskBatch(x, y)  # a cast can overflow to inf: validate again

    def __getitem__(self, item) -> "TaskBatch":
        """Select tasks: ``tasks[0:4]`` or ``tasks[[0, 2]]`` keeps the task dimension.

        Only the task dimension is indexed: a tuple (``tasks[:, :5]``, ``tasks[..., :1]``) is a
        ``TypeError`` (it used to slice x's features and y's points apart into a batch that failed
        deep inside a backend); an int (a 0-dim integer tensor or numpy array too) outside
        ``[-T, T)`` an ``IndexError``."""
        if isinstance(item, torch.Tensor) and item.dim() == 0 and not item.is_floating_point() \
                and item.dtype != torch.bool:
            item = int(item)  # tasks[torch.argmax(losses)] selects that task, as an int does
        elif getattr(item, "ndim", None) == 0 and getattr(getattr(item, "dtype", None), "kind", "") in ("i", "u"):
            item = int(item)  # a 0-dim numpy integer array (np.asarray(i)), as a numpy integer
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):  # numpy's ints too
            item, n = int(item), self.x.shape[0]
            if not -n <= item < n:
                raise IndexError(f"TaskBatch[{item}]: task index out of range for {n} tasks")
            item = slice(item, item + 1 if item != -1 else None)
        try:
            if isinstance(item, (str, bytes)):  # torch warned of "multidimensional indexing", then failed
                raise TypeError("a string selects no tasks")
            if item is None or isinstance(item, tuple):
                raise TypeError("only the task dimension can be indexed")
            if isinstance(item, numbers.Real) and not isinstance(item, numbers.Integral):
                raise TypeError(f"a {type(item).__name__} is not a task index")  # torch's own words before (QA46)
            if isinstance(item, slice) and item.step is not None and item.step < 1:
                # torch's "step must be greater than zero" named no TaskBatch
                raise ValueError(f"TaskBatch[{item!r}]: a slice's step must be positive (reverse with a list or "
                                 f"tensor of indices: tasks[torch.arange(T - 1, -1, -1)])")
            x, y = self.x[item], self.y[item]
        except TypeError as exc:
            raise TypeError(f"TaskBatch[{item!r}]: select tasks with an int, a slice, a list of ints or an "
                            f"index tensor ({exc})") from None
        if x.dim() != self.x.dim() or x.shape[0] < 1:
            raise IndexError(f"TaskBatch[{item!r}] must select one or more tasks")
        return TaskBatch.trusted(x, y, self.n_classes)


@runtime_checkable
class TaskDistribution(Protocol):
    """Anything with ``sample(n_tasks, *, generator=None, device=None) -> TaskBatch``."""

    def sample(self, n_tasks: int, *, generator: Optional[torch.Generator] = None,
               device=None) -> TaskBatch: ...


def _check_generator(generator) -> torch.device:
    """The device to draw on: the generator's (CPU when None); a clear error for anything else."""
    if generator is None:
        return torch.device("cpu")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device


def _check_device(device):
    """``device`` as a ``torch.device`` (None stays None); ValueError naming a bad or unavailable one."""
    return None if device is None else check_device(device)


def _check_positive_int(name: str, value) -> int:
    return check_int(name, value, 1)


def uniform_keys(names: str, *sizes: int, generator: Optional[torch.Generator], device,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 uniforms ``[*sizes]`` for a draw, or a ValueError naming ``names`` (the arguments the
    sizes come from) when they cannot exist: torch raised a RuntimeError from inside for a count
    whose bytes overflow ("Storage size calculation overflowed", ``inner_steps=2**62``) or that
    exceeds memory.  ``out``: a contiguous float64 ``[*sizes]`` slice of a buffer from
    ``empty_keys`` to fill instead (the same numbers: ``torch.rand`` is ``empty().uniform_()``)."""
    # (a module-level import: a function-level one cost ~1.5 us per call, two calls per meta-step
    # in Sine.sample_steps, about 5 % of a compiled meta-step at meta-batch 1)
    if out is not None:
        return torch.rand(*sizes, generator=generator, dtype=torch.float64, out=out)
    return _allocated(names, sizes, lambda: torch.rand(*sizes, generator=generator, device=device,
                                                        dtype=torch.float64))


def empty_keys(names: str, *sizes: int, device) -> torch.Tensor:
    """An uninitialised float64 ``[*sizes]`` buffer that ``uniform_keys(..., out=)`` fills part by
    part (a chunk of draws without a ``torch.cat`` copy); the same ValueErrors."""
    return _allocated(names, sizes, lambda: torch.empty(*sizes, device=device, dtype=torch.float64))


def _allocated(names: str, sizes: Tuple[int, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
    count = math.prod(sizes)
    if count * 8 >= 2 ** 63:
        raise ValueError(f"{names} = {' x '.join(map(str, sizes))}: {count} random numbers cannot be drawn "
                         f"(more bytes than a 64-bit size holds)")
    try:
        return make()
    except RuntimeError as exc:
        message = out_of_memory_message(exc, f"lower {names}")
        if message is None:
            raise
        raise ValueError(f"{names} = {' x '.join(map(str, sizes))}: {message}") from None


def _plan_arguments(n_tasks, inner_steps, n_points, batch_size, generator, device, why: str):
    """A plan function's arguments checked: ``(n_tasks, inner_steps, n_points, batch_size, the
    generator's device, device)``; a minibatch larger than the task is refused (``why``: the
    function's reason)."""
    n_tasks = _check_positive_int("n_tasks", n_tasks)
    inner_steps = _check_positive_int("inner_steps", inner_steps)
    n_points = _check_positive_int("n_points", n_points)
    batch_size = _check_positive_int("batch_size", batch_size)
    if batch_size > n_points:
        raise ValueError(f"batch_size ({batch_size}) must not exceed n_points ({n_points}): {why}")
    return n_tasks, inner_steps, n_points, batch_size, _check_generator(generator), _check_device(device)


def sample_indices(
    n_tasks: int,
    inner_steps: int,
    n_points: int,
    batch_size: int,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Draw the minibatch plan: long ``[n_tasks, inner_steps, batch_size]``.

    For every task and step, ``batch_size`` distinct point indices drawn uniformly from
    ``range(n_points)`` in random order: the distribution of ``torch.randperm(n_points)[:batch_size]``
    that the seed draws at every inner step.  Drawn on the generator's device (CPU by default)
    and moved to ``device``, so a seeded generator gives the same plan wherever it is used.
    """
    n_tasks, inner_steps, n_points, batch_size, draw_device, device = _plan_arguments(
        n_tasks, inner_steps, n_points, batch_size, generator, device, "a minibatch holds distinct points")
    # A uniformly random permutation per (task, step): argsort of i.i.d. uniforms.  Ties have
    # probability ~N^2 / 2^24 per row in fp32, so draw in float64 where they are negligible.
    keys = uniform_keys("n_tasks x inner_steps x n_points", n_tasks, inner_steps, n_points, generator=generator,
                        device=draw_device)
    return plan_from_keys(keys, batch_size).to(device=device if device is not None else draw_device)


#: how a plan's minibatches are drawn (``Reptile(minibatches=...)``, ``draw_plan``): "fresh", each
#: step's minibatch drawn anew (the seed: ``sample_indices``); "epochs", each task's points
#: shuffled and cut into consecutive minibatches, reshuffled when used up (the official
#: supervised-reptile code's ``_mini_batches``: ``epoch_indices``)
MINIBATCHES = ("fresh", "epochs")


def check_minibatches(value) -> str:
    """``value`` if it names a way of drawing minibatches (``MINIBATCHES``), else a clear error."""
    return check_choice("minibatches", value, MINIBATCHES)  # the plain str (QA47)


def epoch_indices(
    n_tasks: int,
    inner_steps: int,
    n_points: int,
    batch_size: int,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Draw a minibatch plan epoch by epoch: long ``[n_tasks, inner_steps, batch_size]``.

    Each task's ``n_points`` indices are shuffled and read in order, ``batch_size`` per step;
    when they run out a new shuffle follows, and a minibatch may straddle two shuffles (then it
    can hold a point twice), as the official supervised-reptile code's ``_mini_batches`` does.
    With ``inner_steps · batch_size = n_points`` every point is used exactly once per inner loop
    (5-way 10-shot training, 5 steps of 10); ``sample_indices`` draws each step afresh instead.
    Shuffles are argsorts of float64 uniforms drawn on the generator's device, so a seeded
    generator gives the same plan wherever it is used.
    """
    # (the official code takes a minibatch larger than the task, spanning shuffles; every other
    # plan refuses it, and it is almost surely a mistake)
    n_tasks, inner_steps, n_points, batch_size, draw_device, device = _plan_arguments(
        n_tasks, inner_steps, n_points, batch_size, generator, device, "a minibatch is at most one task's points")
    used = inner_steps * batch_size
    epochs = -(-used // n_points)
    keys = uniform_keys(f"n_tasks x epochs (inner_steps x batch_size / n_points, rounded up: {epochs}) x n_points",
                        n_tasks, epochs, n_points, generator=generator, device=draw_device)
    order = keys.argsort(dim=-1).view(n_tasks, epochs * n_points)[:, :used]
    return order.reshape(n_tasks, inner_steps, batch_size).to(
        device=device if device is not None else draw_device)


def draw_plan(minibatches: str, n_tasks: int, inner_steps: int, n_points: int, batch_size: int, *,
              generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The plan ``minibatches`` names (``MINIBATCHES``): ``sample_indices`` for "fresh",
    ``epoch_indices`` for "epochs"; the same arguments and result shape."""
    draw = sample_indices if check_minibatches(minibatches) == "fresh" else epoch_indices
    return draw(n_tasks, inner_steps, n_points, batch_size, generator=generator, device=device)


def plan_from_keys(keys: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The plan ``sample_indices`` makes of its keys: long ``[..., batch_size]``, the indices of
    each row's ``batch_size`` smallest keys in ascending order of key (float64 ``keys [..., N]``)."""
    if batch_size == keys.shape[-1]:
        return keys.argsort(dim=-1)
    # the same indices as topk, several times faster on the CPU where a C compiler exists
    # (from 64 rows: below, the call's fixed cost makes topk as fast)
    idx = smallest_k(keys, batch_size) if keys.numel() >= 64 * keys.shape[-1] else None
    if idx is None:
        idx = keys.topk(batch_size, dim=-1, largest=False, sorted=True).indices
    return idx


def concat_draws(parts):
    """One ``TaskBatch`` and plan from drawn pieces ``[(TaskBatch, plan or None), ...]``, in order
    (each piece valid already: no second validation).  The plan is None when the pieces have none."""
    if len(parts) == 1:
        return parts[0]
    batches = [t for t, _ in parts]
    first = batches[0]
    for other in batches[1:]:
        if (other.x.shape[1:], other.y.shape[1:], other.x.dtype, other.y.dtype) != \
                (first.x.shape[1:], first.y.shape[1:], first.x.dtype, first.y.dtype):
            # torch.cat failed with "Sizes of tensors must match except in dimension 0"
            raise ValueError(
                f"task_distribution.sample returned tasks of x {tuple(first.x.shape)} {first.x.dtype}, y "
                f"{tuple(first.y.shape)} and, in a draw that runs in the same call, x {tuple(other.x.shape)} "
                f"{other.x.dtype}, y {tuple(other.y.shape)}: a chunk of meta-steps (backend 'compiled', "
                f"triton's fused stepper) or the blocks of one distributed meta-step are stacked, so their "
                f"points and features must agree. Keep the number of points fixed, or train such a "
                f"distribution on backend 'torch' or 'reference' (one meta-step per call)")
    bounds = [t.n_classes for t in batches if t.n_classes is not None]
    tasks = TaskBatch.trusted(torch.cat([t.x for t in batches]), torch.cat([t.y for t in batches]),
                              max(bounds) if bounds else None)
    plans = [p for _, p in parts]
    return tasks, (None if plans[0] is None else torch.cat(plans))
