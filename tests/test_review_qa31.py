"""QA31: the CPU backends' numerics against a float64 oracle, and dtype mismatches on direct calls.

The promise tested: a fast backend sits as close to a float64 run as the reference backend (the
seed's deep-copied module and torch.optim) does.  One seed cannot test that in bfloat16, where a
single rounding decision moves a whole trajectory, so each check runs many seeds and asks whether
the seed-by-seed comparison is consistent with "equally close": under that hypothesis, which of the
two is closer on a seed is a fair coin, so the number of seeds where the backend is farther is
Binomial(n, 1/2) (ties — bitwise equal results — dropped); a count whose one-sided p-value is
below 1e-3 refuses "equally close" (``test_the_sign_test_refuses_tanh_through_the_sigmoid_under_adam``).
Session 16's AMD EPYC showed the batched FOMAML meta-gradient 1.28x farther on 30 of 32 seeds; the
cause was the output layer's fused SGD step (fixed in session 17, see the test), so the sign test
holds again, beside the project's fp32 bound (at most 2x the reference's distance, median over
seeds); the tanh defect is also caught exactly (the default path equals ``fast_tanh=False`` bit for bit).  Before the fix, the torch backend's MLP path computed tanh as 2σ(2z) − 1
(an absolute, not relative, ~ulp(1) error) with inner Adam and for FOMAML's meta-gradient too: it
was farther than the reference on 80-94 of 100 seeds (p < 1e-9) in float32 and bfloat16.
bench/numerics_grid.py sweeps the whole grid (bench/results/numerics_grid_cpu.json).
"""
from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Sine, TaskBatch, sample_indices
from reptile_fast.backends import InnerConfig, get_backend

#: a one-sided sign-test p-value below this refuses "as close to float64 as the reference"
P_REFUSE = 1e-3


def _sign_test_p(farther: int, n: int) -> float:
    """P(X >= farther) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(farther, n + 1)) / 2 ** n


@functools.lru_cache(maxsize=None)
def _seed_case(dtype, config: InnerConfig, seed: int, n_tasks: int = 2):
    """One seed's sine MLP, tasks and plan in ``dtype``, the float64 oracle's result and the
    reference backend's distance from it (cached: the power test reuses the Adam test's seeds).
    The oracle is backend "reference" in float64 on the same (rounded) parameters, tasks and plan,
    so only the arithmetic differs; distances are of the adapted parameters (Reptile) or of the
    meta-gradients (FOMAML, Σ w_s g_s)."""
    reference = get_backend("reference")
    key = "meta_grads" if config.needs_meta_grads else "params"
    torch.manual_seed(seed)
    model = MLP().to(dtype)
    model64 = MLP().double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    t = Sine(dtype=torch.float64).sample(n_tasks, generator=g)
    tasks = TaskBatch(t.x.to(dtype), t.y.to(dtype))
    idx = sample_indices(n_tasks, 5 + (config.algorithm == "fomaml"), 50, 10, generator=g)  # 5 inner steps
    oracle = getattr(reference.inner_loop(model64, TaskBatch(tasks.x.double(), tasks.y.double()), idx, config), key)

    def dist(result):
        got = getattr(result, key)
        return math.sqrt(sum(float(((got[n].double() - oracle[n]) ** 2).sum()) for n in oracle))

    return model, tasks, idx, dist, dist(reference.inner_loop(model, tasks, idx, config))


def _distances(backend, dtype, config: InnerConfig, seeds: int):
    """Per seed, (backend's, reference's) distance from the float64 oracle (``_seed_case``)."""
    out = []
    for seed in range(seeds):
        model, tasks, idx, dist, ref = _seed_case(dtype, config, seed)
        out.append((dist(backend.inner_loop(model, tasks, idx, config)), ref))
    return out


def _farther_count(pairs):
    untied = [(a, b) for a, b in pairs if a != b]
    return sum(a > b for a, b in untied), len(untied)


@pytest.mark.parametrize("dtype, optimizer, algorithm, weights, seeds", [
    (torch.float32, "adam", "reptile", None, 100),
    (torch.bfloat16, "adam", "reptile", None, 100),
    (torch.float32, "sgd", "fomaml", None, 64),
    (torch.float32, "sgd", "reptile", (1.0, 0.5, 0.25, 0.125, 0.0625), 100),
])
def test_torch_backend_is_as_close_to_float64_as_the_reference(dtype, optimizer, algorithm, weights, seeds):
    """Inner Adam (float32, bfloat16), FOMAML's meta-gradient and Σ w_s g_s (``grad_weights``) on
    the sine MLP 1-64-64-1 tanh: backend "torch" (its batched-MLP path) is as close to the float64
    oracle as the reference -- the sign test does not refuse "equally close" -- and within 2x the
    reference's distance (median over seeds)."""
    config = InnerConfig(lr=0.02, optimizer=optimizer, algorithm=algorithm, grad_weights=weights)
    pairs = _distances(get_backend("torch"), dtype, config, seeds)
    # Session 16 relaxed this to the 2x bound alone: on an AMD EPYC (torch 2.14.1) the FOMAML
    # meta-gradient sat 1.28x farther than the reference's on 30 of 32 seeds.  The cause was the
    # output layer's fused SGD step (``baddbmm_`` with alpha = -lr on its one-row product gᵀh,
    # two roundings where SGD's add_ has one): its adapted weights 2.5x farther, the hidden layers'
    # meta-gradients through them 1.2-1.5x.  Unfused, every layer is as close as the reference's
    # (``mlp_batched._run_backward_sgd``; bench/results/numerics_grid_cpu_amd_epyc.json), so the
    # sign test is back.
    ratio = statistics.median(a / b for a, b in pairs if b > 0)
    farther, n = _farther_count(pairs)
    what = f"farther than the reference on {farther} of {n} seeds, median ratio {ratio:.3g}"
    assert _sign_test_p(farther, n) >= P_REFUSE, f"backend torch drifts from float64: {what}"
    assert ratio <= 2.0, f"backend torch is beyond 2x the reference's distance from float64: {what}"


