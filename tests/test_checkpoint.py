"""Checkpoints: atomic writes, what is stored, safe and checked loading, RNG round trips."""
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, Sine
from reptile_fast.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, atomic_torch_save,
                                     atomic_write_text, capture_rng_state, load_checkpoint,
                                     restore_checkpoint, restore_rng_state, save_checkpoint)


def trained(iterations=3, *, outer_optimizer=False, seed=0):
    torch.manual_seed(seed)
    model = MLP(1, 16, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if outer_optimizer else None
    trainer = Reptile(model, backend="reference", outer_optimizer=opt)
    gen = torch.Generator().manual_seed(seed)
    trainer.fit(Sine(), iterations, meta_batch_size=2, generator=gen, progress=False)
    return trainer, gen


# ------------------------------------------------------------------ atomic writes
def test_atomic_write_failure_keeps_old_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    def bad_save(obj, f):
        f.write(b"partial bytes")
        raise Boom()

    from reptile_fast import checkpoint

    with pytest.raises(Boom):
        checkpoint._atomic_write(target, lambda f: bad_save(None, f))
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_crash_while_writing_a_checkpoint_keeps_the_latest_loadable(tmp_path, monkeypatch):
    trainer, gen = trained(2)
    save_checkpoint(tmp_path, trainer, generator=gen)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # the process "dies" with half a file written
        raise KeyboardInterrupt

    trainer.fit(Sine(), 3, meta_batch_size=2, generator=gen, progress=False)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, trainer, generator=gen)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_previous_checkpoint_is_kept(tmp_path):
    trainer, gen = trained(2)
    save_checkpoint(tmp_path, trainer, generator=gen)
    assert not (tmp_path / PREVIOUS_NAME).exists()
    trainer.fit(Sine(), 4, meta_batch_size=2, generator=gen, progress=False)
    save_checkpoint(tmp_path, trainer, generator=gen)
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 4
    assert load_checkpoint(tmp_path / PREVIOUS_NAME)["trainer"]["iteration"] == 2


def test_atomic_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


# ------------------------------------------------------------------ contents
def test_checkpoint_holds_everything_and_loads_with_weights_only(tmp_path):
    trainer, gen = trained(3, outer_optimizer=True)
    path = save_checkpoint(tmp_path, trainer, generator=gen, history={"loss": [1.0, 0.5, 0.25]},
                           extra={"job": "x", "n": 3, "nested": {"l": [1, 2.5, None]}})
    raw = torch.load(path, weights_only=True)  # plain torch can read it, safely
    assert raw["format"] == "reptile_fast.checkpoint"
    ck = load_checkpoint(tmp_path)
    t = ck["trainer"]
    assert t["iteration"] == 3 and t["total_iterations"] == 3
    assert set(t["model"]) == set(trainer.model.state_dict())
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(t["model"][k], v)
    assert t["outer_optimizer"]["state"], "Adam moments are stored"
    assert t["config"]["inner_lr"] == 0.02 and t["config"]["loss"] == "mse"
    assert torch.equal(ck["rng"]["generator"]["state"], gen.get_state())
    assert set(ck["rng"]) == {"torch", "cuda", "numpy", "python", "generator"}
    assert ck["history"]["loss"].tolist() == [1.0, 0.5, 0.25]
    assert ck["extra"] == {"job": "x", "n": 3, "nested": {"l": [1, 2.5, None]}}


def test_unloadable_extra_is_refused_before_writing(tmp_path):
    trainer, gen = trained(1)
    with pytest.raises(TypeError, match=r"extra.*object"):
        save_checkpoint(tmp_path, trainer, extra={"bad": object()})
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_parameters_holding_nan_are_never_written(tmp_path):
    """The README: a checkpoint is never written from parameters holding NaN/inf (load refuses
    them anyway, so such a file could only replace the last good one)."""
    trainer, gen = trained(1)
    save_checkpoint(tmp_path, trainer, generator=gen)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        trainer.model.network[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"network\.2\.weight.*NaN or inf"):
        save_checkpoint(tmp_path, trainer, generator=gen)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


