"""Review of distributed training and resume (issues 14 and 6): defects found and fixed.

* ``DistContext.from_group`` with a subgroup that does not hold global rank 0: the broadcasts
  passed the group's rank 0 as torch.distributed's *global* source rank and failed ("Global rank 0
  is not part of group");
* ranks whose outer optimizers differ (Adam's lr) were not refused: φ then differed across ranks;
* ``Reptile.fit`` continued a ``distributed_fit`` checkpoint silently from one generator stream
  (other tasks than the uninterrupted run's); the reverse was already refused;
* a checkpoint with a malformed RNG state replaced the model, then failed deep in torch / numpy /
  random (RuntimeError, IndexError);
* a model or a string as ``distributed_fit``'s trainer failed with an AttributeError; a bad device
  name or CUDA without a GPU reached torch (RuntimeError) or passed.

The multi-process checks share one 3-process gloo job (loopback, one thread each).
"""
import copy

import pytest
import torch

import _dist_worker as W
from reptile_fast import MLP, Reptile, Sine
from reptile_fast.checkpoint import atomic_torch_save, load_checkpoint, restore_checkpoint
from reptile_fast.distributed import DistContext, distributed_fit, setup_from_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

RTOL, ATOL = 1e-5, 1e-6


def _trainer():
    torch.manual_seed(0)
    return Reptile(MLP(1, 8, 1), backend="torch", inner_steps=2, inner_batch_size=4)


# ---------------------------------------------------------------------------------- in-process
def test_fit_refuses_to_continue_a_distributed_checkpoint_from_one_stream(tmp_path):
    """distributed_fit draws task j of step t from (seed, t, j); Reptile.fit from one generator.
    Continuing the one with the other gave another run without a word."""
    distributed_fit(_trainer(), Sine(), 3, meta_batch_size=4, seed=5, context=DistContext.single(), progress=False,
                    checkpoint_dir=tmp_path)
    fresh = _trainer()
    before = copy.deepcopy(fresh.model.state_dict())
    for generator in (None, torch.Generator()):
        with pytest.raises(ValueError, match=r"written by distributed_fit.*seed 5, meta_batch_size 4.*"
                                             r"distributed_fit\(\.\.\., seed=5, meta_batch_size=4"):
            fresh.fit(Sine(), 6, meta_batch_size=4, generator=generator, progress=False, resume_from=tmp_path)
    assert fresh.iteration == 0 and all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())
    # distributed_fit continues it (one process here), to where an uninterrupted run ends
    distributed_fit(fresh, Sine(), 6, meta_batch_size=4, seed=5, context=DistContext.single(), progress=False,
                    resume_from=tmp_path)
    whole = _trainer()
    distributed_fit(whole, Sine(), 6, meta_batch_size=4, seed=5, context=DistContext.single(), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(fresh.model.parameters(), whole.model.parameters()))


def _corrupt(rng, what):
    if what == "torch":
        rng["torch"] = rng["torch"][:100]
    elif what == "numpy":
        rng["numpy"]["keys"] = rng["numpy"]["keys"][:10]
    elif what == "python":
        rng["python"]["internal"] = rng["python"]["internal"][:10]
    elif what == "generator":
        rng["generator"]["state"] = rng["generator"]["state"][:10]
    elif what == "cuda":
        rng["cuda"] = ["not a state"]


@pytest.mark.parametrize("what", ["torch", "numpy", "python", "generator", "cuda"])
def test_a_malformed_rng_state_is_refused_before_anything_changes(tmp_path, what):
    """Such a file passed load_checkpoint; restoring it replaced φ and the iteration, then failed
    inside torch.set_rng_state (RuntimeError), numpy (IndexError) or random (ValueError)."""
    _trainer().fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False, checkpoint_dir=tmp_path / "a")
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    _corrupt(state["rng"], what)
    atomic_torch_save(state, tmp_path / "b" / "checkpoint.pt")
    words = {"torch": "malformed torch RNG state", "numpy": "malformed numpy RNG state",
             "python": "malformed Python RNG state", "generator": "malformed generator state",
             "cuda": "malformed CUDA RNG state"}[what]
    with pytest.raises(ValueError, match=f"checkpoint .*checkpoint.pt has a {words}"):
        load_checkpoint(tmp_path / "b")
    fresh = _trainer()
    before = copy.deepcopy(fresh.model.state_dict())
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=words):  # a dict (as distributed_fit's ranks get) is checked too
        restore_checkpoint(fresh, state, generator=torch.Generator())
    assert fresh.iteration == 0 and all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("trainer", ["model", "name"])
