"""benchmarks/frontier.py end to end at a tiny size: rows, paired ratios, peak bytes ordered as the
formats predict, and the run log (--from-log rebuilds the same rows without training)."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import frontier  # noqa: E402
import pytest  # noqa: E402


def test_frontier_quick_rows_and_run_log(tmp_path):
    out = str(tmp_path / "frontier.json")
    args = ["--quick", "--steps", "6", "--seeds", "2", "--only", "stq4", "f4", "--json", out, "--no-progress"]
    assert frontier.main(args) == 0
    with open(out) as f:
        data = json.load(f)
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"adamw", "stq4", "f4"}
    log = tmp_path / "frontier.runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    final = {(r["key"], r["seed"]): r["final_val"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    assert len(seeds) == 2
    for key, r in rows.items():  # each row's ratios recomputed from the run log's raw losses, paired by seed
        want = [final[(key, sd)] / final[("adamw", sd)] for sd in seeds]
        assert r["seeds"] == seeds and r["ratios"] == pytest.approx(want, rel=1e-12), (key, r["ratios"], want)
        assert r["ratio_mean"] == pytest.approx(sum(want) / 2, rel=1e-12)
        assert r["val_loss_mean"] == pytest.approx(sum(final[(key, sd)] for sd in seeds) / 2, rel=1e-12)
    assert all(0.5 < x < 2.0 and x != 1.0 for k in ("stq4", "f4") for x in rows[k]["ratios"])  # different runs
    # fp32 AdamW 8 B/param; packed 4-bit both moments ~1.07; factored exp_avg_sq leaves exp_avg's ~0.53 + escapes
    assert rows["adamw"]["peak_state_bytes_per_param"] >= 8.0
    assert 1.0 < rows["stq4"]["peak_state_bytes_per_param"] < 1.2
    assert rows["f4"]["peak_state_bytes_per_param"] < 0.75 * rows["stq4"]["peak_state_bytes_per_param"]
    assert len(log.read_text().splitlines()) == 6  # 3 configurations x 2 seeds
    again = str(tmp_path / "again.json")
    os.replace(log, tmp_path / "again.runs.jsonl")
    assert frontier.main(["--quick", "--steps", "6", "--seeds", "2", "--only", "stq4", "f4", "--json", again,
                          "--from-log"]) == 0  # fmt: skip
    with open(again) as f:
        rebuilt = {r["key"]: r for r in json.load(f)["rows"]}
    for key, r in rows.items():
        assert rebuilt[key]["ratios"] == r["ratios"] and rebuilt[key]["peak_state_bytes_per_param"] == r["peak_state_bytes_per_param"]
