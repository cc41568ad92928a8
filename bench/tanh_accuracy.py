"""Kernel v2's tanh against float64 near where its two forms meet and near saturation, under the
Triton interpreter (the kernel's fp32 arithmetic on the CPU; on a GPU the GPU check's stage 3
measures the special functions on fewer points).

    TRITON_INTERPRET=1 python -m bench.tanh_accuracy [--out bench/results/FILE.json]

Every float32 in [0.4, 1) (where |x| >= 0.4 leaves the Taylor series and cancellation in the
closed form is largest), a grid of float32 on [0.4, 10], and the smallest x at which the kernel's
tanh returns 1.0 beside the smallest at which fp32-rounded tanh does (below that the gradient
1 - y² of a unit torch still trains is 0 in the kernel).  Errors relative to float64 tanh of the
same fp32 input, in units of 2^-23 (``ACCURACY["tanh"]`` states the bound).  To measure another
version of the kernel, run this file with that version's tree first on ``PYTHONPATH`` (the
special-function launcher is ``tests/test_kernel_mlp_meta_step_v2.py::_apply``, as in the GPU
check).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


def _errors(apply, x):
    import torch

    exact = torch.tanh(x.double())
    got = apply("tanh", x, "cpu").double()
    err = (got - exact).abs() / exact.abs().clamp_min(1e-300) / 2.0 ** -23
    i = int(err.argmax())
    return {"points": x.numel(), "max": float(err[i]), "at": float(x[i]), "mean": float(err.mean())}


def measure(apply) -> dict:
    import torch

    lo, hi = (torch.tensor([0.4, 1.0]).view(torch.int32)).tolist()
    every = torch.arange(lo, hi, dtype=torch.int32).view(torch.float32)
    grid = torch.linspace(0.4, 10.0, 500001)
    sat = torch.linspace(8.0, 9.5, 150001)
    got = apply("tanh", sat, "cpu")
    want = torch.tanh(sat.double()).float()
    return {"every_float32_in_[0.4,1)": _errors(apply, every), "grid_[0.4,10]_500001": _errors(apply, grid),
            "first_x_with_tanh_1": {"kernel": float(sat[got >= 1].min()), "float64_rounded_to_fp32": float(sat[want >= 1].min()),
                                    "grid": "linspace(8, 9.5, 150001)"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tanh_accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the record here (JSON)")
    ap.add_argument("--label", default="this tree", help="what kernel version is measured (recorded)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("set TRITON_INTERPRET=1: this measures the kernel's arithmetic under the interpreter")
    tests = next(Path(p) / "tests" for p in [*sys.path, "."] if (Path(p or ".") / "tests" / "test_kernel_mlp_meta_step_v2.py").exists())
    sys.path.insert(0, str(tests))
    tmod = importlib.import_module("test_kernel_mlp_meta_step_v2")
    result = measure(tmod._apply)
    for k, v in result.items():
        print(k, v)
    if args.out:
        from bench.env import machine_stamp
        from reptile_fast.kernels import mlp_meta_step_v2 as V

        stamp = {**machine_stamp(), "command": " ".join(["python -m bench.tanh_accuracy", *(argv if argv is not None else sys.argv[1:])]),
                 "kernel_module": V.__file__, "stated_bound": V.ACCURACY["tanh"], "label": args.label}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "units": "2^-23 relative to float64", **result}, indent=1) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
