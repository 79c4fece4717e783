#!/usr/bin/env bash
# The first day a GPU is lent, in one command (docs/gpu.md, "GPU day").
#
#   bash benchmarks/gpu_day.sh --fetch-wheels   # once, on a CPU machine with PyPI access: wheels + fixture
#                                               # into .gpu_day/ (ignored by git; travels with `carry`)
#   bash benchmarks/gpu_day.sh [--out DIR] [...] # on the GPU: (a) parity, (b) gpu_step, (c) Megatron GPT,
#                                               # (d) summary; results (JSON + logs) in one folder
#   bash benchmarks/gpu_day.sh --dry-run         # the same code paths on the CPU, tiny (what CI runs)
#
# The GPU image (Python 3.12, torch 2.11 / CUDA 13, triton 3.6) has no network and no megatron-core,
# torchao, bitsandbytes or Transformer Engine: the wheels of .gpu_day/wheels are installed into
# .gpu_day/site (`pip install --no-index --no-deps --target`, or unzipped when pip is absent) and put on
# PYTHONPATH. Results: --out DIR, else $OUT/gpu_day when $OUT is set (the device tool's folder that comes
# back), else .gpu_day/results. Re-runnable: the folder's files are overwritten.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DAY="$ROOT/.gpu_day"
WHEELS="$DAY/wheels"
SITE="$DAY/site"
SHARED="${STQUANT_SHARED:-$ROOT/../shared}"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS" "$DAY/megatron-lm"
  dl=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64
      --platform linux_x86_64 --platform any -d "$WHEELS")
  "${dl[@]}" "megatron-core==0.19.2" "torchao==0.18.*" "bitsandbytes==0.50.2" \
    "pytest>=8,<10" "pluggy>=1.5,<2" "iniconfig>=2" "packaging>=24.2" "pygments>=2.7.2"
  # Megatron-LM's training scripts (the fixture; ../shared does not travel with the working tree)
  cp -r "$SHARED/fixtures/megatron-lm-core_r0.19.0/." "$DAY/megatron-lm/"
  ls -la "$WHEELS"
  total=$(du -sm "$DAY" --exclude="$DAY/site" --exclude="$DAY/results" | cut -f1)
  echo "[gpu_day] .gpu_day holds ${total} MiB (the working tree and carried folders travel within 64 MiB)"
  exit 0
fi

OUT_DIR=""
ARGS=()
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -z "$OUT_DIR" ]]; then
  if [[ -n "${OUT:-}" && $DRY -eq 0 ]]; then OUT_DIR="$OUT/gpu_day"; else OUT_DIR="$DAY/results"; fi
fi

if [[ $DRY -eq 0 ]]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_day.sh needs a CUDA GPU, but torch.cuda.is_available() is False here (or torch does not import)." >&2
    echo "On a CPU machine: bash benchmarks/gpu_day.sh --dry-run (the same code paths, tiny), or" >&2
    echo "bash benchmarks/gpu_day.sh --fetch-wheels (prepares the wheels the GPU run installs)." >&2
    exit 2
  fi
  # install the carried wheels once (a stamp per wheel set); the image's own packages stay as they are
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    stamp="$SITE/.stamp-$(ls "$WHEELS" | cksum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" ]]; then
      rm -rf "$SITE" && mkdir -p "$SITE"
      if ! "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl; then
        echo "[gpu_day] pip install --target failed; unzipping the wheels into $SITE instead"
        "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" "$WHEELS"/*.whl
      fi
      touch "$stamp"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_day] no wheels in $WHEELS (run --fetch-wheels on a CPU machine and carry .gpu_day):" \
         "megatron-core / torchao / bitsandbytes / pytest only if the image has them"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
exec "$PY" benchmarks/gpu_day.py --out "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"}
