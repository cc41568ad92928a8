"""Models: a configurable MLP with the seed's defaults, and the paper's Omniglot and Mini-ImageNet conv nets."""
from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
import torch.nn as nn

from .validation import check_bool

__all__ = ["MLP", "OmniglotConvNet", "MiniImageNetConvNet", "ACTIVATIONS"]

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def _is_int(v) -> bool:
    """An integral number (numpy's too), not a bool."""
    return isinstance(v, Integral) and not isinstance(v, bool)


class MLP(nn.Module):
    """``in → hidden[0] → … → hidden[-1] → out`` with one activation between Linear layers.

    ``MLP()`` is the seed's model (1 → 64 → 64 → 1, tanh) with the seed's state_dict keys
    (``network.0.weight`` …).  Input ``[batch, input_dim]``, output ``[batch, output_dim]``.

    Args:
        input_dim, output_dim: feature sizes.
        hidden_dim: width of every hidden layer (used when ``hidden_dims`` is None).
        depth: number of hidden layers (used when ``hidden_dims`` is None); the seed's is 2.
        hidden_dims: explicit widths, one per hidden layer.
        activation: "tanh", "relu", "sigmoid" or "identity".
    """

    def __init__(self, input_dim: int = 1, hidden_dim: int = 64, output_dim: int = 1, *,
                 depth: int = 2, hidden_dims: Sequence[int] | None = None, activation: str = "tanh"):
        super().__init__()
        if not isinstance(activation, str):  # a list raised a bare "unhashable type: 'list'"
            raise TypeError(f"activation must be a name (one of {sorted(ACTIVATIONS)}), got "
                            f"{type(activation).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden_dims is None:
            if not _is_int(depth) or depth < 0:
                raise ValueError(f"depth must be a non-negative int, got {depth!r}")
            hidden_dims = [hidden_dim] * int(depth)
        dims = [input_dim, *hidden_dims, output_dim]
        for d in dims:
            if not _is_int(d) or d < 1:
                raise ValueError(f"layer sizes must be positive ints, got {dims}")
        dims = [int(d) for d in dims]  # numpy integers as ints
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class OmniglotConvNet(nn.Module):
    """The paper's Omniglot net: 4 × [conv 3×3, ``channels``, stride 2, BatchNorm, ReLU] + linear.

    Input ``[batch, in_channels, H, W]`` (28×28 in the paper), output ``[batch, n_classes]`` logits.
    """

    def __init__(self, n_classes: int = 5, in_channels: int = 1, channels: int = 64,
                 image_size: int = 28, n_blocks: int = 4):
        super().__init__()
        for name, v in (("n_classes", n_classes), ("in_channels", in_channels), ("channels", channels),
                        ("image_size", image_size), ("n_blocks", n_blocks)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"OmniglotConvNet {name} must be a positive int, got {v!r}")
        n_classes, in_channels, channels, image_size, n_blocks = map(
            int, (n_classes, in_channels, channels, image_size, n_blocks))
        blocks: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(n_blocks):
            blocks += [nn.Conv2d(c, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels),
                       nn.ReLU()]
            c, s = channels, (s + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels * s * s, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MiniImageNetConvNet(nn.Module):
    """The paper's Mini-ImageNet net: 4 × [conv 3×3, ``channels``, BatchNorm, ReLU, max-pool 2] + linear.

    Input ``[batch, in_channels, H, W]`` (3×84×84 in the paper), output ``[batch, n_classes]``
    logits.  The pooling rounds up (``ceil_mode``), as the official code's "same"-padded
    pooling does: 84 → 42 → 21 → 11 → 6, so the classifier sees 32 × 6 × 6 features.

    This is the official code's function (openai/supervised-reptile ``MiniImageNetModel``:
    conv → BatchNorm → max-pool → ReLU per block; ReLU and max-pooling commute, so its order and
    this one compute the same values).  ``pool_first=True`` is another net, conv → max-pool →
    BatchNorm → ReLU, whose BatchNorm statistics are taken over the pooled activations.
    """

    def __init__(self, n_classes: int = 5, in_channels: int = 3, channels: int = 32,
                 image_size: int = 84, n_blocks: int = 4, pool_first: bool = False):
        super().__init__()
        for name, v in (("n_classes", n_classes), ("in_channels", in_channels), ("channels", channels),
                        ("image_size", image_size), ("n_blocks", n_blocks)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"MiniImageNetConvNet {name} must be a positive int, got {v!r}")
        n_classes, in_channels, channels, image_size, n_blocks = map(
            int, (n_classes, in_channels, channels, image_size, n_blocks))
        pool_first = check_bool("MiniImageNetConvNet pool_first", pool_first)  # numpy's bool too
        blocks: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(n_blocks):
            conv, pool = nn.Conv2d(c, channels, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True)
            norm_relu = [nn.BatchNorm2d(channels), nn.ReLU()]
            blocks += [conv, pool, *norm_relu] if pool_first else [conv, *norm_relu, pool]
            c, s = channels, (s + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels * s * s, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
