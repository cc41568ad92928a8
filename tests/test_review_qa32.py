"""QA32: held-out style checks through the public API (issues 2, 3, 4, 8, 11, 15, 16).

Each test pins a defect found by probing the public API with inputs the other tests do not use.
"""
import pytest
import torch

from reptile_fast import Episodes, MLP, Reptile, TaskBatch


def _labels_batch():
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.randn(3, 8, 2, generator=g), torch.randint(0, 3, (3, 8), generator=g))


@pytest.mark.parametrize("item", [(Ellipsis, slice(0, 1)), (slice(None), slice(0, 3)), None])
def test_taskbatch_indexes_tasks_only(item):
    """``tasks[..., :1]`` sliced x's features and y's points apart (x [3, 8, 1], y [3, 1]) into a
    trusted TaskBatch that failed deep inside a backend with an IndexError; a tuple is refused."""
    tb = _labels_batch()
    with pytest.raises(TypeError, match="only the task dimension"):
        tb[item]
    episodes = Episodes(tb, tb, ways=3)
    with pytest.raises(TypeError, match="only the task dimension"):
        episodes[item]


def test_taskbatch_zero_dim_tensor_and_out_of_range_index():
    """A 0-dim integer tensor selects its task as an int does (it was "must select one or more
    tasks"); an index past the end names the index and the task count, not a slice."""
    tb = _labels_batch()
    one = tb[torch.tensor(2)]
    assert torch.equal(one.x, tb.x[2:3]) and torch.equal(one.y, tb.y[2:3])
    assert torch.equal(tb[torch.tensor(-3)].x, tb.x[0:1])
    for bad in (3, -4, torch.tensor(3)):
        with pytest.raises(IndexError, match="out of range for 3 tasks"):
            tb[bad]
    # what worked keeps working
    assert tb[[0, 2]].n_tasks == 2 and tb[1:].n_tasks == 2 and tb[-1].n_tasks == 1
    assert tb[torch.tensor([True, False, True])].n_tasks == 2
    trainer = Reptile(MLP(2, hidden_dim=4, output_dim=3), loss="cross_entropy", inner_batch_size=2)
    assert trainer.evaluate(tb[torch.tensor(1)], 1).shape == (1,)
