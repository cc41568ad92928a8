"""The gate in front of every benchmark timing (bench/providers.py ``check_prepared``): a provider
returning φ, one at half the learning rate, one with the update's sign flipped, one wrong on a
single task, or one that ignores new inputs is refused, in fp32 and in tf32, and is never timed;
correct providers pass.  The float64 oracle it compares with is itself checked against the
reference backend run in float64.  The same for the other timed benchmarks: bench_torch_backend,
bench_triton_kernel, main_job_wall, and the GPU check's timing stage, seed-setting rows, main-job
row and launch-settings sweep."""
from pathlib import Path

import pytest
import torch

import bench.bench_inner_loop as bench_inner_loop
from bench.gate_calibration import EmulatedTF32Provider, round_to_tf32
from bench.providers import (GATE_CAP, Point, Prepared, Provider, check_prepared, check_subset, get_provider,
                             make_problem, oracle_updates, update_error_bound)
from reptile_fast.backends import InnerConfig
from reptile_fast.backends.reference import ReferenceBackend

SMALL = Point(meta_batch=5, width=8, steps=3)
#: 40 tasks: more than check_subset's 16, so some tasks are compared only by the oracle gate
WIDE = Point(meta_batch=40, width=8, steps=2)


@pytest.fixture(scope="module")
def small():
    return make_problem(SMALL, "cpu", rotations=2)


@pytest.fixture(scope="module")
def wide():
    return make_problem(WIDE, "cpu", rotations=2)


class Broken(Provider):
    """The reference backend's answer, broken in one way (``how``), declared ``precision``."""

    def __init__(self, how, precision="fp32", task=0):
        self.name, self.how, self.precision, self.task = f"broken-{how}", how, precision, task

    def prepare(self, problem):
        backend = ReferenceBackend()

        def inner(r, lr):
            return backend.inner_loop(problem.model, problem.tasks[r], problem.plans[r],
                                      InnerConfig(lr=lr, loss="mse")).params

        def run(i):
            r, lr = i % problem.rotations, problem.point.lr
            if self.how == "returns_phi":  # skips the inner loop
                return {n: p.detach().expand(problem.point.meta_batch, *p.shape).clone()
                        for n, p in problem.model.named_parameters()}
            if self.how == "half_lr":
                return inner(r, lr / 2)
            if self.how == "wrong_sign":  # the update's sign flipped: φ − Δ
                good = inner(r, lr)
                return {n: 2 * p.detach() - good[n] for n, p in problem.model.named_parameters()}
            if self.how == "one_task_half_lr":
                good, half = inner(r, lr), inner(r, lr / 2)
                for n in good:
                    good[n][self.task] = half[n][self.task]
                return good
            if self.how == "ignores_new_inputs":  # a replay that always shows input set 0's answer
                return inner(0, lr)
            if self.how == "correct":
                return inner(r, lr)
            raise ValueError(self.how)

        return Prepared(run, lambda out: out)


def check(provider, problem):
    result, _ = check_prepared(provider, provider.prepare(problem), problem)
    return result


# ---------------------------------------------------------------------------- the oracle
def test_oracle_equals_the_reference_backend_in_float64(small):
    """The gate's oracle (torch.func, float64, all tasks at once) is the reference's maths."""
    phi = {n: p.detach().double() for n, p in small.model.named_parameters()}
    for r in range(small.rotations):
        model64 = type(small.model)(1, SMALL.width, 1, depth=SMALL.depth).double()
        model64.load_state_dict({k: v.double() for k, v in small.model.state_dict().items()})
        ref = ReferenceBackend().inner_loop(model64, small.tasks[r].to(dtype=torch.float64), small.plans[r],
                                            small.config).params
        got = oracle_updates(small, r)
        for n in phi:
            torch.testing.assert_close(got[n], ref[n] - phi[n], rtol=1e-12, atol=1e-14, msg=n)
            assert got[n].abs().max() > 1e-4, f"{n}: the update must not be trivial"


