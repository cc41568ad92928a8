"""Reducers: every rank's per-task updates → the global mean update, the same on every rank.

A reducer is called once per meta-step as ``reducer(deltas, losses) -> (mean_deltas, mean_loss)``:

* ``deltas``: one tensor per parameter, ``[T_local, *shape]``: this rank's per-task
  ``φ̃_i − φ`` (or negative pseudo-gradients);
* ``losses``: ``[T_local, S]`` inner-step losses;
* returns the means over all ``T = Σ T_local`` tasks of all ranks: ``[*shape]`` per parameter and
  a 0-dim loss.

``local_mean`` is the one-process reduction (``d.mean(0)``, ``losses.mean()``).

``MeanReducer`` (the default): one collective per meta-step of a flat buffer holding every
parameter's ``Σ_i D_i`` over this rank's tasks, ``Σ loss`` and the task count (in float32 for
float16 / bfloat16 models, else in the model's dtype); every rank adds
the ranks' buffers in rank order and divides.  Every rank computes the same bits, so φ stays
identical across ranks; the mean equals one process's within fp32 summation-order rounding (the
sum is grouped by rank).

``OrderedGather``: ``all_gather`` of every rank's per-task rows (padded to the largest share;
uneven shares handled) into ``[T, …]`` in global task order, then exactly ``local_mean`` on the
full tensor: the same bits as one process given the same per-task updates.  End to end (training
equal to one process bit for bit) this also needs a backend whose per-task results do not depend
on how many tasks share a call: true of "reference" (one task at a time); not of "torch" on the
CPU, whose batched matmuls may round differently for another batch count (measured ~1e-8 after
five meta-steps), so there ordered training equals one process within fp32 rounding.  Costs ``T·F`` traffic per rank (the
default: ``W·F``) and two collectives (the shares' sizes, then the rows): for checking.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..core import local_mean as _local_mean  # the one-process reduction: one definition for every path
from .context import DistContext

__all__ = ["local_mean", "MeanReducer", "OrderedGather", "make_reducer", "REDUCTIONS"]

REDUCTIONS = ("mean", "ordered")


def _same_layout(full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``full`` (contiguous ``[T, ...]``) stored with ``local``'s dimension order.

    A backend may return a transposed view (the torch backend's losses are ``[T, S]`` with
    strides ``(1, T)``); a reduction over another layout may sum in another order, so the gathered
    tensor takes the layout one process would have reduced."""
    if local.dim() < 2 or local.is_contiguous():
        return full.contiguous()
    order = sorted(range(local.dim()), key=lambda d: (-local.stride(d), d))
    inverse = [order.index(d) for d in range(local.dim())]
    return full.permute(order).contiguous().permute(inverse)


def _check(deltas, losses) -> int:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 2 or not losses.is_floating_point():
        raise ValueError(f"losses must be a [tasks, steps] floating-point tensor, got "
                         f"{(tuple(losses.shape), losses.dtype) if isinstance(losses, torch.Tensor) else type(losses).__name__}")
    n = losses.shape[0]
    if n < 1:  # the mean of no task's update is NaN
        raise ValueError("losses holds no task: a reducer needs this rank's updates of at least one task")
    # a tensor would be read row by row as parameters, None failed with "not iterable", and the
    # collectives take their dtype from deltas[0]
    if isinstance(deltas, (str, bytes)) or not isinstance(deltas, Sequence) or not deltas:
        raise TypeError(f"deltas must be a non-empty list of [tasks, *shape] tensors (one per parameter), got "
                        f"{type(deltas).__name__}{' (empty)' if isinstance(deltas, Sequence) else ''}")
    for i, d in enumerate(deltas):
        if not isinstance(d, torch.Tensor) or d.dim() < 1 or d.shape[0] != n or not d.is_floating_point():
            raise ValueError(f"deltas[{i}] must be a [tasks={n}, *shape] floating-point tensor, got "
                             f"{(tuple(d.shape), d.dtype) if isinstance(d, torch.Tensor) else type(d).__name__}")
    return n


def local_mean(deltas: Sequence[torch.Tensor], losses: torch.Tensor):
    """The one-process reduction (``core.local_mean``: ``d.mean(0)`` per parameter, ``losses.mean()``)
    with its arguments checked: ``ValueError``/``TypeError`` naming ``deltas`` or ``losses`` for
    anything but one meta-step's updates of at least one task (the stepper calls the unchecked
    ``core.local_mean`` on its own deltas)."""
    _check(deltas, losses)
    return _local_mean(deltas, losses)


