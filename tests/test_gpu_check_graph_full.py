"""QA40: the whole meta-step under one CUDA graph (the GPU check's "v2-meta-graph-full" row) was
timed on the H200 without any check of what its replays computed.  Now one replay after the
timing is checked against float64 on the tasks and plans it drew (``check_meta_step``), and a
wrong replay's time is kept apart ("wrong", ``ms_not_a_result``).  ``check_variant`` says "cannot
be verified" where the float64 update is zero or the bound is not finite (it let NaN decide)."""
import math
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before a kernel module is imported

pytest.importorskip("triton")

import torch  # noqa: E402

from bench import gpu_check as G  # noqa: E402
from tests.test_review_qa35 import _stage_timing, fake_cuda  # noqa: E402,F401

DIMS = (1, 8, 8, 1)


def _drawn(T=3, seed=5):
    model, params, phi, sets = G.problem_sets(T, torch.device("cpu"), 1, seed=seed, width=DIMS[1])
    tasks, plan = sets[0]
    return model, phi, tasks, plan


def _meta_step(phi, tasks, plan):
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    new = torch.full_like(phi, float("nan"))  # poisoned: an unwritten entry fails the check
    V.meta_step(tasks.x, tasks.y, plan, phi, DIMS, G.ACTS, lr=G.LR, eps=G.EPS, out=new)
    return new


def test_a_right_meta_step_passes():
    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    assert G.check_meta_step(phi, after, tasks.x, tasks.y, plan, DIMS) is None


@pytest.mark.parametrize("name, broken", [
    ("half the update", lambda phi, after: phi + 0.5 * (after - phi)),
    ("no update", lambda phi, after: phi.clone()),
    ("sign flipped", lambda phi, after: phi - (after - phi)),
    ("one parameter off", lambda phi, after: torch.cat([after[:1] + 1e-2, after[1:]])),
])
def test_a_wrong_meta_step_is_named(name, broken):
    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    wrong = G.check_meta_step(phi, broken(phi, after), tasks.x, tasks.y, plan, DIMS)
    assert wrong and "differs from float64" in wrong, (name, wrong)


def test_another_draw_is_not_this_meta_step():
    """The check uses the tasks the replay drew: a φ stepped on other tasks fails."""
    _, phi, tasks, plan = _drawn(seed=5)
    _, _, other, other_plan = _drawn(seed=6)
    after = _meta_step(phi, other, other_plan)
    assert G.check_meta_step(phi, after, tasks.x, tasks.y, plan, DIMS)


def test_non_finite_output_is_named():
    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    after[3] = float("nan")
    assert G.check_meta_step(phi, after, tasks.x, tasks.y, plan, DIMS) == "non-finite values in its output"


def test_zero_float64_update_cannot_be_verified(monkeypatch):
    """An oracle whose updates are all exactly zero (no relative error exists): the check says so
    instead of comparing NaNs (it divided by zero)."""
    from bench import providers as P

    model, phi, tasks, plan = _drawn()

    class Zero(dict):
        path = torch.zeros(tasks.n_tasks, dtype=torch.float64)

    def zero_updates(model, x, y, plan, lr, **kw):
        return Zero({n: torch.zeros(x.shape[0], *p.shape, dtype=torch.float64) for n, p in model.named_parameters()})

    monkeypatch.setattr(P, "float64_updates", zero_updates)
    wrong = G.check_meta_step(phi, phi.clone(), tasks.x, tasks.y, plan, DIMS)
    assert wrong and wrong.startswith("cannot be verified") and "zero float64 update" in wrong, wrong


def test_non_finite_bound_cannot_be_verified(monkeypatch):
    from bench import providers as P

    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    monkeypatch.setattr(P, "update_error_bound", lambda *a, **k: torch.full((tasks.n_tasks,), math.nan,
                                                                            dtype=torch.float64))
    wrong = G.check_meta_step(phi, after, tasks.x, tasks.y, plan, DIMS)
    assert wrong and wrong.startswith("cannot be verified") and "non-finite" in wrong, wrong


@pytest.mark.parametrize("wrong", [None, "its outer update differs from float64 (rel err 0.5 > allowed 1e-06)"])
def test_timing_stage_records_a_wrong_graph_apart(fake_cuda, tmp_path, monkeypatch, wrong):  # noqa: F811
    monkeypatch.setattr(G, "SMOKE_VARIANTS", [])
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(G, "cli_sine_row", lambda *a, **k: {"provider": "cli-sine-gpu", "T": 1, "status": "skipped"})
    monkeypatch.setattr(G, "_graphed_full_meta_step_ms", lambda T, device, dims: (0.7, wrong))
    rows = [r for r in _stage_timing(fake_cuda, tmp_path)["rows"] if r["provider"] == "v2-meta-graph-full"]
    assert rows
    for r in rows:
        if wrong:
            assert r["status"] == "wrong" and "ms" not in r and r["ms_not_a_result"] == 0.7, r
            assert wrong in r["reason"]
        else:
            assert r["ms"] == 0.7 and "status" not in r and "float64" in r["checked"], r
