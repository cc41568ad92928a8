"""QA52: review of session 22 (``git diff 1621a95..HEAD``): ``--split official``
(``tasks.official_character_split``, ``Omniglot(characters=)``), the model-change checks
(``model_watch``: renamed / frozen parameters; backend reference's ``task_copy``; sparse
embeddings) and the jobs' warnings printed as notes (``jobs.train_job``).

Part (a): each test under "Bugs" FAILS on the code reviewed (ac3490c) and says in its docstring
what is expected and why.
Part (b): behaviours checked during the review that no test pinned yet (they pass).
"""
from __future__ import annotations

import copy
import json
import os
import random
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from _fake_omniglot import job_data, make_folder
from reptile_fast import Reptile, TaskBatch, sample_indices
from reptile_fast.cli import main
from reptile_fast.model_watch import structure_key
from reptile_fast.tasks import Omniglot, official_character_split
from reptile_fast.tasks.omniglot import load_omniglot_images

KW = dict(inner_steps=3, inner_batch_size=4, inner_lr=0.05, outer_lr=0.5)
DATA = Path("/work/shared/data/omniglot")
_TINY = ["--ways", "2", "--shots", "1", "--train-shots", "2", "--inner-batch-size", "2", "--inner-steps", "2",
         "--eval-steps", "2", "--eval-batch-size", "2", "--eval-tasks", "2", "--validate-every", "0",
         "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("qa52_job"))


def _tasks(seed=0, fout=2):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(3, 12, 5, generator=g), torch.randn(3, 12, fout, generator=g))


