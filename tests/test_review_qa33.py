"""QA33's mutation audit (the modules the audits of QA24 and QA27 barely touched: checkpoint,
trainer_state, callbacks, hyperparams, model_watch, validation, compat, loop, jobs, fewshot_job,
cli, the task families, seed_recognition, native_select, native_build): each test here fails
under a deliberate, realistic breakage of the library that the rest of the suite let through
(NOTES-qa33.md (folded into the README since; ``git show c88d181:NOTES-qa33.md``) has the table).  Tiny models, one to three meta-steps: the file runs in seconds."""
import random

import numpy as np
import pytest
import torch

from _checkpoint_files import flip_a_data_bit
from reptile_fast import MLP, Reptile, Sine
from reptile_fast.checkpoint import (CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_checkpoint,
                                     save_checkpoint)


def _trainer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Reptile(MLP(1, 8, 1), backend="reference", **kwargs)


def _fit(trainer, iterations, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    trainer.fit(Sine(), iterations, meta_batch_size=2, generator=gen, progress=False, **kwargs)
    return gen


def _params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------------------ checkpoint
def test_cached_gaussians_of_numpy_and_python_survive_a_checkpoint(tmp_path):
    """numpy's legacy RNG and Python's ``random`` each cache the second normal of a pair: a
    checkpoint taken between the two must give the same next normal after a restore.

    Catches: ``capture_rng_state`` storing numpy's ``has_gauss`` as 0, or Python's
    ``gauss_next`` as None (the resumed run then draws another number)."""
    trainer = _trainer()
    np.random.seed(3)
    np.random.standard_normal()
    random.seed(4)
    random.gauss(0, 1)
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None  # a cached normal each
    save_checkpoint(tmp_path, trainer)
    expected = (np.random.standard_normal(), random.gauss(0, 1))
    np.random.seed(0)
    random.seed(0)
    restore_checkpoint(trainer, tmp_path)
    assert (np.random.standard_normal(), random.gauss(0, 1)) == expected


def test_a_generator_state_saved_on_another_device_is_refused_before_anything_changes():
    """A checkpoint whose generator state is a CUDA generator's, restored with a CPU generator:
    a ValueError naming both devices, and the trainer untouched.

    Catches: ``_check_generator_compatible`` without its device comparison (the restore then
    replaced the model and failed inside ``Generator.set_state`` with a RuntimeError)."""
    source = _trainer(seed=1)
    gen = torch.Generator().manual_seed(0)
    ckpt = {"trainer": source.state_dict(), "rng": capture_rng_state(gen)}
    ckpt["rng"]["generator"] = {"state": torch.zeros(16, dtype=torch.uint8), "device": "cuda:0"}
    target = _trainer(seed=2)
    before = _params(target)
    with pytest.raises(ValueError, match=r"generator on cuda:0.*on cpu"):
        restore_checkpoint(target, ckpt, generator=gen)
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


def test_a_state_that_loading_would_refuse_is_never_written(tmp_path):
    """``save_checkpoint`` of a trainer whose ``iteration`` was set to -1: a ValueError, and the
    last good checkpoint stays byte for byte (``load_checkpoint`` refuses a negative iteration).

    Catches: ``save_checkpoint`` without its ``_validate`` of the state (it wrote a checkpoint
    that no resume can load, over the good one)."""
    trainer = _trainer()
    save_checkpoint(tmp_path, trainer)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    trainer.iteration = -1
    with pytest.raises(ValueError, match="invalid iteration -1"):
        save_checkpoint(tmp_path, trainer)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good
    load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_latest_checkpoint_never_replaces_the_previous_one(tmp_path, damage):
    """Save, save, damage the latest, save again: ``checkpoint.prev.pt`` is still a loadable
    checkpoint (the first one), not a copy of the damaged file.

    Catches: ``save_checkpoint`` keeping the latest as the previous one without checking it is
    intact, or ``_intact`` not comparing the records' CRC-32 (a failure of the next write then
    left no loadable checkpoint at all)."""
    from reptile_fast.checkpoint import PREVIOUS_NAME

    trainer = _trainer()
    save_checkpoint(tmp_path, trainer)
    trainer.iteration = 1
    save_checkpoint(tmp_path, trainer)
    latest = tmp_path / CHECKPOINT_NAME
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:200])
    else:
        flip_a_data_bit(latest)
    trainer.iteration = 2
    save_checkpoint(tmp_path, trainer)
    assert load_checkpoint(tmp_path / PREVIOUS_NAME)["trainer"]["iteration"] == 0
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 2


