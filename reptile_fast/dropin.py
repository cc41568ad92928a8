"""``reptile_fast.reptile``: the seed's ``reptile()`` call, unchanged, on the fast paths.

A seed script changes one import::

    from reptile_fast import reptile      # instead of its own reptile()
    reptile(model, 30000, sample_task, perform_k_training_steps)

and gets the same algorithm: φ ← φ + ε (φ̃ − φ) after ``k · N // batch_size`` SGD steps
(lr 0.02) on randperm-style minibatches of ``batch_size`` points of each sampled task.

Which path runs:
    * the inner loop is the standard one — ``None``, ``reptile_fast.reference.
      perform_k_training_steps`` or a function with the same code (the seed's own, recognised by
      its bytecode; a ``functools.partial`` of it setting ``batch_size`` too) — and the task's
      loss is ``nn.MSELoss()`` or ``nn.CrossEntropyLoss()`` with default settings (or
      ``F.mse_loss`` / ``F.cross_entropy``):
        - CPU, plain MLP (Linear + tanh/relu/sigmoid chain): ``reptile_fast.compiled_step``, the
          whole meta-step compiled (``backend="auto"`` or ``"compiled"``; ``"fused"`` is the
          same maths without compilation);
        - anything else (a GPU, other models, or ``backend="torch"/"triton"/"reference"``): the
          ``Reptile`` trainer's ``meta_step`` with that backend ("auto": the fastest that fits,
          the fused Triton kernel on a GPU).
    * otherwise (a custom inner loop, another loss, the seed's loop on non-1-D data): the
      reference loop, exactly ``reptile_fast.reference.reptile`` (bit for bit with the seed at
      meta-batch 1), with one warning (``ReferencePathWarning``) saying why.

The fast paths draw tasks by calling ``sample_task`` (in chunks of ``chunk_size`` meta-steps;
the seed's own ``sample_task``, recognised by its code, is drawn vectorised with
``reptile_fast.Sine``, the same distribution) and the minibatch plans with
``reptile_fast.sample_indices`` from ``generator`` (the global RNG by default): the same
distributions as the seed's, drawn in another order.  ``indices=`` feeds the plans instead (for
exact comparisons; pass a ``sample_task`` that replays recorded tasks to fix those too).
"""
from __future__ import annotations

import copy
import dis
import functools
import inspect
import math
import time
import types
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .backends import BACKENDS
from .backends.base import UnsupportedModelError
from .compiled_step import DEFAULT_CHUNK, DEFAULT_MODE, check_compiled_supported, check_plan_shape, compiled_fit
from .tasks.base import TaskBatch, sample_indices
from .validation import check_float, check_int

__all__ = ["reptile", "standard_inner_loop", "is_standard_inner_loop", "is_seed_sample_task",
           "ReferencePathWarning", "BACKEND_CHOICES"]

#: "compiled"/"fused": the CPU meta-step of ``reptile_fast.compiled_step`` (with / without
#: torch.compile); the others are ``Reptile`` trainer backends.
BACKEND_CHOICES = ("auto", "compiled", "fused", *BACKENDS)

#: the seed's inner learning rate (``torch.optim.SGD(..., lr=0.02)`` in its loop)
SEED_INNER_LR = 0.02


class ReferencePathWarning(UserWarning):
    """The drop-in runs the (slow, exact) reference loop; the message says why."""


# ---------------------------------------------------------------------- the standard inner loop
def _points(t: torch.Tensor) -> torch.Tensor:
    """The seed's ``t[ind].unsqueeze(-1)`` for 1-D data; ``[B, features]`` is used as it is."""
    return t.unsqueeze(-1) if t.dim() == 1 else t


