"""Two parts of the CPU's compiled meta-step, each beside what it replaced, in the same rounds.

1. The native C program alone (``NativeProgram`` on ready tensors: no sampling, no gathering),
   sine MLP 1-64-64-1, 5 inner steps of 10 points, meta-batch T: the hidden layer's ``Wᵀ`` copied
   from the updated ``W`` by block transposes (the default) against a second weight-gradient
   product (``NativeProgram(transpose=False)``).  Useful FLOP/s (``bench.flops``) as a fraction of
   the same round's 1024² sgemm rate.  Both programs are first checked bitwise equal.  Beside
   them, the same program for the MLP without activations (identity instead of tanh: the same
   products, another model) prices the tanh: time of the tanh MLP over time of the linear one.
2. The minibatch plan's selection (``sample_indices``: the 10 smallest of 50 keys per task and
   step): ``native_select.smallest_k`` against ``torch.topk``, ns per row, after checking equal
   indices.

One thread; interleaved rounds (a shared machine's load hits both sides alike); medians.

    python -m bench.native_step_parts --rounds 5 --out bench/results/native_step_parts_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.env import machine_stamp
from bench.flops import inner_loop_flops, measure_matmul_peak

DIMS, STEPS, BATCH, N_POINTS = (1, 64, 64, 1), 5, 10, 50


def _program(T: int, transpose: bool, activation: str = "tanh"):
    from reptile_fast import MLP, native_step
    from reptile_fast.mlp_spec import MLPSpec, extract_mlp_spec

    spec = extract_mlp_spec(MLP(1, 64, 1))
    if activation != "tanh":
        spec = MLPSpec(spec.dims, (activation,) * (len(spec.dims) - 2) + ("identity",),
                       spec.weight_names, spec.bias_names)
    return native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=STEPS, n_tasks=T, batch=BATCH,
                                     dtype=torch.float32, transpose=transpose).build()


def _inputs(T: int, M: int):
    from reptile_fast import MLP, Sine, sample_indices
    from reptile_fast.steppers import gather_chunk

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    phi = [p.detach() for p in MLP(1, 64, 1).parameters()]
    tasks = Sine().sample(M * T, generator=g)
    plans = sample_indices(M * T, STEPS, N_POINTS, BATCH, generator=g)
    xs, ys = gather_chunk(tasks, plans, T)
    return phi, xs, ys, torch.full((M,), 0.1)


def _best_seconds(fn, min_time: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    best = float("inf")
    while time.perf_counter() - t0 < min_time or n < 3:
        s = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - s)
        n += 1
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="1,32,256")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per case and round")
    p.add_argument("--out", default="bench/results/native_step_parts_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from reptile_fast.native_select import smallest_k

    sizes = [int(s) for s in args.sizes.split(",")]
    programs, inputs, checks = {}, {}, {}
    for T in sizes:
        M = max(1, 256 // T)
        inputs[T] = _inputs(T, M)
        programs[T] = {"transpose": _program(T, True), "two products": _program(T, False),
                       "linear MLP": _program(T, True, "identity")}
        a = programs[T]["transpose"](*inputs[T])
        b = programs[T]["two products"](*inputs[T])
        checks[f"program T{T}"] = bool(all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1]))
    keys = {T: torch.rand(T * STEPS, N_POINTS, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
            for T in sizes}
    for T in sizes:
        checks[f"selection T{T}"] = bool(torch.equal(smallest_k(keys[T], BATCH),
                                                     keys[T].topk(BATCH, dim=-1, largest=False, sorted=True).indices))
    if not all(checks.values()):
        print("checks failed:", checks)
        return 1

    frac = {(T, v): [] for T in sizes for v in ("transpose", "two products", "linear MLP")}
    sel = {(T, v): [] for T in sizes for v in ("C", "topk")}
    peaks = []
    for _ in range(args.rounds):
        peak = measure_matmul_peak(torch.device("cpu"))["flops_per_s"]
        peaks.append(peak)
        for T in sizes:
            M = inputs[T][1].shape[0]
            flops = inner_loop_flops(DIMS, BATCH, STEPS, T) * M
            for v, prog in programs[T].items():
                frac[T, v].append(flops / _best_seconds(lambda: prog(*inputs[T]), args.min_time) / peak)
            rows = T * STEPS
            sel[T, "C"].append(1e9 * _best_seconds(lambda: smallest_k(keys[T], BATCH), args.min_time / 3) / rows)
            sel[T, "topk"].append(1e9 * _best_seconds(
                lambda: keys[T].topk(BATCH, dim=-1, largest=False, sorted=True).indices, args.min_time / 3) / rows)
    med = statistics.median
    program = {f"T{T}": {"transpose_fraction_of_peak": med(frac[T, "transpose"]),
                         "two_products_fraction_of_peak": med(frac[T, "two products"]),
                         "speedup_median_of_rounds": med(a / b for a, b in zip(frac[T, "transpose"], frac[T, "two products"])),
                         "tanh_mlp_time_over_linear_mlp_time": med(b / a for a, b in zip(frac[T, "transpose"], frac[T, "linear MLP"])),
                         "per_round": {"transpose": frac[T, "transpose"], "two products": frac[T, "two products"],
                                       "linear MLP (same FLOP count used)": frac[T, "linear MLP"]}}
               for T in sizes}
    selection = {f"T{T}": {"rows": T * STEPS, "C_ns_per_row": med(sel[T, "C"]), "topk_ns_per_row": med(sel[T, "topk"]),
                           "speedup_median_of_rounds": med(b / a for a, b in zip(sel[T, "C"], sel[T, "topk"]))}
                 for T in sizes}
    result = {"experiment": __doc__.split("\n\n")[0], "checks": checks, "rounds": args.rounds,
              "peak_flops_per_s": {"median": med(peaks), "per_round": peaks,
                                   "what": "1024x1024 fp32 matmul, best of repeats, measured each round"},
              "native_program": program, "plan_selection": selection,
              "note": "one thread; best time per case within each round, medians over rounds; the machine's "
                      "2 cores are shared",
              **machine_stamp(),
              "command": "python -m bench.native_step_parts " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for k, v in program.items():
        print(f"program {k}: transpose {100 * v['transpose_fraction_of_peak']:.1f}% of peak, two products "
              f"{100 * v['two_products_fraction_of_peak']:.1f}% ({v['speedup_median_of_rounds']:.2f}x); "
              f"tanh MLP / linear MLP time {v['tanh_mlp_time_over_linear_mlp_time']:.2f}")
    for k, v in selection.items():
        print(f"selection {k}: C {v['C_ns_per_row']:.0f} ns/row, topk {v['topk_ns_per_row']:.0f} ns/row "
              f"({v['speedup_median_of_rounds']:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
