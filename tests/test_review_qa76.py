"""QA76 (session 26): tests for the behaviours a mutation round on the trainer's support modules
(core, loop, callbacks, checkpoint, trainer_state, compat, validation, losses, tasks,
hyperparams) found unpinned: each test kills one surviving mutant (named in its docstring)
through the public API.
"""
import torch
import torch.nn as nn
import pytest

from reptile_fast import Reptile, Sine
from reptile_fast.core import NonFiniteError, all_finite


def test_all_finite_is_true_for_tensors_without_floating_values():
    """Integer, bool and empty tensors hold no NaN or inf: ``all_finite`` says True for them (alone,
    and next to finite float tensors), False as soon as one float element is not finite.

    Catches (M02): the "nothing to read" answer flipped to False."""
    assert bool(all_finite([torch.arange(5)]))
    assert bool(all_finite([torch.ones(3, dtype=torch.bool), torch.empty(0)]))
    assert bool(all_finite([]))
    assert bool(all_finite([torch.arange(5), torch.ones(2)]))
    assert not bool(all_finite([torch.arange(5), torch.tensor([1.0, float("inf")])]))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_an_infinite_inner_loss_with_a_finite_update_is_reported(backend):
    """A meta-step whose inner loss overflows (a prediction of 2e19: its square is inf in float32)
    while its update stays finite (inner_lr 1e-30) is skipped and reported as the README promises
    ("a meta-step whose loss or update is not finite"), φ left as it was.

    Catches (M04): the interpolation's guard reading only the new φ, not the loss: the run went on
    with inf in its loss history and no error."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.bias.fill_(2e19)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Reptile(model, backend=backend, inner_lr=1e-30, inner_steps=2, inner_batch_size=5, outer_lr=0.5)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(Sine(), 3, meta_batch_size=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert info.value.iteration == 1 and trainer.iteration == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_resume_from_a_loaded_checkpoint_dict_into_its_own_directory(tmp_path):
    """``fit(resume_from=<the dict load_checkpoint returned>, checkpoint_dir=<the folder it came
    from>)`` continues the run (as ``resume_for_fit`` takes a dict, distributed ranks' way), ending
    where the uninterrupted run ends and saving into the folder.

    Before: TypeError "checkpoint path must be a path ..., got dict" from the check whether
    ``resume_from`` is the folder's latest checkpoint, raised after the trainer and every RNG had
    been restored."""
    from reptile_fast import MLP
    from reptile_fast.checkpoint import load_checkpoint

    def trainer():
        torch.manual_seed(0)
        return Reptile(MLP(), backend="torch", inner_steps=2, inner_batch_size=5)

    whole = trainer()
    whole.fit(Sine(), 6, generator=torch.Generator().manual_seed(0), progress=False)
    first = trainer()
    first.fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)
    resumed = trainer()
    history = resumed.fit(Sine(), 6, generator=torch.Generator(), progress=False, checkpoint_dir=tmp_path,
                          resume_from=load_checkpoint(tmp_path))
    assert len(history["loss"]) == 6 and resumed.iteration == 6
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 6


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_first_of_several_bad_meta_steps_between_reads_is_the_one_reported(backend):
    """Five meta-steps between two reads (``log_every=10``), every one non-finite: the error names
    meta-step 1 and ``trainer.iteration`` is 0, with φ as before it (no later step was applied).

    Catches (M07): the guard's "first bad meta-step" overwritten by every later bad one (meta-step 5
    reported, ``trainer.iteration`` 4 for a φ that never moved)."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.bias.fill_(2e19)  # every meta-step's loss is inf
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Reptile(model, backend=backend, inner_lr=1e-30, inner_steps=2, inner_batch_size=5, outer_lr=0.5)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(Sine(), 5, meta_batch_size=2, generator=torch.Generator().manual_seed(0), progress=False,
                    log_every=10)
    assert info.value.iteration == 1 and trainer.iteration == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_a_fused_adam_with_its_default_eps_trains_a_float16_model():
    """``Adam(fused=True)`` adds eps in float32, so its default 1e-8 is fine for float16 parameters:
    accepted, and the run stays finite (the unfused one is refused: 1e-8 is 0 in float16).

    Catches (M09): the eps check applied to fused groups too (a working setup refused)."""
    from reptile_fast import MLP

    torch.manual_seed(0)
    model = MLP().to(torch.float16)
    trainer = Reptile(model, backend="torch", inner_steps=2, inner_batch_size=5,
                      outer_optimizer=torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
    history = trainer.fit(Sine(dtype=torch.float16), 3, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(history["loss"]) == 3 and trainer.iteration == 3
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    unfused = MLP().to(torch.float16)
    with pytest.raises(ValueError, match="eps"):
        Reptile(unfused, backend="torch", outer_optimizer=torch.optim.Adam(unfused.parameters(), lr=1e-3))


class _CountingSGD(torch.optim.Optimizer):
    """Plain SGD that keeps its step count in the param group, added at its first step (as
    D-Adaptation-style optimizers keep theirs)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["steps"] = group.get("steps", 0) + 1
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_an_undone_outer_step_leaves_no_value_it_added_to_a_param_group():
    """A non-finite first meta-step undoes the outer optimizer's step entirely: a value its step
    added to the param group (a custom optimizer's step count) is gone again, so the next run
    starts as if that step never ran.

    Catches (M10): the undo put back the group's old values but kept the ones the step added."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.bias.fill_(2e19)  # the first meta-step's loss is inf
    opt = _CountingSGD(model.parameters(), lr=0.1)
    trainer = Reptile(model, backend="torch", inner_lr=1e-30, inner_steps=2, inner_batch_size=5,
                      outer_optimizer=opt)
    with pytest.raises(NonFiniteError):
        trainer.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False)
    assert "steps" not in opt.param_groups[0]


def test_plan_sampler_refuses_an_index_equal_to_the_number_of_points():
    """``loop.PlanSampler`` with a check (so ``fit`` trusts its draws: ``checked``) refuses a plan
    index equal to the tasks' number of points — one past the last point — and takes the last
    point itself.

    Catches (M16): the range check off by one (``hi > n_points``): index 50 of a 50-point task went
    to the stepper unchecked."""
    from reptile_fast.loop import PlanSampler

    def sampler(top):
        indices = torch.zeros(2, 1, 1, 5, dtype=torch.long)
        indices[1, 0, 0, 4] = top
        return PlanSampler(Sine(), indices, generator=torch.Generator().manual_seed(0), check=lambda t: None)

    assert sampler(49).checked
    tasks, plans = sampler(49).draw(1, 2)
    assert tuple(plans.shape) == (2, 1, 5) and int(plans.max()) == 49
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        sampler(50).draw(1, 2)


def test_a_callback_that_stops_fit_between_reads_still_gets_every_loss():
    """A ``Callback`` that calls ``loop.stop()`` in ``on_chunk_end`` (allowed: the docstring says
    so) after meta-step 3 of a run reading every 100: ``fit`` returns the three meta-steps' losses
    (the pending ones read at the end), and ``trainer.iteration`` is 3.

    Catches (M18): the loop's closing read dropped: the history came back empty."""
    from reptile_fast import MLP
    from reptile_fast.loop import Callback

    class StopAt3(Callback):
        def on_chunk_end(self, loop, read):
            if loop.iteration >= 3:
                loop.stop()

    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="torch", inner_steps=2, inner_batch_size=5)
    history = trainer.fit(Sine(), 10, generator=torch.Generator().manual_seed(0), progress=False,
                          log_every=100, callbacks=[StopAt3()])
    assert trainer.iteration == 3
    assert len(history["loss"]) == 3 and all(v > 0 for v in history["loss"])


def test_a_callback_writing_nan_into_the_model_gets_no_checkpoint_and_a_nonfinite_error(tmp_path):
    """A ``fit`` callback that writes NaN into φ after meta-step 4 (checkpoints every 2): the due
    checkpoint is not written, ``fit`` raises ``NonFiniteError`` naming the last good checkpoint
    (meta-step 2), and that checkpoint is still the folder's latest.

    Catches (M25): ``CheckpointCallback.save`` without its own finiteness check: the save failed
    inside ``save_checkpoint`` with a plain ValueError naming no checkpoint to resume from."""
    from reptile_fast import MLP
    from reptile_fast.checkpoint import load_checkpoint

    torch.manual_seed(0)
    model = MLP()
    trainer = Reptile(model, backend="torch", inner_steps=2, inner_batch_size=5)

    def poison(iteration, metrics):
        if iteration == 4:
            with torch.no_grad():
                next(model.parameters())[0].fill_(float("nan"))

    with pytest.raises(NonFiniteError) as info:
        trainer.fit(Sine(), 6, generator=torch.Generator().manual_seed(0), progress=False, callback=poison,
                    checkpoint_dir=tmp_path, checkpoint_every=2)
    assert info.value.checkpoint_iteration == 2 and info.value.checkpoint is not None
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 2


def test_a_checkpoint_taken_right_after_numpy_is_seeded_loads(tmp_path):
    """``np.random.seed(0)`` leaves numpy's MT19937 at position 624 (its state words used up, a
    fresh block due at the next draw); a checkpoint saved then loads, and resuming from it puts
    numpy back there (the next draw is the seeded one).

    Catches (M29): position 624 refused as malformed (``pos < 624``): the checkpoint of any run
    that seeds numpy and draws nothing from it could not be loaded."""
    import numpy as np
    from reptile_fast import MLP
    from reptile_fast.checkpoint import load_checkpoint

    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="torch", inner_steps=2, inner_batch_size=5)
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    trainer.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)
    assert load_checkpoint(tmp_path)["rng"]["numpy"]["pos"] == 624
    np.random.rand(5)
    resumed = Reptile(MLP(), backend="torch", inner_steps=2, inner_batch_size=5)
    resumed.fit(Sine(), 3, generator=torch.Generator(), progress=False, resume_from=tmp_path)
    assert np.random.rand() == expected


