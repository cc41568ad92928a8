"""Review of the drop-in's reference path: what a user's own inner loop returns is checked, so a
mistake there is a ValueError/TypeError naming it, not an IndexError or AttributeError from
inside the outer update (or, as in the seed's ``zip``, parameters silently left untrained)."""
import warnings

import pytest
import torch

import reptile_fast
from reptile_fast import reference


def _inner(transform):
    def perform(model, task, k):
        return transform(model, reference.perform_k_training_steps(model, task, k))
    return perform


@pytest.mark.parametrize("transform, error, match", [
    (lambda m, ps: m.state_dict(), TypeError, "a list of tensors"),                 # names, not tensors
    (lambda m, ps: None, TypeError, "returned NoneType"),
    (lambda m, ps: list(ps)[:-1], ValueError, "returned 5 tensors; the model has 6"),
    (lambda m, ps: [p.detach().numpy() for p in ps], TypeError, "ndarray"),
    (lambda m, ps: [p[:1] for p in ps], ValueError, r"network\.0\.weight.*shape"),
])
def test_custom_inner_loop_result_is_checked(transform, error, match):
    model = reference.MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            reptile_fast.reptile(model, 3, reference.sample_task, _inner(transform), progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # φ untouched


def test_custom_inner_loop_may_return_a_generator_or_a_tuple():
    for transform in (lambda m, ps: m.parameters(), lambda m, ps: tuple(ps)):
        torch.manual_seed(0)
        model = reference.MLP()
        ref = reference.MLP()
        ref.load_state_dict(model.state_dict())
        torch.manual_seed(1)
        reference.reptile(ref, 3, reference.sample_task, reference.perform_k_training_steps, progress=False)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reptile_fast.reptile(model, 3, reference.sample_task, _inner(transform), progress=False)
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))


def test_numpy_integers_are_accepted_as_the_seed_accepts_them():
    """The seed's loop takes any integer (``range(nb_iterations)``, ``k * N // batch_size``), so
    a sweep such as ``for k in np.arange(1, 4)`` works there; the drop-in raised TypeError
    "k must be an int, got int64". Same numbers as with Python ints."""
    import numpy as np

    results = []
    for cast in (int, np.int64):
        torch.manual_seed(0)
        model = reference.MLP()
        reptile_fast.reptile(model, cast(3), reference.sample_task, reference.perform_k_training_steps,
                             k=cast(2), meta_batch_size=cast(2), chunk_size=cast(2), progress=False)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(TypeError, match="k must be an int"):
        reptile_fast.reptile(reference.MLP(), 3, reference.sample_task, k=True, progress=False)


def test_a_zero_dim_tensor_epsilon_is_accepted_as_the_seed_accepts_it():
    """The seed's update ``p + epsilon * (q - p)`` takes a 0-dim tensor ε (e.g. from a schedule
    built with torch); the drop-in gives the same numbers as with the float."""
    results = []
    for eps in (0.1, torch.tensor(0.1, dtype=torch.float64)):
        torch.manual_seed(0)
        model = reference.MLP()
        reptile_fast.reptile(model, 3, reference.sample_task, reference.perform_k_training_steps, epsilon=eps,
                             progress=False)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for bad, error in ((torch.tensor([0.1, 0.2]), TypeError), (torch.tensor(True), TypeError),
                       (torch.tensor(-0.1), ValueError)):
        with pytest.raises(error, match="epsilon"):
            reptile_fast.reptile(reference.MLP(), 3, reference.sample_task, epsilon=bad, progress=False)
