"""QA63 (session 25): distributed training's faults.

* A checkpoint that rank 0 could not write in the middle of ``distributed_fit`` (a full disk)
  raised on rank 0 alone: the other ranks went on into the next meta-step's collective and
  waited there for the process group's timeout (300 s by default), then blamed a dead rank.
  Every rank now learns each save's outcome at the same meta-steps (``_save_exchange``) and
  raises the same ``OSError`` (errno kept), promptly; the group stays usable.
* ``distributed_fit(handle_signals=True)`` without a ``checkpoint_dir`` deferred nothing: a
  Ctrl-C after a meta-step's outer update was a plain ``KeyboardInterrupt`` with φ one step ahead
  of ``trainer.iteration`` (continuing applied that meta-step twice).  Now SIGINT is deferred as
  ``Reptile.fit`` defers it, and every rank raises ``TrainingInterrupted`` after the same meta-step.
"""
import os
import signal

import pytest
import torch

import _dist_worker as W
from reptile_fast import MLP, Reptile, Sine
from reptile_fast.distributed import DistContext, distributed_fit
from reptile_fast.signals import TrainingInterrupted

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _results(out, name, n):
    return [torch.load(out / f"{name}.{r}.pt") for r in range(n)]


@needs_gloo
def test_a_checkpoint_rank_0_cannot_write_fails_every_rank_alike_and_promptly(tmp_path):
    scenarios = [dict(name="periodic", iterations=8, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=2,
                      save_fails_at=4),
                 dict(name="final", iterations=3, checkpoint_dir=str(tmp_path / "b"), save_fails_at=3),
                 dict(name="sigint", iterations=6, checkpoint_dir=str(tmp_path / "c"), save_fails_at=2,
                      signal_at=2, signal=signal.SIGINT, stop_check_every=1),
                 dict(name="next", iterations=2, checkpoint_dir=str(tmp_path / "d"), checkpoint_every=1)]
    codes = W.run_job(2, tmp_path, scenarios, wait=120, grace=10)  # the process group's timeout: 60 s
    assert codes == [0, 0], codes
    for name in ("periodic", "final", "sigint"):
        for rank, res in enumerate(_results(tmp_path, name, 2)):
            assert res["error"] is not None and res["error"][0] == "OSError" and res.get("errno") == 28, \
                (name, rank, res["error"])
            assert "No space left on device" in res["error"][1], (name, rank, res["error"])
            assert res["seconds"] < 30, (name, rank, res["seconds"])  # not the group's timeout
    # the periodic checkpoint before the disk filled up is intact
    from reptile_fast.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "a")["trainer"]["iteration"] == 2
    for res in _results(tmp_path, "next", 2):  # the group is still usable
        assert res["error"] is None, res["error"]


@needs_gloo
def test_sigint_without_a_checkpoint_dir_stops_every_rank_after_the_same_meta_step(tmp_path):
    codes = W.run_job(2, tmp_path, [dict(name="nockpt", iterations=8, signal_at=3, signal=signal.SIGINT,
                                         stop_check_every=1)], wait=120, grace=10)
    assert codes == [0, 0], codes
    for res in _results(tmp_path, "nockpt", 2):
        assert res["error"] is not None and res["error"][0] == "TrainingInterrupted", res["error"]
        assert "after meta-step 3 of 8" in res["error"][1] and "no checkpoint_dir was given" in res["error"][1]


def _trainer():
    torch.manual_seed(0)
    return Reptile(MLP(1, 16, 1), inner_steps=2, inner_batch_size=5, backend="torch", outer_lr=0.5)


def _fit(trainer, n):
    return distributed_fit(trainer, Sine(), n, meta_batch_size=3, seed=1, context=DistContext.single(),
                           progress=False, handle_signals=True)


def test_a_ctrl_c_right_after_an_outer_update_is_deferred_without_a_checkpoint_dir(monkeypatch):
    import reptile_fast.steppers as steppers

    reference = _trainer()
    _fit(reference, 4)  # uninterrupted
    original = steppers.EagerStepper.step

    def step(self, tasks, plan, eps, iteration):
        out = original(self, tasks, plan, eps, iteration)  # φ now holds meta-step `iteration`
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arriving right after the outer update
        return out
    monkeypatch.setattr(steppers.EagerStepper, "step", step)
    trainer = _trainer()
    with pytest.raises(TrainingInterrupted, match="after meta-step 2 of 4.*no checkpoint_dir was given") as info:
        _fit(trainer, 4)
    assert trainer.iteration == 2 and info.value.checkpoint is None
    monkeypatch.setattr(steppers.EagerStepper, "step", original)
    _fit(trainer, 4)  # continues from there
    for (k, a), b in zip(reference.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs from the uninterrupted run by {(a - b).abs().max()}"
