"""What tf32 and tf32x3 dots should cost in accuracy, emulated on the CPU (no GPU needed).

    python -m bench.tf32_emulation [--tasks 64] [--out bench/results/triton-tf32-emulated-cpu.json]

Runs the sine MLP 1-64-64-1 inner loop (5 SGD steps of 10 points, lr 0.02) exactly as kernel v2
splits it: the 1-wide layers in fp32, the 64 x 64 layer's three products (forward, input
gradient, weight gradient) with operands rounded to tf32 (10 explicit mantissa bits; both
round-to-nearest-away, as ``cvt.rna.tf32.f32``, and truncation, as tensor cores reading raw fp32
registers) or split 3-ways (``a·b ≈ hi(a)hi(b) + hi(a)lo(b) + lo(a)hi(b)``, Triton's "tf32x3"),
products accumulated in fp32.  It reports ‖φ̃ − φ̃_float64‖ / ‖φ̃_float64‖ over the tasks for each
mode, beside plain fp32 ("ieee").  An emulation: the GPU check (stage 3) measures the real thing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def to_tf32(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """fp32 -> the nearest (or truncated) value with 10 explicit mantissa bits, still fp32."""
    bits = x.contiguous().view(torch.int32)
    if rounding == "rna":
        bits = bits + 0x1000  # half of the dropped 13 bits: ties away from zero (sign-magnitude)
    return (bits & ~0x1FFF).view(torch.float32)


def mm(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """a @ b (batched) in fp32 with the operands treated as ``mode`` says."""
    if mode == "ieee":
        return a @ b
    if mode in ("tf32-rna", "tf32-trunc"):
        r = mode.split("-")[1]
        return to_tf32(a, r) @ to_tf32(b, r)
    if mode == "tf32x3":
        a_hi, b_hi = to_tf32(a, "rna"), to_tf32(b, "rna")
        a_lo, b_lo = to_tf32(a - a_hi, "rna"), to_tf32(b - b_hi, "rna")
        return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi
    raise ValueError(mode)


def inner_loop(params, x, y, plan, lr, mode, dtype):
    """Every task's SGD loop on the MLP 1-H-H-1 (tanh), MSE; params: φ; returns φ̃ [T, n] flat."""
    w0, b0, w1, b1, w2, b2 = [p.to(dtype) for p in params]
    T = x.shape[0]
    w0, b0, w1, b1, w2, b2 = [p.expand(T, *p.shape).clone() for p in (w0, b0, w1, b1, w2, b2)]
    rows = torch.arange(T).view(-1, 1)
    for s in range(plan.shape[1]):
        idx = plan[:, s]
        xb, yb = x[rows, idx].to(dtype), y[rows, idx].to(dtype)  # [T, B, 1]
        B = xb.shape[1]
        a1 = torch.tanh(xb * w0.transpose(1, 2) + b0[:, None, :])  # 1-wide: exact outer product
        z2 = (mm(a1, w1.transpose(1, 2), mode) if dtype == torch.float32 else a1 @ w1.transpose(1, 2))
        a2 = torch.tanh(z2 + b1[:, None, :])
        out = (a2 * w2).sum(-1, keepdim=True) + b2[:, None, :]  # 64 -> 1: row reduction
        g = (out - yb) * (2.0 / B)
        gw2 = (g * a2).sum(1, keepdim=True).transpose(1, 2).transpose(1, 2)
        gb2 = g.sum(1)
        g2 = g * w2 * (1 - a2 * a2)  # [T, B, H]
        if dtype == torch.float32:
            gw1 = mm(g2.transpose(1, 2), a1, mode)
            g1 = mm(g2, w1, mode) * (1 - a1 * a1)
        else:
            gw1 = g2.transpose(1, 2) @ a1
            g1 = (g2 @ w1) * (1 - a1 * a1)
        gb1 = g2.sum(1)
        gw0 = (g1 * xb).sum(1).unsqueeze(-1)
        gb0 = g1.sum(1)
        w0, b0, w1, b1 = w0 - lr * gw0, b0 - lr * gb0, w1 - lr * gw1, b1 - lr * gb1
        w2, b2 = w2 - lr * gw2, b2 - lr * gb2
    return torch.cat([p.reshape(T, -1) for p in (w0, b0, w1, b1, w2, b2)], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from reptile_fast import MLP, Sine, sample_indices

    torch.backends.cuda.matmul.allow_tf32 = False
    modes = ("ieee", "tf32x3", "tf32-rna", "tf32-trunc")
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = MLP()
        params = [p.detach() for p in model.parameters()]
        g = torch.Generator().manual_seed(100 + seed)
        tasks = Sine().sample(args.tasks, generator=g)
        plan = sample_indices(args.tasks, 5, 50, 10, generator=g)
        ref = inner_loop(params, tasks.x, tasks.y, plan, 0.02, "ieee", torch.float64)
        row = {"seed": seed}
        for mode in modes:
            got = inner_loop(params, tasks.x, tasks.y, plan, 0.02, mode, torch.float32)
            row[mode] = float((got.double() - ref).norm() / ref.norm())
        rows.append(row)
        print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    worst = {m: max(r[m] for r in rows) for m in modes}
    print("worst relative error of the adapted parameters vs float64:", worst)
    if args.out:
        from bench.env import machine_stamp

        stamp = {**machine_stamp(), "command": " ".join(["python -m bench.tf32_emulation", *(argv or sys.argv[1:])])}
        Path(args.out).write_text(json.dumps({"stamp": stamp, "note": "CPU emulation of kernel v2's arithmetic "
                                              "with tf32 operands in the 64x64 layer; not a GPU measurement",
                                              "tasks": args.tasks, "rows": rows, "worst": worst}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
