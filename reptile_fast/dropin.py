"""``reptile_fast.reptile``: the seed's ``reptile()`` call, unchanged, on the fast paths.

A seed script changes one import::

    from reptile_fast import reptile      # instead of its own reptile()
    reptile(model, 30000, sample_task, perform_k_training_steps)

and gets the same algorithm: φ ← φ + ε (φ̃ − φ) after ``k · N // batch_size`` SGD steps
(lr 0.02) on randperm-style minibatches of ``batch_size`` points of each sampled task.

Which path runs (``stats["path"]`` names it, with the trainer's backend names):
    * the inner loop is the standard one (``reptile_fast.seed_recognition``: ``None``, the
      seed's or the reference's ``perform_k_training_steps``, or a ``functools.partial`` of it
      setting ``batch_size``) and the task's loss is ``nn.MSELoss()`` / ``nn.CrossEntropyLoss()``
      with default settings (or ``F.mse_loss`` / ``F.cross_entropy``): a ``Reptile`` trainer
      with ``backend`` — "auto" is "compiled" (the whole meta-step of a CPU MLP compiled) when
      the model fits it, else the trainer's "auto" (the fastest backend that fits; the fused
      Triton kernel on a GPU);
    * otherwise (a custom inner loop, another loss, the seed's loop on non-1-D data, a model
      with frozen parameters, which the seed's loop leaves as they are): path
      "reference", the seed's loop — the user's inner loop on a deep copy per task, then the
      trainer's outer update — with one warning (``ReferencePathWarning``) saying why.

Every path runs the one training loop (``reptile_fast.loop``).  The fast paths draw tasks by
calling ``sample_task`` (the seed's own ``sample_task``, recognised by its code, is drawn
vectorised with ``reptile_fast.Sine``, the same distribution) and the minibatch plans with
``reptile_fast.sample_indices`` from ``generator`` (the global RNG by default): the same
distributions as the seed's, drawn in another order.  ``indices=`` feeds the plans instead (for
exact comparisons; pass a ``sample_task`` that replays recorded tasks to fix those too).
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .backends import BACKENDS, UnsupportedModelError
from .compat import check_plan_shape
from .core import NONFINITE_HINT, NonFiniteError, OuterUpdate
from .losses import loss_name
from .loop import PlanSampler, ProgressCallback, Sampler, TrainingLoop
from .seed_recognition import SEED_INNER_LR, classify_inner_loop, is_seed_sample_task, points, standard_inner_loop
from .steppers import DEFAULT_CHUNK, Stepper
from .tasks.base import TaskBatch
from .validation import check_bool, check_float, check_int, check_materialised

__all__ = ["reptile", "ReferencePathWarning", "BACKEND_CHOICES"]

#: the trainer's backends, plus "compiled" (the whole meta-step of a CPU MLP compiled)
BACKEND_CHOICES = ("auto", "compiled", *BACKENDS)


class ReferencePathWarning(UserWarning):
    """The drop-in runs the (slow, exact) reference loop; the message says why."""


class SampleTaskError(ValueError):
    """A task from ``sample_task()`` that the drop-in refuses, named by its call.  (A subclass:
    the training loop passes it on as it is instead of wording it as ``fit``'s own draw.)"""


# ---------------------------------------------------------------------- tasks
def _loss_kind(loss_fct) -> Optional[str]:
    """"mse" / "cross_entropy" when the fast paths compute exactly this loss; else None."""
    return loss_name(loss_fct) if callable(loss_fct) else None


def _owned(task):
    """``sample_task()``'s ``(x, y, loss_fct)`` with its tensors copied, for the fast paths.  They
    keep tasks before training on them (the first while they pick a path, a meta-batch or a chunk
    to stack); a ``sample_task`` that refills one tensor each call then trained every kept task on
    the last one's data, silently (QA46).  The seed uses each task at once, so copies give its
    numbers.  (The reference path draws each task just before its inner loop instead.)"""
    if not isinstance(task, (tuple, list)):
        return task  # refused by _check_task, naming its type
    items = [t.clone() if isinstance(t, torch.Tensor) else t for t in task]
    make = getattr(type(task), "_make", None)  # a namedtuple keeps its type
    return make(items) if callable(make) else type(task)(items) if type(task) in (tuple, list) else tuple(items)


def _check_task(task, i: int):
    """``sample_task()``'s result as ``(x, y, loss_fct)``, with a clear error when it is not one."""
    where = f"sample_task() (call {i + 1})"
    if not isinstance(task, (tuple, list)) or len(task) != 3:
        raise TypeError(f"{where} must return a tuple (x, y, loss_fct), got "
                        f"{type(task).__name__}{'' if not isinstance(task, (tuple, list)) else f' of length {len(task)}'}")
    x, y, loss_fct = task
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{where}: x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    if not callable(loss_fct):
        raise TypeError(f"{where}: loss_fct must be callable, got {type(loss_fct).__name__}")
    if x.layout != torch.strided or y.layout != torch.strided:
        # mkldnn failed inside torch ("Could not run 'aten::as_strided' ... 'MkldnnCPU'"), sparse was
        # named as a TaskBatch the caller never built
        raise TypeError(f"{where}: x and y must be dense tensors, got layouts {x.layout} and {y.layout} "
                        f"(use .to_dense())")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() not in (1, 2) or x.shape[0] < 1:
        raise ValueError(f"{where}: x must have shape [N] or [N, in_features] with N >= 1, got {tuple(x.shape)}")
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: y must have one row per point of x ({x.shape[0]}), got shape {tuple(y.shape)}")
    if "meta" in (x.device.type, y.device.type):  # stacking failed inside torch ("Cannot copy out of meta tensor")
        raise ValueError(f"{where}: x and y must hold data, got tensors on the meta device")
    return x, y, loss_fct


class _SampleTaskSource:
    """``sample_task`` as a task distribution: ``sample(n)`` calls it ``n`` times and stacks the
    tasks into a ``TaskBatch`` (x ``[n, N, in]``, y ``[n, N, out]`` or labels ``[n, N]``).

    The first call's task (already drawn to choose the path) is served first.  Every task must
    have the first one's shapes, dtypes and kind of loss: the fast paths stack them."""

    def __init__(self, sample_task: Callable, first, kind: str):
        self.sample_task, self.pending, self.kind, self.calls = sample_task, first, kind, 1
        x, y, _ = first
        self.signature = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)

    def _next(self):
        if self.pending is not None:
            task, self.pending = self.pending, None
            return task
        task = _check_task(_owned(self.sample_task()), self.calls)
        self.calls += 1
        x, y, loss_fct = task
        if (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype) != self.signature or _loss_kind(loss_fct) != self.kind:
            raise ValueError(
                f"sample_task() call {self.calls} returned x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} "
                f"{y.dtype}, loss {type(loss_fct).__name__}; the first returned "
                f"x {self.signature[0]} {self.signature[1]}, y {self.signature[2]} {self.signature[3]}, "
                f"a {self.kind} loss. The fast path stacks tasks, so they must agree")
        return task

    def sample(self, n: int, *, generator=None, device=None) -> TaskBatch:
        xs, ys = [], []
        for _ in range(n):
            x, y, _ = self._next()
            xs.append(points(x))
            ys.append(y if self.kind == "cross_entropy" else points(y))
        try:
            return TaskBatch(torch.stack(xs).to(device), torch.stack(ys).to(device))
        except ValueError:
            # name the sample_task() call (the values are read again only on this failure path);
            # the loop worded it as fit's draw ("task_distribution.sample(2, ...) raised: ... fit's
            # arguments to it: n_tasks = ..."), names a drop-in caller never used
            first_call = self.calls - n + 1
            for j, (x, y) in enumerate(zip(xs, ys)):
                try:
                    TaskBatch(x[None], y[None])
                except ValueError as exc:
                    raise SampleTaskError(f"sample_task() (call {first_call + j}) returned a task the fast path "
                                          f"cannot train on: {exc}") from None
            raise


