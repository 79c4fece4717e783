"""Codebooks: the map from b-bit codes to normalized values, and back.

A codebook for ``bits`` maps codes ``0 .. 2**bits - 1`` to sorted values:

- signed (``exp_avg``): values in [-1, 1] with an exact zero, symmetric: ``2**bits - 1`` levels,
  L = 2**(bits-1) - 1, code c is level k = c - L. The top code (2**bits - 1) is never produced.
- unsigned (``exp_avg_sq``): values in (0, 1], **zero-free** (a zero second moment makes
  m / (sqrt(v) + eps) explode; Li et al. 2023, arXiv 2309.01507, section 4.1): ``2**bits`` levels,
  N = 2**bits.

Kinds:

- ``linear``: signed k / L; unsigned (i + 1) / N.
- ``pow2``: the linear level times its own magnitude. Unsigned ``pow2`` is the same as quantizing
  sqrt(v) linearly; signed ``pow2`` puts more levels near zero, in the spirit of the
  dynamic-exponent map of 8-bit Adam (arXiv 2110.02861).
- ``log``: unsigned only, 2 to 4 bits: 2**(-(N - 1 - i) * LOG_STEP[bits]) (SOLO, arXiv 2505.00347).

``linear`` and ``pow2`` are computed in closed form from IEEE-exact fp32 operations
(+, -, *, /, sqrt, floor), written identically in the Triton kernel and in its PyTorch twin, so
both produce the same codes bit for bit. ``log`` looks its levels up in ``qmap`` and finds the
lower neighbour by an exact binary search over ``bounds``.

Rounding (shared by all kinds): find the lower neighbour ``lo`` of the normalized value x (clamped
to the codebook), then with the levels q(lo) < q(lo+1):
nearest -> ``lo + (x - q(lo) > q(lo+1) - x)``; stochastic -> ``lo + (u * (q(lo+1) - q(lo)) < x - q(lo))``,
which is unbiased between the two neighbours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KINDS = ("linear", "pow2", "log")
MIN_BITS, MAX_BITS = 2, 8
# Octaves between adjacent levels of the log codebook, per width.
LOG_STEP = {2: 4.0, 3: 2.0, 4: 1.0}


@dataclass(frozen=True)
class Codebook:
    """One (kind, bits, signed) codebook, with its lookup tables on one device."""

    kind: str
    bits: int
    signed: bool
    qmap: torch.Tensor
    """fp32 [2**bits]: code -> normalized value (the top signed code repeats +1)."""
    bounds: torch.Tensor
    """fp32 [2**bits - 1]: levels 1 .. levels-1, +inf padded; ``#{bounds <= x}`` is the lower
    neighbour of x (searched only by the ``log`` kind)."""

    @property
    def levels(self) -> int:
        return 2**self.bits - 1 if self.signed else 2**self.bits

    @property
    def offset(self) -> int:
        """Code of the lowest level's index 0 (signed: L, so code c is level c - L)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 0


def check_kind(kind: str, bits: int, signed: bool) -> None:
    """Raise ValueError for a (kind, bits, signed) combination that does not exist."""
    if kind not in KINDS:
        raise ValueError(f"codebook kind {kind!r} is unknown; choose one of {KINDS}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits} is outside [{MIN_BITS}, {MAX_BITS}]")
    if kind == "log" and (signed or bits not in LOG_STEP):
        raise ValueError(
            f"the 'log' codebook exists for exp_avg_sq at bits {sorted(LOG_STEP)} only "
            f"(got bits={bits}, {'signed exp_avg' if signed else 'exp_avg_sq'}); use 'pow2' or 'linear'"
        )


def level_values(k: torch.Tensor, kind: str, bits: int, signed: bool) -> torch.Tensor:
    """fp32 level values of fp32 level indices ``k`` (signed: k in [-L, L]; unsigned: i in [0, N)).

    Closed form for ``linear`` / ``pow2``; the Triton kernel has the same expression.
    """
    if signed:
        s = k * (1.0 / (2 ** (bits - 1) - 1))  # a multiplier, as in the Triton kernel
    else:
        s = (k + 1.0) * (1.0 / 2**bits)  # exact: power-of-two scaling
    if kind == "pow2":
        s = s * s.abs()
    elif kind == "log":
        s = torch.exp2((k - float(2**bits - 1)) * LOG_STEP[bits])
    return s


@functools.lru_cache(maxsize=None)
def get_codebook(kind: str, bits: int, signed: bool, device: torch.device | str = "cpu") -> Codebook:
    """The codebook ``(kind, bits, signed)`` with its tables on ``device`` (cached)."""
    check_kind(kind, bits, signed)
    n = 2**bits
    levels = n - 1 if signed else n
    k = torch.arange(levels, dtype=torch.float32)
    if signed:
        k = k - float(2 ** (bits - 1) - 1)
    values = level_values(k, kind, bits, signed)
    qmap = torch.cat([values, values[-1:].expand(n - levels)])
    bounds = torch.cat([values[1:], torch.full((n - levels,), float("inf"))])
    return Codebook(kind=kind, bits=bits, signed=signed, qmap=qmap.to(device), bounds=bounds.to(device))
