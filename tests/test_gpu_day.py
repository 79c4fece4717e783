"""``bash benchmarks/gpu_day.sh --dry-run``: the GPU day's stages (parity, gpu_step, Megatron GPT stock vs
patched, summary) on the CPU at a tiny size; and its refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_day.sh"

pytestmark = pytest.mark.megatron


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its stages
    return env


def test_gpu_day_dry_run(tmp_path):
    out = tmp_path / "day"
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], env=_env(), capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] is True and s["ok"] is True
    stages = {st["stage"]: st for st in s["stages"]}
    assert set(stages) == {"parity", "step", "gpt"}
    assert stages["parity"]["tests"] >= 5 and stages["parity"]["failures"] == 0 and stages["parity"]["errors"] == 0
    assert {row["bits"] for row in stages["step"]["rows"]} >= {"32", "8", "4", "2"}
    rows = {row["config"]: row for row in stages["gpt"]["rows"]}
    assert set(rows) == {"stock", "stq4", "stq8", "stq_default"}
    assert rows["stock"]["inner"] != ["STQuantAdamW"] and rows["stq4"]["inner"] == ["STQuantAdamW"]
    for row in rows.values():
        assert row["iters"] == 3 and row["step_ms_median"] > 0 and 3.0 < row["loss_last"] < 7.0
    # the optimizer's own accounting: 8-bit state is about twice 4-bit; none for the stock optimizer
    assert rows["stock"]["peak_state_bytes_own"] is None and rows["stq4"]["peak_state_bytes_own"] > 0
    assert 1.5 < rows["stq8"]["peak_state_bytes_own"] / rows["stq4"]["peak_state_bytes_own"] < 2.2
    assert rows["stq4"]["state_bytes_storages"] <= rows["stq4"]["peak_state_bytes_own"]
    assert "gpu_day summary" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("gpu_day: all stages passed")


def test_gpu_day_refuses_without_cuda(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], env=_env(CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr and "--dry-run" in r.stderr
    assert not any(tmp_path.iterdir())