def test_the_sign_test_refuses_tanh_through_the_sigmoid_under_adam():
    """The statistic above has the power to see the drift it guards against: forcing
    ``fast_tanh=True`` with inner Adam in float32 is refused (farther on ~83 of 100 seeds)."""
    config = InnerConfig(lr=0.02, optimizer="adam")
    farther, n = _farther_count(_distances(get_backend("torch", fast_tanh=True), torch.float32, config, 100))
    assert _sign_test_p(farther, n) < P_REFUSE


@pytest.mark.parametrize("config", [InnerConfig(optimizer="adam"), InnerConfig(algorithm="fomaml"),
                                    InnerConfig(grad_weights=(1.0, 0.5, 0.25))])
def test_default_tanh_is_torch_tanh_where_gradients_reach_the_result(config):
    """With Adam, FOMAML or grad_weights the default MLP path equals ``fast_tanh=False`` bit for
    bit (plain SGD Reptile keeps the sigmoid form, which is as close as the reference there)."""
    torch.manual_seed(0)
    model = MLP()
    tasks = Sine().sample(3, generator=torch.Generator().manual_seed(1))
    rows = 4 if config.algorithm == "fomaml" else 3
    idx = sample_indices(3, rows, 50, 10, generator=torch.Generator().manual_seed(2))
    a = get_backend("torch").inner_loop(model, tasks, idx, config)
    b = get_backend("torch", fast_tanh=False).inner_loop(model, tasks, idx, config)
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n]), n
        if a.meta_grads is not None:
            assert torch.equal(a.meta_grads[n], b.meta_grads[n]), n


# ---------------------------------------------------------------- dtypes on direct backend calls

