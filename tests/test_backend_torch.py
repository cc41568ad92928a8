"""Backend "torch" (batched-MLP fast path and generic torch.func path) against the reference.

Every comparison gives both backends the same TaskBatch and minibatch plan, through the trainer
as a user would (``Reptile(model, backend=...).meta_step(tasks, indices)``).  fp32 tolerances
are the issue's: rtol 1e-5 / atol 1e-6 (TF32 is off in conftest); float64 checks are tight.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from reptile_fast import MLP, OmniglotConvNet, Reptile, Sine, TaskBatch, reference, sample_indices
from reptile_fast.backends import get_backend
from reptile_fast.backends.base import Backend, InnerConfig
from reptile_fast.backends.mlp_batched import (gather_minibatches, mlp_inner_loop,
                                               stack_mlp_params)
from reptile_fast.backends.torch_func import TorchBackend
from reptile_fast.mlp_spec import extract_mlp_spec

RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------- helpers
def regression_tasks(T, n_in=1, n_out=1, n_points=50, seed=0):
    """Sine tasks for 1-in/1-out models; smooth random regression targets otherwise."""
    g = torch.Generator().manual_seed(seed)
    if n_in == 1 and n_out == 1:
        return Sine(n_points=n_points).sample(T, generator=g)
    x = torch.rand(T, n_points, n_in, generator=g) * 4 - 2
    mix = torch.randn(T, n_in, n_out, generator=g)
    return TaskBatch(x, torch.sin(x @ mix) + 0.1 * torch.randn(T, n_points, n_out, generator=g))


def class_tasks(T, in_shape, n_classes, n_points, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n_points, *in_shape, generator=g)
    y = torch.arange(n_points).remainder(n_classes).repeat(T, 1)
    return TaskBatch(x, y)


def plans(T, meta_steps, rows, n_points, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [sample_indices(T, rows, n_points, batch, generator=g) for _ in range(meta_steps)]


def run_trainer(model, backend, task_list, plan_list, fast_mlp=True, **kwargs):
    """Meta-train a copy of ``model``; returns its parameters after step 1 and after the last."""
    model = copy.deepcopy(model)
    trainer = Reptile(model, backend=backend, **kwargs)
    if backend == "torch":
        trainer.backend.fast_mlp = fast_mlp
    snapshots = []
    for i, (tasks, idx) in enumerate(zip(task_list, plan_list)):
        trainer.meta_step(tasks, idx)
        if i == 0 or i == len(plan_list) - 1:
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots, trainer


def assert_params_close(got, expected, rtol=RTOL, atol=ATOL, what=""):
    assert list(got) == list(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=rtol, atol=atol, msg=lambda m: f"{what} {n}: {m}")


def equivalence(model, tasks_fn, T, meta_steps, n_points, batch=10, inner_steps=5, paths=(True, False),
                expect_fast=None, **kwargs):
    """Reference vs torch (each path in ``paths``) after 1 and after ``meta_steps`` meta-steps."""
    task_list = [tasks_fn(T, seed=k) for k in range(meta_steps)]
    plan_list = plans(T, meta_steps, inner_steps, n_points, batch)
    kwargs.setdefault("inner_steps", inner_steps)
    kwargs.setdefault("inner_batch_size", batch)
    ref, _ = run_trainer(model, "reference", task_list, plan_list, **kwargs)
    for fast in paths:
        got, trainer = run_trainer(model, "torch", task_list, plan_list, fast_mlp=fast, **kwargs)
        if expect_fast is not None:
            assert trainer.backend.uses_fast_path(trainer.model, task_list[0], trainer.config) == (fast and expect_fast)
        for k, (g, r) in enumerate(zip(got, ref)):
            assert_params_close(g, r, what=f"fast_mlp={fast} snapshot {k}")


# ---------------------------------------------------------------------------- MLP equivalence
@pytest.mark.parametrize("T", [1, 4, 32])
@pytest.mark.parametrize("make", [reference.MLP, MLP], ids=["seed_MLP", "reptile_fast_MLP"])
def test_seed_mlp_matches_reference(make, T):
    torch.manual_seed(0)
    equivalence(make(), regression_tasks, T, 20, 50, expect_fast=True)


@pytest.mark.parametrize("dims, width, depth, act, T", [
    ((1, 1), 40, 1, "tanh", 4),
    ((1, 1), 100, 4, "relu", 4),
    ((3, 2), 40, 2, "relu", 4),
    ((2, 3), 100, 3, "tanh", 4),
    ((4, 1), 40, 4, "tanh", 32),
    ((1, 5), 100, 1, "relu", 32),
])
def test_other_mlps_match_reference(dims, width, depth, act, T):
    torch.manual_seed(1)
    model = MLP(dims[0], width, dims[1], depth=depth, activation=act)
    tasks_fn = lambda n, seed: regression_tasks(n, dims[0], dims[1], 40, seed)  # noqa: E731
    equivalence(model, tasks_fn, T, 20 if T < 32 else 6, 40, expect_fast=True, outer_lr=0.5)


def test_single_linear_layer_matches_reference():
    torch.manual_seed(19)
    equivalence(MLP(1, 5, 1, depth=0), regression_tasks, 4, 10, 50, expect_fast=True, inner_lr=0.05)


def test_sigmoid_and_output_activation_mlp():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 16), nn.Sigmoid(), nn.Linear(16, 3), nn.Tanh())
    tasks_fn = lambda n, seed: regression_tasks(n, 2, 3, 30, seed)  # noqa: E731
    equivalence(model, tasks_fn, 4, 20, 30, expect_fast=True, inner_lr=0.1)


@pytest.mark.parametrize("T", [1, 4, 32])
def test_cross_entropy_mlp_matches_reference(T):
    torch.manual_seed(3)
    model = MLP(6, 40, 5, depth=2, activation="relu")
    tasks_fn = lambda n, seed: class_tasks(n, (6,), 5, 25, seed)  # noqa: E731
    equivalence(model, tasks_fn, T, 20 if T < 32 else 6, 25, batch=10, expect_fast=True,
                loss="cross_entropy", inner_lr=0.1, outer_lr=1.0)


def test_callable_loss_takes_generic_path_and_matches():
    torch.manual_seed(4)
    huber = lambda pred, target: F.smooth_l1_loss(pred, target)  # noqa: E731
    equivalence(MLP(), regression_tasks, 4, 5, 50, expect_fast=False, loss=huber, paths=(True,))


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.99)])
def test_adam_matches_reference_mlp(betas):
    torch.manual_seed(5)
    equivalence(MLP(2, 40, 3, depth=2), lambda n, seed: regression_tasks(n, 2, 3, 40, seed), 4, 20, 40,
                expect_fast=True, inner_optimizer="adam", inner_lr=0.01, adam_betas=betas)


# ---------------------------------------------------------------------------- conv nets
class ConvBN(nn.Module):
    """Two [conv 3×3 (no bias), BatchNorm, ReLU] blocks + linear: every parameter has a real
    gradient (a conv bias before BatchNorm has an exactly-zero one, which Adam turns into
    steps of ±lr decided by rounding noise)."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Linear(16, n_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@pytest.mark.parametrize("T", [1, 4, 32])
