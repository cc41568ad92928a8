"""The fused Triton stepper replaying chunks of whole meta-steps (CUDA graphs) in the training loop.

On CUDA the real graphs run.  On the CPU (Triton interpreter) a stand-in "graph" that records the
chunk program at capture and runs it at replay exercises everything around the capture: static
buffers refilled before every replay, ε and meta-step numbers moved on the device, the losses
copied out, the first chunk run plainly, remainders run plainly, a failed capture falling back.

Oracles: the same stepper without graphs, chunk 1 (bitwise: the same kernels on the same values),
and backend "reference" (rtol 1e-5 / atol 1e-6: fp32 against fp32 in another summation order).
Every run sees the same per-meta-step tasks and plans, whatever its chunking (``FixedDraws``).
"""
import copy
import warnings

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import MLP, Reptile, Sine, sample_indices  # noqa: E402
from reptile_fast.backends.triton import GRAPH_MAX_TASKS, TritonBackend, TritonFusedStepper  # noqa: E402
from reptile_fast.core import NonFiniteError  # noqa: E402
from reptile_fast.loop import Sampler  # noqa: E402
from reptile_fast.tasks.base import TaskBatch  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
T, STEPS, BATCH = 3, 2, 10
OPTIONS = {"kernel": "v2", "fused": True, "cuda_graphs": True, "chunk": 4}


class FixedDraws(Sampler):
    """Meta-step t's tasks and plans are fixed in advance: chunking cannot change what a step sees."""

    def __init__(self, iterations, device, poison_step=None):
        g = torch.Generator().manual_seed(21)
        draws = [(Sine().sample(T, generator=g), sample_indices(T, STEPS, 50, BATCH, generator=g))
                 for _ in range(iterations)]  # step t's draw does not depend on how many follow
        self.tasks, self.plans = [d[0] for d in draws], [d[1] for d in draws]
        if poison_step is not None:  # finite targets whose squared error overflows to inf
            y = self.tasks[poison_step - 1].y.clone()
            y[1, :, 0] = 3e38
            self.tasks[poison_step - 1] = TaskBatch(self.tasks[poison_step - 1].x, y)
        self.device = device

    def draw(self, first_iteration, m):
        rows = range(first_iteration - 1, first_iteration - 1 + m)
        x = torch.cat([self.tasks[i].x for i in rows]).to(self.device)
        y = torch.cat([self.tasks[i].y for i in rows]).to(self.device)
        return TaskBatch(x, y), torch.cat([self.plans[i] for i in rows]).to(self.device)


class StandInGraph:
    """Capture records the body without running it (as a CUDA graph capture); replay runs it."""

    captures = replays = 0

    def __init__(self, body):
        self.body = body
        StandInGraph.captures += 1

    def replay(self):
        StandInGraph.replays += 1
        self.body()


def _trainer(model, device, options, final=0.05):
    tri = Reptile(copy.deepcopy(model).to(device), backend="triton", inner_steps=STEPS, inner_batch_size=BATCH,
                  outer_lr=0.3, outer_lr_final=final, backend_options=options)
    if device == "cpu" and options.get("cuda_graphs"):
        tri._fused._capture, tri._fused.cuda_graphs = StandInGraph, True  # off CUDA: the stand-in
    return tri


def _fit(trainer, iterations, device, **kw):
    return trainer.fit(None, iterations, meta_batch_size=T, sampler=FixedDraws(iterations, device, **kw),
                       progress=False, handle_signals=False)


