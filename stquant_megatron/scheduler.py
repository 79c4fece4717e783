"""The STQuant precision scheduler: measured sensitivity -> budgeted bits -> in-place transitions.

Per unit (parameter x moment) the fused step measures, over the ``stats_steps`` steps before each
decision, the damage its quantization does to Adam's update direction U = m / denom::

    E_u = sum ||U(Q(m), v) - U(m, v)||^2 / sum ||U(m, v)||^2      (exp_avg units; likewise exp_avg_sq)

Both sums run over a sample: each step, every ``SAMPLE_STRIDE``-th program of the kernel (1024
elements, or one block above that) measures from its registers, the others pay nothing; the phase
rotates (``sample_phase``), so ``SAMPLE_STRIDE`` consecutive statistics steps (the default
``stats_steps``) measure every element once. On the last of those steps the kernel also measures
the error one width below and one above, and at the current width again, all on the same sample,
so the ratios E(b-1)/E(b) and E(b)/E(b+1) compare like with like. The error curve uses those measured
ratios for the neighbouring widths and continues with 4 per bit beyond them (one more bit halves
the quantization step, which quarters the squared error).

After every statistics step each rank's per-unit sums go into a fixed ``[num_units, 5]`` tensor
(zeros for units it holds no shard of) that is all-reduced over the optimizer's process group and
added to the window: every rank holds the same global sums at every step (so a checkpoint taken
inside a window carries the global sums, whichever rank writes it), and runs the same deterministic
``allocation.allocate`` on them at the decision: every rank ends with identical bits.

The budget ``avg_bits`` bounds the state of every rank from the first step: the units start at the
widths a neutral allocation gives under the budget (or at ``warmup_bits`` when set, which must fit),
statistics are measured from step 1, and the first decision comes after ``warmup_steps`` steps, then
one every ``interval`` steps. After the first decision a unit moves at most ``max_move`` levels per
decision; a new plan is adopted only if it lowers the total error by more than ``hysteresis``
(relative) or the current plan breaks the budget. A unit that had no gradient during the window
keeps its width. See ``docs/scheduler.md``.

The format is a width too (``exp_avg_sq_format="auto"``): a matrix's exp_avg_sq may be factored
(width 0: row and column statistics, ~0 bits per element). On the probe step the optimizer measures,
for each packed exp_avg_sq that may be factored, the same relative error of the update direction that
the factored estimate would cause (built from the row and column means of its decoded exp_avg_sq, on
the probe's sample); the allocation weighs it against the widths at the statistics' real cost on every
rank. Factored is the level below ``min_bits`` for ``max_move``. A factored unit has no dense
exp_avg_sq to measure against, so it is not re-measured: it holds its format (a re-check would need a
dense shadow of a sample updated every step, per unit); switching back is still possible when a
checkpoint is loaded under another configuration.

Memory is O(units): the last ``history_keep`` decisions stay in memory and in checkpoints; the full
history is appended, one JSON line per decision, to ``history_path`` when set.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .allocation import MAX_BITS, MIN_BITS, allocate
from .kernels.common import SAMPLE_STRIDE

WIDTHS = torch.arange(MIN_BITS, MAX_BITS + 1, dtype=torch.float64)
DEFAULT_RATIO = 4.0
"""Error ratio per bit where it was not measured: one more bit halves the quantization step."""
NUM_STATS = 7
"""Window columns per unit: err, ref (every statistics step), then from the probe step: err at b,
err at b-1, err at b+1 (the probe's sampled blocks), and for an exp_avg_sq unit that may be factored,
err and ref of the factored estimate (``STQuantAdamW._factored_probe``)."""
HISTORY_KEEP = 8
HISTORY_FORMAT = "stquant-history-v2"
STATE_VERSION = 3
LEGACY_NUM_STATS = 5
"""Window columns of version-2 checkpoints (no factored probe): loaded with the new columns at 0."""


@dataclass
class Decision:
    """One decision: the step, the per-unit bits after it, and how many units moved."""

    step: int
    bits: dict[str, int]
    moved: int
    avg_bits: float
    errors: dict[str, float] = field(default_factory=dict)

    def row(self, names: list[str]) -> dict[str, Any]:
        return {"step": self.step, "bits": [self.bits[k] for k in names], "moved": self.moved,
                "avg_bits": self.avg_bits, "errors": [self.errors.get(k, 0.0) for k in names]}  # fmt: skip


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


def _bad(unit: str, fieldname: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"scheduler checkpoint: unit {unit!r} has {fieldname}={value!r}; {allowed}")


class PrecisionScheduler:
    """Decides the width of every unit. Pure bookkeeping: the optimizer applies the widths.

    Args:
        avg_bits: the budget in bits per element of scheduled units, scale bits included; it holds
            on every rank of ``group`` at every step.
        min_bits, max_bits: allowed widths.
        max_error: per-unit cap on E_u, met wherever the budget allows it.
        interval, warmup_steps, warmup_bits, stats_steps, max_move, hysteresis: see module docstring.
        scale_bits: scale overhead per element (32 / block_size for fp32 scales).
        group: process group whose ranks must agree (None: no communication).
        history_keep: decisions kept in memory and in checkpoints.
    """

    def __init__(
        self, *, avg_bits: float, min_bits: int, max_bits: int, max_error: float, interval: int,
        warmup_steps: int, warmup_bits: int | None, stats_steps: int, max_move: int, hysteresis: float,
        scale_bits: float, group: Any = None, history_keep: int = HISTORY_KEEP,
    ):  # fmt: skip
        self.avg_bits, self.min_bits, self.max_bits, self.max_error = avg_bits, min_bits, max_bits, max_error
        self.interval, self.warmup_steps, self.warmup_bits = interval, warmup_steps, warmup_bits
        self.stats_steps, self.max_move, self.hysteresis = stats_steps, max_move, hysteresis
        self.scale_bits, self.group = scale_bits, group
        self.names: list[str] = []
        self.numel: torch.Tensor | None = None
        """float64 [U]: elements per unit over the group, each replicated copy counted once."""
        self.rank_numel: torch.Tensor | None = None
        """float64 [R, U]: elements of each unit each rank holds (its memory), R = group size."""
        self.bits: torch.Tensor | None = None
        """int64 [U]: each unit's width; 0 = factored (a unit with ``factored_bits`` > 0 only)."""
        self.factored_bits: torch.Tensor | None = None
        """float64 [U]: bits the factored statistics of a unit take on each rank holding part of it
        (32 * (rows + cols)); 0 for units that cannot be factored."""
        self.decisions = 0
        self.window: torch.Tensor | None = None
        """float64 [U, NUM_STATS]: global statistics of the current window (identical on all ranks)."""
        self.moves: torch.Tensor | None = None
        """int64 [U]: how many decisions changed each unit's width."""
        self.history: collections.deque[Decision] = collections.deque(maxlen=history_keep)
        self.history_path: str | None = None
        """When set (on one rank), every decision is appended to this file as one JSON line."""
        self._headers: dict[str, list[str]] = {}

    # --------------------------------------------------------------------------- set-up
    def _distributed(self) -> bool:
        return self.group is not None and dist.is_available() and dist.is_initialized()

    def _device(self) -> torch.device:
        if self._distributed() and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def setup(self, local_numel: dict[str, int], replicas: dict[str, int] | None = None,
              factored_bits: dict[str, float] | None = None) -> None:
        """Agree on the unit names (all-gather) and their element counts. Called once, and again
        when units are added (new units start at ``min_bits``: the budget keeps holding).

        ``replicas[unit]``: how many ranks of the group hold the same elements of ``unit``'s
        parameter besides being data-parallel shards (e.g. the tensor-parallel size for a parameter
        every TP rank keeps whole); those copies count once in the unit's size.
        ``factored_bits[unit]``: the unit may be factored (width 0), its statistics then taking this
        many bits on every rank that holds part of it (agreed as the maximum over ranks)."""
        names = set(local_numel)
        if self._distributed():
            gathered: list[Any] = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, sorted(names), group=self.group)
            names = set().union(*map(set, gathered))
        names = sorted(names)
        old = {k: i for i, k in enumerate(self.names)}
        replicas = replicas or {}
        local = torch.tensor([float(local_numel.get(k, 0)) for k in names], dtype=torch.float64)
        weight = torch.tensor([1.0 / max(1, replicas.get(k, 1)) for k in names], dtype=torch.float64)
        self.numel = self._all_reduce(local * weight)
        self.rank_numel = self._all_gather(local)
        fb = torch.tensor([float((factored_bits or {}).get(k, 0.0)) for k in names], dtype=torch.float64)
        self.factored_bits = self._all_reduce(fb, op=dist.ReduceOp.MAX) if self._distributed() else fb
        if self.bits is None:
            self.names = names
            self.bits = self._initial_bits()
            self.moves = torch.zeros(len(names), dtype=torch.long)
            self.window = torch.zeros(len(names), NUM_STATS, dtype=torch.float64, device=self._device())
            return
        keep = [old.get(k) for k in names]
        bits = torch.full((len(names),), self.min_bits, dtype=torch.long)
        moves = torch.zeros(len(names), dtype=torch.long)
        window = torch.zeros(len(names), NUM_STATS, dtype=torch.float64, device=self._device())
        for i, j in enumerate(keep):
            if j is not None:
                bits[i], moves[i], window[i] = self.bits[j], self.moves[j], self.window[j]
        self.names, self.bits, self.moves, self.window = names, bits, moves, window

    def _initial_bits(self) -> torch.Tensor:
        """``warmup_bits`` if set, else a neutral allocation (the same curve for every unit) under the
        budget on every rank: every width is as even as the budget allows."""
        u = len(self.names)
        if self.warmup_bits is not None:
            return torch.full((u,), self.warmup_bits, dtype=torch.long)
        neutral = DEFAULT_RATIO ** -(WIDTHS - MIN_BITS)
        return allocate(
            self.numel.clamp_min(1e-12), neutral.expand(u, -1).clone(), avg_bits=self.avg_bits,
            min_bits=self.min_bits, max_bits=self.max_bits, scale_bits=self.scale_bits, rank_numel=self.rank_numel,
        )  # fmt: skip

    def _all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if not self._distributed():
            return t
        buf = t.to(self._device())
        dist.all_reduce(buf, group=self.group, op=dist.ReduceOp.SUM if op is None else op)
        return buf.cpu()

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if not self._distributed():
            return t[None, :].clone()
        dev = self._device()
        parts = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t.to(dev), group=self.group)
        return torch.stack([p.cpu() for p in parts])

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

    def sample_phase(self, step: int) -> int:
        """Which programs of each unit measure the step's statistics (``kernels.common.sampled_programs``):
        the phase counts down to 0 at the decision step, so ``SAMPLE_STRIDE`` consecutive statistics
        steps measure every program once, and the probe step (the decision step) measures every unit's
        first program."""
        return (self.next_decision(step) - step) % SAMPLE_STRIDE

    def due(self, step: int) -> bool:
        return step >= self.warmup_steps and step == self.next_decision(step)

    def current(self) -> dict[str, int]:
        return {k: int(b) for k, b in zip(self.names, self.bits.tolist())}

    def _factored_extra(self, bits: torch.Tensor) -> torch.Tensor:
        """float64 [R]: per rank, the factored units' statistics bits minus the scale bits they do not pay."""
        zero = (bits == 0).double()
        h = (self.rank_numel > 0).double()
        fb = self.factored_bits if self.factored_bits is not None else torch.zeros_like(zero)
        return h @ (fb * zero) - self.scale_bits * (self.rank_numel @ zero)

    def average_bits(self, bits: torch.Tensor | None = None) -> float:
        """Bits per element over the group (scales and factored statistics included)."""
        bits = self.bits if bits is None else bits
        n = self.numel
        out = float((n * bits.double()).sum() / n.sum().clamp_min(1e-300)) + self.scale_bits
        if bool((bits == 0).any()):  # each rank's statistics, over its elements
            out += float(self._factored_extra(bits).sum() / self.rank_numel.sum().clamp_min(1e-300))
        return out

    def rank_bits(self, bits: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [R]: bits per element of each rank's scheduled state (scales and factored statistics included)."""
        bits = self.bits if bits is None else bits
        a = self.rank_numel
        out = (a @ bits.double()) / a.sum(1).clamp_min(1e-300) + self.scale_bits
        if bool((bits == 0).any()):
            out = out + self._factored_extra(bits) / a.sum(1).clamp_min(1e-300)
        return out

    def factorable(self) -> torch.Tensor:
        """bool [U]: units that may be factored (width 0)."""
        if self.factored_bits is None:
            return torch.zeros(len(self.names), dtype=torch.bool)
        return self.factored_bits > 0

    def in_range(self, bits: torch.Tensor | None = None) -> torch.Tensor:
        """bool [U]: widths this scheduler may hold (min..max bits, or 0 where a unit may be factored)."""
        bits = self.bits if bits is None else bits
        return ((bits >= self.min_bits) & (bits <= self.max_bits)) | ((bits == 0) & self.factorable())

    def within_budget(self, bits: torch.Tensor | None = None) -> bool:
        held = self.rank_numel.sum(1) > 0
        return bool((self.rank_bits(bits)[held] <= self.avg_bits + 1e-9).all())

    # --------------------------------------------------------------------------- statistics
    def accumulate(self, local_stats: dict[str, torch.Tensor]) -> None:
        """Add one step's statistics: per unit this rank's ``[err, ref]`` sums, or on the probe step
        ``[err, ref, err at b, err at b-1, err at b+1]`` (the last three on the sampled blocks).
        All-reduced over the group here, so every rank's window holds the global sums."""
        dev = self._device()
        s = torch.zeros(len(self.names), NUM_STATS, dtype=torch.float64, device=dev)
        index = {k: i for i, k in enumerate(self.names)}
        rows, vals = [], []
        for k, v in local_stats.items():
            rows.append(index[k])
            vals.append(torch.nn.functional.pad(v.detach().to(dev, torch.float64), (0, NUM_STATS - v.numel())))
        if rows:
            s[torch.tensor(rows, device=dev)] = torch.stack(vals)
        if self._distributed():
            dist.all_reduce(s, group=self.group)
        self.window.add_(s)

    # --------------------------------------------------------------------------- decisions
    def decide(self, step: int) -> Decision:
        """Allocate widths from the window's statistics, then start a new window."""
        s = self.window.to("cpu", copy=True)
        self.window.zero_()
        measured = s[:, 1] > 0  # a unit without a gradient in the window has no reference energy
        rel = torch.where(measured, s[:, 0] / s[:, 1].clamp_min(1e-300), torch.zeros_like(s[:, 0]))
        packed_bits = torch.where(self.bits == 0, self.min_bits, self.bits)
        error = error_curves(rel, packed_bits, _ratio(s[:, 3], s[:, 2]), _ratio(s[:, 2], s[:, 4]))
        # Factored: a packed unit's measured error of the factored estimate (probe step); a factored unit
        # has no dense exp_avg_sq to measure against (no statistics: it holds, below).
        can_factor = self.factorable()
        factored = self.bits == 0
        error_f = torch.where(s[:, 6] > 0, s[:, 5] / s[:, 6].clamp_min(1e-300), torch.full_like(rel, torch.inf))
        error_f = torch.where(can_factor, error_f, torch.full_like(rel, torch.inf))
        error_f = torch.where(factored, torch.zeros_like(rel), error_f)
        rel = torch.where(factored, error_f, rel)
        first = self.decisions == 0
        if first:
            lower = torch.full_like(self.bits, self.min_bits)
            upper = torch.full_like(self.bits, self.max_bits)
        else:
            lower = (self.bits - self.max_move).clamp(self.min_bits, self.max_bits)
            upper = (self.bits + self.max_move).clamp(self.min_bits, self.max_bits)
        # the factored format is the level below min_bits, within max_move levels like any width
        reach = first | (self.bits - self.min_bits + 1 <= self.max_move)
        lower = torch.where(can_factor & reach, torch.zeros_like(lower), lower)
        hold = self.bits.clamp(self.min_bits, self.max_bits)
        hold = torch.where(factored & can_factor, self.bits, hold)
        lower = torch.where(measured, lower, hold)  # unmeasured (and factored) units hold
        upper = torch.where(measured, upper, hold)
        new = allocate(
            self.numel.clamp_min(1e-12), error, avg_bits=self.avg_bits, min_bits=self.min_bits,
            max_bits=self.max_bits, max_error=self.max_error, scale_bits=self.scale_bits, lower=lower, upper=upper,
            rank_numel=self.rank_numel,
            **({"factored_error": error_f, "factored_bits": self.factored_bits} if bool(can_factor.any()) else {}),
        )  # fmt: skip

        def chosen(b: torch.Tensor) -> torch.Tensor:  # E_u at the widths b
            e = error.gather(1, (b.clamp(MIN_BITS, MAX_BITS) - MIN_BITS)[:, None]).squeeze(1)
            return torch.where(b == 0, error_f, e)

        if not first:
            old_err = float((self.numel * rel).sum())
            new_err = float((self.numel * chosen(new)).sum())
            out_of_range = not bool(self.in_range().all())
            new_e = chosen(new)
            fewer_over_cap = int((new_e > self.max_error).sum()) < int((rel > self.max_error).sum())
            if (self.within_budget() and not out_of_range and not fewer_over_cap
                    and old_err - new_err <= self.hysteresis * old_err):  # fmt: skip
                new = self.bits.clone()
        changed = new != self.bits
        moved = int(changed.sum())
        self.moves += changed.long()
        self.bits = new
        self.decisions += 1
        d = Decision(step, self.current(), moved, self.average_bits(),
                     {k: float(r) for k, r in zip(self.names, rel.tolist())})  # fmt: skip
        self.history.append(d)
        if self.history_path:
            self.append_history(d, self.history_path)
        return d

    def append_history(self, d: Decision, path: str) -> None:
        """Append ``d`` to the JSON-lines file ``path``: one complete line per decision in one
        ``write(2)`` on an ``O_APPEND`` file (a header line with the unit names first, and again
        whenever they change)."""
        header = None
        known = self._headers.get(path)
        if known is None:  # first write to this file in this process: read its last header once
            known = _last_header(path) if os.path.exists(path) else None
        if known != self.names:
            header = json.dumps({"format": HISTORY_FORMAT, "names": self.names})
        self._headers[path] = list(self.names)
        data = ((header + "\n") if header else "") + json.dumps(d.row(self.names)) + "\n"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            buf = data.encode()
            while buf:
                buf = buf[os.write(fd, buf):]
        finally:
            os.close(fd)

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values, O(units): names, bits, decisions, moves, the window's global sums and the
        last ``history_keep`` decisions."""
        return {
            "version": STATE_VERSION, "names": list(self.names),
            "factored_bits": self.factored_bits.tolist() if self.factored_bits is not None else None,
            "bits": self.bits.tolist() if self.bits is not None else None, "decisions": self.decisions,
            "moves": self.moves.tolist() if self.moves is not None else None,
            "window": self.window.cpu().tolist() if self.window is not None else None,
            "history": [d.row(self.names) for d in self.history],
        }  # fmt: skip

    def validate_state_dict(self, sd: dict[str, Any]) -> None:
        """Raise ``ValueError`` (unit, field, value, allowed range) for anything this scheduler
        cannot take; changes nothing."""
        if not isinstance(sd, dict) or "names" not in sd or "bits" not in sd:
            got = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"scheduler checkpoint lacks 'names'/'bits' (has {got})")
        names = sd["names"]
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names) or len(set(names)) != len(names):
            raise ValueError("scheduler checkpoint: 'names' must be a list of distinct unit names")
        if self.names and list(names) != self.names:
            diff = sorted(set(self.names) ^ set(names))[:5]
            raise ValueError(f"scheduler checkpoint units differ from this model's (first differences: {diff})")
        bits = sd["bits"]
        if bits is None:
            return
        if not isinstance(bits, list) or len(bits) != len(names):
            raise ValueError(f"scheduler checkpoint: 'bits' should list {len(names)} widths, got {bits!r:.80}")
        for k, b in zip(names, bits):
            if not isinstance(b, int) or isinstance(b, bool) or not (MIN_BITS <= b <= MAX_BITS or b == 0):
                raise _bad(k, "bits", b, f"allowed widths are {MIN_BITS}..{MAX_BITS}, or 0 (factored)")
        dec = sd.get("decisions", 0)
        if not isinstance(dec, int) or isinstance(dec, bool) or dec < 0:
            raise ValueError(f"scheduler checkpoint: decisions={dec!r}; need an int >= 0")
        window = sd.get("window")
        if window is not None:
            w = torch.tensor(window, dtype=torch.float64)
            if tuple(w.shape) not in ((len(names), NUM_STATS), (len(names), LEGACY_NUM_STATS)):
                raise ValueError(f"scheduler checkpoint: window has shape {tuple(w.shape)}; need ({len(names)}, {NUM_STATS})")
            bad = ~(torch.isfinite(w) & (w >= 0)).all(1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise _bad(names[i], "window", window[i], "statistics are finite sums >= 0")
        moves = sd.get("moves")
        if moves is not None and (not isinstance(moves, list) or len(moves) != len(names)
                                  or not all(isinstance(m, int) and m >= 0 for m in moves)):  # fmt: skip
            raise ValueError(f"scheduler checkpoint: 'moves' should list {len(names)} ints >= 0")
        for h in sd.get("history") or []:
            if not isinstance(h, dict) or len(h.get("bits", ())) != len(names):
                raise ValueError("scheduler checkpoint: a history entry does not match the unit names")

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Validate (``validate_state_dict``), then restore. Version 1 entries (full history, no
        window) load with an empty window and their last ``history_keep`` decisions."""
        self.validate_state_dict(sd)
        names = list(sd["names"])
        self.names = names
        self.bits = None if sd["bits"] is None else torch.tensor(sd["bits"], dtype=torch.long)
        self.decisions = int(sd.get("decisions", 0))
        u = len(names)
        self.moves = torch.tensor(sd["moves"], dtype=torch.long) if sd.get("moves") is not None else torch.zeros(u, dtype=torch.long)
        w = sd.get("window")
        window = torch.zeros(u, NUM_STATS, dtype=torch.float64)
        if w is not None:
            saved = torch.tensor(w, dtype=torch.float64)
            window[:, : saved.shape[1]] = saved  # version 2: no factored probe columns
        self.window = window.to(self._device())
        self.history.clear()
        for h in (sd.get("history") or [])[-HISTORY_KEEP * 64 :]:  # the deque keeps the last history_keep
            self.history.append(Decision(int(h["step"]), dict(zip(names, h["bits"])), int(h["moved"]),
                                         float(h["avg_bits"]), dict(zip(names, h.get("errors") or []))))  # fmt: skip


def _last_header(path: str) -> list[str] | None:
    """Unit names of the last header line of a history file."""
    names = None
    with open(path) as f:
        for line in f:
            if line.startswith('{"format"'):
                try:
                    names = json.loads(line)["names"]
                except (ValueError, KeyError):
                    pass
    return names


def read_history(path: str) -> dict[str, Any]:
    """``{"names", "history"}`` from a JSON-lines history file: the latest header's names; decisions
    written under other names are mapped by name (0 bits where a unit did not exist). A trailing
    partial line (a crash during a write) is ignored."""
    names: list[str] = []
    blocks: list[tuple[list[str], dict]] = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}: line is not JSON ({e}); is it a stquant history file?") from None
            if "format" in obj:
                names = list(obj["names"])
            else:
                blocks.append((names, obj))
    rows = []
    for row_names, obj in blocks:
        if row_names == names:
            rows.append(obj)
        else:
            where = dict(zip(row_names, range(len(row_names))))
            pick = [where.get(k) for k in names]
            rows.append({**obj, "bits": [obj["bits"][j] if j is not None else 0 for j in pick],
                         "errors": [obj["errors"][j] if j is not None else 0.0 for j in pick]})  # fmt: skip
    return {"names": names, "history": rows}


