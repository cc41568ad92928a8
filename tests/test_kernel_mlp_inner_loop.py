"""The fused Triton inner-loop kernel against the reference backend (and the torch backend).

Without CUDA these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before this
module imports the kernel) at small sizes; with CUDA the same cases run on the GPU too.  Outputs
are poisoned with NaN before every launch, so an element the kernel forgets to write fails.
Tolerance: rtol 1e-5 / atol 1e-6 — both sides are fp32 and differ only in summation order.
"""
import copy
import math

import numpy as np
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

from reptile_fast import MLP, Sine, reference, sample_indices  # noqa: E402
from reptile_fast.backends import InnerConfig  # noqa: E402
from reptile_fast.backends.reference import ReferenceBackend  # noqa: E402
from reptile_fast.kernels import mlp_inner_loop as K  # noqa: E402
from _triton_devices import DEVICES  # noqa: E402
from reptile_fast.mlp_spec import extract_mlp_spec  # noqa: E402
from reptile_fast.tasks import TaskBatch  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6



# ----------------------------------------------------------------------------- helpers
def regression_tasks(T, N, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, d_in, generator=g)
    w = torch.randn(T, d_in, d_out, generator=g)
    y = torch.sin(x @ w) * (1 + torch.rand(T, 1, 1, generator=g) * 4)  # different data per task
    return TaskBatch(x, y)


def classification_tasks(T, N, d_in, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, N, d_in, generator=g) * 2,
                     torch.randint(0, n_classes, (T, N), generator=g))


def layer_params(model):
    """φ in the kernel's order [W0, b0, W1, b1, …], the names, and the spec."""
    spec = extract_mlp_spec(model)
    named = dict(model.named_parameters())
    names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
    return [named[n].detach() for n in names], names, spec


def run_kernel(model, tasks, indices, *, lr=0.02, loss="mse", precision="ieee", device="cpu",
               row_pad=0, **launch):
    """Launch on NaN-poisoned outputs (and scratch); returns ({name: [T, *shape]}, losses)."""
    model = copy.deepcopy(model).to(device)
    params, names, spec = layer_params(model)
    T, S = indices.shape[0], indices.shape[1]
    out = torch.full((T, spec.n_params + row_pad), float("nan"), device=device)
    out_losses = torch.full((T, S), float("nan"), device=device)
    config = K.choose_launch_config(spec.dims, indices.shape[2], **launch)
    flat, losses = K.mlp_inner_loop(tasks.x.to(device), tasks.y.to(device), indices.to(device), params,
                                    spec.activations, lr=lr, loss=loss, precision=precision,
                                    config=config, out=out, out_losses=out_losses,
                                    scratch_fill=float("nan"))
    assert flat is out and losses is out_losses
    if row_pad:  # the kernel writes its parameters and nothing past them
        assert torch.isnan(flat[:, spec.n_params:]).all(), "kernel wrote past a task's parameters"
    return dict(zip(names, K.split_params(flat, spec.dims))), losses


def reference_result(model, tasks, indices, *, lr=0.02, loss="mse"):
    model = copy.deepcopy(model).cpu()
    return ReferenceBackend().inner_loop(model, tasks, indices, InnerConfig(lr=lr, loss=loss))


