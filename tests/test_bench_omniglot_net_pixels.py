"""bench/omniglot_net_pixels.py end to end on a tiny fake Omniglot: the file's structure, the
pairing (the same image indices under both pixel readings), the job check."""
from __future__ import annotations

import json

import torch

from _fake_omniglot import bench_data
from bench.omniglot_net_pixels import main

COMBOS = {("torch", "area"), ("torch", "official"), ("official", "area"), ("official", "official")}


def test_writes_every_cell_and_pair(tmp_path):
    data = bench_data(tmp_path)
    result = tmp_path / "result.json"
    threads = torch.get_num_threads()
    try:  # main sets one thread for the process: the suite's setting is put back after
        main(["--data", str(data), "--out-dir", str(tmp_path / "runs"), "--iterations", "2", "--eval-tasks", "3",
              "--eval-steps", "2", "--job-eval-tasks", "2", "--threads", "1", "--result", str(result)])
    finally:
        torch.set_num_threads(threads)
    r = json.loads(result.read_text())
    for key in ("date", "command", "torch", "cpu", "torch_threads", "wall_seconds", "settings"):
        assert key in r, key
    assert r["command"].startswith("python -m bench.omniglot_net_pixels --data")
    assert {tuple(t["config"][k] for k in ("net", "pixels")) for t in r["training"].values()} == COMBOS
    for name, t in r["training"].items():
        net, pixels = name.split("-")
        assert f"--net {net} --pixels {pixels}" in t["command"] and t["train_seconds"] > 0
    cells = {(c["net"], c["pixels"], c["shots"]): c for c in r["cells"]}
    assert set(cells) == {(n, p, k) for n, p in COMBOS for k in (1, 5)}
    assert len(r["paired_differences"]) == 5 * 2
    for d in r["paired_differences"]:
        a, b = (cells[(d[s]["net"], d[s]["pixels"], d["shots"])] for s in ("a", "b"))
        assert abs(d["mean"] - (a["accuracy"] - b["accuracy"])) < 1e-12  # paired: the same tasks
        assert d["n_tasks"] == 3 and d["ci95"] >= 0.0
    # this script's evaluation reproduces each job's own test (same episodes, pixels, minibatches)
    assert len(r["job_check"]) == 8 and all(c["equal"] for c in r["job_check"]), r["job_check"]
