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


def _global_module_hooks() -> bool:
    """Whether torch's global module hooks (``nn.modules.module.register_module_forward_hook`` and
    its kin) are registered: every module's call runs them, a loss module's too."""
    from torch.nn.modules import module as M

    return any(getattr(M, n, None) for n in ("_global_forward_pre_hooks", "_global_forward_hooks",
                                             "_global_backward_pre_hooks", "_global_backward_hooks"))


def loss_name(loss: Union[str, LossFn]) -> str | None:
    """The built-in name of ``loss`` (fast paths specialise on these), or None for a custom callable.

    ``nn.MSELoss()`` and ``nn.CrossEntropyLoss()`` with their defaults (mean reduction; no class
    weights, label smoothing or ignored index in use; no hooks) compute exactly ``F.mse_loss`` /
    ``F.cross_entropy``, so they count as the names too (the drop-in recognised them, the trainer
    did not: compiled and triton refused the seed's own ``nn.MSELoss()``)."""
    if isinstance(loss, str):
        return loss if loss in LOSSES else None
    for name, fn in LOSSES.items():
        if loss is fn:
            return name
    if isinstance(loss, torch.nn.Module) and (loss._forward_hooks or loss._forward_pre_hooks or loss._backward_hooks
                                              or loss._backward_pre_hooks or "forward" in vars(loss)
                                              or _global_module_hooks()):
        # what the module computes is not (only) the named loss: a hook of its own (a backward hook
        # scaling the gradient too), torch's global module hooks, or a forward set on the instance
        # (the fast paths computed the plain loss while the seed's loop ran these: QA79)
        return None
    if type(loss) is torch.nn.MSELoss and loss.reduction == "mean":
        return "mse"
    if (type(loss) is torch.nn.CrossEntropyLoss and loss.reduction == "mean" and loss.weight is None
            and loss.label_smoothing == 0.0 and loss.ignore_index < 0):
        return "cross_entropy"  # (labels are checked to lie in [0, classes): a negative index never matches)
    return None
