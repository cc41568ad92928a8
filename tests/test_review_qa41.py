"""QA41: the timing stage's CUDA-graph captures after the H200 run of 2026-12-04
(bench/results/gpu-h200-2026-12-04/defaults-w4-pps2): v1-tf32x3's capture at T = 1 was
invalidated (cudaErrorStreamCaptureInvalidated) and every later JAX row failed with "Callback
registry is closed".  Likely cause: torch.cuda.graph's default "global" capture mode, under which
a CUDA call from *another* thread (XLA's stream-status poller, running since JAX's first use)
invalidates the capture, and the failed poll closes JAX's stream for good.

On the fake CUDA of test_review_qa35 (``fake_cuda``), with a ``do_bench_cudagraph`` that captures
as Triton 3.6's does (``with torch.cuda.graph(g):`` after a warm-up call and 5 estimate calls):

* every capture is thread-local, with Python's cyclic GC off, and restores the current stream;
* before any capture, each timed callable ran outside a capture for every input set, with the
  arguments the capture uses;
* a failed capture is an error row with its reason; the run recovers (synchronize + a probe) and
  times the next cases; later error rows (JAX's) name the failed capture; the summary says so.
"""
import contextlib
import copy
import gc
import types

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from bench import gpu_check as G  # noqa: E402
from test_review_qa35 import _State, _graph, _stage_timing, fake_cuda  # noqa: E402,F401  (the fake CUDA)

CAPTURES = []  # (capture_error_mode, gc enabled inside the capture) of each fake capture


@contextlib.contextmanager
def _recording_graph(g, pool=None, stream=None, capture_error_mode="global"):
    """torch.cuda.graph on the fake CUDA, recording the mode it was given and whether GC ran."""
    with _graph(g, pool, stream, capture_error_mode):
        CAPTURES.append((capture_error_mode, gc.isenabled()))
        yield


def _triton_like_bench(fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
    """Triton 3.6's do_bench_cudagraph, shortened: a warm-up call, estimate calls, then
    ``with torch.cuda.graph(g):`` (looked up at call time, as Triton does) around the calls."""
    import torch as t

    fn()
    for _ in range(2):
        fn()
    g = t.cuda.CUDAGraph()
    with t.cuda.graph(g):
        for _ in range(2):
            fn()
    g.replay()
    return 0.25


@pytest.fixture
def triton_like(fake_cuda, monkeypatch):  # noqa: F811
    import triton.testing as tt

    CAPTURES.clear()
    monkeypatch.setattr(torch.cuda, "graph", _recording_graph)
    monkeypatch.setattr(tt, "do_bench_cudagraph", _triton_like_bench)
    return fake_cuda


def test_timed_captures_are_thread_local_without_gc_and_leave_torch_cuda_graph_as_it_was(triton_like):
    calls = []
    rot = G.Rotation([lambda: calls.append(0), lambda: calls.append(1)])
    assert gc.isenabled()
    ms, timer = G._time_ms(rot, triton_like, graph=True, sets=rot.sets)
    assert ms == 0.25 / 2 and "thread_local capture" in timer and "do_bench_cudagraph" in timer
    assert CAPTURES == [("thread_local", False)] and gc.isenabled()
    assert torch.cuda.graph is _recording_graph  # the timer's swap is undone
    # the whole graphed meta-step captures the same way
    CAPTURES.clear()
    G._graphed_full_meta_step(1, triton_like, (1, 8, 8, 1), replays=2)  # a fake replay is "wrong": not timed
    assert CAPTURES == [("thread_local", False)]


def test_a_capture_that_fails_at_its_end_raises_capture_failed_and_restores_gc_and_stream(fake_cuda, monkeypatch):  # noqa: F811
    streams = []
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: streams.append(s))

    @contextlib.contextmanager
    def invalidated(g, pool=None, stream=None, capture_error_mode="global"):
        yield
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    with pytest.raises(G.CaptureFailed, match="capture failed: RuntimeError: CUDA error: operation failed") as info:
        with G._capture(invalidated, torch.cuda.CUDAGraph()):
            pass
    assert isinstance(info.value.__cause__, RuntimeError) and gc.isenabled() and len(streams) == 1

    # a failing call inside the capture, then the end failing too: both errors are in the message
    @contextlib.contextmanager
    def body_then_end(g, pool=None, stream=None, capture_error_mode="global"):
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    with pytest.raises(G.CaptureFailed, match=r"after ValueError: a launch failed"):
        with G._capture(body_then_end, torch.cuda.CUDAGraph()):
            raise ValueError("a launch failed")
    assert gc.isenabled()


