"""``STQuantConfig``: every knob of the packed optimizer state, validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .formats.codebooks import KINDS, LOG_STEP, MAX_BITS, MIN_BITS
from .kernels.common import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

# Codebook per (moment, bits) when the config says "auto": the kind with the lowest measured
# update-direction error on real moments at every width (`python benchmarks/codebooks.py`: pow2
# beats linear for both moments at 3-8 bits, and beats log for exp_avg_sq at 2-4 bits; at 2 bits
# the signed kinds coincide).
AUTO_CODEBOOK = {moment: {bits: "pow2" for bits in range(MIN_BITS, MAX_BITS + 1)} for moment in ("exp_avg", "exp_avg_sq")}
MOMENTS = ("exp_avg", "exp_avg_sq")
DEFAULT_AVG_BITS = 3.0
"""The budget of ``STQuantConfig()`` (no ``bits``, no ``avg_bits``; both moments packed; scheduled
runs round stochastically), chosen on seeds 0-2 of the frontier benchmark (``benchmarks/frontier.py``)
as the least peak memory among the scheduled packed budgets whose mean validation loss is within
0.4 % of fp32 AdamW's: scheduled 3.0 with stochastic rounding (0.804 B/param peak, 0.9853 x fp32
AdamW) against 3.5 with nearest rounding (0.925, 0.9984) and 3.0 with nearest rounding (1.0421: nearest
rounding swallows the EMAs' small updates at 2-3 bits), and re-measured on seeds 3-5 that played no part
in the choice. The numbers, with the commit they were measured at and whether the code changed since:
README "Frontier" (generated from ``benchmarks/results/frontier.json`` and ``frontier_confirm.json``)."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"STQuantConfig.{field}={value!r} is invalid: {allowed}")


@dataclass(kw_only=True, slots=True)
class STQuantConfig:
    """How Adam's moments are stored. Invalid values raise ``ValueError`` naming the field."""

    bits: int | tuple[int, int] | None = None
    """Fixed code width of both moments, or an ``(exp_avg, exp_avg_sq)`` pair; each in 2..8. None
    (default): the scheduler places the widths within ``avg_bits``."""
    block_size: int = 128
    """Elements sharing one scale: a power of two in 32..2048 (larger blocks spill on GPUs)."""
    min_numel: int = 4096
    """Tensors with fewer elements (norms, biases) keep fp32 moments ("escapes")."""
    stochastic_rounding: bool | None = None
    """Round codes stochastically (unbiased), reproducibly from (seed, step, unit, element). None
    (default): stochastic when the scheduler places the widths (``avg_bits``, or neither ``bits`` nor
    ``avg_bits``), nearest for fixed ``bits``; measured on the frontier benchmark: at scheduled 3.0
    nearest rounding loses 4.2 % of validation loss, stochastic rounding none."""
    seed: int = 0
    """Seed of stochastic rounding, 0 .. 2**32 - 1."""
    scale_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage type of block scales (fp32: 4 bytes per block; bf16: 2)."""
    exp_avg_codebook: str = "auto"
    """Codebook kind of exp_avg: "auto" or one of formats.codebooks.KINDS (signed: not "log")."""
    exp_avg_sq_codebook: str = "auto"
    """Codebook kind of exp_avg_sq: "auto" or one of formats.codebooks.KINDS."""
    exp_avg_sq_format: Literal["auto", "factored", "packed"] = "packed"
    """"factored": the exp_avg_sq of every packed parameter with a matrix shape (2-D or more, viewed as
    ``[shape[0], rest]``) keeps row and column statistics instead of codes (``FactoredState``, 4 bytes
    per row and column, about 0 bits per element; Adafactor's rank-1 second moment). Under Megatron's
    distributed optimizer a matrix's data-parallel shards keep the full matrix's statistics, all-reduced
    every step (``STQuantAdamW.set_factored_sharding``). "auto" with the scheduler (``avg_bits``): the
    scheduler chooses per matrix, like a width, between a factored exp_avg_sq (width 0) and packed codes,
    from the measured error of the factored estimate (``docs/scheduler.md``), within the same budget.
    "auto" with fixed ``bits``: factored where the statistics, on each rank holding part of the matrix,
    take fewer bytes than a 4-bit packed exp_avg_sq of its share (``8 * (rows + cols) * shards <=
    numel``), packed elsewhere (vectors). "packed" (the default): codes everywhere. The scheduler
    places the packed units (exp_avg, and exp_avg_sq where packed or chosen) within ``avg_bits``."""
    never_factor: tuple[str, ...] = ()
    """``fnmatch`` patterns of parameter names (e.g. ``"tok.weight"``, ``"*.qkv.weight"``) whose
    exp_avg_sq is never factored, whatever ``exp_avg_sq_format`` says: it stays packed."""
    nonfinite: Literal["raise", "skip", "unchecked"] = "raise"
    """Non-finite gradients: raise before touching any state, skip the step with a warning, or
    do not check (saves one read of the gradients; for hosts that check themselves)."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Fused-step implementation: auto = Triton on CUDA, PyTorch elsewhere."""
    compile: bool | None = None
    """Run the PyTorch path's chunks through torch.compile. None (auto): on the CPU, for units of at
    least one chunk (2**18 elements), where the one-time compile (a few seconds per width
    combination) pays back within a few steps; falls back to eager, with one warning, where no
    compiler works. True: every unit. False: never."""

    # --- precision scheduler (active when avg_bits is set) -----------------------------------
    avg_bits: float | None = None
    """Budget in bits per element of the scheduled units, scale bits included. None: fixed ``bits``
    if given, else ``DEFAULT_AVG_BITS`` (so ``STQuantConfig()`` is scheduled, ``STQuantConfig(bits=4)`` fixed)."""
    min_bits: int = 2
    """Narrowest width the scheduler may choose."""
    max_bits: int = 8
    """Widest width the scheduler may choose."""
    max_error: float = 0.1
    """Per-unit cap on the relative update-direction error E; wins over the budget."""
    interval: int = 100
    """Steps between decisions."""
    warmup_steps: int = 100
    """Steps before the first decision (the units sit at their starting widths, within the budget)."""
    warmup_bits: int | None = None
    """Starting width of every unit; None = the most even widths the budget allows. A set value
    must fit the budget (``warmup_bits`` + scale bits <= ``avg_bits``): the budget bounds the peak."""
    stats_steps: int = 4
    """Steps before each decision whose errors are measured (the rest run without statistics). Each
    measures a rotating quarter of every unit (``SAMPLE_STRIDE`` = 4 programs): 4 steps measure it all."""
    max_move: int = 2
    """Most levels a unit moves per decision after the first one."""
    hysteresis: float = 0.02
    """A new plan is adopted only if it lowers the total error by more than this fraction."""

    def __post_init__(self) -> None:
        if self.bits is not None and self.avg_bits is not None:  # what the caller passed (the default is filled below)
            raise ValueError(
                f"STQuantConfig(bits={self.bits!r}, avg_bits={self.avg_bits!r}): bits and avg_bits are exclusive "
                f"(with both, bits would be ignored); give bits for fixed widths (STQuantConfig(bits={self.bits!r})) "
                f"or avg_bits for the precision scheduler (STQuantConfig(avg_bits={self.avg_bits!r})); neither gives "
                f"the default, scheduled at avg_bits={DEFAULT_AVG_BITS}"
            )
        if self.bits is None and self.avg_bits is None:
            self.avg_bits = DEFAULT_AVG_BITS
        if self.stochastic_rounding is None:
            self.stochastic_rounding = self.avg_bits is not None
        bits = 4 if self.bits is None else self.bits  # (unused while scheduled)
        pair = bits if isinstance(bits, (tuple, list)) else (bits, bits)
        if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in pair):
            _fail("bits", bits, "use an int or an (exp_avg, exp_avg_sq) pair of ints in 2..8")
        if not all(MIN_BITS <= b <= MAX_BITS for b in pair):
            _fail("bits", bits, f"each width must be in {MIN_BITS}..{MAX_BITS}")
        if isinstance(self.bits, list):
            self.bits = tuple(bits)
        if isinstance(self.never_factor, str) or not all(isinstance(x, str) for x in self.never_factor):
            _fail("never_factor", self.never_factor, "use a tuple of fnmatch patterns of parameter names")
        self.never_factor = tuple(self.never_factor)
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
            _fail("block_size", bs, f"use a power of two in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE} (default 128)")
        if not isinstance(self.min_numel, int) or isinstance(self.min_numel, bool) or self.min_numel < 0:
            _fail("min_numel", self.min_numel, "use an int >= 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            _fail("seed", self.seed, "use an int in 0..2**32-1")
        for name, allowed in (
            ("scale_dtype", ("fp32", "bf16")),
            ("nonfinite", ("raise", "skip", "unchecked")),
            ("exp_avg_sq_format", ("auto", "factored", "packed")),
            ("backend", ("auto", "torch", "triton")),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"choose one of {allowed}")
        if self.avg_bits is not None:
            self._check_scheduler()
        if not isinstance(self.stochastic_rounding, bool):
            _fail("stochastic_rounding", self.stochastic_rounding, "use True, False or None (stochastic when scheduled)")
        if self.compile is not None and not isinstance(self.compile, bool):
            _fail("compile", self.compile, "use None (auto: large units on the CPU), True or False")
        for moment in MOMENTS:
            field = f"{moment}_codebook"
            kind = getattr(self, field)
            if kind not in ("auto", *KINDS):
                _fail(field, kind, f"choose 'auto' or one of {KINDS}")
            if kind == "log" and moment == "exp_avg":
                _fail(field, kind, "'log' is zero-free and unsigned: only for exp_avg_sq; use 'pow2' or 'linear'")

    def _check_scheduler(self) -> None:
        for name in ("min_bits", "max_bits", "warmup_bits"):
            v = getattr(self, name)
            if name == "warmup_bits" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not MIN_BITS <= v <= MAX_BITS:
                _fail(name, v, f"use an int in {MIN_BITS}..{MAX_BITS}" + (" or None" if name == "warmup_bits" else ""))
        if self.min_bits > self.max_bits:
            _fail("min_bits", self.min_bits, f"must not exceed max_bits={self.max_bits}")
        lo, hi = self.min_bits + self.scale_bits(), self.max_bits + self.scale_bits()
        if not isinstance(self.avg_bits, (int, float)) or not lo <= self.avg_bits <= hi:
            _fail("avg_bits", self.avg_bits, f"use a number in [{lo:g}, {hi:g}] (min/max_bits plus "
                  f"{self.scale_bits():g} scale bits per element), or None for fixed bits")  # fmt: skip
        if self.warmup_bits is not None and not (
            self.min_bits <= self.warmup_bits and self.warmup_bits + self.scale_bits() <= self.avg_bits + 1e-9
        ):
            _fail("warmup_bits", self.warmup_bits, f"the starting width must lie in [min_bits={self.min_bits}, "
                  f"avg_bits - scale bits = {self.avg_bits - self.scale_bits():g}] so that the budget bounds the "
                  "peak from step 1; use None for the most even widths the budget allows")  # fmt: skip
        for name, minimum in (("interval", 1), ("warmup_steps", 0), ("stats_steps", 1), ("max_move", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < minimum:
                _fail(name, v, f"use an int >= {minimum}")
        if self.stats_steps > self.interval:
            _fail("stats_steps", self.stats_steps, f"must not exceed interval={self.interval}")
        if not self.max_error > 0:
            _fail("max_error", self.max_error, "use a number > 0 (float('inf') for no cap)")
        if not 0 <= self.hysteresis < 1:
            _fail("hysteresis", self.hysteresis, "use a number in [0, 1)")

    def scale_bits(self) -> float:
        """Scale overhead in bits per element."""
        return (32 if self.scale_dtype == "fp32" else 16) / self.block_size

    def moment_bits(self, moment: str) -> int:
        """The configured fixed width of ``moment`` ("exp_avg" or "exp_avg_sq"); 4 where ``bits`` is None."""
        bits = 4 if self.bits is None else self.bits
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
        d["never_factor"] = list(d["never_factor"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> STQuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown STQuantConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)
