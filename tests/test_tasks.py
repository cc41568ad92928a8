"""TaskBatch validation, the sample_indices plan and the Sine task family."""
import math

import pytest
import torch

from reptile_fast import Sine, TaskBatch, reference, sample_indices


def test_taskbatch_shapes_regression_and_classification():
    tb = TaskBatch(torch.zeros(3, 7, 2), torch.zeros(3, 7, 4))
    assert (tb.n_tasks, tb.n_points, tb.is_classification) == (3, 7, False)
    tc = TaskBatch(torch.zeros(2, 5, 1, 4, 4), torch.zeros(2, 5, dtype=torch.long))
    assert tc.is_classification
    assert tb[1].n_tasks == 1 and tb[0:2].n_tasks == 2


@pytest.mark.parametrize("x, y, exc, words", [
    (torch.zeros(3, 7), torch.zeros(3, 7, 1), ValueError, "shape"),
    (torch.zeros(3, 7, 1, dtype=torch.int8), torch.zeros(3, 7, 1), TypeError, "floating"),
    (torch.zeros(3, 7, 1, dtype=torch.bool), torch.zeros(3, 7, 1), TypeError, "floating"),
    (torch.zeros(3, 7, 1), torch.zeros(3, 6, 1), ValueError, "disagree"),
    (torch.zeros(3, 7, 1), torch.zeros(3, 7), ValueError, "out_features"),
    (torch.zeros(3, 7, 1), torch.zeros(3, 7, 1, dtype=torch.long), ValueError, "labels"),
    (torch.zeros(3, 7, 1), torch.zeros(3, 7, 1, dtype=torch.int32), TypeError, "long"),
    (torch.zeros(3, 7, 1), torch.zeros(3, 7, 1, dtype=torch.float64), TypeError, "dtype"),
    (torch.full((3, 7, 1), math.nan), torch.zeros(3, 7, 1), ValueError, "NaN"),
    (torch.zeros(3, 7, 1), torch.full((3, 7, 1), math.inf), ValueError, "NaN or infinite"),
    (torch.zeros(0, 7, 1), torch.zeros(0, 7, 1), ValueError, "at least one task"),
    ([[0.0]], torch.zeros(1, 1, 1), TypeError, "torch.Tensor"),
    (torch.zeros(2, 3, 1), -torch.ones(2, 3, dtype=torch.long), ValueError, "non-negative"),
])
def test_taskbatch_rejects_bad_input(x, y, exc, words):
    with pytest.raises(exc, match=words):
        TaskBatch(x, y)


