"""Kernel v2's launch settings swept on a GPU, to choose its defaults from measurements.

    PYTHONPATH=. python -m bench.gpu_sweep OUT_DIR               # one H100/H200, <= ~4 minutes
    PYTHONPATH=. python -m bench.gpu_sweep --cpu-smoke OUT_DIR   # anywhere: tiny sizes, interpreter

The GPU check (``bench/gpu_check.sh``) times each kernel variant at its default settings; this
sweeps the settings ``V2Config`` exposes -- warps per program, programs per SM (the persistent
grid), where a program accumulates its tasks' updates, streamed wide layers, how minibatches are
loaded (the whole plan up front, or prefetched a step ahead) -- for the fused
meta-step (``meta_step``: T = 4096 and 65536 tasks) and for the seed's setting (``guarded_meta_step``
at T = 1, one launch, what the fused CUDA-graph stepper replays), sine MLP 1-64-64-1, 5 inner
steps of 10 points, precision "ieee".  Before it is timed, every setting's outer update (the
default's included) is checked against a float64 oracle (``bench.gpu_check.check_variant``), and
its φ against the default setting's (the settings change only the order of the outer sum: equal
within fp32 rounding of a T-term mean, rtol 1e-5 / atol 1e-6), so no wrong answer is timed;
at T > 1 the timed calls' (graph replays') outputs are checked the same way after the timing, and a
setting whose replays compute something else is recorded as wrong, its time kept apart.
Every setting runs on the GPU check's rotating input sets (``ROTATIONS``; each checked, each
timed call runs every set once).

Timing: ``triton.testing.do_bench_cudagraph`` (a CUDA graph of launches, CUDA events).  Writes
``OUT_DIR/sweep.json`` after every T (a kill loses at most one T) and prints the table, best first.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

SWEEP_T = (1, 4096, 65536)


#: the settings swept by default (``--warps``, ``--per-sm``, ``--accumulate``, ``--stream``, ``--preload``,
#: ``--flat``, ``--transpose``, ``--max-registers`` narrow or widen them); "default" in ``accumulate`` /
#: ``preload`` / ``flat`` / ``transpose`` / ``max_registers``: the kernel's own choice (the field left out)
GRID = {"warps": (4, 8), "accumulate": ("registers", "memory"), "stream": (False, True), "per_sm": (1, 2, 4, 8),
        "preload": ("default", "prefetch"), "flat": ("default",), "transpose": ("default",),
        "max_registers": ("default",)}


def settings(T: int, smoke: bool, precision: str = "ieee", grid=None):
    """V2Config keyword sets for T tasks: the default first (the correctness baseline).

    ``grid``: ``GRID``'s keys, each a tuple of values ("default" in ``accumulate`` / ``preload``: the
    kernel's own choice, the field left out).  Streamed layers are exact fp32 whatever the precision,
    so with ``precision`` other than "ieee" they are another computation, not a setting: left out;
    when "default" is among the preload values swept they run with it only (prefetching is swept on
    the unstreamed kernel), else with the values given (``smoke`` keeps only the last preload value,
    "prefetch" by default: its streamed settings prefetch too)."""
    yield {}
    g = dict(GRID, **(grid or {}))
    warps, accumulate, stream, per_sm, preload = g["warps"], g["accumulate"], g["stream"], g["per_sm"], g["preload"]
    flat, transpose, caps = g["flat"], g["transpose"], g["max_registers"]
    if precision != "ieee":
        stream = tuple(s for s in stream if not s)
    if T == 1:  # one task: one program whatever the grid
        per_sm = per_sm[:1]
    if smoke:  # each code path once
        warps, accumulate, per_sm, preload = warps[:1], accumulate[-1:], per_sm[:2], preload[-1:]
    for w, acc, st, p, pre, fl, tr, cap in itertools.product(warps, accumulate, stream, per_sm, preload, flat, transpose,
                                                              caps):
        if st and pre != "default" and "default" in preload:
            continue
        if st and fl != "default" and "default" in flat:  # 2-D 1-wide layers: swept unstreamed
            continue
        if st and tr != "default" and "default" in transpose:  # a streamed layer has no tl.dot to transpose
            continue
        kw = {"num_warps": w, "accumulate": acc, "stream": st, "programs_per_sm": p, "preload": pre, "flat": fl,
              "transpose": tr, "max_registers": cap}
        for field, value in (("accumulate", acc), ("preload", pre), ("flat", fl), ("transpose", tr),
                             ("max_registers", cap)):
            if value == "default":
                del kw[field]
        yield kw


def sweep_T(T, device, width, smoke, budget, log, rows=None, precision="ieee", grid=None):
    """Every setting at T tasks, checked then timed, on the GPU check's rotating input sets
    (``bench.gpu_check.problem_sets``: every set checked, each timed call runs every set once);
    rows appended to ``rows`` as they are made (``main`` passes sweep.json's list, so a run cut
    short by its deadline keeps them).  ``precision``: the kernel's ("ieee", "tf32x3", "tf32");
    ``grid``: ``settings``'s."""
    import torch

    from bench.gpu_check import (ACTS, EPS, LR, ROTATIONS, SMOKE_ROTATIONS, Rotation, _time_ms, check_variant,
                                 problem_sets)
    from bench.providers import float64_updates
    from reptile_fast.kernels import meta_step_guard as G
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    dims = (1, width, width, 1)
    model, _, phi, sets = problem_sets(T, device, SMOKE_ROTATIONS if smoke else ROTATIONS, seed=21, width=width)
    oracles = [None] * len(sets)
    eps = torch.full((1,), EPS, device=device)
    it = torch.ones(1, dtype=torch.int64, device=device)
    rows = [] if rows is None else rows
    want = None  # the default setting's φ per input set

    def launch(cfg, tasks, plan):
        """fn() for one input set, and result() its φ after the first call."""
        if T == 1:  # the fused stepper's one-launch meta-step, applied in place
            work, state, loss_out = phi.clone(), G.new_state(device), torch.empty(1, device=device)

            def fn():
                V.guarded_meta_step(tasks.x, tasks.y, plan, work, dims, ACTS, lr=LR, eps=eps, state=state,
                                    iteration=it, loss_out=loss_out, precision=precision, config=cfg,
                                    check_values=False)

            # timed replays keep stepping φ: start each setting from the same φ, check the first call
            return fn, work
        new = torch.empty_like(phi)

        def fn():
            V.meta_step(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, eps=eps, precision=precision, config=cfg,
                        out=new, check_values=False)

        return fn, new

    inner_means = [None] * len(sets)

    def inner_mean(r, tasks, plan):
        """tf32: the mean over tasks of the default setting's per-task updates (``inner_loop``, the
        same per-task arithmetic), once they pass the per-task gate; ``check_variant`` verifies a
        tf32 mean against it where the tf32 bound alone is too loose (None for other precisions)."""
        if precision != "tf32":
            return None
        if inner_means[r] is None:
            adapted, _ = V.inner_loop(tasks.x, tasks.y, plan, phi, dims, ACTS, lr=LR, precision=precision,
                                      check_values=False)
            got = adapted[:, :phi.numel()]
            wrong = check_variant(("sweep", "v2", precision, "inner"), got, model, tasks, plan, phi, oracles[r])
            if wrong:
                raise RuntimeError(f"the tf32 inner loop (the meta-steps' verifier) is wrong: {wrong}")
            inner_means[r] = (got.double() - phi.double()).mean(0)
        return inner_means[r]

    def check(phis):
        """Why the φ of each input set in ``phis`` is not the outer update (float64 oracle), or None."""
        for r, (tasks, plan) in enumerate(sets):
            if oracles[r] is None:
                oracles[r] = float64_updates(model, tasks.x, tasks.y, plan, LR)
            wrong = check_variant(("sweep", "v2", precision, "meta"), phis[r], model, tasks, plan, phi, oracles[r],
                                  inner_mean=inner_mean(r, tasks, plan))
            if wrong:
                return f"input set {r}: {wrong}"
        return None

    def differs(phis):
        """Whether ``phis`` differ from the default setting's beyond fp32 summation order."""
        return want is None or not all(bool(torch.allclose(g, w, rtol=1e-5, atol=1e-6)) for g, w in zip(phis, want))

    for kw in settings(T, smoke, precision, grid):
        if budget.left() < 10:
            rows.append({"T": T, "config": kw, "status": "skipped", "reason": "time budget spent"})
            continue
        row = {"T": T, "config": kw, "precision": precision,
               "launch": "guarded_meta_step" if T == 1 else "meta_step"}
        try:
            cfg = V.V2Config(**kw)
            fns, bufs, got = [], [], []
            for tasks, plan in sets:
                fn, buf = launch(cfg, tasks, plan)
                fn()
                fns.append(fn)
                bufs.append(buf)
                got.append(buf.clone())
            # every setting's outer update against the float64 oracle (the default's included: the
            # settings are compared with it, so it must be right itself), then with the default's φ
            wrong = check(got)
            if want is None and not wrong:
                want = got
            if want is not None:
                row["max_abs_vs_default"] = max(float((g - w).abs().max()) for g, w in zip(got, want))
            row["ok"] = (not wrong and want is not None and not differs(got)
                         and all(bool(torch.isfinite(g).all()) for g in got))
            if row["ok"]:
                rotation = Rotation(fns)
                ms, timer = _time_ms(rotation, device, graph=True, sets=rotation.sets)
                # the timed calls (graph replays on a GPU) wrote each set's `new`: their last answers
                # are checked as the first call's were (T = 1: the replays step φ on from the checked
                # first call, so there is no fixed answer to hold them to)
                after = None if T == 1 else (check(bufs) or ("its φ differs from the default setting's"
                                                             if differs(bufs) else None))
                if after:
                    row.update(ok=False, ms_not_a_result=ms, status=f"wrong: the timed calls' outputs: {after}")
                else:
                    row.update(ms=ms, timer=timer, tasks_per_s=T / (ms / 1e3), input_sets=rotation.sets)
            else:
                row["status"] = "not timed: " + (wrong or "result differs from the default setting's")
        except Exception as exc:  # noqa: BLE001 - recorded; the other settings go on
            row["status"] = "error"
            row["reason"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
        log(f"  T={T:>6} {kw or 'default'}: " + (f"{row['ms']:.4f} ms, {row['tasks_per_s']:,.0f} tasks/s"
                                                   if "ms" in row else f"{row.get('status')} {row.get('reason', '')}"))
    return rows


class _Deadline:
    """The sweep's hard end (``bench.gpu_check.Deadline``'s rule: a hung GPU call blocks the main
    thread where no Python timeout reaches): sweep.json with the rows made so far, a "cut short"
    row for the T in flight, the table; exit code 3."""

    def __init__(self, seconds, out, results, log, exit_fn=os._exit, elapsed=0.0):
        self.seconds, self.out, self.results, self.log, self._exit = seconds, out, results, log, exit_fn
        self.T = None
        self.done = False  # set by main once sweep.json is final
        # elapsed: seconds since the budget's start (before `import torch`), as gpu_check's
        self._timer = threading.Timer(max(0.0, seconds - elapsed), self._fire)
        self._timer.daemon = True

    def start(self):
        self._timer.start()
        return self

    def cancel(self):
        self._timer.cancel()

    def _fire(self):
        _WRITE_LOCK.acquire(timeout=30)  # never released: as bench.gpu_check.Deadline
        if self.done:
            _WRITE_LOCK.release()
            return
        try:
            from bench.gpu_check import _snapshot

            snap = _snapshot(self.results)
            snap.setdefault("rows", []).append({"T": self.T, "status": "cut short", "reason": (
                f"the sweep passed its deadline ({self.seconds:.0f} s, the budget plus a grace) at T={self.T}")})
            snap["table"] = table([r for r in snap["rows"] if r.get("T") is not None])
            _write(self.out, snap)
            self.log(f"== cut short at T={self.T}: the deadline ({self.seconds:.0f} s) passed")
            for line in snap["table"]:
                self.log(line)
        finally:
            self._exit(3)


#: held while sweep.json is written; the deadline keeps it until the process ends (the main
#: thread wrote the same sweep.json.tmp at the same time, or replaced the deadline's file with one
#: without the "cut short" row)
_WRITE_LOCK = threading.RLock()


def _write(out: Path, results: dict) -> None:
    with _WRITE_LOCK:
        tmp = out / "sweep.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(out / "sweep.json")


def table(rows):
    lines = []
    for T in sorted({r["T"] for r in rows}):
        timed = sorted((r for r in rows if r["T"] == T and "ms" in r), key=lambda r: r["ms"])
        default = next((r for r in timed if not r["config"]), None)
        lines.append(f"T={T}: {len(timed)} settings timed" + (f"; default {default['ms']:.4f} ms" if default else ""))
        for r in timed[:8]:
            ratio = f"  {default['ms'] / r['ms']:.2f}x the default" if default else ""
            lines.append(f"  {r['ms']:9.4f} ms {r['tasks_per_s']:>14,.0f} tasks/s  {r['config'] or 'default'}{ratio}")
    return lines


def _ints(ap, flag, text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} takes comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        ap.error(f"{flag} takes comma-separated integers >= 1, got {text!r}")
    return vals


def _grid_args(ap, args):
    """``settings``'s grid from the command line (only the flags given)."""
    grid = {}
    if args.warps is not None:
        grid["warps"] = tuple(_ints(ap, "--warps", args.warps))
        if any(w not in (1, 2, 4, 8, 16) for w in grid["warps"]):
            ap.error(f"--warps takes powers of two in 1..16, got {args.warps!r}")
    if args.per_sm is not None:
        grid["per_sm"] = tuple(_ints(ap, "--per-sm", args.per_sm))
    if args.accumulate is not None:
        grid["accumulate"] = tuple(v.strip() for v in args.accumulate.split(",") if v.strip())
        if not grid["accumulate"] or any(v not in ("registers", "memory", "default") for v in grid["accumulate"]):
            ap.error(f"--accumulate takes registers, memory, default; got {args.accumulate!r}")
    if args.stream is not None:
        words = [v.strip() for v in args.stream.split(",") if v.strip()]
        if not words or any(v not in ("on", "off") for v in words):
            ap.error(f"--stream takes on, off; got {args.stream!r}")
        grid["stream"] = tuple(v == "on" for v in words)
    if args.preload is not None:
        words = [v.strip() for v in args.preload.split(",") if v.strip()]
        if not words or any(v not in ("default", "prefetch", "on", "off") for v in words):
            ap.error(f"--preload takes default, prefetch, on, off; got {args.preload!r}")
        grid["preload"] = tuple({"on": True, "off": False}.get(v, v) for v in words)
    if args.flat is not None:
        words = [v.strip() for v in args.flat.split(",") if v.strip()]
        if not words or any(v not in ("default", "on", "off") for v in words):
            ap.error(f"--flat takes default, on, off; got {args.flat!r}")
        grid["flat"] = tuple({"on": True, "off": False}.get(v, v) for v in words)
    if args.transpose is not None:
        words = [v.strip() for v in args.transpose.split(",") if v.strip()]
        if not words or any(v not in ("default", "on", "off") for v in words):
            ap.error(f"--transpose takes default, on, off; got {args.transpose!r}")
        grid["transpose"] = tuple({"on": True, "off": False}.get(v, v) for v in words)
    if args.max_registers is not None:
        words = [v.strip() for v in args.max_registers.split(",") if v.strip()]
        if not words or not all(v == "default" or (v.isdigit() and 32 <= int(v) <= 255) for v in words):
            ap.error(f"--max-registers takes default or ints in 32..255; got {args.max_registers!r}")
        grid["max_registers"] = tuple(v if v == "default" else int(v) for v in words)
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, Triton interpreter")
    ap.add_argument("--budget", type=float, default=None, help="seconds in all (default 220 on a GPU, 120 smoke)")
    ap.add_argument("--precision", default="ieee", choices=("ieee", "tf32x3", "tf32"),
                    help="the kernel's precision (default ieee); others leave streamed settings out")
    ap.add_argument("--T", default=None, help="comma-separated task counts (default 1,4096,65536; smoke 1,5)")
    ap.add_argument("--warps", default=None, help="comma-separated warps per program (default 4,8)")
    ap.add_argument("--per-sm", default=None, help="comma-separated programs per SM (default 1,2,4,8)")
    ap.add_argument("--accumulate", default=None,
                    help="comma-separated: registers, memory, default (the kernel's choice); default registers,memory")
    ap.add_argument("--stream", default=None, help="comma-separated: off, on (default both)")
    ap.add_argument("--preload", default=None,
                    help="comma-separated: default (the kernel's choice), prefetch, on (whole plan up front), "
                         "off (loaded at each step); default: default,prefetch")
    ap.add_argument("--flat", default=None,
                    help="comma-separated: default (the kernel's choice), on, off (V2Config.flat: 1-wide layers "
                         "in 2-D or as 3-D products); default: default")
    ap.add_argument("--transpose", default=None,
                    help="comma-separated: default (the kernel's choice), on, off (V2Config.transpose: wide x wide "
                         "products feature-major or batch-major); default: default")
    ap.add_argument("--max-registers", default=None,
                    help="comma-separated: default (the kernel's choice: no cap unless streamed), or per-thread "
                         "register caps in 32..255 (V2Config.max_registers, PTX .maxnreg); default: default")
    args = ap.parse_args(argv)
    grid, Ts_arg = _grid_args(ap, args), None
    if args.T is not None:
        Ts_arg = tuple(_ints(ap, "--T", args.T))
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before a kernel module is imported
    from bench.gpu_check import Budget, Log

    # the budget starts before `import torch` (seconds on a fresh machine): the device tool's
    # limit counts from the process's start
    budget = Budget(args.budget or (120 if args.cpu_smoke else 220))
    import torch

    from bench.env import machine_stamp

    torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "sweep.log")
    if args.cpu_smoke:
        device, Ts, width = torch.device("cpu"), (1, 5), 16
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        log("no CUDA device: run with --cpu-smoke for the CPU smoke test")
        return 2
    else:
        device, Ts, width = torch.device("cuda"), SWEEP_T, 64
    if Ts_arg is not None:
        Ts = Ts_arg
    stamp = machine_stamp()
    stamp["command"] = "python -m bench.gpu_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        stamp.update(gpu=p.name, sms=p.multi_processor_count)
    results = {"stamp": stamp, "mode": "cpu-smoke (timings meaningless)" if args.cpu_smoke else "gpu",
               "dims": [1, width, width, 1], "precision": args.precision, "rows": []}
    from bench.gpu_check import DEADLINE_GRACE

    deadline = _Deadline(budget.seconds + DEADLINE_GRACE, out, results, log, elapsed=budget.elapsed()).start()
    try:
        for T in Ts:
            t0 = time.monotonic()
            deadline.T = T
            try:
                sweep_T(T, device, width, args.cpu_smoke, budget, log, rows=results["rows"],
                        precision=args.precision, grid=grid)
            except Exception as exc:  # noqa: BLE001
                results["rows"].append({"T": T, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
                log(traceback.format_exc())
            log(f"  T={T} done in {time.monotonic() - t0:.1f} s")
            results["table"] = table(results["rows"])
            _write(out, results)
        with _WRITE_LOCK:
            deadline.done = True
        for line in results["table"]:
            log(line)
        return 0
    finally:
        deadline.cancel()


if __name__ == "__main__":
    raise SystemExit(main())
