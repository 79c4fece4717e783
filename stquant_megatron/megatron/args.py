"""``--stquant-*`` launch flags for Megatron-LM, mapped onto ``STQuantConfig`` in one place."""

from __future__ import annotations

import argparse

from ..config import STQuantConfig
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
    g.add_argument("--stquant", action="store_true", help="store Adam moments in packed 2-8 bit buffers")
    g.add_argument("--stquant-bits", type=_bits, default=d.bits, help="code width N, or M,V per moment")
    g.add_argument("--stquant-block-size", type=int, default=d.block_size)
    g.add_argument("--stquant-min-numel", type=int, default=d.min_numel, help="smaller tensors keep fp32 moments")
    g.add_argument("--stquant-stochastic-rounding", action="store_true")
    g.add_argument("--stquant-seed", type=int, default=d.seed)
    g.add_argument("--stquant-scale-dtype", choices=("fp32", "bf16"), default=d.scale_dtype)
    g.add_argument("--stquant-avg-bits", type=float, default=None, help="scheduler budget (bits/element)")
    g.add_argument("--stquant-min-bits", type=int, default=d.min_bits)
    g.add_argument("--stquant-max-bits", type=int, default=d.max_bits)
    g.add_argument("--stquant-max-error", type=float, default=d.max_error)
    g.add_argument("--stquant-interval", type=int, default=d.interval)
    g.add_argument("--stquant-warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--stquant-warmup-bits", type=int, default=d.warmup_bits)
    g.add_argument("--stquant-stats-steps", type=int, default=d.stats_steps)
    g.add_argument("--stquant-max-move", type=int, default=d.max_move)
    g.add_argument("--stquant-hysteresis", type=float, default=d.hysteresis)
    g.add_argument("--stquant-exp-avg-codebook", default=d.exp_avg_codebook, choices=("auto", *KINDS))
    g.add_argument("--stquant-exp-avg-sq-codebook", default=d.exp_avg_sq_codebook, choices=("auto", *KINDS))
    g.add_argument("--stquant-backend", default=d.backend, choices=("auto", "torch", "triton"))
    g.add_argument("--stquant-compile", action="store_true", help="torch.compile the PyTorch path")
    return parser


def config_from_args(args: argparse.Namespace) -> STQuantConfig | None:
    """The ``STQuantConfig`` the flags ask for, or None without ``--stquant``."""
    if not getattr(args, "stquant", False):
        return None
    return STQuantConfig(
        bits=args.stquant_bits, block_size=args.stquant_block_size, min_numel=args.stquant_min_numel,
        stochastic_rounding=args.stquant_stochastic_rounding, seed=args.stquant_seed,
        scale_dtype=args.stquant_scale_dtype, avg_bits=args.stquant_avg_bits, min_bits=args.stquant_min_bits,
        max_bits=args.stquant_max_bits, max_error=args.stquant_max_error, interval=args.stquant_interval,
        warmup_steps=args.stquant_warmup_steps, warmup_bits=args.stquant_warmup_bits,
        stats_steps=args.stquant_stats_steps, max_move=args.stquant_max_move, hysteresis=args.stquant_hysteresis,
        exp_avg_codebook=args.stquant_exp_avg_codebook, exp_avg_sq_codebook=args.stquant_exp_avg_sq_codebook,
        backend=args.stquant_backend, compile=args.stquant_compile,
        nonfinite="unchecked",  # Megatron checks grads itself; a per-rank raise would hang the others
    )  # fmt: skip
