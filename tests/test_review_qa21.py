"""Review qa21: checkpoints, exact resume, interruption, validation (issue 6) and distributed
training (issue 14).  Tiny models and few meta-steps: the whole file runs in seconds."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import reptile_fast.checkpoint as checkpoint_module
from reptile_fast import MLP, Reptile, Sine, load_checkpoint, save_checkpoint


def _adam_trainer(params=None, cls=torch.optim.Adam, **kwargs):
    """A width-8 sine MLP with an outer optimizer over ``params(model)`` (default: model order)."""
    torch.manual_seed(0)
    model = MLP(hidden_dim=8)
    chosen = list(model.parameters()) if params is None else params(model)
    return Reptile(model, backend="torch", inner_steps=2, inner_batch_size=5,
                   outer_optimizer=cls(chosen, lr=1e-3, **kwargs))


def _fit(trainer, iterations, **kwargs):
    return trainer.fit(Sine(), iterations, meta_batch_size=2, progress=False, **kwargs)


def _snapshot(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------ outer-optimizer state checks
def test_outer_optimizer_state_for_other_parameter_shapes_is_refused_before_anything_changes(tmp_path):
    # torch's Optimizer.load_state_dict pairs saved states with parameters by position and checks
    # only the counts: an optimizer built over the parameters in another order took Adam moments of
    # other shapes, and the first resumed meta-step failed inside torch ("output with shape [1]
    # doesn't match the broadcast shape [8, 1]") with the trainer already at the checkpoint's φ.
    _fit(_adam_trainer(), 3, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(0))
    other = _adam_trainer(params=lambda m: list(m.parameters())[::-1])
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"outer_optimizer state does not fit .*'exp_avg' of parameter 0 .*"
                                         r"shape \(8, 1\), the parameter's is \(1,\)"):
        _fit(other, 6, checkpoint_dir=tmp_path, resume_from=tmp_path, generator=torch.Generator())
    assert other.iteration == 0 and not other.outer_optimizer.state
    assert all(torch.equal(v, before[k]) for k, v in other.model.state_dict().items())


def test_outer_optimizer_state_holding_nan_is_refused(tmp_path):
    trainer = _adam_trainer()
    _fit(trainer, 2)
    state = trainer.state_dict()
    state["outer_optimizer"]["state"][1]["exp_avg_sq"][0] = float("nan")
    fresh = _adam_trainer()
    with pytest.raises(ValueError, match="'exp_avg_sq' of parameter 1 .* NaN or inf"):
        fresh.load_state_dict(state)
    assert fresh.iteration == 0 and not fresh.outer_optimizer.state


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor needs torch >= 2.5")
def test_factored_optimizer_states_still_resume_exactly(tmp_path):
    # Adafactor keeps [rows, 1] / [1, cols] factors of a matrix parameter's second moment: the
    # shape check must take them
    def run(**kwargs):
        trainer = _adam_trainer(cls=torch.optim.Adafactor)
        return trainer, _fit(trainer, kwargs.pop("iterations"), generator=kwargs.pop("generator"), **kwargs)

    whole, _ = run(iterations=4, generator=torch.Generator().manual_seed(1))
    run(iterations=2, generator=torch.Generator().manual_seed(1), checkpoint_dir=tmp_path)
    resumed, _ = run(iterations=4, generator=torch.Generator(), checkpoint_dir=tmp_path, resume_from=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), resumed.model.parameters()))


# ------------------------------------------------------------------ failed writes name the file
def _fail_fsync(monkeypatch, code=errno.ENOSPC):
    def fsync(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync)


def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_last_one(tmp_path, monkeypatch):
    # before: "[Errno 28] No space left on device", naming no file (the CLI printed just that)
    trainer = _adam_trainer()
    _fit(trainer, 2, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(0))
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'checkpoint.pt'}: No space left on device "
                                      r"\(the existing checkpoint.pt there is unchanged\)") as info:
        _fit(trainer, 4, checkpoint_dir=tmp_path, checkpoint_every=1, generator=torch.Generator().manual_seed(0))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "checkpoint.prev.pt"}  # no temporaries


def test_an_unwritable_directory_keeps_the_error_kind_and_names_the_file(tmp_path, monkeypatch):
    trainer = _adam_trainer()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".checkpoint.pt.x.tmp"))
    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=rf"cannot write {tmp_path / 'checkpoint.pt'}: Permission denied "
                                              r"\(nothing was written\)"):
        save_checkpoint(tmp_path, trainer)


def test_a_failed_copy_to_the_previous_checkpoint_names_it(tmp_path, monkeypatch):
    trainer = _adam_trainer()
    save_checkpoint(tmp_path, trainer)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_module, "_link_or_copy", full)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint.prev.pt \(the copy of checkpoint.pt kept before it "
                                      r"is replaced\); checkpoint.pt is unchanged: No space left on device"):
        save_checkpoint(tmp_path, trainer)
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 0


# ------------------------------------------------------------------ another architecture, same parameters
def test_resuming_into_a_model_with_another_activation_warns(tmp_path):
    # the parameters' names, shapes and dtypes are all the same: before, the tanh run continued as a
    # ReLU one without a word, while another inner_lr warned
    torch.manual_seed(0)
    trainer = Reptile(MLP(hidden_dim=8), backend="torch", inner_steps=2, inner_batch_size=5)
    _fit(trainer, 2, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(0))
    relu = Reptile(MLP(hidden_dim=8, activation="relu"), backend="torch", inner_steps=2, inner_batch_size=5)
    with pytest.warns(UserWarning, match=r"different hyper-parameters \(modules: saved 'network.1:Tanh', "
                                         r"now 'network.1:ReLU'\)"):
        relu.load_state_dict(load_checkpoint(tmp_path)["trainer"])
    deeper = Reptile(MLP(hidden_dim=8, depth=3), backend="torch", inner_steps=2, inner_batch_size=5)
    state = deeper.state_dict()
    state["config"] = {**state["config"], "modules": state["config"]["modules"][:-2]}
    with pytest.warns(UserWarning, match=r"modules: saved None, now 'network.5:Tanh'"):
        deeper.load_state_dict(state)


# ------------------------------------------------------------------ distributed (one 2-rank gloo job)
BOUND_T = 7  # tasks of the bound scenario's meta-step, split 3 + 4
TWO_RANK_SCENARIOS = [
    dict(name="bound", backend="reference", reduction="mean", iterations=1, meta_batch_size=BOUND_T),
    # SIGTERM to rank 1 after meta-step 3 of 4: the next periodic agreement would be at meta-step 11
    dict(name="late-signal", iterations=4, signal_at=3, stop_check_every=10),
]
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory):
    import _dist_worker as W

    out = tmp_path_factory.mktemp("qa21_two_ranks")
    scenarios = [dict(s, checkpoint_dir=str(out / "late-ckpt")) if s["name"] == "late-signal" else s
                 for s in TWO_RANK_SCENARIOS]
    assert W.run_job(2, out, scenarios) == [0, 0]
    return out


@needs_gloo
def test_two_ranks_mean_reduction_is_one_process_within_the_summation_bound(two_rank_job, tmp_path):
    """One meta-step of T = 7 tasks split 3 + 4 over two gloo ranks, reduction "mean", against one
    process, within a bound derived from fp32 summation (u = 2^-24), not a chosen tolerance.

    Per element, with D_i the per-task updates and S = Σ|D_i|: one process's ``D.mean(0)`` is the
    exact mean m within (T−1)·u·S/T + u·|m| (any summation order); the ranks' sums of 3 and 4 tasks,
    added in rank order, then divided, within ((n_r − 1) + (W − 1))·u·S/T + u·|m| ≤ the same.  So the
    two means differ by at most 2·((T−1)·u·S/T + u·|m|), and φ + ε·mean by ε·(1+u) times that plus
    one rounding of each result (u·|φ'| each).  The reference backend computes each task's update
    independently of how the tasks are split, so the D_i are the same on both sides.  The bound is
    far below what a wrong reduction gives (the mean of the two ranks' means, checked here)."""
    import _dist_worker as W
    from reptile_fast.distributed import IndexedSampler

    T, s = BOUND_T, TWO_RANK_SCENARIOS[0]
    ranks = [torch.load(two_rank_job / f"bound.{r}.pt") for r in range(2)]
    assert ranks[0]["error"] is None and ranks[1]["error"] is None, [r["error"] for r in ranks]
    one = W.single_process(s, tmp_path)
    assert one["error"] is None

    cfg = {**W.BASE, **s}
    trainer = W.make_trainer(cfg)
    phi = dict(trainer.model.named_parameters())
    sampler = IndexedSampler(Sine(), T, seed=cfg["seed"], plan_rows=trainer.inner_steps,
                             batch_size=trainer.inner_batch_size)
    tasks, plans = sampler.draw_step(0)
    adapted = trainer.adapt(tasks, trainer.inner_steps, plans).params
    u, eps = 2.0 ** -24, trainer.outer_lr
    for name, p in phi.items():
        assert torch.equal(ranks[1]["params"][name], ranks[0]["params"][name])  # φ identical on both ranks
        d = (adapted[name] - p.detach()).double()
        m, big_s = d.mean(0), d.abs().sum(0)
        want = one["params"][name].double()
        bound = eps * (1 + u) * 2 * ((T - 1) * u * big_s / T + u * m.abs()) + 2 * u * want.abs()
        gap = (ranks[0]["params"][name].double() - want).abs()
        assert (gap <= bound * (1 + 1e-6)).all(), f"{name}: {(gap - bound).max()} beyond the bound"
        wrong = eps * ((d[:3].mean(0) + d[3:].mean(0)) / 2 - m).abs()  # the mean of the ranks' means
        assert (wrong > 10 * bound).any(), name


# ------------------------------------------------------------------ the omniglot job's validation history
def test_a_damaged_validation_history_never_stops_an_omniglot_resume(tmp_path, capsys):
    # validation.json is monitoring beside the checkpoint: a damaged one made --resume fail with
    # json's "Expecting ',' delimiter" (naming no file) or a KeyError traceback
    from _fake_omniglot import make_folder, make_zip
    from reptile_fast.cli import main

    train = make_zip(make_folder(tmp_path / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1"),
                     tmp_path / "small1.zip")
    test = make_folder(tmp_path / "b", {"Beta": 2, "Gamma": 3}, prefix="images_background_small2")
    out = tmp_path / "run"
    assert main(["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "1",
                 "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1",
                 "--eval-batch-size", "2", "--eval-tasks", "2", "--validation-tasks", "2", "--validate-every", "1",
                 "--iterations", "2", "--checkpoint-every", "1", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    whole = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for i, content in enumerate(['[{"iteration": 1, "accuracy": 0.5}', '[{"accuracy": 0.5}]', '{"iteration": 1}']):
        (out / "validation.json").write_text(content)
        capsys.readouterr()
        again = tmp_path / f"again{i}"
        assert main(["omniglot", "--resume", str(out / "checkpoint.prev.pt"), "--out", str(again),
                     "--no-progress"]) == 0, content
        said = capsys.readouterr()
        assert f"note: {out / 'validation.json'} cannot be read" in said.out + said.err, content
        resumed = torch.load(again / "model.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)
        assert [v["iteration"] for v in json.loads((again / "validation.json").read_text())] == [2]


# ------------------------------------------------------------------ draw_chunks: the chunk size is part of the run
def test_resuming_a_chunk_drawn_run_with_another_chunk_size_warns(tmp_path):
    # fit(draw_chunks=True) draws [c·j, c·(j+1)) at once, c = checkpoint_every: a checkpoint on a
    # multiple of both the old and the new c (35 for 7 and 5) continued on other draws without a word
    def trainer():
        torch.manual_seed(0)
        return Reptile(MLP(hidden_dim=8), backend="compiled", inner_steps=2, inner_batch_size=5)

    def fit(t, iterations, every, directory, generator, draw_chunks=True, **kwargs):
        return t.fit(Sine(), iterations, meta_batch_size=2, progress=False, generator=generator,
                     draw_chunks=draw_chunks, checkpoint_every=every, checkpoint_dir=directory, **kwargs)

    whole = trainer()
    fit(whole, 50, 7, tmp_path / "whole", torch.Generator().manual_seed(1))
    fit(trainer(), 35, 7, tmp_path / "part", torch.Generator().manual_seed(1))
    assert load_checkpoint(tmp_path / "part")["trainer"]["draw_chunk"] == 7
    for every, draw_chunks, words in ((5, True, "in chunks of 7 meta-steps .*, this fit in chunks of 5"),
                                      (7, False, "in chunks of 7 meta-steps .*, this fit step by step")):
        with pytest.warns(UserWarning, match=f"drew its tasks and plans {words}.*: other draws"):
            fit(trainer(), 50, every, tmp_path / f"r{every}", torch.Generator(), draw_chunks=draw_chunks,
                resume_from=tmp_path / "part")
    resumed = trainer()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same chunks: exact, and no warning
        fit(resumed, 50, 7, tmp_path / "same", torch.Generator(), resume_from=tmp_path / "part")
    assert all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), resumed.model.parameters()))


def test_a_checkpoint_is_never_written_from_an_outer_optimizer_state_that_loading_refuses(tmp_path):
    trainer = _adam_trainer()
    _fit(trainer, 2, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(0))
    trainer.outer_optimizer.state[trainer.model.network[0].weight]["exp_avg"].fill_(float("inf"))
    with pytest.raises(ValueError, match="'exp_avg' of parameter 0 .* NaN or inf values; not writing a checkpoint"):
        save_checkpoint(tmp_path, trainer)
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 2


def test_another_libraries_optimizer_state_is_left_to_it(tmp_path):
    # a preconditioner [n, n] for an [n, 1] parameter is that optimizer's business: not refused
    class Preconditioned(torch.optim.SGD):
        pass
    Preconditioned.__module__ = "someones_optimizers"
    trainer = _adam_trainer(cls=Preconditioned)
    _fit(trainer, 1)
    state = trainer.state_dict()
    state["outer_optimizer"]["state"][0] = {"preconditioner": torch.eye(8)}
    _adam_trainer(cls=Preconditioned).load_state_dict(state)


@needs_gloo
def test_a_signal_after_the_last_stop_agreement_still_stops_every_rank(two_rank_job):
    # the rank that got it printed "finishing the current meta-step and writing a checkpoint", then
    # every rank returned normally: the signal was dropped (a torchrun job went on to its evaluation)
    for r in range(2):
        error = torch.load(two_rank_job / f"late-signal.{r}.pt")["error"]
        assert error is not None and error[0] == "TrainingInterrupted", (r, error)
        assert f"by SIGTERM after meta-step 4 of 4 (rank {r} of 2" in error[1], error[1]
    assert load_checkpoint(two_rank_job / "late-ckpt")["trainer"]["iteration"] == 4


# ------------------------------------------------------------------ checkpoint_extra is checked before training
def test_an_unstorable_checkpoint_extra_is_refused_before_the_first_meta_step(tmp_path):
    # a numpy scalar (or a set) in checkpoint_extra failed at the first checkpoint, after
    # checkpoint_every meta-steps, which were lost with nothing written
    import numpy as np
    from reptile_fast.distributed import distributed_fit

    for run in (lambda t, extra: _fit(t, 5, checkpoint_dir=tmp_path, checkpoint_every=4, checkpoint_extra=extra),
                lambda t, extra: distributed_fit(t, Sine(), 5, meta_batch_size=2, seed=0, progress=False,
                                                 checkpoint_dir=tmp_path, checkpoint_extra=extra)):
        trainer = _adam_trainer()
        with pytest.raises(TypeError, match=r"checkpoint_extra\[.lr.\] is a float32 \(a numpy scalar.*\); "
                                            r"a checkpoint holds only"):
            run(trainer, {"lr": np.float32(0.1)})
        assert trainer.iteration == 0 and not (tmp_path / "checkpoint.pt").exists()


def test_an_outer_optimizer_with_numpy_hyper_parameters_is_refused_before_training_when_checkpointing(tmp_path):
    # Adam(lr=np.float32(1e-3)) trains, but its param groups cannot be saved: the first checkpoint
    # failed after the meta-steps up to it (the end of the run without checkpoint_every)
    import numpy as np
    from reptile_fast.distributed import distributed_fit

    for run in (lambda t: _fit(t, 3, checkpoint_dir=tmp_path),
                lambda t: distributed_fit(t, Sine(), 3, meta_batch_size=2, seed=0, progress=False,
                                          checkpoint_dir=tmp_path)):
        trainer = _adam_trainer(betas=(np.float64(0.9), 0.999))
        with pytest.raises(TypeError, match=r"outer_optimizer.param_groups\[0\]\['betas'\]\[0\] is a float64 "
                                            r"\(a numpy scalar: convert it with float\(\) or int\(\)\)"):
            run(trainer)
        assert trainer.iteration == 0 and not (tmp_path / "checkpoint.pt").exists()
    _fit(_adam_trainer(betas=(np.float64(0.9), 0.999)), 2)  # without checkpoints nothing is stored: it trains


def test_distributed_fit_raises_a_read_only_checkpoint_dir_as_an_oserror(tmp_path, monkeypatch):
    # rank 0's error is re-raised on every rank by name: a plain OSError (a read-only file system,
    # EROFS) became a ValueError, unlike Reptile.fit's
    from reptile_fast.distributed import distributed_fit

    def read_only(path, what="checkpoint_dir"):
        raise OSError(errno.EROFS, f"cannot create {what} {path}: Read-only file system")
    monkeypatch.setattr(checkpoint_module, "prepare_checkpoint_directory", read_only)
    with pytest.raises(OSError, match="cannot create checkpoint_dir .*: Read-only file system") as info:
        distributed_fit(_adam_trainer(), Sine(), 2, meta_batch_size=2, seed=0, progress=False,
                        checkpoint_dir=tmp_path / "ro")
    assert type(info.value) is OSError and info.value.errno == errno.EROFS


def test_a_reducer_with_a_fused_backend_is_refused_in_distributed_terms():
    # the message said "(compiled / fused); a reducer needs an eager backend": distributed_fit's user
    # passed no reducer and got no hint which backend to use
    from reptile_fast.core import local_mean

    torch.manual_seed(0)
    trainer = Reptile(MLP(hidden_dim=8), backend="compiled", inner_steps=2, inner_batch_size=5)
    with pytest.raises(ValueError, match=r"backend 'compiled' applies its own outer update in one process .*"
                                         r"distributed_fit across processes\) needs an eager backend: auto, torch"):
        trainer.fit(Sine(), 2, meta_batch_size=2, progress=False, reducer=local_mean)