def test_omniglot_convnet_batchnorm_matches_reference(T):
    torch.manual_seed(6)
    model = OmniglotConvNet(n_classes=3, channels=4, image_size=8, n_blocks=2)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    tasks_fn = lambda n, seed: class_tasks(n, (1, 8, 8), 3, 12, seed)  # noqa: E731
    equivalence(model, tasks_fn, T, 20, 12, batch=6, expect_fast=False, loss="cross_entropy",
                inner_lr=0.1, outer_lr=0.5, paths=(True,))
    for k, v in model.named_buffers():  # the meta-model's running statistics stay untouched
        assert torch.equal(v, buffers[k])


def test_convnet_adam_matches_reference():
    torch.manual_seed(7)
    tasks_fn = lambda n, seed: class_tasks(n, (1, 8, 8), 3, 12, seed)  # noqa: E731
    equivalence(ConvBN(), tasks_fn, 4, 20, 12, batch=6, loss="cross_entropy", inner_optimizer="adam",
                inner_lr=0.01, outer_lr=0.5, paths=(True,))


def test_convnet_in_eval_mode_uses_running_statistics():
    """A model in eval mode keeps its mode per task (BatchNorm uses the running statistics)."""
    torch.manual_seed(8)
    model = OmniglotConvNet(n_classes=3, channels=4, image_size=8, n_blocks=2)
    model(torch.randn(20, 1, 8, 8))  # move the running statistics away from 0 / 1
    model.eval()
    tasks_fn = lambda n, seed: class_tasks(n, (1, 8, 8), 3, 12, seed)  # noqa: E731
    equivalence(model, tasks_fn, 4, 3, 12, batch=6, loss="cross_entropy", inner_lr=0.1, paths=(True,))


