"""Meta-training across the ranks of a torch.distributed job (also runs in one process).

Per meta-step ``t``, on every rank: draw this rank's share of the global meta-batch
(``IndexedSampler.draw(t)``) → the backend's inner loops → per-task ``D_i = φ̃_i − φ`` → the
reducer (one collective) → the same outer update ``φ ← φ + ε·mean_i D_i`` (or the outer
optimizer's step) on every rank.  Rank 0 alone prints and writes checkpoints.

This module holds the step and loop that the issue-11 refactor replaces by its stepper (with a
``reducer``) and ``run_loop`` (with the ``IndexedSampler`` and rank-0-only callbacks).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from tqdm import tqdm

from ..signals import DeferredSignals, TrainingInterrupted, signal_name
from ..validation import check_int
from .context import DistContext, DistributedError, setup_from_env
from .reducers import make_reducer
from .sampler import DEFAULT_BLOCK_SIZE, IndexedSampler

__all__ = ["distributed_fit", "distributed_meta_step"]


@torch.no_grad()
def _apply(trainer, mean_deltas, mean_loss, iteration: int, eps: float) -> None:
    from ..trainer import NonFiniteError

    named = list(trainer.model.named_parameters())
    finite = torch.stack([torch.isfinite(d).all() for d in mean_deltas]).all() & torch.isfinite(mean_loss)
    # The reduced values are the same bits on every rank, so every rank takes the same branch.
    if not bool(finite):
        raise NonFiniteError(f"meta-step {iteration + 1}: non-finite inner loss or update (NaN/inf) on some "
                             f"rank; the parameters were left as they were before this step. Lower "
                             f"inner_lr/outer_lr or check the data.", iteration=iteration + 1)
    if trainer.outer_optimizer is not None:
        for (_, p), d in zip(named, mean_deltas):
            p.grad = -d
        trainer.outer_optimizer.step()
        trainer.outer_optimizer.zero_grad(set_to_none=True)
    else:
        torch._foreach_add_([p for _, p in named], torch._foreach_mul(list(mean_deltas), eps))


def distributed_meta_step(trainer, tasks, indices, reducer, eps: float) -> torch.Tensor:
    """One meta-step over this rank's ``tasks`` and plan, reduced across ranks; returns the mean loss (0-dim)."""
    result = trainer.backend.inner_loop(trainer.model, tasks, indices, trainer.config)
    named = list(trainer.model.named_parameters())
    if result.meta_grads is None:
        deltas = [result.params[n] - p.detach() for n, p in named]  # [T_local, *shape]
    else:
        deltas = [-result.meta_grads[n] for n, _ in named]
    mean_deltas, mean_loss = reducer(deltas, result.losses)
    _apply(trainer, mean_deltas, mean_loss, trainer.iteration, eps)
    trainer.iteration += 1
    return mean_loss


def _load_on_main(ctx: DistContext, source) -> Dict[str, Any]:
    """Rank 0 reads the checkpoint and sends it to every rank (other machines need no shared disk);
    a file that cannot be read raises the same error on every rank."""
    from ..checkpoint import load_checkpoint

    payload = None
    if ctx.is_main:
        try:
            payload = ("ok", load_checkpoint(source))
        except (OSError, ValueError, TypeError) as exc:
            payload = ("error", type(exc).__name__, str(exc))
    payload = ctx.broadcast_object(payload, "broadcast of the checkpoint to resume from")
    if payload[0] == "error":
        kind = {"FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError,
                "TypeError": TypeError}.get(payload[1], ValueError)
        raise kind(payload[2])
    return payload[1]


