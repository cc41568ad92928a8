"""Few-shot evaluation: adapt on each task's support set, predict its query set, score.

The protocol of the paper's official code (openai/supervised-reptile), spelled out.  Adaptation
minibatches follow the trainer's ``minibatches``: "epochs" cycles through the shuffled support
set as the official code does (the job's default), "fresh" draws each step's anew (the Python
API's default).  The inner Adam starts fresh per test task, or, with ``adam_state="carried"``,
from the state training left, as the official code (README, "Differences from the official code").

* **Adaptation**: a fresh copy of φ per task takes ``steps`` inner steps (the trainer's inner
  optimizer and learning rate) on minibatches of ``batch_size`` support images (50 steps of 5
  images for 5-way Omniglot, of 10 for 20-way).  Only support images are seen.
* **BatchNorm**: batch statistics everywhere (train mode), never running statistics, as the
  official code runs ``batch_normalization(training=True)`` at test time too.  So how query
  images are batched matters:
* **Non-transductive** (default): each query image is predicted in a batch made of the support
  set plus that one image, so the BatchNorm statistics never mix query images; the prediction
  is the last row.  No query image can influence another's prediction.
* **Transductive** (``transductive=True``): all of a task's query images in one batch, so the
  statistics are computed over the query set (the paper's "transduction" numbers).
  For a model without BatchNorm both give the same predictions.
* **Score**: per task, the fraction of its query images predicted right; reported as the mean
  over tasks with a 95 % confidence interval ``1.96 · std / sqrt(T)`` (normal approximation).

The official code draws one query image per class (``query_shots=1``); so do the job's defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.func import vmap

from .backends.base import functional_call
from .model_watch import modes_kept
from .tasks.base import check_minibatches, draw_plan
from .tasks.episodes import Episodes
from .validation import check_bool, check_int

__all__ = ["FewShotResult", "evaluate_episodes", "query_logits", "mean_ci95",
           "nearest_neighbour_predictions", "score_predictions"]

#: images in one batched forward pass of the evaluation (bounds its memory)
DEFAULT_MAX_IMAGES = 2048


@dataclass
class FewShotResult:
    """Accuracy over ``T`` few-shot tasks.

    Attributes:
        accuracy: mean over tasks of the per-task accuracy (a fraction).
        ci95: half-width of its 95 % confidence interval (NaN with one task).
        per_task: float ``[T]``, each task's fraction of query images predicted right.
        predictions: long ``[T, Q]``, the predicted labels.
    """

    accuracy: float
    ci95: float
    per_task: torch.Tensor
    predictions: torch.Tensor

    @property
    def n_tasks(self) -> int:
        return int(self.per_task.numel())

    def as_dict(self) -> Dict[str, object]:
        """JSON-ready summary (``ci95`` None when undefined)."""
        return {"accuracy": self.accuracy,
                "ci95": None if math.isnan(self.ci95) else self.ci95,
                "n_tasks": self.n_tasks,
                "queries_per_task": int(self.predictions.shape[1])}


def mean_ci95(values: torch.Tensor) -> tuple:
    """``(mean, 1.96 · std / sqrt(n))`` of a 1-D tensor (the half-width is NaN for n < 2)."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() < 1:
        raise ValueError("mean_ci95 needs a non-empty 1-D tensor")
    v = values.double()
    n = v.numel()
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return float(v.mean()), half


def score_predictions(predictions: torch.Tensor, labels: torch.Tensor) -> FewShotResult:
    """Per-task accuracy of ``predictions`` against ``labels`` (both long ``[T, Q]``)."""
    for name, t in (("predictions", predictions), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            # a numpy array was named by its dtype alone ("got int64": QA46)
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be an integer tensor (a torch.Tensor) of class labels [tasks, queries], "
                            f"got {got}")
    if predictions.shape != labels.shape or predictions.dim() != 2:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must "
                         f"both be [tasks, queries]")
    if predictions.numel() == 0:  # accuracy NaN, or mean_ci95's own words, before (QA46)
        raise ValueError(f"predictions and labels must hold at least one task and one query, got "
                         f"{tuple(predictions.shape)}")
    per_task = (predictions.to(labels.device) == labels).double().mean(1).cpu()
    acc, ci = mean_ci95(per_task)
    return FewShotResult(acc, ci, per_task, predictions.cpu())


def _stacked_buffers(model: nn.Module, *lead: int) -> Dict[str, torch.Tensor]:
    # Private copies per forward pass: train-mode BatchNorm writes its running statistics into
    # the buffers it is given, and must neither touch the model's nor share them across vmap.
    return {n: b.detach().expand(*lead, *b.shape).clone() if lead else b.detach().clone()
            for n, b in model.named_buffers()}


