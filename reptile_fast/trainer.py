"""``Reptile``: the trainer's facade.  It validates once, picks the backend and the stepper, and
delegates: backends (``reptile_fast.backends``) run the inner loops, steppers
(``reptile_fast.steppers``) take meta-steps, ``reptile_fast.loop`` is the training loop."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .backends import InnerConfig, InnerResult, UnsupportedModelError, resolve_backend
from .backends.base import ALGORITHMS, INNER_OPTIMIZERS
from .backends.reference import CarriedOptimizerState, check_adam_state
from .compat import InputChecker
from .hyperparams import HyperParameters
from .core import NonFiniteError, Reducer, check_outer_optimizer_kind, check_outer_optimizer_lr
from .losses import resolve_loss
from .model_watch import check_followable, structure_key
from .loop import (default_log_every, Callback, CheckedDraws, FunctionCallback, HistoryCallback, ProgressCallback,
                   StreamSampler, TrainingLoop)
from .signals import TrainingInterrupted
from .steppers import (CHUNK_MAX_TASKS, DEFAULT_CHUNK, CompiledStepper, EagerStepper, check_compiled_options,
                       check_compiled_supported)
from .tasks.base import TaskBatch, _check_generator, draw_plan
from .trainer_state import load_trainer_state, trainer_hparams, trainer_state_dict
from .validation import (check_fit_args, check_float, check_inner_options, check_int, check_meta_model,
                         check_optimizer_storable, out_of_memory_message)

__all__ = ["Reptile", "NonFiniteError", "TrainingInterrupted"]


def _takes_batch(backend, model: nn.Module, batch_size: int) -> bool:
    """Whether ``backend`` runs a plan of ``batch_size`` points for ``model`` (asked without
    changing it: ``check_plan_size``)."""
    try:
        backend.check_plan_size(model, batch_size)
    except UnsupportedModelError:
        return False
    return True


_TRAINING_LOCK = threading.Lock()
#: id of a trainer, or of a parameter, that a running ``fit`` or ``meta_step`` updates -> "fit"/"meta_step"
_TRAINING: Dict[int, str] = {}


def _forget_claims_in_child() -> None:
    """A forked child trains its own copies of the models: the fits running in the parent (in
    other threads, or the one whose callback forked) do not train them there (QA90: a child forked
    from a fit callback, or by a process pool beside a fit in a thread, was refused its own
    meta_step or fit as "called from a fit callback, or from another thread")."""
    global _TRAINING_LOCK
    _TRAINING_LOCK = threading.Lock()  # (another thread may have held it at the fork)
    _TRAINING.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_claims_in_child)


class _ModelClaim:
    """Marks ``trainer`` and its model's parameters as being trained until ``release()`` (or the
    end of a ``with`` block); raises ``ValueError`` if a running ``fit``/``meta_step`` already
    trains either.  Two fits of one trainer, or of two trainers sharing a model, in two threads
    updated φ in place at once: one's result silently replaced the other's, or they interleaved
    (nondeterministic), each reporting its own iterations; a ``fit`` or ``meta_step`` called from a
    ``fit`` callback took meta-steps the running loop did not count (QA89)."""

    def __init__(self, trainer: "Reptile", what: str):
        self.keys = [id(trainer)] + [id(p) for p in trainer.model.parameters()]
        with _TRAINING_LOCK:
            running = next((_TRAINING[k] for k in self.keys if k in _TRAINING), None)
            if running is not None:
                raise ValueError(f"{what} cannot run while a {running} trains this model (called from a fit "
                                 f"callback, or from another thread): a Reptile updates its model in place, so "
                                 f"give each concurrent training its own model (copy.deepcopy) and its own Reptile")
            for k in self.keys:
                _TRAINING[k] = what
        self.held = True

    def release(self) -> None:
        if self.held:
            with _TRAINING_LOCK:
                for k in self.keys:
                    _TRAINING.pop(k, None)
            self.held = False

    def __enter__(self) -> "_ModelClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Reptile(HyperParameters):
    """Reptile meta-training of ``model`` in place (Nichol, Achiam, Schulman 2018).

    One meta-step: every task in the meta-batch starts from φ (the model's parameters) and takes
    ``inner_steps`` optimizer steps on minibatches of ``inner_batch_size`` of its points, giving
    φ̃_i; then ``φ ← φ + ε · mean_i(φ̃_i − φ)``.  With one task, SGD and the defaults this is
    exactly one iteration of the seed's ``reptile()``.

    Args:
        model: any ``nn.Module``; updated in place.  Its buffers (e.g. BatchNorm running
            statistics) are not meta-learned: as in the seed, each task trains a copy.
        inner_lr, inner_steps, inner_batch_size: the inner loop (seed: 0.02, 5, 10).
        outer_lr: ε, the interpolation step (seed: 0.1); unused with ``outer_optimizer``, whose lr
            is the outer step (and is what ``meta_step``/``fit`` report as "outer_lr").
        outer_lr_final: if set, ε anneals linearly from ``outer_lr`` to this over ``fit``'s
            iterations (the paper's schedule).
        loss: "mse", "cross_entropy" or a callable ``(prediction, target) -> scalar``.
        backend: "auto", "reference", "torch", "triton" (inner-loop backends), or "compiled":
            the whole meta-step of a CPU MLP as one compiled program (``adapt``/``evaluate`` then
            use "torch").
        inner_optimizer: "sgd" or "adam" (β1 = 0 by default, fresh state per task).
        algorithm: "reptile" or "fomaml" (meta-gradient on a final, separate minibatch).
        inner_grad_weights: ``(w_1, …, w_k)``, k = inner_steps: the outer direction becomes
            Σ w_i g_i of the inner gradients (paper §6.2).
        outer_optimizer: a ``torch.optim.Optimizer`` over the model's parameters, fed the mean
            pseudo-gradient (φ − φ̃ for Reptile) instead of the interpolation update.
        backend_options: keyword arguments for the named backend, e.g. ``{"precision": "tf32"}``
            for "triton", ``{"mode": "eager", "chunk": 100}`` for "compiled" (not with "auto").
        adam_state: with ``inner_optimizer="adam"``: "fresh" (each task's inner loop starts from a
            new Adam state, so tasks are independent and run batched) or "carried" (one Adam state
            carried from task to task and meta-step to meta-step, as the official supervised-reptile
            code keeps one optimizer; ``adapt``/``evaluate`` start every task from the state
            training left and keep it unchanged, as its ``evaluate`` does).  "carried" runs the
            tasks one after another, on backend "reference" only ("auto" picks it; another
            named backend is refused); its state is checkpointed.
        minibatches: how the plans this trainer draws (``fit``, ``meta_step``, ``adapt``,
            ``evaluate`` without ``indices``) pick each inner step's points: "fresh" (the seed:
            ``sample_indices``, distinct points drawn anew every step) or "epochs" (the official
            supervised-reptile code: each task's points shuffled and read in order, reshuffled
            when used up: ``epoch_indices``).
    """

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.02, inner_steps: int = 5,
                 inner_batch_size: int = 10, outer_lr: float = 0.1,
                 outer_lr_final: Optional[float] = None, loss: Union[str, Callable] = "mse",
                 backend: str = "auto", inner_optimizer: str = "sgd", algorithm: str = "reptile",
                 inner_grad_weights: Optional[Sequence[float]] = None,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None,
                 adam_betas=(0.0, 0.999), backend_options: Optional[dict] = None,
                 minibatches: str = "fresh", adam_state: str = "fresh"):
        params, self.device, self.dtype = check_meta_model(model)
        # numpy's str_ names as the plain strs they equal: hparams() and checkpoints hold them, and a
        # checkpoint refused np.str_ after the whole fit had run (QA47)
        # (str.__str__: the string's own characters, also for a str-valued Enum, whose str() is its name)
        loss, backend, inner_optimizer, algorithm = (str.__str__(v) if isinstance(v, str) else v
                                                     for v in (loss, backend, inner_optimizer, algorithm))
        self.model = model
        inner_lr = self._checked_inner_lr(inner_lr)
        self._inner_steps = check_int("inner_steps", inner_steps)
        self.inner_batch_size = inner_batch_size
        self.minibatches = minibatches
        self.outer_lr = outer_lr
        if outer_lr_final is not None:
            outer_lr_final = check_float("outer_lr_final", outer_lr_final, allow_zero=True)
        resolve_loss(loss)
        self._loss = loss
        weights, betas = check_inner_options(inner_steps=self.inner_steps, algorithm=algorithm,
                                             inner_optimizer=inner_optimizer, inner_grad_weights=inner_grad_weights,
                                             adam_betas=adam_betas, algorithms=ALGORITHMS, optimizers=INNER_OPTIMIZERS)
        if outer_optimizer is not None:
            if not isinstance(outer_optimizer, torch.optim.Optimizer):
                raise TypeError(f"outer_optimizer must be a torch.optim.Optimizer, got {type(outer_optimizer).__name__}")
            if {id(p) for g in outer_optimizer.param_groups for p in g["params"]} != {id(p) for p in params}:
                raise ValueError("outer_optimizer must optimise exactly the model's parameters")
            check_outer_optimizer_lr(outer_optimizer, self.dtype)
            check_outer_optimizer_kind(outer_optimizer)
            if outer_lr_final is not None:
                raise ValueError("outer_lr_final anneals the interpolation step; with outer_optimizer "
                                 "use a torch.optim.lr_scheduler instead")
        self._outer_optimizer = outer_optimizer
        self.outer_lr_final = outer_lr_final
        self.config = InnerConfig(lr=inner_lr, optimizer=inner_optimizer, loss=loss, algorithm=algorithm,
                                  grad_weights=weights, adam_betas=betas)
        info = torch.finfo(self.dtype)
        # the outer direction Σ w_i g_i multiplies each weight as a Python number, in at least float32
        # (a float16 model's product too): 1e39 became inf there for float32 parameters, and the
        # NonFiniteError that followed advised lowering inner_lr / outer_lr
        top = torch.finfo(torch.promote_types(self.dtype, torch.float32)).max
        if weights is not None and any(abs(w) > top for w in weights):
            raise ValueError(f"inner_grad_weights must be at most {top:.4g} in magnitude (the largest number "
                             f"the outer direction is formed with), got {max(weights, key=abs)!r}")
        if inner_optimizer == "adam" and self.config.adam_eps <= info.smallest_normal * info.eps / 2:
            # every backend adds eps in the parameters' dtype: 1e-8 is 0 in float16, and the first
            # step divided 0 by 0 where a gradient element was 0 (a NonFiniteError at meta-step 1
            # advising lower rates, which cannot help)
            raise ValueError(f"inner_optimizer='adam' cannot train {self.dtype} parameters: its eps "
                             f"({self.config.adam_eps:g}) is 0 in {self.dtype}, so each step divides by zero where a "
                             f"gradient element is 0; use bfloat16 or float32 parameters, or inner_optimizer='sgd'")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend_options is not None and not isinstance(backend_options, dict):
            raise TypeError(f"backend_options must be a dict, got {type(backend_options).__name__}")
        if isinstance(adam_state, str) and adam_state == "carried" and backend == "auto":
            backend = "reference"  # the one backend that carries it: auto's only pick
        self.backend_name = backend
        self._adam_state = check_adam_state(adam_state, inner_optimizer, backend)
        #: the inner Adam's state carried from task to task (adam_state="carried"), or None
        self._carried = CarriedOptimizerState() if self._adam_state == "carried" else None
        self.compiled_options: Optional[dict] = None
        if backend == "compiled":
            self.compiled_options = check_compiled_options(backend_options)
            check_compiled_supported(model, self.config, self.device, outer_optimizer)
            backend, backend_options = "torch", None
        self._backend_options = backend_options
        backend = resolve_backend(backend, model, self.device, self.config, backend_options,
                                  batch_size=self.inner_batch_size)
        self.checker = InputChecker(model, loss, self.device, self.dtype)
        self._auto_moved = False  # auto moved to reference (_auto_fallback): it stays there
        self._plan_home = None  # auto's backend while a user's plan runs on another (_follow_plan)
        self._use_backend(backend)
        self._structure = structure_key(model)
        self.iteration = 0
        self._fitting = False  # True while fit's loop runs (the inner loop's settings are then fixed)
        self.total_iterations: Optional[int] = None
        self.last_fit_stats: Optional[dict] = None
        #: the meta-batch of the last ``fit`` that drew its own tasks (recorded in checkpoints)
        self.meta_batch_size: Optional[int] = None
        #: ... and the chunk size its ``draw_chunks`` draws depended on (None: drawn step by step)
        self.draw_chunk: Optional[int] = None

    def _use_backend(self, backend) -> None:
        """Run the inner loops on ``backend`` (built or swapped in between fits) from now on."""
        self.backend = backend
        if self._carried is not None:  # (backend "reference", the one adam_state="carried" runs on)
            backend.carried = self._carried
        if hasattr(backend, "validate") and "validate" not in (self._backend_options or {}):
            # The trainer checks plans and labels where they enter (InputChecker, checked samplers):
            # a backend's own per-call check would read the device every meta-step.
            backend.validate = False
        # (only auto's torch can move: no RNG mark per meta-step on any other backend)
        movable = self.backend_name == "auto" and backend.name == "torch"
        self._eager = EagerStepper(backend, self.model, self.config, self.outer_optimizer,
                                   fallback=self._auto_fallback if movable else None)
        # a backend that fuses the outer update too (triton with {"fused": True}) brings its own
        # stepper; asked for by the environment only (a preference), it gives way where it cannot run
        self._make_fused()
        self._compiled: Dict[tuple, CompiledStepper] = {}

    def _auto_fallback(self, exc: UnsupportedModelError):
        """Under ``backend="auto"``: backend reference, in use from now on, when backend torch's
        vmap refuses an operation of the model as it runs (``.item()``, a data-dependent ``if``,
        boolean-mask indexing, a reentrant checkpoint: seen only in the forward, after auto chose);
        None otherwise (the error stands).  The refused call had not changed φ."""
        from .backends.torch_func import vmap_refused

        cause = exc.__cause__
        if (self.backend_name != "auto" or self.backend.name != "torch" or not isinstance(cause, RuntimeError)
                or not vmap_refused(cause)):
            return None
        backend = resolve_backend("reference", self.model, self.device, self.config,
                                  batch_size=self.inner_batch_size)
        warnings.warn(f"backend='auto' moves to backend 'reference' for this model (the seed's loop, "
                      f"task by task): {exc}", UserWarning, stacklevel=4)
        if hasattr(backend, "validate") and "validate" not in (self._backend_options or {}):
            backend.validate = False  # as _use_backend: the trainer checks inputs where they enter
        self.backend, self._auto_moved = backend, True
        return backend

    def _inner(self, method: str, *args):
        """``self.backend.<method>(*args)``, with auto's move to reference (``_auto_fallback``),
        through the eager stepper, which then runs the meta-steps on reference too."""
        return self._eager.call_backend(method, *args)

    def _follow_batch_size(self, batch_size: int) -> None:
        """A new ``inner_batch_size``: a named backend that cannot take it refuses it
        (``UnsupportedModelError``); under ``backend="auto"`` the trainer moves to the backend
        ``auto`` picks for it (kernel v2 takes at most 32 points: torch beyond), as a trainer built
        with it would."""
        if self.backend_name != "auto" or self._auto_moved:
            # (after auto's move to reference: torch would refuse the model again, warning again)
            self.backend.check_batch_size(self.model, batch_size)
            self._follow_fused()
            return
        backend = resolve_backend("auto", self.model, self.device, self.config, batch_size=batch_size)
        if type(backend) is type(self.backend):
            # keep the trainer's own (its kernel, graphs, fused stepper) where it takes the batch:
            # the class alone said nothing (kernel v2 kept for 40 points when auto now picks v1)
            try:
                self.backend.check_batch_size(self.model, batch_size)
                # auto's pick for the new size: a backend a plan moved away from (_follow_plan)
                # no longer is the trainer's own (it may not take the new size)
                self._plan_home = None
                self._follow_fused()
                return
            except UnsupportedModelError:
                pass
        self.check_finite()  # report a pending non-finite step of the old steppers first
        self._plan_home = None
        self._use_backend(backend)

    def _follow_plan(self, batch_size: int) -> None:
        """A plan of ``batch_size`` points for ``meta_step``/``adapt``/``fit``: under ``backend="auto"``,
        where the trainer's backend cannot take it (kernel v2: at most 32 points), the call runs on
        the backend ``auto`` picks for that size, and so do the next ones until a plan the first
        backend takes — a user's, or one drawn at ``inner_batch_size`` (``fit``'s) — brings it back
        (a named backend refuses the plan with its ``UnsupportedModelError``).  No device read
        unless the backend changes."""
        home = self._plan_home
        if home is None:
            if (batch_size == self.inner_batch_size or self.backend_name != "auto" or self._auto_moved
                    or _takes_batch(self.backend, self.model, batch_size)):
                return
            backend = resolve_backend("auto", self.model, self.device, self.config, batch_size=batch_size)
            self.check_finite()  # report a pending non-finite step of the old steppers first
            home = self.backend
            self._use_backend(backend)
            self._plan_home = home
        elif self._auto_moved:  # auto's move to reference: it stays there
            self._plan_home = None
        elif batch_size == self.inner_batch_size or _takes_batch(home, self.model, batch_size):
            self.check_finite()
            self._plan_home = None
            self._use_backend(home)

    def _follow_fused(self) -> None:
        """After the backend took a new inner batch size: its fused stepper comes or goes with it
        (triton under kernel "auto" with the environment's fused preference: v1 beyond kernel v2's
        32 points has none, v2 within them again)."""
        if bool(getattr(self.backend, "fused", False)) == self._fused_wanted:
            return
        try:
            self.check_finite()  # report a pending non-finite step of the old steppers first
        except NonFiniteError:
            # the setting is refused: the backend goes back to the old size's kernel
            self.backend.check_batch_size(self.model, self.inner_batch_size)
            raise
        self._make_fused()

    def _set_config(self, config: InnerConfig) -> None:
        """Use ``config`` (and the current inner_steps) from the next meta-step on."""
        if self._fused is not None:
            self.check_finite()  # the fused stepper is rebuilt: report its pending non-finite step first
        self.config = config
        self._eager.config = config
        self._compiled = {}
        self._make_fused()

    # ------------------------------------------------------------------ steppers
    def _make_fused(self) -> None:
        self._fused = None
        # what the backend asked for when it was built (a preference it gave way on included)
        self._fused_wanted = bool(getattr(self.backend, "fused", False))
        if self._fused_wanted:
            try:
                self._fused = self.backend.make_stepper(self.model, self.config, self.outer_optimizer)
            except UnsupportedModelError:
                if getattr(self.backend, "fused_explicit", True):
                    raise

    @property
    def adam_state(self) -> str:
        """"fresh" or "carried" (read-only: see the constructor)."""
        return self._adam_state

    @property
    def carried_adam_state(self) -> Optional[dict]:
        """The carried inner Adam's ``state_dict()`` (``adam_state="carried"``; None before the first
        task, and with "fresh").  A reference, like ``state_dict``'s tensors."""
        return None if self._carried is None else self._carried.state

    def _check_structure(self) -> None:
        """Follow a layer swapped in the model since the steppers were built (an activation: the
        compiled and fused programs are rebuilt for it, or refuse a hook they cannot run); refuse
        replaced, moved or cast parameters (``model_watch``).  No device read unless it changed."""
        key = structure_key(self.model)
        if key == self._structure:
            return
        check_followable(self._structure, key)
        self.check_finite()  # report a pending non-finite step of the old steppers first
        if self.compiled_options is not None:
            check_compiled_supported(self.model, self.config, self.device, self.outer_optimizer)
        self._compiled = {}
        self._make_fused()
        self.checker = InputChecker(self.model, self.loss, self.device, self.dtype)
        self._structure = key

    def _check_params_kept(self) -> None:
        """``adapt``/``evaluate``: the ``ValueError`` of ``meta_step``/``fit`` for parameters
        replaced, moved or cast since construction (they failed deep inside torch or a kernel
        launcher, or adapted parameters the trainer does not own).  A swapped parameter-free layer
        or another train/eval mode needs nothing rebuilt here: the backends read the model as it is."""
        key = structure_key(self.model)
        if key != self._structure:
            check_followable(self._structure, key)

    def plan_rows(self, steps: int) -> int:
        """Rows of a minibatch plan for ``steps`` inner steps (FOMAML adds its meta-gradient's batch)."""
        return steps + 1 if self.config.algorithm == "fomaml" else steps

    def stepper(self, n_tasks: int, *, chunk: Optional[int] = None, announce=None, batch: Optional[int] = None):
        """The stepper for meta-batches of ``n_tasks``: the compiled program (backend "compiled",
        ``chunk`` meta-steps per call — cut to its largest divisor that keeps a chunk within
        ``CHUNK_MAX_TASKS`` tasks —, minibatches of ``batch`` points, default ``inner_batch_size``),
        the fused one (triton ``{"fused": True}``; with CUDA graphs its chunk is made a divisor of
        ``chunk``) or the eager one (the backend's inner loop)."""
        if self.compiled_options is None:
            fused = self._fused
            takes = getattr(fused, "takes_batch", None)
            if (takes is not None and batch is not None and not getattr(self.backend, "fused_explicit", True)
                    and not takes(batch)):
                # the environment's fused preference gives way for a plan kernel v2 cannot run
                # (under kernel "auto" the eager stepper runs it on v1)
                fused = None
            # the fused stepper draws chunks when it replays CUDA graphs (boundaries on chunk's multiples)
            return fused.set_chunk(n_tasks, chunk) if fused is not None else self._eager
        opts = self.compiled_options
        chunk = chunk or opts.get("chunk", DEFAULT_CHUNK)
        if chunk * n_tasks > CHUNK_MAX_TASKS:  # cut to a divisor: boundaries stay on chunk's multiples
            chunk = next(d for d in range(max(1, CHUNK_MAX_TASKS // n_tasks), 0, -1) if chunk % d == 0)
        batch = batch or self.inner_batch_size
        key = (n_tasks, chunk, batch)
        if key not in self._compiled:
            self._compiled[key] = CompiledStepper(self.model, self.config, n_tasks=n_tasks, steps=self.inner_steps,
                                                  batch=batch, chunk=chunk,
                                                  mode=opts.get("mode"), announce=announce)
        self._compiled[key].announce = announce
        return self._compiled[key]

    def check_finite(self) -> None:
        """Raise ``NonFiniteError`` if a meta-step since the last check was not finite (it and
        every later one were skipped: φ and ``iteration`` are as after the meta-step before it).
        Reads one flag from the device; ``fit`` calls it at every read."""
        try:
            for stepper in filter(None, (self._eager, self._fused)):
                stepper.check()
        except NonFiniteError as exc:
            self.iteration = exc.iteration - 1
            raise

    # ------------------------------------------------------------------ schedule
    def outer_lr_at(self, iteration: int, total: Optional[int] = None) -> float:
        """ε at ``iteration`` of ``total``: linear from ``outer_lr`` to ``outer_lr_final``.

        With an ``outer_optimizer`` the outer step is the optimizer's: its first param group's
        ``lr`` now (what ``meta_step`` and ``fit`` report as "outer_lr"; ``outer_lr`` is unused)."""
        if self.outer_optimizer is not None:
            # reported the unused outer_lr before (QA46); SGD(lr) makes exactly ε = lr's update
            lr = self.outer_optimizer.param_groups[0]["lr"]
            if isinstance(lr, torch.Tensor):  # a tensor lr: a number when that reads no device
                return float(lr) if lr.device.type == "cpu" else lr.detach().clone()
            return float(lr)
        total = total if total is not None else self.total_iterations
        # a flat schedule is ε itself (frac·ε + (1 − frac)·ε rounds away from ε at some fractions,
        # which made the result depend on the total: QA45)
        if self.outer_lr_final is None or not total or self.outer_lr_final == self.outer_lr:
            return self.outer_lr
        frac = min(max(iteration / total, 0.0), 1.0)
        return frac * self.outer_lr_final + (1 - frac) * self.outer_lr

    # ------------------------------------------------------------------ training
    def meta_step(self, tasks: TaskBatch, indices: Optional[torch.Tensor] = None, *,
                  generator: Optional[torch.Generator] = None, outer_lr: Optional[float] = None) -> Dict[str, Any]:
        """One outer update whose meta-batch is ``tasks`` (``T`` tasks on the model's device).

        ``indices``: long ``[T, inner_steps, B]`` plan (``inner_steps + 1`` rows for FOMAML),
        drawn from ``generator`` as ``minibatches`` says (``sample_indices`` for "fresh") when
        None.  ``outer_lr``: ε for this step (default: the schedule's; not with an
        ``outer_optimizer``, whose lr is the step).  Returns ``{"loss": mean inner-loop minibatch
        loss as a 0-dim tensor, "outer_lr": ε, "iteration": i}``.  Reads no tensor value on the host once
        a task shape has been seen (integer ids for an ``nn.Embedding`` excepted: their range is
        read every call): a non-finite step is skipped on the device and reported by
        ``check_finite`` (``fit`` does it at its reads).
        """
        with _ModelClaim(self, "meta_step"):
            self._check_structure()
            self.checker.tasks(tasks, self.inner_batch_size if indices is None else 1)
            rows = self.plan_rows(self.inner_steps)
            if indices is None:
                indices = draw_plan(self.minibatches, tasks.n_tasks, rows, tasks.n_points, self.inner_batch_size,
                                    generator=generator, device=self.device)
            else:
                indices = self.checker.indices(indices, tasks, rows)
            self._follow_plan(indices.shape[2])
            if outer_lr is not None and self.outer_optimizer is not None:
                # it was accepted, ignored, and returned as the step taken (QA46)
                raise ValueError("meta_step's outer_lr sets the interpolation step ε, which an outer_optimizer "
                                 "replaces: set the optimizer's lr (its param_groups) instead")
            eps = self.outer_lr_at(self.iteration) if outer_lr is None else \
                self._nonzero_in_dtype("outer_lr", check_float("outer_lr", outer_lr))
            # a user's plan may use another minibatch size than inner_batch_size, as on every backend
            stepper = self.stepper(tasks.n_tasks, chunk=1, batch=indices.shape[2])
            loss = stepper.run(tasks, indices, [eps], self.iteration + 1)[0]
            self.iteration += 1
            return {"loss": loss, "outer_lr": eps, "iteration": self.iteration}

    def fit(self, task_distribution, iterations: int, *, meta_batch_size: int = 1,
            generator: Optional[torch.Generator] = None, progress: bool = True,
            callback: Optional[Callable[[int, Dict[str, Any]], None]] = None,
            checkpoint_dir: Optional[Union[str, os.PathLike]] = None, checkpoint_every: Optional[int] = None,
            resume_from: Optional[Union[str, os.PathLike]] = None,
            checkpoint_extra: Optional[Mapping[str, Any]] = None, handle_signals: bool = True,
            log_every: Optional[int] = None, sampler=None, reducer: Optional[Reducer] = None,
            callbacks: Sequence[Callback] = (), draw_chunks: bool = False,
            _folder_held: bool = False) -> Dict[str, list]:
        """Meta-train until ``iterations`` meta-steps in all, ``meta_batch_size`` tasks each.

        Tasks come from ``task_distribution.sample(meta_batch_size, generator=..., device=...)``
        and plans as ``minibatches`` says (``sample_indices`` for "fresh", ``epoch_indices`` for
        "epochs") with the same generator (the global RNG when None),
        meta-step by meta-step, so every backend trains on the same draws for a given generator
        — also backend "compiled" and triton's fused graphs, which run chunks of meta-steps
        (``checkpoint_every``, else their ``chunk`` option).  ``draw_chunks=True`` lets them draw
        a chunk's tasks and plans in one call each instead: faster at small meta-batches (for a
        task distribution without ``sample_steps``, much faster), the same distribution, but
        other draws than the other backends' (and than another chunk size's); the drop-in (and
        the CLI sine job on CUDA) use it.  Continues from ``self.iteration`` (a restored trainer
        resumes).  Returns ``{"loss": [...]}``: every meta-step's mean inner loss, preceded by
        the checkpoint's when resuming.  ``last_fit_stats`` holds the timings.

        Device values (losses, finiteness) are read every ``log_every`` meta-steps (None, the
        default: 100, or 10 chunks when the stepper replays CUDA graphs -- triton's fused stepper
        on CUDA -- as a read idles the GPU while the host draws the next chunk), at
        checkpoints and at the end — and after every meta-step while a ``callback(iteration,
        {"loss", "outer_lr", "iteration"})`` is given, as it is called after each.  A non-finite meta-step
        raises ``NonFiniteError`` at the next read naming it; φ and ``iteration`` are then as
        after the meta-step before it and the last checkpoint is left as it was.

        Checkpoints and exact resume:
            checkpoint_dir: write ``checkpoint_dir/checkpoint.pt`` (``reptile_fast.checkpoint``)
                at the end, on SIGINT/SIGTERM, and every ``checkpoint_every`` meta-steps if set.
            resume_from: a checkpoint file or directory (or ``load_checkpoint``'s dict): restore
                φ, the outer optimizer, the iteration, the loss history and every RNG
                (``generator``'s included) first, so that the run ends with exactly the
                parameters of an uninterrupted one.
            checkpoint_extra: the caller's data stored in every checkpoint (``"extra"``).
            handle_signals: SIGINT (Ctrl-C) and, with ``checkpoint_dir``, SIGTERM (main thread
                only) finish the current chunk, write a checkpoint (with ``checkpoint_dir``) and
                raise ``TrainingInterrupted`` (a ``KeyboardInterrupt``), with φ and ``iteration``
                as after that chunk; a second signal stops at once.

        Extension points (the distributed trainer uses them): ``sampler`` (a ``loop.Sampler``
        drawing each meta-step's tasks and plans), ``reducer`` (``core.Reducer``: per-task
        updates to means, eager steppers only), ``callbacks`` (more ``loop.Callback`` objects).
        """
        from .callbacks import CheckpointCallback, ModelWatchCallback, SignalCallback, resume_for_fit
        from .checkpoint import (CHECKPOINT_NAME, CheckpointReplacedWarning, prepare_checkpoint_directory,
                                 directory_lock, remove_stale_temporaries)
        from .compiled_step import single_thread
        from .signals import DEFAULT_SIGNALS, DeferredSignals

        self._check_structure()
        check_fit_args(task_distribution, iterations, meta_batch_size=meta_batch_size, generator=generator,
                       callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                       checkpoint_extra=checkpoint_extra, log_every=log_every, sampler=sampler,
                       draw_chunks=draw_chunks, reducer=reducer, callbacks=callbacks, progress=progress,
                       handle_signals=handle_signals)
        # numpy integers pass the checks; plain ints from here on (the checkpoint stores some of them)
        iterations, meta_batch_size = int(iterations), int(meta_batch_size)
        log_every = None if log_every is None else int(log_every)
        checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
        # refused here, before anything changes, while another fit or meta_step trains this model
        claim = _ModelClaim(self, "fit")
        try:
            self._follow_plan(self.inner_batch_size)  # back from a user's plan auto ran elsewhere
            fused_demanded = self._fused is not None and getattr(self.backend, "fused_explicit", True)
            if reducer is not None and (self.compiled_options is not None or fused_demanded):
                raise ValueError(f"backend {self.backend_name!r} applies its own outer update in one process (the "
                                 f"compiled program, or triton's {{'fused': True}}); a reducer (distributed_fit "
                                 f"across processes) needs an eager backend: auto, torch, reference, or triton "
                                 f"without 'fused'")
            # Paths are checked before anything changes, so a typo costs nothing.
            ckpt_dir = None if checkpoint_dir is None else prepare_checkpoint_directory(checkpoint_dir,
                                                                                        "checkpoint_dir")
            # the folder is this run's from here: another run saving there is refused before anything of
            # this trainer changes (QA72, QA73); distributed_fit holds it for rank 0 already
            held = (directory_lock(ckpt_dir) if ckpt_dir is not None and not _folder_held
                    else contextlib.nullcontext())
        except BaseException:
            claim.release()
            raise
        with claim, held:
            if ckpt_dir is not None:
                remove_stale_temporaries(ckpt_dir)  # left by a run killed in the middle of a save
            if ckpt_dir is not None:
                check_optimizer_storable(self.outer_optimizer)
                if resume_from is None and self.iteration == 0 and (ckpt_dir / CHECKPOINT_NAME).is_file():
                    # another run's checkpoint: after two saves neither it nor checkpoint.prev.pt is left
                    warnings.warn(CheckpointReplacedWarning(
                        f"checkpoint_dir {ckpt_dir} already holds a checkpoint ({CHECKPOINT_NAME}) and this fit starts "
                        f"a new run (no resume_from): its saves replace it, and the one after keeps none of it; "
                        f"pass resume_from={str(ckpt_dir)!r} to continue that run, or another checkpoint_dir"),
                        stacklevel=2)
            history, resumed_latest, saved = [], False, {}
            if resume_from is not None:
                history, resumed_latest, saved = resume_for_fit(
                    self, resume_from, generator, iterations, ckpt_dir,
                    meta_batch_size=meta_batch_size if sampler is None else None, one_stream=sampler is None)
                # (a checkpoint beyond ``iterations`` is refused inside, before anything is restored)
            elif self.iteration >= iterations:
                raise ValueError(f"iterations={iterations} is the total number of meta-steps, and this trainer has "
                                 f"already taken {self.iteration}; pass a larger total to train further")
            self.total_iterations = iterations
            if sampler is None:
                self.meta_batch_size = meta_batch_size

            announce = (lambda msg: print(f"reptile_fast: {msg}", file=sys.stderr, flush=True)) if progress else None
            stepper = self.stepper(meta_batch_size, chunk=checkpoint_every, announce=announce)
            if reducer is not None and stepper is self._fused:
                stepper = self._eager  # the environment's fused preference: a reducer needs the eager stepper
            # the chunk size whose draws a draw_chunks run makes (None: step by step, as chunks of 1 draw)
            draw_chunk = stepper.chunk if draw_chunks and stepper.chunk > 1 else None
            self.draw_chunk = draw_chunk
            if "draw_chunk" in saved and saved["draw_chunk"] != draw_chunk and self.iteration < iterations:
                def drawn(chunk):
                    return "step by step" if chunk is None else f"in chunks of {chunk} meta-steps (draw_chunks=True)"
                warnings.warn(f"the checkpoint's run drew its tasks and plans {drawn(saved['draw_chunk'])}, this fit "
                              f"{drawn(draw_chunk)}: other draws, so the result will differ from an uninterrupted run "
                              f"(resume with the same draw_chunks and checkpoint_every)", stacklevel=2)
            elif (resume_from is not None and draw_chunks and self.iteration % stepper.chunk
                    and self.iteration < iterations):
                # chunk-drawn runs draw [c·j, c·(j+1)) at once: a run ended inside one of those chunks
                # (its total was not a multiple of c) and extended drew that chunk's first part apart
                warnings.warn(f"the checkpoint's run ended at meta-step {self.iteration}, inside a chunk of "
                              f"{stepper.chunk} meta-steps whose tasks and plans this fit draws at once "
                              f"(draw_chunks=True): extended to {iterations}, the result will differ from an "
                              f"uninterrupted run (checkpoints every multiple of the chunk resume exactly)",
                              stacklevel=2)
            if sampler is None:
                sampler = StreamSampler(task_distribution, meta_batch_size, self.plan_rows(self.inner_steps),
                                        self.inner_batch_size, generator=generator, device=self.device,
                                        check=lambda tasks: self.checker.tasks(tasks, self.inner_batch_size),
                                        draw_chunks=draw_chunks, minibatches=self.minibatches)
            elif not getattr(sampler, "checked", False):
                rows = self.plan_rows(self.inner_steps)
                sampler = CheckedDraws(sampler, lambda tasks, plans: (self.checker.tasks(tasks, 1),
                                                                      self.checker.indices(plans, tasks, rows)),
                                       per_step=meta_batch_size)
            ckpt = CheckpointCallback(self, ckpt_dir, checkpoint_every, generator=generator, history=history,
                                      extra=checkpoint_extra)
            if resumed_latest:
                ckpt.last_saved, ckpt.last_path = self.iteration, str(ckpt_dir / CHECKPOINT_NAME)
            watch = []
            if callback is not None or callbacks:  # user code runs inside fit: it may change the model
                follows = isinstance(stepper, EagerStepper)
                watch = [ModelWatchCallback(self, self._structure, follows, getattr(stepper, "name", "compiled"))]
            cbs = [HistoryCallback(history), ProgressCallback(progress),
                   *([FunctionCallback(callback)] if callback is not None else []), *callbacks, *watch, ckpt]
            previous_reducer = getattr(stepper, "reducer", None)
            if reducer is not None:
                stepper.reducer = reducer
            # The compiled program's meta-steps are tiny: one thread for the whole loop (draws and
            # gathers included); OpenMP fork/join on a busy 2-core machine costs ~10x their work.
            threads = single_thread() if isinstance(stepper, CompiledStepper) else contextlib.nullcontext()
            try:
                if isinstance(stepper, CompiledStepper):
                    stepper.prepare()  # compile before the clock and the progress bar start
                # Without a checkpoint_dir only SIGINT is deferred (SIGTERM keeps its default): a Ctrl-C
                # raised in the middle of a meta-step could leave φ one step ahead of self.iteration.
                deferred = DEFAULT_SIGNALS if ckpt_dir is not None else (signal.SIGINT,)
                with threads, DeferredSignals(deferred, enabled=handle_signals,
                                              checkpointing=ckpt_dir is not None) as signals:
                    loop = TrainingLoop(self, stepper, sampler, iterations,
                                        callbacks=[*cbs, SignalCallback(signals, ckpt)],
                                        outer_lr_at=lambda i: self.outer_lr_at(i, iterations),
                                        log_every=default_log_every(stepper) if log_every is None else log_every)
                    try:
                        self._fitting = True
                        loop.run()
                    except NonFiniteError as exc:
                        raise ckpt.explain(exc) from exc
                    except (RuntimeError, MemoryError) as exc:
                        # draws that fit but inner loops that do not (per-task parameters and
                        # activations outgrow the draws): as the draws' and the compiled program's
                        # errors, a ValueError saying which setting to lower (φ is as before the step)
                        oom = out_of_memory_message(exc, f"lower meta_batch_size ({meta_batch_size}) or "
                                                         f"inner_batch_size ({self.inner_batch_size})")
                        if oom is None:
                            raise
                        raise ValueError(f"meta-step {self.iteration + 1}: {oom}") from exc
                    finally:
                        self._fitting = False
                        done = loop.iteration - loop.start
                        self.last_fit_stats = {
                            "stepper": stepper.name, "mode": getattr(stepper, "mode", "eager"),
                            "fallback_reason": getattr(stepper, "fallback_reason", None),
                            "compile_seconds": getattr(stepper, "compile_seconds", 0.0),
                            "train_seconds": loop.train_seconds,
                            "ms_per_iteration": 1e3 * loop.train_seconds / max(done, 1),
                            "log_every": loop.log_every}
            finally:
                if reducer is not None:
                    stepper.reducer = previous_reducer
            return {"loss": history}

    # ------------------------------------------------------------------ state
    def hparams(self) -> Dict[str, Any]:
        """The trainer's hyper-parameters as plain values (stored in checkpoints)."""
        return trainer_hparams(self)

    def state_dict(self) -> Dict[str, Any]:
        """``{"model": model.state_dict(), "outer_optimizer": its state_dict or None, "iteration",
        "total_iterations", "config": hparams(), "meta_batch_size", "draw_chunk",
        "inner_optimizer": the carried inner Adam's state or None}`` (references, like
        ``nn.Module.state_dict``; ``reptile_fast.trainer_state.trainer_state_dict``)."""
        self.check_finite()
        return trainer_state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output, checking everything before changing anything
        (``reptile_fast.trainer_state.load_trainer_state``).  A non-finite meta-step skipped
        since the last read is dropped: it was about the parameters this state replaces (before,
        it went on skipping every meta-step after the load, then was reported, rewinding
        ``iteration`` below the loaded one)."""
        load_trainer_state(self, state)
        for stepper in filter(None, (self._eager, self._fused)):
            try:
                stepper.check()  # one read; re-arms the device-side guard
            except NonFiniteError:
                pass

    # ------------------------------------------------------------------ adaptation
    def _adapt_config(self) -> InnerConfig:
        return InnerConfig(lr=self.config.lr, optimizer=self.config.optimizer, loss=self.config.loss,
                           adam_betas=self.config.adam_betas, adam_eps=self.config.adam_eps)

    def adapt(self, tasks: TaskBatch, steps: int, indices: Optional[torch.Tensor] = None, *,
              generator: Optional[torch.Generator] = None) -> InnerResult:
        """Fine-tune a copy of φ on each task for ``steps`` inner steps; the model is unchanged.

        Returns the ``InnerResult``: adapted parameters ``[T, *shape]`` and losses ``[T, steps]``.
        """
        steps = check_int("steps", steps)
        self._check_params_kept()
        self.checker.tasks(tasks, self.inner_batch_size if indices is None else 1)
        if indices is None:
            indices = draw_plan(self.minibatches, tasks.n_tasks, steps, tasks.n_points, self.inner_batch_size,
                                generator=generator, device=self.device)
        else:
            indices = self.checker.indices(indices, tasks, steps)
        self._follow_plan(indices.shape[2])
        # with a carried Adam state: every task starts from the state training left, unchanged after
        with self._carried.frozen() if self._carried is not None else contextlib.nullcontext():
            return self._inner("inner_loop", self.model, tasks, indices, self._adapt_config())

    def evaluate(self, tasks: TaskBatch, steps: int, indices: Optional[torch.Tensor] = None, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-task loss on all of each task's points after ``steps`` adaptation steps: ``[T]``.

        ``steps=0`` gives the loss at φ.  The seed's demo adapts with 32 epochs of 50 points in
        batches of 10, i.e. ``steps=160``.
        """
        steps = check_int("steps", steps, 0)
        self._check_params_kept()
        # (steps=0 draws no minibatch: tasks with fewer points than inner_batch_size are evaluated)
        self.checker.tasks(tasks, self.inner_batch_size if indices is None and steps else 1)
        self.check_finite()
        if steps == 0:
            # nothing is drawn, but the arguments are checked as for steps > 0: a wrong plan or
            # generator passed silently here and raised only once steps grew (QA45)
            _check_generator(generator)
            if indices is not None:
                self.checker.indices(indices, tasks, 0)
            params = {n: p.detach().unsqueeze(0).expand(tasks.n_tasks, *p.shape)
                      for n, p in self.model.named_parameters()}
        else:
            params = self.adapt(tasks, steps, indices, generator=generator).params
        return self._inner("evaluate", self.model, params, tasks, self._adapt_config())
