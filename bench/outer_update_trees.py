"""``OuterUpdate.apply`` (the outer step every meta-step ends with) timed for two source trees in
the same run: interleaved rounds, each configuration in a fresh process, one thread.

    python -m bench.outer_update_trees --trees /path/to/old /path/to/new --rounds 3 \\
        --out bench/results/outer_update_trees_cpu.json

Configurations: ``MLP(1, H, 1, depth=2)`` (H = 64: the sine model, 4.4k parameters; H = 512:
264k) with the interpolation ``φ + ε·mean D`` ("interp") or an outer ``torch.optim.Adam``
("adam"); fixed finite deltas, 20 warm-up calls, then min and median of 9 rounds of 50 calls.
Before any time is compared, both trees must leave φ bitwise equal after the same calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.compare_trees import run_in_tree
from bench.env import machine_stamp

CHILD = r"""
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import reptile_fast
from reptile_fast.core import OuterUpdate
from reptile_fast.models import MLP
H, mode = int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
m = MLP(1, H, 1, depth=2)
named = list(m.named_parameters())
opt = torch.optim.Adam(m.parameters(), lr=1e-3) if mode == "adam" else None
update = OuterUpdate(named, opt)
deltas = [torch.randn_like(p) * 1e-3 for _, p in named]
loss = torch.zeros(())
for i in range(20):
    update.apply(deltas, loss, 0.1, i + 1)
times = []
for r in range(9):
    t = time.perf_counter()
    for i in range(50):
        update.apply(deltas, loss, 0.1, 21 + 50 * r + i)
    times.append((time.perf_counter() - t) / 50 * 1e6)
update.check()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in named)).hexdigest()
print(json.dumps({"file": reptile_fast.__file__, "min_us": min(times), "median_us": sorted(times)[4],
                  "phi_sha256": digest}))
"""

CONFIGS = [(64, "interp"), (512, "interp"), (64, "adam"), (512, "adam")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trees", nargs=2, required=True, help="two source trees (old, new)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = {f"H{h}-{m}": {t: [] for t in args.trees} for h, m in CONFIGS}
    for r in range(args.rounds):
        for h, m in CONFIGS:
            for tree in (args.trees if r % 2 == 0 else args.trees[::-1]):  # alternate which goes first
                rows[f"H{h}-{m}"][tree].append(run_in_tree(CHILD, tree, h, m))
    summary = {}
    for key, per_tree in rows.items():
        digests = {row["phi_sha256"] for tree in args.trees for row in per_tree[tree]}
        if len(digests) != 1:
            raise SystemExit(f"{key}: the trees leave different φ ({len(digests)} digests); not timed")
        old, new = (statistics.median(row["min_us"] for row in per_tree[t]) for t in args.trees)
        summary[key] = {"old_min_us_median": round(old, 1), "new_min_us_median": round(new, 1),
                        "old_over_new": round(old / new, 2),
                        "runs": {t: [{k: round(v, 1) for k, v in row.items() if k.endswith("_us")}
                                     for row in per_tree[t]] for t in args.trees}}
        print(key, summary[key]["old_over_new"], flush=True)
    record = {"what": "OuterUpdate.apply time per call, two trees, same run", "machine": machine_stamp(),
              "command": "python -m bench.outer_update_trees " + " ".join(argv or sys.argv[1:]),
              "trees": args.trees, "results": summary}
    text = json.dumps(record, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
