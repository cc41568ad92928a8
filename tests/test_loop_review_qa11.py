"""Review of issues 8 and 11 (qa11): behaviours of the one training loop and the drop-in that a
user meets between and around fits.  Each test compares with a trainer built with the value
from the start (or with the reference), never with itself."""
import copy

import pytest
import torch

from reptile_fast import MLP, Reptile, Sine, sample_indices
from reptile_fast.loop import Sampler

BACKENDS = ("reference", "torch", "compiled")


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _fit(trainer, total, seed):
    trainer.fit(Sine(), total, meta_batch_size=2, generator=torch.Generator().manual_seed(seed), progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attr, value", [("inner_lr", 0.05), ("inner_steps", 2), ("inner_batch_size", 5),
                                         ("outer_lr", 0.3), ("outer_lr_final", 0.01)])
def test_hyper_parameter_changed_between_fits_is_used(backend, attr, value):
    """``trainer.<hparam> = v`` between two fits trains the second fit with v, exactly as a trainer
    built with v (inner_lr was silently ignored on every backend; inner_steps crashed the compiled
    program with a shape error)."""
    torch.manual_seed(0)
    base = MLP(hidden_dim=16)
    changed = Reptile(copy.deepcopy(base), backend=backend)
    _fit(changed, 3, seed=3)
    setattr(changed, attr, value)
    assert getattr(changed, attr) == value
    _fit(changed, 6, seed=5)

    first = Reptile(copy.deepcopy(base), backend=backend)
    _fit(first, 3, seed=3)
    fresh = Reptile(first.model, backend=backend, **{attr: value})
    fresh.iteration = 3
    _fit(fresh, 6, seed=5)
    for a, b in zip(_params(changed.model), _params(fresh.model)):
        assert torch.equal(a, b)
    assert changed.hparams()[attr] == value


@pytest.mark.parametrize("attr, value, error", [
    ("inner_lr", -0.1, ValueError), ("inner_lr", float("nan"), ValueError), ("inner_lr", "0.1", TypeError),
    ("inner_steps", 0, ValueError), ("inner_steps", 2.5, TypeError), ("inner_batch_size", 0, ValueError),
    ("outer_lr", 0.0, ValueError), ("outer_lr", None, TypeError), ("outer_lr_final", -1.0, ValueError)])
def test_bad_hyper_parameter_assignment_is_refused(attr, value, error):
    trainer = Reptile(MLP(hidden_dim=8), backend="torch")
    before = trainer.hparams()
    with pytest.raises(error, match=attr):
        setattr(trainer, attr, value)
    assert trainer.hparams() == before


def test_inner_steps_assignment_checks_inner_grad_weights():
    trainer = Reptile(MLP(hidden_dim=8), backend="torch", inner_steps=2, inner_grad_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="inner_grad_weights"):
        trainer.inner_steps = 3
    assert trainer.inner_steps == 2


@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_load_state_dict_drops_a_non_finite_step_pending_from_before(backend):
    """A skipped non-finite meta-step not yet read is about the φ that ``load_state_dict`` replaces:
    the meta-steps after the load train (they were skipped too) and no NonFiniteError names the
    old step (it rewound ``iteration`` below the loaded one)."""
    from reptile_fast import NonFiniteError, TaskBatch

    torch.manual_seed(0)
    base = MLP(hidden_dim=16)
    trainer = Reptile(copy.deepcopy(base), backend=backend)
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(0))
    good = Reptile(copy.deepcopy(base), backend=backend)
    for _ in range(3):
        good.meta_step(tasks, generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(good.state_dict())

    trainer.meta_step(tasks)
    trainer.meta_step(TaskBatch.trusted(tasks.x, torch.full_like(tasks.y, float("nan"))))  # skipped, pending
    trainer.load_state_dict(state)
    trainer.meta_step(tasks, generator=torch.Generator().manual_seed(2))
    trainer.check_finite()
    assert trainer.iteration == 4

    good.meta_step(tasks, generator=torch.Generator().manual_seed(2))
    for a, b in zip(_params(trainer.model), _params(good.model)):
        assert torch.equal(a, b)
    # a non-finite step after the load is still reported
    trainer.meta_step(TaskBatch.trusted(tasks.x, torch.full_like(tasks.y, float("nan"))))
    with pytest.raises(NonFiniteError, match="meta-step 5"):
        trainer.check_finite()
    assert trainer.iteration == 4


@pytest.mark.parametrize("backend", ("torch", "compiled"))
@pytest.mark.parametrize("attr, value", [("inner_lr", 0.05), ("inner_steps", 2), ("inner_batch_size", 5)])
def test_inner_loop_settings_cannot_change_inside_fit(backend, attr, value):
    """From a callback, a new inner_lr / inner_steps / inner_batch_size would be ignored for the
    rest of the fit (the sampler and the compiled program are built at its start): refused."""
    trainer = Reptile(MLP(hidden_dim=8), backend=backend)

    def callback(i, metrics):
        if i == 2:
            setattr(trainer, attr, value)

    with pytest.raises(ValueError, match=f"{attr} cannot change while fit runs"):
        trainer.fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False, callback=callback)
    setattr(trainer, attr, value)  # between fits: taken
    assert getattr(trainer, attr) == value