# ---------------------------------------------------------------------------- first-order family
def plain_loop(model, tasks, indices, lr, steps, loss_fn, weights=None, fomaml=False):
    """Per-task meta-gradients, written out with torch.autograd: ``name -> [T, *shape]``."""
    names = [n for n, _ in model.named_parameters()]
    per_task = []
    for i in range(tasks.n_tasks):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        acc = [torch.zeros_like(p) for p in params]

        def grads_at(params, row):
            ind = indices[i, row]
            out = functional_call(model, dict(zip(names, params)), (tasks.x[i][ind],))
            return torch.autograd.grad(loss_fn(out, tasks.y[i][ind]), params)

        for s in range(steps):
            g = grads_at(params, s)
            if weights is not None:
                acc = [a + weights[s] * gi for a, gi in zip(acc, g)]
            params = [(p - lr * gi).detach().requires_grad_() for p, gi in zip(params, g)]
        per_task.append(grads_at(params, steps) if fomaml else acc)
    return {n: torch.stack([t[k] for t in per_task]) for k, n in enumerate(names)}


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("algo", ["fomaml", "weights"])
def test_first_order_family_matches_plain_loop(algo, fast):
    """φ ← φ − ε·mean_i(meta-gradient_i), with the meta-gradient from a per-task autograd loop (float64)."""
    torch.manual_seed(9)
    model = MLP(2, 40, 2, depth=2).double()
    T, steps, eps, lr = 4, 5, 0.7, 0.05
    tasks = regression_tasks(T, 2, 2, 40, seed=3).to(dtype=torch.float64)
    rows = steps + 1 if algo == "fomaml" else steps
    idx = sample_indices(T, rows, 40, 10, generator=torch.Generator().manual_seed(4))
    weights = (0.5, -1.0, 2.0, 0.0, 1.5) if algo == "weights" else None
    expected_g = plain_loop(model, tasks, idx, lr, steps, F.mse_loss, weights, fomaml=algo == "fomaml")
    phi = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Reptile(model, backend="torch", inner_lr=lr, outer_lr=eps, inner_steps=steps,
                      algorithm="fomaml" if algo == "fomaml" else "reptile", inner_grad_weights=weights)
    trainer.backend.fast_mlp = fast
    result = trainer.backend.inner_loop(model, tasks, idx, trainer.config)
    assert trainer.backend.uses_fast_path(model, tasks, trainer.config) == fast
    assert list(result.meta_grads) == list(phi)
    assert_params_close(result.meta_grads, expected_g, rtol=1e-10, atol=1e-12, what="meta-gradient")
    trainer.meta_step(tasks, idx)
    expected = {n: phi[n] - eps * expected_g[n].mean(0) for n in phi}
    assert_params_close(dict(model.named_parameters()), expected, rtol=1e-10, atol=1e-12, what="φ")


