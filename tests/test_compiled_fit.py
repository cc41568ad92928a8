"""Reptile.fit(compiled=True) and the CLI's compiled path: checkpoints, exact resume, metrics."""
import json

import pytest
import torch

from reptile_fast import MLP, Reptile, Sine
from reptile_fast.backends import UnsupportedModelError
from reptile_fast.cli import main


def _trainer():
    torch.manual_seed(0)
    return Reptile(MLP(1, 16, 1), backend="torch", outer_lr=0.5)


def test_compiled_fit_resume_is_exact(tmp_path):
    full = _trainer()
    hist = full.fit(Sine(), 60, generator=torch.Generator().manual_seed(3), progress=False,
                    compiled=True, checkpoint_dir=tmp_path / "full", checkpoint_every=20)
    assert len(hist["loss"]) == 60 and full.iteration == 60
    assert full.last_compiled_stats["ms_per_iteration"] > 0

    part = _trainer()
    part.fit(Sine(), 40, generator=torch.Generator().manual_seed(3), progress=False,
             compiled=True, checkpoint_dir=tmp_path / "part", checkpoint_every=20)
    resumed = _trainer()
    hist2 = resumed.fit(Sine(), 60, generator=torch.Generator(), progress=False, compiled=True,
                        checkpoint_dir=tmp_path / "part", checkpoint_every=20,
                        resume_from=tmp_path / "part")
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert hist2["loss"] == hist["loss"]


def test_compiled_fit_rejects_unsupported_model():
    trainer = Reptile(torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1)),
                      backend="reference")
    with pytest.raises(UnsupportedModelError):
        trainer.fit(Sine(), 2, progress=False, compiled=True)


def test_cli_seed_setting_runs_compiled(tmp_path):
    out = tmp_path / "run"
    assert main(["sine", "--iterations", "30", "--hidden-dim", "16", "--eval-tasks", "3",
                 "--eval-steps", "5", "--checkpoint-every", "10", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "compiled"
    assert metrics["compile_seconds"] >= 0 and metrics["ms_per_iteration"] > 0
    assert (out / "checkpoint.pt").exists() and (out / "figure.png").exists()
