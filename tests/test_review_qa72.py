"""QA72 (session 25): the jobs' folders and the runs that write them.

* Two runs saving into one checkpoint folder replaced each other's checkpoints (a ``--resume``
  continued whichever saved last), and a run starting there deleted the other's save in flight
  as a stale temporary.  ``fit`` now holds the folder (``checkpoint.directory_lock``, a ``flock``);
  a second run is refused with ``DirectoryInUseError`` naming the first's pid.
* ``--resume B/a_step3.pt`` (another run's checkpoint kept in B's folder) replaced B's run without
  the note a ``--resume A --out B`` gets.
* A new omniglot run left an earlier run's ``validation.json``: a later ``--resume`` read its points
  as its own, and a run that validated nothing listed it as written.  It is moved aside to
  ``validation.prev.json``.
* The printed "Resume with: … --resume OUT" commands were not shell-quoted.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import reptile_fast.checkpoint as ckpt_mod
from _fake_omniglot import job_data
from reptile_fast import MLP, Reptile, Sine
from reptile_fast.checkpoint import LOCK_NAME, DirectoryInUseError, load_checkpoint
from reptile_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "4", "--hidden-dim", "8", "--eval-tasks", "2", "--eval-steps", "2",
        "--checkpoint-every", "1", "--threads", "1", "--no-progress", "--backend", "torch"]


def _long_job(out, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "reptile_fast", "sine", "--iterations", "1000000", "--seed", "1",
                             "--checkpoint-every", "20", "--backend", "torch", "--hidden-dim", "8", "--threads", "1",
                             "--no-progress", "--out", str(out), *extra], env=env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out, proc):
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (out / "checkpoint.pt").exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"


def test_a_second_job_into_the_out_of_a_running_job_is_refused_and_the_printed_hint_is_quoted(tmp_path, capsys):
    out = tmp_path / "my runs" / "sine 1"
    a = _long_job(out)
    try:
        _wait_for_checkpoint(out, a)
        rc = main(["sine", "--iterations", "20", "--seed", "2", "--checkpoint-every", "1", "--backend", "torch",
                   "--hidden-dim", "8", "--eval-tasks", "2", "--eval-steps", "2", "--threads", "1",
                   "--no-progress", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc != 0 and "is in use by another run (pid" in err, err
        a.send_signal(signal.SIGINT)  # job A stops and writes its checkpoint
        _, a_err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert load_checkpoint(out)["extra"]["job_config"]["seed"] == 1  # A's run, whole
    assert not (out / LOCK_NAME).exists()  # released with the run
    line = next(line for line in a_err.splitlines() if line.startswith("Resume with: "))
    argv = shlex.split(line[len("Resume with: "):])  # what a shell makes of the pasted command
    assert argv[:2] == ["reptile-fast", "sine"] and argv[argv.index("--resume") + 1] == str(out), line


def test_a_fit_starting_in_a_folder_another_fit_holds_is_refused_and_the_save_in_flight_completes(tmp_path,
                                                                                                   monkeypatch):
    d = tmp_path / "ckpt"
    torch.manual_seed(0)
    a = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=2, inner_batch_size=5)
    b = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=2, inner_batch_size=5)
    real_save = torch.save
    refused = []

    def save_while_another_fit_starts(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if not refused and getattr(f, "name", None) is not None:
            with pytest.raises(DirectoryInUseError, match=f"is in use by another run \\(pid {os.getpid()}\\)"):
                b.fit(Sine(), 1, generator=torch.Generator().manual_seed(2), checkpoint_dir=d, progress=False)
            refused.append(True)

    monkeypatch.setattr(ckpt_mod.torch, "save", save_while_another_fit_starts)
    a.fit(Sine(), 2, generator=torch.Generator().manual_seed(1), checkpoint_dir=d, progress=False)
    assert refused and b.iteration == 0
    assert load_checkpoint(d)["trainer"]["iteration"] == 2
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.pt"]  # no temporary, no lock left


def test_resuming_a_file_kept_in_another_runs_folder_says_it_replaces_that_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["sine", *TINY, "--seed", "1", "--out", str(a)]) == 0
    assert main(["sine", *TINY, "--seed", "2", "--out", str(b)]) == 0
    shutil.copy(a / "checkpoint.prev.pt", b / "a_step3.pt")  # run A's meta-step-3 checkpoint, kept in B
    capsys.readouterr()
    assert main(["sine", "--resume", str(b / "a_step3.pt"), "--iterations", "6", "--no-progress"]) == 0
    assert "already holds a checkpoint of another run" in capsys.readouterr().err
    # resuming the folder's own checkpoints says nothing of the kind
    assert main(["sine", "--resume", str(b), "--iterations", "7", "--no-progress"]) == 0
    assert main(["sine", "--resume", str(b / "checkpoint.prev.pt"), "--iterations", "8", "--no-progress"]) == 0
    assert "another run" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def omniglot_data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("qa72_omni"))


def _omniglot(data, out, *extra):
    return ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "2", "--eval-tasks", "3", "--validation-tasks", "2",
            "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def test_a_resumed_run_never_takes_an_earlier_runs_validation_points(omniglot_data, tmp_path, capsys):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(_omniglot(omniglot_data, out, "--seed", "1", "--iterations", "4", "--validate-every", "2")) == 0
    first = (out / "validation.json").read_text()
    assert main(_omniglot(omniglot_data, out, "--seed", "2", "--iterations", "2", "--validate-every", "4")) == 0
    assert (out / "validation.prev.json").read_text() == first  # run 1's points, kept beside
    assert main(["omniglot", "--resume", str(out), "--iterations", "4", "--no-progress"]) == 0
    assert main(_omniglot(omniglot_data, fresh, "--seed", "2", "--iterations", "4", "--validate-every", "4")) == 0
    resumed = json.loads((out / "validation.json").read_text())
    uninterrupted = json.loads((fresh / "validation.json").read_text())
    assert [v["iteration"] for v in resumed] == [v["iteration"] for v in uninterrupted] == [4]


def test_a_new_run_that_validates_nothing_does_not_claim_an_old_validation_json(omniglot_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_omniglot(omniglot_data, out, "--seed", "1", "--iterations", "2", "--validate-every", "2")) == 0
    capsys.readouterr()
    assert main(_omniglot(omniglot_data, out, "--seed", "2", "--iterations", "2", "--validate-every", "0")) == 0
    err = capsys.readouterr().err
    assert not (out / "validation.json").exists() and "validation.json" not in err.splitlines()[-1]
