"""``--stquant-*`` launch flags for Megatron-LM, mapped onto ``STQuantConfig`` in one place."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_AVG_BITS, STQuantConfig
from ..formats.codebooks import KINDS


def _bits(text: str) -> int | tuple[int, int]:
    parts = text.split(",")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stquant-bits {text!r}: use N or M,V (ints in 2..8)") from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return (vals[0], vals[1])
    raise argparse.ArgumentTypeError(f"--stquant-bits {text!r}: use N or M,V (ints in 2..8)")


def add_stquant_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the flags (idempotent); returns ``parser`` (Megatron's extra_args_provider contract)."""
    if any(a.dest == "stquant" for a in parser._actions):
        return parser
    d = STQuantConfig()
    g = parser.add_argument_group("stquant", "packed variable-bit Adam moments (stquant-megatron)")
    g.add_argument("--stquant", action="store_true", help="store Adam moments in packed 2-8 bit buffers (off: stock Megatron)")
    g.add_argument("--stquant-bits", type=_bits, default=None, metavar="N or M,V",
                   help="fixed code width of both moments, or exp_avg,exp_avg_sq widths; each 2..8 (unset: scheduled)")
    g.add_argument("--stquant-block-size", type=int, default=d.block_size,
                   help="elements sharing one scale: a power of two in 32..2048")
    g.add_argument("--stquant-min-numel", type=int, default=d.min_numel,
                   help="smaller tensors (norms, biases) keep fp32 moments")
    g.add_argument("--stquant-stochastic-rounding", action=argparse.BooleanOptionalAction, default=None,
                   help="round codes stochastically, reproducibly from (seed, step, unit, element); unset: "
                        "stochastic when scheduled, nearest with --stquant-bits")
    g.add_argument("--stquant-seed", type=int, default=d.seed, help="seed of stochastic rounding")
    g.add_argument("--stquant-scale-dtype", choices=("fp32", "bf16"), default=d.scale_dtype,
                   help="storage type of the block scales")
    g.add_argument("--stquant-avg-bits", type=float, default=None,
                   help="scheduler budget in bits per element, scale bits included (unset: fixed --stquant-bits if "
                        f"given, else {DEFAULT_AVG_BITS:g})")
    g.add_argument("--stquant-min-bits", type=int, default=d.min_bits, help="narrowest width the scheduler may choose")
    g.add_argument("--stquant-max-bits", type=int, default=d.max_bits, help="widest width the scheduler may choose")
    g.add_argument("--stquant-max-error", type=float, default=d.max_error,
                   help="per-unit cap on the relative update error, met wherever the budget allows it")
    g.add_argument("--stquant-interval", type=int, default=d.interval, help="steps between scheduler decisions")
    g.add_argument("--stquant-warmup-steps", type=int, default=d.warmup_steps,
                   help="steps before the first decision (statistics from step 1; units at their starting widths)")
    g.add_argument("--stquant-warmup-bits", type=int, default=d.warmup_bits,
                   help="starting width of every unit, must fit the budget (default: the most even widths it allows)")
    g.add_argument("--stquant-stats-steps", type=int, default=d.stats_steps,
                   help="steps before each decision that measure errors, a rotating quarter of each tensor per step; "
                        "4 cover it all (<= --stquant-interval)")
    g.add_argument("--stquant-max-move", type=int, default=d.max_move,
                   help="most levels a unit moves per decision, after the first one")
    g.add_argument("--stquant-hysteresis", type=float, default=d.hysteresis,
                   help="a new plan is adopted only if it lowers the total error by more than this fraction")
    g.add_argument("--stquant-exp-avg-codebook", default=d.exp_avg_codebook, choices=("auto", *KINDS),
                   help="codebook kind of exp_avg (signed: not log)")
    g.add_argument("--stquant-exp-avg-sq-codebook", default=d.exp_avg_sq_codebook, choices=("auto", *KINDS),
                   help="codebook kind of exp_avg_sq")
    g.add_argument("--stquant-exp-avg-sq-format", default=d.exp_avg_sq_format, choices=("auto", "factored", "packed"),
                   help="exp_avg_sq of matrices: row/column statistics (factored, ~0 bits, all-reduced over the "
                        "data-parallel shards) or codes (packed); auto: the scheduler chooses per matrix from the "
                        "measured error (fixed bits: factored where that takes fewer bytes)")
    g.add_argument("--stquant-never-factor", nargs="*", default=list(d.never_factor), metavar="PATTERN",
                   help="fnmatch patterns of parameter names (global layer numbers, e.g. "
                        "'embedding.word_embeddings.weight') whose exp_avg_sq is never factored")
    g.add_argument("--stquant-backend", default=d.backend, choices=("auto", "torch", "triton"),
                   help="fused-step implementation: auto = Triton on CUDA, PyTorch elsewhere")
    g.add_argument("--stquant-checkpoint-format", choices=("dense", "packed"), default="dense",
                   help="optimizer moments in checkpoints (torch_dist dp_reshardable and fully_reshardable, legacy torch): "
                        "dense fp32 (Megatron's own, loadable by stock Megatron) or packed as in memory (about 1/8 of the "
                        "moments' bytes; loads only with stquant-megatron or after `stquant-megatron checkpoint convert`; "
                        "reshards as the format does: data-parallel sizes, and with fully_reshardable TP/PP sizes too)")
    g.add_argument("--stquant-compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the PyTorch (CPU) path: auto = units of 2**18+ elements")
    return parser


