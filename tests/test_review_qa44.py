"""QA44: an adversarial review of kernel v2's public functions (session 18).

What it found, each fixed and checked here: relu turned NaN into 0 (a NaN input gave a finite
loss; v1 too); lr / eps finite in Python but beyond float32 crashed in ``torch.full`` or ran as
inf; ``guarded_meta_step`` with ``params_flat=None`` and unhashable activation / loss names
crashed with bare AttributeError / TypeError; ``grid_size`` crashed on ``config=None`` or a
device string; sparse and meta tensors crashed inside torch; ``supports_v2`` accepted a 0-wide
layer and an empty batch; ``V2Config`` / ``LaunchConfig`` refused NumPy integers that ``dims`` and
``steps`` take.  And the kernels' tanh reached 1.0 from |x| = 8.66, where tanh rounds to 1 in
fp32 only from 9.01: 1 - y², the gradient, was 0 there, so with saturated units (inputs x 100)
an adapted weight sat 1.7e-4 from float64 against torch's 8e-6.  Under the interpreter without
CUDA (conftest); tiny shapes.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from reptile_fast.kernels import mlp_inner_loop as K  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402

ACT = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda a: a}


def _data(dims, *, T=3, N=8, R=3, B=4, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, dims[0], generator=g) * scale
    y = torch.randn(T, N, dims[-1], generator=g)
    idx = torch.randint(0, N, (T, R, B), generator=g)
    phi = torch.randn(V.n_flat_params(dims), generator=g) * 0.5
    return x.to(device), y.to(device), idx.to(device), phi.to(device)


def _sgd(x, y, idx, phi, dims, acts, lr, dtype):
    """Every task's inner SGD loop by autograd in ``dtype``: adapted φ̃ ``[T, n_params]``."""
    out = []
    for t in range(x.shape[0]):
        ps = [p.to(dtype).clone().requires_grad_(True) for p in V.unflatten_params(phi.cpu(), dims)]
        for s in range(idx.shape[1]):
            a = x[t, idx[t, s]].cpu().to(dtype)
            for l in range(len(dims) - 1):
                a = ACT[acts[l]](a @ ps[2 * l].T + ps[2 * l + 1])
            grads = torch.autograd.grad(F.mse_loss(a, y[t, idx[t, s]].cpu().to(dtype)), ps)
            with torch.no_grad():
                ps = [(p - lr * g).requires_grad_(True) for p, g in zip(ps, grads)]
        out.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    return torch.stack(out)


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("device", DEVICES)
def test_relu_keeps_nan_as_torch_does(device):
    """A NaN point in the plan: NaN losses and NaN in every parameter torch's loop makes NaN (the
    kernels' relu was ``max(z, 0)``, which returns the 0)."""
    dims, acts = (2, 8, 1), ("relu", "identity")
    x, y, idx, phi = _data(dims, device=device)
    x[0, idx[0, 0, 0], 0] = float("nan")
    want = _sgd(x, y, idx, phi, dims, acts, 0.1, torch.float32)
    adapted, losses = V.inner_loop(x, y, idx, phi, dims, acts, lr=0.1)
    assert torch.isnan(losses[0]).all(), f"v2 inner losses of the task with a NaN point: {losses[0]}"
    got_nan = torch.isnan(adapted[:, :V.n_flat_params(dims)].cpu())
    assert torch.equal(got_nan, torch.isnan(want)), "v2: NaN parameters differ from torch's"
    res = V.meta_step(x, y, idx, phi, dims, acts, lr=0.1, eps=0.5)
    assert math.isnan(float(res.loss)), f"v2 meta-step loss {float(res.loss)}"
    params = list(V.unflatten_params(phi, dims))
    _, losses1 = K.mlp_inner_loop(x, y, idx, params, acts, lr=0.1)
    assert torch.isnan(losses1[0]).all(), f"v1 inner losses of the task with a NaN point: {losses1[0]}"


@pytest.mark.parametrize("device", DEVICES)
def test_tanh_reaches_one_where_fp32_tanh_does(device):
    """tanh(x) rounds to 1 in fp32 only from x = 9.0108; up to 9.0 the kernel's tanh stays below 1
    (it was 1.0 from 8.66), and the gradient 1 - y² with it."""
    from test_kernel_mlp_meta_step_v2 import _apply

    x = torch.linspace(8.0, 9.0, 2001)
    assert (torch.tanh(x.double()).float() < 1).all()  # the premise, from float64
    got = _apply("tanh", torch.cat([x, -x]), device)
    assert (got.abs() < 1).all(), f"tanh reaches 1 at x = {float(x[(got[:x.numel()] >= 1)].min())}"


@pytest.mark.parametrize("device", DEVICES)
def test_saturated_tanh_adapts_as_close_to_float64_as_torch(device):
    """The reviewer's case: a 2-16-1 tanh MLP on inputs x 100 (most units saturated), 3 steps.
    Each kernel's adapted parameters lie within 2x torch fp32's distance from float64 (v2's tanh
    has a 3-ulp bound against torch's ~0.5; before the fix: 21x)."""
    dims, acts = (2, 16, 1), ("tanh", "identity")
    x, y, idx, phi = _data(dims, scale=100.0, device=device)
    want = _sgd(x, y, idx, phi, dims, acts, 0.05, torch.float64)
    torch32 = (_sgd(x, y, idx, phi, dims, acts, 0.05, torch.float32).double() - want).abs().max()
    n = V.n_flat_params(dims)
    for kernel, run in (("v2", lambda: V.inner_loop(x, y, idx, phi, dims, acts, lr=0.05)),
                        ("v1", lambda: K.mlp_inner_loop(x, y, idx, list(V.unflatten_params(phi, dims)), acts, lr=0.05))):
        adapted, _ = run()
        got = (adapted[:, :n].cpu().double() - want).abs().max()
        assert got <= 2 * torch32, f"{kernel}: {float(got):.3g} from float64, torch fp32 {float(torch32):.3g}"


