"""QA43: kernel v2's prefetched minibatches (``V2Config(preload="prefetch")``) and the one-task
guarded meta-step that updates φ from the program's registers (``ONE_TASK``).

Prefetching changes only *when* a step's rows are loaded, never which rows or what arithmetic
follows, so every output equals the preloaded / per-step-loaded kernels' -- bit for bit under the
interpreter; on a GPU each preload setting is its own compiled kernel whose reductions Triton may
lay out (and so add up) differently, so there they agree within fp32 summation-order rounding
(``_triton_devices.assert_same_across_configs``; an H200 gave different bits for
``preload=False``).  The one-task update ``φ + ε·(0 + (φ̃ − φ))`` is the three-launch path's
``φ + ε·div_rn(0 + (0 + (φ̃ − φ)), 1)`` with an exact division by 1, so φ, the loss slot and the
guard's state equal ``meta_step`` + ``meta_step_guard.accept_step`` bit for bit -- compared with
``torch.equal`` on a GPU too, where it held on an H200 (a kernel change that lets the compiler
treat the two variants' step loops differently can break it: bench/results/gpu-h200-2026-12-04-s15/
tanh-variant-6e6e836/).  Under the interpreter without CUDA (conftest); tiny shapes.
"""
import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import sample_indices  # noqa: E402
from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402
from _triton_devices import DEVICES, assert_same_across_configs  # noqa: E402


def _data(T, N, dims, loss, seed, device, *, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, dims[0], generator=g) * scale
    if loss == "mse":
        y = torch.randn(T, N, dims[-1], generator=g)
    else:
        y = torch.randint(0, dims[-1], (T, N), generator=g)
    phi = torch.randn(V.n_flat_params(dims), generator=g) * 0.4
    return x.to(device), y.to(device), phi.to(device), g


# ----------------------------------------------------------------------------- one task, one launch
def _both_paths(x, y, plan, phi, dims, acts, *, lr, eps, loss, precision, config, state, it, steps=None):
    """(φ, state, loss slot) after guarded_meta_step's one launch and after meta_step + accept_step."""
    device = x.device
    out = {}
    for path in ("one", "three"):
        p, st, lo = phi.clone(), state.clone(), torch.full((1,), -7.0, device=device)
        if path == "one":
            V.guarded_meta_step(x, y, plan, p, dims, acts, lr=lr, eps=eps, state=st, iteration=it, loss_out=lo,
                                loss=loss, precision=precision, config=config, steps=steps, check_values=False)
        else:
            res = V.meta_step(x, y, plan, p, dims, acts, lr=lr, eps=eps, loss=loss, precision=precision,
                              config=config, steps=steps, check_values=False)
            G.accept_step(p, res.params, res.loss, st, it, lo)
            out["new"] = res.params
        out[path] = (p, st, lo)
    return out


def _assert_same(out, what):
    (p1, s1, l1), (p3, s3, l3) = out["one"], out["three"]
    assert torch.equal(p1, p3), f"{what}: φ differs (max |Δ| {float((p1 - p3).abs().max())})"
    assert torch.equal(s1, s3), f"{what}: state {s1.tolist()} vs {s3.tolist()}"
    # a NaN loss is written by both: compare bit patterns, NaN included
    assert torch.equal(l1.view(torch.int32), l3.view(torch.int32)), f"{what}: loss slot {l1} vs {l3}"


