"""QA24's mutation audit: each test here fails under a deliberate, realistic breakage of the
library that the rest of the suite let through (see NOTES-qa24.md (folded into the README since; ``git show 84b67f4:NOTES-qa24.md``) for the table).

Oracles are float64 loops written with torch.autograd, independent of the library's backends;
fp32 results are compared at the project's rtol 1e-5 / atol 1e-6 (a few inner steps of a tiny
MLP: fp32 rounding is ~1e-7 relative)."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from reptile_fast import Reptile, TaskBatch, sample_indices
from reptile_fast.core import NonFiniteError, OuterUpdate

RTOL, ATOL = 1e-5, 1e-6


def _mlp(d_in=2, hidden=8, d_out=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def _tasks(T=3, n=9, d_in=2, d_out=2, seed=0, classes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, d_in, generator=g)
    y = torch.randint(0, classes, (T, n), generator=g) if classes else torch.randn(T, n, d_out, generator=g)
    return TaskBatch(x, y)


def _oracle_meta_step(model, tasks, plan, *, inner_lr, eps, algorithm="reptile", loss="mse"):
    """One meta-step in float64 with plain autograd: ``(new φ by name, mean inner minibatch loss)``.

    Reptile: D_i = φ̃_i − φ; FOMAML: D_i = −∇L(φ̃_i) on the plan's last row.  φ ← φ + ε·mean_i D_i.
    The loss is the mean over tasks and inner steps of the minibatch loss before each step."""
    lossf = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
    model = copy.deepcopy(model).double()
    phi = {n: p.detach() for n, p in model.named_parameters()}
    names = list(phi)
    rows = plan.shape[1]
    steps = rows - 1 if algorithm == "fomaml" else rows
    deltas, losses = {n: [] for n in names}, []

    def grad_at(params, i, row):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        ind = plan[i, row]
        y = tasks.y[i][ind]
        out = torch.func.functional_call(model, leaves, (tasks.x[i][ind].double(),))
        value = lossf(out, y if loss != "mse" else y.double())
        return value.item(), dict(zip(names, torch.autograd.grad(value, list(leaves.values()))))

    for i in range(tasks.n_tasks):
        params = dict(phi)
        for s in range(steps):
            value, g = grad_at(params, i, s)
            losses.append(value)
            params = {n: params[n] - inner_lr * g[n] for n in names}
        if algorithm == "fomaml":
            _, g = grad_at(params, i, steps)
            for n in names:
                deltas[n].append(-g[n])
        else:
            for n in names:
                deltas[n].append(params[n] - phi[n])
    new = {n: phi[n] + eps * torch.stack(deltas[n]).mean(0) for n in names}
    return new, sum(losses) / len(losses)


# ------------------------------------------------------------------------------------ core
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_meta_step_equals_a_float64_oracle_in_direction_and_loss(backend, algorithm):
    """φ after one meta-step and its reported loss, against a float64 autograd loop.

    Catches: FOMAML's pseudo-gradient applied with the wrong sign in ``per_task_deltas`` (every
    backend shares it, so backend-vs-backend comparisons cannot see it), and a reported loss that
    is not the mean over tasks *and* inner steps (e.g. the first step's only)."""
    model = _mlp()
    tasks = _tasks()
    rows = 3 + (algorithm == "fomaml")
    plan = sample_indices(3, rows, 9, 4, generator=torch.Generator().manual_seed(1))
    expected, expected_loss = _oracle_meta_step(model, tasks, plan, inner_lr=0.1, eps=0.7, algorithm=algorithm)
    trainer = Reptile(copy.deepcopy(model), backend=backend, inner_steps=3, inner_batch_size=4, inner_lr=0.1,
                      outer_lr=0.7, algorithm=algorithm)
    out = trainer.meta_step(tasks, plan)
    trainer.check_finite()
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=RTOL, atol=ATOL, msg=n)
    # the move is not negligible next to the tolerance (a sign error shows)
    moved = max(float((expected[n] - p.detach().double()).abs().max()) for n, p in model.named_parameters())
    assert moved > 100 * ATOL
    assert math.isclose(float(out["loss"]), expected_loss, rel_tol=RTOL)