def test_sample_indices_shape_distinct_and_range():
    idx = sample_indices(64, 5, 50, 10, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (64, 5, 10) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < 50
    sorted_idx = idx.sort(-1).values
    assert bool((sorted_idx[..., 1:] != sorted_idx[..., :-1]).all()), "indices repeat within a step"


def test_sample_indices_full_batch_is_permutation():
    idx = sample_indices(4, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx.sort(-1).values, torch.arange(9).expand(4, 3, 9))


def test_sample_indices_deterministic_with_generator():
    a = sample_indices(8, 5, 50, 10, generator=torch.Generator().manual_seed(7))
    b = sample_indices(8, 5, 50, 10, generator=torch.Generator().manual_seed(7))
    c = sample_indices(8, 5, 50, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_indices_uniform_frequencies():
    """Each point is in a batch with probability B/N and each position is uniform over points:
    chi-square over 20k draws at a threshold ~ 6 standard deviations above its mean."""
    n, b, draws = 20, 5, 20000
    idx = sample_indices(draws, 1, n, b, generator=torch.Generator().manual_seed(3))
    for counts in (torch.bincount(idx.flatten(), minlength=n).double(),
                   torch.bincount(idx[:, 0, 0], minlength=n).double()):
        expected = counts.sum() / n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = n - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2


@pytest.mark.parametrize("args, exc", [
    ((4, 5, 10, 11), ValueError),
    ((0, 5, 10, 2), ValueError),
    ((4, 0, 10, 2), ValueError),
    ((4, 5, 10, 0), ValueError),
    ((4.0, 5, 10, 2), TypeError),
])
def test_sample_indices_rejects_bad_input(args, exc):
    with pytest.raises(exc):
        sample_indices(*args)


def test_sine_shapes_ranges_determinism():
    sine = Sine()
    g = torch.Generator().manual_seed(0)
    tb = sine.sample(500, generator=g)
    assert tb.x.shape == (500, 50, 1) and tb.y.shape == (500, 50, 1)
    assert torch.equal(tb.x[0, :, 0], torch.linspace(-5, 5, 50))
    assert torch.equal(tb.x[0], tb.x[-1])
    a, b = sine.sample_params(10000, generator=torch.Generator().manual_seed(1))
    assert 0.1 <= float(a.min()) and float(a.max()) <= 5.0
    assert 0.0 <= float(b.min()) and float(b.max()) <= 2 * math.pi
    assert abs(float(a.mean()) - 2.55) < 0.05 and abs(float(b.mean()) - math.pi) < 0.05
    amp = tb.y.abs().amax(dim=(1, 2))
    assert float(amp.max()) <= 5.0 + 1e-5
    t1 = sine.sample(4, generator=torch.Generator().manual_seed(9))
    t2 = sine.sample(4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(t1.y, t2.y)


def test_sine_make_matches_seed_arithmetic():
    torch.manual_seed(4)
    a = torch.rand(1).item() * 4.9 + .1
    b = torch.rand(1).item() * 2 * math.pi
    torch.manual_seed(4)
    x, y, _ = reference.sample_task()
    tb = Sine().make(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))
    assert torch.equal(tb.x[0, :, 0], x) and torch.equal(tb.y[0, :, 0], y)


@pytest.mark.parametrize("kwargs", [
    {"amplitude": (5.0, 0.1)}, {"phase": (0.0, math.inf)}, {"n_points": 0}, {"amplitude": 3.0},
])
def test_sine_rejects_bad_config(kwargs):
    with pytest.raises((ValueError, TypeError)):
        Sine(**kwargs)


@pytest.mark.parametrize("n_steps,n_tasks,rows,batch", [(1, 1, 5, 10), (500, 1, 5, 10), (7, 3, 6, 10),
                                                        (4, 20, 5, 50), (3, 100, 2, 4)])
def test_sine_sample_steps_is_the_round_by_round_draws(n_steps, n_tasks, rows, batch):
    """``Sine.sample_steps`` gives bitwise the tasks and plans of ``n_steps`` rounds of
    ``sample(n_tasks)`` then ``sample_indices(...)`` on the same generator, and leaves the
    generator where those rounds leave it (batch = n_points: the argsort path; 500 × 5 rows and
    100 × 2: the C selection; 5 rows: topk)."""
    sine = Sine()
    g = torch.Generator().manual_seed(n_steps * 1000 + n_tasks)
    want_t, want_p = [], []
    for _ in range(n_steps):
        t = sine.sample(n_tasks, generator=g)
        want_t.append(t)
        want_p.append(sample_indices(n_tasks, rows, t.n_points, batch, generator=g))
    g2 = torch.Generator().manual_seed(n_steps * 1000 + n_tasks)
    tasks, plans = sine.sample_steps(n_steps, n_tasks, rows, batch, generator=g2)
    assert torch.equal(tasks.x, torch.cat([t.x for t in want_t]))
    assert torch.equal(tasks.y, torch.cat([t.y for t in want_t]))
    assert torch.equal(plans, torch.cat(want_p))
    assert torch.equal(g.get_state(), g2.get_state())


def test_sine_sample_steps_on_the_global_generator_and_bad_arguments():
    torch.manual_seed(11)
    t1 = Sine().sample(2)
    p1 = sample_indices(2, 5, 50, 10)
    torch.manual_seed(11)
    tasks, plans = Sine().sample_steps(1, 2, 5, 10)
    assert torch.equal(tasks.y, t1.y) and torch.equal(plans, p1)
    with pytest.raises(ValueError, match="batch_size"):
        Sine().sample_steps(2, 1, 5, 51)
    for bad in (0, -1, 1.5, True):
        with pytest.raises((ValueError, TypeError)):
            Sine().sample_steps(bad, 1, 5, 10)


def test_taskbatch_takes_integer_ids_as_inputs():
    """Token ids (int64 / int32, for a model starting with nn.Embedding) are inputs too: float
    targets of any float dtype, class labels; ``to(dtype=...)`` casts float targets, not the ids."""
    ids = torch.randint(0, 10, (3, 7, 4))
    tb = TaskBatch(ids, torch.zeros(3, 7, 1, dtype=torch.float64))
    assert tb.x.dtype == torch.long and not tb.is_classification
    tc = TaskBatch(ids.int(), torch.zeros(3, 7, dtype=torch.long))
    assert tc.is_classification and tc.x.dtype == torch.int32
    moved = tb.to(dtype=torch.float32)
    assert moved.x.dtype == torch.long and moved.y.dtype == torch.float32 and torch.equal(moved.x, ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_sampling_on_an_unavailable_device_is_a_clear_error(device):
    """``Sine().sample(2, device="cuda")`` on a machine without CUDA failed inside torch
    ("Found no NVIDIA driver ...", a RuntimeError); the task families now name the device."""
    from reptile_fast import sample_indices

    with pytest.raises(ValueError, match="is not available on this machine"):
        Sine().sample(2, device=device)
    with pytest.raises(ValueError, match="is not available on this machine"):
        Sine().sample_steps(2, 1, 5, 10, device=device)
    with pytest.raises(ValueError, match="is not available on this machine"):
        sample_indices(2, 5, 50, 10, device=device)


# ------------------------------------------------------------------ Sine's dtype
def test_sine_float64_tasks_are_the_same_draws_computed_in_float64():
    """A float64 model had no Sine tasks to train on (float32 only: 'tasks.x dtype differs').
    ``Sine(dtype=torch.float64)`` computes y = a·sin(x + b) in float64 from the very draws of the
    float32 family, so it is the float64 oracle of the same tasks."""
    g32, g64 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t32 = Sine().sample(7, generator=g32)
    t64 = Sine(dtype=torch.float64).sample(7, generator=g64)
    assert t64.x.dtype == t64.y.dtype == torch.float64 and t32.x.dtype == torch.float32
    a, b = Sine().sample_params(7, generator=torch.Generator().manual_seed(5))  # float64 draws
    grid = torch.linspace(-5.0, 5.0, 50, dtype=torch.float64)
    want = a[:, None] * torch.sin(grid[None, :] + b[:, None])
    assert torch.equal(t64.x[0, :, 0], grid) and torch.equal(t64.y[..., 0], want), "y64"
    # the float32 tasks are these rounded: |a|·(sin's and the sum's rounding) ≲ 4 ulp of 5·(1 + 12)
    assert (t32.y.double() - t64.y).abs().max() <= 4 * 2.0 ** -24 * 5.0 * 13
    assert torch.equal(g32.get_state(), g64.get_state()), "both consumed the generator alike"
    steps64, plans64 = Sine(dtype=torch.float64).sample_steps(2, 3, 5, 10, generator=torch.Generator().manual_seed(1))
    steps32, plans32 = Sine().sample_steps(2, 3, 5, 10, generator=torch.Generator().manual_seed(1))
    assert steps64.y.dtype == torch.float64 and torch.equal(plans64, plans32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sine_low_precision_tasks_are_the_float32_tasks_rounded_once(dtype):
    t32 = Sine().sample(4, generator=torch.Generator().manual_seed(2))
    t = Sine(dtype=dtype).sample(4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(t.x, t32.x.to(dtype)) and torch.equal(t.y, t32.y.to(dtype))


def test_sine_dtype_is_checked():
    with pytest.raises(TypeError, match="dtype must be one of"):
        Sine(dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be one of"):
        Sine(dtype="float64")
    with pytest.raises(ValueError, match="amplitude must be at most 65504 in magnitude for torch.float16"):
        Sine(amplitude=(1.0, 1e5), dtype=torch.float16)
    with pytest.raises(ValueError, match="too wide for a torch.float16 grid"):
        Sine(x_range=(-1e5, 1e5), dtype=torch.float16)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_float64_model_trains_on_float64_sine_tasks(backend):
    """Every CPU backend trains a float64 MLP on them, equal to the reference to float64 rounding;
    float32 tasks for it are refused with a hint naming the way out."""
    from reptile_fast import MLP, Reptile

    def run(name):
        torch.manual_seed(0)
        trainer = Reptile(MLP(1, 16, 1).double(), backend=name)
        trainer.fit(Sine(dtype=torch.float64), 4, meta_batch_size=2, progress=False,
                    generator=torch.Generator().manual_seed(3))
        return trainer

    ref, fast = run("reference"), run(backend)
    for (name, a), b in zip(ref.model.named_parameters(), fast.model.parameters()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    with pytest.raises(TypeError, match=r"Sine\(dtype=torch.float64\)"):
        ref.fit(Sine(), 5, progress=False)
