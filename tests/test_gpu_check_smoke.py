"""bench/gpu_check.sh --cpu-smoke: the GPU check's whole path at tiny sizes on the CPU (Triton
interpreter), so the script a GPU session runs once is known to work end to end."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_cpu_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHON"] = sys.executable
    # stages 1 (env), 3 (correctness), 4 (timing), 5-6 (skipped without CUDA): the compile stage
    # is bench/bench_triton_kernel.py's test_kernel_compiles_for_sm90
    # --budget: the smoke's default 240 s is a GPU session's limit, not this test's; under a parallel
    # run (pytest -n) on 2 loaded cores the run took 160 s and its timed cases were near the skip
    # threshold ("time budget spent").  480 + the 10 s deadline grace stays under timeout=600.
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path),
                           "--stages", "1,3,4,5,6", "--budget", "480"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["stages"]
    assert set(stages) == {"env", "correctness", "timing", "sanitizer", "ncu"}
    corr = {r["variant"]: r for r in stages["correctness"]["rows"]}
    for name in ("v1", "v2-tf32x3", "v2-meta"):
        assert "error" not in corr[name] and corr[name]["ok_rtol1e-5"], corr[name]
        assert corr[name]["unwritten"] == 0
    assert corr["v2-meta"]["deterministic"]
    repeat = [r for r in corr.values() if r["variant"].startswith("v2-repeat-")]
    assert len(repeat) == 4 and all("error" not in r and r["bitwise"] for r in repeat), repeat
    special = corr["special-functions"]
    assert all(special[f]["max_rel_err_in_2^-23"] <= special[f]["stated_bound"] for f in ("exp", "tanh", "sigmoid", "log"))
    timed = {(r["provider"], r["T"]) for r in stages["timing"]["rows"] if "ms" in r}
    assert {("v1", 1), ("v2-meta", 2), ("torch", 1)} <= timed
    # every timed case rotated over the stage's input sets (recorded), the same number for all
    assert stages["timing"]["rotations"] == 2
    assert all(r["input_sets"] == 2 for r in stages["timing"]["rows"] if "ms" in r and r["T"] in (1, 2)
               and not r["provider"].startswith(("fit-", "cli-"))), stages["timing"]["rows"]
    assert stages["sanitizer"]["status"] == "skipped"
    cli = next(r for r in stages["timing"]["rows"] if r["provider"] == "cli-sine-gpu")
    assert cli["returncode"] == 0 and cli["post_adaptation_mse"] > 0, cli
    assert json.loads((tmp_path / "sine_gpu_metrics.json").read_text())["post_adaptation_mse"] == cli["post_adaptation_mse"]
    # the device tool brings back at most 8 files from $OUT, two folders down at most, named in
    # letters, digits, '.', '_' and '-': the GPU run writes only flat, plain names (sanitizer.log
    # and ncu.log join these with CUDA)
    files = [p for p in tmp_path.rglob("*")]
    assert all(p.is_file() and p.parent == tmp_path for p in files), files
    assert len(files) + 2 <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.splitlines()[-1].startswith("ncu: skipped") and "tasks/s" in summary


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_sweep_cpu_smoke(tmp_path):
    """bench/gpu_check.sh --cpu-smoke --sweep: every launch setting's φ checked against the
    default's, then timed; sweep.json holds both task counts.  (--sweep after another flag: it
    counted only as the first argument.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["PYTHON"] = sys.executable
    # --budget: the sweep's smoke default (120 s) took 112-115 s under pytest -n 4 on 2 cores, and a
    # setting started past 110 s is "skipped: time budget spent" (seen at load ~9).  480 + the 10 s
    # deadline grace stays under timeout=600.
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--sweep", "--budget", "480",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {r["T"] for r in rows} == {1, 5}
    assert all(r.get("ok") and "ms" in r for r in rows), [r for r in rows if not r.get("ok")]
    assert all(r["input_sets"] == 2 for r in rows), rows  # every setting rotated over the smoke's sets
    assert any(r["config"].get("stream") for r in rows) and any(not r["config"] for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.log"]


def test_triton_compile_writes_each_row_as_it_goes(tmp_path):
    """The GPU check's compile stage kills bench.triton_compile at its time cap and reads the rows
    done by then: --out must hold every finished row, not only a complete run's.  In a child
    process: compiling imports the kernel modules without TRITON_INTERPRET, which this process's
    later kernel tests must not inherit."""
    out = tmp_path / "compile.json"
    script = ("import sys\n"
              "from bench import triton_compile as TC\n"
              "def killed(*args, **kwargs):\n"
              "    raise SystemExit(7)  # the kill, after the v2 rows\n"
              "TC.guard_rows = killed\n"
              f"TC.main(['--kernel', 'v2', '--cases', 'smoke', '--out', {str(out)!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 7, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["mode"]) for r in rows] == [("v2", "meta-step"), ("v2", "meta-step-1")]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_tool_stage_timeout_kills_the_python_the_tool_runs(tmp_path, monkeypatch):
    """compute-sanitizer / ncu run python as their child: on a timeout both must die, or that python
    keeps the GPU busy through the next stages and the session's sweep."""
    from types import SimpleNamespace

    from bench import gpu_check as GC

    pidfile = tmp_path / "child.pid"
    tool = tmp_path / "fake-tool"
    tool.write_text(f"#!/bin/bash\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    tool.chmod(0o755)
    monkeypatch.setattr(GC, "find_tool", lambda name: str(tool))
    res = GC.stage_tools(lambda *a: None, tmp_path, SimpleNamespace(type="cuda"), "sanitizer", 2, ("memcheck",))
    assert str(res["memcheck"]["returncode"]).startswith("timeout")
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the tool's child outlived the timeout")


def _run_fake_ncu(tmp_path, monkeypatch, tool_name, lines):
    """Stage 6's ``tool_name`` pass with a stand-in ncu that records its arguments and prints
    ``lines``: ``(stage_tools' result, the arguments)``."""
    from types import SimpleNamespace

    from bench import gpu_check as GC

    argsfile = tmp_path / "args"
    tool = tmp_path / "fake-ncu"
    tool.write_text(f"#!/bin/bash\necho \"$@\" > {argsfile}\n" + "".join(f"echo '{line}'\n" for line in lines))
    tool.chmod(0o755)
    monkeypatch.setattr(GC, "find_tool", lambda name: str(tool))
    res = GC.stage_tools(lambda *a: None, tmp_path, SimpleNamespace(type="cuda"), "ncu", 10, (tool_name,))
    return res, argsfile.read_text().split()


def test_ncu_profiles_every_profiled_launch_with_the_stall_sections(tmp_path, monkeypatch):
    """Stage 6's ncu command: every ``PROFILED`` launch selected (no skip, count = len(PROFILED)),
    the sections that say what warps wait on (WarpStateStats, SchedulerStats), and its stall
    figures kept in the summary."""
    from bench import gpu_check as GC

    res, args = _run_fake_ncu(tmp_path, monkeypatch, "ncu", [
        "    Warp Cycles Per Issued Instruction           cycle        41.20",
        "          On average, each warp of this kernel spends 18.9 cycles being stalled waiting for sibling "
        "warps at a CTA barrier."])
    assert "--launch-skip" not in args
    assert args[args.index("--launch-count") + 1] == str(len(GC.PROFILED))
    sections = [args[i + 1] for i, a in enumerate(args) if a == "--section"]
    assert {"SpeedOfLight", "Occupancy", "WarpStateStats", "SchedulerStats"} <= set(sections)
    assert "--metrics" not in args
    summary = res["ncu"]["summary"]
    assert any("Warp Cycles Per Issued Instruction" in line for line in summary)
    assert any("cycles being stalled" in line for line in summary)


def test_ncu_second_pass_counts_shared_memory_wavefronts_and_bank_conflicts(tmp_path, monkeypatch):
    """Stage 6's "ncu-shared" pass: the same ``PROFILED`` launches with ``NCU_SHARED_METRICS`` (shared
    loads' and stores' wavefronts and bank conflicts) and no sections, its figures in the summary;
    stage 6 runs both passes (``tests/test_review_qa35.py::test_main_on_a_gpu_writes_results_and_summary``)."""
    from bench import gpu_check as GC

    res, args = _run_fake_ncu(tmp_path, monkeypatch, "ncu-shared", [
        "    l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum            1,234",
        "    l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum                5,678"])
    assert "--section" not in args
    assert args[args.index("--metrics") + 1].split(",") == list(GC.NCU_SHARED_METRICS)
    assert args[args.index("--launch-count") + 1] == str(len(GC.PROFILED))
    assert "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum" in GC.NCU_SHARED_METRICS
    assert args[args.index("--print-units") + 1] == "base"
    summary = res["ncu-shared"]["summary"]
    assert any("bank_conflicts" in line and "1,234" in line for line in summary)
    assert any("wavefronts_mem_shared_op_ld" in line for line in summary)


NCU_METRICS_OUT = """==PROF== Connected to process 1460
  _meta_step_kernel (264, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    ---------------------------------------------------------- ----------- ------------
    Metric Name                                                Metric Unit Metric Value
    ---------------------------------------------------------- ----------- ------------
    gpu__time_duration.sum                                              ns      982,180
    l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum                 1,234,567
    l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum                     5,678,901
    sass__inst_executed_shared_loads                               inst        345,678
  _meta_step_kernel (264, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: Command line profiler metrics
    l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum                     9,999,999
"""


def test_ncu_metric_table_pairs_each_kernel_block_with_its_profiled_launch():
    """``ncu_metric_table``: one row per ``_meta_step_kernel`` block in ncu's order, named by
    ``PROFILED`` in launch order, its metrics as numbers (thousands separators dropped, units
    skipped); the summary prints one line per launch."""
    from bench import gpu_check as GC

    table = GC.ncu_metric_table(NCU_METRICS_OUT)
    assert [(r["variant"], r["T"]) for r in table] == list(GC.PROFILED[:2])
    assert table[0]["metrics"] == {"gpu__time_duration.sum": 982180.0,
                                   "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": 1234567.0,
                                   "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": 5678901.0,
                                   "sass__inst_executed_shared_loads": 345678.0}
    assert table[1]["metrics"] == {"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": 9999999.0}
    results = {"stages": {"ncu": {"ncu-shared": {"returncode": 0, "summary": [], "table": table}}}, "seconds": {}}
    lines = [l for l in GC.summary_lines(results) if l.startswith("ncu-shared")]
    v, T = GC.PROFILED[0]
    assert lines[0] == (f"ncu-shared {v} T={T}: shared ld wavefronts 5,678,901, of them bank conflicts 1,234,567, "
                        "ld instructions 345,678, ns 982,180")
    assert len(lines) == 2


def test_a_tool_run_gets_what_the_budget_has_left_or_is_skipped(tmp_path, monkeypatch):
    """stage_tools with a callable timeout: each run's seconds are asked for when it starts; a run
    left less than ``TOOL_MIN_SECONDS`` is skipped (not started) and says so; ``on_result`` sees
    the results after every run, so a later run cut by the deadline leaves the earlier ones saved."""
    from types import SimpleNamespace

    from bench import gpu_check as GC

    tool = tmp_path / "fake-ncu"
    tool.write_text("#!/bin/bash\necho ran >> " + str(tmp_path / "runs") + "\n")
    tool.chmod(0o755)
    monkeypatch.setattr(GC, "find_tool", lambda name: str(tool))
    left = iter([20.0, 3.0])
    seen = []
    res = GC.stage_tools(lambda *a: None, tmp_path, SimpleNamespace(type="cuda"), "ncu", lambda: next(left),
                         ("ncu", "ncu-shared"), on_result=seen.append)
    assert (tmp_path / "runs").read_text().split() == ["ran"]
    assert res["ncu"]["returncode"] == 0
    assert res["ncu-shared"]["status"] == "skipped" and "time budget" in res["ncu-shared"]["reason"]
    assert [sorted(r) for r in seen] == [["ncu"], ["ncu", "ncu-shared"]]
    line = [l for l in GC.summary_lines({"stages": {"ncu": res}, "seconds": {}}) if l.startswith("ncu-shared")]
    assert line == ["ncu-shared: skipped (time budget spent (3 s left for it))"]


def test_failures_are_printed_as_they_happen(tmp_path):
    """bench/pytest_failures_now: a failure's report is in the output before the run goes on (a run
    killed by its timeout keeps the failures seen so far)."""
    (tmp_path / "test_two.py").write_text("def test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
                                          "def test_after():\n    print('RAN AFTER')\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "-p", "bench.pytest_failures_now", str(tmp_path / "test_two.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out[-2000:]
    report = out.index("=== FAILED test_two.py::test_bad (call)")
    assert "one is not two" in out[report:] and report < out.index("RAN AFTER"), out[-2000:]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
@pytest.mark.parametrize("budget", ["1", "300"])
def test_gpu_check_tests_mode(tmp_path, budget):
    """bench/gpu_check.sh --tests OUT: pytest -m gpu into OUT/pytest_gpu.log with its exit status;
    without CUDA every selected case skips (rc 0); a budget too short to finish is killed (rc 124)
    and says so."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(PYTHON=sys.executable, TESTS_BUDGET=budget, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tests", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "pytest_gpu.log").read_text()
    if budget == "1":
        assert proc.returncode == 124 and log.rstrip().endswith("rc=124 (killed after TESTS_BUDGET=1 s)"), log[-2000:]
    else:
        assert proc.returncode == 0 and re.search(r"\d+ skipped, \d+ deselected", log), log[-2000:]
        assert log.rstrip().endswith("rc=0") and " passed" not in log, log[-2000:]


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_tests_mode_without_pytest_benchmark(tmp_path):
    """--tests on a machine without pytest-benchmark (pyproject's addopts name its
    --benchmark-disable, which pytest alone refuses with rc 4): the cases still run."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "pytest_benchmark.py").write_text("raise ImportError('not installed here')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.update(PYTHON=sys.executable, TESTS_BUDGET="300", CUDA_VISIBLE_DEVICES="",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",  # no installed plugin, as on such a machine
               PYTHONPATH=os.pathsep.join([str(fake), str(ROOT), env.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--tests", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "pytest_gpu.log").read_text()
    assert proc.returncode == 0 and re.search(r"\d+ skipped, \d+ deselected", log), log[-2000:]