def test_an_update_that_overflows_phi_is_skipped_though_the_step_is_finite():
    """ε·D finite (3e38) but φ + ε·D = inf in fp32: the guard must read the new φ, not only the
    step (the module docstring's promise); a guard on ε·D alone let φ become inf silently."""
    w = torch.tensor([3e38, 1.0])
    b = torch.tensor([0.5])
    outer = OuterUpdate([("w", w), ("b", b)])
    outer.apply([torch.tensor([3e38, 0.0]), torch.tensor([0.0])], torch.tensor(0.25), 1.0, 1)
    assert torch.equal(w, torch.tensor([3e38, 1.0])) and torch.equal(b, torch.tensor([0.5]))
    with pytest.raises(NonFiniteError) as info:
        outer.check()
    assert info.value.iteration == 1
    # re-armed: the next good step applies
    outer.apply([torch.tensor([-1e38, 1.0]), torch.tensor([1.0])], torch.tensor(0.25), 0.5, 2)
    outer.check()
    torch.testing.assert_close(w, torch.tensor([2.5e38, 1.5]))
    torch.testing.assert_close(b, torch.tensor([1.0]))


def test_an_update_that_overflows_a_float16_phi_is_skipped():
    """The fp16 case of the same guard: 6e4 + 6e4 overflows float16 (max 65504)."""
    w = torch.tensor([6e4, 1.0], dtype=torch.float16)
    outer = OuterUpdate([("w", w)])
    outer.apply([torch.tensor([6e4, 1.0], dtype=torch.float16)], torch.tensor(0.0, dtype=torch.float16), 1.0, 3)
    assert torch.equal(w, torch.tensor([6e4, 1.0], dtype=torch.float16))
    with pytest.raises(NonFiniteError, match="meta-step 3"):
        outer.check()


# ------------------------------------------------------------------------------ native C
def _native_math():
    """The native program's fp32 tanh / exp / sigmoid (``native_step._MATH_F32``) compiled on
    their own, as ``f(x [n], tanh [n], exp [n], sigmoid [n], n)``; None without a C compiler."""
    import ctypes

    from reptile_fast import native_build, native_step

    if native_build.find_compiler() is None:
        return None
    source = ("#include <math.h>\n#include <stdint.h>\n" + native_step._MATH_F32 +
              "void rf_eval(const float *x, float *t, float *e, float *s, int64_t n) {\n"
              "    for (int64_t i = 0; i < n; i++) { t[i] = rf_tanh(x[i]); e[i] = rf_exp(x[i]); "
              "s[i] = rf_sigmoid(x[i]); }\n}\n")
    lib, _, _ = native_build.load_library(source, "qa24_math", what="the qa24 math check")
    fn = lib.rf_eval
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64]

    def run(x):
        x = x.contiguous()
        t, e, s = (torch.empty_like(x) for _ in range(3))
        fn(x.data_ptr(), t.data_ptr(), e.data_ptr(), s.data_ptr(), x.numel())
        return t, e, s

    return run


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got − exact| in units of the last place of the fp32 value nearest ``exact`` (float64)."""
    nearest = exact.float()
    ulp = (torch.nextafter(nearest.abs(), torch.tensor(math.inf)) - nearest.abs()).double()
    return (got.double() - exact).abs() / ulp


def test_native_fp32_tanh_exp_sigmoid_are_within_a_few_ulp_of_float64():
    """The module docstring's promise: Cephes' tanhf / expf polynomials, within 2 ulp.  A wrong
    polynomial constant (1.33314422036e-1 → 1.3331e-1 in tanh: ≤ 4e-7 absolute) stays within the
    meta-step tests' atol 1e-6, so the functions are checked against float64 on their own."""
    run = _native_math()
    if run is None:
        pytest.skip("no C compiler")
    x = torch.cat([torch.linspace(-12.0, 12.0, 240001), torch.linspace(-0.7, 0.7, 140001),
                   torch.tensor([0.0, -0.0, 0.625, -0.625, 1e-20, -1e-20, 20.0, -20.0])])
    t, e, s = run(x)
    xd = x.double()
    assert float(_ulps(t, torch.tanh(xd)).max()) <= 2
    ex = torch.linspace(-87.0, 88.0, 350001)
    _, e, _ = run(ex)
    assert float(_ulps(e, torch.exp(ex.double())).max()) <= 2
    assert float(_ulps(s, torch.sigmoid(xd)).max()) <= 3  # 1 / (1 + exp(−x)): two more roundings