def assert_matches(params, losses, expected, what):
    for name, ref in expected.params.items():
        torch.testing.assert_close(params[name].cpu(), ref, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name: f"{what}: adapted '{n}' differs\n{m}")
    torch.testing.assert_close(losses.cpu(), expected.losses, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{what}: inner losses differ\n{m}")


def check(model, tasks, indices, *, what, device, lr=0.02, loss="mse", **launch):
    torch.manual_seed(0)
    expected = reference_result(model, tasks, indices, lr=lr, loss=loss)
    params, losses = run_kernel(model, tasks, indices, lr=lr, loss=loss, device=device, **launch)
    assert_matches(params, losses, expected, what)


# ----------------------------------------------------------------------------- the seed's setting
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_model", [reference.MLP, MLP], ids=["seed-MLP", "reptile_fast-MLP"])
def test_seed_mlp_sine(device, make_model):
    torch.manual_seed(1)
    model = make_model()
    tasks = Sine().sample(3, generator=torch.Generator().manual_seed(2))
    indices = sample_indices(3, 5, 50, 10, generator=torch.Generator().manual_seed(3))
    assert K.choose_launch_config((1, 64, 64, 1), 10).mode == "registers"
    check(model, tasks, indices, what=f"{make_model.__module__}.MLP sine", device=device)


# ----------------------------------------------------------------------------- depth, width, batch, activation
CASES = [
    # (in, hidden widths, out, activation, inner batch, steps, tasks)
    (1, [40], 1, "tanh", 1, 3, 2),
    (3, [64, 64], 2, "relu", 7, 3, 3),
    (2, [100, 40, 64], 1, "tanh", 10, 2, 2),
    (1, [40, 40, 40, 40], 1, "relu", 10, 2, 3),
    (5, [40, 100], 4, "sigmoid", 7, 3, 2),
    (2, [64, 64, 64, 64], 3, "sigmoid", 1, 2, 2),
    (4, [], 3, "identity", 7, 3, 2),  # depth 0: a single Linear
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["registers", "tiled"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1]))}-{c[2]}-{c[3]}-B{c[4]}")
def test_mse_depth_width_batch_activation(device, mode, case):
    d_in, hidden, d_out, act, B, S, T = case
    torch.manual_seed(4)
    model = MLP(d_in, output_dim=d_out, hidden_dims=hidden, activation=act)
    tasks = regression_tasks(T, 12, d_in, d_out, seed=5)
    indices = sample_indices(T, S, 12, B, generator=torch.Generator().manual_seed(6))
    check(model, tasks, indices, what=f"MLP {case} ({mode})", device=device, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(4, [40], 5, "tanh", 7), (3, [64, 40], 3, "relu", 10), (2, [], 6, "identity", 1)],
                         ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1]))}-{c[2]}-{c[3]}-B{c[4]}")
def test_cross_entropy(device, case):
    d_in, hidden, n_classes, act, B = case
    torch.manual_seed(7)
    model = MLP(d_in, output_dim=n_classes, hidden_dims=hidden, activation=act)
    tasks = classification_tasks(3, 15, d_in, n_classes, seed=8)
    indices = sample_indices(3, 3, 15, B, generator=torch.Generator().manual_seed(9))
    check(model, tasks, indices, what=f"cross-entropy {case}", device=device, lr=0.1, loss="cross_entropy")


