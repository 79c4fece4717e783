"""The STQuant precision scheduler: measured sensitivity -> budgeted bits -> in-place transitions.

Per unit (parameter x moment) the fused step accumulates, over the ``stats_steps`` steps before
each decision, the damage its quantization does to Adam's update direction U = m / denom::

    E_u = sum ||U(Q(m), v) - U(m, v)||^2 / sum ||U(m, v)||^2      (exp_avg units; likewise exp_avg_sq)

On the last of those steps the kernel also measures E_u one width below and one above (nothing is
stored); the error curve uses those measured ratios for the neighbouring widths and continues
with 4 per bit beyond them (one more bit halves the quantization step, which quarters the squared
error; ``benchmarks/codebooks.py`` measures 3.5-7.7 per bit on real moments).

Every rank fills the same ``[num_units, 6]`` tensor of error sums (zeros for units it owns none
of), all-reduces it over the optimizer's process group, and runs the same deterministic
``allocation.allocate`` on identical numbers: every rank ends with identical bits. Unit names and
element counts are agreed once (all-gather / all-reduce) when the scheduler is set up.

Schedule: ``warmup_bits`` for ``warmup_steps`` steps; then a decision every ``interval`` steps.
After the first decision a unit moves at most ``max_move`` levels per decision, and a new plan
is adopted only if it lowers the total error by more than ``hysteresis`` (relative) or the
current plan breaks the budget. See ``docs/scheduler.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .allocation import MAX_BITS, MIN_BITS, allocate

WIDTHS = torch.arange(MIN_BITS, MAX_BITS + 1, dtype=torch.float64)
DEFAULT_RATIO = 4.0
"""Error ratio per bit where it was not measured: one more bit halves the quantization step."""


@dataclass
class Decision:
    """One decision: the step, the per-unit bits after it, and how many units moved."""

    step: int
    bits: dict[str, int]
    moved: int
    avg_bits: float
    errors: dict[str, float] = field(default_factory=dict)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where both are > 0, else NaN (not measured)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def error_curves(rel: torch.Tensor, bits: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """E_u(b) for b = 2..8 (``[U, 7]``) from the error at the current width ``rel`` and the measured
    ratios ``down`` = E(b-1)/E(b) and ``up`` = E(b)/E(b+1) (NaN: not measured). The neighbouring
    widths use the measured ratios (clamped to [1, 64]: the curve never increases with width);
    further widths continue with 4 per bit (one bit halves the quantization step)."""
    down = torch.nan_to_num(down, nan=DEFAULT_RATIO).clamp(1.0, 64.0)[:, None]
    up = torch.nan_to_num(up, nan=DEFAULT_RATIO).clamp(1.0, 64.0)[:, None]
    delta = bits.double()[:, None] - WIDTHS[None, :]  # > 0 below the current width
    far = DEFAULT_RATIO ** (delta.abs() - 1).clamp_min(0)
    factor = torch.where(delta > 0, down * far, torch.where(delta < 0, 1.0 / (up * far), torch.ones_like(far)))
    return rel[:, None] * factor


class PrecisionScheduler:
    """Decides the width of every unit. Pure bookkeeping: the optimizer applies the widths.

    Args:
        avg_bits: the budget in bits per element of scheduled units, scale bits included.
        min_bits, max_bits: allowed widths.
        max_error: per-unit cap on E_u; wins over the budget.
        interval, warmup_steps, warmup_bits, stats_steps, max_move, hysteresis: see module docstring.
        scale_bits: scale overhead per element (32 / block_size for fp32 scales).
        group: process group whose ranks must agree (None: no communication).
    """

    def __init__(
        self, *, avg_bits: float, min_bits: int, max_bits: int, max_error: float, interval: int,
        warmup_steps: int, warmup_bits: int, stats_steps: int, max_move: int, hysteresis: float,
        scale_bits: float, group: Any = None,
    ):  # fmt: skip
        self.avg_bits, self.min_bits, self.max_bits, self.max_error = avg_bits, min_bits, max_bits, max_error
        self.interval, self.warmup_steps, self.warmup_bits = interval, warmup_steps, warmup_bits
        self.stats_steps, self.max_move, self.hysteresis = stats_steps, max_move, hysteresis
        self.scale_bits, self.group = scale_bits, group
        self.names: list[str] = []
        self.numel: torch.Tensor | None = None
        self.bits: torch.Tensor | None = None
        self.decisions = 0
        self.history: list[Decision] = []

    # --------------------------------------------------------------------------- set-up
    def _distributed(self) -> bool:
        return self.group is not None and dist.is_available() and dist.is_initialized()

    def _device(self) -> torch.device:
        if self._distributed() and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def setup(self, local_numel: dict[str, int]) -> None:
        """Agree on the unit names (all-gather, once) and their total element counts."""
        names = set(local_numel)
        if self._distributed():
            gathered: list[Any] = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, sorted(names), group=self.group)
            names = set().union(*map(set, gathered))
        if self.names and self.names != sorted(names):  # names restored from a checkpoint
            diff = sorted(set(self.names) ^ names)[:5]
            raise ValueError(f"the checkpoint's scheduled units differ from this model's (first differences: {diff})")
        self.names = sorted(names)
        n = torch.tensor([float(local_numel.get(k, 0)) for k in self.names], dtype=torch.float64)
        self.numel = self._all_reduce(n)
        if self.bits is None:
            self.bits = torch.full((len(self.names),), self.warmup_bits, dtype=torch.long)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not self._distributed():
            return t
        dev = self._device()
        buf = t.to(dev)
        dist.all_reduce(buf, group=self.group)
        return buf.cpu()

    # --------------------------------------------------------------------------- schedule
    def collecting(self, step: int) -> bool:
        """Whether the step numbered ``step`` should accumulate error statistics."""
        nxt = self.next_decision(step)
        return nxt - self.stats_steps < step <= nxt

    def next_decision(self, step: int) -> int:
        if step <= self.warmup_steps:
            return self.warmup_steps
        k = -(-(step - self.warmup_steps) // self.interval)
        return self.warmup_steps + k * self.interval

    def due(self, step: int) -> bool:
        return step >= self.warmup_steps and step == self.next_decision(step)

    def current(self) -> dict[str, int]:
        return {k: int(b) for k, b in zip(self.names, self.bits.tolist())}

    def average_bits(self, bits: torch.Tensor | None = None) -> float:
        bits = self.bits if bits is None else bits
        n = self.numel
        return float((n * bits.double()).sum() / n.sum()) + self.scale_bits

    # --------------------------------------------------------------------------- decisions
    def decide(self, step: int, local_stats: dict[str, torch.Tensor]) -> Decision:
        """Allocate widths from this rank's sums per unit (all-reduced here):
        ``[err, ref]`` accumulated over the statistics steps, then, from the last step alone,
        ``[err, ref, err at b-1, err at b+1]`` (zeros where not measured)."""
        s = torch.zeros(len(self.names), 6, dtype=torch.float64)
        index = {k: i for i, k in enumerate(self.names)}
        for k, v in local_stats.items():
            v = v.detach().double().cpu()
            s[index[k], : v.numel()] = v
        s = self._all_reduce(s)
        rel = torch.nan_to_num(_ratio(s[:, 0], s[:, 1]), nan=0.0)  # no statistics: no measured damage
        error = error_curves(rel, self.bits, _ratio(s[:, 4], s[:, 2]), _ratio(s[:, 2], s[:, 5]))
        first = self.decisions == 0
        lower = upper = None
        if not first:
            lower = (self.bits - self.max_move).clamp(self.min_bits, self.max_bits)
            upper = (self.bits + self.max_move).clamp(self.min_bits, self.max_bits)
        new = allocate(
            self.numel, error, avg_bits=self.avg_bits, min_bits=self.min_bits, max_bits=self.max_bits,
            max_error=self.max_error, scale_bits=self.scale_bits, lower=lower, upper=upper,
        )  # fmt: skip
        if not first:
            old_err = float((self.numel * rel).sum())
            new_err = float((self.numel * error.gather(1, (new - MIN_BITS)[:, None]).squeeze(1)).sum())
            over_budget = self.average_bits() > self.avg_bits + 1e-9
            if not over_budget and old_err - new_err <= self.hysteresis * old_err:
                new = self.bits.clone()
        moved = int((new != self.bits).sum())
        self.bits = new
        self.decisions += 1
        d = Decision(step, self.current(), moved, self.average_bits(),
                     {k: float(torch.nan_to_num(r)) for k, r in zip(self.names, rel)})  # fmt: skip
        self.history.append(d)
        return d

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names), "bits": self.bits.tolist() if self.bits is not None else None,
            "decisions": self.decisions,
            "history": [
                {"step": d.step, "bits": [d.bits[k] for k in self.names], "moved": d.moved, "avg_bits": d.avg_bits,
                 "errors": [d.errors.get(k, 0.0) for k in self.names]}
                for d in self.history
            ],
        }  # fmt: skip

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.names and list(sd["names"]) != self.names:
            missing = sorted(set(self.names) ^ set(sd["names"]))[:5]
            raise ValueError(f"scheduler checkpoint units differ from this model's (first differences: {missing})")
        self.names = list(sd["names"])
        self.bits = None if sd["bits"] is None else torch.tensor(sd["bits"], dtype=torch.long)
        self.decisions = int(sd["decisions"])
        self.history = [
            Decision(h["step"], dict(zip(self.names, h["bits"])), h["moved"], h["avg_bits"], dict(zip(self.names, h["errors"])))
            for h in sd["history"]
        ]
