"""QA40: the GPU check's timing stage timed one row unchecked, and its meta-level check could
divide by zero or pass on a bound that is not finite.

1. "v2-meta-graph-full" (``bench.gpu_check._graphed_full_meta_step``: device sampling, plans and
   kernel v2's meta-step under one CUDA graph) was timed without any check of the φ it computes
   (bench/results/gpu-h200-2026-12-04: four timed rows).  Now the replay before the timed ones
   and one after them are checked (``check_full_meta_step``: the tasks and plans that replay
   sampled, read back from the graph's memory, against their float64 oracle): a wrong one is
   "wrong", not timed (before) or its time kept apart as ``ms_not_a_result`` (after).
2. ``check_variant``: a mean float64 update of norm 0 divided by zero (ZeroDivisionError), and a
   bound that is not finite (a task's update of norm 0, a NaN or inf in the oracle) either passed
   (inf, through the inner-mean comparison) or was reported as a wrong result (NaN); now both are
   "cannot be verified: ...".

These run under test_review_qa35's fake CUDA (CUDA branches on the CPU, Triton's interpreter).
Its graphs' replays run nothing; ``replaying_graphs`` captures as that fake does (no host read
inside the capture) and makes each replay rerun the captured step, as a GPU replays the graph.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from bench import gpu_check as G  # noqa: E402
from bench.providers import Updates, float64_updates  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402
from reptile_fast.tasks.base import TaskBatch  # noqa: E402
from test_review_qa35 import _State, fake_cuda  # noqa: E402,F401  (the fixture)

DIMS = (1, 8, 8, 1)
META = ("v2-meta", "v2", "ieee", "meta")
INNER = ("v2", "v2", "ieee", "inner")
_META_STEP = V.meta_step  # the kernel's, whatever a test patches


class _ReplayingGraph:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        _State.replays += 1
        self.fn()


@pytest.fixture
def replaying_graphs(fake_cuda, monkeypatch):  # noqa: F811
    def capture(fn):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):  # the fake's capture: a host read in fn raises
            fn()
        return _ReplayingGraph(fn)

    monkeypatch.setattr(G, "_capture_graph", capture)
    return fake_cuda


def _halving(monkeypatch, from_call=0):
    """V.meta_step, from its ``from_call``-th call on, writing φ + (φ' − φ)/2: half the update."""
    real = _META_STEP
    calls = []

    def meta_step(x, y, plan, phi, *a, out=None, **k):
        res = real(x, y, plan, phi, *a, out=out, **k)
        calls.append(1)
        if len(calls) > from_call:
            res.params.copy_(phi + (res.params - phi) / 2)
        return res

    monkeypatch.setattr(V, "meta_step", meta_step)
    return calls


# ----------------------------------------------------------------------------- 1. v2-meta-graph-full
def test_graphed_whole_meta_step_is_checked_before_and_after_its_timing(replaying_graphs, monkeypatch):
    """Two checked replays (one before the 2 timed ones, one after), each on the tasks, plans and φ
    that replay used: φ after is kernel v2's meta-step of them, and passes the float64 check."""
    seen = []

    def check(dims, x, y, plan, before, after):
        seen.append((x.clone(), y.clone(), plan.clone(), before.clone(), after.clone()))
        return G.check_full_meta_step(dims, x, y, plan, before, after)

    full = G._graphed_full_meta_step(1, replaying_graphs, DIMS, replays=2, check=check)
    assert full["wrong"] is None and full["ms"] > 0, full
    assert _State.captures == 1 and _State.replays == 4 and len(seen) == 2
    acts = G.ACTS[:len(DIMS) - 2] + ("identity",)
    for x, y, plan, before, after in seen:
        again = V.meta_step(x, y, plan, before, DIMS, acts, lr=G.LR, eps=G.EPS).params
        assert torch.allclose(again, after, rtol=0, atol=1e-6) and not torch.equal(before, after)
    assert not torch.equal(seen[0][1], seen[1][1])  # fresh tasks each replay: each check reads its own


def test_a_wrong_graphed_meta_step_is_not_timed(replaying_graphs, monkeypatch):
    """Negative control: the meta-step halving its update is wrong on the replay before the timed
    ones (nothing timed); halving only from the timed replays on, the replay after them is wrong
    and its time is no result."""
    calls = _halving(monkeypatch)
    full = G._graphed_full_meta_step(1, replaying_graphs, DIMS, replays=2)
    assert full["ms"] is None and _State.replays == 1, full
    assert full["wrong"].startswith("the replay before the timed ones: its outer update differs from float64")
    # 2 warm-up steps, the capture, the checked replay: right; the timed replays and the last: halved
    calls = _halving(monkeypatch, from_call=4)
    full = G._graphed_full_meta_step(1, replaying_graphs, DIMS, replays=2)
    assert len(calls) == 7 and full["ms"] > 0, full
    assert full["wrong"].startswith("the replay after the timed ones: its outer update differs from float64")


def test_check_full_meta_step_falls_back_on_the_inner_loop_of_the_same_tasks(fake_cuda, monkeypatch):  # noqa: F811
    """Where float64 alone cannot verify (allowed > GATE_CAP: large T; said here by a stand-in for
    the first check), kernel v2's inner loop on the same tasks, checked per task, is run and its
    mean passed to the check; a halved update is still caught."""
    real = G.check_variant
    asked = []

    def check_variant(variant, result, *a, inner_mean=None):
        asked.append((variant[3], inner_mean is not None))
        if variant[3] == "meta" and inner_mean is None:  # what a large T's bound says
            return "cannot be verified: allowed rel err 0.06 > 0.05 (fp32; no checked inner variant ...)"
        return real(variant, result, *a, inner_mean=inner_mean)

    monkeypatch.setattr(G, "check_variant", check_variant)
    model, tasks, plan, params, phi = G.problem(2, fake_cuda, seed=4, width=8)
    acts = G.ACTS[:len(DIMS) - 2] + ("identity",)
    new = V.meta_step(tasks.x, tasks.y, plan, phi, DIMS, acts, lr=G.LR, eps=G.EPS).params
    assert G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, new) is None
    assert asked == [("meta", False), ("inner", False), ("meta", True)]
    asked.clear()
    why = G.check_full_meta_step(DIMS, tasks.x, tasks.y, plan, phi, phi + (new - phi) / 2)
    assert why.startswith("its outer update differs") and asked[-1] == ("meta", True), why


