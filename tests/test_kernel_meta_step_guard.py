"""The fused stepper's accept-or-skip kernel (kernels/meta_step_guard.py) against its rule:
φ ← new only if the loss and every element of new are finite and no earlier step since the last
reset was bad; the first bad step's number is kept; the loss is always written.

Outputs are poisoned with NaN before each call so an unwritten slot cannot pass.  Exact
comparisons: the kernel only copies values.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402

# 2 full blocks + a ragged tail: every pass loops and masks
N = 2 * G.BLOCK + 37


def _call(phi, new, loss, state, iteration, device):
    out = torch.full((1,), math.nan, device=device)
    G.accept_step(phi, new, torch.tensor([loss], device=device), state,
                  torch.tensor([iteration], device=device), out)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf
def test_accepts_finite_steps_and_skips_from_the_first_bad_one(device):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(N, generator=g).to(device)
    state = G.new_state(device)
    steps = [torch.randn(N, generator=g).to(device) for _ in range(4)]
    steps[1][N - 1] = math.inf          # the last element (in the ragged tail) is +inf
    # step 2 is finite but comes after a bad one: skipped too
    steps[3][G.BLOCK] = math.nan

    out = _call(phi, steps[0], 0.25, state, 11, device)
    assert torch.equal(phi, steps[0]), "φ after an accepted step (11)"
    assert state.tolist() == [1, 0], "state after an accepted step"
    assert float(out) == 0.25, "loss slot of step 11"

    keep = phi.clone()
    out = _call(phi, steps[1], 0.5, state, 12, device)
    assert torch.equal(phi, keep), "φ after a step with an inf parameter (12)"
    assert state.tolist() == [0, 12], "state names the first bad step"
    assert float(out) == 0.5, "loss slot of step 12 (written even when skipped)"

    _call(phi, steps[2], 0.75, state, 13, device)
    assert torch.equal(phi, keep), "φ after a finite step that follows a bad one (13)"
    assert state.tolist() == [0, 12], "the first bad step is kept"

    state.copy_(G.new_state(device))  # the host's check re-arms
    _call(phi, steps[3], 1.0, state, 14, device)
    assert torch.equal(phi, keep), "φ after a step with a NaN parameter (14)"
    assert state.tolist() == [0, 14]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_nonfinite_loss_alone_skips_the_step(device, loss):
    phi = torch.zeros(N, device=device)
    state = G.new_state(device)
    out = _call(phi, torch.ones(N, device=device), loss, state, 3, device)
    assert torch.equal(phi, torch.zeros(N, device=device)), f"φ after loss {loss}"
    assert state.tolist() == [0, 3]
    assert torch.equal(out.isnan(), torch.tensor([math.isnan(loss)], device=device)), "loss slot"


@pytest.mark.parametrize("device", DEVICES)
def test_large_finite_values_are_accepted(device):
    """The float32 extremes are finite: only NaN and ±inf count as bad."""
    new = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -0.0], device=device)
    phi = torch.zeros(4, device=device)
    state = G.new_state(device)
    _call(phi, new, 3.0e38, state, 1, device)
    assert torch.equal(phi, new) and state.tolist() == [1, 0]


def test_refuses_bad_arguments():
    phi, new = torch.zeros(8), torch.zeros(8)
    one, it, st = torch.zeros(1), torch.ones(1, dtype=torch.int64), G.new_state("cpu")
    with pytest.raises(ValueError, match="alias"):
        G.accept_step(phi, phi, one, st, it, one.clone())
    with pytest.raises(ValueError, match="one shape"):
        G.accept_step(phi, torch.zeros(9), one, st, it, one.clone())
    with pytest.raises(TypeError, match="phi must be torch.float32"):
        G.accept_step(phi.double(), new, one, st, it, one.clone())
    with pytest.raises(TypeError, match="iteration must be a torch.int64"):
        G.accept_step(phi, new, one, st, it.float(), one.clone())
    with pytest.raises(TypeError, match="loss must be"):
        G.accept_step(phi, new, torch.zeros(2), st, it, one.clone())
    with pytest.raises(ValueError, match="state two"):
        G.accept_step(phi, new, one, torch.zeros(3, dtype=torch.int64), it, one.clone())
    # a strided state (a view of every other element) had its first bad iteration written one
    # element off, outside the view: state then read [0, 0] after a bad meta-step 1
    with pytest.raises(ValueError, match="state must be contiguous"):
        G.accept_step(phi, new, one, torch.tensor([1, 0, 0, 0])[::2], it, one.clone())
    buf = torch.zeros(9)  # new one element past phi in the same buffer: pass 2 would read what it wrote
    with pytest.raises(ValueError, match="alias or overlap"):
        G.accept_step(buf[:8], buf[1:], one, st, it, one.clone())


def test_guarded_meta_step_refuses_zero_inner_steps():
    """steps=0 was accepted: its mean loss (of no steps) is NaN, so the guard marked a meta-step
    that changed nothing as the first bad one and skipped every later step."""
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    dims = (1, 8, 1)
    x, y, plan, phi = _problem(1, dims, 5, "cpu")
    state, it, loss_out = G.new_state("cpu"), torch.tensor([7]), torch.zeros(1)
    with pytest.raises(ValueError, match="steps >= 1"):
        V.guarded_meta_step(x, y, plan, phi, dims, ("tanh", "identity"), lr=0.02, eps=0.1, state=state,
                            iteration=it, loss_out=loss_out, steps=0)
    assert state.tolist() == [1, 0]


# ----------------------------------------------------------------------------- guarded_meta_step
def _problem(T, dims, seed, device, scale=1.0):
    from reptile_fast import Sine, sample_indices
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    g = torch.Generator().manual_seed(seed)
    tasks = Sine().sample(T, generator=g)
    y = tasks.y * scale
    plan = sample_indices(T, 3, 50, 10, generator=g)
    phi = torch.randn(V.n_flat_params(dims), generator=g) * 0.3
    return tasks.x.to(device), y.to(device), plan.to(device), phi.to(device)


CASES = [  # (T, dims, V2Config fields): one program (one launch) unless max_programs says more
    (1, (1, 16, 16, 1), {}),
    (3, (1, 16, 16, 1), {"max_programs": 1}),
    (3, (1, 16, 16, 1), {"max_programs": 1, "stream": True}),
    (1, (1, 24, 1), {}),
    (3, (1, 16, 16, 1), {"max_programs": 1, "accumulate": "memory"}),  # partial row in memory (1-64-64-1's mode)
    (3, (1, 16, 16, 1), {"max_programs": 2}),  # two programs: meta_step + accept_step
    # one task: the update straight from the program's registers (no partial row)
    (1, (1, 16, 16, 1), {"stream": True}),
    (1, (1, 16, 16, 1), {"preload": "prefetch", "accumulate": "memory"}),
    (1, (1, 8, 8, 8, 8, 1), {}),  # five layers
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,dims,launch", CASES)
@pytest.mark.parametrize("scale", [1.0, 1e19])  # 1e19: the squared error overflows (a skipped step)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_guarded_meta_step_is_bitwise_meta_step_then_accept_step(device, T, dims, launch, scale):
    """guarded_meta_step (one launch with one program) == meta_step + accept_step, bit for bit:
    φ, the loss slot and the state, for an accepted and a skipped meta-step."""
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    x, y, plan, phi = _problem(T, dims, 7, device, scale)
    acts = ("tanh",) * (len(dims) - 2) + ("identity",)
    config = V.V2Config(**launch)
    got_phi, want_phi = phi.clone(), phi.clone()
    got_state, want_state = G.new_state(device), G.new_state(device)
    it = torch.tensor([9], device=device)
    got_loss, want_loss = (torch.full((1,), math.nan, device=device) for _ in range(2))
    V.guarded_meta_step(x, y, plan, got_phi, dims, acts, lr=0.02, eps=0.3, state=got_state, iteration=it,
                        loss_out=got_loss, config=config)
    res = V.meta_step(x, y, plan, want_phi, dims, acts, lr=0.02, eps=0.3, config=config)
    G.accept_step(want_phi, res.params, res.loss, want_state, it, want_loss)
    assert torch.equal(got_phi, want_phi), "φ"
    assert torch.equal(got_state, want_state), "state"
    assert torch.equal(got_loss.isnan(), want_loss.isnan()) and torch.equal(
        torch.nan_to_num(got_loss), torch.nan_to_num(want_loss)), "loss slot"
    if scale == 1.0:
        assert got_state.tolist() == [1, 0] and not torch.equal(got_phi, phi), "an accepted step moved φ"
    else:
        assert got_state.tolist() == [0, 9] and torch.equal(got_phi, phi), "a skipped step left φ"


def _one_launch_and_three(x, y, plan, phi, dims, acts, it, **kw):
    """guarded_meta_step (one launch at T = 1) and meta_step + accept_step on copies of φ, from a
    healthy state: ((φ, state, loss slot) of each, the meta_step result)."""
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    device = x.device
    runs = [[phi.clone(), G.new_state(device), torch.zeros(1, device=device)] for _ in range(2)]
    (got_phi, got_state, got_loss), (want_phi, want_state, want_loss) = runs
    V.guarded_meta_step(x, y, plan, got_phi, dims, acts, state=got_state, iteration=it, loss_out=got_loss, **kw)
    res = V.meta_step(x, y, plan, want_phi, dims, acts, **kw)
    G.accept_step(want_phi, res.params, res.loss, want_state, it, want_loss)
    return runs, res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [(3, 16, 4), (3, 20, 20, 5)])
def test_one_task_cross_entropy_is_bitwise_meta_step_then_accept_step(device, dims):
    """T = 1 with class labels (cross-entropy): the one-launch update from the registers equals
    meta_step + accept_step bit for bit (φ, loss slot, state)."""
    from reptile_fast import sample_indices
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    g = torch.Generator().manual_seed(12)
    x = (torch.randn(1, 20, dims[0], generator=g) * 2).to(device)
    y = torch.randint(0, dims[-1], (1, 20), generator=g).to(device)
    plan = sample_indices(1, 3, 20, 5, generator=g).to(device)
    phi = (torch.randn(V.n_flat_params(dims), generator=g) * 0.3).to(device)
    acts = ("relu",) * (len(dims) - 2) + ("identity",)
    ((got_phi, got_state, got_loss), (want_phi, want_state, want_loss)), _ = _one_launch_and_three(
        x, y, plan, phi, dims, acts, torch.tensor([2], device=device), lr=0.1, eps=0.4, loss="cross_entropy")
    assert torch.equal(got_phi, want_phi) and not torch.equal(got_phi, phi), "φ"
    assert torch.equal(got_state, want_state) and got_state.tolist() == [1, 0], "state"
    assert torch.equal(got_loss, want_loss), "loss slot"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [(1, 16, 16, 1), (1, 24, 1)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflow: the point
def test_one_task_rejects_an_update_that_overflows_with_a_finite_loss(device, dims):
    """T = 1 (one launch, φ̃ from the registers): a finite inner loss whose outer update overflows
    (ε = 1e38, large inner steps) is skipped, bitwise as meta_step + accept_step skip it."""
    x, y, plan, phi = _problem(1, dims, 11, device)
    acts = ("tanh",) * (len(dims) - 2) + ("identity",)
    ((got_phi, got_state, got_loss), (_, want_state, want_loss)), res = _one_launch_and_three(
        x, y, plan, phi, dims, acts, torch.tensor([4], device=device), lr=5.0, eps=1e38)
    assert torch.isfinite(got_loss).all() and not torch.isfinite(res.params).all(), \
        "the case must have a finite loss and a non-finite update"
    assert got_state.tolist() == [0, 4] and torch.equal(got_phi, phi), "the overflowing step was applied"
    assert torch.equal(got_state, want_state) and torch.equal(got_loss, want_loss)


@pytest.mark.parametrize("device", DEVICES)
def test_guarded_meta_step_skips_while_unhealthy(device):
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    dims = (1, 16, 1)
    x, y, plan, phi = _problem(1, dims, 3, device)
    state = torch.tensor([0, 4], device=device)
    before = phi.clone()
    V.guarded_meta_step(x, y, plan, phi, dims, ("tanh", "identity"), lr=0.02, eps=0.5, state=state,
                        iteration=torch.tensor([5], device=device), loss_out=torch.zeros(1, device=device))
    assert torch.equal(phi, before) and state.tolist() == [0, 4]
    with pytest.raises(ValueError, match="contiguous"):
        V.guarded_meta_step(x, y, plan, torch.zeros(2 * phi.numel(), device=device)[::2], dims, ("tanh", "identity"),
                            lr=0.02, eps=0.5, state=state, iteration=torch.tensor([5], device=device),
                            loss_out=torch.zeros(1, device=device))


def test_loss_out_over_phi_is_refused():
    """The loss is written after φ: a ``loss_out`` inside φ's buffer overwrote a parameter with
    the loss, silently."""
    phi, new = torch.zeros(8), torch.ones(8)
    one, it, st = torch.zeros(1), torch.ones(1, dtype=torch.int64), G.new_state("cpu")
    with pytest.raises(ValueError, match="loss_out must not overlap phi"):
        G.accept_step(phi, new, one, st, it, phi[3:4])
