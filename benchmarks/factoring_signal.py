#!/usr/bin/env python
"""The scheduler's online signal for factoring, on the frontier benchmark's model.

Trains ``benchmarks/frontier.py``'s byte GPT (same set-up, data, schedule) with the format-choosing
scheduler at the widest budget (``avg_bits=8.25``: every unit at 8 bits, so the reference exp_avg_sq is
nearly exact and nothing needs the bits that factoring would free) and records, at every decision, the
probe's measured error of the factored estimate for each matrix's exp_avg_sq (window columns 5 and 6,
``STQuantAdamW._factored_probe``): the relative error of Adam's update direction that factoring that
matrix would cause now. ``benchmarks/results_table.py`` sets it beside the ablation
(``frontier.py --only f4 f4-keep-<class> ...``: the validation loss recovered by keeping one class of
matrices packed), so whether the cheap signal ranks the classes as the expensive ablation does can be
read off one table.

    python benchmarks/factoring_signal.py --json benchmarks/results/factoring_signal.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from frontier import QUICK, ByteGPT, Setup, param_groups  # noqa: E402
from provenance import hardware, provenance  # noqa: E402
from quality import CLIP, lr_at, make_optimizer, set_lr  # noqa: E402

CLASSES = {"tok": ("tok.weight",), "pos": ("pos",), "qkv": (".qkv.weight",), "proj": (".proj.weight",),
           "fc1": (".fc1.weight",), "fc2": (".fc2.weight",)}  # fmt: skip
"""Matrix classes of the ablation (``frontier.py``'s ``f4-keep-<class>``), by parameter-name suffix."""


def matrix_class(unit: str) -> str | None:
    name = unit.rsplit(".", 1)[0]
    for cls, suffixes in CLASSES.items():
        if any(name == s or name.endswith(s) for s in suffixes):
            return cls
    return None


def run(seed: int, s: Setup, threads: int) -> dict:
    from stquant_megatron.testing.data import lm_batches, stdlib_corpus

    torch.set_num_threads(threads)
    train_tokens = stdlib_corpus("train")
    torch.manual_seed(seed)
    model = ByteGPT(s)
    groups = param_groups(model)
    names = [g.pop("names") for g in groups]
    config = dict(avg_bits=8.25, exp_avg_sq_format="auto", warmup_steps=max(1, round(0.10 * s.steps)),
                  interval=max(4, round(0.10 * s.steps)), stats_steps=4)  # fmt: skip
    opt = make_optimizer("stq", groups, s.lr, config)
    for g, ns in zip(opt.param_groups, names):
        for p, n in zip(g["params"], ns):
            opt.set_param_name(p, n)
    records = []
    decide = opt.scheduler.decide

    def spy(step):  # the window as the decision sees it
        w = opt.scheduler.window.cpu()
        row = {}
        for unit, (err, ref, *_, err_f, ref_f) in zip(opt.scheduler.names, w.tolist()):
            if unit.endswith(".exp_avg_sq") and ref_f > 0:
                row[unit] = {"factored": err_f / ref_f, "packed": err / ref if ref > 0 else None}
        d = decide(step)
        records.append({"step": step, "units": row, "factored_now": [u for u, b in d.bits.items() if b == 0]})
        return d

    opt.scheduler.decide = spy
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(lm_batches(train_tokens, batch=s.batch, seq=s.seq, steps=s.steps, seed=seed)):
        set_lr(opt.param_groups, lr_at(step, s.steps, s.lr))
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return {"seed": seed, "records": records, "config": config, "train_seconds": time.perf_counter() - t0}


def summarize(runs: list[dict]) -> dict:
    """Per class: the mean over its matrices, decisions and seeds of the measured factored error."""
    acc: dict[str, list[float]] = {}
    for r in runs:
        for rec in r["records"]:
            for unit, e in rec["units"].items():
                cls = matrix_class(unit)
                if cls is not None:
                    acc.setdefault(cls, []).append(e["factored"])
    return {cls: {"mean_factored_error": sum(v) / len(v), "samples": len(v)} for cls, v in acc.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    ap.add_argument("--quick", action="store_true", help="the frontier's quick set-up (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="write the per-decision records and the per-class summary")
    args = ap.parse_args(argv)
    s = Setup(**QUICK) if args.quick else Setup()
    t0 = time.perf_counter()
    runs = [run(seed, s, args.threads) for seed in args.seeds]
    summary = summarize(runs)
    print(f"{'class':6s} {'mean factored E':>16s} {'samples':>8s}")
    for cls, v in sorted(summary.items(), key=lambda kv: -kv[1]["mean_factored_error"]):
        print(f"{cls:6s} {v['mean_factored_error']:16.4f} {v['samples']:8d}")
    if args.json:
        meta = dict(setup=vars(s) | {"seeds": list(args.seeds)}, quick=args.quick, hardware=hardware(),
                    wall_seconds=time.perf_counter() - t0,
                    provenance=provenance("benchmarks/factoring_signal.py", argv, ("factoring_signal",)))
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": runs, "meta": meta}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