def config_from_args(args: argparse.Namespace) -> STQuantConfig | None:
    """The ``STQuantConfig`` the flags ask for, or None without ``--stquant``."""
    if not getattr(args, "stquant", False):
        return None
    if args.stquant_bits is not None and args.stquant_avg_bits is not None:
        bits = args.stquant_bits
        bits = ",".join(map(str, bits)) if isinstance(bits, (tuple, list)) else str(bits)
        raise ValueError(
            f"--stquant-bits {bits} and --stquant-avg-bits {args.stquant_avg_bits:g} were both given; they are exclusive "
            f"(with both, --stquant-bits would be ignored): pass --stquant-bits {bits} for fixed widths or "
            f"--stquant-avg-bits {args.stquant_avg_bits:g} for the precision scheduler, not both (--stquant alone: "
            f"scheduled at {DEFAULT_AVG_BITS} bits)"
        )
    return STQuantConfig(
        bits=args.stquant_bits, block_size=args.stquant_block_size, min_numel=args.stquant_min_numel,
        stochastic_rounding=args.stquant_stochastic_rounding, seed=args.stquant_seed,
        scale_dtype=args.stquant_scale_dtype, avg_bits=args.stquant_avg_bits, min_bits=args.stquant_min_bits,
        max_bits=args.stquant_max_bits, max_error=args.stquant_max_error, interval=args.stquant_interval,
        warmup_steps=args.stquant_warmup_steps, warmup_bits=args.stquant_warmup_bits,
        stats_steps=args.stquant_stats_steps, max_move=args.stquant_max_move, hysteresis=args.stquant_hysteresis,
        exp_avg_codebook=args.stquant_exp_avg_codebook, exp_avg_sq_codebook=args.stquant_exp_avg_sq_codebook,
        never_factor=tuple(args.stquant_never_factor),
        exp_avg_sq_format=args.stquant_exp_avg_sq_format, backend=args.stquant_backend, compile={"auto": None, "on": True, "off": False}[args.stquant_compile],
        nonfinite="unchecked",  # Megatron checks grads itself; a per-rank raise would hang the others
    )  # fmt: skip


# ------------------------------------------------------------------------------------- flag table
FLAGS_BEGIN = "<!-- flags:start: generated from stquant_megatron/megatron/args.py by `stquant-megatron flags --write README.md docs/megatron.md`; do not edit by hand -->"
FLAGS_END = "<!-- flags:end -->"


def flag_table() -> str:
    """Markdown table of every ``--stquant-*`` flag (default, ``STQuantConfig`` field, meaning),
    rendered from the parser above: the one source of the flag tables in README and docs."""
    parser = add_stquant_args(argparse.ArgumentParser(add_help=False))
    rows = ["| flag | default | `STQuantConfig` field | meaning |", "|---|---|---|---|"]
    for a in parser._actions:
        if not a.dest.startswith("stquant"):
            continue
        flag = a.option_strings[0]
        if a.choices:
            flag += " {" + ",".join(map(str, a.choices)) + "}"
        elif a.metavar:
            flag += f" {a.metavar}"
        if isinstance(a.default, bool):
            default = "on" if a.default else "off"
        else:
            default = "unset" if a.default is None else str(a.default)
        field = {"stquant": "(turns the patch on)", "stquant_checkpoint_format": "(checkpoints: `patch(checkpoint_format=)`)"}.get(
            a.dest, f"`{a.dest[len('stquant_'):]}`")  # fmt: skip
        rows.append(f"| `{flag}` | {default} | {field} | {a.help or ''} |")
    return "\n".join(rows)


def render_flag_block(text: str, path: str = "<text>") -> str:
    """``text`` with the block between ``FLAGS_BEGIN`` and ``FLAGS_END`` replaced by ``flag_table()``."""
    if text.count(FLAGS_BEGIN) != 1 or text.count(FLAGS_END) != 1:
        raise ValueError(f"{path}: needs exactly one {FLAGS_BEGIN!r} ... {FLAGS_END!r} block")
    head, rest = text.split(FLAGS_BEGIN)
    _, tail = rest.split(FLAGS_END)
    return f"{head}{FLAGS_BEGIN}\n{flag_table()}\n{FLAGS_END}{tail}"


def write_flag_blocks(paths: list[str]) -> list[str]:
    """Regenerate the flags block in each file; returns the files that changed."""
    changed = []
    for path in paths:
        with open(path) as f:
            text = f.read()
        new = render_flag_block(text, path)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            changed.append(path)
    return changed
