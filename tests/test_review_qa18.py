"""QA18's review of issue 12 (kernel v2, the fused outer update, the guard): what it found, as tests.

* Caller buffers over inputs: ``meta_step``'s ``out`` over ``x`` / ``y`` / ``indices``, and
  ``guarded_meta_step``'s ``loss_out`` and ``scratch`` over its inputs or each other, ran silently
  (the README says the launchers refuse them); ``scratch`` of a wrong shape was refused under the
  name ``out``, and only when several programs ran.  ``accept_step`` took ``loss_out`` over ``new``
  (on a GPU a thread can write the loss while another still reads ``new`` in pass 2).
* Launcher flags take True or False only: ``task_losses="no"`` returned the losses and
  ``check_values="no"`` ran the host sync its caller refused.
* The issue's own shapes under the interpreter: the sine MLP 1-64-64-1, 5 inner steps of 10
  points, 37 tasks on 8 programs and T = 1, against the reference backend (rtol 1e-5 / atol 1e-6)
  and a float64 oracle; the meta-step's partial sums in memory and in registers; the one-launch
  guarded meta-step at T = 1 for each precision.

Without CUDA these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1 first).
"""
import copy

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import Sine, reference, sample_indices  # noqa: E402
from reptile_fast.backends import InnerConfig  # noqa: E402
from reptile_fast.backends.reference import ReferenceBackend  # noqa: E402
from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from reptile_fast.kernels import mlp_inner_loop as K  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402
from reptile_fast.mlp_spec import extract_mlp_spec  # noqa: E402
from reptile_fast.tasks import TaskBatch  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _small():
    """A 2-8-1 MLP's φ and 2 regression tasks of 40 points (x holds more floats than φ)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DEVICE)
    spec = extract_mlp_spec(model)
    phi = V.flat_params([p for p in model.parameters()])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 2, generator=g).to(DEVICE)
    y = torch.randn(2, 40, 1, generator=g).to(DEVICE)
    idx = sample_indices(2, 3, 40, 4, generator=g).to(DEVICE)
    return spec, phi, x, y, idx


def _guarded(spec, phi, x, y, idx, **kw):
    args = dict(state=G.new_state(DEVICE), iteration=torch.ones(1, dtype=torch.int64, device=DEVICE),
                loss_out=torch.empty(1, device=DEVICE))
    args.update(kw)
    V.guarded_meta_step(x, y, idx, phi, spec.dims, spec.activations, lr=0.02, eps=0.1, **args)


# ----------------------------------------------------------------------------- caller buffers
def test_meta_step_refuses_an_out_over_its_inputs():
    spec, phi, x, y, idx = _small()
    n = spec.n_params
    for name, buf in (("x", x), ("y", y)):
        keep = buf.clone()
        with pytest.raises(ValueError, match="out must not overlap x, y or indices"):
            V.meta_step(x, y, idx, phi, spec.dims, spec.activations, lr=0.02, eps=0.1, out=buf.view(-1)[:n])
        assert torch.equal(buf, keep), f"meta_step wrote φ over {name}"


@pytest.mark.parametrize("programs", [1, 2])
def test_guarded_meta_step_checks_scratch_and_loss_out_under_their_own_names(programs):
    """One program (one launch) and two (meta_step + accept_step) check the same buffers."""
    spec, phi, x, y, idx = _small()
    n = spec.n_params
    cfg = V.V2Config(max_programs=programs)
    with pytest.raises(ValueError, match=rf"scratch must be a contiguous \[{n}\] tensor"):
        _guarded(spec, phi.clone(), x, y, idx, scratch=torch.empty(3, device=DEVICE), config=cfg)
    with pytest.raises(TypeError, match="scratch must be torch.float32"):
        _guarded(spec, phi.clone(), x, y, idx, scratch=torch.empty(n, dtype=torch.float64, device=DEVICE), config=cfg)
    keep = x.clone()
    with pytest.raises(ValueError, match="scratch must not overlap"):
        _guarded(spec, phi.clone(), x, y, idx, scratch=x.view(-1)[:n], config=cfg)
    with pytest.raises(ValueError, match="loss_out must not overlap x"):
        _guarded(spec, phi.clone(), x, y, idx, loss_out=x.view(-1)[:1], config=cfg)
    assert torch.equal(x, keep), "a refused meta-step wrote into x"
    both = torch.empty(n + 1, device=DEVICE)
    with pytest.raises(ValueError, match="scratch must not overlap"):
        _guarded(spec, phi.clone(), x, y, idx, scratch=both[:n], loss_out=both[n - 1:n], config=cfg)
    state = torch.tensor([1, 0, 0], dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="state must not overlap"):
        _guarded(spec, phi.clone(), x, y, idx, state=state[:2], iteration=state[1:2], config=cfg)
    # the buffers the fused stepper passes (separate tensors) are taken
    _guarded(spec, phi.clone(), x, y, idx, scratch=torch.empty(n, device=DEVICE), config=cfg)


def test_accept_step_refuses_loss_out_or_state_over_new():
    n = 6  # even: φ's memory viewed as int64 below
    phi, new = torch.zeros(n, device=DEVICE), torch.ones(n + 2, device=DEVICE)
    loss = torch.zeros(1, device=DEVICE)
    it = torch.ones(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="loss_out and state must not overlap new"):
        G.accept_step(phi, new[:n], loss, G.new_state(DEVICE), it, new[n - 1:n])
    with pytest.raises(ValueError, match="state must not overlap phi"):
        G.accept_step(phi, new[:n], loss, phi.view(torch.int64)[:2], it, torch.empty(1, device=DEVICE))
    G.accept_step(phi, new[:n], loss, G.new_state(DEVICE), it, torch.empty(1, device=DEVICE))
    assert torch.equal(phi, new[:n])


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("value", ["no", 0, None])
def test_launcher_flags_take_true_or_false_only(value):
    spec, phi, x, y, idx = _small()
    common = (x, y, idx, phi, spec.dims, spec.activations)
    with pytest.raises(TypeError, match="task_losses must be True or False"):
        V.meta_step(*common, lr=0.02, eps=0.1, task_losses=value)
    for call in (lambda: V.meta_step(*common, lr=0.02, eps=0.1, check_values=value),
                 lambda: V.inner_loop(*common, lr=0.02, check_values=value),
                 lambda: _guarded(spec, phi.clone(), x, y, idx, check_values=value),
                 lambda: K.mlp_inner_loop(x, y, idx, V.unflatten_params(phi, spec.dims), spec.activations, lr=0.02,
                                          check_values=value)):
        with pytest.raises(TypeError, match="check_values must be True or False"):
            call()


# ----------------------------------------------------------------------------- the shapes
def _sine(T, seed):
    tasks = Sine().sample(T, generator=torch.Generator().manual_seed(seed))
    plan = sample_indices(T, 5, 50, 10, generator=torch.Generator().manual_seed(seed + 1))
    return tasks, plan


def _reference(model, tasks, plan, dtype):
    m = copy.deepcopy(model).cpu().to(dtype)
    t = TaskBatch(tasks.x.cpu().to(dtype), tasks.y.cpu().to(dtype))
    res = ReferenceBackend().inner_loop(m, t, plan.cpu(), InnerConfig(lr=0.02))
    names = [n for n, _ in m.named_parameters()]
    return torch.cat([res.params[n].reshape(plan.shape[0], -1) for n in names], 1), res.losses


def test_sine_1_64_64_1_on_37_tasks_and_8_programs():
    """The issue's case: the seed's MLP, 5 steps of 10 points, 37 tasks on 8 programs (the last
    round part-empty): adapted parameters and losses against the reference (NaN-poisoned
    outputs), their error against float64 within 2x the fp32 reference's; the fused meta-step
    (the default partial sums of this size: in memory) against the trainer's update."""
    torch.manual_seed(11)
    model = reference.MLP().to(DEVICE)
    spec = extract_mlp_spec(model)
    assert spec.dims == (1, 64, 64, 1)
    phi = V.flat_params(list(model.parameters()))
    tasks, plan = _sine(37, 12)
    want32, losses32 = _reference(model, tasks, plan, torch.float32)
    want64, _ = _reference(model, tasks, plan, torch.float64)
    n = spec.n_params
    cfg = V.V2Config(max_programs=8)
    args = (tasks.x.to(DEVICE), tasks.y.to(DEVICE), plan.to(DEVICE), phi, spec.dims, spec.activations)
    out = torch.full((37, n + 3), float("nan"), device=DEVICE)
    out_losses = torch.full((37, 5), float("nan"), device=DEVICE)
    V.inner_loop(*args, lr=0.02, config=cfg, out=out, out_losses=out_losses)
    assert torch.isnan(out[:, n:]).all(), "kernel v2 wrote past a task's parameters"
    got = out[:, :n].cpu()
    torch.testing.assert_close(got, want32, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out_losses.cpu(), losses32, rtol=RTOL, atol=ATOL)
    e_v2 = float((got.double() - want64).norm() / want64.norm())
    e_ref = float((want32.double() - want64).norm() / want64.norm())
    assert e_v2 <= 2 * e_ref + 2.0 ** -23, f"v2 vs float64 {e_v2:.3g} > 2 x the fp32 reference's {e_ref:.3g}"
    partials = torch.full((8, n), float("nan"), device=DEVICE)
    res = V.meta_step(*args, lr=0.02, eps=0.1, config=cfg, out=torch.full_like(phi, float("nan")),
                      partials=partials)
    assert not torch.isnan(partials).any(), "a program left its partial row unwritten"
    want_phi = phi.cpu() + 0.1 * (want32 - phi.cpu()).mean(0)
    torch.testing.assert_close(res.params.cpu(), want_phi, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(res.loss.cpu(), losses32.mean(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("precision", V.PRECISIONS)
def test_sine_1_64_64_1_one_task_each_precision(precision):
    """T = 1 (one program): the inner loop, the meta-step with its sums in registers and in
    memory, and the one-launch guarded meta-step (bitwise the meta-step's φ), each precision (the
    interpreter computes every dot in fp32: on a GPU test_kernel_mlp_meta_step_v2 holds tf32x3 and
    tf32 to float64 bounds instead)."""
    torch.manual_seed(13)
    model = reference.MLP().to(DEVICE)
    spec = extract_mlp_spec(model)
    phi = V.flat_params(list(model.parameters()))
    tasks, plan = _sine(1, 14)
    want32, losses32 = _reference(model, tasks, plan, torch.float32)
    args = (tasks.x.to(DEVICE), tasks.y.to(DEVICE), plan.to(DEVICE), phi, spec.dims, spec.activations)
    exact = precision == "ieee" or DEVICE == "cpu"
    tol = dict(rtol=RTOL, atol=ATOL) if exact else dict(rtol=1e-2, atol=1e-3)
    flat, losses = V.inner_loop(*args, lr=0.02, precision=precision)
    torch.testing.assert_close(flat[:, :spec.n_params].cpu(), want32, **tol)
    torch.testing.assert_close(losses.cpu(), losses32, **tol)
    want_phi = phi.cpu() + 0.5 * (want32[0] - phi.cpu())
    results = []
    for acc in ("registers", "memory"):
        res = V.meta_step(*args, lr=0.02, eps=0.5, precision=precision, config=V.V2Config(accumulate=acc))
        torch.testing.assert_close(res.params.cpu(), want_phi, **tol)
        results.append(res)
    work = phi.clone()
    state, loss_out = G.new_state(DEVICE), torch.full((1,), float("nan"), device=DEVICE)
    V.guarded_meta_step(*args[:3], work, spec.dims, spec.activations, lr=0.02, eps=0.5, precision=precision,
                        state=state, iteration=torch.ones(1, dtype=torch.int64, device=DEVICE), loss_out=loss_out)
    assert torch.equal(work, results[1].params) and torch.equal(loss_out, results[1].loss.reshape(1))
    assert state.tolist() == [1, 0]


# ----------------------------------------------------------------------------- the GPU check's time budget
def test_gpu_check_times_t4096_first_and_caps_the_main_job(tmp_path, monkeypatch):
    """Stage 4 on a GPU (stood in for: the stage's logic only): the fit rows, the main job and ~11
    cases per T with their compiles at T = 1 fill the stage's ~170 s, so a budget that runs out
    must cost the least informative T, not T = 4096 (the issue's targets' size: it ran third);
    the main job, ~20 s expected, may take at most 45 s of it (it could take 75 s before any T)."""
    from types import SimpleNamespace

    from bench import gpu_check as GC

    seen = {}

    def cli_row(log, out, timeout, smoke=False):
        seen["cli_timeout"] = timeout
        return {"provider": "cli-sine-gpu", "T": 1, "status": "stood in"}

    def no_problem(T, device, **kw):
        raise RuntimeError("stood in")

    monkeypatch.setattr(GC, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(GC, "cli_sine_row", cli_row)
    monkeypatch.setattr(GC, "problem", no_problem)
    results = {"stages": {}, "seconds": {}}
    GC.stage_timing(lambda *a: None, SimpleNamespace(type="cuda"), False, GC.Budget(170), results, tmp_path)
    order = [r["T"] for r in results["stages"]["timing"]["rows"] if r["provider"] == "*"]
    assert order[0] == 4096 and sorted(order) == [1, 256, 4096, 65536], order
    assert seen["cli_timeout"] <= 45


def test_flat_params_and_unflatten_params_name_bad_input():
    """flat_params: an int in the list was an AttributeError, an empty list torch.cat's error, a
    float64 tensor among float32 ones made the whole vector float64 (its docstring: float32);
    unflatten_params(flat, None) was a bare "'NoneType' object is not iterable"."""
    from reptile_fast import MLP

    model = MLP(1, 8, 1, depth=1)
    assert V.flat_params(model.parameters()).shape == (V.n_flat_params((1, 8, 1)),)  # an iterator too
    with pytest.raises(TypeError, match=r"params\[0\] must be a float32 tensor, got int"):
        V.flat_params([1, 2])
    with pytest.raises(ValueError, match="at least one tensor"):
        V.flat_params([])
    with pytest.raises(TypeError, match=r"params\[1\] must be a float32 tensor, got torch.float64"):
        V.flat_params([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="params must be a sequence of tensors"):
        V.flat_params(None)
    with pytest.raises(TypeError, match="dims must be a sequence of feature sizes"):
        V.unflatten_params(torch.zeros(25), None)