def _params(trainer):
    return [p.detach().cpu() for p in trainer.model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_chunks_equal_plain_launches_and_the_reference(device):
    """14 meta-steps in chunks of 4: warm-up + capture, 2 replays, a plain remainder of 2."""
    torch.manual_seed(3)
    model = MLP(1, 16, 1, depth=2)
    StandInGraph.captures = StandInGraph.replays = 0
    graphed = _trainer(model, device, OPTIONS)
    plain = _trainer(model, device, {"kernel": "v2", "fused": True})
    ref = Reptile(copy.deepcopy(model), backend="reference", inner_steps=STEPS, inner_batch_size=BATCH,
                  outer_lr=0.3, outer_lr_final=0.05)
    got, same, want = _fit(graphed, 14, device), _fit(plain, 14, device), _fit(ref, 14, "cpu")
    stepper = graphed._fused
    assert stepper.chunk == 4 and plain._fused.chunk == 1
    assert graphed.last_fit_stats["mode"] == "graphs" and stepper.graph_fallback_reason is None
    if device == "cpu":
        assert (StandInGraph.captures, StandInGraph.replays) == (1, 2), "one capture, replayed twice"
    assert got["loss"] == same["loss"], "per-meta-step losses: graphs vs plain launches (bitwise)"
    for k, (a, b) in enumerate(zip(_params(graphed), _params(plain))):
        assert torch.equal(a, b), f"φ[{k}] after 14 meta-steps: graphs vs plain launches"
    assert got["loss"] == pytest.approx(want["loss"], rel=RTOL, abs=ATOL), "losses vs the reference"
    for k, (a, b) in enumerate(zip(_params(graphed), _params(ref))):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"φ[{k}] vs the reference\n{m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN arithmetic
def test_a_nonfinite_meta_step_inside_a_replayed_chunk(device):
    """Meta-step 7 (the 3rd of the 2nd chunk: a replay) overflows to inf: fit raises naming it,
    with φ and the iteration as after meta-step 6."""
    torch.manual_seed(4)
    model = MLP(1, 16, 1, depth=2)
    graphed = _trainer(model, device, OPTIONS, final=None)  # constant ε: 6 steps of a 12-step run = a 6-step run
    with pytest.raises(NonFiniteError, match="meta-step 7") as info:
        _fit(graphed, 12, device, poison_step=7)
    assert info.value.iteration == 7 and graphed.iteration == 6
    six = _trainer(model, device, {"kernel": "v2", "fused": True}, final=None)
    _fit(six, 6, device)
    for k, (a, b) in enumerate(zip(_params(graphed), _params(six))):
        assert torch.equal(a, b), f"φ[{k}] after the failed run vs 6 good meta-steps"
    graphed.check_finite()  # re-armed


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_capture_warns_and_carries_on_without_graphs(device):
    def broken(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    torch.manual_seed(5)
    model = MLP(1, 16, 1, depth=1)
    graphed = _trainer(model, device, OPTIONS)
    graphed._fused._capture, graphed._fused.cuda_graphs = broken, True
    plain = _trainer(model, device, {"kernel": "v2", "fused": True})
    with pytest.warns(RuntimeWarning, match="CUDA graph failed.*not permitted"):
        got = _fit(graphed, 9, device)
    assert graphed._fused.mode == "launches" and "not permitted" in graphed.last_fit_stats["fallback_reason"]
    assert got["loss"] == _fit(plain, 9, device)["loss"]
    for a, b in zip(_params(graphed), _params(plain)):
        assert torch.equal(a, b)


def test_chunk_sizes():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MLP(1, 8, 1, depth=1).to(device)
    tri = Reptile(model, backend="triton", backend_options={"kernel": "v2", "fused": True, "chunk": 100})
    assert tri.stepper(1).chunk == 100
    assert tri.stepper(1, chunk=150).chunk == 75, "a divisor of checkpoint_every"
    assert tri.stepper(1, chunk=7).chunk == 7
    assert tri.stepper(1, chunk=101).chunk == 1, "a prime checkpoint interval: one meta-step per run"
    assert tri._fused.mode == "launches", "no graph has run"
    assert tri.stepper(GRAPH_MAX_TASKS // 10, chunk=None).chunk == 10, "at most GRAPH_MAX_TASKS tasks per replay"
    assert tri.stepper(2 * GRAPH_MAX_TASKS).chunk == 1
    assert tri.stepper(1, chunk=1).chunk == 1, "meta_step"
    with pytest.raises(ValueError, match="needs fused=True"):
        TritonBackend(kernel="v2", chunk=4)
    with pytest.raises(ValueError, match="chunk"):
        TritonBackend(kernel="v2", fused=True, chunk=0)
    with pytest.raises(TypeError, match="cuda_graphs"):
        TritonFusedStepper(model, tri.config, cuda_graphs="yes")


def test_graphs_are_off_on_the_cpu():
    """cuda_graphs is ignored off CUDA: one meta-step per run, no capture, mode "launches"."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tri = Reptile(MLP(1, 8, 1, depth=1), backend="triton", backend_options={"kernel": "v2", "fused": True,
                                                                                 "cuda_graphs": True})
    assert tri.stepper(2).chunk == 1 and tri._fused.mode == "launches"


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoints_on_chunk_boundaries_and_exact_resume(device, tmp_path):
    """checkpoint_every=6 with chunks of 4 asked: chunks of 3 (a divisor), checkpoints at 6 and 12,
    and a run resumed from meta-step 6 ends bitwise where the uninterrupted one does."""
    torch.manual_seed(6)
    model = MLP(1, 16, 1, depth=1)  # constant ε: a 6-step fit is the first half of a 12-step one
    gen_device = device if device == "cuda" else "cpu"

    def fit(trainer, iterations, **kw):
        return trainer.fit(Sine(), iterations, meta_batch_size=T, progress=False, handle_signals=False,
                           generator=torch.Generator(gen_device).manual_seed(2), checkpoint_every=6, **kw)

    whole = _trainer(model, device, OPTIONS, final=None)
    fit(whole, 12, checkpoint_dir=tmp_path / "whole")
    assert whole._fused.chunk == 3
    first = _trainer(model, device, OPTIONS, final=None)
    fit(first, 6, checkpoint_dir=tmp_path / "part")
    resumed = _trainer(model, device, OPTIONS, final=None)
    fit(resumed, 12, checkpoint_dir=tmp_path / "part", resume_from=tmp_path / "part")
    assert resumed.iteration == 12
    for k, (a, b) in enumerate(zip(_params(resumed), _params(whole))):
        assert torch.equal(a, b), f"φ[{k}]: resumed at 6 vs uninterrupted"


def test_fused_and_graphs_from_the_environment(monkeypatch):
    """How the CLI jobs opt in: $REPTILE_FAST_TRITON_KERNEL=v2, _FUSED=1, _CUDA_GRAPHS=1."""
    from reptile_fast.backends.triton import CUDA_GRAPHS_ENV, FUSED_ENV, KERNEL_ENV

    monkeypatch.setenv(KERNEL_ENV, "v2")
    monkeypatch.setenv(FUSED_ENV, "1")
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    backend = TritonBackend()
    assert (backend.kernel, backend.fused, backend.cuda_graphs) == ("v2", True, True)
    assert TritonBackend(fused=False).fused is False, "an argument wins over the environment"
    # the environment's fused is a preference: it gives way where the fused stepper cannot run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MLP(1, 8, 1, depth=1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with_optimizer = Reptile(model, backend="triton", outer_optimizer=optimizer)
    assert with_optimizer._fused is None and with_optimizer.stepper(1) is with_optimizer._eager
    env_fused = Reptile(MLP(1, 8, 1, depth=1).to(device), backend="triton", inner_steps=1)
    assert env_fused.stepper(2) is env_fused._fused
    env_fused.fit(Sine(), 1, meta_batch_size=2, progress=False, reducer=lambda d, l: (
        [x.mean(0) for x in d], l.mean()))  # a reducer: this fit runs the eager stepper
    assert env_fused.last_fit_stats["stepper"] == "triton"
    monkeypatch.setenv(KERNEL_ENV, "v1")
    assert TritonBackend().fused is False, "kernel v1: the fused preference does not apply"
    with pytest.raises(ValueError, match="REPTILE_FAST_TRITON_KERNEL=v2"):
        TritonBackend(fused=True)


def test_graph_replays_read_every_ten_chunks_by_default(monkeypatch):
    """A read waits for every queued chunk and the next chunk is drawn after it, so each read
    idles the GPU for a chunk's host work: with CUDA-graph replays fit reads every
    ``GRAPH_READ_CHUNKS`` chunks unless ``log_every`` is given (and at the end); without graphs,
    every ``DEFAULT_LOG_EVERY`` meta-steps (made 4 here, so that a short run shows it).  Reads
    counted through a callback's ``on_read``."""
    from reptile_fast import loop as L

    monkeypatch.setattr(L, "DEFAULT_LOG_EVERY", 4)
    assert L.GRAPH_READ_CHUNKS == 10
    monkeypatch.setattr(L, "GRAPH_READ_CHUNKS", 3)  # 3 chunks of 2: a 12-step run shows it (CI time)

    class Reads(L.Callback):
        def __init__(self):
            self.at = []

        def on_read(self, loop, losses):
            self.at.append(loop.iteration)

    model = MLP(1, 8, 1)
    for options, log_every, want in ((dict(OPTIONS, chunk=2), None, [6, 12]),       # 3 chunks of 2
                                     (dict(OPTIONS, chunk=2), 8, [8, 12]),           # as given
                                     ({"kernel": "v2", "fused": True}, None, [4, 8, 12])):
        t = _trainer(model, "cpu", options)
        reads = Reads()
        t.fit(None, 12, meta_batch_size=T, sampler=FixedDraws(12, "cpu"), progress=False, handle_signals=False,
              log_every=log_every, callbacks=[reads])
        assert t.last_fit_stats["mode"] == ("graphs" if options.get("cuda_graphs") else "launches")
        assert reads.at == want, f"{options}, log_every={log_every}: reads at {reads.at}"
        assert t.last_fit_stats["log_every"] == want[0]
