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


def test_load_state_dict_while_fit_runs_is_refused_before_anything_changes():
    """A callback's ``trainer.load_state_dict(earlier)`` rewound φ under fit's loop, which went on
    counting its own meta-steps: the run ended at ``iteration`` 5 holding φ two meta-steps short
    of it (and with ``total_iterations`` refused mid-fit, the load stopped half-way: φ and
    iteration loaded, the total not).  Now it is refused before anything changes."""
    trainer = _trainer()
    trainer.fit(Sine(), 1, meta_batch_size=2, progress=False)
    earlier = trainer.state_dict()
    earlier = {**earlier, "model": {k: v.clone() for k, v in earlier["model"].items()}}
    reference = _trainer()
    reference.fit(Sine(), 1, meta_batch_size=2, progress=False)
    raised = []

    def callback(i, _metrics):
        if i == 3:
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            with pytest.raises(ValueError, match="load_state_dict cannot run while fit runs"):
                trainer.load_state_dict(earlier)
            assert trainer.iteration == 3 and trainer.total_iterations == 5
            assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
            raised.append(i)

    torch.manual_seed(7)
    trainer.fit(Sine(), 5, meta_batch_size=2, progress=False, callback=callback)
    torch.manual_seed(7)
    reference.fit(Sine(), 5, meta_batch_size=2, progress=False)
    assert raised == [3] and trainer.iteration == 5
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in trainer.model.state_dict().items())
    trainer.load_state_dict(earlier)  # between fits, as before
    assert trainer.iteration == 1 and trainer.total_iterations == 1


def test_a_checkpoint_past_the_total_is_refused_from_every_source_before_anything_changes(tmp_path):
    """fit's own "checkpoint past the total" check (after the restore) was removed as dead code:
    ``resume_for_fit`` refuses first.  Every source a resume comes from — the directory, its
    checkpoint.pt, the checkpoint.prev.pt a damaged latest points to, a dict (rank 0's, sent to
    the other ranks) — is refused with the same words, the trainer, torch's RNG and the
    generator untouched."""
    from reptile_fast.callbacks import resume_for_fit
    from reptile_fast.checkpoint import load_checkpoint

    write = dict(meta_batch_size=2, progress=False, generator=torch.Generator().manual_seed(0))
    _trainer().fit(Sine(), 4, checkpoint_dir=tmp_path, checkpoint_every=2, **write)
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["trainer"]["iteration"] == 2
    (tmp_path / "checkpoint.pt").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="checkpoint.prev.pt may be intact"):
        load_checkpoint(tmp_path)
    (tmp_path / "other").mkdir()
    _trainer().fit(Sine(), 4, checkpoint_dir=tmp_path / "other", **write)
    sources = [(tmp_path / "other", 4, f" {tmp_path / 'other'}"),
               (tmp_path / "other" / "checkpoint.pt", 4, f" {tmp_path / 'other' / 'checkpoint.pt'}"),
               (tmp_path / "checkpoint.prev.pt", 2, f" {tmp_path / 'checkpoint.prev.pt'}"),
               (load_checkpoint(tmp_path / "other"), 4, "")]
    for source, at, where in sources:
        trainer = _trainer()
        trainer.meta_step(Sine().sample(2, generator=torch.Generator().manual_seed(1)))
        phi = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        gen = torch.Generator().manual_seed(5)
        rng, gen_state = torch.get_rng_state(), gen.get_state()
        total = at - 1
        with pytest.raises(ValueError) as info:
            trainer.fit(Sine(), total, meta_batch_size=2, generator=gen, progress=False, resume_from=source)
        assert str(info.value) == (f"the checkpoint{where} is at meta-step {at}, beyond iterations={total} (the "
                                   f"total number of meta-steps); pass a total of at least {at}")
        assert trainer.iteration == 1 and trainer.total_iterations is None
        assert all(torch.equal(v, phi[k]) for k, v in trainer.model.state_dict().items())
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(gen.get_state(), gen_state)
        history, _, _ = resume_for_fit(trainer, source, gen, 4, None)  # the same source, its run's total
        assert trainer.iteration == at and len(history) == at
