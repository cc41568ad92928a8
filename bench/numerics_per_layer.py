"""Per parameter tensor: backend "torch"'s distance from a float64 oracle against the reference
backend's, over seeds -- where in the model a fast path's extra rounding sits.

    python -m bench.numerics_per_layer [--seeds 32] [--algorithm fomaml] [--fused-output-update]
                                       [--out bench/results/FILE.json]

The sine MLP 1-64-64-1 in float32 with a plain-SGD inner loop (``bench.numerics_grid``'s tasks,
plan, learning rate and float64 oracle: backend "reference" in float64 on the same rounded
parameters and data).  Per seed and parameter tensor: ‖x_torch − x_64‖ / ‖x_ref − x_64‖ for the
adapted parameters and, with FOMAML, the meta-gradients; per tensor the geometric mean of that
ratio over seeds and on how many seeds backend torch was farther.

``--fused-output-update``: the one-output-feature layer's SGD step fused into its one-row weight
gradient product, ``W.baddbmm_(gᵀ, h, alpha=−lr)``, as backend torch did before session 17 (the
form QA31 found 1.28x farther on an AMD EPYC; ``mlp_batched.fused_one_output_update``), for the
comparison; the default is the code as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch

from bench.env import machine_stamp
from bench.numerics_grid import BATCH, LR, STEPS, T, _cast, make_model, make_tasks
from reptile_fast import sample_indices
from reptile_fast.backends import InnerConfig, get_backend
from reptile_fast.backends import mlp_batched as MB


def ratios(seeds: int, algorithm: str) -> dict:
    """Per tensor ("adapted NAME", "meta-grad NAME"): log-ratios of backend torch's distance from the
    float64 oracle to the reference's, one per seed (seeds where either distance is 0 dropped)."""
    cfg = InnerConfig(lr=LR["sgd"], optimizer="sgd", loss="mse", algorithm=algorithm)
    out = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = make_model("sine").float()
        g = torch.Generator().manual_seed(seed)
        tasks = _cast(make_tasks("sine", g), torch.float32)
        idx = sample_indices(T, STEPS + (algorithm == "fomaml"), tasks.n_points, BATCH, generator=g)
        model64 = make_model("sine").double()
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        oracle = get_backend("reference").inner_loop(model64, _cast(tasks, torch.float64), idx, cfg)
        res = {b: get_backend(b).inner_loop(model, tasks, idx, cfg) for b in ("reference", "torch")}
        for kind, field in (("adapted", "params"), ("meta-grad", "meta_grads")):
            want = getattr(oracle, field)
            if want is None:
                continue
            for name in want:
                d = {b: float((getattr(r, field)[name].double() - want[name]).norm()) for b, r in res.items()}
                if d["reference"] > 0 and d["torch"] > 0:
                    out.setdefault(f"{kind} {name}", []).append(math.log(d["torch"] / d["reference"]))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.numerics_per_layer", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--algorithm", default="fomaml", choices=("fomaml", "reptile"))
    ap.add_argument("--fused-output-update", action="store_true",
                    help="the one-output-feature layer's SGD step fused as before session 17")
    ap.add_argument("--out", help="write {machine, settings, rows} JSON here")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rounding, not speed: one thread, one summation order
    try:
        with MB.fused_one_output_update() if args.fused_output_update else contextlib.nullcontext():
            logs = ratios(args.seeds, args.algorithm)
    finally:
        torch.set_num_threads(threads)
    rows = {name: {"ratio_geomean": math.exp(sum(v) / len(v)), "farther": sum(x > 0 for x in v), "n": len(v)}
            for name, v in logs.items()}
    for name, r in rows.items():
        print(f"{name:26s} torch / reference: geometric mean {r['ratio_geomean']:.3f}, farther on {r['farther']} of {r['n']}")
    result = {"machine": machine_stamp(), "settings": {"seeds": args.seeds, "algorithm": args.algorithm,
                                                       "fused_output_update": args.fused_output_update,
                                                       "tasks": T, "inner_steps": STEPS, "batch": BATCH, "lr": LR["sgd"]},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
