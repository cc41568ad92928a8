"""The seed's no-op calls through the drop-in: ``nb_iterations=0``, ``k=0`` (or any ``k · N //
batch_size = 0``) and ``epsilon=0`` run in the seed and leave the model as it was.  The drop-in
runs them too (they were ValueErrors), as the seed does: no task drawn for 0 iterations; every
task drawn, and for ε = 0 every inner loop trained, otherwise.  ``reference.reptile`` is the seed's
loop bit for bit (tests/test_reference.py), so the global RNG after the call is compared with it."""
import copy

import pytest
import torch
import torch.nn as nn

import reptile_fast
from reptile_fast import reference


def counting(sample_task):
    calls = []

    def wrapped():
        calls.append(1)
        return sample_task()
    return wrapped, calls


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_zero_iterations_draw_nothing_and_change_nothing():
    torch.manual_seed(0)
    model = reference.MLP()
    before = copy.deepcopy(model)
    sample_task, calls = counting(reference.sample_task)
    rng = torch.get_rng_state()
    stats = reptile_fast.reptile(model, 0, sample_task, reference.perform_k_training_steps, progress=False)
    assert calls == [] and torch.equal(torch.get_rng_state(), rng)
    assert same_parameters(model, before)
    assert stats["iterations"] == 0 and stats["path"] is None and stats["loss"] == []


@pytest.mark.parametrize("k, epsilon, n_points", [(0, 0.1, 50), (1, 0.1, 5), (1, 0.0, 50), (2, 0.0, 50)])
def test_no_op_calls_run_as_the_seeds_loop(k, epsilon, n_points):
    """k=0 or fewer points than a minibatch (0 inner steps), or ε=0: the model is unchanged and
    the global RNG has advanced exactly as through the seed's loop (same draws, same training)."""
    def sample_task():
        a = torch.rand(1).item() * 4.9 + .1
        b = torch.rand(1).item() * 6.283185307179586
        x = torch.linspace(-5, 5, n_points)
        return x, a * torch.sin(x + b), nn.MSELoss()

    torch.manual_seed(1)
    seed_model = reference.MLP()
    model = copy.deepcopy(seed_model)
    state = torch.get_rng_state()
    reference.reptile(seed_model, 4, sample_task, reference.perform_k_training_steps, k, epsilon, progress=False)
    seed_rng = torch.get_rng_state()

    torch.set_rng_state(state)
    counted, calls = counting(sample_task)
    with pytest.warns(reptile_fast.ReferencePathWarning, match="left as it was"):
        stats = reptile_fast.reptile(model, 4, counted, reference.perform_k_training_steps, k, epsilon,
                                     progress=False)
    assert stats["path"] == "reference" and len(calls) == 4
    assert same_parameters(model, seed_model)
    assert torch.equal(torch.get_rng_state(), seed_rng), "the drop-in drew other random numbers than the seed"


def test_no_op_calls_leave_the_model_bitwise_unchanged():
    torch.manual_seed(2)
    model = reference.MLP()
    before = copy.deepcopy(model)
    for k, epsilon in [(0, 0.1), (1, 0.0)]:
        with pytest.warns(reptile_fast.ReferencePathWarning):
            reptile_fast.reptile(model, 3, reference.sample_task, None, k, epsilon, progress=False)
        assert same_parameters(model, before), (k, epsilon)


@pytest.mark.parametrize("overrides, match", [
    (dict(nb_iterations=-1), "nb_iterations must be >= 0"),
    (dict(k=-2), "k must be >= 0"),
    (dict(epsilon=-0.5), "epsilon must be a finite number >= 0"),
    (dict(indices=torch.zeros(1, 1, 5, 10, dtype=torch.long)), r"\[0, \.\.\.\] for nb_iterations=0"),
])
def test_negative_counts_and_steps_are_refused(overrides, match):
    args = dict(nb_iterations=0, k=1, epsilon=0.1)
    indices = overrides.pop("indices", None)
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        reptile_fast.reptile(reference.MLP(), args["nb_iterations"], reference.sample_task, None, args["k"],
                             args["epsilon"], progress=False, indices=indices)
