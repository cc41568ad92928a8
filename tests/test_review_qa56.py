"""QA56's mutation audit (the modules QA24, QA27 and QA33 left aside or that changed since: fewshot,
fewshot_job, the task families with ``official_character_split`` / ``Omniglot(characters=)``, backend
reference's ``task_copy`` and carried Adam state, validation, model_watch, jobs, trainer_state and
distributed): each test here fails under a deliberate, realistic breakage of the library that the
rest of the suite let through (NOTES-qa56.md has the table).  Each docstring names the mutation it
kills.  Tiny models and a fake Omniglot written as PNGs: the file runs in seconds."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from _fake_omniglot import job_data, make_folder, make_runs
from reptile_fast import Reptile, TaskBatch
from reptile_fast.cli import main
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.tasks import Episodes, official_character_split
from reptile_fast.tasks.omniglot import load_omniglot_images

_TINY = ["--ways", "2", "--train-shots", "2", "--inner-batch-size", "2", "--inner-steps", "2",
         "--eval-steps", "3", "--eval-tasks", "6", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("qa56_job"))


# ------------------------------------------------------------------------------ fewshot
def test_evaluation_leaves_a_cumulative_batchnorms_statistics_alone():
    """``evaluate_episodes`` promises the trainer's model is not changed.  A BatchNorm with
    ``momentum=None`` (a cumulative average, which vmap cannot batch) is evaluated one task at a
    time; its running statistics and batch count must stay the model's.

    Kills: ``fewshot._stacked_buffers`` without ``.clone()`` on its one-by-one path (the buffers
    handed to ``functional_call`` were the model's own: evaluation updated running_mean /
    running_var / num_batches_tracked in place)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=None), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    trainer = Reptile(model, inner_lr=0.05, inner_steps=2, inner_batch_size=2, loss="cross_entropy",
                      inner_optimizer="adam")
    g = torch.Generator().manual_seed(1)
    y = torch.arange(2).repeat(2).expand(3, -1).contiguous()
    episodes = Episodes(TaskBatch(torch.rand(3, 4, 1, 6, 6, generator=g), y),
                        TaskBatch(torch.rand(3, 4, 1, 6, 6, generator=g), y), 2)
    before = copy.deepcopy(model.state_dict())
    for transductive in (False, True):
        evaluate_episodes(trainer, episodes, steps=2, batch_size=2, transductive=transductive,
                          generator=torch.Generator().manual_seed(2))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k



