"""Backend "torch": every task's inner loop at once, for any ``nn.Module``, wherever PyTorch runs.

Two paths behind one backend, chosen per call:

* the batched-MLP fast path (``mlp_batched``): for models that ``extract_mlp_spec`` accepts
  (Linear + tanh/relu/sigmoid/identity chains) with the "mse" or "cross_entropy" loss, batched
  matmuls with a hand-written backward, no autograd and no ``vmap`` dispatch;
* the generic path: per-task copies of the parameters and buffers stacked ``[T, ...]``, and
  ``torch.func.vmap`` over ``torch.func.grad`` of the loss of ``torch.func.functional_call``,
  for any module (conv nets with BatchNorm, user modules), any loss, SGD or Adam.

Both follow the reference backend's floating-point operations (``torch.optim.SGD``'s
``add_(grad, alpha=-lr)``, ``torch.optim.Adam``'s single-tensor algorithm), so the adapted
parameters agree with it to rounding (the MLP path's documented differences: matmul summation
order, SGD fused into the matmul, tanh as 2σ(2z) − 1 for plain SGD on CPU; see ``mlp_batched``).
``TorchBackend(fast_mlp=False)`` forces the generic path; ``uses_fast_path`` says which one a
call takes.

Measured on the 2-core CPU (bench/results/torch_throughput_cpu*.json): for the sine MLP the MLP
path is 3-4× (meta-batch 256) to 5-10× (meta-batch 1-16) faster than the generic path;
``torch.compile`` of the MLP path ran at 0.5-0.9× of eager at meta-batches 16 and 256 and takes
10-60 s to compile, so it is not used.  On the CPU the MLP path runs in cache-sized task blocks
(``task_block="auto"``): meta-batch 4096 keeps the tasks/s of meta-batch 256
(bench/results/large_meta_batch_cpu.json).
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn
from torch.func import grad, vmap

from ..losses import loss_name, resolve_loss
from ..tasks.base import TaskBatch
from ..validation import check_bool
from .base import (ALGORITHMS, INNER_OPTIMIZERS, Backend, InnerConfig, InnerResult, UnsupportedModelError,
                   functional_call)
from .mlp_batched import (FAST_LOSSES, StackedMLP, default_task_block, gather_minibatches, mlp_forward,
                          mlp_inner_loop)

__all__ = ["TorchBackend", "StackedAdam"]


class _BufferCapture(nn.Module):
    """``model(x)`` and then every named buffer as its slot holds it after the forward.

    Writes in place land in the copies ``functional_call`` was given; a forward that *reassigns*
    a buffer (``self.mu = 0.5 * self.mu + ...``) puts a new tensor into the slot, which
    ``functional_call`` drops when it puts the slots back, so the task's next step saw the old
    value (QA46: φ 0.056 away from reference's deep copies, silently).  Read inside the call,
    both kinds carry over to the next step, as in a deep-copied module.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model
        # a buffer registered under two names (checked in forward only then)
        self.shared = len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.named_buffers()))

    def __call__(self, x, names):
        # not through Module.__call__: torch's global hooks would run on this wrapper too (and
        # see its (output, buffers) pair); they run on the model's own modules inside ``forward``
        return self.forward(x, names)

    def forward(self, x, names):
        # a buffer registered under two names (``register_buffer("alias", self.c.mu)``) is one
        # slot per name, given the same tensor; a forward that reassigns one name unties them,
        # which one stacked copy per task cannot carry
        before = list(self.m.named_buffers(remove_duplicate=False)) if self.shared else ()
        out = self.m(x)
        after = dict(self.m.named_buffers(remove_duplicate=False))
        groups: Dict[int, list] = {}
        for n, b in before:
            groups.setdefault(id(b), []).append(n)
        for group in groups.values():
            if len(group) > 1 and any(after.get(n) is not after.get(group[0]) for n in group[1:]):
                raise UnsupportedModelError(f"the model's forward reassigned one of the buffer names {group}, which "
                                            f"share one tensor; backend torch keeps one copy per task of each "
                                            f"shared buffer (use backend 'reference')")
        buffers = {}
        for n in names:
            b = after.get(n)
            if not isinstance(b, torch.Tensor):
                raise UnsupportedModelError(f"the model's forward set buffer '{n}' to {type(b).__name__}; backend "
                                            f"torch carries each task's buffers from step to step as tensors")
            buffers[n] = b
        return out, buffers


