"""Models: a configurable MLP with the seed's defaults, and the paper's Omniglot and Mini-ImageNet conv nets."""
from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .validation import check_bool, check_choice, check_float

__all__ = ["MLP", "OmniglotConvNet", "MiniImageNetConvNet", "ACTIVATIONS", "SamePad2d", "NET_INITS",
           "OMNIGLOT_PADDINGS"]

#: ``init=`` of the conv nets: "torch" (PyTorch's layer defaults) or "glorot" (Glorot-uniform
#: weights and zero biases, TensorFlow's defaults, which the official code's nets use)
NET_INITS = ("torch", "glorot")
#: ``OmniglotConvNet(padding=...)``: "torch" (``padding=1`` on every side) or "same" (TensorFlow's)
OMNIGLOT_PADDINGS = ("torch", "same")


def _initialise(model: nn.Module, init: str) -> None:
    """Glorot-uniform weights and zero biases for every conv and linear layer ("glorot"): the
    fans of ``nn.init.xavier_uniform_`` are TensorFlow's (receptive field × channels for a conv
    kernel, inputs and outputs for a dense one); BatchNorm keeps γ = 1, β = 0 in both."""
    if init == "glorot":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class SamePad2d(nn.Module):
    """TensorFlow's ``padding='same'`` before a ``kernel_size`` window at ``stride``: the output
    has ``ceil(H / stride)`` rows, and an odd total padding puts the extra row (column) after,
    i.e. at the bottom (right).  For 3×3 at stride 2: 0 before and 1 after on even sizes, 1 and
    1 on odd ones, where ``nn.Conv2d(padding=1)`` always pads 1 and 1."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = int(kernel_size), int(stride)

    @staticmethod
    def _pads(n: int, k: int, s: int):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2], self.kernel_size, self.stride)
        left, right = self._pads(x.shape[-1], self.kernel_size, self.stride)
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"

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

    The defaults are PyTorch's layers (``padding=1``, BatchNorm ε = 1e-5, PyTorch's initialisation).
    ``padding="same", bn_eps=1e-3, init="glorot"`` is the official code's net as TensorFlow builds
    it (``OmniglotConvNet.official(n)``): TensorFlow's "same" padding (``SamePad2d`` before an
    unpadded conv: 0 rows before and 1 after at the even sizes 28, 14 and 4, 1 and 1 at 7), ``tf.layers.batch_normalization``'s
    ε and Glorot-uniform kernels with zero biases.  Same shapes (28 → 14 → 7 → 4 → 2).
    """

    def __init__(self, n_classes: int = 5, in_channels: int = 1, channels: int = 64,
                 image_size: int = 28, n_blocks: int = 4, *, padding: str = "torch", bn_eps: float = 1e-5,
                 init: str = "torch"):
        super().__init__()
        for name, v in (("n_classes", n_classes), ("in_channels", in_channels), ("channels", channels),
                        ("image_size", image_size), ("n_blocks", n_blocks)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"OmniglotConvNet {name} must be a positive int, got {v!r}")
        n_classes, in_channels, channels, image_size, n_blocks = map(
            int, (n_classes, in_channels, channels, image_size, n_blocks))
        padding = check_choice("OmniglotConvNet padding", padding, OMNIGLOT_PADDINGS)
        bn_eps = check_float("OmniglotConvNet bn_eps", bn_eps)
        init = check_choice("OmniglotConvNet init", init, NET_INITS)
        blocks: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(n_blocks):
            conv = [nn.Conv2d(c, channels, 3, stride=2, padding=1)] if padding == "torch" else \
                [SamePad2d(3, 2), nn.Conv2d(c, channels, 3, stride=2, padding=0)]
            blocks += [*conv, nn.BatchNorm2d(channels, eps=bn_eps), nn.ReLU()]
            c, s = channels, (s + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels * s * s, n_classes)
        _initialise(self, init)

    @classmethod
    def official(cls, n_classes: int = 5, **kwargs) -> "OmniglotConvNet":
        """The official code's Omniglot net (TensorFlow's padding, BatchNorm ε and initialisation)."""
        return cls(n_classes, **{"padding": "same", "bn_eps": 1e-3, "init": "glorot", **kwargs})

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
    ``bn_eps=1e-3, init="glorot"`` (``MiniImageNetConvNet.official(n)``): TensorFlow's BatchNorm ε
    and Glorot-uniform kernels with zero biases, as the official code builds it.
    """

    def __init__(self, n_classes: int = 5, in_channels: int = 3, channels: int = 32,
                 image_size: int = 84, n_blocks: int = 4, pool_first: bool = False, *, bn_eps: float = 1e-5,
                 init: str = "torch"):
        super().__init__()
        for name, v in (("n_classes", n_classes), ("in_channels", in_channels), ("channels", channels),
                        ("image_size", image_size), ("n_blocks", n_blocks)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"MiniImageNetConvNet {name} must be a positive int, got {v!r}")
        n_classes, in_channels, channels, image_size, n_blocks = map(
            int, (n_classes, in_channels, channels, image_size, n_blocks))
        pool_first = check_bool("MiniImageNetConvNet pool_first", pool_first)  # numpy's bool too
        bn_eps = check_float("MiniImageNetConvNet bn_eps", bn_eps)
        init = check_choice("MiniImageNetConvNet init", init, NET_INITS)
        blocks: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(n_blocks):
            conv, pool = nn.Conv2d(c, channels, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True)
            norm_relu = [nn.BatchNorm2d(channels, eps=bn_eps), nn.ReLU()]
            blocks += [conv, pool, *norm_relu] if pool_first else [conv, *norm_relu, pool]
            c, s = channels, (s + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels * s * s, n_classes)
        _initialise(self, init)

    @classmethod
    def official(cls, n_classes: int = 5, **kwargs) -> "MiniImageNetConvNet":
        """The official code's Mini-ImageNet net (TensorFlow's BatchNorm ε and initialisation; its
        stride-1 "same" convolutions pad 1 and 1, as ``padding=1`` does)."""
        return cls(n_classes, **{"bn_eps": 1e-3, "init": "glorot", **kwargs})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
