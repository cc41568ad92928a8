"""QA73 (session 25): a review of the session's own changes.

* The folder lock in ``distributed_fit`` was taken by rank 0's ``fit`` alone: refused there, the
  other ranks went on into the first meta-step's collective and blamed a dead rank.  Rank 0 now
  takes it where it checks the folder, and every rank raises ``DirectoryInUseError``.
* A run that opened the lock file just before its holder removed it took the lock on the removed
  file, and a third run then held the folder too: the fd's inode is now checked against the path's.
* ``fit`` refused by the lock had already restored the checkpoint into the trainer.
* ``loss_settings`` of a nested function with a nested code object held a memory address:
  ranks refused each other ("different settings"); bound methods were all "builtins.method".
* A 16-bit PNG that Pillow opens as mode "I" decoded as black.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _dist_worker as W
import reptile_fast.checkpoint as ckpt_mod
from reptile_fast import MLP, Reptile, Sine
from reptile_fast.checkpoint import LOCK_NAME, DirectoryInUseError, directory_lock

ROOT = Path(__file__).resolve().parents[1]
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@needs_gloo
def test_a_held_folder_refuses_every_rank_alike_and_the_group_stays_usable(tmp_path):
    scenarios = [dict(name="held", iterations=4, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1,
                      hold_folder=True),
                 dict(name="next", iterations=2, checkpoint_dir=str(tmp_path / "ckpt"))]
    assert W.run_job(2, tmp_path, scenarios, wait=120, grace=10) == [0, 0]
    for r in range(2):
        res = torch.load(tmp_path / f"held.{r}.pt")
        assert res["error"] is not None and res["error"][0] == "DirectoryInUseError", (r, res["error"])
        assert "is in use by another run" in res["error"][1] and res["seconds"] < 30, (r, res)
        assert torch.load(tmp_path / f"next.{r}.pt")["error"] is None  # released: the next run trains


def test_a_lock_taken_on_the_removed_file_of_the_last_holder_is_retaken_on_the_folders(tmp_path, monkeypatch):
    path = tmp_path / LOCK_NAME
    path.write_text("")
    stale = os.open(path, os.O_RDWR)  # opened just before the last holder removed it
    os.unlink(path)
    real_open, calls = os.open, []

    def open_(p, flags, mode=0o777):
        if not calls:
            calls.append(p)
            return stale
        return real_open(p, flags, mode)

    monkeypatch.setattr(ckpt_mod.os, "open", open_)
    with directory_lock(tmp_path):
        assert path.exists() and calls  # the folder's lock file, not the removed one
        monkeypatch.setattr(ckpt_mod.os, "open", real_open)
        with pytest.raises(DirectoryInUseError, match=f"pid {os.getpid()}"):
            with directory_lock(tmp_path):
                pass
    assert not path.exists()


def test_a_fit_refused_by_the_lock_changes_nothing(tmp_path):
    torch.manual_seed(0)
    first = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=2, inner_batch_size=5)
    first.fit(Sine(), 3, generator=torch.Generator().manual_seed(1), checkpoint_dir=tmp_path, progress=False)
    torch.manual_seed(1)
    fresh = Reptile(MLP(1, 8, 1), backend="torch", inner_steps=2, inner_batch_size=5)
    before = [p.detach().clone() for p in fresh.model.parameters()]
    with directory_lock(tmp_path):  # another run holds the folder
        with pytest.raises(DirectoryInUseError):
            fresh.fit(Sine(), 6, generator=torch.Generator().manual_seed(1), checkpoint_dir=tmp_path,
                      resume_from=tmp_path, progress=False)
    assert fresh.iteration == 0 and fresh.total_iterations is None
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.model.parameters()))


def test_loss_settings_of_nested_functions_are_the_same_in_every_process():
    code = ("from reptile_fast.trainer_state import loss_settings\n"
            "def make():\n"
            "    def loss(p, y):\n"
            "        return sum(((a - b) ** 2).mean() for a, b in zip([p], [y])) if 'x' in {'x', 'y', 'z'} else None\n"
            "    return loss\n"
            "class A:\n"
            "    def loss(self, p, y):\n"
            "        return (p - y).abs().mean()\n"
            "print(loss_settings(make())); print(loss_settings(A().loss))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2)}
    assert len(outs) == 1, outs
    nested, method = outs.pop().splitlines()
    assert nested.startswith("__main__.make.<locals>.loss#") and method == "__main__.A.loss of __main__.A"


def test_a_mode_i_image_of_16_bit_values_keeps_its_level():
    """Some Pillow versions open a 16-bit PNG as mode "I": values in [0, 65535] read as 16-bit
    (here a 32-bit TIFF of such values, which this Pillow opens as "I")."""
    from PIL import Image

    from reptile_fast.tasks.images import decode_grey

    img = Image.fromarray(np.full((4, 4), 32768, dtype=np.int32), mode="I")
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
    x = decode_grey(buf.getvalue(), 4, invert=False)
    assert torch.allclose(x, torch.full((4, 4), 128 / 255))