@pytest.mark.parametrize("fast", [True, False])
def test_grad_weights_all_ones_is_reptile_direction_over_lr(fast):
    torch.manual_seed(10)
    model = MLP().double()
    T, lr = 8, 0.02
    tasks = regression_tasks(T, seed=5).to(dtype=torch.float64)
    idx = sample_indices(T, 5, 50, 10, generator=torch.Generator().manual_seed(6))
    # φ − ε·mean(Σ g_i) = φ + (ε / lr)·mean(φ̃ − φ): Reptile with outer_lr ε / lr.
    ones = Reptile(copy.deepcopy(model), backend="torch", inner_lr=lr, outer_lr=0.3 * lr,
                   inner_grad_weights=(1.0,) * 5)
    plain = Reptile(copy.deepcopy(model), backend="torch", inner_lr=lr, outer_lr=0.3)
    ones.backend.fast_mlp = plain.backend.fast_mlp = fast
    res = ones.backend.inner_loop(ones.model, tasks, idx, ones.config)
    for n, p in model.named_parameters():  # Σ_i g_i = (φ − φ̃) / lr
        torch.testing.assert_close(res.meta_grads[n] * lr, p.detach() - res.params[n], rtol=1e-9, atol=1e-12)
    ones.meta_step(tasks, idx)
    plain.meta_step(tasks, idx)
    assert_params_close(dict(ones.model.named_parameters()), dict(plain.model.named_parameters()),
                        rtol=1e-9, atol=1e-12)


def test_fomaml_and_weights_match_reference_fp32():
    torch.manual_seed(11)
    model = MLP()
    task_list = [regression_tasks(4, seed=k) for k in range(10)]
    for kwargs, rows in [(dict(algorithm="fomaml"), 6), (dict(inner_grad_weights=(0.2, 0.4, 0.6, 0.8, 1.0)), 5)]:
        plan_list = plans(4, 10, rows, 50, 10)
        ref, _ = run_trainer(model, "reference", task_list, plan_list, outer_lr=0.05, **kwargs)
        for fast in (True, False):
            got, _ = run_trainer(model, "torch", task_list, plan_list, fast_mlp=fast, outer_lr=0.05, **kwargs)
            for g, r in zip(got, ref):
                assert_params_close(g, r, what=f"{kwargs} fast={fast}")


# ---------------------------------------------------------------------------- float64 tie-breaker
@pytest.mark.parametrize("fast", [True, False])
def test_fp32_backends_equally_close_to_float64_oracle(fast):
    """Both fp32 backends sit within fp32 rounding of the float64 reference, and neither is
    systematically worse: the torch backend's distance is at most a few times the reference's."""
    torch.manual_seed(12)
    model = MLP()
    T, n = 16, 20
    task_list = [regression_tasks(T, seed=k) for k in range(n)]
    plan_list = plans(T, n, 5, 50, 10)
    oracle, _ = run_trainer(model.double(), "reference", [t.to(dtype=torch.float64) for t in task_list],
                            plan_list, outer_lr=0.5)
    model = model.float()
    ref, _ = run_trainer(model, "reference", task_list, plan_list, outer_lr=0.5)
    got, _ = run_trainer(model, "torch", task_list, plan_list, fast_mlp=fast, outer_lr=0.5)
    o = torch.cat([v.flatten() for v in oracle[-1].values()])
    r = torch.cat([v.flatten() for v in ref[-1].values()]).double()
    g = torch.cat([v.flatten() for v in got[-1].values()]).double()
    err_ref, err_got = (r - o).abs().max().item(), (g - o).abs().max().item()
    assert err_ref < 1e-5 and err_got < 1e-5, (err_ref, err_got)
    assert err_got <= 4 * err_ref + 1e-7, (err_ref, err_got)


def test_float64_backends_agree_tightly():
    torch.manual_seed(13)
    model = MLP(2, 40, 3, depth=3, activation="tanh").double()
    task_list = [regression_tasks(8, 2, 3, 40, seed=k).to(dtype=torch.float64) for k in range(5)]
    plan_list = plans(8, 5, 5, 40, 10)
    ref, _ = run_trainer(model, "reference", task_list, plan_list, outer_lr=0.5)
    for fast in (True, False):
        got, _ = run_trainer(model, "torch", task_list, plan_list, fast_mlp=fast, outer_lr=0.5)
        assert_params_close(got[-1], ref[-1], rtol=1e-12, atol=1e-13, what=f"float64 fast={fast}")