def _plans(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [sample_indices(3, 3, 12, 4, generator=g) for _ in range(count)]


def _train(model, backend, steps=2, fout=2, **kw):
    trainer = Reptile(model, backend=backend, **{**KW, **kw})
    for k, plan in enumerate(_plans(steps)):
        trainer.meta_step(_tasks(seed=k, fout=fout), plan)
    trainer.check_finite()
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _official_read_dataset(data_dir):
    """openai/supervised-reptile ``omniglot.read_dataset``, as (alphabet, character) names."""
    for alphabet_name in sorted(os.listdir(data_dir)):
        alphabet_dir = os.path.join(data_dir, alphabet_name)
        if not os.path.isdir(alphabet_dir):
            continue
        for char_name in sorted(os.listdir(alphabet_dir)):
            if not char_name.startswith('character'):
                continue
            yield alphabet_name, char_name


def _official_split(data_dir, seed, num_train):
    """``random.seed(args.seed)``; ``split_dataset(read_dataset(DATA_DIR))`` (global state restored)."""
    state = random.getstate()
    try:
        random.seed(seed)
        all_data = list(_official_read_dataset(data_dir))
        random.shuffle(all_data)
        return all_data[:num_train], all_data[num_train:]
    finally:
        random.setstate(state)


# ====================================================================================== (a) bugs
def test_resume_of_an_official_split_run_with_another_test_source_keeps_its_characters(data, tmp_path, capsys):
    """Medium.  ``--split official`` pools ``--train`` and ``--test`` and shuffles the pool, so the
    split depends on the sources.  A resume refuses another ``--split``, ``--split-seed`` or
    ``--train-characters`` ("a resumed run would train and test on other characters", README
    "Resume"), but ``--resume DIR --test OTHER`` (or another ``--train``) is only a note ("--test
    ... overrides the checkpoint's ''"): the pool grows from 5 to 8 characters, the resumed run
    trains on other characters and -- worse -- its "held-out" test set holds characters the first
    part of the run trained on (here Alpha/character01 and Alpha/character03), so the reported
    test accuracy is silently contaminated.

    Expected: the resumed run keeps the checkpoint's split (the same test characters; a moved
    source that holds the same characters is fine), or the resume is refused naming --test before
    any work, as the other split flags are."""
    out = tmp_path / "run"
    assert main(["omniglot", "--train", data["train"], "--split", "official", "--train-characters", "3",
                 "--iterations", "1", "--checkpoint-every", "1", "--out", str(out)] + _TINY) == 0
    before = json.loads((out / "metrics.json").read_text())["test_character_names"]
    capsys.readouterr()
    rc = main(["omniglot", "--resume", str(out), "--test", data["test"], "--iterations", "2", "--no-progress"])
    err = capsys.readouterr().err
    if rc == 2:
        assert "--test" in err, err
        return
    assert rc == 0, err
    after = json.loads((out / "metrics.json").read_text())["test_character_names"]
    assert after == before, f"the resumed run tests on {after}, the run it continues held out {before}"


def test_split_flags_without_split_official_are_refused_by_name(data, tmp_path, capsys):
    """Low.  ``--split-seed`` and ``--train-characters`` only act with ``--split official``; given
    with the default ``--split alphabets`` they are accepted silently, do nothing, and are
    recorded in config.json (``"split_seed": 3, "train_characters": 4``) as if they had shaped the
    run.  The job refuses other meaningless combinations by name (README: bad values are refused
    by name; e.g. ``--test`` is required without --split official).

    Expected: exit 2 naming the flag (give --split official, or drop the flag) -- or at least a
    note; here: refusal, before any work."""
    out = tmp_path / "r"
    rc = main(["omniglot", "--train", data["train"], "--test", data["test"], "--split-seed", "3",
               "--iterations", "1", "--out", str(out)] + _TINY)
    err = capsys.readouterr().err
    assert rc == 2 and "--split-seed" in err, f"rc {rc}: {err[-400:]}"


def test_run_sine_callers_can_still_record_the_librarys_warnings(tmp_path, capsys):
    """Low.  ``train_job`` now swaps ``warnings.showwarning`` for the whole fit so the CLI prints
    the library's warnings as notes -- but ``train_job`` is also the body of the documented Python
    API ``run_sine``/``run_omniglot``.  A Python caller recording warnings
    (``warnings.catch_warnings(record=True)``, ``pytest.warns``, ``logging.captureWarnings``) no
    longer receives the library's resume warning: it is printed to stderr instead (the repository
    had to drop its own ``pytest.warns`` in test_review_qa47 for this), while other modules'
    warnings are still recorded.  ``run_omniglot(log=...)`` callers do not get it through their
    ``log`` either.

    Expected: Python's warnings machinery still sees the library's warning when it records (the
    note conversion done by the CLI, or only when showwarning is Python's own display)."""
    from reptile_fast.jobs import SineConfig, run_sine

    small = dict(eval_tasks=1, eval_steps=1, checkpoint_every=1, threads=1)
    run_sine(SineConfig(iterations=2, **small), tmp_path / "a", progress=False)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_sine(SineConfig(iterations=3, meta_batch_size=2, **small), tmp_path / "a", progress=False,
                 resume=tmp_path / "a")
    messages = [str(w.message) for w in caught]
    assert any("tasks per meta-step" in m for m in messages), \
        f"recorded: {messages}; printed instead: {capsys.readouterr().err[-300:]}"


class _KeepsDict(nn.Module):
    """Keeps its activations in a dict for plotting (what forward hooks usually fill)."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 2)
        self.acts = {}

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.acts["hidden"] = h
        return self.o(h)


class _PlainNet(_KeepsDict):
    def forward(self, x):
        return self.o(torch.tanh(self.a(x)))


def test_reference_runs_a_model_that_keeps_activations_in_a_dict():
    """Low-medium.  QA50's fix (``task_copy``) detaches the non-leaf tensors a forward left in a
    module's *direct* attributes; the same activation kept in a dict or list attribute
    (``self.acts["hidden"] = h``, the usual forward-hook pattern) still makes backend reference's
    per-task deep copy fail inside torch: "RuntimeError: Only Tensors created explicitly by the
    user (graph leaves) support the deepcopy protocol", after the trainer's own probe forward.
    Backend torch and "auto" run the model.

    Expected (README: reference is the oracle that runs anywhere; bad input is a
    ValueError/TypeError naming it, never an error from inside torch): reference gives the numbers
    of the same model without the attribute."""
    torch.manual_seed(0)
    keeps, plain = _KeepsDict(), _PlainNet()
    plain.load_state_dict(keeps.state_dict())
    expected = _train(plain, "reference")
    failure = None
    try:
        got = _train(keeps, "reference")
    except (ValueError, TypeError) as exc:
        assert "acts" in str(exc), exc  # refused by name would be acceptable
        return
    except Exception as exc:  # noqa: BLE001 - reported by type below
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if failure:
        pytest.fail(f"an error from inside torch: {failure}", pytrace=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _TiedView(nn.Module):
    """A decoder tied to the encoder through a view of its weight kept as an attribute."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 8, bias=False)
        self.dec_weight = self.enc.weight.view(8, 5)  # shares storage and autograd with enc.weight

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.dec_weight


class _TiedPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 8, bias=False)

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.enc.weight


