"""Loss functions by name: what an inner step minimises on one minibatch."""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "resolve_loss", "loss_name"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: name -> fn(prediction, target) -> scalar mean loss.
#: "mse": prediction and target ``[B, out]``; "cross_entropy": logits ``[B, C]``, labels long ``[B]``.
LOSSES: dict[str, LossFn] = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
}


def resolve_loss(loss: Union[str, LossFn]) -> LossFn:
    """The loss function for a name in ``LOSSES`` or a callable ``(prediction, target) -> scalar``."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
        return LOSSES[loss]
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a name in {sorted(LOSSES)} or a callable, got {type(loss).__name__}")


def loss_name(loss: Union[str, LossFn]) -> str | None:
    """The built-in name of ``loss`` (fast paths specialise on these), or None for a custom callable."""
    if isinstance(loss, str):
        return loss if loss in LOSSES else None
    for name, fn in LOSSES.items():
        if loss is fn:
            return name
    return None
