"""``stquant-megatron`` command line (thin: calls library functions)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stquant-megatron", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser("report", help="scheduler history -> table and bits heatmap")
    rep.add_argument("source", help="checkpoint file, torch_dist checkpoint directory, or history JSON")
    rep.add_argument("--out", default="stquant_bits.png", help="heatmap PNG path")
    rep.add_argument("--last", type=int, default=6, help="decisions shown in the table")
    flags = sub.add_parser("flags", help="the --stquant-* flag table (Markdown), or rewrite it in files")
    flags.add_argument("--write", nargs="+", metavar="FILE", help="files whose flags block is regenerated")
    mem = sub.add_parser("memory", help="per-GPU memory and checkpoint bytes, stock Megatron vs STQuant",
                         description="Per-GPU memory (the busiest rank) and checkpoint bytes of a Megatron GPT "
                                     "run, stock against STQuant; Megatron-LM's flag names. See "
                                     "stquant_megatron/megatron/memory.py for what is modelled.")
    _memory_args(mem)
    ck = sub.add_parser("checkpoint", help="checkpoint tools")
    cksub = ck.add_subparsers(dest="ckcmd", required=True)
    conv = cksub.add_parser("convert", help="packed <-> Megatron's dense checkpoint format (offline, CPU)",
                            description="--to dense: write the dense form (stock Megatron's) of a packed torch_dist "
                                        "(dp_reshardable or fully_reshardable) or legacy torch checkpoint. --to packed: "
                                        "pack the moments of a dense fully_reshardable checkpoint (stock's or ours). One "
                                        "process, no GPU, no process group.")  # fmt: skip
    conv.add_argument("src", help="the checkpoint's iter_XXXXXXX directory")
    conv.add_argument("dst", help="a new directory for the converted checkpoint")
    conv.add_argument("--to", choices=("dense", "packed"), default="dense", help="target format")
    conv.add_argument("--bits", type=int, default=8, choices=range(2, 9), metavar="{2..8}",
                      help="--to packed: width of the packed moments (a patched run loading it re-codes at its own)")
    args = ap.parse_args(argv)
    if args.cmd == "checkpoint":
        from .megatron.convert import convert_to_dense, convert_to_packed

        try:
            counts = convert_to_dense(args.src, args.dst) if args.to == "dense" else convert_to_packed(args.src, args.dst, args.bits)
        except ValueError as e:
            print(f"stquant-megatron checkpoint convert: {e}", file=sys.stderr)
            return 2
        if args.to == "packed":
            into = f"{counts['entries']} moments packed at {args.bits} bits ({counts['layouts']} layout(s), fully_reshardable)"
        elif "bucket_tensors" in counts:
            into = f"{counts['entries']} packed entries decoded into {counts['bucket_tensors']} dense tensors (stock Megatron's torch_dist)"
        else:
            into = f"{counts['entries']} packed entries decoded into {counts['files']} dense distrib_optim.pt file(s) (stock legacy torch)"
        print(f"wrote {args.dst}: {into}; copy or link the tracker file beside it as needed")
        return 0
    if args.cmd == "memory":
        return _memory(args)
    if args.cmd == "flags":
        from .megatron.args import write_flag_blocks, flag_table

        if args.write:
            for path in write_flag_blocks(args.write):
                print(f"updated {path}")
        else:
            print(flag_table())
        return 0
    from .report import heatmap, history_of, table

    hist = history_of(args.source)
    print(table(hist, args.last))
    print(f"heatmap: {heatmap(hist, args.out)}")
    return 0


def _memory_args(p: argparse.ArgumentParser) -> None:
    from .megatron.args import _bits

    m = p.add_argument_group("model (a count, or the shape of a GPT)")
    m.add_argument("--num-parameters", help="parameter count, e.g. 7e9, 70B, 350M (without a shape)")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--ffn-hidden-size", type=int, help="default: 4h, or int(8h/3/64)*64 with --swiglu")
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--num-query-groups", type=int, help="grouped-query attention (default: one per head)")
    m.add_argument("--group-query-attention", action="store_true", help="accepted; --num-query-groups decides")
    m.add_argument("--kv-channels", type=int, help="default: hidden / heads")
    m.add_argument("--vocab-size", type=int, help="tokenizer vocabulary, padded like Megatron-LM")
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    m.add_argument("--seq-length", type=int)
    m.add_argument("--max-position-embeddings", type=int, help="default: --seq-length")
    m.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"),
                   default="learned_absolute")
    m.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--disable-bias-linear", action="store_true")
    m.add_argument("--add-qkv-bias", action="store_true")
    m.add_argument("--qk-layernorm", action="store_true")
    m.add_argument("--num-experts", type=int, help="MoE: experts per layer (every layer)")
    m.add_argument("--moe-ffn-hidden-size", type=int, help="default: --ffn-hidden-size")
    q = p.add_argument_group("parallelism and precision")
    q.add_argument("--tensor-model-parallel-size", type=int, default=1)
    q.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    q.add_argument("--data-parallel-size", type=int, help="default: --world-size / (TP x PP), else 1")
    q.add_argument("--world-size", type=int)
    q.add_argument("--expert-model-parallel-size", type=int, default=1)
    prec = q.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp16", action="store_true")
    q.add_argument("--grad-reduce-in-bf16", action="store_true")
    q.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true", help="with --fp16")
    s = p.add_argument_group("STQuant (the --stquant-* launch flags)")
    bits = s.add_mutually_exclusive_group()
    bits.add_argument("--stquant-bits", type=_bits, metavar="N or M,V", help="fixed widths (default: scheduled)")
    bits.add_argument("--stquant-avg-bits", type=float, help="scheduler budget (default: the default config's)")
    s.add_argument("--stquant-block-size", type=int, default=128)
    s.add_argument("--stquant-scale-dtype", choices=("fp32", "bf16"), default="fp32")
    s.add_argument("--stquant-min-numel", type=int, default=4096,
                   help="tensors under it keep fp32 moments (needs the shape; ignored with --num-parameters)")
    s.add_argument("--stquant-exp-avg-sq-format", choices=("packed", "factored"), default="packed")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _memory(args: argparse.Namespace) -> int:
    import json

    from .megatron.memory import estimate, format_table

    kw = {k: v for k, v in vars(args).items() if k not in ("cmd", "json", "bf16", "fp16", "group_query_attention",
                                                         "disable_bias_linear")}
    kw["add_bias_linear"] = not args.disable_bias_linear
    kw["precision"] = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    try:
        est = estimate(**kw)
    except ValueError as e:
        print(f"stquant-megatron memory: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est, indent=1) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