def test_distributed_fit_names_a_trainer_that_is_not_one(trainer):
    value = MLP() if trainer == "model" else "torch"
    with pytest.raises(TypeError, match="trainer must be a reptile_fast.Reptile"):
        distributed_fit(value, Sine(), 2, meta_batch_size=2, seed=0, context=DistContext.single())


@pytest.mark.parametrize("device, exc, words", [
    ("gpu0", ValueError, "unknown device .gpu0."),
    (1.5, TypeError, "device must be a torch.device or a name"),
    pytest.param("cuda", ValueError, "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_setup_from_env_names_a_bad_device(monkeypatch, device, exc, words):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(exc, match=words):
        setup_from_env(device=device)
    if device != "cuda":
        with pytest.raises(exc, match=words):
            DistContext.single(device)


# ---------------------------------------------------------------------------------- three processes
SUBGROUP = dict(name="subgroup", group_ranks=[1, 2], backend="torch", reduction="mean", meta_batch_size=5)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_ranks")
    # a truncated checkpoint: rank 0 reads it, every rank must raise the same error
    bad = out / "truncated"
    W.single_process(dict(name="writer", iterations=2, checkpoint_dir=str(bad)), out)
    (bad / "checkpoint.pt").write_bytes((bad / "checkpoint.pt").read_bytes()[:500])
    scenarios = [SUBGROUP,
                 dict(name="truncated", iterations=4, resume_from=str(bad)),
                 dict(name="adam_lr", outer_optimizer=True, adam_lr_last_rank=0.02),
                 dict(name="thread", iterations=5, stop_check_every=1, checkpoint_dir=str(out / "thread"),
                      thread_last_rank=True),
                 dict(name="sigint", iterations=6, checkpoint_dir=str(out / "sigint"), signal_at=2,
                      signal=2, stop_check_every=1),
                 dict(name="after", iterations=2)]
    codes = W.run_job(3, out, scenarios)
    assert codes == [0, 0, 0], codes
    return out


def test_a_subgroup_without_global_rank_0_trains_what_one_process_does(three_ranks, tmp_path):
    """Ranks 1 and 2 of 3 train on DistContext.from_group(new_group([1, 2])); rank 0 is not in it."""
    ranks = [torch.load(three_ranks / f"subgroup.{r}.pt") for r in range(2)]  # saved by group rank
    for res in ranks:
        assert res["error"] is None, res["error"]
    baseline = W.single_process({k: v for k, v in SUBGROUP.items() if k != "group_ranks"}, tmp_path)
    for k, want in baseline["params"].items():
        assert torch.equal(ranks[1]["params"][k], ranks[0]["params"][k]), k
        torch.testing.assert_close(ranks[0]["params"][k], want, rtol=RTOL, atol=ATOL, msg=k)
    # global rank 0, outside the group, is told so (it got rank -1 and trained as a bogus rank)
    outside = torch.load(three_ranks / "subgroup-outside.0.pt")
    assert outside["error"] is not None and outside["error"][0] == "ValueError", outside["error"]
    assert "global rank 0) is not a member of the group" in outside["error"][1]


def test_ranks_with_other_outer_optimizer_settings_are_refused_on_every_rank(three_ranks):
    for r in range(3):
        res = torch.load(three_ranks / f"adam_lr.{r}.pt")
        assert res["error"] is not None and res["error"][0] == "ValueError", res["error"]
        assert "different settings" in res["error"][1] and "outer_optimizer" in res["error"][1]
        assert "'lr': 0.01" in res["error"][1] and "'lr': 0.02" in res["error"][1]
    for r in range(3):  # the group stays usable
        assert torch.load(three_ranks / f"after.{r}.pt")["error"] is None


def test_resuming_from_the_previous_checkpoint_never_rotates_a_damaged_latest_over_it(tmp_path, monkeypatch):
    """load_checkpoint's advice for a damaged checkpoint.pt is to resume from checkpoint.prev.pt.
    The next save then copied the damaged latest over checkpoint.prev.pt before writing the new
    one: a crash (or a full disk) in that write left no loadable checkpoint in the directory."""
    from reptile_fast import checkpoint

    gen = torch.Generator().manual_seed(0)
    trainer = _trainer()
    trainer.fit(Sine(), 4, generator=gen, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:300])  # damaged on disk
    with pytest.raises(ValueError, match="may be intact"):
        load_checkpoint(tmp_path)

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_torch_save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _trainer().fit(Sine(), 6, generator=torch.Generator(), progress=False, checkpoint_dir=tmp_path,
                       checkpoint_every=2, resume_from=tmp_path / "checkpoint.prev.pt")
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["trainer"]["iteration"] == 2


def test_a_rank_training_outside_the_main_thread_keeps_step_with_the_others(three_ranks, tmp_path):
    """With checkpoint_dir and handle_signals, the ranks agree on stopping every stop_check_every
    meta-steps (one all-reduce) -- but only the ranks whose signal handlers were installed did, and
    Python installs none outside the main thread: such a rank skipped the all-reduce and the
    collectives of the ranks no longer matched (a DistributedError, or wrong sums)."""
    ranks = [torch.load(three_ranks / f"thread.{r}.pt") for r in range(3)]
    for res in ranks:
        assert res["error"] is None, res["error"]
    baseline = W.single_process(dict(name="thread1", iterations=5), tmp_path)
    for k, want in baseline["params"].items():
        for res in ranks:
            torch.testing.assert_close(res["params"][k], want, rtol=RTOL, atol=ATOL, msg=k)
    assert load_checkpoint(three_ranks / "thread")["trainer"]["iteration"] == 5


def test_one_process_stops_after_the_meta_step_that_got_the_signal(tmp_path):
    """Alone (e.g. `reptile-fast sine --resume` of a torchrun run without torchrun) there is no rank
    to agree with, yet the run went on to the next multiple of stop_check_every (10) meta-steps."""
    import os
    import signal

    from reptile_fast.signals import TrainingInterrupted

    def callback(iteration, _metrics):
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = _trainer()
    with pytest.raises(TrainingInterrupted, match="after meta-step 3 of 50") as info:
        distributed_fit(trainer, Sine(), 50, meta_batch_size=2, seed=0, context=DistContext.single(),
                        progress=False, callback=callback, checkpoint_dir=tmp_path)
    assert info.value.exit_code == 143 and trainer.iteration == 3
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 3


@pytest.mark.parametrize("other", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                   lambda p: torch.optim.AdamW(p, lr=0.01)], ids=["SGD", "AdamW"])
def test_resuming_with_another_outer_optimizer_class_is_refused_before_anything_changes(tmp_path, other):
    """torch's load_state_dict took Adam's state into SGD (then KeyError 'momentum' at the first
    step, after φ had been replaced) or into AdamW (which ran with Adam's settings); only a
    warning named the difference."""
    def trainer(make):
        torch.manual_seed(0)
        model = MLP(1, 8, 1)
        return Reptile(model, backend="torch", inner_steps=2, inner_batch_size=4, outer_optimizer=make(model.parameters()))

    trainer(lambda p: torch.optim.Adam(p, lr=0.01)).fit(Sine(), 2, generator=torch.Generator().manual_seed(0),
                                                        progress=False, checkpoint_dir=tmp_path)
    fresh = trainer(other)
    before = copy.deepcopy(fresh.model.state_dict())
    with pytest.raises(ValueError, match=r"outer_optimizer state is Adam state, but this trainer's outer optimizer "
                                         r"is (SGD|AdamW)"):
        fresh.fit(Sine(), 4, generator=torch.Generator(), progress=False, resume_from=tmp_path)
    assert fresh.iteration == 0 and all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())
    assert not fresh.outer_optimizer.state


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(reducer="mean"), TypeError, "reducer must be callable"),
    (dict(reducer=lambda d, l: (d, l)), ValueError, "reducer's mean loss must be a one-element tensor, got \\(2, 2\\)"),
    (dict(reducer=lambda d, l: ([x.mean(0) for x in d][:-1], l.mean())), ValueError,
     "one mean delta per parameter \\(6\\), got 5"),
    (dict(reducer=lambda d, l: (list(d), l.mean())), ValueError,
     "mean delta for network.0.weight must be \\(8, 1\\) torch.float32 on cpu .*got \\(2, 8, 1\\)"),
    (dict(sampler="indexed"), TypeError, "sampler must have a draw\\(first_iteration, m\\) method"),
    (dict(callbacks=[1]), TypeError, "callbacks\\[0\\] must be a reptile_fast.loop.Callback"),
    (dict(callbacks=3), TypeError, "callbacks must be a list"),
])
def test_fit_extension_points_name_a_wrong_object(kwargs, exc, words):
    """fit's sampler / reducer / callbacks (what distributed_fit plugs in): a wrong one failed deep
    in the loop ("'str' object is not callable", an AttributeError, a size mismatch in the update)."""
    trainer = _trainer()
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(exc, match=words):
        trainer.fit(Sine(), 2, meta_batch_size=2, progress=False, **kwargs)
    assert trainer.iteration == 0 and all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("obj", [MLP(1, 8, 1), "trainer"], ids=["module", "string"])
