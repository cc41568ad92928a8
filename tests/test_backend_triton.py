"""Backend "triton" behind the Backend protocol and the Reptile trainer.

Without CUDA it runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so sizes are
small; with CUDA the same checks run on the GPU.
"""
import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

from reptile_fast import MLP, OmniglotConvNet, Reptile, Sine, reference, sample_indices  # noqa: E402
from reptile_fast.backends import InnerConfig, UnsupportedModelError, get_backend  # noqa: E402
from reptile_fast.backends.reference import ReferenceBackend  # noqa: E402
from reptile_fast.backends.triton import PRECISION_ENV, TritonBackend  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402
from reptile_fast.tasks import TaskBatch  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6



class Wrapped(nn.Module):
    """A user module with its own parameter names and a functional activation."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(2, 30), nn.Linear(30, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("meta_steps", [1, 3])
def test_reptile_meta_steps_match_reference(device, meta_steps):
    torch.manual_seed(0)
    model_ref = reference.MLP()
    model_tri = copy.deepcopy(model_ref).to(device)
    ref = Reptile(model_ref, backend="reference", outer_lr=0.1)
    tri = Reptile(model_tri, backend="triton", outer_lr=0.1)
    assert tri.backend.name == "triton"
    gen = torch.Generator().manual_seed(1)
    for step in range(meta_steps):
        tasks = Sine().sample(2, generator=gen)
        indices = sample_indices(2, 5, 50, 10, generator=gen)
        m_ref = ref.meta_step(tasks, indices)
        m_tri = tri.meta_step(tasks.to(device), indices.to(device))
        assert float(m_tri["loss"]) == pytest.approx(float(m_ref["loss"]), rel=RTOL, abs=ATOL), f"meta-step {step} loss"
    for (name, p_ref), p_tri in zip(model_ref.named_parameters(), model_tri.parameters()):
        torch.testing.assert_close(p_tri.detach().cpu(), p_ref.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"φ '{n}' after {meta_steps} meta-steps\n{m}")


@pytest.mark.parametrize("device", DEVICES)
def test_inner_loop_names_shapes_and_order(device):
    torch.manual_seed(2)
    model = Wrapped().to(device)
    g = torch.Generator().manual_seed(3)
    tasks = TaskBatch(torch.randn(3, 9, 2, generator=g), torch.randn(3, 9, 3, generator=g)).to(device)
    indices = sample_indices(3, 2, 9, 4, generator=g).to(device)
    result = TritonBackend().inner_loop(model, tasks, indices, InnerConfig(lr=0.05))
    assert list(result.params) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert result.params[n].shape == (3, *p.shape), n
    assert result.losses.shape == (3, 2) and result.meta_grads is None
    expected = ReferenceBackend().inner_loop(copy.deepcopy(model).cpu(), tasks.to("cpu"), indices.cpu(),
                                             InnerConfig(lr=0.05))
    for n, ref in expected.params.items():
        torch.testing.assert_close(result.params[n].cpu(), ref, rtol=RTOL, atol=ATOL, msg=f"'{n}'")


@pytest.mark.parametrize("device", DEVICES)
def test_adapt_and_evaluate(device):
    torch.manual_seed(4)
    model = MLP(1, 40, 1)
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(5))
    indices = sample_indices(2, 4, 50, 10, generator=torch.Generator().manual_seed(6))
    ref = Reptile(copy.deepcopy(model), backend="reference")
    tri = Reptile(copy.deepcopy(model).to(device), backend="triton")
    want = ref.evaluate(tasks, 4, indices)
    got = tri.evaluate(tasks.to(device), 4, indices.to(device))
    torch.testing.assert_close(got.cpu(), want, rtol=RTOL, atol=ATOL, msg="post-adaptation loss")


# ----------------------------------------------------------------------------- what it refuses
@pytest.mark.parametrize("model, config, words", [
    (OmniglotConvNet(), InnerConfig(), "Conv2d"),
    (MLP(1, 8, 1, depth=5), InnerConfig(), "at most 5 Linear layers"),
    (MLP(1, 300, 1), InnerConfig(), "feature sizes up to 256"),
    (MLP().double(), InnerConfig(), "float32"),
    (MLP(), InnerConfig(optimizer="adam"), "inner_optimizer='sgd'"),
    (MLP(), InnerConfig(loss=lambda p, t: ((p - t) ** 4).mean()), "custom loss"),
    (MLP(), InnerConfig(algorithm="fomaml"), "algorithm='reptile'"),
    (MLP(), InnerConfig(grad_weights=(1.0,) * 5), "inner_grad_weights"),
])
def test_unsupported_raise_clear_errors(model, config, words):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(UnsupportedModelError, match=words):
        TritonBackend().check_supported(model.to(device), torch.device(device), config)


def test_reptile_backend_triton_refuses_unsupported_model():
    with pytest.raises(UnsupportedModelError, match="Conv2d"):
        Reptile(OmniglotConvNet(), backend="triton", loss="cross_entropy")
    with pytest.raises(UnsupportedModelError, match="inner_optimizer='sgd'"):
        Reptile(MLP(), backend="triton", inner_optimizer="adam")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedModelError, match="needs a CUDA device"):
        TritonBackend().check_supported(MLP(), torch.device("cpu"), InnerConfig())


def test_auto_candidate_only_on_cuda():
    backend = get_backend("triton")
    assert isinstance(backend, TritonBackend)
    assert backend.auto_candidate(torch.device("cpu")) is False
    assert backend.auto_candidate(torch.device("cuda")) is True


def test_auto_does_not_pick_triton_on_cpu():
    """The interpreter is for tests: "auto" must pick a fast CPU backend even when it is active."""
    trainer = Reptile(MLP(), backend="auto")
    assert trainer.backend.name != "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    assert Reptile(MLP().cuda(), backend="auto").backend.name == "triton"


@pytest.mark.parametrize("device", DEVICES)
def test_bad_indices_and_labels_are_value_errors(device):
    model = MLP(2, 16, 3).to(device)
    g = torch.Generator().manual_seed(7)
    tasks = TaskBatch(torch.randn(2, 6, 2, generator=g), torch.randint(0, 5, (2, 6), generator=g)).to(device)
    indices = sample_indices(2, 2, 6, 3, generator=g).to(device)
    backend = TritonBackend()
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        backend.inner_loop(model, tasks, indices, InnerConfig(loss="cross_entropy"))
    ok_tasks = TaskBatch(tasks.x, tasks.y % 3)
    bad = indices.clone()
    bad[1, 1, 2] = 6
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        backend.inner_loop(model, ok_tasks, bad, InnerConfig(loss="cross_entropy"))
    with pytest.raises(ValueError, match="loss 'mse' needs float targets"):
        backend.inner_loop(model, ok_tasks, indices, InnerConfig(loss="mse"))
    with pytest.raises(ValueError, match=r"needs inputs \[tasks, points, 2\]"):
        backend.inner_loop(model, TaskBatch(torch.randn(2, 6, 4, device=device), ok_tasks.y), indices,
                           InnerConfig(loss="cross_entropy"))


# ----------------------------------------------------------------------------- options
def test_precision_option_and_environment(monkeypatch):
    assert TritonBackend().precision == "ieee"
    assert TritonBackend(precision="tf32").precision == "tf32"
    monkeypatch.setenv(PRECISION_ENV, "tf32")
    assert get_backend("triton").precision == "tf32"
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match="triton precision must be one of"):
        TritonBackend()
    with pytest.raises(TypeError, match="launch must be a dict"):
        TritonBackend(precision="ieee", launch="tiled")


@pytest.mark.parametrize("device", DEVICES)
def test_launch_overrides_reach_the_kernel(device, monkeypatch):
    """The launch overrides are what the kernel is launched with (seen at the launcher), and the
    result still equals the reference backend (an independent oracle, not the kernel itself)."""
    from reptile_fast.backends.reference import ReferenceBackend
    from reptile_fast.kernels import mlp_inner_loop as K

    torch.manual_seed(8)
    model = MLP(1, 24, 1).to(device)
    tasks = Sine().sample(3, generator=torch.Generator().manual_seed(9)).to(device)
    indices = sample_indices(3, 2, 50, 10, generator=torch.Generator().manual_seed(10)).to(device)
    seen = []
    launch = K.mlp_inner_loop

    def spy(*args, **kwargs):
        seen.append(kwargs["config"])
        return launch(*args, **kwargs)

    monkeypatch.setattr(K, "mlp_inner_loop", spy)
    got = TritonBackend(launch={"mode": "tiled", "max_programs": 2}).inner_loop(model, tasks, indices, InnerConfig())
    default = TritonBackend(kernel="v1").inner_loop(model, tasks, indices, InnerConfig())  # (auto: v2 here)
    assert seen[0].mode == "tiled" and seen[0].max_programs == 2, seen[0]
    assert seen[1] != seen[0], "the default launch should differ from the override"
    want = ReferenceBackend().inner_loop(copy.deepcopy(model).cpu(), tasks.to("cpu"), indices.cpu(), InnerConfig())
    for name, result in (("override", got), ("default", default)):
        for n in want.params:
            torch.testing.assert_close(result.params[n].cpu(), want.params[n], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name} launch, '{n}' vs the reference: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graphs_give_the_same_results():
    torch.manual_seed(11)
    model = MLP().cuda()
    plain, graphed = TritonBackend(), TritonBackend(cuda_graphs=True)
    gen = torch.Generator().manual_seed(12)
    for _ in range(3):  # capture once, then replay with new data in the same static buffers
        tasks = Sine().sample(1, generator=gen).to("cuda")
        indices = sample_indices(1, 5, 50, 10, generator=gen).cuda()
        want = plain.inner_loop(model, tasks, indices, InnerConfig())
        got = graphed.inner_loop(model, tasks, indices, InnerConfig())
        for n in want.params:
            torch.testing.assert_close(got.params[n], want.params[n], rtol=0, atol=0, msg=f"graphed '{n}'")
        torch.testing.assert_close(got.losses, want.losses, rtol=0, atol=0, msg="graphed losses")
        with torch.no_grad():
            for p in model.parameters():  # φ changes between calls: the graph must see it
                p.add_(0.01)
    assert len(graphed._graphs) == 1


def test_a_failed_inner_loop_capture_warns_and_launches_plainly(monkeypatch):
    """A CUDA-graph capture that raises (e.g. an operation a capture refuses) is not the user's
    error: ``inner_loop`` warns once naming it, returns the plain launch's results, and launches
    plainly from then on (as the fused stepper's capture failure does)."""
    import reptile_fast.backends.triton as T

    captures = []

    def failing_capture(run, inputs):
        captures.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(T, "_GraphedLaunch", failing_capture)
    backend = TritonBackend(cuda_graphs=True)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="capturing the inner-loop launch in a CUDA graph failed"):
        out = backend._graphed(lambda t: (t * 2, t + 1), (x,), ("settings",))
    torch.testing.assert_close(out[0], x * 2, rtol=0, atol=0, msg="the plain launch's first output")
    assert backend.graph_fallback_reason == "RuntimeError: operation not permitted when stream is capturing"
    assert captures == [1] and not backend._graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_failed_capture_on_the_gpu_gives_the_plain_results(monkeypatch):
    """A real capture that fails on the GPU (an operation inside the capture raising): the
    caller's stream is put back and the results are the plain launch's, bit for bit."""
    torch.manual_seed(11)
    model = MLP().cuda()
    gen = torch.Generator().manual_seed(12)
    tasks = Sine().sample(1, generator=gen).to("cuda")
    indices = sample_indices(1, 5, 50, 10, generator=gen).cuda()
    want = TritonBackend().inner_loop(model, tasks, indices, InnerConfig())

    import importlib

    def refusing(fn):
        def wrapped(*args, **kwargs):
            if torch.cuda.is_current_stream_capturing():  # as an operation a capture refuses
                raise RuntimeError("capture refused")
            return fn(*args, **kwargs)
        return wrapped

    v1 = importlib.import_module("reptile_fast.kernels.mlp_inner_loop")
    v2 = importlib.import_module("reptile_fast.kernels.mlp_meta_step_v2")
    monkeypatch.setattr(v1, "mlp_inner_loop", refusing(v1.mlp_inner_loop))
    monkeypatch.setattr(v2, "inner_loop", refusing(v2.inner_loop))
    stream = torch.cuda.current_stream()
    graphed = TritonBackend(cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        got = graphed.inner_loop(model, tasks, indices, InnerConfig())
    assert torch.cuda.current_stream() == stream
    for n in want.params:
        torch.testing.assert_close(got.params[n], want.params[n], rtol=0, atol=0, msg=f"'{n}' after a failed capture")


def test_check_supported_takes_cuda_without_an_index(monkeypatch):
    """device "cuda" is the current CUDA device: parameters report theirs as "cuda:0", which must
    not read as another device (the GPU benchmarks pass torch.device("cuda"))."""
    from types import SimpleNamespace

    model = MLP(1, 8, 1)
    params = [(n, SimpleNamespace(dtype=p.dtype, shape=p.shape, device=torch.device("cuda", 0))) for n, p in model.named_parameters()]
    monkeypatch.setattr(model, "named_parameters", lambda *a, **k: iter(params))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    backend = TritonBackend()
    backend.check_supported(model, torch.device("cuda"), InnerConfig(lr=0.02))
    backend.check_supported(model, "cuda", InnerConfig(lr=0.02))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with pytest.raises(UnsupportedModelError, match="not cuda:1"):
        backend.check_supported(model, "cuda", InnerConfig(lr=0.02))


def test_options_are_checked_when_the_backend_is_built():
    """cuda_graphs="no" and validate="no" meant yes (bool() of a string); a misspelt or float
    launch field failed only at the first meta-step (a float max_programs as torch.empty's error
    there).  All refused by the constructor now, naming the option."""
    for name in ("cuda_graphs", "validate"):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            TritonBackend(**{name: "no"})
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            Reptile(MLP(1, 8, 1), backend="triton", backend_options={name: 1})
    with pytest.raises(TypeError, match="LaunchConfig fields"):
        TritonBackend(launch={"mdoe": "tiled"})
    with pytest.raises(ValueError, match="mode must be"):
        TritonBackend(launch={"mode": "fast"})
    with pytest.raises(TypeError, match="max_programs must be an int"):
        TritonBackend(launch={"max_programs": 2.5})
    with pytest.raises(TypeError, match="V2Config fields"):
        TritonBackend(kernel="v2", launch={"mode": "tiled"})
    with pytest.raises(TypeError, match="max_programs must be an int"):
        TritonBackend(kernel="v2", launch={"max_programs": True})
    assert TritonBackend(launch={"num_warps": 2}).launch == {"num_warps": 2}
    assert TritonBackend(cuda_graphs=False, validate=False).validate is False