class _SineSource:
    """The seed's ``sample_task`` drawn vectorised: the first (already drawn) task, then ``Sine``
    tasks (the same distribution) from the fast path's generator."""

    def __init__(self, first):
        from .tasks.sine import Sine

        # in the first task's dtype: the seed's linspace follows torch's default dtype (float64
        # under torch.set_default_dtype(torch.float64)), so its later tasks would too
        self.pending, self.sine = first, Sine(dtype=first[0].dtype)

    def sample(self, n: int, *, generator=None, device=None) -> TaskBatch:
        if self.pending is None:
            return self.sine.sample(n, generator=generator, device=device)
        x, y, _ = self.pending
        self.pending = None
        head = TaskBatch(x[None, :, None], y[None, :, None]).to(device)
        if n == 1:
            return head
        rest = self.sine.sample(n - 1, generator=generator, device=device)
        return TaskBatch.trusted(torch.cat([head.x, rest.x]), torch.cat([head.y, rest.y]))  # both validated


# ---------------------------------------------------------------------- validation
def _int_arg(name: str, value, minimum: int = 1) -> int:
    # the seed's loop takes any integer (``range(nb_iterations)``, ``k * N // batch_size``): numpy's
    # too, and a 0-dim integer tensor (``range(torch.tensor(3))``), as epsilon takes a 0-dim tensor
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.is_floating_point() and not value.is_complex()):
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    return check_int(name, value, minimum)