def test_a_history_that_is_not_one_curve_per_name_is_refused(tmp_path):
    """A checkpoint dict whose ``history['loss']`` is 2-D: ``validate_checkpoint`` (and so
    ``fit(resume_from=dict)``) names the entry.

    Catches: ``_validate`` accepting any tensor as a history entry (the resume then failed with
    "float() argument must be ... not 'list'" after the trainer was restored)."""
    from reptile_fast.checkpoint import validate_checkpoint

    trainer = _trainer()
    ckpt = load_checkpoint(save_checkpoint(tmp_path, trainer, history={"loss": [0.5, 0.25]}))
    assert validate_checkpoint(ckpt)["history"]["loss"].tolist() == [0.5, 0.25]
    ckpt["history"]["loss"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="malformed history entry 'loss'"):
        validate_checkpoint(ckpt)
    with pytest.raises(ValueError, match="malformed history entry 'loss'"):
        _fit(_trainer(), 2, resume_from=ckpt)


def test_fit_removes_a_killed_writers_temporary_of_the_previous_checkpoint(tmp_path):
    """A ``.checkpoint.prev.pt.<pid>.tmp`` left by a writer killed while it kept the previous
    checkpoint is removed by the next ``fit`` into that folder, as the latest's temporaries are.

    Catches: ``remove_stale_temporaries`` matching only ``.checkpoint.pt.*.tmp``."""
    stale = tmp_path / ".checkpoint.prev.pt.4242.tmp"
    stale.write_bytes(b"half a copy")
    _fit(_trainer(), 1, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


@pytest.mark.parametrize("part, bad", [("torch", torch.zeros(10, dtype=torch.uint8)), ("numpy pos", 700)])
def test_a_malformed_rng_state_is_refused_before_the_trainer_changes(tmp_path, part, bad):
    """A checkpoint dict whose torch CPU RNG state has the wrong size, or whose numpy position
    lies past MT19937's 624 words: ``restore_checkpoint`` raises a ValueError naming that RNG and
    leaves the trainer as it was.

    Catches: ``rng_state_problem`` without its size check of the torch state (the restore then
    replaced the model and failed inside ``torch.set_rng_state``) or without its range check of
    numpy's ``pos`` (numpy took 700 silently and read past its key array)."""
    ckpt = {"trainer": _trainer(seed=1).state_dict(), "rng": capture_rng_state()}
    if part == "torch":
        ckpt["rng"]["torch"] = bad
    else:
        ckpt["rng"]["numpy"]["pos"] = bad
    target = _trainer(seed=2)
    before = _params(target)
    with pytest.raises(ValueError, match=f"malformed {part.split()[0]} RNG state"):
        restore_checkpoint(target, ckpt)
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


# ------------------------------------------------------------------------------ trainer_state
def test_resuming_on_another_backend_does_not_warn():
    """The backend is how the same meta-step is computed, not a hyper-parameter: loading a
    "reference" trainer's state into a "torch" one gives no warning (a changed inner_lr does).

    Catches: ``load_trainer_state`` comparing the saved ``backend`` too (every resume on another
    backend then warned that the run would not match an uninterrupted one)."""
    import warnings

    state = _trainer().state_dict()
    torch.manual_seed(0)
    other = Reptile(MLP(1, 8, 1), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(state)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"inner_lr: saved 0\.02, now 0\.01"):
        Reptile(MLP(1, 8, 1), backend="torch", inner_lr=0.01).load_state_dict(state)


def _adam_trainer(seed=0):
    torch.manual_seed(seed)
    model = MLP(1, 8, 1)
    return Reptile(model, backend="reference", outer_optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))


def test_an_outer_optimizer_state_on_one_side_only_is_refused_before_anything_changes():
    """A state written without an outer optimizer loaded into a trainer with one (its moments
    would silently restart), and the reverse: a ValueError saying to build the trainer with the
    same ``outer_optimizer``, the model unchanged.

    Catches: ``load_trainer_state`` without its check that both sides have (or lack) one."""
    plain, with_adam = _trainer(seed=1), _adam_trainer(seed=1)
    _fit(with_adam, 1)
    for source, target in ((plain, _adam_trainer(seed=2)), (with_adam, _trainer(seed=2))):
        before = _params(target)
        with pytest.raises(ValueError, match="outer_optimizer state but this trainer has.*same outer_optimizer"):
            target.load_state_dict(source.state_dict())
        assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


