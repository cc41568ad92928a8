"""bench/omniglot_minibatches.py end to end on a tiny fake Omniglot: the file's structure."""
from __future__ import annotations

import json

import torch

from _fake_omniglot import bench_data
from bench.omniglot_minibatches import main

MINIBATCHES = ("fresh", "epochs")


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
    assert r["torch_threads"] == 1 and r["settings"]["test_alphabets"] == ["Delta", "Gamma"]

    assert set(r["training"]) == set(MINIBATCHES)
    for mb, t in r["training"].items():
        assert t["config"]["minibatches"] == mb and t["config"]["ways"] == 5
        assert t["config"]["validate_every"] == 0 and t["config"]["checkpoint_every"] == 0
        assert t["train_seconds"] > 0 and f"--minibatches {mb}" in t["command"]

    cells = {(c["train_minibatches"], c["eval_minibatches"], c["shots"]): c for c in r["cells"]}
    assert set(cells) == {(t, e, k) for t in MINIBATCHES for e in MINIBATCHES for k in (1, 5)}
    for c in cells.values():
        assert 0.0 <= c["accuracy"] <= 1.0 and c["ci95"] >= 0.0 and c["n_tasks"] == 3
    for name, values in r["per_task_accuracy"].items():
        assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values), name

    assert len(r["paired_differences"]) == 5 * 2
    for d in r["paired_differences"]:
        a, b = (cells[(d[s]["train_minibatches"], d[s]["eval_minibatches"], d["shots"])] for s in ("a", "b"))
        assert abs(d["mean"] - (a["accuracy"] - b["accuracy"])) < 1e-12  # paired: the same tasks
        assert -1.0 <= d["mean"] <= 1.0 and d["ci95"] >= 0.0 and d["n_tasks"] == 3

    # this script's evaluation reproduces the job's own test (same episodes, same minibatches)
    assert len(r["job_check"]) == 4 and all(c["equal"] for c in r["job_check"])
