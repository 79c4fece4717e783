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
echo "[tests] smoke: quality benchmark --quick path (executes end to end; quality is not asserted)"
SMOKE="$(mktemp -d)"
python benchmarks/quality.py --quick --gpt-steps 10 --digits-steps 30 --no-progress --json "$SMOKE/quality.json"
python -c "import json,sys; [json.load(open(f'$SMOKE/quality_{t}.json'))['rows'][0]['state_bytes_per_param'] for t in ('gpt','digits')]"
echo "[tests] GPU compile check: every feature compiled ahead of time for sm_80 and sm_90 (no GPU needed)"
env -u TRITON_INTERPRET python benchmarks/gpu_compile.py --quick --arch 80,90 --json "$SMOKE/gpu_compile.json"