def _check_args(model, nb_iterations, sample_task, perform_k_training_steps, k, epsilon,
                meta_batch_size, backend, generator, chunk_size, backend_options) -> tuple:
    """``(nb_iterations, k, epsilon, meta_batch_size, chunk_size)`` as Python numbers, after checking
    every argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("model has no parameters to meta-learn")
    check_materialised(first)
    # 0 iterations, k = 0 and ε = 0 run in the seed as no-ops (the model is left as it was); a
    # negative count or step is refused: the seed would run it silently, but it is never meant
    nb_iterations = _int_arg("nb_iterations", nb_iterations, minimum=0)
    if not callable(sample_task):
        raise TypeError(f"sample_task must be callable (returning (x, y, loss_fct)), got {type(sample_task).__name__}")
    if perform_k_training_steps is not None and not callable(perform_k_training_steps):
        raise TypeError(f"perform_k_training_steps must be callable or None, got "
                        f"{type(perform_k_training_steps).__name__}")
    k = _int_arg("k", k, minimum=0)
    if (isinstance(epsilon, torch.Tensor) and epsilon.dim() == 0 and not epsilon.is_complex()
            and epsilon.dtype != torch.bool):
        epsilon = epsilon.item()  # the seed's arithmetic takes a 0-dim tensor ε too
    epsilon = check_float("epsilon", epsilon, allow_zero=True)
    meta_batch_size = _int_arg("meta_batch_size", meta_batch_size)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "fused":
        raise ValueError("backend 'fused' is now backend='compiled' with backend_options={'mode': 'eager'} "
                         "(the same maths without a compiler)")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKEND_CHOICES)}")
    if backend_options is not None and not isinstance(backend_options, dict):
        raise TypeError(f"backend_options must be a dict, got {type(backend_options).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    chunk_size = _int_arg("chunk_size", chunk_size)
    return nb_iterations, k, epsilon, meta_batch_size, chunk_size


def _reference_reason(model: nn.Module, any_shape: bool, task, kind) -> Optional[str]:
    """Why the fast paths cannot run the standard inner loop on this model and task (None when
    they can)."""
    named = list(model.named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    if len(frozen) == len(named):
        # the seed's loop fails in loss.backward() ("element 0 of tensors does not require grad")
        raise ValueError(f"every model parameter is frozen (requires_grad=False): {frozen}; the standard inner "
                         f"loop has nothing to train — unfreeze the parameters to meta-learn")
    if frozen:
        # the seed's loop runs such a model: torch.optim skips a parameter without a gradient, so it
        # stays as it was (ε·(φ̃ − φ) = 0); the trainer refuses frozen parameters (its batched paths
        # would train them), which made the drop-in fail on a model the seed runs
        return (f"the model has frozen parameters (requires_grad=False) {frozen}, which the seed's loop leaves "
                f"as they are and the fast paths would train")
    x, y, loss_fct = task
    if kind is None:
        return (f"the task's loss_fct ({type(loss_fct).__name__}) is not nn.MSELoss() or "
                f"nn.CrossEntropyLoss() with default settings (no hooks, no forward of its own)")
    if not any_shape and (x.dim() != 1 or y.dim() != 1 or kind != "mse"):
        return (f"the seed's perform_k_training_steps unsqueezes 1-D data; with x {tuple(x.shape)}, "
                f"y {tuple(y.shape)} {y.dtype} it computes something else than the standard loop "
                f"(pass perform_k_training_steps=None for [N, in] / [N, out] / label data)")
    if kind == "mse" and (not y.is_floating_point() or y.dtype != x.dtype):
        return f"MSE targets must be floating point like x ({x.dtype}), got {y.dtype}"
    if kind == "cross_entropy" and (y.dtype != torch.long or y.dim() != 1):
        return f"cross-entropy targets must be long class labels [N], got {y.dtype} {tuple(y.shape)}"
    if y.dim() > 2:
        return f"targets must be [N] or [N, out], got {tuple(y.shape)}"
    return None


def _seed_loop_error(model: nn.Module, task, batch: int) -> Optional[str]:
    """torch's error when the seed's ``perform_k_training_steps`` cannot compute its first
    minibatch's loss on ``task`` (``loss_fct(model(x[ind].unsqueeze(-1)), y[ind].unsqueeze(-1))``:
    e.g. class labels, unsqueezed to ``[B, 1]``, which ``nn.CrossEntropyLoss`` refuses), else None.

    The seed's own loop raises the same error at its first step; the reference path ran it and
    the caller saw torch's traceback after a warning.  Run on a copy in eval mode with the RNG
    state restored: the global RNG and the model are left as they were."""
    x, y, loss_fct = task
    ind = torch.arange(min(batch, x.shape[0]), device=x.device)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            loss_fct(copy.deepcopy(model).eval()(x[ind].unsqueeze(-1)), y[ind].unsqueeze(-1))
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------------- the reference path
class _RawTaskSampler(Sampler):
    """``sample_task()`` results as they are (a custom inner loop may read any format)."""

    def __init__(self, sample_task: Callable, first, meta_batch_size: int):
        self.sample_task, self.pending, self.T = sample_task, first, meta_batch_size

    def draw(self, first_iteration: int, m: int):
        # drawn one at a time as the stepper reaches each task, as the seed draws a task just before
        # its inner loop: a sample_task that refills one buffer (or a custom format the inner loop
        # writes to) sees the seed's order of calls, with nothing copied (QA46)
        return _LazyTasks(self, m * self.T), None

    def next_task(self):
        task, self.pending = (self.pending, None) if self.pending is not None else (self.sample_task(), None)
        return task


class _LazyTasks:
    """``n`` tasks of a ``_RawTaskSampler``, each drawn when the stepper asks for it (``next``).
    Not a generator: a ``StopIteration`` from ``sample_task`` (a ``lambda: next(it)`` over too few
    tasks) reaches the caller as the seed's loop raises it; a generator turned it into
    ``RuntimeError: generator raised StopIteration`` (QA79)."""

    def __init__(self, sampler: "_RawTaskSampler", n: int):
        self.sampler, self.left = sampler, n

    def next(self):
        if self.left <= 0:
            raise RuntimeError("the reference path asked for more tasks than the meta-steps drawn")
        self.left -= 1
        return self.sampler.next_task()


class _SeedLoopStepper(Stepper):
    """The seed's meta-step: the user's inner loop on a deep copy of the model per task, then the
    trainer's outer update (``core.OuterUpdate``: one task gives the seed's ``p += ε(φ̃ − p)``)."""

    chunk = 1
    name = "reference"

    def __init__(self, model: nn.Module, inner: Callable, k: int, meta_batch_size: int):
        self.model, self.inner, self.k, self.T = model, inner, k, meta_batch_size
        self.named = list(model.named_parameters())
        self.outer = OuterUpdate(self.named)

    def _adapted(self, result) -> list:
        """The inner loop's result as detached tensors, one per model parameter in order; a
        ValueError/TypeError naming the problem otherwise (the seed's ``zip`` would leave the
        parameters past a short list untrained, or fail deep inside the update)."""
        where = f"perform_k_training_steps ({getattr(self.inner, '__qualname__', type(self.inner).__name__)})"
        if isinstance(result, (torch.Tensor, dict, str)) or not hasattr(result, "__iter__"):
            raise TypeError(f"{where} returned {type(result).__name__}; it must return the adapted model's "
                            f"parameters, a list of tensors in model.parameters() order")
        result = list(result)
        if len(result) != len(self.named):
            raise ValueError(f"{where} returned {len(result)} tensors; the model has {len(self.named)} "
                             f"parameters, and each must have its adapted value")
        for g, (name, p) in zip(result, self.named):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{where} returned a {type(g).__name__} for parameter {name}; it must return "
                                f"a list of tensors in model.parameters() order")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(f"{where} returned {name} with shape {tuple(g.shape)} {g.dtype} on {g.device}; "
                                 f"the parameter has shape {tuple(p.shape)} {p.dtype} on {p.device}")
        return [g.detach() for g in result]

    def run(self, tasks, plans, eps, first_iteration):
        # drawn lazily (``_LazyTasks``): each task right before its inner loop; called, not iterated,
        # so a StopIteration from sample_task is not taken for the end of the tasks
        for step in range(len(eps)):
            adapted = [self._adapted(self.inner(copy.deepcopy(self.model), tasks.next(), self.k))
                       for _ in range(self.T)]
            with torch.no_grad():
                deltas = [torch.stack([a[j] for a in adapted]) - p for j, (_, p) in enumerate(self.named)]
                self.outer.apply([d.mean(0) for d in deltas], torch.zeros(()), eps[step], first_iteration + step)
        return torch.full((len(eps),), math.nan)  # the user's loop reports no loss

    def check(self) -> None:
        self.outer.check()


class _Counter:
    iteration = 0


class _ProgressWithoutLoss(ProgressCallback):
    """The bar without a loss: the user's inner loop reports none (the stepper's NaN placeholders
    showed as ``loss=nan``, which reads as a diverged run)."""

    def on_read(self, loop, losses):
        pass


def _run_reference_path(model, nb_iterations, sample_task, inner, k, epsilon, meta_batch_size, first,
                        progress) -> dict:
    stepper = _SeedLoopStepper(model, inner, k, meta_batch_size)
    loop = TrainingLoop(_Counter(), stepper, _RawTaskSampler(sample_task, first, meta_batch_size), nb_iterations,
                        outer_lr_at=lambda i: epsilon, callbacks=[_ProgressWithoutLoss(progress)])
    loop.run()
    return {"loss": [], "compile_seconds": 0.0, "train_seconds": loop.train_seconds,
            "ms_per_iteration": 1e3 * loop.train_seconds / nb_iterations, "mode": None, "fallback_reason": None}


@contextlib.contextmanager
def _dropin_words():
    """A ``NonFiniteError`` worded for the seed's call, which has no ``inner_lr``/``outer_lr``."""
    try:
        yield
    except NonFiniteError as exc:
        hint = ("Lower epsilon (or, with your own perform_k_training_steps, its learning rate) or check "
                "what sample_task returns.")
        raise NonFiniteError(str(exc).replace(NONFINITE_HINT, hint), iteration=exc.iteration,
                             checkpoint=exc.checkpoint, checkpoint_iteration=exc.checkpoint_iteration) from None