# ---------------------------------------------------------------------------- broken providers
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("how", ["returns_phi", "half_lr"])
def test_gate_refuses_phi_and_half_learning_rate(small, how, precision):
    result = check(Broken(how, precision), small)
    assert not result.ok
    assert "update" in result.message and "float64 oracle" in result.message
    assert result.update_margin > 1
    # e = 1 for φ, ≈ 0.5 for half the learning rate: far above either precision's bound
    assert result.update_rel_err == pytest.approx(1.0 if how == "returns_phi" else 0.5, rel=0.2)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_gate_refuses_a_wrong_sign(small, precision):
    """The update's sign flipped (φ − Δ): e = 2 on every task."""
    result = check(Broken("wrong_sign", precision), small)
    assert not result.ok and "float64 oracle" in result.message
    assert result.update_rel_err == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_gate_refuses_a_single_wrong_task_outside_the_reference_subset(wide, precision):
    task = 1
    assert task not in check_subset(WIDE.meta_batch).tolist()
    result = check(Broken("one_task_half_lr", precision, task=task), wide)
    assert not result.ok and "on 1 of 40 tasks of input set 0" in result.message


def test_gate_refuses_a_provider_that_ignores_new_inputs(small):
    """Input set 0 right, input set 1 answered with input set 0's result (a stale replay)."""
    result = check(Broken("ignores_new_inputs"), small)
    assert not result.ok and "input set 1" in result.message


@pytest.mark.parametrize("name", ["seed", "reference", "torch", "torch-vmap"])
def test_gate_passes_correct_providers_on_every_task_and_input_set(wide, name):
    result = check(get_provider(name), wide)
    assert result.ok, result.message
    assert result.tasks_checked == WIDE.meta_batch and result.rotations_checked == 2
    assert 0 <= result.update_margin <= 1


def test_tf32_bound_passes_tf32_rounding_and_the_fp32_bound_does_not(small):
    """A loop with tf32 matrix-product inputs is within the tf32 bound, and far outside the fp32
    one: the bounds are per precision, and the fp32 one is tight enough to see tf32 rounding."""
    # tf32 spacing at 1 is 2^-10: below half rounds down, a tie away from zero, above half up
    x = torch.tensor([1.0 + 2 ** -12, 1.0 + 2 ** -11, 1.0 + 2 ** -10 + 2 ** -11 + 2 ** -13])
    assert round_to_tf32(x).tolist() == [1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -9]
    tf32 = check(EmulatedTF32Provider("tf32"), small)
    assert tf32.ok, tf32.message
    assert 1e-5 < tf32.update_rel_err
    as_fp32 = check(EmulatedTF32Provider("fp32"), small)
    assert not as_fp32.ok and as_fp32.update_margin > 10


def test_bound_follows_the_derivation():
    """b = K·(S·u32·ρ + L·u·A): the storage term linear in steps and ρ (fp32 in both precisions),
    the products' term in the path ratio A and per precision; without A, S stands for it."""
    rho, path = torch.tensor([0.0, 100.0]), torch.tensor([1.0, 3.0])
    pt = Point(meta_batch=2, width=64, steps=5)  # L = 3
    b32, b_tf = update_error_bound(pt, "fp32", rho, path), update_error_bound(pt, "tf32", rho, path)
    torch.testing.assert_close(b32[0], torch.tensor(4.0 * 3 * 2.0 ** -24))
    torch.testing.assert_close(b_tf[0], torch.tensor(4.0 * 3 * 2.0 ** -11))
    torch.testing.assert_close(b_tf[1] - 3 * b_tf[0], b32[1] - 3 * b32[0])  # storage term is fp32 in both
    torch.testing.assert_close(b_tf[1] - 3 * b_tf[0], torch.tensor(4.0 * 5 * 100 * 2.0 ** -24))
    torch.testing.assert_close(update_error_bound(pt, "tf32", rho), update_error_bound(pt, "tf32", rho, torch.full((2,), 5.0)))
    # 32 steps: the products' term does not grow with the steps (the storage term does)
    pt32 = Point(meta_batch=2, width=64, steps=32)
    torch.testing.assert_close(update_error_bound(pt32, "tf32", rho[:1], path[:1]), b_tf[:1])
    with pytest.raises(ValueError, match="precision"):
        update_error_bound(pt, "bf16", rho)


