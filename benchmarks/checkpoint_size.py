#!/usr/bin/env python
"""Checkpoint bytes, save/load time and host memory through Megatron-LM's own ``pretrain_gpt.py``.

A GPT of 6 layers, hidden 512 (19.05M parameters, vocabulary 256, ``--mock-data``) trains on 2 CPU
gloo ranks (data-parallel 2, bf16, distributed optimizer) under the test-only wrapper
``stquant_megatron.testing.megatron_lm``, saves a ``torch_dist`` checkpoint (``dp_reshardable``, or
``fully_reshardable`` with ``--dist-ckpt-optim-fully-reshardable``) or a legacy ``torch`` one after 2 of 3 iterations, and a second job loads it and trains the third (its loss must equal the
first job's). Per configuration (stock; ours with dense and with packed moments, at the default and at fixed
4 bits; fully_reshardable: the default, dense and packed; legacy: the default, dense and packed) it
records:

- the checkpoint's bytes on disk: all files, and per part from the torch_dist storage metadata (what
  the files hold): optimizer moments (``stquant_packed`` or the dense ``exp_avg``/``exp_avg_sq``
  bucket tensors), the rest of the optimizer (fp32 main params, non-tensor state), the model (legacy:
  the moments' tensors in ``distrib_optim.pt``);
- the optimizer state in memory (``STQuantAdamW.state_bytes()`` / the stock tensors, summed over the ranks);
- each job's save / load wall time and the peak resident memory of a rank during the save above its
  level just before (the wrapper samples ``/proc/self/statm`` every 2 ms), the max over the ranks.

    python benchmarks/checkpoint_size.py --json benchmarks/results/checkpoint_size.json

Times on this 2-core machine are noisy: compare rows of one run, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import hardware, provenance  # noqa: E402

PACKED = ["--stquant-checkpoint-format", "packed"]
CONFIGS = [  # (key, label, flags, checkpoint format: --ckpt-format, or fully_reshardable (torch_dist))
    ("stock", "stock Megatron", [], "torch_dist"),
    ("default-dense", "ours default (--stquant), dense checkpoint", ["--stquant"], "torch_dist"),
    ("default-packed", "ours default (--stquant), packed checkpoint", ["--stquant", *PACKED], "torch_dist"),
    ("fixed4-dense", "ours --stquant-bits 4, dense checkpoint", ["--stquant", "--stquant-bits", "4"], "torch_dist"),
    ("fixed4-packed", "ours --stquant-bits 4, packed checkpoint", ["--stquant", "--stquant-bits", "4", *PACKED], "torch_dist"),
    # (no stock fully_reshardable or legacy row: on this CPU, stock Megatron's loaders for both ask for torch
    # AdamW's per-parameter `step` state, which neither format holds; our dense files have stock's form)
    ("default-dense-fr", "ours default, dense, fully_reshardable", ["--stquant"], "fully_reshardable"),
    ("default-packed-fr", "ours default, packed, fully_reshardable", ["--stquant", *PACKED], "fully_reshardable"),
    ("default-dense-torch", "ours default, dense, legacy torch", ["--stquant"], "torch"),
    ("default-packed-torch", "ours default, packed, legacy torch", ["--stquant", *PACKED], "torch"),
]  # fmt: skip


def disk_bytes(ckpt_dir: str) -> dict[str, int]:
    """Bytes per part of a torch_dist checkpoint directory, from its storage metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt_dir).read_metadata()
    out = {"moments": 0, "optimizer_other": 0, "model": 0, "layout": 0}
    for index, info in md.storage_data.items():
        fqn = index.fqn
        if "stquant_packed" in fqn or fqn.endswith((".exp_avg", ".exp_avg_sq")) or ".state.exp_avg" in fqn:
            part = "moments"
        elif "stquant_layout" in fqn:
            part = "layout"
        elif fqn.startswith("optimizer"):
            part = "optimizer_other"
        else:
            part = "model"
        out[part] += int(info.length)
    out["files"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt_dir) for f in fs)
    return out