def query_logits(model: nn.Module, params: Dict[str, torch.Tensor], support_x: torch.Tensor,
                 query_x: torch.Tensor, *, transductive: bool = False) -> torch.Tensor:
    """Logits of every query image at its task's adapted parameters: ``[T, Q, classes]``.

    Args:
        model: the module whose ``functional_call`` is evaluated (its own parameters unused).
        params: name -> ``[T, *shape]`` per-task parameters (``Reptile.adapt(...).params``).
        support_x: ``[T, S, *image]``; query_x: ``[T, Q, *image]``.
        transductive: False: each query image in a batch with the support set (``S + 1``
            images, the query last); True: all ``Q`` query images in one batch.
    The model runs in its current mode (``evaluate_episodes`` puts it in train mode); all tasks
    (and queries) at once under ``torch.func.vmap``, or one by one, with the same batches, for a
    model vmap cannot batch (BatchNorm with ``momentum=None`` in train mode, recurrent layers).
    """
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a dict name -> [T, *shape] (Reptile.adapt(...).params)")
    names = [n for n, _ in model.named_parameters()]
    if set(params) != set(names):
        # functional_call would silently take the model's own tensor for a missing name
        raise ValueError(f"params must hold exactly the model's parameters: missing "
                         f"{[n for n in names if n not in params]}, unknown {[n for n in params if n not in names]}")
    if not isinstance(support_x, torch.Tensor) or not isinstance(query_x, torch.Tensor):
        raise TypeError(f"support_x and query_x must be tensors, got {type(support_x).__name__} and "
                        f"{type(query_x).__name__}")
    if support_x.dim() < 3 or query_x.dim() != support_x.dim() or support_x.shape[2:] != query_x.shape[2:]:
        raise ValueError(f"support_x {tuple(support_x.shape)} and query_x {tuple(query_x.shape)} must be "
                         f"[T, S, *image] and [T, Q, *image] with the same image shape")
    T, Q = query_x.shape[0], query_x.shape[1]
    bad = [n for n, p in params.items() if p.shape[0] != T] + ([] if support_x.shape[0] == T else ["support_x"])
    if bad:
        raise ValueError(f"{bad} do not have the query set's {T} tasks in their first dimension")

    def forward(p, b, x):
        out = functional_call(model, (p, b), (x,))
        if not isinstance(out, torch.Tensor):  # several heads (a callable loss can train them)
            raise TypeError(f"query_logits predicts classes from the model's logits [batch, classes]; the model "
                            f"returns a {type(out).__name__}")
        return out

    S = support_x.shape[1]
    groups = None if transductive else torch.cat(
        [support_x.unsqueeze(1).expand(T, Q, *support_x.shape[1:]), query_x.unsqueeze(2)], dim=2)  # [T, Q, S+1, *image]
    try:
        # randomness="different": a stochastic layer (Dropout in train mode) draws per task and
        # per query, as the batched backend's inner loop does
        if transductive:
            return vmap(forward, randomness="different")(params, _stacked_buffers(model, T), query_x)
        per_query = vmap(forward, in_dims=(None, 0, 0), randomness="different")       # over queries
        logits = vmap(per_query, randomness="different")(params, _stacked_buffers(model, T, Q), groups)
        return logits[:, :, S]                                               # [T, Q, classes]
    except RuntimeError as exc:
        from .backends.torch_func import vmap_refused

        if not vmap_refused(exc):
            raise
    # A model vmap cannot batch (BatchNorm with momentum=None in train mode, which backend
    # "auto" trains on "reference"; a recurrent layer's fused op): the same batches, one by one.
    out = []
    for t in range(T):
        p_t = {n: v[t] for n, v in params.items()}
        if transductive:
            out.append(forward(p_t, _stacked_buffers(model), query_x[t]))
        else:
            out.append(torch.stack([forward(p_t, _stacked_buffers(model), groups[t, q])[S] for q in range(Q)]))
    return torch.stack(out)


