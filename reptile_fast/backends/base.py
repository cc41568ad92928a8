"""The small protocol every inner-loop backend implements.

The trainer (``reptile_fast.Reptile``) owns φ, the outer loop and the outer update; a backend
owns only the inner loop: given the model (whose current parameters are φ), a ``TaskBatch`` and
the plan of minibatch indices, it returns every task's adapted parameters φ̃_i and inner losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..tasks.base import TaskBatch

__all__ = ["InnerConfig", "InnerResult", "Backend", "UnsupportedModelError", "functional_call", "INNER_OPTIMIZERS",
           "ALGORITHMS"]


def functional_call(model: nn.Module, tensors, args: tuple):
    """``torch.func.functional_call(model, tensors, args)`` that always gives the model its own
    tensors back.

    torch swaps a module's tensors once per *path*: a module registered at two paths (one layer
    applied twice, ``nn.Sequential(l, act, l)``) is swapped twice and left holding the call's
    tensors afterwards (torch 2.14).  Every module's parameter and buffer slots are put back here.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        return torch.func.functional_call(model, tensors, args)
    finally:
        for m, params, buffers in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)


#: the inner optimizers and algorithms an ``InnerConfig`` may name (every backend knows them)
INNER_OPTIMIZERS = ("sgd", "adam")
ALGORITHMS = ("reptile", "fomaml")


class UnsupportedModelError(ValueError):
    """The model (or loss, device, optimizer) is outside what a backend can run."""


