#!/usr/bin/env python
"""Turn benchmark results into the README's result blocks (generated, not typed).

Quality (``benchmarks/quality.py --json``) goes between ``<!-- results:start -->`` and
``<!-- results:end -->``; the optimizer-step benchmark (``benchmarks/step.py --json
benchmarks/results/step.json``) between ``<!-- step:start -->`` and ``<!-- step:end -->``; the frontier
(``benchmarks/frontier.py --json benchmarks/results/frontier.json``) between ``<!-- frontier:start -->``
and ``<!-- frontier:end -->``.

    python benchmarks/results_table.py                                  # default result files -> README.md
    python benchmarks/results_table.py out/quality_gpt.json out/quality_digits.json --print

Reads each ``quality_<task>.json`` (rows) and, when present, its ``quality_<task>.meta.json`` (set-up,
hardware, versions, command, wall time), builds one markdown table per task plus the notes, and
replaces everything between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the README
(nothing outside the markers is touched). Without the markers (or with ``--print``) the block is
printed instead and the README is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import DEPS, freshness  # noqa: E402  (benchmarks/ is a script folder, not a package)

START, END = "<!-- results:start -->", "<!-- results:end -->"
DEFAULT_FILES = [os.path.join("benchmarks", "results", f"quality_{t}.json") for t in ("gpt", "digits")]
STEP_START, STEP_END = "<!-- step:start -->", "<!-- step:end -->"
STEP_FILE = os.path.join("benchmarks", "results", "step.json")
FRONTIER_START, FRONTIER_END = "<!-- frontier:start -->", "<!-- frontier:end -->"
FRONTIER_FILE = os.path.join("benchmarks", "results", "frontier.json")
MLM_START, MLM_END = "<!-- megatron_lm:start -->", "<!-- megatron_lm:end -->"
MLM_FILE = os.path.join("benchmarks", "results", "megatron_lm.json")
COST_START, COST_END = "<!-- scheduler_cost:start -->", "<!-- scheduler_cost:end -->"
COST_FILE = os.path.join("benchmarks", "results", "scheduler_cost.json")
COST_DOC = os.path.join("docs", "scheduler.md")
GPU_START, GPU_END = "<!-- gpu_compile:start -->", "<!-- gpu_compile:end -->"
GPU_FILE = os.path.join("benchmarks", "results", "gpu_compile.json")
GPU_BEFORE = os.path.join("benchmarks", "results", "gpu_compile_before_edges.json")
GPU_DOC = os.path.join("docs", "gpu.md")
ABLATION_START, ABLATION_END = "<!-- ablation:start -->", "<!-- ablation:end -->"
ABLATION_FILE = os.path.join("benchmarks", "results", "frontier_ablation.json")
SIGNAL_FILE = os.path.join("benchmarks", "results", "factoring_signal.json")
CKPT_START, CKPT_END = "<!-- checkpoint:start -->", "<!-- checkpoint:end -->"
CKPT_FILE = os.path.join("benchmarks", "results", "checkpoint_size.json")
FRONTIER_TARGETS = ((0.75, 1.004), (0.60, 1.01))  # (peak B/param at most, mean val-loss ratio at most)
TITLES = {
    "gpt": "Megatron-core GPT on Python standard-library sources (byte-level)",
    "digits": "Small ViT on scikit-learn handwritten digits (standalone optimizer)",
}
TARGET_RATIO, TARGET_ACC_POINTS = 1.01, 0.5
TASK_NOTES = {
    "digits": "The test loss is not the quality measure here: once the training loss is ~1e-3 it is dominated by a "
              "few confidently misclassified test images and differs by tens of percent between runs; compare accuracy "
              "(one test image = 100 / 450 = 0.22 points).",
}


def load(path: str) -> tuple[dict, dict]:
    with open(path) as f:
        data = json.load(f)
    meta_path = os.path.splitext(path)[0] + ".meta.json"
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    return data, meta


# ----------------------------------------------------------------------------------- provenance
def _deps_text(deps) -> str:
    return ", ".join(f"`{d}`" for d in deps)


def provenance_line(prov: dict | None, deps: tuple[str, ...], fallback_command: str | None = None) -> str:
    """Where a block's numbers come from and whether the code they depend on has changed since,
    judged from the code hashes the results file recorded (``benchmarks/provenance.py``)."""
    prov = prov or {}
    fresh, sets = freshness(prov.get("code"), deps)
    if prov.get("commit"):
        where = f"measured at commit `{prov['commit']}` on {prov.get('date', '?')}"
    elif prov.get("committed_in"):
        where = (f"committed in `{prov['committed_in']}` ({prov.get('committed_on', '?')}; the file does not record "
                 "the commit it was measured at)")  # fmt: skip
    else:
        where = "measured at a commit the results file does not record"
    cmd = prov.get("command") or fallback_command
    if fresh is True:
        state = f"the code it depends on ({_deps_text(deps)} in `benchmarks/provenance.py`) is unchanged since"
    elif fresh is False:
        state = (f"**stale**: the code it depends on has changed since ({_deps_text(sets)} in "
                 "`benchmarks/provenance.py`); re-measure before relying on these numbers")  # fmt: skip
    else:
        state = ("**not known to describe the current code**: the results file was written before code hashes "
                 "were recorded; re-measure before relying on these numbers")  # fmt: skip
    return (f"- Provenance: {where}" + (f" by `{cmd}`" if cmd else "") + f"; {state}.")


def _rel(path: str) -> str:
    """A results file's name as the docs give it (relative to the repository, wherever it was read)."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if "benchmarks" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("benchmarks"):])
    return os.path.relpath(path, ROOT)


def _run_fresh(run: dict, deps: str) -> bool | None:
    return freshness(run.get("code"), (deps,))[0]


def _fmt_acc(a) -> str:
    return "" if a is None else f"{100 * a:.2f} %"


def _fmt_peak(r: dict) -> str:
    """Peak state bytes/param; "n/a" for result files made before the peak was measured."""
    v = r.get("peak_state_bytes_per_param")
    return "n/a" if v is None else f"{v:.3f}"


def _fmt_ratio(r: dict) -> str:
    std = r.get("val_loss_vs_adamw_std")
    return f"{r['val_loss_vs_adamw']:.4f}" + ("" if std is None else f" ± {std:.4f}")