def distributed_fit(trainer, task_distribution, iterations: int, *, meta_batch_size: int, seed: int,
                    context: Optional[DistContext] = None, reduction: str = "mean",
                    block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True,
                    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
                    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                    checkpoint_every: Optional[int] = None,
                    resume_from: Optional[Union[str, os.PathLike]] = None,
                    checkpoint_extra: Optional[Mapping[str, Any]] = None,
                    handle_signals: bool = True) -> Dict[str, list]:
    """Meta-train ``trainer`` for ``iterations`` meta-steps of ``meta_batch_size`` tasks split over the ranks.

    Args:
        trainer: a ``Reptile`` on this rank's device (every rank builds the same one; rank 0's φ
            is broadcast at the start, so the ranks begin identical).
        task_distribution: ``sample(n, *, generator, device) -> TaskBatch``.
        iterations: the total number of meta-steps (continues from ``trainer.iteration``).
        meta_batch_size: ``T``, the global number of tasks per meta-step (split over the ranks;
            uneven shares are fine; fewer tasks than ranks is refused).
        seed: task j of meta-step t is drawn from ``(seed, t, j)`` (``IndexedSampler``).
        context: the ``DistContext`` (default: ``setup_from_env(device=trainer.device)``).
        reduction: "mean" (one all_reduce per step; equal to one process within fp32 rounding) or
            "ordered" (all_gather in task order; the same bits as one process).
        block_size: tasks per random stream (part of the run's definition, stored in checkpoints).
        callback: ``callback(iteration, {"loss", "iteration"})`` after every meta-step, on every rank.
        checkpoint_dir, checkpoint_every, resume_from, checkpoint_extra, handle_signals: as
            ``Reptile.fit``; rank 0 alone writes; ``resume_from`` is read by rank 0 and sent to
            every rank, and may come from a run with another number of ranks (the draws depend
            only on the seed and the iteration).

    Returns ``{"loss": [...]}`` (the global mean inner loss per meta-step; the same on every rank).
    Raises ``DistributedError`` when another rank dies or hangs (after at most the context's timeout),
    ``TrainingInterrupted`` on every rank after SIGINT/SIGTERM to any rank (all stop after the same
    meta-step; rank 0 writes the checkpoint first), ``NonFiniteError`` on every rank for a NaN/inf step.
    """
    from ..checkpoint import (CHECKPOINT_NAME, prepare_directory, remove_stale_temporaries,
                              resolve_checkpoint_path, restore_checkpoint, save_checkpoint)
    from ..trainer import NonFiniteError

    check_int("iterations", iterations, 1)
    check_int("meta_batch_size", meta_batch_size, 1)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, 1)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir: where should checkpoints go?")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if checkpoint_extra is not None and not isinstance(checkpoint_extra, Mapping):
        raise TypeError(f"checkpoint_extra must be a dict, got {type(checkpoint_extra).__name__}")
    ctx = context if context is not None else setup_from_env(device=trainer.device)
    if not isinstance(ctx, DistContext):
        raise TypeError(f"context must be a DistContext, got {type(ctx).__name__}")
    if ctx.device != trainer.device:
        raise ValueError(f"this rank trains on {ctx.device} but the model is on {trainer.device}: move the "
                         f"model to context.device before building the trainer")
    reducer = make_reducer(reduction, ctx)
    sampler = IndexedSampler(task_distribution, meta_batch_size, seed=seed,
                             plan_rows=trainer._plan_rows(trainer.inner_steps),
                             batch_size=trainer.inner_batch_size, device=trainer.device,
                             rank=ctx.rank, world_size=ctx.world_size, block_size=block_size)
    ckpt_dir = None
    if checkpoint_dir is not None and ctx.is_main:
        ckpt_dir = prepare_directory(checkpoint_dir, "checkpoint_dir")
        remove_stale_temporaries(ckpt_dir)
    history: Dict[str, list] = {"loss": []}
    last_saved: Optional[int] = None
    last_path: Optional[str] = None
    if resume_from is not None:
        ckpt = _load_on_main(ctx, resume_from)
        sampler.check_resumable(ckpt["extra"].get("sampler"), f"checkpoint {resume_from}")
        restore_checkpoint(trainer, ckpt, generator=None)
        history["loss"] = [float(v) for v in ckpt["history"].get("loss", torch.zeros(0)).tolist()]
        saved_total = ckpt["trainer"]["total_iterations"]
        if trainer.outer_lr_final is not None and saved_total is not None and saved_total != iterations:
            warnings.warn(f"the checkpoint's run annealed the outer step over {saved_total} iterations, "
                          f"this fit over {iterations}: the result will differ from an uninterrupted run",
                          stacklevel=2)
        if ckpt_dir is not None:
            latest = ckpt_dir / CHECKPOINT_NAME
            if latest.exists() and latest.resolve() == resolve_checkpoint_path(resume_from).resolve():
                last_saved, last_path = trainer.iteration, str(latest)
    elif trainer.iteration >= iterations:
        raise ValueError(f"iterations={iterations} is the total number of meta-steps, and this trainer has "
                         f"already taken {trainer.iteration}; pass a larger total to train further")
    trainer.total_iterations = iterations
    # Rank 0's φ (and buffers) everywhere: ranks built with other initial seeds start identical.
    ctx.broadcast_module(trainer.model, "broadcast of the initial parameters from rank 0")
    extra = {**(checkpoint_extra or {}), "sampler": sampler.state_dict(), "world_size": ctx.world_size}

    def save() -> None:
        nonlocal last_saved, last_path
        if ckpt_dir is not None:  # rank 0 only
            last_path = str(save_checkpoint(ckpt_dir, trainer, generator=None, history=history, extra=extra))
        last_saved = trainer.iteration

    want_signals = handle_signals and checkpoint_dir is not None
    checked = False
    try:
        with DeferredSignals(enabled=want_signals) as signals:
            stop = False
            for _ in tqdm(range(trainer.iteration, iterations), disable=not (progress and ctx.is_main),
                          desc=f"meta-train ({ctx.world_size} ranks)", initial=trainer.iteration,
                          total=max(iterations, trainer.iteration)):
                tasks, plan = sampler.draw(trainer.iteration)
                if not checked:  # first draw: the trainer's shape/dtype/loss checks, once
                    trainer._check_tasks(tasks, trainer.inner_batch_size)
                    checked = True
                eps = trainer.outer_lr_at(trainer.iteration)
                loss = float(distributed_meta_step(trainer, tasks, plan, reducer, eps))
                history["loss"].append(loss)
                if callback is not None:
                    callback(trainer.iteration, {"loss": loss, "iteration": trainer.iteration})
                if checkpoint_every is not None and trainer.iteration % checkpoint_every == 0:
                    save()
                # Ranks get a signal at different moments; agreeing on it keeps them in step.
                if want_signals and ctx.any(signals.received is not None,
                                            f"agreement on stopping after meta-step {trainer.iteration}"):
                    stop = True
                    break
            if checkpoint_dir is not None and last_saved != trainer.iteration:
                save()
            # Nobody leaves before rank 0's checkpoint is complete (a launcher kills the rest
            # when one rank exits with an error code).
            ctx.barrier(f"barrier after the checkpoint of meta-step {trainer.iteration}")
            if stop:
                signum = signals.received if signals.received is not None else 15
                raise TrainingInterrupted(
                    f"training interrupted by {signal_name(signum)} after meta-step {trainer.iteration} of "
                    f"{iterations} ({ctx.describe()}); checkpoint written to "
                    f"{os.path.join(str(checkpoint_dir), CHECKPOINT_NAME)} by rank 0. Resume with "
                    f"resume_from={str(checkpoint_dir)!r} (any number of ranks)",
                    signal_number=signum, iteration=trainer.iteration,
                    checkpoint=last_path if ctx.is_main else os.path.join(str(checkpoint_dir), CHECKPOINT_NAME))
    except NonFiniteError as exc:
        where = (f"The last good checkpoint, {last_path} (meta-step {last_saved}), was kept."
                 if last_path is not None else "No checkpoint had been written by this run yet.")
        raise NonFiniteError(f"{exc} {where}", iteration=exc.iteration, checkpoint=last_path,
                             checkpoint_iteration=last_saved) from exc
    return history


