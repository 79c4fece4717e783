#!/usr/bin/env python
"""Frontier benchmark: peak optimizer-state bytes per parameter against validation loss.

A byte-level GPT (pre-norm, learned positions, tied embeddings, no linear biases; default
3 layers of width 256 -> 2.44M parameters) trains on the Python standard library's own source
(``stquant_megatron.testing.data``: ``TRAIN_FILES``; validation on the held-out ``VAL_FILES``) with
the standalone optimizers, the same seeds, data order, learning-rate schedule (warm-up + cosine),
weight decay (none on norms and biases) and gradient clipping for every configuration.

Per configuration and seed it records the final validation loss (mean cross-entropy over fixed,
evenly spaced windows of the held-out text), the state bytes per parameter at the end and at the
peak (``STQuantAdamW.peak_state_bytes()``: the high-water mark since construction, precision
transitions included; the peers allocate their state once, at the first step: the max of the
storage sampled after the first step and at the end), and the wall time. Per configuration:
the mean and standard deviation (n - 1) over seeds of ``val_loss / val_loss(fp32 AdamW, same seed)``
(paired: the same initial weights and batches), the max peak and the mean final bytes.

    python benchmarks/frontier.py --quick                               # smoke run, about 2 minutes
    python benchmarks/frontier.py --jobs 2 --json benchmarks/results/frontier.json --plot docs/frontier.png

``--json PATH`` writes ``{"rows": [...], "meta": {...}}``: one row per configuration (key, label,
config, peak_state_bytes_per_param, state_bytes_per_param, val_loss_mean, ratio_mean, ratio_std,
per-seed values) and the set-up, command, hardware, versions and wall times;
``python benchmarks/results_table.py`` renders the README table from it. ``--plot PATH`` draws the
Pareto plot (peak bytes/param vs ratio, error bars = one standard deviation over seeds).
``--only KEY ...`` runs a subset, including the configurations not run by default (``--list``
shows them); fp32 AdamW always runs: it is every ratio's reference.

Every finished (configuration, seed) run is appended to ``<json stem>.runs.jsonl`` with its
configuration, set-up, the git commit its process started from, the hash of the code it measured
(``benchmarks/provenance.py``: a fp32 AdamW or peer run does not depend on our optimizer's code) and the
time it finished. ``--resume`` reuses the runs there whose configuration
and set-up match (a long benchmark survives an interruption; a configuration added later runs alone);
the meta records which results were reused and when each was produced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from quality import (  # noqa: E402  (benchmarks/ is a script folder, not a package)
    BETAS,
    CLIP,
    EPS,
    WEIGHT_DECAY,
    PeakMeter,
    _mean_std,
    _progress,
    lr_at,
    make_optimizer,
    record_decisions,
    set_lr,
    state_bytes,
)
from provenance import STARTED, hardware, provenance  # noqa: E402


# ----------------------------------------------------------------------------------- set-up
@dataclass
class Setup:
    steps: int = 1000
    layers: int = 3
    width: int = 256
    heads: int = 4
    seq: int = 64
    batch: int = 16
    lr: float = 1e-3  # fp32 AdamW's best of 5e-4, 1e-3, 2e-3, 3e-3 (adamw-lr* rows; the run log)
    val_windows: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)


QUICK = dict(steps=60, layers=2, width=128, seq=32, batch=8, val_windows=32, seeds=(0, 1))


@dataclass
class Spec:
    key: str
    label: str
    family: str  # torch | bnb8 | ao8 | ao4 | stq
    config: dict = field(default_factory=dict)
    default: bool = True  # False: runs only when named in --only
    lr: float | None = None  # multiple of the set-up's peak learning rate; None: 1

    def peak_lr(self, s: "Setup") -> float:
        return s.lr * (1.0 if self.lr is None else self.lr)


# provenance: specs begin
def specs(steps: int) -> list[Spec]:
    """The compared configurations; scheduled runs' warm-up and interval scale with the run length."""
    sched = dict(warmup_steps=max(1, round(0.10 * steps)), interval=max(4, round(0.075 * steps)))
    sched["stats_steps"] = min(4, sched["interval"])
    # the specs name their rounding: scheduled runs round stochastically by default (STQuantConfig)
    packed = dict(exp_avg_sq_format="packed", stochastic_rounding=False)
    lean = dict(scale_dtype="bf16", block_size=256, **packed)  # 1/16 scale bit per element instead of 1/4
    out = [
        Spec("adamw", "fp32 AdamW", "torch"),
        # exactly what STQuantConfig() / --stquant alone give (scheduler warm-up and interval at their defaults)
        Spec("default", "ours default, STQuantConfig()", "stq", {}),
        # is the reference tuned? fp32 AdamW at half and 1.5x the set-up's learning rate (ratios still to "adamw")
        Spec("adamw-lr0.5x", "fp32 AdamW, lr x0.5", "torch", default=False, lr=0.5),
        Spec("adamw-lr1.5x", "fp32 AdamW, lr x1.5", "torch", default=False, lr=1.5),
        Spec("bnb8", "bnb AdamW8bit", "bnb8"),
        Spec("ao8", "torchao AdamW8bit", "ao8"),
        Spec("ao4", "torchao AdamW4bit", "ao4"),
        Spec("stq4", "ours fixed 4-bit", "stq", dict(bits=4, **packed)),
    ]
    for avg in (4.0, 3.5, 3.0, 2.5):
        out.append(Spec(f"avg{avg}", f"ours scheduled {avg}, nearest rounding", "stq", dict(avg_bits=avg, **packed, **sched)))
    for avg in (3.0, 2.5):
        out.append(Spec(f"avg{avg}-lean", f"ours scheduled {avg}, nearest, bf16 scales, block 256", "stq",
                        dict(avg_bits=avg, **lean, **sched), default=False))  # fmt: skip
    fact = dict(exp_avg_sq_format="factored", stochastic_rounding=False)  # matrices' exp_avg_sq as row/column statistics (~0 bits)
    out.append(Spec("f4", "ours 4-bit exp_avg, factored exp_avg_sq", "stq", dict(bits=4, **fact)))
    # Ablation: which matrices carry factoring's cost? 4-bit exp_avg, every matrix's exp_avg_sq factored
    # except one class, which stays packed at 4 bits (``never_factor``); compare with f4 (all factored)
    # and stq4 (none).
    for cls, pat in (("tok", "tok.weight"), ("pos", "pos"), ("qkv", "*.qkv.weight"), ("proj", "*.proj.weight"),
                     ("fc1", "*.fc1.weight"), ("fc2", "*.fc2.weight")):  # fmt: skip
        out.append(Spec(f"f4-keep-{cls}", f"ours 4-bit, factored exp_avg_sq except {cls}", "stq",
                        dict(bits=4, **fact, never_factor=[pat]), default=False))  # fmt: skip
    for avg in (5.5, 4.0, 3.0):
        out.append(Spec(f"f-avg{avg}", f"ours scheduled {avg} exp_avg (nearest), factored exp_avg_sq", "stq",
                        dict(avg_bits=avg, **fact, **sched), default=avg != 3.0))  # fmt: skip
    # The format as a precision decision: exp_avg_sq_format="auto" lets the scheduler choose, per matrix,
    # a factored exp_avg_sq (~0 bits) or packed codes, from the measured error, within the budget.
    for avg in (3.0, 2.75, 2.5):
        out.append(Spec(f"auto-avg{avg}", f"ours scheduled {avg} (nearest), format chosen per unit", "stq",
                        dict(avg_bits=avg, exp_avg_sq_format="auto", stochastic_rounding=False, **sched), default=False))  # fmt: skip
    # stochastic rounding below 4 bits (nearest rounding may swallow the EMAs' small updates)
    sr = dict(stochastic_rounding=True)
    packed_sr, fact_sr = {**packed, **sr}, {**fact, **sr}
    for avg in (3.0, 2.75, 2.5):
        out.append(Spec(f"avg{avg}-sr", f"ours scheduled {avg}, stochastic rounding", "stq",
                        dict(avg_bits=avg, **packed_sr, **sched), default=False))  # fmt: skip
    # bf16 scales with block 256: a quarter of the scale bits (1/16 per element instead of 1/4), which
    # the budget (scale bits included) spends on codes
    lean_sr = dict(scale_dtype="bf16", block_size=256, **packed_sr)
    for avg in (3.0, 2.75):
        out.append(Spec(f"avg{avg}-lean-sr", f"ours scheduled {avg}, stochastic rounding, bf16 scales, block 256", "stq",
                        dict(avg_bits=avg, **lean_sr, **sched), default=False))  # fmt: skip
    out.append(Spec("f4-sr", "ours 4-bit exp_avg, factored exp_avg_sq, stochastic rounding", "stq",
                    dict(bits=4, **fact_sr), default=False))  # fmt: skip
    out.append(Spec("auto-avg2.75-sr", "ours scheduled 2.75, format chosen per unit, stochastic rounding", "stq",
                    dict(avg_bits=2.75, exp_avg_sq_format="auto", **sr, **sched), default=False))  # fmt: skip
    return out
