"""Each CPU backend's distance from a float64 oracle, next to the reference backend's, over seeds.

    python -m bench.numerics_grid [--seeds 100] [--triton-seeds 20] [--out bench/results/numerics_grid_cpu.json]

The project's promise for the fast backends is "as close to a float64 run as the reference
backend is" (the reference being the seed's deep-copied module and ``torch.optim``).  A single
seed cannot test that in float16/bfloat16, where one rounding decision moves a whole trajectory,
so for every cell of the grid

    model     "sine": the seed's MLP 1-64-64-1 tanh on Sine tasks, MSE;
              "classifier": 8-32-32-5 (tanh, relu) on Gaussian-cluster tasks, cross-entropy
    dtype     float64, float32, float16, bfloat16 (the model's; tasks are the float64 draws
              rounded once to it)
    optimizer inner SGD, inner Adam (β1 = 0; not float16, which refuses it: eps is 0 there)
    algorithm Reptile, FOMAML

and every seed, each backend runs the same model, tasks and plan in the cell's dtype, and the
float64 oracle (backend "reference" on the float64 copy of the *same* rounded parameters and data,
so only the arithmetic differs) runs once.  Measured per seed:

    inner      ‖φ̃_b − φ̃_64‖ / ‖φ̃_64 − φ‖ over all tasks' adapted parameters (the inner loops)
    meta_grad  FOMAML only: ‖g_b − g_64‖ / ‖g_64‖, the meta-gradients at φ̃
    meta_step  ‖φ'_b − φ'_64‖ / ‖φ'_64 − φ‖ after one ``Reptile.meta_step`` with ε = 1
               (backend "compiled" is measured only here: it is a whole-meta-step program)

For float64 the "oracle" is the float64 reference itself, so its rows are the backends' distance
from it (rounding-level, ~1e-15).  Per backend and cell the file records the error's median,
mean, 90th percentile and maximum, and against the reference seed by seed: the geometric mean
of e_b / e_ref, the fraction of seeds where e_b > e_ref, and a two-sided sign-test p-value.
A backend "drifts" where the geometric-mean ratio is above 1.1 with p < 0.01.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from bench.env import machine_stamp
from reptile_fast import MLP, Reptile, Sine, TaskBatch, sample_indices
from reptile_fast.backends import InnerConfig, get_backend

__all__ = ["DTYPES", "BACKENDS", "cell_errors", "summarise", "main"]

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: label -> (backend name, options); "compiled" is meta-step only
BACKENDS = {
    "reference": ("reference", {}),
    "torch": ("torch", {}),
    "torch[fast_tanh=False]": ("torch", {"fast_tanh": False}),
    "torch[fast_tanh=True]": ("torch", {"fast_tanh": True}),
    "torch[fast_mlp=False]": ("torch", {"fast_mlp": False}),
    "compiled": ("compiled", {}),
    "triton": ("triton", {}),
}

T, STEPS, BATCH = 4, 5, 10
LR = {"sgd": 0.02, "adam": 0.02}
CLASSES, FEATURES, PER_CLASS = 5, 8, 10


def make_model(kind: str) -> nn.Module:
    if kind == "sine":
        return MLP()
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def make_tasks(kind: str, generator: torch.Generator) -> TaskBatch:
    """float64 tasks (``T`` of them, 50 points each) from ``generator``."""
    if kind == "sine":
        return Sine(dtype=torch.float64).sample(T, generator=generator)
    means = torch.randn(T, CLASSES, FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS).expand(T, -1).contiguous()
    x = means.gather(1, labels.unsqueeze(-1).expand(-1, -1, FEATURES)) \
        + 0.7 * torch.randn(T, CLASSES * PER_CLASS, FEATURES, generator=generator, dtype=torch.float64)
    return TaskBatch(x, labels)


def _cast(tasks: TaskBatch, dtype: torch.dtype) -> TaskBatch:
    y = tasks.y if tasks.is_classification else tasks.y.to(dtype)
    return TaskBatch(tasks.x.to(dtype), y)


def _rel(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], base: Optional[Dict[str, torch.Tensor]]) -> float:
    num = sum(float(((got[n].detach().double() - want[n]) ** 2).sum()) for n in want)
    den = sum(float(((want[n] - (0 if base is None else base[n])) ** 2).sum()) for n in want)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _supported(label: str, dtype: torch.dtype, opt: str, algorithm: str) -> bool:
    if label == "compiled":
        return opt == "sgd" and algorithm == "reptile"
    if label == "triton":
        return dtype == torch.float32 and opt == "sgd" and algorithm == "reptile"
    return True


def cell_errors(kind: str, dtype: torch.dtype, opt: str, algorithm: str, seed: int,
                labels: List[str]) -> Dict[str, Dict[str, float]]:
    """label -> {"inner", "meta_grad" (FOMAML), "meta_step"} errors for one seed of one cell."""
    loss = "mse" if kind == "sine" else "cross_entropy"
    eps = 1e-8
    torch.manual_seed(seed)
    model = make_model(kind).to(dtype)
    phi = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    tasks = _cast(make_tasks(kind, g), dtype)
    rows = STEPS + (algorithm == "fomaml")
    idx = sample_indices(T, rows, tasks.n_points, BATCH, generator=g)
    cfg = InnerConfig(lr=LR[opt], optimizer=opt, loss=loss, algorithm=algorithm, adam_eps=eps)

    def model64():
        m = make_model(kind).double()
        m.load_state_dict({n: v.double() for n, v in phi.items()})
        return m

    tasks64 = _cast(tasks, torch.float64)
    phi64 = {n: v.double() for n, v in phi.items()}
    oracle = get_backend("reference").inner_loop(model64(), tasks64, idx, cfg)
    m64 = model64()
    Reptile(m64, backend="reference", inner_lr=LR[opt], inner_steps=STEPS, inner_batch_size=BATCH,
            outer_lr=1.0, loss=loss, inner_optimizer=opt, algorithm=algorithm).meta_step(tasks64, idx)
    oracle_phi = {n: p.detach() for n, p in m64.named_parameters()}

    out: Dict[str, Dict[str, float]] = {}
    for label in labels:
        name, options = BACKENDS[label]
        if not _supported(label, dtype, opt, algorithm):
            continue
        row = {}
        if name != "compiled":
            res = get_backend(name, **options).inner_loop(model, tasks, idx, cfg)
            row["inner"] = _rel(res.params, oracle.params, {n: v.unsqueeze(0) for n, v in phi64.items()})
            if algorithm == "fomaml":
                row["meta_grad"] = _rel(res.meta_grads, oracle.meta_grads, None)
        m = make_model(kind).to(dtype)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(phi[n])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # compiled: native -> torch.compile for half types
            Reptile(m, backend=name, backend_options=options or None, inner_lr=LR[opt], inner_steps=STEPS,
                    inner_batch_size=BATCH, outer_lr=1.0, loss=loss, inner_optimizer=opt,
                    algorithm=algorithm).meta_step(tasks, idx)
        row["meta_step"] = _rel(dict(m.named_parameters()), oracle_phi, phi64)
        out[label] = row
    return out


def _sign_test(wins: int, n: int) -> float:
    """Two-sided sign-test p-value for ``wins`` of ``n`` (ties dropped before)."""
    if n == 0:
        return 1.0
    k = min(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarise(errors: Dict[str, List[float]]) -> Dict[str, dict]:
    """Per backend label: the error's distribution and its seed-by-seed comparison with "reference"."""
    out = {}
    ref = errors.get("reference")
    for label, vals in errors.items():
        s = sorted(vals)
        row = {"n": len(s), "median": s[len(s) // 2], "mean": sum(s) / len(s), "p90": s[int(0.9 * (len(s) - 1))],
               "max": s[-1]}
        if ref is not None and label != "reference" and len(ref) == len(vals):
            pairs = [(a, b) for a, b in zip(vals, ref) if a != b and a > 0 and b > 0]
            wins = sum(a > b for a, b in pairs)
            logs = [math.log(a / b) for a, b in pairs]
            row.update(ratio_geomean=math.exp(sum(logs) / len(logs)) if logs else 1.0,
                       frac_worse=wins / len(pairs) if pairs else 0.0, ties=len(vals) - len(pairs),
                       sign_p=_sign_test(wins, len(pairs)))
            row["drifts"] = bool(row["ratio_geomean"] > 1.1 and row["sign_p"] < 0.01)
        out[label] = row
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--triton-seeds", type=int, default=20, help="seeds for triton (the interpreter is slow)")
    ap.add_argument("--models", default="sine,classifier")
    ap.add_argument("--dtypes", default="float64,float32,float16,bfloat16")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--out", default="bench/results/numerics_grid_cpu.json")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measurement is about rounding: one thread, one summation order
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    labels = args.backends.split(",")
    if "triton" in labels and os.environ.get("TRITON_INTERPRET") != "1":
        labels.remove("triton")  # run with TRITON_INTERPRET=1 to include it
    cells = []
    for kind in args.models.split(","):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for opt in ("sgd", "adam"):
                if opt == "adam" and dtype == torch.float16:
                    continue  # refused by Reptile: Adam's eps is 0 in float16
                for algorithm in ("reptile", "fomaml"):
                    errs: Dict[str, Dict[str, List[float]]] = {}
                    for seed in range(args.seeds):
                        use = [l for l in labels if l != "triton" or seed < args.triton_seeds]
                        for label, row in cell_errors(kind, dtype, opt, algorithm, seed, use).items():
                            for measure, v in row.items():
                                errs.setdefault(measure, {}).setdefault(label, []).append(v)
                    # triton ran fewer seeds: compare it with the reference's first seeds
                    summary = {}
                    for measure, by_label in errs.items():
                        summary[measure] = summarise({l: v for l, v in by_label.items() if l != "triton"})
                        if "triton" in by_label:
                            n = len(by_label["triton"])
                            summary[measure]["triton"] = summarise(
                                {"reference": by_label["reference"][:n], "triton": by_label["triton"]})["triton"]
                    cell = {"model": kind, "dtype": dname, "optimizer": opt, "algorithm": algorithm,
                            "summary": summary}
                    cells.append(cell)
                    flag = [f"{m}:{l}" for m, s in summary.items() for l, r in s.items() if r.get("drifts")]
                    print(f"{kind:10s} {dname:8s} {opt:4s} {algorithm:7s} ref inner median "
                          f"{summary.get('inner', summary['meta_step'])['reference']['median']:.3g}"
                          f"  drifts: {flag or '-'}", flush=True)
    result = {"machine": machine_stamp(), "settings": {"tasks": T, "inner_steps": STEPS, "batch": BATCH, "lr": LR,
                                                       "seeds": args.seeds, "triton_seeds": args.triton_seeds},
              "cells": cells}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