@pytest.mark.parametrize("device", DEVICES)
def test_nn_sequential_with_final_activation(device):
    """A plain nn.Sequential whose last layer also has an activation."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 20), nn.ReLU(), nn.Linear(20, 2), nn.Tanh())
    tasks = regression_tasks(2, 9, 3, 2, seed=11)
    indices = sample_indices(2, 3, 9, 5, generator=torch.Generator().manual_seed(12))
    check(model, tasks, indices, what="Sequential ending in Tanh", device=device)


# ----------------------------------------------------------------------------- the tiled variant
TILED_CASES = [
    (1, [64, 64], 1, "tanh", 10, "mse"),
    (3, [40, 100], 2, "sigmoid", 7, "mse"),
    (2, [70], 5, "relu", 20, "cross_entropy"),  # batch > one tile, width not a tile multiple
    (3, [], 2, "identity", 1, "mse"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1]))}-{c[2]}-{c[3]}-B{c[4]}-{c[5]}")
def test_tiled_variant(device, case):
    d_in, hidden, d_out, act, B, loss = case
    torch.manual_seed(13)
    model = MLP(d_in, output_dim=d_out, hidden_dims=hidden, activation=act)
    T, N = 3, 24
    if loss == "mse":
        tasks = regression_tasks(T, N, d_in, d_out, seed=14)
    else:
        tasks = classification_tasks(T, N, d_in, d_out, seed=14)
    indices = sample_indices(T, 2, N, B, generator=torch.Generator().manual_seed(15))
    # max_programs=2 < T: programs loop over tasks and reuse their scratch
    check(model, tasks, indices, what=f"tiled {case}", device=device, loss=loss, lr=0.05,
          mode="tiled", max_programs=2, block_n=32, block_k=16)


@pytest.mark.parametrize("device", DEVICES)
def test_width_256_picks_tiled_and_matches(device):
    torch.manual_seed(16)
    model = MLP(2, output_dim=3, hidden_dims=[256, 256], activation="tanh")
    assert K.choose_launch_config((2, 256, 256, 3), 7).mode == "tiled"
    tasks = regression_tasks(2, 10, 2, 3, seed=17)
    indices = sample_indices(2, 2, 10, 7, generator=torch.Generator().manual_seed(18))
    check(model, tasks, indices, what="2-256-256-3", device=device)


# ----------------------------------------------------------------------------- masks and launch shapes
@pytest.mark.parametrize("device", DEVICES)
def test_unplanned_points_are_never_read(device):
    """Points outside the plan hold NaN: any unmasked read of them would poison the result."""
    torch.manual_seed(19)
    model = MLP(2, 24, 2, depth=2)
    clean = regression_tasks(3, 16, 2, 2, seed=20)
    indices = sample_indices(3, 3, 12, 7, generator=torch.Generator().manual_seed(21))  # points 12..15 unused
    expected = reference_result(model, clean, indices)
    x, y = clean.x.clone(), clean.y.clone()
    x[:, 12:], y[:, 12:] = float("nan"), float("nan")
    dirty = SimpleNamespace(x=x, y=y)  # not a TaskBatch: that would refuse the NaN
    for mode in ("registers", "tiled"):
        params, losses = run_kernel(model, dirty, indices, device=device, mode=mode, block_b=64)
        assert_matches(params, losses, expected, f"NaN outside the plan ({mode})")


@pytest.mark.parametrize("device", DEVICES)
def test_task_count_and_programs_not_multiples(device):
    """7 tasks, 3 per program (last program part-empty); wide output rows stay untouched past φ."""
    torch.manual_seed(22)
    model = MLP(1, 40, 1)
    tasks = Sine().sample(7, generator=torch.Generator().manual_seed(23))
    indices = sample_indices(7, 2, 50, 10, generator=torch.Generator().manual_seed(24))
    expected = reference_result(model, tasks, indices)
    params, losses = run_kernel(model, tasks, indices, device=device, tasks_per_program=3, row_pad=13)
    assert_matches(params, losses, expected, "7 tasks, 3 per program")
    params, losses = run_kernel(model, tasks, indices, device=device, mode="tiled", max_programs=3,
                                row_pad=13)
    assert_matches(params, losses, expected, "7 tasks on 3 tiled programs")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_steps_returns_phi(device):
    model = MLP(2, 20, 1)
    tasks = regression_tasks(2, 8, 2, 1, seed=25)
    indices = sample_indices(2, 3, 8, 4, generator=torch.Generator().manual_seed(26))
    params, _, spec = layer_params(model)
    for mode in ("registers", "tiled"):
        flat, losses = K.mlp_inner_loop(tasks.x.to(device), tasks.y.to(device), indices.to(device),
                                        [p.to(device) for p in params], spec.activations, lr=0.02,
                                        steps=0, config=K.choose_launch_config(spec.dims, 4, mode=mode))
        assert losses.shape == (2, 0)
        for got, want in zip(K.split_params(flat, spec.dims), params):
            torch.testing.assert_close(got.cpu(), want.expand_as(got), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_option_runs(device):
    """tf32 is accepted; the interpreter computes fp32 dots, so it must match exactly there.  On a
    GPU every task's update φ̃ − φ must be within the benchmark gate's tf32 bound of a float64
    oracle (bench.providers: K·S·(2⁻²⁴·‖φ‖/‖Δ‖ + L·2⁻¹¹)); a weight-level rtol 1e-2 would pass a
    kernel that skipped the inner loop (the update is ~1 % of the weights)."""
    torch.manual_seed(27)
    model = MLP()
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(28))
    indices = sample_indices(2, 3, 50, 10, generator=torch.Generator().manual_seed(29))
    expected = reference_result(model, tasks, indices)
    params, losses = run_kernel(model, tasks, indices, device=device, precision="tf32")
    if device == "cpu":
        assert_matches(params, losses, expected, "tf32 under the interpreter")
    else:
        from bench.providers import GATE_CAP, float64_updates, update_error_bound

        names = [n for n, _ in model.named_parameters()]
        phi = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        oracle = float64_updates(model, tasks.x, tasks.y, indices, 0.02)
        want = torch.cat([oracle[n].reshape(2, -1) for n in names], 1)
        got = torch.cat([params[n].cpu().double().reshape(2, -1) for n in names], 1) - phi
        err = (got - want).norm(dim=1) / want.norm(dim=1)
        point = type("P", (), {"steps": indices.shape[1], "dims": (1, 64, 64, 1)})()
        bound = update_error_bound(point, "tf32", phi.norm() / want.norm(dim=1))
        assert bool((bound < GATE_CAP).all()) and bool((err <= bound).all()), (err, bound)


# ----------------------------------------------------------------------------- the torch backend as a second oracle
@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_backend(device):
    torch_func = pytest.importorskip("reptile_fast.backends.torch_func")
    torch.manual_seed(30)
    for model, tasks, loss in [
        (MLP(), Sine().sample(4, generator=torch.Generator().manual_seed(31)), "mse"),
        (MLP(3, 40, 4, depth=3, activation="relu"), classification_tasks(4, 50, 3, 4, seed=32), "cross_entropy"),
    ]:
        indices = sample_indices(4, 3, 50, 10, generator=torch.Generator().manual_seed(33))
        model = model.to(device)
        tasks = tasks.to(device)
        expected = torch_func.TorchBackend().inner_loop(model, tasks, indices.to(device),
                                                        InnerConfig(loss=loss))
        params, losses = run_kernel(model, tasks, indices, device=device, loss=loss)
        for name, ref in expected.params.items():
            torch.testing.assert_close(params[name], ref, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"vs torch backend ({loss}): '{n}'\n{m}")
        torch.testing.assert_close(losses, expected.losses, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"vs torch backend ({loss}): losses\n{m}")


# ----------------------------------------------------------------------------- the launcher's checks
def _ok_inputs():
    model = MLP(2, 20, 1)
    params, _, spec = layer_params(model)
    tasks = regression_tasks(2, 8, 2, 1, seed=34)
    indices = sample_indices(2, 3, 8, 4, generator=torch.Generator().manual_seed(35))
    return tasks.x, tasks.y, indices, params, list(spec.activations)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(x=a["x"].double()), TypeError, "x must be torch.float32"),
    (lambda a: a.update(indices=a["indices"].int()), TypeError, "indices must be torch.int64"),
    (lambda a: a.update(y=a["y"][:, :, :0]), ValueError, "y must have shape"),
    (lambda a: a.update(activations=["tanh", "gelu", "identity"]), ValueError, "activation must be one of"),
    (lambda a: a.update(params=a["params"][:3]), ValueError, "params must be"),
    (lambda a: a.update(params=[torch.zeros(300, 2), torch.zeros(300), torch.zeros(1, 300), torch.zeros(1)],
                        activations=["tanh", "identity"]), ValueError, "exceed the kernel's limit"),
    (lambda a: a.update(loss="hinge"), ValueError, "loss must be one of"),
    (lambda a: a.update(precision="bf16"), ValueError, "precision must be"),
    (lambda a: a.update(steps=4), ValueError, "steps must lie in"),
    # int(1.5) ran one step silently (kernel v2 refuses it)
    (lambda a: a.update(steps=1.5), ValueError, "be an int"),
    (lambda a: a.update(steps=True), ValueError, "be an int"),
    (lambda a: a.update(lr=math.nan), ValueError, "lr must be a finite"),
    (lambda a: a.update(lr="0.02"), ValueError, "lr must be a finite"),
    # out-of-range plan values read outside the task's rows: a segfault under the interpreter
    (lambda a: a.update(indices=_poke(a["indices"], 8)), ValueError, r"indices must lie in \[0, 8\)"),
    (lambda a: a.update(indices=_poke(a["indices"], -1)), ValueError, r"indices must lie in \[0, 8\)"),
])
def test_launcher_rejects_bad_input(change, error, words):
    x, y, indices, params, acts = _ok_inputs()
    args = dict(x=x, y=y, indices=indices, params=params, activations=acts, loss="mse", precision="ieee",
                steps=None, lr=0.02)
    change(args)
    with pytest.raises(error, match=words):
        K.mlp_inner_loop(args["x"], args["y"], args["indices"], args["params"], args["activations"],
                         lr=args["lr"], loss=args["loss"], precision=args["precision"], steps=args["steps"])


def _poke(t, value):
    t = t.clone()
    t[1, 2, 3] = value
    return t


def test_launcher_checks_class_labels_and_takes_numpy_scalars():
    """Labels outside [0, D_L) index past the logits (refused); a numpy lr is a number (it was
    refused as "not a finite number").  ``check_values=False`` skips the one sync for callers
    that checked already, and gives the same numbers on valid input."""
    model = MLP(3, 16, 4, activation="relu")
    params, _, spec = layer_params(model)
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(2, 8, 3, generator=g), torch.randint(0, 4, (2, 8), generator=g)
    indices = sample_indices(2, 2, 8, 4, generator=g)
    acts = list(spec.activations)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\)"):
        K.mlp_inner_loop(x, _poke_labels(labels, 4), indices, params, acts, lr=0.1, loss="cross_entropy")
    want = K.mlp_inner_loop(x, labels, indices, params, acts, lr=0.1, loss="cross_entropy")
    got = K.mlp_inner_loop(x, labels, indices, params, acts, lr=np.float32(0.1), loss="cross_entropy",
                           check_values=False)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def _poke_labels(t, value):
    t = t.clone()
    t[0, 5] = value
    return t


def test_split_params_refuses_a_buffer_too_short():
    with pytest.raises(ValueError, match=r"flat has 24 values per row but dims \[1, 8, 1\] need 25"):
        K.split_params(torch.zeros(2, 24), (1, 8, 1))


def test_launch_config_validation_and_choice():
    with pytest.raises(ValueError, match="mode must be"):
        K.LaunchConfig(mode="fast", num_warps=4)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        K.LaunchConfig(mode="tiled", num_warps=4, block_n=48)
    with pytest.raises(ValueError, match="num_stages must be"):
        K.LaunchConfig(mode="tiled", num_warps=4, num_stages=0)
    # Behaviour, not tuning: a chosen config is a valid LaunchConfig; explicit overrides win; and
    # models whose weights cannot stay in registers get the tiled variant.
    for dims, batch in (((1, 64, 64, 1), 10), ((1, 32, 32, 1), 10), ((2, 256, 256, 3), 7)):
        chosen = K.choose_launch_config(dims, batch)
        assert isinstance(chosen, K.LaunchConfig) and chosen.mode in ("registers", "tiled")
    assert K.choose_launch_config((1, 100, 1), 10).mode == "tiled"
    assert K.choose_launch_config((1, 64, 64, 64, 64, 1), 10).mode == "tiled"  # 14336 weights spill
    tiled = K.choose_launch_config((1, 64, 1), 10, mode="tiled", num_warps=2, block_k=16)
    assert (tiled.mode, tiled.num_warps, tiled.block_k, tiled.num_stages) == ("tiled", 2, 16, 1)


def test_tanh_is_accurate():
    """The kernel's exp-based tanh is within a few ulp of torch.tanh (checked under the interpreter)."""
    if not K.INTERPRETED:
        pytest.skip("checks the device function through the interpreter")
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, K._tanh(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    x = torch.cat([torch.linspace(-12, 12, 20001), torch.logspace(-8, 0, 2001), -torch.logspace(-8, 0, 2001),
                   torch.tensor([0.0, 0.4, -0.4, 0.39999998, 0.40000001])])
    y = torch.empty_like(x)
    tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.tanh(x.double())
    ulp = (exact.abs().float().nextafter(torch.tensor(math.inf)) - exact.abs().float()).double()
    assert ((y.double() - exact).abs() / ulp).max() <= 4


def test_launch_config_fields_are_ints_and_config_a_launch_config():
    """4.0, 2.5 and True passed LaunchConfig's range checks: a float grid reached torch.empty
    ("takes 1 positional argument"), a float tasks_per_program an InterpreterError, a float block
    size a TypeError from ``&``; a dict as config an AttributeError inside the launcher."""
    for field, value in (("num_warps", 4.0), ("num_warps", True), ("num_stages", 1.5), ("block_m", 16.0),
                         ("tasks_per_program", 1.5), ("max_programs", 2.5)):
        with pytest.raises(TypeError, match=f"{field} must be an int"):
            K.LaunchConfig(**{"mode": "tiled", "num_warps": 4, field: value})
    x, y, indices, params, acts = _ok_inputs()
    with pytest.raises(TypeError, match="config must be a LaunchConfig"):
        K.mlp_inner_loop(x, y, indices, params, acts, lr=0.02, config={"mode": "tiled"})


def test_outputs_that_overlap_are_refused():
    """``out`` rows that overlap (stride 0: several programs write one row), ``out`` over x (the
    tiled variant keeps its working weights there while others read x) and ``out_losses`` inside
    ``out`` all ran silently; refused now."""
    x, y, indices, params, acts = _ok_inputs()
    n = sum(p.numel() for p in params)
    T, S = indices.shape[:2]
    with pytest.raises(ValueError, match="rows that do not overlap"):
        K.mlp_inner_loop(x, y, indices, params, acts, lr=0.02, out=torch.zeros(1, n).expand(T, n))
    big = torch.zeros(T * (n + x[0].numel()))
    xs = big[:x.numel()].view_as(x)
    xs.copy_(x)
    with pytest.raises(ValueError, match="out must not overlap x"):
        K.mlp_inner_loop(xs, y, indices, params, acts, lr=0.02,
                         out=torch.as_strided(big, (T, n), (n, 1), x.numel() - 1))
    buf = torch.zeros(T * (n + 3))
    with pytest.raises(ValueError, match="out_losses must not overlap out"):
        K.mlp_inner_loop(x, y, indices, params, acts, lr=0.02, out=buf.view(T, n + 3),
                         out_losses=buf[2:2 + T * S].view(T, S))
