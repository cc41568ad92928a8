"""QA40, with the real kernel under the interpreter: ``check_full_meta_step`` (what checks the
GPU check's whole-meta-step graph, "v2-meta-graph-full", before and after its timing) passes
kernel v2's own meta-step and names broken ones (tests/test_review_qa40.py covers the stage)."""
import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it on machines without CUDA
    # setting it here would switch every later-imported kernel to the interpreter on a GPU run
    pytest.skip("runs the kernels under the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

pytest.importorskip("triton")

import torch  # noqa: E402

from bench import gpu_check as G  # noqa: E402

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
    assert G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, after) is None


@pytest.mark.parametrize("name, broken", [
    ("half the update", lambda phi, after: phi + 0.5 * (after - phi)),
    ("no update", lambda phi, after: phi.clone()),
    ("sign flipped", lambda phi, after: phi - (after - phi)),
    ("one parameter off", lambda phi, after: torch.cat([after[:1] + 1e-2, after[1:]])),
])
def test_a_wrong_meta_step_is_named(name, broken):
    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    wrong = G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, broken(phi, after))
    assert wrong and "differs from float64" in wrong, (name, wrong)


def test_another_draw_is_not_this_meta_step():
    """The check uses the tasks the replay drew: a φ stepped on other tasks fails."""
    _, phi, tasks, plan = _drawn(seed=5)
    _, _, other, other_plan = _drawn(seed=6)
    after = _meta_step(phi, other, other_plan)
    assert G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, after)


def test_non_finite_output_is_named():
    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    after[3] = float("nan")
    assert G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, after) == "non-finite values in its output"


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
    wrong = G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, phi.clone())
    assert wrong and wrong.startswith("cannot be verified"), wrong


def test_non_finite_bound_cannot_be_verified(monkeypatch):
    from bench import providers as P

    _, phi, tasks, plan = _drawn()
    after = _meta_step(phi, tasks, plan)
    monkeypatch.setattr(P, "update_error_bound", lambda *a, **k: torch.full((tasks.n_tasks,), math.nan,
                                                                            dtype=torch.float64))
    wrong = G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, after)
    assert wrong and wrong.startswith("cannot be verified") and "not finite" in wrong, wrong