# provenance: specs end


# ----------------------------------------------------------------------------------- model
class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.proj = torch.nn.Linear(width, width, bias=False)
        self.ln2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 4 * width, bias=False)
        self.fc2 = torch.nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class ByteGPT(torch.nn.Module):
    """Byte-level GPT: vocabulary 256, tied input/output embedding."""

    def __init__(self, s: Setup):
        super().__init__()
        self.tok = torch.nn.Embedding(256, s.width)
        self.pos = torch.nn.Parameter(torch.zeros(s.seq, s.width))
        self.blocks = torch.nn.ModuleList(Block(s.width, s.heads) for _ in range(s.layers))
        self.ln = torch.nn.LayerNorm(s.width)
        for n, p in self.named_parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * s.layers) if n.endswith(("proj.weight", "fc2.weight")) else 0.02)

    def forward(self, idx):
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.ln(h) @ self.tok.weight.t()


def param_groups(model):
    decay, plain = [], []
    for n, p in model.named_parameters():
        (plain if p.ndim < 2 else decay).append((n, p))
    return [dict(params=[p for _, p in g], wd_mult=w, names=[n for n, _ in g]) for g, w in ((decay, 1.0), (plain, 0.0))]


def val_windows(tokens: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    starts = torch.linspace(0, tokens.numel() - seq - 2, n).long()
    return tokens[starts[:, None] + torch.arange(seq + 1)]


# ----------------------------------------------------------------------------------- one run
def run_one(spec: Spec, s: Setup, seed: int, progress: bool, threads: int) -> dict:
    from stquant_megatron.testing.data import lm_batches, stdlib_corpus

    torch.set_num_threads(threads)
    train_tokens, val_tokens = stdlib_corpus("train"), stdlib_corpus("val")
    val = val_windows(val_tokens, s.val_windows, s.seq)
    torch.manual_seed(seed)
    model = ByteGPT(s)
    nparams = sum(p.numel() for p in model.parameters())
    groups = param_groups(model)
    names = [g.pop("names") for g in groups]
    opt = make_optimizer(spec.family, groups, spec.peak_lr(s), spec.config)
    if hasattr(opt, "set_param_name"):
        for g, ns in zip(opt.param_groups, names):
            for p, n in zip(g["params"], ns):
                opt.set_param_name(p, n)
    decisions = record_decisions(opt) if getattr(opt, "scheduler", None) is not None else None
    peak = PeakMeter([opt])
    loss_fn = torch.nn.functional.cross_entropy

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            tot = 0.0
            for chunk in val.split(64):
                logits = model(chunk[:, :-1])
                tot += loss_fn(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum").item()
        model.train()
        return tot / (val.shape[0] * s.seq)

    bar = _progress(s.steps, f"{spec.label} | seed {seed}", progress)
    t0 = time.perf_counter()
    train_curve = []
    for step, (x, y) in enumerate(lm_batches(train_tokens, batch=s.batch, seq=s.seq, steps=s.steps, seed=seed)):
        set_lr(opt.param_groups, lr_at(step, s.steps, spec.peak_lr(s)))
        loss = loss_fn(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        train_curve.append(loss.item())
        if step == 0:
            peak.sample()
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{train_curve[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - t0
    final = evaluate()
    bar.set_postfix(val=f"{final:.4f}")
    bar.close()
    out = dict(key=spec.key, seed=seed, nparams=nparams, final_val=final, state_bytes=state_bytes(opt),
               peak_state_bytes=peak.value(), train_seconds=seconds,
               train_curve=[sum(train_curve[i:i + 20]) / len(train_curve[i:i + 20]) for i in range(0, len(train_curve), 20)])  # fmt: skip
    if decisions is not None:
        out["bits_history"] = {"names": list(opt.scheduler.names), "history": decisions}
        out["avg_bits"] = opt.scheduler.average_bits()
    return out


# ----------------------------------------------------------------------------------- run log
def _norm(family: str, config: dict) -> str:
    """A configuration's identity; ours spell out the exp_avg_sq format and the rounding (runs logged
    before the format existed were packed; before rounding followed the scheduler, nearest)."""
    if family == "stq" and config:  # {}: exactly STQuantConfig(), whatever it is at the run's commit
        config = {"exp_avg_sq_format": "packed", "stochastic_rounding": False, **config}
    return json.dumps([family, config], sort_keys=True)


def _run_key(family: str, config: dict, lr: float) -> str:
    """A run's identity besides key and seed: its configuration and its peak learning rate (the specs
    live outside the code hash, ``benchmarks/provenance.py``: a run is reused only for an equal one)."""
    return f"{_norm(family, config)} lr={lr:.9g}"


def _cfg_key(sp: Spec, s: Setup) -> str:
    return _run_key(sp.family, sp.config, sp.peak_lr(s))


def run_deps(family: str) -> str:
    """The dependency set (``provenance.DEPS``) whose code a run of ``family`` measures."""
    return "frontier" if family == "stq" else "frontier-peers"


def append_run(path: str | None, sp: Spec, s: Setup, r: dict) -> None:
    """One JSON line per finished run (O_APPEND: parallel workers' lines do not interleave)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dep = run_deps(sp.family)
    r.update(commit=STARTED["commit"], code={dep: STARTED["code"][dep]}, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    line = json.dumps(dict(r, family=sp.family, config=sp.config, lr=sp.peak_lr(s), setup=asdict(s))) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def load_runs(path: str, s: Setup, fresh_only: bool = False) -> dict:
    """Runs of ``path`` with the same set-up, keyed by (key, seed, configuration and learning rate); the last line of a
    key wins. ``fresh_only``: only runs whose recorded code hash equals the current code's."""
    out = {}
    if not os.path.exists(path):
        return out
    want = {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k != "seeds"}  # each run has its seed
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if fresh_only and (r.get("code") or {}).get(run_deps(r["family"])) != STARTED["code"][run_deps(r["family"])]:
                continue
            if {k: v for k, v in (r.get("setup") or {}).items() if k != "seeds"} == want:
                lr = r.get("lr", s.lr)  # runs logged before per-spec learning rates ran at the set-up's
                out[(r["key"], r["seed"], _run_key(r["family"], r["config"], lr))] = dict(r, reused=True)
    return out


# ----------------------------------------------------------------------------------- summary
def summarize(spec_list: list[Spec], results: list[dict]) -> list[dict]:
    by = {(r["key"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    rows = []
    for sp in spec_list:
        mine = [by[(sp.key, sd)] for sd in seeds if (sp.key, sd) in by]
        if not mine:
            continue
        ratios = [r["final_val"] / by[("adamw", r["seed"])]["final_val"] for r in mine if ("adamw", r["seed"]) in by]
        rm, rs = _mean_std(ratios) if ratios else (float("nan"), None)
        n = mine[0]["nparams"]
        rows.append(dict(
            key=sp.key, label=sp.label, family=sp.family, config=sp.config,
            peak_state_bytes_per_param=max(r["peak_state_bytes"] for r in mine) / n,
            state_bytes_per_param=sum(r["state_bytes"] for r in mine) / len(mine) / n,
            val_loss_mean=sum(r["final_val"] for r in mine) / len(mine),
            ratio_mean=rm, ratio_std=rs, seeds=[r["seed"] for r in mine], ratios=ratios,
            train_seconds_mean=sum(r["train_seconds"] for r in mine) / len(mine),
        ))  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'configuration':50s} {'seeds':>5s} {'peak B/param':>12s} {'final B/param':>13s} {'val loss':>9s} "
          f"{'ratio (mean +- std)':>21s}")  # fmt: skip
    for r in rows:
        std = f" +- {r['ratio_std']:.4f}" if r["ratio_std"] is not None else ""
        print(f"{r['label']:50s} {len(r['seeds']):5d} {r['peak_state_bytes_per_param']:12.3f} "
              f"{r['state_bytes_per_param']:13.3f} {r['val_loss_mean']:9.4f} {r['ratio_mean']:>11.4f}{std:10s}")  # fmt: skip


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5.5))
    top = 1.08  # rows above are drawn on the top edge, their ratio in the label
    lo = min(r["ratio_mean"] - (r["ratio_std"] or 0.0) for r in rows)
    keys = []
    for i, r in enumerate(sorted(rows, key=lambda r: (r["peak_state_bytes_per_param"], r["ratio_mean"]))):
        ours = r["family"] == "stq"
        y, label = r["ratio_mean"], r["label"]
        if y > top:
            y, label = top, f"{label} ({r['ratio_mean']:.3f}, off scale)"
        ax.errorbar(r["peak_state_bytes_per_param"], y, yerr=0.0 if y == top else (r["ratio_std"] or 0.0), capsize=3,
                    fmt=("^" if y == top else "o") if ours else "s", color="tab:red" if ours else "tab:blue")  # fmt: skip
        ax.annotate(str(i + 1), (r["peak_state_bytes_per_param"], y), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
        keys.append(f"{i + 1}: {label} ({r['peak_state_bytes_per_param']:.3f} B, {r['ratio_mean']:.4f})")
    ax.set_ylim(lo - 0.01, top + 0.01)
    ax.text(1.02, 1.0, "\n".join(keys), transform=ax.transAxes, fontsize=7, va="top", ha="left")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="peak optimizer-state bytes per parameter (log2)", ylabel="val loss / fp32 AdamW (same seed)",
           title=title)  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, 60 steps, 2 seeds (smoke run)")
    ap.add_argument("--steps", type=int, help="training steps (default 1000)")
    ap.add_argument("--seeds", type=int, help="seeds per configuration: 0..N-1 (default 3)")
    ap.add_argument("--seed-list", type=int, nargs="+", metavar="SEED",
                    help="these seeds instead of 0..N-1 (e.g. confirmation seeds 3 4 5)")
    ap.add_argument("--only", nargs="+", metavar="KEY", help="subset of configurations (adamw always runs)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each (default 1)")
    ap.add_argument("--json", metavar="PATH", help="write rows and meta (set-up, per-seed results, command, times)")
    ap.add_argument("--plot", metavar="PATH", help="write the Pareto plot (PNG)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse matching runs from <json stem>.runs.jsonl (needs --json)")
    ap.add_argument("--fresh-only", action="store_true",
                    help="with --resume: reuse only runs measured on the current code (their code hash equals "
                         "today's, benchmarks/provenance.py); stale ones run again")
    ap.add_argument("--from-log", action="store_true",
                    help="run nothing: the table, JSON and plot from the runs in <json stem>.runs.jsonl (rows show "
                         "how many seeds they have)")
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    s = Setup(**QUICK) if args.quick else Setup()
    if args.steps:
        s.steps = args.steps
    if args.seeds:
        if args.seeds < 1:
            ap.error(f"--seeds must be at least 1; got {args.seeds}")
        s.seeds = tuple(range(args.seeds))
    if args.seed_list:
        if args.seeds:
            ap.error("give --seeds N or --seed-list SEED ..., not both")
        if len(set(args.seed_list)) != len(args.seed_list) or min(args.seed_list) < 0:
            ap.error(f"--seed-list needs distinct non-negative seeds; got {args.seed_list}")
        s.seeds = tuple(args.seed_list)
    spec_list = specs(s.steps)
    if args.list:
        for sp in spec_list:
            print(f"{sp.key:16s} {sp.label:52s} {'' if sp.default else '(--only) '}{sp.config}")
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {sp.key for sp in spec_list})
        if unknown:
            ap.error(f"--only: unknown {unknown}; choose from {[sp.key for sp in spec_list]}")
        spec_list = [sp for sp in spec_list if sp.key in args.only or sp.key == "adamw"]
    else:
        spec_list = [sp for sp in spec_list if sp.default]
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1; got {args.jobs}")
    if (args.resume or args.from_log) and not args.json:
        ap.error("--resume / --from-log read <json stem>.runs.jsonl: give --json PATH")
    if args.from_log:
        args.resume = True
    log_path = os.path.splitext(args.json)[0] + ".runs.jsonl" if args.json else None
    cached = load_runs(log_path, s, args.fresh_only) if args.resume else {}
    wanted = [(sp, sd, (sp.key, sd, _cfg_key(sp, s))) for sd in s.seeds for sp in spec_list]
    results = [cached[k] for _, _, k in wanted if k in cached]
    jobs = [(sp, sd) for sp, sd, k in wanted if k not in cached]
    if results:
        print(f"reusing {len(results)} run(s) from {log_path}", flush=True)
    if args.from_log:
        jobs = []
    print(f"hardware: {hardware()}\n{len(spec_list)} configurations x {len(s.seeds)} seeds, {s.steps} steps, "
          f"{args.jobs} job(s)", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    progress = not args.no_progress and args.jobs == 1
    if args.jobs == 1:
        for sp, sd in sorted(jobs, key=lambda j: j[0].key == "adamw"):  # the reference last: another
            if args.resume:  # process writing the same log may have run it meanwhile
                done = load_runs(log_path, s, args.fresh_only).get((sp.key, sd, _cfg_key(sp, s)))
                if done is not None:
                    results.append(done)
                    print(f"  {sp.label} seed {sd}: reused (finished {done.get('finished')})", flush=True)
                    continue
            r = run_one(sp, s, sd, progress, 1)
            results.append(r)
            append_run(log_path, sp, s, r)
            print(f"  {sp.label} seed {sd}: val {r['final_val']:.4f}, peak {r['peak_state_bytes'] / r['nparams']:.3f} "
                  f"B/param, {r['train_seconds']:.0f} s", flush=True)  # fmt: skip
    else:
        # every seed of the reference and of the configurations nearest the targets first, then the rest by
        # seed, the slow peers last: an interrupted run (--resume continues it) has the comparisons that matter
        first = ("adamw", "adamw-lr0.5x", "adamw-lr1.5x", "f4", "f-avg4.0", "stq4", "avg4.0")
        jobs.sort(key=lambda j: (j[0].key not in first, j[0].family in ("ao8", "ao4", "bnb8"), j[1]))
        with ProcessPoolExecutor(args.jobs) as pool:
            futs = {pool.submit(run_one, sp, s, sd, False, 1): (sp, sd) for sp, sd in jobs}
            for i, f in enumerate(as_completed(futs), 1):
                sp, sd = futs[f]
                r = f.result()
                results.append(r)
                append_run(log_path, sp, s, r)
                print(f"  [{i}/{len(jobs)} {time.perf_counter() - t0:.0f} s] {sp.label} seed {sd}: val "
                      f"{r['final_val']:.4f}, peak {r['peak_state_bytes'] / r['nparams']:.3f} B/param, "
                      f"{r['train_seconds']:.0f} s", flush=True)  # fmt: skip
    wall = time.perf_counter() - t0
    rows = summarize(spec_list, results)
    print_table(rows)
    if not results:
        print(f"no runs: nothing in {log_path} matches this set-up" if args.from_log else "no runs", file=sys.stderr)
        return 2
    nparams = results[0]["nparams"]
    title = (f"byte GPT, {nparams / 1e6:.2f}M params, {s.steps} steps, seeds {list(s.seeds)}"
             + (" (--quick)" if args.quick else ""))  # fmt: skip
    print(f"\n{title}; wall time {wall:.0f} s ({wall / 60:.1f} min, {args.jobs} job(s))")
    if args.json:
        prov = provenance(__file__, argv)  # each run in ``results`` records its own commit and code hash
        meta = dict(setup=asdict(s), nparams=nparams, title=title, wall_seconds=wall, jobs=args.jobs, quick=args.quick,
                    betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, clip=CLIP, hardware=prov["hardware"],
                    versions=prov["versions"], results=results, command=prov["command"], provenance=prov)  # fmt: skip
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "meta": meta}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
