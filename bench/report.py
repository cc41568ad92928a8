"""Turn benchmark results into a markdown table and plots under bench/results/.

    python -m bench.report bench/results/cpu-<machine>-<date>.json [--out PREFIX]

Reads pytest-benchmark's JSON (``pytest --benchmark-json=...`` over bench/bench_inner_loop.py)
or the GPU check's ``results.json`` (``bench/gpu_check.py``), and writes ``PREFIX.md`` (stamp,
one table per model size, skips and failures with reasons), ``PREFIX_tasks_per_s.png``
(tasks/s against meta-batch per provider, log–log) and ``PREFIX_speedup.png`` (speed-ups over
seed and over torch).  PREFIX defaults to the JSON's path without ``.json``.

Derived figures, from each timing's median seconds per call (all tasks of one meta-batch):
tasks/s = T / s; inner steps/s = T·S / s; FLOP/s = FLOP count (bench/flops.py) / s; % of peak =
FLOP/s over the fp32 matmul rate measured in the same run; × seed / × torch = tasks/s over
theirs at the same size.  The seed is timed only up to meta-batch 256 (its per-task cost does not
depend on the meta-batch): at larger meta-batches × seed uses the seed's rate at its largest
timed meta-batch of the same model size, marked with *.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["load_results", "records_from_pytest_benchmark", "records_from_gpu_check", "derive", "render_markdown",
           "plot_tasks_per_s", "plot_speedups", "headline", "write_report"]

PROVIDER_ORDER = ("seed", "reference", "torch-vmap", "torch", "torch-compile", "triton", "triton-graphs",
                  "triton-tf32", "jax")


def _order(name: str) -> int:
    return PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _color(name: str) -> str:
    """One colour per provider in every plot (tab10)."""
    return f"C{_order(name) % 10}"


def records_from_pytest_benchmark(data: Dict[str, Any]) -> Tuple[List[dict], dict]:
    """Records (one per timed provider × size) and the stamp from pytest-benchmark's JSON."""
    records = []
    for b in data.get("benchmarks", []):
        ei = dict(b.get("extra_info") or {})
        if "width" not in ei and len(ei.get("dims") or ()) >= 3:  # suites that store only dims
            ei.setdefault("width", ei["dims"][1])
            ei.setdefault("depth", len(ei["dims"]) - 2)
        if not {"provider", "meta_batch", "width", "steps"} <= set(ei):
            continue  # not an inner-loop throughput benchmark
        stats = b.get("stats") or {}  # none: an invalid record ("Not timed"), not a crash
        peak = ei.pop("peak", None) or {}
        records.append({**ei, "status": "ok", "seconds": stats.get("median"), "seconds_min": stats.get("min"),
                        "seconds_iqr": stats.get("iqr"), "rounds": stats.get("rounds"),
                        "iterations": stats.get("iterations"),
                        "peak_flops_per_s": peak.get("matmul_flops_per_s"),
                        "bmm_flops_per_s": peak.get("bmm_flops_per_s")})
    for s in data.get("reptile_fast_not_timed", []):
        records.append(s)
    mi = data.get("machine_info", {})
    stamp = dict(mi.get("reptile_fast") or {})
    # a JSON written without bench/conftest.py's stamp: pytest-benchmark's own machine fields
    cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
    for key, value in (("cpu", cpu.get("brand_raw") or mi.get("processor") or mi.get("machine")),
                       ("cpu_count", cpu.get("count")), ("python", mi.get("python_version")),
                       ("platform", " ".join(filter(None, (mi.get("system"), mi.get("release")))))):
        if value not in (None, ""):
            stamp.setdefault(key, value)
    stamp.setdefault("date", data.get("datetime"))
    commit = data.get("commit_info") or {}
    if commit.get("id"):
        stamp["commit"] = commit["id"][:12] + ("-dirty" if commit.get("dirty") else "")
    peaks = [r for r in records if r.get("peak_flops_per_s")]
    if peaks:
        stamp["fp32_matmul_peak_gflops"] = peaks[0]["peak_flops_per_s"] / 1e9
        if peaks[0].get("bmm_flops_per_s"):
            stamp["bmm_rate_gflops"] = peaks[0]["bmm_flops_per_s"] / 1e9
    return records, stamp


