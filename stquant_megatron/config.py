"""``STQuantConfig``: every knob of the packed optimizer state, validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .formats.codebooks import KINDS, LOG_STEP, MAX_BITS, MIN_BITS

# Codebook per (moment, bits) when the config says "auto": the kind with the lowest measured
# update-direction error on real moments at every width (`python benchmarks/codebooks.py`: pow2
# beats linear for both moments at 3-8 bits, and beats log for exp_avg_sq at 2-4 bits; at 2 bits
# the signed kinds coincide).
AUTO_CODEBOOK = {moment: {bits: "pow2" for bits in range(MIN_BITS, MAX_BITS + 1)} for moment in ("exp_avg", "exp_avg_sq")}
MOMENTS = ("exp_avg", "exp_avg_sq")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"STQuantConfig.{field}={value!r} is invalid: {allowed}")


@dataclass(kw_only=True, slots=True)
class STQuantConfig:
    """How Adam's moments are stored. Invalid values raise ``ValueError`` naming the field."""

    bits: int | tuple[int, int] = 4
    """Code width of both moments, or an ``(exp_avg, exp_avg_sq)`` pair; each in 2..8."""
    block_size: int = 128
    """Elements sharing one scale: a power of two in 32..4096."""
    min_numel: int = 4096
    """Tensors with fewer elements (norms, biases) keep fp32 moments ("escapes")."""
    stochastic_rounding: bool = False
    """Round codes stochastically (unbiased), reproducibly from (seed, step, unit, element)."""
    seed: int = 0
    """Seed of stochastic rounding, 0 .. 2**32 - 1."""
    scale_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage type of block scales (fp32: 4 bytes per block; bf16: 2)."""
    exp_avg_codebook: str = "auto"
    """Codebook kind of exp_avg: "auto" or one of formats.codebooks.KINDS (signed: not "log")."""
    exp_avg_sq_codebook: str = "auto"
    """Codebook kind of exp_avg_sq: "auto" or one of formats.codebooks.KINDS."""
    nonfinite: Literal["raise", "skip", "unchecked"] = "raise"
    """Non-finite gradients: raise before touching any state, skip the step with a warning, or
    do not check (saves one read of the gradients; for hosts that check themselves)."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Fused-step implementation: auto = Triton on CUDA, PyTorch elsewhere."""
    compile: bool = False
    """Run the PyTorch path through torch.compile (CPU: pays only on long runs)."""

    def __post_init__(self) -> None:
        bits = self.bits
        pair = bits if isinstance(bits, (tuple, list)) else (bits, bits)
        if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
            _fail("bits", bits, "use an int or an (exp_avg, exp_avg_sq) pair of ints in 2..8")
        if not all(MIN_BITS <= b <= MAX_BITS for b in pair):
            _fail("bits", bits, f"each width must be in {MIN_BITS}..{MAX_BITS}")
        if isinstance(bits, list):
            self.bits = tuple(bits)
        bs = self.block_size
        if not isinstance(bs, int) or bs < 32 or bs > 4096 or bs & (bs - 1):
            _fail("block_size", bs, "use a power of two in 32..4096 (default 128)")
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            _fail("min_numel", self.min_numel, "use an int >= 0")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            _fail("seed", self.seed, "use an int in 0..2**32-1")
        for name, allowed in (
            ("scale_dtype", ("fp32", "bf16")),
            ("nonfinite", ("raise", "skip", "unchecked")),
            ("backend", ("auto", "torch", "triton")),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"choose one of {allowed}")
        for name in ("stochastic_rounding", "compile"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "use True or False")
        for moment in MOMENTS:
            field = f"{moment}_codebook"
            kind = getattr(self, field)
            if kind not in ("auto", *KINDS):
                _fail(field, kind, f"choose 'auto' or one of {KINDS}")
            if kind == "log" and moment == "exp_avg":
                _fail(field, kind, "'log' is zero-free and unsigned: only for exp_avg_sq; use 'pow2' or 'linear'")

    def moment_bits(self, moment: str) -> int:
        """The configured width of ``moment`` ("exp_avg" or "exp_avg_sq")."""
        bits = self.bits
        return bits[MOMENTS.index(moment)] if isinstance(bits, tuple) else bits

    def codebook(self, moment: str, bits: int) -> str:
        """The codebook kind of ``moment`` at width ``bits``."""
        kind = getattr(self, f"{moment}_codebook")
        if kind == "auto":
            return AUTO_CODEBOOK[moment][bits]
        if kind == "log" and bits not in LOG_STEP:  # a scheduler may move a unit past 4 bits
            return "pow2"
        return kind

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (safe for ``torch.load(weights_only=True)`` and for logging)."""
        d = dataclasses.asdict(self)
        if isinstance(d["bits"], tuple):
            d["bits"] = list(d["bits"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STQuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown STQuantConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)
