"""Backend "torch"'s MLP path over blocks of tasks (``task_block``): the same numbers as all tasks
at once (bitwise: every task's arithmetic is independent of the others'), and the reference's
within the project's fp32 tolerance (rtol 1e-5 / atol 1e-6)."""
import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Sine, TaskBatch, sample_indices
from reptile_fast.backends.base import InnerConfig
from reptile_fast.backends.mlp_batched import (StackedMLP, default_task_block, gather_minibatches,
                                               mlp_inner_loop, stack_mlp_params)
from reptile_fast.backends.reference import ReferenceBackend
from reptile_fast.backends.torch_func import TorchBackend
from reptile_fast.mlp_spec import extract_mlp_spec


def _classification(T, N, d_in, C, seed):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, N, d_in, generator=g), torch.randint(0, C, (T, N), generator=g))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_blocked_equals_unblocked_bitwise(loss):
    torch.manual_seed(0)
    if loss == "mse":
        model, tasks = MLP(1, 32, 1), Sine().sample(37, generator=torch.Generator().manual_seed(1))
    else:
        model = nn.Sequential(nn.Linear(3, 24), nn.ReLU(), nn.Linear(24, 5))
        tasks = _classification(37, 20, 3, 5, 1)
    spec = extract_mlp_spec(model)
    idx = sample_indices(37, 4, tasks.n_points, 6, generator=torch.Generator().manual_seed(2))
    xs, ys = gather_minibatches(tasks.x, tasks.y, idx)
    named = dict(model.named_parameters())
    whole = mlp_inner_loop(spec, stack_mlp_params(spec, named, 37), xs, ys, lr=0.05, loss=loss)
    # 1 and 36 would leave a block of one task: the split evens them out (2 → blocks of 2 or 3 tasks)
    for block in (1, 2, 8, 18, 36, 37, 100):
        blocked = mlp_inner_loop(spec, stack_mlp_params(spec, named, 37), xs, ys, lr=0.05, loss=loss,
                                 task_block=block)
        assert torch.equal(blocked.params.flat, whole.params.flat), block
        assert torch.equal(blocked.losses, whole.losses), block
        # φ copied block by block (init=) instead of stacked up front: the same numbers
        lazy = mlp_inner_loop(spec, StackedMLP.empty(spec, 37), xs, ys, lr=0.05, loss=loss, task_block=block,
                              init=named)
        assert torch.equal(lazy.params.flat, whole.params.flat), block


def test_backend_blocks_match_reference_and_unblocked():
    torch.manual_seed(3)
    model = MLP()
    tasks = Sine().sample(20, generator=torch.Generator().manual_seed(4))
    idx = sample_indices(20, 5, 50, 10, generator=torch.Generator().manual_seed(5))
    config = InnerConfig(lr=0.02)
    blocked = TorchBackend(task_block=6).inner_loop(model, tasks, idx, config)
    whole = TorchBackend(task_block=None).inner_loop(model, tasks, idx, config)
    ref = ReferenceBackend().inner_loop(model, tasks, idx, config)
    for name in ref.params:
        assert torch.equal(blocked.params[name], whole.params[name]), name
        torch.testing.assert_close(blocked.params[name], ref.params[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked.losses, ref.losses, rtol=1e-5, atol=1e-6)


def test_blocks_leave_adam_fomaml_and_grad_weights_whole():
    """Paths that need the flat buffer run unblocked: the same result as task_block=None."""
    torch.manual_seed(6)
    model = MLP(1, 16, 1)
    tasks = Sine().sample(9, generator=torch.Generator().manual_seed(7))
    for config, rows in ((InnerConfig(lr=0.01, optimizer="adam"), 3), (InnerConfig(lr=0.02, algorithm="fomaml"), 4),
                         (InnerConfig(lr=0.02, grad_weights=(0.5, 1.0, 2.0)), 3)):
        idx = sample_indices(9, rows, 50, 5, generator=torch.Generator().manual_seed(8))
        a = TorchBackend(task_block=2).inner_loop(model, tasks, idx, config)
        b = TorchBackend(task_block=None).inner_loop(model, tasks, idx, config)
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name])


def test_task_block_validation_and_default():
    for bad in (0, -3, 2.5, True, "big"):
        with pytest.raises(ValueError, match="task_block"):
            TorchBackend(task_block=bad)
    spec = extract_mlp_spec(MLP())
    assert default_task_block(spec, 10) == 63  # 2 MiB / (4 B · (4353 + 3·10·130))
    params = stack_mlp_params(spec, dict(MLP().named_parameters()), 4)
    with pytest.raises(ValueError, match="outside"):
        params.block(2, 5)
    xs = torch.zeros(2, 4, 10, 1)
    with pytest.raises(ValueError, match="task_block"):
        mlp_inner_loop(spec, params, xs, xs, lr=0.1, task_block=0)
    with pytest.raises(ValueError, match="fused SGD"):
        mlp_inner_loop(spec, params.block(0, 2), xs[:, :2], xs[:, :2], lr=0.1, grad_weights=(1.0, 1.0))
    assert isinstance(params.block(1, 3), StackedMLP) and params.block(1, 3).weights[0].shape[0] == 2
