"""Benchmark setup: the smoke/full switch, the device, shared seeded problems, the measured fp32
peak, and the machine stamp in pytest-benchmark's JSON.

Modes (``REPTILE_BENCH``):
- unset or "smoke" (CI, ``python -m pytest -q``): every provider's correctness at tiny sizes and
  one tiny timed case; pyproject's addopts pass ``--benchmark-disable``, so timed functions run
  once, untimed.
- "full": the sweep of ``bench.providers.sweep_points``; needs ``--benchmark-enable``.
"""
import os
import sys

import pytest
import torch

# As in tests/conftest.py (bench/ may be run alone): the Triton interpreter where there is no
# CUDA, set before any kernel module is imported; and no TF32 anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


_LOAD_AT_START = []


def pytest_configure(config):
    from bench.providers import bench_device, bench_mode

    if hasattr(os, "getloadavg"):
        _LOAD_AT_START.append(round(os.getloadavg()[0], 2))
    try:
        bench_mode()
        bench_device()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    threads = os.environ.get("REPTILE_BENCH_THREADS")
    if threads:
        # A fixed thread count for every provider: on a CPU shared with other jobs, torch's
        # OpenMP threads wait on descheduled partners and small ops slow down 10-100x.
        if not threads.isdigit() or int(threads) < 1:
            raise pytest.UsageError(f"REPTILE_BENCH_THREADS must be a positive int, got {threads!r}")
        torch.set_num_threads(int(threads))
        if threads == "1":
            os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


# optional: pytest-benchmark's own hooks (without the plugin, e.g. on a GPU image that lacks it,
# pytest would refuse these as unknown hooks and run nothing)
@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.env import command_line, machine_stamp
    from bench.providers import bench_device, bench_mode

    stamp = {**machine_stamp(), "mode": bench_mode(), "device": str(bench_device())}
    env = [f"{k}={os.environ[k]}" for k in ("REPTILE_BENCH", "REPTILE_BENCH_DEVICE", "REPTILE_BENCH_THREADS")
           if os.environ.get(k)]
    stamp["command"] = command_line(*env, "python", "-m", "pytest", *config.invocation_params.args)
    if hasattr(os, "getloadavg"):
        # The CPU may be shared: the 1-minute load average at the start and end of the run.
        stamp["loadavg_1min"] = f"{_LOAD_AT_START[0] if _LOAD_AT_START else '?'} -> {os.getloadavg()[0]:.2f}"
    if "jax" in sys.modules:  # the JAX peer ran
        stamp["jax"] = sys.modules["jax"].__version__
    machine_info["reptile_fast"] = stamp


#: Timed cases that were skipped or failed, with the reason, for bench.report's "Not timed".
_NOT_TIMED = []


def pytest_runtest_logreport(report):
    if "test_inner_loop_speed[" not in report.nodeid or not (report.skipped or report.failed):
        return
    case = report.nodeid.rsplit("[", 1)[1].rstrip("]")
    provider, _, point = case.rpartition("-T")
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
    else:
        reason = str(report.longrepr).strip().splitlines()[-1] if report.longrepr else "failed"
    _NOT_TIMED.append({"provider": provider, "point": "T" + point,
                       "status": "skipped" if report.skipped else "failed", "reason": reason})


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["reptile_fast_not_timed"] = list(_NOT_TIMED)


@pytest.fixture(scope="session")
def device() -> torch.device:
    from bench.providers import bench_device

    return bench_device()


@pytest.fixture(scope="session")
def problems(device):
    """``get(point, rotations)``: the seeded problem at ``point``, shared by every provider (so the
    reference it is checked against is computed once)."""
    from bench.providers import make_problem

    cache = {}

    def get(point, rotations=1):
        key = (point, rotations)
        if key not in cache:
            cache.clear()  # one size at a time: large meta-batches hold a lot of memory
            cache[key] = make_problem(point, device, rotations=rotations)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def fp32_peak(request, device):
    """The device's fp32 matmul rate (TF32 off) and the inner loop's own bmm rate, measured once
    per session when timing is on (None when benchmarks are disabled)."""
    opt = request.config.getoption
    if opt("benchmark_disable", False) and not opt("benchmark_enable", False):
        return None
    from bench.flops import measure_bmm_rate, measure_matmul_peak

    peak = measure_matmul_peak(device)
    bmm = measure_bmm_rate(device)
    return {"matmul_flops_per_s": peak["flops_per_s"], "matmul_n": peak["n"],
            "bmm_flops_per_s": bmm["flops_per_s"], "bmm_shape": bmm["shape"]}