def test_a_bound_too_loose_to_tell_a_tenth_off_the_learning_rate_is_refused():
    """tf32 at 60 steps of lr 0.3 (float64 path ratios 10-13: the steps turn): the derived bound
    passes GATE_CAP, so nothing at that point is trusted in tf32; the fp32 bound still holds."""
    problem = make_problem(Point(meta_batch=2, width=8, steps=60, inner_batch=5, lr=0.3), "cpu")
    result = check(Broken("correct", "tf32"), problem)
    assert not result.ok and "cannot be verified" in result.message
    assert check(Broken("correct", "fp32"), problem).ok


# ---------------------------------------------------------------------------- never timed
class FakeBenchmark:
    enabled, disabled = True, False

    def __init__(self):
        self.extra_info, self.timed = {}, False

    def pedantic(self, *args, **kwargs):
        self.timed = True


@pytest.mark.parametrize("how", ["returns_phi", "half_lr"])
def test_a_refused_provider_is_never_timed(monkeypatch, how):
    broken = Broken(how)
    monkeypatch.setattr(bench_inner_loop, "get_provider", lambda name: broken)
    monkeypatch.setattr(bench_inner_loop, "timed_skip_reason", lambda *a: None)
    problems = {}

    def get(point, rotations=1):
        return problems.setdefault((point, rotations), make_problem(point, "cpu", rotations=rotations))

    benchmark = FakeBenchmark()
    with pytest.raises(pytest.fail.Exception, match="is wrong, so it is not timed"):
        bench_inner_loop.test_inner_loop_speed(benchmark, SMALL, broken.name, torch.device("cpu"), get, None)
    assert not benchmark.timed
    # the same path times a correct provider
    monkeypatch.setattr(bench_inner_loop, "get_provider", lambda name: get_provider("reference"))
    bench_inner_loop.test_inner_loop_speed(benchmark, SMALL, "reference", torch.device("cpu"), get, None)
    assert benchmark.timed and benchmark.extra_info["check"]["ok"]


def test_triton_benchmark_gate_checks_every_timed_set():
    """bench_triton_kernel's gate (every timed input set, sampled tasks' updates vs float64):
    passes a correct backend, refuses one returning φ, one at half the learning rate and one
    that ignores new inputs (answers every set with the first set's result)."""
    pytest.importorskip("triton")
    import copy as _copy

    from bench import bench_triton_kernel as B
    from reptile_fast.backends import InnerConfig as _Config
    from reptile_fast.backends.torch_func import TorchBackend

    model, _, _ = B._problem(8, "cpu")
    sets = [B._problem(8, "cpu", seed=s)[1:] for s in range(1, 4)]
    B._update_gate(TorchBackend(), model, sets, "fp32")

    class Broken:
        def __init__(self, kind):
            self.kind, self.inner, self.first = kind, TorchBackend(), None

        def inner_loop(self, model, tasks, indices, config):
            if self.kind == "phi":
                config = _Config(lr=0.0 + 1e-30)
            elif self.kind == "half_lr":
                config = _Config(lr=config.lr / 2)
            result = self.inner.inner_loop(model, tasks, indices, config)
            if self.kind == "wrong_sign":  # φ − Δ
                phi = dict(model.named_parameters())
                result.params.update({n: 2 * phi[n].detach() - v for n, v in result.params.items()})
            if self.kind == "stale":
                self.first = self.first or _copy.deepcopy(result)
                return self.first
            return result

    for kind in ("phi", "half_lr", "wrong_sign", "stale"):
        with pytest.raises(pytest.fail.Exception, match="not timed"):
            B._update_gate(Broken(kind), model, sets, "fp32")
        with pytest.raises(pytest.fail.Exception, match="not timed"):
            B._update_gate(Broken(kind), model, sets, "tf32")