def standard_inner_loop(model, task, k, batch_size=10):
    """The seed's ``perform_k_training_steps`` for inputs ``[N]`` or ``[N, in]`` and targets
    ``[N]``, ``[N, out]`` or long labels ``[N]``: ``k · N // batch_size`` SGD steps (lr 0.02) on
    ``torch.randperm(N)[:batch_size]`` minibatches.  On 1-D data it is the seed's function,
    operation for operation.  Trains ``model`` in place and returns its parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=SEED_INNER_LR)
    train_x, train_y, loss_fct = task
    labels = not train_y.is_floating_point()
    for _ in range(k * train_x.shape[0] // batch_size):
        ind = torch.randperm(train_x.shape[0])[:batch_size]
        x_batch = _points(train_x[ind])
        target = train_y[ind] if labels else _points(train_y[ind])
        loss = loss_fct(model(x_batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p for p in model.parameters()]


def _code_fingerprint(code: types.CodeType) -> tuple:
    """The instruction stream with local-variable names and nested code objects normalised: two
    functions with equal fingerprints run the same operations on the same globals."""
    out = []
    for ins in dis.get_instructions(code):
        if ins.opname in ("NOP", "RESUME", "CACHE", "EXTENDED_ARG"):
            continue
        if "FAST" in ins.opname or "DEREF" in ins.opname or "CLOSURE" in ins.opname or ins.opname == "MAKE_CELL":
            arg = ins.arg  # slot number: names of locals do not matter
        elif isinstance(ins.argval, types.CodeType):
            arg = _code_fingerprint(ins.argval)
        else:
            arg = ins.argval
        # 3.11 compiles ``obj.f(...)`` to LOAD_METHOD or LOAD_ATTR depending on context; same op.
        out.append(("LOAD_ATTR" if ins.opname == "LOAD_METHOD" else ins.opname, arg))
    return (code.co_argcount, code.co_kwonlyargcount, tuple(code.co_names), tuple(out))


@functools.lru_cache(maxsize=None)
def _standard_fingerprints() -> Dict[tuple, bool]:
    """fingerprint -> whether that loop takes any data shape (True) or, like the seed's, 1-D."""
    from . import reference

    return {_code_fingerprint(reference.perform_k_training_steps.__code__): False,
            _code_fingerprint(standard_inner_loop.__code__): True}


def _classify_inner_loop(fn) -> Tuple[Optional[int], bool]:
    """``(batch_size, any_shape)`` for a standard inner loop; ``(None, False)`` otherwise."""
    if fn is None:
        return 10, True
    keywords = {}
    if isinstance(fn, functools.partial):
        if fn.args or set(fn.keywords) - {"batch_size"}:
            return None, False
        keywords, fn = fn.keywords, fn.func
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    any_shape = _standard_fingerprints().get(_code_fingerprint(code)) if isinstance(code, types.CodeType) else None
    if any_shape is None or fn.__globals__.get("torch") is not torch:
        return None, False
    batch = keywords.get("batch_size", (fn.__defaults__ or (None,))[-1])
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        return None, False
    return batch, any_shape


def is_standard_inner_loop(fn) -> Optional[int]:
    """The minibatch size if ``fn`` is the standard inner loop (None, the reference's, the seed's
    or another function with the same code, ``standard_inner_loop``, or a ``functools.partial``
    of one of them that only sets ``batch_size``); None otherwise."""
    return _classify_inner_loop(fn)[0]


# The seed's sample_task, as its text reads (the seed program lives outside this package):
# recognising it lets the fast paths draw the same tasks vectorised (``Sine``), ~40 µs per
# iteration less than calling it.
_SEED_SAMPLE_TASK_SOURCE = """
def sample_task():
    a = torch.rand(1).item() * 4.9 + .1  # Sample a in [0.1, 5.0]
    b = torch.rand(1).item() * 2 * np.pi  # Sample b in [0, 2pi]
    x = torch.linspace(-5, 5, 50)
    y = a * torch.sin(x + b)
    loss_fct = nn.MSELoss()
    return x, y, loss_fct
"""


@functools.lru_cache(maxsize=None)
def _seed_sample_task_fingerprints() -> Dict[tuple, str]:
    """fingerprint -> the global name its π comes from ("np" in the seed, "math" in reference)."""
    from . import reference

    module = compile(_SEED_SAMPLE_TASK_SOURCE, "<seed sample_task>", "exec")
    seed_code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return {_code_fingerprint(seed_code): "np",
            _code_fingerprint(inspect.unwrap(reference.sample_task).__code__): "math"}