def test_reference_does_not_silently_untie_a_parameter_view_attribute():
    """Low (an edge case).  ``task_copy`` detaches *every* non-leaf tensor attribute, not only
    stale activations: a view of a parameter kept as an attribute (weight tying written as
    ``self.dec_weight = self.enc.weight.view(...)``; plain PyTorch training follows it, the view
    shares the weight's storage and gradient) becomes, in each task's copy, a constant snapshot of
    φ: the inner loop no longer updates or differentiates the tied use.  Before session 22 backend
    reference (the seed's ``copy.deepcopy``) refused the model with torch's deepcopy error; now it
    silently trains other maths (φ 0.02 from the same model written with ``self.enc.weight``).

    Expected: reference runs the model's maths (those of ``_TiedPlain``), or refuses the attribute
    by name (a non-leaf tensor attribute that shares a parameter's storage is not an activation:
    ``task_copy`` can tell them apart)."""
    torch.manual_seed(0)
    view, plain = _TiedView(), _TiedPlain()
    plain.load_state_dict(view.state_dict())
    expected = _train(plain, "reference", fout=5)
    try:
        got = _train(view, "reference", fout=5)
    except (ValueError, TypeError) as exc:
        assert "dec_weight" in str(exc), exc
        return
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ====================================================================================== (b) verified
@pytest.mark.skipif(not (DATA / "images_background_small2.zip").exists(), reason="Omniglot small sets absent")
def test_official_split_of_the_real_small_sets_is_the_official_codes(tmp_path):
    """The two real background subsets (242 characters, 8 alphabets; Greek and Latin in both)
    read from their zips equal the official ``read_dataset`` on one folder of their alphabets
    (fetch_data.sh's layout: both sets' alphabets moved into data/omniglot), split by the official
    ``random.seed`` + ``split_dataset``, for several seeds."""
    zips = [DATA / "images_background_small1.zip", DATA / "images_background_small2.zip"]
    pooled = tmp_path / "omniglot"
    for z in zips:  # the folders alone: the official listing reads names, not images
        with zipfile.ZipFile(z) as zf:
            for name in zf.namelist():
                parts = [p for p in name.split("/") if p]
                if len(parts) >= 3 and parts[2].startswith("character"):
                    (pooled / parts[1] / parts[2]).mkdir(parents=True, exist_ok=True)
    chars = load_omniglot_images(zips, image_size=4).characters
    assert len(chars) == 242
    for seed in (0, 1, 7):
        assert official_character_split(chars, seed=seed, n_train=200) == _official_split(pooled, seed, 200)


def test_official_split_with_unusual_alphabet_names_is_the_official_codes(tmp_path):
    """Names whose order differs between "alphabet/character" strings and (alphabet, character)
    pairs ('-' and '(' sort before '/'), mixed case (upper case first) and a non-character folder:
    the split equals the official listing of the same folder."""
    names = {"Aurek": 2, "Aurek-Besh": 2, "Aurek_Besh": 1, "Malay_(Jawi_-_Arabic)": 2, "Malay": 1,
             "ULOG": 2, "ulog": 1, "N_Ko": 1}
    base = make_folder(tmp_path, names, images=2, prefix="omniglot")
    (base / "ULOG" / "notes").mkdir()  # not a character* folder: the official code skips it
    chars = load_omniglot_images([base], image_size=4).characters
    assert chars == list(_official_read_dataset(base))
    for seed in (0, 3):
        assert official_character_split(chars, seed=seed, n_train=7) == _official_split(base, seed, 7)


def test_a_source_given_twice_does_not_change_the_official_split(data, tmp_path):
    """``--train X --test X`` (or a zip and its extracted folder) pools the same characters once:
    the split is the official one of X alone, not one over duplicates."""
    once = load_omniglot_images([data["train"]], image_size=4).characters
    twice = load_omniglot_images([data["train"], data["train"]], image_size=4).characters
    assert once == twice
    assert official_character_split(twice, seed=2, n_train=3) == official_character_split(once, seed=2, n_train=3)


