"""The benchmark suite's own machinery: FLOP counts, the check that guards every timing, and the
report.  (Each provider's correctness at tiny sizes is bench/bench_inner_loop.py's smoke run.)"""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import inner_loop_flops, inner_step_flops, time_calls
from bench.providers import (Point, Prepared, Provider, check_prepared, check_subset, get_provider,
                             make_problem)
from bench.report import derive, load_results, write_report
from reptile_fast import MLP


@pytest.mark.parametrize("dims, batch", [((1, 64, 64, 1), 10), ((3, 40, 100, 40, 5), 7), ((2, 1), 1)])
def test_matmul_flops_match_torch_flop_counter(dims, batch):
    model = MLP(dims[0], output_dim=dims[-1], hidden_dims=list(dims[1:-1]))
    x, y = torch.randn(batch, dims[0]), torch.randn(batch, dims[-1])
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(model(x), y).backward()
    assert inner_step_flops(dims, batch)["matmul"] == counter.get_total_flops()


def test_sine_mlp_step_flops_by_hand():
    f = inner_step_flops((1, 64, 64, 1), 10)
    # forward: 2·10·(64 + 4096 + 64) matmul + 10·(64 + 64 + 1) bias + 10·128 tanh
    assert f["forward"] == 84480 + 1290 + 1280
    assert f["update"] == 2 * 4353
    assert f["total"] == f["forward"] + f["loss"] + f["backward"] + f["update"]
    assert inner_loop_flops((1, 64, 64, 1), 10, 5, 3) == 15 * f["total"]
    with pytest.raises(ValueError):
        inner_step_flops((1,), 10)


def test_time_calls_rotates_inputs_and_reports_positive_times():
    seen = []
    t = time_calls(lambda i: seen.append(i), "cpu", min_time=0.005, repeats=2)
    assert t["median"] > 0 and t["min"] <= t["median"] <= t["max"]
    assert seen == list(range(len(seen))) and len(seen) >= 4


def test_check_subset_includes_both_ends():
    s = check_subset(16384)
    assert s[0] == 0 and s[-1] == 16383 and len(s) == 16
    assert check_subset(5).tolist() == [0, 1, 2, 3, 4]


class _Perturbed(Provider):
    """The reference's answer, with one element of one task changed."""

    name = "perturbed"

    def __init__(self, task, delta):
        self.task, self.delta = task, delta

    def prepare(self, problem):
        ref = get_provider("reference").prepare(problem)

        def run(i):
            params = {k: v.clone() for k, v in ref.run(i).params.items()}
            params["network.2.weight"][self.task, 3, 5] += self.delta
            return params

        return Prepared(run, lambda out: out)


def test_check_rejects_a_wrong_fast_answer():
    problem = make_problem(Point(meta_batch=40, width=8, steps=2), "cpu")
    good, params = check_prepared(get_provider("seed"), get_provider("seed").prepare(problem), problem)
    assert good.ok and good.max_abs_err == 0 and good.rel_err_f64 < 1e-6
    last = _Perturbed(39, 1e-3)
    res, _ = check_prepared(last, last.prepare(problem), problem)
    assert not res.ok and "network.2.weight" in res.message
    # a task outside the subset compared with the fp32 reference is caught by the float64 gate,
    # which sees every task
    hidden = _Perturbed(1, 1e-3)
    assert 1 not in check_subset(40).tolist()
    res, _ = check_prepared(hidden, hidden.prepare(problem), problem)
    assert not res.ok and "1 of 40 tasks" in res.message and "network.2.weight" in res.message
    # compare_to: every task against another provider's output (here one that differs on task 1)
    other = {k: v.clone() for k, v in params.items()}
    other["network.2.weight"][1, 3, 5] += 1e-4
    res, _ = check_prepared(get_provider("seed"), get_provider("seed").prepare(problem), problem, compare_to=other)
    assert not res.ok and "all 40 tasks" in res.message
    nan = _Perturbed(0, float("nan"))
    res, _ = check_prepared(nan, nan.prepare(problem), problem)
    assert not res.ok


def _fake_benchmark_json(path):
    benches = []
    for prov, per_task in (("seed", 1e-3), ("torch", 2e-5), ("jax", 1e-5)):
        for T in (1, 32, 256, 4096):
            if prov == "seed" and T > 256:
                continue
            benches.append({"name": f"x[{prov}-{T}]", "stats": {"median": per_task * T, "min": per_task * T,
                                                                "iqr": 0.0, "rounds": 3, "iterations": 1},
                            "extra_info": {"provider": prov, "meta_batch": T, "width": 64, "depth": 2, "steps": 5,
                                           "inner_batch": 10, "flops": 1e6 * T,
                                           "check": {"max_abs_err": 0.0, "rel_err_f64": 5e-8},
                                           "peak": {"matmul_flops_per_s": 1e11, "bmm_flops_per_s": 5e10}}})
    data = {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
            "machine_info": {"reptile_fast": {"cpu": "test cpu", "torch": "x", "command": "pytest"}},
            "reptile_fast_not_timed": [{"provider": "triton", "point": "T1-H64-S5", "status": "skipped",
                                        "reason": "no GPU"}]}
    path.write_text(json.dumps(data))


def test_report_derives_ratios_and_writes_table_and_plots(tmp_path):
    src = tmp_path / "cpu.json"
    _fake_benchmark_json(src)
    records, stamp, _ = load_results(src)
    d = {(r["provider"], r["meta_batch"]): r for r in derive(records) if "tasks_per_s" in r}
    assert d[("torch", 256)]["tasks_per_s"] == pytest.approx(5e4)
    assert d[("torch", 256)]["x_seed"] == pytest.approx(50)
    assert d[("jax", 256)]["x_torch"] == pytest.approx(2)
    assert d[("torch", 4096)]["x_seed_from"] == 256  # seed not timed there: its rate at 256
    assert d[("torch", 4096)]["pct_peak"] == pytest.approx(100 * 1e6 / 2e-5 / 1e11)
    written = write_report(records, stamp, tmp_path / "cpu", title="t")
    assert [p.name for p in written] == ["cpu.md", "cpu_tasks_per_s.png", "cpu_speedup.png"]
    md = written[0].read_text()
    assert "| torch | 256 | 5.12 | 50k | 50k |" in md and "no GPU" in md
    assert all(p.stat().st_size > 1000 for p in written[1:])
