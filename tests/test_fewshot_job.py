"""`reptile-fast omniglot` and `reptile-fast omniglot-runs` end to end on a tiny fake Omniglot."""
from __future__ import annotations

import json

import pytest
import torch

from _fake_omniglot import make_folder, make_runs, make_zip
from reptile_fast.cli import build_parser, main
from reptile_fast.fewshot_job import OmniglotConfig, config_from_args, omniglot_preset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_job")
    train = make_zip(make_folder(root / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1"),
                     root / "small1.zip")
    test = make_folder(root / "b", {"Beta": 2, "Gamma": 3}, prefix="images_background_small2")
    return {"train": str(train), "test": str(test), "root": root}


def tiny_args(data, out, *extra):
    return ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "2", "--eval-tasks", "3", "--validation-tasks", "2", "--validate-every", "2",
            "--iterations", "4", "--checkpoint-every", "2", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(data):
    out = data["root"] / "run"
    assert main(tiny_args(data, out)) == 0
    return out


def test_job_writes_its_outputs(trained, capsys):
    for name in ("metrics.json", "config.json", "model.pt", "learning_curve.png", "checkpoint.pt",
                 "validation.json"):
        assert (trained / name).is_file(), name
    m = json.loads((trained / "metrics.json").read_text())
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy_ci95"] >= 0.0
    assert m["train_alphabets"] == ["Alpha", "Beta"]
    assert m["test_alphabets"] == ["Gamma"]  # Beta is in both: removed from the test set
    assert m["train_classes"] == 5 * 4  # 90° rotations as extra classes
    assert m["train_seconds"] > 0 and m["results"][0]["n_tasks"] == 3
    assert [v["iteration"] for v in json.loads((trained / "validation.json").read_text())] == [2, 4]
    saved = torch.load(trained / "model.pt", weights_only=True)
    assert saved["ways"] == 3 and saved["model"] == "OmniglotConvNet"


def test_resume_is_exact(data, trained, tmp_path):
    # continue from the meta-step-2 checkpoint the first run left behind, in a fresh folder
    assert main(["omniglot", "--resume", str(trained / "checkpoint.prev.pt"), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    a = torch.load(trained / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((trained / "metrics.json").read_text())
    mb = json.loads((tmp_path / "metrics.json").read_text())
    assert mb["resumed_from_iteration"] == 2 and mb["test_accuracy"] == ma["test_accuracy"]


def test_resume_with_other_ways_names_the_flag(trained, tmp_path, capsys):
    """The model's classifier has one output per way: --resume with another --ways failed with
    "saved model entry classifier.weight has shape ..."; now the flag and both counts are named."""
    assert main(["omniglot", "--resume", str(trained), "--ways", "4", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--ways 4" in err and "trained for 3-way tasks" in err and "classifier.weight" not in err


def test_resume_names_the_flags_that_override_the_checkpoint(trained, tmp_path, capsys):
    """As the sine job does: a flag given with --resume that differs from the stored setting is
    named on stderr (the run then differs from an uninterrupted one)."""
    assert main(["omniglot", "--resume", str(trained / "checkpoint.prev.pt"), "--out", str(tmp_path),
                 "--eval-steps", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: --eval-steps 3 overrides the checkpoint's 2" in err


def test_official_runs_command(data, trained, tmp_path, capsys):
    runs = make_runs(tmp_path, n_runs=2, ways=3)
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(trained), "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "runs_metrics.json").read_text())
    assert sorted(m["per_run_error"]) == ["run01", "run02"]
    assert m["error_rate"] == pytest.approx(sum(m["per_run_error"].values()) / 2)
    other = make_runs(tmp_path / "four", n_runs=1, ways=4)
    capsys.readouterr()
    assert main(["omniglot-runs", "--runs", str(other), "--model", str(trained)]) == 2
    assert "trained for 3-way tasks" in capsys.readouterr().err
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(tmp_path / "none")]) == 2


def test_official_runs_command_names_an_output_that_is_a_file(data, trained, tmp_path, capsys):
    """--out pointing at a file failed with a bare "[Errno 17] File exists", and only after the
    whole evaluation; the omniglot job says what is wrong before any work."""
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(trained), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "output directory" in err and "afile" in err and "not a directory" in err, err
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(trained), "--out",
                 str(tmp_path / "afile" / "sub")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_defaults_are_the_papers_protocol(data):
    parser = build_parser()
    five, _, _ = config_from_args(parser.parse_args(["omniglot", "--train", "x", "--test", "y"]))
    assert (five.ways, five.inner_lr, five.inner_batch_size, five.inner_steps, five.train_shots,
            five.meta_batch_size, five.outer_lr, five.outer_lr_final, five.iterations, five.eval_steps,
            five.eval_batch_size, five.transductive, five.minibatches) == \
        (5, 1e-3, 10, 5, 10, 5, 1.0, 0.0, 100000, 50, 5, False, "epochs")
    twenty, _, _ = config_from_args(parser.parse_args(["omniglot", "--train", "x", "--test", "y", "--ways", "20"]))
    assert (twenty.inner_batch_size, twenty.inner_steps, twenty.inner_lr, twenty.iterations,
            twenty.eval_batch_size, twenty.minibatches) == (20, 10, 5e-4, 200000, 10, "epochs")
    flagged, _, _ = config_from_args(parser.parse_args(["omniglot", "--train", "x", "--test", "y", "--ways", "20",
                                                        "--inner-lr", "0.01", "--transductive"]))
    assert flagged.inner_lr == 0.01 and flagged.transductive and flagged.inner_steps == 10
    assert omniglot_preset(5)["iterations"] == 100000


def test_bad_input(data, tmp_path, capsys):
    assert main(["omniglot", "--train", data["train"], "--out", str(tmp_path)]) == 2
    assert "--test" in capsys.readouterr().err
    # every test alphabet also trained on
    assert main(tiny_args(data, tmp_path, "--test", data["train"])) == 2
    assert "nothing is left to test on" in capsys.readouterr().err
    assert main(tiny_args(data, tmp_path, "--eval-batch-size", "9")) == 2
    assert "--eval-batch-size 9 exceeds" in capsys.readouterr().err  # the flag, in the CLI's words
    assert main(tiny_args(data, tmp_path, "--device", "tpu")) == 2
    assert main(["omniglot", "--resume", str(tmp_path / "nothing")]) == 2
    with pytest.raises(SystemExit):
        main(["omniglot", "--ways", "0"])
    with pytest.raises(ValueError, match="train"):
        OmniglotConfig(train=[], test="y")
    with pytest.raises(ValueError, match="inner_batch_size"):
        OmniglotConfig(train=["x"], test="y", inner_batch_size=51)
    # validation and test episodes are drawn from seeds derived from it: 2**64 failed mid-training
    with pytest.raises(ValueError, match="seed must be < 2..32"):
        OmniglotConfig(train=["x"], test="y", seed=2 ** 64)
    with pytest.raises(ValueError, match="seed must be < 2..32"):  # it would train what seed 0 trains (QA67)
        OmniglotConfig(train=["x"], test="y", seed=2 ** 32)


def test_every_output_is_written_atomically(data, tmp_path, monkeypatch):
    """The learning curve too lands through a rename of a finished temporary file."""
    import os

    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.path.basename(dst)),
                                                          real_replace(src, dst))[1])
    out = tmp_path / "run"
    assert main(tiny_args(data, out)) == 0
    written = {p.name for p in out.iterdir()}
    assert "learning_curve.png" in written and written <= set(renamed), sorted(written - set(renamed))


def test_the_last_line_names_only_the_files_written(data, tmp_path, capsys):
    """Without validation (--validate-every 0) no validation.json is written, and the job's last
    line does not claim one."""
    out = tmp_path / "novalidation"
    args = tiny_args(data, out)
    args[args.index("--validate-every") + 1] = "0"
    capsys.readouterr()
    assert main(args) == 0
    assert not (out / "validation.json").exists()
    captured = capsys.readouterr()
    last = next(l for l in (captured.out + captured.err).splitlines() if l.startswith("wrote "))
    assert last.startswith("wrote metrics.json") and "checkpoint.pt" in last and "validation.json" not in last, last


def test_run_omniglot_names_a_bad_device(data, tmp_path, monkeypatch):
    """From Python (the CLI checked it), a bad device failed with torch's RuntimeError ("Expected
    one of cpu, cuda, ipu, ..." / "Found no NVIDIA driver") after the data was read."""
    from reptile_fast.fewshot_job import run_omniglot

    def config(device):
        return OmniglotConfig(train=[data["train"]], test=data["test"], ways=3, train_shots=2,
                              inner_batch_size=3, eval_batch_size=3, iterations=1, device=device)

    with pytest.raises(ValueError, match="device: unknown device 'tpu0'"):
        run_omniglot(config("tpu0"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="device meta: the omniglot job runs on cpu or cuda"):
        run_omniglot(config("meta"), tmp_path / "b", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda: CUDA is not available"):
        run_omniglot(config("cuda"), tmp_path / "c", progress=False)


def test_a_job_stopped_by_a_bad_data_path_leaves_no_empty_out(data, tmp_path, capsys):
    """A mistyped --train made --out (and its missing parents) before the data was read, and the
    error left them behind empty; a folder that existed, and whatever is in it, stays."""
    missing = str(tmp_path / "no-such-omniglot")
    out = tmp_path / "new" / "run"
    args = tiny_args(data, out)
    args[args.index("--train") + 1] = missing
    assert main(args) == 2
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(args[:-1] + [str(kept / "run")]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    args[-1] = str(kept)
    assert main(args) == 2
    assert (kept / "notes.txt").read_text() == "mine"  # an existing --out is never removed
    runs_out = tmp_path / "runs-out"
    assert main(["omniglot-runs", "--runs", missing, "--model", str(tmp_path / "no-model"),
                 "--out", str(runs_out)]) == 2
    assert not runs_out.exists()


def test_removed_if_left_empty_removes_only_what_it_made_and_left_empty(tmp_path):
    from reptile_fast.checkpoint import prepare_directory, removed_if_left_empty

    with pytest.raises(KeyError):
        with removed_if_left_empty(tmp_path / "a" / "b"):
            prepare_directory(tmp_path / "a" / "b")
            raise KeyError("stop")
    assert sorted(tmp_path.iterdir()) == []
    with pytest.raises(KeyError):
        with removed_if_left_empty(tmp_path / "c" / "d"):
            prepare_directory(tmp_path / "c" / "d")
            (tmp_path / "c" / "d" / "checkpoint.pt").write_bytes(b"x")
            raise KeyError("stop")
    assert (tmp_path / "c" / "d" / "checkpoint.pt").exists()  # written: kept with its parents
    with removed_if_left_empty(tmp_path / "e"):
        prepare_directory(tmp_path / "e")
    assert (tmp_path / "e").is_dir()  # no error: kept even while empty
