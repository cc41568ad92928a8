"""What the paired Omniglot experiments share (``omniglot_minibatches``, ``omniglot_net_pixels``,
``omniglot_net_parts``): their command-line protocol and the per-task paired difference."""
from __future__ import annotations

import argparse
import math
from typing import Optional

import torch

from reptile_fast.fewshot import mean_ci95


def ci_or_none(value: float) -> Optional[float]:
    """A confidence half-width for JSON: None where it is undefined (NaN: one task)."""
    return None if math.isnan(value) else value


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean and 95 % half-width (1.96 · std / sqrt(T)) of the per-task differences ``a - b``."""
    mean, half = mean_ci95(a - b)
    return {"mean": mean, "ci95": ci_or_none(half), "n_tasks": int(a.numel()),
            "tasks_a_better": int((a > b).sum()), "tasks_b_better": int((a < b).sum())}


def protocol_arguments(description: str, *, result: str, out_dir: Optional[str] = None,
                       out_dir_help: str = "", job_check: bool = True) -> argparse.ArgumentParser:
    """The experiments' shared flags: the data (the two small background sets: small1 trains,
    small2's held-out alphabets test), the paper's 5-way protocol cut to ``--iterations``, the test
    episodes, threads, seed and the result file; ``--out-dir`` and ``--job-eval-tasks`` (the job's
    own test, reproduced as a check) for the experiments that run the job."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default="../shared/data/omniglot",
                   help="folder with images_background_small1.zip (train) and images_background_small2.zip (test)")
    if out_dir is not None:
        p.add_argument("--out-dir", default=out_dir, help=out_dir_help)
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--eval-tasks", type=int, default=200)
    if job_check:
        p.add_argument("--eval-steps", type=int, default=None, help="adaptation steps (default: the preset's 50)")
        p.add_argument("--job-eval-tasks", type=int, default=10,
                       help="episodes of the job's own test, reproduced here as a check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", default=result)
    return p
