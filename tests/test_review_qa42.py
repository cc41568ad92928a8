"""QA42: backend "triton"'s default kernel "auto" — v2 where it can run the model and inner batch,
v1 where it cannot (v2 measured faster on an H200 at every T >= 256, and at T = 1 in ieee and
tf32x3: bench/results/gpu-h200-2026-12-04/defaults-w4-pps2/summary.txt).

Oracles: backend "reference" on the same draws (rtol 1e-5 / atol 1e-6, fp32 against fp32) and the
reference in float64 (the triton run's error within 2x the fp32 reference's plus 2^-23).  Under the
interpreter without CUDA (conftest: TRITON_INTERPRET=1, TF32 off); tiny shapes, few steps.
"""
import copy

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import MLP, Reptile, Sine, reference, sample_indices  # noqa: E402
from reptile_fast.backends import InnerConfig, UnsupportedModelError, get_backend  # noqa: E402
from reptile_fast.backends.triton import (DEFAULT_KERNEL, FUSED_ENV, KERNEL_ENV, TritonBackend,  # noqa: E402
                                          TritonFusedStepper)
from reptile_fast.kernels.mlp_meta_step_v2 import MAX_BATCH_V2  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
BIG = MAX_BATCH_V2 + 1


@pytest.fixture(autouse=True)
def _no_kernel_env(monkeypatch):
    # the defaults under test: no kernel or fused choice from the caller's environment
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.delenv(FUSED_ENV, raising=False)


def _close(model, twin, what):
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"φ '{n}' {what}\n{m}")


def _draw(gen, batch, rows=2, tasks=2, points=40):
    t = Sine(n_points=points).sample(tasks, generator=gen)
    return t, sample_indices(tasks, rows, t.n_points, batch, generator=gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_fn, kernel", [(reference.MLP, "v2"), (lambda: MLP(1, 80, 1, depth=2), "v1")],
                         ids=["sine-1-64-64-1", "1-80-80-1"])
def test_default_kernel_matches_the_reference(device, model_fn, kernel):
    """A default TritonBackend trainer resolves v2 on the sine MLP and v1 on a model wider than
    v2's 64 features, and its meta-steps and adapted parameters equal backend "reference"'s."""
    assert DEFAULT_KERNEL == "auto"
    torch.manual_seed(0)
    model_ref = model_fn()
    model_tri, model_64 = copy.deepcopy(model_ref).to(device), copy.deepcopy(model_ref).double()
    ref = Reptile(model_ref, backend="reference", outer_lr=0.1, inner_steps=2)
    ref64 = Reptile(model_64, backend="reference", outer_lr=0.1, inner_steps=2)
    tri = Reptile(model_tri, backend="triton", outer_lr=0.1, inner_steps=2)
    assert (tri.backend.kernel_option, tri.backend.kernel) == ("auto", kernel)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        tasks, indices = _draw(gen, 10)
        m_ref = ref.meta_step(tasks, indices)
        ref64.meta_step(tasks.to(dtype=torch.float64), indices)
        m_tri = tri.meta_step(tasks.to(device), indices.to(device))
        assert tri.backend.last_kernel == kernel
        assert float(m_tri["loss"]) == pytest.approx(float(m_ref["loss"]), rel=RTOL, abs=ATOL), f"meta-step {step}"
    _close(model_tri, model_ref, f"after 2 meta-steps (kernel {kernel})")
    for (name, p64), p_ref, p_tri in zip(model_64.named_parameters(), model_ref.parameters(), model_tri.parameters()):
        p64 = p64.detach()
        e_tri = float((p_tri.detach().cpu().double() - p64).norm() / p64.norm())
        e_ref = float((p_ref.detach().double() - p64).norm() / p64.norm())
        assert e_tri <= 2 * e_ref + 2.0 ** -23, f"φ '{name}': {e_tri:.3g} vs fp32 reference {e_ref:.3g}"
    tasks, indices = _draw(gen, 10, rows=3)
    got, want = tri.adapt(tasks.to(device), 3, indices.to(device)), ref.adapt(tasks, 3, indices)
    for name, p in want.params.items():
        torch.testing.assert_close(got.params[name].cpu(), p, rtol=RTOL, atol=ATOL, msg=f"adapted '{name}'")