def is_seed_sample_task(fn) -> bool:
    """Whether ``fn`` is the seed's ``sample_task`` (its code, with ``torch``, ``nn`` and ``np`` /
    ``math`` bound to the real modules): sine tasks a·sin(x + b), a ~ U[0.1, 5], b ~ U[0, 2π],
    x = linspace(−5, 5, 50), MSE."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or code.co_argcount or code.co_kwonlyargcount:
        return False
    pi_module = _seed_sample_task_fingerprints().get(_code_fingerprint(code))
    if pi_module is None:
        return False
    import numpy

    expected = {"torch": torch, "nn": nn, pi_module: numpy if pi_module == "np" else math}
    return all(fn.__globals__.get(name) is module for name, module in expected.items())


# ---------------------------------------------------------------------- tasks
def _loss_kind(loss_fct) -> Optional[str]:
    """"mse" / "cross_entropy" when the fast paths compute exactly this loss; else None."""
    if loss_fct is F.mse_loss:
        return "mse"
    if loss_fct is F.cross_entropy:
        return "cross_entropy"
    if type(loss_fct) is nn.MSELoss and loss_fct.reduction == "mean":
        return "mse"
    if (type(loss_fct) is nn.CrossEntropyLoss and loss_fct.reduction == "mean" and loss_fct.weight is None
            and loss_fct.label_smoothing == 0.0 and loss_fct.ignore_index < 0):
        return "cross_entropy"
    return None


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
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() not in (1, 2) or x.shape[0] < 1:
        raise ValueError(f"{where}: x must have shape [N] or [N, in_features] with N >= 1, got {tuple(x.shape)}")
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: y must have one row per point of x ({x.shape[0]}), got shape {tuple(y.shape)}")
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
        task = _check_task(self.sample_task(), self.calls)
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
            xs.append(_points(x))
            ys.append(y if self.kind == "cross_entropy" else _points(y))
        return TaskBatch(torch.stack(xs).to(device), torch.stack(ys).to(device))


class _SineSource:
    """The seed's ``sample_task`` drawn vectorised: the first (already drawn) task, then ``Sine``
    tasks (the same distribution) from the fast path's generator."""

    def __init__(self, first):
        from .tasks.sine import Sine

        self.pending, self.sine = first, Sine()

    def sample(self, n: int, *, generator=None, device=None) -> TaskBatch:
        if self.pending is None:
            return self.sine.sample(n, generator=generator, device=device)
        x, y, _ = self.pending
        self.pending = None
        head = TaskBatch(x[None, :, None], y[None, :, None]).to(device)
        if n == 1:
            return head
        rest = self.sine.sample(n - 1, generator=generator, device=device)
        return TaskBatch(torch.cat([head.x, rest.x]), torch.cat([head.y, rest.y]))


# ---------------------------------------------------------------------- validation
def _int_arg(name: str, value, minimum: int = 1) -> int:
    return check_int(name, value, minimum)


def _check_args(model, nb_iterations, sample_task, perform_k_training_steps, k, epsilon,
                meta_batch_size, backend, generator, chunk_size) -> float:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model has no parameters to meta-learn")
    _int_arg("nb_iterations", nb_iterations)
    if not callable(sample_task):
        raise TypeError(f"sample_task must be callable (returning (x, y, loss_fct)), got {type(sample_task).__name__}")
    if perform_k_training_steps is not None and not callable(perform_k_training_steps):
        raise TypeError(f"perform_k_training_steps must be callable or None, got "
                        f"{type(perform_k_training_steps).__name__}")
    _int_arg("k", k)
    epsilon = check_float("epsilon", epsilon)
    _int_arg("meta_batch_size", meta_batch_size)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKEND_CHOICES)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _int_arg("chunk_size", chunk_size)
    return epsilon


def _reference_reason(any_shape: bool, task, kind) -> Optional[str]:
    """Why the fast paths cannot run the standard inner loop on this task (None when they can)."""
    x, y, loss_fct = task
    if kind is None:
        return (f"the task's loss_fct ({type(loss_fct).__name__}) is not nn.MSELoss() or "
                f"nn.CrossEntropyLoss() with default settings")
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


