"""bench/omniglot_net_parts.py end to end on a tiny fake Omniglot: its training is the job's
(bitwise the job's models for the two ends), every variant is tested on the same episodes."""
from __future__ import annotations

import json

import torch

from _fake_omniglot import bench_data
from bench.omniglot_net_parts import VARIANTS, main
from reptile_fast.fewshot_job import OmniglotConfig, omniglot_preset, run_omniglot


def test_variants_train_as_the_job_and_pair_per_task(tmp_path):
    data = bench_data(tmp_path)
    threads = torch.get_num_threads()
    try:  # main sets one thread for the process: the suite's setting is put back after
        for net in ("torch", "official"):  # the job's own models, as bench.omniglot_net_pixels makes them
            cfg = OmniglotConfig(**{**omniglot_preset(5), "train": [str(data / "images_background_small1.zip")],
                                    "test": str(data / "images_background_small2.zip"), "shots": [1],
                                    "iterations": 2, "eval_tasks": 1, "eval_steps": 1, "validate_every": 0,
                                    "checkpoint_every": 0, "threads": 1, "net": net})
            run_omniglot(cfg, tmp_path / "runs" / f"{net}-area", progress=False, log=lambda m: None)
        result = tmp_path / "result.json"
        main(["--data", str(data), "--iterations", "2", "--eval-tasks", "3", "--threads", "1",
              "--check-runs", str(tmp_path / "runs"), "--result", str(result)])
    finally:
        torch.set_num_threads(threads)
    r = json.loads(result.read_text())
    assert r["job_check"] == {"default": {"job_model": str(tmp_path / "runs" / "torch-area" / "model.pt"),
                                          "bitwise_equal": True},
                              "official": {"job_model": str(tmp_path / "runs" / "official-area" / "model.pt"),
                                           "bitwise_equal": True}}
    assert set(r["training"]) == set(VARIANTS) and r["command"].startswith("python -m bench.omniglot_net_parts")
    cells = {(c["variant"], c["shots"]): c for c in r["cells"]}
    assert set(cells) == {(v, k) for v in VARIANTS for k in (1, 5)}
    assert len(r["paired_differences"]) == (len(VARIANTS) - 1) * 2
    for d in r["paired_differences"]:
        a = cells[(d["what"].removesuffix(" - default"), d["shots"])]
        assert abs(d["mean"] - (a["accuracy"] - cells[("default", d["shots"])]["accuracy"])) < 1e-12