@pytest.mark.parametrize("device", DEVICES)
def test_inner_batch_beyond_v2_switches_to_v1_and_back(device):
    """inner_batch_size 33 moves the default backend (the same object) to v1 instead of refusing
    it, 10 brings it back to v2; a trainer built with 33 starts on v1; φ equals the reference."""
    torch.manual_seed(2)
    model = MLP(1, 16, 1, depth=1)
    twin = copy.deepcopy(model)
    tri = Reptile(model.to(device), backend="triton", inner_steps=2)
    ref = Reptile(twin, backend="reference", inner_steps=2)
    backend = tri.backend
    assert backend.kernel == "v2"
    gen = torch.Generator().manual_seed(3)
    for batch, kernel in [(BIG, "v1"), (10, "v2")]:
        tri.inner_batch_size = ref.inner_batch_size = batch
        assert tri.backend is backend and backend.kernel == kernel, f"inner_batch_size={batch}"
        tasks, indices = _draw(gen, batch)
        tri.meta_step(tasks.to(device), indices.to(device))
        ref.meta_step(tasks, indices)
        assert backend.last_kernel == kernel
        _close(model, twin, f"after inner_batch_size={batch}")
    assert Reptile(copy.deepcopy(model), backend="triton", inner_batch_size=BIG).backend.kernel == "v1"
    # a named v2 still refuses it (tests/test_backend_triton_v2.py), a named v1 stays v1
    with pytest.raises(UnsupportedModelError, match="inner batches up to"):
        Reptile(copy.deepcopy(model), backend="triton", inner_batch_size=BIG, backend_options={"kernel": "v2"})
    named = Reptile(copy.deepcopy(model), backend="triton", backend_options={"kernel": "v1"})
    named.inner_batch_size = 10
    assert named.backend.kernel == "v1"


@pytest.mark.parametrize("device", DEVICES)
def test_a_plan_beyond_v2_runs_on_v1_for_that_call(device):
    """A plan of 33 points passed to meta_step or adapt runs on v1 (v2 refused it) on the same
    backend, without changing its resolved kernel; the next plan of 10 runs on v2 again."""
    torch.manual_seed(4)
    model = MLP(1, 16, 1, depth=1)
    twin = copy.deepcopy(model)
    tri = Reptile(model.to(device), backend="triton", inner_steps=2)
    ref = Reptile(twin, backend="reference", inner_steps=2)
    backend = tri.backend
    gen = torch.Generator().manual_seed(5)
    for batch, ran in [(BIG, "v1"), (10, "v2"), (BIG, "v1")]:
        tasks, indices = _draw(gen, batch)
        tri.meta_step(tasks.to(device), indices.to(device))
        ref.meta_step(tasks, indices)
        assert tri.backend is backend and (backend.kernel, backend.last_kernel) == ("v2", ran), f"plan of {batch}"
        _close(model, twin, f"after a plan of {batch} points")
    assert tri.inner_batch_size == 10
    tasks, indices = _draw(gen, BIG, rows=2)
    got, want = tri.adapt(tasks.to(device), 2, indices.to(device)), ref.adapt(tasks, 2, indices)
    assert backend.last_kernel == "v1"
    for name, p in want.params.items():
        torch.testing.assert_close(got.params[name].cpu(), p, rtol=RTOL, atol=ATOL, msg=f"adapted '{name}'")


def test_trainer_auto_stays_on_triton_across_v2s_limit(monkeypatch):
    """backend="auto" with the default kernel: beyond v2's 32 points the triton backend itself moves
    to v1 (with kernel "v2" named it moved to torch: test_auto_follows_inner_batch_size_across_v2s_limit)."""
    monkeypatch.setattr(TritonBackend, "auto_candidate", lambda self, dev: True)
    trainer = Reptile(MLP(1, 8, 1, depth=1), backend="auto", inner_steps=1)
    backend = trainer.backend
    assert isinstance(backend, TritonBackend) and backend.kernel == "v2"
    trainer.inner_batch_size = BIG
    assert trainer.backend is backend and backend.kernel == "v1"
    trainer.inner_batch_size = 10
    assert trainer.backend is backend and backend.kernel == "v2"
    tasks, indices = _draw(torch.Generator().manual_seed(6), BIG, rows=1)
    trainer.meta_step(tasks, indices)
    assert trainer.backend is backend and (backend.kernel, backend.last_kernel) == ("v2", "v1")