def _timing_rows(device, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "SMOKE_VARIANTS", [])
    monkeypatch.setattr(G, "fit_rows", lambda *a, **k: [])
    monkeypatch.setattr(G, "cli_sine_row", lambda *a, **k: {"provider": "cli-sine-gpu", "T": 1, "status": "skipped"})
    results = {"stages": {"env": {"fp32_matmul_flops_per_s": 1e12}}}
    rows = G.stage_timing(lambda *a: None, device, True, G.Budget(600), results, tmp_path)["rows"]
    return [r for r in rows if r["provider"] == "v2-meta-graph-full"]


def test_timing_stage_records_the_graphed_meta_step_checked_or_wrong(replaying_graphs, tmp_path, monkeypatch):
    """In the timing stage (smoke sizes T = 1, 2 on the fake GPU): timed with "checked" when right;
    "wrong", not timed, when the meta-step halves its update; "wrong" with the time kept apart when
    only the timed replays are; "cannot be verified" is no time either."""
    rows = _timing_rows(replaying_graphs, tmp_path, monkeypatch)
    assert [r["T"] for r in rows] == [1, 2] and all(r["ms"] > 0 and "status" not in r and "float64" in r["checked"]
                                                     for r in rows), rows
    with monkeypatch.context() as m:
        _halving(m)
        rows = _timing_rows(replaying_graphs, tmp_path, m)
    assert [r["T"] for r in rows] == [1, 2], rows
    for r in rows:
        assert r["status"] == "wrong" and "ms" not in r and "ms_not_a_result" not in r, r
        assert r["reason"].startswith("not timed: the replay before the timed ones: its outer update differs"), r
    with monkeypatch.context() as m:
        m.setattr(G, "_graphed_full_meta_step",
                            lambda T, device, dims: {"ms": 2.0, "wrong": "the replay after the timed ones: x"})
        rows = _timing_rows(replaying_graphs, tmp_path, m)
    assert all(r["status"] == "wrong" and r["ms_not_a_result"] == 2.0 and "ms" not in r for r in rows), rows
    with monkeypatch.context() as m:
        m.setattr(G, "check_full_meta_step", lambda *a: "cannot be verified: no bound")
        rows = _timing_rows(replaying_graphs, tmp_path, m)
    assert all(r["status"] == "wrong" and "ms" not in r and "cannot be verified: no bound" in r["reason"]
               for r in rows), rows
    lines = [line for line in G.summary_lines({"stages": {"timing": {"rows": rows}}, "seconds": {}})
             if line.strip().startswith("v2-meta-graph-full")]
    assert len(lines) == 1 and lines[0].split()[1:] == ["wrong", "wrong"], lines  # no rate in the table


