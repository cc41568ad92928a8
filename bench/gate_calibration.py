"""The measurement behind the benchmark gate's constant K (``bench.providers.GATE_K``).

    python -m bench.gate_calibration [--out bench/results/gate_calibration_cpu.json]

For each size (the smoke shapes and the CPU sweep's), every fp32 provider that runs here, and an
fp32 loop whose matrix-product inputs are rounded to tf32 (``EmulatedTF32Provider``: what the
GPU's tf32 mode does, emulated on the CPU; to nearest, and truncated as tensor cores reading raw
fp32 registers do), it records per task the relative error of the update against the float64
oracle, e_i, and the constant that task needs, K_i = e_i / (S·u₃₂·ρ_i + L·u·A_i)
(``bench.providers``' derivation; A_i the float64 path ratio), keeping the largest.  For the
tf32 rows it also records the error of the same loop at 90 % of the learning rate, which the
gate must refuse.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import torch

from bench.providers import (GATE_K, UNIT_ROUNDOFF, Point, Prepared, Problem, Provider, SMOKE_POINTS, get_provider,
                             make_problem, oracle_updates, update_error_bound)

__all__ = ["round_to_tf32", "EmulatedTF32Provider", "needed_constant", "main"]

#: sizes measured: the smoke shapes, the smoke sweep's, and the CPU sweep's widths and steps
POINTS = (*SMOKE_POINTS, Point(meta_batch=4, width=16, steps=2),
          *(Point(meta_batch=256, width=w, steps=5) for w in (32, 64, 128, 256)),
          Point(meta_batch=256, width=64, steps=32))


def round_to_tf32(x: torch.Tensor, rounding: str = "rna") -> torch.Tensor:
    """fp32 ``x`` with tf32's 10 mantissa bits, as fp32: "rna" to nearest, ties away from zero
    (``cvt.rna.tf32.f32``); "trunc" the 13 low bits dropped (toward zero)."""
    bits = x.contiguous().view(torch.int32)
    if rounding == "rna":
        bits = bits + 0x1000
    elif rounding != "trunc":
        raise ValueError(f"rounding must be 'rna' or 'trunc', got {rounding!r}")
    return (bits & ~0x1FFF).view(torch.float32)


class _TF32Linear(torch.autograd.Function):
    """``h Wᵀ + b`` over tasks (``h [T, B, i]``, ``W [T, o, i]``) with every product's inputs in
    tf32, forward and backward; accumulation in fp32."""

    @staticmethod
    def forward(ctx, h, W, b, rounding):
        ctx.save_for_backward(h, W)
        ctx.rounding = rounding
        return torch.bmm(round_to_tf32(h, rounding), round_to_tf32(W, rounding).transpose(1, 2)) + b.unsqueeze(1)

    @staticmethod
    def backward(ctx, g):
        h, W = ctx.saved_tensors
        r = ctx.rounding
        rg = round_to_tf32(g, r)
        return (torch.bmm(rg, round_to_tf32(W, r)), torch.bmm(rg.transpose(1, 2), round_to_tf32(h, r)), g.sum(1),
                None)


class EmulatedTF32Provider(Provider):
    """The benchmark's inner loop (MLP with tanh, MSE, SGD) in fp32 with tf32 matrix-product
    inputs, declared ``precision`` (default "tf32"; "fp32" to show the fp32 bound refuses it).
    ``rounding``: "rna" or "trunc" (``round_to_tf32``); ``lr_scale``: the loop run at
    ``lr_scale`` × the problem's learning rate (0.9: a wrong provider the tf32 gate must refuse)."""

    name = "emulated-tf32"

    def __init__(self, precision: str = "tf32", rounding: str = "rna", lr_scale: float = 1.0):
        round_to_tf32(torch.zeros(1), rounding)  # validates rounding
        self.precision, self.rounding, self.lr_scale = precision, rounding, lr_scale

    def prepare(self, problem: Problem) -> Prepared:
        names = [n for n, _ in problem.model.named_parameters()]
        phi = [p.detach() for p in problem.model.parameters()]
        lr, T = problem.point.lr * self.lr_scale, problem.point.meta_batch
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
                    h = _TF32Linear.apply(h, params[2 * k], params[2 * k + 1], self.rounding)
                    if k < n_layers - 1:
                        h = torch.tanh(h)
                loss = ((h - y) ** 2).mean(dim=(1, 2)).sum()  # each task's MSE; tasks independent
                grads = torch.autograd.grad(loss, params)
                params = [p.detach() - lr * g for p, g in zip(params, grads)]
            return dict(zip(names, params))

        return Prepared(run, lambda out: out)