# ---------------------------------------------------------------------------- backend plumbing
@pytest.mark.parametrize("make", [MLP, reference.MLP, lambda: MLP(3, 40, 2, depth=4, activation="relu"),
                                  lambda: OmniglotConvNet(n_classes=3, channels=4, image_size=8, n_blocks=2)])
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_resolves_to_torch_on_cpu(make, interpret, monkeypatch):
    # With or without Triton's CPU interpreter (conftest turns it on for the kernel tests), the
    # fastest backend on the CPU is this one.
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert Reptile(make(), backend="auto").backend.name == "torch"


def test_inner_result_layout_and_model_untouched():
    torch.manual_seed(14)
    model = MLP(2, 40, 3)
    before = copy.deepcopy(model.state_dict())
    tasks = regression_tasks(5, 2, 3, 30)
    idx = sample_indices(5, 4, 30, 10)
    for fast in (True, False):
        res = TorchBackend(fast_mlp=fast).inner_loop(model, tasks, idx, InnerConfig())
        assert list(res.params) == [n for n, _ in model.named_parameters()]
        for n, p in model.named_parameters():
            assert res.params[n].shape == (5, *p.shape) and res.params[n].dtype == p.dtype
        assert res.losses.shape == (5, 4) and res.meta_grads is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_losses_are_the_minibatch_losses_before_each_step():
    torch.manual_seed(15)
    model = MLP()
    tasks = regression_tasks(3)
    idx = sample_indices(3, 5, 50, 10)
    ref = get_backend("reference").inner_loop(model, tasks, idx, InnerConfig())
    for fast in (True, False):
        res = TorchBackend(fast_mlp=fast).inner_loop(model, tasks, idx, InnerConfig())
        torch.testing.assert_close(res.losses, ref.losses, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("make, loss, tasks_fn", [
    (MLP, "mse", lambda: regression_tasks(6)),
    (lambda: MLP(6, 40, 5, activation="relu"), "cross_entropy", lambda: class_tasks(6, (6,), 5, 25)),
    (lambda: OmniglotConvNet(n_classes=3, channels=4, image_size=8, n_blocks=2), "cross_entropy",
     lambda: class_tasks(6, (1, 8, 8), 3, 12)),
])
def test_evaluate_equals_default_evaluation(make, loss, tasks_fn):
    torch.manual_seed(16)
    model = make()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    tasks = tasks_fn()
    trainer = Reptile(model, backend="torch", loss=loss, inner_batch_size=6)
    params = trainer.adapt(tasks, 3, generator=torch.Generator().manual_seed(0)).params
    got = trainer.backend.evaluate(model, params, tasks, trainer.config)
    expected = Backend.evaluate(trainer.backend, model, params, tasks, trainer.config)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    at_phi = trainer.evaluate(tasks, 0)
    default_phi = Backend.evaluate(trainer.backend, model, {n: p.detach().expand(6, *p.shape) for n, p in
                                                           model.named_parameters()}, tasks, trainer.config)
    torch.testing.assert_close(at_phi, default_phi, rtol=RTOL, atol=ATOL)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])


def test_mlp_batched_functional_api():
    """The reusable core: stack, gather, run; equals the reference backend (fp32, rtol 1e-5 /
    atol 1e-6), parameters and step losses, and in float64 agrees with it tightly."""
    torch.manual_seed(17)
    model = MLP()
    spec = extract_mlp_spec(model)
    tasks = regression_tasks(3)
    idx = sample_indices(3, 5, 50, 10)
    for dtype, rtol, atol in ((torch.float32, RTOL, ATOL), (torch.float64, 1e-12, 1e-13)):
        m = copy.deepcopy(model).to(dtype)
        t = tasks.to(dtype=dtype)
        params = stack_mlp_params(spec, dict(m.named_parameters()), 3)
        xs, ys = gather_minibatches(t.x, t.y, idx)
        assert xs.shape == (5, 3, 10, 1) and params.weights[1].shape == (3, 64, 64)
        assert params.flat.shape == (3 * spec.n_params,)
        out = mlp_inner_loop(spec, params, xs, ys, lr=0.02)
        ref = get_backend("reference").inner_loop(m, t, idx, InnerConfig(lr=0.02))
        assert set(out.params.named()) == set(ref.params)
        got = {n: out.params.named()[n] for n in ref.params}  # in the reference's order
        assert_params_close(got, ref.params, rtol=rtol, atol=atol, what=f"{dtype}")
        for n, p in m.named_parameters():
            assert not torch.equal(got[n][0], p.detach()), f"{n}: no update"
        assert out.losses.shape == (3, 5)
        torch.testing.assert_close(out.losses, ref.losses, rtol=rtol, atol=atol)