# ---------------------------------------------------------------------- the entry point
def reptile(model: nn.Module, nb_iterations: int, sample_task: Callable,
            perform_k_training_steps: Optional[Callable] = None, k: int = 1, epsilon: float = 0.1, *,
            meta_batch_size: int = 1, backend: str = "auto", progress: bool = True,
            generator: Optional[torch.Generator] = None, indices: Optional[torch.Tensor] = None,
            chunk_size: int = DEFAULT_CHUNK, backend_options: Optional[dict] = None) -> Dict:
    """The seed's ``reptile(model, nb_iterations, sample_task, perform_k_training_steps, k,
    epsilon)``, fast: meta-trains ``model`` in place (see the module docstring for the paths).

    Args:
        model: an ``nn.Module`` (the seed's ``MLP``, any MLP, or any model the trainer runs).
        nb_iterations: outer steps (0: nothing is drawn or changed, as in the seed).
        sample_task: ``() -> (x, y, loss_fct)``: x ``[N]`` (the seed) or ``[N, in]``; y ``[N]``,
            ``[N, out]`` or long labels ``[N]`` (with ``nn.CrossEntropyLoss()``).
        perform_k_training_steps: the inner loop ``(model, task, k) -> parameters``; None or the
            seed's runs the fast paths, anything else the reference loop (with a warning).
        k: epochs of inner training; ``k · N // batch_size`` SGD steps per task (0 steps, e.g.
            ``k=0``, and ``epsilon=0`` leave the model as it was: they run the seed's loop).
        epsilon: the outer step ε (>= 0).
        meta_batch_size: tasks per outer step; their (φ̃_i − φ) are averaged.
        backend: "auto", "compiled", "reference", "torch" or "triton" (``Reptile``'s names).
        progress: show a tqdm bar (the seed always does).
        generator: draws the minibatch plans on the fast paths (default: the global RNG).
        indices: long ``[nb_iterations, meta_batch_size, steps, batch]``: the minibatch plans to use
            instead of drawing them (fast paths only), e.g. the seed's own randperm draws.
        chunk_size: meta-steps per compiled call / per draw of tasks and plans ("compiled"; and
            per CUDA-graph replay for "triton" with ``{"fused": True, "cuda_graphs": True}``).
        backend_options: passed to ``Reptile`` (e.g. ``{"mode": "eager"}`` for "compiled").

    Returns:
        A dict: ``path`` (the backend that ran: "compiled", "torch", "triton", "reference", or
        "triton-fused" for triton's fused stepper, ``backend_options={"fused": True}``),
        ``mode``, ``reason`` (why the reference path ran), ``tasks`` (how tasks were drawn),
        ``inner_steps``, ``inner_batch_size``, ``compile_seconds``, ``train_seconds`` and
        ``ms_per_iteration`` (after compilation) and ``loss`` (mean inner-loop loss per
        iteration; empty on the reference path).  Seed scripts may ignore it.
    """
    nb_iterations, k, epsilon, meta_batch_size, chunk_size = _check_args(
        model, nb_iterations, sample_task, perform_k_training_steps, k, epsilon, meta_batch_size, backend,
        generator, chunk_size, backend_options)
    check_bool("progress", progress)
    batch, any_shape = classify_inner_loop(perform_k_training_steps)
    if nb_iterations == 0:
        # the seed's ``for _ in range(0)``: no task is drawn and the model is left as it was
        if indices is not None and (not isinstance(indices, torch.Tensor) or indices.dim() != 4
                                    or indices.shape[0] != 0):
            raise ValueError(f"indices must be [nb_iterations, meta_batch_size, steps, batch] = [0, ...] "
                             f"for nb_iterations=0, got "
                             f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        return {"iterations": 0, "meta_batch_size": meta_batch_size, "reason": "nb_iterations=0: nothing to run",
                "path": None, "backend": None, "mode": None, "fallback_reason": None, "tasks": "none drawn",
                "inner_steps": None, "inner_batch_size": None, "compile_seconds": 0.0, "train_seconds": 0.0,
                "ms_per_iteration": None, "loss": []}
    first = sample_task()
    kind = None
    if batch is None:
        # A custom inner loop may take tasks of its own format: they are passed through unread.
        name = getattr(perform_k_training_steps, "__qualname__", type(perform_k_training_steps).__name__)
        reason = (f"perform_k_training_steps ({name}) is not the standard inner loop (the seed's "
                  f"perform_k_training_steps), so the fast paths cannot know what it computes")
    else:
        first = _check_task(_owned(first), 0)
        dtype = next(model.parameters()).dtype
        if first[0].dtype != dtype:
            # the standard loop feeds x to the model as it is: on the reference path (chosen for the
            # y/x dtype mismatch) this failed inside the first Linear ("mat1 and mat2 must have the same dtype")
            raise TypeError(f"sample_task() (call 1): x dtype {first[0].dtype} differs from the model's {dtype} "
                            f"(the inner loop feeds x to the model as it is)")
        kind = _loss_kind(first[2])
        reason = _reference_reason(model, any_shape, first, kind)
        steps = k * first[0].shape[0] // batch
        # (only for the named losses: a user's loss_fct is not called an extra time)
        failure = _seed_loop_error(model, first, batch) if (reason is not None and not any_shape and steps >= 1
                                                            and kind is not None) else None
        if failure is not None:
            x, y, _ = first
            raise ValueError(
                f"sample_task() (call 1): the seed's perform_k_training_steps cannot train on this task (x "
                f"{tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype}): its first minibatch's loss, "
                f"loss_fct(model(x[ind].unsqueeze(-1)), y[ind].unsqueeze(-1)), raises {failure} (the seed's own "
                f"loop fails the same way). Pass perform_k_training_steps=None to train on [N, in] inputs, "
                f"[N, out] targets or class labels [N]")
        if reason is None and (steps < 1 or epsilon == 0):
            # the model does not move; the seed's loop still draws every task (and, for ε = 0, trains
            # on each), which the reference path does as the seed does, rather than refusing the call
            reason = ("epsilon=0: the model is left as it was (the outer update adds 0)" if epsilon == 0 else
                      f"k * N // batch_size = {k} * {first[0].shape[0]} // {batch} = 0 inner steps: the "
                      f"model is left as it was")
    stats = {"iterations": nb_iterations, "meta_batch_size": meta_batch_size, "reason": reason}
    if reason is not None:
        if indices is not None:
            raise ValueError(f"indices feeds the fast paths' minibatch draws, but this call runs the "
                             f"reference loop, which draws its own: {reason}")
        warnings.warn(f"reptile_fast.reptile runs the reference loop (the seed's speed): {reason}",
                      ReferencePathWarning, stacklevel=2)
        inner = perform_k_training_steps if perform_k_training_steps is not None else standard_inner_loop
        with _dropin_words():
            stats.update(_run_reference_path(model, nb_iterations, sample_task, inner, k, epsilon, meta_batch_size,
                                             first, progress))
        # "tasks" as on the fast paths: the docstring promises it (a KeyError here before)
        stats.update(path="reference", backend="reference", inner_steps=None, inner_batch_size=None,
                     tasks="sample_task() calls")
        return stats

    from .trainer import Reptile

    n_points = first[0].shape[0]
    batch = min(batch, n_points)  # randperm(N)[:batch] holds all N points when N < batch
    if indices is not None:
        check_plan_shape(indices, (nb_iterations, meta_batch_size, steps, batch),
                         "[nb_iterations, meta_batch_size, steps, batch]", n_points)

    def make_trainer(name: str, options: Optional[dict]):
        return Reptile(model, inner_lr=SEED_INNER_LR, inner_steps=steps, inner_batch_size=batch,
                       outer_lr=epsilon, loss=kind, backend=name, backend_options=options)

    options = dict(backend_options or {})
    if backend == "compiled" or (backend == "triton" and options.get("fused") and options.get("cuda_graphs")):
        options.setdefault("chunk", chunk_size)
    trainer = None
    # auto: the compiled program (the native C meta-step) wherever it runs the model: measured
    # 2.0x (meta-batch 1024) to 38x (meta-batch 1) backend torch's tasks/s on the CPU with the
    # chunked draws used here (bench/results/native_meta_batch_cpu.json).
    if backend == "auto" and not options:
        try:
            trainer = make_trainer("compiled", {"chunk": chunk_size})
        except UnsupportedModelError:
            trainer = None
    if trainer is None:
        trainer = make_trainer(backend, options or None)
    if (is_seed_sample_task(sample_task) and kind == "mse" and first[0].shape == (50,)
            and first[0].dtype in (torch.float32, torch.float64) and first[1].dtype == first[0].dtype):
        source = _SineSource(first)
        stats["tasks"] = "the seed's sample_task, drawn vectorised (reptile_fast.Sine)"
    else:
        source = _SampleTaskSource(sample_task, first, kind)
        stats["tasks"] = "sample_task() calls"
    sampler = None
    if indices is not None:
        sampler = PlanSampler(source, indices.to(trainer.device), generator=generator, device=trainer.device,
                              check=lambda t: trainer.checker.tasks(t, 1), draw_chunks=True)
    # a chunk's draws at once (Reptile.fit's draw_chunks): the compiled path's speed at meta-batch 1
    with _dropin_words():
        history = trainer.fit(source, nb_iterations, meta_batch_size=meta_batch_size, generator=generator,
                              progress=progress, sampler=sampler, handle_signals=False,
                              draw_chunks=sampler is None)
    fit_stats = trainer.last_fit_stats
    stats.update(path=fit_stats["stepper"], backend=fit_stats["stepper"], mode=fit_stats["mode"],
                 fallback_reason=fit_stats["fallback_reason"], compile_seconds=fit_stats["compile_seconds"],
                 train_seconds=fit_stats["train_seconds"], ms_per_iteration=fit_stats["ms_per_iteration"],
                 loss=history["loss"], inner_steps=steps, inner_batch_size=batch)
    return stats
