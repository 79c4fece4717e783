#!/usr/bin/env bash
# The whole test suite, set-up included: megatron-core 0.16.1 (pip) and 0.19.2 (sources).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tests/setup_env.sh
export TRITON_INTERPRET=1
echo "[tests] megatron-core $(python -c 'import megatron.core as m; print(m.__version__)') + core tests"
python -m pytest -q "$@"
echo "[tests] megatron-core 0.19.2 sources: Megatron tests again"
PYTHONPATH="$STQUANT_MCORE_019${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -m megatron "$@"
