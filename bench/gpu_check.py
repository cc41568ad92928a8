"""The first GPU run: six stages in at most ~6 minutes, results saved after every stage.

    bench/gpu_check.sh OUT_DIR               # on one H100/H200 (device tool: `bench/gpu_check.sh $OUT`)
    bench/gpu_check.sh --cpu-smoke OUT_DIR   # anywhere: the same path at tiny sizes, Triton interpreter

No stage stops the others: each runs under its own guard and time cap, and ``results.json`` is
rewritten (atomically) after every stage, so a kill loses at most the stage in flight.

1. env: versions, GPU, SM count, driver, which of nvcc / ncu / compute-sanitizer exist, the fp32
   matmul rate (TF32 off) measured here.
2. compile: every kernel variant x precision for this GPU's sm_XXa (``bench.triton_compile``, a
   subprocess without TRITON_INTERPRET, running beside stage 3 and joined before stage 4, so its
   host load overlaps no timed row): registers, spills, shared memory, PTX facts (mma, wgmma,
   ex2.approx, div.full).
3. correctness at T=64 (smoke: T=4): each Triton variant x precision on NaN-poisoned outputs
   against the fp32 reference backend (CPU) and a float64 oracle, and against backend torch on
   the device; v2's fused meta-step against the trainer's outer update.  Recorded, never blocking.
4. first the seed's setting through ``Reptile.fit`` (meta-batch 1): kernel v2's fused stepper
   replaying chunks of 100 whole meta-steps as CUDA graphs, checked bitwise against its plain
   launches and against backend torch, then 30000 meta-steps timed (goal < 1 s of training).
   Then timing, each case checked first (a kernel variant's output on every task against a
   float64 oracle within the benchmark gate's bound for its precision, ``check_variant``; the
   torch/vmap/JAX/seed providers through ``bench.providers.check_prepared``): a wrong one is
   recorded as "wrong" and not timed.  Every case is checked and timed on the same ``ROTATIONS``
   input sets (tasks + plans, built before any timing; each timed call runs every set once, so
   no set's cached data or lucky values flatter a provider).  Kernel alone (``triton.testing.do_bench_cudagraph``: a CUDA graph of the launches,
   timed with CUDA events, so Python launch overhead and input checks are not counted) for
   T in {4096, 1, 65536, 256} (``TIMED_T``, in that order) x variant x precision; beside torch batched (events, and under a
   CUDA graph), torch vmap, JAX, the seed's loop (small T), and the whole v2 meta-step under one
   CUDA graph (task sampling and plans on the device, inner loops, outer update, ε on the device),
   checked as the others are: the replays before and after its timed ones against the float64
   oracle of the tasks and plans they sampled (``check_full_meta_step``).
   Every capture is thread-local (``CAPTURE_ERROR_MODE``: another thread's CUDA calls, e.g. JAX's
   stream polling, cannot invalidate it); a failed one is an error row, the run recovers
   (``_recover_after_capture``) and later error rows say they came after it.
5. compute-sanitizer memcheck, initcheck, synccheck at T=16, each under a timeout.
6. ncu SpeedOfLight, Occupancy, WarpStateStats and SchedulerStats of v2 meta-step launches
   (``PROFILED``: default, batch-major, batch-major with 3-D 1-wide layers and streamed at T=4096;
   default and batch-major one-task guarded meta-steps at T=1, the seed's launch, one program alone
   on its SM; when ncu exists), then a second pass over the same launches for shared-memory
   wavefronts and bank conflicts (``NCU_SHARED_METRICS``).

A run that cannot end by itself (a GPU call that never returns) is ended ``DEADLINE_GRACE`` s after
the budget (355 s on a GPU): results.json with the rows made so far, summary.txt, children
killed, exit code 3.  A run that ended but where a stage raised exits with 1 (the other stages
still ran; results.json says which, ``"status": "error"``); one that asked for no stage or an
unknown one (``--stages``) is refused at once with 2.  Give the device tool's run timeout_s >= 360.

Files in OUT_DIR (flat, at most 7: the device tool brings back 8): results.json, gpu_check.log
(everything printed), compile.json, sanitizer.log, ncu.log, summary.txt (the table printed last),
sine_gpu_metrics.json (the main job's metrics; the job's other files stay in a temporary folder).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = (1, 64, 64, 1)
ACTS = ("tanh", "tanh", "identity")
STEPS, BATCH, N_POINTS, LR, EPS = 5, 10, 50, 0.02, 0.1
#: timed meta-batches, in the order they run: the issue's targets' size (4096) first, then the seed's
#: (1), then the largest; a stage cut short by its budget (fit rows, the main job and ~11 cases per
#: T with their compiles at T = 1 fill ~170 s) loses the least informative T, not T = 4096.  The
#: summary table sorts them.
TIMED_T = (4096, 1, 65536, 256)
#: kernel variants: (name, kernel, precision, what) -- what: "inner" (adapted params per task) or "meta" (fused meta-step)
VARIANTS = [("v1", "v1", "ieee", "inner"), ("v1-tf32x3", "v1", "tf32x3", "inner"), ("v1-tf32", "v1", "tf32", "inner"),
            ("v2", "v2", "ieee", "inner"), ("v2-tf32x3", "v2", "tf32x3", "inner"), ("v2-tf32", "v2", "tf32", "inner"),
            ("v2-meta", "v2", "ieee", "meta"), ("v2-meta-tf32x3", "v2", "tf32x3", "meta"),
            ("v2-meta-tf32", "v2", "tf32", "meta"),
            # wide layers streamed through a per-program scratch (V2Config(stream=True), 4 warps)
            ("v2s", "v2s", "ieee", "inner"), ("v2s-meta", "v2s", "ieee", "meta"),
            # minibatches prefetched a step ahead (V2Config(preload="prefetch")): no cross-thread
            # selection from a preloaded plan (sm_90a: 35 barriers per inner step against 45)
            ("v2p", "v2p", "ieee", "inner"), ("v2p-meta", "v2p", "ieee", "meta"),
            # wide x wide products batch-major (V2Config(transpose=False)): the kernel before
            # ``transpose``, timed beside it in the same run (sm_90a, ieee: 196 spill loads/stores and
            # 25 barriers per inner step against none and 10)
            ("v2-bm", "v2-bm", "ieee", "inner"), ("v2-bm-meta", "v2-bm", "ieee", "meta"),
            # and 1-wide layers as 3-D broadcast products too (flat=False, transpose=False): the
            # kernel timed in session 16 (40 barriers per inner step)
            ("v2-3d", "v2-3d", "ieee", "inner"), ("v2-3d-meta", "v2-3d", "ieee", "meta")]
#: input sets (tasks + plans) the timing stage rotates over: every timed call runs each once, so
#: no kernel variant or provider is timed on one set's cached data or lucky values (issue 5)
ROTATIONS = 3
#: the CPU smoke's (interpreter: seconds per launch): enough to exercise the rotation
SMOKE_ROTATIONS = 2
#: seconds the main job (``cli_sine_row``) may take on a GPU
CLI_TIMEOUT = 45.0
#: the CPU smoke's (interpreter) subset: each code path once
SMOKE_VARIANTS = [v for v in VARIANTS if v[0] in ("v1", "v2-tf32x3", "v2-meta", "v2s-meta", "v2p-meta", "v2-bm-meta",
                                                  "v2-3d-meta")]


def v2_config(kernel: str):
    """The ``V2Config`` of a v2 ``VARIANTS`` kernel name: "v2" (defaults), "v2s" (streamed wide
    layers), "v2p" (minibatches prefetched a step ahead), "v2-bm" (wide x wide products batch-major),
    "v2-3d" (batch-major and 1-wide layers as 3-D products)."""
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    return V.V2Config(stream=kernel == "v2s", preload="prefetch" if kernel == "v2p" else None,
                      flat=False if kernel == "v2-3d" else None,
                      transpose=False if kernel in ("v2-bm", "v2-3d") else None)


class Log:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, *args):
        msg = " ".join(str(a) for a in args)
        print(msg, flush=True)
        self.f.write(msg + "\n")


#: held while results.json or summary.txt is written.  ``Deadline`` takes it before its own write
#: and keeps it until the process ends, so the main thread (still running: a slow stage, not a
#: hung one) cannot replace the deadline's files with ones that lack the "cut short" mark, nor
#: write the same temporary file at the same time; re-entrant for the deadline's own ``save``.
SAVE_LOCK = threading.RLock()


def save(out: Path, results: dict, tmp_name: str = "results.json.tmp") -> None:
    with SAVE_LOCK:
        tmp = out / tmp_name
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(out / "results.json")


#: where Nsight Compute installs itself: ``<root>/<version>/ncu`` (e.g. 2025.3.1), not always on PATH
NSIGHT_COMPUTE_ROOT = Path("/opt/nvidia/nsight-compute")


def find_tool(name: str):
    """The tool's path: PATH, the CUDA toolkit's bin, Nsight Compute's install folders (newest
    version first); None when absent."""
    candidates = [shutil.which(name), f"/usr/local/cuda/bin/{name}", str(NSIGHT_COMPUTE_ROOT / name)]
    if name == "ncu" and NSIGHT_COMPUTE_ROOT.is_dir():
        versions = [d for d in NSIGHT_COMPUTE_ROOT.iterdir() if (d / name).is_file()]
        candidates += [str(d / name) for d in sorted(versions, key=lambda d: _version_key(d.name), reverse=True)]
    if name == "compute-sanitizer":
        candidates.append("/usr/local/cuda/compute-sanitizer/compute-sanitizer")
    for p in candidates:
        if p and Path(p).is_file():
            return p
    return None


def _version_key(text: str):
    return tuple(int(p) if p.isdigit() else -1 for p in text.split("."))


#: children started in their own session (the compile, the tools, the CLI job): a run cut short
#: by its deadline kills their process groups, or they keep the GPU through the session's next call
_CHILDREN: set = set()


def _start(cmd, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, registered in ``_CHILDREN``."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    _CHILDREN.add(proc)
    return proc


def _run(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(capture_output=True, text=True)`` in its own session, registered in
    ``_CHILDREN``; on a timeout its whole process group is killed and ``TimeoutExpired`` raised."""
    proc = _start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise
    finally:
        _CHILDREN.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _snapshot(results: dict) -> dict:
    """A JSON copy of ``results`` taken from another thread while the main thread may be adding
    rows (a dict or list changing size mid-copy raises: try again)."""
    for _ in range(20):
        try:
            return json.loads(json.dumps(results, default=str))
        except (RuntimeError, ValueError):
            time.sleep(0.05)
    return {"stages": {}, "seconds": {}, "note": "results changed too fast to be copied at the deadline"}


#: seconds past the budget at which ``Deadline`` ends a run (345 + 10: before a 6-minute limit)
DEADLINE_GRACE = 10.0


class Deadline:
    """The run's hard end: ``seconds`` after ``start()`` a daemon thread marks the stage in flight
    (``stage``) as cut short, kills the children in ``_CHILDREN``, writes results.json (every
    row the stages have recorded so far) and summary.txt, and ends the process with exit code 3.

    A normal run ends well before it (the stages keep to the budget; ``seconds`` is the budget
    plus a grace).  It is for a run that cannot end: a GPU kernel that never finishes blocks the
    main thread inside the driver, where no Python timeout reaches, and the device tool would
    otherwise stop the run at its own limit with no summary and the stage in flight lost."""

    def __init__(self, seconds: float, out: Path, results: dict, log, exit_fn=os._exit, elapsed: float = 0.0):
        # elapsed: seconds of the run already spent (main's budget starts before `import torch`,
        # which takes seconds on a fresh machine): the deadline is ``seconds`` after the run's start
        self.seconds, self.out, self.results, self.log, self._exit = seconds, out, results, log, exit_fn
        self.stage = None
        #: set by ``main`` (holding ``SAVE_LOCK``) once its final files are written: a timer firing
        #: after that (``cancel`` does not stop a callback already running) leaves the run be
        self.done = False
        self._timer = threading.Timer(max(0.0, seconds - elapsed), self._fire)
        self._timer.daemon = True

    def start(self) -> "Deadline":
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        # never released: the process ends below (a main thread stuck inside a write for 30 s is
        # not waited for longer)
        SAVE_LOCK.acquire(timeout=30)
        if self.done:
            SAVE_LOCK.release()
            return
        try:
            self._write()
        finally:
            self._exit(3)

    def _write(self) -> None:
        stage = self.stage
        for proc in list(_CHILDREN):
            _kill_group(proc)
        snap = _snapshot(self.results)
        reason = (f"cut short: the run passed its deadline ({self.seconds:.0f} s, the budget plus a grace) "
                  f"in stage {stage}; its children were killed")
        if stage is not None:
            st = snap.setdefault("stages", {}).get(stage)
            st = dict(st) if isinstance(st, dict) else {}
            st.update(status="cut short", reason=reason)
            snap["stages"][stage] = st
        snap.setdefault("seconds", {})["total"] = round(self.seconds, 1)
        try:
            lines = summary_lines(snap)
        except Exception as exc:  # noqa: BLE001
            lines = [f"summary ERROR {type(exc).__name__}: {exc}"]
        snap["summary"] = lines + [reason]
        save(self.out, snap, "results.json.deadline.tmp")
        (self.out / "summary.txt").write_text("\n".join(snap["summary"]) + "\n")
        self.log(f"== {reason}")
        for line in snap["summary"]:
            self.log(line)


