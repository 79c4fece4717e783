#!/usr/bin/env bash
# The whole test suite, set-up included: megatron-core 0.16.1 (pip) and 0.19.2 (sources).
# bash tests/run_tests.sh --gpu [pytest args]: on a CUDA machine, the compiled kernels vs the twin (see below).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ "${1:-}" == "--gpu" ]]; then
  # On a CUDA machine: the compiled Triton kernels on the GPU against the PyTorch twin on the CPU, bit for
  # bit (tests/test_gpu_parity.py, full matrix). No set-up: the GPU image may have no network, so the
  # current python must already import torch (CUDA build), triton and pytest (benchmarks/gpu_day.sh
  # brings pytest as a wheel). The CPU suite is the plain `bash tests/run_tests.sh`.
  shift
  if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[tests] --gpu runs the compiled kernels on a CUDA GPU, but torch.cuda.is_available() is False here" \
         "(or torch does not import). On a CPU machine run: bash tests/run_tests.sh" >&2
    exit 2
  fi
  echo "[tests] GPU parity: compiled kernels on $(python -c 'import torch; print(torch.cuda.get_device_name())') vs the CPU twin"
  exec env -u TRITON_INTERPRET STQUANT_REQUIRE_COMPILED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    python -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py "$@"
fi
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
# The oldest Triton pyproject.toml declares (3.6: the GPU image's) compiles the same subset: installed once
# into a cached target folder, put first on PYTHONPATH (about 2 min of CI, most of it the compile check).
TRITON_OLDEST=3.6.0
OLD_TRITON="$ROOT/.cache/triton-$TRITON_OLDEST"
if [[ ! -f "$OLD_TRITON/.stquant-complete" ]]; then
  rm -rf "$OLD_TRITON"
  python -m pip install -q --no-deps --target "$OLD_TRITON" "triton==$TRITON_OLDEST"
  touch "$OLD_TRITON/.stquant-complete"
fi
got="$(PYTHONPATH="$OLD_TRITON" python -c 'import triton; print(triton.__version__)')"
[[ "$got" == "$TRITON_OLDEST" ]] || { echo "[tests] expected triton $TRITON_OLDEST from $OLD_TRITON, got $got" >&2; exit 1; }
echo "[tests] GPU compile check again under the oldest declared Triton ($got)"
env -u TRITON_INTERPRET PYTHONPATH="$OLD_TRITON:$ROOT" python benchmarks/gpu_compile.py --quick --arch 80,90 \
  --json "$SMOKE/gpu_compile_triton$TRITON_OLDEST.json"
