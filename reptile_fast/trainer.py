"""``Reptile``: the trainer.  It owns φ (the model's parameters), the outer loop, the outer-step
schedule and validation; a backend (``reptile_fast.backends``) runs only the inner loops."""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .backends import InnerConfig, InnerResult, resolve_backend
from .losses import loss_name, resolve_loss
from .tasks.base import TaskBatch, sample_indices

__all__ = ["Reptile", "NonFiniteError"]

ALGORITHMS = ("reptile", "fomaml")
INNER_OPTIMIZERS = ("sgd", "adam")


class NonFiniteError(FloatingPointError):
    """A meta-step produced a NaN or infinite loss or update; φ was left as it was before it."""


def _positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return value


class Reptile:
    """Reptile meta-training of ``model`` in place (Nichol, Achiam, Schulman 2018).

    One meta-step: every task in the meta-batch starts from φ (the model's parameters) and takes
    ``inner_steps`` optimizer steps on minibatches of ``inner_batch_size`` of its points, giving
    φ̃_i; then ``φ ← φ + ε · mean_i(φ̃_i − φ)``.  With one task, SGD and the defaults this is
    exactly one iteration of the seed's ``reptile()``.

    Args:
        model: any ``nn.Module``; updated in place.  Its buffers (e.g. BatchNorm running
            statistics) are not meta-learned: as in the seed, each task trains a copy.
        inner_lr, inner_steps, inner_batch_size: the inner loop (seed: 0.02, 5, 10).
        outer_lr: ε, the interpolation step (seed: 0.1).
        outer_lr_final: if set, ε anneals linearly from ``outer_lr`` to this over ``fit``'s
            iterations (the paper's schedule).
        loss: "mse", "cross_entropy" or a callable ``(prediction, target) -> scalar``.
        backend: "auto", "reference", or any registered backend ("torch", "triton").
        inner_optimizer: "sgd" or "adam" (β1 = 0 by default, fresh state per task).
        algorithm: "reptile" or "fomaml" (meta-gradient on a final, separate minibatch).
        inner_grad_weights: ``(w_1, …, w_k)``, k = inner_steps: the outer direction becomes
            Σ w_i g_i of the inner gradients (paper §6.2).
        outer_optimizer: a ``torch.optim.Optimizer`` over the model's parameters, fed the mean
            pseudo-gradient (φ − φ̃ for Reptile) instead of the interpolation update.
    """

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.02, inner_steps: int = 5,
                 inner_batch_size: int = 10, outer_lr: float = 0.1,
                 outer_lr_final: Optional[float] = None, loss: Union[str, Callable] = "mse",
                 backend: str = "auto", inner_optimizer: str = "sgd", algorithm: str = "reptile",
                 inner_grad_weights: Optional[Sequence[float]] = None,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None,
                 adam_betas=(0.0, 0.999)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters to meta-learn")
        devices = {p.device for p in params}
        dtypes = {p.dtype for p in params}
        if len(devices) != 1:
            raise ValueError(f"model parameters must all be on one device, found {sorted(map(str, devices))}")
        if len(dtypes) != 1 or not params[0].is_floating_point():
            raise TypeError(f"model parameters must share one floating-point dtype, found {dtypes}")
        self.model = model
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.inner_lr = _positive_float("inner_lr", inner_lr)
        self.inner_steps = _positive_int("inner_steps", inner_steps)
        self.inner_batch_size = _positive_int("inner_batch_size", inner_batch_size)
        self.outer_lr = _positive_float("outer_lr", outer_lr)
        self.outer_lr_final = (None if outer_lr_final is None
                               else _positive_float("outer_lr_final", outer_lr_final, allow_zero=True))
        resolve_loss(loss)
        self.loss = loss
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if inner_grad_weights is not None:
            if algorithm != "reptile":
                raise ValueError("inner_grad_weights defines its own outer direction; use it with algorithm='reptile'")
            try:
                weights = tuple(float(w) for w in inner_grad_weights)
            except (TypeError, ValueError):
                raise TypeError("inner_grad_weights must be a sequence of numbers") from None
            if len(weights) != self.inner_steps:
                raise ValueError(f"inner_grad_weights must have inner_steps={self.inner_steps} entries, "
                                 f"got {len(weights)}")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError("inner_grad_weights must be finite")
            inner_grad_weights = weights
        try:
            betas = tuple(float(b) for b in adam_betas)
        except (TypeError, ValueError):
            raise TypeError("adam_betas must be a pair of numbers") from None
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
        if outer_optimizer is not None:
            if not isinstance(outer_optimizer, torch.optim.Optimizer):
                raise TypeError(f"outer_optimizer must be a torch.optim.Optimizer, got {type(outer_optimizer).__name__}")
            opt_params = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
            if opt_params != {id(p) for p in params}:
                raise ValueError("outer_optimizer must optimise exactly the model's parameters")
            if outer_lr_final is not None:
                raise ValueError("outer_lr_final anneals the interpolation step; with outer_optimizer "
                                 "use a torch.optim.lr_scheduler instead")
        self.outer_optimizer = outer_optimizer
        self.config = InnerConfig(lr=self.inner_lr, optimizer=inner_optimizer, loss=loss,
                                  algorithm=algorithm, grad_weights=inner_grad_weights,
                                  adam_betas=betas)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self.backend_name = backend
        self.backend = resolve_backend(backend, model, self.device, self.config)
        self.iteration = 0
        self.total_iterations: Optional[int] = None
        self._checked_shapes: set = set()

    # ------------------------------------------------------------------ validation
    def _check_tasks(self, tasks: TaskBatch, min_points: int) -> None:
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a reptile_fast.TaskBatch, got {type(tasks).__name__}")
        if tasks.device != self.device:
            raise ValueError(f"tasks are on {tasks.device} but the model is on {self.device}")
        if tasks.x.dtype != self.dtype:
            raise TypeError(f"tasks.x dtype {tasks.x.dtype} differs from the model's {self.dtype}")
        if tasks.n_points < min_points:
            raise ValueError(f"inner_batch_size ({min_points}) exceeds the tasks' points ({tasks.n_points})")
        name = loss_name(self.loss)
        if name == "mse" and tasks.is_classification:
            raise TypeError("loss 'mse' needs float targets [tasks, points, out]; got class labels")
        if name == "cross_entropy" and not tasks.is_classification:
            raise TypeError("loss 'cross_entropy' needs long class labels [tasks, points]; got float targets")
        key = (tuple(tasks.x.shape[2:]), tuple(tasks.y.shape[2:]), tasks.y.dtype,
               int(tasks.y.max()) if tasks.is_classification else None)
        if key in self._checked_shapes:
            return
        # One forward on a single point to catch shape mismatches that torch would broadcast
        # silently (MSE of [B, 1] against [B, 3]) or report from deep inside a layer.
        with torch.no_grad():
            probe_x = tasks.x[0, :2]
            was_training = self.model.training
            try:
                self.model.eval()
                out = self.model(probe_x)
            except Exception as exc:  # noqa: BLE001 - re-raised with the shapes that caused it
                raise ValueError(f"the model cannot take task inputs of shape {tuple(tasks.x.shape[2:])} "
                                 f"per point: {exc}") from exc
            finally:
                self.model.train(was_training)
        if name == "mse" and tuple(out.shape) != tuple(tasks.y[0, :2].shape):
            raise ValueError(f"model output per point {tuple(out.shape[1:])} does not match targets "
                             f"{tuple(tasks.y.shape[2:])}")
        if name == "cross_entropy":
            if out.dim() != 2:
                raise ValueError(f"cross_entropy needs logits [batch, classes]; the model gives {tuple(out.shape)}")
            if key[3] >= out.shape[1]:
                raise ValueError(f"class label {key[3]} out of range for a model with {out.shape[1]} outputs")
        self._checked_shapes.add(key)

    def _plan_rows(self, steps: int) -> int:
        return steps + 1 if self.config.algorithm == "fomaml" else steps

    def _check_indices(self, indices: torch.Tensor, tasks: TaskBatch, rows: int) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != torch.long:
            raise TypeError(f"indices must be torch.long, got {indices.dtype}")
        if indices.dim() != 3 or indices.shape[0] != tasks.n_tasks or indices.shape[1] != rows \
                or indices.shape[2] < 1:
            raise ValueError(f"indices must have shape [tasks={tasks.n_tasks}, steps={rows}, batch], "
                             f"got {tuple(indices.shape)}")
        if indices.device != self.device:
            raise ValueError(f"indices are on {indices.device} but the model is on {self.device}")
        if int(indices.min()) < 0 or int(indices.max()) >= tasks.n_points:
            raise ValueError(f"indices must lie in [0, {tasks.n_points}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices

    # ------------------------------------------------------------------ schedule
    def outer_lr_at(self, iteration: int, total: Optional[int] = None) -> float:
        """ε at ``iteration`` of ``total``: linear from ``outer_lr`` to ``outer_lr_final``."""
        total = total if total is not None else self.total_iterations
        if self.outer_lr_final is None or not total:
            return self.outer_lr
        frac = min(max(iteration / total, 0.0), 1.0)
        return frac * self.outer_lr_final + (1 - frac) * self.outer_lr

    # ------------------------------------------------------------------ training
    def meta_step(self, tasks: TaskBatch, indices: Optional[torch.Tensor] = None, *,
                  generator: Optional[torch.Generator] = None,
                  outer_lr: Optional[float] = None) -> Dict[str, float]:
        """One outer update whose meta-batch is ``tasks``.

        Args:
            tasks: ``T`` tasks on the model's device.
            indices: long ``[T, inner_steps, B]`` minibatch plan (``inner_steps + 1`` rows for
                FOMAML); drawn with ``sample_indices`` from ``generator`` when None.
            outer_lr: ε for this step; by default the schedule's value.

        Returns:
            ``{"loss": mean inner-loop minibatch loss, "outer_lr": ε, "iteration": i}``.
        """
        self._check_tasks(tasks, self.inner_batch_size if indices is None else 1)
        rows = self._plan_rows(self.inner_steps)
        if indices is None:
            indices = sample_indices(tasks.n_tasks, rows, tasks.n_points, self.inner_batch_size,
                                     generator=generator, device=self.device)
        else:
            self._check_indices(indices, tasks, rows)
        eps = self.outer_lr_at(self.iteration) if outer_lr is None else _positive_float("outer_lr", outer_lr)
        result = self.backend.inner_loop(self.model, tasks, indices, self.config)
        self._outer_update(result, eps)
        self.iteration += 1
        return {"loss": float(result.losses.mean()), "outer_lr": eps, "iteration": self.iteration}

    @torch.no_grad()
    def _outer_update(self, result: InnerResult, eps: float) -> None:
        named = list(self.model.named_parameters())
        # The mean pseudo-gradient per parameter.  For Reptile the update is written as the seed
        # writes it, φ + ε·(φ̃ − φ), so that one task reproduces the seed bit for bit.
        if result.meta_grads is None:
            deltas = [(result.params[n] - p).mean(0) for n, p in named]  # mean_i (φ̃_i − φ)
        else:
            deltas = [-result.meta_grads[n].mean(0) for n, _ in named]
        finite = torch.stack([torch.isfinite(d).all() for d in deltas]).all() & torch.isfinite(result.losses).all()
        if not bool(finite):
            raise NonFiniteError(
                f"meta-step {self.iteration + 1}: non-finite inner loss or update (NaN/inf); the "
                f"parameters were left as they were before this step. Lower inner_lr/outer_lr or check the data.")
        if self.outer_optimizer is not None:
            for (_, p), d in zip(named, deltas):
                p.grad = -d
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
        else:
            for (_, p), d in zip(named, deltas):
                p += eps * d

    def fit(self, task_distribution, iterations: int, *, meta_batch_size: int = 1,
            generator: Optional[torch.Generator] = None, progress: bool = True,
            callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, list]:
        """Meta-train for ``iterations`` meta-steps of ``meta_batch_size`` tasks each.

        Tasks come from ``task_distribution.sample(meta_batch_size, generator=..., device=...)``
        and plans from ``sample_indices`` with the same generator (the global RNG when None).
        ``callback(iteration, metrics)`` runs after every meta-step.  Continues from
        ``self.iteration`` (so a restored trainer resumes).  Returns ``{"loss": [...]}``.
        """
        if not hasattr(task_distribution, "sample") or not callable(task_distribution.sample):
            raise TypeError("task_distribution must have a sample(n_tasks, *, generator, device) method")
        _positive_int("iterations", iterations)
        _positive_int("meta_batch_size", meta_batch_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.total_iterations = iterations
        history: Dict[str, list] = {"loss": []}
        for _ in tqdm(range(self.iteration, iterations), disable=not progress, desc="meta-train"):
            tasks = task_distribution.sample(meta_batch_size, generator=generator, device=self.device)
            metrics = self.meta_step(tasks, generator=generator)
            history["loss"].append(metrics["loss"])
            if callback is not None:
                callback(self.iteration, metrics)
        return history

    # ------------------------------------------------------------------ adaptation
    def _adapt_config(self) -> InnerConfig:
        return InnerConfig(lr=self.config.lr, optimizer=self.config.optimizer, loss=self.config.loss,
                           adam_betas=self.config.adam_betas, adam_eps=self.config.adam_eps)

    def adapt(self, tasks: TaskBatch, steps: int, indices: Optional[torch.Tensor] = None, *,
              generator: Optional[torch.Generator] = None) -> InnerResult:
        """Fine-tune a copy of φ on each task for ``steps`` inner steps; the model is unchanged.

        Returns the ``InnerResult``: adapted parameters ``[T, *shape]`` and losses ``[T, steps]``.
        """
        _positive_int("steps", steps)
        self._check_tasks(tasks, self.inner_batch_size if indices is None else 1)
        if indices is None:
            indices = sample_indices(tasks.n_tasks, steps, tasks.n_points, self.inner_batch_size,
                                     generator=generator, device=self.device)
        else:
            self._check_indices(indices, tasks, steps)
        return self.backend.inner_loop(self.model, tasks, indices, self._adapt_config())

    def evaluate(self, tasks: TaskBatch, steps: int, indices: Optional[torch.Tensor] = None, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-task loss on all of each task's points after ``steps`` adaptation steps: ``[T]``.

        ``steps=0`` gives the loss at φ.  The seed's demo adapts with 32 epochs of 50 points in
        batches of 10, i.e. ``steps=160``.
        """
        _positive_int("steps", steps, allow_zero=True)
        self._check_tasks(tasks, self.inner_batch_size if indices is None else 1)
        if steps == 0:
            params = {n: p.detach().unsqueeze(0).expand(tasks.n_tasks, *p.shape)
                      for n, p in self.model.named_parameters()}
        else:
            params = self.adapt(tasks, steps, indices, generator=generator).params
        return self.backend.evaluate(self.model, params, tasks, self._adapt_config())
