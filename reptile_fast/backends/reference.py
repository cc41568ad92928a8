"""Backend "reference": the seed's way, one deep-copied nn.Module and torch.optim per task.

Slow and obviously right: the oracle the batched backends are compared with.
"""
from __future__ import annotations

import copy

import torch

from ..losses import resolve_loss
from .base import Backend, InnerConfig, InnerResult

__all__ = ["ReferenceBackend"]


def make_inner_optimizer(params, config: InnerConfig) -> torch.optim.Optimizer:
    """The per-task inner optimizer: plain SGD (the seed's) or Adam with the configured betas."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    raise ValueError(f"inner optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


class ReferenceBackend(Backend):
    name = "reference"

    def inner_loop(self, model, tasks, indices, config: InnerConfig) -> InnerResult:
        self.check_plan(tasks, indices, config)
        if self.validate:  # inside Reptile its InputChecker checked the data where it entered
            self.check_data(model, tasks)
        # The inner loop is training (autograd + torch.optim) even when the caller evaluates
        # under torch.no_grad() / inference_mode(), as the batched backends' torch.func does.
        with torch.inference_mode(False), torch.enable_grad():
            return self._inner_loop(model, tasks, indices, config)

    def _inner_loop(self, model, tasks, indices, config: InnerConfig) -> InnerResult:
        loss_fn = resolve_loss(config.loss)
        T, R = indices.shape[0], indices.shape[1]
        steps = config.train_steps(R)
        names = [n for n, _ in model.named_parameters()]
        adapted = {n: [] for n in names}
        meta = {n: [] for n in names} if config.needs_meta_grads else None
        losses = torch.empty(T, steps, dtype=next(model.parameters()).dtype, device=tasks.device)
        for i in range(T):
            task_model = copy.deepcopy(model)
            params = list(task_model.parameters())
            optimizer = make_inner_optimizer(params, config)
            acc = [torch.zeros_like(p) for p in params] if config.grad_weights is not None else None
            for s in range(steps):
                ind = indices[i, s]
                loss = loss_fn(task_model(tasks.x[i][ind]), tasks.y[i][ind])
                optimizer.zero_grad()
                loss.backward()
                if acc is not None:
                    w = config.grad_weights[s]
                    with torch.no_grad():
                        for a, p in zip(acc, params):
                            if p.grad is not None:  # a parameter the loss does not use: gradient zero
                                a += w * p.grad
                optimizer.step()
                losses[i, s] = loss.detach()
            if config.algorithm == "fomaml":
                ind = indices[i, steps]
                final = loss_fn(task_model(tasks.x[i][ind]), tasks.y[i][ind])
                # a parameter the loss does not use (an unused head) has gradient zero, as under
                # torch.func.grad; autograd.grad alone raised "appears to not have been used in the graph"
                grads = torch.autograd.grad(final, params, allow_unused=True, materialize_grads=True)
                for n, g in zip(names, grads):
                    meta[n].append(g.detach())
            elif acc is not None:
                for n, a in zip(names, acc):
                    meta[n].append(a)
            for n, p in zip(names, params):
                adapted[n].append(p.detach())
        stacked = {n: torch.stack(v) for n, v in adapted.items()}
        meta_stacked = {n: torch.stack(v) for n, v in meta.items()} if meta is not None else None
        return InnerResult(params=stacked, losses=losses, meta_grads=meta_stacked)