def _width_from_flops(flops, T: int, depth: int, steps: int, batch: int) -> Optional[int]:
    """The hidden width of a row that did not record it (GPU checks before it did), from its FLOP
    count; None when no width up to 4096 gives that count."""
    from bench.flops import inner_loop_flops

    for w in range(1, 4097):
        if inner_loop_flops((1,) + (w,) * depth + (1,), batch, steps, T) == flops:
            return w
    return None


def records_from_gpu_check(data: Dict[str, Any]) -> Tuple[List[dict], dict]:
    """Records and stamp from ``bench/gpu_check.py``'s results.json: the inner-loop rows of its
    timing stage (one meta-batch of inner loops per call, ``ms`` per call; the whole-job rows,
    ``fit-*`` and ``cli-*``, are not inner-loop throughputs and are left out), the stamp from its
    env stage, the fp32 peak it measured there."""
    stages = data.get("stages") or {}
    env = stages.get("env") or {}
    stamp = {k: v for k, v in env.items() if isinstance(v, (str, int, float)) and k != "fp32_matmul_flops_per_s"}
    peak = env.get("fp32_matmul_flops_per_s")
    if isinstance(peak, (int, float)):
        stamp["fp32_matmul_peak_gflops"] = peak / 1e9
    stamp["checked"] = ("Every timed row was first checked by bench/gpu_check.py's timing stage: the kernel "
                        "variants' every task's update against a float64 oracle (check_variant), the "
                        "providers by bench/providers.py's gate (every task's update against a float64 "
                        "oracle, fp32 providers also against the fp32 reference); rows that failed are "
                        "under \"Not timed\".")
    records = []
    for r in (stages.get("timing") or {}).get("rows", []):
        prov = str(r.get("provider", "?"))
        if "T" not in r or "meta_steps" in r or prov.startswith(("fit-", "cli-")):
            continue
        if prov == "*":  # a whole meta-batch not timed (its problem failed, the budget ran out): said (QA64)
            prov = "* (every provider)"
        depth, steps, batch = r.get("depth", 2), r.get("steps", 5), r.get("inner_batch", 10)
        width = r.get("width") or _width_from_flops(r.get("flops"), r["T"], depth, steps, batch)
        rec = {"provider": prov, "meta_batch": r["T"], "width": width, "depth": depth, "steps": steps,
               "inner_batch": batch, "flops": r.get("flops"), "peak_flops_per_s": peak, "timer": r.get("timer")}
        if r.get("ms") is not None and "status" not in r and width is not None:
            rec.update(status="ok", seconds=r["ms"] / 1e3, seconds_min=r.get("ms_min", r["ms"]) / 1e3)
        else:
            rec.update(status=r.get("status", "invalid"), point=f"T{r['T']}",
                       reason=r.get("reason") or ("no time" if r.get("ms") is None else "no model size"))
        records.append(rec)
    return records, stamp


def load_results(path) -> Tuple[List[dict], dict, dict]:
    """(records, stamp, extras) from either JSON format; extras holds the GPU check's targets.
    A file that is neither is a ``ValueError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        data = {}
    if "records" in data:
        return list(data["records"]), dict(data.get("stamp", {})), dict(data.get("extras", {}))
    if "benchmarks" in data:
        records, stamp = records_from_pytest_benchmark(data)
        return records, stamp, {}
    if isinstance(data.get("stages"), dict):  # bench/gpu_check.py's results.json
        records, stamp = records_from_gpu_check(data)
        return records, stamp, {}
    raise ValueError(f"{path}: neither pytest-benchmark JSON ('benchmarks') nor a GPU-check result "
                     f"('stages' or 'records')")


def _size(r: dict) -> Tuple[int, int, int, int]:
    return (r.get("depth", 2), r["width"], r["steps"], r.get("inner_batch", 10))


def _valid_seconds(x: Any) -> bool:
    """A usable time: a finite number > 0 (a NaN, 0 or missing median is no measurement)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _point_id(r: dict) -> str:
    return str(r.get("point") or f"T{r.get('meta_batch', '?')}-H{r.get('width', '?')}-S{r.get('steps', '?')}")


