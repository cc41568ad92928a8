"""QA35: the GPU check's CUDA-only branches (bench/gpu_check.py, bench/gpu_sweep.py, bench/report.py)
run on the CPU under a fake CUDA, so a Python-level bug there does not spend the one GPU run.

The fake (``fake_cuda``): ``torch.device("cuda")`` is passed as the device, so every
``device.type == "cuda"`` branch is taken; a ``TorchFunctionMode`` turns every "cuda" device
argument into the CPU (tensors live on the CPU, Triton kernels run under the interpreter);
``torch.Generator``, ``torch.cuda.*`` (Event, Stream, CUDAGraph, graph, synchronize, properties)
and ``triton.testing.do_bench_cudagraph`` / ``do_bench`` are stand-ins with Triton 3.6's
signatures (triton/testing.py at v3.6.0: ``do_bench_cudagraph(fn, rep=20, grad_to_none=None,
quantiles=None, return_mode="mean")`` and ``do_bench(fn, warmup=25, rep=100, grad_to_none=None,
quantiles=None, return_mode="mean")``, both returning a float of ms).  While a fake graph is
being captured, a host read of a tensor (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``.cpu()``, ``.numpy()``) outside Triton's interpreter raises, as CUDA refuses a sync during a
capture.  A capture runs its body once (the captured work), a replay runs nothing.
"""
import contextlib
import inspect
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("triton")

from bench import gpu_check as G  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the fake CUDA
class _State:
    capturing = False
    captures = 0
    replays = 0
    syncs_in_capture = []


def _to_cpu(v):
    if isinstance(v, torch.device) and v.type == "cuda":
        return torch.device("cpu")
    if isinstance(v, str) and (v == "cuda" or v.startswith("cuda:")):
        return "cpu"
    return v


_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
               torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
               torch.Tensor.is_nonzero, torch.equal, torch.allclose, torch.Tensor.equal, torch.Tensor.allclose}


class _CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if func is torch.device:  # torch.device("cuda") stays a CUDA device: its .type picks the branches
            return func(*args, **(kwargs or {}))
        kwargs = {k: _to_cpu(v) for k, v in (kwargs or {}).items()}
        args = tuple(_to_cpu(a) for a in args)
        if _State.capturing and func in _HOST_READS and not _in_interpreter():
            _State.syncs_in_capture.append(getattr(func, "__name__", str(func)))
            raise RuntimeError("fake CUDA: operation not permitted when stream is capturing (a host read)")
        return func(*args, **kwargs)


def _in_interpreter():
    f = sys._getframe(2)
    while f is not None:
        if "triton" in f.f_code.co_filename and "interpreter" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


_RealGenerator = torch.Generator


class _GenMeta(type(_RealGenerator)):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _RealGenerator) if cls is _CpuGenerator else type.__instancecheck__(cls, obj)


class _CpuGenerator(_RealGenerator, metaclass=_GenMeta):
    def __new__(cls, device="cpu"):
        return _RealGenerator.__new__(cls, "cpu")

    def __init__(self, device="cpu"):
        pass


class _Event:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        assert self.t is not None and end.t is not None, "elapsed_time of an event never recorded"
        return 1e3 * (end.t - self.t)


class _Stream:
    def __init__(self, device=None, priority=0):
        pass

    def wait_stream(self, other):
        assert isinstance(other, _Stream), other

    def synchronize(self):
        pass


class _CUDAGraph:
    def __init__(self, *a, **k):
        self.captured = False

    def replay(self):
        assert self.captured, "replay of a graph never captured"
        _State.replays += 1


@contextlib.contextmanager
def _graph(g, pool=None, stream=None, capture_error_mode="global"):
    assert isinstance(g, _CUDAGraph), g
    assert not _State.capturing, "nested capture"
    _State.capturing = True
    try:
        yield g
    finally:
        _State.capturing = False
    g.captured = True
    _State.captures += 1


def _synchronize(device=None):
    if _State.capturing:
        _State.syncs_in_capture.append("torch.cuda.synchronize")
        raise RuntimeError("fake CUDA: synchronize while capturing")


