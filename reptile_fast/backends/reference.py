"""Backend "reference": the seed's way, one deep-copied nn.Module and torch.optim per task.

Slow and obviously right: the oracle the batched backends are compared with.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..losses import resolve_loss
from ..validation import attribute_tensors, check_choice
from .base import Backend, InnerConfig, InnerResult

__all__ = ["ReferenceBackend", "CarriedOptimizerState", "ADAM_STATES", "check_adam_state", "task_copy"]

#: ``Reptile(adam_state=...)``: "fresh", a new inner Adam per task (tasks independent, batched
#: backends); "carried", one Adam state carried from task to task (the official code's)
ADAM_STATES = ("fresh", "carried")


def check_adam_state(value, inner_optimizer, backend) -> str:
    """``value`` as a plain str if it names an ``ADAM_STATES`` entry that ``inner_optimizer`` and
    ``backend`` can run, else a TypeError/ValueError naming what to change."""
    value = check_choice("adam_state", value, ADAM_STATES)
    if value == "carried" and inner_optimizer != "adam":
        raise ValueError(f"adam_state='carried' carries the inner Adam's state from task to task; the inner "
                         f"optimizer is {inner_optimizer!r}: pass inner_optimizer='adam'")
    if value == "carried" and backend != "reference":
        raise ValueError(f"adam_state='carried' runs the tasks one after another, each from the Adam state the "
                         f"task before left, which only backend 'reference' does; got backend={backend!r}: pass "
                         f"backend='reference'")
    return value


def make_inner_optimizer(params, config: InnerConfig) -> torch.optim.Optimizer:
    """The per-task inner optimizer: plain SGD (the seed's) or Adam with the configured betas."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    raise ValueError(f"inner optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


class CarriedOptimizerState:
    """One inner-optimizer state carried from task to task (``Reptile(adam_state="carried")``),
    as the official supervised-reptile code keeps one Adam for all its inner loops.

    ``state``: a ``torch.optim`` ``state_dict()`` (None before the first task).  A training call
    (``update`` True) starts each task from the state the previous task left and leaves the last
    task's as ``pending``; the stepper ``commit``s it once the outer update is applied, only if
    that meta-step was applied (a non-finite meta-step, and every one the outer guard skips after
    it, leave the state as φ: as it was).  An adaptation call (``frozen()``) starts every task
    from the same, unchanged state, as the official ``evaluate`` restores it after each test task.
    """

    def __init__(self, state=None):
        self.state = state
        self.pending = None
        self.update = True

    @contextlib.contextmanager
    def frozen(self):
        """A context in which inner loops read the state and never change it."""
        before, self.update = self.update, False
        try:
            yield self
        finally:
            self.update = before

    def start(self, optimizer: torch.optim.Optimizer, state) -> None:
        if state is not None:
            # the moments and step count only: the learning rate and betas stay this optimizer's
            # (the trainer's current settings); a deep copy, since load_state_dict keeps the tensors
            # it is given and Adam updates them in place, which would change the carried state
            optimizer.load_state_dict({"state": copy.deepcopy(state["state"]),
                                       "param_groups": optimizer.state_dict()["param_groups"]})

    def commit(self, applied: bool) -> None:
        """Keep the pending state if its meta-step was ``applied`` and its moments are finite."""
        pending, self.pending = self.pending, None
        if pending is None or not applied:
            return
        tensors = [v for per in pending["state"].values() for v in per.values() if isinstance(v, torch.Tensor)]
        if all(bool(torch.isfinite(t).all()) for t in tensors):
            self.state = pending


def task_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)`` for one task's inner loop, with the tensors a forward left outside
    the parameters and buffers copied detached.  deepcopy refuses a tensor that is not a graph
    leaf ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol"), and a forward leaves such tensors behind: an activation kept for plotting
    (``self.features = h``, or in a dict, after the trainer's own input check ran a forward),
    ``torch.nn.utils.prune``'s masked weight (recomputed from ``weight_orig`` before each forward).
    A view of a parameter kept as an attribute is refused when the trainer is built
    (``validation.check_meta_model``): detached, it would untie silently."""
    memo = {}
    for _, value in attribute_tensors(model):
        if not value.is_leaf:
            memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


class ReferenceBackend(Backend):
    name = "reference"
    #: a ``CarriedOptimizerState`` the inner loops start from and update, or None (a fresh
    #: optimizer per task, the seed's way)
    carried = None

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
        carried = self.carried
        state = carried.state if carried is not None else None
        for i in range(T):
            task_model = task_copy(model)
            params = list(task_model.parameters())
            optimizer = make_inner_optimizer(params, config)
            if carried is not None:
                carried.start(optimizer, state)
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
            if carried is not None and carried.update:
                state = optimizer.state_dict()  # the next task starts from it
        if carried is not None and carried.update:
            carried.pending = state  # committed by the stepper if the meta-step is applied
        stacked = {n: torch.stack(v) for n, v in adapted.items()}
        meta_stacked = {n: torch.stack(v) for n, v in meta.items()} if meta is not None else None
        return InnerResult(params=stacked, losses=losses, meta_grads=meta_stacked)
