"""The sine job from the command line: every file written and readable; bad arguments rejected."""
import json
import subprocess
import sys

import pytest
import torch

from reptile_fast.cli import main


def test_sine_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["sine", "--iterations", "20", "--meta-batch-size", "2", "--eval-tasks", "8",
               "--backend", "reference", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("figure.png", "learning_curve.png", "model.pt", "config.json", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_tasks"] == 8 and metrics["post_adaptation_mse"] > 0
    assert metrics["post_adaptation_mse"] < metrics["pre_adaptation_mse"]
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"network.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert ckpt["config"]["iterations"] == 20
    assert json.loads((out / "config.json").read_text())["meta_batch_size"] == 2
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, words", [
    (["sine", "--iterations", "0"], "positive integer"),
    (["sine", "--iterations", "ten"], "positive integer"),
    (["sine", "--outer-lr", "-1"], "positive number"),
    (["sine", "--outer-lr", "nan"], "positive number"),
    (["sine", "--backend", "fortran"], "invalid choice"),
    (["sine", "--inner-batch-size", "51"], "exceeds"),
    (["sine", "--seed", "-3"], "non-negative"),
    (["nonsense"], "invalid choice"),
])
def test_bad_cli_arguments(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "reptile_fast", "sine", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--meta-batch-size" in out.stdout