# ------------------------------------------------------------------------------ drop-in
_SEED_LOOP = '''
def perform_k_training_steps(model, task, k, batch_size=10):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    train_x, train_y, loss_fct = task
    for epoch in range(k * train_x.shape[0] // batch_size):
        ind = torch.randperm(train_x.shape[0])[:batch_size]
        x_batch = train_x[ind].unsqueeze(-1)
        target = train_y[ind].unsqueeze(-1)
        loss = loss_fct(model(x_batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p for p in model.parameters()]
'''


def test_the_seed_loop_text_over_another_torch_is_not_the_standard_loop():
    """The seed's loop, word for word, in a module whose ``torch`` is not torch (here a wrapper
    whose ``randperm`` never shuffles): it computes something else, so it must not be taken for
    the standard loop (the fast paths would run torch's randperm draws instead)."""
    import types

    from reptile_fast.seed_recognition import classify_inner_loop

    real = {}
    exec(_SEED_LOOP, {"torch": torch}, real)
    assert classify_inner_loop(real["perform_k_training_steps"]) == (10, False)
    fake_torch = types.SimpleNamespace(optim=torch.optim, randperm=lambda n: torch.arange(n))
    fake = {}
    exec(_SEED_LOOP, {"torch": fake_torch}, fake)
    assert classify_inner_loop(fake["perform_k_training_steps"]) == (None, False)


def test_dropin_serves_the_first_drawn_sine_task_first():
    """reptile_fast.reptile with the seed's sample_task at meta-batch 2 and fed plans: task 0 of
    meta-step 1 is the one sample_task() drew (global RNG), task 1 is drawn vectorised from
    ``generator``; plan [0, i] goes with task i.  Equal to one reference meta-step on those tasks."""
    from reptile_fast import Sine, reference, reptile

    torch.manual_seed(5)
    x, y, _ = reference.sample_task()
    second = Sine().sample(1, generator=torch.Generator().manual_seed(9))
    tasks = TaskBatch(torch.cat([x[None, :, None], second.x]), torch.cat([y[None, :, None], second.y]))
    plans = sample_indices(2, 5, 50, 10, generator=torch.Generator().manual_seed(3)).view(1, 2, 5, 10)
    torch.manual_seed(0)
    model = reference.MLP()
    expected = Reptile(copy.deepcopy(model), backend="reference", inner_lr=0.02, inner_steps=5,
                       inner_batch_size=10, outer_lr=0.1)
    expected.meta_step(tasks, plans[0])
    expected.check_finite()
    torch.manual_seed(5)
    stats = reptile(model, 1, reference.sample_task, None, meta_batch_size=2, indices=plans, backend="torch",
                    generator=torch.Generator().manual_seed(9), progress=False)
    assert "vectorised" in stats["tasks"] and stats["path"] == "torch"
    for (n, got), want in zip(model.named_parameters(), expected.model.parameters()):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=n)


@pytest.mark.parametrize("where", ["notebook cell", "exec with locals"])
def test_the_seed_loop_defined_where_torch_is_imported_elsewhere_is_recognised(where):
    """A notebook defines the seed's loop in a cell and imports torch in another: Python 3.11 then
    compiles ``torch.randperm(...)`` to LOAD_METHOD rather than LOAD_ATTR (other cache sizes, so
    other jump offsets), and the fingerprint's byte offsets made the seed's own function 'not the
    standard inner loop': the drop-in ran the reference loop at the seed's speed, with a warning."""
    import reptile_fast
    from reptile_fast import reference
    from reptile_fast.seed_recognition import classify_inner_loop

    namespace = {"torch": torch}
    if where == "notebook cell":
        exec(_SEED_LOOP, namespace)
        fn = namespace["perform_k_training_steps"]
    else:
        local = {}
        exec(_SEED_LOOP, namespace, local)
        fn = local["perform_k_training_steps"]
    assert classify_inner_loop(fn) == (10, False)
    torch.manual_seed(0)
    model = reference.MLP(1, 8, 1)
    stats = reptile_fast.reptile(model, 2, reference.sample_task, fn, backend="torch", progress=False)
    assert stats["path"] == "torch" and stats["reason"] is None


