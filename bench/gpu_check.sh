#!/usr/bin/env bash
# The first GPU run (bench/gpu_check.py's docstring has the six stages):
#   bench/gpu_check.sh OUT_DIR              on one H100/H200, <= 6 minutes (device tool: bench/gpu_check.sh $OUT)
#   bench/gpu_check.sh --cpu-smoke OUT_DIR  anywhere: the same path at tiny sizes on the CPU,
#                                           Triton kernels under TRITON_INTERPRET=1 (CI runs it)
#   bench/gpu_check.sh --sweep OUT_DIR      kernel v2's launch settings swept (bench/gpu_sweep.py,
#                                           <= ~4 minutes): the second call of a GPU session
#   bench/gpu_check.sh --tests OUT_DIR      the test suite's CUDA cases (pytest -m gpu) on the GPU,
#                                           killed after TESTS_BUDGET seconds (default 300); every
#                                           failure printed as it happens into OUT_DIR/pytest_gpu.log
# Extra flags go to bench/gpu_check.py (--stages 1,3,4  --budget SECONDS).  Needs no installs:
# torch and triton (JAX, nvcc, ncu, compute-sanitizer are used when present); runs from the source
# tree.  results.json in OUT_DIR is rewritten after every stage; the summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX must not take the GPU's memory from torch
for a in "$@"; do
  if [ "$a" = "--cpu-smoke" ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; fi
done
PY=${PYTHON:-python3}
# kernels/ is installed as reptile_fast.kernels (setup.py's package_dir).  In a source tree where
# the link reptile_fast/kernels -> ../kernels did not survive the copy, link it for this run.
# A copy that kept the link as a plain file (its target's text) or a dangling link would shadow
# the package: moved aside for this run and put back after.
LINK=""
ASIDE=""
if [ -d kernels ] && [ ! -d reptile_fast/kernels ]; then
  if [ -e reptile_fast/kernels ] || [ -L reptile_fast/kernels ]; then
    ASIDE="reptile_fast/kernels.gpu_check.$$" && mv reptile_fast/kernels "$ASIDE"
  fi
  ln -s ../kernels reptile_fast/kernels && LINK=reptile_fast/kernels
  echo "[gpu_check] linked reptile_fast/kernels -> ../kernels for this run"
fi
cleanup() {
  if [ -n "$LINK" ]; then rm -f "$LINK"; fi
  if [ -n "$ASIDE" ]; then mv "$ASIDE" reptile_fast/kernels; fi
}
trap cleanup EXIT
# --sweep anywhere among the arguments (--cpu-smoke --sweep OUT failed: only a first --sweep counted)
SWEEP=0
TESTS=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--sweep" ]; then SWEEP=1; elif [ "$a" = "--tests" ]; then TESTS=1; else ARGS+=("$a"); fi
done
if [ "$TESTS" = 1 ]; then
  # -m gpu: the CUDA cases (tests/conftest.py explains the split); a cold Triton cache compiles
  # every case's kernel first (session 16: > 290 s cold, 80 s warm on an H200)
  OUT_DIR=${ARGS[${#ARGS[@]}-1]:?"--tests needs OUT_DIR"}
  mkdir -p "$OUT_DIR"
  # pyproject's addopts pass --benchmark-disable, an option only pytest-benchmark knows: without
  # the plugin (a GPU image may lack it) pytest would stop at once with rc 4; the bench/ cases that
  # use its fixture then error alone
  NO_PLUGIN_OPTS=()
  if ! $PY -c "import pytest_benchmark" 2>/dev/null; then NO_PLUGIN_OPTS=(-o "addopts="); fi
  timeout -k 10 "${TESTS_BUDGET:-300}" $PY -m pytest -q -m gpu -p no:cacheprovider ${NO_PLUGIN_OPTS[@]+"${NO_PLUGIN_OPTS[@]}"} \
    -p bench.pytest_failures_now -rfE --durations=10 > "$OUT_DIR/pytest_gpu.log" 2>&1
  rc=$?
  echo "rc=$rc$([ $rc = 124 ] && echo " (killed after TESTS_BUDGET=${TESTS_BUDGET:-300} s)")" >> "$OUT_DIR/pytest_gpu.log"
  grep -E "^=== FAILED|passed|failed|skipped|^rc=" "$OUT_DIR/pytest_gpu.log" | tail -40
  exit $rc
elif [ "$SWEEP" = 1 ]; then
  $PY -m bench.gpu_sweep ${ARGS[@]+"${ARGS[@]}"}
else
  $PY -m bench.gpu_check ${ARGS[@]+"${ARGS[@]}"}
fi
