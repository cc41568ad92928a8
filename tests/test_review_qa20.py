"""QA20's review of the session's changes: auto's move to reference, the outer optimizer's undo,
``all_finite``.  Each test failed on the code before its fix (704084f)."""
import warnings

import pytest
import torch
import torch.nn as nn

from reptile_fast import NonFiniteError, Reptile
from reptile_fast.core import OuterUpdate, all_finite
from reptile_fast.tasks.base import TaskBatch, sample_indices


# ---------------------------------------------------------------- auto's move to reference
class DropoutThenIf(nn.Module):
    """Dropout (drawn from the global RNG) before an operation vmap refuses: backend torch draws
    the masks, then refuses."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(nn.functional.dropout(x, 0.5, True))
        return y if y.sum() > 0 else -y


def _tasks(g, n=3):
    return TaskBatch(torch.randn(n, 12, 3, generator=g), torch.randn(n, 12, 2, generator=g))


@pytest.mark.parametrize("call", ["meta_step", "evaluate"])
def test_the_move_reruns_on_the_rng_as_before_the_refused_call(call):
    """The rerun on reference drew the model's dropout masks after those backend torch had drawn
    (and thrown away) before refusing: φ differed from a reference run on the same RNG."""
    torch.manual_seed(0)
    model, twin = DropoutThenIf(), DropoutThenIf()
    twin.load_state_dict(model.state_dict())
    auto = Reptile(model, backend="auto", inner_steps=2, inner_batch_size=4)
    ref = Reptile(twin, backend="reference", inner_steps=2, inner_batch_size=4)
    assert auto.backend.name == "torch"
    g = torch.Generator().manual_seed(1)
    tasks, plan = _tasks(g), sample_indices(3, 2, 12, 4, generator=g)
    outs = []
    for trainer in (auto, ref):
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if call == "meta_step":
                trainer.meta_step(tasks, plan)
                outs.append([p.detach().clone() for p in trainer.model.parameters()])
            else:
                outs.append([trainer.evaluate(tasks, 2, plan)])
        outs[-1].append(torch.get_rng_state())
    assert auto.backend.name == "reference"
    for a, b in zip(*outs):
        assert torch.equal(a, b)
