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


def _sine_task(n=20):
    x = torch.linspace(-5, 5, n)
    return x, torch.sin(x)


def test_dropin_names_the_sample_task_call_that_returned_nan():
    """A NaN target from the 7th sample_task() call was reported as "task_distribution.sample(3,
    ...) raised: ... (fit's arguments to it: n_tasks = ...)": names of an API the drop-in caller
    never used, and not which call.  Now the call is named, for every meta-batch and chunk size."""
    import torch.nn as nn

    from reptile_fast import reptile

    for kw in (dict(meta_batch_size=3), dict(meta_batch_size=2, chunk_size=1), dict(backend="torch")):
        calls = [0]

        def sample_task():
            calls[0] += 1
            x, y = _sine_task()
            if calls[0] == 7:
                y[4] = float("nan")
            return x, y, nn.MSELoss()

        with pytest.raises(ValueError, match=r"sample_task\(\) \(call 7\).*NaN") as info:
            reptile(MLP(hidden_dim=4), 10, sample_task, progress=False, **kw)
        assert "task_distribution" not in str(info.value) and "fit's" not in str(info.value)


@pytest.mark.parametrize("outputs", [1, 3])
def test_dropin_seed_inner_loop_on_class_labels_is_a_clear_error(outputs):
    """The README lists the seed's perform_k_training_steps as a standard inner loop for
    nn.CrossEntropyLoss; on class labels [N] it unsqueezes them to [B, 1], which cross-entropy
    refuses: the drop-in warned, ran the seed's loop and surfaced torch's RuntimeError ("0D or 1D
    target tensor expected, multi-target not supported") from deep inside.  Now a ValueError up
    front says why and what to pass; the global RNG and the model are left as they were."""
    import copy
    import warnings

    import torch.nn as nn

    from reptile_fast import reference, reptile

    def sample_task():
        x, _ = _sine_task()
        return x, (x > 0).long(), nn.CrossEntropyLoss()

    model = MLP(hidden_dim=4, output_dim=outputs)
    before = copy.deepcopy(model)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ReferencePathWarning before the error
        with pytest.raises(ValueError, match=r"perform_k_training_steps=None") as info:
            reptile(model, 3, sample_task, reference.perform_k_training_steps, progress=False)
    assert "unsqueeze" in str(info.value) and "call 1" in str(info.value)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    if outputs > 1:  # what the message advises runs
        assert reptile(model, 3, sample_task, None, progress=False)["path"] == "compiled"


def test_kernel_launchers_name_the_loss_that_takes_the_targets():
    """V.meta_step / V.inner_loop / mlp_inner_loop with int64 labels and the default loss said only
    "y must be torch.float32, got torch.int64"; float targets with loss="cross_entropy" likewise."""
    pytest.importorskip("triton")
    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    dims, acts = (2, 4, 3), ("tanh", "identity")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 2, generator=g)
    labels = torch.randint(0, 3, (2, 6), generator=g)
    idx = torch.randint(0, 6, (2, 1, 3), generator=g)
    params = [torch.randn(4, 2), torch.zeros(4), torch.randn(3, 4), torch.zeros(3)]
    phi = V.flat_params(params)
    for call in (lambda: V.meta_step(x, labels, idx, phi, dims, acts, lr=0.1, eps=0.5),
                 lambda: V.inner_loop(x, labels, idx, phi, dims, acts, lr=0.1),
                 lambda: K.mlp_inner_loop(x, labels, idx, params, acts, lr=0.1)):
        with pytest.raises(TypeError, match=r"int64 class labels need loss='cross_entropy'"):
            call()
    with pytest.raises(TypeError, match=r"float targets need loss='mse'"):
        V.meta_step(x, torch.randn(2, 6, 3), idx, phi, dims, acts, lr=0.1, eps=0.5, loss="cross_entropy")
