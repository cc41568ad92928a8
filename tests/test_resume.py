"""Exact resume after Ctrl-C, SIGTERM, SIGKILL; NaN keeps the last good checkpoint.

"Exact" is bitwise on the CPU: a run interrupted and resumed ends with the same parameters, loss
history and RNG states as one that ran through.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from reptile_fast import MLP, NonFiniteError, Reptile, Sine, TaskBatch
from reptile_fast.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore_checkpoint, save_checkpoint
from reptile_fast.cli import main
from reptile_fast.signals import DeferredSignals, TrainingInterrupted

ITERS = 12


def make_trainer(outer_optimizer=False):
    torch.manual_seed(0)
    model = MLP(1, 24, 1)
    if outer_optimizer:
        return Reptile(model, backend="reference", inner_steps=3,
                       outer_optimizer=torch.optim.Adam(model.parameters(), lr=0.01))
    return Reptile(model, backend="reference", inner_steps=3, outer_lr=0.5, outer_lr_final=0.05)


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_through(use_generator, outer_optimizer):
    trainer = make_trainer(outer_optimizer)
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(3) if use_generator else None
    history = trainer.fit(Sine(), ITERS, meta_batch_size=2, generator=gen, progress=False)
    return params_of(trainer), history, torch.rand(3)  # the global RNG afterwards


def kill_self_at(iteration, signum):
    def callback(i, _metrics):
        if i == iteration:
            os.kill(os.getpid(), signum)
    return callback


@pytest.mark.parametrize("use_generator, outer_optimizer, signum", [
    (True, False, signal.SIGINT),
    (False, False, signal.SIGTERM),  # tasks from the global RNG: it must be restored too
    (True, True, signal.SIGINT),     # Adam's moments must be restored
])
def test_interrupted_and_resumed_fit_equals_uninterrupted(tmp_path, use_generator, outer_optimizer, signum):
    expected, expected_history, expected_rand = run_through(use_generator, outer_optimizer)
    previous = signal.getsignal(signum)

    trainer = make_trainer(outer_optimizer)
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(3) if use_generator else None
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(Sine(), ITERS, meta_batch_size=2, generator=gen, progress=False,
                    checkpoint_dir=tmp_path, checkpoint_every=4, callback=kill_self_at(6, signum))
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.exit_code == 128 + signum and info.value.iteration == 6
    assert "resume_from" in str(info.value) and str(tmp_path) in str(info.value)
    assert signal.getsignal(signum) is previous, "the previous handler is restored"
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 6

    # A new process would start from scratch: fresh model, other global RNG state.
    torch.manual_seed(12345)
    resumed = make_trainer(outer_optimizer)
    gen = torch.Generator() if use_generator else None
    history = resumed.fit(Sine(), ITERS, meta_batch_size=2, generator=gen, progress=False,
                          checkpoint_dir=tmp_path, checkpoint_every=4, resume_from=tmp_path)
    assert_bitwise_equal(params_of(resumed), expected)
    assert history["loss"] == expected_history["loss"]
    assert torch.equal(torch.rand(3), expected_rand)
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == ITERS


def test_resume_from_periodic_checkpoint_file(tmp_path):
    """As after a crash: continue from the last periodic checkpoint (by file name)."""
    expected, _, _ = run_through(True, False)
    class Crash(Exception):
        pass

    def crash_at_9(i, _metrics):
        if i == 9:
            raise Crash

    trainer = make_trainer()
    torch.manual_seed(1)
    with pytest.raises(Crash):
        trainer.fit(Sine(), ITERS, meta_batch_size=2, generator=torch.Generator().manual_seed(3),
                    progress=False, checkpoint_dir=tmp_path, checkpoint_every=4, callback=crash_at_9)
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 8
    resumed = make_trainer()
    resumed.fit(Sine(), ITERS, meta_batch_size=2, generator=torch.Generator(), progress=False,
                resume_from=tmp_path / "checkpoint.prev.pt")  # iteration 4
    assert_bitwise_equal(params_of(resumed), expected)


def test_second_signal_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        with DeferredSignals() as sig:
            os.kill(os.getpid(), signal.SIGINT)
            assert sig.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the handler raises
    assert not isinstance(info.value, TrainingInterrupted) and "second SIGINT" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_signal_not_acted_on_is_delivered_on_exit_not_dropped():
    """A signal recorded after the caller's last look (fit's: after its final checkpoint) reaches
    the handler put back when the scope ends (here Python's SIGINT handler: KeyboardInterrupt);
    one that was acted on (an exception leaving the scope) is not delivered twice."""
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        with DeferredSignals() as sig:
            os.kill(os.getpid(), signal.SIGINT)
            assert sig.received == signal.SIGINT  # recorded, not raised, inside the scope
    assert "second" not in str(info.value)
    assert signal.getsignal(signal.SIGINT) is previous
    with pytest.raises(TrainingInterrupted):  # acted on: the caller's own exception, nothing after it
        with DeferredSignals():
            os.kill(os.getpid(), signal.SIGINT)
            raise TrainingInterrupted("stopped", signal_number=signal.SIGINT, iteration=1, checkpoint=None)


def test_no_handlers_outside_the_main_thread(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    errors, seen = [], []

    def work():
        try:
            trainer = make_trainer()
            trainer.fit(Sine(), 3, generator=torch.Generator().manual_seed(0), progress=False,
                        checkpoint_dir=tmp_path,
                        callback=lambda i, m: seen.append(signal.getsignal(signal.SIGINT)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    assert not errors and seen == [previous] * 3
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 3


class PoisonAt:
    """Sine tasks, except call ``bad`` whose targets overflow the inner loss to inf."""

    def __init__(self, bad):
        self.calls, self.bad, self.sine = 0, bad, Sine()

    def sample(self, n, *, generator=None, device=None):
        self.calls += 1
        tasks = self.sine.sample(n, generator=generator, device=device)
        return TaskBatch(tasks.x, tasks.y * 1e30) if self.calls == self.bad else tasks


def test_non_finite_step_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer()
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(PoisonAt(7), ITERS, generator=torch.Generator().manual_seed(0), progress=False,
                    checkpoint_dir=tmp_path, checkpoint_every=5)
    message = str(info.value)
    assert "meta-step 7" in message and "meta-step 5" in message and "resume_from" in message
    assert info.value.iteration == 7 and info.value.checkpoint_iteration == 5
    assert trainer.iteration == 6  # φ is that of the last good step
    ck = load_checkpoint(tmp_path)
    assert ck["trainer"]["iteration"] == 5, "the failed state was not written over it"
    assert all(torch.isfinite(v).all() for v in ck["trainer"]["model"].values())


def test_cli_reports_non_finite_training(tmp_path, capsys):
    rc = main(["sine", "--iterations", "5", "--inner-lr", "1e30", "--backend", "reference",
               "--eval-tasks", "1", "--eval-steps", "1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "non-finite" in err and "meta-step 1" in err and "no checkpoint had been written" in err
    assert not (tmp_path / CHECKPOINT_NAME).exists()


# ------------------------------------------------------------------ the CLI in a subprocess
SINE_ARGS = ["sine", "--meta-batch-size", "1", "--inner-steps", "3", "--outer-lr", "0.5",
             "--outer-lr-final", "0.05", "--backend", "reference", "--eval-tasks", "2",
             "--eval-steps", "5", "--no-progress"]


def start_cli(args, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "reptile_fast", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_file(path, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before writing {path}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.005)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    iters, every = "100", "5"
    killed = tmp_path / "killed"
    proc = start_cli([*SINE_ARGS, "--iterations", iters, "--checkpoint-every", every], killed)
    wait_for_file(killed / CHECKPOINT_NAME, proc)
    proc.kill()  # SIGKILL: no handler runs, no final checkpoint
    proc.wait(60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    at = load_checkpoint(killed)["trainer"]["iteration"]
    assert 5 <= at < int(iters) and at % 5 == 0
    assert not (killed / "model.pt").exists()

    assert main(["sine", "--resume", str(killed), "--no-progress"]) == 0
    whole = tmp_path / "whole"
    assert main([*SINE_ARGS, "--iterations", iters, "--checkpoint-every", every, "--out", str(whole)]) == 0
    a = torch.load(killed / "model.pt", weights_only=True)
    b = torch.load(whole / "model.pt", weights_only=True)
    assert_bitwise_equal(a["state_dict"], b["state_dict"])
    assert a["config"] == b["config"]
    ha, hb = (load_checkpoint(d)["history"]["loss"] for d in (killed, whole))
    assert ha.shape == (int(iters),) and torch.equal(ha, hb)


def test_sigint_mid_run_exits_nonzero_with_checkpoint_and_hint(tmp_path):
    out = tmp_path / "run"
    proc = start_cli([*SINE_ARGS, "--iterations", "100000", "--checkpoint-every", "5"], out)
    wait_for_file(out / CHECKPOINT_NAME, proc)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    at = load_checkpoint(out)["trainer"]["iteration"]
    assert 5 <= at < 100000
    assert f"stopped after meta-step {at}" in err
    assert f"reptile-fast sine --resume {out}" in err


def test_signal_handlers_follow_handle_signals_and_checkpoint_dir(tmp_path):
    """handle_signals=False leaves Ctrl-C as it always was; without checkpoint_dir only SIGINT is
    deferred (to the end of the meta-step: a Ctrl-C inside the outer update could leave φ one
    step ahead of ``iteration``), SIGTERM keeps its handler; with checkpoint_dir both are.
    Every handler is restored afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handlers(**kwargs):
        seen = []
        make_trainer().fit(Sine(), 2, progress=False, **kwargs,
                           callback=lambda i, m: seen.append({s: signal.getsignal(s) for s in previous}))
        assert {s: signal.getsignal(s) for s in previous} == previous
        return seen[0]

    assert handlers(checkpoint_dir=tmp_path / "a", handle_signals=False) == previous
    plain = handlers()
    assert plain[signal.SIGINT] is not previous[signal.SIGINT] and plain[signal.SIGTERM] is previous[signal.SIGTERM]
    with_dir = handlers(checkpoint_dir=tmp_path / "b")
    assert all(with_dir[s] is not previous[s] for s in previous)


def test_resume_with_another_schedule_length_warns(tmp_path):
    trainer = make_trainer()  # anneals the outer step
    trainer.fit(Sine(), 3, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)
    with pytest.warns(UserWarning, match="annealed the outer step over 3 iterations"):
        make_trainer().fit(Sine(), 5, generator=torch.Generator(), progress=False, resume_from=tmp_path)


def test_resuming_past_the_requested_total_is_refused(tmp_path):
    """fit(iterations=3, resume_from=a meta-step-4 checkpoint) returned silently without training
    (fit refuses the same total without resume_from, and so does the CLI's --resume)."""
    make_trainer().fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path)
    import warnings

    with pytest.raises(ValueError, match=r"at meta-step 4, beyond iterations=3"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the annealing-length warning comes first
        make_trainer().fit(Sine(), 3, generator=torch.Generator(), progress=False, resume_from=tmp_path)
    finished = make_trainer()  # resuming a finished run with its own total stays a no-op
    finished.fit(Sine(), 4, generator=torch.Generator(), progress=False, resume_from=tmp_path)
    assert finished.iteration == 4


def test_periodic_checkpoints_when_the_run_starts_off_a_multiple(tmp_path, monkeypatch):
    """Chunks counted from a start that is not a multiple of checkpoint_every (here 1, after a
    meta_step) still save once per multiple they pass: at the ends of the chunks holding 5 and 10."""
    from reptile_fast.callbacks import CheckpointCallback

    torch.manual_seed(0)
    trainer = Reptile(MLP(1, 8, 1, depth=1), backend="compiled", backend_options={"mode": "eager"})
    trainer.meta_step(Sine().sample(1), generator=torch.Generator().manual_seed(0))
    saved, original = [], CheckpointCallback.save

    def spy(self):
        saved.append(self.trainer.iteration)
        original(self)

    monkeypatch.setattr(CheckpointCallback, "save", spy)
    trainer.fit(Sine(), 13, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False,
                generator=torch.Generator().manual_seed(1))
    assert saved == [6, 11, 13]


def test_resuming_with_another_meta_batch_warns(tmp_path):
    """The checkpoint records fit's meta-batch; resuming with another one warns (the run then
    differs from an uninterrupted one), with the same one it does not."""
    import warnings as _warnings

    from reptile_fast import MLP, Reptile, Sine

    torch.manual_seed(0)
    t = Reptile(MLP(1, 8, 1), backend="torch")
    t.fit(Sine(), 3, meta_batch_size=2, generator=torch.Generator().manual_seed(0), progress=False,
          checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["trainer"]["meta_batch_size"] == 2
    for batch, warns in ((3, True), (2, False)):
        torch.manual_seed(0)
        r = Reptile(MLP(1, 8, 1), backend="torch")
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            r.fit(Sine(), 5, meta_batch_size=batch, generator=torch.Generator(), progress=False,
                  resume_from=tmp_path)
        hit = [w for w in caught if "tasks per meta-step" in str(w.message)]
        assert bool(hit) == warns, (batch, [str(w.message) for w in caught])


@pytest.mark.parametrize("value, error, words", [(0, ValueError, "total_iterations must be >= 1, got 0"),
                                                 (2.5, TypeError, "total_iterations must be an int, got float"),
                                                 (True, TypeError, "total_iterations must be an int, got bool")])
def test_total_iterations_set_by_hand_is_checked_as_a_checkpoint_is(tmp_path, value, error, words):
    """A 0 set by hand was saved into the checkpoint and refused only when resuming from it."""
    trainer = make_trainer()
    with pytest.raises(error, match=words):
        trainer.total_iterations = value
    assert trainer.total_iterations is None
    trainer.total_iterations = 7  # what a later fit's schedule would see; saved and loaded as is
    save_checkpoint(tmp_path, trainer)
    again = make_trainer()
    restore_checkpoint(again, tmp_path)
    assert again.total_iterations == 7
    again.total_iterations = None
    assert again.outer_lr_at(3) == again.outer_lr