def test_triton_benchmark_gate_checks_every_task():
    """bench_triton_kernel's gate sees every task of every timed set, not a sample: a backend at
    half the learning rate on one task of 100 (one that a 64-task random sample per set, as the
    gate once drew, would miss in all three sets) is refused, in fp32 and tf32."""
    pytest.importorskip("triton")
    from bench import bench_triton_kernel as B
    from reptile_fast.backends.torch_func import TorchBackend

    T = 100
    model, _, _ = B._problem(T, "cpu")
    sets = [B._problem(T, "cpu", seed=s)[1:] for s in range(1, 4)]
    sampled = set()
    for k in range(len(sets)):
        sampled |= set(torch.randperm(T, generator=torch.Generator().manual_seed(k))[:64].tolist())
    task = min(set(range(T)) - sampled)

    class WrongOnOneTask(TorchBackend):
        def inner_loop(self, model, tasks, indices, config):
            result = super().inner_loop(model, tasks, indices, config)
            half = super().inner_loop(model, tasks[task:task + 1], indices[task:task + 1],
                                      InnerConfig(lr=config.lr / 2))
            for n, v in result.params.items():
                v[task] = half.params[n][0]
            return result

    B._update_gate(TorchBackend(), model, sets, "fp32")
    for precision in ("fp32", "tf32"):
        with pytest.raises(pytest.fail.Exception, match=f"task {task}'s update.*on 1 of {T} tasks; not timed"):
            B._update_gate(WrongOnOneTask(), model, sets, precision)


def test_torch_backend_benchmark_checks_every_task_before_timing(monkeypatch):
    """bench_torch_backend's inner-loop case compares every task with the reference before it
    times anything: a backend right on the first tasks and wrong on a later one (here task 11
    of 16, at half the learning rate) is refused and never timed."""
    from bench import bench_torch_backend as B
    from reptile_fast.backends.torch_func import TorchBackend

    class WrongOnOneTask(TorchBackend):
        def inner_loop(self, model, tasks, indices, config):
            result = super().inner_loop(model, tasks, indices, config)
            half = super().inner_loop(model, tasks[11:12], indices[11:12], InnerConfig(lr=config.lr / 2))
            for n, v in result.params.items():
                v[11] = half.params[n][0]
            return result

    monkeypatch.setattr(B, "TorchBackend", WrongOnOneTask)
    monkeypatch.setattr(B, "_time", lambda benchmark, *a: setattr(benchmark, "timed", True))
    benchmark = FakeBenchmark()
    with pytest.raises(AssertionError):
        B.test_inner_loop_throughput(benchmark, "fast", 16)
    assert not benchmark.timed
    monkeypatch.setattr(B, "TorchBackend", TorchBackend)
    B.test_inner_loop_throughput(benchmark, "fast", 16)
    assert benchmark.timed


def test_main_job_wall_refuses_a_run_whose_answer_is_wrong_or_missing(tmp_path):
    """bench/main_job_wall.py times whole processes; a run is a result only if its answer is a
    trained model's: a job that writes no metrics, or one whose post-adaptation MSE is an untrained
    model's (or NaN), raises instead of being recorded as a timing."""
    import json
    import sys

    from bench import main_job_wall as W

    metrics = tmp_path / "metrics.json"

    def job(mse):
        code = "" if mse is None else f"open({str(metrics)!r}, 'w').write({json.dumps(json.dumps({'post_adaptation_mse': mse}))})"
        metrics.unlink(missing_ok=True)
        return W._timed([sys.executable, "-c", code or "pass"], env=None, metrics=metrics)

    assert job(0.03)["post_adaptation_mse"] == 0.03
    for bad in (None, 0.4, float("nan")):
        with pytest.raises(RuntimeError, match="not a result"):
            job(bad)


