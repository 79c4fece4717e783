"""benchmarks/frontier.py end to end at a tiny size: rows, paired ratios, peak bytes ordered as the
formats predict, and the run log (--from-log rebuilds the same rows without training)."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import frontier  # noqa: E402


def test_frontier_quick_rows_and_run_log(tmp_path):
    out = str(tmp_path / "frontier.json")
    args = ["--quick", "--steps", "6", "--seeds", "2", "--only", "stq4", "f4", "--json", out, "--no-progress"]
    assert frontier.main(args) == 0
    with open(out) as f:
        data = json.load(f)
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"adamw", "stq4", "f4"}
    assert rows["adamw"]["ratios"] == [1.0, 1.0] and len(rows["f4"]["ratios"]) == 2
    # fp32 AdamW 8 B/param; packed 4-bit both moments ~1.07; factored exp_avg_sq leaves exp_avg's ~0.53 + escapes
    assert rows["adamw"]["peak_state_bytes_per_param"] >= 8.0
    assert 1.0 < rows["stq4"]["peak_state_bytes_per_param"] < 1.2
    assert rows["f4"]["peak_state_bytes_per_param"] < 0.75 * rows["stq4"]["peak_state_bytes_per_param"]
    log = tmp_path / "frontier.runs.jsonl"
    assert len(log.read_text().splitlines()) == 6  # 3 configurations x 2 seeds
    again = str(tmp_path / "again.json")
    os.replace(log, tmp_path / "again.runs.jsonl")
    assert frontier.main(["--quick", "--steps", "6", "--seeds", "2", "--only", "stq4", "f4", "--json", again,
                          "--from-log"]) == 0  # fmt: skip
    with open(again) as f:
        rebuilt = {r["key"]: r for r in json.load(f)["rows"]}
    for key, r in rows.items():
        assert rebuilt[key]["ratios"] == r["ratios"] and rebuilt[key]["peak_state_bytes_per_param"] == r["peak_state_bytes_per_param"]
