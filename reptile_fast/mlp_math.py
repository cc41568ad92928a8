"""The MLP maths of the fast paths, in one table: activations, their derivatives, loss gradients.

Read by the batched torch path (``backends.mlp_batched``), the compiled meta-step
(``compiled_step``), the MLP recogniser (``mlp_spec``) and the Triton launchers (their
compile-time activation codes are ``ACTIVATION_CODES``).  Adding an activation is one entry in
``ACTIVATIONS`` plus its kernel code.

Derivatives are written as autograd computes them (aten's ``*_backward`` kernels), so every
path agrees with the reference backend to a few ulps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

__all__ = ["Activation", "ACTIVATIONS", "ACTIVATION_NAMES", "ACTIVATION_CODES", "FAST_LOSSES",
           "loss_and_grad", "output_grad"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """One elementwise activation.

    Attributes:
        forward: ``act(z)``, out of place.
        forward_: ``act(z)`` in place on ``z`` (a fresh matmul output).
        backward: ``(dloss/dy, y) -> dloss/dz`` from the activation's *output* ``y = act(z)``.
        code: the Triton kernels' compile-time code (0 is identity).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    forward_: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    code: int


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def _identity_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return g


#: name -> Activation.  The names are what ``mlp_spec`` recognises.
ACTIVATIONS: Dict[str, Activation] = {
    "identity": Activation(_identity, _identity, _identity_backward, 0),
    "tanh": Activation(torch.tanh, torch.Tensor.tanh_, _aten.tanh_backward, 1),
    "relu": Activation(torch.relu, torch.Tensor.relu_,
                       lambda g, y: _aten.threshold_backward(g, y, 0), 2),
    "sigmoid": Activation(torch.sigmoid, torch.Tensor.sigmoid_, _aten.sigmoid_backward, 3),
}

ACTIVATION_NAMES: Tuple[str, ...] = tuple(ACTIVATIONS)
#: activation name -> the Triton kernels' compile-time code
ACTIVATION_CODES: Dict[str, int] = {name: a.code for name, a in ACTIVATIONS.items()}

#: losses the fast paths differentiate by hand; other losses take the generic vmap path.
FAST_LOSSES = ("mse", "cross_entropy")


def output_grad(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dloss/dout ``[T, B, o]`` of the per-task mean loss, as autograd computes it.

    ``out``: ``[T, B, o]``; ``y``: ``[T, B, o]`` float targets ("mse") or ``[T, B]`` long labels
    ("cross_entropy").
    """
    n = out.shape[1]
    if loss == "mse":
        # aten::mse_loss_backward: (2 / numel) · (input − target)
        return (out - y) * (2.0 / (n * out.shape[2]))
    if loss == "cross_entropy":
        logp = torch.log_softmax(out, -1)
        # nll_loss_backward writes −1/n at the label; then log_softmax's backward.
        grad_logp = torch.zeros_like(logp).scatter_(-1, y.unsqueeze(-1), -1.0 / n)
        return torch._log_softmax_backward_data(grad_logp, logp, -1, out.dtype)
    raise ValueError(f"the MLP fast paths support losses {FAST_LOSSES}, got {loss!r}")


def loss_and_grad(loss: str, out: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-task minibatch loss ``[T]`` and dloss/dout ``[T, B, o]``, written for a compiler
    (no scatter, no in-place ops): the compiled meta-step's formulation of ``output_grad``."""
    n = out.shape[1]
    if loss == "mse":
        diff = out - y
        return diff.square().mean(dim=(1, 2)), diff * (2.0 / (n * out.shape[2]))
    if loss == "cross_entropy":
        logp = torch.log_softmax(out, -1)
        onehot = torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
        g = onehot * (-1.0 / n)
        # _log_softmax_backward_data: g − exp(logp)·Σg, with Σg = −1/n per row.
        return -(logp * onehot).sum(dim=(1, 2)) / n, g + torch.exp(logp) * (1.0 / n)
    raise ValueError(f"the MLP fast paths support losses {FAST_LOSSES}, got {loss!r}")
