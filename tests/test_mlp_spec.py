"""Recognising Linear/activation chains for the fast paths."""
import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, OmniglotConvNet, reference
from reptile_fast.backends import UnsupportedModelError
from reptile_fast.mlp_spec import extract_mlp_spec


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("model, dims, acts", [
    (MLP(), (1, 64, 64, 1), ("tanh", "tanh", "identity")),
    (reference.MLP(), (1, 64, 64, 1), ("tanh", "tanh", "identity")),
    (MLP(2, 40, 3, depth=4, activation="relu"), (2, 40, 40, 40, 40, 3), ("relu",) * 4 + ("identity",)),
    (nn.Sequential(nn.Linear(2, 5), nn.Sigmoid(), nn.Linear(5, 1)), (2, 5, 1), ("sigmoid", "identity")),
    (Wrapped(), (3, 8, 2), ("relu", "identity")),
    (MLP(1, 5, 1, depth=0), (1, 1), ("identity",)),
    (nn.Linear(3, 2), (3, 2), ("identity",)),  # a bare Linear is the root module itself
])
def test_recognised(model, dims, acts):
    spec = extract_mlp_spec(model)
    assert spec.dims == dims and spec.activations == acts
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    names = dict(model.named_parameters())
    assert all(n in names for n in spec.weight_names + spec.bias_names)


@pytest.mark.parametrize("model, words", [
    (OmniglotConvNet(), "Conv2d"),
    (nn.Sequential(nn.Linear(2, 3, bias=False)), "no bias"),
    (nn.Linear(2, 3, bias=False), "no bias"),
    (nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 1)), "Dropout"),
    (nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.ReLU(), nn.Linear(3, 1)), "two activations"),
    (nn.Sequential(nn.Tanh(), nn.Linear(2, 3)), "before the first"),
    (nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)), "LayerNorm"),
])
def test_rejected_with_reason(model, words):
    with pytest.raises(UnsupportedModelError, match=words):
        extract_mlp_spec(model)
