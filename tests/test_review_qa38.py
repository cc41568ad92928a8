"""QA38: review of the session's own diff (066d62b..a3cbc19): ``Reptile.total_iterations`` as a
checked property, fit's removed "checkpoint past the total" check, ``prepare_directory``'s retry,
the GPU check's / sweep's re-checks after timing, the Omniglot job's validation on every rank."""
from __future__ import annotations

import warnings

import pytest
import torch

from reptile_fast import MLP, Reptile, Sine


def _trainer():
    torch.manual_seed(0)
    return Reptile(MLP(1, 8, 1), backend="reference", inner_steps=2, outer_lr=0.5, outer_lr_final=0.05)


def test_total_iterations_cannot_change_while_fit_runs(tmp_path):
    """fit anneals over its own ``iterations``: a callback's ``trainer.total_iterations = 100``
    was ignored by the running fit (ε of meta-step 2 of 4: 0.275), yet reported by the trainer
    (``outer_lr_at(2)`` 0.491) and saved in every later checkpoint, whose resume then warned that
    the run "annealed the outer step over 100 iterations"."""
    trainer = _trainer()
    seen = []

    def callback(i, _metrics):
        if i == 2:
            with pytest.raises(ValueError, match="total_iterations cannot change while fit runs"):
                trainer.total_iterations = 100
            seen.append(trainer.total_iterations)

    trainer.fit(Sine(), 4, meta_batch_size=2, progress=False, callback=callback, checkpoint_dir=tmp_path)
    assert seen == [4] and trainer.total_iterations == 4
    trainer.total_iterations = 100  # between fits it may change (and is checked)
    assert trainer.total_iterations == 100
    again = _trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint's total is the one the run used: no warning
        again.fit(Sine(), 4, meta_batch_size=2, progress=False, resume_from=tmp_path)
    assert again.iteration == 4 and again.total_iterations == 4


def test_a_parent_that_is_a_symbolic_link_to_nothing_is_named(tmp_path):
    """``--out runs/b`` with ``runs`` a symbolic link whose target was removed (a moved data disk):
    mkdir meets it as FileExistsError, which was reported as "a parent is a file, not a
    directory" (no file anywhere); the link itself was already named this way."""
    from reptile_fast.checkpoint import prepare_directory

    (tmp_path / "runs").symlink_to(tmp_path / "gone" / "runs")
    for out in (tmp_path / "runs" / "b", tmp_path / "runs" / "b" / "c"):
        with pytest.raises(NotADirectoryError) as info:
            prepare_directory(out, "--out")
        assert str(info.value) == (f"cannot create --out {out}: {tmp_path / 'runs'} is a symbolic link to "
                                   f"{tmp_path / 'gone' / 'runs'}, which does not exist")
    assert not (tmp_path / "gone").exists()
    (tmp_path / "afile").write_text("x")  # a real file parent: named as before
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'afile'} is a file, not a directory"):
        prepare_directory(tmp_path / "afile" / "b", "--out")
