"""The GPU check's CUDA-only paths reviewed on the CPU (QA12): the run's hard deadline (a hung GPU
call must not cost the session its summary or leave children on the GPU), the tool lookup, and
the JIT-launch compile harness (bench/jit_launches.py) on the installed Triton, and the
checkpoint's CUDA RNG states (checked on the CPU: their sizes are torch's, not a device's)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_until_cut_short(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (a GPU check or sweep with a stage that hangs); its deadline must end it with
    exit code 3 well within a minute.  The scripts' budgets (15 s, 12 s) count from main's start;
    the scripts import torch and triton first (under a loaded parallel run importing them took
    8-14 s, and a budget that counted them left too little for the hung stage to start: QA59)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child not yet reaped is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_deadline_ends_a_hung_run_with_its_rows_and_a_summary(tmp_path):
    """A stage that never returns (on a GPU: a kernel that never finishes, the main thread stuck in
    the driver) used to hold the run until the device tool's limit: no summary.txt, the stage's
    rows lost, the children (compile, tools) left on the GPU.  The deadline (budget + grace)
    writes both files with the rows made so far, kills the children and exits 3."""
    out, pidfile = tmp_path / "out", tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              # torch (and triton) imported before main: its budget counts from main's start, and
              # under a loaded parallel run (pytest -n) importing them took 10+ s of the budget
              "import torch, triton  # noqa: F401\n"
              "from bench import gpu_check as GC\n"
              "def hung(log, device, smoke, rows=None):\n"
              "    rows.append({'variant': 'v1', 'T': 3, 'ok_rtol1e-5': True})\n"
              "    child = subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
              "    GC._CHILDREN.add(child)\n"
              f"    open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
              "    time.sleep(120)\n"
              "GC.stage_correctness = hung\n"
              "GC.DEADLINE_GRACE = 1.0  # (10 s on a real run)\n"
              f"sys.exit(GC.main(['--cpu-smoke', '--budget', '15', '--stages', '3', {str(out)!r}]))\n")
    _run_until_cut_short(script)
    results = json.loads((out / "results.json").read_text())
    corr = results["stages"]["correctness"]
    assert corr["status"] == "cut short" and corr["rows"] == [{"variant": "v1", "T": 3, "ok_rtol1e-5": True}]
    summary = (out / "summary.txt").read_text()
    assert "correctness v1" in summary and "cut short" in summary
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the run's child outlived the deadline")


def test_deadline_is_cancelled_when_the_run_ends(tmp_path, monkeypatch):
    """main() in a process that goes on (a test, a notebook) must not be ended later by the timer."""
    from bench import gpu_check as GC

    made = []

    class Recorded(GC.Deadline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, exit_fn=lambda code: made.append(("exit", code)), **kwargs)
            made.append(self)

    import torch

    monkeypatch.setattr(GC, "Deadline", Recorded)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # main sets it
    threads = torch.get_num_threads()
    try:
        assert GC.main(["--cpu-smoke", "--stages", "", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    deadline = made[0]
    assert deadline._timer.finished.is_set() and ("exit", 3) not in made


def test_find_tool_looks_in_versioned_nsight_compute_folders(tmp_path, monkeypatch):
    """Nsight Compute installs as /opt/nvidia/nsight-compute/<version>/ncu; off PATH, stage 6 was
    skipped as "ncu not found"."""
    import shutil

    from bench import gpu_check as GC

    for version in ("2024.1.0", "2025.3.1", "2025.10.0-beta"):
        (tmp_path / version).mkdir()
    for version in ("2024.1.0", "2025.3.1"):
        (tmp_path / version / "ncu").write_text("#!/bin/sh\n")
    monkeypatch.setattr(GC, "NSIGHT_COMPUTE_ROOT", tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert GC.find_tool("ncu") == str(tmp_path / "2025.3.1" / "ncu")
    monkeypatch.setattr(GC, "NSIGHT_COMPUTE_ROOT", tmp_path / "absent")
    assert GC.find_tool("ncu") is None or not GC.find_tool("ncu").startswith(str(tmp_path))


def test_jit_launch_harness_compiles_one_launch_for_sm90(tmp_path):
    """bench/jit_launches.py drives Triton's own JIT path (binder, specialization, compile) with a
    stand-in sm_90 driver, nothing launched: checked here on one small kernel with the installed
    Triton (in a child: it imports the kernels compiled, not interpreted)."""
    script = ("import json, sys, torch\n"
              "from bench import jit_launches as J\n"
              "from reptile_fast.kernels import meta_step_guard as G\n"
              "rec = J.Recorder(90, lambda *a: None)\n"
              "with rec.installed():\n"
              "    with rec.at('guard'):\n"
              "        phi = torch.zeros(4225)\n"
              "        G.accept_step(phi, torch.ones(4225), torch.zeros(1), G.new_state('cpu'),\n"
              "                      torch.ones(1, dtype=torch.int64), torch.zeros(1))\n"
              "    assert torch.equal(phi, torch.zeros(4225))  # compiled, not run\n"
              "print(json.dumps(rec.rows, default=str))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["kernel"] == "_accept_kernel" and rows[0]["num_warps"] == 4
    if rows[0].get("ptxas") is None:  # registers come from the wheel's ptxas when it has one
        assert isinstance(rows[0]["registers"], int) and isinstance(rows[0]["loads"], bool)


def test_a_malformed_cuda_rng_state_is_refused_before_any_rng_is_set():
    """A checkpoint's CUDA RNG states (torch.cuda.get_rng_state_all, a CUDA torch.Generator) were
    checked for dtype only: a wrong size passed, the CPU, numpy and Python RNGs were restored, and
    then torch raised "RNG state is wrong size" (on a GPU) or the state was silently not used.
    Now refused by rng_state_problem, before anything is set (torch takes 16 bytes, or 8)."""
    import torch

    from reptile_fast.checkpoint import capture_rng_state, restore_rng_state, rng_state_problem

    good = capture_rng_state()
    u8 = lambda n: torch.zeros(n, dtype=torch.uint8)  # noqa: E731
    assert rng_state_problem(dict(good, cuda=[u8(16), u8(8)],
                                  generator={"state": u8(16), "device": "cuda:0"})) is None
    assert "CUDA RNG state" in rng_state_problem(dict(good, cuda=[u8(16), u8(5)]))
    assert "16 bytes" in rng_state_problem(dict(good, generator={"state": u8(5016), "device": "cuda"}))
    old = torch.get_rng_state()
    torch.rand(3)
    now = torch.get_rng_state()
    with pytest.raises(ValueError, match="CUDA RNG state"):
        restore_rng_state(dict(good, torch=old, cuda=[u8(12)]))
    assert torch.equal(torch.get_rng_state(), now)


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess timing")
def test_sweep_deadline_keeps_the_rows_of_a_hung_T(tmp_path):
    """The sweep (the session's second GPU call) held a hung run until the tool's limit too, and
    a T's rows reached sweep.json only when the T was done.  Now rows go into sweep.json's list as
    they are made and the deadline (budget + 10 s) writes it with a "cut short" row, exit 3."""
    out = tmp_path / "out"
    script = ("import sys, time\n"
              # torch (and triton) imported before main: its budget counts from main's start, and
              # under a loaded parallel run (pytest -n) importing them took 10+ s of the budget
              "import torch, triton  # noqa: F401\n"
              "from bench import gpu_sweep as S\n"
              "def hung(T, device, width, smoke, budget, log, rows=None, **kw):\n"
              "    rows.append({'T': T, 'config': {}, 'ok': True, 'ms': 1.0, 'tasks_per_s': 1e3 * T})\n"
              "    time.sleep(120)\n"
              "S.sweep_T = hung\n"
              "import bench.gpu_check as GC\n"
              "GC.DEADLINE_GRACE = 1.0  # (10 s on a real run)\n"
              f"sys.exit(S.main(['--cpu-smoke', '--budget', '12', {str(out)!r}]))\n")
    _run_until_cut_short(script)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert rows[0]["ms"] == 1.0 and rows[-1]["status"] == "cut short" and rows[-1]["T"] == 1, rows
