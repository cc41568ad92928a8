"""The sine job's fast preset timed for two source trees (e.g. an old commit's worktree and this
one) in the same run: interleaved rounds, each in a fresh process, so machine load falls on both.

    python -m bench.compare_trees --trees /path/to/old /path/to/new --iterations 800 --rounds 4 \\
        --out bench/results/fast_preset_trees_cpu.json

A time measured in one session against another session's number says nothing on a shared
machine; this gives the ratio.  Both trees must train to the same model for the same seed (the
check before any time is compared: a tree that computes something else is not timed against one
that does not).  Each round runs ``reptile_fast.jobs.run_sine`` (the CLI's job) with
``--backend torch --meta-batch-size 16 --outer-lr 1.5`` and ``--iterations``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.env import machine_stamp

# run in the child, with the tree first on sys.path: prints one JSON line
CHILD = r"""
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
import reptile_fast, torch
from reptile_fast.jobs import SineConfig, run_sine
cfg = SineConfig(seed=int(sys.argv[3]), checkpoint_every=0, backend="torch", iterations=int(sys.argv[2]),
                 meta_batch_size=16, outer_lr=1.5)
with tempfile.TemporaryDirectory() as tmp:
    m = run_sine(cfg, tmp, progress=False)
print(json.dumps({"file": reptile_fast.__file__, "ms_per_iteration": m["ms_per_iteration"],
                  "post_adaptation_mse": m["post_adaptation_mse"], "torch": torch.__version__}))
"""


def run_in_tree(child: str, tree: str, *args) -> dict:
    """Run ``child`` (Python source that puts ``sys.argv[1]`` first on sys.path and prints a JSON
    line with the imported ``reptile_fast.__file__`` as "file") in a fresh process for ``tree``;
    its last line, checked to come from that tree's code."""
    out = subprocess.run([sys.executable, "-c", child, tree, *map(str, args)], check=True,
                         capture_output=True, text=True, cwd=tree).stdout
    row = json.loads(out.strip().splitlines()[-1])
    if not Path(row["file"]).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"{tree}: imported reptile_fast from {row['file']}, not from the tree")
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trees", nargs=2, required=True, help="two source trees (worktrees of two commits)")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = {t: [] for t in args.trees}
    for r in range(args.rounds):
        for tree in (args.trees if r % 2 == 0 else args.trees[::-1]):  # alternate which goes first
            rows[tree].append(run_in_tree(CHILD, tree, args.iterations, args.seed))
            print(tree, rows[tree][-1], flush=True)
    mse = {t: {row["post_adaptation_mse"] for row in rs} for t, rs in rows.items()}
    if len(set.union(*mse.values())) != 1:
        raise SystemExit(f"the trees trained different models (post-adaptation MSE {mse}): not timed against "
                         f"each other")
    med = {t: statistics.median(row["ms_per_iteration"] for row in rs) for t, rs in rows.items()}
    old, new = args.trees
    result = {"trees": args.trees, "iterations": args.iterations, "rounds": args.rounds, "seed": args.seed,
              "median_ms_per_iteration": med, "ratio_second_over_first": med[new] / med[old],
              "post_adaptation_mse": next(iter(mse[old])), "runs": rows, **machine_stamp()}
    print(json.dumps({k: result[k] for k in ("median_ms_per_iteration", "ratio_second_over_first")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