def test_recovery_says_when_cuda_or_jax_is_not_usable(fake_cuda, monkeypatch):  # noqa: F811
    from bench import jax_peer

    closed = [False]

    def block_until_ready(x):
        if closed[0]:
            raise RuntimeError("CANCELLED: Callback registry is closed.")
        return x

    fake_jax = types.SimpleNamespace(device_put=lambda a, dev: np.asarray(a), block_until_ready=block_until_ready)
    monkeypatch.setattr(jax_peer, "load_jax", lambda: fake_jax)
    monkeypatch.setattr(jax_peer, "_jax_device", lambda device: None)
    assert G._recover_after_capture(fake_cuda) == {"cuda_usable": True}
    assert G._recover_after_capture(fake_cuda, jax_used=True) == {"cuda_usable": True, "jax_usable": True}
    closed[0] = True
    state = G._recover_after_capture(fake_cuda, jax_used=True)
    assert state["jax_usable"] is False and "Callback registry is closed" in state["jax_error"]

    def lost(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", lost)
    state = G._recover_after_capture(fake_cuda)
    assert state["cuda_usable"] is False and "illegal memory access" in state["cuda_error"]


def _instrumented_stage(triton_like, tmp_path, monkeypatch, fail_capture_of=None, Ts=(1, 2)):
    """The non-smoke timing stage at ``Ts`` with v1 and v1-tf32x3, torch, torch-graph and a
    JAX stand-in (backend torch underneath; a closed "stream" once the injected capture failure
    happened, as XLA's after a failed status poll).  Returns (stage, log of calls)."""
    from bench import jax_peer
    from bench import providers as P
    from reptile_fast.kernels import mlp_inner_loop as K

    log = []  # (what, T, set or args, capturing)
    closed = [False]
    monkeypatch.setattr(G, "TIMED_T", Ts)
    monkeypatch.setattr(G, "VARIANTS", [v for v in G.VARIANTS if v[0] in ("v1", "v1-tf32x3")])
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(G, "cli_sine_row", lambda *a, **k: {"provider": "cli-sine-gpu", "T": 1, "status": "skipped"})
    monkeypatch.setattr(G, "_graphed_full_meta_step", lambda T, device, dims: {"ms": 1.0, "wrong": None})

    real_kernel = K.mlp_inner_loop

    def kernel(x, y, plan, params, acts, **kw):
        # what the launch gets: the tensors (by identity) and the settings
        args = (id(x), id(y), id(plan), tuple(id(p) for p in params), id(kw["out"]), id(kw["out_losses"]),
                kw["precision"], repr(kw["config"]), kw["check_values"], kw["lr"], tuple(acts))
        log.append(("kernel", x.shape[0], args, _State.capturing))
        if _State.capturing and fail_capture_of == (kw["precision"], x.shape[0]):
            closed[0] = True  # what XLA's poller did when its query failed during the capture
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return real_kernel(x, y, plan, params, acts, **kw)

    monkeypatch.setattr(K, "mlp_inner_loop", kernel)

    torch_prov = P.get_provider("torch")
    prepares = {}

    def prepare(name):
        def prep(problem):
            T = problem.point.meta_batch
            prepares[(name, T)] = prepares.get((name, T), 0) + 1
            # the stage asks for "torch" twice per T: the eager row, then torch-graph
            prov_name = "torch-graph" if name == "torch" and prepares[(name, T)] == 2 else name
            prepared = torch_prov.prepare(problem)

            def run(r):
                if prov_name == "jax" and closed[0]:
                    raise RuntimeError("CANCELLED: Callback registry is closed. This usually means that the "
                                       "stream is in an error state or being destroyed.")
                log.append((prov_name, T, r, _State.capturing))
                return prepared.run(r)

            sync = (lambda out: None) if prov_name == "jax" else None
            return P.Prepared(run, prepared.to_params, sync)
        return prep

    def get_provider(name):
        if name in ("torch-vmap", "seed"):
            return types.SimpleNamespace(name=name, unavailable=lambda device: "not in this test")
        prov = copy.copy(torch_prov)  # its precision, checks and limits; run through prepare below
        prov.name, prov.unavailable, prov.prepare = name, (lambda device: None), prepare(name)
        return prov

    monkeypatch.setattr(P, "get_provider", get_provider)
    fake_jax = types.SimpleNamespace(
        device_put=lambda a, dev: np.asarray(a),
        block_until_ready=lambda x: (_ for _ in ()).throw(RuntimeError("CANCELLED: Callback registry is closed."))
        if closed[0] else x)
    monkeypatch.setattr(jax_peer, "load_jax", lambda: fake_jax)
    monkeypatch.setattr(jax_peer, "_jax_device", lambda device: None)
    return _stage_timing(triton_like, tmp_path, smoke=False), log


def test_every_timed_callable_ran_for_every_input_set_with_the_capture_arguments_first(triton_like, tmp_path, monkeypatch):
    """(a) Nothing is first done inside a capture: before a variant's (or torch-graph's) first
    captured call, its launch ran outside any capture for every input set, with the same
    tensors and settings as the captured launch (so no first-time kernel load, compilation or
    allocation outside the graph's pool happens while capturing)."""
    stage, log = _instrumented_stage(triton_like, tmp_path, monkeypatch)
    rows = {(r["provider"], r["T"]): r for r in stage["rows"]}
    for key in (("v1", 1), ("v1-tf32x3", 1), ("v1", 2), ("v1-tf32x3", 2), ("torch-graph", 1), ("jax", 2)):
        assert "ms" in rows[key], (key, rows[key].get("status"), rows[key].get("reason"))
    assert "thread_local capture" in rows[("v1", 1)]["timer"] and "capture_failures" not in stage
    assert CAPTURES and all(c == ("thread_local", False) for c in CAPTURES)
    # kernel launches: per T and precision, the captured launches' arguments were all seen before
    # any capture of that case, and every input set (its own tensors) was launched before
    for T in (1, 2):
        for precision in ("ieee", "tf32x3"):
            calls = [(args, cap) for what, t, args, cap in log if what == "kernel" and t == T and args[6] == precision]
            first = next(i for i, (_, cap) in enumerate(calls) if cap)
            before = {args for args, cap in calls[:first]}
            assert not any(cap for _, cap in calls[:first])
            assert len({a[:3] for a in before}) == G.ROTATIONS  # every input set's x, y, plan
            assert {args for args, cap in calls if cap} <= before, (T, precision)
    # torch-graph: prepared.run(r) for every r (check_prepared) before its capture
    for T in (1, 2):
        runs = [(r, cap) for what, t, r, cap in log if what == "torch-graph" and t == T]
        first = next(i for i, (_, cap) in enumerate(runs) if cap)
        assert {r for r, _ in runs[:first]} == set(range(G.ROTATIONS))
        assert {r for r, cap in runs if cap} == set(range(G.ROTATIONS))


def test_a_failed_capture_is_recorded_the_run_recovers_and_later_errors_name_it(triton_like, tmp_path, monkeypatch):
    """(b, c) The 2026-12-04 sequence (T in the order 4096, 1, 65536 there; 2, 1, 3 here): JAX
    runs at the first T; v1-tf32x3's capture at T = 1 fails and JAX's stream is closed by it.
    The failed row has the reason; the run recovers (CUDA probed usable, JAX not), every other
    kernel case is still timed, and each later JAX error says it came after the failed capture
    of v1-tf32x3 at T=1, in its row and in the summary."""
    stage, _ = _instrumented_stage(triton_like, tmp_path, monkeypatch, fail_capture_of=("tf32x3", 1), Ts=(2, 1, 3))
    rows = {(r["provider"], r["T"]): r for r in stage["rows"]}
    assert "ms" in rows[("jax", 2)]
    failed = rows[("v1-tf32x3", 1)]
    assert failed["status"] == "error" and failed["capture_failed"] is True
    assert failed["reason"].startswith("CUDA-graph capture failed: RuntimeError: CUDA error: operation failed")
    recovery = failed["recovery"]
    assert recovery["cuda_usable"] is True and recovery["jax_usable"] is False
    assert "Callback registry is closed" in recovery["jax_error"] and "after_failed_capture" not in failed
    assert stage["capture_failures"] == [{"provider": "v1-tf32x3", "T": 1, **recovery}]
    for T in (2, 1, 3):
        for name in ("v1", "v1-tf32x3", "torch", "torch-graph"):
            if (name, T) != ("v1-tf32x3", 1):
                assert "ms" in rows[(name, T)] and "after_failed_capture" not in rows[(name, T)], (name, T)
    for T in (1, 3):
        jax = rows[("jax", T)]
        assert jax["status"] == "error" and jax["after_failed_capture"] == "v1-tf32x3 at T=1"
        assert jax["reason"].startswith("after the failed CUDA-graph capture of v1-tf32x3 at T=1: RuntimeError: "
                                        "CANCELLED: Callback registry is closed")
    assert gc.isenabled()
    lines = G.summary_lines({"stages": {"timing": stage}, "seconds": {}})
    assert "  failed CUDA-graph captures: v1-tf32x3 at T=1 (after it: cuda_usable True, jax_usable False)" in lines
    assert "  errors after a failed capture: jax T=1, jax T=3" in lines
