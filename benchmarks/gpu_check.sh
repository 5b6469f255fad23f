#!/usr/bin/env bash
# Issue 11's GPU check, on the GPU machine (or with --cpu-smoke here): install the staged wheels
# (DALI for CUDA 13, Dask, dask-cuda; see ../shared/device/stage-wheels.sh) when they are there,
# then run benchmarks/gpu_check.py, which writes docs/results/gpu-<device>.json step by step.
#
#   bash benchmarks/gpu_check.sh [--cpu-smoke] [gpu_check.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .devtools/install-wheels.sh ] && [ -d /tmp/whl-stage ]; then
  bash .devtools/install-wheels.sh || exit 3
  export PYTHONPATH=/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
