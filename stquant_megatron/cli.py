"""``stquant-megatron`` command line (thin: calls library functions)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stquant-megatron", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rep = sub.add_parser("report", help="scheduler history -> table and bits heatmap")
    rep.add_argument("source", help="checkpoint file, torch_dist checkpoint directory, or history JSON")
    rep.add_argument("--out", default="stquant_bits.png", help="heatmap PNG path")
    rep.add_argument("--last", type=int, default=6, help="decisions shown in the table")
    flags = sub.add_parser("flags", help="the --stquant-* flag table (Markdown), or rewrite it in files")
    flags.add_argument("--write", nargs="+", metavar="FILE", help="files whose flags block is regenerated")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