# ----------------------------------------------------------------------------- 2. check_variant's bounds
def _problem(T=2, seed=6):
    G._ORACLE_FLAT.clear()
    model, tasks, plan, params, phi = G.problem(T, torch.device("cpu"), seed=seed, width=8)
    return model, tasks, plan, phi


def _cancelling_oracle(model, tasks, plan):
    """Two tasks whose float64 updates are d and −d: the mean update is exactly zero, each task's is not."""
    one = float64_updates(model, tasks.x[:1], tasks.y[:1], plan[:1], G.LR)
    return Updates({n: torch.cat([v, -v]) for n, v in one.items()}, path=one.path.repeat(2))


def test_meta_check_with_a_zero_mean_update_does_not_divide_by_zero():
    """The tasks' mean float64 update of norm 0: "cannot be verified" for an answer within the
    absolute allowance (no relative bound exists; the old code raised ZeroDivisionError), "differs"
    for one beyond it."""
    model, tasks, plan, phi = _problem()
    oracle = _cancelling_oracle(model, tasks, plan)
    names = [n for n, _ in model.named_parameters()]
    assert float(G._oracle_flat(oracle, names, 2, phi.device)[2].norm()) == 0.0
    why = G.check_variant(META, phi.clone(), model, tasks, plan, phi, oracle)
    assert why.startswith("cannot be verified: the tasks' mean float64 update is zero"), why
    step = torch.cat([oracle[n][0].reshape(-1) for n in names]).float()
    why = G.check_variant(META, phi + G.EPS * step, model, tasks, plan, phi, oracle)
    assert why.startswith("its outer update differs from float64 (abs err"), why
    for inner_mean in (None, torch.zeros(phi.numel(), dtype=torch.float64)):  # no division there either
        why = G.check_variant(META, phi.clone(), model, tasks, plan, phi, oracle, inner_mean=inner_mean)
        assert why.startswith("cannot be verified"), why


def test_tasks_with_zero_updates_cannot_be_verified():
    """Targets the model already fits exactly (last layer 0, y = 0): every float64 update is 0, the
    bound is inf or NaN; the right answer (φ unchanged) is "cannot be verified", inner and meta."""
    model, tasks, plan, phi = _problem()
    with torch.no_grad():
        model.network[-1].weight.zero_()
        model.network[-1].bias.zero_()
    phi = V.flat_params([p.detach() for p in model.parameters()])
    tasks = TaskBatch(tasks.x, torch.zeros_like(tasks.y))
    oracle = float64_updates(model, tasks.x, tasks.y, plan, G.LR)
    assert all(float(v.abs().max()) == 0 for v in oracle.values())
    why = G.check_variant(INNER, phi.expand(2, -1).clone(), model, tasks, plan, phi, oracle)
    assert why.startswith("cannot be verified: the fp32 bound is not finite on 2 of 2 tasks"), why
    why = G.check_variant(META, phi.clone(), model, tasks, plan, phi, oracle)
    assert why.startswith("cannot be verified: the allowed error of its outer update is not finite"), why


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_bound_cannot_be_verified_not_pass_nor_wrong(bad):
    """Negative controls: an oracle whose path (the bound's A_i) is NaN or inf on one task, with the
    right answers (and a meta-step at half the update).  Before: a NaN bound's answers were reported
    wrong, and with an inf bound the meta check passed, through the inner-mean comparison (allowed
    inf), the right answer and the halved one alike.  Now: "cannot be verified"."""
    model, tasks, plan, phi = _problem()
    good = float64_updates(model, tasks.x, tasks.y, plan, G.LR)
    path = good.path.clone()
    path[1] = bad
    oracle = Updates(dict(good), path=path)
    names = [n for n, _ in model.named_parameters()]
    want = torch.cat([good[n].reshape(2, -1) for n in names], 1)
    adapted = (phi.double() + want).float()
    assert G.check_variant(INNER, adapted, model, tasks, plan, phi, good) is None  # the finite oracle passes it
    why = G.check_variant(INNER, adapted, model, tasks, plan, phi, oracle)
    assert why.startswith("cannot be verified: the fp32 bound is not finite on 1 of 2 tasks (task 1"), why
    mean = want.mean(0)
    new = (phi.double() + G.EPS * mean).float()
    assert G.check_variant(META, new, model, tasks, plan, phi, good) is None
    half = (phi.double() + G.EPS * mean / 2).float()  # half the update: the old check passed it (inf)
    for result, inner_mean in ((new, None), (new, mean), (half, mean)):
        why = G.check_variant(META, result, model, tasks, plan, phi, oracle, inner_mean=inner_mean)
        assert why.startswith("cannot be verified: the allowed error of its outer update is not finite"), why