class StackedAdam:
    """``torch.optim.Adam`` (no weight decay, no amsgrad) for ``T`` tasks' stacked parameters.

    The operations are those of torch's single-tensor Adam (the CPU default), applied to
    ``[T, *shape]`` tensors, so each task's trajectory is the one a fresh ``torch.optim.Adam``
    per task would give; every task has taken the same number of steps, so the bias
    corrections are shared scalars.
    """

    def __init__(self, params: List[torch.Tensor], lr: float, betas, eps: float):
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(betas[0]), float(betas[1]), float(eps)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def step(self, params: List[torch.Tensor], grads: List[torch.Tensor]) -> None:
        """Update ``params`` (``[T, *shape]`` each) in place with their gradients."""
        self.steps += 1
        step = float(self.steps)  # torch keeps the count in a float tensor and reads .item()
        bias_correction1 = 1 - self.beta1 ** step
        bias_correction2 = 1 - self.beta2 ** step
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        for p, g, m, v in zip(params, grads, self.exp_avg, self.exp_avg_sq):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def check_vmappable(model: nn.Module) -> None:
    """``UnsupportedModelError`` for layers ``torch.func.vmap`` cannot run per task (torch 2.14):
    BatchNorm's cumulative average (``momentum=None`` reads its per-task batch count as a Python
    float) in training mode.  (Recurrent layers run: under ``grad`` they decompose into
    batchable ops; ``evaluate``'s gradient-free forward falls back to one task at a time.)"""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.momentum is None and m.training \
                and m.track_running_stats:
            raise UnsupportedModelError(
                f"backend 'torch' cannot run {type(m).__name__} layer '{name}' with momentum=None in "
                f"training mode under torch.func.vmap (its cumulative average reads the batch count as a "
                f"float); give it a momentum, put it in eval mode, or use backend='reference' "
                f"(backend='auto' does)")


def _no_batching_rule(exc: RuntimeError) -> bool:
    return "Batching rule not implemented" in str(exc)


#: torch.func's refusals that do not start with "vmap:": an ``autograd.Function`` without functorch
#: support (a reentrant ``torch.utils.checkpoint``), and a batched tensor's data read on the host
#: (``.numpy()``, ``.data_ptr()`` in forward)
_FUNC_REFUSALS = ("In order to use an autograd.Function with functorch transforms",
                  "Cannot access data pointer of Tensor that doesn't have storage")


def vmap_refused(exc: RuntimeError) -> bool:
    """Whether ``exc`` is ``torch.func.vmap`` refusing an operation of the model: no batching rule
    (a recurrent layer's fused op without autograd), one of vmap's own "vmap: ..." errors
    (``.item()``, e.g. BatchNorm with ``momentum=None`` in training mode), an ``autograd.Function``
    torch.func cannot transform, or a read of a batched tensor's data (``.numpy()``)."""
    text = str(exc)
    return _no_batching_rule(exc) or text.startswith("vmap:") or any(text.startswith(m) for m in _FUNC_REFUSALS)


def _vmap_errors(call: Callable, *args):
    """``call(*args)``, with vmap's own refusals of an operation in the model re-raised as
    ``UnsupportedModelError`` naming the way out."""
    try:
        return call(*args)
    except RuntimeError as exc:
        if vmap_refused(exc):
            first = str(exc).splitlines()[0].rstrip()
            raise UnsupportedModelError(f"backend 'torch' cannot run this model under torch.func.vmap: "
                                        f"{first}{'' if first.endswith('.') else '.'} Use backend='reference'.") from exc
        raise


