"""QA45: a helper's review of the task families, the plan's C selection and few-shot evaluation
(session 19); each test failed before its fix.

1. ``Omniglot(exclude_alphabets=iter(train.alphabets))`` excluded nothing: the unknown-name check
   used the iterator up, and the training alphabets leaked into the test set.
2. ``native_select.smallest_k`` returned index -1 for a row with fewer than k keys below +inf
   (NaN or inf keys), which would index the last point; ``topk`` answers instead now.
3. ``Sine.make(device="gpu")`` failed inside torch (``Sine.sample`` refused it by name); bools and
   complex amplitudes were taken.
4. ``Episodes(..., ways=1)`` was accepted: 1-way tasks score 100 % whatever the model does.
5. ``TaskBatch.to(dtype=torch.long)`` truncated float inputs into integer "ids".
6. ``MLP(activation=["tanh"])`` raised a bare "unhashable type".
"""
import pytest
import torch

from reptile_fast import MLP, Sine, TaskBatch
from reptile_fast.native_select import smallest_k
from reptile_fast.tasks import Omniglot
from reptile_fast.tasks.base import plan_from_keys
from reptile_fast.tasks.episodes import Episodes


def test_alphabets_given_as_iterators_are_read_once(tmp_path):
    from _fake_omniglot import make_folder

    folder = make_folder(tmp_path / "o", {"Alpha": 2, "Beta": 2, "Gamma": 2}, prefix="images_background")
    train = Omniglot([folder], ways=2, shots=1, alphabets=["Alpha"])
    for given in (iter(train.alphabets), (a for a in train.alphabets), map(str, train.alphabets)):
        test = Omniglot([folder], ways=2, shots=1, exclude_alphabets=given)
        assert test.alphabets == ["Beta", "Gamma"]
    assert Omniglot([folder], ways=2, shots=1, alphabets=iter(["Alpha", "Beta"])).alphabets == ["Alpha", "Beta"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_selection_with_too_few_finite_keys_is_topks(bad):
    keys = torch.rand(80, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keys[3, 5:] = bad  # 5 finite keys for k = 10
    want = keys.topk(10, dim=-1, largest=False, sorted=True).indices
    assert smallest_k(keys, 10) is None  # the C path declines
    plan = plan_from_keys(keys, 10)
    assert int(plan.min()) >= 0 and torch.equal(plan, want)
    keys[3, 5:] = torch.rand(45, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # finite again
    # (no ties: the C path orders equal keys by index, topk leaves them unspecified)
    got = smallest_k(keys, 10)
    if got is not None:  # None without a C compiler
        assert torch.equal(got, keys.topk(10, dim=-1, largest=False, sorted=True).indices)


def test_sine_make_checks_device_and_values():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Sine().make([1.0], [0.0], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Sine().make([1.0], [0.0], device="cuda")
    for bad in ([True], [1 + 2j]):
        with pytest.raises(TypeError, match="amplitude must be real numbers"):
            Sine().make(bad, [0.0])
    # float64 tasks keep the digits Python floats carry (converted directly, not through float32)
    y = Sine(dtype=torch.float64).make([0.1], [0.3]).y
    assert y.dtype == torch.float64 and y[0, 0, 0].item() == 0.1 * __import__("math").sin(-5 + 0.3)


def test_one_way_episodes_are_refused():
    support = TaskBatch(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    query = TaskBatch(torch.randn(2, 1, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ways must be >= 2"):
        Episodes(support, query, 1)
    assert Episodes(support, query, 2).ways == 2


def test_taskbatch_to_an_integer_dtype_is_refused():
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.long, torch.int32, torch.bool, "float64"):
        with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
            tasks.to(dtype=dtype)
    assert tasks.to(dtype=torch.float64).x.dtype == torch.float64


def test_mlp_activation_must_be_a_name():
    with pytest.raises(TypeError, match="activation must be a name"):
        MLP(activation=["tanh"])