def derive(records: Iterable[dict]) -> List[dict]:
    """Each timed record with ``tasks_per_s``, ``steps_per_s``, ``flops_per_s``, ``pct_peak``,
    ``x_seed`` (and ``x_seed_from`` when the seed's rate comes from another meta-batch) and
    ``x_torch`` added; records that were not timed pass through unchanged, and a record marked
    ok whose median time is not a finite positive number (NaN, 0, missing) becomes
    ``status="invalid"`` with the reason, so it reaches the "Not timed" table, never a rate."""
    out = []
    records = list(records)
    timed = [dict(r) for r in records if r.get("status", "ok") == "ok" and _valid_seconds(r.get("seconds"))]
    for r in timed:
        s = r["seconds"]
        r["tasks_per_s"] = r["meta_batch"] / s
        r["best_tasks_per_s"] = r["meta_batch"] / r["seconds_min"] if _valid_seconds(r.get("seconds_min")) else None
        r["steps_per_s"] = r["meta_batch"] * r["steps"] / s
        r["flops_per_s"] = r["flops"] / s if r.get("flops") else None
        peak = r.get("peak_flops_per_s")
        r["pct_peak"] = 100.0 * r["flops_per_s"] / peak if peak and r["flops_per_s"] else None
    by = {(r["provider"], _size(r), r["meta_batch"]): r for r in timed}
    for r in timed:
        size, T = _size(r), r["meta_batch"]
        seed = by.get(("seed", size, T))
        if seed is None:
            seeds = [x for x in timed if x["provider"] == "seed" and _size(x) == size and x["meta_batch"] < T]
            if seeds:
                seed = max(seeds, key=lambda x: x["meta_batch"])
                r["x_seed_from"] = seed["meta_batch"]
        r["x_seed"] = r["tasks_per_s"] / seed["tasks_per_s"] if seed else None
        torch_r = by.get(("torch", size, T))
        r["x_torch"] = r["tasks_per_s"] / torch_r["tasks_per_s"] if torch_r else None
    out.extend(timed)
    for r in records:
        if r.get("status", "ok") == "ok" and _valid_seconds(r.get("seconds")):
            continue
        r = dict(r)
        if r.get("status", "ok") == "ok":
            r.update(status="invalid", point=_point_id(r),
                     reason="no median time" if r.get("seconds") is None
                     else f"median time {r['seconds']!r} s is not a finite positive number")
        out.append(r)
    return out


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _rate(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _groups(derived: Sequence[dict]) -> List[Tuple[Tuple[int, int, int, int], List[dict]]]:
    groups: Dict[Tuple, List[dict]] = {}
    for r in derived:
        if "tasks_per_s" in r:
            groups.setdefault(_size(r), []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: (-len({r["meta_batch"] for r in kv[1]}), kv[0]))
    return [(k, sorted(v, key=lambda r: (r["meta_batch"], _order(r["provider"])))) for k, v in ordered]


def render_markdown(derived: Sequence[dict], stamp: dict, *, title: str, extras: Optional[dict] = None,
                    source: Optional[str] = None, summary: Optional[Sequence[str]] = None) -> str:
    """The report: stamp, ``summary`` lines (if any), one table per model size, then what was
    skipped or failed and why, then ``extras`` (the GPU check's targets) as JSON."""
    lines = [f"# {title}", ""]
    keys = ("date", "command", "device", "gpu", "cpu", "cpu_count", "torch_threads", "python", "torch",
            "triton", "jax", "cuda", "platform", "commit", "mode", "loadavg_1min", "fp32_matmul_peak_gflops",
            "bmm_rate_gflops", "seconds")
    lines += ["| | |", "|---|---|"]
    for k in keys:
        if stamp.get(k) not in (None, ""):
            v = stamp[k]
            v = f"{v:.1f}" if isinstance(v, float) else v
            lines.append(f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |")
    if source:
        lines.append(f"| data | `{source}` |")
    timed = [r for r in derived if "tasks_per_s" in r]
    if stamp.get("checked"):  # the producer's own words for its check (the GPU check)
        gate = str(stamp["checked"])
    elif timed and all("update_margin" in (r.get("check") or {}) for r in timed):
        gate = ("Every timed provider was first checked on every input set its timing cycles through "
                "(bench/providers.py's gate): every task's update φ̃ − φ against a float64 oracle's, within "
                "a bound derived for its precision (fp32 or tf32), and fp32 providers' adapted parameters "
                "against the fp32 reference backend (rtol 1e-5 / atol 1e-6) on up to 16 tasks spread over "
                "the meta-batch.")
    else:  # results made before the per-task update gate (their check records have no update_margin)
        gate = ("Every timed provider was first checked against the fp32 reference backend (adapted "
                "parameters within rtol 1e-5 / atol 1e-6 on up to 16 tasks spread over the meta-batch; "
                "tf32 variants: relative error against a float64 oracle under their bound).")
    lines += ["", gate + " Times are "
              "medians of seconds per call (one meta-batch of inner loops, all tasks); \"best\" uses the "
              "fastest round instead (less disturbed by other jobs on a shared machine); FLOP counts "
              "follow bench/flops.py; % peak is against the fp32 matmul rate (TF32 off) measured in "
              "the same run. × seed marked * uses the seed's rate at the meta-batch in brackets "
              "(its per-task cost does not depend on the meta-batch).", ""]
    if summary:
        lines += ["## Summary", "", "```", *summary, "```", ""]
    for (depth, width, steps, batch), rows in _groups(derived):
        lines += [f"## MLP 1-{'-'.join([str(width)] * depth)}-1, {steps} inner steps of {batch} points", "",
                  "| provider | meta-batch | ms / call | tasks/s | best tasks/s | inner steps/s | FLOP/s "
                  "| % fp32 peak | × seed | × torch | max abs err vs ref | rel err vs f64 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            chk = r.get("check") or {}
            xs = _fmt(r.get("x_seed"))
            if r.get("x_seed_from") is not None and r.get("x_seed") is not None:
                xs += f"* [{r['x_seed_from']}]"
            lines.append(
                f"| {r['provider']} | {r['meta_batch']} | {_fmt(1e3 * r['seconds'])} | {_rate(r['tasks_per_s'])} "
                f"| {_rate(r.get('best_tasks_per_s'))} | {_rate(r['steps_per_s'])} | {_rate(r.get('flops_per_s'))} | {_fmt(r.get('pct_peak'), 2)} "
                f"| {xs} | {_fmt(r.get('x_torch'))} | {_fmt(chk.get('max_abs_err'), 2)} "
                f"| {_fmt(chk.get('rel_err_f64'), 2)} |")
        lines.append("")
    not_timed = [r for r in derived if "tasks_per_s" not in r]
    if not_timed:
        lines += ["## Not timed", "", "| provider | status | reason | sizes |", "|---|---|---|---|"]
        grouped: Dict[Tuple[str, str, str], List[str]] = {}
        for r in not_timed:
            reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")[:300]
            grouped.setdefault((r.get("provider", "?"), r.get("status", ""), reason), []).append(str(r.get("point", "")))
        for (prov, status, reason), pts in sorted(grouped.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1:])):
            lines.append(f"| {prov} | {status} | {reason} | {', '.join(sorted(pts))} |")
        lines.append("")
    if extras:
        lines += ["## Targets and extra measurements", ""]
        for name, value in extras.items():
            if name in ("smoke", "key"):
                continue
            lines += [f"### {name}", "", "```", json.dumps(value, indent=1, default=str)[:4000], "```", ""]
    return "\n".join(lines)


def _figure(ncols: int, width: float = 6.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path) -> Path:
    """The figure as PNG, written atomically (a rerun over a committed result never leaves half a file)."""
    import io

    from reptile_fast.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return Path(atomic_write_bytes(path, buf.getvalue()))


def _stamp_line(stamp: dict) -> str:
    dev = stamp.get("gpu") or stamp.get("cpu") or stamp.get("device") or "?"
    return f"{dev} · torch {stamp.get('torch', '?')} · {str(stamp.get('date', ''))[:10]}"


def plot_tasks_per_s(derived: Sequence[dict], stamp: dict, path) -> Optional[Path]:
    """tasks/s against meta-batch, log–log, one line per provider, one panel per model size that
    has at least two meta-batches (when no size has two, one panel per size, points only)."""
    groups = _groups(derived)
    panels = [(k, rows) for k, rows in groups if len({r["meta_batch"] for r in rows}) >= 2] or groups
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, ((depth, width, steps, batch), rows) in zip(axes, panels):
        for prov in sorted({r["provider"] for r in rows}, key=_order):
            pts = sorted((r["meta_batch"], r["tasks_per_s"]) for r in rows if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=_color(prov))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("meta-batch (tasks per call)")
        ax.set_ylabel("tasks / s")
        ax.set_title(f"MLP width {width}, depth {depth}, {steps} steps of {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Inner-loop throughput — {_stamp_line(stamp)}")
    return _save(fig, path)


def plot_speedups(derived: Sequence[dict], stamp: dict, path) -> Optional[Path]:
    """Grouped bars: speed-up over seed (left) and over torch (right) per meta-batch, for the
    model size with the most meta-batches."""
    groups = _groups(derived)
    if not groups:
        return None
    (depth, width, steps, batch), rows = groups[0]
    fig, axes = _figure(2)
    for ax, key, base in ((axes[0], "x_seed", "seed"), (axes[1], "x_torch", "torch")):
        provs = [p for p in sorted({r["provider"] for r in rows}, key=_order)
                 if p != base and any(r.get(key) for r in rows if r["provider"] == p)]
        Ts = sorted({r["meta_batch"] for r in rows})
        n = max(len(provs), 1)
        for j, prov in enumerate(provs):
            vals = {r["meta_batch"]: r.get(key) for r in rows if r["provider"] == prov}
            xs = [i + (j - (n - 1) / 2) * 0.8 / n for i in range(len(Ts))]
            ys = [vals.get(T) or 0 for T in Ts]
            bars = ax.bar(xs, ys, width=0.8 / n, label=prov, color=_color(prov))
            for b, y in zip(bars, ys):
                if y:
                    ax.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                                fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(Ts)), [str(T) for T in Ts])
        ax.set_yscale("log")
        ax.set_xlabel("meta-batch")
        ax.set_ylabel(f"speed-up over {base} (tasks/s ratio)")
        ax.set_title(f"× {base}, MLP width {width}, {steps} steps" + (" (* seed rate at ≤256)" if base == "seed" else ""))
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if provs:
            ax.legend()
    fig.suptitle(f"Speed-ups — {_stamp_line(stamp)}")
    return _save(fig, path)


