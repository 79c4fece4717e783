"""The GPU benchmark's code path (``benchmarks/gpu_step.py``) on the CPU under the Triton interpreter,
and its refusal on a machine without CUDA. (The ahead-of-time compile check,
``benchmarks/gpu_compile.py --quick``, runs in ``tests/run_tests.sh``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --interpret-check
    return env


def test_gpu_step_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "gpu_step.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--interpret-check", "--json", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["timed"] is False and res["params"] > 0
    ours = [row for row in res["rows"] if row["optimizer"].startswith("STQuantAdamW")]
    assert [row["bits"] for row in ours] == ["8", "6", "5", "4", "3", "2", "4/4.5"]
    for row in ours:  # every configuration stepped and went through the bytes model
        assert row["step_ms_median"] > 0 and row["bytes_per_param_model"] < 28
    base = next(row for row in res["rows"] if row["optimizer"] == "torch.AdamW(fused)")
    # fp32 AdamW moves param r/w 8 + grad 4 + exp_avg r/w 8 + exp_avg_sq r/w 8 bytes per parameter
    assert base["bytes_per_param_model"] == 4 * (2 + 1 + 2 + 2)
    timed = [row for row in res["rows"] if "step_ms_median" in row]
    assert len(timed) >= len(ours) + 1
    for row in timed:  # the ratio recomputed from the row's and the baseline's own timings
        want = row["step_ms_median"] / base["step_ms_median"]
        assert abs(row["step_time_vs_adamw"] - want) <= 5e-4 + 1e-3 * want, (row, want)


def test_gpu_step_refuses_without_cuda():
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], env=_env(CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr and "torch.cuda.is_available() is False" in r.stderr