# ----------------------------------------------------------------------------- refusals
def test_scalars_beyond_float32_are_refused():
    dims, acts = (1, 4, 1), ("tanh", "identity")
    x, y, idx, phi = _data(dims)
    for lr in (1e39, -3.5e38):
        with pytest.raises(ValueError, match=r"lr must be at most 3\.403e\+38"):
            V.inner_loop(x, y, idx, phi, dims, acts, lr=lr)
        with pytest.raises(ValueError, match=r"lr must be at most 3\.403e\+38"):
            K.mlp_inner_loop(x, y, idx, list(V.unflatten_params(phi, dims)), acts, lr=lr)
    with pytest.raises(ValueError, match=r"eps must be at most 3\.403e\+38"):
        V.meta_step(x, y, idx, phi, dims, acts, lr=0.1, eps=1e39)
    with pytest.raises(ValueError, match="lr must be a finite number"):  # beyond float64: OverflowError before
        V.inner_loop(x, y, idx, phi, dims, acts, lr=10 ** 400)


def test_names_that_are_not_strings_are_refused_by_name():
    dims = (1, 4, 1)
    x, y, idx, phi = _data(dims)
    with pytest.raises(ValueError, match="activation must be one of"):
        V.inner_loop(x, y, idx, phi, dims, [["relu"], "identity"], lr=0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        V.inner_loop(x, y, idx, phi, dims, ("relu", "identity"), lr=0.1, loss=["mse"])
    with pytest.raises(ValueError, match="activation must be one of"):
        K.mlp_inner_loop(x, y, idx, list(V.unflatten_params(phi, dims)), [{"tanh"}, "identity"], lr=0.1)


def test_guarded_meta_step_refuses_a_missing_phi():
    dims, acts = (1, 4, 1), ("tanh", "identity")
    x, y, idx, _ = _data(dims, T=1)
    with pytest.raises(TypeError, match="params_flat .* must be a torch.Tensor"):
        V.guarded_meta_step(x, y, idx, None, dims, acts, lr=0.1, eps=0.5, state=G.new_state("cpu"),
                            iteration=torch.ones(1, dtype=torch.int64), loss_out=torch.empty(1))


def test_sparse_and_meta_tensors_are_refused():
    dims, acts = (1, 4, 1), ("tanh", "identity")
    x, y, idx, phi = _data(dims)
    with pytest.raises(TypeError, match="x must be a dense"):
        V.meta_step(x.to_sparse(), y, idx, phi, dims, acts, lr=0.1, eps=0.5)
    with pytest.raises(TypeError, match="params_flat must be a dense"):
        V.inner_loop(x, y, idx, phi.to_sparse(), dims, acts, lr=0.1)
    meta = [t.to("meta") for t in (x, y, idx, phi)]
    with pytest.raises(ValueError, match="meta device"):
        V.inner_loop(*meta, dims, acts, lr=0.1)
    with pytest.raises(ValueError, match="eps as a tensor must be one dense float32 element"):
        V.meta_step(x, y, idx, phi, dims, acts, lr=0.1, eps=torch.tensor([0.5]).to_sparse())
    one = dict(x=x[:1], y=y[:1], indices=idx[:1], params_flat=phi.clone(), dims=dims, activations=acts, lr=0.1,
               eps=0.5, state=G.new_state("cpu"), iteration=torch.ones(1, dtype=torch.int64), loss_out=torch.empty(1))
    for name in ("state", "iteration", "loss_out"):
        bad = dict(one, **{name: one[name].to_sparse()})
        with pytest.raises(TypeError, match=f"{name} must be a .* tensor on cpu \\(dense\\)"):
            V.guarded_meta_step(**bad)


def test_shape_helpers_take_defaults_and_refuse_what_cannot_run():
    assert V.grid_size(4, "cpu") == V.grid_size(4, torch.device("cpu"), V.V2Config()) == 4
    assert V.grid_size(20, "cpu", None) == 8  # the interpreter's default grid
    assert not V.supports_v2((1, 0, 1), 4) and "at least 1" in V.unsupported_reason((1, 0, 1), 4)
    for batch in (0, -5):
        assert not V.supports_v2((1, 8, 1), batch) and "at least one point" in V.unsupported_reason((1, 8, 1), batch)
    assert "got 0" in V.unsupported_reason([], 4)
    assert V.supports_v2((1, 64, 64, 1), 10)


def test_configs_take_numpy_integers_as_ints():
    cfg = V.V2Config(num_warps=np.int64(4), programs_per_sm=np.int32(2), max_programs=np.int64(3),
                     max_registers=np.int16(160))
    assert cfg == V.V2Config(num_warps=4, programs_per_sm=2, max_programs=3, max_registers=160)
    assert all(type(getattr(cfg, f)) is int for f in ("num_warps", "programs_per_sm", "max_programs", "max_registers"))
    launch = K.LaunchConfig(mode="registers", num_warps=np.int64(4), max_programs=np.int64(2))
    assert type(launch.num_warps) is int and type(launch.max_programs) is int
    for bad in (np.float64(4.0), True, 4.0):
        with pytest.raises(TypeError, match="num_warps must be an int"):
            V.V2Config(num_warps=bad)
