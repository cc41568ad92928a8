"""The core every training path shares: the data, the inner-loop contract and the one outer update.

One meta-step of Reptile (Nichol, Achiam, Schulman 2018):

    tasks  ──sample_indices──▶  plan [T, R, B]
    backend.inner_loop(φ, tasks, plan)  ──▶  InnerResult: φ̃_i [T, ...], losses [T, S]
    per_task_deltas  ──▶  D_i = φ̃_i − φ            (or −g_i: FOMAML / weighted inner gradients)
    reducer          ──▶  mean_i D_i, mean loss    (one process: mean over dim 0;
                                                    torch.distributed: a collective)
    OuterUpdate      ──▶  φ ← φ + ε · mean_i D_i   (or an outer optimizer's step on −mean D)

``OuterUpdate`` is the only place φ changes during training.  It never reads a tensor value on
the host: a meta-step whose loss or update is not finite is skipped on the device (a select),
and from then on every update is skipped until ``check()`` — called by the training loop at its
reads — raises ``NonFiniteError`` naming the first bad meta-step, with φ exactly as after the
meta-step before it.  (An outer ``torch.optim`` optimizer cannot be skipped on the device: with
one, every meta-step reads one flag after the optimizer's step, which is undone, state included,
if the meta-step's loss or deltas were not finite, or the step overflowed φ or the optimizer's
per-parameter state.  An optimizer with step hooks reads the deltas' flag before its step too,
and skips it when they are not finite, so its hooks see no step that is then undone.)
"""
from __future__ import annotations

import copy
import math
from numbers import Integral, Real
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .backends.base import InnerConfig, InnerResult
from .tasks.base import TaskBatch, sample_indices

__all__ = ["TaskBatch", "sample_indices", "InnerConfig", "InnerResult", "NonFiniteError",
           "Reducer", "per_task_deltas", "local_mean", "OuterUpdate", "all_finite"]

#: ``reducer(deltas, losses) -> (mean_deltas, mean_loss)``: per-task deltas ``[T_local, *shape]``
#: of every parameter and losses ``[T_local, S]`` to the meta-batch's means (``[*shape]`` each,
#: 0-dim).  ``local_mean`` on one process; ``reptile_fast.distributed`` across processes.
Reducer = Callable[[List[torch.Tensor], torch.Tensor], Tuple[List[torch.Tensor], torch.Tensor]]


#: the end of every NonFiniteError message from the trainer (the drop-in words it its own way)
NONFINITE_HINT = "Lower inner_lr/outer_lr or check the data."


class NonFiniteError(FloatingPointError):
    """A meta-step produced a NaN or infinite loss or update; φ was left as it was before it.

    Attributes: ``iteration`` (the first bad meta-step, 1-based), and from ``fit`` the last good
    checkpoint (``checkpoint``: its path or None, ``checkpoint_iteration``), which ``fit`` never
    overwrites with a failed state.
    """

    def __init__(self, message: str, *, iteration: Optional[int] = None,
                 checkpoint: Optional[str] = None, checkpoint_iteration: Optional[int] = None):
        super().__init__(message)
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.checkpoint_iteration = checkpoint_iteration


def per_task_deltas(params: Sequence[Tuple[str, torch.Tensor]], result: InnerResult) -> List[torch.Tensor]:
    """Each task's update direction ``[T, *shape]`` per parameter, in ``params``' order.

    Reptile: ``φ̃_i − φ``.  FOMAML or weighted inner gradients: ``−g_i`` (the negated
    pseudo-gradient, so that ``φ + ε · mean D`` is a descent step in both cases).
    """
    if result.meta_grads is None:
        return [result.params[n] - p for n, p in params]
    return [-result.meta_grads[n] for n, _ in params]


