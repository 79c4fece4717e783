"""Optimizer-state memory measured, not bookkept: ``testing.memory.StateMemoryMeter`` follows every
storage ``optimizer.state`` holds, after every ATen operation (transitions included), without the
optimizer's own byte counts; its peak is compared with ``peak_state_bytes()`` and with the budget
plus the documented CPU slack (one re-coded unit's new codes and scales, docs/scheduler.md)."""

from __future__ import annotations

import pytest
import torch

import stquant_megatron.optim as optim_mod
from stquant_megatron import STQuantAdamW, STQuantConfig
from stquant_megatron.formats.packing import num_blocks
from stquant_megatron.testing.memory import StateMemoryMeter

BLOCK = 128


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 32)
    )


def _batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=gen) / 8
    for _ in range(steps):
        x = torch.randn(64, 64, generator=gen)
        yield x, torch.tanh(x @ w)


def _run(model, opt, steps):
    """Train; the meter sees every operation of every step. Returns the meter, each step's measured
    live bytes and bookkept ``state_bytes()``, and each decision's widths before and after."""
    meter = StateMemoryMeter(opt)
    ends, moves = [], []
    for x, y in _batches(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        before = dict(opt.scheduler.current()) if opt.scheduler.bits is not None else None
        with meter:
            opt.step()
        ends.append((meter.live_bytes(), opt.state_bytes()))
        if opt.scheduler.history and opt.scheduler.history[-1].step == opt.global_step:
            moves.append((before, dict(opt.scheduler.history[-1].bits)))
    return meter, ends, moves


def _unit_bytes(numel, bits):
    """Codes and fp32 scales of one unit at ``bits`` (docs/formats.md: ceil(n / block) * (bits * block / 8 + 4))."""
    return num_blocks(numel, BLOCK) * (bits * BLOCK // 8 + 4)


def _budget(model, cfg, avg_bits):
    """From the model alone: packed units at avg_bits per element (scales included) over whole
    blocks, fp32 escapes of small tensors (8 B per element) and one 4-byte step counter per parameter."""
    packed = [p for p in model.parameters() if p.numel() >= cfg.min_numel]
    small = [p for p in model.parameters() if p.numel() < cfg.min_numel]
    elems = sum(num_blocks(p.numel(), BLOCK) * BLOCK for p in packed)
    units = 2 * elems if cfg.exp_avg_sq_format == "packed" else elems
    factored = 0 if cfg.exp_avg_sq_format == "packed" else sum(4 * (p.shape[0] + p.shape[1]) for p in packed)
    return avg_bits / 8 * units + 8 * sum(p.numel() for p in small) + 4 * len(list(model.parameters())) + factored


def _moved_slack(model, moves):
    """The documented CPU slack: the largest new codes and scales of a unit that moved."""
    numel = {name: p.numel() for name, p in model.named_parameters()}
    out = 0
    for before, after in moves:
        for unit, b in after.items():
            if before is not None and before[unit] != b:
                out = max(out, _unit_bytes(numel[unit.rsplit(".", 1)[0]], b))
    return out


CASES = {
    # both moments packed at avg 4.0; starting at 2 bits, the first decision widens every unit
    "widen": dict(exp_avg_sq_format="packed", avg_bits=4.0, warmup_bits=2, warmup_steps=4, interval=4, stats_steps=2,
                  min_numel=1024),
    # avg 3.0 from the neutral start: later decisions narrow some units and widen others
    "reshuffle": dict(exp_avg_sq_format="packed", avg_bits=3.0, warmup_steps=4, interval=4, stats_steps=2,
                      min_numel=1024),
    # factored exp_avg_sq: only the exp_avg units are scheduled
    "factored": dict(exp_avg_sq_format="factored", avg_bits=3.25, warmup_bits=2, warmup_steps=4, interval=4,
                     stats_steps=2, min_numel=1024),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_measured_peak_equals_bookkeeping_and_fits_budget_plus_one_unit(case):
    cfg = STQuantConfig(**CASES[case])
    model = _model()
    opt = STQuantAdamW(model.named_parameters(), lr=1e-3, config=cfg)
    meter, ends, moves = _run(model, opt, 12)
    budget = _budget(model, cfg, cfg.avg_bits)
    slack = _moved_slack(model, moves)
    widened = sum(b > a[u] for a, bb in moves if a for u, b in bb.items())
    narrowed = sum(b < a[u] for a, bb in moves if a for u, b in bb.items())
    assert len(moves) == 3 and widened > 0 and slack > 0, moves
    if case == "reshuffle":
        assert narrowed > 0, moves
    # between steps the measured live bytes are the bookkept ones and within the budget itself
    assert all(live == book for live, book in ends), ends
    steady = max(live for live, _ in ends)
    assert steady <= budget, (steady, budget)
    # the peak: measured, transitions included, equals the bookkept high-water mark ...
    peak = meter.peak_bytes()
    assert peak == opt.peak_state_bytes(), (peak, opt.peak_state_bytes())
    # ... and stays within the budget plus one moved unit's new codes and scales, no more
    assert peak <= budget + slack, (peak, budget, slack)
    if case == "widen":  # the meter sees the transient copy: a widened unit's old and new codes at once
        assert peak > steady, (peak, steady)


def test_staged_transitions_keep_the_measured_peak_within_the_budget(monkeypatch):
    """With the old codes staged off the device (forced on the CPU), the state never holds a unit
    twice: the measured peak is within the budget itself."""
    monkeypatch.setattr(optim_mod, "_stage_on_host", lambda device: True)
    cfg = STQuantConfig(**CASES["widen"])
    model = _model()
    opt = STQuantAdamW(model.named_parameters(), lr=1e-3, config=cfg)
    meter, ends, moves = _run(model, opt, 8)
    assert sum(b > a[u] for a, bb in moves if a for u, b in bb.items()) > 0
    budget = _budget(model, cfg, cfg.avg_bits)
    assert meter.peak_bytes() == opt.peak_state_bytes() <= budget, (meter.peak_bytes(), opt.peak_state_bytes(), budget)


def test_meter_counts_state_not_scratch_and_sees_a_copy_while_both_live():
    """The meter itself: a tensor counts from its allocation once it enters the state, scratch never,
    a replaced tensor until it dies."""

    class Holder:
        def __init__(self):
            self.state = {}

    h = Holder()
    meter = StateMemoryMeter(h)
    with meter:
        a = torch.zeros(100)  # 400 bytes: becomes state below
        scratch = torch.ones(1000) * 2  # never state
        h.state["x"] = {"m": a}
        del a
        b = torch.zeros(50)  # 200 bytes while the old one is still held
        h.state["x"]["m"] = b
        torch.ones(1)  # an operation after the old one died
    del scratch
    tl = meter.timeline()
    assert meter.peak_bytes() == 600 and meter.live_bytes() == 200, tl
