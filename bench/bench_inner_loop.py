"""Inner-loop throughput of every provider, each checked before it is timed: on every input set
it will be timed on, every task's update against a float64 oracle (``bench.providers``' gate).

    python -m pytest -q bench/bench_inner_loop.py                      # smoke (CI): tiny, untimed
    REPTILE_BENCH=full python -m pytest -q bench/bench_inner_loop.py --benchmark-enable \
        --benchmark-json=bench/results/cpu-<date>.json                 # the sweep
    python -m bench.report bench/results/cpu-<date>.json               # table + plots

Providers and sizes: ``bench/providers.py``; derived figures (tasks/s, FLOP/s, % of peak,
speed-ups): ``bench/report.py`` from the numbers stored in each benchmark's ``extra_info``.
"""
import math
import time

import pytest
import torch

from bench.flops import inner_loop_flops, synchronize
from bench.providers import (PROVIDERS, SMOKE_POINTS, ProviderSkip, bench_device, bench_mode,
                             check_prepared, get_provider, sweep_points, timed_skip_reason)

_DEVICE = bench_device()
_MODE = bench_mode()
#: Seconds of timed calls per benchmark in the full sweep (rounds are at least 3).
TARGET_SECONDS = 1.5


def _cases(points, smoke=False):
    # Point-major order, so the problem (and its reference) is built once per size.  In smoke
    # runs torch-compile is checked at the first size only (compiling takes 10-25 s).
    return [pytest.param(pt, name, id=f"{name}-{pt.id}") for k, pt in enumerate(points) for name in PROVIDERS
            if not (smoke and name == "torch-compile" and k > 0)]


def _prepare_checked(provider_name, point, device, problems, rotations=1):
    """The provider prepared on the shared problem and checked; skips or fails with the reason."""
    provider = get_provider(provider_name)
    reason = provider.unavailable(device) or provider.skip_reason(point, device)
    if reason:
        pytest.skip(reason)
    problem = problems(point, rotations)
    try:
        prepared = provider.prepare(problem)
    except ProviderSkip as exc:
        pytest.skip(str(exc))
    result, _ = check_prepared(provider, prepared, problem)
    if not result.ok:
        pytest.fail(f"{provider_name} at {point} is wrong, so it is not timed: {result.message}")
    # every task of every input set the timing cycles through was held to the bound
    assert result.tasks_checked == point.meta_batch and result.rotations_checked == problem.rotations
    return provider, problem, prepared, result


@pytest.mark.parametrize("point, provider_name", _cases(SMOKE_POINTS, smoke=True))
def test_provider_matches_reference(point, provider_name, device, problems):
    """At tiny sizes, on two input sets: every task's update is within its precision's bound of
    the float64 oracle, and fp32 providers' adapted parameters equal the fp32 reference's
    (rtol 1e-5 / atol 1e-6)."""
    _, _, _, result = _prepare_checked(provider_name, point, device, problems, rotations=2)
    assert result.ok, result.message
    assert result.update_margin <= 1


@pytest.mark.parametrize("point, provider_name", _cases(sweep_points(_MODE, _DEVICE.type), smoke=_MODE == "smoke"))
def test_inner_loop_speed(benchmark, point, provider_name, device, problems, fp32_peak):
    """Seconds per meta-batch of inner loops (all tasks), after the correctness check."""
    if _MODE == "full" and benchmark.disabled:
        pytest.fail("REPTILE_BENCH=full needs --benchmark-enable (pyproject's addopts disable "
                    "timing for the CI smoke run)")
    reason = timed_skip_reason(provider_name, point, device, _MODE)
    if reason:
        pytest.skip(reason)
    rotations = 2 if _MODE == "smoke" else (4 if device.type == "cuda" else 2)
    provider, problem, prepared, result = _prepare_checked(provider_name, point, device, problems, rotations)
    counter = [1]

    def target():
        out = prepared.run(counter[0])
        counter[0] += 1
        if prepared.sync is not None:
            prepared.sync(out)
        else:
            synchronize(device)
        return out

    rounds, iterations = 1, 1
    if benchmark.enabled:
        target()  # warm-up beyond the check's call
        t0 = time.perf_counter()
        target()
        single = max(time.perf_counter() - t0, 1e-6)
        iterations = max(1, min(1000, int(0.02 / single)))
        rounds = max(3, min(30, math.ceil(TARGET_SECONDS / (single * iterations))))
    benchmark.extra_info.update(
        provider=provider_name, meta_batch=point.meta_batch, width=point.width, depth=point.depth,
        steps=point.steps, inner_batch=point.inner_batch, dims=list(point.dims),
        flops=inner_loop_flops(point.dims, point.inner_batch, point.steps, point.meta_batch),
        device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                         else "cpu"),
        rotations=rotations, check=result.as_dict(), peak=fp32_peak,
        timer="host clock around back-to-back calls, synchronized after each call")
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=1)