def local_mean(deltas: List[torch.Tensor], losses: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The one-process reducer: means over the task dimension (one task: the delta itself, so
    the update is the seed's ``φ + ε(φ̃ − φ)`` bit for bit)."""
    return [d.mean(0) for d in deltas], losses.mean()


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor on the tensors' device: True when no element of any tensor is NaN or ±inf.

    Reads each tensor once, with ``torch.aminmax`` (NaN propagates to both ends, and ±inf is one
    of them; empty tensors are skipped).  ``isfinite(t).all()`` computes the same answer through a
    bool tensor as large as ``t`` (the guard's cost before and after: bench/results/
    outer_update_trees_cpu.json); on a GPU it is one kernel per tensor instead of three."""
    ends = []
    for t in tensors:
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.numel() and t.is_floating_point():  # (integers and bools are always finite)
            if t.element_size() == 1:
                t = t.float()  # float8 formats: torch has no aminmax for them (exact in float32)
            ends.extend(torch.aminmax(t))
    if not ends:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if len(tensors) else None)
    if any(e.dtype != ends[0].dtype or e.device != ends[0].device for e in ends):
        # (mixed dtypes: a float64 value beyond float32's range must not read as inf)
        finite = torch.isfinite(ends[0])
        for e in ends[1:]:
            finite = finite & torch.isfinite(e)
        return finite
    return torch.isfinite(torch.stack(ends)).all()


#: torch.optim's hyper-parameters that inf turns into NaN or inf in φ.  Other keys may use inf
#: for "no limit" (a custom optimizer's max norm): only NaN, never meaningful, is refused there.
_FINITE_OPTIMIZER_KEYS = frozenset({"momentum", "dampening", "weight_decay", "betas", "eps", "alpha", "rho",
                                    "lr_decay", "initial_accumulator_value", "etas", "step_sizes", "lambd",
                                    "momentum_decay", "beta1", "beta2"})  # (ASGD's t0=inf: never average)


def check_outer_optimizer_lr(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    """ValueError naming a hyper-parameter of ``optimizer`` that would turn φ into NaN silently
    or that ``torch.optim`` takes and then fails on deep inside.

    The learning rate must lie in ``[0, largest dtype value]`` (above it torch failed with "value
    cannot be converted to type float without overflow"; NaN and inf turned φ into NaN: torch
    only refuses lr < 0).  Every other number of a param group (momentum, weight decay, betas,
    eps, ...) must not be NaN, and torch.optim's own ones not inf: torch takes NaN momentum or
    weight decay and writes NaN into φ.  A positive ``eps`` must not round to 0 in ``dtype``
    (Adam's default 1e-8 in float16: 0/0 where a pseudo-gradient element is 0), except in a
    ``fused`` group (float32 arithmetic).
    Reads host values only (a tensor hyper-parameter is left to torch)."""
    top = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2  # half the least subnormal
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if not isinstance(lr, torch.Tensor) and (isinstance(lr, bool) or not isinstance(lr, Real)
                                                 or not 0 <= lr <= top):
            raise ValueError(f"outer_optimizer's learning rate (param_groups[{i}]['lr']) must be a finite number "
                             f"in [0, {top:.4g}] for {dtype} parameters, got {lr!r}")
        for key, value in group.items():
            values = value if isinstance(value, (tuple, list)) and key != "params" else (value,)
            for v in values:
                # (an Integral is never NaN or inf, and math.isnan(10**400) overflows)
                if isinstance(v, Real) and not isinstance(v, (bool, Integral)) and (
                        math.isnan(v) or (math.isinf(v) and key in _FINITE_OPTIMIZER_KEYS)):
                    raise ValueError(f"outer_optimizer's param_groups[{i}][{key!r}] must be finite, got {value!r}")
                if key == "eps" and isinstance(v, Real) and 0 < v <= tiny and not group.get("fused"):
                    # torch adds eps in the parameters' dtype (its fused kernels in float32): Adam's
                    # default 1e-8 is 0 in float16, and where a pseudo-gradient element is 0 (or its
                    # square underflows) the step divides by 0: NaN/inf in φ at the first meta-step
                    raise ValueError(
                        f"outer_optimizer's param_groups[{i}]['eps'] = {v!r} is 0 in {dtype} (values up to "
                        f"{tiny:.3g} round to 0), so its step divides by zero where a pseudo-gradient element "
                        f"is 0: use eps=1e-4 or larger for {dtype} parameters, or float32 parameters")


def check_outer_optimizer_kind(optimizer: torch.optim.Optimizer) -> None:
    """ValueError for an optimizer that cannot take Reptile's dense pseudo-gradient with a plain
    ``step()``: one whose ``step`` needs a closure (``LBFGS``), ``SparseAdam`` (sparse gradients
    only), or a ``capturable=True`` group over parameters torch cannot capture (CPU).  torch failed
    at the first meta-step instead, with its own TypeError/RuntimeError/AssertionError."""
    import inspect

    name = type(optimizer).__name__
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        closure = None
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"outer_optimizer {name} needs a closure in step() (it re-evaluates the loss), which "
                         f"Reptile's pseudo-gradient cannot give: use a first-order optimizer (SGD, Adam, ...)")
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise ValueError("outer_optimizer SparseAdam takes sparse gradients only; Reptile's pseudo-gradient is "
                         "dense: use Adam")
    for i, group in enumerate(optimizer.param_groups):
        if group.get("capturable"):
            for p in group["params"]:
                if p.device.type == "cpu":
                    raise ValueError(f"outer_optimizer's param_groups[{i}] has capturable=True, which torch runs "
                                     f"on accelerator parameters only; a parameter is on the CPU: use "
                                     f"capturable=False")


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` runs step hooks (its own or torch's global ones)."""
    from torch.optim import optimizer as optim_module
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(optim_module, "_global_optimizer_pre_hooks", None)
                or getattr(optim_module, "_global_optimizer_post_hooks", None))


def _copied(value, memo: dict):
    """A deep copy of a non-tensor optimizer value, or the value itself where it cannot be copied."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # (most values: no deepcopy machinery per meta-step)
    try:
        return copy.deepcopy(value, memo)
    except Exception:  # noqa: BLE001 - not copyable (TypeError, pickling errors): keep it
        return value


class _StepSnapshot:
    """φ, an outer optimizer's per-parameter state and its param groups' values (other than the
    parameters) as before its step, to put back when the step is undone.

    The values are copied into buffers kept from one meta-step to the next (a fresh clone of
    every state tensor per meta-step doubled ``apply`` for a 264k-parameter MLP with Adam on the
    CPU: the allocations, not the copies), and put back into the same tensor objects, so
    anything holding them (a state tensor shared by several parameters, a compiled or captured
    optimizer step) still sees the optimizer's own state.  Other values are deep-copied, or kept
    as they are where they cannot be copied (a lock, a stream: torch.optim replaces such values
    rather than changing them, and a custom optimizer holding one trained before the undo existed).
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self._phi = [torch.empty_like(p) for p in self.params]
        self._buffers: dict = {}  # id(state tensor) -> (that tensor, its buffer)

    def take(self, optimizer: torch.optim.Optimizer) -> tuple:
        torch._foreach_copy_(self._phi, self.params)  # one device and dtype (check_meta_model)
        state = optimizer.state
        memo = {id(p): p for p in self.params}
        saved, live, buffers = [], [], {}

        def keep(v: torch.Tensor) -> None:
            """Copy ``v`` into its kept buffer, once per tensor (a parameter is put back with φ)."""
            if id(v) in memo:
                return
            memo[id(v)] = v
            kept = self._buffers.get(id(v))
            if kept is None or kept[0] is not v or kept[1].shape != v.shape \
                    or kept[1].dtype != v.dtype or kept[1].device != v.device:
                kept = (v, torch.empty_like(v))
            buffers[id(v)] = kept
            kept[1].copy_(v)  # (one by one: Adam's step count may sit on the CPU)
            live.append(kept)

        def snapshot(values) -> dict:
            """``values`` as they are now: tensors kept in buffers, the rest deep-copied."""
            out = {}
            for k, v in values:
                if isinstance(v, torch.Tensor):
                    keep(v)
                    out[k] = v
                else:
                    out[k] = _copied(v, memo)
            return out

        for p in self.params:
            own = state.get(p)  # (one Tensor.__hash__ call, and no entry made in the defaultdict)
            saved.append(None if own is None else snapshot(own.items()))
        # A param group's own values: an optimizer may keep state there (D-Adaptation's and
        # Prodigy's step count and scale d), which an undone step must not keep either (a list the
        # step appends to in place included: deep copies, as the state's).
        groups = [snapshot((k, v) for k, v in group.items() if k != "params") for group in optimizer.param_groups]
        self._buffers = buffers  # tensors the state no longer holds are let go
        return saved, live, groups

    def restore(self, optimizer: torch.optim.Optimizer, taken: tuple) -> None:
        saved, live, groups = taken
        torch._foreach_copy_(self.params, self._phi)
        for v, buffer in live:
            v.copy_(buffer)
        for p, s in zip(self.params, saved):
            if s is None:
                optimizer.state.pop(p, None)
            else:
                optimizer.state[p] = s
        for group, values in zip(optimizer.param_groups, groups):
            for k in [k for k in group if k != "params" and k not in values]:
                del group[k]  # (a value the undone step added)
            group.update(values)


class OuterUpdate:
    """``φ ← φ + ε · mean_i D_i`` on a model's parameters, with the device-side finiteness guard.

    Args:
        params: the model's ``(name, parameter)`` pairs (φ), updated in place.
        outer_optimizer: a ``torch.optim.Optimizer`` over exactly those parameters, fed the
            pseudo-gradient ``−mean D`` instead of the interpolation (optional).
    """

    def __init__(self, params: Sequence[Tuple[str, torch.Tensor]],
                 outer_optimizer: Optional[torch.optim.Optimizer] = None):
        self.params = list(params)
        self.outer_optimizer = outer_optimizer
        device = self.params[0][1].device
        # healthy: no bad meta-step since the last check; first_bad: its 1-based number (0: none)
        self._healthy = torch.ones((), dtype=torch.bool, device=device)
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)
        self._snapshot: Optional[_StepSnapshot] = None  # φ and the outer optimizer's state before its step

    @torch.no_grad()
    def apply(self, mean_deltas: List[torch.Tensor], mean_loss: torch.Tensor, eps, iteration: int) -> None:
        """Apply meta-step ``iteration`` (1-based) with outer step ``eps`` (a float or 0-dim tensor).

        Reads nothing on the host (except with an outer optimizer: see the module docstring)."""
        tensors = [p for _, p in self.params]
        if self.outer_optimizer is not None:
            self._optimizer_step(tensors, mean_deltas, mean_loss, iteration)
            return
        # φ + ok·ε·D would turn a NaN D into NaN; select instead.  Written as the seed writes it,
        # φ + ε·(φ̃ − φ), so one task reproduces the seed bit for bit; all parameters in one
        # _foreach call, so a Ctrl-C (handled between bytecodes) cannot split the update.
        # The guard reads the new φ, not only D: a finite D times a large ε (1e300: inf in fp32,
        # or an fp16 model's 7e4) overflowed into φ unnoticed.
        steps = torch._foreach_mul(mean_deltas, eps)
        finite = all_finite([mean_loss, *torch._foreach_add(tensors, steps)])
        ok = finite & self._healthy
        steps = [torch.where(ok, s, 0.0) for s in steps]
        torch._foreach_add_(tensors, steps)
        self._mark_bad(finite, iteration)

    def _optimizer_step(self, tensors: List[torch.Tensor], mean_deltas: List[torch.Tensor],
                        mean_loss: torch.Tensor, iteration: int) -> None:
        """The outer optimizer's step on the pseudo-gradient ``−mean D``, undone (φ and state) when
        the meta-step is not good; one host read.

        A torch.optim step cannot be skipped on the device, so it always runs, with NaN and ±inf
        in the pseudo-gradient set to 0 (no NaN reaches the optimizer), and is
        undone after it when anything was not finite: the deltas, or what the step made of φ (a
        finite pseudo-gradient times lr=3e38), or only the optimizer's per-parameter state (Adam's
        second moment of a pseudo-gradient beyond ~5.8e20 in fp32 is inf while φ stays finite, and
        that weight would never move again).  As the interpolation's guard, φ and the state
        (momentum, moments, step count) are then as before the step, and this meta-step is the
        one reported."""
        optimizer = self.outer_optimizer
        finite = all_finite([mean_loss, *mean_deltas])
        check_outer_optimizer_lr(optimizer, tensors[0].dtype)  # a scheduler may have set it
        if _has_step_hooks(optimizer) and not bool(finite & self._healthy):
            # Step hooks (an EMA of the weights, a step counter) would see a step that is then
            # undone: with hooks, bad deltas skip the step, for one more host read per meta-step.
            self._mark_bad(finite, iteration)
            return
        if self._snapshot is None:
            self._snapshot = _StepSnapshot(tensors)
        taken = self._snapshot.take(optimizer)
        for p, g in zip(tensors, torch._foreach_neg(mean_deltas)):
            # finite pseudo-gradients, in place: a torch.where copy per parameter made this call
            # up to 3x slower on the CPU (one more large allocation per parameter)
            p.grad = g.nan_to_num_(0.0, 0.0, 0.0)

        def undo():
            self._snapshot.restore(optimizer, taken)

        stepped = True
        try:
            optimizer.step()
        except BaseException as exc:
            # Adam's lr / (1 − β1^t) above the dtype's largest value: torch fails half-way
            # through the parameters ("cannot be converted to type float without overflow").
            # Anything else (a custom optimizer's own error, a Ctrl-C outside fit's deferral) is
            # raised with φ and the state as before the step: iteration did not advance.
            if not (isinstance(exc, RuntimeError) and "without overflow" in str(exc)):
                undo()
                raise
            stepped = False
        finally:
            optimizer.zero_grad(set_to_none=True)
        checked = list(tensors)
        for p in tensors:
            own = optimizer.state.get(p)
            # the tensors shaped like the parameter are the ones its update reads (moments,
            # momentum); a custom optimizer may keep other values at inf on purpose
            checked.extend(v for v in (own.values() if own else ())
                           if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape)
        good = finite & all_finite(checked) if stepped else torch.zeros_like(finite)
        if not bool(good & self._healthy):
            undo()
        self._mark_bad(good, iteration)

    def _mark_bad(self, finite: torch.Tensor, iteration: int) -> None:
        first = self._healthy & ~finite
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, iteration), self._first_bad)
        self._healthy = self._healthy & finite

    @property
    def healthy(self) -> torch.Tensor:
        """0-dim bool on the device: no meta-step since the last ``check`` was bad, so the last one
        was applied (a bad one and every later one are skipped until the check)."""
        return self._healthy

    def first_bad(self) -> int:
        """The first non-finite meta-step since the last ``check`` (0: none).  Reads the device."""
        return int(self._first_bad)

    def check(self) -> None:
        """Raise ``NonFiniteError`` (and re-arm) if a meta-step since the last check was not finite."""
        bad = self.first_bad()
        if bad:
            self._healthy.fill_(True)
            self._first_bad.zero_()
            raise NonFiniteError(
                f"meta-step {bad}: non-finite inner loss or update (NaN/inf); the parameters were left "
                f"as they were after meta-step {bad - 1} and no later meta-step was applied. {NONFINITE_HINT}",
                iteration=bad)