def test_fused_preference_follows_the_resolved_kernel(monkeypatch):
    """$REPTILE_FAST_TRITON_FUSED=1 under kernel "auto": the fused stepper runs where the kernel
    resolves to v2, not beyond v2's inner batch (v1, eager) nor for a plan of more points; it
    comes back within the limit.  φ equals the reference throughout."""
    monkeypatch.setenv(FUSED_ENV, "1")
    torch.manual_seed(7)
    model = MLP(1, 8, 1, depth=1)
    twin = copy.deepcopy(model)
    tri = Reptile(model, backend="triton", inner_steps=2)
    ref = Reptile(twin, backend="reference", inner_steps=2)
    assert not tri.backend.fused_explicit and tri.backend.fused
    assert isinstance(tri.stepper(2), TritonFusedStepper)
    gen = torch.Generator().manual_seed(8)
    for batch, fused in [(10, True), (BIG, False), (10, True)]:
        tri.inner_batch_size = ref.inner_batch_size = batch
        assert tri.backend.fused is fused and (tri._fused is not None) is fused, f"inner_batch_size={batch}"
        assert (tri.stepper(2) is tri._fused) if fused else (tri.stepper(2) is tri._eager)
        tasks, indices = _draw(gen, batch)
        tri.meta_step(tasks, indices)
        ref.meta_step(tasks, indices)
        tri.check_finite()
        _close(model, twin, f"after inner_batch_size={batch} (fused {fused})")
    tasks, indices = _draw(gen, BIG)  # a plan v2 cannot run: the eager stepper, on v1
    tri.meta_step(tasks, indices)
    ref.meta_step(tasks, indices)
    assert tri._fused is not None and tri.backend.last_kernel == "v1"
    _close(model, twin, "after a plan of 33 points with the fused preference")
    # with an outer optimizer the preference gives way at every size (no fused stepper, no error)
    opt_model = MLP(1, 8, 1, depth=1)
    with_opt = Reptile(opt_model, backend="triton", outer_optimizer=torch.optim.SGD(opt_model.parameters(), lr=0.1))
    for batch in (BIG, 10):
        with_opt.inner_batch_size = batch
        assert with_opt._fused is None and with_opt.stepper(2) is with_opt._eager
    # on a model v2 cannot run the preference does not apply
    wide = Reptile(MLP(1, 80, 1, depth=1), backend="triton")
    assert wide.backend.kernel == "v1" and not wide.backend.fused and wide._fused is None


def test_fused_true_pins_v2():
    """fused=True under kernel "auto" is a demand for kernel v2: pinned from the start, a model or
    inner batch v2 cannot run is refused as with kernel "v2"."""
    backend = TritonBackend(fused=True)
    assert (backend.kernel_option, backend.kernel, backend.fused) == ("auto", "v2", True)
    with pytest.raises(UnsupportedModelError, match="feature sizes up to 64"):
        Reptile(MLP(1, 80, 1, depth=1), backend="triton", backend_options={"fused": True})
    with pytest.raises(UnsupportedModelError, match="inner batches up to"):
        Reptile(MLP(1, 8, 1, depth=1), backend="triton", inner_batch_size=BIG, backend_options={"fused": True})
    trainer = Reptile(MLP(1, 8, 1, depth=1), backend="triton", backend_options={"fused": True})
    assert isinstance(trainer.stepper(2), TritonFusedStepper)
    with pytest.raises(UnsupportedModelError, match="inner batches up to"):
        trainer.inner_batch_size = BIG
    with pytest.raises(TypeError, match="V2Config fields.*fused=True runs kernel v2"):
        TritonBackend(fused=True, launch={"mode": "tiled"})
    with pytest.raises(ValueError, match="needs kernel='v2'"):
        TritonBackend(kernel="v1", fused=True)