def test_dropin_custom_inner_loop_averages_the_meta_batch():
    """The reference path (a custom inner loop) at meta-batch 3: φ ← φ + ε·mean_i(φ̃_i − φ), the
    mean over the 3 tasks (a sum moved φ 3× as far and passed every other test)."""
    from reptile_fast import reptile

    shifts = iter([1.0, -0.5, 2.0])

    def sample_task():
        return torch.zeros(4), torch.zeros(4), nn.MSELoss()

    def my_loop(model, task, k):  # not the standard loop: moves every parameter by a known shift
        s = next(shifts)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(s)
        return list(model.parameters())

    torch.manual_seed(0)
    model = nn.Linear(1, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(Warning, match="reference loop"):
        stats = reptile(model, 1, sample_task, my_loop, epsilon=0.3, meta_batch_size=3, progress=False)
    assert stats["path"] == "reference"
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b + 0.3 * (1.0 - 0.5 + 2.0) / 3, rtol=RTOL, atol=ATOL)


def test_dropin_tasks_with_fewer_points_than_the_minibatch():
    """The seed's loop on a task of N = 6 points takes randperm(6)[:10]: every point, so the fast
    path's minibatch is min(10, N) (k = 5: 5·6 // 10 = 3 steps), equal to the reference backend
    on the same plans."""
    from reptile_fast import reptile

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)

    def sample_task():
        return x, y, nn.MSELoss()

    plans = sample_indices(1, 3, 6, 6, generator=torch.Generator().manual_seed(4)).view(1, 1, 3, 6)
    model = _mlp(1, 8, 1)
    expected = Reptile(copy.deepcopy(model), backend="reference", inner_lr=0.02, inner_steps=3,
                       inner_batch_size=6, outer_lr=0.1)
    expected.meta_step(TaskBatch(x[None], y[None]), plans[0])
    stats = reptile(model, 1, sample_task, None, k=5, indices=plans, backend="torch", progress=False)
    assert stats["inner_steps"] == 3 and stats["inner_batch_size"] == 6
    for (n, got), want in zip(model.named_parameters(), expected.model.parameters()):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=n)


# ------------------------------------------------------------------------- compiled, eager mode
class _Replay:
    """A fixed pool of tasks handed out in order (paths drawing other chunk sizes see the same)."""

    def __init__(self, tasks):
        self.tasks, self.next = tasks, 0

    def sample(self, n, *, generator=None, device=None):
        out = self.tasks[self.next:self.next + n]
        self.next += n
        return out


def test_compiled_eager_mode_anneals_epsilon_within_a_chunk():
    """Backend "compiled" in mode "eager" (what runs without a C compiler or torch.compile):
    9 meta-steps in chunks of 4 with ε annealed 0.5 → 0, equal to the reference backend on the
    same tasks and plans; each meta-step of a chunk takes its own ε (the first one's for the
    whole chunk passed the native/scan tests)."""
    from reptile_fast import MLP, Sine
    from reptile_fast.loop import PlanSampler

    iterations, T, steps, batch = 9, 2, 3, 5
    gen = torch.Generator().manual_seed(11)
    tasks = Sine().sample(iterations * T, generator=gen)
    plans = sample_indices(iterations * T, steps, 50, batch, generator=gen).view(iterations, T, steps, batch)
    out = {}
    for backend, options in (("compiled", {"mode": "eager", "chunk": 4}), ("reference", None)):
        torch.manual_seed(0)
        trainer = Reptile(MLP(1, 8, 1), backend=backend, backend_options=options, inner_steps=steps,
                          inner_batch_size=batch, outer_lr=0.5, outer_lr_final=0.0)
        trainer.fit(_Replay(tasks), iterations, meta_batch_size=T, progress=False,
                    sampler=PlanSampler(_Replay(tasks), plans))
        if backend == "compiled":
            assert trainer.last_fit_stats["mode"] == "eager"
        out[backend] = trainer.model
    for (n, a), b in zip(out["compiled"].named_parameters(), out["reference"].parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=n)