ONE_TASK_CASES = [  # (dims, activations, loss, batch, precision, V2Config fields)
    ((1, 5, 1), ("identity", "identity"), "mse", 1, "ieee", {}),
    ((2, 20, 3), ("sigmoid", "sigmoid"), "mse", 3, "ieee", {}),  # padded 20 -> 32, sigmoid's padded 0.5s
    ((3, 33, 5), ("relu", "identity"), "cross_entropy", 7, "ieee", {"accumulate": "memory"}),
    ((3, 20, 20, 5), ("tanh", "relu", "identity"), "mse", 4, "tf32x3", {"preload": "prefetch"}),
    ((3, 20, 20, 5), ("tanh", "relu", "identity"), "cross_entropy", 4, "tf32", {"preload": False}),
    ((1, 4, 3, 4, 2, 1), ("tanh", "sigmoid", "relu", "tanh", "identity"), "mse", 2, "ieee", {}),  # 5 layers
    ((4, 64, 64, 2), ("tanh", "tanh", "identity"), "mse", 32, "ieee", {"num_warps": 2}),  # widest, batch 32
    ((1, 1), ("sigmoid",), "mse", 1, "ieee", {"preload": "prefetch"}),  # one 1 x 1 layer
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims, acts, loss, batch, precision, cfg", ONE_TASK_CASES,
                         ids=[f"{'-'.join(map(str, c[0]))}-{c[2]}-{c[4]}" for c in ONE_TASK_CASES])
def test_one_task_launch_is_bitwise_meta_step_then_accept(device, dims, acts, loss, batch, precision, cfg):
    config = V.V2Config(**cfg)
    meta = V._meta(dims, acts, loss, batch, 3, precision, config, True, False, False, finalize=True, one_task=True)
    assert meta["ONE_TASK"] and meta["ACCUMULATE"] == 0, "the case must take the register path"
    x, y, phi, g = _data(1, 40, dims, loss, 3, device)
    plan = sample_indices(1, 4, 40, batch, generator=g).to(device)  # 4 rows, 3 steps run
    it = torch.tensor([6], device=device)
    out = _both_paths(x, y, plan, phi, dims, acts, lr=0.05, eps=0.3, loss=loss, precision=precision,
                      config=config, state=G.new_state(device), it=it, steps=3)
    _assert_same(out, "accepted step")
    assert out["one"][1].tolist() == [1, 0] and not torch.equal(out["one"][0], phi), "the step must be taken"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflow / NaN: the point
