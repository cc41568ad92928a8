"""QA82: the command line under hostile input (huge sizes on the compiled path, empty paths, a
stray RANK in the environment)."""
from __future__ import annotations

import json

import pytest
import torch

from _fake_omniglot import make_folder, make_runs
from reptile_fast.cli import main
from reptile_fast.compiled_step import MetaStepProgram
from reptile_fast.mlp_spec import extract_mlp_spec
from reptile_fast.models import MLP


@pytest.mark.parametrize("flag", ["--inner-steps", "--meta-batch-size"])
@pytest.mark.parametrize("value", [2 ** 63 - 1, 10 ** 30])
def test_a_size_beyond_64_bits_on_the_compiled_path_is_a_usage_error_naming_the_flag(tmp_path, capsys, monkeypatch,
                                                                                     flag, value):
    # the default backend (auto: compiled on the CPU) failed with a RuntimeError traceback
    # ("no meta-step mode could run: ... Storage size calculation overflowed"); the job's memory
    # check (QA77) refuses these sizes first where /proc/meminfo is read: without it (another OS)
    # the compiled path's own check must
    from reptile_fast import jobs

    monkeypatch.setattr(jobs, "available_memory", lambda: None)
    code = main(["sine", "--iterations", "2", "--eval-tasks", "2", "--eval-steps", "1", "--no-progress",
                 flag, str(value), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and f"{flag} {value}" in err and "64-bit" in err
    assert not (tmp_path / "out").exists()  # nothing written, no empty --out left behind


def test_the_compiled_program_refuses_sizes_beyond_64_bits_before_building():
    spec = extract_mlp_spec(MLP(1, 8, 1))
    program = MetaStepProgram(spec, lr=0.01, loss="mse", steps=2 ** 62, n_tasks=1, batch=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="inner_steps=4611686018427387904 .* 64-bit size"):
        program.prepare()


def test_an_empty_train_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, capsys):
    # `--train "$OMNIGLOT"` with the variable unset trained on the current folder, and config.json
    # recorded "" (a --resume elsewhere would read another folder)
    here = make_folder(tmp_path / "cwd", {"Alpha": 3, "Beta": 2})
    test = make_folder(tmp_path / "t", {"Gamma": 3})
    monkeypatch.chdir(here)
    code = main(["omniglot", "--train", "", "--test", str(test), "--ways", "3", "--train-shots", "2",
                 "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1", "--eval-batch-size", "2",
                 "--eval-tasks", "2", "--validate-every", "0", "--iterations", "1", "--no-progress",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "empty path" in err and "current folder" in err, err
    assert not (tmp_path / "out").exists()


def test_empty_runs_and_model_paths_of_omniglot_runs_are_refused(tmp_path, monkeypatch, capsys):
    runs = make_runs(tmp_path / "r", ways=3)
    monkeypatch.chdir(runs)
    # --model "" read ./model.pt: a run's folder as the current one was used without a word
    code = main(["omniglot-runs", "--runs", str(runs), "--model", "", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "empty path" in err and "Traceback" not in err, err
    # --runs "" read the current folder (the runs here): the loader refuses it
    from reptile_fast.tasks.omniglot import load_official_runs, load_omniglot_images
    with pytest.raises(ValueError, match="empty"):
        load_official_runs("")
    with pytest.raises(ValueError, match="empty path"):
        load_omniglot_images([str(runs), ""])


def test_a_rank_in_the_environment_of_a_one_process_run_still_prints_its_results(tmp_path, monkeypatch, capsys):
    # RANK=3 alone (or with WORLD_SIZE=1): the job ran as one process and wrote every file, yet the
    # CLI printed nothing, not even its metrics (is_main() read RANK alone)
    for env in ({"RANK": "3"}, {"RANK": "3", "WORLD_SIZE": "1"}):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        out = tmp_path / "_".join(env)
        assert main(["sine", "--iterations", "2", "--eval-tasks", "2", "--eval-steps", "1", "--no-progress",
                     "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert (out / "metrics.json").is_file()
        assert json.loads(printed[:printed.rindex("}") + 1]) == json.loads((out / "metrics.json").read_text())