def test_evaluation_chunks_stay_within_max_images():
    """``max_images`` bounds the images of one batched forward pass (the evaluation's memory): with
    room for exactly two tasks' query batches (each query with the support set: Q·(S+1) images per
    task), tasks are adapted and predicted two at a time, and the result does not depend on it.

    Kills: the chunk size computed one task too large (``max_images // per_task + 1``: 3 tasks,
    1.5x the memory asked for; no result changes, so nothing else noticed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    trainer = Reptile(model, inner_lr=0.1, inner_steps=1, inner_batch_size=2, loss="cross_entropy")
    g = torch.Generator().manual_seed(3)
    y = torch.arange(2).repeat(2).expand(7, -1).contiguous()                   # S = Q = 4
    episodes = Episodes(TaskBatch(torch.rand(7, 4, 1, 4, 4, generator=g), y),
                        TaskBatch(torch.rand(7, 4, 1, 4, 4, generator=g), y), 2)
    seen, adapt = [], trainer.adapt

    def recording_adapt(tasks, *args, **kwargs):
        seen.append(tasks.n_tasks)
        return adapt(tasks, *args, **kwargs)

    trainer.adapt = recording_adapt
    small = evaluate_episodes(trainer, episodes, steps=2, batch_size=2, max_images=2 * 4 * 5,
                              generator=torch.Generator().manual_seed(1))
    assert seen == [2, 2, 2, 1]
    whole = evaluate_episodes(trainer, episodes, steps=2, batch_size=2, generator=torch.Generator().manual_seed(1))
    assert seen[4:] == [7] and torch.equal(small.predictions, whole.predictions)


# ------------------------------------------------------------------------------ fewshot_job
def _official_args(data, out, *extra):
    # 8 fake characters of 4 images: 5 train (with rotations: 20 classes), 3 test; 3-shot tests
    # adapt on 5 of the 6 support images per step (the preset's eval batch 5): the draws matter
    return ["omniglot", "--train", data["train"], "--test", data["test"], "--split", "official",
            "--split-seed", "3", "--train-characters", "5", "--shots", "3", "--iterations", "2",
            "--checkpoint-every", "1", "--validation-tasks", "3", "--transductive", "--out", str(out), *_TINY,
            *extra]


@pytest.fixture(scope="module")
def official_runs(data):
    """The same official-split run twice: with a validation every meta-step, and without."""
    root = data["root"]
    assert main(_official_args(data, root / "validated", "--validate-every", "1")) == 0
    assert main(_official_args(data, root / "plain", "--validate-every", "0")) == 0
    return root / "validated", root / "plain"


def _metrics(folder, name="metrics.json"):
    return json.loads((folder / name).read_text())


def test_official_split_trains_on_the_rotations_and_validation_does_not_change_the_test(official_runs):
    """``--split official`` trains on its training characters with their 90° rotations (the
    official code's augmentation), and validation is monitoring only: the final test is the same
    with and without it.

    Kills: ``_official_split_tasks`` building the training tasks with ``rotations=(0,)`` (5 classes
    instead of 20: nothing else looked at the official split's training classes), and the job's
    ``evaluate`` calling ``evaluate_episodes`` without its generator (the adaptation minibatches
    then came from torch's global stream, which each validation advanced: the test accuracy
    depended on ``--validate-every``); metrics.json's ``test_alphabets`` taken from the training
    tasks (``train_dist.alphabets``) under ``--split official``."""
    validated, plain = official_runs
    a, b = _metrics(validated), _metrics(plain)
    assert a["train_characters"] == 5 and a["train_classes"] == 5 * 4
    # split seed 3: training characters of Alpha and Gamma, test characters of Beta and Gamma
    assert a["train_alphabets"] == ["Alpha", "Gamma"]
    assert a["test_alphabets"] == sorted({n.split("/")[0] for n in a["test_character_names"]}) == ["Beta", "Gamma"]
    assert len(_metrics(validated, "validation.json")) == 2 and not (plain / "validation.json").exists()
    for key in ("accuracy", "ci95", "nearest_neighbour_accuracy"):
        assert a["results"][0][key] == b["results"][0][key], key


def test_official_split_resume_refuses_other_test_characters_of_the_same_count(data, official_runs, tmp_path,
                                                                             capsys):
    """A resume whose --test data gives the same number of test characters, but other ones, would
    train on another split (characters of the run's test set among them): refused by name.

    Kills: the resume check comparing only the number of saved test characters
    (``len(saved_test) != len(now_test)``)."""
    validated, _ = official_runs
    other = make_folder(tmp_path, {"Delta": 3}, prefix="other")  # sorts where Gamma did: same positions
    everything = load_omniglot_images([data["train"], str(other)]).characters
    _, test_now = official_character_split(everything, seed=3, n_train=5)
    saved = _metrics(validated)["test_character_names"]
    assert len(test_now) == len(saved) and sorted("/".join(c) for c in test_now) != sorted(saved)
    capsys.readouterr()
    assert main(["omniglot", "--resume", str(validated), "--test", str(other), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "is not the checkpoint's run's" in capsys.readouterr().err


def test_resume_caps_the_evaluation_batch_at_the_smallest_of_several_shots(official_runs, tmp_path):
    """A run tested 3-shot (eval batch 5 of the 6 support images) resumed with ``--shots 1 3``: the
    evaluation batch not given as a flag is capped at the smallest support set (2), as for a new
    run; the resumed run tests both.

    Kills: ``config_from_args`` capping it at ``ways * max(shots)`` on resume (5 stays, and the
    config refuses it: the resume failed)."""
    validated, _ = official_runs
    assert main(["omniglot", "--resume", str(validated), "--shots", "1", "3", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    m = _metrics(tmp_path)
    assert [r["shots"] for r in m["results"]] == [1, 3]
    assert _metrics(tmp_path, "config.json")["eval_batch_size"] == 2


def test_official_runs_follow_the_models_settings_and_keep_the_callers_threads(official_runs, tmp_path):
    """``omniglot-runs`` adapts with the model's run's minibatches and transductive setting
    (default: as the model's run; here the omniglot job's default "epochs", and --transductive)
    and runs with the run's ``--threads`` only while it runs.

    Kills: ``_official_runs`` defaulting to "fresh" minibatches (the model's "epochs" ignored, and
    runs_metrics.json recording "fresh"), or to non-transductive predictions
    (``transductive = bool(transductive)``); ``_with_threads`` not putting torch's thread count back
    (a Python caller of run_omniglot / run_omniglot_runs was left on the job's ``--threads``)."""
    validated, _ = official_runs
    runs = make_runs(tmp_path, n_runs=1, ways=2)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs to tell the job's --threads 1 from the caller's count")
    torch.set_num_threads(2)
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(validated), "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == 2
    m = _metrics(tmp_path, "runs_metrics.json")
    config = _metrics(validated, "config.json")
    assert (config["minibatches"], config["transductive"]) == ("epochs", True)
    assert (m["minibatches"], m["transductive"]) == ("epochs", True)


def test_official_runs_take_numpys_bool_for_transductive_and_refuse_a_string(official_runs, tmp_path):
    """``run_omniglot_runs(transductive=numpy.bool_(False))`` runs as ``False`` and writes
    runs_metrics.json with a JSON bool; a string is refused before any evaluation, naming
    ``transductive``; ``OmniglotConfig`` takes numpy's bool as ``indexed_tasks`` already did.

    Kills (QA56's report): numpy's bool passed through unchecked — the evaluation ran, then writing
    runs_metrics.json failed (numpy bool is not JSON-serialisable) and the result was lost."""
    np = pytest.importorskip("numpy")
    from reptile_fast.fewshot_job import OmniglotConfig, run_omniglot_runs

    validated, _ = official_runs
    runs = make_runs(tmp_path, n_runs=1, ways=2)
    out = tmp_path / "out"
    m = run_omniglot_runs(runs, validated, out, transductive=np.bool_(False), threads=1, log=lambda *a: None)
    assert m["transductive"] is False
    assert json.loads((out / "runs_metrics.json").read_text())["transductive"] is False
    with pytest.raises(TypeError, match="transductive"):
        run_omniglot_runs(runs, validated, tmp_path / "never", transductive="no", threads=1, log=lambda *a: None)
    assert not (tmp_path / "never").exists()
    config = OmniglotConfig(train=["-"], test="-", transductive=np.bool_(True))
    assert config.transductive is True



def test_official_runs_label_each_query_by_its_own_line_whatever_the_lines_order(tmp_path):
    """``load_official_runs`` labels each test item through its own ``class_labels.txt`` line; a file
    whose lines are not in item order (here reversed) gives the same labels per item.

    Kills: the query labels taken from the lines sorted by item name while the query images keep
    the file's order (every label shifted to another image: a silent mislabel)."""
    import numpy as np

    from reptile_fast.tasks.omniglot import load_official_runs

    runs = make_runs(tmp_path, n_runs=1, ways=3)
    labels = runs / "run01" / "class_labels.txt"
    lines = labels.read_text().strip().splitlines()
    labels.write_text("\n".join(reversed(lines)) + "\n")
    episodes, names = load_official_runs(runs)
    perm = np.random.default_rng(0).permutation(3)  # make_runs: item k shows class perm[k]
    assert names == ["run01"]
    assert episodes.query.y[0].tolist() == [int(perm[2]), int(perm[1]), int(perm[0])]


# ------------------------------------------------------------------------------ backends/reference
def test_carried_adam_state_keeps_no_overflowed_moments_and_its_checkpoint_loads():
    """A meta-step whose inner gradients overflow Adam's second moment (inputs of 1e17 into a linear
    model: g² > float32's max) moves no parameter (m / sqrt(inf) = 0) and is applied; the carried
    state must stay the one before it, so the trainer's state_dict() still loads.

    Kills: ``CarriedOptimizerState.commit`` keeping a pending state without checking its moments
    are finite (the carried exp_avg_sq held inf, and ``load_state_dict`` then refused the trainer's
    own state: a checkpoint that cannot be resumed)."""
    from reptile_fast.tasks import sample_indices

    def make(model):
        return Reptile(model, inner_lr=0.01, inner_steps=2, inner_batch_size=2, outer_lr=0.5,
                       inner_optimizer="adam", adam_state="carried", backend="reference")

    torch.manual_seed(0)
    trainer = make(nn.Linear(1, 1))
    g = torch.Generator().manual_seed(0)
    plan = sample_indices(2, 2, 4, 2, generator=g)
    trainer.meta_step(TaskBatch(torch.randn(2, 4, 1, generator=g), torch.randn(2, 4, 1, generator=g)), plan)
    kept = copy.deepcopy(trainer.carried_adam_state)
    trainer.meta_step(TaskBatch(torch.full((2, 4, 1), 1e17), torch.zeros(2, 4, 1)), plan)
    state = trainer.carried_adam_state
    for key, entries in kept["state"].items():
        for name, value in entries.items():
            assert torch.equal(state["state"][key][name], value), (key, name)
    make(copy.deepcopy(trainer.model)).load_state_dict(trainer.state_dict())


class _KeepsTuple(nn.Module):
    """An MLP that keeps its activations in a tuple under a private name (a plotting habit)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
        self._acts = ()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self._acts = (h, h.sum())
        return self.b(h)


class _TupleView(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.a = nn.Linear(3, 3, bias=False)
        self.tied = (self.a.weight.t(),)  # a view of a (not the first) parameter, in a tuple

    def forward(self, x):
        return torch.tanh(self.a(self.pre(x))) @ self.tied[0]


def test_reference_copies_activations_kept_in_a_tuple_and_refuses_a_view_kept_there():
    """Backend reference's per-task copies detach the activations a forward left in a tuple
    attribute with a private name (as in a dict or list: QA52), giving the numbers of the same
    model without them; a view of a parameter kept in a tuple is refused by name at construction.

    Kills: ``validation.attribute_tensors`` walking lists but not tuples, or skipping every
    attribute whose name starts with "_" instead of nn.Module's own bookkeeping (the deep copy
    failed inside torch: "Only Tensors created explicitly by the user (graph leaves) support the
    deepcopy protocol", and the tied view trained silently untied); ``_parameter_views`` comparing
    the attributes' storage with the first parameter's only (a view of another one was not
    refused)."""
    from reptile_fast.tasks import sample_indices

    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 2, generator=g))
    plan = sample_indices(2, 2, 6, 3, generator=g)
    torch.manual_seed(0)
    keeps = _KeepsTuple()
    plain = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    plain.load_state_dict({"0.weight": keeps.a.weight, "0.bias": keeps.a.bias, "2.weight": keeps.b.weight,
                           "2.bias": keeps.b.bias})
    for model in (keeps, plain):
        Reptile(model, inner_lr=0.05, inner_steps=2, inner_batch_size=3, backend="reference").meta_step(tasks, plan)
    torch.testing.assert_close(keeps.b.weight, plain[2].weight, rtol=0, atol=0)
    torch.testing.assert_close(keeps.a.weight, plain[0].weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tied"):
        Reptile(_TupleView(), backend="reference")


# ------------------------------------------------------------------------------ validation / model_watch
class _ModeAct(nn.Module):
    """An activation that branches on the module's mode (as Dropout-like layers do)."""

    def forward(self, x):
        return torch.tanh(x) if self.training else torch.relu(x)


def test_compiled_programs_follow_a_train_eval_switch_after_construction():
    """A model built in eval mode and switched to train mode between meta-steps trains what its
    forward computes in each mode: backend "compiled" equals backend "reference" on the same draws.

    Kills: ``model_watch.structure_key`` without each module's ``training`` flag (the compiled
    program traced in eval mode, ReLU here, kept running after ``model.train()``: wrong numbers,
    0.009 off after one meta-step)."""
    from reptile_fast.tasks import sample_indices

    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.randn(3, 6, 2, generator=g), torch.randn(3, 6, 1, generator=g))
    plan = sample_indices(3, 2, 6, 3, generator=g)
    models = []
    for backend in ("compiled", "reference"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 8), _ModeAct(), nn.Linear(8, 1)).eval()
        trainer = Reptile(model, inner_lr=0.1, inner_steps=2, inner_batch_size=3, backend=backend)
        trainer.meta_step(tasks, plan)
        model.train()
        trainer.meta_step(tasks, plan)
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inner_grad_weights_of_another_length_are_refused():
    """``inner_grad_weights`` must have exactly ``inner_steps`` entries.

    Kills: the length check relaxed to ``len(weights) < inner_steps`` (extra weights silently
    ignored: a schedule written for more steps trained a truncated one)."""
    with pytest.raises(ValueError, match="inner_steps=2 entries"):
        Reptile(nn.Linear(2, 1), inner_steps=2, inner_grad_weights=[1.0, 0.5, 0.25])


# ------------------------------------------------------------------------------ jobs
def test_a_resumed_run_of_a_torchrun_launch_draws_by_index_in_one_process(tmp_path, monkeypatch, capsys):
    """A sine run launched by torchrun draws its tasks by global index; resumed in one process
    (no torchrun) from its meta-step-2 checkpoint, into its own folder named by a relative path, it
    continues those draws (the same model as the uninterrupted run) without a note about replacing
    "another run".

    Kills: ``jobs.uses_indexed_tasks`` ignoring the checkpoint's sampler (the resumed run drew from
    a generator: refused by fit); ``replaced_run_note`` comparing the resolved source folder with
    ``out`` as given (a relative or symlinked ``out`` of the same run was reported as another run's
    folder, "this resumed run ... replaces it and that run's outputs")."""
    from reptile_fast.jobs import SineConfig, run_sine

    config = SineConfig(iterations=4, checkpoint_every=2, hidden_dim=4, eval_tasks=1, eval_steps=1,
                        backend="reference", meta_batch_size=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "qa56")
    whole = run_sine(config, "whole", progress=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert whole["task_sampler"] == "indexed"
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    capsys.readouterr()
    resumed = run_sine(config, "whole", progress=False, resume="whole/checkpoint.prev.pt")
    assert "another run" not in capsys.readouterr().err
    assert resumed["task_sampler"] == "indexed" and resumed["resumed_from_iteration"] == 2
    b = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_replaced_run_note_is_rank_0s_alone(tmp_path, capsys):
    """Under torchrun every rank runs the job: the note that a run replaces another's checkpoint is
    printed by rank 0 alone (as the jobs' other notes).

    Kills: ``replaced_run_note`` ignoring its ``main`` flag (every rank printed it)."""
    from reptile_fast.checkpoint import CHECKPOINT_NAME
    from reptile_fast.jobs import replaced_run_note

    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    replaced_run_note(tmp_path, None, False)
    assert capsys.readouterr().err == ""
    replaced_run_note(tmp_path, None, True)
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_sine_job_checkpoints_only_at_the_end_with_checkpoint_every_0_and_reports_the_unadapted_mse(tmp_path):
    """``checkpoint_every=0``: a checkpoint at the end only (and on signals), whatever the number of
    meta-steps; ``pre_adaptation_mse`` is the trained model's MSE on the held-out tasks before any
    adaptation step (the tasks the job draws from its held-out stream, seed + 1000003).

    Kills: ``train_job`` passing 1000 for ``checkpoint_every`` 0 (a 1001-step run saved at
    meta-step 1000 too: checkpoint.prev.pt), and ``pre_adaptation_mse`` measured after one
    adaptation step (``trainer.evaluate(held_out, 1)``)."""
    from reptile_fast import MLP, Sine
    from reptile_fast.jobs import SineConfig, derived_seed, run_sine

    metrics = run_sine(SineConfig(iterations=1001, checkpoint_every=0, hidden_dim=4, eval_tasks=3, eval_steps=1),
                       tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "checkpoint.prev.pt").exists()
    model = MLP(1, 4, 1)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"])
    held_out = Sine(n_points=50).sample(3, generator=torch.Generator().manual_seed(derived_seed(0, 1_000_003)))
    with torch.no_grad():
        mse = ((model(held_out.x) - held_out.y) ** 2).mean(dim=(1, 2)).mean()
    assert metrics["pre_adaptation_mse"] == pytest.approx(float(mse), rel=1e-5)


def test_sine_job_refuses_an_evaluation_that_cannot_fit_before_training(tmp_path, monkeypatch):
    """The held-out evaluation's memory (eval_tasks x (parameters + points)) is checked before
    training: more than the machine has free is a MemoryError, and nothing is trained.

    Kills: ``check_sine_memory``'s estimate without the number of tasks (one task's bytes: never
    refused; the kernel's OOM killer ended such jobs after training, QA46)."""
    from reptile_fast import jobs

    monkeypatch.setattr(jobs, "available_memory", lambda: 2 ** 20)  # 1 MiB free; 5 MB needed
    with pytest.raises(MemoryError, match="held-out evaluation"):
        jobs.run_sine(jobs.SineConfig(iterations=1, hidden_dim=4, eval_tasks=10000, eval_steps=1), tmp_path / "o",
                      progress=False)
    assert not (tmp_path / "o" / "model.pt").exists()


# ------------------------------------------------------------------------------ trainer_state
def _carried_trainer(model=None, **kwargs):
    from reptile_fast import MLP

    torch.manual_seed(0)
    return Reptile(model if model is not None else MLP(1, 4, 1), inner_lr=0.01, inner_steps=2, inner_batch_size=2,
                   inner_optimizer="adam", adam_state="carried", backend="reference", **kwargs)


def _trained_state():
    from reptile_fast import Sine

    trainer = _carried_trainer()
    trainer.meta_step(Sine(n_points=8).sample(2, generator=torch.Generator().manual_seed(0)))
    return trainer, trainer.state_dict()


def test_a_carried_state_for_fewer_parameters_is_refused_and_a_loaded_one_is_the_trainers_own_copy():
    """``load_state_dict`` checks the carried inner Adam state against the model: one that holds the
    state of fewer parameters (the first four of six, of the right shapes) is refused by name (else
    the next tasks ran with those four moments and restarted the other two silently); an accepted
    one is copied, so changing the caller's dict afterwards does not change the trainer.

    Kills: ``carried_state_problem`` refusing only more parameters than the model has
    (``len(ids) > len(params)``), and ``load_trainer_state`` keeping ``dict(inner_state)`` (a
    shallow copy: the trainer's carried moments were the caller's tensors)."""
    _, state = _trained_state()
    truncated = copy.deepcopy(state["inner_optimizer"])
    truncated["param_groups"][0]["params"] = truncated["param_groups"][0]["params"][:4]
    for key in list(truncated["state"])[4:]:
        del truncated["state"][key]
    with pytest.raises(ValueError, match="holds the state of 4 parameters, the model has 6"):
        _carried_trainer().load_state_dict({**state, "inner_optimizer": truncated})
    other = _carried_trainer()
    other.load_state_dict(state)
    moments = state["inner_optimizer"]["state"][0]
    kept = moments["exp_avg"].clone()
    moments["exp_avg"].fill_(7.0)
    moments.clear()
    assert torch.equal(other.carried_adam_state["state"][0]["exp_avg"], kept)


def test_resuming_a_checkpoint_from_before_minibatches_existed_says_the_run_differs():
    """A state saved before ``minibatches`` / ``adam_state`` existed drew "fresh" minibatches with a
    fresh Adam per task: loaded into an "epochs" trainer, the warning says the run will differ.

    Kills: ``load_trainer_state`` without those defaults for old states (the keys absent, no
    difference was reported: a silent change of the run)."""
    from reptile_fast import MLP

    torch.manual_seed(0)
    old = Reptile(MLP(1, 4, 1), backend="reference").state_dict()
    del old["config"]["minibatches"], old["config"]["adam_state"]
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="minibatches: saved 'fresh', now 'epochs'"):
        Reptile(MLP(1, 4, 1), backend="reference", minibatches="epochs").load_state_dict(old)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 5)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1)