def test_save_checkpoint_names_an_object_that_is_not_a_trainer(tmp_path, obj):
    """A model (it has a state_dict, not the trainer's) failed with KeyError 'model', a string
    with AttributeError."""
    from reptile_fast import save_checkpoint

    with pytest.raises(TypeError, match="trainer must be a reptile_fast.Reptile"):
        save_checkpoint(tmp_path, obj)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_truncated_checkpoint_is_refused_on_every_rank(three_ranks):
    for r in range(3):
        res = torch.load(three_ranks / f"truncated.{r}.pt")
        assert res["error"] is not None and res["error"][0] == "ValueError", res["error"]
        assert "checkpoint.pt is not a torch checkpoint archive (500 bytes): truncated" in res["error"][1]


def test_every_rank_reports_the_signal_another_rank_received(three_ranks):
    """SIGINT to the last rank: the others reported SIGTERM (their fallback) and would exit 143,
    that rank 130."""
    for r in range(3):
        res = torch.load(three_ranks / f"sigint.{r}.pt")
        assert res["error"] is not None and res["error"][0] == "TrainingInterrupted", res["error"]
        assert "interrupted by SIGINT after meta-step 2 of 6" in res["error"][1], res["error"]
    assert load_checkpoint(three_ranks / "sigint")["trainer"]["iteration"] == 2