def test_bad_arguments():
    with pytest.raises(TypeError, match="fast_mlp"):
        TorchBackend(fast_mlp="yes")
    with pytest.raises(TypeError, match="fast_tanh"):
        TorchBackend(fast_tanh=1)
    tasks = regression_tasks(2)
    with pytest.raises(ValueError, match="grad_weights"):
        TorchBackend().inner_loop(MLP(), tasks, sample_indices(2, 5, 50, 10), InnerConfig(grad_weights=(1.0, 2.0)))
    with pytest.raises(ValueError, match="indices"):
        TorchBackend().inner_loop(MLP(), tasks, sample_indices(3, 5, 50, 10), InnerConfig())
    with pytest.raises(ValueError, match="losses"):
        spec = extract_mlp_spec(MLP())
        params = stack_mlp_params(spec, dict(MLP().named_parameters()), 2)
        xs, ys = gather_minibatches(tasks.x, tasks.y, sample_indices(2, 5, 50, 10))
        mlp_inner_loop(spec, params, xs, ys, lr=0.1, loss="hinge")


def test_inner_grad_weights_given_as_a_string_are_refused():
    """float() read each character of "12345" as a weight: five weights, silently."""
    for weights in ("12345", b"12345"):
        with pytest.raises(TypeError, match="inner_grad_weights must be a sequence of numbers"):
            Reptile(MLP(), backend="torch", inner_grad_weights=weights)


def test_fast_path_follows_model_changes_and_hooks():
    """A layer swapped after first use is seen; a forward hook sends the model to the generic path."""
    torch.manual_seed(18)
    model = MLP(2, 16, 1)
    tasks = regression_tasks(3, 2, 1, 30)
    idx = sample_indices(3, 4, 30, 10)
    backend, config = TorchBackend(), InnerConfig(lr=0.1)
    backend.inner_loop(model, tasks, idx, config)
    model.network[1] = nn.ReLU()
    ref = get_backend("reference").inner_loop(model, tasks, idx, config)
    res = backend.inner_loop(model, tasks, idx, config)
    assert backend.uses_fast_path(model, tasks, config)
    assert_params_close(res.params, ref.params)
    handle = model.network[0].register_forward_hook(lambda m, inp, out: out * 0.5)
    assert not backend.uses_fast_path(model, tasks, config)
    assert_params_close(backend.inner_loop(model, tasks, idx, config).params,
                        get_backend("reference").inner_loop(model, tasks, idx, config).params)
    handle.remove()
    assert backend.uses_fast_path(model, tasks, config)


@pytest.mark.parametrize("fast", [True, False])
def test_tasks_that_require_grad_give_the_same_numbers(fast):
    """Data that requires grad (e.g. from a user's pipeline) is data: both paths train and
    evaluate on it as on its detached copy (the reference does), instead of failing inside an
    ``out=`` op of the hand-written backward."""
    torch.manual_seed(23)
    tasks = regression_tasks(3, 2, 1, 20)
    grad_tasks = TaskBatch(tasks.x.clone().requires_grad_(), tasks.y.clone().requires_grad_())
    idx = plans(3, 1, 4, 20, 5)[0]
    config = InnerConfig(lr=0.1)
    backend = TorchBackend(fast_mlp=fast)
    model = MLP(2, 16, 1)
    expected = get_backend("reference").inner_loop(model, tasks, idx, config)
    got = backend.inner_loop(model, grad_tasks, idx, config)
    assert_params_close(got.params, expected.params)
    torch.testing.assert_close(backend.evaluate(model, got.params, grad_tasks, config),
                               backend.evaluate(model, got.params, tasks, config), rtol=0, atol=0)


