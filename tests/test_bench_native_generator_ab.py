"""bench/native_generator_ab.py: a revision's generator against this tree's — bitwise checked
before anything is timed, and a program that differs stops the timing."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from reptile_fast.native_build import find_compiler

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(find_compiler() is None, reason="no C compiler"),
              pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")]


def test_head_against_this_tree_is_bitwise_and_timed(tmp_path):
    from bench.native_generator_ab import CHECKS, main

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    out = tmp_path / "ab.json"
    assert main(["--rev", head, "--rounds", "2", "--sizes", "1,3", "--tasks-per-call", "6", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["bitwise"]) == 2 * len(CHECKS)
    assert all(row["bitwise"] and row["phi_moved"] for row in r["bitwise"]), r["bitwise"]
    assert r["timed"] and set(r["sizes"]) == {"1", "3"}
    for row in r["sizes"].values():
        assert row["speedup_old_over_new_median"] > 0 and all(v > 0 for v in row["us_per_task_median"].values())
    assert r["stamp"]["command"].startswith("python") or "native_generator_ab" in r["stamp"]["command"]


def test_a_program_that_differs_is_reported_and_not_timed(tmp_path, monkeypatch):
    import bench.native_generator_ab as ab
    from reptile_fast import native_step

    class OffByOneUlp:
        """The tree's program, its first weight moved one ulp after each call: "another generator"."""

        def __init__(self, *args, **kwargs):
            self.inner = native_step.NativeProgram(*args, **kwargs)

        def build(self):
            self.inner.build()
            return self

        def __call__(self, *args):
            phi, losses = self.inner(*args)
            phi[0] = torch.nextafter(phi[0], torch.full_like(phi[0], float("inf")))
            return phi, losses

    class Module:
        NativeProgram = OffByOneUlp

    monkeypatch.setattr(ab, "generator_at", lambda rev: Module)
    out = tmp_path / "ab.json"
    assert ab.main(["--rev", "whatever", "--rounds", "1", "--sizes", "1", "--out", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["timed"] is False and "sizes" not in r
    assert not any(row["bitwise"] for row in r["bitwise"])
