"""SIGTERM after training (a CLI job's final evaluation): before, its default action killed the
process without a word, so a long Omniglot test stopped by a scheduler printed no way to resume.
Now the job prints the resume line and exits 143, as a SIGTERM during training does."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from _fake_omniglot import job_data
from reptile_fast.checkpoint import CHECKPOINT_NAME, load_checkpoint
from reptile_fast.signals import Terminated, sigterm_as_interrupt

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def test_sigterm_during_the_final_evaluation_says_how_to_resume(tmp_path):
    data = job_data(tmp_path)
    out = tmp_path / "run"
    args = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "3", "--eval-tasks", "200000", "--validate-every", "0", "--iterations", "2",
            "--checkpoint-every", "0", "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "reptile_fast", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT_NAME).exists():  # written once training ends (--checkpoint-every 0)
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "training did not end"
            time.sleep(0.01)
        time.sleep(1.0)  # inside the 200000-task evaluation (minutes long), past fit's own handlers
        assert proc.poll() is None, "the evaluation ended before the signal"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"reptile-fast omniglot --resume {out}" in err and "Traceback" not in err
    assert load_checkpoint(out)["trainer"]["iteration"] == 2  # the trained model is there to resume
    assert not (out / "metrics.json").exists()


def test_the_handler_is_scoped(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        with pytest.raises(Terminated) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert exc.value.exit_code == 143 and isinstance(exc.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    with sigterm_as_interrupt(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setenv("WORLD_SIZE", "2")
    with sigterm_as_interrupt():  # several processes: torchrun's SIGTERM ends a rank as before
        assert signal.getsignal(signal.SIGTERM) is before
