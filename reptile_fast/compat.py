"""Does this data fit this model?  The trainer's checks of tasks and plans, done where data enters.

``InputChecker.tasks`` probes the model once per combination of task shapes, target kind and
label bound (a forward pass on two points), and afterwards only compares shapes and dtypes:
it reads no tensor value, so it costs nothing in a training loop.  ``InputChecker.indices``
checks a plan the *user* passes (its range needs one read); plans the library draws are valid
by construction and are not checked.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .losses import loss_name, resolve_loss
from .model_watch import modes_kept
from .tasks.base import TaskBatch

__all__ = ["InputChecker", "check_plan_shape"]


def check_plan_shape(indices, expected: tuple, layout: str, n_points: Optional[int] = None) -> None:
    """ValueError unless ``indices`` is a long tensor of shape ``expected`` (described by ``layout``)
    with values in ``[0, n_points)`` when ``n_points`` is given (one read: a user's plan)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or tuple(indices.shape) != expected:
        raise ValueError(f"indices must be a long tensor of shape {expected} {layout}, got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)} {tuple(getattr(indices, 'shape', ()))}")
    if n_points is not None and indices.numel():
        lo, hi = (int(v) for v in torch.stack([indices.min(), indices.max()]).tolist())
        if lo < 0 or hi >= n_points:
            raise ValueError(f"indices must lie in [0, {n_points}), got values in [{lo}, {hi}]")


class InputChecker:
    """Checks ``TaskBatch``es and plans against one model, loss, device and dtype."""

    def __init__(self, model: nn.Module, loss: Union[str, Callable], device: torch.device, dtype: torch.dtype):
        self.model, self.loss, self.device, self.dtype = model, loss, device, dtype
        self._seen: set = set()

    def tasks(self, tasks: TaskBatch, min_points: int) -> None:
        """TypeError/ValueError naming what does not fit (device, dtype, points, targets, shapes)."""
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a reptile_fast.TaskBatch, got {type(tasks).__name__}")
        if tasks.device != self.device:
            raise ValueError(f"tasks are on {tasks.device} but the model is on {self.device}")
        if tasks.x.is_floating_point() and tasks.x.dtype != self.dtype:
            raise TypeError(f"tasks.x dtype {tasks.x.dtype} differs from the model's {self.dtype}")
        if tasks.y.is_floating_point() and tasks.y.dtype != self.dtype:  # x holds integer ids
            raise TypeError(f"tasks.y dtype {tasks.y.dtype} differs from the model's {self.dtype}")
        if tasks.n_points < min_points:
            raise ValueError(f"inner_batch_size ({min_points}) exceeds the tasks' points ({tasks.n_points})")
        name = loss_name(self.loss)
        if name == "mse" and tasks.is_classification:
            raise TypeError("loss 'mse' needs float targets [tasks, points, out]; got class labels")
        if name == "cross_entropy" and not tasks.is_classification:
            raise TypeError("loss 'cross_entropy' needs long class labels [tasks, points]; got float targets")
        n_classes = tasks.n_classes
        if tasks.is_classification and n_classes is None:  # a trusted batch without a bound: one read
            n_classes = int(tasks.y.max()) + 1
        if not tasks.x.is_floating_point():
            self._check_ids(tasks.x)
        key = (tuple(tasks.x.shape[2:]), tuple(tasks.y.shape[2:]), tasks.y.dtype, n_classes)
        if key in self._seen:
            return
        out = self._probe(tasks)
        if name == "mse" and tuple(out.shape) != tuple(tasks.y[0, :2].shape):
            raise ValueError(f"model output per point {tuple(out.shape[1:])} does not match targets "
                             f"{tuple(tasks.y.shape[2:])}")
        if name == "cross_entropy":
            if out.dim() != 2:
                raise ValueError(f"cross_entropy needs logits [batch, classes]; the model gives {tuple(out.shape)}")
            if n_classes > out.shape[1]:
                raise ValueError(f"class label {n_classes - 1} out of range for a model with {out.shape[1]} outputs")
        if name is None:
            self._check_callable_loss(out, tasks)
        self._seen.add(key)

    def _check_ids(self, x: torch.Tensor) -> None:
        """Integer inputs are ids into the model's first ``nn.Embedding``: each must lie in
        ``[0, num_embeddings)``.  One read per call (id inputs only): the probe sees two points,
        and past it an id out of range raised IndexError deep inside the inner loop (reference) or,
        negative, was taken silently under vmap (torch), training on other rows than the reference."""
        emb = next((m for m in self.model.modules() if isinstance(m, nn.Embedding)), None)
        if emb is None or not x.numel():
            return
        lo, hi = (int(v) for v in torch.stack([x.min(), x.max()]).tolist())
        if lo < 0 or hi >= emb.num_embeddings:
            raise ValueError(f"tasks.x holds ids in [{lo}, {hi}], but the model's nn.Embedding has "
                             f"{emb.num_embeddings} rows: ids must lie in [0, {emb.num_embeddings})")

    def _probe(self, tasks: TaskBatch) -> torch.Tensor:
        # One forward on two points catches shape mismatches that torch would broadcast silently
        # (MSE of [B, 1] against [B, 3]) or report from deep inside a layer.
        with torch.no_grad(), modes_kept(self.model):
            try:
                self.model.eval()
                out = self.model(tasks.x[0, :2])
            except Exception as exc:  # noqa: BLE001 - re-raised with the shapes that caused it
                raise ValueError(f"the model cannot take task inputs of shape {tuple(tasks.x.shape[2:])} "
                                 f"per point: {exc}") from exc
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor (predictions [batch, ...]) for the loss, got "
                            f"{type(out).__name__}")
        return out

    def _check_callable_loss(self, out: torch.Tensor, tasks: TaskBatch) -> None:
        """A callable loss must give one floating-point number per minibatch."""
        pred = out.detach().requires_grad_(out.is_floating_point())
        try:
            with torch.enable_grad():
                value = resolve_loss(self.loss)(pred, tasks.y[0, :2])
        except Exception as exc:  # noqa: BLE001 - re-raised naming the loss
            raise ValueError(f"the loss callable failed on a model output {tuple(out.shape)} and targets "
                             f"{tuple(tasks.y[0, :2].shape)}: {exc}") from exc
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
            raise TypeError("the loss callable must return a 0-dim floating-point tensor (the mean loss), got "
                            + (f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                               else type(value).__name__))
        if pred.requires_grad and not value.requires_grad:
            # a detached loss: backend torch took a zero gradient (the model never moved), reference
            # failed inside backward ("element 0 of tensors does not require grad")
            raise ValueError("the loss callable's result does not depend on the prediction (detached, or computed "
                             "without autograd): the inner steps would have no gradient")

    def indices(self, indices: torch.Tensor, tasks: TaskBatch, rows: int) -> torch.Tensor:
        """A user's plan: long ``[T, rows, B]`` on the model's device, values in ``[0, N)``."""
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
        lo, hi = (int(v) for v in torch.stack([indices.min(), indices.max()]).tolist())
        if lo < 0 or hi >= tasks.n_points:
            raise ValueError(f"indices must lie in [0, {tasks.n_points}), got values in [{lo}, {hi}]")
        return indices