def _plan(n_tasks=2, rows=2):
    return sample_indices(n_tasks, rows, 50, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("task_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_direct_inner_loop_refuses_tasks_of_another_dtype_by_name(backend, task_dtype):
    """A backend called directly (``get_backend``) with float16/bfloat16/float64 tasks on a
    float32 model: a TypeError naming both dtypes (it failed inside torch with "mat1 and mat2 must
    have the same dtype" / "Input dtypes must be the same")."""
    t = Sine().sample(2, generator=torch.Generator().manual_seed(1))
    tasks = TaskBatch(t.x.to(task_dtype), t.y.to(task_dtype))
    with pytest.raises(TypeError, match=rf"tasks.x dtype {task_dtype} differs from the model's torch.float32"):
        get_backend(backend).inner_loop(MLP(), tasks, _plan(), InnerConfig())
    # x right, y another dtype cannot be built: TaskBatch refuses it where it is made
    with pytest.raises(TypeError, match="y dtype"):
        TaskBatch(t.x, t.y.to(task_dtype))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_direct_inner_loop_refuses_a_model_of_two_dtypes(backend):
    """One layer in float64, the rest float32: a TypeError listing the dtypes (Reptile refused it;
    the backends failed inside torch with "expected scalar type Double but found Float")."""
    model = MLP()
    next(m for m in model.modules() if isinstance(m, nn.Linear)).double()
    with pytest.raises(TypeError, match=r"share one floating-point dtype.*float32.*float64"):
        get_backend(backend).inner_loop(model, Sine().sample(2, generator=torch.Generator().manual_seed(1)),
                                        _plan(), InnerConfig())


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float64])
def test_direct_evaluate_refuses_params_of_another_dtype(backend, param_dtype):
    """``evaluate`` with adapted params in another dtype than the model's: a TypeError naming the
    parameter.  Before: reference failed inside torch, torch's MLP path returned float64 losses
    computed from float64 params (another precision, silently)."""
    model = MLP()
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(1))
    params = {n: p.detach().expand(2, *p.shape).to(param_dtype) for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=rf"params\['.*'\] is {param_dtype} but the model's parameter is torch.float32"):
        get_backend(backend).evaluate(model, params, tasks, InnerConfig())
    ok = {n: v.float() for n, v in params.items()}
    assert get_backend(backend).evaluate(model, ok, tasks, InnerConfig()).dtype == torch.float32


def test_numerics_grid_bench_runs_and_summarises(tmp_path):
    """``bench.numerics_grid`` (the sweep behind NOTES-qa31.md (folded into the README since; ``git show 4ac46e4:NOTES-qa31.md``) and bench/results/numerics_grid_cpu.json)
    runs end to end on a small grid, and its sign test is the binomial one."""
    import json

    from bench.numerics_grid import _sign_test, main, summarise

    out = tmp_path / "grid.json"
    threads = torch.get_num_threads()
    main(["--seeds", "2", "--models", "sine", "--dtypes", "float32", "--backends", "reference,torch", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the sweep runs on one thread and puts the count back
    cells = json.loads(out.read_text())["cells"]
    assert {(c["optimizer"], c["algorithm"]) for c in cells} == {(o, a) for o in ("sgd", "adam") for a in ("reptile", "fomaml")}
    fomaml = next(c for c in cells if c["algorithm"] == "fomaml")
    assert set(fomaml["summary"]) == {"inner", "meta_grad", "meta_step"}
    assert 0 < fomaml["summary"]["meta_step"]["torch"]["median"] < 1e-4  # fp32 rounding, not a wrong answer
    assert _sign_test(5, 5) == pytest.approx(2 / 32) and _sign_test(0, 5) == pytest.approx(2 / 32)
    s = summarise({"reference": [1.0, 1.0, 1.0], "x": [2.0, 2.0, 1.0]})["x"]
    assert s["frac_worse"] == 1.0 and s["ties"] == 1 and s["ratio_geomean"] == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.999)])
def test_stacked_adam_is_torch_optim_adam_bit_for_bit(dtype, betas):
    """Backend torch's inner Adam (``StackedAdam``, all tasks' parameters stacked) against one
    ``torch.optim.Adam`` per task, given the same gradients (spanning 1e-6 … 10): the same bits in
    every dtype — state kept in the parameters' dtype, the single-tensor algorithm's op order.  So
    the bfloat16 drift of the open item was not Adam (it was the MLP path's tanh, tested above)."""
    from reptile_fast.backends.torch_func import StackedAdam

    torch.manual_seed(0)
    eps = 1e-4 if dtype == torch.float16 else 1e-8  # 1e-8 is 0 in float16 (Reptile refuses it)
    p0 = torch.randn(3, 40).to(dtype)
    grads = [(torch.randn(3, 40) * 10.0 ** torch.randint(-6, 2, (3, 40)).float()).to(dtype) for _ in range(12)]
    ps = [p0[i].clone().requires_grad_() for i in range(3)]
    optims = [torch.optim.Adam([p], lr=0.02, betas=betas, eps=eps) for p in ps]
    stacked = p0.clone()
    adam = StackedAdam([stacked], 0.02, betas, eps)
    for g in grads:
        for i, (p, opt) in enumerate(zip(ps, optims)):
            p.grad = g[i].clone()
            opt.step()
        adam.step([stacked], [g])
    for i in range(3):
        assert torch.equal(ps[i].detach(), stacked[i])
        assert torch.equal(optims[i].state[ps[i]]["exp_avg_sq"], adam.exp_avg_sq[0][i])
