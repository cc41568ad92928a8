"""The one-command GPU check: correctness tests, then the benchmark sweep and the GPU targets.

    PYTHONPATH=. python3 -m bench.gpu_check OUT_DIR            # on a GPU machine (< 5 min)
    PYTHONPATH=. python3 -m bench.gpu_check --cpu-smoke OUT_DIR  # here: tiny sizes, Triton interpreter

(``bench/gpu_check.sh`` wraps it.)  Needs only what the GPU image has: torch, Triton, JAX,
matplotlib; pytest is used for the correctness tests when present.  Stages, each guarded so one
failure does not stop the rest, all against one time budget (``--budget`` seconds):

1. stamp: GPU, driver, versions, date, command;
2. correctness: ``pytest -x`` over the tests with CUDA cases (TF32 off), log in pytest.log;
3. the fp32 matmul peak (TF32 off), measured here;
4. the key size first — sine MLP 1-64-64-1, 5 steps of 10 points, meta-batch 4096 — for every
   provider (seed, torch-vmap, torch, triton, triton-graphs, triton-tf32, jax), each checked
   against the reference (and triton against backend torch on every task) before it is timed;
5. meta-batch 1: time per meta-step of the seed's loop on the GPU against ``Reptile.meta_step``
   with backends triton (plain and CUDA-graphed) and torch, and the drop-in
   ``reptile_fast.reptile``; the trainers' φ after a few steps is compared with the seed loop's;
6. time to train (backend triton) to post-adaptation MSE <= 0.035 on held-out sine tasks;
7. the rest of the sweep (meta-batch 1 … 16384, widths 32 … 256, 5 and 32 steps) until the
   budget runs out (on a GPU it leaves 110 s for the next two stages);
8. backend triton's launch variants at meta-batch 1, 4096, 16384 (bench/bench_triton_kernel.py's
   sweep under pytest-benchmark: JSON in triton_kernel.json, output in the log; its timed cases skip on
   the CPU);
9. on a GPU, torch-compile at the key size (compiling takes 30-60 s) if 75 s are left.

Writes into OUT_DIR (flat, at most 8 files): gpu_check.log (everything printed), pytest.log,
results.json (records + stamp + targets; ``python -m bench.report`` reads it), results.md,
results_tasks_per_s.png, results_speedup.png, summary.txt (the table printed last) and
triton_kernel.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

#: Test files with CUDA cases (the ones that exist are run).
#: backend triton's launch-variant sweep (pytest-benchmark), run on a GPU when time is left.
VARIANTS_FILE = "bench/bench_triton_kernel.py"
TEST_FILES = ("tests/test_kernel_mlp_inner_loop.py", "tests/test_backend_triton.py",
              "tests/test_backend_torch.py")
#: Post-adaptation MSE of the seed's quality band (issue 7: the seed gives 0.013–0.028).
QUALITY_MSE = 0.035
KEY = dict(meta_batch=4096, width=64, steps=5)


class Tee:
    """Print to stdout and to the log file."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, *args):
        msg = " ".join(str(a) for a in args)
        print(msg, flush=True)
        self.f.write(msg + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description="One-command GPU check.")
    ap.add_argument("out", help="output directory (e.g. the device tool's $OUT)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run end to end on the CPU at tiny sizes under TRITON_INTERPRET=1 (no GPU needed)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default 290 on a GPU, 900 for --cpu-smoke)")
    ap.add_argument("--tests-timeout", type=float, default=None,
                    help="seconds for the pytest stage (default 110 on a GPU, 420 for --cpu-smoke)")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest stage")
    ap.add_argument("--skip-variants", action="store_true",
                    help="skip backend triton's launch-variant sweep (bench/bench_triton_kernel.py)")
    ap.add_argument("--ttq", default="16:1.0,64:1.0,256:1.0",
                    help="time-to-quality runs as meta_batch:outer_lr,... (backend triton)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------ stages
def stage_stamp(log, args, device):
    import torch

    from bench.env import machine_stamp

    stamp = machine_stamp()
    stamp["command"] = "bench/gpu_check.sh " + " ".join(sys.argv[1:])
    stamp["device"] = str(device)
    stamp["mode"] = "cpu-smoke (tiny sizes, Triton interpreter: timings meaningless)" if args.cpu_smoke else "gpu"
    try:
        from bench import jax_peer

        stamp["jax"] = jax_peer.load_jax().__version__
    except Exception as exc:  # noqa: BLE001 - JAX is an optional peer
        stamp["jax"] = f"not importable ({type(exc).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        stamp["gpu_sms"] = p.multi_processor_count
        stamp["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                  "power.draw,temperature.gpu", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            stamp["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:  # noqa: BLE001
            stamp["nvidia_smi"] = f"unavailable: {exc}"
    if hasattr(os, "getloadavg"):
        stamp["loadavg_1min"] = round(os.getloadavg()[0], 2)
    stamp["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    for k, v in stamp.items():
        log(f"  {k}: {v}")
    return stamp


def stage_tests(log, args, out: Path, root: Path):
    files = [f for f in TEST_FILES if (root / f).exists()]
    if not files:
        return {"status": "skipped", "reason": "no test files with CUDA cases found"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "pytest is not installed: the sweep's per-provider "
                "checks against the reference are the correctness check"}
    timeout = args.tests_timeout or (420 if args.cpu_smoke else 110)
    # addopts cleared: pytest-benchmark's --benchmark-disable would fail where it is missing.
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-W", "ignore::DeprecationWarning", "--durations=15", *files]
    log("  $ " + " ".join(cmd[1:]))
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\n[gpu_check] pytest killed after {timeout:.0f} s\n"
        rc = "timeout"
    (out / "pytest.log").write_text(" ".join(cmd) + "\n\n" + text)
    last = [l for l in text.strip().splitlines() if l.strip()][-1:] or [""]
    res = {"status": "passed" if rc == 0 else "failed", "returncode": rc, "files": files,
           "summary": last[0], "seconds": round(time.monotonic() - t0, 1)}
    log(f"  pytest: {res['status']} ({res['summary']}) in {res['seconds']} s")
    return res


def stage_variants(log, out: Path, root: Path, budget):
    """Backend triton's own launch variants (bench/bench_triton_kernel.py's GPU sweep) under
    pytest-benchmark, JSON into OUT/triton_kernel.json, output into the log."""
    try:
        import pytest  # noqa: F401
        import pytest_benchmark  # noqa: F401
    except ImportError as exc:
        return {"status": "skipped", "reason": f"needs pytest-benchmark: {exc}"}
    timeout = budget.left() - 35
    if timeout < 45:
        return {"status": "skipped", "reason": f"time budget spent ({budget.elapsed():.0f} s)"}
    env = dict(os.environ, REPTILE_BENCH="full",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore"]
    # meta-batch 1, 4096 and 16384 only (the targets' sizes; all 30 cases would not fit the time)
    listed = subprocess.run(base + ["--collect-only", VARIANTS_FILE, "-k", "test_triton_kernel_speed"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=60).stdout
    ids = [l.strip() for l in listed.splitlines() if re.search(r"-(1|4096|16384)\]$", l.strip())]
    if not ids:
        return {"status": "skipped", "reason": "no test_triton_kernel_speed cases at meta-batch 1/4096/16384 collected"}
    cmd = base + [*ids, "--benchmark-enable", f"--benchmark-json={out / 'triton_kernel.json'}",
                  "--benchmark-columns=median,rounds"]
    log("  $ REPTILE_BENCH=full " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text, rc = text + f"\n[gpu_check] killed after {timeout:.0f} s\n", "timeout"
    log(text[-6000:])
    last = [l for l in text.strip().splitlines() if l.strip()][-1:] or [""]
    res = {"status": "passed" if rc == 0 else "failed", "returncode": rc, "summary": last[0]}
    try:  # tasks/s per variant and meta-batch, for the summary
        data = json.loads((out / "triton_kernel.json").read_text())
        table = {}
        for b in data.get("benchmarks", []):
            ei = b.get("extra_info", {})
            if "meta_batch" in ei and "provider" in ei:
                table.setdefault(str(ei["meta_batch"]), {})[ei["provider"]] = ei["meta_batch"] / b["stats"]["median"]
        res["tasks_per_s"] = table
    except Exception as exc:  # noqa: BLE001 - the JSON is missing when pytest failed early
        res["tasks_per_s_error"] = f"{type(exc).__name__}: {exc}"
    return res


def stage_peak(log, device, smoke):
    from bench.flops import measure_matmul_peak

    peak = measure_matmul_peak(device, n=256 if smoke else None, min_time=0.05 if smoke else 0.5)
    log(f"  fp32 matmul (TF32 off) n={peak['n']}: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s")
    return peak


def run_point(log, point, device, providers, peak, budget, *, smoke, reserve):
    """Check then time every provider at ``point``; returns records (one per provider)."""
    import torch

    from bench.flops import inner_loop_flops, time_calls
    from bench.providers import ProviderSkip, check_prepared, get_provider, make_problem, timed_skip_reason

    records = []
    gen_dev = device if device.type == "cuda" else None
    problem = make_problem(point, device, rotations=1 if smoke else 4, gen_device=gen_dev)
    flops = inner_loop_flops(point.dims, point.inner_batch, point.steps, point.meta_batch)
    torch_params = None
    for name in providers:
        base = dict(provider=name, point=point.id, meta_batch=point.meta_batch, width=point.width,
                    depth=point.depth, steps=point.steps, inner_batch=point.inner_batch, flops=flops,
                    device=str(device))
        provider = get_provider(name)
        reason = provider.unavailable(device) or provider.skip_reason(point, device)
        if not reason and not smoke:
            reason = timed_skip_reason(name, point, device, "full")
        if not reason and budget.left() < reserve:
            reason = f"time budget spent ({budget.elapsed():.0f} s)"
        if reason:
            records.append({**base, "status": "skipped", "reason": reason})
            continue
        t0 = time.monotonic()
        try:
            prepared = provider.prepare(problem)
            compare = torch_params if (provider.exact and name.startswith(("triton", "torch-compile"))) else None
            check, params = check_prepared(provider, prepared, problem, compare_to=compare)
            if name == "torch" and check.ok:
                torch_params = params
            if not check.ok:
                records.append({**base, "status": "failed", "reason": check.message, "check": check.as_dict()})
                log(f"  {name:>13} {point.id}: WRONG, not timed: {check.message}")
                continue
            t = time_calls(prepared.run, device, sync=prepared.sync,
                           min_time=0.01 if smoke else 0.15, repeats=2 if smoke else 5, warmup=1,
                           max_time=1.0 if smoke else 3.0)
            rec = {**base, "status": "ok", "seconds": t["median"], "seconds_min": t["min"],
                   "seconds_max": t["max"], "calls_per_repeat": t["calls_per_repeat"],
                   "peak_flops_per_s": peak["flops_per_s"] if peak else None, "check": check.as_dict(),
                   "timer": "host clock + block_until_ready" if prepared.sync else
                   ("CUDA events" if device.type == "cuda" else "host clock")}
            records.append(rec)
            log(f"  {name:>13} {point.id}: {1e3 * t['median']:9.3f} ms/call  {point.meta_batch / t['median']:12,.0f} "
                f"tasks/s  max|Δref| {check.max_abs_err:.2g}  rel err f64 {check.rel_err_f64:.2g}  "
                f"({time.monotonic() - t0:.1f} s)")
        except ProviderSkip as exc:
            records.append({**base, "status": "skipped", "reason": str(exc)})
        except Exception as exc:  # noqa: BLE001 - record and go on with the next provider
            records.append({**base, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"})
            log(f"  {name:>13} {point.id}: ERROR {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def _seed_meta_step(model, x, y, plan, lr, eps):
    """One iteration of the seed's loop on the model's device: deep copy, ``torch.optim.SGD``,
    ``nn.MSELoss``, one backward per step over the plan's rows, then φ += ε (φ̃ − φ)."""
    import copy

    import torch
    import torch.nn as nn

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    loss_fct = nn.MSELoss()
    for s in range(plan.shape[0]):
        ind = plan[s]
        loss = loss_fct(m(x[ind]), y[ind])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for p, g in zip(model.parameters(), m.parameters()):
            p += eps * (g - p)


def stage_meta_batch_1(log, device, smoke):
    """Seconds per meta-step at meta-batch 1 (the seed's setting), same tasks and plans."""
    import copy

    import torch

    from bench.flops import time_calls
    from bench.providers import Point, make_problem
    from reptile_fast import Reptile

    n = 8 if smoke else 64
    point = Point(meta_batch=1, width=64, steps=5)
    # n single-task problems in rotation: tasks [n] of 1 task each
    big = make_problem(Point(meta_batch=n, width=64, steps=5), device,
                       gen_device=device if device.type == "cuda" else None)
    tasks, plan = big.tasks[0], big.plans[0]
    singles = [(tasks[i], plan[i:i + 1]) for i in range(n)]
    model0 = big.model
    res = {"point": point.id, "tasks_rotated": n}

    seed_model = copy.deepcopy(model0)

    def seed_step(i):
        tb, pl = singles[i % n]
        _seed_meta_step(seed_model, tb.x[0], tb.y[0], pl[0], 0.02, 0.1)

    kw = dict(min_time=0.01 if smoke else 0.5, repeats=2 if smoke else 5, warmup=1 if smoke else 3)
    t = time_calls(seed_step, device, **kw)
    res["seed_loop_ms"] = 1e3 * t["median"]
    log(f"  seed loop (deepcopy + SGD + MSELoss per task): {res['seed_loop_ms']:.3f} ms / meta-step")

    variants = [("triton", "triton", {}), ("triton-graphs", "triton", {"REPTILE_FAST_TRITON_CUDA_GRAPHS": "1"}),
                ("torch", "torch", {})]
    for label, backend, env in variants:
        if label == "triton-graphs" and device.type != "cuda":
            continue
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            trainer = Reptile(copy.deepcopy(model0), inner_lr=0.02, inner_steps=5, inner_batch_size=10,
                              outer_lr=0.1, backend=backend)

            def step(i, trainer=trainer):
                tb, pl = singles[i % n]
                trainer.meta_step(tb, pl)

            t = time_calls(step, device, **kw)
            res[f"{label}_ms"] = 1e3 * t["median"]
            res[f"seed_over_{label}"] = res["seed_loop_ms"] / res[f"{label}_ms"]
            log(f"  Reptile(backend={backend}{', CUDA graphs' if env else ''}).meta_step: "
                f"{res[f'{label}_ms']:.3f} ms / meta-step  ({res[f'seed_over_{label}']:.1f}x the seed loop)")
            # Same results: k meta-steps from the same φ on the same tasks and plans.
            k = 3
            ref_model, fast = copy.deepcopy(model0), Reptile(copy.deepcopy(model0), inner_lr=0.02, inner_steps=5,
                                                             inner_batch_size=10, outer_lr=0.1, backend=backend)
            for i in range(k):
                tb, pl = singles[i]
                _seed_meta_step(ref_model, tb.x[0], tb.y[0], pl[0], 0.02, 0.1)
                fast.meta_step(tb, pl)
            diff = max(float((a - b).detach().abs().max())
                       for a, b in zip(ref_model.parameters(), fast.model.parameters()))
            ok = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                     for a, b in zip(fast.model.parameters(), ref_model.parameters()))
            res[f"{label}_phi_max_abs_diff_after_{k}"] = diff
            res[f"{label}_phi_matches_seed"] = ok
            log(f"    φ after {k} meta-steps vs the seed loop: max |Δ| {diff:.2g} ({'ok' if ok else 'MISMATCH'})")
        except Exception as exc:  # noqa: BLE001
            res[f"{label}_error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {label}: ERROR {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        finally:
            for k_, v in old.items():
                if v is None:
                    os.environ.pop(k_, None)
                else:
                    os.environ[k_] = v
    # The drop-in: the seed's own call, reptile(model, N, sample_task, perform_k_training_steps).
    try:
        import warnings

        from reptile_fast import reference
        from reptile_fast.dropin import reptile as dropin_reptile

        model = copy.deepcopy(model0)
        iters = 20 if smoke else 300
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dropin_reptile(model, 5 if smoke else 50, reference.sample_task, reference.perform_k_training_steps,
                           progress=False)  # warm-up: compilation, first launches
            stats = dropin_reptile(model, iters, reference.sample_task, reference.perform_k_training_steps,
                                   progress=False)
        res["dropin_ms"] = stats.get("ms_per_iteration")
        res["dropin_path"] = f"{stats.get('path')}/{stats.get('backend')}"
        if res["dropin_ms"]:
            res["seed_over_dropin"] = res["seed_loop_ms"] / res["dropin_ms"]
        log(f"  drop-in reptile_fast.reptile ({res['dropin_path']}): {res['dropin_ms']:.3f} ms / iteration "
            f"(includes the seed's sample_task on the CPU)")
    except Exception as exc:  # noqa: BLE001
        res["dropin_error"] = f"{type(exc).__name__}: {exc}"
        log(f"  drop-in: ERROR {type(exc).__name__}: {exc}")
    return res


def stage_time_to_quality(log, device, smoke, configs, budget):
    """Meta-train the sine MLP with backend triton until the post-adaptation MSE (200 held-out
    tasks, each adapted 160 SGD steps as the seed's demo does) is <= QUALITY_MSE; the time
    counted is the meta-steps' (synchronized), not the evaluations'."""
    import torch

    from reptile_fast import MLP, Reptile, Sine
    from reptile_fast.backends.triton import TritonBackend  # noqa: F401 - fail early if missing

    gen_dev = device if device.type == "cuda" else torch.device("cpu")
    eval_tasks = Sine().sample(8 if smoke else 200, generator=torch.Generator(gen_dev).manual_seed(10_000),
                               device=device)
    results = []
    for spec in configs:
        mb, lr = spec.split(":")
        mb, lr = int(mb), float(lr)
        every = 2 if smoke else 100
        max_steps = 4 if smoke else 6000
        cap = 20 if smoke else 15.0
        torch.manual_seed(0)
        trainer = Reptile(MLP().to(device), inner_lr=0.02, inner_steps=5, inner_batch_size=10, outer_lr=lr,
                          backend="triton")
        g = torch.Generator(gen_dev).manual_seed(1)
        ge = torch.Generator(gen_dev).manual_seed(2)
        sine = Sine()
        train_s, steps, curve, reached = 0.0, 0, [], None
        while steps < max_steps and train_s < cap and budget.left() > 60:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(every):
                trainer.meta_step(sine.sample(mb, generator=g, device=device), generator=g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_s += time.perf_counter() - t0
            steps += every
            mse = float(trainer.evaluate(eval_tasks, steps=160, generator=ge).mean())
            curve.append((steps, round(train_s, 4), mse))
            if mse <= QUALITY_MSE:
                reached = {"meta_steps": steps, "train_seconds": train_s, "mse": mse}
                break
        r = {"meta_batch": mb, "outer_lr": lr, "eval_every": every, "reached": reached,
             "final": curve[-1] if curve else None, "curve": curve[-20:]}
        results.append(r)
        if reached:
            log(f"  meta-batch {mb}, outer lr {lr}: MSE {reached['mse']:.4f} <= {QUALITY_MSE} after "
                f"{steps} meta-steps, {train_s:.3f} s of training")
        else:
            log(f"  meta-batch {mb}, outer lr {lr}: not reached; last (steps, s, MSE) = {r['final']}")
    return results


# ------------------------------------------------------------------------------------ summary
def summary_lines(records, extras, stamp):
    from bench.report import derive

    d = [r for r in derive(records) if "tasks_per_s" in r]

    def get(p, T=4096, H=64, S=5):
        return next((r for r in d if r["provider"] == p and r["meta_batch"] == T and r["width"] == H
                     and r["steps"] == S), None)

    lines = [f"GPU check summary — {stamp.get('gpu') or stamp.get('cpu')} — torch {stamp.get('torch')}, "
             f"triton {stamp.get('triton')}, jax {stamp.get('jax')} — {stamp.get('date')}",
             f"mode: {stamp.get('mode')}"]
    t = extras.get("tests", {})
    lines.append(f"tests: {t.get('status')} {t.get('summary', t.get('reason', ''))}")
    pk = extras.get("fp32_peak") or {}
    if pk:
        lines.append(f"fp32 matmul peak (TF32 off, n={pk.get('n')}): {pk.get('flops_per_s', 0) / 1e9:,.1f} GFLOP/s")
    key = extras.get("key") or KEY
    T, H, S = key["meta_batch"], key["width"], key["steps"]
    lines.append(f"meta-batch {T}, MLP 1-{H}-{H}-1, {S} steps of 10 points:")
    lines.append(f"  {'provider':>13} {'tasks/s':>12} {'% peak':>7} {'x torch':>8} {'x jax':>7}")
    jax_r = get("jax", T, H, S)
    for p in ("seed", "torch-vmap", "torch", "torch-compile", "triton", "triton-graphs", "triton-tf32", "jax"):
        r = get(p, T, H, S)
        if r is None:
            continue
        xj = r["tasks_per_s"] / jax_r["tasks_per_s"] if jax_r else None
        lines.append(f"  {p:>13} {r['tasks_per_s']:12,.0f} {r['pct_peak'] or 0:7.2f} "
                     f"{(r.get('x_torch') or 0):8.2f} {(xj or 0):7.2f}")
    lines.append("  targets: triton >= 10x torch, >= 3x jax, >= 30% of peak")
    mb1 = extras.get("meta_batch_1") or {}
    if mb1:
        parts = [f"seed loop {mb1.get('seed_loop_ms', float('nan')):.3f} ms"]
        for k in ("triton", "triton-graphs", "torch", "dropin"):
            if f"{k}_ms" in mb1 and mb1[f"{k}_ms"]:
                parts.append(f"{k} {mb1[f'{k}_ms']:.3f} ms ({mb1.get(f'seed_over_{k}', 0):.1f}x)")
        lines.append("meta-batch 1, per meta-step: " + ", ".join(parts) + "  [target >= 50x]")
    for r in extras.get("time_to_quality") or []:
        reached = r.get("reached")
        lines.append(f"time to MSE <= {QUALITY_MSE} (triton, meta-batch {r['meta_batch']}, outer lr {r['outer_lr']}): "
                     + (f"{reached['train_seconds']:.3f} s, {reached['meta_steps']} meta-steps, MSE {reached['mse']:.4f}"
                        if reached else f"not reached (last steps, s, MSE: {r.get('final')})") + "  [target < 0.3 s]")
    kv = extras.get("kernel_variants") or {}
    if kv:
        lines.append(f"kernel variants (bench_triton_kernel.py): {kv.get('status')} {kv.get('summary', kv.get('reason', ''))}")
        for T, row in sorted((kv.get("tasks_per_s") or {}).items(), key=lambda kv_: int(kv_[0])):
            lines.append(f"  T={T}: " + ", ".join(f"{v} {x:,.0f}" for v, x in row.items()) + " tasks/s")
    tf = [r for r in d if r["provider"] == "triton-tf32"]
    if tf:
        worst = max(tf, key=lambda r: r["check"]["rel_err_f64"])
        lines.append(f"triton tf32: rel err vs float64 up to {worst['check']['rel_err_f64']:.2e} "
                     f"(ieee fp32 reference: {worst['check']['ref_rel_err_f64']:.2e}) at {worst['point']}")
    bad = [r for r in records if r.get("status") == "failed"]
    lines.append(f"timed: {len(d)}, failed: {len(bad)}, skipped: "
                 f"{sum(1 for r in records if r.get('status') == 'skipped')}")
    for r in bad[:8]:
        lines.append(f"  FAILED {r['provider']} {r['point']}: {str(r.get('reason'))[:160]}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        # Before anything imports Triton: the kernels run in the interpreter.
        os.environ["TRITON_INTERPRET"] = "1"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    log = Tee(out / "gpu_check.log")
    budget = Budget(args.budget or (900 if args.cpu_smoke else 290))

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a smoke test on a possibly shared CPU: no OpenMP waits
    elif not torch.cuda.is_available():
        log("no CUDA device: run with --cpu-smoke for the CPU smoke test")
        return 2
    else:
        device = torch.device("cuda")

    from bench.providers import PROVIDERS, Point, sweep_points
    from bench.report import write_report

    extras = {"smoke": args.cpu_smoke}
    records = []

    def stage(name, fn, *a):
        log(f"== {name} [{budget.elapsed():.0f} s]")
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - the other stages still run
            log(f"  {name} ERROR {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
            return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}

    stamp = stage("stamp", stage_stamp, log, args, device)
    extras["tests"] = ({"status": "skipped", "reason": "--skip-tests"} if args.skip_tests
                       else stage("correctness tests", stage_tests, log, args, out, root))
    peak = stage("fp32 peak", stage_peak, log, device, args.cpu_smoke)
    extras["fp32_peak"] = peak
    peak = peak if isinstance(peak, dict) and "flops_per_s" in peak else None
    # The seed loop is the reference's loop; on a GPU torch-compile (30-60 s of compiling) runs
    # last, at the key size only, if the budget allows.
    providers = [p for p in PROVIDERS if p != "reference" and not (p == "torch-compile" and device.type == "cuda")]
    points = sweep_points("tiny" if args.cpu_smoke else "full", device.type)
    key = Point(**KEY) if not args.cpu_smoke else points[-1]
    rest = [p for p in points if p != key]
    extras["key"] = {"meta_batch": key.meta_batch, "width": key.width, "steps": key.steps}
    reserve = 30 if args.cpu_smoke else 25

    def sweep(pts, reserve):
        for pt in pts:
            log(f"-- {pt.id} [{budget.elapsed():.0f} s]")
            records.extend(run_point(log, pt, device, providers, peak, budget, smoke=args.cpu_smoke,
                                     reserve=reserve))

    stage(f"key size {key.id}", sweep, [key], reserve)
    extras["meta_batch_1"] = stage("meta-batch 1: time per meta-step", stage_meta_batch_1, log, device, args.cpu_smoke)
    configs = [c for c in args.ttq.split(",") if c][: 1 if args.cpu_smoke else None]
    extras["time_to_quality"] = stage("time to quality (backend triton)", stage_time_to_quality, log, device,
                                      args.cpu_smoke, configs, budget)
    # (On the CPU the variant sweep's timed tests skip: only its plumbing is exercised.)
    variants = not args.skip_variants and (root / VARIANTS_FILE).exists()
    # On a GPU the sweep leaves time for the kernel-variant sweep (about a minute).
    stage("sweep", sweep, rest, 110 if variants and device.type == "cuda" else reserve)
    if variants:
        extras["kernel_variants"] = stage("kernel variants (bench/bench_triton_kernel.py)", stage_variants,
                                          log, out, root, budget)
    if device.type == "cuda":
        log(f"== torch-compile at {key.id} [{budget.elapsed():.0f} s]")
        if budget.left() > 75:
            records.extend(run_point(log, key, device, ["torch-compile"], peak, budget, smoke=False, reserve=60))
        else:
            log("  skipped: time budget spent")
    log(f"== report [{budget.elapsed():.0f} s]")
    stamp = stamp if isinstance(stamp, dict) and "torch" in stamp else {}
    stamp["seconds"] = round(budget.elapsed(), 1)
    (out / "results.json").write_text(json.dumps({"stamp": stamp, "records": records, "extras": extras},
                                                 indent=1, default=str) + "\n")
    try:
        lines = summary_lines(records, extras, stamp)
    except Exception as exc:  # noqa: BLE001
        lines = [f"summary ERROR {type(exc).__name__}: {exc}"]
        log(traceback.format_exc())
    try:
        title = f"GPU check — {stamp.get('gpu') or stamp.get('cpu')}" + (" (CPU smoke)" if args.cpu_smoke else "")
        write_report(records, stamp, out / "results", title=title, extras=extras, source="results.json",
                     summary=lines)
    except Exception as exc:  # noqa: BLE001
        log(f"  report ERROR {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    log("")
    for line in lines:
        log(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
