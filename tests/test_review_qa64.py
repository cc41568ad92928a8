"""QA64 (session 25): a review of the benchmark suite and the GPU check.

* The GPU check's gate for a fused meta-step (``check_variant``, "meta" rows) passed a meta-step
  that skipped tasks: its fp32 summation allowance was the worst case γ_{T−1}, which grows as T
  while one task's share of the mean shrinks as 1/T (at T = 4096 a skip of 8 tasks passed, at
  65536 one of 2048).  Now the probabilistic bound of Higham & Mary (``_sum_bound``) and the
  single rounding of φ' bound it, and each checked meta row records how many tasks a skip must
  involve to be caught (``check_resolution_tasks``).
* ``bench.report`` dropped the whole-T rows (provider "*": a problem that could not be built, a
  spent budget) instead of listing them as not timed.
* ``--stages`` took unknown entries silently, and a run whose stage raised exited 0.
"""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def case():
    pytest.importorskip("triton")
    from bench import gpu_check as G
    from bench.providers import float64_updates
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.torch_func import TorchBackend

    T = 4096  # the GPU check's timed size
    model, tasks, plan, _, phi = G.problem(T, torch.device("cpu"), seed=11, width=64)
    oracle = float64_updates(model, tasks.x, tasks.y, plan, G.LR)
    res = TorchBackend().inner_loop(model, tasks, plan, InnerConfig(lr=G.LR)).params
    upd = torch.cat([res[n].reshape(T, -1) for n, _ in model.named_parameters()], 1) - phi
    return G, T, upd, phi, (model, tasks, plan, phi, oracle)


META = ("v2-meta", "v2", "ieee", "meta")


def test_correct_meta_steps_pass_in_any_summation_order(case):
    G, T, upd, phi, args = case
    running = torch.zeros_like(phi)
    for d in upd:  # task by task in fp32: the longest chain of roundings an order can have
        running += d
    for name, mean in (("torch's sum", upd.mean(0)), ("a running fp32 sum", running / T)):
        info = {}
        assert G.check_variant(META, phi + G.EPS * mean, *args, info=info) is None, name
        assert info["check_resolution_tasks"] == 1, info  # one skipped task of median size is caught


@pytest.mark.parametrize("skipped", [1, 4, 8, 64])
def test_a_meta_step_that_skips_tasks_is_refused(case, skipped):
    G, T, upd, phi, args = case
    m = upd.clone()
    m[T - skipped:] = 0  # the last `skipped` tasks' inner loops never ran (a tail program, say)
    why = G.check_variant(META, phi + G.EPS * m.mean(0), *args)
    assert why is not None and why.startswith("its outer update differs from float64"), why


def test_the_summation_bound_is_higham_and_marys():
    from bench import gpu_check as G

    u = 2.0 ** -24
    assert G._sum_bound(4095, u) == pytest.approx(G.SUM_LAMBDA * 4095 ** 0.5 * u, rel=1e-3)
    assert G._sum_bound(4095, u) < 4095 * u / 6  # √n/λ = 6.4 times below the worst case at this size


def test_report_lists_whole_meta_batch_skips_and_errors(tmp_path):
    from bench import report as R

    size = {"width": 64, "depth": 2, "steps": 5, "inner_batch": 10}
    rows = [{"T": 4096, "provider": "torch", "ms": 2.0, "flops": 1, **size},
            {"T": 65536, "provider": "*", "status": "error", "reason": "problem: CUDA out of memory", **size},
            {"T": 256, "provider": "*", "status": "skipped", "reason": "time budget spent", **size}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"stages": {"env": {"gpu": "NVIDIA H200", "fp32_matmul_flops_per_s": 5e13},
                                           "timing": {"rows": rows}}}))
    assert R.main([str(path), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "problem: CUDA out of memory" in md and "time budget spent" in md, md


@pytest.mark.parametrize("stages", ["timing", "7", "1,7", "1;3"])
def test_unknown_stages_are_refused(tmp_path, stages, capsys):
    from bench import gpu_check as G

    with pytest.raises(SystemExit) as exc:
        G.parse_args(["--cpu-smoke", "--stages", stages, str(tmp_path)])
    assert exc.value.code == 2 and "--stages takes stage numbers among 1,2,3,4,5,6" in capsys.readouterr().err
    assert G.parse_args(["--stages", "1, 3,4", str(tmp_path)]).stages == "1, 3,4"


def test_a_stage_that_raised_makes_the_run_exit_1_after_every_stage(tmp_path, monkeypatch):
    from bench import gpu_check as G

    def broken(*a, **k):
        raise RuntimeError("stage env broke")

    monkeypatch.setattr(G, "stage_env", broken)
    rc = G.main(["--cpu-smoke", "--stages", "1", "--budget", "30", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stages"]["env"]["status"] == "error"
    assert rc == G.EXIT_STAGE_ERROR == 1
    assert (tmp_path / "summary.txt").exists()