@dataclass(frozen=True)
class InnerConfig:
    """How each task's inner loop runs.

    Attributes:
        lr: inner learning rate.
        optimizer: "sgd" (the seed's) or "adam" (β1 = ``adam_betas[0]``, fresh state per task).
        loss: a name in ``reptile_fast.losses.LOSSES`` or a callable ``(pred, target) -> scalar``.
        algorithm: "reptile" (pseudo-gradient φ − φ̃) or "fomaml" (gradient on a final, separate
            minibatch at φ̃: the plan then holds ``steps + 1`` rows and the last is that batch).
        grad_weights: optional ``(w_1, …, w_k)``: pseudo-gradient Σ w_i g_i over the inner
            gradients (the paper's §6.2); all ones with SGD gives Reptile's direction / lr.
    """

    lr: float = 0.02
    optimizer: str = "sgd"
    loss: Union[str, Callable] = "mse"
    algorithm: str = "reptile"
    grad_weights: Optional[Tuple[float, ...]] = None
    adam_betas: Tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        # a backend called directly (no Reptile check before it) ran plain SGD for "rmsprop" or
        # "Adam" (torch) and plain Reptile for "maml" (torch and reference), silently
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner optimizer must be one of {INNER_OPTIMIZERS}, got {self.optimizer!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.grad_weights is not None and self.algorithm != "reptile":
            # every backend ran plain FOMAML and ignored the weights (QA68), as Reptile refuses
            raise ValueError("inner_grad_weights defines its own outer direction; use it with algorithm='reptile'")

    @property
    def needs_meta_grads(self) -> bool:
        return self.algorithm == "fomaml" or self.grad_weights is not None

    def train_steps(self, plan_rows: int) -> int:
        """Inner updates taken for a plan with ``plan_rows`` rows (FOMAML keeps one back)."""
        return plan_rows - 1 if self.algorithm == "fomaml" else plan_rows


@dataclass
class InnerResult:
    """What a backend's inner loop returns, for ``T`` tasks and ``S`` inner updates.

    Attributes:
        params: name -> adapted parameters φ̃_i, ``[T, *param.shape]``, in ``model.named_parameters()`` order.
        losses: ``[T, S]`` minibatch loss at each inner step, before that step's update.
        meta_grads: name -> ``[T, *param.shape]`` per-task pseudo-gradient when the algorithm is
            not plain Reptile (FOMAML or ``grad_weights``); None for Reptile.
    """

    params: Dict[str, torch.Tensor]
    losses: torch.Tensor
    meta_grads: Optional[Dict[str, torch.Tensor]] = None


class Backend:
    """Base class of inner-loop backends; subclasses set ``name`` and implement ``inner_loop``."""

    name: ClassVar[str] = "?"
    #: check a plan's values (in ``[0, points)``: one host read per call) in ``check_plan``.
    #: ``Reptile`` turns it off: it checks plans where they enter (a user's plan, a sampler's
    #: draws), so that a meta-step reads nothing on the host.
    validate: bool = True

    def check_plan(self, tasks: TaskBatch, indices, config: Optional[InnerConfig] = None, *,
                   values: Optional[bool] = None) -> None:
        """TypeError/ValueError unless ``indices`` is a long ``[T, R >= 1, B >= 1]`` plan for
        ``tasks`` (``T = tasks.n_tasks``) on their device, with values in ``[0, N)`` when
        ``values`` (default: ``validate``; one host read), and ``config.grad_weights`` (if any)
        holds one weight per inner step.  A backend called directly, without ``Reptile``'s checks, took a 2-D plan,
        another task count, negative indices (Python's wrap-around: other points), int32 plans or
        surplus grad_weights silently, and failed on indices ``>= N`` with torch's IndexError."""
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long:
            raise TypeError(f"indices must be a torch.long tensor [tasks, rows, batch], got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.layout != torch.strided:  # (torch's NotImplementedError at the value read, or in the loop)
            raise TypeError(f"indices must be a dense tensor, got layout {indices.layout}")
        if indices.dim() != 3 or indices.shape[0] != tasks.n_tasks or indices.shape[1] < 1 or indices.shape[2] < 1:
            raise ValueError(f"indices must have shape [tasks={tasks.n_tasks}, rows >= 1, batch >= 1], "
                             f"got {tuple(indices.shape)}")
        if indices.device != tasks.device:
            raise ValueError(f"indices are on {indices.device} but the tasks on {tasks.device}")
        if config is not None and config.grad_weights is not None:
            steps = config.train_steps(indices.shape[1])
            if len(config.grad_weights) != steps:
                raise ValueError(f"grad_weights has {len(config.grad_weights)} entries for {steps} inner steps")
        if self.validate if values is None else values:
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(indices)).tolist())
            if lo < 0 or hi >= tasks.n_points:
                raise ValueError(f"indices must lie in [0, {tasks.n_points}) (the tasks' points), got values "
                                 f"in [{lo}, {hi}]")

    @staticmethod
    def check_data(model: nn.Module, tasks: TaskBatch) -> torch.dtype:
        """The model's parameter dtype; TypeError unless its parameters share one floating dtype
        and the tasks' float tensors (``x`` ``[T, N, ...]`` unless integer ids, ``y`` unless long
        labels) have it, ValueError unless the tasks are on the parameters' device.

        Backends call it while ``validate`` (called directly: without it they failed deep inside
        torch, "mat1 and mat2 must have the same dtype", for float16 tasks on a float32 model or
        a model of two dtypes); inside ``Reptile`` the trainer checks the same where data enters
        and sets ``validate=False``, so a meta-step does not check twice."""
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or not params[0].is_floating_point():
            raise TypeError(f"model parameters must share one floating-point dtype, found "
                            f"{sorted(map(str, dtypes))}")
        dtype, device = params[0].dtype, params[0].device
        if tasks.device != device:
            raise ValueError(f"tasks are on {tasks.device} but the model's parameters on {device}")
        for name, t in (("x", tasks.x), ("y", tasks.y)):
            if t.is_floating_point() and t.dtype != dtype:
                raise TypeError(f"tasks.{name} dtype {t.dtype} differs from the model's {dtype}: draw the "
                                f"tasks in it (e.g. Sine(dtype={dtype})) or convert the model")
        return dtype

    @staticmethod
    def check_params(model: nn.Module, params, n_tasks: int) -> None:
        """TypeError/ValueError unless ``params`` maps exactly the model's parameter names to
        tensors ``[n_tasks, *shape]`` (what ``evaluate`` takes).  ``functional_call`` took the
        model's own tensor for a missing name and ignored an unknown one, silently; a wrong task
        count was used in part (reference) or failed inside torch."""
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict name -> [tasks, *shape], got {type(params).__name__}")
        named = dict(model.named_parameters())
        if set(params) != set(named):
            missing, unknown = [n for n in named if n not in params], [n for n in params if n not in named]
            raise ValueError(f"params must hold exactly the model's parameters: missing {missing}, unknown {unknown}")
        for n, p in named.items():
            v = params[n]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n_tasks, *p.shape):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"params[{n!r}] must be [tasks={n_tasks}, *{tuple(p.shape)}], got {got}")
            if v.dtype != p.dtype:
                # reference and torch's generic path failed inside torch; torch's MLP path computed
                # in the params' dtype, silently another precision than the model's
                raise TypeError(f"params[{n!r}] is {v.dtype} but the model's parameter is {p.dtype}")
            if v.device != p.device:
                raise ValueError(f"params[{n!r}] is on {v.device} but the model's parameter on {p.device}")

    def auto_candidate(self, device: torch.device) -> bool:
        """Whether ``backend="auto"`` may pick this backend on ``device`` (before ``check_supported``).

        A backend that can run somewhere only slowly (Triton's CPU interpreter) says no there."""
        return True

    def check_supported(self, model: nn.Module, device: torch.device, config: InnerConfig) -> None:
        """Raise ``UnsupportedModelError`` naming what this backend cannot run; None when it can."""

    def check_batch_size(self, model: nn.Module, batch_size: int) -> None:
        """Raise ``UnsupportedModelError`` when this backend cannot run inner minibatches of
        ``batch_size`` points (checked when the trainer is built and when its
        ``inner_batch_size`` changes, not at the first meta-step).  It may adapt the backend to
        the new size (backend "triton" under kernel "auto" resolves its kernel for it)."""

    def check_plan_size(self, model: nn.Module, batch_size: int) -> None:
        """Raise ``UnsupportedModelError`` when this backend cannot run one call's plan of
        ``batch_size`` points; unlike ``check_batch_size``, changes nothing (the trainer asks it
        about a plan passed to ``meta_step`` / ``adapt``).  Default: ``check_batch_size``."""
        self.check_batch_size(model, batch_size)

    def inner_loop(self, model: nn.Module, tasks: TaskBatch, indices: torch.Tensor,
                   config: InnerConfig) -> InnerResult:
        """Run every task's inner loop from the model's current parameters φ.

        Args:
            model: the meta-model; its parameters are φ and must not be modified.
            tasks: ``T`` tasks on the model's device.
            indices: long ``[T, R, B]`` plan; row ``s`` is the minibatch of inner step ``s``.
            config: the inner-loop settings.
        """
        raise NotImplementedError

    def evaluate(self, model: nn.Module, params: Dict[str, torch.Tensor], tasks: TaskBatch,
                 config: InnerConfig) -> torch.Tensor:
        """Loss of each task on all its points at its own parameters: float ``[T]``.

        ``params`` maps names to ``[T, *shape]``.  The default runs ``functional_call`` task by
        task on copies of the buffers (BatchNorm in train mode uses the batch's statistics and
        the model's running statistics stay untouched).
        """
        from ..losses import resolve_loss

        self.check_params(model, params, tasks.n_tasks)
        if self.validate:  # inside Reptile its InputChecker checked the data where it entered
            self.check_data(model, tasks)
        loss_fn = resolve_loss(config.loss)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        out = []
        with torch.no_grad():
            for i in range(tasks.n_tasks):
                p_i = {k: v[i] for k, v in params.items()}
                b_i = {k: v.clone() for k, v in buffers.items()}
                pred = functional_call(model, {**p_i, **b_i}, (tasks.x[i],))
                out.append(loss_fn(pred, tasks.y[i]).reshape(()))
        return torch.stack(out)