def test_module_used_twice_keeps_its_parameters():
    """A layer applied twice (one module at two paths of a Sequential, weights shared): torch's
    functional_call swaps its tensors twice and restored the second swap's, leaving the model
    holding a task's tensor instead of its Parameter (an escaped vmap tensor after the torch
    backend, a plain tensor after the reference backend's evaluate).  Both backends now leave the
    model's Parameters in place, and agree with each other."""
    torch.manual_seed(24)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(8, 1))
    before = list(model.parameters())
    tasks, idx = regression_tasks(2, n_points=20), plans(2, 1, 3, 20, 5)[0]
    results = {}
    for name in ("reference", "torch"):
        m = copy.deepcopy(model)
        params = list(m.parameters())
        trainer = Reptile(m, backend=name, inner_steps=3, inner_batch_size=5)
        trainer.meta_step(tasks, idx)
        results[name] = (trainer.evaluate(tasks, 3, idx), [p.detach().clone() for p in m.parameters()])
        assert all(a is b for a, b in zip(m.parameters(), params)) and len(list(m.parameters())) == len(before)
        assert all(isinstance(m[k].weight, nn.Parameter) for k in (0, 2, 4, 6))
    torch.testing.assert_close(results["torch"][0], results["reference"][0], rtol=RTOL, atol=ATOL)
    for a, b in zip(results["torch"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_dropout_runs_on_both_backends_and_agrees_in_eval_mode():
    """Dropout in training mode draws its masks from the global RNG in each backend's own order
    (README: agreement in distribution only); in eval mode the backends agree as for any model."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    tasks = TaskBatch(torch.randn(3, 12, 5), torch.randn(3, 12, 2))
    plan = sample_indices(3, 3, 12, 4, generator=torch.Generator().manual_seed(1))
    for train_mode in (True, False):
        got = {}
        for backend in ("reference", "torch"):
            model = copy.deepcopy(base).train(train_mode)
            Reptile(model, backend=backend, inner_steps=3, inner_batch_size=4).meta_step(tasks, plan)
            got[backend] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            assert torch.isfinite(got[backend]).all()
        if not train_mode:
            torch.testing.assert_close(got["torch"], got["reference"], rtol=1e-5, atol=1e-6)


class _TokenTasks:
    """Few-shot regression on token ids: x int64 ids [T, N, 4], y = a task-specific linear
    function of the ids' embedding-free features (any target works for the equivalence)."""

    def sample(self, n, *, generator=None, device=None):
        x = torch.randint(0, 10, (n, 12, 4), generator=generator)
        w = torch.randn(n, 1, 4, generator=generator)
        y = (x.float() * w).sum(-1, keepdim=True) / 10
        return TaskBatch(x.to(device), y.to(device))


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_integer_inputs_train_an_embedding_model_on_both_backends(id_dtype):
    """Token ids as inputs (an nn.Embedding first): TaskBatch takes int32/int64 x, and backends
    reference and torch (vmap path) train the same model through fit, adapt and evaluate."""

    class Ids(_TokenTasks):
        def sample(self, n, *, generator=None, device=None):
            t = super().sample(n, generator=generator, device=device)
            return TaskBatch(t.x.to(id_dtype), t.y)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
    got = {}
    for backend in ("reference", "torch"):
        model = copy.deepcopy(base)
        trainer = Reptile(model, backend=backend, inner_steps=3, inner_batch_size=4)
        hist = trainer.fit(Ids(), 6, meta_batch_size=3, generator=torch.Generator().manual_seed(2),
                           progress=False)["loss"]
        tasks = Ids().sample(4, generator=torch.Generator().manual_seed(3))
        post = trainer.evaluate(tasks, steps=2, generator=torch.Generator().manual_seed(4))
        got[backend] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), torch.tensor(hist), post)
    for a, b, what in zip(got["torch"], got["reference"], ("phi", "losses", "evaluate")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


def test_integer_inputs_are_refused_by_a_model_that_cannot_take_them():
    tasks = _TokenTasks().sample(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cannot take task inputs"):
        Reptile(MLP(4, 8, 1), backend="torch").meta_step(tasks)
