"""A pytest plugin for runs under a wall-clock limit (``bench/gpu_check.sh --tests``): each failure's
report is printed the moment it happens, so a run killed by its timeout still leaves every failure
seen so far in its log (pytest prints tracebacks only at the end).

    python -m pytest -p bench.pytest_failures_now ...
"""


def pytest_runtest_logreport(report):
    if report.failed:
        print(f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}", flush=True)
