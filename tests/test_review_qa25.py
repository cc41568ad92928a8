"""QA25's review of kernel v2's launchers (issue 12): what each fix pins.

Under the Triton interpreter without CUDA (tests/conftest.py); tiny models, one launch or none.
"""
import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import MLP, sample_indices  # noqa: E402
from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402
from test_kernel_mlp_meta_step_v2 import regression_tasks, spec_of  # noqa: E402


def _problem(T=3):
    torch.manual_seed(0)
    spec, _, phi = spec_of(MLP(2, 8, 1, depth=1))
    tasks = regression_tasks(T, 8, 2, 1, seed=1)
    plan = sample_indices(T, 2, 8, 4, generator=torch.Generator().manual_seed(2))
    return (tasks.x, tasks.y, plan, phi, spec.dims, spec.activations), phi.numel()


def test_meta_step_refuses_eps_inside_out_or_partials():
    """ε as a device tensor that lies inside ``out`` or ``partials``: the first launch wrote the
    partial sums (or another program of the second wrote φ') before ε was read, so the update ran
    with a step size taken from those sums, silently (1-40-40-1: max |Δφ| 6e-3 against eps=0.5)."""
    args, n = _problem()
    out = torch.zeros(n)
    out[0] = 0.5
    with pytest.raises(ValueError, match="eps must not overlap out or partials"):
        V.meta_step(*args, lr=0.02, eps=out[:1], out=out)
    partials = torch.zeros(V.grid_size(3, torch.device("cpu"), V.V2Config()), n)
    partials[0, 0] = 0.5
    with pytest.raises(ValueError, match="eps must not overlap out or partials"):
        V.meta_step(*args, lr=0.02, eps=partials[0, :1], partials=partials)


def test_guarded_meta_step_refuses_eps_inside_scratch():
    """guarded_meta_step's scratch is the proposed φ of its three-launch path: ε inside it is the
    same silent error, refused under scratch's name on both paths (as its other overlaps are)."""
    args, n = _problem()
    scratch = torch.zeros(n)
    for programs in (1, 3):
        with pytest.raises(ValueError, match="eps must not overlap scratch"):
            V.guarded_meta_step(*args, lr=0.02, eps=scratch[:1], state=G.new_state("cpu"),
                                iteration=torch.ones(1, dtype=torch.int64), loss_out=torch.zeros(1),
                                config=V.V2Config(max_programs=programs), scratch=scratch)



def test_guarded_meta_step_refuses_phi_or_state_over_its_inputs():
    """guarded_meta_step rewrites params_flat and state in place: lying over x or the plan they
    overwrote the caller's data, silently (its loss_out and scratch were refused there already)."""
    args, n = _problem()
    x, y, plan, phi, dims, acts = args
    kw = dict(lr=0.02, eps=0.5, iteration=torch.ones(1, dtype=torch.int64), loss_out=torch.zeros(1))
    xs = torch.cat([phi, x.reshape(-1)])  # φ then the inputs, in one buffer; φ's last element over x[0]
    with pytest.raises(ValueError, match="params_flat must not overlap x, y or indices"):
        V.guarded_meta_step(xs[n:].view_as(x), y, plan, xs[1:n + 1], dims, acts, state=G.new_state("cpu"), **kw)
    packed = torch.cat([torch.tensor([1, 0]), plan.reshape(-1)])  # the state's second element over the plan's first
    with pytest.raises(ValueError, match="state must not overlap x, y or indices"):
        V.guarded_meta_step(x, y, packed[2:].view_as(plan), phi.clone(), dims, acts, state=packed[1:3], **kw)


def test_every_launcher_launches_on_its_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device and stream, not the tensors': tensors on cuda:1
    from a process whose current device is cuda:0 ran on GPU 0 (an illegal address).  Every public
    launcher now enters ``_launch_device(x.device)`` (``torch.cuda.device`` on CUDA) around its
    launches; here, without a GPU, that each one does, with the tensors' device."""
    import contextlib

    from reptile_fast.kernels import mlp_inner_loop as K

    seen = []

    def record(device):
        seen.append(device)
        return contextlib.nullcontext()

    for module in (K, V, G):
        monkeypatch.setattr(module, "_launch_device", record)
    args, n = _problem(T=2)
    x, y, plan, phi, dims, acts = args
    params = V.unflatten_params(phi, dims)
    cases = {
        "mlp_inner_loop": lambda: K.mlp_inner_loop(x, y, plan, params, acts, lr=0.02),
        "inner_loop": lambda: V.inner_loop(*args, lr=0.02),
        "meta_step": lambda: V.meta_step(*args, lr=0.02, eps=0.5),
        "guarded_meta_step": lambda: V.guarded_meta_step(
            *args[:3], phi.clone(), *args[4:], lr=0.02, eps=0.5, state=G.new_state("cpu"),
            iteration=torch.ones(1, dtype=torch.int64), loss_out=torch.zeros(1), config=V.V2Config(max_programs=1)),
        "accept_step": lambda: G.accept_step(phi.clone(), phi.clone(), torch.zeros(1), G.new_state("cpu"),
                                             torch.ones(1, dtype=torch.int64), torch.zeros(1)),
    }
    for name, call in cases.items():
        seen.clear()
        call()
        assert seen == [x.device], f"{name} launched outside its tensors' device context: {seen}"