def test_an_optimizer_moment_with_fewer_dimensions_than_its_parameter_is_refused():
    """Adam's ``exp_avg`` of the ``[8, 1]`` first weight saved flattened to ``[8]``: the sizes
    agree position by position, the number of dimensions does not; a ValueError naming the
    state and both shapes.

    Catches: ``optimizer_state_problem`` comparing sizes only (zip stops at the shorter shape:
    the state was accepted and the first outer step failed inside torch)."""
    source = _adam_trainer(seed=1)
    _fit(source, 1)
    state = source.state_dict()
    moments = state["outer_optimizer"]["state"][0]
    assert tuple(moments["exp_avg"].shape) == (8, 1)
    moments["exp_avg"] = moments["exp_avg"].reshape(8)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0 .* shape \(8,\), the parameter's is \(8, 1\)"):
        _adam_trainer(seed=2).load_state_dict(state)


@pytest.mark.parametrize("total, ok", [(1, True), (None, True), (0, False)])
def test_a_schedule_length_below_one_is_refused(total, ok):
    """``state['total_iterations']``: None or an int >= 1 (the annealing schedule divides by it).

    Catches: ``load_trainer_state`` accepting 0."""
    state = _trainer(seed=1).state_dict()
    state["total_iterations"] = total
    target = _trainer(seed=2)
    if ok:
        target.load_state_dict(state)
        assert target.total_iterations == total
    else:
        with pytest.raises(ValueError, match=r"total_iterations'\] must be None or an int >= 1, got 0"):
            target.load_state_dict(state)