def test_launch_fields_pin_the_kernel(monkeypatch):
    """Under "auto", launch fields of only one kernel pin it; shared ones (num_warps, max_programs)
    leave the choice to the model; fields of neither, or of both kernels at once, are TypeErrors."""
    from reptile_fast.kernels import mlp_inner_loop as K

    small, wide = MLP(1, 8, 1, depth=1), MLP(1, 80, 1, depth=1)
    cpu = torch.device("cpu")
    v1 = TritonBackend(launch={"mode": "tiled"})
    assert v1.kernel == "v1"
    v1.check_supported(small, cpu, InnerConfig())
    v1.check_batch_size(small, 10)
    assert v1.kernel == "v1", "a v1-only launch field pins v1 even where v2 could run"
    seen = []
    launch = K.mlp_inner_loop
    monkeypatch.setattr(K, "mlp_inner_loop", lambda *a, **k: (seen.append(k["config"]), launch(*a, **k))[1])
    tasks, indices = _draw(torch.Generator().manual_seed(9), 10, rows=1)
    v1.inner_loop(small, tasks, indices, InnerConfig())
    assert v1.last_kernel == "v1" and seen and seen[0].mode == "tiled"
    v2 = TritonBackend(launch={"programs_per_sm": 2})
    assert v2.kernel == "v2"
    with pytest.raises(UnsupportedModelError, match="feature sizes up to 64"):
        v2.check_supported(wide, cpu, InnerConfig())
    shared = TritonBackend(launch={"num_warps": 4, "max_programs": 2})
    assert shared.kernel == "auto"
    shared.check_supported(wide, cpu, InnerConfig())
    assert shared.kernel == "v1"
    shared.check_supported(small, cpu, InnerConfig())
    assert shared.kernel == "v2"
    with pytest.raises(TypeError, match="LaunchConfig fields.*V2Config fields.*'bogus'"):
        TritonBackend(launch={"bogus": 1})
    with pytest.raises(TypeError, match="kernel v1 only.*kernel v2 only"):
        TritonBackend(launch={"mode": "tiled", "preload": True})
    with pytest.raises(ValueError, match="num_warps.*must suit both"):
        TritonBackend(launch={"num_warps": 32})  # v1 takes 32 warps, v2 at most 16
    assert TritonBackend(kernel="v1", launch={"num_warps": 32}).kernel == "v1"
    with pytest.raises(TypeError, match="max_programs must be an int"):
        TritonBackend(launch={"max_programs": 2.5})


def test_kernel_environment(monkeypatch):
    """$REPTILE_FAST_TRITON_KERNEL takes "auto", "v1" or "v2"; anything else is a ValueError
    naming the three; an argument wins over it."""
    for value in ("auto", "v1", "v2"):
        monkeypatch.setenv(KERNEL_ENV, value)
        backend = get_backend("triton")
        assert backend.kernel_option == value and backend.kernel == ("auto" if value == "auto" else value)
    monkeypatch.setenv(KERNEL_ENV, "v2")
    assert TritonBackend(kernel="auto").kernel_option == "auto"
    for bad in ("V2", "", "v3"):
        monkeypatch.setenv(KERNEL_ENV, bad)
        with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'v1', 'v2'\).*REPTILE_FAST_TRITON_KERNEL"):
            TritonBackend()
    monkeypatch.delenv(KERNEL_ENV)
    with pytest.raises(ValueError, match=r"\('auto', 'v1', 'v2'\)"):
        TritonBackend(kernel="fast")
    with pytest.raises(ValueError, match=r"\('auto', 'v1', 'v2'\)"):
        Reptile(MLP(1, 8, 1, depth=1), backend="triton", backend_options={"kernel": 2})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graphs_are_keyed_by_the_kernel_that_ran():
    """With cuda_graphs under "auto", a plan of 10 (v2) and one of 33 (v1) are two graphs, each
    keyed by the kernel that ran it, and each equals the plain launch bitwise."""
    torch.manual_seed(10)
    model = MLP(1, 16, 1, depth=1).cuda()
    graphed, plain = TritonBackend(cuda_graphs=True), TritonBackend()
    gen = torch.Generator().manual_seed(11)
    for batch in (10, BIG, 10):
        tasks, indices = _draw(gen, batch)
        tasks, indices = tasks.to("cuda"), indices.cuda()
        got = graphed.inner_loop(model, tasks, indices, InnerConfig())
        want = plain.inner_loop(model, tasks, indices, InnerConfig())
        for n in want.params:
            torch.testing.assert_close(got.params[n], want.params[n], rtol=0, atol=0, msg=f"graphed '{n}' ({batch})")
    assert sorted(key[0] for key in graphed._graphs) == ["v1", "v2"]
