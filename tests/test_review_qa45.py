"""QA45: an adversarial review of the public API (session 19); each test failed before its fix.

1. The drop-in recognised a *wrapped* function as the seed's own (``inspect.unwrap`` followed any
   ``functools.wraps`` wrapper): a wrapper calling the seed's inner loop with ``batch_size=25`` ran
   as 5 steps of 10 points, and a wrapper of the seed's ``sample_task`` that shifts y was replaced
   by clean ``Sine`` tasks after its first call -- other maths, no warning.  Now only torch's own
   grad-mode decorators (the seed's ``@torch.no_grad()``) are seen through.
2. The drop-in with the seed's ``sample_task`` under ``torch.set_default_dtype(torch.float64)``:
   the later tasks were drawn float32 (``Sine()``), a TypeError at the second meta-step (naming a
   ``Sine`` the caller never used), after silently promoted float32 tasks on the chunked path.
3. ``trainer.loss = ...`` and ``trainer.outer_optimizer = ...`` were plain attributes: assigned,
   ignored by training, yet reported by ``hparams()`` and saved in checkpoints.  Now read-only.
4. ``evaluate(tasks, steps=0, indices=..., generator=...)`` ignored a wrong plan or generator that
   ``steps=1`` refuses.
"""
import functools
import warnings

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, Sine, reference, reptile
from reptile_fast.seed_recognition import classify_inner_loop, is_seed_sample_task


# ------------------------------------------------------------------ 1. wrapped seed functions
def test_a_wrapper_of_the_seed_functions_is_not_the_seed():
    @functools.wraps(reference.perform_k_training_steps)
    def inner_with_other_batch(model, task, k):
        return reference.perform_k_training_steps(model, task, k, batch_size=25)

    @functools.wraps(reference.sample_task)
    def shifted_tasks():
        x, y, loss = reference.sample_task()
        return x, y + 100.0, loss

    assert classify_inner_loop(reference.perform_k_training_steps)[0] == 10  # the seed's own: recognised
    assert classify_inner_loop(inner_with_other_batch) == (None, False)
    # through a decorator that turns gradients on (the same maths), not one that turns them off
    assert classify_inner_loop(torch.enable_grad()(reference.perform_k_training_steps))[0] == 10
    assert classify_inner_loop(torch.no_grad()(reference.perform_k_training_steps)) == (None, False)
    assert is_seed_sample_task(reference.sample_task)  # @torch.no_grad() is seen through
    assert is_seed_sample_task(torch.enable_grad()(reference.sample_task.__wrapped__))
    assert not is_seed_sample_task(shifted_tasks)


def test_the_dropin_trains_on_what_a_wrapped_sample_task_returns():
    """The shifted tasks' targets are ~100, so every meta-step's mean inner loss stays ~1e4 when
    they are what is trained on (the clean sines that replaced them gave ~10 from the second)."""
    @functools.wraps(reference.sample_task)
    def shifted_tasks():
        x, y, loss = reference.sample_task()
        return x, y + 100.0, loss

    torch.manual_seed(0)
    stats = reptile(MLP(), 4, shifted_tasks, None, k=1, epsilon=0.01, progress=False, backend="auto",
                    chunk_size=2, generator=torch.Generator().manual_seed(0))
    assert stats["tasks"] == "sample_task() calls"
    assert len(stats["loss"]) == 4 and min(stats["loss"]) > 1000, stats["loss"]


def test_a_wrapped_inner_loop_runs_on_the_reference_path():
    @functools.wraps(reference.perform_k_training_steps)
    def inner_with_other_batch(model, task, k):
        return reference.perform_k_training_steps(model, task, k, batch_size=25)

    torch.manual_seed(0)
    model = MLP()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = reptile(model, 2, reference.sample_task, inner_with_other_batch, k=1, progress=False)
    assert stats["path"] == "reference"
    assert any(type(w.message).__name__ == "ReferencePathWarning" for w in caught)