def test_an_outer_optimizer_state_saved_in_another_parameter_order_is_refused():
    """An outer Adam built over the parameters in another order than the run that saved its state
    (heads ``[4, 3]`` and ``[5, 3]`` swapped: the same trailing sizes, another first one): refused
    by name, the model unchanged.

    Kills: ``optimizer_state_problem`` comparing every size but the first (the state was accepted
    and the first outer step failed inside torch, "The size of tensor a (4) must match ...")."""
    def trainer(order):
        torch.manual_seed(0)
        model = _TwoHeads()
        params = list(model.parameters())
        return Reptile(model, inner_lr=0.05, inner_steps=1, inner_batch_size=2, backend="reference",
                       outer_optimizer=torch.optim.Adam(params if order == "same" else params[2:] + params[:2], lr=1e-3))

    source = trainer("same")
    source.meta_step(TaskBatch(torch.randn(2, 4, 3), torch.randn(2, 4, 9)))
    target = trainer("swapped")
    before = copy.deepcopy(target.model.state_dict())
    with pytest.raises(ValueError, match="has shape \\(4, 3\\), the parameter's is \\(5, 3\\)"):
        target.load_state_dict(source.state_dict())
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


# ------------------------------------------------------------------------------ distributed
def _mirror_context():
    """A two-rank ``DistContext`` in one process: the other rank mirrors this one (it sends the same
    values), so ``distributed_fit``'s rank logic runs without a process group."""
    from reptile_fast.distributed import DistContext

    class Mirror(DistContext):
        def all_reduce_(self, tensor, what, op="sum"):
            return tensor.mul_(2) if op == "sum" else tensor

        def all_gather(self, tensor, what):
            return [tensor.clone(), tensor.clone()]

        def all_gather_object(self, obj, what):
            return [obj, copy.deepcopy(obj)]

        def broadcast_object(self, obj, what, src=0):
            return obj

        def broadcast_module(self, module, what, src=0):
            pass

        def barrier(self, what):
            pass

    return Mirror(rank=0, world_size=2, device=torch.device("cpu"))