def test_outer_lr_may_change_inside_fit():
    """outer_lr is read by the schedule at every meta-step: a callback's change applies from the
    next one, exactly as a run whose ε changed there (compared step by step with meta_step)."""
    torch.manual_seed(0)
    base = MLP(hidden_dim=8)
    trainer = Reptile(copy.deepcopy(base), backend="torch")

    def callback(i, metrics):
        if i == 2:
            trainer.outer_lr = 0.5

    trainer.fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False, callback=callback)
    other = Reptile(copy.deepcopy(base), backend="torch")
    g = torch.Generator().manual_seed(0)
    for eps in (0.1, 0.1, 0.5, 0.5):
        other.meta_step(Sine().sample(1, generator=g), generator=g, outer_lr=eps)
    for a, b in zip(_params(trainer.model), _params(other.model)):
        assert torch.equal(a, b)


class UserSampler(Sampler):
    """A user's sampler: ``n(m)`` Sine tasks and plans per draw (or a 3-tuple with ``bad_result``)."""

    def __init__(self, n, bad_result=False):
        self.n, self.bad_result, self.g = n, bad_result, torch.Generator().manual_seed(0)

    def draw(self, first_iteration, m):
        n = self.n(m)
        tasks, plans = Sine().sample(n, generator=self.g), sample_indices(n, 5, 50, 10, generator=self.g)
        return (tasks, plans, None) if self.bad_result else (tasks, plans)


@pytest.mark.parametrize("n", [lambda m: 2, lambda m: 3 * m], ids=["ignores_m", "other_meta_batch"])
def test_compiled_refuses_a_sampler_draw_of_the_wrong_size(n):
    """backend compiled runs chunks of meta_batch_size tasks per meta-step: a user sampler's draw of
    another size failed inside the program ("eps must have shape (1,), got (6,)")."""
    trainer = Reptile(MLP(hidden_dim=8), backend="compiled")
    with pytest.raises(ValueError, match="m \\* meta_batch_size tasks"):
        trainer.fit(None, 6, meta_batch_size=2, sampler=UserSampler(n), progress=False)
    assert trainer.iteration == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sampler_returning_other_than_two_things_is_named(backend):
    trainer = Reptile(MLP(hidden_dim=8), backend=backend)
    with pytest.raises(TypeError, match=r"UserSampler.draw\(first_iteration, m\) must return \(tasks, plans\)"):
        trainer.fit(None, 3, meta_batch_size=2, sampler=UserSampler(lambda m: 2 * m, bad_result=True), progress=False)


def test_reference_path_warning_is_importable_from_the_package():
    """README names ``ReferencePathWarning`` (to filter or catch it); it lived in a submodule only."""
    import reptile_fast
    from reptile_fast.dropin import ReferencePathWarning

    assert reptile_fast.ReferencePathWarning is ReferencePathWarning
    assert "ReferencePathWarning" in reptile_fast.__all__


@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_ctrl_c_inside_an_outer_update_keeps_iteration_and_phi_together(backend, monkeypatch):
    """A SIGINT that arrives while the outer update runs (here: right after φ was written, as a
    real Ctrl-C does in about 1 of 40 tries) must not leave φ one meta-step ahead of
    ``trainer.iteration``: without a checkpoint_dir the plain KeyboardInterrupt fired there, so
    a later fit took that meta-step twice.  Now the meta-step finishes and ``TrainingInterrupted``
    (a KeyboardInterrupt) is raised after it."""
    import os
    import signal

    from reptile_fast import TrainingInterrupted
    from reptile_fast.core import OuterUpdate

    torch.manual_seed(0)
    base = MLP(hidden_dim=8)
    expected = Reptile(copy.deepcopy(base), backend=backend)
    _fit(expected, 3, seed=1)

    original = OuterUpdate._mark_bad

    def mark_bad(self, finite, iteration):
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, finite, iteration)

    monkeypatch.setattr(OuterUpdate, "_mark_bad", mark_bad)
    previous = signal.getsignal(signal.SIGINT)
    trainer = Reptile(copy.deepcopy(base), backend=backend)
    with pytest.raises(TrainingInterrupted, match="after meta-step 3 of 10.*no checkpoint") as info:
        _fit(trainer, 10, seed=1)
    assert info.value.checkpoint is None and info.value.iteration == 3
    assert trainer.iteration == 3
    for a, b in zip(_params(trainer.model), _params(expected.model)):
        assert torch.equal(a, b)
    assert signal.getsignal(signal.SIGINT) is previous


def test_standard_inner_loop_on_integer_regression_targets_is_the_seeds():
    """perform_k_training_steps=None on 1-D integer targets with nn.MSELoss (the reference path:
    the fast paths take float targets) computes the seed's loop, which unsqueezes the targets.
    The standard loop took every integer target for a class label: MSE of [10, 1] against [10]
    broadcast to [10, 10]."""
    import warnings

    import torch.nn as nn

    from reptile_fast import reference, reptile

    def int_task():
        x, y, _ = reference.sample_task()
        return x, y.round().long(), nn.MSELoss()

    torch.manual_seed(0)
    seed_model = reference.MLP()
    none_model = copy.deepcopy(seed_model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(3)
        try:
            reptile(seed_model, 4, int_task, reference.perform_k_training_steps, progress=False)
        except RuntimeError as exc:  # torch 2.11's MSE backward refuses integer targets
            if "dtype Long" not in str(exc):
                raise
            pytest.skip(f"the seed's own loop cannot run integer MSE targets on torch {torch.__version__}: {exc}")
        torch.manual_seed(3)
        reptile(none_model, 4, int_task, None, progress=False)
    assert not [w for w in record if "broadcasting" in str(w.message)]
    for a, b in zip(seed_model.parameters(), none_model.parameters()):
        assert torch.equal(a, b)