# ---------------------------------------------------------------------- the paths
def _reference_loop(model, nb_iterations, sample_task, inner, k, epsilon, meta_batch_size, first,
                    progress) -> None:
    """``reptile_fast.reference.reptile`` (the seed's loop), with ``meta_batch_size`` tasks per
    outer step averaged as ``Reptile.meta_step`` does."""
    pending = first
    for _ in tqdm(range(nb_iterations), disable=not progress):
        if meta_batch_size == 1:
            task = pending if pending is not None else sample_task()
            pending = None
            phi_tilde = inner(copy.deepcopy(model), task, k)
            with torch.no_grad():
                for p, g in zip(model.parameters(), phi_tilde):
                    p += epsilon * (g - p)
            continue
        adapted = []
        for _ in range(meta_batch_size):
            task = pending if pending is not None else sample_task()
            pending = None
            adapted.append([g.detach() for g in inner(copy.deepcopy(model), task, k)])
        with torch.no_grad():
            for j, p in enumerate(model.parameters()):
                p += epsilon * (torch.stack([a[j] for a in adapted]) - p).mean(0)


def _trainer_loop(trainer, source, nb_iterations, meta_batch_size, generator, indices, chunk_size,
                  progress) -> Dict:
    """``Reptile.meta_step`` per iteration, tasks and plans drawn ``chunk_size`` steps at a time."""
    T, S, B = meta_batch_size, trainer.inner_steps, trainer.inner_batch_size
    history = []
    t0 = time.perf_counter()
    done = 0
    with tqdm(total=nb_iterations, disable=not progress, desc="meta-train") as bar:
        while done < nb_iterations:
            m = min(chunk_size, nb_iterations - done)
            tasks = source.sample(m * T, generator=generator, device=trainer.device)
            if indices is None:
                plans = sample_indices(m * T, S, tasks.n_points, B, generator=generator, device=trainer.device)
            else:
                plans = indices[done:done + m].reshape(m * T, S, B).to(trainer.device)
            for i in range(m):
                metrics = trainer.meta_step(tasks[i * T:(i + 1) * T], plans[i * T:(i + 1) * T])
                history.append(metrics["loss"])
            done += m
            bar.update(m)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    train_s = time.perf_counter() - t0
    return {"loss": history, "compile_seconds": 0.0, "train_seconds": train_s,
            "ms_per_iteration": 1e3 * train_s / nb_iterations}


