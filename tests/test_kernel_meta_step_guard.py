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
    with pytest.raises(ValueError, match="state two"):
        G.accept_step(phi, new, one, torch.zeros(3, dtype=torch.int64), it, one.clone())
