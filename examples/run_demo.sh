#!/usr/bin/env bash
# The README's first command: set-up (creates .venv and installs everything on a fresh machine,
# ~2 min; nothing on later runs), then a short megatron-core GPT run on 2 gloo CPU ranks with stock
# fp32 AdamW and with STQuant (its default, STQuantConfig() = --stquant alone: scheduled at
# DEFAULT_AVG_BITS; and fixed 4 bits): a table of state bytes per parameter, memory saved and final
# losses; loss plot and bits heatmap PNGs in out/.
#
#   bash examples/run_demo.sh [megatron_demo.py options, e.g. --steps 100 --out out]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$SECONDS
echo "[demo] set-up: tests/setup_env.sh"
# shellcheck disable=SC1091
source tests/setup_env.sh
echo "[demo] set-up done in $((SECONDS - start)) s; training (progress bars below)"
python examples/megatron_demo.py "$@"
echo "[demo] total $((SECONDS - start)) s"
