"""reptile_fast.reptile, the drop-in for the seed's reptile(): the same parameters as the
reference loop when fed the same draws, the reference path (with one warning) for custom inner
loops, and clear errors for bad input.

Tolerances: the fast paths run the reference's floating-point operations except for the order
of additions inside matrix products (fp32, a few ulps per step); over 20 meta-steps of the sine
MLP the largest relative difference measured is ~6e-6, so rtol 1e-5 with atol 1e-6 for entries
near zero (|φ| ~ 0.1–1) is the issue's bound, not a loosened one.
"""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import reptile_fast
from reptile_fast import Reptile, TaskBatch, reference
from reptile_fast import compiled_step
from reptile_fast.backends.base import UnsupportedModelError
from reptile_fast.dropin import ReferencePathWarning
from reptile_fast.mlp_spec import extract_mlp_spec
from reptile_fast.seed_recognition import is_seed_sample_task, is_standard_inner_loop, standard_inner_loop

from _compiled import compiled_calls  # noqa: E402

#: the compiled path's maths without a compiler (fast to set up in tests)
EAGER = {"backend": "compiled", "backend_options": {"mode": "eager"}}

RTOL, ATOL = 1e-5, 1e-6


def record_seed_draws(sample_task, n_tasks, seed, k=1, batch=10):
    """Tasks and randperm plans in the seed's order from the global RNG: ``(tasks, plans)`` with
    plans long ``[n_tasks, k·N//batch, batch]``."""
    torch.manual_seed(seed)
    tasks, plans = [], []
    for _ in range(n_tasks):
        task = sample_task()
        n = task[0].shape[0]
        tasks.append(task)
        plans.append(torch.stack([torch.randperm(n)[:batch] for _ in range(k * n // batch)]))
    return tasks, torch.stack(plans)


def replay(tasks):
    """A sample_task that returns the recorded tasks in order."""
    it = iter(tasks)
    return lambda: next(it)


def assert_params_close(model_a, model_b, rtol=RTOL, atol=ATOL):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def no_reference_warning(record):
    return not [w for w in record if issubclass(w.category, ReferencePathWarning)]


# ---------------------------------------------------------------------- same draws, same numbers
@pytest.mark.parametrize("mode, chunk_size", [("native", 500), ("native", 19), ("scan", 500), ("scan", 19),
                                              ("eager", 500)])
def test_meta_batch_1_equals_reference_with_same_draws(mode, chunk_size):
    """20 meta-steps of the seed's experiment: the drop-in fed the seed's own task and randperm
    draws ends where reference.reptile (the seed's loop) ends under the same manual_seed.
    (chunk_size 19: a chunk of 19 compiled meta-steps, then a chunk of one.)"""
    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_fast = copy.deepcopy(model_ref)
    params_before = [id(p) for p in model_fast.parameters()]
    tasks, plans = record_seed_draws(reference.sample_task, 20, seed=7)
    torch.manual_seed(7)
    reference.reptile(model_ref, 20, reference.sample_task, reference.perform_k_training_steps, progress=False)
    # the drop-in's program for this shape, compiled now (once per process) so that the count
    # below sees only the training
    compiled_step.get_program(extract_mlp_spec(model_fast), lr=0.02, loss="mse", steps=5, n_tasks=1, batch=10,
                              dtype=torch.float32, mode=mode).prepare()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats, ran = compiled_calls(reptile_fast.reptile, model_fast, 20, replay(tasks),
                                    reference.perform_k_training_steps, backend="compiled",
                                    backend_options={"mode": mode}, progress=False,
                                    indices=plans[:, None], chunk_size=chunk_size)
    assert no_reference_warning(record)
    assert stats["path"] == "compiled" and stats["inner_steps"] == 5 and stats["inner_batch_size"] == 10
    assert stats["mode"] == mode and stats["fallback_reason"] is None
    # Compiled code really ran in scan mode: one call for the chunk of 20 (chunk_size 500) or of
    # 19 (the last, single meta-step runs uncompiled by design); none in eager mode.
    assert ran == (1 if mode == "scan" else 0), ran
    assert len(stats["loss"]) == 20
    assert [id(p) for p in model_fast.parameters()] == params_before  # updated in place
    assert_params_close(model_ref, model_fast)


def test_compiled_program_is_cached():
    torch.manual_seed(0)
    tasks, plans = record_seed_draws(reference.sample_task, 4, seed=1)
    model = reference.MLP()
    reptile_fast.reptile(model, 2, replay(tasks[:2]), backend="compiled", progress=False, indices=plans[:2, None])
    stats = reptile_fast.reptile(model, 2, replay(tasks[2:]), backend="compiled", progress=False,
                                 indices=plans[2:, None])
    assert stats["compile_seconds"] == 0.0


def test_seed_functions_take_the_fast_path(seed_module):
    """The user's own seed_program functions, passed as they are: recognised, fast, and equal to
    the seed's own reptile() fed the same draws."""
    assert is_standard_inner_loop(seed_module.perform_k_training_steps) == 10
    torch.manual_seed(3)
    model_seed = seed_module.MLP()
    model_fast = copy.deepcopy(model_seed)
    tasks, plans = record_seed_draws(seed_module.sample_task, 20, seed=5)
    torch.manual_seed(5)
    seed_module.reptile(model_seed, 20, seed_module.sample_task, seed_module.perform_k_training_steps)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = reptile_fast.reptile(model_fast, 20, replay(tasks), seed_module.perform_k_training_steps,
                                     progress=False, indices=plans[:, None])
    assert no_reference_warning(record)
    assert stats["path"] == "compiled"
    assert_params_close(model_seed, model_fast)
    # And without fed draws (the drop-in draws its own), straight from the seed's sample_task.
    stats = reptile_fast.reptile(model_fast, 30, seed_module.sample_task, seed_module.perform_k_training_steps,
                                 progress=False)
    assert stats["path"] == "compiled" and len(stats["loss"]) == 30
    assert "vectorised" in stats["tasks"]
    assert all(torch.isfinite(p).all() for p in model_fast.parameters())


def test_standard_inner_loop_recognition():
    assert is_standard_inner_loop(None) == 10
    assert is_standard_inner_loop(reference.perform_k_training_steps) == 10
    assert is_standard_inner_loop(standard_inner_loop) == 10
    assert is_standard_inner_loop(functools.partial(reference.perform_k_training_steps, batch_size=5)) == 5
    assert is_standard_inner_loop(lambda m, t, k: reference.perform_k_training_steps(m, t, k)) is None
    assert is_standard_inner_loop(functools.partial(reference.perform_k_training_steps, lr=0.1)) is None

    def other_lr(model, task, k, batch_size=10):  # the seed's loop with another learning rate
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        train_x, train_y, loss_fct = task
        for epoch in range(k * train_x.shape[0] // batch_size):
            ind = torch.randperm(train_x.shape[0])[:batch_size]
            x_batch = train_x[ind].unsqueeze(-1)
            target = train_y[ind].unsqueeze(-1)
            loss = loss_fct(model(x_batch), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p for p in model.parameters()]

    assert is_standard_inner_loop(other_lr) is None


def test_seed_sample_task_recognition(seed_module):
    """The seed's sample_task (drawn vectorised by the fast paths) is recognised; an edited one
    is not (it is then called once per task)."""
    assert is_seed_sample_task(seed_module.sample_task)
    assert is_seed_sample_task(reference.sample_task)
    namespace = dict(seed_module.__dict__)
    source = """
@torch.no_grad()
def sample_task():
    a = torch.rand(1).item() * 2.9 + .1  # another amplitude range
    b = torch.rand(1).item() * 2 * np.pi
    x = torch.linspace(-5, 5, 50)
    y = a * torch.sin(x + b)
    loss_fct = nn.MSELoss()
    return x, y, loss_fct
"""
    exec(source, namespace)
    assert not is_seed_sample_task(namespace["sample_task"])
    assert not is_seed_sample_task(lambda: seed_module.sample_task())
    namespace = dict(seed_module.__dict__, np=type("FakeNumpy", (), {"pi": 3.0}))
    exec(source.replace("2.9", "4.9"), namespace)  # the seed's code, but π is not numpy's
    assert not is_seed_sample_task(namespace["sample_task"])


def test_batch_size_of_a_partial_is_used():
    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_fast = copy.deepcopy(model_ref)
    inner = functools.partial(reference.perform_k_training_steps, batch_size=25)
    tasks, plans = record_seed_draws(reference.sample_task, 6, seed=2, k=2, batch=25)
    torch.manual_seed(2)
    reference.reptile(model_ref, 6, reference.sample_task, inner, k=2, progress=False)
    stats = reptile_fast.reptile(model_fast, 6, replay(tasks), inner, k=2, **EAGER, progress=False,
                                 indices=plans[:, None])
    assert stats["inner_steps"] == 4 and stats["inner_batch_size"] == 25
    assert_params_close(model_ref, model_fast)


# ---------------------------------------------------------------------- the reference path
def test_custom_inner_loop_runs_the_reference_loop_with_one_warning():
    def my_inner_loop(model, task, k):
        return reference.perform_k_training_steps(model, task, k)

    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_drop = copy.deepcopy(model_ref)
    torch.manual_seed(9)
    reference.reptile(model_ref, 20, reference.sample_task, my_inner_loop, progress=False)
    torch.manual_seed(9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = reptile_fast.reptile(model_drop, 20, reference.sample_task, my_inner_loop, progress=False)
    ours = [w for w in record if issubclass(w.category, ReferencePathWarning)]
    assert len(ours) == 1 and "my_inner_loop" in str(ours[0].message)
    assert stats["path"] == "reference" and "not the standard inner loop" in stats["reason"]
    for a, b in zip(model_ref.parameters(), model_drop.parameters()):
        assert torch.equal(a, b)  # the same operations in the same order: bit for bit


def test_custom_inner_loop_may_use_its_own_task_format():
    """Tasks go to a custom inner loop unread: any format the user's functions agree on works."""
    def dict_task():
        x, y, _ = reference.sample_task()
        return {"x": x[:, None], "y": y[:, None]}

    def inner(model, task, k):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(k):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(task["x"]), task["y"]).backward()
            optimizer.step()
        return list(model.parameters())

    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_drop = copy.deepcopy(model_ref)
    torch.manual_seed(1)
    reference.reptile(model_ref, 3, dict_task, inner, k=2, progress=False)
    torch.manual_seed(1)
    with pytest.warns(ReferencePathWarning):
        reptile_fast.reptile(model_drop, 3, dict_task, inner, k=2, progress=False)
    for a, b in zip(model_ref.parameters(), model_drop.parameters()):
        assert torch.equal(a, b)


def test_unsupported_loss_runs_the_reference_loop():
    def l1_task():
        x, y, _ = reference.sample_task()
        return x, y, nn.L1Loss()

    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_drop = copy.deepcopy(model_ref)
    torch.manual_seed(4)
    reference.reptile(model_ref, 5, l1_task, reference.perform_k_training_steps, progress=False)
    torch.manual_seed(4)
    with pytest.warns(ReferencePathWarning, match="L1Loss"):
        stats = reptile_fast.reptile(model_drop, 5, l1_task, progress=False)
    assert stats["path"] == "reference"
    for a, b in zip(model_ref.parameters(), model_drop.parameters()):
        assert torch.equal(a, b)


def test_seed_loop_on_two_dimensional_data_is_not_reinterpreted():
    """The seed's loop unsqueezes its data; on [N, 1] data that is not the standard loop's maths,
    so the drop-in keeps the seed's (reference path) rather than silently changing it."""
    def task_2d():
        x, y, loss = reference.sample_task()
        return x[:, None], y[:, None], loss

    model = reference.MLP()
    with pytest.warns(ReferencePathWarning, match="unsqueezes 1-D data"):
        stats = reptile_fast.reptile(model, 2, task_2d, reference.perform_k_training_steps, progress=False)
    assert stats["path"] == "reference"


# ---------------------------------------------------------------------- other shapes, meta-batches
def stacked(tasks):
    return TaskBatch(torch.stack([t[0] if t[0].dim() == 2 else t[0][:, None] for t in tasks]),
                     torch.stack([t[1] if t[1].dim() != 1 or t[1].dtype == torch.long else t[1][:, None]
                                  for t in tasks]))


@pytest.mark.parametrize("options", [EAGER, {"backend": "auto"}, {"backend": "reference"}])
def test_meta_batch_4_equals_trainer_meta_step(options):
    """meta_batch_size 4: the mean over tasks, exactly Reptile(backend='reference').meta_step on
    the same stacked tasks and plans."""
    T, n = 4, 5
    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_fast = copy.deepcopy(model_ref)
    tasks, plans = record_seed_draws(reference.sample_task, n * T, seed=11)
    trainer = Reptile(model_ref, backend="reference")
    for i in range(n):
        trainer.meta_step(stacked(tasks[i * T:(i + 1) * T]), plans[i * T:(i + 1) * T])
    stats = reptile_fast.reptile(model_fast, n, replay(tasks), meta_batch_size=T, **options,
                                 progress=False, indices=plans.view(n, T, 5, 10))
    assert stats["meta_batch_size"] == T
    if options.get("backend") == "auto":
        assert stats["path"] == "compiled", "auto on the CPU runs the compiled program at any meta-batch"
    assert_params_close(model_ref, model_fast)


def test_classification_and_multi_dimensional_regression():
    """[N, in] inputs with long labels (cross-entropy) and [N, out] targets (MSE), perform None."""
    gen = torch.Generator().manual_seed(0)

    def classification_task():
        return torch.randn(20, 3, generator=gen), torch.randint(0, 4, (20,), generator=gen), nn.CrossEntropyLoss()

    def regression_task():
        x = torch.randn(30, 2, generator=gen)
        return x, torch.cat([x.sin(), x.cos().sum(1, keepdim=True)], 1), nn.MSELoss()

    for sample, out_dim, steps in ((classification_task, 4, 4), (regression_task, 3, 6)):
        torch.manual_seed(1)
        model_ref = nn.Sequential(nn.Linear(3 if out_dim == 4 else 2, 16), nn.ReLU(), nn.Linear(16, out_dim))
        model_fast = copy.deepcopy(model_ref)
        tasks = [sample() for _ in range(6)]
        plans = torch.stack([torch.randperm(tasks[0][0].shape[0])[:10]
                             for _ in range(6 * steps)]).view(6, 1, steps, 10)
        trainer = Reptile(model_ref, backend="reference", inner_steps=steps,
                          loss="cross_entropy" if out_dim == 4 else "mse")
        for i in range(6):
            trainer.meta_step(stacked(tasks[i:i + 1]), plans[i])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            stats = reptile_fast.reptile(model_fast, 6, replay(tasks), k=2, **EAGER, progress=False,
                                         indices=plans)
        assert no_reference_warning(record) and stats["path"] == "compiled" and stats["mode"] == "eager"
        assert_params_close(model_ref, model_fast)


def test_non_mlp_model_uses_the_trainer():
    class Scaled(nn.Module):  # not a plain Linear chain: the compiled path cannot take it
        def __init__(self):
            super().__init__()
            self.net = reference.MLP()
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.net(x) * self.scale

    torch.manual_seed(0)
    model_ref = Scaled()
    model_fast = copy.deepcopy(model_ref)
    tasks, plans = record_seed_draws(reference.sample_task, 5, seed=3)
    torch.manual_seed(3)
    reference.reptile(model_ref, 5, reference.sample_task, reference.perform_k_training_steps, progress=False)
    stats = reptile_fast.reptile(model_fast, 5, replay(tasks), progress=False, indices=plans[:, None])
    assert stats["path"] == "torch"  # the trainer's "auto" on the CPU
    assert_params_close(model_ref, model_fast)
    with pytest.raises(UnsupportedModelError, match="scale|not supported|operation"):
        reptile_fast.reptile(Scaled(), 1, reference.sample_task, backend="compiled", progress=False)


def test_falls_back_to_eager_when_torch_compile_fails(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    from reptile_fast import native_build

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)  # no C compiler either
    monkeypatch.setattr(compiled_step, "_PROGRAMS", {})
    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_fast = copy.deepcopy(model_ref)
    tasks, plans = record_seed_draws(reference.sample_task, 5, seed=8)
    torch.manual_seed(8)
    reference.reptile(model_ref, 5, reference.sample_task, reference.perform_k_training_steps, progress=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        stats = reptile_fast.reptile(model_fast, 5, replay(tasks), progress=False, indices=plans[:, None])
    assert stats["path"] == "compiled" and stats["mode"] == "eager"
    assert "no C++ compiler" in stats["fallback_reason"]
    assert_params_close(model_ref, model_fast)


def test_nan_raises_and_keeps_parameters():
    def bad_task():
        x, y, loss = reference.sample_task()
        return x, y * 1e30, loss

    model = reference.MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(reptile_fast.NonFiniteError, match="non-finite") as info:
        reptile_fast.reptile(model, 3, bad_task, **EAGER, progress=False)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    # in the words of the seed's call, which has no inner_lr/outer_lr arguments
    assert "Lower epsilon" in str(info.value) and "inner_lr" not in str(info.value)
    assert info.value.iteration == 1


def test_nan_on_the_reference_path_is_worded_for_the_seed_call():
    def perform(model, task, k):  # a custom inner loop: the reference path
        return reference.perform_k_training_steps(model, task, k)

    def nan_task():
        x, y, loss = reference.sample_task()
        return x, y * float("nan"), loss

    with pytest.warns(reptile_fast.ReferencePathWarning):
        with pytest.raises(reptile_fast.NonFiniteError, match="Lower epsilon") as info:
            reptile_fast.reptile(reference.MLP(), 3, nan_task, perform, progress=False)
    assert "inner_lr" not in str(info.value) and info.value.iteration == 1


# ---------------------------------------------------------------------- bad input
def call(**overrides):
    args = dict(model=reference.MLP(), nb_iterations=2, sample_task=reference.sample_task,
                perform_k_training_steps=None, k=1, epsilon=0.1)
    kwargs = {key: overrides.pop(key) for key in list(overrides) if key not in args}
    args.update(overrides)
    return reptile_fast.reptile(*args.values(), progress=False, **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(nb_iterations=-3), ValueError, "nb_iterations"),
    (dict(nb_iterations=2.5), TypeError, "nb_iterations"),
    (dict(k=-1), ValueError, "k must"),
    (dict(k=1.5), TypeError, "k must"),
    (dict(epsilon=float("nan")), ValueError, "epsilon"),
    (dict(epsilon=float("inf")), ValueError, "epsilon"),
    (dict(epsilon=-0.1), ValueError, "epsilon"),
    (dict(epsilon="0.1"), TypeError, "epsilon"),
    (dict(model="not a model"), TypeError, "model"),
    (dict(sample_task=42), TypeError, "sample_task must be callable"),
    (dict(sample_task=lambda: (torch.zeros(50), torch.zeros(50))), TypeError, "tuple"),
    (dict(sample_task=lambda: ([0.0] * 50, torch.zeros(50), nn.MSELoss())), TypeError, "torch.Tensor"),
    (dict(sample_task=lambda: (torch.zeros(50), torch.zeros(40), nn.MSELoss())), ValueError, "one row per point"),
    (dict(sample_task=lambda: (torch.zeros(50), torch.zeros(50), "mse")), TypeError, "loss_fct"),
    (dict(sample_task=lambda: (torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64),
                               nn.MSELoss())), TypeError, "dtype"),
    (dict(perform_k_training_steps="sgd"), TypeError, "perform_k_training_steps"),
    (dict(meta_batch_size=0), ValueError, "meta_batch_size"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
    (dict(backend=None), TypeError, "backend"),
    (dict(generator=0), TypeError, "generator"),
    (dict(indices=torch.zeros(2, 1, 5, 9, dtype=torch.long)), ValueError, "indices must"),
    (dict(indices=torch.zeros(2, 1, 5, 10)), ValueError, "indices must"),
    (dict(indices=torch.full((2, 1, 5, 10), 50, dtype=torch.long)), ValueError, "indices must lie"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


def test_tasks_that_change_shape_are_rejected():
    sizes = iter([50, 50, 40])

    def varying():
        n = next(sizes)
        return torch.linspace(-5, 5, n), torch.zeros(n), nn.MSELoss()

    with pytest.raises(ValueError, match="must agree"):
        call(sample_task=varying, nb_iterations=3, **EAGER)


def test_indices_with_the_reference_path_is_an_error():
    with pytest.raises(ValueError, match="reference loop"):
        call(perform_k_training_steps=lambda m, t, k: list(m.parameters()),
             indices=torch.zeros(2, 1, 5, 10, dtype=torch.long))


def test_seed_full_experiment_lands_in_the_quality_band():
    """The seed's whole experiment through the drop-in (30000 iterations, meta-batch 1, the seed's
    functions), evaluated as the seed's demo adapts: 200 held-out tasks, 160 SGD steps of 10
    points at lr 0.02, MSE on all 50 points.  Band: <= 0.035 (the seed gives 0.016-0.038 over
    training seeds 0-5 here; this uses training seed 0, the first of the issue's three)."""
    torch.manual_seed(0)
    model = reference.MLP()
    stats = reptile_fast.reptile(model, 30000, reference.sample_task, reference.perform_k_training_steps,
                                 progress=False)
    assert stats["path"] == "compiled" and stats["mode"] == compiled_step.DEFAULT_MODE, stats
    # The seed's demo: new_task = sample_task(); perform_k_training_steps(model, new_task, 32), on
    # held-out draws from torch.manual_seed(10_000), as bench/dropin_experiment.py records them.
    from bench.seed_experiment import held_out_mse

    mse = held_out_mse(reference, model, 200, 10_000)
    assert mse <= 0.035, mse
