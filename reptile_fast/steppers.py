"""Steppers: one meta-step = a backend's inner loop + the outer update, behind one small protocol.

The training loop (``reptile_fast.loop``) draws ``m`` meta-steps' tasks and plans at a time —
``m = stepper.chunk`` — and hands them to ``stepper.run``.  Two implementations:

* ``EagerStepper``: per meta-step, ``backend.inner_loop`` (reference / torch / triton), the
  reducer (``core.local_mean``, or a collective across processes) and ``core.OuterUpdate``.
  Reads no tensor value on the host (non-finite steps are skipped on the device and reported by
  ``check``).  ``chunk = 1``: tasks and plans are drawn every meta-step.
* ``CompiledStepper``: the whole meta-step of a plain MLP on the CPU — every task's SGD inner
  loop and the interpolation update — as one compiled program over a chunk of meta-steps
  (``reptile_fast.compiled_step.MetaStepProgram``).  It checks finiteness once per chunk (a CPU
  program: there is no device queue to drain) and raises ``NonFiniteError`` naming the first bad
  meta-step, with φ as after the one before it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .backends.base import Backend, InnerConfig, UnsupportedModelError
from .core import NONFINITE_HINT, NonFiniteError, OuterUpdate, Reducer, all_finite, local_mean, per_task_deltas
from .losses import loss_name
from .mlp_math import FAST_LOSSES
from .mlp_spec import MLPSpec, cached_mlp_spec
from .tasks.base import TaskBatch
from .validation import check_int

__all__ = ["Stepper", "EagerStepper", "CompiledStepper", "check_compiled_supported", "gather_chunk",
           "DEFAULT_CHUNK", "CHUNK_MAX_TASKS"]

#: meta-steps per compiled call (and per draw of tasks / minibatch plans) on the compiled path
DEFAULT_CHUNK = 500
#: at most this many tasks per chunk of the compiled stepper: a chunk's draws are held at once
#: (a sine task with its plan keys: ~2.4 kB, so ~80 MB per chunk)
CHUNK_MAX_TASKS = 32768


class Stepper:
    """The protocol: ``run`` takes ``m`` meta-steps; ``check`` reports a non-finite one."""

    #: meta-steps the stepper takes per ``run`` call (and the loop draws at once)
    chunk: int = 1
    #: the name reported in stats and metrics ("eager" paths report their backend's name)
    name: str = "?"

    def run(self, tasks: TaskBatch, plans: torch.Tensor, eps: Sequence[float], first_iteration: int) -> torch.Tensor:
        """Take ``m = len(eps)`` meta-steps.

        Args:
            tasks: ``m · T`` tasks, meta-step-major (tasks ``k·T … k·T + T − 1`` are meta-step k's).
            plans: long ``[m · T, R, B]`` minibatch plans, in the same order.
            eps: the outer step of each meta-step.
            first_iteration: the 1-based number of the first of these meta-steps.

        Returns:
            The mean inner loss of each meta-step, ``[m]``, on the model's device (not read).
        """
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``NonFiniteError`` if a meta-step since the last check was skipped as non-finite."""


class RngMark:
    """The global RNG states a model's own random operations draw from (the CPU's, and the CUDA
    device's), taken before a call a fallback may rerun and put back before the rerun: backend
    torch draws a model's dropout masks under vmap before refusing a later operation, and the
    rerun must draw what the new backend alone would have drawn.  ~1 µs on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class EagerStepper(Stepper):
    """``backend.inner_loop`` + ``reducer`` + ``OuterUpdate``, one meta-step at a time.

    Args:
        backend: an inner-loop backend that supports ``model`` with ``config``.
        model: the meta-model; its parameters are φ and are updated in place.
        config: the inner loop's settings.
        outer_optimizer: optional ``torch.optim`` optimizer fed the pseudo-gradient.
        reducer: turns per-task deltas into means (default: ``core.local_mean``).
        fallback: ``UnsupportedModelError -> backend or None``: where the backend refuses the
            model only when it runs (``backend="auto"``'s torch under vmap), the backend to run
            this and every later meta-step on (None: the error is raised).  The global RNG is
            put back as before the refused call first (``RngMark``), so the rerun draws the same.
    """

    chunk = 1

    def __init__(self, backend: Backend, model: nn.Module, config: InnerConfig,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None, reducer: Optional[Reducer] = None,
                 fallback: Optional[Callable[[UnsupportedModelError], Optional[Backend]]] = None):
        self.backend, self.model, self.config, self.fallback = backend, model, config, fallback
        self.named = list(model.named_parameters())
        self.outer = OuterUpdate(self.named, outer_optimizer)
        self.reducer = reducer or local_mean
        self._checked_reducer = local_mean
        self.name = backend.name
        self.fallback_reason: Optional[str] = None  # why the stepper moved to another backend

    def step(self, tasks: TaskBatch, plan: torch.Tensor, eps, iteration: int) -> torch.Tensor:
        """One meta-step on ``T`` tasks with plan ``[T, R, B]``; returns the mean loss (0-dim)."""
        result = self.call_backend("inner_loop", self.model, tasks, plan, self.config)
        reduced = self.reducer(per_task_deltas(self.named, result), result.losses)
        if self.reducer is not self._checked_reducer:  # another reducer's first answer (metadata only)
            self._check_reduced(reduced)
            self._checked_reducer = self.reducer
        mean_deltas, mean_loss = reduced
        self.outer.apply(mean_deltas, mean_loss, eps, iteration)
        carried = getattr(self.backend, "carried", None)
        if carried is not None:  # adam_state="carried": its state moves on with φ only (one read)
            carried.commit(bool(self.outer.healthy))
        return mean_loss

    def call_backend(self, method: str, *args):
        """``self.backend.<method>(*args)``; where the backend refuses the model as it runs and
        ``fallback`` gives another, the call again on that one, which every later call uses."""
        mark = RngMark(self.named[0][1].device) if self.fallback is not None else None
        try:
            return getattr(self.backend, method)(*args)
        except UnsupportedModelError as exc:
            backend = self.fallback(exc) if mark is not None else None
            if backend is None:
                raise
            # (the refused call raised before φ changed: the same draws run on the new backend, and
            # the model's own random operations draw from the RNG as it was before the call)
            mark.restore()
            self.move_to(backend, str(exc))
            return getattr(backend, method)(*args)

    def move_to(self, backend: Backend, reason: str) -> None:
        """Run every later meta-step on ``backend`` (``reason``: why, in ``fit``'s stats as
        ``fallback_reason``); no further move (nor RNG mark) after it."""
        self.backend, self.name, self.fallback = backend, backend.name, None
        self.fallback_reason = reason

    def _check_reduced(self, reduced) -> None:
        """ValueError/TypeError unless ``reduced`` is ``(one tensor per parameter, shaped like it, a
        one-element loss)``: a reducer returning per-task rows failed deep inside the update."""
        if not isinstance(reduced, (tuple, list)) or len(reduced) != 2:
            raise TypeError(f"the reducer must return (mean_deltas, mean_loss), got {type(reduced).__name__}")
        deltas, loss = reduced
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"the reducer's mean loss must be a one-element tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        if not isinstance(deltas, (tuple, list)) or len(deltas) != len(self.named):
            raise ValueError(f"the reducer must return one mean delta per parameter ({len(self.named)}), got "
                             f"{len(deltas) if isinstance(deltas, (tuple, list)) else type(deltas).__name__}")
        for (name, p), d in zip(self.named, deltas):
            if not isinstance(d, torch.Tensor) or d.shape != p.shape or d.dtype != p.dtype or d.device != p.device:
                got = (f"{tuple(d.shape)} {d.dtype} on {d.device}" if isinstance(d, torch.Tensor)
                       else type(d).__name__)
                raise ValueError(f"the reducer's mean delta for {name} must be {tuple(p.shape)} {p.dtype} on "
                                 f"{p.device} (the parameter's), got {got}")

    def run(self, tasks, plans, eps, first_iteration):
        m = len(eps)
        if m < 1:  # (a ZeroDivisionError below)
            raise ValueError(f"run needs at least one meta-step's eps, got {m}")
        if m == 1:
            return self.step(tasks, plans, eps[0], first_iteration).reshape(1)
        T = tasks.n_tasks // m
        if T * m != tasks.n_tasks:  # the slices below would drop the remainder silently
            raise ValueError(f"{tasks.n_tasks} tasks do not split into {m} meta-steps: a sampler's "
                             f"draw(first_iteration, m) must return m * meta_batch_size tasks and plans")
        return torch.stack([self.step(tasks[k * T:(k + 1) * T], plans[k * T:(k + 1) * T], eps[k],
                                      first_iteration + k) for k in range(m)])

    def check(self) -> None:
        self.outer.check()


def check_compiled_supported(model: nn.Module, config: InnerConfig, device: torch.device,
                             outer_optimizer=None) -> MLPSpec:
    """The model's ``MLPSpec`` if the compiled stepper can run it; else ``UnsupportedModelError``
    saying why (a CPU MLP chain without buffers, SGD inner loop, plain Reptile,
    "mse"/"cross_entropy", no outer optimizer)."""
    if torch.device(device).type != "cpu":
        raise UnsupportedModelError(f"the compiled meta-step is the CPU path; the model is on {device}")
    if config.optimizer != "sgd":
        raise UnsupportedModelError(f"the compiled meta-step runs SGD inner loops, not {config.optimizer!r}")
    if config.algorithm != "reptile" or config.grad_weights is not None:
        raise UnsupportedModelError("the compiled meta-step runs plain Reptile (no FOMAML, no inner_grad_weights)")
    if loss_name(config.loss) not in FAST_LOSSES:
        raise UnsupportedModelError(f"the compiled meta-step supports losses {FAST_LOSSES}")
    if outer_optimizer is not None:
        raise UnsupportedModelError("the compiled meta-step runs the interpolation update, not an outer_optimizer")
    if len(list(model.buffers())):
        raise UnsupportedModelError("the compiled meta-step supports models without buffers")
    return cached_mlp_spec(model)


#: options of backend "compiled" (``Reptile(..., backend_options=...)``): see ``CompiledStepper``
COMPILED_OPTIONS = ("mode", "chunk")


def check_compiled_options(options: Optional[dict]) -> dict:
    """Backend "compiled"'s ``backend_options`` as a new dict; TypeError/ValueError naming an
    unknown option or a bad value."""
    from .compiled_step import MODES

    options = dict(options or {})
    unknown = sorted(set(options) - set(COMPILED_OPTIONS))
    if unknown:
        raise TypeError(f"backend 'compiled' does not accept options {unknown}; it takes {COMPILED_OPTIONS}")
    if "chunk" in options:
        options["chunk"] = check_int("chunk", options["chunk"])
    if options.get("mode") is not None and options["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {options['mode']!r}")
    return options


def gather_chunk(tasks: TaskBatch, plans: torch.Tensor, n_tasks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The minibatches of ``M`` meta-steps in the layout ``MetaStepProgram`` takes.

    Args:
        tasks: ``M · T`` tasks, meta-step-major (tasks ``m·T … m·T+T−1`` form meta-step ``m``).
        plans: long ``[M · T, S, B]``.
        n_tasks: ``T``.

    Returns:
        ``xs [M, S, T, B, *in]`` and ``ys [M, S, T, B, *out]`` (``[M, S, T, B]`` for labels).
    """
    rows = torch.arange(plans.shape[0], device=plans.device).view(-1, 1, 1)
    xs, ys = tasks.x[rows, plans], tasks.y[rows, plans]  # [M·T, S, B, ...]
    M = plans.shape[0] // n_tasks

    def layout(t):
        t = t.reshape(M, n_tasks, *t.shape[1:]).transpose(1, 2).contiguous()
        # .view gives canonical strides even on size-1 dims (the compiled program guards on them)
        return t.view(t.shape)
    return layout(xs), layout(ys)


class CompiledStepper(Stepper):
    """The whole meta-step of a plain MLP (SGD inner loops + interpolation update) compiled for
    chunks of ``chunk`` meta-steps (``reptile_fast.compiled_step``).

    Args:
        model: a CPU MLP that ``check_compiled_supported`` accepts; updated in place.
        config: the inner loop (SGD, "mse"/"cross_entropy").
        n_tasks, steps, batch: ``T`` tasks per meta-step, ``S`` inner steps, ``B`` points each.
        chunk: meta-steps per compiled call.
        mode: "native" (default: a C program compiled once and cached on disk), "scan", "step"
            or "eager" (the same maths without a compiler); see ``compiled_step``.  Each falls
            back along that order with a warning.
        announce: called with a message before a long compilation (e.g. ``print``).
    """

    name = "compiled"

    def __init__(self, model: nn.Module, config: InnerConfig, *, n_tasks: int, steps: int, batch: int,
                 chunk: int = DEFAULT_CHUNK, mode: Optional[str] = None,
                 announce: Optional[Callable[[str], None]] = None):
        from .compiled_step import DEFAULT_MODE, get_program

        spec = check_compiled_supported(model, config, next(model.parameters()).device)
        self.model, self.n_tasks, self.chunk, self.batch = model, n_tasks, chunk, batch
        self.dtype = next(model.parameters()).dtype
        names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
        self.live = [model.get_parameter(n) for n in names]
        self.program = get_program(spec, lr=config.lr, loss=loss_name(config.loss), steps=steps,
                                   n_tasks=n_tasks, batch=batch, dtype=self.dtype, mode=mode or DEFAULT_MODE)
        self.compile_seconds = 0.0
        self.announce = announce

    def prepare(self) -> "CompiledStepper":
        """Compile (or load from the disk cache) now, once per shape and process; the program says
        through ``announce`` when a long compile starts; ``compile_seconds`` records the time."""
        if not self.program._ready:
            t0 = time.perf_counter()
            self.program.prepare(progress=self.announce)
            self.compile_seconds = time.perf_counter() - t0
        return self

    @property
    def mode(self) -> str:
        return self.program.mode

    @property
    def fallback_reason(self) -> Optional[str]:
        return self.program.fallback_reason

    def run(self, tasks, plans, eps, first_iteration):
        if plans.shape[2] != self.batch:
            # the program's shapes are fixed when it is built: say so instead of failing inside it
            raise ValueError(f"the plans hold minibatches of {plans.shape[2]} points but this compiled "
                             f"meta-step was built for inner_batch_size={self.batch}")
        if tasks.n_tasks != len(eps) * self.n_tasks:
            # a sampler's draw that ignored m or the meta-batch failed inside the program ("eps must
            # have shape ...") or, for a multiple, ran other meta-steps than the loop counted
            raise ValueError(f"{len(eps)} meta-step(s) of {self.n_tasks} tasks (fit's meta_batch_size) need "
                             f"{len(eps) * self.n_tasks} tasks, got {tasks.n_tasks}: a sampler's "
                             f"draw(first_iteration, m) must return m * meta_batch_size tasks and plans")
        self.prepare()
        xs, ys = gather_chunk(tasks, plans, self.n_tasks)
        eps_t = torch.tensor(list(eps), dtype=self.dtype)
        new, losses = self.program(self.live, xs, ys, eps_t)
        # One read per chunk (a CPU program).
        if not self._finite(new, losses):
            self._raise_first_bad(xs, ys, eps_t, losses, first_iteration)
        with torch.no_grad():
            torch._foreach_copy_(self.live, new)
        return losses.mean(dim=(1, 2))

    @staticmethod
    def _finite(params, losses) -> bool:
        return bool(all_finite([losses, *params]))

    def _raise_first_bad(self, xs, ys, eps_t, losses, first_iteration: int):
        """Find the chunk's first non-finite meta-step, leave φ as after the one before it (the
        good prefix run again: the same program on the same draws gives the same bits) and raise
        ``NonFiniteError`` naming it, as the eager steppers do."""
        per_step = torch.isfinite(losses.reshape(losses.shape[0], -1)).all(dim=1)
        bad = int((~per_step).nonzero()[0]) if not bool(per_step.all()) else losses.shape[0] - 1
        while bad > 0:  # a finite loss may still be followed by a non-finite update: step back
            good, good_losses = self.program(self.live, xs[:bad], ys[:bad], eps_t[:bad])
            if self._finite(good, good_losses):
                with torch.no_grad():
                    torch._foreach_copy_(self.live, good)
                break
            bad -= 1
        it = first_iteration + bad
        raise NonFiniteError(
            f"meta-step {it}: non-finite inner loss or update (NaN/inf); the parameters were left as "
            f"they were after meta-step {it - 1} and no later meta-step was applied. {NONFINITE_HINT}",
            iteration=it)
