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