@pytest.mark.parametrize("why", ["nan-loss", "inf-eps", "nan-eps", "unhealthy", "unhealthy-nan-loss", "overflow"])
def test_one_task_skips_exactly_as_accept_step(device, why):
    """Every way a step is skipped: a NaN inner loss, a non-finite ε (device tensor), an unhealthy
    state on entry (a finite step, and a bad one: the first bad iteration recorded stays), an update
    that overflows with a finite loss.  φ unchanged,
    state and loss slot as accept_step writes them."""
    dims, acts = (2, 20, 20, 1), ("tanh", "tanh", "identity")
    x, y, phi, g = _data(1, 30, dims, "mse", 8, device)
    plan = sample_indices(1, 2, 30, 5, generator=g).to(device)
    eps, lr, state = 0.5, 0.02, G.new_state(device)
    if why.endswith("nan-loss"):
        y = y.clone()
        y[0, plan[0, 1, 2]] = float("nan")  # a planned point of step 2
    elif why == "inf-eps":
        eps = torch.full((1,), float("inf"), device=device)
    elif why == "nan-eps":
        eps = torch.full((1,), float("nan"), device=device)
    if why.startswith("unhealthy"):
        state = torch.tensor([0, 3], dtype=torch.int64, device=device)
    if why == "overflow":
        eps, lr = 1e38, 3.0
    it = torch.tensor([9], device=device)
    out = _both_paths(x, y, plan, phi, dims, acts, lr=lr, eps=eps, loss="mse", precision="ieee",
                      config=V.V2Config(), state=state, it=it)
    _assert_same(out, why)
    assert torch.equal(out["one"][0], phi), f"{why}: a skipped step moved φ"
    assert out["one"][1].tolist() == ([0, 3] if why.startswith("unhealthy") else [0, 9]), out["one"][1]
    if why == "overflow":
        assert torch.isfinite(out["one"][2]).all() and not torch.isfinite(out["new"]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_one_task_chain_of_steps_matches(device):
    """Three guarded meta-steps in a row on the same buffers (φ, state carried), cross-entropy,
    prefetching: each step's result equals the three-launch path's."""
    dims, acts = (3, 9, 4), ("relu", "identity")
    x, y, phi, g = _data(1, 16, dims, "cross_entropy", 21, device)
    cfg = V.V2Config(preload="prefetch")
    p1, p3 = phi.clone(), phi.clone()
    s1, s3 = G.new_state(device), G.new_state(device)
    for k in range(1, 4):
        plan = sample_indices(1, 3, 16, 6, generator=g).to(device)
        it = torch.tensor([k], device=device)
        l1, l3 = torch.zeros(1, device=device), torch.zeros(1, device=device)
        V.guarded_meta_step(x, y, plan, p1, dims, acts, lr=0.1, eps=0.5, state=s1, iteration=it, loss_out=l1,
                            loss="cross_entropy", config=cfg)
        res = V.meta_step(x, y, plan, p3, dims, acts, lr=0.1, eps=0.5, loss="cross_entropy", config=cfg)
        G.accept_step(p3, res.params, res.loss, s3, it, l3)
        assert torch.equal(p1, p3) and torch.equal(s1, s3) and torch.equal(l1, l3), f"step {k}"
    assert s1.tolist() == [1, 0] and not torch.equal(p1, phi)


# ----------------------------------------------------------------------------- prefetch
def _garbage_plan(T, R, steps, N, batch, g, device):
    """A plan whose rows past ``steps`` hold indices far outside the task (allowed: only the rows
    run are checked) -- a prefetch reading a row past the last step would use them."""
    plan = sample_indices(T, R, N, batch, generator=g)
    plan[:, steps:] = torch.randint(-(2 ** 40), 2 ** 40, plan[:, steps:].shape, generator=g)
    return plan.to(device)


def _poison_unplanned(x, y, plan, steps, loss):
    """NaN inputs (and targets) at every point the first ``steps`` plan rows do not name."""
    x, y = x.clone(), y.clone()
    for t in range(x.shape[0]):
        used = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        used[plan[t, :steps].reshape(-1)] = True
        x[t, ~used] = float("nan")
        if loss == "mse":
            y[t, ~used] = float("nan")
    return x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss, dims, batch", [("mse", (2, 6, 3), 3), ("cross_entropy", (3, 20, 5), 1),
                                               ("mse", (1, 8, 1), 32)])
def test_prefetch_every_step_count_many_tasks_per_program(device, loss, dims, batch):
    """preload "prefetch" against True and False (``assert_same_across_configs``) for 0, 1, 2 and 5 inner steps
    (none; one, where nothing is fetched ahead; the first look-ahead; several) on a plan with two
    more rows than steps (garbage indices there), 7 tasks on 3 programs (tasks 3 and 6 start a
    program's look-ahead afresh), batch 1 (a padded row block) to 32, NaN at every unplanned point."""
    acts = ("tanh", "identity")
    T, N = 7, 40
    x0, y0, phi, g = _data(T, N, dims, loss, 30 + batch, device)
    for steps in (0, 1, 2, 5):  # (3 and 4 added 1/3 of the time and no new case: CI time)
        plan = _garbage_plan(T, steps + 2, steps, N, batch, g, device)
        x, y = _poison_unplanned(x0, y0, plan, steps, loss)
        runs = {}
        for pre in (True, False, "prefetch"):
            cfg = V.V2Config(preload=pre, max_programs=3)
            flat, losses = V.inner_loop(x, y, plan, phi, dims, acts, lr=0.1, loss=loss, steps=steps, config=cfg)
            res = V.meta_step(x, y, plan, phi, dims, acts, lr=0.1, eps=0.7, loss=loss, steps=steps, config=cfg)
            runs[pre] = (flat[:, :phi.numel()].clone(), losses.clone(), res.params.clone(), res.loss.clone())
        for pre in (False, "prefetch"):
            for name, a, b in zip(("adapted", "losses", "meta φ", "meta loss"), runs[True], runs[pre]):
                assert_same_across_configs(b, a, device, f"{loss}, batch {batch}, {steps} steps, "
                                                         f"preload={pre!r}: {name}")
        if steps:
            assert torch.isfinite(runs["prefetch"][0]).all(), "an unplanned (NaN) point was read"