def test_stop_agreements_come_sooner_when_meta_steps_are_slow(monkeypatch):
    """The ranks agree on stopping every stop_check_every meta-steps at most, and after about
    STOP_CHECK_SECONDS of meta-steps when they are slow: at 10 s per meta-step, 10 meta-steps
    between agreements made a SIGTERM wait ~100 s, past torchrun's 30 s before its SIGKILL."""
    from reptile_fast.distributed import training as T
    from reptile_fast.signals import DeferredSignals

    clock = [0.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])

    class Ctx:  # a distributed context whose all-reduce is the identity (one rank's view)
        is_distributed, device = True, torch.device("cpu")

        def all_reduce_(self, t, what, op="sum"):
            assert op == "max"
            return t

    class Loop:
        iteration = 0
        stopped = False

        def stop(self):
            self.stopped = True

    def agreements_at(seconds_per_step, steps=40):
        cb = T._RankCallback(Ctx(), DeferredSignals(), None, 10, agree=True)
        loop = Loop()
        cb.on_start(loop)
        at = []
        for i in range(1, steps + 1):
            clock[0] += seconds_per_step
            loop.iteration = i
            before = cb.agreements
            cb.on_chunk_end(loop, read=False)
            if cb.agreements > before:
                at.append(i)
        return at

    assert agreements_at(0.01) == [1, 11, 21, 31]               # fast: every 10, after a first measure
    assert agreements_at(1.0) == [1, 6, 11, 16, 21, 26, 31, 36]  # 5 s worth
    assert agreements_at(10.0, 5) == [1, 2, 3, 4, 5]             # slower than 5 s: every meta-step
    assert T.next_agreement_gap(0.0, 10) == 10 and T.next_agreement_gap(float("nan"), 10) == 10
