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