# ---------------------------------------------------------------------- the Stepper protocol
def test_eager_stepper_run_of_several_meta_steps_equals_single_meta_steps():
    """``Stepper.run(tasks, plans, eps, first_iteration)`` takes ``m = len(eps)`` meta-steps: on
    the eager stepper each with its own ε and number — the same φ as ``m`` ``meta_step`` calls,
    and a non-finite second meta-step reported as meta-step ``first_iteration + 1``."""
    model = _mlp()
    tasks = _tasks(T=4)
    plans = sample_indices(4, 2, 9, 3, generator=torch.Generator().manual_seed(6))
    a = Reptile(copy.deepcopy(model), backend="torch", inner_steps=2, inner_batch_size=3, inner_lr=0.1)
    b = Reptile(copy.deepcopy(model), backend="torch", inner_steps=2, inner_batch_size=3, inner_lr=0.1)
    a.stepper(2).run(tasks, plans, [0.5, 0.25], 1)
    a.check_finite()
    b.meta_step(tasks[:2], plans[:2], outer_lr=0.5)
    b.meta_step(tasks[2:], plans[2:], outer_lr=0.25)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    bad = TaskBatch(tasks.x.clone(), tasks.y.clone())
    bad.y[3, :] = float("nan")
    before = [p.detach().clone() for p in a.model.parameters()]
    a.stepper(2).run(bad, plans, [0.5, 0.25], 7)
    with pytest.raises(NonFiniteError) as info:
        a.check_finite()
    assert info.value.iteration == 8
    b.meta_step(tasks[:2], plans[:2], outer_lr=0.5)  # meta-step 7 applied, meta-step 8 skipped
    for (n, p), q, p0 in zip(a.model.named_parameters(), b.model.parameters(), before):
        assert torch.equal(p, q) and not torch.equal(p, p0), n


# ------------------------------------------------------------------------------- the sine job
def test_sine_job_metrics_and_schedule_are_what_the_flags_say(tmp_path):
    """``reptile-fast sine``: ``--outer-lr-final`` reaches the trainer (it was dropped silently
    under a mutation, the run then trained at a constant ε), and metrics.json's pre-/post-
    adaptation MSE are the saved model's loss on the job's held-out tasks at φ and after
    ``--eval-steps`` steps (swapping them passed every CLI test)."""
    from reptile_fast import MLP, Sine
    from reptile_fast.checkpoint import load_checkpoint
    from reptile_fast.cli import main
    from reptile_fast.jobs import SINE_POINTS, derived_seed

    out = tmp_path / "run"
    assert main(["sine", "--iterations", "6", "--meta-batch-size", "2", "--outer-lr", "0.5", "--outer-lr-final", "0",
                 "--eval-tasks", "3", "--eval-steps", "4", "--backend", "torch", "--seed", "3", "--hidden-dim", "8",
                 "--out", str(out), "--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    config = ckpt["trainer"]["config"]
    assert config["outer_lr"] == 0.5 and config["outer_lr_final"] == 0.0
    metrics = __import__("json").loads((out / "metrics.json").read_text())
    model = MLP(1, 8, 1)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True)["state_dict"])
    trainer = Reptile(model, backend="torch")
    gen = torch.Generator().manual_seed(derived_seed(3, 1_000_003))  # the job's held-out stream
    held_out = Sine(n_points=SINE_POINTS).sample(3, generator=gen)
    post = float(trainer.evaluate(held_out, 4, generator=gen).mean())
    pre = float(trainer.evaluate(held_out, 0).mean())
    assert math.isclose(metrics["post_adaptation_mse"], post, rel_tol=RTOL)
    assert math.isclose(metrics["pre_adaptation_mse"], pre, rel_tol=RTOL)