def do_bench_cudagraph(fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
    """Triton 3.6's: warm-up call, an estimate call, a graph of ``n_repeat`` calls captured (its
    calls are what the replays compute), mean ms per call."""
    assert return_mode in ["min", "max", "mean", "median", "all"]
    fn()
    fn()
    g = _CUDAGraph()
    with _graph(g):
        for _ in range(2):
            fn()
    g.replay()
    do_bench_cudagraph.calls.append(rep)
    return 0.25


do_bench_cudagraph.calls = []


def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
    """Triton 3.6's: events around each call, mean ms."""
    assert return_mode in ["min", "max", "mean", "median", "all"]
    for _ in range(3):
        fn()
    do_bench.calls.append((warmup, rep))
    return 0.5


do_bench.calls = []


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.device("cuda")`` that runs on the CPU (see the module docstring)."""
    import triton.testing as tt

    real = inspect.signature(tt.do_bench_cudagraph), inspect.signature(tt.do_bench)
    # the fakes take what Triton 3.6's take (and the installed Triton's, whatever its version)
    assert set(inspect.signature(do_bench_cudagraph).parameters) <= set(real[0].parameters) | {"rep"}
    props = types.SimpleNamespace(name="FAKE H200", multi_processor_count=132, major=9, minor=0,
                                  total_memory=141 * 2 ** 30)
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1),
                        ("get_device_properties", lambda d=None: props),
                        ("get_device_capability", lambda d=None: (9, 0)), ("synchronize", _synchronize),
                        ("get_device_name", lambda d=None: props.name), ("current_device", lambda: 0),
                        ("Event", _Event), ("Stream", _Stream), ("current_stream", lambda d=None: _Stream()),
                        ("stream", lambda s: contextlib.nullcontext()), ("set_stream", lambda s: None),
                        ("CUDAGraph", _CUDAGraph), ("graph", _graph),
                        ("is_current_stream_capturing", lambda: _State.capturing),
                        ("device", lambda d: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch, "Generator", _CpuGenerator)
    monkeypatch.setattr(tt, "do_bench_cudagraph", do_bench_cudagraph)
    monkeypatch.setattr(tt, "do_bench", do_bench)
    _State.capturing, _State.captures, _State.replays, _State.syncs_in_capture = False, 0, 0, []
    do_bench_cudagraph.calls.clear()
    do_bench.calls.clear()
    with _CudaOnCpu():
        yield torch.device("cuda")
    assert not _State.syncs_in_capture, _State.syncs_in_capture


def test_the_fake_runs_cuda_tensors_on_the_cpu(fake_cuda):
    x = torch.randn(3, device=fake_cuda)
    g = torch.Generator(device=fake_cuda).manual_seed(0)
    assert x.device.type == "cpu" and isinstance(g, torch.Generator) and torch.rand(2, generator=g).shape == (2,)
    with pytest.raises(RuntimeError, match="capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            float(x.sum())
    _State.syncs_in_capture.clear()


def test_triton_36_bench_signatures_are_what_time_ms_calls():
    """_time_ms calls do_bench_cudagraph(fn, rep=40) and do_bench(fn, warmup=10, rep=60) and
    divides the float they return: Triton 3.6's signatures (triton/testing.py, v3.6.0) and the
    installed Triton's take those keywords."""
    import triton.testing as tt

    for fn, kw in ((tt.do_bench_cudagraph, {"rep"}), (tt.do_bench, {"warmup", "rep"})):
        params = inspect.signature(fn).parameters
        assert kw <= set(params) and params["return_mode"].default == "mean" and params["quantiles"].default is None
    src = inspect.getsource(G._time_ms)
    assert "do_bench_cudagraph(fn, rep=40)" in src and "do_bench(fn, warmup=10, rep=60)" in src


def test_time_ms_on_cuda_divides_the_bench_result_by_the_sets(fake_cuda):
    calls = []
    rot = G.Rotation([lambda: calls.append(0), lambda: calls.append(1)])
    ms, timer = G._time_ms(rot, fake_cuda, graph=True, sets=rot.sets)
    assert ms == 0.25 / 2 and "cudagraph" in timer and do_bench_cudagraph.calls == [40]
    ms, timer = G._time_ms(rot, fake_cuda, graph=False, sets=rot.sets)
    assert ms == 0.5 / 2 and "events" in timer and do_bench.calls == [(10, 60)]
    assert calls[:4] == [0, 1, 0, 1]


# ----------------------------------------------------------------------------- timing stage on "CUDA"
def _stage_timing(device, tmp_path, smoke=True):
    results = {"stages": {"env": {"fp32_matmul_flops_per_s": 1e12}}}
    return G.stage_timing(lambda *a: None, device, smoke, G.Budget(600), results, tmp_path)


def test_torch_graph_outputs_of_the_timed_replays_are_checked(fake_cuda, tmp_path, monkeypatch):
    """The torch-under-CUDA-graph provider was checked before timing (an eager call) but not
    after: a graph whose replays compute something else was timed as a result.  Now its timed
    calls' outputs are checked as the kernel variants' are; such a row is "wrong", its time kept
    apart; the eager torch row, and torch-graph when the replays are right, stay timed."""
    from bench import providers as P

    prov = P.get_provider("torch")
    real_prepare = prov.prepare

    def prepare(problem):
        prepared = real_prepare(problem)

        def run(i):
            out = prepared.run(i)
            if _State.capturing and tamper[0]:  # what the captured graph computes: φ unchanged
                model = problem.model
                T = problem.point.meta_batch
                out.params.update({n: p.detach().expand(T, *p.shape).clone() for n, p in model.named_parameters()})
            return out

        return P.Prepared(run, prepared.to_params, prepared.sync)

    monkeypatch.setattr(prov, "prepare", prepare)
    monkeypatch.setattr(G, "SMOKE_VARIANTS", [])
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(G, "cli_sine_row", lambda *a, **k: {"provider": "cli-sine-gpu", "T": 1, "status": "skipped"})
    monkeypatch.setattr(G, "_graphed_full_meta_step", lambda T, device, dims: {"ms": 1.0, "wrong": None})
    for tampered in (True, False):
        tamper = [tampered]
        rows = _stage_timing(fake_cuda, tmp_path)["rows"]
        graph = [r for r in rows if r["provider"] == "torch-graph"]
        eager = [r for r in rows if r["provider"] == "torch"]
        assert len(graph) == 2 and len(eager) == 2, rows
        assert all("ms" in r and r["input_sets"] == G.SMOKE_ROTATIONS for r in eager), eager
        if tampered:
            assert all(r.get("status") == "wrong" and "timed calls" in r["reason"] and "ms" not in r
                       and r["ms_not_a_result"] > 0 for r in graph), graph
        else:
            assert all("ms" in r and "status" not in r for r in graph), graph
        full = [r for r in rows if r["provider"] == "v2-meta-graph-full"]
        assert [r["T"] for r in full] == [1, 2] and all(r["ms"] == 1.0 for r in full)
    lines = G.summary_lines({"stages": {"timing": {"rows": rows}}, "seconds": {}})
    assert any(line.strip().startswith("torch-graph") for line in lines)


def test_every_timed_launcher_captures_without_a_host_read(fake_cuda):
    """What do_bench_cudagraph captures on the GPU: each kernel variant's launcher (``launcher``:
    preallocated outputs, ``check_values=False``) reads nothing on the host inside a capture
    (CUDA refuses a sync there: the variant would be recorded as an error, not timed)."""
    model, tasks, plan, params, phi = G.problem(1, fake_cuda, seed=3, width=8)
    for variant in G.VARIANTS:
        fn = G.launcher(variant, 1, fake_cuda, (1, 8, 8, 1), tasks, plan, params, phi)
        fn()  # compiles, outside the capture (as do_bench_cudagraph's warm-up call)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            fn()
        assert torch.isfinite(fn.result()).all(), variant
    assert _State.captures == len(G.VARIANTS)


def test_whole_meta_step_under_one_graph_runs_on_fake_cuda(fake_cuda):
    """_graphed_full_meta_step: warm-up on a side stream, one capture, no host read inside the
    capture.  This fake's replays run nothing, so φ does not move: the replay checked before the
    timed ones is wrong against float64 and nothing is timed (QA40; tests/test_review_qa40.py runs
    it under a fake whose replays rerun the captured step, and checks the timed path)."""
    full = G._graphed_full_meta_step(1, fake_cuda, (1, 8, 8, 1), replays=2)
    assert full["ms"] is None and full["wrong"].startswith("the replay before the timed ones: its outer update differs")
    assert _State.captures == 1 and _State.replays == 1  # the checked one; none timed


def test_timing_stage_at_gpu_sizes_times_each_provider_or_says_why(fake_cuda, tmp_path, monkeypatch):
    """The non-smoke provider loop (torch, torch-graph, torch-vmap, jax, seed) and the main job's
    CUDA branch on a fake GPU, at T=1 and a T beyond the seed's and vmap's limits."""
    seen = {}

    def cli(log, out, timeout, smoke=False):
        seen["cli"] = (timeout, smoke)
        return {"provider": "cli-sine-gpu", "T": 1, "wall_seconds": 1.5, "status": "skipped"}

    monkeypatch.setattr(G, "TIMED_T", (1, 40))
    monkeypatch.setattr(G, "VARIANTS", [])
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(G, "cli_sine_row", cli)
    monkeypatch.setattr(G, "_graphed_full_meta_step", lambda T, device, dims: {"ms": 1.0, "wrong": None})
    stage = _stage_timing(fake_cuda, tmp_path, smoke=False)
    assert stage["rotations"] == G.ROTATIONS
    assert seen["cli"] == (G.CLI_TIMEOUT, False)
    by = {(r["provider"], r["T"]): r for r in stage["rows"]}
    for name in ("torch", "torch-graph", "torch-vmap", "seed"):
        assert "ms" in by[(name, 1)] and by[(name, 1)]["input_sets"] == G.ROTATIONS, by[(name, 1)]
    assert by[("seed", 40)]["status"] == "skipped" and "ms" in by[("torch-vmap", 40)]
    assert "ms" in by[("jax", 1)] or by[("jax", 1)]["status"] == "skipped"
    lines = G.summary_lines({"stages": {"timing": stage}, "seconds": {}})
    assert any("T=1: fastest" in line or "seed" in line for line in lines)


# ----------------------------------------------------------------------------- stages 5-6 on "CUDA"
# Text in the formats the tools print (composed here with this project's kernel; the layout is
# ncu's text report as shown in public ncu outputs, e.g. nvcc4jupyter's docs/source/usage.rst
# ("Section: GPU Speed Of Light Throughput" table) and Nsight Compute's Occupancy section; and
# compute-sanitizer's "=========" lines as in NVIDIA's compute-sanitizer documentation).
NCU_KERNEL = """\
  _meta_step_kernel (528, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Frequency                  Ghz         2.62
    SM Frequency                    Ghz         1.75
    Elapsed Cycles                cycle      123,456
    Memory Throughput                 %        12.34
    DRAM Throughput                   %         3.21
    Duration                         us        70.55
    L1/TEX Cache Throughput           %        20.10
    L2 Cache Throughput               %         4.20
    SM Active Cycles              cycle   120,000.50
    Compute (SM) Throughput           %        61.70
    ----------------------- ----------- ------------

    Section: Occupancy
    ------------------------------- ----------- ------------
    Metric Name                     Metric Unit Metric Value
    ------------------------------- ----------- ------------
    Block Limit SM                        block           32
    Block Limit Registers                 block            4
    Block Limit Shared Mem                block            9
    Block Limit Warps                     block           16
    Theoretical Active Warps per SM        warp           16
    Theoretical Occupancy                     %           25
    Achieved Occupancy                        %        23.80
    Achieved Active Warps Per SM           warp        15.23
    ------------------------------- ----------- ------------
"""
NCU_OUT = ("==PROF== Connected to process 4242 (/usr/bin/python3.12)\n"
           + "".join(f'==PROF== Profiling "_meta_step_kernel" - {i}: 0%....50%....100% - 9 passes\n' for i in range(3))
           + "==PROF== Disconnected from process 4242\n[4242] python3.12@127.0.0.1\n" + NCU_KERNEL * 3)
NCU_NO_PERMISSION = ("==PROF== Connected to process 4243 (/usr/bin/python3.12)\n"
                     "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to access NVIDIA GPU Performance "
                     "Counters on the target device 0.\n==PROF== Disconnected from process 4243\n"
                     "==WARNING== No kernels were profiled.\n")
SANITIZER_CLEAN = "[target tiny] v1 T=16: ran twice\n========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"
SANITIZER_ERRORS = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at _meta_step_kernel+0x1a40
=========     by thread (31,0,0) in block (2,0,0)
=========     Address 0x7f2b4c000400 is out of bounds
=========
========= Target application returned an error
========= ERROR SUMMARY: 1 error
"""


class _Proc:
    def __init__(self, out, rc, hang=False):
        self.out, self.returncode, self.hang, self.pid = out, rc, hang, -1

    def communicate(self, timeout=None):
        if self.hang:
            self.hang = False
            raise subprocess.TimeoutExpired("tool", timeout)
        return self.out, ""


def test_sanitizer_and_ncu_stages_read_the_tools_real_output(fake_cuda, tmp_path, monkeypatch):
    """Stages 5 and 6 on a GPU: each tool's command, its log, and a summary that shows the
    kernel's line, throughput and occupancy, or the line saying why the tool measured nothing
    (e.g. ncu without access to the performance counters); a tool past its time cap is killed."""
    outputs = {"memcheck": (SANITIZER_CLEAN, 0, False), "initcheck": (SANITIZER_ERRORS, 9, False),
               "synccheck": ("========= COMPUTE-SANITIZER\n", 0, True), "ncu": (NCU_OUT, 0, False)}
    cmds, killed = [], []

    def start(cmd, **kw):
        cmds.append(cmd)
        tool = "ncu" if cmd[0].endswith("ncu") else cmd[cmd.index("--tool") + 1]
        return _Proc(*outputs[tool])

    monkeypatch.setattr(G, "find_tool", lambda name: f"/opt/fake/{name}")
    monkeypatch.setattr(G, "_start", start)
    monkeypatch.setattr(G, "_kill_group", lambda proc: killed.append(proc))
    san = G.stage_tools(lambda *a: None, tmp_path, fake_cuda, "sanitizer", 30, ("memcheck", "initcheck", "synccheck"))
    assert san["memcheck"]["returncode"] == 0 and san["memcheck"]["summary"] == ["========= ERROR SUMMARY: 0 errors"]
    assert san["initcheck"]["returncode"] == 9
    assert san["initcheck"]["summary"][0] == "========= Target application returned an error"
    assert san["synccheck"]["returncode"] == "timeout after 30 s" and len(killed) == 1
    assert all(c[1:3] == ["--tool", t] and "--target" in c and c[-2:] == ["tiny", str(tmp_path)]
               for c, t in zip(cmds, ("memcheck", "initcheck", "synccheck")))
    assert (tmp_path / "sanitizer.log").read_text().count("[rc ") == 3
    ncu = G.stage_tools(lambda *a: None, tmp_path, fake_cuda, "ncu", 45, ("ncu",))["ncu"]
    first = ncu["summary"][:6]
    assert first[0].startswith("_meta_step_kernel (528, 1, 1)x(128, 1, 1)")
    assert [line.split("  ")[0] for line in first[1:]] == ["Memory Throughput", "Duration", "Compute (SM) Throughput",
                                                            "Theoretical Occupancy", "Achieved Occupancy"]
    assert "regex:_meta_step_kernel" in cmds[-1] and cmds[-1][-2:] == ["profile", str(tmp_path)]
    outputs["ncu"] = (NCU_NO_PERMISSION, 1, False)
    denied = G.stage_tools(lambda *a: None, tmp_path, fake_cuda, "ncu", 45, ("ncu",))
    assert denied["ncu"]["summary"][0].startswith("==ERROR== ERR_NVGPUCTRPERM")
    lines = G.summary_lines({"stages": {"sanitizer": san, "ncu": denied}, "seconds": {}})
    assert any(line.startswith("ncu: rc 1 ==ERROR== ERR_NVGPUCTRPERM") for line in lines), lines
    assert any("Achieved Occupancy" in line for line in G.summary_lines({"stages": {"ncu": {"ncu": ncu}},
                                                                         "seconds": {}}))


def test_summary_says_a_tool_stage_failed_or_was_cut_not_skipped():
    """A sanitizer stage that raised ({"status": "error", "reason": ...}) or that the deadline cut
    short read "sanitizer: skipped (...)" in the summary."""
    lines = G.summary_lines({"stages": {"sanitizer": {"status": "error", "reason": "OSError: boom"},
                                        "ncu": {"status": "skipped", "reason": "needs CUDA and the tool"}},
                             "seconds": {}})
    assert "sanitizer: error (OSError: boom)" in lines and "ncu: skipped (needs CUDA and the tool)" in lines


# ----------------------------------------------------------------------------- stages 1-2, the tools' child
def test_env_stage_and_compile_arch_on_a_gpu(fake_cuda, tmp_path, monkeypatch):
    """Stage 1's GPU branch (properties, nvidia-smi absent or not, the matmul rate at the GPU's
    default size) and stage 2's target architecture from the device's capability."""
    from bench import flops

    peak_calls, started = [], []
    monkeypatch.setattr(flops, "measure_matmul_peak",
                        lambda device, n=None, min_time=0.3: peak_calls.append((device.type, n, min_time))
                        or {"flops_per_s": 5e13})
    env = G.stage_env(lambda *a: None, fake_cuda, smoke=False)
    assert (env["gpu"], env["sms"], env["capability"], env["memory_gib"]) == ("FAKE H200", 132, "9.0", 141.0)
    assert isinstance(env["nvidia_smi"], str) and env["fp32_matmul_flops_per_s"] == 5e13
    assert peak_calls == [("cuda", None, 0.3)]
    json.dumps(env, default=str)  # results.json takes it

    class _Popen:
        pid = -1

    monkeypatch.setattr(G, "_start", lambda cmd, **kw: started.append((cmd, kw)) or _Popen())
    job = G.BackgroundCompile(lambda *a: None, tmp_path, fake_cuda, smoke=False, timeout=30)
    cmd, kw = started[0]
    assert job.arch == 90 and cmd[cmd.index("--arch") + 1] == "90" and cmd[cmd.index("--cases") + 1] == "gpu"
    assert "TRITON_INTERPRET" not in kw["env"]


def test_the_tools_child_runs_its_launches_on_a_gpu(fake_cuda, monkeypatch, capsys):
    """run_target, the process compute-sanitizer (``--target tiny``: every variant at T=16) and
    ncu (``--target profile``: ``PROFILED``, v2 meta-steps at T=4096 and T=1, each once) run, on a fake GPU: each variant's
    launcher called twice, then the tiny target's streamed and guarded meta-steps, one line per
    variant.  The kernels are stand-ins that bind their arguments to the real launchers'
    signatures (a wrong keyword or argument count fails here, not in the tool's child)."""
    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    calls = []
    for mod, name in ((K, "mlp_inner_loop"), (V, "inner_loop"), (V, "meta_step"), (V, "guarded_meta_step")):
        sig = inspect.signature(getattr(mod, name))
        monkeypatch.setattr(mod, name, lambda *a, _s=sig, _n=name, **k: calls.append((_n, _s.bind(*a, **k).arguments)))
    assert G.run_target("tiny") == 0
    out = capsys.readouterr().out
    assert all(f"[target tiny] {v[0]} T=16: ran twice" in out for v in G.VARIANTS)
    assert "v2s-registers T=16 and v2-guarded T=1: ran" in out
    assert len(calls) == 2 * len(G.VARIANTS) + 3 and calls[-1][0] == "guarded_meta_step"
    assert all(c[1]["x"].shape[0] == 16 for c in calls[:-1])
    calls.clear()
    assert G.run_target("profile") == 0
    out = capsys.readouterr().out
    # G.PROFILED, each launched once: ncu's --launch-count is len(G.PROFILED)
    assert out.count("[target profile]") == len(G.PROFILED) == 6
    assert all(f"[target profile] {name} T={T}: ran once" in out for name, T in G.PROFILED)
    # T = 1: the seed's one launch (the one-task guarded meta-step), with the variant's config
    assert [c[0] for c in calls] == ["meta_step" if T > 1 else "guarded_meta_step" for _, T in G.PROFILED]
    assert [c[1]["x"].shape[0] for c in calls] == [T for _, T in G.PROFILED]
    assert [c[1]["config"].transpose for c in calls if c[0] == "guarded_meta_step"] == [None, False]


def test_fused_stepper_chunk_program_captures_without_a_host_read(fake_cuda):
    """The fused stepper's chunk program through the real ``_CudaGraph`` (torch.cuda.graph) on a
    fake GPU: captured once, replayed for the next chunks, no host read inside the capture; a
    capture that raises puts the caller's stream back and re-raises."""
    from reptile_fast import MLP, Reptile, Sine
    from reptile_fast.backends import triton as TB

    torch.manual_seed(0)
    tri = Reptile(MLP(1, 8, 1).to(fake_cuda), backend="triton", inner_steps=2, inner_batch_size=5,
                  backend_options={"kernel": "v2", "fused": True, "cuda_graphs": True, "chunk": 2})
    tri._fused._capture, tri._fused.cuda_graphs = TB._CudaGraph, True  # its device is the CPU here
    tri.fit(Sine(), 6, meta_batch_size=1, progress=False, handle_signals=False, draw_chunks=True)
    assert _State.captures == 1 and _State.replays == 2 and tri.last_fit_stats["mode"] == "graphs"
    streams = []
    torch.cuda.set_stream = streams.append  # (monkeypatched by the fixture: restored after)
    with pytest.raises(ZeroDivisionError):
        TB._CudaGraph(lambda: 1 / 0)
    assert len(streams) == 1 and isinstance(streams[0], _Stream)


# ----------------------------------------------------------------------------- the sweep, the report
def test_sweep_main_on_a_gpu_sweeps_the_gpu_sizes_and_tables_them(fake_cuda, tmp_path, monkeypatch):
    """bench/gpu_check.sh --sweep on a GPU: T = 1, 4096, 65536 at width 64, the GPU's stamp;
    sweep.json and the table after every T, whatever rows a T made (timed, not timed, error)."""
    from bench import gpu_sweep as S

    seen = []

    def sweep_T(T, device, width, smoke, budget, log, rows=None, precision="ieee", grid=None):
        assert precision == "ieee" and not grid  # the command line's defaults
        seen.append((T, device.type, width, smoke))
        rows.append({"T": T, "config": {}, "launch": "meta_step", "ok": True, "ms": 0.5, "tasks_per_s": T / 5e-4,
                     "input_sets": 3, "timer": "do_bench_cudagraph"})
        rows.append({"T": T, "config": {"num_warps": 8}, "ok": False, "status": "not timed: wrong"})
        if T == 65536:
            raise RuntimeError("CUDA out of memory")
        return rows

    monkeypatch.setattr(S, "sweep_T", sweep_T)
    assert S.main([str(tmp_path)]) == 0
    assert seen == [(1, "cuda", 64, False), (4096, "cuda", 64, False), (65536, "cuda", 64, False)]
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["stamp"]["gpu"] == "FAKE H200" and data["stamp"]["sms"] == 132 and data["mode"] == "gpu"
    assert any(r.get("status") == "error" and "out of memory" in r["reason"] for r in data["rows"])
    assert data["table"][0].startswith("T=1: 1 settings timed; default 0.5000 ms")


def _gpu_shaped_results():
    """results.json as a GPU run writes it: every row shape the GPU path makes (GPU stamp, compile
    rows, whole-job rows, graph rows, wrong rows with their time kept apart, errors, skips)."""
    common = {"width": 64, "depth": 2, "steps": 5, "inner_batch": 10}

    def timed(provider, T, ms, **kw):
        return {"provider": provider, "T": T, "ms": ms, "timer": "do_bench_cudagraph", "input_sets": 3,
                "tasks_per_s": T / (ms / 1e3), "flops": 1e6 * T, "flops_per_s": 1e9 * T / ms,
                "pct_fp32_matmul_peak": 1.0, **common, **kw}

    rows = [
        {"provider": "fit-v2-graphs-check", "T": 1, "meta_steps": 300, "mode": "graphs", "fallback_reason": None,
         "bitwise_graphs_vs_launches": True, "phi_max_abs_vs_torch": 1e-7, "phi_rel_vs_torch_movement": 1e-6,
         "ok": True},
        {"provider": "fit-v2-graphs", "T": 1, "meta_steps": 30000, "mode": "graphs", "fallback_reason": None,
         "train_seconds": 0.6, "ms": 0.02, "finite": True, "timer": "host clock", "seed_setting_30000_s": 0.6},
        {"provider": "fit-v2-launches", "T": 1, "status": "skipped", "reason": "time budget spent"},
        {"provider": "cli-sine-gpu", "T": 1, "status": "timeout after 45 s", "command": "python -m reptile_fast sine"},
        timed("v2-meta", 4096, 0.08), timed("v2-meta", 1, 0.01), timed("torch", 4096, 2.0), timed("torch", 1, 0.5),
        timed("torch-vmap", 4096, 9.0), timed("jax", 4096, 3.0, timer="host clock + block_until_ready"),
        timed("seed", 1, 2.0), timed("v2-meta-graph-full", 1, 0.02, input_sets="fresh each replay"),
        {"provider": "torch-graph", "T": 4096, "status": "wrong", "ms_not_a_result": 1.5,
         "reason": "the timed calls' outputs are wrong: | pipes | and\nnewlines", **common, "flops": 1e6},
        {"provider": "v1", "T": 65536, "status": "error", "reason": "OutOfMemoryError: CUDA out of memory", **common},
        {"provider": "seed", "T": 4096, "status": "skipped", "reason": "the seed loop is timed up to T=32", **common},
        {"provider": "*", "T": 256, "status": "skipped", "reason": "time budget spent", **common},
    ]
    compile_rows = [{"kernel": "v2", "case": "sine-1-64-64-1", "precision": "ieee", "mode": "meta-step", "num_warps": 4,
                     "registers": 128, "spill_store_bytes": 0, "shared_bytes": 2048,
                     "ptx": {"mma": 0, "wgmma": 0, "ex2.approx": 0, "div.full": 0}},
                    {"kernel": "v1", "case": "sine-1-64-64-1", "precision": "tf32", "mode": "registers",
                     "num_warps": 8, "error": "CompilationError: out of resources"}]
    return {"stages": {
        "env": {"gpu": "NVIDIA H200", "sms": 132, "torch": "2.11.0", "triton": "3.6.0", "jax": "0.6.0",
                "date": "2026-12-04", "mode": "gpu", "command": "bench/gpu_check.sh /out",
                "fp32_matmul_flops_per_s": 5e13, "tools": {"ncu": "/usr/local/cuda/bin/ncu"}},
        "compile": {"status": "timeout after 110 s", "arch": 90, "rows": compile_rows},
        "correctness": {"rows": [{"variant": "v1", "T": 64, "ok_rtol1e-5": True, "max_abs_vs_ref32": 1e-7},
                                 {"variant": "v2-tf32", "T": 64, "error": "RuntimeError: x"},
                                 {"variant": "special-functions",
                                  "exp": {"max_rel_err_in_2^-23": 1.2, "stated_bound": 2.0}}]},
        "timing": {"rows": rows, "rotations": 3},
        "sanitizer": {"memcheck": {"returncode": 0, "summary": ["========= ERROR SUMMARY: 0 errors"]},
                      "synccheck": {"returncode": "timeout after 40 s", "summary": []}},
        "ncu": {"status": "cut short", "reason": "cut short: the run passed its deadline"}},
        "seconds": {"env": 3.0, "timing": 170.0, "total": 350.0}, "budget_s": 345}


def test_summary_and_report_read_every_row_shape_a_gpu_run_writes(tmp_path):
    """summary.txt (printed last by the GPU run) and ``python -m bench.report results.json`` (run
    on its results afterwards) take every row shape only the GPU path makes."""
    from bench import report as R

    results = _gpu_shaped_results()
    lines = G.summary_lines(results)
    text = "\n".join(lines)
    assert "summary ERROR" not in text and "NVIDIA H200 (132 SMs)" in lines[0]
    assert "T=4096: fastest ieee Triton variant v2-meta: 112.5x torch-vmap, 25.0x torch, 37.5x jax" in text
    assert "fit-v2-graphs: 0.0200 ms per meta-step (graphs) -> 30000 meta-steps 0.60 s" in text
    assert "as one graphed meta-step each: 0.0200 ms -> 0.60 s" in text
    assert "ncu: cut short (cut short: the run passed its deadline)" in text and "synccheck: rc timeout" in text
    assert "main job on the GPU" in text and "status timeout after 45 s" in text
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    records, stamp, _ = R.load_results(path)
    derived = R.derive(records)
    timed = {(r["provider"], r["meta_batch"]) for r in derived if "tasks_per_s" in r}
    assert timed == {("v2-meta", 4096), ("v2-meta", 1), ("torch", 4096), ("torch", 1), ("torch-vmap", 4096),
                     ("jax", 4096), ("seed", 1), ("v2-meta-graph-full", 1)}
    assert stamp["gpu"] == "NVIDIA H200" and stamp["fp32_matmul_peak_gflops"] == 5e4
    assert R.main([str(path), "--out", str(tmp_path / "gpu")]) == 0
    md = (tmp_path / "gpu.md").read_text()
    assert "| torch-graph | wrong | the timed calls' outputs are wrong: / pipes / and newlines | T4096 |" in md
    assert "OutOfMemoryError" in md and (tmp_path / "gpu_tasks_per_s.png").exists()


def test_sweep_rechecks_the_outputs_of_the_timed_calls(tmp_path, monkeypatch):
    """The sweep checked each setting's first call, then timed graph replays whose outputs nobody
    looked at (the GPU check re-checks its kernel variants' timed calls; the sweep did not): a
    setting whose replays compute something else was timed as a result.  Now at T > 1 the timed
    calls' outputs are checked too; such a setting is "wrong", its time kept apart."""
    from bench import gpu_sweep as S
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    real_meta_step, real_time_ms = V.meta_step, G._time_ms
    timing = [False]

    def meta_step(x, y, plan, phi, *a, out=None, config=None, **kw):
        if timing[0] and config.num_warps == 4:  # the replays of one setting: φ left as it was
            out.copy_(phi)
            return None
        return real_meta_step(x, y, plan, phi, *a, out=out, config=config, **kw)

    def time_ms(*a, **k):
        timing[0] = True
        try:
            return real_time_ms(*a, **k)
        finally:
            timing[0] = False

    monkeypatch.setattr(V, "meta_step", meta_step)
    monkeypatch.setattr(G, "_time_ms", time_ms)
    monkeypatch.setattr(S, "settings", lambda T, smoke, *a: iter([{}, {"num_warps": 4, "accumulate": "memory"}]))
    rows = S.sweep_T(3, torch.device("cpu"), 8, True, G.Budget(300), lambda *a: None)
    default, bad = rows
    assert default["ok"] and "ms" in default and default["input_sets"] == G.SMOKE_ROTATIONS, default
    assert not bad["ok"] and "ms" not in bad and bad["ms_not_a_result"] > 0, bad
    assert bad["status"].startswith("wrong: the timed calls' outputs: input set 0: its outer update differs")
    assert S.table(rows)[0].startswith("T=3: 1 settings timed")


def test_a_spent_budget_on_a_gpu_records_every_case_it_skips(fake_cuda, tmp_path, monkeypatch):
    """The timing stage's budget paths on a GPU (never taken by the CPU smoke): the main job, each
    kernel variant, the whole graphed meta-step and each provider say "skipped" when the time is
    spent (the graphed meta-step was left out of the table without a word), later T as "*"."""
    real_sets = G.problem_sets
    spent = [False]

    class Budget(G.Budget):
        def left(self):
            return 10.0 if spent[0] else 25.0

    def problem_sets(*a, **k):
        spent[0] = True  # the time runs out once the first T's problem is built
        return real_sets(*a, **k)

    monkeypatch.setattr(G, "TIMED_T", (1, 2))
    monkeypatch.setattr(G, "VARIANTS", G.VARIANTS[:2])
    monkeypatch.setattr(G, "problem_sets", problem_sets)
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    results = {"stages": {}}
    rows = G.stage_timing(lambda *a: None, fake_cuda, False, Budget(25), results, tmp_path)["rows"]
    by = {(r["provider"], r["T"]): r for r in rows}
    assert by[("cli-sine-gpu", 1)]["status"] == "skipped" and "time budget" in by[("cli-sine-gpu", 1)]["reason"]
    for name in ("v1", "v1-tf32x3", "v2-meta-graph-full", "torch", "torch-graph", "torch-vmap", "jax", "seed"):
        assert by[(name, 1)]["status"] == "skipped" and "ms" not in by[(name, 1)], (name, by.get((name, 1)))
    assert by[("*", 2)]["status"] == "skipped"
    assert "summary ERROR" not in "\n".join(G.summary_lines({"stages": results["stages"], "seconds": {}}))


def test_main_on_a_gpu_writes_results_and_summary(fake_cuda, tmp_path, monkeypatch):
    """main's GPU path (budget 345 s, the tools' stages with their GPU time caps, results.json
    and summary.txt, exit 0), stages 1, 5, 6 on the fake GPU; without CUDA it says so (exit 2)."""
    from bench import flops

    monkeypatch.setattr(flops, "measure_matmul_peak", lambda device, n=None, min_time=0.3: {"flops_per_s": 5e13})
    monkeypatch.setattr(G, "find_tool", lambda name: f"/opt/fake/{name}")
    caps = []

    def start(cmd, **kw):
        caps.append(cmd)
        return _Proc(NCU_OUT if cmd[0].endswith("ncu") else SANITIZER_CLEAN, 0)

    monkeypatch.setattr(G, "_start", start)
    real_tools = G.stage_tools
    monkeypatch.setattr(G, "stage_tools", lambda log, out, device, name, timeout, tools, **kw:
                        caps.append((name, timeout() if callable(timeout) else timeout))
                        or real_tools(log, out, device, name, timeout, tools, **kw))
    out = tmp_path / "gpu"
    assert G.main([str(out), "--stages", "1,5,6"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["budget_s"] == 345 and results["stages"]["env"]["gpu"] == "FAKE H200"
    # ncu: two passes (sections, then the shared-memory metrics), each given what the budget has
    # left when it starts, at most 30 s
    assert [c for c in caps if isinstance(c, tuple)] == [("sanitizer", 40), ("ncu", 30)]
    ncu_runs = [c for c in caps if isinstance(c, list) and c[0].endswith("ncu")]
    assert len(ncu_runs) == 2 and "--section" in ncu_runs[0] and "--metrics" in ncu_runs[1]
    summary = (out / "summary.txt").read_text()
    assert "FAKE H200 (132 SMs)" in summary and "memcheck: rc 0 ========= ERROR SUMMARY: 0 errors" in summary
    assert "Achieved Occupancy" in summary
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert G.main([str(tmp_path / "none")]) == 2


# ----------------------------------------------------------------------------- GPU-size branches of stage 3-4
def test_repeatability_at_gpu_size_compares_meta_steps_and_adapted_rows(fake_cuda, monkeypatch):
    """_v2_repeatability's GPU branch (T=4096, 20 runs, adapt's launches compared too; the smoke
    runs the meta-step only).  Stand-in kernels (bound to the real signatures) return the same
    answers every run except one configuration's adapted rows on one run: only that row is not
    bitwise, and its largest difference is recorded."""
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    sigs = {name: inspect.signature(getattr(V, name)) for name in ("meta_step", "inner_loop")}
    n_adapt = {}

    def meta_step(*a, **k):
        args = sigs["meta_step"].bind(*a, **k).arguments
        phi = args["params_flat"]
        return V.MetaStepResult(phi + 1.0, phi.sum(), None)

    def inner_loop(*a, **k):
        args = sigs["inner_loop"].bind(*a, **k).arguments
        cfg, T = args["config"], args["x"].shape[0]
        key = (cfg.stream, cfg.accumulate)
        n_adapt[key] = n_adapt.get(key, 0) + 1
        n = V.n_flat_params(args["dims"])
        out = torch.zeros(T, -(-n // 4) * 4)
        if key == (True, "memory") and n_adapt[key] == 7:  # one run's rows differ
            out[5, 3] = 0.25
        return out, torch.zeros(T, 5)

    monkeypatch.setattr(V, "meta_step", meta_step)
    monkeypatch.setattr(V, "inner_loop", inner_loop)
    rows = G._v2_repeatability(lambda *a: None, fake_cuda, False, 8)
    assert [r["variant"] for r in rows] == ["v2-repeat-regs-registers", "v2-repeat-regs-memory",
                                            "v2-repeat-stream-registers", "v2-repeat-stream-memory"]
    assert all("error" not in r and r["T"] == 4096 and r["runs"] == 20 for r in rows), rows
    assert [r["bitwise"] for r in rows] == [True, True, True, False]
    assert rows[3]["max_abs_diff"] == 0.25 and n_adapt[(False, "registers")] == 20


def test_main_job_row_on_a_gpu_is_a_time_only_for_a_trained_model(tmp_path, monkeypatch):
    """cli_sine_row's GPU branch (the smoke skips it): the job's command, its metrics copied out,
    and its times kept apart as *_not_a_result when it failed or did not train (post-adaptation
    MSE above bench.main_job_wall.MAX_TRAINED_MSE); a job past its time cap is a timeout row."""
    from bench.main_job_wall import MAX_TRAINED_MSE

    seen = []

    def run(mse, rc=0):
        def fake(cmd, timeout, **kw):
            seen.append((cmd, timeout, kw["env"]))
            if mse == "timeout":
                raise subprocess.TimeoutExpired(cmd, timeout)
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({"post_adaptation_mse": mse, "train_seconds": 0.8,
                                                          "ms_per_iteration": 0.027, "backend": "triton",
                                                          "mode": "graphs", "fallback_reason": None}))
            return subprocess.CompletedProcess(cmd, rc, "done\n", "")
        return fake

    monkeypatch.setattr(G, "_run", run(0.01))
    good = G.cli_sine_row(lambda *a: None, tmp_path, timeout=45.0)
    cmd, timeout, env = seen[-1]
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--backend") + 1] == "triton" and timeout == 45.0
    assert env["REPTILE_FAST_TRITON_CUDA_GRAPHS"] == "1" and "TRITON_INTERPRET" not in env
    assert good["train_seconds"] == 0.8 and good["mode"] == "graphs" and "status" not in good, good
    assert json.loads((tmp_path / "sine_gpu_metrics.json").read_text())["post_adaptation_mse"] == 0.01
    # the job's own folder (five files) is a temporary one, removed after the row
    assert not Path(cmd[cmd.index("--out") + 1]).parent.exists()
    for mse, rc in ((10 * MAX_TRAINED_MSE, 0), (0.01, 1), (float("nan"), 0)):
        monkeypatch.setattr(G, "_run", run(mse, rc))
        bad = G.cli_sine_row(lambda *a: None, tmp_path, timeout=45.0)
        assert bad["status"].startswith("wrong:") and "train_seconds" not in bad, bad
        assert bad["train_seconds_not_a_result"] == 0.8 and bad["wall_seconds_not_a_result"] >= 0
    monkeypatch.setattr(G, "_run", run("timeout"))
    assert G.cli_sine_row(lambda *a: None, tmp_path, timeout=45.0)["status"] == "timeout after 45 s"