def task_table(data: dict) -> list[str]:
    rows = data["rows"]
    has_acc = any(r.get("accuracy") is not None for r in rows)
    loss_name = "final val loss" if data["task"] != "digits" else "final test loss"
    head = (["optimizer", "bits", "final state bytes / param", "peak state bytes / param", loss_name,
             "val loss vs fp32 AdamW"] + (["test accuracy"] if has_acc else []))  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        ours = r["optimizer"].startswith("STQuant")
        name = f"**{r['optimizer']}**" if ours else r["optimizer"]
        cells = [name, r["bits"], f"{r['state_bytes_per_param']:.3f}", _fmt_peak(r), f"{r['final_val_loss']:.4f}",
                 _fmt_ratio(r)]  # fmt: skip
        if has_acc:
            cells.append(_fmt_acc(r.get("accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def noise_gauge(data: dict) -> str:
    """The 8-bit rows store the moments almost exactly, so their distance from fp32 AdamW shows how far
    apart one run of each lands for reasons other than coarse quantization (a floor of the scatter)."""
    eight = [r for r in data["rows"] if r["bits"] == "8" and r["val_loss_vs_adamw"] == r["val_loss_vs_adamw"]]
    if not eight:
        return ""
    base = next((r for r in data["rows"] if r["optimizer"] == "fp32 AdamW"), None)
    if base is not None and base.get("accuracy") is not None and all(r.get("accuracy") is not None for r in eight):
        dacc = max(abs(r["accuracy"] - base["accuracy"]) for r in eight)
        return (f"Noise gauge: the 8-bit rows (moments stored almost exactly) land within {100 * dacc:.2f} points of "
                "fp32 AdamW's accuracy. That is a floor: coarser moments perturb each step more, so accuracy "
                "differences of a few test images between rows are not significant.")
    dev = max(abs(r["val_loss_vs_adamw"] - 1) for r in eight)
    below = [r for r in data["rows"] if r["bits"] != "8" and r["val_loss_vs_adamw"] < 1 - max(dev, 1e-4)]
    lower = ""
    if below:
        r = min(below, key=lambda r: r["val_loss_vs_adamw"])
        lower = (f"; rows below 1.0, such as {r['optimizer']} at {r['val_loss_vs_adamw']:.4f}, are this scatter, "
                 "not a better optimizer")
    return (f"Noise gauge: the 8-bit rows (moments stored almost exactly) land within {100 * dev:.2f} % of fp32 AdamW's "
            "loss. That is a floor: coarser moments perturb each step more and one run of each lands further from "
            f"fp32 AdamW, in either direction{lower}. Differences of a few tenths of a percent between the 4-bit "
            "rows are not significant.")


def scheduler_vs_fixed(results: dict[str, dict]) -> list[str]:
    """Each scheduled row against fixed 4-bit: peak bytes and quality, with a verdict that only calls
    a quality difference real when it exceeds the seed spread (or the noise gauge with one seed)."""
    out = []
    for task, data in results.items():
        rows = data["rows"]
        fixed = next((r for r in rows if r["optimizer"] == "STQuant 4-bit"), None)
        if fixed is None or fixed.get("peak_state_bytes_per_param") is None:
            continue
        eight = [abs(r["val_loss_vs_adamw"] - 1) for r in rows if r["bits"] == "8"]
        for r in rows:
            if not r["bits"].startswith("auto") or r.get("peak_state_bytes_per_param") is None:
                continue
            dpeak = r["peak_state_bytes_per_param"] / fixed["peak_state_bytes_per_param"] - 1
            if r.get("accuracy") is not None and fixed.get("accuracy") is not None:
                d = 100 * (r["accuracy"] - fixed["accuracy"])
                images = round(abs(d) / 100 * 450) if task == "digits" else None
                quality = (f"accuracy {d:+.2f} points" + (f" ({images} test images, one seed: not a significant "
                           "difference by itself)" if images is not None else ""))  # fmt: skip
            else:
                spread = max(r.get("val_loss_vs_adamw_std") or 0.0, fixed.get("val_loss_vs_adamw_std") or 0.0,
                             max(eight, default=0.0))  # fmt: skip
                d = r["val_loss_vs_adamw"] - fixed["val_loss_vs_adamw"]
                quality = (f"val-loss ratio {r['val_loss_vs_adamw']:.4f} against {fixed['val_loss_vs_adamw']:.4f} "
                           f"({'the same within' if abs(d) <= spread else ('better by more than' if d < 0 else 'worse by more than')} "
                           f"the spread {spread:.4f})")  # fmt: skip
            out.append(f"- {TITLES.get(task, task).split(' (')[0]}, {r['optimizer']}: peak "
                       f"{r['peak_state_bytes_per_param']:.3f} B/param, {abs(dpeak):.1%} "
                       f"{'below' if dpeak < 0 else 'above'} fixed 4-bit's {fixed['peak_state_bytes_per_param']:.3f}; "
                       f"{quality}.")  # fmt: skip
    if out:
        out.append("- On this CPU a unit being re-coded holds its old and new codes for a moment, which is most of "
                   "the scheduled rows' peak above their final bytes; on GPUs the old codes wait in host memory and "
                   "the device peak stays within the budget (`docs/scheduler.md`).")
    return out


def targets(results: dict[str, dict]) -> list[str]:
    """Issue-5 acceptance targets, checked on the numbers in the tables."""
    out = []
    gpt, digits = results.get("gpt"), results.get("digits")

    def row(data, prefix):
        return next((r for r in data["rows"] if r["optimizer"].startswith(prefix)), None) if data else None

    for name, data in (("GPT", gpt), ("digits", digits)):
        ours, ao4 = row(data, "STQuant adaptive 4.0"), row(data, "torchao AdamW4bit")
        if ours is None:
            continue
        checks = []
        if name == "GPT":
            ok = ours["val_loss_vs_adamw"] <= TARGET_RATIO
            checks.append(f"val loss vs fp32 AdamW {_fmt_ratio(ours)} (target <= {TARGET_RATIO}): "
                          f"{'met' if ok else '**missed**'}")  # fmt: skip
        else:
            base = row(data, "fp32 AdamW")
            if base and base.get("accuracy") is not None and ours.get("accuracy") is not None:
                diff = 100 * (ours["accuracy"] - base["accuracy"])
                ok = diff >= -TARGET_ACC_POINTS
                checks.append(f"accuracy {diff:+.2f} points vs fp32 AdamW (target within {TARGET_ACC_POINTS}): "
                              f"{'met' if ok else '**missed**'}")  # fmt: skip
        if ao4 is not None:
            a, b = ours.get("peak_state_bytes_per_param"), ao4.get("peak_state_bytes_per_param")
            if a is None or b is None:
                checks.append("peak state bytes/param vs torchao AdamW4bit: n/a (result file made before the peak "
                              "was measured)")  # fmt: skip
            else:
                checks.append(f"peak {a:.3f} vs torchao AdamW4bit peak {b:.3f} state bytes/param: "
                              f"{'fewer' if a < b else '**not fewer**'}")  # fmt: skip
        out.append(f"- {name}, STQuant adaptive 4.0: " + "; ".join(checks) + ".")
    return out


def block(paths: list[str]) -> str:
    results, metas = {}, {}
    for p in paths:
        data, meta = load(p)
        results[data["task"]] = data
        metas[data["task"]] = meta
    lines = [START,
             f"<!-- generated by benchmarks/results_table.py from {', '.join(_rel(p) for p in paths)}; "
             "do not edit by hand -->", ""]  # fmt: skip
    commands, hardware, versions = [], set(), {}
    for task, data in results.items():
        meta = metas[task]
        desc = meta.get("description") or ""
        seeds = meta.get("seeds")
        setup = meta.get("setup") or {}
        if not seeds and "seed" in setup and setup.get("seeds", 1) == 1:
            seeds = [setup["seed"]]  # result files made before several GPT seeds existed: one seed
        if seeds and "seed" not in desc:
            desc += (f"; seeds {seeds}" if len(seeds) > 1 else f"; seed {seeds[0]}")
        lines.append(f"**{TITLES.get(task, task)}**" + (f": {desc.lstrip('; ')}." if desc else ""))
        lines.append("")
        lines += task_table(data)
        lines.append("")
        for n in meta.get("notes", []):
            lines.append(f"- {n}")
        if task in TASK_NOTES:
            lines.append(f"- {TASK_NOTES[task]}")
        gauge = noise_gauge(data)
        if gauge:
            lines.append(f"- {gauge}")
        if meta.get("wall_seconds") is not None:
            lines.append(f"- Wall time of this task: {meta['wall_seconds'] / 60:.1f} min"
                         + (" (`--quick` run)" if meta.get("quick") else "") + ".")  # fmt: skip
        lines.append(provenance_line(meta.get("provenance"), ("quality",), meta.get("command")))
        lines.append("")
        if meta.get("command"):
            commands.append(meta["command"])
        if meta.get("hardware"):
            hardware.add(meta["hardware"])
        versions.update(meta.get("versions") or {})
    for title, items in (("What the scheduler buys against fixed 4-bit widths", scheduler_vs_fixed(results)),
                         ("Targets (issue 5)", targets(results))):  # fmt: skip
        if items:
            lines += [f"{title}, read off the tables above:", "", *items, ""]
    lines.append("How these numbers were made:")
    lines.append("")
    if commands:
        uniq = list(dict.fromkeys(commands))
        lines.append("- Reproduce: " + " and ".join(f"`{c}`" for c in uniq) + ", then `python benchmarks/results_table.py`.")
    if hardware:
        lines.append("- Hardware: " + "; ".join(sorted(hardware)) + " (shared with other jobs: timings are noisy).")
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".")
    lines.append("- State bytes / param: optimizer-state storage actually allocated (codes, scales, qmaps/absmax, fp32 "
                 "moments of small tensors, step counters; each storage once), over all ranks, divided by the "
                 "parameter count. fp32 AdamW is 8 bytes + step counters. *Final*: at the end of training; *peak*: "
                 "the high-water mark over the run (STQuant: `peak_state_bytes()`, precision transitions included; "
                 "the peers allocate their state once at the first step and are sampled after it, at every eval and "
                 "at the end); n/a: result file made before the peak was measured.")
    many = {t: len(m.get("seeds") or []) for t, m in metas.items() if len(m.get("seeds") or []) > 1}
    if many:
        lines.append("- Same seeds, data order, step count, learning-rate schedule, weight decay and gradient clipping "
                     "for every optimizer; " + ", ".join(f"{t}: {n} runs (seeds) each" for t, n in many.items())
                     + ", otherwise one training run each (see the noise gauges); ± is the standard deviation over "
                     "seeds of the per-seed ratio to fp32 AdamW.")  # fmt: skip
    else:
        lines.append("- Same seed, data order, step count, learning-rate schedule, weight decay and gradient clipping "
                     "for every optimizer; one training run each (see the noise gauges).")
    lines.append("- Not measured here: GPU step time. There is no GPU on this machine; the GPU speed of the fused step "
                 "comes from the bytes-moved model only (`benchmarks/step.py`), and CPU step times are not representative.")
    lines.append(END)
    return "\n".join(lines)


def step_block(path: str) -> str:
    """The step benchmark's table: state bytes, step time against fused AdamW in the same run."""
    with open(path) as f:
        data = json.load(f)
    meta = data.get("meta", {})
    lines = [STEP_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}; "
             "do not edit by hand -->", "",
             "| optimizer | bits | state B/param | step ms (median) | vs fused AdamW | first step ms | GPU B/param (model) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in data["rows"]:
        ours = r["optimizer"].startswith("STQuant")
        name = f"**{r['optimizer']}**" if ours else r["optimizer"]
        graphs = r.get("first_step_graphs_compiled")
        first = f"{r['first_step_ms']:.0f}" + (f" ({graphs} graphs compiled)" if graphs else "")
        lines.append(f"| {name} | {r['bits']} | {r['state_bytes_per_param']:.3f} | {r['step_ms_median']:.0f} | "
                     f"{r['step_time_vs_adamw']:.1f}x | {first} | {r['gpu_bytes_per_param_model']:.1f} |")
    lines.append("")
    shapes = meta.get("shapes", {})
    lines.append(f"- Command: `{meta.get('command', 'python benchmarks/step.py --json ' + STEP_FILE)}`; "
                 f"{data['params']:,} parameters in {shapes.get('tensors', '?')} tensors of GPT-like shapes "
                 f"(hidden {shapes.get('hidden', '?')}, {shapes.get('layers', '?')} layers); "
                 f"{meta.get('threads', '?')} torch thread(s); median of {meta.get('steps', '?')} timed steps after "
                 f"{meta.get('warmup', '?')} warm-up steps; wall time {meta.get('wall_seconds', 0) / 60:.1f} min.")
    if "load_average_start" in meta:
        lines.append(f"- Machine: {meta.get('hardware', '?')}; 1-minute load average {meta['load_average_start'][0]:.1f} "
                     f"at the start and {meta['load_average_end'][0]:.1f} at the end (the ratios are measured in one "
                     "run, so load from other processes hits every row alike).")
    lines.append("- STQuantAdamW rows: the default config (`compile=None`: on the CPU, units of at least 2**18 "
                 "elements run through `torch.compile`, one compile per width combination, in the first step); "
                 "*eager*: `compile=False`; *+compile*: `compile=True` (every unit); *+sr*: stochastic rounding.")
    counted = any("first_step_graphs_compiled" in r for r in data["rows"])
    lines.append("- Ratios are to `torch.optim.AdamW(fused=True)` in the same run; first step = state allocation"
                 + (", plus `torch.compile` where the row built graphs (how many, from dynamo's own counter, in "
                    "brackets; a row without brackets reused the graphs an earlier row of the same process built: "
                    "*+compile* runs first of ours, so it pays for the 4-bit graphs)" if counted else
                    " (whether a row's first step includes a compile is not recorded in this file)")
                 + ". GPU column: the bytes-moved model of a memory-bound step, not a timing.")  # fmt: skip
    lines.append(provenance_line(meta.get("provenance"), ("step",), meta.get("command")))
    lines.append(STEP_END)
    return "\n".join(lines)


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value), as benchmarks/frontier.py reports."""
    m = sum(xs) / len(xs)
    return m, ((sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None)


def _lr_sweep(log: str, setup: dict) -> dict:
    """{peak lr: {seed: final val loss}} of the fp32 AdamW runs in the frontier run log whose set-up
    equals ``setup`` apart from the learning rate and the seed list (the last run of a seed wins)."""
    if not os.path.exists(log):
        return {}
    same = {k: v for k, v in setup.items() if k not in ("lr", "seeds")}
    by: dict = {}
    with open(log) as f:
        for line in f:
            r = json.loads(line)
            st = r.get("setup") or {}
            if r.get("family") != "torch" or {k: v for k, v in st.items() if k not in ("lr", "seeds")} != same:
                continue
            by.setdefault(round(r.get("lr", st.get("lr")), 10), {})[r["seed"]] = r["final_val"]
    return by


def _vs_best_adamw(sweep: dict, setup: dict, rows: list[dict], runs: list[dict]) -> list[str]:
    """Our rows against fp32 AdamW at the sweep's best learning rate (paired by seed, the seeds both have)."""
    means = {lr: sum(v.values()) / len(v) for lr, v in sweep.items()}
    best = min(means, key=means.get)
    if best == round(setup["lr"], 10):
        return []
    out = []
    for r in rows:
        if r["family"] != "stq":
            continue
        mine = {x["seed"]: x["final_val"] for x in runs if x["key"] == r["key"] and x["seed"] in r["seeds"]}
        common = sorted(set(mine) & set(sweep[best]))
        if len(common) < 2:
            continue
        ratios = [mine[k] / sweep[best][k] for k in common]
        m, sd = _mean_std(ratios)
        mark = "" if _row_fresh(r, runs) else " †"
        out.append(f"{r['label']}{mark} {m:.4f} ± {sd:.4f} (seeds {','.join(map(str, common))})")
    if not out:
        return []
    return [f"- Against fp32 AdamW at the best learning rate of that sweep ({best:g}, paired by seed; ours ran at "
            f"the set-up's {setup['lr']:g}): " + "; ".join(out) + "."]


def _row_fresh(r: dict, runs: list[dict]) -> bool | None:
    """Whether every run behind a frontier row measured the current code (None: a run without a hash)."""
    dep = "frontier" if r["family"] == "stq" else "frontier-peers"
    states = [_run_fresh(x, dep) for x in runs if x["key"] == r["key"] and x["seed"] in r["seeds"]]
    return True if states and all(v is True for v in states) else (False if False in states else None)


def frontier_table(rows: list[dict], runs: list[dict]) -> list[str]:
    lines = ["| configuration | seeds | peak B/param | final B/param | val loss (mean) | val loss / fp32 AdamW | per seed |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: -r["peak_state_bytes_per_param"]):
        ours = r["family"] == "stq"
        std = f" ± {r['ratio_std']:.4f}" if r.get("ratio_std") is not None else ""
        name = (f"**{r['label']}**" if ours else r["label"]) + ("" if _row_fresh(r, runs) else " †")
        seeds = ",".join(str(x) for x in r["seeds"])
        lines.append(f"| {name} | {seeds} | {r['peak_state_bytes_per_param']:.3f} | {r['state_bytes_per_param']:.3f} | "
                     f"{r['val_loss_mean']:.4f} | {r['ratio_mean']:.4f}{std} | "
                     f"{', '.join(f'{x:.4f}' for x in r['ratios'])} |")
    return lines


def _stale_note(rows: list[dict], runs: list[dict]) -> str:
    stale = [r for r in rows if not _row_fresh(r, runs)]
    if not stale:
        return ("- Every row was measured on the current code (the runs' code hashes, `frontier` and "
                "`frontier-peers` in `benchmarks/provenance.py`, equal today's).")
    commits = sorted({x.get("commit") or "?" for r in stale for x in runs if x["key"] == r["key"] and x["seed"] in r["seeds"]})
    return (f"- † {len(stale)} of {len(rows)} rows were measured on other code than today's (commits "
            f"{', '.join(commits)}: a run's code hash, `frontier` or `frontier-peers` in `benchmarks/provenance.py`, "
            "differs from today's, or the run predates code hashes): they describe that code and are stale until "
            "re-measured (`benchmarks/frontier.py --resume --fresh-only` re-runs them). Rows without † were "
            "measured on the current code.")


def confirmation_rows(log: str, setup: dict, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows (as ``frontier.summarize`` makes them) of the run log's runs whose seeds are not the
    table's, same set-up otherwise; the last run of a (key, seed, configuration) wins, as in
    ``frontier.load_runs``. Labels from the table's rows (configurations not in it are skipped)."""
    if not os.path.exists(log):
        return [], []
    same = {k: v for k, v in setup.items() if k != "seeds"}
    labels = {r["key"]: (r["label"], r["family"], r["config"]) for r in rows}
    by: dict = {}
    with open(log) as f:
        for line in f:
            r = json.loads(line)
            if ({k: v for k, v in (r.get("setup") or {}).items() if k != "seeds"} == same
                    and r["seed"] not in setup["seeds"] and r["key"] in labels
                    and r["config"] == labels[r["key"]][2]):
                by[(r["key"], r["seed"])] = r
    runs = list(by.values())
    out = []
    for key, (label, family, config) in labels.items():
        mine = sorted((x for x in runs if x["key"] == key), key=lambda x: x["seed"])
        ref = {x["seed"]: x["final_val"] for x in runs if x["key"] == "adamw"}
        mine = [x for x in mine if x["seed"] in ref]
        if not mine:
            continue
        ratios = [x["final_val"] / ref[x["seed"]] for x in mine]
        mean, std = _mean_std(ratios)
        n = mine[0]["nparams"]
        out.append(dict(key=key, label=label, family=family, config=config, seeds=[x["seed"] for x in mine],
                        peak_state_bytes_per_param=max(x["peak_state_bytes"] for x in mine) / n,
                        state_bytes_per_param=sum(x["state_bytes"] for x in mine) / len(mine) / n,
                        val_loss_mean=sum(x["final_val"] for x in mine) / len(mine), ratio_mean=mean, ratio_std=std,
                        ratios=ratios))  # fmt: skip
    return (out if any(r["key"] != "adamw" for r in out) else []), runs


def frontier_block(path: str) -> str:
    """The frontier table (benchmarks/frontier.py): peak and final state bytes against the paired loss ratio."""
    with open(path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    s = meta["setup"]
    runs = meta.get("results", [])
    lines = [FRONTIER_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}; "
             "do not edit by hand -->", ""] + frontier_table(rows, runs)  # fmt: skip
    results = runs
    train_min = sum(x.get("train_seconds", 0.0) for x in results) / 60
    reused = sum(1 for x in results if x.get("reused"))
    lines += ["", f"![frontier](docs/frontier.png)", "",
              f"- {meta['title']}: {meta['nparams']:,} parameters ({s['layers']} layers, width {s['width']}, "
              f"{s['heads']} heads), sequence {s['seq']}, batch {s['batch']}, lr {s['lr']} (warm-up + cosine), "
              f"betas {tuple(meta['betas'])}, weight decay {meta['weight_decay']}, clip {meta['clip']}; validation on "
              f"{s['val_windows']} fixed windows of held-out files. Ratios are paired: each seed's final validation "
              "loss over fp32 AdamW's with the same seed (same initial weights and batches); ± = standard deviation "
              "over seeds. Peak: max over seeds; final: mean.",
              f"- Command: `{meta['command']}`; {len(results)} runs, {train_min:.0f} min of training in all"
              + (f" ({reused} runs reused from `{_rel(os.path.splitext(path)[0])}.runs.jsonl`, "
                 "which records each run's commit and finish time)" if reused else "")
              + f"; {meta.get('hardware', '?')}.",
              "- Peak bytes of STQuant rows include the CPU transition slack (a unit being re-coded briefly holds old "
              "and new codes); on accelerators the old codes are staged in host memory."]  # fmt: skip
    sweep = _lr_sweep(os.path.splitext(path)[0] + ".runs.jsonl", s)
    if sweep:
        means = {lr: (sum(v.values()) / len(v), sorted(v)) for lr, v in sweep.items()}
        best = min(means, key=lambda lr: means[lr][0])
        lines.append("- fp32 AdamW's final validation loss by peak learning rate (every fp32 AdamW run in the run log with "
                     "this model and step count, mean over the seeds listed): "
                     + ", ".join(f"{lr:g}: {m:.4f} (seeds {','.join(map(str, sd))})" for lr, (m, sd) in sorted(means.items()))
                     + (f"; the set-up's {s['lr']:g} is the best of these." if best == round(s["lr"], 10)
                        else f"; the best of these is {best:g}, not the set-up's {s['lr']:g}."))  # fmt: skip
        lines += _vs_best_adamw(sweep, s, rows, runs)
    others = [r for r in rows if r["key"] not in ("adamw",) and not r["key"].startswith("adamw-lr")]
    below = [r for r in others if r["ratio_mean"] < 1.0]
    if len(below) > len(others) // 2:
        lines.append(f"- {len(below)} of {len(others)} configurations (peers included) end below fp32 AdamW's loss: "
                     "the fp32 reference is not tuned at this learning rate (quantized second moments damp small "
                     "updates, like a lower rate), so read a ratio <= 1 as *no worse than fp32 AdamW here*.")
    full = max(len(r["seeds"]) for r in rows)
    short = [r["label"] for r in rows if len(r["seeds"]) < full]
    if short:
        lines.append(f"- Not every configuration has all {full} seeds yet: {', '.join(short)} (the run log "
                     "continues with `--resume`); their means are over the seeds shown.")
    for peak, ratio in FRONTIER_TARGETS:
        ok = [r for r in rows if r["family"] == "stq" and r["peak_state_bytes_per_param"] <= peak
              and r["ratio_mean"] <= ratio and len(r["seeds"]) == full]
        best = min(ok, key=lambda r: r["peak_state_bytes_per_param"]) if ok else None
        lines.append(f"- Target peak <= {peak} B/param at ratio <= {ratio}: "
                     + (f"**met** by {best['label']} ({best['peak_state_bytes_per_param']:.3f} B/param, "
                        f"{best['ratio_mean']:.4f}, mean of {full} seeds)" if best
                        else f"**not met** by any configuration with {full} seeds in this table"))
    lines.append(_stale_note(rows, runs))
    crows, cruns = confirmation_rows(os.path.splitext(path)[0] + ".runs.jsonl", s, rows)
    if crows:  # the default was chosen on the table's seeds; confirmed on others that played no part
        cseeds = sorted({x for r in crows for x in r["seeds"]})
        lines += ["", f"Confirmation on seeds {', '.join(map(str, cseeds))}, which played no part in choosing the "
                  f"default (chosen on seeds {', '.join(map(str, s['seeds']))} above); the runs of the same run log "
                  "with those seeds (`--seed-list`), paired with fp32 AdamW of the same seed:", ""]
        lines += frontier_table(crows, cruns) + ["", _stale_note(crows, cruns)]
    gpt = os.path.join(os.path.dirname(path), "frontier_gpt.json")
    if os.path.exists(gpt):
        gdata, gmeta = load(gpt)
        lines += ["", "The same configurations on the quality benchmark's Megatron GPT task (megatron-core "
                  "`DistributedOptimizer`, 2 gloo ranks, data-parallel shards; "
                  f"`{gmeta.get('command', 'python benchmarks/quality.py --task gpt ...')}`, "
                  f"{gmeta.get('description', '')}):", ""] + task_table(gdata)  # fmt: skip
        lines += ["", provenance_line(gmeta.get("provenance"), ("quality",), gmeta.get("command"))]
    digits = os.path.join(os.path.dirname(path), "frontier_digits.json")
    if os.path.exists(digits):
        ddata, dmeta = load(digits)
        lines += ["", "The same configurations on the digits ViT (standalone; "
                  f"`{dmeta.get('command', 'python benchmarks/quality.py --task digits ...')}`, "
                  f"{dmeta.get('description', '')}):", ""] + task_table(ddata)  # fmt: skip
        lines += ["", "- On digits compare accuracy: the test loss swings by tens of percent between runs (Results section).",
                  provenance_line(dmeta.get("provenance"), ("quality",), dmeta.get("command"))]  # fmt: skip
    lines.append(FRONTIER_END)
    return "\n".join(lines)


def _spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation (no ties expected; None below 3 points)."""
    if len(a) < 3:
        return None
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=lambda i: xs[i]))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def _class_sizes(setup: dict) -> dict[str, int]:
    """Elements per matrix class of the frontier model at ``setup`` (benchmarks/frontier.py's ByteGPT)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from factoring_signal import matrix_class
    from frontier import ByteGPT, Setup

    model = ByteGPT(Setup(**{k: v for k, v in setup.items() if k in Setup.__dataclass_fields__ and k != "seeds"}))
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        cls = matrix_class(f"{name}.exp_avg_sq") if p.ndim == 2 else None
        if cls is not None:
            out[cls] = out.get(cls, 0) + p.numel()
    return out


def ablation_block(path: str) -> str:
    """Where factoring costs: 4-bit exp_avg with every matrix's exp_avg_sq factored (f4) against the same
    with one class of matrices kept packed (f4-keep-<class>), paired by seed; beside it the probe's
    measured factoring error per class (benchmarks/factoring_signal.py), when that file exists."""
    with open(path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    runs = meta.get("results", [])
    by = {(x["key"], x["seed"]): x for x in runs}
    base = next((r for r in rows if r["key"] == "f4"), None)
    signal = {}
    sig_path = os.path.join(os.path.dirname(path), os.path.basename(SIGNAL_FILE))
    sig_meta = None
    if os.path.exists(sig_path):
        with open(sig_path) as f:
            sig = json.load(f)
        signal, sig_meta = sig["summary"], sig["meta"]
    lines = [ABLATION_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}"
             + (f" and {_rel(sig_path)}" if signal else "") + "; do not edit by hand -->", "",
             "| exp_avg_sq kept packed (4 bits) | seeds | peak B/param | val loss / fp32 AdamW | recovered vs all "
             "factored (paired) | probe's factoring error E_F |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    points = []
    for r in sorted(rows, key=lambda r: r["ratio_mean"]):
        if r["family"] != "stq":
            continue
        cls = r["key"].removeprefix("f4-keep-") if r["key"].startswith("f4-keep-") else None
        rec = ""
        if base is not None and cls is not None:
            diffs = [by[("f4", sd)]["final_val"] / by[("adamw", sd)]["final_val"] - ratio
                     for sd, ratio in zip(r["seeds"], r["ratios"]) if ("f4", sd) in by and ("adamw", sd) in by]
            if diffs:
                m, sd_ = _mean_std(diffs)
                rec = f"{m:+.4f}" + (f" ± {sd_:.4f}" if sd_ is not None else "")
                if cls in signal:
                    points.append((m, signal[cls]["mean_factored_error"], cls))
        label = f"{cls}" if cls else ("none (all factored)" if r["key"] == "f4" else r["label"])
        e_f = f"{signal[cls]['mean_factored_error']:.4f}" if cls in signal else ""
        std = f" ± {r['ratio_std']:.4f}" if r.get("ratio_std") is not None else ""
        lines.append(f"| {label}{'' if _row_fresh(r, runs) else ' †'} | {','.join(map(str, r['seeds']))} | "
                     f"{r['peak_state_bytes_per_param']:.3f} | {r['ratio_mean']:.4f}{std} | {rec} | {e_f} |")
    full = max(len(r["seeds"]) for r in rows)
    for peak, ratio in FRONTIER_TARGETS[:1]:
        ok = [r for r in rows if r["family"] == "stq" and r["peak_state_bytes_per_param"] <= peak
              and r["ratio_mean"] <= ratio and max(r["ratios"]) <= 2 * ratio - 1 and len(r["seeds"]) == full]
        lines += ["", f"- Target peak <= {peak} B/param at mean ratio <= {ratio}, every seed <= {2 * ratio - 1:g}: "
                  + ("**met** by " + "; ".join(f"{r['label']} ({r['peak_state_bytes_per_param']:.3f} B/param, "
                                                f"{r['ratio_mean']:.4f}, worst seed {max(r['ratios']):.4f})" for r in ok)
                     if ok else f"**not met** by any row with {full} seeds")]  # fmt: skip
    lines += [f"- Command: `{meta['command']}`; {meta.get('hardware', '?')}. Same model, data and set-up as the "
              "frontier table; fp32 AdamW is the same runs. \"recovered\": per seed, f4's ratio minus the row's "
              "(positive: keeping that class packed recovers loss), mean ± standard deviation over seeds.",
              _stale_note(rows, runs)]  # fmt: skip
    if signal:
        s_ = sig_meta["setup"]
        lines.append(f"- E_F: `{sig_meta['provenance']['command']}` (seeds {s_['seeds']}): the scheduler's probe, "
                     "at every decision of a run with every unit at 8 bits, measures the relative update error that "
                     "factoring each matrix's exp_avg_sq would cause now; mean over the class's matrices and the "
                     "decisions. " + provenance_line(sig_meta.get("provenance"), ("factoring_signal",)).removeprefix("- "))
        rho = _spearman([p[0] for p in points], [p[1] for p in points])
        if rho is not None:
            order_a = " > ".join(p[2] for p in sorted(points, key=lambda p: -p[0]))
            order_s = " > ".join(p[2] for p in sorted(points, key=lambda p: -p[1]))
            lines.append(f"- Ranking: the ablation orders the classes by loss recovered {order_a}; the probe's E_F "
                         f"orders them {order_s}; Spearman rank correlation {rho:+.2f} over {len(points)} classes.")
            sizes = _class_sizes(s_)
            if sizes:  # what the allocation weighs: elements x E_F, summed over the class
                weighted = [(p[0], sizes[p[2]] * p[1], p[2]) for p in points if p[2] in sizes]
                rho_w = _spearman([p[0] for p in weighted], [p[1] for p in weighted])
                order_w = " > ".join(p[2] for p in sorted(weighted, key=lambda p: -p[1]))
                lines.append(f"- Weighted as the allocation weighs it (the class's elements x E_F): {order_w}; "
                             f"Spearman against the ablation {rho_w:+.2f}.")
    lines.append(ABLATION_END)
    return "\n".join(lines)


def megatron_lm_block(path: str) -> str:
    """Megatron-LM's own pretrain_*.py runs, as tests/test_megatron_lm.py recorded them after its checks passed."""
    with open(path) as f:
        data = json.load(f)
    lines = [MLM_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}; "
             "do not edit by hand -->", "",
             "| run | route | B/param | loss it 1 → last | checked (and passed) |", "|---|---|---:|---|---|"]  # fmt: skip
    for r in data["rows"]:
        bpp = "" if r.get("bytes_per_param") is None else f"{r['bytes_per_param']:.3f}"
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else ""
        lines.append(f"| {r['run']} | {r['route']} | {bpp} | {loss} | {r.get('checked', '')} |")
    prov = data.get("provenance") or {}
    lines += ["", f"- {len(data['rows'])} rows from {data.get('tests', '?')} passing tests "
              f"({data.get('wall_seconds', 0) / 60:.1f} min); each row is written by its test after the test's "
              "assertions passed (`STQUANT_RECORD_MEGATRON_LM=<file>`), so *checked* is what was asserted.",
              f"- Machine: {prov.get('hardware', '?')}; "
              + ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v) + ".",
              provenance_line(prov, ("megatron_lm",)), MLM_END]  # fmt: skip
    return "\n".join(lines)


def checkpoint_block(path: str) -> str:
    """Checkpoint bytes, save/load time and host memory through pretrain_gpt.py (benchmarks/checkpoint_size.py)."""
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    stocks = {r.get("ckpt_format", "torch_dist"): r for r in rows if r["key"].startswith("stock")}
    for r in rows:  # a format without a stock row: its dense row (stock's file format) is the reference
        if "dense" in r["key"]:
            stocks.setdefault(r.get("ckpt_format", "torch_dist"), r)
    n = rows[0]["nparams"]
    lines = [CKPT_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}; do not edit by hand -->", "",
             "| configuration | state in memory (B/param) | moments on disk (B/param) | on disk / in memory | "
             "checkpoint (MB, B/param) | vs stock | save (s) | load (s) | host memory during save (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        d = r["disk"]
        moments = d["moments"] + d.get("layout", 0)
        stock = stocks.get(r.get("ckpt_format", "torch_dist"))
        vs = f"{d['files'] / stock['disk']['files']:.2f}x" if stock else ""
        lines.append(f"| {r['label']} | {r['state_bytes'] / r['nparams']:.3f} | {moments / r['nparams']:.3f} | "
                     f"{moments / r['state_bytes']:.3f} | {d['files'] / 1e6:.1f} ({d['files'] / r['nparams']:.2f}) | {vs} | "
                     f"{r['save_seconds']:.2f} | {r['load_seconds']:.2f} | {r['save_rss_extra'] / 1e6:.0f} |")  # fmt: skip
    prov = data.get("provenance") or {}
    lines += ["", f"- Megatron-LM `pretrain_gpt.py` (fixture), GPT {data['layers']} layers x hidden {data['hidden']}, "
              f"{n:,} parameters, bf16, 2 CPU gloo ranks (DP=2), `--ckpt-format torch_dist` (dp_reshardable; rows "
              "saying *fully_reshardable*: `--dist-ckpt-optim-fully-reshardable`, model-space tensors; rows saying "
              "*legacy torch*: `--ckpt-format torch`, Megatron's dp_zero `distrib_optim.pt` gathered to data-parallel "
              "rank 0); saved after iteration 2 of 3, loaded by a second job that trains iteration 3 with the saving job's "
              "loss exactly (asserted). *State in memory*: every rank's optimizer state (the step counters included), "
              "summed; *moments on disk*: the moments' bytes in the checkpoint's storage metadata (packed: codes, "
              "scales, statistics, fp32 escapes and the layout; legacy: the moments' tensors in `distrib_optim.pt`); "
              "*checkpoint*: all files; *vs stock*: against stock Megatron in the same checkpoint format (legacy: "
              "against our dense legacy file, which has stock's form; stock Megatron's legacy loader cannot run on "
              "this CPU: it asks the file for torch AdamW's per-parameter `step` tensors, which no legacy file "
              "holds; fully_reshardable likewise: against our dense file). Save / load: the slower "
              "rank's wall time of Megatron-LM's `save_checkpoint` / `load_checkpoint`; host memory: the larger "
              "rank's peak resident memory during the save above its level just before (sampled every 2 ms).",
              f"- Machine: {prov.get('hardware', '?')}; times on 2 shared cores are noisy (compare rows of one run).",
              provenance_line(prov, ("checkpoint",)), CKPT_END]  # fmt: skip
    return "\n".join(lines)


def scheduler_cost_block(path: str) -> str:
    """docs/scheduler.md's cost table (benchmarks/scheduler_cost.py --json)."""
    with open(path) as f:
        d = json.load(f)
    w, c, cfg = d["measured"]["wall"], d["measured"].get("cpu"), d["config"]

    def pct(x):
        return f"{100 * x:.2f} %"

    def cell(key, rel=False):
        out = f"{w[key]:.1f} ms"
        if rel:
            out += f" ({(w[key] - w['plain_ms']) / w['plain_ms']:+.0%})"
        return out + (f" / {c[key]:.1f} ms" if c else "")

    moved_first = ", ".join(map(str, d["first_moved"]))
    moved_later = ", ".join(map(str, d["later_moved"]))
    ok = lambda x: "met" if x < d["target"] else "**missed**"  # noqa: E731
    lines = [COST_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}; "
             "do not edit by hand -->", "",
             f"{d['params']:,} parameters in {d['shapes']['tensors']} tensors, {d['units']} scheduled units; "
             f"avg_bits {cfg['avg_bits']}, interval {cfg['interval']}, stats_steps {cfg['stats_steps']}, "
             f"max_move {cfg['max_move']}, hysteresis {cfg['hysteresis']}; {d['threads']} torch thread(s); medians, "
             "wall-clock / process CPU time:", "",
             "| | time |", "|---|---:|",
             f"| (a) plain step | {cell('plain_ms')} |",
             f"| (b) statistics step ({cfg['stats_steps'] - 1} of the {cfg['stats_steps']}) | {cell('stats_ms', True)} |",
             f"| (b') last statistics step, with the sampled neighbour probe | {cell('probe_ms', True)} |",
             f"| (c) first decision: units moved {moved_first} (of {d['units']}; every unit may move any number of "
             f"levels) | {cell('first_decision_ms')} |",
             f"| (c) later decisions: units moved {moved_later} | {cell('later_decision_ms')} |",
             f"| **amortised overhead, measured later decisions** | **{pct(w['overhead_later'])}** (target < "
             f"{pct(d['target'])}: {ok(w['overhead_later'])}) |",
             f"| **worst case: every decision as costly as the first** | **{pct(w['overhead_first'])}** ({ok(w['overhead_first'])}) |",
             "",
             f"- Statistics alone: {pct(w['overhead_statistics'])} of a plain step; the rest is the decision. "
             + (f"No decision moved a unit in this run (first: {moved_first}; later: {moved_later}): with these "
                "fixed synthetic gradients every unit measures alike, so (c) is the allocation and its bookkeeping, "
                "and the cost of re-coding units that move is not in this table."
                if not any(d["first_moved"]) and not any(d["later_moved"]) else
                "The worst-case line charges every decision the first one's cost."),
             f"- Command: `{d['provenance']['command']}`; wall time {d['wall_seconds']:.0f} s; 1-minute load "
             f"average {d['load_average_end'][0]:.1f} at the end; {d['provenance']['hardware']}.",
             provenance_line(d.get("provenance"), ("scheduler_cost",)), COST_END]  # fmt: skip
    return "\n".join(lines)


def gpu_compile_block(path: str) -> str:
    """docs/gpu.md: SASS per element before / after the edge-value fixes (``gpu_compile.py --compare``,
    run as a subprocess: it needs triton), and the full run's check result with its provenance."""
    import subprocess

    before = os.path.join(os.path.dirname(path), os.path.basename(GPU_BEFORE))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_compile.py"), "--compare", _rel(before),
                            _rel(path)], capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout.strip()
    with open(path) as f:
        d = json.load(f)
    ok = [r for r in d["results"] if r.get("ok")]
    lines = [GPU_START, f"<!-- generated by benchmarks/results_table.py from {_rel(path)}; do not edit by hand -->", "",
             table, "",
             f"- The run: `{d['command']}`, triton {d['triton']}, {d['wall_s']:.0f} s; {len(ok)} of {len(d['results'])} "
             f"specializations compiled, {len(d.get('replay', []))} replayed configurations; "
             + ("**failures**: " + "; ".join(d["failures"]) if d.get("failures") else
                "no failure (spills, local memory, fp64, FMA contraction, `.ftz`, more than one compile per "
                "configuration)") + ".",
             provenance_line(d.get("provenance"), ("gpu_compile",)), GPU_END]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- all blocks
# (start marker, end marker, document, results file, renderer): every generated block of the docs
BLOCKS = [
    (START, END, "README.md", None, None),  # quality: several files, see generated_blocks()
    (STEP_START, STEP_END, "README.md", STEP_FILE, step_block),
    (FRONTIER_START, FRONTIER_END, "README.md", FRONTIER_FILE, frontier_block),
    (ABLATION_START, ABLATION_END, "README.md", ABLATION_FILE, ablation_block),
    (MLM_START, MLM_END, "README.md", MLM_FILE, megatron_lm_block),
    (CKPT_START, CKPT_END, "README.md", CKPT_FILE, checkpoint_block),
    (COST_START, COST_END, COST_DOC, COST_FILE, scheduler_cost_block),
    (GPU_START, GPU_END, GPU_DOC, GPU_FILE, gpu_compile_block),
]


def generated_blocks(root: str = ROOT) -> list[tuple[str, str, str, str]]:
    """(document, start, end, text) of every block whose results files exist."""
    out = []
    for start, end, doc, path, render in BLOCKS:
        if render is None:
            files = [os.path.join(root, f) for f in DEFAULT_FILES]
            if all(os.path.exists(f) for f in files):
                out.append((doc, start, end, block(files)))
        elif os.path.exists(os.path.join(root, path)):
            out.append((doc, start, end, render(os.path.join(root, path))))
    return out


def check(root: str = ROOT) -> list[str]:
    """The blocks whose text in their document differs from what their results files generate now
    (a block missing from its document counts as differing)."""
    bad = []
    for doc, start, end, text in generated_blocks(root):
        with open(os.path.join(root, doc)) as f:
            current = f.read()
        i, j = current.find(start), current.find(end)
        if i < 0 or j < i or current[i:j + len(end)] != text:
            bad.append(f"{doc}: {start}")
    return bad


def _replace(readme: str, start: str, end: str, text: str) -> str | None:
    i, j = readme.find(start), readme.find(end)
    return None if i < 0 or j < i else readme[:i] + text + readme[j + len(end):]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help=f"quality_<task>.json files to print (default: {' '.join(DEFAULT_FILES)})")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the quality block, touch nothing")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a generated block differs from what its results file generates (CI)")
    args = ap.parse_args(argv)
    if args.files or args.print_only:
        files = args.files or [os.path.join(ROOT, f) for f in DEFAULT_FILES]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            print(f"missing result files: {missing}; run benchmarks/quality.py --json ... first", file=sys.stderr)
            return 2
        print(block(files))
        return 0
    if args.check:
        bad = check()
        for b in bad:
            print(f"out of date: {b} (run `python benchmarks/results_table.py`: it regenerates the blocks from "
                  "their results files, staleness notes included, without measuring anything)", file=sys.stderr)
        print("generated blocks: " + ("all match their results files" if not bad else f"{len(bad)} out of date"))
        return 1 if bad else 0
    docs: dict[str, str] = {}
    for doc, start, end, text in generated_blocks():
        if doc not in docs:
            with open(os.path.join(ROOT, doc)) as f:
                docs[doc] = f.read()
        new = _replace(docs[doc], start, end, text)
        if new is None:
            print(f"{doc}: no '{start}' ... '{end}' markers; block not written", file=sys.stderr)
            continue
        docs[doc] = new
    for doc, text in docs.items():
        path = os.path.join(ROOT, doc)
        with open(path) as f:
            old = f.read()
        if old != text:
            with open(path, "w") as f:
                f.write(text)
            print(f"rewrote the generated blocks of {doc}")
        else:
            print(f"{doc}: generated blocks already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