# ------------------------------------------------------------------------------ callbacks
def test_resuming_a_finished_run_from_its_own_folder_writes_nothing(tmp_path):
    """A run of 2 meta-steps with a checkpoint after each, resumed from its own folder with the
    same total: nothing to train, and both checkpoints stay as they were (the previous one still
    meta-step 1: a needless save would have turned it into a second copy of the latest).

    Catches: ``resume_for_fit`` not recognising that ``resume_from`` is the folder's latest
    checkpoint (``fit`` then saved it again at the end)."""
    from reptile_fast.checkpoint import PREVIOUS_NAME

    _fit(_trainer(), 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    latest = (tmp_path / CHECKPOINT_NAME).read_bytes()
    assert load_checkpoint(tmp_path / PREVIOUS_NAME)["trainer"]["iteration"] == 1
    resumed = _trainer(seed=5)
    _fit(resumed, 2, checkpoint_dir=tmp_path, resume_from=tmp_path)
    assert resumed.iteration == 2
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == latest
    assert load_checkpoint(tmp_path / PREVIOUS_NAME)["trainer"]["iteration"] == 1


# ------------------------------------------------------------------------------ loop
def test_a_plan_samplers_indices_must_lie_below_the_tasks_points():
    """``PlanSampler`` (a fixed plan) handed to ``fit`` with a task check of its own (so ``fit``
    trusts it): an index equal to the tasks' number of points is refused, naming the range.

    Catches: ``PlanSampler.draw`` comparing ``hi > n_points`` (an index one past the last point
    reached the backend's gather)."""
    from reptile_fast.loop import PlanSampler

    trainer = _trainer()
    rows = trainer.plan_rows(trainer.inner_steps)
    indices = torch.zeros(2, 1, rows, 3, dtype=torch.long)

    def sampler(indices):
        return PlanSampler(Sine(n_points=10), indices, generator=torch.Generator().manual_seed(0),
                           check=lambda tasks: trainer.checker.tasks(tasks, 1))
    assert sampler(indices).checked
    trainer.fit(Sine(n_points=10), 1, sampler=sampler(indices), progress=False)  # in range: trains
    indices = indices.clone()
    indices[1, 0, 0, 0] = 10
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got values in \[0, 10\]"):
        trainer.fit(Sine(n_points=10), 2, sampler=sampler(indices), progress=False)


def test_a_custom_sampler_drawing_too_few_tasks_is_refused():
    """A ``Sampler`` whose ``draw`` returns one task for a meta-step of ``meta_batch_size=2``:
    ``fit`` says how many it needs (the eager stepper would train on one task per meta-step).

    Catches: ``CheckedDraws`` without its count check."""
    from reptile_fast import sample_indices
    from reptile_fast.loop import Sampler

    trainer = _trainer()
    rows = trainer.plan_rows(trainer.inner_steps)

    class OneTask(Sampler):
        def draw(self, first_iteration, m):
            tasks = Sine().sample(m, generator=torch.Generator().manual_seed(first_iteration))
            return tasks, sample_indices(m, rows, tasks.n_points, trainer.inner_batch_size)

    before = _params(trainer)
    with pytest.raises(ValueError, match=r"1 meta-step\(s\) of 2 tasks .* need 2 tasks, got 1"):
        trainer.fit(Sine(), 1, meta_batch_size=2, sampler=OneTask(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_run_stopped_by_a_callback_still_reads_its_last_losses():
    """A callback that stops the loop after the first meta-step, ``log_every`` far away: the
    run ends with that meta-step's loss in the history (and its finiteness checked).

    Catches: ``TrainingLoop.run`` without its final read of the pending losses."""
    from reptile_fast.loop import Callback

    class StopAfterFirst(Callback):
        def on_chunk_end(self, loop, read):
            loop.stop()

    trainer = _trainer()
    history = trainer.fit(Sine(), 5, meta_batch_size=2, generator=torch.Generator().manual_seed(0),
                          progress=False, log_every=100, callbacks=[StopAfterFirst()])
    assert trainer.iteration == 1 and len(history["loss"]) == 1


def test_a_chunk_drawn_at_once_names_both_factors_of_the_task_count():
    """A task family refusing a draw of 6 tasks, drawn as 3 meta-steps at once of
    ``meta_batch_size=2``: the error says the 6 are 3 meta-steps x meta_batch_size=2.

    Catches: ``StreamSampler._sample`` naming only ``meta_batch_size=2`` (the user's setting
    that looks fine) for a chunk's draw."""
    from reptile_fast.loop import StreamSampler

    class AtMostFive:
        def sample(self, n, *, generator=None, device=None):
            if n > 5:
                raise ValueError(f"n_tasks must be at most 5, got {n}")
            return Sine().sample(n, generator=generator, device=device)

    sampler = StreamSampler(AtMostFive(), 2, 1, 5, generator=None, device=torch.device("cpu"), draw_chunks=True)
    sampler.draw(1, 2)
    with pytest.raises(ValueError, match=r"sample\(6, \.\.\.\) raised: n_tasks must be at most 5, got 6 "
                                         r"\(fit's arguments to it: n_tasks = 3 meta-steps drawn at once x "
                                         r"meta_batch_size=2\)"):
        sampler.draw(1, 3)


def test_callbacks_hear_of_an_aborted_run():
    """A task family failing at the second meta-step: every callback's ``on_abort`` gets the
    error (the progress bar closes there; a user's callback may flush its logs), ``on_end`` none.

    Catches: ``TrainingLoop.run`` not calling ``on_abort``."""
    from reptile_fast.loop import Callback

    class Flaky:
        calls = 0

        def sample(self, n, *, generator=None, device=None):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise RuntimeError("the data server went away")
            return Sine().sample(n, generator=generator, device=device)

    class Record(Callback):
        seen = []

        def on_abort(self, loop, exc):
            self.seen.append(("abort", loop.iteration, str(exc)))

        def on_end(self, loop):
            self.seen.append(("end",))

    with pytest.raises(RuntimeError, match="went away"):
        _trainer().fit(Flaky(), 3, progress=False, callbacks=[Record()])
    assert Record.seen == [("abort", 1, "the data server went away")]


# ------------------------------------------------------------------------------ compat
def test_a_trusted_batch_with_a_negative_class_label_is_refused():
    """``TaskBatch.trusted`` skips the constructor's checks; a label -1 in it is still refused
    by the trainer's input check with the label named (torch's cross-entropy raised IndexError
    from inside the inner loop, and the Triton kernel read outside the logits).

    Catches: ``InputChecker.tasks`` testing ``lo < -1`` (or not at all)."""
    from reptile_fast import TaskBatch

    torch.manual_seed(0)
    trainer = Reptile(MLP(2, 8, 3), backend="reference", loss="cross_entropy")
    y = torch.randint(0, 3, (2, 10))
    y[1, 4] = -1
    before = _params(trainer)
    with pytest.raises(ValueError, match="class labels must be non-negative, got -1"):
        trainer.meta_step(TaskBatch.trusted(torch.randn(2, 10, 2), y))
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_float_targets_of_another_dtype_beside_integer_ids_are_refused():
    """Integer ids as inputs (an embedding model, float32) with float64 targets: the
    ``TaskBatch`` cannot compare x's dtype with y's, so the trainer names y's dtype.

    Catches: ``InputChecker.tasks`` without its check of y's dtype (the float64 targets then
    promoted the loss to float64 silently, or failed inside a kernel)."""
    import torch.nn as nn
    from reptile_fast import TaskBatch

    torch.manual_seed(0)
    trainer = Reptile(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(4, 1)), backend="reference")
    x = torch.randint(0, 5, (2, 10, 1))
    with pytest.raises(TypeError, match="tasks.y dtype torch.float64 differs from the model's torch.float32"):
        trainer.meta_step(TaskBatch(x, torch.randn(2, 10, 1, dtype=torch.float64)))
    trainer.meta_step(TaskBatch(x, torch.randn(2, 10, 1)))


def test_a_plan_on_the_meta_device_is_refused_by_name():
    """``meta_step(tasks, indices=...)`` with a plan on the meta device (shape and dtype right,
    no data): a ValueError saying so, the model unchanged.

    Catches: ``compat._check_dense_plan`` without its meta check (torch then failed reading the
    plan's range: "Tensor.item() cannot be called on meta tensors")."""
    trainer = _trainer()
    rows = trainer.plan_rows(trainer.inner_steps)
    before = _params(trainer)
    with pytest.raises(ValueError, match="indices are on the meta device"):
        trainer.meta_step(Sine().sample(2), indices=torch.zeros(2, rows, 5, dtype=torch.long, device="meta"))
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------------------ validation
def test_checkpoint_every_without_a_folder_is_refused():
    """``fit(checkpoint_every=1)`` without ``checkpoint_dir``: a ValueError asking where the
    checkpoints should go, before any meta-step (else the run wrote none, silently).

    Catches: ``check_fit_args`` without that check."""
    trainer = _trainer()
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        _fit(trainer, 2, checkpoint_every=1)
    assert trainer.iteration == 0


def test_draw_chunks_with_a_given_sampler_is_refused():
    """``draw_chunks`` is how ``fit``'s own sampler draws: with ``sampler=`` it would be
    ignored, so it is a ValueError naming both.

    Catches: ``check_fit_args`` without that check."""
    from reptile_fast.loop import StreamSampler

    trainer = _trainer()
    sampler = StreamSampler(Sine(), 2, trainer.plan_rows(trainer.inner_steps), trainer.inner_batch_size,
                            generator=None, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="draw_chunks is how fit's own sampler draws"):
        trainer.fit(Sine(), 1, meta_batch_size=2, sampler=sampler, draw_chunks=True, progress=False)


def test_a_cuda_index_past_the_visible_devices_is_refused(monkeypatch):
    """``check_device("cuda:1")`` on a machine that shows one CUDA device (faked here): a
    ValueError saying how many are visible; ``cuda:0`` passes.

    Catches: ``device_unavailable`` comparing ``index > device_count()``."""
    from reptile_fast.validation import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device cuda:1: only 1 CUDA device\(s\) visible"):
        check_device("cuda:1")


def test_a_numpy_key_deep_in_checkpoint_extra_is_refused_before_writing(tmp_path):
    """``save_checkpoint(extra={"m": {np.int64(3): 1.0}})``: a TypeError naming the key's type,
    and no file (``torch.load(weights_only=True)`` refuses numpy's int64, so the checkpoint
    could never be loaded).

    Catches: ``check_loadable`` checking dict values but not keys."""
    with pytest.raises(TypeError, match=r"keys must be str or int, got int64"):
        save_checkpoint(tmp_path, _trainer(), extra={"m": {np.int64(3): 1.0}})
    assert not (tmp_path / CHECKPOINT_NAME).exists()


# ------------------------------------------------------------------------------ cli
def test_a_config_error_opening_with_a_plain_setting_name_is_worded_as_its_flag(tmp_path, capsys):
    """``reptile-fast omniglot --ways 1``: the config's "ways must be >= 2" is reported as
    "--ways must be >= 2" (exit 2), before any data is read or folder made.

    Catches: ``validation.as_flags`` not turning a plain word that opens the message into its
    flag (the error named a setting the command line does not have)."""
    from reptile_fast.cli import main

    out = tmp_path / "out"
    assert main(["omniglot", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"), "--ways", "1",
                 "--out", str(out)]) == 2
    assert "error: --ways must be >= 2, got 1" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ task families
@pytest.mark.parametrize("cache", [True, False])
def test_miniimagenet_without_a_cache_reads_each_image_again(tmp_path, cache):
    """Two classes of two solid 4x4 images; after a first draw every image is rewritten black:
    ``cache=False`` reads the new pixels at the next draw, ``cache=True`` keeps the decoded ones.

    Catches: ``MiniImageNet._image`` caching whatever ``cache`` says (memory grows with every
    image of the split)."""
    from PIL import Image
    from reptile_fast.tasks import MiniImageNet

    (tmp_path / "images").mkdir()
    names = [f"n{c}_{k}.png" for c in (1, 2) for k in range(2)]
    for name in names:
        Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).save(tmp_path / "images" / name)
    (tmp_path / "train.csv").write_text("filename,label\n" + "".join(f"{n},{n[:2]}\n" for n in names))
    dist = MiniImageNet(tmp_path, "train", ways=2, shots=2, query_shots=0, image_size=4, cache=cache)
    assert bool((dist.sample(1).x == 200 / 255).all())
    for name in names:
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    x = dist.sample(1).x
    assert bool((x == (200 / 255 if cache else 0.0)).all())


# ------------------------------------------------------------------------------ jobs
def test_derived_seeds_wrap_at_the_seed_limit():
    """The jobs' held-out and validation streams are seeded ``seed + offset`` wrapped to 64
    bits: unchanged below SEED_LIMIT (2**32 since QA67), 0 at exactly SEED_LIMIT, and always a seed torch takes.

    Catches: ``jobs.derived_seed`` wrapping modulo 2**64 - 1 (another held-out set for the
    largest seeds than documented)."""
    from reptile_fast.jobs import SEED_LIMIT, derived_seed

    assert derived_seed(5, 1_000_003) == 1_000_008
    assert derived_seed(SEED_LIMIT - 2, 1) == SEED_LIMIT - 1
    assert derived_seed(SEED_LIMIT - 1, 1) == 0 and derived_seed(SEED_LIMIT - 1, 1_000_003) == 1_000_002
    torch.Generator().manual_seed(derived_seed(SEED_LIMIT - 1, 0))


def test_sine_amplitude_and_phase_are_drawn_independently():
    """2000 tasks' amplitudes and phases: each spans its range and the two are uncorrelated
    (|r| < 0.1; independent draws give |r| ~ 0.02 at this size, one shared uniform r = 1).

    Catches: ``Sine._params`` taking the phase from the amplitude's uniform row."""
    a, b = Sine().sample_params(2000, generator=torch.Generator().manual_seed(0))
    assert 0.1 <= float(a.min()) and float(a.max()) <= 5.0 and 0.0 <= float(b.min()) and float(b.max()) <= 2 * np.pi
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(r) < 0.1, r


def test_a_sine_checkpoint_with_settings_this_version_does_not_know_is_named():
    """A sine job's checkpoint config holding a setting this version lacks: a ValueError naming
    it and the checkpoint (not ``SineConfig``'s "unexpected keyword argument" TypeError).

    Catches: ``sine_config_from_checkpoint`` without its check of unknown settings."""
    from dataclasses import asdict

    from reptile_fast.jobs import SineConfig, sine_config_from_checkpoint

    saved = {"extra": {"job": "sine", "job_config": {**asdict(SineConfig(iterations=7)), "warp_drive": 9}}}
    with pytest.raises(ValueError, match=r"checkpoint X holds sine settings this version does not know: \['warp_drive'\]"):
        sine_config_from_checkpoint(saved, "checkpoint X")
    del saved["extra"]["job_config"]["warp_drive"]
    assert sine_config_from_checkpoint(saved).iterations == 7


def test_the_sine_job_gives_back_torchs_thread_count(tmp_path):
    """``run_sine`` with ``threads=1`` on a process set to 2 threads: 2 again afterwards (a
    notebook running the job keeps its own setting).

    Catches: ``_run_sine_ranked`` not restoring ``torch.get_num_threads()``."""
    import os

    from reptile_fast.jobs import SineConfig, run_sine

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_sine(SineConfig(iterations=1, hidden_dim=4, eval_tasks=1, eval_steps=1, backend="reference",
                            checkpoint_every=0, threads=1), tmp_path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ cli
def test_the_sine_command_defaults_its_folder_and_resumes_from_a_checkpoint_file(tmp_path, monkeypatch, capsys):
    """``reptile-fast sine`` without ``--out`` writes into ``runs/sine``; ``--resume
    runs/sine/checkpoint.pt`` (the file, not the folder) without ``--out`` continues there.

    Catches: the CLI's default folder, and ``--resume FILE`` taking the file itself as the
    output folder (it then failed: "output directory ... exists and is not a directory")."""
    from reptile_fast.cli import main

    monkeypatch.chdir(tmp_path)
    small = ["--hidden-dim", "4", "--eval-tasks", "1", "--eval-steps", "1", "--backend", "reference", "--no-progress"]
    assert main(["sine", "--iterations", "1", *small]) == 0
    out = tmp_path / "runs" / "sine"
    assert load_checkpoint(out)["trainer"]["iteration"] == 1 and (out / "metrics.json").is_file()
    assert main(["sine", "--resume", str(out / CHECKPOINT_NAME), "--iterations", "2", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert load_checkpoint(out)["trainer"]["iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sine"]


# ------------------------------------------------------------------------------ seed_recognition
def test_the_seeds_sample_task_text_over_another_pi_is_not_the_seeds():
    """The seed's ``sample_task`` source run where ``np`` is not numpy (its ``np.pi`` is 3): not
    recognised as the seed's (the drop-in must call it, not draw ``Sine`` tasks for it); over
    the real numpy it is.

    Catches: ``is_seed_sample_task`` comparing the code only, not the globals it reads."""
    import types

    import torch.nn as nn
    from reptile_fast.seed_recognition import _SEED_SAMPLE_TASK_SOURCE, is_seed_sample_task

    def defined_over(np_module):
        namespace = {"torch": torch, "nn": nn, "np": np_module}
        exec(_SEED_SAMPLE_TASK_SOURCE, namespace)
        return namespace["sample_task"]

    assert is_seed_sample_task(defined_over(np))
    assert not is_seed_sample_task(defined_over(types.SimpleNamespace(pi=3.0)))


@pytest.mark.parametrize("raised, code, words", [
    (KeyboardInterrupt(), 130, "interrupted without writing a new checkpoint; the last one in {out} (if any) is "
                               "intact: continue with reptile-fast sine --resume {out}"),
    ("non-finite", 3, "no checkpoint had been written yet"),
])
def test_the_sine_command_reports_a_stopped_run_with_its_exit_code(tmp_path, monkeypatch, capsys, raised, code, words):
    """The job stopped by a second Ctrl-C (KeyboardInterrupt: exit 130, how to continue) or by a
    non-finite meta-step before any checkpoint (exit 3, documented in ``main``): the message and
    the code say which.

    Catches: the CLI's KeyboardInterrupt message without the ``--resume`` line, and exit 2 (bad
    input) for a diverged run."""
    import reptile_fast.jobs as jobs
    from reptile_fast.cli import main
    from reptile_fast.core import NonFiniteError

    def stopped(*args, **kwargs):
        raise raised if isinstance(raised, BaseException) else NonFiniteError("meta-step 1 is not finite", iteration=1)
    monkeypatch.setattr(jobs, "run_sine", stopped)
    out = tmp_path / "o"
    assert main(["sine", "--out", str(out), "--no-progress"]) == code
    assert words.format(out=out) in capsys.readouterr().err


def test_native_library_keys_differ_between_the_native_and_the_portable_flags():
    """A library compiled with ``-march=native`` and the portable one are cached under
    different names (the portable build is the fallback for a CPU where the native one fails).

    Catches: ``native_build.library_key`` leaving the flags out of the hash."""
    from reptile_fast import native_build

    cc = native_build.find_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    source = "int f(void) { return 1; }"
    native = native_build.library_key(source, cc, native_build._FLAGS)
    assert native != native_build.library_key(source, cc, native_build._FLAGS_PORTABLE)
    assert native == native_build.library_key(source, cc, native_build._FLAGS)


# ------------------------------------------------------------------------------ fewshot_job
def test_an_omniglot_evaluation_batch_larger_than_the_smallest_support_set_is_refused():
    """``shots=[1, 5]`` with ``eval_batch_size=10`` at 5 ways: the 1-shot support set holds 5
    images, so the setting is refused naming it (it would be capped silently for that test).

    Catches: ``OmniglotConfig`` checking against the largest K instead of the smallest."""
    from reptile_fast.fewshot_job import OmniglotConfig

    assert OmniglotConfig(train=["a"], test="b", shots=[1, 5], eval_batch_size=5).eval_batch_size == 5
    with pytest.raises(ValueError, match=r"eval_batch_size 10 exceeds the support set of 5 × 1 images"):
        OmniglotConfig(train=["a"], test="b", shots=[1, 5], eval_batch_size=10)


def test_a_resumed_omniglot_run_keeps_the_validation_point_of_its_checkpoint(tmp_path):
    """Validation points at meta-steps 2, 4, 6, resumed from the checkpoint of meta-step 4: the
    points up to and including 4 are kept (4 was measured on exactly the resumed parameters).

    Catches: ``read_validation`` dropping the point at the resumed meta-step."""
    import json

    from reptile_fast.fewshot_job import read_validation

    path = tmp_path / "validation.json"
    path.write_text(json.dumps([{"iteration": i, "accuracy": i / 10} for i in (2, 4, 6)]))
    notes = []
    assert [v["iteration"] for v in read_validation(path, 4, notes.append)] == [2, 4]
    assert notes == []


def test_a_sine_range_given_high_before_low_is_refused():
    """``Sine(amplitude=(1.0, 0.5))``: a ValueError asking for low <= high (a reversed range
    drew amplitudes in [0.5, 1] by a negative width, silently); a point range (1, 1) is fine.

    Catches: ``tasks.sine._check_range`` comparing ``hi <= lo - 1``."""
    assert Sine(amplitude=(1.0, 1.0)).amplitude == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"amplitude must have low <= high, got \(1\.0, 0\.5\)"):
        Sine(amplitude=(1.0, 0.5))


def _tiny_omniglot(root):
    """The omniglot job's tiny data (``tests/test_fewshot_job.py``'s) under ``root``: ``(data,
    main, tiny_args)``."""
    from test_fewshot_job import main, make_folder, make_zip, tiny_args

    data = {"train": str(make_zip(make_folder(root / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1"),
                                  root / "small1.zip")),
            "test": str(make_folder(root / "b", {"Beta": 2, "Gamma": 3}, prefix="images_background_small2"))}
    return data, main, tiny_args


def test_omniglot_runs_follow_the_transductive_flag_over_the_models(tmp_path):
    """``run_omniglot_runs(..., transductive=True)`` on a model trained non-transductively
    evaluates (and reports) transductively; ``None`` keeps the model's setting.

    Catches: ``run_omniglot_runs`` ignoring its ``transductive`` argument."""
    import json

    from reptile_fast.fewshot_job import run_omniglot_runs
    from test_fewshot_job import make_runs

    data, main, tiny_args = _tiny_omniglot(tmp_path / "data")
    model = tmp_path / "run"
    assert main([*tiny_args(data, model), "--iterations", "1", "--validate-every", "0"]) == 0
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    assert json.loads((model / "config.json").read_text())["transductive"] is False
    assert run_omniglot_runs(runs, model, tmp_path / "t", transductive=True, log=lambda m: None)["transductive"] is True
    assert run_omniglot_runs(runs, model, tmp_path / "n", log=lambda m: None)["transductive"] is False



def test_a_resumed_omniglot_runs_time_per_meta_step_counts_only_the_steps_it_ran(tmp_path, monkeypatch, capsys):
    """The job's clock faked to advance 1 s per reading (training then takes exactly 1 s): a
    run of 1 meta-step resumed to 3 reports 1000 / 2 ms per meta-step, not 1000 / 3.

    Catches: ``ms_per_iteration`` dividing by all of ``iterations`` after a resume."""
    import itertools
    import json
    import types

    import reptile_fast.fewshot_job as fewshot_job

    data, main, tiny_args = _tiny_omniglot(tmp_path / "data")
    out = tmp_path / "run"
    quick = ["--validate-every", "0", "--checkpoint-every", "0"]
    assert main([*tiny_args(data, out), "--iterations", "1", *quick]) == 0
    clock = itertools.count()
    monkeypatch.setattr(fewshot_job, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    capsys.readouterr()
    assert main(["omniglot", "--resume", str(out), "--iterations", "3", "--no-progress"]) == 0
    # (the command line prints the library's warning as a note since session 22)
    assert "note: the checkpoint's run annealed the outer step over 1 iterations, this fit over 3" in \
        capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_iteration"] == 1 and metrics["ms_per_iteration"] == 500.0


def test_a_cc_with_arguments_is_found_and_its_arguments_key_the_cache(monkeypatch):
    """``CC="cc -DREPTILE_QA"``: the compiler is the first word found on PATH, the further words
    are passed to it and are part of the cache key (a library built with other arguments is
    another library).

    Catches: ``find_compiler`` looking up the whole ``$CC`` string (no compiler found), and
    ``_compiler_extra_args`` dropping the further words."""
    import shutil

    from reptile_fast import native_build

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", cc)
    plain = native_build.library_key("int f(void) { return 1; }", cc, native_build._FLAGS)
    monkeypatch.setenv("CC", f"{cc} -DREPTILE_QA")
    assert native_build.find_compiler() == cc
    assert native_build._compiler_extra_args() == ["-DREPTILE_QA"]
    assert native_build.library_key("int f(void) { return 1; }", cc, native_build._FLAGS) != plain


# ------------------------------------------------------------------------------ seed_recognition (batch sizes)
@pytest.mark.parametrize("batch, expected", [(4, 4), (0, None), (True, None), (2.0, None)])
def test_a_partial_of_the_standard_loop_needs_a_positive_int_batch_size(batch, expected):
    """``functools.partial(standard_inner_loop, batch_size=...)`` is the standard loop only with
    a positive int batch size (0, True or 2.0 would reach the fast paths as a minibatch size).

    Catches: ``classify_inner_loop`` taking any int (bool included, 0 included)."""
    import functools

    from reptile_fast.seed_recognition import is_standard_inner_loop, standard_inner_loop

    assert is_standard_inner_loop(functools.partial(standard_inner_loop, batch_size=batch)) == expected
