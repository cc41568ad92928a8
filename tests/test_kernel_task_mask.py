"""Kernel v1's task mask (``t < n_tasks``) in both variants, with a readable failure.

The last program of a grid whose task count is not a multiple of its tasks per program (registers
variant) or programs (tiled variant) has slots beyond ``T``.  A mask that lets slot ``T`` run read
past the end of x, y and the plan: under the interpreter that crashed the process (no assertion,
CI red with nothing to read), on a GPU it reads another allocation.  Here every input and output
is the first ``T`` rows of a buffer with one more task, so slot ``T`` reads valid memory, and the
extra output rows, poisoned with NaN, must come back untouched.  Under the interpreter (CI);
with CUDA on the GPU too.
"""
import pytest
import torch

pytest.importorskip("triton")

from reptile_fast.kernels import mlp_inner_loop as K  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402

DIMS = (1, 16, 16, 1)
ACTS = ("tanh", "tanh", "identity")


def _params(device):
    g = torch.Generator().manual_seed(0)
    return [t.to(device) for d_in, d_out in zip(DIMS[:-1], DIMS[1:])
            for t in (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, generator=g) * 0.1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [K.LaunchConfig("registers", num_warps=4, tasks_per_program=2),
                                    K.LaunchConfig("tiled", num_warps=4, max_programs=2)],
                         ids=["registers-2-per-program", "tiled-2-programs"])
@pytest.mark.parametrize("T", [1, 3, 5])
def test_slots_beyond_the_last_task_write_nothing(device, config, T):
    N, R, B = 12, 3, 4
    g = torch.Generator().manual_seed(T)
    x_all = torch.randn(T + 1, N, DIMS[0], generator=g).to(device)
    y_all = torch.randn(T + 1, N, DIMS[-1], generator=g).to(device)
    idx_all = torch.randint(0, N, (T + 1, R, B), generator=g).to(device)
    n_params = K.n_flat_params(DIMS)
    row = -(-n_params // 4) * 4
    out_all = torch.full((T + 1, row), float("nan"), device=device)
    losses_all = torch.full((T + 1, R), float("nan"), device=device)
    params = _params(device)
    out, losses = K.mlp_inner_loop(x_all[:T], y_all[:T], idx_all[:T], params, ACTS, lr=0.02, config=config,
                                   out=out_all[:T], out_losses=losses_all[:T])
    extra = {"out row T": out_all[T], "out_losses row T": losses_all[T]}
    for name, t in extra.items():
        assert bool(t.isnan().all()), f"{name} was written: the task mask let slot T={T} run ({config.mode})"
    assert bool(out[:, :n_params].isfinite().all()) and bool(losses.isfinite().all()), "a task within T was not written"
    # the same tasks on their own buffers (no extra task behind them) give the same result
    ref_out, ref_losses = K.mlp_inner_loop(x_all[:T].clone(), y_all[:T].clone(), idx_all[:T].clone(), params,
                                           ACTS, lr=0.02, config=config)
    torch.testing.assert_close(out[:, :n_params], ref_out[:, :n_params], rtol=0, atol=0,
                               msg=lambda m: f"adapted parameters depend on memory beyond T ({config.mode})\n{m}")
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
