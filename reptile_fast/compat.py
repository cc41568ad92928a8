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
from torch.utils._pytree import tree_flatten, tree_map

from .backends.base import functional_call
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
    _check_dense_plan(indices)
    if n_points is not None and indices.numel():
        lo, hi = (int(v) for v in torch.stack([indices.min(), indices.max()]).tolist())
        if lo < 0 or hi >= n_points:
            raise ValueError(f"indices must lie in [0, {n_points}), got values in [{lo}, {hi}]")


def _check_dense_plan(indices: torch.Tensor) -> None:
    """A plan must hold data in the strided layout: a sparse one failed inside torch
    (NotImplementedError "Could not run 'aten::min' ... 'SparseCPU'"), a meta one at the read."""
    if indices.layout != torch.strided:
        raise TypeError(f"indices must be a dense tensor, got layout {indices.layout} (use .to_dense())")
    if indices.is_meta:
        raise ValueError("indices are on the meta device (a tensor without data)")


def _output_leaves(out) -> "list[torch.Tensor] | None":
    """The tensors a model's output holds: ``[out]`` for a tensor, the leaves of a (nested) tuple,
    list or dict of tensors (several heads), None for anything else (or no tensor at all)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if not isinstance(out, (tuple, list, dict)):
        return None
    leaves, _ = tree_flatten(out)
    return leaves if leaves and all(isinstance(t, torch.Tensor) for t in leaves) else None


def _describe(out) -> str:
    """A model output's shape (a tensor) or its leaves' shapes (several heads), for messages."""
    if isinstance(out, torch.Tensor):
        return str(tuple(out.shape))
    return f"{type(out).__name__} of shapes {[tuple(t.shape) for t in _output_leaves(out) or ()]}"


class InputChecker:
    """Checks ``TaskBatch``es and plans against one model, loss, device and dtype."""

    def __init__(self, model: nn.Module, loss: Union[str, Callable], device: torch.device, dtype: torch.dtype):
        self.model, self.loss, self.device, self.dtype = model, loss, device, dtype
        self._seen: set = set()
        #: per probed input (point shape, dtype): the (nn.Embedding's name, rows, per-point
        #: positions of x) of each embedding that reads straight from x (see ``_probe``)
        self._id_readers: dict = {}

    def tasks(self, tasks: TaskBatch, min_points: int) -> None:
        """TypeError/ValueError naming what does not fit (device, dtype, points, targets, shapes)."""
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a reptile_fast.TaskBatch, got {type(tasks).__name__}")
        if tasks.device != self.device:
            raise ValueError(f"tasks are on {tasks.device} but the model is on {self.device}")
        hint = f" (draw the tasks in it, e.g. Sine(dtype={self.dtype}), or convert them: tasks.to(dtype={self.dtype}))"
        if tasks.x.is_floating_point() and tasks.x.dtype != self.dtype:
            raise TypeError(f"tasks.x dtype {tasks.x.dtype} differs from the model's {self.dtype}{hint}")
        if tasks.y.is_floating_point() and tasks.y.dtype != self.dtype:  # x holds integer ids
            raise TypeError(f"tasks.y dtype {tasks.y.dtype} differs from the model's {self.dtype}{hint}")
        if tasks.n_points < min_points:
            raise ValueError(f"inner_batch_size ({min_points}) exceeds the tasks' points ({tasks.n_points})")
        name = loss_name(self.loss)
        if name == "mse" and tasks.is_classification:
            raise TypeError("loss 'mse' needs float targets [tasks, points, out]; got class labels")
        if name == "cross_entropy" and not tasks.is_classification:
            raise TypeError("loss 'cross_entropy' needs long class labels [tasks, points]; got float targets")
        n_classes = tasks.n_classes
        if tasks.is_classification and n_classes is None:  # a trusted batch without a bound: one read
            # both ends: a negative label failed deep inside torch (reference, torch) and was read
            # outside the logits by the Triton kernel (whose own check the trainer turns off)
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(tasks.y)).tolist())
            if lo < 0:
                raise ValueError(f"TaskBatch.y class labels must be non-negative, got {lo}")
            n_classes = hi + 1
        # x's dtype too: which embeddings read integer inputs is found by the probe (float x: none)
        key = (tuple(tasks.x.shape[2:]), tasks.x.dtype, tuple(tasks.y.shape[2:]), tasks.y.dtype, n_classes)
        if key in self._seen:
            if not tasks.x.is_floating_point():
                self._check_ids(tasks.x, self._id_readers.get(key[:2], ()))
            return
        out = self._probe(tasks)
        self._check_differentiable(tasks, out)
        if not tasks.x.is_floating_point():
            self._check_ids(tasks.x, self._id_readers.get(key[:2], ()))
        if name == "mse" and tuple(out.shape) != tuple(tasks.y[0, :2].shape):
            raise ValueError(f"model output per point {tuple(out.shape[1:])} does not match targets "
                             f"{tuple(tasks.y.shape[2:])}")
        if name == "cross_entropy":
            if out.dim() != 2:
                raise ValueError(f"cross_entropy needs logits [batch, classes]; the model gives {tuple(out.shape)}")
            if n_classes > out.shape[1]:
                raise ValueError(f"class label {n_classes - 1} out of range for a model with {out.shape[1]} outputs")
            if out.shape[1] < 2:
                # a softmax over one logit is 1 whatever the weights: the loss was 0 and nothing trained (QA46)
                raise ValueError(f"cross_entropy needs a model with at least 2 outputs (one per class); this one "
                                 f"gives {out.shape[1]}, so its loss is 0 and the inner steps would not train it")
        if name is None:
            self._check_callable_loss(out, tasks)
        self._seen.add(key)

    def _check_ids(self, x: torch.Tensor, readers) -> None:
        """Integer inputs are ids: each position of a point that an ``nn.Embedding`` of the model
        reads straight from x (``readers``, found by ``_probe``) must lie in ``[0, rows)`` of that
        embedding.  One read per call (id inputs only): the probe sees two points, and past it an id
        out of range raised IndexError deep inside the inner loop (reference) or, negative, was taken
        silently under vmap (torch), training on other rows than the reference.  Positions no
        embedding reads (a second id column of another embedding, an integer feature) are not held
        to the first embedding's range."""
        if not readers or not x.numel():
            return
        flat = x.reshape(-1, x[0, 0].numel())
        ends = torch.stack([torch.stack([flat[:, cols].min(), flat[:, cols].max()]) for _, _, cols in readers])
        for (name, rows, _), (lo, hi) in zip(readers, ends.tolist()):
            if lo < 0 or hi >= rows:
                raise ValueError(f"tasks.x holds ids in [{lo}, {hi}] where the model's nn.Embedding {name!r} reads "
                                 f"them, but that nn.Embedding has {rows} rows: ids must lie in [0, {rows})")

    def _hook_id_readers(self, xp: torch.Tensor, found: list) -> list:
        """Forward pre-hooks on the model's ``nn.Embedding``s that record, into ``found``, each one
        whose input is a view of the probe's contiguous input ``xp [2, *point]`` (x itself, a
        column ``x[:, 0]``, ``x.squeeze(-1)``): its name, rows and the positions within a point it
        reads.  An embedding fed something computed from x (``x + 1``) is not recorded: its range
        in x is not known."""
        if xp.is_floating_point():
            return []
        per_point = xp[0].numel()
        base, span = xp.storage_offset(), xp.numel()
        storage = xp.untyped_storage().data_ptr()

        def hook(name, module):
            def record(_module, args):
                a = args[0] if args else None
                if (not isinstance(a, torch.Tensor) or a.device != xp.device or not a.numel()
                        or a.untyped_storage().data_ptr() != storage):
                    return
                offset = a.storage_offset() - base
                reach = offset + sum((n - 1) * st for n, st in zip(a.shape, a.stride()))
                if offset < 0 or reach >= span or min(a.stride(), default=0) < 0:
                    return
                flat = torch.as_strided(torch.arange(span), a.shape, a.stride(), offset)
                found.append((name, module.num_embeddings, torch.unique(flat % per_point).to(xp.device)))
            return record

        return [m.register_forward_pre_hook(hook(n, m)) for n, m in self.model.named_modules()
                if isinstance(m, nn.Embedding)]

    def _probe(self, tasks: TaskBatch) -> torch.Tensor:
        # One forward on two points catches shape mismatches that torch would broadcast silently
        # (MSE of [B, 1] against [B, 3]) or report from deep inside a layer.
        # contiguous (a view of x when x is): the id check's positions are read from its layout
        xp = tasks.x[0, :2].contiguous()
        found: list = []
        handles = self._hook_id_readers(xp, found)
        with torch.no_grad(), modes_kept(self.model):
            try:
                self.model.eval()
                # on copies of the buffers: a forward that writes one (a call counter, a custom running
                # average) changed the meta-model's, which every backend leaves untouched
                out = functional_call(self.model, {n: b.clone() for n, b in self.model.named_buffers()}, (xp,))
            except Exception as exc:  # noqa: BLE001 - re-raised with the shapes that caused it
                if found:  # an id out of range among the probed points: say so, not torch's IndexError
                    self._check_ids(tasks.x, found)
                if not tasks.x.dtype.is_floating_point and not any(isinstance(m, nn.Embedding)
                                                                    for m in self.model.modules()):
                    # integer ids are for a model that starts with an nn.Embedding (QA74: the
                    # message blamed the shape, torch's dtype complaint last)
                    raise ValueError(f"the model cannot take task inputs of dtype {tasks.x.dtype}: integer inputs "
                                     f"are ids, for a model that starts with an nn.Embedding, and this model takes "
                                     f"floating inputs; convert x, e.g. TaskBatch(x.float(), y)") from exc
                raise ValueError(f"the model cannot take task inputs of shape {tuple(tasks.x.shape[2:])} "
                                 f"per point: {exc}") from exc
            finally:
                for h in handles:
                    h.remove()
        self._id_readers[(tuple(tasks.x.shape[2:]), tasks.x.dtype)] = tuple(found)
        if isinstance(out, (tuple, list, dict)) and loss_name(self.loss) is None and _output_leaves(out) is None:
            # a callable loss was given: what it cannot take is an output holding something else (QA50)
            raise TypeError(f"the model returns a {type(out).__name__} that holds something other than tensors "
                            f"(None, a number, a string); a callable loss takes a tensor or a tuple, list or dict "
                            f"of tensors: return only tensors")
        if not isinstance(out, torch.Tensor) and (loss_name(self.loss) is not None or _output_leaves(out) is None):
            raise TypeError(f"the model must return a tensor (predictions [batch, ...]) for the loss, got "
                            f"{type(out).__name__} (a tuple, list or dict of tensors, e.g. several heads, "
                            f"needs a callable loss that takes it)")
        return out

    def _check_differentiable(self, tasks: TaskBatch, out: torch.Tensor) -> None:
        """The model's predictions must depend on its parameters: an integer output (``.long()``,
        ``.argmax()``) or a detached one gave backend torch zero gradients (the model never moved,
        silently) and failed inside backward on reference ("element 0 of tensors does not require
        grad").  One more forward on the probe's two points, with autograd on (once per shape)."""
        dtypes = [t.dtype for t in _output_leaves(out)]
        if not any(t.is_floating_point for t in dtypes):
            raise TypeError(f"the model returns {dtypes[0] if len(dtypes) == 1 else dtypes} predictions; they must "
                            f"be floating point (an integer output has no gradient, so the inner steps could not "
                            f"train it)")
        # the caller may hold no_grad / inference_mode (even have built the model under it): the
        # inner loops run with autograd on anyway, on copies of the parameters and buffers
        with torch.inference_mode(False), torch.enable_grad(), modes_kept(self.model):
            self.model.eval()
            state = {n: p.detach().clone().requires_grad_(True) for n, p in self.model.named_parameters()}
            state.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
            pred = functional_call(self.model, state, (tasks.x[0, :2].clone(),))
        if not any(t.requires_grad for t in _output_leaves(pred) or ()):
            raise ValueError("the model's output does not depend on its parameters (detached, or computed "
                             "without autograd): the inner steps would have no gradient")

    def _check_callable_loss(self, out: torch.Tensor, tasks: TaskBatch) -> None:
        """A callable loss must give one floating-point number per minibatch."""
        # one detached leaf per output tensor (several heads: a tuple, list or dict of them)
        pred = tree_map(lambda t: t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                        else t, out)
        try:
            with torch.enable_grad():
                value = resolve_loss(self.loss)(pred, tasks.y[0, :2])
        except Exception as exc:  # noqa: BLE001 - re-raised naming the loss
            raise ValueError(f"the loss callable failed on a model output {_describe(out)} and targets "
                             f"{tuple(tasks.y[0, :2].shape)}: {exc}") from exc
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
            raise TypeError("the loss callable must return a 0-dim floating-point tensor (the mean loss), got "
                            + (f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                               else type(value).__name__))
        if any(t.requires_grad for t in _output_leaves(pred)) and not value.requires_grad:
            # a detached loss: backend torch took a zero gradient (the model never moved), reference
            # failed inside backward ("element 0 of tensors does not require grad")
            raise ValueError("the loss callable's result does not depend on the prediction (detached, or computed "
                             "without autograd): the inner steps would have no gradient")

    def indices(self, indices: torch.Tensor, tasks: TaskBatch, rows: int) -> torch.Tensor:
        """A user's plan: long ``[T, rows, B]`` on the model's device, values in ``[0, N)``; returned
        contiguous (every backend then sees the plain layout, whose results the tests pin)."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != torch.long:
            raise TypeError(f"indices must be torch.long, got {indices.dtype}")
        _check_dense_plan(indices)
        if indices.dim() != 3 or indices.shape[0] != tasks.n_tasks or indices.shape[1] != rows \
                or indices.shape[2] < 1:
            raise ValueError(f"indices must have shape [tasks={tasks.n_tasks}, steps={rows}, batch], "
                             f"got {tuple(indices.shape)}")
        if indices.device != self.device:
            raise ValueError(f"indices are on {indices.device} but the model is on {self.device}")
        if indices.numel() == 0:  # a plan of 0 steps (evaluate(steps=0, indices=...)): nothing to range-check
            return indices
        lo, hi = (int(v) for v in torch.stack([indices.min(), indices.max()]).tolist())
        if lo < 0 or hi >= tasks.n_points:
            raise ValueError(f"indices must lie in [0, {tasks.n_points}), got values in [{lo}, {hi}]")
        return indices.contiguous()
