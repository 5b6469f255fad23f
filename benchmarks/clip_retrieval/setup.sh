#!/usr/bin/env bash
# clip-retrieval's own virtualenv for benchmarks/bench_clip_retrieval.py (idempotent).
#
#   bash benchmarks/clip_retrieval/setup.sh            # -> benchmarks/_data/clip-retrieval-venv (git-ignored)
#   NEMO_BENCH_CLIP_RETRIEVAL_VENV=/path bash benchmarks/clip_retrieval/setup.sh
#
# clip-retrieval pins old numpy (<2) and pyarrow (<16), so it cannot share the project's .venv.
# What is installed, in this order (about 6 GB, ~3 minutes):
#   1. torch==2.14.1 torchvision==0.29.1: the builds the project's .venv has;
#   2. clip-retrieval==2.45.0 (the latest release) with every dependency it declares, resolved by
#      pip under constraints.txt (torch/torchvision as above, timm==1.0.31 as in the project's
#      .venv, setuptools<81 for clip-anytorch's pkg_resources import), and timm itself (not a
#      clip-retrieval dependency: the runner builds the tiny CLIP-shaped model with it).
# The script does nothing when the venv already holds exactly these versions.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${NEMO_BENCH_CLIP_RETRIEVAL_VENV:-$ROOT/benchmarks/_data/clip-retrieval-venv}"
CLIP_RETRIEVAL_VERSION=2.45.0
TIMM_VERSION=1.0.31
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1

# the interpreter: the one the project's .venv was made from (Python 3.11), else python3.11 / python3
if [[ -n "${PYTHON:-}" ]]; then
  BASE_PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  BASE_PY="$("$ROOT/.venv/bin/python" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')"
else
  BASE_PY="$(command -v python3.11 || command -v python3)"
fi

STAMP="$VENV/.nemo-bench-setup"
WANT="clip-retrieval==$CLIP_RETRIEVAL_VERSION timm==$TIMM_VERSION torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION $(sha256sum "$HERE/constraints.txt" | cut -c1-16)"

check() {  # the venv has the wanted versions (and with --import: imports clip_inference)
  "$VENV/bin/python" -W ignore - "$@" <<PY 2>/dev/null
import importlib, sys
from importlib.metadata import version
if "--import" in sys.argv:
    importlib.import_module("clip_retrieval.clip_inference.main")  # ~7 CPU s: clip_retrieval imports a lot
    import timm, webdataset, all_clip  # noqa: F401
want = {"clip-retrieval": "$CLIP_RETRIEVAL_VERSION", "timm": "$TIMM_VERSION"}
got = {k: version(k) for k in want}
sys.exit(0 if got == want and version("torch").startswith("$TORCH_VERSION") else 1)
PY
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && check; then
  echo "clip-retrieval venv ready: $VENV"
  exit 0
fi

echo "making clip-retrieval's virtualenv in $VENV (with $BASE_PY)"
[[ -x "$VENV/bin/python" ]] || "$BASE_PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" -c "$HERE/constraints.txt" "clip-retrieval==$CLIP_RETRIEVAL_VERSION" "timm==$TIMM_VERSION" \
    "setuptools>=77.0.3,<81"
"$VENV/bin/python" -m pip check
if ! check --import; then
  echo "clip-retrieval venv $VENV: clip_retrieval.clip_inference does not import, or the versions differ" >&2
  exit 1
fi
echo "$WANT" > "$STAMP"
"$VENV/bin/python" -m pip freeze > "$VENV/pip-freeze.txt"
echo "clip-retrieval venv ready: $VENV (pip freeze in $VENV/pip-freeze.txt)"
