#!/usr/bin/env python
"""Megatron demo: the same megatron-core GPT trained with stock fp32 AdamW and with STQuant.

Two gloo CPU ranks (data parallel 2) run a real megatron-core ``GPTModel`` (bf16 params with fp32 main
params, byte-level vocabulary) through Megatron's ``DistributedOptimizer`` on the Python standard
library's own source files; the held-out files give the validation loss. Each run uses the same
seed, data order, step count and learning-rate schedule:

- ``adamw``:   stock megatron-core (its torch AdamW inner optimizer, fp32 moments);
- ``default``: what ``--stquant`` alone / ``STQuantConfig()`` give, unchanged
  (``stquant_megatron.megatron.patch(STQuantConfig())``): the precision scheduler gives every moment
  tensor its own width (2-8 bits) within ``DEFAULT_AVG_BITS`` (``stquant_megatron/config.py``) bits
  per element, scales included, at its default timing (first decision after ``warmup_steps``, then
  every ``interval`` steps; the header line prints them);
- ``stq4``:    fixed 4-bit moments (``STQuantConfig(bits=4)``).

It prints a table (final and peak state bytes per parameter, memory saved against fp32 AdamW at the
peak, final train and validation loss, validation loss ratio) and the scheduler's decisions, and writes to ``--out``:
``demo_loss.png`` (loss curves), ``demo_bits_default.png`` (bits heatmap, when the run reached a
decision), ``demo_memory.png``.

    bash examples/run_demo.sh                     # set-up (fresh machine) + this demo
    python examples/megatron_demo.py [--steps 120] [--runs adamw default stq4] [--out out]

The training code is the GPT task of ``benchmarks/quality.py`` (which adds the peer optimizers);
``--runs`` also takes its ``stq8``, ``auto4.0`` and ``auto3.5`` (scheduled, with the warm-up and
interval scaled to the run length).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # before any rank starts: the ranks import it too
sys.path.insert(0, ROOT)

import quality  # noqa: E402  (benchmarks/quality.py)

from stquant_megatron.config import STQuantConfig  # noqa: E402

DEFAULT_RUNS = ["adamw", "default", "stq4"]
EXTRA_RUNS = ["stq8", "auto4.0", "auto3.5"]  # benchmarks/quality.py's specs


def demo_specs(steps: int, runs: list[str]) -> list[quality.OptSpec]:
    """The runs named in ``runs`` (fp32 AdamW always, first): ``default`` is ``STQuantConfig()``
    exactly (the config dict is empty), ``stq4`` is ``STQuantConfig(bits=4)``; the rest come from
    ``benchmarks/quality.py``."""
    d = STQuantConfig()
    ours = {
        "default": quality.OptSpec("default", f"STQuant default (scheduled {d.avg_bits:g})", f"auto {d.avg_bits:g}",
                                   "stq", {}),  # fmt: skip
        "stq4": quality.OptSpec("stq4", "STQuant fixed 4-bit", "4", "stq", {"bits": 4}),
    }
    theirs = {s.key: s for s in quality.optimizer_specs(steps, ["adamw", *EXTRA_RUNS])}
    keys = ["adamw"] + [k for k in dict.fromkeys(runs) if k != "adamw"]
    return [ours[k] if k in ours else theirs[k] for k in keys]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="training steps per run (default 120: the whole demo, set-up included, stays under 10 minutes on 2 cores)")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                    help=f"which runs: adamw (always), default (STQuantConfig(), what --stquant alone gives), stq4 "
                         f"(fixed 4 bits), or {', '.join(EXTRA_RUNS)} (default: {' '.join(DEFAULT_RUNS)})")
    ap.add_argument("--out", default=os.path.join(ROOT, "out"), help="output directory for PNGs (default out/)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    setup = quality.GPTSetup(steps=args.steps, eval_every=max(1, args.steps // 8), val_windows=128)
    allowed = DEFAULT_RUNS + EXTRA_RUNS
    bad = sorted(set(args.runs) - set(allowed))
    if bad:
        ap.error(f"--runs: unknown {bad}; choose from {allowed}")
    specs = demo_specs(setup.steps, args.runs)
    print(
        f"megatron-core GPT ({setup.layers} layers, hidden {setup.hidden}, seq {setup.seq}, byte vocab 256, bf16 + fp32 "
        f"main params) on 2 gloo CPU ranks (DP=2, DistributedOptimizer), {setup.steps} steps of "
        f"{setup.global_batch} x {setup.seq} bytes of Python stdlib source; runs: "
        + ", ".join(s.label for s in specs),
        flush=True,
    )
    if "default" in args.runs:
        d = STQuantConfig()
        print(f"STQuant default = STQuantConfig() = --stquant alone: scheduled within {d.avg_bits:g} bits per element "
              f"(scales included), first decision after {d.warmup_steps} steps, then every {d.interval}"
              + ("" if setup.steps >= d.warmup_steps else f" (none within {setup.steps} steps: the units keep their "
                 "starting widths)"), flush=True)  # fmt: skip
    t0 = time.perf_counter()
    rows, meta = quality.run_gpt(specs, setup, progress=not args.no_progress, threads=1)
    runs = meta["runs"]
    if "adamw@2" not in runs:
        print("the fp32 AdamW run failed; nothing to compare against", file=sys.stderr)
        return 1
    base = runs["adamw@2"]
    base_peak = base["peak_state_bytes"] / base["nparams"]

    def tail_mean(curve):
        k = max(1, len(curve) // 10)
        return sum(curve[-k:]) / k

    print(f"\n{base['nparams']:,} parameters; state = optimizer moments (+ step counters) of both ranks, "
          "storage actually allocated\n")  # fmt: skip
    w = max(24, *(len(quality.OptSpec(**r["spec"]).label) for r in runs.values()))
    head = (f"{'run':{w}s} {'final B/param':>13s} {'peak B/param':>12s} {'memory saved':>12s} {'train loss':>10s} "
            f"{'val loss':>9s} {'val/AdamW':>9s} {'time s':>7s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for key, r in runs.items():
        label = quality.OptSpec(**r["spec"]).label
        bpp, peak = r["state_bytes"] / r["nparams"], r["peak_state_bytes"] / r["nparams"]
        print(f"{label:{w}s} {bpp:13.3f} {peak:12.3f} {1 - peak / base_peak:12.1%} {tail_mean(r['train_curve']):10.4f} "
              f"{r['final_val']:9.4f} {r['final_val'] / base['final_val']:9.4f} {r['train_seconds']:7.0f}")  # fmt: skip
    print("(final/peak: state bytes per parameter at the end of training / at its high-water mark, STQuant's "
          "precision transitions included; memory saved: peak vs fp32 AdamW's peak; train loss: mean of the last "
          "10% of steps; val loss: held-out stdlib files)")  # fmt: skip
    best = min((r for k, r in runs.items() if k != "adamw@2"), key=lambda r: r["peak_state_bytes"], default=None)
    if best is not None:
        peak = best["peak_state_bytes"] / best["nparams"]
        print(f"At 7B parameters that is {base_peak * 7e9 / 2**30:.0f} GiB of fp32 Adam state against a peak of "
              f"{peak * 7e9 / 2**30:.1f} GiB ({quality.OptSpec(**best['spec']).label}), summed over all ranks.")

    from stquant_megatron.report import table

    for key, r in runs.items():
        hist = r.get("bits_history")
        if hist and hist.get("history"):
            print(f"\n{quality.OptSpec(**r['spec']).label}: bits per unit at the last decisions "
                  f"(final average {r['avg_bits']:.2f} bits per element, scales included)")  # fmt: skip
            print(table(hist))
    print()
    for path in quality.plots("gpt", meta, rows, args.out, prefix="demo"):
        print(f"wrote {os.path.relpath(path)}")
    print(f"demo training + evaluation: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