def test_resuming_on_another_backend_gives_no_hyper_parameter_warning(tmp_path):
    """A run checkpointed on backend torch and resumed on backend reference (same training within
    fp32 rounding: the README's promise) is not warned about as resumed "with different
    hyper-parameters"; another inner_lr is.

    Catches (M34): the backend counted among the hyper-parameters whose change spoils a resume."""
    import warnings

    from reptile_fast import MLP

    def trainer(backend, inner_lr=0.02):
        torch.manual_seed(0)
        return Reptile(MLP(), backend=backend, inner_lr=inner_lr, inner_steps=2, inner_batch_size=5)

    trainer("torch").fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False,
                         checkpoint_dir=tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer("reference").load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"])
    assert not [w for w in seen if "different hyper-parameters" in str(w.message)]
    with pytest.warns(UserWarning, match="different hyper-parameters.*inner_lr"):
        trainer("reference", inner_lr=0.03).load_state_dict(
            torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainer"])


def test_an_adafactor_outer_optimizer_checkpoint_resumes(tmp_path):
    """``torch.optim.Adafactor`` keeps factored second moments ``[rows, 1]`` / ``[1, cols]`` of a
    weight matrix: its checkpoint loads, and the resumed run ends with the uninterrupted run's φ.

    Catches (M37): a state tensor of another shape than its parameter refused even where each size
    is the parameter's or 1 (every Adafactor checkpoint refused at resume)."""
    from reptile_fast import MLP

    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("this torch has no Adafactor")

    def trainer():
        torch.manual_seed(0)
        model = MLP()
        return Reptile(model, backend="torch", inner_steps=2, inner_batch_size=5,
                       outer_optimizer=torch.optim.Adafactor(model.parameters(), lr=1e-2))

    whole = trainer()
    whole.fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False)
    first = trainer()
    first.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)
    shapes = {tuple(v.shape) for s in first.outer_optimizer.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim()}
    assert any(len(s) == 2 and 1 in s and s != (1, 1) for s in shapes)  # a 64 x 64 weight's factored moments
    resumed = trainer()
    resumed.fit(Sine(), 4, generator=torch.Generator(), progress=False, resume_from=tmp_path)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_a_carried_adam_state_with_a_negative_step_count_is_refused():
    """``load_state_dict`` of an ``adam_state="carried"`` trainer refuses an inner Adam state whose
    step count is negative (-1: Adam's bias correction 1 - beta^0 = 0 divides by zero at the next
    task, NaN everywhere), naming it, and changes nothing; 0 and up load.

    Catches (M39): only finiteness checked: the step count -1 was taken."""
    from reptile_fast import MLP

    def carried():
        torch.manual_seed(4)
        return Reptile(MLP(1, 16, 1), backend="reference", inner_optimizer="adam", adam_state="carried",
                       inner_steps=2, inner_batch_size=5)

    source = carried()
    source.fit(Sine(), 2, generator=torch.Generator().manual_seed(5), progress=False)
    state = source.state_dict()
    step = state["inner_optimizer"]["state"][0]["step"]
    state["inner_optimizer"]["state"][0]["step"] = torch.full_like(step, -1) if isinstance(step, torch.Tensor) else -1
    target = carried()
    with pytest.raises(ValueError, match=r"'step' of parameter 0 .* >= 0"):
        target.load_state_dict(state)
    assert target.carried_adam_state is None and target.iteration == 0
    state["inner_optimizer"]["state"][0]["step"] = step
    target.load_state_dict(state)
    assert target.iteration == 2


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_minibatch_of_every_point_trains_and_one_more_is_refused(backend):
    """``inner_batch_size`` equal to the tasks' number of points (full-batch inner steps, as the
    drop-in runs for tasks smaller than the seed's batch) trains; one more is refused by name.

    Catches (M40): the trainer's check off by one (``n_points <= batch``), refusing full batches."""
    from reptile_fast import MLP

    torch.manual_seed(0)
    tasks = Sine(n_points=8)
    trainer = Reptile(MLP(), backend=backend, inner_steps=2, inner_batch_size=8)
    history = trainer.fit(tasks, 2, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(history["loss"]) == 2
    trainer.inner_batch_size = 9
    with pytest.raises(ValueError, match="inner_batch_size"):
        trainer.fit(tasks, 4, generator=torch.Generator().manual_seed(0), progress=False)


def _classifier_trainer(backend="torch"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    return Reptile(model, backend=backend, loss="cross_entropy", inner_steps=2, inner_batch_size=4)


def test_a_user_plan_index_equal_to_the_number_of_points_is_refused():
    """``meta_step`` / ``adapt`` with the caller's plan: index N of an N-point task (one past the
    last) is refused by name, index N - 1 taken.

    Catches (M41): the plan's range check off by one (``hi > N``)."""
    from reptile_fast import TaskBatch

    trainer = _classifier_trainer()
    tasks = TaskBatch(torch.randn(2, 6, 2), torch.randint(0, 3, (2, 6)))
    plan = torch.zeros(2, 2, 4, dtype=torch.long)
    plan[1, 1, 3] = 5
    trainer.meta_step(tasks, plan)
    plan[1, 1, 3] = 6
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        trainer.meta_step(tasks, plan)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        trainer.adapt(tasks, 2, plan)


def test_a_later_batch_with_a_label_beyond_the_model_outputs_is_refused():
    """The trainer checks each new label bound against the model's logits: a first batch with labels
    0..1 fits a 3-output model, a later one of the same shapes with label 3 is refused by name
    (not trained on: cross_entropy read a logit that does not exist).

    Catches (M43): the input check's cache keyed on shapes and dtypes only, so the second batch
    skipped the label check."""
    from reptile_fast import TaskBatch

    trainer = _classifier_trainer()
    x = torch.randn(2, 6, 2)
    trainer.meta_step(TaskBatch(x, torch.tensor([[0, 1] * 3] * 2)), torch.zeros(2, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="class label 3 out of range for a model with 3 outputs"):
        trainer.meta_step(TaskBatch(x, torch.tensor([[0, 3] * 3] * 2)), torch.zeros(2, 2, 4, dtype=torch.long))


def test_the_last_task_is_selected_by_index_minus_one():
    """``tasks[-1]`` (and ``episodes[-1]``) is the last task, as for a list: one task, equal to
    ``tasks[T - 1]``; ``tasks[-2]`` the one before it.

    Catches (M50): -1 turned into ``slice(-1, 0)``, an empty selection refused with IndexError."""
    from reptile_fast import TaskBatch
    from reptile_fast.tasks.episodes import Episodes

    tasks = TaskBatch(torch.arange(12.0).reshape(3, 4, 1), torch.arange(12.0).reshape(3, 4, 1) * 2)
    last = tasks[-1]
    assert last.n_tasks == 1 and torch.equal(last.x, tasks.x[2:]) and torch.equal(last.y, tasks.y[2:])
    assert torch.equal(tasks[-2].x, tasks.x[1:2])
    labels = TaskBatch(torch.randn(3, 4, 2), torch.tensor([[0, 1, 0, 1]] * 3))
    episodes = Episodes(labels, labels, 2)
    assert episodes[-1].n_tasks == 1 and torch.equal(episodes[-1].support.x, labels.x[2:])


def test_joined_draws_keep_the_largest_label_bound():
    """``concat_draws`` (how chunks of meta-steps and a distributed meta-step's blocks are joined
    before the trainer's input check reads ``n_classes``) bounds the joined labels by the largest
    piece's bound: a piece with labels up to 3 next to one up to 1 gives ``n_classes`` 4, so a
    3-output model is refused for it.

    Catches (M51): the smallest bound kept (2): the joined batch claimed labels below 2 while
    holding 3."""
    from reptile_fast import TaskBatch
    from reptile_fast.tasks.base import concat_draws

    low = TaskBatch(torch.randn(1, 4, 2), torch.tensor([[0, 1, 0, 1]]))
    high = TaskBatch(torch.randn(1, 4, 2), torch.tensor([[0, 3, 2, 1]]))
    plan = torch.zeros(1, 2, 4, dtype=torch.long)
    for parts in ([(low, plan), (high, plan)], [(high, plan), (low, plan)]):
        joined, plans = concat_draws(parts)
        assert joined.n_classes == 4 and joined.n_tasks == 2 and tuple(plans.shape) == (2, 2, 4)
    trainer = _classifier_trainer()
    with pytest.raises(ValueError, match="class label 3 out of range"):
        trainer.meta_step(joined, plans)


def test_inner_steps_cannot_leave_the_inner_grad_weights_behind():
    """A trainer built with ``inner_grad_weights`` (one per inner step) refuses a new
    ``inner_steps`` of another count, naming both, and keeps training with its own.

    Catches (M58): the setter without the count check: 4 steps ran with 3 weights."""
    from reptile_fast import MLP

    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="torch", inner_steps=3, inner_batch_size=5, inner_grad_weights=(1.0, 0.5, 0.25))
    with pytest.raises(ValueError, match="inner_steps=4.*inner_grad_weights has 3"):
        trainer.inner_steps = 4
    assert trainer.inner_steps == 3
    history = trainer.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(history["loss"]) == 2