# --------------------------------------------------------------------------- the omniglot job
def test_omniglot_job_uses_its_eval_batch_size_and_anneals(tmp_path, monkeypatch):
    """``reptile-fast omniglot``: every evaluation (validation and test) adapts on minibatches of
    ``--eval-batch-size`` support images (the whole support set instead passed every test), and
    the trainer anneals ε to ``outer_lr_final`` (0 by default, the paper's; dropped under a
    mutation, the run trained at a constant ε = 1 with every test green)."""
    from _fake_omniglot import make_folder, make_zip
    from reptile_fast import fewshot_job
    from reptile_fast.checkpoint import load_checkpoint
    from reptile_fast.cli import main

    seen = []
    real = fewshot_job.evaluate_episodes

    def spy(trainer, episodes, **kw):
        seen.append(kw["batch_size"])
        return real(trainer, episodes, **kw)

    monkeypatch.setattr(fewshot_job, "evaluate_episodes", spy)
    train = make_zip(make_folder(tmp_path / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1"),
                     tmp_path / "small1.zip")
    test = make_folder(tmp_path / "b", {"Gamma": 3}, prefix="images_background_small2")
    out = tmp_path / "run"
    assert main(["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "1",
                 "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1",
                 "--eval-batch-size", "2", "--eval-tasks", "2", "--validation-tasks", "2", "--validate-every", "2",
                 "--iterations", "2", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    assert len(seen) >= 2 and set(seen) == {2}  # validation at meta-step 2 and the test evaluation
    config = load_checkpoint(out)["trainer"]["config"]
    assert config["outer_lr"] == 1.0 and config["outer_lr_final"] == 0.0


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_evaluate_at_phi_equals_a_float64_oracle_with_two_outputs(backend):
    """``evaluate(tasks, 0)``: each task's MSE over all its points *and* output features at φ, as
    ``F.mse_loss`` averages (a sum over the outputs on the MLP fast path was caught only by one
    derandomized hypothesis example).  7 points, fewer than the default inner_batch_size 10:
    steps=0 draws no minibatch, yet it was refused ("inner_batch_size (10) exceeds the tasks'
    points (7)")."""
    model = _mlp()
    tasks = _tasks(T=3, n=7)
    got = Reptile(copy.deepcopy(model), backend=backend).evaluate(tasks, 0)
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        want = torch.stack([nn.functional.mse_loss(m64(tasks.x[i].double()), tasks.y[i].double())
                            for i in range(3)])
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)


def test_fit_callback_sees_each_meta_steps_own_outer_lr_in_a_chunk():
    """``fit(callback=...)`` on a chunked path (backend "compiled", chunks of 4): the callback gets
    every meta-step's number, loss and its own annealed ε (the chunk's first ε for all of them
    passed every test), and the losses are the history's."""
    from reptile_fast import MLP, Sine

    torch.manual_seed(0)
    trainer = Reptile(MLP(1, 8, 1), backend="compiled", backend_options={"mode": "eager", "chunk": 4},
                      inner_steps=2, inner_batch_size=5, outer_lr=0.5, outer_lr_final=0.1)
    seen = []
    history = trainer.fit(Sine(), 10, generator=torch.Generator().manual_seed(1), progress=False,
                          callback=lambda i, m: seen.append((i, m["iteration"], m["outer_lr"], m["loss"])))
    assert [s[0] for s in seen] == [s[1] for s in seen] == list(range(1, 11))
    assert [s[2] for s in seen] == pytest.approx([0.5 + (0.1 - 0.5) * k / 10 for k in range(10)], rel=1e-12)
    assert [s[3] for s in seen] == history["loss"]
    torch.manual_seed(0)  # without a callback the loop reads once, at the end: the same history, in order
    quiet = Reptile(MLP(1, 8, 1), backend="compiled", backend_options={"mode": "eager", "chunk": 4},
                    inner_steps=2, inner_batch_size=5, outer_lr=0.5, outer_lr_final=0.1)
    assert quiet.fit(Sine(), 10, generator=torch.Generator().manual_seed(1), progress=False)["loss"] == history["loss"]