def test_validation_during_training_uses_the_official_test_characters(data, tmp_path, monkeypatch):
    """With --split official every episode drawn for validation (--validate-every) and for the final
    evaluation comes from the split's test characters (the official code's train() also evaluates
    on its test set), never from training characters."""
    drawn = []
    original = Omniglot.sample_episodes

    def spy(self, *a, **k):
        drawn.append(tuple(self.characters))
        return original(self, *a, **k)

    monkeypatch.setattr(Omniglot, "sample_episodes", spy)
    out = tmp_path / "v"
    args = list(_TINY)
    args[args.index("--validate-every") + 1] = "1"
    assert main(["omniglot", "--train", data["train"], "--test", data["test"], "--split", "official",
                 "--split-seed", "4", "--train-characters", "5", "--iterations", "2", "--out", str(out)] + args) == 0
    everything = load_omniglot_images([data["train"], data["test"]], image_size=4).characters
    _, test = official_character_split(everything, seed=4, n_train=5)
    assert len(drawn) >= 3  # two validations and the final test
    assert all(set(d) == set(test) for d in drawn), drawn
    assert len(json.loads((out / "validation.json").read_text())) == 2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend, kw", [("torch", {}), ("compiled", {}),
                                         ("reference", {"inner_optimizer": "adam", "adam_state": "carried"})],
                         ids=["torch", "compiled", "reference-carried"])
def test_the_librarys_own_operations_do_not_trip_the_model_change_checks(backend, kw, tmp_path):
    """No false positive of the new rename / requires_grad checks from the library itself: fit with
    checkpoints, evaluate, adapt, state_dict/load_state_dict, a checkpoint resume and
    ``model.requires_grad_(True)`` on a trainable model (with a weight_norm parametrization where
    the backend takes one) leave the structure key as built, and the next meta-step runs."""
    from torch.nn.utils import parametrizations

    from reptile_fast.tasks import Sine

    torch.manual_seed(0)
    middle = nn.Linear(8, 8) if backend == "compiled" else parametrizations.weight_norm(nn.Linear(8, 8))
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), middle, nn.Tanh(), nn.Linear(8, 1))
    trainer = Reptile(model, backend=backend, inner_steps=2, inner_batch_size=5, **kw)
    built = structure_key(model)
    trainer.fit(Sine(), iterations=2, meta_batch_size=2, generator=torch.Generator().manual_seed(0),
                checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    g = torch.Generator().manual_seed(1)
    tasks = Sine().sample(2, generator=g)
    trainer.evaluate(tasks, 2)
    trainer.adapt(tasks, 2)
    trainer.load_state_dict(copy.deepcopy(trainer.state_dict()))
    model.requires_grad_(True)
    assert structure_key(model) == built
    trainer.fit(Sine(), iterations=3, meta_batch_size=2, generator=torch.Generator().manual_seed(0),
                checkpoint_dir=tmp_path, resume_from=tmp_path, progress=False)
    assert structure_key(model) == built and trainer.iteration == 3
    trainer.meta_step(Sine().sample(2, generator=g))
    trainer.check_finite()


def test_library_warnings_become_notes_from_any_install_path_and_on_rank_0_only(tmp_path, capsys, monkeypatch):
    """The CLI's filename test (``library_warnings_as_notes``) holds for a site-packages install and a zipped package (the
    parent folder is named reptile_fast either way); other ranks print nothing; a warning from a
    folder merely containing the name (``reptile_fast_extra``) keeps Python's display."""
    from reptile_fast import jobs

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(str(a[0])))
    paths = ["/usr/lib/python3/site-packages/reptile_fast/trainer.py", "/x/dist.zip/reptile_fast/callbacks.py",
             "/x/reptile_fast_extra/mod.py"]

    # (after this review the swap moved from train_job to the command line's
    # jobs.library_warnings_as_notes, so Python callers of run_sine keep the warnings)
    for is_main in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with jobs.library_warnings_as_notes(is_main):
                for i, p in enumerate(paths):
                    warnings.warn_explicit(f"w{i}", UserWarning, p, 1)
        err = capsys.readouterr().err
        assert ("note: w0" in err and "note: w1" in err) == is_main and "w2" not in err
    assert shown == ["w2", "w2"]