def _stack(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` contiguous copies of ``t``: ``[n, *t.shape]``."""
    return t.detach().unsqueeze(0).expand(n, *t.shape).clone()


class TorchBackend(Backend):
    """Batched inner loops with PyTorch: ``torch.func`` for any model, batched matmuls for MLPs.

    Args:
        fast_mlp: use the batched-matmul path for plain MLPs (the default); False forces the
            generic ``vmap`` path for every model.
        fast_tanh: on the MLP path, tanh as 2σ(2z) − 1 (vectorised; within 1.8e-7 of
            ``torch.tanh``, absolute).  None (default): on CPU only, where ``torch.tanh`` is a
            scalar loop, and for plain SGD Reptile only (``mlp_batched.default_fast_tanh``: with
            Adam, FOMAML or ``inner_grad_weights`` its absolute error put the results farther
            from a float64 run than the reference's).
        task_block: on the MLP path with SGD (no FOMAML, no ``inner_grad_weights``), run the
            inner loops this many tasks at a time, so that a block's stacked weights stay in cache
            through all its inner steps (same results: the tasks' arithmetic is independent).
            "auto" (default): ``mlp_batched.default_task_block`` on the CPU (about an L2 cache of
            state per block), no blocking on GPUs; None: never; or a positive int.
    """

    name = "torch"

    def __init__(self, fast_mlp: bool = True, fast_tanh: Optional[bool] = None,
                 task_block: Union[int, str, None] = "auto"):
        fast_mlp = check_bool("fast_mlp", fast_mlp)  # numpy's bool too, stored as a bool
        if fast_tanh is not None:
            fast_tanh = check_bool("fast_tanh (or None)", fast_tanh)
        if isinstance(task_block, numbers.Integral) and not isinstance(task_block, bool):
            task_block = int(task_block)  # numpy's integers too (a count), stored as an int
        if not (task_block is None or (isinstance(task_block, str) and task_block == "auto") or
                (isinstance(task_block, int) and not isinstance(task_block, bool) and task_block >= 1)):
            raise ValueError(f"task_block must be 'auto', None or a positive int, got {task_block!r}")
        self.fast_mlp = fast_mlp
        self.fast_tanh = fast_tanh
        self.task_block = task_block

    # ------------------------------------------------------------------ dispatch
    def check_supported(self, model: nn.Module, device: torch.device, config: InnerConfig) -> None:
        if config.optimizer not in INNER_OPTIMIZERS:
            raise UnsupportedModelError(f"backend 'torch' supports inner optimizers {INNER_OPTIMIZERS}, "
                                        f"got {config.optimizer!r}")
        if config.algorithm not in ALGORITHMS:
            raise UnsupportedModelError(f"backend 'torch' supports algorithms {ALGORITHMS}, "
                                        f"got {config.algorithm!r}")
        resolve_loss(config.loss)
        check_vmappable(model)

    def mlp_spec(self, model: nn.Module):
        """The model's ``MLPSpec``, or None when it is not a plain MLP (or has forward hooks,
        which the hand-written path would not run).

        Cached per model and re-derived when its submodules change (a layer swapped in place).
        """
        from ..mlp_spec import cached_mlp_spec

        try:
            return cached_mlp_spec(model)
        except UnsupportedModelError:
            return None

    def uses_fast_path(self, model: nn.Module, tasks: TaskBatch, config: InnerConfig) -> bool:
        """Whether ``inner_loop`` takes the batched-MLP path for this model, data and config."""
        return self._fast_spec(model, tasks, config) is not None

    def _fast_spec(self, model: nn.Module, tasks: TaskBatch, config: InnerConfig):
        """The ``MLPSpec`` the batched-MLP path runs, or None when it does not apply."""
        name = loss_name(config.loss)
        if not self.fast_mlp or name not in FAST_LOSSES:
            return None
        spec = self.mlp_spec(model)
        if spec is None or tasks.x.dim() != 3 or tasks.x.shape[2] != spec.dims[0]:
            return None
        if tasks.is_classification:
            return spec if name == "cross_entropy" else None
        return spec if name == "mse" and tasks.y.shape[2] == spec.dims[-1] else None

    def _task_block(self, spec, tasks: TaskBatch, batch: int) -> Optional[int]:
        if self.task_block != "auto":
            return self.task_block
        if tasks.device.type != "cpu":
            return None
        return default_task_block(spec, batch, tasks.x.element_size())

    def inner_loop(self, model: nn.Module, tasks: TaskBatch, indices: torch.Tensor,
                   config: InnerConfig) -> InnerResult:
        self.check_plan(tasks, indices, config)
        if self.validate:  # inside Reptile its InputChecker checked the data where it entered
            self.check_data(model, tasks)
        steps = config.train_steps(indices.shape[1])
        if steps < 1:
            raise ValueError(f"the plan has {indices.shape[1]} rows: no inner step to take")
        spec = self._fast_spec(model, tasks, config)
        if spec is not None:
            return self._mlp_inner_loop(model, tasks, indices, config, spec)
        # torch.func.grad under a caller's inference_mode() returned zero gradients on torch 2.11
        # (the GPU machine's version): no inner step at all, silently.  Training is training.
        with torch.inference_mode(False), torch.enable_grad():
            return self._vmap_inner_loop(model, tasks, indices, config)

    # ------------------------------------------------------------------ fast path
    def _mlp_inner_loop(self, model, tasks, indices, config: InnerConfig, spec) -> InnerResult:
        named = dict(model.named_parameters())
        # φ is copied into the per-task parameters inside mlp_inner_loop (block by block when it
        # runs in task blocks: each copy lands in cache right before its block runs).
        first = named[spec.weight_names[0]]
        params = StackedMLP.empty(spec, tasks.n_tasks, dtype=first.dtype, device=first.device)
        xs, ys = gather_minibatches(tasks.x, tasks.y, indices)
        adam = StackedAdam([params.flat], config.lr, config.adam_betas, config.adam_eps) \
            if config.optimizer == "adam" else None
        out = mlp_inner_loop(spec, params, xs, ys, lr=config.lr, loss=loss_name(config.loss),
                             fomaml=config.algorithm == "fomaml", grad_weights=config.grad_weights,
                             fast_tanh=self.fast_tanh, optimizer=adam,
                             task_block=self._task_block(spec, tasks, indices.shape[2]), init=named)
        adapted = out.params.named()
        meta = None
        if out.meta_grads is not None:
            g = out.meta_grads.named()
            meta = {n: g[n] for n in named}
        return InnerResult(params={n: adapted[n] for n in named}, losses=out.losses, meta_grads=meta)

    # ------------------------------------------------------------------ generic path
    @staticmethod
    def _functional_loss(model: nn.Module, loss_fn: Callable) -> Callable:
        """One task's ``(params, buffers, x, y) -> (loss, (loss, new_buffers))``."""
        wrapper = _BufferCapture(model)

        def task_loss(params, buffers, x, y):
            # functional_call writes BatchNorm's running statistics into the buffers it is given:
            # give it this task's own copies and hand them back, as a deep-copied module keeps them.
            state = {"m." + k: v for k, v in params.items()}
            state.update({"m." + k: v.clone() for k, v in buffers.items()})
            out, buffers = functional_call(wrapper, state, (x, tuple(buffers)))
            loss = loss_fn(out, y)
            if loss.dim() != 0:
                loss = loss.reshape(())
            return loss, (loss.detach(), buffers)

        return task_loss

    def _vmap_inner_loop(self, model, tasks, indices, config: InnerConfig) -> InnerResult:
        loss_fn = resolve_loss(config.loss)
        T, R = indices.shape[0], indices.shape[1]
        steps = config.train_steps(R)
        names = [n for n, _ in model.named_parameters()]
        params = {n: _stack(p, T) for n, p in model.named_parameters()}
        buffers = {n: _stack(b, T) for n, b in model.named_buffers()}
        xs, ys = gather_minibatches(tasks.x, tasks.y, indices)
        step_grads = vmap(grad(self._functional_loss(model, loss_fn), has_aux=True), randomness="different")
        losses = torch.empty(T, steps, dtype=next(model.parameters()).dtype, device=tasks.device)
        plist = [params[n] for n in names]
        adam = StackedAdam(plist, config.lr, config.adam_betas, config.adam_eps) \
            if config.optimizer == "adam" else None
        acc = [torch.zeros_like(p) for p in plist] if config.grad_weights is not None else None
        for s in range(steps):
            grads, (loss, buffers) = _vmap_errors(step_grads, params, buffers, xs[s], ys[s])
            losses[:, s] = loss
            glist = [grads[n] for n in names]
            if acc is not None:
                w = config.grad_weights[s]
                for a, g in zip(acc, glist):
                    a += w * g
            if adam is not None:
                adam.step(plist, glist)
            else:
                for p, g in zip(plist, glist):
                    p.add_(g, alpha=-config.lr)
        meta = None
        if config.algorithm == "fomaml":
            grads, _ = _vmap_errors(step_grads, params, buffers, xs[steps], ys[steps])
            meta = {n: grads[n] for n in names}
        elif acc is not None:
            meta = dict(zip(names, acc))
        return InnerResult(params=params, losses=losses, meta_grads=meta)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, params: Dict[str, torch.Tensor], tasks: TaskBatch,
                 config: InnerConfig) -> torch.Tensor:
        """Loss of each task on all its points at its own parameters, all tasks at once: ``[T]``.

        Same semantics as ``Backend.evaluate``: BatchNorm in train mode uses each task's batch
        statistics, and the model's running statistics stay untouched.
        """
        T = tasks.n_tasks
        self.check_params(model, params, T)
        if self.validate:  # inside Reptile its InputChecker checked the data where it entered
            self.check_data(model, tasks)
        with torch.no_grad():
            if self.uses_fast_path(model, tasks, InnerConfig(loss=config.loss)):
                spec = self.mlp_spec(model)
                out = mlp_forward(spec, [params[n] for n in spec.weight_names],
                                  [params[n] for n in spec.bias_names], tasks.x, fast_tanh=False)
                if tasks.is_classification:
                    logp = torch.log_softmax(out, dim=-1)
                    return -logp.gather(-1, tasks.y.unsqueeze(-1)).squeeze(-1).mean(1)
                return (out - tasks.y).square().mean(dim=(1, 2))
            loss_fn = resolve_loss(config.loss)
            buffers = {n: _stack(b, T) for n, b in model.named_buffers()}
            task_loss = self._functional_loss(model, loss_fn)
            try:
                loss, _ = vmap(lambda p, b, x, y: task_loss(p, b, x, y)[1], randomness="different")(
                    params, buffers, tasks.x, tasks.y)
            except RuntimeError as exc:
                if not _no_batching_rule(exc):
                    raise
                # e.g. recurrent layers: without autograd they run one fused op that has no batching
                # rule; the same losses one task at a time (evaluation only, no gradients)
                loss = torch.stack([
                    task_loss({n: v[i] for n, v in params.items()}, {n: v[i] for n, v in buffers.items()},
                              tasks.x[i], tasks.y[i])[0] for i in range(T)])
            return loss
