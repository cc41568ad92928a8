"""``reptile-fast`` / ``python -m reptile_fast``: the command line."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import List, Optional

from .backends import BACKENDS

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .jobs import SineConfig

    d = SineConfig()
    parser = argparse.ArgumentParser(prog="reptile-fast", description="Fast Reptile meta-learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sine = sub.add_parser("sine", help="meta-train the seed's MLP on sine-wave regression",
                          description="Meta-train the seed's MLP on sine tasks and write the figure, "
                                      "learning curve, checkpoint and metrics into --out.")
    sine.add_argument("--iterations", type=_positive_int, default=d.iterations, help="meta-steps")
    sine.add_argument("--meta-batch-size", type=_positive_int, default=d.meta_batch_size,
                      help="tasks per meta-step")
    sine.add_argument("--outer-lr", type=_positive_float, default=d.outer_lr, help="ε, the outer step")
    sine.add_argument("--outer-lr-final", type=_nonneg_float, default=d.outer_lr_final,
                      help="anneal ε linearly to this value")
    sine.add_argument("--inner-lr", type=_positive_float, default=d.inner_lr)
    sine.add_argument("--inner-steps", type=_positive_int, default=d.inner_steps)
    sine.add_argument("--inner-batch-size", type=_positive_int, default=d.inner_batch_size)
    sine.add_argument("--backend", default=d.backend, choices=["auto", *sorted(BACKENDS)])
    sine.add_argument("--device", default=d.device, help="cpu (default) or cuda")
    sine.add_argument("--seed", type=_nonneg_int, default=d.seed)
    sine.add_argument("--eval-tasks", type=_positive_int, default=d.eval_tasks,
                      help="held-out tasks for the post-adaptation MSE")
    sine.add_argument("--out", default="runs/sine", help="output directory")
    sine.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sine":
        import torch

        from .jobs import SineConfig, run_sine

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        try:
            torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: unknown device {args.device!r}")
        config = SineConfig(iterations=args.iterations, meta_batch_size=args.meta_batch_size,
                            outer_lr=args.outer_lr, outer_lr_final=args.outer_lr_final,
                            inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                            inner_batch_size=args.inner_batch_size, backend=args.backend,
                            seed=args.seed, eval_tasks=args.eval_tasks, device=args.device)
        if config.inner_batch_size > 50:
            parser.error(f"--inner-batch-size {config.inner_batch_size} exceeds the 50 points of a sine task")
        try:
            metrics = run_sine(config, args.out, progress=not args.no_progress)
        except (ValueError, TypeError, PermissionError, OSError) as exc:
            print(f"reptile-fast: error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(metrics, indent=2))
        print(f"wrote figure.png, learning_curve.png, model.pt, config.json, metrics.json to {args.out}")
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
