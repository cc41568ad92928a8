"""The measurement behind the benchmark gate's constant K (``bench.providers.GATE_K``).

    python -m bench.gate_calibration [--out bench/results/gate_calibration_cpu.json]

For each size (the smoke shapes and the CPU sweep's), every fp32 provider that runs here, and an
fp32 loop whose matrix-product inputs are rounded to tf32 (``EmulatedTF32Provider``: what the
GPU's tf32 mode does, emulated on the CPU), it records per task the relative error of the update
against the float64 oracle, e_i, and the constant that task needs,
K_i = e_i / (S · (u₃₂·ρ_i + L·u)) (``bench.providers``' derivation), keeping the largest.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import torch

from bench.providers import (UNIT_ROUNDOFF, Point, Prepared, Problem, Provider, SMOKE_POINTS, get_provider,
                             make_problem, oracle_updates)

__all__ = ["round_to_tf32", "EmulatedTF32Provider", "needed_constant", "main"]

#: sizes measured: the smoke shapes, the smoke sweep's, and the CPU sweep's widths and steps
POINTS = (*SMOKE_POINTS, Point(meta_batch=4, width=16, steps=2),
          *(Point(meta_batch=256, width=w, steps=5) for w in (32, 64, 128, 256)),
          Point(meta_batch=256, width=64, steps=32))


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to tf32's 10 mantissa bits (to nearest, ties away from zero), as fp32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _TF32Linear(torch.autograd.Function):
    """``h Wᵀ + b`` over tasks (``h [T, B, i]``, ``W [T, o, i]``) with every product's inputs in
    tf32, forward and backward; accumulation in fp32."""

    @staticmethod
    def forward(ctx, h, W, b):
        ctx.save_for_backward(h, W)
        return torch.bmm(round_to_tf32(h), round_to_tf32(W).transpose(1, 2)) + b.unsqueeze(1)

    @staticmethod
    def backward(ctx, g):
        h, W = ctx.saved_tensors
        rg = round_to_tf32(g)
        return torch.bmm(rg, round_to_tf32(W)), torch.bmm(rg.transpose(1, 2), round_to_tf32(h)), g.sum(1)


class EmulatedTF32Provider(Provider):
    """The benchmark's inner loop (MLP with tanh, MSE, SGD) in fp32 with tf32 matrix-product
    inputs, declared ``precision`` (default "tf32"; "fp32" to show the fp32 bound refuses it)."""

    name = "emulated-tf32"

    def __init__(self, precision: str = "tf32"):
        self.precision = precision

    def prepare(self, problem: Problem) -> Prepared:
        names = [n for n, _ in problem.model.named_parameters()]
        phi = [p.detach() for p in problem.model.parameters()]
        lr, T = problem.point.lr, problem.point.meta_batch
        if problem.point.activation != "tanh":
            raise ValueError("the emulation covers tanh MLPs")

        def run(i):
            r = i % problem.rotations
            tasks, plan = problem.tasks[r], problem.plans[r]
            rows = torch.arange(T, device=plan.device).view(-1, 1)
            params = [p.unsqueeze(0).repeat(T, *([1] * p.dim())) for p in phi]
            for s in range(plan.shape[1]):
                params = [p.detach().requires_grad_() for p in params]
                h, y = tasks.x[rows, plan[:, s]], tasks.y[rows, plan[:, s]]
                n_layers = len(params) // 2
                for k in range(n_layers):
                    h = _TF32Linear.apply(h, params[2 * k], params[2 * k + 1])
                    if k < n_layers - 1:
                        h = torch.tanh(h)
                loss = ((h - y) ** 2).mean(dim=(1, 2)).sum()  # each task's MSE; tasks independent
                grads = torch.autograd.grad(loss, params)
                params = [p.detach() - lr * g for p, g in zip(params, grads)]
            return dict(zip(names, params))

        return Prepared(run, lambda out: out)


def needed_constant(problem: Problem, params: Dict[str, torch.Tensor], precision: str, rotation: int = 0) -> Dict[str, float]:
    """The largest e_i and K_i over the tasks of input set ``rotation`` for adapted ``params``."""
    names = [n for n, _ in problem.model.named_parameters()]
    phi = {n: p.detach().to("cpu", torch.float64) for n, p in problem.model.named_parameters()}
    oracle = oracle_updates(problem, rotation)
    T = problem.point.meta_batch
    mine = torch.cat([(params[n].detach().cpu().double() - phi[n]).reshape(T, -1) for n in names], 1)
    ref = torch.cat([oracle[n].reshape(T, -1) for n in names], 1)
    err = (mine - ref).norm(dim=1) / ref.norm(dim=1)
    rho = torch.cat([v.reshape(-1) for v in phi.values()]).norm() / ref.norm(dim=1)
    layers = len(problem.point.dims) - 1
    k = err / (problem.point.steps * (UNIT_ROUNDOFF["fp32"] * rho + layers * UNIT_ROUNDOFF[precision]))
    return {"max_rel_err": float(err.max()), "K_needed": float(k.max()), "max_rho": float(rho.max())}


def main(argv: List[str] | None = None) -> dict:
    from bench.env import machine_stamp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gate_calibration_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for point in POINTS:
        problem = make_problem(point, "cpu")
        cases = [("torch", "fp32"), ("torch-vmap", "fp32"), ("reference", "fp32"), ("emulated-tf32", "tf32")]
        if point.meta_batch <= 4:
            cases.insert(0, ("seed", "fp32"))
        for name, precision in cases:
            prepared = (EmulatedTF32Provider() if name == "emulated-tf32" else get_provider(name)).prepare(problem)
            row = {"point": point.id, "width": point.width, "steps": point.steps, "meta_batch": point.meta_batch,
                   "provider": name, "precision": precision,
                   **needed_constant(problem, prepared.to_params(prepared.run(0)), precision)}
            rows.append(row)
            print(f"{point.id:>14} {name:>14} {precision}: max e {row['max_rel_err']:.3g}  K needed {row['K_needed']:.3g}",
                  flush=True)
    result = {"machine": machine_stamp(), "rows": rows,
              "K_needed_max": {p: max(r["K_needed"] for r in rows if r["precision"] == p) for p in UNIT_ROUNDOFF},
              "note": "K_i = e_i / (S·(u32·ρ_i + L·u)), e_i the update's relative error against the float64 "
                      "oracle on task i; bench.providers.GATE_K is the largest K needed times a safety factor"}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"K needed: {result['K_needed_max']} -> {args.out}")
    return result


if __name__ == "__main__":
    main()
