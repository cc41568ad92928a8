"""QA26's review of the benchmark suite's report and FLOP counts and of the CLI's error messages.
Each test failed before its fix (NOTES-qa26.md (folded into the README since; ``git show 56b4dbf:NOTES-qa26.md``))."""
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import inner_loop_flops, inner_step_flops
from bench.report import derive, load_results, main as report_main, render_markdown, write_report
from reptile_fast import MLP
from reptile_fast.cli import main


def _bench(provider, T, median, width=64, steps=5):
    return {"stats": {"median": median, "min": median, "iqr": 0.0, "rounds": 3, "iterations": 1},
            "extra_info": {"provider": provider, "meta_batch": T, "width": width, "depth": 2, "steps": steps,
                           "inner_batch": 10, "flops": 1e6 * T, "check": {"max_abs_err": 0.0},
                           "peak": {"matmul_flops_per_s": 1e11}}}


def _write(path, benches, machine_info=None):
    data = {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
            "machine_info": {"reptile_fast": {"cpu": "test cpu", "torch": "x", "command": "pytest"}}
            if machine_info is None else machine_info}
    path.write_text(json.dumps(data))  # NaN is written as JSON's NaN literal, as json.dump does
    return path


def test_report_puts_nan_and_zero_times_under_not_timed(tmp_path):
    """A NaN median became a "nan tasks/s" row (and NaN speed-ups beside it); a 0 median a
    blank "| seed | ok |  |  |" row.  Both are no measurement: "Not timed", status invalid."""
    src = _write(tmp_path / "r.json", [_bench("seed", 32, float("nan")), _bench("reference", 32, 0.0),
                                       _bench("torch", 32, 1e-3), _bench("torch", 256, 4e-3)])
    records, stamp, _ = load_results(src)
    derived = derive(records)
    timed = [r for r in derived if "tasks_per_s" in r]
    assert sorted((r["provider"], r["meta_batch"]) for r in timed) == [("torch", 32), ("torch", 256)]
    assert all(math.isfinite(r["tasks_per_s"]) and r["x_seed"] is None for r in timed)
    invalid = {r["provider"]: r for r in derived if r.get("status") == "invalid"}
    assert set(invalid) == {"seed", "reference"} and invalid["seed"]["point"] == "T32-H64-S5"
    md = render_markdown(derived, stamp, title="t")
    assert "nan" not in md.lower().replace("nan s is not", "")
    assert "| seed | invalid | median time nan s is not a finite positive number | T32-H64-S5 |" in md
    assert "| reference | invalid | median time 0.0 s is not a finite positive number | T32-H64-S5 |" in md


def test_report_describes_the_gate_its_records_went_through(tmp_path):
    """The report said every provider was compared with the fp32 reference "on up to 16 tasks"
    also for runs checked by the per-task float64 update gate (issue 16); records that carry the
    gate's update_margin are now described as such, older ones as before."""
    new = _bench("torch", 32, 1e-3)
    new["extra_info"]["check"] = {"max_abs_err": 0.0, "update_margin": 0.01}
    records, stamp, _ = load_results(_write(tmp_path / "n.json", [new]))
    assert "every task's update" in render_markdown(derive(records), stamp, title="t")
    records, stamp, _ = load_results(_write(tmp_path / "o.json", [_bench("torch", 32, 1e-3)]))
    md = render_markdown(derive(records), stamp, title="t")
    assert "every task's update" not in md and "on up to 16 tasks" in md


def test_report_refuses_a_json_without_any_valid_time(tmp_path):
    src = _write(tmp_path / "r.json", [_bench("torch", 32, float("nan"))])
    with pytest.raises(SystemExit, match="no timed results"):
        report_main([str(src), "--out", str(tmp_path / "o")])


