"""``backend="auto"`` and a model that backend torch's vmap refuses only when it runs (a
data-dependent ``if``, boolean-mask selection, ``.item()``, a reentrant checkpoint: seen in the
forward, after auto chose torch).  The first call that runs it moves the trainer to backend
reference with one warning, on the same draws (φ had not changed), instead of raising
``UnsupportedModelError`` from a backend the user never named.  An explicitly named torch still
refuses (tests/test_review_qa19.py)."""
import warnings

import pytest
import torch
import torch.nn as nn

from reptile_fast import Reptile
from reptile_fast.backends import UnsupportedModelError
from reptile_fast.tasks.base import TaskBatch, sample_indices


class DataDependentIf(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y


class BoolMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(x)
        return y + 0.1 * y[y > 0].sum()


class ItemScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) * (1.0 + 0.0 * float(self.lin.weight.abs().max().item()))


def _tasks(g, n=3):
    return TaskBatch(torch.randn(n, 12, 3, generator=g), torch.randn(n, 12, 2, generator=g))


def _pair(make):
    torch.manual_seed(0)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("make", [DataDependentIf, BoolMask, ItemScale], ids=lambda m: m.__name__)
def test_auto_moves_to_reference_on_the_same_draws(make):
    model, twin = _pair(make)
    auto = Reptile(model, backend="auto", inner_steps=2, inner_batch_size=4)
    ref = Reptile(twin, backend="reference", inner_steps=2, inner_batch_size=4)
    assert auto.backend.name == "torch"  # the premise: auto chose torch at construction
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        tasks = _tasks(g)
        plan = sample_indices(3, 2, 12, 4, generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto.meta_step(tasks, plan)
        moved = [w for w in caught if "moves to backend 'reference'" in str(w.message)]
        assert len(moved) == (1 if k == 0 else 0), [str(w.message) for w in caught]
        ref.meta_step(tasks, plan)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), f"{name} after meta-step {k + 1}"
    assert auto.backend.name == "reference"


def test_auto_moves_in_fit_and_adapt_too():
    model, twin = _pair(DataDependentIf)

    class Family:
        def sample(self, n, *, generator=None, device=None):
            return _tasks(generator, n)

    auto = Reptile(model, backend="auto", inner_steps=2, inner_batch_size=4)
    ref = Reptile(twin, backend="reference", inner_steps=2, inner_batch_size=4)
    with pytest.warns(UserWarning, match="moves to backend 'reference'"):
        auto.fit(Family(), 4, meta_batch_size=2, generator=torch.Generator().manual_seed(3), progress=False)
    ref.fit(Family(), 4, meta_batch_size=2, generator=torch.Generator().manual_seed(3), progress=False)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    fresh, _ = _pair(DataDependentIf)
    trainer = Reptile(fresh, backend="auto", inner_steps=2, inner_batch_size=4)
    with pytest.warns(UserWarning, match="moves to backend 'reference'"):
        out = trainer.evaluate(_tasks(torch.Generator().manual_seed(4)), 2,
                               generator=torch.Generator().manual_seed(5))
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_named_torch_still_refuses():
    torch.manual_seed(0)
    trainer = Reptile(DataDependentIf(), backend="torch", inner_steps=2, inner_batch_size=4)
    g = torch.Generator().manual_seed(1)
    with pytest.raises(UnsupportedModelError, match="backend='reference'"):
        trainer.meta_step(_tasks(g), sample_indices(3, 2, 12, 4, generator=g))
