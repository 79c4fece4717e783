#!/usr/bin/env bash
# Create (once) the project virtualenv with everything the tests, examples and benchmarks need.
# Usage: source tests/setup_env.sh   (idempotent; exports STQUANT_MCORE_019 = path of the
# megatron-core 0.19.2 sources, which the tests also run against)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STQUANT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.stquant-setup-v1"
if [[ ! -f "$STAMP" ]]; then
  echo "[setup] creating $VENV (first run: a few minutes)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e "$ROOT[tests,benchmarks]"
  touch "$STAMP"
fi
# megatron-core 0.19.2 declares Python >= 3.12; its pure-Python sources run on 3.11 from PYTHONPATH.
STQUANT_MCORE_019="$("$VENV/bin/python" "$ROOT/tests/fetch_megatron_019.py" | tail -n 1)"
export STQUANT_MCORE_019
# shellcheck disable=SC1091
source "$VENV/bin/activate"