class MeanReducer:
    """The default reducer: one collective per meta-step (see the module docstring).

    Args:
        context: the ``DistContext``; with one process this is ``local_mean`` exactly.
        collective: "all_gather" (default): every rank gathers every rank's flat sum ``[W, F]``
            and adds the rows in rank order itself — the same bits on every rank whatever the
            collective's algorithm, and deterministic from run to run; traffic ``W·F`` per rank
            (F = number of parameters + 2: small for Reptile's models).
            "all_reduce": ``all_reduce(SUM)``, traffic ~``2F`` per rank: for large models on many
            ranks.  φ then stays identical across ranks only if the collective's algorithm hands
            every rank the same bits (NCCL's ring and tree reduce once and broadcast the result);
            the sum's order is the algorithm's, not rank order.
    """

    COLLECTIVES = ("all_gather", "all_reduce")

    def __init__(self, context: DistContext, collective: str = "all_gather"):
        if not isinstance(context, DistContext):
            raise TypeError(f"context must be a DistContext, got {type(context).__name__}")
        if collective not in self.COLLECTIVES:
            raise ValueError(f"collective must be one of {self.COLLECTIVES}, got {collective!r}")
        self.context = context
        self.collective = collective
        self.calls = 0

    def __call__(self, deltas: Sequence[torch.Tensor], losses: torch.Tensor):
        _check(deltas, losses)
        if not self.context.is_distributed:
            return _local_mean(deltas, losses)
        self.calls += 1
        # The sums travel in at least float32: in a float16 model's dtype the loss sum of a few
        # tasks overflowed (inf/inf: a NaN meta-step where one process trains), and float16 /
        # bfloat16 cannot hold every task count (bfloat16: 257 → 256).  float32 / float64 models:
        # the same bits as before.
        dtype = torch.promote_types(deltas[0].dtype, torch.float32)
        count = torch.full((1,), float(losses.shape[0]), dtype=dtype, device=losses.device)
        # [Σ_i D_i of every parameter..., Σ losses, tasks, tasks × steps]
        flat = torch.cat([d.sum(0, dtype=torch.promote_types(d.dtype, torch.float32)).reshape(-1).to(dtype)
                          for d in deltas]
                         + [losses.sum(dtype=torch.promote_types(losses.dtype, torch.float32)).reshape(1).to(dtype),
                            count, count * losses.shape[1]])
        what = f"{self.collective} of the meta-step's update (call {self.calls})"
        if self.collective == "all_reduce":
            self.context.all_reduce_(flat, what)
        else:
            flat = torch.stack(self.context.all_gather(flat, what)).sum(0)
        n_tasks, n_losses = flat[-2], flat[-1]
        out, offset = [], 0
        for d in deltas:
            size = d[0].numel()
            out.append((flat[offset:offset + size] / n_tasks).view(d.shape[1:]).to(d.dtype))
            offset += size
        return out, (flat[offset] / n_losses).to(losses.dtype)


class OrderedGather:
    """Bitwise-equal-to-one-process reducer: gather every task's rows in task order, then ``local_mean``.

    Relies on ranks holding contiguous shares in rank order (``split_tasks``), so rank order is
    task order.
    """

    def __init__(self, context: DistContext):
        if not isinstance(context, DistContext):
            raise TypeError(f"context must be a DistContext, got {type(context).__name__}")
        self.context = context
        self.calls = 0

    def __call__(self, deltas: Sequence[torch.Tensor], losses: torch.Tensor):
        n = _check(deltas, losses)
        if not self.context.is_distributed:
            return _local_mean(deltas, losses)
        self.calls += 1
        ctx = self.context
        sizes = ctx.all_gather(torch.tensor([n], dtype=torch.long, device=losses.device),
                               f"all_gather of the task counts (call {self.calls})")
        counts = [int(s.item()) for s in sizes]
        n_max = max(counts)
        dtype = deltas[0].dtype
        widths = [d[0].numel() for d in deltas] + [losses.shape[1]]
        rows = torch.cat([d.reshape(n, -1).to(dtype) for d in deltas] + [losses.reshape(n, -1).to(dtype)], dim=1)
        if n < n_max:
            rows = torch.cat([rows, rows.new_zeros(n_max - n, rows.shape[1])])
        gathered = ctx.all_gather(rows, f"all_gather of the per-task updates (call {self.calls})")
        full = torch.cat([g[:c] for g, c in zip(gathered, counts)])  # [T, F] in global task order
        total = full.shape[0]
        parts = torch.split(full, widths, dim=1)
        full_deltas = [_same_layout(p.reshape(total, *d.shape[1:]).to(d.dtype), d) for p, d in zip(parts, deltas)]
        full_losses = _same_layout(parts[-1].to(losses.dtype), losses)
        return _local_mean(full_deltas, full_losses)


def make_reducer(reduction: str, context: DistContext):
    """``"mean"`` → ``MeanReducer``, ``"ordered"`` → ``OrderedGather``."""
    if reduction == "mean":
        return MeanReducer(context)
    if reduction == "ordered":
        return OrderedGather(context)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