@pytest.mark.parametrize("device", DEVICES)
def test_prefetch_streamed_layers_match_preloaded(device):
    """Streamed wide layers (their inputs through the scratch) with prefetched minibatches: the
    preloaded plan's φ and loss (``assert_same_across_configs``), in a meta-step over 5 tasks on
    2 programs."""
    dims, acts = (2, 20, 20, 1), ("tanh", "tanh", "identity")
    x, y, phi, g = _data(5, 24, dims, "mse", 44, device)
    plan = sample_indices(5, 4, 24, 5, generator=g).to(device)
    got = {}
    for pre in (True, "prefetch"):
        cfg = V.V2Config(stream=True, preload=pre, max_programs=2)
        res = V.meta_step(x, y, plan, phi, dims, acts, lr=0.05, eps=0.5, steps=3, config=cfg)
        got[pre] = (res.params.clone(), res.loss.clone())
    assert_same_across_configs(got["prefetch"][0], got[True][0], device, "streamed, prefetch: φ")
    assert_same_across_configs(got["prefetch"][1], got[True][1], device, "streamed, prefetch: loss")


def test_v2config_preload_values():
    for ok in (None, True, False, "prefetch"):
        V.V2Config(preload=ok)
    for bad in ("Prefetch", "on", 1, 0, 2, "true"):
        with pytest.raises(ValueError, match="preload"):
            V.V2Config(preload=bad)
    dims, acts = (1, 8, 1), ("tanh", "identity")
    codes = {pre: V._meta(dims, acts, "mse", 4, 3, "ieee", V.V2Config(preload=pre), True, False, False)["PRELOAD"]
             for pre in (True, False, "prefetch")}
    assert codes == {True: 1, False: 0, "prefetch": 2}


# ----------------------------------------------------------------------------- the preloaded plan's row selection
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the interpreter's tl.sum (numpy's) turns a sum of -0.0s into +0.0; "
                           "a GPU's reduction adds the elements only")
def test_select_step_keeps_signed_zeros():
    """``_select_step`` (preload=True: a step's rows picked from the whole preloaded plan by a
    masked sum) returns the row bit for bit, -0.0 included: the other rows enter the sum as -0.0
    (with +0.0 a -0.0 input came back +0.0, while preload False / "prefetch" keep it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def pick(src, dst, s, S_P: tl.constexpr, BB: tl.constexpr, C: tl.constexpr):
        i = tl.arange(0, S_P)[:, None, None] * (BB * C) + tl.arange(0, BB)[None, :, None] * C \
            + tl.arange(0, C)[None, None, :]
        row = V._select_step(tl.load(src + i), s, S_P)
        tl.store(dst + tl.arange(0, BB)[:, None] * C + tl.arange(0, C)[None, :], row)

    src = torch.tensor([-0.0, 0.0, 1.5, -2.0, float("inf"), -0.0, 3.0, -0.0]).repeat(8).reshape(4, 4, 4)
    src[1] = -0.0
    src[2, 0] = float("-inf")
    for s in range(4):
        dst = torch.full((4, 4), float("nan"))
        src, dst = src.cuda(), dst.cuda()
        pick[(1,)](src, dst, s, S_P=4, BB=4, C=4)
        src, dst = src.cpu(), dst.cpu()
        assert torch.equal(dst.view(torch.int32), src[s].view(torch.int32)), f"step {s}: {dst} != {src[s]}"