def evaluate_episodes(trainer, episodes: Episodes, *, steps: int, batch_size: int,
                      transductive: bool = False, generator: Optional[torch.Generator] = None,
                      max_images: int = DEFAULT_MAX_IMAGES, minibatches: Optional[str] = None) -> FewShotResult:
    """Adapt on each episode's support set, predict its query set, score (see the module doc).

    Args:
        trainer: a ``reptile_fast.Reptile``; its model (φ) is not changed.
        episodes: ``T`` tasks on the trainer's device, labels below the model's outputs.
        steps: inner steps of adaptation per task (50 in the paper's evaluation).
        batch_size: support images per inner step (at most the support set's size).
        transductive: predict all query images of a task in one batch (see module doc).
            A model with more outputs than ``episodes.ways`` predicts among the first ``ways``.
        generator: draws the adaptation minibatches (one plan for all tasks, drawn first, so
            the result of a deterministic model does not depend on ``max_images``; a model that
            draws random numbers itself, e.g. ``nn.Dropout`` in train mode, draws them from the
            global stream chunk by chunk, so its masks -- and its result -- depend on the chunking).
        max_images: images per batched forward pass; tasks are processed in chunks under it.
        minibatches: how the adaptation minibatches are drawn (default: the trainer's
            ``minibatches``): "fresh" draws each step's ``batch_size`` support images anew;
            "epochs" reads the shuffled support set in order, reshuffling when it is used up, as
            the official code's evaluation does (5-way 5-shot, 50 steps of 5: each support image
            used exactly 10 times).
    """
    from .trainer import Reptile

    if not isinstance(trainer, Reptile):
        raise TypeError(f"trainer must be a reptile_fast.Reptile, got {type(trainer).__name__}")
    if not isinstance(episodes, Episodes):
        raise TypeError(f"episodes must be reptile_fast.tasks.Episodes, got {type(episodes).__name__}")
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    max_images = check_int("max_images", max_images, 1)
    transductive = check_bool("transductive", transductive)  # numpy's bool too
    if episodes.device != trainer.device:
        raise ValueError(f"episodes are on {episodes.device} but the model is on {trainer.device}")
    S = episodes.support.n_points
    Q = episodes.query.n_points
    if batch_size > S:
        raise ValueError(f"batch_size ({batch_size}) exceeds the support set ({S} images per task)")
    model = trainer.model
    minibatches = trainer.minibatches if minibatches is None else check_minibatches(minibatches)
    indices = draw_plan(minibatches, episodes.n_tasks, steps, S, batch_size, generator=generator,
                        device=trainer.device)
    per_task = max(Q * (S + 1) if not transductive else Q, batch_size)
    chunk = max(1, min(episodes.n_tasks, max_images // per_task))
    preds, finite = [], []
    with modes_kept(model):  # each submodule's own mode, put back after
        model.train()  # BatchNorm on batch statistics, as the official code evaluates
        for start in range(0, episodes.n_tasks, chunk):
            part = episodes[start:start + chunk]
            adapted = trainer.adapt(part.support, steps, indices[start:start + chunk]).params
            with torch.no_grad():
                logits = query_logits(model, adapted, part.support.x, part.query.x,
                                      transductive=transductive)
            if logits.dim() != 3 or logits.shape[-1] < episodes.ways:
                raise ValueError(f"the model gives logits {tuple(logits.shape[2:])} per image; "
                                 f"{episodes.ways}-way tasks need at least {episodes.ways} classes")
            # labels are 0..ways-1: a model with more outputs predicts among the first ``ways``
            preds.append(logits[..., :episodes.ways].argmax(-1))
            finite.append(torch.isfinite(logits[..., :episodes.ways]).flatten(1).all(1))
    finite = torch.cat(finite)
    if not bool(finite.all()):  # one read for the whole evaluation
        # argmax of NaN logits picks class 0: an accuracy of 1/ways that looks like a bad model (QA53)
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"the adapted model's outputs are NaN or infinite on {bad.numel()} of "
                         f"{episodes.n_tasks} test tasks (the first: task {int(bad[0])}): its adaptation "
                         f"diverged (lower the inner learning rate) or the model's parameters are not finite")
    return score_predictions(torch.cat(preds), episodes.query.y)


def nearest_neighbour_predictions(episodes: Episodes) -> torch.Tensor:
    """The pixel baseline: each query image gets the label of its nearest support image in
    Euclidean pixel distance (ties in the computed distance: the lowest support index; distances
    equal in exact arithmetic may differ by rounding, more often above 25 support images, where
    ``torch.cdist`` uses its matmul formula).  Returns long ``[T, Q]``."""
    if not isinstance(episodes, Episodes):
        raise TypeError(f"episodes must be reptile_fast.tasks.Episodes, got {type(episodes).__name__}")
    s = episodes.support.x.flatten(2).double()
    q = episodes.query.x.flatten(2).double()
    nearest = torch.cdist(q, s).argmin(-1)                                  # [T, Q]
    return episodes.support.y.gather(1, nearest)