# ------------------------------------------------------------------------------------- problems
def problem(T, device, seed=0, width=64):
    """Sine tasks, plans and the seed MLP's φ (flat and per layer), drawn on the device."""
    model, params, phi, sets = problem_sets(T, device, 1, seed=seed, width=width)
    return model, sets[0][0], sets[0][1], params, phi


def problem_sets(T, device, n_sets, seed=0, width=64):
    """The seed MLP's φ and ``n_sets`` input sets of T sine tasks and their plans, drawn on the
    device from one generator (set 0 is ``problem``'s).  The timing stage rotates over them.

    Returns ``(model, params, phi, [(tasks, plan), ...])``: per-layer and flat ``[n]`` φ; tasks
    x, y ``[T, N_POINTS, 1]``, plans long ``[T, STEPS, BATCH]``."""
    import torch

    from reptile_fast import MLP, Sine, sample_indices
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(1, width, 1).to(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    sets = []
    for _ in range(n_sets):
        tasks = Sine(n_points=N_POINTS).sample(T, generator=g, device=device)
        sets.append((tasks, sample_indices(T, STEPS, N_POINTS, BATCH, generator=g).to(device)))
    params = [p.detach() for p in model.parameters()]
    return model, params, V.flat_params(params), sets


class Rotation:
    """One call runs every input set's launch once, in turn (``fns[0]() … fns[R-1]()``): what the
    timing stage times, so each set is timed equally often whatever number of calls the timer
    makes (``do_bench_cudagraph`` captures a graph of a number of calls it chooses); the time per
    set is the time per call / ``sets``."""

    def __init__(self, fns):
        self.fns = list(fns)
        self.sets = len(self.fns)

    def __call__(self):
        for fn in self.fns:
            fn()


def _kept_outputs(prepared, n_sets):
    """``(Rotation, last)``: one call runs ``prepared.run(r)`` for every input set r, keeping its
    output in ``last[r]`` (a list).  Under a CUDA graph the outputs kept are the last captured
    call's, in the graph's memory: after the replays they hold what the timed replays computed."""
    last = [None] * n_sets

    def run(r):
        last[r] = prepared.run(r)

    return Rotation([lambda r=r: run(r) for r in range(n_sets)]), last


def launcher(variant, T, device, dims, tasks, plan, params, phi):
    """fn() launching one variant with preallocated outputs (what do_bench_cudagraph replays)."""
    import torch

    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    _, kernel, prec, what = variant
    x, y = tasks.x, tasks.y
    n = V.n_flat_params(dims)
    if kernel == "v1":
        out = torch.empty(T, -(-n // 4) * 4, device=device)
        losses = torch.empty(T, STEPS, device=device)
        config = K.choose_launch_config(dims, BATCH)
        fn = lambda: K.mlp_inner_loop(x, y, plan, params, ACTS[:len(dims) - 2] + ("identity",), lr=LR,  # noqa: E731
                                      precision=prec, config=config, out=out, out_losses=losses,
                                      check_values=False)  # timed: no host sync per launch
        fn.result = lambda: out[:, :n]
        return fn
    acts = ACTS[:len(dims) - 2] + ("identity",)
    config = v2_config(kernel)
    if what == "inner":
        out = torch.empty(T, -(-n // 4) * 4, device=device)
        losses = torch.empty(T, STEPS, device=device)
        fn = lambda: V.inner_loop(x, y, plan, phi, dims, acts, lr=LR, precision=prec, config=config,  # noqa: E731
                                  out=out, out_losses=losses, check_values=False)
        fn.result = lambda: out[:, :n]
        return fn
    new = torch.empty(n, device=device)
    eps = torch.full((1,), EPS, device=device)
    fn = lambda: V.meta_step(x, y, plan, phi, dims, acts, lr=LR, eps=eps, precision=prec, config=config,  # noqa: E731
                             out=new, check_values=False)
    fn.result = lambda: new
    return fn


#: check_variant's cache of the oracles' flat forms on the device, oldest first:
#: ``{id(oracle): (oracle, device, flat, norms, mean, path_ratio)}``; at most ``ORACLE_CACHE`` entries
_ORACLE_FLAT: dict = {}
#: entries kept (the timing stage checks every variant on each of its ROTATIONS input sets)
ORACLE_CACHE = 4


def _oracle_flat(oracle, names, T, device):
    """``(flat [T, n], norms [T], mean [n], path_ratio [T] or None)`` of a float64 oracle on
    ``device``, built once per oracle: at T = 65536 the flat form is 2.3 GB of float64, and every
    variant (a sweep: 33 settings) is checked against the same oracles."""
    import torch

    hit = _ORACLE_FLAT.get(id(oracle))
    if hit is None or hit[0] is not oracle or hit[1] != device:
        want = torch.cat([oracle[n].reshape(T, -1) for n in names], 1).to(device)
        norms = want.norm(dim=1)
        path = getattr(oracle, "path", None)
        ratio = None if path is None else path.to(device) / norms
        while len(_ORACLE_FLAT) >= ORACLE_CACHE:
            _ORACLE_FLAT.pop(next(iter(_ORACLE_FLAT)))
        hit = _ORACLE_FLAT[id(oracle)] = (oracle, device, want, norms, want.mean(0), ratio)
    return hit[2:]


#: λ of the probabilistic summation bound (``_sum_bound``): the bound fails with probability at
#: most n·2·exp(−λ²/2) per sum (Higham & Mary 2019), < 1e-16 for λ = 10 and n ≤ 2^20 tasks
SUM_LAMBDA = 10.0


def _sum_bound(n: int, u: float) -> float:
    """γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1: the relative error bound (against Σ|x_i|) of an
    n-term fp32 sum under the probabilistic model of rounding errors (independent, mean zero:
    N. J. Higham and T. Mary, "A new approach to probabilistic rounding error analysis", SIAM J.
    Sci. Comput. 41(5), 2019, Theorem 2.4), λ = ``SUM_LAMBDA``.  The worst-case γ_n = n·u/(1 − n·u)
    grows as n while one task's share of a mean over n tasks shrinks as 1/n: from a few thousand
    tasks on it admitted a meta-step that skipped tasks (QA64: 2048 of 65536 passed)."""
    return math.expm1(SUM_LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))


def _meta_allowed(point, precision, phi64, norms, path_ratio, T):
    """The absolute error a correct fused meta-step's (φ' − φ)/ε may have against the tasks' mean
    float64 update m: the tasks' own bounds (mean of b_i·‖Δ_i‖), the fp32 sum over T tasks (any
    order: ``_sum_bound(T − 1)``·mean‖Δ_i‖), and φ' = φ + ε·m itself: ε·Σ/T in fp32 (3 roundings
    of ε‖m‖) and φ' stored once (each element rounded to nearest: u·|φ'_j|), then divided by ε.
    (These two were GATE_K·u·‖φ‖·(1 + 1/ε) before QA64: 4× what one rounding can do.)"""
    from bench.providers import UNIT_ROUNDOFF, update_error_bound

    u = UNIT_ROUNDOFF["fp32"]
    bound = update_error_bound(point, precision, phi64.norm() / norms, path_ratio)
    mean_norm = float(norms.mean())  # ≥ ‖m‖
    return (float((bound * norms).mean()) + _sum_bound(max(T - 1, 1), u) * mean_norm
            + 3 * u * mean_norm + u * (float(phi64.norm()) + EPS * mean_norm) / EPS)


def skip_resolution(allowed_abs: float, norms, T: int) -> int:
    """How many tasks of median update norm a meta-step must skip before the gate refuses it:
    each adds ‖Δ_i‖/T to the error, and the result may already lie ``allowed_abs`` off (QA64:
    the worst-case summation bound let 2048 of 65536 tasks go missing).  Recorded beside each
    checked meta row (``check_resolution_tasks``); a fp32 mean over T tasks cannot resolve one
    task once T²·u is near 1, whatever the bound."""
    share = float(norms.median()) / T
    if not (share > 0 and math.isfinite(allowed_abs)):
        return T
    return min(T, max(1, math.ceil(2 * allowed_abs / share)))


def check_variant(variant, result, model, tasks, plan, phi, oracle, inner_mean=None, info=None):
    """Why ``result`` (a launcher's output after a call) is not a result, or None when it is: the
    benchmark gate's bound (``bench.providers.update_error_bound``, per precision: "tf32" for
    tf32, "fp32" for ieee and tf32x3; with the oracle's path ratio when it has one) against the
    float64 oracle ``oracle`` (``float64_updates`` of this problem), on every task.

    A meta variant's mean is checked against the mean of the tasks' float64 updates.  The tasks'
    updates point different ways (‖mean Δ‖ ≈ mean ‖Δ_i‖ / 2.7 for sine tasks), so there the tf32
    bound, a sum of per-task bounds, can pass the 0.1 error of a meta-step at 90 % of the inner
    learning rate: beyond ``GATE_CAP`` it cannot verify the variant alone.  ``inner_mean`` (the
    mean over tasks of ``result − φ`` of the same kernel and precision's "inner" variant, which
    passed the per-task gate on this input set) then verifies it: the two run the same per-task
    arithmetic, so their means may differ by no more than twice the fp32 allowance.  (Used only
    there: that the two paths' tf32 roundings agree to fp32 level is an assumption a GPU run
    must confirm; where it fails the variant is refused, never timed wrong.)

    Where no finite bound exists (a task's float64 update or the tasks' mean update of norm 0, a
    non-finite oracle) the answer is "cannot be verified: ...", never a pass and never a crash; a
    meta result beyond the absolute allowance is still wrong when the mean update is zero.

    Args:
        variant: a ``VARIANTS`` entry; "inner" results are ``[T, n]`` adapted flat parameters,
            "meta" results the flat ``[n]`` φ after the outer update (ε = ``EPS``).
        result: the output on the device; model, tasks, plan, phi: the problem (``problem``).
        oracle: ``{name: [T, *shape]}`` float64 updates (``float64_updates``: with ``.path``).
        inner_mean: float64 ``[n]`` on the result's device, or None.
        info: a dict, or None; a meta result that passes sets ``info["check_resolution_tasks"]``
            (``skip_resolution`` of the allowance it passed under).
    """
    import torch

    from bench.providers import GATE_CAP, update_error_bound

    _, _, prec, what = variant
    precision = "tf32" if prec == "tf32" else "fp32"
    T = tasks.n_tasks
    names = [n for n, _ in model.named_parameters()]
    dims = (tasks.x.shape[-1],) + tuple(p.shape[0] for n, p in model.named_parameters() if n.endswith("weight"))
    point = type("P", (), {"steps": STEPS, "dims": dims})()
    device = result.device
    want, norms, mean, ratio = _oracle_flat(oracle, names, T, device)
    phi64 = phi.detach().double().to(device)
    got = result.detach().double()
    if not bool(torch.isfinite(got).all()):
        return "non-finite values in its output"
    if what == "inner":
        bound = update_error_bound(point, precision, phi64.norm() / norms, ratio)
        if not bool(torch.isfinite(bound).all()):  # a task's float64 update of norm 0, or a non-finite oracle
            i = int((~torch.isfinite(bound)).nonzero()[0])
            return (f"cannot be verified: the {precision} bound is not finite on {int((~torch.isfinite(bound)).sum())} "
                    f"of {T} tasks (task {i}: bound {float(bound[i])}, float64 update norm {float(norms[i]):.3g})")
        err = (got - phi64 - want).norm(dim=1) / norms
        bad = ~(err <= bound)
        if bool((bound > GATE_CAP).any()):
            return f"cannot be verified: {precision} bound {float(bound.max()):.3g} > {GATE_CAP}"
        if bool(bad.any()):
            i = int(torch.nan_to_num(err / bound, nan=float("inf")).argmax())
            return (f"its update differs from float64 on {int(bad.sum())} of {T} tasks (task {i}: rel err "
                    f"{float(err[i]):.3g} > bound {float(bound[i]):.3g}, {precision})")
        return None
    step = (got - phi64) / EPS
    # compared in absolute terms (‖step − mean‖ against the absolute allowance), divided by ‖mean‖
    # only to report and to cap: a mean float64 update of norm 0 divides nothing by zero, and a
    # non-finite allowance (a task's update of norm 0, a non-finite oracle) verifies nothing
    allowed_abs = _meta_allowed(point, precision, phi64, norms, ratio, T)
    mean_norm = float(mean.norm())
    err_abs = float((step - mean).norm())
    if not math.isfinite(allowed_abs) or not math.isfinite(mean_norm):
        return (f"cannot be verified: the allowed error of its outer update is not finite ({allowed_abs}, "
                f"{precision}; norm of the tasks' mean float64 update {mean_norm:.3g})")
    if mean_norm == 0:
        if not err_abs <= allowed_abs:
            return (f"its outer update differs from float64 (abs err {err_abs:.3g} > allowed {allowed_abs:.3g}, "
                    f"{precision}; the tasks' mean float64 update is zero)")
        return (f"cannot be verified: the tasks' mean float64 update is zero (norm 0), so no relative bound "
                f"(abs err {err_abs:.3g} <= allowed {allowed_abs:.3g}, {precision})")
    rel_allowed = allowed_abs / mean_norm
    rel = err_abs / mean_norm
    if not rel <= rel_allowed:
        return f"its outer update differs from float64 (rel err {rel:.3g} > allowed {rel_allowed:.3g}, {precision})"
    if rel_allowed <= GATE_CAP:
        if info is not None:
            info["check_resolution_tasks"] = skip_resolution(allowed_abs, norms, T)
        return None
    if inner_mean is None:
        return (f"cannot be verified: allowed rel err {rel_allowed:.3g} > {GATE_CAP} ({precision}; no checked "
                f"inner variant of the same kernel and precision to compare with)")
    allowed_inner = 2 * _meta_allowed(point, "fp32", phi64, norms, ratio, T)
    inner_norm = float(inner_mean.norm())
    if not (math.isfinite(allowed_inner) and math.isfinite(inner_norm) and inner_norm > 0):
        return (f"cannot be verified: allowed rel err {rel_allowed:.3g} > {GATE_CAP} ({precision}) and its inner "
                f"variant's mean update (norm {inner_norm:.3g}, allowance {allowed_inner}) gives no finite bound")
    allowed = allowed_inner / inner_norm
    rel_inner = float((step - inner_mean).norm()) / inner_norm
    if not rel_inner <= allowed:
        return (f"its outer update differs from the mean of its inner variant's checked updates (rel err "
                f"{rel_inner:.3g} > allowed {allowed:.3g}; float64 alone allows {rel_allowed:.3g} > {GATE_CAP})")
    if info is not None:
        info["check_resolution_tasks"] = skip_resolution(allowed_inner, norms, T)
    return None


# ------------------------------------------------------------------------------------- stages
def stage_env(log, device, smoke):
    import torch
    import triton

    from bench.env import machine_stamp

    r = machine_stamp()
    r["command"] = "bench/gpu_check.sh " + " ".join(sys.argv[1:])
    r["mode"] = "cpu-smoke (tiny sizes, Triton interpreter: timings meaningless)" if smoke else "gpu"
    r["triton"] = triton.__version__
    try:
        import jax

        r["jax"] = jax.__version__
    except Exception as exc:  # noqa: BLE001 - optional peer
        r["jax"] = f"not importable ({type(exc).__name__})"
    r["tools"] = {t: find_tool(t) for t in ("nvcc", "ncu", "compute-sanitizer")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        r.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                 memory_gib=round(p.total_memory / 2 ** 30, 1))
        try:
            r["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            r["nvidia_smi"] = f"unavailable: {exc}"
    from bench.flops import measure_matmul_peak

    peak = measure_matmul_peak(device, n=256 if smoke else None, min_time=0.05 if smoke else 0.3)
    r["fp32_matmul_flops_per_s"] = peak["flops_per_s"]
    for k, v in r.items():
        log(f"  {k}: {v}")
    return r


class BackgroundCompile:
    """Stage 2 in a subprocess (``bench.triton_compile``: ptxas on the host, no GPU work) running
    beside stage 3, joined before the timing stage so that its CPU load overlaps no timed row."""

    def __init__(self, log, out: Path, device, smoke, timeout: float):
        import tempfile

        self.arch = 90
        if device.type == "cuda":
            import torch

            cap = torch.cuda.get_device_capability(device)
            self.arch = cap[0] * 10 + cap[1]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.json = out / "compile.json"
        cmd = [sys.executable, "-m", "bench.triton_compile", "--kernel", "all", "--arch", str(self.arch),
               "--cases", "smoke" if smoke else "gpu", "--out", str(self.json)]
        log("  $ " + " ".join(cmd[1:]) + f"  (in the background, beside stage 3; at most {timeout:.0f} s)")
        # its output goes to a file outside OUT (the device tool brings back 8 files), then to the log
        self.output = tempfile.TemporaryFile(mode="w+")
        self.t0, self.deadline = time.monotonic(), time.monotonic() + timeout
        self.proc = _start(cmd, cwd=ROOT, env=env, stdout=self.output, stderr=subprocess.STDOUT, text=True)

    def finish(self, log) -> dict:
        try:
            rc = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            self.proc.wait()
            status = f"timeout after {self.deadline - self.t0:.0f} s"
        _CHILDREN.discard(self.proc)
        self.seconds = time.monotonic() - self.t0
        self.output.seek(0)
        text = self.output.read()
        log(text[-6000:])
        # compile.json is rewritten after every compile: a timeout keeps the rows done by then
        rows = json.loads(self.json.read_text())["rows"] if self.json.exists() else []
        return {"status": status, "arch": self.arch, "rows": rows}


def _kill_group(proc) -> None:
    """SIGKILL a child started with ``start_new_session=True`` and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # gone (its group id may be reused: not ours then)
        pass


def _rel(a, b64):
    return float((a.double().cpu() - b64).norm() / b64.norm().clamp_min(1e-300))


def _v2_repeatability(log, device, smoke, width):
    """Kernel v2 run again and again on the same inputs, for each way it keeps its data (streamed
    wide layers or not, sums in registers or memory): bitwise the same φ, loss and adapted rows.
    A missing barrier between a store and another thread's load of the same global address (the
    kind QA29 found and fixed in the streamed variant under the interpreter's race checker) is
    invisible to compute-sanitizer's racecheck (shared memory only) and to one comparison with a
    reference; at T=4096 warps drift, so such a race shows as runs that differ.  One row per
    configuration: ``bitwise`` and the largest difference seen."""
    import torch

    from reptile_fast.kernels import mlp_meta_step_v2 as V

    T, runs = (5, 2) if smoke else (4096, 20)  # smoke: the code path only (each interpreted call ~0.7 s)
    dims = (1, width, width, 1)
    _, tasks, plan, _, phi = problem(T, device, seed=9, width=width)
    n = V.n_flat_params(dims)  # adapted rows are padded to a multiple of 4: the padding is not written
    rows = []
    for stream in (False, True):
        for accumulate in ("registers", "memory"):
            row = {"variant": f"v2-repeat-{'stream' if stream else 'regs'}-{accumulate}", "T": T, "runs": runs}
            try:
                cfg = V.V2Config(stream=stream, accumulate=accumulate, max_programs=2 if smoke else None)
                first = V.meta_step(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, eps=EPS, config=cfg)
                # (adapt's launches too, on the GPU; the smoke keeps to the meta-step)
                adapt = (lambda: V.inner_loop(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, config=cfg)) \
                    if not smoke else None
                first_in = adapt() if adapt else None
                worst = 0.0
                same = True
                for _ in range(runs - 1):
                    res = V.meta_step(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, eps=EPS, config=cfg)
                    same = same and bool(torch.equal(res.params, first.params) and torch.equal(res.loss, first.loss))
                    worst = max(worst, float((res.params - first.params).abs().max()))
                    if adapt:
                        out, losses = adapt()
                        same = same and bool(torch.equal(out[:, :n], first_in[0][:, :n])
                                             and torch.equal(losses, first_in[1]))
                        worst = max(worst, float((out[:, :n] - first_in[0][:, :n]).abs().max()))
                row["bitwise"] = same
                row["max_abs_diff"] = worst
            except Exception as exc:  # noqa: BLE001 - recorded; the other configurations go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            rows.append(row)
            log("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return rows


def stage_correctness(log, device, smoke, rows=None):
    """Every variant at T=64 (smoke: T=4) on NaN-poisoned outputs vs the references.  ``rows``:
    a list the rows are appended to as they are made (``main`` keeps it in results.json's stage
    entry, so a run cut short by its ``Deadline`` still reports the rows done)."""
    import torch

    from reptile_fast import Reptile
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.reference import ReferenceBackend
    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    T, width = (3, 16) if smoke else (64, 64)
    dims = (1, width, width, 1)
    model, tasks, plan, params, phi = problem(T, device, seed=7, width=width)
    cpu_tasks, cpu_plan = tasks.to("cpu"), plan.cpu()
    ref32 = ReferenceBackend().inner_loop(copy.deepcopy(model).cpu(), cpu_tasks, cpu_plan, InnerConfig(lr=LR))
    ref64 = ReferenceBackend().inner_loop(copy.deepcopy(model).cpu().double(), cpu_tasks.to(dtype=torch.float64),
                                          cpu_plan, InnerConfig(lr=LR))
    names = list(ref32.params)
    flat32 = torch.cat([ref32.params[n].reshape(T, -1) for n in names], 1)
    flat64 = torch.cat([ref64.params[n].reshape(T, -1) for n in names], 1)
    rows = [] if rows is None else rows
    torch_flat = None
    try:
        from reptile_fast.backends.torch_func import TorchBackend

        tb = TorchBackend().inner_loop(model, tasks, plan, InnerConfig(lr=LR))
        torch_flat = torch.cat([tb.params[n].reshape(T, -1) for n in names], 1)
        rows.append({"variant": "torch", "max_abs_vs_ref32": float((torch_flat.cpu() - flat32).abs().max()),
                     "rel_vs_f64": _rel(torch_flat, flat64)})
    except Exception as exc:  # noqa: BLE001
        rows.append({"variant": "torch", "error": f"{type(exc).__name__}: {exc}"})
    n = V.n_flat_params(dims)
    for variant in (SMOKE_VARIANTS if smoke else VARIANTS):
        name, kernel, prec, what = variant
        row = {"variant": name, "T": T}
        try:
            if what == "inner":
                out = torch.full((T, n + 3), float("nan"), device=device)
                losses = torch.full((T, STEPS), float("nan"), device=device)
                if kernel == "v1":
                    K.mlp_inner_loop(tasks.x, tasks.y, plan, params, ACTS, lr=LR, precision=prec, out=out,
                                     out_losses=losses, scratch_fill=float("nan"))
                else:
                    V.inner_loop(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, precision=prec, out=out,
                                 out_losses=losses, config=v2_config(kernel))
                got = out[:, :n]
                row["unwritten"] = int(torch.isnan(got).sum()) + int(torch.isnan(losses).sum())
                row["wrote_past_row"] = bool(not torch.isnan(out[:, n:]).all())
                row["max_abs_vs_ref32"] = float((got.cpu() - flat32).abs().max())
                row["rel_vs_f64"] = _rel(got, flat64)
                row["ref32_rel_vs_f64"] = _rel(flat32, flat64)
                row["loss_max_abs_vs_ref32"] = float((losses.cpu() - ref32.losses).abs().max())
                if torch_flat is not None:
                    row["max_abs_vs_torch"] = float((got - torch_flat).abs().max())
                row["ok_rtol1e-5"] = bool(torch.allclose(got.cpu(), flat32, rtol=1e-5, atol=1e-6))
            else:
                trainer = Reptile(copy.deepcopy(model).cpu(), backend="reference", outer_lr=EPS, inner_lr=LR,
                                  inner_steps=STEPS, inner_batch_size=BATCH)
                want = trainer.meta_step(cpu_tasks, cpu_plan)
                want_phi = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
                cfg = v2_config(kernel)
                res = V.meta_step(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, eps=EPS, precision=prec,
                                  config=cfg, out=torch.full_like(phi, float("nan")))
                again = V.meta_step(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, eps=EPS, precision=prec,
                                    config=cfg)
                row["unwritten"] = int(torch.isnan(res.params).sum())
                row["deterministic"] = bool(torch.equal(res.params, again.params) and torch.equal(res.loss, again.loss))
                row["max_abs_vs_trainer"] = float((res.params.cpu() - want_phi).abs().max())
                row["loss_abs_vs_trainer"] = abs(float(res.loss) - float(want["loss"]))
                row["ok_rtol1e-5"] = bool(torch.allclose(res.params.cpu(), want_phi, rtol=1e-5, atol=1e-6))
        except Exception as exc:  # noqa: BLE001 - recorded; the other variants go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        rows.append(row)
        log(f"  {name:>15}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items() if k not in ("variant", "T")))
    # one program finishing the meta-step itself (T=1: one launch) vs meta_step + accept_step
    row = {"variant": "v2-guarded-1", "T": 1}
    try:
        from reptile_fast.kernels import meta_step_guard as G

        _, t1, p1, _, phi1 = problem(1, device, seed=8, width=width)
        it = torch.ones(1, dtype=torch.int64, device=device)
        got, want = phi1.clone(), phi1.clone()
        st_got, st_want = G.new_state(device), G.new_state(device)
        l_got, l_want = torch.full((1,), float("nan"), device=device), torch.full((1,), float("nan"), device=device)
        V.guarded_meta_step(t1.x, t1.y, p1, got, dims, ACTS, lr=LR, eps=EPS, state=st_got, iteration=it,
                            loss_out=l_got)
        res = V.meta_step(t1.x, t1.y, p1, want, dims, ACTS, lr=LR, eps=EPS)
        G.accept_step(want, res.params, res.loss, st_want, it, l_want)
        row["bitwise_vs_three_launches"] = bool(torch.equal(got, want) and torch.equal(l_got, l_want)
                                                and torch.equal(st_got, st_want))
        row["accepted"] = st_got.tolist() == [1, 0]
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    rows.append(row)
    log("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    rows.extend(_v2_repeatability(log, device, smoke, width))
    # special functions against float64 on this device
    try:
        import importlib

        sys.path.insert(0, str(ROOT / "tests"))
        tmod = importlib.import_module("test_kernel_mlp_meta_step_v2")
        x = tmod._special_values()
        x = x[::20] if smoke else x
        special = {}
        for fn in ("exp", "tanh", "sigmoid", "log"):
            xs = x
            if fn == "exp":
                xs = x[x.abs() <= 87]
            elif fn == "sigmoid":
                xs = x[x >= -80]
            elif fn == "log":
                xs = torch.logspace(0, 38, 1001 if smoke else 20001).float()
            exact = getattr(torch, fn)(xs.double())
            got = tmod._apply(fn, xs, device)
            scale = exact.abs().clamp_min(1.0) if fn == "log" else exact.abs().clamp_min(1e-300)
            special[fn] = {"max_rel_err_in_2^-23": float(((got.double() - exact).abs() / scale).max() / 2.0 ** -23),
                           "stated_bound": V.ACCURACY[fn]}
        rows.append({"variant": "special-functions", **special})
        log("  special functions (max error in 2^-23 units, bound): "
            + ", ".join(f"{k} {v['max_rel_err_in_2^-23']:.2f} ({v['stated_bound']})" for k, v in special.items()))
    except Exception as exc:  # noqa: BLE001
        rows.append({"variant": "special-functions", "error": f"{type(exc).__name__}: {exc}"})
    return {"rows": rows}


#: the capture mode of the timing stage's CUDA graphs (``_capture``).  torch.cuda.graph's default,
#: "global" (what Triton's do_bench_cudagraph gets), forbids the CUDA calls CUDA deems unsafe in
#: *every* thread of the process while a capture runs, and such a call from another thread
#: invalidates the capture (cudaErrorStreamCaptureInvalidated).  Once JAX has run on the GPU,
#: XLA's stream executor polls its streams from a background thread (cuStreamQuery, every few
#: seconds, until the process ends), and when a poll fails it closes that stream's host-callback
#: registry for good.  That is the likely cause of the H200 run of 2026-12-04 (defaults-w4-pps2):
#: v1-tf32x3's capture at T = 1 invalidated, then every JAX row "Callback registry is closed".
#: "thread_local" ignores other threads and keeps the check for this one (a host sync inside a
#: captured call still fails the capture).
CAPTURE_ERROR_MODE = "thread_local"


class CaptureFailed(RuntimeError):
    """A CUDA-graph capture of the timing stage failed (its body or its end raised); the message
    has the original error, ``__cause__`` is the original exception."""


@contextlib.contextmanager
def _capture(graph_cm, cuda_graph, *args, **kwargs):
    """``graph_cm(cuda_graph, ...)`` (``torch.cuda.graph``) for the timing stage: mode
    ``CAPTURE_ERROR_MODE`` unless given; Python's cyclic garbage collector off during the capture
    (it could free another library's device buffers, e.g. JAX arrays, whose CUDA calls this
    thread may not make while capturing); any failure raised as ``CaptureFailed``; the current
    stream restored (torch.cuda.graph leaves its capture stream current when ending the capture
    raises)."""
    import torch

    kwargs.setdefault("capture_error_mode", CAPTURE_ERROR_MODE)
    stream = torch.cuda.current_stream()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with graph_cm(cuda_graph, *args, **kwargs):
            yield
    except Exception as exc:
        # ending an invalidated capture raises again: the first error says which call failed
        first = exc.__context__
        first = f" (after {type(first).__name__}: {str(first)[:200]})" if first is not None else ""
        raise CaptureFailed(f"CUDA-graph capture failed: {type(exc).__name__}: {exc}{first}") from exc
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.cuda.set_stream(stream)


@contextlib.contextmanager
def _captures_guarded():
    """While a timer runs, ``torch.cuda.graph(g)`` (how Triton's do_bench_cudagraph captures) goes
    through ``_capture``.  Yields a list with one entry per capture made that way (empty: the
    timer captured some other way, in its own mode)."""
    import torch

    real, seen = torch.cuda.graph, []

    def graph(cuda_graph, *args, **kwargs):
        seen.append(cuda_graph)
        return _capture(real, cuda_graph, *args, **kwargs)

    torch.cuda.graph = graph
    try:
        yield seen
    finally:
        torch.cuda.graph = real


def _recover_after_capture(device, jax_used=False) -> dict:
    """After a ``CaptureFailed``: whether CUDA (and JAX, if it already ran here) still work.

    The capture has ended (torch.cuda.graph ends it even when its body raised); torch cleared the
    runtime's last error when it raised (c10_cuda_check_implementation calls cudaGetLastError),
    and an invalidated capture is no sticky error.  So: synchronize, run a probe and read it back.
    A failure means the context is lost and every later CUDA row will fail; it is recorded here
    rather than found out row by row.  JAX cannot be repaired from here (XLA does not reopen a
    closed callback registry): a failed probe says that its later rows will fail."""
    import torch

    state = {}
    try:
        torch.cuda.synchronize(device)
        state["cuda_usable"] = float((torch.arange(4, device=device, dtype=torch.float32) * 2).sum()) == 12.0
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        state.update(cuda_usable=False, cuda_error=f"{type(exc).__name__}: {exc}"[:300])
    if jax_used:
        try:
            import numpy as np

            from bench import jax_peer

            jax = jax_peer.load_jax()
            x = jax.device_put(np.arange(4, dtype=np.float32), jax_peer._jax_device(device))
            state["jax_usable"] = float(jax.block_until_ready(x * 2).sum()) == 12.0
        except Exception as exc:  # noqa: BLE001
            state.update(jax_usable=False, jax_error=f"{type(exc).__name__}: {exc}"[:300])
    return state


def _time_ms(fn, device, graph, sets=1):
    """Mean ms per input set of fn, which runs ``sets`` input sets per call (``Rotation``): a CUDA
    graph of calls timed with events (do_bench_cudagraph, capturing through ``_capture``), or
    events around each call (do_bench); on the CPU one host-clock call (meaningless).  A failed
    capture raises ``CaptureFailed``."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0) / sets, "host clock, 1 call (interpreter)"
    import triton.testing as tt

    if graph:
        with _captures_guarded() as seen:
            ms = tt.do_bench_cudagraph(fn, rep=40)
        mode = f"{CAPTURE_ERROR_MODE} capture" if seen else "the timer's own capture"
        return ms / sets, f"do_bench_cudagraph (CUDA graph of launches, {mode}, events)"
    return tt.do_bench(fn, warmup=10, rep=60) / sets, "do_bench (events around each call)"


def stage_timing(log, device, smoke, budget, results, out):
    from bench.flops import inner_loop_flops
    from bench.providers import Point, Prepared, Problem, check_prepared, get_provider, oracle_updates
    from reptile_fast.backends import InnerConfig

    Ts = (1, 2) if smoke else TIMED_T
    width = 16 if smoke else 64
    dims = (1, width, width, 1)
    peak = (results["stages"].get("env") or {}).get("fp32_matmul_flops_per_s")
    stage = results["stages"].setdefault("timing", {"rows": []})
    rows = stage["rows"]
    #: "provider at T=…" of every failed CUDA-graph capture so far; jax_used: JAX ran on the device
    failed_captures, jax_used = [], [False]

    def record(**r):
        r.update(width=width, depth=len(dims) - 2, steps=STEPS, inner_batch=BATCH)  # for bench.report
        r["flops"] = inner_loop_flops(dims, BATCH, STEPS, r["T"])
        if "ms" in r and r["ms"]:
            r["tasks_per_s"] = r["T"] / (r["ms"] / 1e3)
            r["flops_per_s"] = r["flops"] / (r["ms"] / 1e3)
            if peak:
                r["pct_fp32_matmul_peak"] = 100 * r["flops_per_s"] / peak
        if r.get("status") == "error" and failed_captures and not r.get("capture_failed"):
            # a failed capture can leave the context or another library's stream unusable (in the
            # 2026-12-04 run every later JAX row failed): a later error says it came after one
            r["after_failed_capture"] = ", ".join(failed_captures)
            r["reason"] = f"after the failed CUDA-graph capture of {r['after_failed_capture']}: {r.get('reason', '')}"
        rows.append(r)
        log(f"  T={r['T']:>6} {r['provider']:>16}: " + (f"{r['ms']:.4f} ms  {r.get('tasks_per_s', 0):,.0f} tasks/s"
                                                         if "ms" in r else f"{r.get('status')}: {r.get('reason', '')[:150]}"))

    def record_error(T, provider, exc, limit=None):
        """An error row; after a failed capture (``CaptureFailed``) the run recovers
        (``_recover_after_capture``), and the row and ``capture_failures`` say what still works."""
        if not isinstance(exc, CaptureFailed):
            record(T=T, provider=provider, status="error", reason=f"{type(exc).__name__}: {exc}"[:limit])
            return
        recovery = _recover_after_capture(device, jax_used=jax_used[0])
        record(T=T, provider=provider, status="error", reason=str(exc)[:limit], capture_failed=True, recovery=recovery)
        failed_captures.append(f"{provider} at T={T}")
        stage.setdefault("capture_failures", []).append({"provider": provider, "T": T, **recovery})
        log(f"  after the failed capture of {provider} at T={T}: " + ", ".join(f"{k} {v}" for k, v in recovery.items()))

    # the seed's setting through Reptile.fit first: the issue's headline goal (< 1 s on one GPU)
    try:
        rows.extend(fit_rows(log, device, smoke, Budget(min(90, max(10, budget.left() - 60)))))
        if smoke:
            rows.append(cli_sine_row(log, out, timeout=120.0, smoke=True))
        elif device.type == "cuda" and budget.left() > 60:  # its own time, kept apart from the fits'
            # ~20 s expected (import, 30000 graphed meta-steps, the evaluation); capped so that a slow
            # or hung job leaves the kernel timings below their time
            rows.append(cli_sine_row(log, out, timeout=min(CLI_TIMEOUT, budget.left() - 30)))
        elif device.type == "cuda":  # said, not silently left out of the table
            rows.append({"provider": "cli-sine-gpu", "T": 1, "status": "skipped",
                         "reason": f"time budget: {budget.left():.0f} s left in the timing stage, the job runs from 60"})
            log(f"  cli-sine-gpu: skipped ({rows[-1]['reason']})")
    except Exception as exc:  # noqa: BLE001
        rows.append({"provider": "fit-v2-graphs", "T": 1, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
    save(out, results)
    n_sets = SMOKE_ROTATIONS if smoke else ROTATIONS
    stage["rotations"] = n_sets
    for T in Ts:
        if budget.left() < 20:
            record(T=T, provider="*", status="skipped", reason="time budget spent")
            continue
        _ORACLE_FLAT.clear()  # the previous T's oracles (2.3 GB each at T = 65536)
        try:
            # n_sets input sets, built here, outside every timed region; the same sets (and
            # float64 oracles, cached in the Problem) for every kernel variant and provider of this T
            model, params, phi, sets = problem_sets(T, device, n_sets, seed=11, width=width)
            prob = Problem(Point(meta_batch=T, width=width, steps=STEPS, inner_batch=BATCH, n_points=N_POINTS, lr=LR),
                           device, model, [t for t, _ in sets], [p for _, p in sets], InnerConfig(lr=LR, loss="mse"))
        except Exception as exc:  # noqa: BLE001
            record(T=T, provider="*", status="error", reason=f"problem: {exc}")
            continue
        inner_means = {}  # (kernel, precision) -> per input set, mean over tasks of (φ̃ − φ): checked inner variants
        resolution = {}  # meta provider -> skip_resolution of its checks (the coarsest input set)

        def check_sets(variant, fns):
            """(why the outputs of ``fns`` (one launcher per input set, each called) are wrong, or None;
            the inner variants' per-set means of φ̃ − φ)."""
            means = []
            for r, (fn, (tasks, plan)) in enumerate(zip(fns, sets)):
                got = fn.result()
                inner = inner_means.get(variant[1:3])
                info = {}
                wrong = check_variant(variant, got, model, tasks, plan, phi, oracle_updates(prob, r),
                                      inner_mean=None if inner is None else inner[r], info=info)
                if wrong:
                    return f"input set {r}: {wrong}", means
                if "check_resolution_tasks" in info:  # the coarsest over the input sets
                    resolution[variant[0]] = max(resolution.get(variant[0], 0), info["check_resolution_tasks"])
                if variant[3] == "inner":
                    means.append((got.detach().double() - phi.detach().double()).mean(0))
            return None, means
        for variant in (SMOKE_VARIANTS if smoke else VARIANTS):
            if budget.left() < 15:
                record(T=T, provider=variant[0], status="skipped", reason="time budget spent")
                continue
            try:
                fns = [launcher(variant, T, device, dims, tasks, plan, params, phi) for tasks, plan in sets]
                # every set's launch, with the arguments the capture will use (the same closures),
                # runs here first: it compiles and loads the kernel (set 0) and allocates outside
                # any capture; every set's output is checked before timing
                for fn in fns:
                    fn()
                wrong, means = check_sets(variant, fns)
                if wrong:
                    record(T=T, provider=variant[0], status="wrong", reason=f"not timed: {wrong}")
                    continue
                rotation = Rotation(fns)
                ms, timer = _time_ms(rotation, device, graph=True, sets=rotation.sets)
                # the timed calls (graph replays on a GPU) wrote the same output buffers: their last
                # answers are checked too, so a replay that computes something else is no result
                after, _ = check_sets(variant, fns)
                if after:
                    record(T=T, provider=variant[0], status="wrong", ms_not_a_result=ms,
                           reason=f"the timed calls' outputs are wrong: {after}")
                    continue
                if variant[3] == "inner":
                    inner_means[variant[1:3]] = means
                extra = {} if variant[0] not in resolution else {"check_resolution_tasks": resolution[variant[0]]}
                record(T=T, provider=variant[0], ms=ms, timer=timer, input_sets=rotation.sets, **extra)
            except Exception as exc:  # noqa: BLE001
                record_error(T, variant[0], exc)
        # the whole v2 meta-step, sampling included, under one CUDA graph
        if device.type == "cuda" and budget.left() <= 15:  # said, as the other cases' skips are
            record(T=T, provider="v2-meta-graph-full", status="skipped", reason="time budget spent")
        elif device.type == "cuda":
            try:
                full = _graphed_full_meta_step(T, device, dims)
                if full["wrong"] and full["ms"] is None:
                    record(T=T, provider="v2-meta-graph-full", status="wrong", reason=f"not timed: {full['wrong']}")
                elif full["wrong"]:
                    record(T=T, provider="v2-meta-graph-full", status="wrong", ms_not_a_result=full["ms"],
                           reason=f"the timed graph is wrong: {full['wrong']}")
                else:
                    record(T=T, provider="v2-meta-graph-full", ms=full["ms"], input_sets="fresh each replay",
                           timer="one CUDA graph: device sampling + plans + meta-step, events around 20 replays",
                           checked="the replays before and after the timed ones vs float64 (their sampled tasks)")
            except Exception as exc:  # noqa: BLE001
                record_error(T, "v2-meta-graph-full", exc)
        # torch / vmap / jax / seed through bench.providers (inner loop of every task), on the same sets.
        # JAX stays after the captures of this T: ordering within a T would not keep it away from
        # them (its stream-polling thread runs from its first use to the end of the process);
        # CAPTURE_ERROR_MODE does.
        for name in ("torch", "torch-graph", "torch-vmap", "jax", "seed")[:(2 if smoke else 5)]:
            if budget.left() < 15:
                record(T=T, provider=name, status="skipped", reason="time budget spent")
                continue
            if name == "seed" and T > 32:
                record(T=T, provider=name, status="skipped", reason="the seed loop is timed up to T=32 (per-task cost)")
                continue
            if name == "torch-vmap" and T > 4096:
                record(T=T, provider=name, status="skipped", reason="torch-vmap timed up to T=4096")
                continue
            if name == "torch-graph" and device.type != "cuda":
                continue
            try:
                prov = get_provider("torch" if name == "torch-graph" else name)
                reason = prov.unavailable(device)
                if reason:
                    record(T=T, provider=name, status="skipped", reason=reason)
                    continue
                jax_used[0] = jax_used[0] or name == "jax"
                prepared = prov.prepare(prob)
                checked, _ = check_prepared(prov, prepared, prob)  # runs it; every task of every set vs float64
                if not checked.ok:
                    record(T=T, provider=name, status="wrong", reason=f"not timed: {checked.message}")
                    continue
                if prepared.sync is not None:  # JAX: host clock around block_until_ready; run(i) rotates
                    from bench.flops import time_calls

                    t = time_calls(prepared.run, device, sync=prepared.sync, min_time=0.1, repeats=3, warmup=1,
                                   max_time=2.0)
                    record(T=T, provider=name, ms=1e3 * t["median"], timer="host clock + block_until_ready",
                           input_sets=prob.rotations)
                else:
                    graph = name == "torch-graph"
                    rotation, last = _kept_outputs(prepared, prob.rotations)
                    ms, timer = _time_ms(rotation, device, graph=graph, sets=rotation.sets)
                    if graph:
                        # as the kernel variants': the graph replays (a capture of the provider's
                        # code, not the eager call checked above) wrote the outputs of the last
                        # captured call of each set; a replay that computes something else is no result
                        after, _ = check_prepared(prov, Prepared(last.__getitem__, prepared.to_params), prob)
                        if not after.ok:
                            record(T=T, provider=name, status="wrong", ms_not_a_result=ms,
                                   reason=f"the timed calls' outputs are wrong: {after.message}")
                            continue
                    record(T=T, provider=name, ms=ms, timer=timer, input_sets=rotation.sets)
            except Exception as exc:  # noqa: BLE001
                record_error(T, name, exc, limit=500)
        save(out, results)
    _ORACLE_FLAT.clear()
    return results["stages"]["timing"]


class _FixedDraws:
    """Meta-step t's sine tasks and plans drawn in advance (a ``loop.Sampler``): runs chunked
    differently (graph replays of 100 meta-steps, one meta-step per call) see the same data."""

    def __init__(self, iterations, device, seed=5):
        import torch

        from reptile_fast import Sine, sample_indices

        g = torch.Generator(device=device).manual_seed(seed)
        tasks = Sine(n_points=N_POINTS).sample(iterations, generator=g, device=device)
        self.x, self.y = tasks.x, tasks.y
        self.plans = sample_indices(iterations, STEPS, N_POINTS, BATCH, generator=g, device=device)

    def draw(self, first_iteration, m):
        from reptile_fast.tasks.base import TaskBatch

        rows = slice(first_iteration - 1, first_iteration - 1 + m)
        return TaskBatch.trusted(self.x[rows], self.y[rows]), self.plans[rows]


def cli_sine_row(log, out: Path, timeout: float, smoke: bool = False) -> dict:
    """The main job on the GPU: ``reptile-fast sine --device cuda --backend triton`` (the seed's
    experiment, 30000 meta-steps + the held-out evaluation) with the fused v2 stepper and CUDA
    graphs chosen through the environment; whole-process wall time and the job's metrics.
    ``smoke``: 3 meta-steps on the CPU (backend torch), to check this row's own path."""
    # The job writes five files; the device tool brings back at most 8 files from $OUT, so the run
    # goes to a temporary folder and only its metrics come back (sine_gpu_metrics.json).
    import tempfile

    with tempfile.TemporaryDirectory(prefix="reptile_fast_sine_gpu_") as tmp:  # removed after the row
        return _cli_sine_row_in(log, out, timeout, smoke, Path(tmp) / "run")


def _cli_sine_row_in(log, out: Path, timeout: float, smoke: bool, run_dir: Path) -> dict:
    env = dict(os.environ, REPTILE_FAST_TRITON_KERNEL="v2", REPTILE_FAST_TRITON_FUSED="1",
               REPTILE_FAST_TRITON_CUDA_GRAPHS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "reptile_fast", "sine", "--device", "cuda", "--backend", "triton",
           "--no-progress", "--out", str(run_dir)]
    if smoke:
        cmd[4:8] = ["--device", "cpu", "--backend", "torch", "--iterations", "3", "--eval-tasks", "2",
                    "--eval-steps", "1"]
    row = {"provider": "cli-sine-gpu", "T": 1, "command": "REPTILE_FAST_TRITON_KERNEL=v2 REPTILE_FAST_TRITON_FUSED=1 "
           "REPTILE_FAST_TRITON_CUDA_GRAPHS=1 " + " ".join(["python"] + cmd[1:])}
    t0 = time.monotonic()
    try:
        proc = _run(cmd, timeout, cwd=ROOT, env=env)
        row["wall_seconds"] = time.monotonic() - t0
        row["returncode"] = proc.returncode
        row["output_tail"] = (proc.stdout + proc.stderr)[-1500:]
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            shutil.copyfile(metrics, out / "sine_gpu_metrics.json")
            row.update({k: m.get(k) for k in ("train_seconds", "ms_per_iteration", "post_adaptation_mse", "backend",
                                               "mode", "fallback_reason", "eval_seconds")})
        if not smoke:  # a time is a result only for a trained model (the smoke's 3 meta-steps train nothing)
            from bench.main_job_wall import MAX_TRAINED_MSE

            mse = row.get("post_adaptation_mse")
            if proc.returncode != 0 or not isinstance(mse, (int, float)) or not 0 <= mse <= MAX_TRAINED_MSE:
                for k in ("wall_seconds", "train_seconds", "ms_per_iteration"):
                    if k in row:
                        row[f"{k}_not_a_result"] = row.pop(k)
                row["status"] = (f"wrong: returncode {proc.returncode}, post-adaptation MSE {mse!r} "
                                 f"(a trained model's is <= {MAX_TRAINED_MSE}); not timed")
    except subprocess.TimeoutExpired:
        row["status"] = f"timeout after {timeout:.0f} s"
    log("  " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "output_tail"))
    return row


#: fit_rows' check: the fused stepper's φ after the check's meta-steps may be at most this many
#: times as far from a float64 run on the same draws as backend torch's fp32 φ is (the benchmark
#: gate's K, ``bench.providers.GATE_K``).  A flat 1 % of φ's movement against backend torch let a
#: stepper whose ε was 0.5 % short (0.0046 of the movement) be timed (QA46); correct runs are
#: ~1e-6 (CPU smoke) to 5.6e-6 (H200) of the movement from torch's, fp32 rounding alone.
def fit_check_k() -> float:
    from bench.providers import GATE_K

    return float(GATE_K)


#: the fused stepper's precisions fit_rows checks and times on a GPU: the default, and "tf32x3"
#: (tensor cores at near-fp32 accuracy) — what the seed's setting takes when a user trades ieee's
#: last bits for time; its rows are named ``…-tf32x3``.  The CPU smoke runs the default only.
FIT_PRECISIONS = ("ieee", "tf32x3")


def fit_rows(log, device, smoke, budget):
    """``fit_rows_for`` each of ``FIT_PRECISIONS`` (the smoke: "ieee" only), while time is left."""
    rows = []
    for precision in (("ieee",) if smoke else FIT_PRECISIONS):
        if precision != "ieee" and budget.left() < 30:
            rows.append({"provider": f"fit-v2-graphs-{precision}", "T": 1, "status": "skipped",
                         "reason": "time budget spent"})
            continue
        rows.extend(fit_rows_for(log, device, smoke, budget, precision))
    return rows


def fit_rows_for(log, device, smoke, budget, precision="ieee"):
    """The seed's setting through ``Reptile.fit`` (meta-batch 1, 5 inner steps of 10 points, the
    seed's MLP): kernel v2's fused stepper at ``precision`` replaying chunks of 100 meta-steps as
    CUDA graphs, against the same stepper's plain launches (bitwise: same kernels) and backend
    a float64 run of backend torch on the same draws (at most ``fit_check_k()`` times backend torch's
    fp32 distance from it), then, only if both hold, timed over 30000
    meta-steps (the issue's goal: < 1 s of training); the plain launches are timed too at "ieee".
    Rows other than ieee's carry the precision in their names (``fit-v2-graphs-tf32x3``)."""
    import torch

    from reptile_fast import MLP, Reptile, Sine

    width, n_check, n_time, chunk = (16, 6, 12, 3) if smoke else (64, 300, 30000, 100)
    graphs = device.type == "cuda"
    fused = {"kernel": "v2", "fused": True, "chunk": chunk, "precision": precision}
    suffix = "" if precision == "ieee" else f"-{precision}"
    rows = []

    def trainer(backend, options):
        torch.manual_seed(0)
        return Reptile(MLP(1, width, 1).to(device), backend=backend, backend_options=options)

    def phi(t):
        return torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])

    row = {"provider": f"fit-v2-graphs-check{suffix}", "T": 1, "meta_steps": n_check, "precision": precision}
    try:
        draws = _FixedDraws(n_check, device)
        runs = {}
        for name, backend, options in (("graphs", "triton", {**fused, "cuda_graphs": graphs}),
                                       ("launches", "triton", fused), ("torch", "torch", None)):
            t = trainer(backend, options)
            hist = t.fit(None, n_check, sampler=draws, progress=False, handle_signals=False)["loss"]
            runs[name] = (phi(t), hist, t.last_fit_stats)
        row["mode"] = runs["graphs"][2]["mode"]
        row["fallback_reason"] = runs["graphs"][2]["fallback_reason"]
        row["bitwise_graphs_vs_launches"] = bool(torch.equal(runs["graphs"][0], runs["launches"][0])
                                                 and runs["graphs"][1] == runs["launches"][1])
        row["phi_max_abs_vs_torch"] = float((runs["graphs"][0] - runs["torch"][0]).abs().max())
        row["phi_max_abs_torch_scale"] = float(runs["torch"][0].abs().max())
        row["loss_max_abs_vs_torch"] = max(abs(a - b) for a, b in zip(runs["graphs"][1], runs["torch"][1]))
        # How far φ is from backend torch's, relative to how far torch's φ moved from the start
        # (recorded: φ left unchanged scores 1, half the inner learning rate about 0.5)
        moved = runs["torch"][0] - phi(trainer("torch", None))
        row["phi_rel_vs_torch_movement"] = float((runs["graphs"][0] - runs["torch"][0]).norm() / moved.norm())
        # The gate: the float64 oracle of the same fp32 inputs and initial φ (backend torch in
        # float64), and how far a correct fp32 implementation (backend torch) lands from it
        torch.manual_seed(0)
        oracle = Reptile(MLP(1, width, 1).double().to(device), backend="torch")
        from bench.providers import Float64Draws

        oracle.fit(None, n_check, sampler=Float64Draws(draws), progress=False, handle_signals=False)
        phi64 = phi(oracle)
        row["phi_err_vs_float64"] = float((runs["graphs"][0].double() - phi64).norm())
        row["torch_fp32_err_vs_float64"] = float((runs["torch"][0].double() - phi64).norm())
        row["allowed_err"] = fit_check_k() * row["torch_fp32_err_vs_float64"]
        row["ok"] = bool(row["bitwise_graphs_vs_launches"] and torch.isfinite(runs["graphs"][0]).all()
                         and row["phi_err_vs_float64"] <= row["allowed_err"])
    except Exception as exc:  # noqa: BLE001 - recorded; timing still runs
        row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        row["ok"] = False
        log(traceback.format_exc())
    rows.append(row)
    log("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    check = row
    timed = [("fit-v2-graphs", {**fused, "cuda_graphs": graphs}, n_time)]
    if precision == "ieee":
        timed.append(("fit-v2-launches", fused, n_time // 10))
    for name, options, iterations in timed:
        name += suffix
        if not check["ok"]:
            reason = check.get("error") or (f"bitwise graphs vs launches {check.get('bitwise_graphs_vs_launches')}, "
                                            f"φ {check.get('phi_err_vs_float64'):.3g} from the float64 run "
                                            f"(allowed {check.get('allowed_err'):.3g}: {fit_check_k():g}× "
                                            f"backend torch's fp32 error)")
            rows.append({"provider": name, "T": 1, "status": "wrong", "reason": f"not timed: the check failed: {reason}"})
            continue
        if budget.left() < 20:
            rows.append({"provider": name, "T": 1, "status": "skipped", "reason": "time budget spent"})
            continue
        row = {"provider": name, "T": 1, "meta_steps": iterations, "precision": precision}
        try:
            trainer("triton", options).fit(Sine(), 2 * chunk, progress=False, handle_signals=False,
                                           draw_chunks=True)  # compile
            t = trainer("triton", options)
            g = torch.Generator(device=device).manual_seed(3)
            # a chunk's draws at once, on the device (as the CLI job draws): one draw per graph replay
            t.fit(Sine(), iterations, generator=g, progress=False, handle_signals=False, draw_chunks=True)
            st = t.last_fit_stats
            row.update(mode=st["mode"], fallback_reason=st["fallback_reason"], train_seconds=st["train_seconds"],
                       ms=st["ms_per_iteration"], reads_every=st.get("log_every"),
                       finite=bool(torch.isfinite(phi(t)).all()),
                       timer="host clock around Reptile.fit's loop (draws, copies, replays, reads)")
            if name.startswith("fit-v2-graphs"):
                row["seed_setting_30000_s"] = 30000 * st["ms_per_iteration"] / 1e3
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            log(traceback.format_exc())
        rows.append(row)
        log("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return rows


#: what the graphed whole meta-step runs: kernel v2's fused meta-step at ``V.meta_step``'s defaults
#: (ieee, ``V2Config()``), checked as the "v2-meta" variant is
FULL_VARIANT = ("v2-meta-graph-full", "v2", "ieee", "meta")


def check_full_meta_step(dims, x, y, plan, phi_before, phi_after):
    """Why ``phi_after`` is not the v2 meta-step of ``phi_before`` on the tasks ``x``, ``y`` and
    plans ``plan`` that a replay of the graphed whole meta-step sampled (read back from the graph's
    memory), or None: ``check_variant``'s meta-level check (``FULL_VARIANT``: the fp32 bound)
    against the float64 oracle (``bench.providers.float64_updates``) of these tasks, plans and φ.
    Where float64 alone allows more than ``GATE_CAP`` (large T), kernel v2's inner loop on the
    same data, itself checked per task against the oracle, gives the mean it is compared with, as
    in the timing stage."""
    import torch

    from bench.providers import float64_updates
    from reptile_fast import MLP
    from reptile_fast.kernels import mlp_meta_step_v2 as V
    from reptile_fast.tasks.base import TaskBatch

    with torch.random.fork_rng(devices=[]):  # its initial values are replaced: the RNG's state is kept
        model = MLP(dims[0], output_dim=dims[-1], hidden_dims=list(dims[1:-1]), activation=ACTS[0])
    model = model.to(phi_before.device)
    with torch.no_grad():
        for p, v in zip(model.parameters(), V.unflatten_params(phi_before, dims)):
            p.copy_(v)
    tasks = TaskBatch(x, y)
    oracle = float64_updates(model, x, y, plan, LR)
    try:
        why = check_variant(FULL_VARIANT, phi_after, model, tasks, plan, phi_before, oracle)
        if why is None or not why.startswith("cannot be verified") or "no checked inner variant" not in why:
            return why
        n = V.n_flat_params(dims)
        adapted, _ = V.inner_loop(x, y, plan, phi_before, dims, ACTS[:len(dims) - 2] + ("identity",), lr=LR)
        inner = ("v2", "v2", FULL_VARIANT[2], "inner")
        wrong = check_variant(inner, adapted[:, :n], model, tasks, plan, phi_before, oracle)
        if wrong:
            return f"{why}; its inner variant on the same tasks does not verify it: {wrong}"
        inner_mean = (adapted[:, :n].double() - phi_before.double()).mean(0)
        return check_variant(FULL_VARIANT, phi_after, model, tasks, plan, phi_before, oracle, inner_mean=inner_mean)
    finally:  # used once: its flat form (2.3 GB at T = 65536) leaves check_variant's cache
        _ORACLE_FLAT.pop(id(oracle), None)


def _capture_graph(fn):
    """A CUDA graph of ``fn()``, captured on the current stream: each replay runs what it launched."""
    import torch

    g = torch.cuda.CUDAGraph()
    with _capture(torch.cuda.graph, g):  # as the timers' captures (CAPTURE_ERROR_MODE)
        fn()
    return g


def _graphed_full_meta_step(T, device, dims, replays=20, check=None):
    """The whole v2 meta-step in one CUDA graph, checked and timed: sine tasks and plans sampled
    on the device (default CUDA RNG, fresh each replay), the fused v2 meta-step, φ copied back; ε
    a device tensor.

    Nothing is timed before it is checked: the replay before the timed ones and one after them
    are each checked (``check(dims, x, y, plan, φ before, φ after)``, None: the module's
    ``check_full_meta_step``: the tasks and plans are read back from the graph's memory, where
    every replay writes them; φ before is copied outside the graph, so the graph and its timing
    are what they were).

    Returns ``{"ms": ms per meta-step of ``replays`` replays between events, or None when the
    replay before them is wrong (not timed), "wrong": None or why a checked replay is not a
    result}``; with "wrong" set, "ms" is no result."""
    import torch

    from reptile_fast.kernels import mlp_meta_step_v2 as V

    check = check_full_meta_step if check is None else check
    n = V.n_flat_params(dims)
    phi = torch.randn(n, device=device) * 0.1
    new = torch.empty_like(phi)
    eps = torch.full((1,), EPS, device=device)
    grid = torch.linspace(-5, 5, N_POINTS, device=device)
    acts = ACTS[:len(dims) - 2] + ("identity",)
    seen = {}  # the last sampled tasks and plans: the graph's own tensors after its capture

    def step():
        u = torch.rand(2, T, 1, device=device)
        amp, phase = 0.1 + 4.9 * u[0], math.pi * 2 * u[1]
        x = grid.expand(T, N_POINTS).unsqueeze(-1).contiguous()
        y = (amp * torch.sin(grid + phase)).unsqueeze(-1)
        plan = torch.rand(T, STEPS, N_POINTS, device=device).argsort(-1)[..., :BATCH]
        seen.update(x=x, y=y, plan=plan)
        V.meta_step(x, y, plan, phi, dims, acts, lr=LR, eps=eps, out=new, check_values=False)
        phi.copy_(new)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = _capture_graph(step)
    before = torch.empty_like(phi)

    def checked_replay():
        before.copy_(phi)
        g.replay()
        torch.cuda.synchronize()
        return check(dims, seen["x"], seen["y"], seen["plan"], before, phi)

    wrong = checked_replay()
    if wrong:
        return {"ms": None, "wrong": f"the replay before the timed ones: {wrong}"}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / replays
    wrong = checked_replay()
    return {"ms": ms, "wrong": f"the replay after the timed ones: {wrong}" if wrong else None}


#: a tool run gets at least this many seconds, else it is skipped ("time budget spent")
TOOL_MIN_SECONDS = 8


def stage_tools(log, out, device, tool_name, timeout, tools, on_result=None):
    """compute-sanitizer (memcheck / initcheck / synccheck) or ncu over `--target tiny|profile`.

    timeout: seconds per tool run, or a callable giving them when each run starts (so a later run
    gets what the budget has left, and is skipped when that is below ``TOOL_MIN_SECONDS``); on_result: called with
    the results so far after each run (the caller saves them: a run cut by the deadline keeps the
    runs before it)."""
    exe = find_tool("compute-sanitizer" if tool_name != "ncu" else "ncu")
    if device.type != "cuda" or exe is None:
        return {"status": "skipped", "reason": "needs CUDA and the tool" + ("" if exe else " (not found)")}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = {}
    logf = out / ("ncu.log" if tool_name == "ncu" else "sanitizer.log")
    for tool in tools:
        seconds = timeout() if callable(timeout) else timeout
        if callable(timeout) and seconds < TOOL_MIN_SECONDS:
            res[tool] = {"status": "skipped", "reason": f"time budget spent ({max(0.0, seconds):.0f} s left for it)"}
            log(f"  {tool}: skipped, {res[tool]['reason']}")
            if on_result:
                on_result(dict(res))
            continue
        if tool_name == "ncu":
            # the shared-memory metrics in a pass of their own: a metric this ncu does not know
            # fails only that pass, not the sections'
            what = (["--section", "SpeedOfLight", "--section", "Occupancy", "--section", "WarpStateStats",
                     "--section", "SchedulerStats"] if tool == "ncu"
                    else ["--metrics", ",".join(NCU_SHARED_METRICS), "--print-units", "base"])
            cmd = [exe, *what, "--clock-control", "none",
                   "-k", "regex:_meta_step_kernel", "--launch-count", str(len(PROFILED)),
                   sys.executable, "-m", "bench.gpu_check", "--target", "profile", str(out)]
        else:
            cmd = [exe, "--tool", tool, "--error-exitcode", "9", sys.executable, "-m", "bench.gpu_check",
                   "--target", "tiny", str(out)]
        t0 = time.monotonic()
        # its own process group: on a timeout the tool *and* the python it runs are killed (killing
        # only the tool can leave that python on the GPU through ncu and the session's sweep)
        proc = _start(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=seconds)
            text, rc = stdout + stderr, proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            text = (stdout or "") + (stderr or "")
            rc = f"timeout after {seconds:.0f} s"
        _CHILDREN.discard(proc)
        with open(logf, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{text}\n[rc {rc}]\n\n")
        summary = tool_summary(text, limit=64 if tool_name == "ncu" else 24)
        res[tool] = {"returncode": rc, "seconds": round(time.monotonic() - t0, 1), "summary": summary,
                     "tail": text[-1500:]}
        if tool == "ncu-shared":
            res[tool]["table"] = ncu_metric_table(text)
        log(f"  {tool}: rc {rc}; " + " | ".join(summary[:8]))
        if on_result:
            on_result(dict(res))
    return res


def ncu_metric_table(text: str) -> list:
    """ncu's ``--metrics`` output (``--print-units base``: counts as counts, durations in ns) per profiled
    kernel, in launch order, paired with ``PROFILED``:
    ``[{"variant", "T", "kernel": the kernel's line, "metrics": {name: number}}]`` (ncu prints one
    block per kernel -- its line, then ``name [unit] value`` rows -- and the launches are
    ``PROFILED`` in order; a block beyond ``PROFILED`` gets no variant)."""
    blocks = []
    for line in text.splitlines():
        if re.match(r"\s*_meta_step_kernel \(", line):
            blocks.append({"kernel": line.strip(), "metrics": {}})
        elif blocks and (m := re.match(r"\s*([a-z][a-z0-9_]*__[a-z0-9_.]+)\s+(?:\S+\s+)?([\d,]+(?:\.\d+)?)\s*$", line)):
            blocks[-1]["metrics"][m.group(1)] = float(m.group(2).replace(",", ""))  # base units (--print-units)
    for i, b in enumerate(blocks):
        b["variant"], b["T"] = PROFILED[i] if i < len(PROFILED) else (None, None)
    return blocks


#: a tool's lines that say it could not do its job (ncu's "==ERROR== ERR_NVGPUCTRPERM ...",
#: "==WARNING== No kernels were profiled.", compute-sanitizer's "========= Error: ...")
_TOOL_PROBLEMS = ("==ERROR==", "==WARNING==", "========= Error", "========= Target application")
#: a tool's figures kept for the summary, per profiled kernel in ncu's order: compute-sanitizer's
#: error count; ncu's SpeedOfLight headline (Memory and Compute (SM) Throughput, Duration) and
#: Occupancy (Theoretical, Achieved); the kernel's line (name, grid x block, "Context 1, ...")
_TOOL_FIGURES = ("ERROR SUMMARY", "Duration", "Memory Throughput", "Compute (SM) Throughput",
                 "Theoretical Occupancy", "Achieved Occupancy", "Registers Per Thread", ", Context ",
                 # WarpStateStats / SchedulerStats: cycles between a warp's instructions, issue slots
                 # used, and the rule text naming the stall that dominates
                 "Warp Cycles Per Issued Instruction", "Issued Warp Per Scheduler", "No Eligible",
                 "cycles being stalled",
                 # the ncu-shared pass: shared-memory wavefronts, bank conflicts, instructions
                 "mem_shared_op_", "sass__inst_executed_shared_", "gpu__time_duration")


def tool_summary(text: str, limit: int = 24) -> list:
    """The lines of compute-sanitizer's or ncu's text output worth a summary, stripped: first
    any line saying the tool could not do its job (``_TOOL_PROBLEMS``), then its figures
    (``_TOOL_FIGURES``), at most ``limit`` in all.  (Matching every "Throughput" kept ncu's DRAM,
    L1 and L2 lines, 6 per kernel, and the summary's first four lines never reached the
    occupancy nor an "==ERROR==" saying why nothing was measured.)"""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    problems = [line for line in lines if line.startswith(_TOOL_PROBLEMS)]
    figures = [line for line in lines if not line.startswith(_TOOL_PROBLEMS) and any(k in line for k in _TOOL_FIGURES)]
    return (problems[:limit // 3] + figures)[:limit]


#: what ncu profiles (``run_target("profile")``), in launch order: (variant, T); each launches
#: ``_meta_step_kernel`` (the kernel ncu's filter selects) once: ``profile_launch``
PROFILED = (("v2-meta", 4096), ("v2-bm-meta", 4096), ("v2-3d-meta", 4096), ("v2s-meta", 4096), ("v2-meta", 1),
            ("v2-bm-meta", 1))
#: the second ncu pass's metrics (``ncu-shared``): shared-memory wavefronts and the bank conflicts
#: among them (wavefronts beyond the minimum an access needs), per load / store instruction
NCU_SHARED_METRICS = ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
                      "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
                      "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
                      "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
                      "sass__inst_executed_shared_loads", "sass__inst_executed_shared_stores",
                      "gpu__time_duration.sum")


def profile_launch(name: str, T: int, device, prob):
    """The call ncu profiles for a ``PROFILED`` entry on ``prob`` (``problem(T, ...)``): at T = 1 the
    one-task guarded meta-step -- the one launch the seed's fused stepper replays (update and guard
    from the program's registers) -- with the variant's config; else the variant's ``launcher``."""
    import torch

    _, tasks, plan, params, phi = prob
    variant = next(v for v in VARIANTS if v[0] == name)
    if T != 1:
        return launcher(variant, T, device, DIMS, tasks, plan, params, phi)
    from reptile_fast.kernels import meta_step_guard as G
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    def fn():
        V.guarded_meta_step(tasks.x, tasks.y, plan, phi.clone(), DIMS, ACTS, lr=LR, eps=EPS, state=G.new_state(device),
                            iteration=torch.ones(1, dtype=torch.int64, device=device),
                            loss_out=torch.empty(1, device=device), precision=variant[2],
                            config=v2_config(variant[1]), check_values=False)
    return fn


def run_target(kind: str) -> int:
    """Child process for the sanitizer ("tiny": every variant at T=16, each launched twice) and
    ncu ("profile": ``PROFILED``, each launched once).

    Sizes whose Triton specialisations stages 3-4 compiled already (T = 64, 4096: task and program
    counts divisible by 16), so the child loads them from Triton's disk cache instead of compiling
    ~15 kernels inside the tool's time cap (T=3 would be a new specialisation of every kernel)."""
    import torch

    device = torch.device("cuda")
    if kind == "profile":
        # ncu profiles every _meta_step_kernel launch here (PROFILED order), each launched once:
        # at T = 4096 what limits throughput, at T = 1 (the seed's one-launch guarded meta-step:
        # one program alone on its SM) what limits latency -- WarpStateStats says what warps wait on
        problems = {T: problem(T, device, seed=3) for T in sorted({T for _, T in PROFILED})}
        for name, T in PROFILED:
            profile_launch(name, T, device, problems[T])()
            torch.cuda.synchronize()
            print(f"[target {kind}] {name} T={T}: ran once", flush=True)
        return 0
    T = 16
    model, tasks, plan, params, phi = problem(T, device, seed=3)
    for variant in VARIANTS:
        fn = launcher(variant, T, device, DIMS, tasks, plan, params, phi)
        fn()
        fn()
        torch.cuda.synchronize()
        # one line per variant: a tool stopped at its time cap still shows in sanitizer.log / ncu.log
        # which variants it covered (its error summary comes only at the end)
        print(f"[target {kind}] {variant[0]} T={T}: ran twice", flush=True)
    if kind == "tiny":
        # the paths QA29's race fixes touched (synccheck: barriers inside loops), compiled by stage 3:
        # the streamed layers with the sums in registers, and one program finishing a meta-step
        from reptile_fast.kernels import meta_step_guard as G
        from reptile_fast.kernels import mlp_meta_step_v2 as V

        cfg = V.V2Config(stream=True, accumulate="registers")
        for _ in range(2):
            V.meta_step(tasks.x, tasks.y, plan, phi, DIMS, ACTS, lr=LR, eps=EPS, config=cfg)
        _, t1, p1, _, phi1 = problem(1, device, seed=8)
        V.guarded_meta_step(t1.x, t1.y, p1, phi1.clone(), DIMS, ACTS, lr=LR, eps=EPS, state=G.new_state(device),
                            iteration=torch.ones(1, dtype=torch.int64, device=device),
                            loss_out=torch.empty(1, device=device))
        torch.cuda.synchronize()
        print(f"[target {kind}] v2s-registers T={T} and v2-guarded T=1: ran", flush=True)
    return 0


# ------------------------------------------------------------------------------------- summary
def summary_lines(results: dict) -> list:
    env = results["stages"].get("env") or {}
    lines = [f"GPU check — {env.get('gpu') or env.get('cpu')} ({env.get('sms', '?')} SMs) — torch {env.get('torch')}, "
             f"triton {env.get('triton')}, jax {env.get('jax')} — {env.get('date')}", f"mode: {env.get('mode')}"]
    for name, st in results["stages"].items():
        status = st.get("status") if isinstance(st, dict) else None
        lines.append(f"stage {name}: {status or 'done'} ({results['seconds'].get(name, '?')} s)")
    comp = (results["stages"].get("compile") or {}).get("rows") or []
    if comp:
        lines.append("compile (sm_XXa): kernel case precision mode warps -> regs, spill B, shared B, mma/wgmma, "
                     "ex2.approx, div.full, largest inner loop: instructions/barriers")
        for r in comp[:40]:
            p = r.get("ptx", {})
            loop = (r.get("sass") or {}).get("loop") or {}
            lines.append(f"  {r['kernel']} {r['case']} {r['precision']} {r['mode']} w{r['num_warps']} -> "
                         + (r["error"][:80] if "error" in r else
                            f"{r.get('registers')} regs, {r.get('spill_store_bytes')} B, {r.get('shared_bytes')} B, "
                            f"{p.get('mma')}/{p.get('wgmma')}, {p.get('ex2.approx')}, {p.get('div.full')}, "
                            f"{loop.get('instructions', '?')}/{loop.get('BAR', '?')}"))
    corr = (results["stages"].get("correctness") or {}).get("rows") or []
    for r in corr:
        if "error" in r:
            lines.append(f"correctness {r['variant']}: ERROR {r['error'][:120]}")
        elif r["variant"] == "special-functions":
            lines.append("special functions, max rel. error (2^-23 units) / bound: " + ", ".join(
                f"{k} {v['max_rel_err_in_2^-23']:.2f}/{v['stated_bound']}" for k, v in r.items() if isinstance(v, dict)))
        else:
            keys = ("ok_rtol1e-5", "max_abs_vs_ref32", "rel_vs_f64", "max_abs_vs_trainer", "unwritten", "deterministic",
                    "bitwise_vs_three_launches", "accepted", "runs", "bitwise", "max_abs_diff")
            lines.append(f"correctness {r['variant']}: " + ", ".join(
                f"{k} {r[k]:.2g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in keys if k in r))
    timing = (results["stages"].get("timing") or {}).get("rows") or []
    if timing:
        provs = []
        for r in timing:
            if r["provider"] not in provs and r["provider"] != "*" and not r["provider"].startswith(("fit-", "cli-")):
                provs.append(r["provider"])
        Ts = sorted({r["T"] for r in timing})
        lines.append(f"tasks/s (kernel alone: CUDA graph + events, rotating over "
                     f"{(results['stages'].get('timing') or {}).get('rotations', 1)} input sets; "
                     f"% = of the fp32 matmul rate):")
        lines.append(f"  {'provider':>18} " + " ".join(f"{'T=' + str(T):>20}" for T in Ts))
        for p in provs:
            cells = []
            for T in Ts:
                r = next((r for r in timing if r["provider"] == p and r["T"] == T), None)
                if r is None or "tasks_per_s" not in r:
                    cells.append(f"{(r or {}).get('status', '-'):>20}")
                else:
                    cells.append(f"{r['tasks_per_s']:>12,.0f} {r.get('pct_fp32_matmul_peak', 0):>6.2f}%")
            lines.append(f"  {p:>18} " + " ".join(cells))
        caps = (results["stages"].get("timing") or {}).get("capture_failures") or []
        if caps:  # and what still worked after each (_recover_after_capture)
            lines.append("  failed CUDA-graph captures: " + "; ".join(
                f"{c['provider']} at T={c['T']} (after it: "
                + ", ".join(f"{k} {c[k]}" for k in ("cuda_usable", "jax_usable") if k in c) + ")" for c in caps))
            after = [f"{r['provider']} T={r['T']}" for r in timing if r.get("after_failed_capture")]
            if after:
                lines.append("  errors after a failed capture: " + ", ".join(after))
        lines.append("  targets at T=4096: >= 10x torch-vmap, >= 3x torch, >= 3x jax, >= 30% of fp32 peak; "
                     "T=1: >= 50x the seed loop")

        def rate(p, T):
            r = next((r for r in timing if r["provider"] == p and r["T"] == T and "tasks_per_s" in r), None)
            return r["tasks_per_s"] if r else None

        def precision(p):
            return "tf32x3" if "tf32x3" in p else "tf32" if "tf32" in p else "ieee"

        # per precision: the fastest variant overall is a tf32 one, whose error (~2e-5) is not the
        # exact default's (a single "fastest" line read as if ieee met what only tf32 met)
        for T, base in ((4096, ("torch-vmap", "torch", "torch-graph", "jax")), (1, ("seed", "torch"))):
            for prec in ("ieee", "tf32x3", "tf32"):
                best = max(((rate(p, T), p) for p in provs
                            if p.startswith("v") and precision(p) == prec and rate(p, T)), default=None)
                if best:
                    ratios = ", ".join(f"{best[0] / rate(b, T):.1f}x {b}" for b in base if rate(b, T))
                    lines.append(f"  T={T}: fastest {prec} Triton variant {best[1]}: {ratios or 'no baseline timed'}")
        # a kernel change against the kernel without it, timed in this run (V2Config.transpose,
        # V2Config.flat)
        for what, new, old in (("wide x wide products feature-major", "v2", "v2-bm"),
                               ("wide x wide products feature-major", "v2-meta", "v2-bm-meta"),
                               ("1-wide layers in 2-D", "v2-bm", "v2-3d"),
                               ("1-wide layers in 2-D", "v2-bm-meta", "v2-3d-meta"),
                               ("both", "v2", "v2-3d"), ("both", "v2-meta", "v2-3d-meta")):
            pairs = [f"T={T} {rate(new, T) / rate(old, T):.2f}x" for T in sorted({r["T"] for r in timing})
                     if rate(new, T) and rate(old, T)]
            if pairs:
                lines.append(f"  {what} ({new}) against not ({old}), tasks/s ratio: " + ", ".join(pairs))
        for check in (r for r in timing if r["provider"].startswith("fit-v2-graphs-check")):
            lines.append(f"  Reptile.fit, seed setting, fused v2 stepper ({check.get('precision', 'ieee')}): " + ", ".join(
                f"{k} {check[k]}" for k in ("ok", "mode", "bitwise_graphs_vs_launches", "phi_max_abs_vs_torch",
                                            "phi_rel_vs_torch_movement", "fallback_reason", "error")
                if check.get(k) is not None))
        cli = next((r for r in timing if r["provider"] == "cli-sine-gpu"), None)
        if cli:
            lines.append("  main job on the GPU (reptile-fast sine, fused v2 + graphs): " + ", ".join(
                f"{k} {cli[k]:.4g}" if isinstance(cli.get(k), float) else f"{k} {cli.get(k)}"
                for k in ("wall_seconds", "train_seconds", "post_adaptation_mse", "mode", "returncode", "status")
                if cli.get(k) is not None))
        for name in ("fit-v2-graphs", "fit-v2-launches", *(f"fit-v2-graphs-{p}" for p in FIT_PRECISIONS[1:])):
            r = next((r for r in timing if r["provider"] == name and "ms" in r), None)
            if r:
                lines.append(f"  {name}: {r['ms']:.4f} ms per meta-step ({r['mode']}) -> 30000 meta-steps "
                             f"{30 * r['ms']:.2f} s of training (goal < 1 s)")
        full = next((r for r in timing if r["provider"] == "v2-meta-graph-full" and r["T"] == 1 and "ms" in r), None)
        if full:
            lines.append(f"  the seed's setting (meta-batch 1, 30000 meta-steps) as one graphed meta-step each: "
                         f"{full['ms']:.4f} ms -> {30 * full['ms']:.2f} s of training (goal < 1 s)")
    for name in ("sanitizer", "ncu"):
        st = results["stages"].get(name) or {}
        for tool, r in st.items():
            if isinstance(r, dict) and r.get("status") == "skipped":
                lines.append(f"{tool}: skipped ({r.get('reason')})")
            elif isinstance(r, dict) and r.get("table"):  # ncu-shared: one line per profiled launch
                for row in r["table"]:
                    m = row["metrics"]
                    lines.append(f"{tool} {row['variant']} T={row['T']}: " + ", ".join(
                        f"{what} {m[k]:,.0f}" for what, k in (
                            ("shared ld wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"),
                            ("of them bank conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"),
                            ("st wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum"),
                            ("st conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"),
                            ("ld instructions", "sass__inst_executed_shared_loads"),
                            ("ns", "gpu__time_duration.sum")) if k in m))
            elif isinstance(r, dict):
                lines.append(f"{tool}: rc {r.get('returncode')} " + " | ".join(s.strip() for s in r.get("summary", [])[:7]))
            elif tool == "reason":  # skipped, or the stage's error / the deadline's cut
                lines.append(f"{name}: {st.get('status', 'skipped')} ({r})")
    return lines


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.monotonic(), seconds

    def elapsed(self):
        return time.monotonic() - self.t0

    def left(self):
        return self.seconds - self.elapsed()


#: the stages' numbers (``--stages``)
STAGE_NUMBERS = ("1", "2", "3", "4", "5", "6")
#: exit code of a run that ended but where a stage raised (its results are in results.json)
EXIT_STAGE_ERROR = 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description="The first GPU run, six stages.")
    ap.add_argument("out", help="output directory (the device tool's $OUT)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, Triton interpreter")
    ap.add_argument("--budget", type=float, default=None, help="seconds in all (default 345 on a GPU, 240 smoke)")
    ap.add_argument("--stages", default="1,2,3,4,5,6", help="comma-separated stage numbers to run")
    ap.add_argument("--target", choices=("tiny", "profile"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # a name or a number outside 1-6 ran nothing, or dropped a stage, and exited 0: a GPU call
    # spent on nothing, reported as success (QA64).  "" asks for no stage (the tests' deadline checks)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGE_NUMBERS]
    if unknown:
        ap.error(f"--stages takes stage numbers among {','.join(STAGE_NUMBERS)}, comma-separated; got "
                 f"{args.stages!r}" + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else ""))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.target:
        return run_target(args.target)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports a kernel module
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    budget = Budget(args.budget or (240 if args.cpu_smoke else 345))
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        log("no CUDA device: run with --cpu-smoke for the CPU smoke test")
        return 2
    else:
        device = torch.device("cuda")
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    results = {"stages": {}, "seconds": {}, "budget_s": budget.seconds}
    correctness_rows = []  # stage 3's rows as they are made (in results while it runs)
    # the hard end of a run that cannot end by itself (a hung GPU call): DEADLINE_GRACE s past the
    # budget, before the device tool's limit for a "<= 6 minutes" run (give it timeout_s >= 360)
    deadline = Deadline(budget.seconds + DEADLINE_GRACE, out, results, log, elapsed=budget.elapsed()).start()
    try:
        # (number, name, function, cap in seconds on a GPU)
        def save_tool_results(name):
            def on_result(partial):  # a stage's tool runs so far, saved as each one ends
                results["stages"][name] = {**partial, "status": "running"}
                save(out, results)
            return on_result

        stages = [
            ("1", "env", lambda: stage_env(log, device, args.cpu_smoke), 30),
            ("2", "compile", lambda: BackgroundCompile(log, out, device, args.cpu_smoke,
                                                       90 if args.cpu_smoke else min(110, max(20, budget.left() - 220))),
             110),
            ("3", "correctness", lambda: stage_correctness(log, device, args.cpu_smoke, correctness_rows), 60),
            ("4", "timing", lambda: stage_timing(log, device, args.cpu_smoke, Budget(min(170, max(10, budget.left() - 75))),
                                                 results, out), 170),
            ("5", "sanitizer", lambda: stage_tools(log, out, device, "sanitizer", max(10, min(40, (budget.left() - 45) / 3)),
                                                   ("memcheck", "initcheck", "synccheck")), 120),
            # two passes, each given what the budget has left when it starts (at most 30 s), each
            # saved as it ends
            ("6", "ncu", lambda: stage_tools(log, out, device, "ncu", lambda: min(30.0, budget.left() - 5),
                                             ("ncu", "ncu-shared"), on_result=save_tool_results("ncu")), 60),
        ]
        pending = []  # stage 2's compile, running beside stage 3

        def join_compile():
            if pending:
                deadline.stage = "compile"
                compile_ = pending.pop()
                log(f"== stage 2: compile, joined [{budget.elapsed():.0f} s]")
                try:
                    results["stages"]["compile"] = compile_.finish(log)
                except Exception as exc:  # noqa: BLE001
                    results["stages"]["compile"] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                results["seconds"]["compile"] = round(time.monotonic() - compile_.t0, 1)
                save(out, results)

        for number, name, fn, _cap in stages:
            if number not in wanted:
                continue
            if number >= "4":
                join_compile()
            log(f"== stage {number}: {name} [{budget.elapsed():.0f} s]")
            t0 = time.monotonic()
            deadline.stage = name
            if name == "correctness":
                results["stages"][name] = {"status": "running", "rows": correctness_rows}
            if budget.left() < 5:
                results["stages"][name] = {"status": "skipped", "reason": "time budget spent"}
            else:
                try:
                    result = fn()
                    if isinstance(result, BackgroundCompile):
                        pending.append(result)
                        results["stages"][name] = {"status": "running beside stage 3"}
                        continue
                    results["stages"][name] = result
                except Exception as exc:  # noqa: BLE001 - the other stages still run
                    log(f"  {name} ERROR {type(exc).__name__}: {exc}")
                    log(traceback.format_exc())
                    prev = results["stages"].get(name)
                    results["stages"][name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                    if isinstance(prev, dict) and prev.get("rows"):  # the rows made before the error
                        results["stages"][name]["rows"] = prev["rows"]
            results["seconds"][name] = round(time.monotonic() - t0, 1)
            save(out, results)
        join_compile()
        deadline.stage = None
        results["seconds"]["total"] = round(budget.elapsed(), 1)
        try:
            lines = summary_lines(results)
        except Exception as exc:  # noqa: BLE001
            lines = [f"summary ERROR {type(exc).__name__}: {exc}"]
            log(traceback.format_exc())
        results["summary"] = lines
        with SAVE_LOCK:  # the deadline's files or these, never a mix
            save(out, results)
            (out / "summary.txt").write_text("\n".join(lines) + "\n")
            deadline.done = True
        log("")
        for line in lines:
            log(line)
        failed = [name for name, r in results["stages"].items() if isinstance(r, dict) and r.get("status") == "error"]
        if failed:  # every stage still ran and saved; the exit code says one of them raised (QA64)
            log(f"exit code {EXIT_STAGE_ERROR}: stage(s) {', '.join(failed)} raised (see results.json)")
            return EXIT_STAGE_ERROR
        return 0
    finally:
        deadline.cancel()  # a run that ended (or raised) must not be ended later by the timer


if __name__ == "__main__":
    raise SystemExit(main())
