"""Review QA80: the few-shot part against the paper's protocol and the official code.

* A resume with another ``--train`` (alphabet split) tested on alphabets the checkpoint's run had
  trained on, as "held-out alphabets", and ``metrics.json`` listed only the new training alphabets.
"""
from __future__ import annotations

import json

import pytest
import torch

from _fake_omniglot import job_data
from reptile_fast.checkpoint import load_checkpoint
from reptile_fast.cli import main


@pytest.fixture(scope="module")
def omniglot_data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("qa80_omni"))


def _omniglot(train, test, out, *extra):
    return ["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "2", "--eval-tasks", "3", "--validate-every", "0",
            "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def test_a_resume_never_tests_on_alphabets_the_checkpoints_run_trained_on(omniglot_data, tmp_path, capsys):
    out = tmp_path / "out"
    # trained on Gamma (the test folder), tested on Alpha and Beta
    assert main(_omniglot(omniglot_data["test"], omniglot_data["train"], out, "--iterations", "2")) == 0
    assert load_checkpoint(out / "checkpoint.pt")["extra"]["trained_alphabets"] == ["Gamma"]
    before = torch.load(out / "checkpoint.pt", weights_only=False)
    capsys.readouterr()
    # the data swapped on resume: Gamma, trained on for 2 meta-steps, would be the "held-out" test set
    code = main(["omniglot", "--resume", str(out), "--train", omniglot_data["train"], "--test",
                 omniglot_data["test"], "--iterations", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "trained on the alphabets ['Gamma']" in err and "--test" in err
    after = torch.load(out / "checkpoint.pt", weights_only=False)
    assert after["trainer"]["iteration"] == before["trainer"]["iteration"] == 2  # nothing trained


def test_a_resume_with_more_training_alphabets_lists_every_alphabet_the_model_trained_on(omniglot_data, tmp_path):
    from _fake_omniglot import make_folder

    extra = make_folder(tmp_path / "extra", {"Delta": 3}, prefix="images_background_extra")
    out = tmp_path / "out"
    assert main(_omniglot(extra, omniglot_data["test"], out, "--iterations", "2")) == 0
    # resumed on other training alphabets (Delta dropped, Alpha and Beta added), the same test set
    assert main(["omniglot", "--resume", str(out), "--train", omniglot_data["train"], "--iterations", "4",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_alphabets"] == ["Alpha", "Beta", "Delta"]
    assert metrics["test_alphabets"] == ["Gamma"]
    assert load_checkpoint(out / "checkpoint.pt")["extra"]["trained_alphabets"] == ["Alpha", "Beta", "Delta"]