# ------------------------------------------------------------------ 2. float64 default dtype
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_dropin_with_the_seed_sample_task_in_float64(backend):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = MLP()
        assert next(model.parameters()).dtype == torch.float64
        stats = reptile(model, 5, reference.sample_task, None, k=1, progress=False, backend=backend,
                        chunk_size=2, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(previous)
    assert stats["tasks"].startswith("the seed's sample_task")
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ 3. fixed at construction
def test_loss_and_outer_optimizer_are_read_only():
    model = MLP(1, 8, 1)
    trainer = Reptile(model, backend="torch")
    with pytest.raises(AttributeError, match="loss is fixed.*build a new Reptile"):
        trainer.loss = nn.L1Loss()
    with pytest.raises(AttributeError, match="outer_optimizer is fixed.*build a new Reptile"):
        trainer.outer_optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert trainer.loss == "mse" and trainer.outer_optimizer is None
    assert trainer.hparams()["loss"] == "mse"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert Reptile(model, backend="torch", outer_optimizer=opt).outer_optimizer is opt


# ------------------------------------------------------------------ 4. evaluate(steps=0)
def test_evaluate_at_zero_steps_checks_its_plan_and_generator():
    trainer = Reptile(MLP(1, 8, 1), backend="torch")
    tasks = Sine().sample(3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        trainer.evaluate(tasks, 0, "garbage")
    with pytest.raises(TypeError, match="indices must be torch.long"):
        trainer.evaluate(tasks, 0, torch.zeros(3, 0, 10))
    with pytest.raises(ValueError, match="indices must have shape"):
        trainer.evaluate(tasks, 0, torch.zeros(3, 2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        trainer.evaluate(tasks, 0, generator=5)
    at_phi = trainer.evaluate(tasks, 0)
    assert torch.equal(trainer.evaluate(tasks, 0, torch.zeros(3, 0, 10, dtype=torch.long)), at_phi)
    assert torch.equal(trainer.evaluate(tasks, 0, generator=torch.Generator()), at_phi)


# ------------------------------------------------------------------ 5. inner_grad_weights
@pytest.mark.parametrize("weights, error, match", [
    ((True,) * 3, TypeError, "sequence of numbers"),             # read as 1.0 before
    (torch.ones(3, 1), TypeError, "sequence of numbers"),        # a [k, 1] tensor's rows read as numbers
    ((1e39,) * 3, ValueError, "at most 3.403e\\+38"),    # inf in float32: a NonFiniteError blaming the rates
])
def test_inner_grad_weights_refused_by_name(weights, error, match):
    with pytest.raises(error, match=match):
        Reptile(MLP(1, 8, 1), backend="torch", inner_steps=3, inner_grad_weights=weights)


def test_inner_grad_weights_take_real_numbers_of_any_kind():
    import numpy as np

    for weights in ((1, 2.5, np.float32(3)), torch.tensor([1.0, 2.0, 3.0]), np.ones(3)):
        trainer = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=3, inner_grad_weights=weights)
        assert all(isinstance(w, float) for w in trainer.config.grad_weights)


# ------------------------------------------------------------------ 6. the kernels' padded rows
def _overflowing_padding_model():
    """1-1-1-1 Linear chain: finite on the real points (x = 1) but inf at x = 0, which the kernels'
    padded batch rows (3 real rows padded to 16) used to hold: 0 x inf in the weight gradient."""
    m = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1))
    with torch.no_grad():
        m[0].weight.fill_(-1e20)
        m[0].bias.fill_(1e20)   # 0 at x = 1, 1e20 at x = 0
        m[1].weight.fill_(1e20)
        m[1].bias.fill_(0.5)    # 0.5 at x = 1, inf at x = 0
        m[2].weight.fill_(0.3)
        m[2].bias.fill_(0.1)
    return m


@pytest.mark.parametrize("options", [{"kernel": "v1"}, {"kernel": "v2"}, {"kernel": "v1", "launch": {"mode": "tiled"}}],
                         ids=["v1-registers", "v2", "v1-tiled"])
def test_padded_rows_stay_finite_where_the_real_rows_are(options):
    """v1-registers and v2 failed before the fix; v1's tiled variant (its padded rows already
    loaded a real point) is a regression guard here."""
    import copy

    pytest.importorskip("triton")
    from reptile_fast import TaskBatch

    m = _overflowing_padding_model()
    tasks = TaskBatch(torch.ones(1, 4, 1), torch.zeros(1, 4, 1))
    plan = torch.tensor([[[0, 1, 2]]])
    want = Reptile(copy.deepcopy(m), inner_lr=0.1, inner_steps=1, inner_batch_size=3,
                   backend="reference").adapt(tasks, 1, plan)
    got = Reptile(copy.deepcopy(m), inner_lr=0.1, inner_steps=1, inner_batch_size=3, backend="triton",
                  backend_options=options).adapt(tasks, 1, plan)
    for name, value in want.params.items():
        assert torch.isfinite(got.params[name]).all(), (name, got.params[name])
        torch.testing.assert_close(got.params[name], value, rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ 7. kernel v1's launcher
def test_v1_refuses_a_zero_wide_output_and_splits_one_row():
    pytest.importorskip("triton")
    from reptile_fast.kernels import mlp_inner_loop as K

    x, y = torch.randn(1, 4, 2), torch.zeros(1, 4, 0)
    plan = torch.tensor([[[0, 1, 2]]])
    with pytest.raises(ValueError, match="0 output features"):  # a bare ZeroDivisionError before
        K.mlp_inner_loop(x, y, plan, [torch.randn(0, 2), torch.randn(0)], ["identity"], lr=0.1)
    dims = [1, 3, 2]
    flat = torch.arange(1.0 * (3 * 1 + 3 + 2 * 3 + 2))  # the 1-3-2 MLP's 14 parameters
    row = K.split_params(flat, dims)  # one 1-D row: a bare IndexError before
    rows = K.split_params(flat[None].expand(2, -1), dims)
    assert [tuple(v.shape) for v in row] == [(3, 1), (3,), (2, 3), (2,)]
    for a, b in zip(row, rows):
        assert torch.equal(a, b[0]) and torch.equal(a, b[1])