def legacy_disk_bytes(ckpt_dir: str) -> dict[str, int]:
    """The same parts for a legacy torch checkpoint directory (``mp_rank_00/model_optim_rng.pt`` and
    ``distrib_optim.pt``), from the tensors the optimizer file holds."""
    import torch

    from stquant_megatron.megatron.packed_checkpoint import PackedMoments

    rank = os.path.join(ckpt_dir, "mp_rank_00")
    path = os.path.join(rank, "distrib_optim.pt")
    with torch.serialization.safe_globals([PackedMoments]):
        state = torch.load(path, weights_only=True)
    moments = 0
    if isinstance(state.get("stquant"), dict):
        moments = state["stquant"]["packed"].numel()
    for gbuf, dtypes in state.items():
        if isinstance(gbuf, int):
            for d in dtypes.values():
                if isinstance(d, dict):
                    moments += sum(d[k].numel() * d[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    files = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt_dir) for f in fs)
    model = os.path.getsize(os.path.join(rank, "model_optim_rng.pt"))
    return {"moments": moments, "optimizer_other": os.path.getsize(path) - moments, "model": model, "layout": 0,
            "files": files}  # fmt: skip


def run(key: str, flags: list[str], fmt: str, work: str, layers: int, hidden: int) -> dict:
    from stquant_megatron.testing.megatron_lm import gpt_args, run_megatron_lm

    ck = os.path.join(work, key)
    route = dict(route="launch") if flags else {}
    ckpt = ["--ckpt-format", "torch_dist", "--dist-ckpt-optim-fully-reshardable"] if fmt == "fully_reshardable" else ["--ckpt-format", fmt]
    base = gpt_args(layers=layers, hidden=hidden, heads=8, iters=3) + [*flags, *ckpt]
    saving = run_megatron_lm("pretrain_gpt.py", base + ["--save", ck, "--save-interval", "2"],
                             workdir=os.path.join(work, key + ".save"), **route)  # fmt: skip
    it = os.path.join(ck, "iter_0000002")
    load = [*base, "--load", ck, "--ckpt-step", "2"]
    if fmt == "torch":  # Megatron-LM reads a legacy checkpoint's iteration from the tracker file: one holding 2 only
        only = os.path.join(work, key + ".at2")
        os.makedirs(only)
        os.symlink(it, os.path.join(only, "iter_0000002"))
        with open(os.path.join(only, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        load = [*base, "--load", only]
    loading = run_megatron_lm("pretrain_gpt.py", load, workdir=os.path.join(work, key + ".load"), **route)
    assert loading.iterations() == [3], loading.iterations()
    # the resumed job's iteration 3 is the saving job's (bit-exact resume)
    assert loading.losses() == saving.losses()[2:], (loading.losses(), saving.losses())
    parts = legacy_disk_bytes(it) if fmt == "torch" else disk_bytes(it)
    opts = [o for r in saving.records for o in (r["optimizers"] or [])]
    nparams = sum(o["params"] for o in opts)
    saves = [r["saves"][0] for r in saving.records]  # the save after iteration 2 (the final one follows)
    loads = [s for r in loading.records for s in r["loads"]]
    return dict(
        key=key, nparams=nparams, state_bytes=sum(o["state_bytes"] for o in opts), disk=parts,
        save_seconds=max(s["seconds"] for s in saves), load_seconds=max(s["seconds"] for s in loads),
        save_rss_extra=max(s["rss_peak"] - s["rss_before"] for s in saves),
        load_rss_extra=max(s["rss_peak"] - s["rss_before"] for s in loads),
        losses=saving.losses(), resumed_loss=loading.losses(), inner=sorted({o["inner"] for o in opts}), ckpt_format=fmt,
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the rows and the provenance")
    ap.add_argument("--only", nargs="+", metavar="KEY", help="subset of " + " ".join(k for k, *_ in CONFIGS))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="stquant_ckpt_")
    rows = []
    try:
        for key, label, flags, fmt in CONFIGS:
            if args.only and key not in args.only:
                continue
            r = run(key, flags, fmt, work, args.layers, args.hidden)
            r["label"] = label
            rows.append(r)
            d = r["disk"]
            print(f"{label:48s} files {d['files'] / 1e6:8.2f} MB ({d['files'] / r['nparams']:.3f} B/param), moments "
                  f"{d['moments'] / r['nparams']:.3f} B/param (in memory {r['state_bytes'] / r['nparams']:.3f}), "
                  f"save {r['save_seconds']:.2f} s (+{r['save_rss_extra'] / 1e6:.0f} MB RSS), load {r['load_seconds']:.2f} s",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, layers=args.layers, hidden=args.hidden, ranks=2, wall_seconds=time.perf_counter() - t0,
                           hardware=hardware(), provenance=provenance(__file__, argv, deps=("checkpoint",))), f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