def reptile(model: nn.Module, nb_iterations: int, sample_task: Callable,
            perform_k_training_steps: Optional[Callable] = None, k: int = 1, epsilon: float = 0.1, *,
            meta_batch_size: int = 1, backend: str = "auto", progress: bool = True,
            generator: Optional[torch.Generator] = None, indices: Optional[torch.Tensor] = None,
            chunk_size: int = DEFAULT_CHUNK) -> Dict:
    """The seed's ``reptile(model, nb_iterations, sample_task, perform_k_training_steps, k,
    epsilon)``, fast: meta-trains ``model`` in place (see the module docstring for the paths).

    Args:
        model: an ``nn.Module`` (the seed's ``MLP``, any MLP, or any model the trainer runs).
        nb_iterations: outer steps.
        sample_task: ``() -> (x, y, loss_fct)``: x ``[N]`` (the seed) or ``[N, in]``; y ``[N]``,
            ``[N, out]`` or long labels ``[N]`` (with ``nn.CrossEntropyLoss()``).
        perform_k_training_steps: the inner loop ``(model, task, k) -> parameters``; None or the
            seed's runs the fast paths, anything else the reference loop (with a warning).
        k: epochs of inner training; ``k · N // batch_size`` SGD steps per task.
        epsilon: the outer step ε.
        meta_batch_size: tasks per outer step; their (φ̃_i − φ) are averaged.
        backend: "auto", "compiled", "fused", or a trainer backend ("reference", "torch", "triton").
        progress: show a tqdm bar (the seed always does).
        generator: draws the minibatch plans on the fast paths (default: the global RNG).
        indices: long ``[nb_iterations, meta_batch_size, steps, batch]``: the minibatch plans to use
            instead of drawing them (fast paths only), e.g. the seed's own randperm draws.
        chunk_size: meta-steps per compiled call / per draw of tasks and plans.

    Returns:
        A dict: ``path`` ("compiled", "fused", "trainer" or "reference"), ``backend``, ``mode``,
        ``reason`` (why the reference path ran), ``tasks`` (how tasks were drawn), ``inner_steps``, ``inner_batch_size``,
        ``compile_seconds``, ``train_seconds`` and ``ms_per_iteration`` (after compilation) and
        ``loss`` (mean inner-loop loss per iteration; empty on the reference path).  Seed
        scripts may ignore it.
    """
    epsilon = _check_args(model, nb_iterations, sample_task, perform_k_training_steps, k, epsilon,
                          meta_batch_size, backend, generator, chunk_size)
    batch, any_shape = _classify_inner_loop(perform_k_training_steps)
    first = sample_task()
    kind = None
    if batch is None:
        # A custom inner loop may take tasks of its own format: they are passed through unread.
        name = getattr(perform_k_training_steps, "__qualname__", type(perform_k_training_steps).__name__)
        reason = (f"perform_k_training_steps ({name}) is not the standard inner loop (the seed's "
                  f"perform_k_training_steps), so the fast paths cannot know what it computes")
    else:
        first = _check_task(first, 0)
        kind = _loss_kind(first[2])
        reason = _reference_reason(any_shape, first, kind)
    stats = {"iterations": nb_iterations, "meta_batch_size": meta_batch_size, "reason": reason,
             "mode": None, "fallback_reason": None}
    if reason is not None:
        if indices is not None:
            raise ValueError(f"indices feeds the fast paths' minibatch draws, but this call runs the "
                             f"reference loop, which draws its own: {reason}")
        warnings.warn(f"reptile_fast.reptile runs the reference loop (the seed's speed): {reason}",
                      ReferencePathWarning, stacklevel=2)
        inner = perform_k_training_steps if perform_k_training_steps is not None else standard_inner_loop
        t0 = time.perf_counter()
        _reference_loop(model, nb_iterations, sample_task, inner, k, epsilon, meta_batch_size, first, progress)
        train_s = time.perf_counter() - t0
        stats.update(path="reference", backend=None, loss=[], compile_seconds=0.0, train_seconds=train_s,
                     ms_per_iteration=1e3 * train_s / nb_iterations, inner_steps=None, inner_batch_size=None)
        return stats

    from .trainer import Reptile

    n_points = first[0].shape[0]
    steps = k * n_points // batch
    if steps < 1:
        raise ValueError(f"k * N // batch_size = {k} * {n_points} // {batch} = 0 inner steps: the model "
                         f"would never change; use k >= {math.ceil(batch / n_points)}")
    batch = min(batch, n_points)  # randperm(N)[:batch] holds all N points when N < batch
    if indices is not None:
        check_plan_shape(indices, (nb_iterations, meta_batch_size, steps, batch),
                         "[nb_iterations, meta_batch_size, steps, batch]")

    def make_trainer(name: str):
        return Reptile(model, inner_lr=SEED_INNER_LR, inner_steps=steps, inner_batch_size=batch,
                       outer_lr=epsilon, loss=kind, backend=name)

    path = "trainer"
    trainer = None
    # auto: the compiled program only at the seed's meta-batch 1, where eager PyTorch is
    # overhead-bound; larger meta-batches measured faster on the torch backend.
    if backend in ("compiled", "fused") or (backend == "auto" and meta_batch_size == 1):
        # The compiled path needs the trainer only for validation and the ε schedule.
        trainer = make_trainer("reference")
        try:
            check_compiled_supported(trainer)
            path = "fused" if backend == "fused" else "compiled"
        except UnsupportedModelError:
            if backend != "auto":
                raise
    if path == "trainer":
        trainer = make_trainer(backend)
    if is_seed_sample_task(sample_task) and kind == "mse" and first[0].shape == (50,):
        source = _SineSource(first)
        stats["tasks"] = "the seed's sample_task, drawn vectorised (reptile_fast.Sine)"
    else:
        source = _SampleTaskSource(sample_task, first, kind)
        stats["tasks"] = "sample_task() calls"
    if path == "trainer":
        result = _trainer_loop(trainer, source, nb_iterations, meta_batch_size, generator, indices,
                               chunk_size, progress)
        stats.update(backend=trainer.backend.name)
    else:
        result = compiled_fit(trainer, source, nb_iterations, meta_batch_size=meta_batch_size,
                              generator=generator, progress=progress, indices=indices,
                              chunk_size=chunk_size, mode="eager" if path == "fused" else DEFAULT_MODE)
        stats.update(backend=path)
    stats.update(result, path=path, inner_steps=steps, inner_batch_size=batch)
    return stats