def test_main_job_wall_without_jax_times_the_main_job_alone(tmp_path, monkeypatch):
    """The README's `python -m bench.main_job_wall --rounds 3 --no-compiler --out ...` crashed after
    its first two jobs where JAX is not installed (it is not a dependency), writing nothing (QA46)."""
    import json
    import sys

    from bench import main_job_wall as W

    ran = []

    def fake_job(python, src, out, env):
        ran.append(env.get("PATH", ""))
        return {"wall_seconds": 1.0 + len(ran), "mode": "eager" if "no_bin" in env.get("PATH", "") else "native"}

    monkeypatch.setattr(W, "main_job", fake_job)
    monkeypatch.setattr(W, "jax_job", lambda *a: pytest.fail("JAX is not importable here: its job must not run"))
    out = tmp_path / "wall.json"
    no_jax = tmp_path / "python-without-jax"  # an interpreter path that cannot import jax
    no_jax.write_text("#!/bin/sh\nexit 1\n")
    no_jax.chmod(0o755)
    assert W.main(["--rounds", "2", "--no-compiler", "--jax-python", str(no_jax), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and "jax_skipped" in result and "targets" not in result
    assert set(result["summary"]) == {"cold", "warm", "no_compiler"} and len(ran) == 6
    assert set(result["ratios"]) == {"no_compiler_over_warm"}
    # without --no-compiler: no ratio at all, still a complete record and exit 0
    assert W.main(["--rounds", "1", "--jax-python", str(no_jax), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["summary"]) == {"cold", "warm"} and "ratios" not in result


# ---------------------------------------------------------------------------- the GPU check's timing stage
def _gpu_check_problem(T=6):
    pytest.importorskip("triton")
    from bench import gpu_check as G
    from bench.providers import float64_updates

    model, tasks, plan, params, phi = G.problem(T, torch.device("cpu"), seed=3, width=16)
    oracle = float64_updates(model, tasks.x, tasks.y, plan, G.LR)

    def adapted(lr):  # the reference's adapted parameters, flat per task [T, n]
        res = ReferenceBackend().inner_loop(model, tasks, plan, InnerConfig(lr=lr)).params
        return torch.cat([res[n].reshape(T, -1) for n, _ in model.named_parameters()], 1)

    return G, model, tasks, plan, phi, oracle, adapted


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_gpu_check_variant_gate_passes_right_and_refuses_wrong_outputs(precision):
    """bench/gpu_check.py's check before each kernel variant is timed: every task's update (inner
    variants) or the outer update (meta variants) against float64, per precision."""
    G, model, tasks, plan, phi, oracle, adapted = _gpu_check_problem()
    good = adapted(G.LR)
    wrong = {"returns φ": phi.expand_as(good), "half lr": adapted(G.LR / 2), "sign flipped": 2 * phi - good}
    wrong["one task at half lr"] = good.clone()
    wrong["one task at half lr"][4] = adapted(G.LR / 2)[4]
    inner, meta = ("v", "v2", precision, "inner"), ("v-meta", "v2", precision, "meta")
    args = (model, tasks, plan, phi, oracle)
    assert G.check_variant(inner, good, *args) is None
    for what, out in wrong.items():
        assert "differs from float64" in (G.check_variant(inner, out, *args) or ""), what
    step = lambda out: phi + G.EPS * (out - phi).mean(0)  # noqa: E731 - the outer update of outputs
    assert G.check_variant(meta, step(good), *args) is None
    for what in ("returns φ", "half lr", "sign flipped"):
        assert "differs from float64" in (G.check_variant(meta, step(wrong[what]), *args) or ""), what
    assert "non-finite" in G.check_variant(inner, torch.full_like(good, float("nan")), *args)


def test_gpu_check_times_no_wrong_kernel_variant_or_provider(tmp_path, monkeypatch):
    """The timing stage checks each variant's output (and each provider, by the providers' gate)
    before timing it: a variant returning φ is recorded as wrong, with no time."""
    G, *_ = _gpu_check_problem()

    def broken_launcher(variant, T, device, dims, tasks, plan, params, phi):
        fn = lambda: None  # noqa: E731
        fn.result = (lambda: phi.expand(T, -1)) if variant[3] == "inner" else (lambda: phi)
        return fn

    monkeypatch.setattr(G, "launcher", broken_launcher)
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(G, "cli_sine_row", lambda *a, **k: {"provider": "cli-sine-gpu", "T": 1, "status": "skipped"})
    results = {"stages": {}}
    rows = G.stage_timing(lambda *a: None, torch.device("cpu"), True, G.Budget(300), results, tmp_path)["rows"]
    kernel_rows = [r for r in rows if r["provider"] in {v[0] for v in G.SMOKE_VARIANTS}]
    assert kernel_rows and all(r.get("status") == "wrong" and "ms" not in r for r in kernel_rows), kernel_rows
    torch_rows = [r for r in rows if r["provider"] == "torch"]
    assert torch_rows and all("ms" in r for r in torch_rows), torch_rows  # the providers' gate passed it


def test_gpu_sweep_checks_the_default_setting_too(monkeypatch):
    """bench/gpu_sweep.py compared each launch setting with the default setting's φ only: a
    meta-step wrong in every setting alike (here: φ returned unchanged) was timed throughout.
    Every setting, the default included, is now checked against float64 first."""
    pytest.importorskip("triton")
    from bench import gpu_check as G
    from bench import gpu_sweep as S
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    def returns_phi(x, y, plan, phi, dims, acts, *, out=None, **kw):
        out.copy_(phi)

    monkeypatch.setattr(V, "meta_step", returns_phi)
    rows = S.sweep_T(5, torch.device("cpu"), 16, True, G.Budget(120), lambda *a: None)
    assert rows and all(not r.get("ok") and "ms" not in r for r in rows), rows
    assert all("differs from float64" in r["status"] for r in rows), rows


def test_gpu_check_fit_rows_time_nothing_that_failed_its_check(monkeypatch):
    """gpu_check's seed-setting rows (Reptile.fit with the fused stepper) recorded their check and
    timed anyway; a stepper that disagrees with backend torch (here: backend "triton" swapped for
    torch at half the inner learning rate) is now recorded as wrong and not timed."""
    pytest.importorskip("triton")
    import reptile_fast
    from bench import gpu_check as G

    real = reptile_fast.Reptile

    def reptile(model, *, backend="auto", backend_options=None, **kw):
        if backend == "triton":
            return real(model, backend="torch", inner_lr=0.01, **kw)
        return real(model, backend=backend, backend_options=backend_options, **kw)

    monkeypatch.setattr(reptile_fast, "Reptile", reptile)
    rows = G.fit_rows(lambda *a: None, torch.device("cpu"), True, G.Budget(120))
    check = next(r for r in rows if r["provider"] == "fit-v2-graphs-check")
    assert check["ok"] is False and check["phi_rel_vs_torch_movement"] > 0.1, check
    timed = [r for r in rows if r["provider"] in ("fit-v2-graphs", "fit-v2-launches")]
    assert len(timed) == 2 and all(r["status"] == "wrong" and "ms" not in r for r in timed), timed


def test_gpu_check_main_job_row_is_a_time_only_for_a_trained_model(tmp_path, monkeypatch):
    """gpu_check's main-job row (reptile-fast sine on the GPU) recorded its wall time whatever the
    job's answer; one whose post-adaptation MSE is an untrained model's is now marked wrong and
    its times kept apart (``*_not_a_result``)."""
    pytest.importorskip("triton")
    import json
    import subprocess as sp

    from bench import gpu_check as G

    def fake_run(cmd, timeout, **kw):
        run = Path(cmd[cmd.index("--out") + 1])
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(json.dumps({"post_adaptation_mse": fake_run.mse, "train_seconds": 0.5}))
        return sp.CompletedProcess(cmd, 0, "", "")

    # the job runs through gpu_check's registered child runner (killed at the hard deadline)
    monkeypatch.setattr(G, "_run", fake_run)
    fake_run.mse = 0.4
    row = G.cli_sine_row(lambda *a: None, tmp_path, timeout=10.0)
    assert row["status"].startswith("wrong") and "wall_seconds" not in row and "train_seconds" not in row, row
    fake_run.mse = 0.03
    row = G.cli_sine_row(lambda *a: None, tmp_path, timeout=10.0)
    assert "status" not in row and row["train_seconds"] == 0.5 and "wall_seconds" in row, row


def test_checkpoint_overhead_times_nothing_that_trained_otherwise_or_loads_wrong(tmp_path):
    """bench/checkpoint_overhead.py timed fits and loads without looking at what they gave: a
    checkpointed fit ending elsewhere than the plain one, or a load that lost the history, passed."""
    from bench.checkpoint_overhead import check_round_trip, check_same_training
    from reptile_fast import MLP, Reptile
    from reptile_fast.checkpoint import load_checkpoint, save_checkpoint

    a = [torch.ones(2), torch.zeros(3)]
    check_same_training(a, [t.clone() for t in a])
    with pytest.raises(SystemExit, match="other parameters"):
        check_same_training(a, [a[0] + 1e-7, a[1]])
    trainer = Reptile(MLP(1, 8, 1), backend="reference")
    save_checkpoint(tmp_path / "c", trainer, history={"loss": [0.1] * 5})
    loaded = load_checkpoint(tmp_path / "c")
    check_round_trip(trainer, loaded, 5)
    with pytest.raises(SystemExit, match="differs from what was saved"):
        check_round_trip(trainer, loaded, 6)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    with pytest.raises(SystemExit, match="differs from what was saved"):
        check_round_trip(trainer, loaded, 5)


def test_gpu_check_fit_rows_for_tf32x3_are_checked_and_named_by_precision():
    """gpu_check timed the seed's fit in ieee only; its tf32x3 rows (``FIT_PRECISIONS``) carry the
    precision in their names and fields, and are checked against backend torch before timing."""
    pytest.importorskip("triton")
    from bench import gpu_check as G

    assert "tf32x3" in G.FIT_PRECISIONS
    rows = G.fit_rows_for(lambda *a: None, torch.device("cpu"), True, G.Budget(120), "tf32x3")
    assert [r["provider"] for r in rows] == ["fit-v2-graphs-check-tf32x3", "fit-v2-graphs-tf32x3"], rows
    check, timed = rows
    assert check["precision"] == timed["precision"] == "tf32x3"
    assert check["ok"] is True and check["phi_err_vs_float64"] <= check["allowed_err"], check
    assert timed["finite"] is True and timed["ms"] > 0, timed


def test_gpu_check_fit_check_refuses_an_outer_step_half_a_percent_short(monkeypatch):
    """The fit check's bound comes from a float64 run: GATE_K times backend torch's fp32 error.  A
    flat 1 % of φ's movement against backend torch timed a stepper whose ε was 0.5 % short (QA46)."""
    pytest.importorskip("triton")
    from bench import gpu_check as G
    from reptile_fast.backends import triton as tb

    host_values = tb.TritonFusedStepper._host_values
    monkeypatch.setattr(tb.TritonFusedStepper, "_host_values",
                        lambda self, eps, first: host_values(self, [0.995 * float(e) for e in eps], first))
    rows = G.fit_rows_for(lambda *a: None, torch.device("cpu"), True, G.Budget(120), "ieee")
    check = rows[0]
    assert check["ok"] is False and check["phi_err_vs_float64"] > check["allowed_err"] > 0, check
    assert check["phi_rel_vs_torch_movement"] < 1e-2  # what the old flat bound let through
    assert all(r["status"] == "wrong" and "float64" in r["reason"] for r in rows[1:]), rows[1:]


def test_summary_compares_each_kernel_change_with_the_kernel_without_it_in_the_same_run():
    """gpu_check's summary: the feature-major default against ``V2Config(transpose=False)`` (v2-bm),
    that against 3-D 1-wide layers too (v2-3d), and the default against v2-3d, as tasks/s ratios per
    T, from rows of the same run only (a T missing either side is left out; a wrong row has no rate)."""
    from bench import gpu_check as G

    rows = [{"provider": "v2-meta", "T": 1, "tasks_per_s": 30.0}, {"provider": "v2-bm-meta", "T": 1, "tasks_per_s": 24.0},
            {"provider": "v2-3d-meta", "T": 1, "tasks_per_s": 20.0},
            {"provider": "v2-meta", "T": 4096, "tasks_per_s": 9.0}, {"provider": "v2-3d-meta", "T": 4096, "status": "wrong"},
            {"provider": "v2-bm-meta", "T": 4096, "tasks_per_s": 6.0},
            {"provider": "v2", "T": 4096, "tasks_per_s": 5.0}, {"provider": "v2-3d", "T": 4096, "tasks_per_s": 4.0}]
    lines = [l for l in G.summary_lines({"stages": {"timing": {"rows": rows}}, "seconds": {}}) if "against not" in l]
    assert lines == [
        "  wide x wide products feature-major (v2-meta) against not (v2-bm-meta), tasks/s ratio: T=1 1.25x, T=4096 1.50x",
        "  1-wide layers in 2-D (v2-bm-meta) against not (v2-3d-meta), tasks/s ratio: T=1 1.20x",
        "  both (v2) against not (v2-3d), tasks/s ratio: T=4096 1.25x",
        "  both (v2-meta) against not (v2-3d-meta), tasks/s ratio: T=1 1.50x"]


def test_dropin_experiment_checks_the_dropin_and_each_program_before_timing(monkeypatch):
    """bench.dropin_experiment timed a drop-in and meta-step programs that returned φ unchanged
    (QA46): now the drop-in must match the seed's loop on the seed's draws, and each program's φ
    must be within GATE_K times backend reference's fp32 error of a float64 run."""
    from bench import dropin_experiment as D
    from reptile_fast import compiled_step, reference
    from reptile_fast.mlp_spec import extract_mlp_spec
    from reptile_fast.steppers import gather_chunk
    from reptile_fast.tasks import Sine, sample_indices

    D.check_dropin(reference, reference.sample_task, iterations=5)
    torch.manual_seed(0)
    model = reference.MLP()
    spec = extract_mlp_spec(model)
    live = [model.get_parameter(n).detach() for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
    g = torch.Generator().manual_seed(0)
    tasks = Sine().sample(8, generator=g)
    plans = sample_indices(8, 5, 50, 10, generator=g)
    xs, ys = gather_chunk(tasks, plans, 1)
    eps = torch.full((8,), 0.1)
    phi32, phi64 = (D._reference_phi(model, tasks, plans, d) for d in (torch.float32, torch.float64))
    program = compiled_step.MetaStepProgram(spec, lr=0.02, loss="mse", steps=5, n_tasks=1, batch=10,
                                            dtype=torch.float32, mode="eager").prepare()
    D.check_program("eager", program(live, xs, ys, eps)[0], phi32, phi64)
    with pytest.raises(SystemExit, match="is wrong"):
        D.check_program("unchanged", live, phi32, phi64)
    short = program(live, xs, ys, 0.995 * eps)[0]  # ε half a percent short
    with pytest.raises(SystemExit, match="is wrong"):
        D.check_program("short", short, phi32, phi64)
    monkeypatch.setattr(compiled_step.MetaStepProgram, "__call__",
                        lambda self, params, xs, ys, eps: ([p.detach() for p in params], torch.zeros(len(eps), 1, 5)))
    with pytest.raises(SystemExit, match="not timed"):
        D.check_dropin(reference, reference.sample_task, iterations=5)


def test_native_meta_batch_check_refuses_one_task_at_ninety_percent(monkeypatch):
    """bench.native_meta_batch compared φ after meta-steps at ε = 0.1, a mean over the tasks: one
    task at 90 % of its update among 1024 passed rtol 1e-5 (QA46).  Its check now also takes one
    meta-step at ε = T, where φ moves by the sum of the updates."""
    from bench import native_meta_batch as N
    from reptile_fast.backends.torch_func import TorchBackend

    ok = N.check(64)
    assert ok["torch"]["ok"] and ok["compiled"]["ok"], ok
    inner_loop = TorchBackend.inner_loop

    def last_task_short(self, model, tasks, plan, config, *args, **kwargs):
        res = inner_loop(self, model, tasks, plan, config, *args, **kwargs)
        for name, p in model.named_parameters():
            v = res.params[name]
            v[-1].copy_(p.detach() + 0.9 * (v[-1] - p.detach()))
        return res

    monkeypatch.setattr(TorchBackend, "inner_loop", last_task_short)
    bad = N.check(64)["torch"]
    assert not bad["ok"] and bad["sum_update_err_vs_float64"] > 10 * bad["sum_update_allowed"], bad
    assert bad["max_abs_err"] < 1e-4  # what the mean at ε = 0.1 saw