def _sine_trainer(**kwargs):
    from reptile_fast import MLP

    torch.manual_seed(0)
    return Reptile(MLP(1, 4, 1), inner_lr=0.02, inner_steps=2, inner_batch_size=5, backend="reference", **kwargs)


def test_ranks_that_differ_in_having_a_callback_are_refused():
    """A callback makes a rank read device values every meta-step (a non-finite step is then seen
    at another meta-step than on the other ranks): ranks started with and without one are refused
    by name before any collective of training.

    Kills: the ranks' settings comparison without its "callback" entry."""
    from reptile_fast import Sine
    from reptile_fast.distributed import distributed_fit

    ctx = _mirror_context()
    gather = type(ctx).all_gather_object
    type(ctx).all_gather_object = lambda self, obj, what: [obj, {**obj, "callback": not obj.get("callback")}] \
        if "settings" in what else gather(self, obj, what)
    with pytest.raises(ValueError, match="callback: \\[True, False\\]"):
        distributed_fit(_sine_trainer(), Sine(n_points=10), 1, meta_batch_size=2, seed=0, context=ctx, progress=False,
                        callback=lambda i, m: None)


def test_indexed_training_reads_the_trainers_epoch_minibatches():
    """``distributed_fit`` (here in one process) draws the trainer's kind of minibatches: with
    ``minibatches="epochs"`` it trains what ``meta_step`` does on the ``IndexedSampler``'s epoch plans.

    Kills: ``distributed_fit`` building its sampler with "fresh" minibatches whatever the trainer's
    (an "epochs" run trained on fresh draws under torchrun)."""
    from reptile_fast import Sine
    from reptile_fast.distributed import IndexedSampler, distributed_fit

    a, b = _sine_trainer(minibatches="epochs"), _sine_trainer(minibatches="epochs")
    distributed_fit(a, Sine(n_points=10), 2, meta_batch_size=3, seed=4, progress=False)
    sampler = IndexedSampler(Sine(n_points=10), 3, seed=4, plan_rows=2, batch_size=5, minibatches="epochs")
    for t in (1, 2):
        b.meta_step(*sampler.draw(t))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)



def test_a_boolean_iteration_in_a_saved_state_is_refused():
    """``state["iteration"]`` must be an int: True (a bool, read as 1) is refused like any other
    malformed entry.

    Kills: ``load_trainer_state`` taking bools as iterations (``trainer.iteration`` became True)."""
    from reptile_fast import MLP

    torch.manual_seed(0)
    trainer = Reptile(MLP(1, 4, 1), backend="reference")
    with pytest.raises(ValueError, match="iteration"):
        trainer.load_state_dict({**trainer.state_dict(), "iteration": True})