def test_report_command_names_a_bad_file_with_exit_code_2(tmp_path, capsys):
    """A missing file, a file that is not JSON, or JSON of another shape were tracebacks
    (FileNotFoundError, JSONDecodeError, ValueError; exit 1); a benchmark without stats a KeyError."""
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1]")
    for name, words in (("missing.json", "No such file"), ("bad.json", "not JSON"),
                        ("list.json", "neither pytest-benchmark JSON")):
        with pytest.raises(SystemExit) as stop:
            report_main([str(tmp_path / name)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and name in err and words in err
    src = _write(tmp_path / "ok.json", [_bench("torch", 32, 1e-3)])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:  # --out inside a file: was a FileExistsError traceback
        report_main([str(src), "--out", str(tmp_path / "file" / "r")])
    assert stop.value.code == 2 and "--out" in capsys.readouterr().err
    no_stats = _bench("seed", 32, 1.0)
    del no_stats["stats"]
    records, _, _ = load_results(_write(tmp_path / "s.json", [no_stats, _bench("torch", 32, 1e-3)]))
    assert [r["reason"] for r in derive(records) if r.get("status") == "invalid"] == ["no median time"]


def test_report_with_one_meta_batch_still_plots_tasks_per_s(tmp_path):
    """One size only: the tasks/s plot was silently left out (it needed two meta-batches)."""
    src = _write(tmp_path / "r.json", [_bench("seed", 256, 0.3), _bench("torch", 256, 5e-3)])
    records, stamp, _ = load_results(src)
    written = write_report(records, stamp, tmp_path / "one", title="t")
    assert [p.name for p in written] == ["one.md", "one_tasks_per_s.png", "one_speedup.png"]


def test_report_stamps_a_plain_pytest_benchmark_json(tmp_path):
    """Without bench/conftest.py's stamp (another conftest, an older run) the report said
    "unknown device" and stamped no machine or Python: pytest-benchmark's own fields are used."""
    mi = {"cpu": {"brand_raw": "Some CPU 9000", "count": 8}, "python_version": "3.12.1", "system": "Linux",
          "release": "6.1"}
    src = _write(tmp_path / "r.json", [_bench("torch", 32, 1e-3)], machine_info=mi)
    _, stamp, _ = load_results(src)
    assert stamp["cpu"] == "Some CPU 9000" and stamp["cpu_count"] == 8 and stamp["python"] == "3.12.1"
    assert stamp["platform"] == "Linux 6.1" and stamp["date"] == "2026-01-01T00:00:00"


# ---------------------------------------------------------------- FLOP counts, derived by hand
def test_flops_two_layer_mlp_by_hand_mse_and_cross_entropy():
    # dims (3, 5, 2), B = 4: layer 0 3x5 (hidden, tanh), layer 1 5x2
    mse = inner_step_flops((3, 5, 2), 4)
    assert mse["forward"] == (2 * 4 * 3 * 5 + 4 * 5 + 4 * 5) + (2 * 4 * 5 * 2 + 4 * 2)  # 160 + 88
    assert mse["loss"] == 3 * 4 * 2 + 1
    # dL/dout 2·B·C; layer 0: dW + db + tanh' (no dx); layer 1: dW + db + dx
    assert mse["backward"] == 2 * 4 * 2 + (120 + 20 + 60) + (80 + 8 + 80)
    assert mse["update"] == 2 * (3 * 5 + 5 + 5 * 2 + 2)
    assert mse["matmul"] == 2 * 120 + 3 * 80
    ce = inner_step_flops((3, 5, 2), 4, loss="cross_entropy")
    assert ce["forward"] == mse["forward"] and ce["update"] == mse["update"] and ce["matmul"] == mse["matmul"]
    assert ce["loss"] == 4 * (4 * 2 + 3) + 1
    assert ce["backward"] == 4 * (2 * 2 + 1) + (120 + 20 + 60) + (80 + 8 + 80)
    assert ce["total"] == ce["forward"] + ce["loss"] + ce["backward"] + ce["update"] == 745
    assert inner_loop_flops((3, 5, 2), 4, 3, 7, loss="cross_entropy") == 21 * 745


def test_flops_three_layer_mlp_by_hand():
    # dims (2, 4, 6, 3), B = 5
    f = inner_step_flops((2, 4, 6, 3), 5)
    fwd = (2 * 5 * 2 * 4 + 5 * 4 + 5 * 4) + (2 * 5 * 4 * 6 + 5 * 6 + 5 * 6) + (2 * 5 * 6 * 3 + 5 * 3)
    bwd = 2 * 5 * 3 + (80 + 20 + 3 * 20) + (240 + 30 + 240 + 3 * 30) + (180 + 15 + 180)
    assert (f["forward"], f["loss"], f["backward"]) == (fwd, 3 * 5 * 3 + 1, bwd)
    assert f["update"] == 2 * (2 * 4 + 4 + 4 * 6 + 6 + 6 * 3 + 3)
    ce = inner_step_flops((2, 4, 6, 3), 5, "cross_entropy")
    assert ce["loss"] == 5 * (4 * 3 + 3) + 1 and ce["backward"] == bwd - 2 * 5 * 3 + 5 * (2 * 3 + 1)
    with pytest.raises(ValueError, match="loss must be one of"):
        inner_step_flops((2, 4, 6, 3), 5, "hinge")


@pytest.mark.parametrize("dims", [(3, 5, 2), (2, 4, 6, 3)])
def test_cross_entropy_matmul_flops_match_torch_flop_counter(dims):
    model = MLP(dims[0], output_dim=dims[-1], hidden_dims=list(dims[1:-1]))
    x, y = torch.randn(4, dims[0]), torch.randint(0, dims[-1], (4,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert inner_step_flops(dims, 4, "cross_entropy")["matmul"] == counter.get_total_flops()


# ---------------------------------------------------------------- CLI: errors name the flag
def test_sine_seed_and_threads_errors_name_the_flag(tmp_path, capsys):
    """--seed 2**64 said "seed must be < 2**64", --threads 99999 "threads 99999 exceeds …":
    neither named the flag (every other bad value does, "argument --iterations: …")."""
    with pytest.raises(SystemExit) as stop:
        main(["sine", "--seed", str(2 ** 64), "--out", str(tmp_path / "a"), "--no-progress"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--seed {2 ** 64}" in err and "seed must be < 2**32" in err
    too_many = (torch.get_num_threads() or 1) + 10_000
    assert main(["sine", "--threads", str(too_many), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert f"--threads {too_many} exceeds" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_omniglot_runs_seed_error_names_the_flag(tmp_path, capsys):
    assert main(["omniglot-runs", "--runs", str(tmp_path), "--model", str(tmp_path / "m"),
                 "--seed", str(2 ** 64)]) == 2
    assert f"--seed {2 ** 64}" in capsys.readouterr().err


# ---------------------------------------------------------------- the bench's environment switches
@pytest.mark.parametrize("value, words", [("foo", "must be 'cpu', 'cuda' or 'cuda:N'"),
                                          ("meta", "must be 'cpu', 'cuda' or 'cuda:N'"),
                                          ("cuda:99", "")])
def test_bench_device_variable_is_checked_by_name(monkeypatch, value, words):
    """REPTILE_BENCH_DEVICE=foo was a RuntimeError from torch at collection ("Expected one of cpu,
    cuda, ..."), =cuda on a CPU machine a failure inside torch.cuda in every test."""
    from bench.providers import bench_device

    monkeypatch.setenv("REPTILE_BENCH_DEVICE", value)
    with pytest.raises(ValueError, match="REPTILE_BENCH_DEVICE") as err:
        bench_device()
    assert words in str(err.value)
    monkeypatch.setenv("REPTILE_BENCH_DEVICE", "cpu")
    assert bench_device() == torch.device("cpu")


@pytest.mark.parametrize("flag, value", [("--hidden-dim", 2_000_000), ("--eval-tasks", 10 ** 11)])
def test_out_of_memory_names_the_size_that_did_not_fit(tmp_path, capsys, flag, value):
    """A 2000000-wide MLP (16 TB) or 1e11 held-out tasks ran out of memory with "--meta-batch-size 1
    does not fit in this machine's memory; lower it": the one flag that was fine."""
    code = main(["sine", flag, str(value), "--iterations", "1", "--backend", "torch", "--eval-steps", "1",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "out of memory" in err and f"{flag} {value}" in err and "Traceback" not in err


def test_report_reads_the_gpu_checks_results_json(tmp_path):
    """bench.report's docstring and --help promise the GPU check's results.json, but since the GPU
    check was rewritten into stages (its rows under stages.timing.rows) the report refused it:
    "neither pytest-benchmark JSON ('benchmarks') nor a GPU-check result ('records')"."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu_check_cpu_smoke" / "results.json"
    records, stamp, _ = load_results(src)
    timed = {(r["provider"], r["meta_batch"]): r for r in derive(records) if "tasks_per_s" in r}
    # the committed smoke run: width 16 (from its FLOP count: older rows do not record it), T = 1 and 2
    assert {r["width"] for r in timed.values()} == {16} and ("torch", 2) in timed and ("v1", 1) in timed
    import json

    raw = json.loads(src.read_text())["stages"]["timing"]["rows"]
    torch_2 = next(r for r in raw if r.get("provider") == "torch" and r.get("T") == 2)
    assert timed[("torch", 2)]["seconds"] == pytest.approx(torch_2["ms"] / 1e3)  # the row's own time, in s
    assert not any(p.startswith(("fit-", "cli-")) for p, _ in timed)  # whole-job rows are not inner loops
    assert stamp["command"].startswith("bench/gpu_check.sh") and stamp["fp32_matmul_peak_gflops"] > 0
    out = tmp_path / "gc"
    assert report_main([str(src), "--out", str(out)]) == 0
    md = (tmp_path / "gc.md").read_text()
    assert "## MLP 1-16-16-1, 5 inner steps of 10 points" in md and "gpu_check.py's timing stage" in md


def test_plain_setting_names_opening_an_error_become_flags():
    """`reptile-fast omniglot --ways 1` said "ways must be >= 2, got 1" (check_int's words; as_flags
    changed plain names only in the name=value form), and a one-letter path such as `--test y`
    protected the "y" inside "ways" from being changed at all."""
    from reptile_fast.validation import as_flags

    assert as_flags("ways must be >= 2, got 1", ["ways", "shots"], keep=["x", "y"]) == "--ways must be >= 2, got 1"
    assert as_flags("shots must be an int, got str", ["shots"]) == "--shots must be an int, got str"
    assert as_flags("the ways must be two", ["ways"]) == "the ways must be two"  # prose stays
    assert as_flags("output directory seed=3 exists", ["seed"], keep=["seed=3"]) == "output directory seed=3 exists"


def test_omniglot_ways_error_names_the_flag(tmp_path, capsys):
    assert main(["omniglot", "--train", str(tmp_path), "--test", str(tmp_path), "--ways", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--ways must be >= 2, got 1" in capsys.readouterr().err


def test_native_meta_batch_checks_the_timed_meta_batch(monkeypatch):
    """bench.native_meta_batch checked every backend at min(T, 32) tasks, so backend torch's task
    blocks (63 tasks for the sine MLP), which start only above that, were timed at meta-batch
    256 and 1024 without a check.  The check now runs the timed meta-batch, and a backend that
    is wrong only on large meta-batches is refused."""
    import bench.native_meta_batch as nmb

    monkeypatch.setattr(nmb, "BACKENDS", {"torch": {"task_block": 16}})
    out = nmb.check(40)  # 3 blocks of 16 tasks
    assert out["torch"]["tasks"] == 40 and out["torch"]["ok"]

    from reptile_fast.backends import get_backend

    TorchBackend = type(get_backend("torch"))
    real = TorchBackend.inner_loop

    def wrong_above_32(self, model, tasks, indices, config, *a, **k):
        res = real(self, model, tasks, indices, config, *a, **k)
        if tasks.n_tasks > 32:
            for v in res.params.values():
                v[-1] = v[0]  # the last task gets the first one's answer
        return res

    monkeypatch.setattr(TorchBackend, "inner_loop", wrong_above_32)
    assert nmb.check(40)["torch"]["ok"] is False
    assert nmb.check(8)["torch"]["ok"] is True


def test_recorded_commands_can_be_run_again(monkeypatch):
    """The stamp joined arguments with spaces: `-k "test_inner_loop_speed and torch-T4"` was recorded
    as `-k test_inner_loop_speed and torch-T4`, which a shell does not take back."""
    import shlex

    from bench.env import command_line, machine_stamp

    monkeypatch.setattr("sys.argv", ["bench/x.py", "-k", "speed and torch", "--out", "a b.json"])
    cmd = machine_stamp()["command"]
    assert shlex.split(cmd)[1:] == ["bench/x.py", "-k", "speed and torch", "--out", "a b.json"]
    assert command_line("REPTILE_BENCH=full", "python", "-m", "pytest", "-k", "a and b") == \
        "REPTILE_BENCH=full python -m pytest -k 'a and b'"
