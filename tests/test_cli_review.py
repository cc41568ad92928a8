"""Review of the CLI jobs: odd flag values end in a clear error before any work, not a crash."""
import os

import pytest

from reptile_fast.cli import main


@pytest.mark.parametrize("command", ["sine", "omniglot"])
def test_more_threads_than_cpus_is_an_error_not_a_crash(tmp_path, capsys, command, monkeypatch):
    """--threads 100000 made torch start 100000 OpenMP threads: the process died with SIGSEGV.
    Now any count above the machine's CPUs is refused (exit 2) before training."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    extra = ([] if command == "sine" else
             ["--train", str(tmp_path / "missing.zip"), "--test", str(tmp_path / "missing2.zip")])
    rc = main([command, "--iterations", "2", "--threads", "3", "--out", str(tmp_path / "run"), "--no-progress",
               *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "threads" in err and "3" in err and "2 CPUs" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, inner_batch, eval_batch", [
    (["--ways", "3"], 10, 3),                        # 3-way 1-shot: a support set of 3 images
    (["--ways", "2", "--shots", "1", "5"], 10, 2),   # the smallest K's support set
    (["--ways", "5", "--train-shots", "1"], 5, 5),   # training tasks of 5 images
    (["--ways", "4", "--shots", "5"], 10, 5),        # the preset fits: unchanged
    (["--ways", "20"], 20, 10),
])
def test_omniglot_presets_fit_fewer_ways_or_shots(flags, inner_batch, eval_batch):
    """`reptile-fast omniglot --ways 3` stopped with "eval_batch_size 5 exceeds the support set of
    3 × 1 images", naming a flag that was never given: the preset's batch sizes are now capped at
    what a task holds (what the evaluation did with them anyway); a flag given is checked as given."""
    from reptile_fast.cli import build_parser
    from reptile_fast.fewshot_job import config_from_args

    config, _, _ = config_from_args(build_parser().parse_args(["omniglot", "--train", "x", "--test", "y", *flags]))
    assert (config.inner_batch_size, config.eval_batch_size) == (inner_batch, eval_batch)
    with pytest.raises(ValueError, match="eval_batch_size 4 exceeds"):
        config_from_args(build_parser().parse_args(["omniglot", "--train", "x", "--test", "y", *flags,
                                                    "--shots", "1", "--ways", "3", "--eval-batch-size", "4"]))


def test_extending_a_chunk_drawn_run_warns_that_it_differs(tmp_path):
    """The default (compiled) sine job draws a chunk's tasks at once (chunks end at multiples of
    --checkpoint-every and at the total), so a run of 4 extended with --resume --iterations 9
    trains on other draws than 9 at once. That used to pass silently, while the README says only
    other hyper-parameters, meta-batch or an annealed total make a resumed run differ."""
    import warnings

    import torch

    args = ["--eval-tasks", "1", "--eval-steps", "1", "--no-progress"]
    assert main(["sine", "--iterations", "4", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["sine", "--iterations", "9", "--out", str(tmp_path / "b"), *args]) == 0
    with pytest.warns(UserWarning, match="differ from an uninterrupted run"):
        assert main(["sine", "--resume", str(tmp_path / "a"), "--iterations", "9", "--no-progress"]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)  # what the warning is about
    # a checkpoint on a chunk boundary (every 2 meta-steps here) resumes exactly, without a warning
    args += ["--checkpoint-every", "2"]
    assert main(["sine", "--iterations", "4", "--out", str(tmp_path / "c"), *args]) == 0
    assert main(["sine", "--iterations", "8", "--out", str(tmp_path / "d"), *args]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["sine", "--resume", str(tmp_path / "c"), "--iterations", "8", "--no-progress"]) == 0
    c = torch.load(tmp_path / "c" / "model.pt", weights_only=True)["state_dict"]
    d = torch.load(tmp_path / "d" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(c[k], d[k]) for k in c)
