"""The precision scheduler on the standalone optimizer: budget, transitions, agreement, resume."""

import io

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stquant_megatron.state as state_mod
from stquant_megatron import PackedState, STQuantAdamW, STQuantConfig
from stquant_megatron.testing.distributed import run_distributed

SCHED = dict(avg_bits=4.0, warmup_steps=6, interval=6, stats_steps=2, min_numel=1024)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 32)
    )


def _train(model, opt, steps, seed=1, start=0):
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(64, 64, generator=gen), torch.randn(64, 32, generator=gen)) for _ in range(start + steps)]
    losses, bits = [], []
    for x, y in data[start:]:
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bits.append(opt.unit_bits())
    return losses, bits


def test_scheduler_meets_budget_and_differentiates_units():
    model = _model()
    opt = STQuantAdamW(model.named_parameters(), lr=1e-3, config=STQuantConfig(**SCHED))
    _, bits = _train(model, opt, 5)
    assert set(v for v in bits[-1].values() if v != 32) == {8}  # warm-up at warmup_bits
    _train(model, opt, 20)
    sched = opt.scheduler
    assert abs(sched.average_bits() - 4.0) <= 0.05, sched.average_bits()
    packed = {k: v for k, v in opt.unit_bits().items() if v != 32}
    assert len(set(packed.values())) > 1, packed
    # bytes follow the bits: codes of every unit at its width
    for unit, b in packed.items():
        name, moment = unit.rsplit(".", 1)
        p = dict(model.named_parameters())[name]
        assert opt.state[p][moment].bits == b
    n = sum(p.numel() for p in model.parameters() if p.numel() >= 1024)
    assert abs(sum(b * dict(model.named_parameters())[u.rsplit(".", 1)[0]].numel() for u, b in packed.items()) / (2 * n) + 0.25 - sched.average_bits()) < 1e-9
    assert sched.history and sched.history[0].step == 6


class _MaxAlloc(TorchDispatchMode):
    """Records the largest floating-point tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_float = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.is_floating_point():
                self.max_float = max(self.max_float, t.numel())
        return out


def test_transition_scratch_memory_is_bounded_by_the_chunk(monkeypatch):
    numel, chunk = 1 << 16, 1 << 12
    monkeypatch.setattr(state_mod, "CHUNK_ELEMENTS", chunk)
    st = PackedState.zeros(numel, bits=8, kind="pow2", signed=True, block_size=128)
    st.copy_(torch.randn(numel))
    with _MaxAlloc() as mode:
        st.requantize(3, "pow2")
    assert st.bits == 3 and tuple(st.codes.shape) == (numel // 128, 3, 16)
    # fp32 scratch never exceeds one chunk (plus the [num_blocks] scales), never the tensor
    assert mode.max_float <= chunk, (mode.max_float, chunk)


def test_resume_with_scheduler_is_deterministic():
    cfg = STQuantConfig(**SCHED)
    model = _model()
    opt = STQuantAdamW(model.named_parameters(), lr=1e-3, config=cfg)
    full_losses, full_bits = _train(model, opt, 20)

    model = _model()
    opt = STQuantAdamW(model.named_parameters(), lr=1e-3, config=cfg)
    first, _ = _train(model, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = _model(seed=123)
    model2.load_state_dict(ck["model"])
    opt2 = STQuantAdamW(model2.named_parameters(), lr=1e-3, config=cfg)
    opt2.load_state_dict(ck["opt"])
    second, second_bits = _train(model2, opt2, 10, start=10)
    assert first + second == full_losses
    assert second_bits == full_bits[10:]
    assert len(opt2.scheduler.history) == len(opt.scheduler.history) + 1 or opt2.scheduler.history


def _agreement(rank, world):
    import torch.distributed as dist

    model = _model(seed=rank)  # different weights and data per rank: different statistics
    opt = STQuantAdamW(model.named_parameters(), lr=1e-3, config=STQuantConfig(**SCHED), process_group=dist.group.WORLD)
    _, bits = _train(model, opt, 24, seed=10 + rank)
    return [bits[s - 1] for s in (6, 12, 18, 24)], opt.scheduler.average_bits()


def test_all_ranks_agree_on_bits():
    results = run_distributed(_agreement, 2, timeout=240)
    (bits0, avg0), (bits1, avg1) = results
    assert bits0 == bits1
    assert avg0 == avg1 and abs(avg0 - 4.0) <= 0.05


def test_error_curves_use_measured_neighbours_then_four_per_bit():
    from stquant_megatron.scheduler import error_curves

    nan = float("nan")
    e = error_curves(torch.tensor([1.0, 2.0]), torch.tensor([4, 8]), torch.tensor([3.0, nan]), torch.tensor([5.0, nan]))
    want0 = [3.0 * 4, 3.0, 1.0, 1 / 5, 1 / 20, 1 / 80, 1 / 320]  # widths 2..8 around 4 bits
    want1 = [2.0 * 4.0**k for k in range(6, -1, -1)]  # not measured: 4 per bit from 8 bits down
    assert torch.allclose(e, torch.tensor([want0, want1], dtype=torch.float64))
    assert (e[:, :-1] >= e[:, 1:]).all()  # never increases with width
