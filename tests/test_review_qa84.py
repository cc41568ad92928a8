"""QA84 (session 26): what the ranks of ``distributed_fit`` compare and share at the start.

* A rank whose outer optimizer held other state than rank 0's (Adam's moments and step count:
  a state loaded, or a step taken, on one rank alone) trained on: rank 0's φ was broadcast but
  not its optimizer's state, so the ranks applied other updates to the same mean and φ differed
  across ranks from the first meta-step.  Rank 0's optimizer state is now broadcast with φ.
* A rank whose task distribution was set up otherwise (``Sine(amplitude=(0.1, 1.0))`` or
  ``Sine(n_points=30)`` on one rank) trained without a word on other tasks than one process
  draws; so did a rank with other ``backend_options`` (its per-task bits differ).  The ranks now
  compare one probe task drawn from a fixed seed, and their backend options, and all refuse.
"""
import pytest
import torch

import _dist_worker as W
from reptile_fast import Sine

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

RTOL, ATOL = 1e-5, 1e-6


def _results(out, name, n):
    return [torch.load(out / f"{name}.{r}.pt") for r in range(n)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("qa84")
    scenarios = [
        dict(name="adam-stepped", outer_optimizer=True, adam_stepped_last_rank=True),
        dict(name="amplitude", tasks_last_rank={"amplitude": (0.1, 1.0)}),
        dict(name="n_points", tasks_last_rank={"n_points": 30}),
        dict(name="options", backend_options_last_rank={"fast_tanh": False}),
        dict(name="next", iterations=2),  # the refusals left the group usable
    ]
    codes = W.run_job(2, out, scenarios, wait=120, grace=10)
    assert codes == [0, 0], codes
    return out


@needs_gloo
def test_rank_0s_outer_optimizer_state_reaches_every_rank(job, tmp_path):
    ranks = _results(job, "adam-stepped", 2)
    for res in ranks:
        assert res["error"] is None, res["error"]
    for k, v in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][k], v), k  # φ bitwise identical on every rank
    # ... and what one process trains with rank 0's (fresh) Adam state
    one = W.single_process(dict(name="adam-one", outer_optimizer=True), tmp_path)
    for k, v in one["params"].items():
        torch.testing.assert_close(ranks[0]["params"][k], v, rtol=RTOL, atol=ATOL)


@needs_gloo
@pytest.mark.parametrize("name, shown", [("amplitude", "Sine(amplitude=(0.1, 1.0)"), ("n_points", "n_points=30")])
def test_ranks_with_other_task_distributions_are_refused_naming_them(job, name, shown):
    for res in _results(job, name, 2):
        assert res["error"] is not None and res["error"][0] == "ValueError", res["error"]
        assert "different settings (listed by rank): tasks: [Sine(amplitude=(0.1, 5.0)" in res["error"][1], res["error"]
        assert shown in res["error"][1], res["error"]


@needs_gloo
def test_ranks_with_other_backend_options_are_refused(job):
    for res in _results(job, "options", 2):
        assert res["error"] is not None and res["error"][0] == "ValueError", res["error"]
        assert "backend_options: [{}, {'fast_tanh': False}]" in res["error"][1], res["error"]


@needs_gloo
def test_the_group_stays_usable_after_the_refusals(job):
    for res in _results(job, "next", 2):
        assert res["error"] is None, res["error"]


class _Plain:
    """A task family without a repr of its own (its default repr holds an address)."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def sample(self, n, *, generator=None, device=None):
        return Sine(amplitude=(self.scale, 2 * self.scale)).sample(n, generator=generator, device=device)


def test_the_task_probe_compares_what_is_drawn_not_how_it_is_shown():
    from reptile_fast.distributed.training import _tasks_probe

    assert _tasks_probe(_Plain(), "cpu") == _tasks_probe(_Plain(), "cpu")  # no address compared
    assert _tasks_probe(_Plain(), "cpu") != _tasks_probe(_Plain(2.0), "cpu")
    assert _tasks_probe(Sine(), "cpu") == _tasks_probe(Sine(), "cpu")
    assert _tasks_probe(Sine(), "cpu") != _tasks_probe(Sine(phase=(0.0, 1.0)), "cpu")
    assert "_Plain" in repr(_tasks_probe(_Plain(), "cpu")) and " at 0x" not in repr(_tasks_probe(_Plain(), "cpu"))
