#!/usr/bin/env bash
# One-command GPU check (bench/README.md):
#   bench/gpu_check.sh OUT_DIR              on a GPU machine: tests, sweep, targets (< 5 min)
#   bench/gpu_check.sh --cpu-smoke OUT_DIR  anywhere: the same path at tiny sizes on the CPU,
#                                           Triton kernels under TRITON_INTERPRET=1
# Needs no installs: torch, triton, matplotlib (JAX and pytest are used when present); runs from
# the source tree.  Everything lands in OUT_DIR; the summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX must not take the GPU's memory from torch
for a in "$@"; do
  if [ "$a" = "--cpu-smoke" ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; fi
done
PY=${PYTHON:-python3}
# kernels/ is installed as reptile_fast.kernels (setup.py's package_dir).  In a source tree that
# was never pip-installed that name does not resolve: link it for this run (removed on exit).
LINK=""
if [ -d kernels ] && [ ! -e reptile_fast/kernels ] && ! $PY -c "import reptile_fast.kernels" >/dev/null 2>&1; then
  ln -s ../kernels reptile_fast/kernels && LINK=reptile_fast/kernels
  echo "[gpu_check] reptile_fast.kernels not importable: linked reptile_fast/kernels -> ../kernels for this run"
fi
cleanup() { if [ -n "$LINK" ]; then rm -f "$LINK"; fi; }
trap cleanup EXIT
$PY -m bench.gpu_check "$@"