def needed_constant(problem: Problem, params: Dict[str, torch.Tensor], precision: str, rotation: int = 0) -> Dict[str, float]:
    """The largest e_i and K_i = e_i / (S·u₃₂·ρ_i + L·u·A_i) over the tasks of input set
    ``rotation`` for adapted ``params``, and the largest ρ_i and A_i."""
    names = [n for n, _ in problem.model.named_parameters()]
    phi = {n: p.detach().to("cpu", torch.float64) for n, p in problem.model.named_parameters()}
    oracle = oracle_updates(problem, rotation)
    T = problem.point.meta_batch
    mine = torch.cat([(params[n].detach().cpu().double() - phi[n]).reshape(T, -1) for n in names], 1)
    ref = torch.cat([oracle[n].reshape(T, -1) for n in names], 1)
    norm = ref.norm(dim=1)
    err = (mine - ref).norm(dim=1) / norm
    rho = torch.cat([v.reshape(-1) for v in phi.values()]).norm() / norm
    path_ratio = oracle.path / norm
    k = err / (update_error_bound(problem.point, precision, rho, path_ratio) / GATE_K)
    return {"max_rel_err": float(err.max()), "min_rel_err": float(err.min()), "K_needed": float(k.max()),
            "max_rho": float(rho.max()), "max_path_ratio": float(path_ratio.max())}


def main(argv: List[str] | None = None) -> dict:
    from bench.env import machine_stamp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gate_calibration_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for point in POINTS:
        problem = make_problem(point, "cpu")
        emulated = {"emulated-tf32": EmulatedTF32Provider(), "emulated-tf32-trunc": EmulatedTF32Provider(rounding="trunc"),
                    "emulated-tf32-0.9lr": EmulatedTF32Provider(lr_scale=0.9)}
        cases = [("torch", "fp32"), ("torch-vmap", "fp32"), ("reference", "fp32"),
                 *((name, "tf32") for name in emulated)]
        if point.meta_batch <= 4:
            cases.insert(0, ("seed", "fp32"))
        for name, precision in cases:
            prepared = (emulated[name] if name in emulated else get_provider(name)).prepare(problem)
            row = {"point": point.id, "width": point.width, "steps": point.steps, "meta_batch": point.meta_batch,
                   "provider": name, "precision": precision,
                   **needed_constant(problem, prepared.to_params(prepared.run(0)), precision)}
            rows.append(row)
            print(f"{point.id:>14} {name:>20} {precision}: max e {row['max_rel_err']:.3g}  K needed {row['K_needed']:.3g}",
                  flush=True)
    correct = [r for r in rows if not r["provider"].endswith("0.9lr")]
    result = {"machine": machine_stamp(), "rows": rows,
              "K_needed_max": {p: max(r["K_needed"] for r in correct if r["precision"] == p) for p in UNIT_ROUNDOFF},
              "K_needed_max_tf32_trunc": max(r["K_needed"] for r in rows if r["provider"] == "emulated-tf32-trunc"),
              "K_needed_min_tf32_0.9lr": min(r["K_needed"] for r in rows if r["provider"].endswith("0.9lr")),
              "GATE_K": GATE_K,
              "note": "K_i = e_i / (S·u32·ρ_i + L·u·A_i), e_i the update's relative error against the float64 "
                      "oracle on task i, A_i its float64 path ratio; bench.providers.GATE_K is the largest K a "
                      "correct provider needed times a safety factor; the 0.9lr rows (a wrong provider) must need "
                      "more than GATE_K on some task: K_needed (the max over tasks) > GATE_K"}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"K needed: {result['K_needed_max']} -> {args.out}")
    return result


if __name__ == "__main__":
    main()