def headline(derived: Sequence[dict], width: int = 64, steps: int = 5) -> List[str]:
    """One line per provider and meta-batch at the sine MLP's size: tasks/s, × seed, × torch."""
    rows = [r for r in derived if "tasks_per_s" in r and r["width"] == width and r["steps"] == steps
            and r.get("depth", 2) == 2]
    out = []
    for r in sorted(rows, key=lambda r: (r["meta_batch"], _order(r["provider"]))):
        out.append(f"{r['provider']:>13} T={r['meta_batch']:<6} {_rate(r['tasks_per_s']):>7} tasks/s  "
                   f"{_fmt(r.get('pct_peak'), 2):>6} % peak  × seed {_fmt(r.get('x_seed')):>7}  "
                   f"× torch {_fmt(r.get('x_torch')):>6}")
    return out


def write_report(records: Sequence[dict], stamp: dict, prefix, *, title: str, extras: Optional[dict] = None,
                 source: Optional[str] = None, summary: Optional[Sequence[str]] = None) -> List[Path]:
    """Write ``PREFIX.md`` and the two plots (each atomically); returns the paths written."""
    from reptile_fast.checkpoint import atomic_write_text

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    derived = derive(records)
    md = prefix.with_name(prefix.name + ".md")
    atomic_write_text(md, render_markdown(derived, stamp, title=title, extras=extras, source=source, summary=summary))
    written = [md]
    for fn, suffix in ((plot_tasks_per_s, "_tasks_per_s.png"), (plot_speedups, "_speedup.png")):
        p = fn(derived, stamp, prefix.with_name(prefix.name + suffix))
        if p is not None:
            written.append(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="pytest-benchmark JSON or the GPU check's results.json")
    ap.add_argument("--out", help="output prefix (default: the JSON path without .json)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        records, stamp, extras = load_results(args.json)
    except (OSError, ValueError) as exc:
        ap.error(str(exc))
    if not any("tasks_per_s" in r for r in derive(records)):
        raise SystemExit(f"{args.json}: no timed results with a finite positive time (was the sweep run "
                         f"with --benchmark-enable?)")
    prefix = args.out or str(Path(args.json).with_suffix(""))
    title = args.title or f"Inner-loop benchmark — {stamp.get('gpu') or stamp.get('cpu') or 'unknown device'}"
    try:
        written = write_report(records, stamp, prefix, title=title, extras=extras, source=args.json)
    except OSError as exc:  # --out in a folder that cannot be made or written
        ap.error(f"--out {prefix}: {exc}")
    for p in written:
        print(p)
    for line in headline(derive(records)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