def test_rng_states_round_trip():
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    state = capture_rng_state(gen)
    expected = (torch.rand(4), torch.rand(4, generator=gen), np.random.rand(3), random.random(),
                random.gauss(0, 1))
    torch.manual_seed(123), np.random.seed(7), random.seed(9), gen.manual_seed(1)
    restore_rng_state(state, gen)
    got = (torch.rand(4), torch.rand(4, generator=gen), np.random.rand(3), random.random(),
           random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert np.array_equal(got[2], expected[2]) and got[3:] == expected[3:]


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("count", torch.zeros(2))

    def forward(self, x):
        return self.lin(x)


def test_state_dict_round_trip_includes_buffers_and_optimizer():
    torch.manual_seed(0)
    m1 = WithBuffer()
    t1 = Reptile(m1, backend="reference", outer_optimizer=torch.optim.Adam(m1.parameters(), lr=0.01))
    t1.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False)
    m1.count += 3
    m2 = WithBuffer()
    t2 = Reptile(m2, backend="reference", outer_optimizer=torch.optim.Adam(m2.parameters(), lr=0.01))
    t2.load_state_dict(t1.state_dict())
    assert t2.iteration == 2 and t2.total_iterations == 2
    for k, v in m1.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    s1, s2 = t1.outer_optimizer.state_dict(), t2.outer_optimizer.state_dict()
    for i in s1["state"]:
        assert torch.equal(s1["state"][i]["exp_avg"], s2["state"][i]["exp_avg"])


def test_changed_hyper_parameters_warn_on_load():
    trainer, _ = trained(1)
    other = Reptile(MLP(1, 16, 1), backend="reference", inner_lr=0.01)
    with pytest.warns(UserWarning, match="inner_lr"):
        other.load_state_dict(trainer.state_dict())


def test_restore_checkpoint_checks_before_changing_anything(tmp_path):
    trainer, gen = trained(2)
    save_checkpoint(tmp_path, trainer, generator=gen)
    fresh = Reptile(MLP(1, 16, 1), backend="reference")
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match="generator"):
        restore_checkpoint(fresh, tmp_path, generator=None)
    assert fresh.iteration == 0
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------ damaged and foreign files
@pytest.fixture
def good_checkpoint(tmp_path):
    trainer, gen = trained(2)
    return save_checkpoint(tmp_path / "run", trainer, generator=gen)


def test_truncated_checkpoint_is_reported(good_checkpoint):
    data = good_checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        good_checkpoint.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"checkpoint .*checkpoint\.pt .*(truncated|corrupted)"):
            load_checkpoint(good_checkpoint)


def test_bit_flip_in_tensor_data_is_detected(good_checkpoint):
    from _checkpoint_files import flip_a_data_bit

    flip_a_data_bit(good_checkpoint)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(good_checkpoint)


def test_empty_checkpoint(good_checkpoint):
    good_checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_checkpoint(good_checkpoint)


def test_code_carrying_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "reptile_fast.checkpoint", "x": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, words", [
    (lambda p: p.write_text("hello, I am a text file\n"), "not a torch checkpoint archive"),
    (lambda p: torch.save(torch.ones(3), p), "holds a Tensor"),
    (lambda p: torch.save({"state_dict": MLP().state_dict(), "config": {}}, p), "model.pt holds only"),
    (lambda p: torch.save({"format": "reptile_fast.checkpoint", "version": 99}, p), "version 99"),
    (lambda p: torch.save({"format": "reptile_fast.checkpoint", "version": 1}, p), "missing 'trainer'"),
])
def test_foreign_files_are_named(tmp_path, content, words):
    path = tmp_path / "foreign.pt"
    content(path)
    with pytest.raises(ValueError, match=words) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path)


def test_damaged_latest_points_to_the_previous_checkpoint(tmp_path):
    trainer, gen = trained(1)
    save_checkpoint(tmp_path, trainer, generator=gen)
    path = save_checkpoint(tmp_path, trainer, generator=gen)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"the previous checkpoint .*checkpoint\.prev\.pt may be intact"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / PREVIOUS_NAME)["trainer"]["iteration"] == 1


def test_fit_removes_temporaries_of_a_killed_writer(tmp_path):
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    trainer = Reptile(MLP(1, 8, 1), backend="reference")
    trainer.fit(Sine(), 1, progress=False, checkpoint_dir=tmp_path)
    assert not stale.exists() and keep.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.txt"]


# ------------------------------------------------------------------ odd checkpoint directories
@pytest.mark.parametrize("name", [CHECKPOINT_NAME, PREVIOUS_NAME])
def test_a_directory_in_place_of_a_checkpoint_file_is_refused_before_training(tmp_path, name):
    """A directory named checkpoint.pt or checkpoint.prev.pt made the first save (after training up
    to it) fail with a bare IsADirectoryError from shutil."""
    (tmp_path / name).mkdir()
    trainer = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=1, inner_batch_size=5)
    steps = []
    with pytest.raises(IsADirectoryError, match=f"{name} there is not a regular file"):
        trainer.fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path,
                    checkpoint_every=1, callback=lambda i, m: steps.append(i))
    assert steps == [] and trainer.iteration == 0
    with pytest.raises(IsADirectoryError, match=f"{name} there is not a regular file"):
        save_checkpoint(tmp_path, trainer)


def test_a_dangling_symlink_as_checkpoint_dir_is_named(tmp_path):
    """It was reported as "a parent is a file, not a directory"."""
    os.symlink(tmp_path / "missing", tmp_path / "link")
    trainer = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=1, inner_batch_size=5)
    with pytest.raises(NotADirectoryError, match="is a symbolic link to .*missing, which does not exist"):
        trainer.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False,
                    checkpoint_dir=tmp_path / "link")


def test_json_outputs_are_strict_json_with_null_for_nonfinite(tmp_path):
    """A diverged evaluation's NaN metric is written as null: strict JSON readers refuse NaN tokens."""
    import json
    import math

    from reptile_fast.checkpoint import atomic_write_json

    path = atomic_write_json(tmp_path / "metrics.json", {"mse": float("nan"), "per_k": [1.5, float("inf")],
                                                        "nested": {"x": -math.inf, "ok": 2.0}, "n": 3})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}")) == {
        "mse": None, "per_k": [1.5, None], "nested": {"x": None, "ok": 2.0}, "n": 3}


def test_a_new_fit_into_a_folder_holding_another_runs_checkpoint_warns(tmp_path):
    """Nothing a user wrote is lost without a word: a fresh ``fit`` (meta-step 0, no resume_from)
    given a checkpoint_dir that holds another run's checkpoint replaced it silently (after two saves
    neither checkpoint.pt nor checkpoint.prev.pt was left).  Continuing the same trainer, resuming,
    or an empty folder do not warn; the CLI jobs print their own note instead."""
    import warnings

    from reptile_fast.checkpoint import CheckpointReplacedWarning

    def fresh():
        torch.manual_seed(0)
        return Reptile(MLP(1, 8, 1), backend="reference")

    first = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointReplacedWarning)  # an empty folder: no warning
        first.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)
        # the same trainer going on (meta-step 2 onwards) continues its own run
        first.fit(Sine(), 3, generator=torch.Generator().manual_seed(1), progress=False, checkpoint_dir=tmp_path)
        fresh().fit(Sine(), 4, generator=torch.Generator(), progress=False, checkpoint_dir=tmp_path,
                    resume_from=tmp_path)
    with pytest.warns(CheckpointReplacedWarning, match="already holds a checkpoint.*resume_from="):
        fresh().fit(Sine(), 1, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)


def test_the_sine_job_notes_a_replaced_checkpoint_once(tmp_path, capsys):
    """The CLI job prints its note; fit's warning is not shown as well."""
    import warnings

    from reptile_fast.cli import main

    args = ["sine", "--iterations", "2", "--backend", "reference", "--out", str(tmp_path), "--no-progress",
            "--eval-tasks", "2"]
    assert main(args) == 0
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert capsys.readouterr().err.count("already holds a checkpoint") == 1
    assert not [w for w in record if "already holds a checkpoint" in str(w.message)]


def test_prepare_directory_makes_a_parent_again_that_another_job_removed(tmp_path, monkeypatch):
    """Two jobs making runs/a and runs/b, runs new: the one stopped early removes the empty runs
    it counted as its own (``removed_if_left_empty``) between the other's ``mkdir`` of runs and
    of runs/b, whose ``Path.mkdir(parents=True)`` then raised FileNotFoundError."""
    from pathlib import Path

    from reptile_fast.checkpoint import prepare_directory

    real, calls = Path.mkdir, []

    def raced(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 1:  # what the second os.mkdir inside Path.mkdir raises in that race
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", raced)
    out = prepare_directory(tmp_path / "runs" / "b", "--out")
    assert out.is_dir() and calls[0] == calls[1] == out  # tried again after the race
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(
        FileNotFoundError(2, "No such file or directory", str(self))))
    with pytest.raises(OSError, match="cannot create --out .*c: No such file or directory"):
        prepare_directory(tmp_path / "runs" / "c", "--out")  # not forever: three tries
