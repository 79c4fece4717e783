"""The compiled Triton kernels on a CUDA device against the PyTorch twin on the CPU, bit for bit.

Every input is drawn on the CPU; the twin steps CPU copies, the kernel steps copies on ``DEVICE``;
the results are compared on the CPU (codes, scales, parameters and factored statistics with
``torch.equal``; the error statistics, which are sums taken in another order, to 1e-5).

Two modes, one code path:

* **compiled** (CUDA present and ``TRITON_INTERPRET`` unset: ``bash tests/run_tests.sh --gpu``):
  the kernels run compiled on the GPU, over the full matrix: every width pair x rounding x dtype
  set, every codebook, every statistics/probe phase, unit and grouped launches, the factored step,
  shard offsets past 2**31 (and 2**32), several block sizes and sizes of many programs.
* **interpreter** (everywhere else, CI included): the same tests on a small subset of the matrix
  at a tiny size, the kernel under ``TRITON_INTERPRET=1`` on the CPU, so this file's comparison
  code runs in CI.

``STQUANT_REQUIRE_COMPILED=1`` (set by ``run_tests.sh --gpu``) makes the interpreter mode a failure:
a GPU run that silently fell back to the interpreter would prove nothing.
"""

from __future__ import annotations

import os

import pytest
import torch

from stquant_megatron.config import AUTO_CODEBOOK
from stquant_megatron.formats.codebooks import get_codebook
from stquant_megatron.kernels import (
    GroupEntry, rng_key, step_scalars, torch_factored_adam_step, torch_packed_adam_group_step, torch_packed_adam_step,
    triton_factored_adam_step, triton_packed_adam_group_step, triton_packed_adam_step,
)  # fmt: skip
from stquant_megatron.kernels.common import SAMPLE_STRIDE, launch_shape
from stquant_megatron.state import PackedState

from conftest import ALL_BITS, valid_kinds

COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if COMPILED else "cpu")
MODE = "compiled" if COMPILED else "interpreter"

pytestmark = pytest.mark.triton


def pick(full: list, tiny: list) -> list:
    """The full matrix when compiled, a small subset of it under the interpreter."""
    if not COMPILED:
        assert all(t in full for t in tiny), "the interpreter subset must be cases of the full matrix"
    return full if COMPILED else tiny


def test_mode_is_the_one_asked_for():
    """``run_tests.sh --gpu`` asks for the compiled kernels; nothing falls back silently."""
    if os.environ.get("STQUANT_REQUIRE_COMPILED") == "1":
        assert COMPILED, (f"compiled GPU parity asked for, but torch.cuda.is_available()={torch.cuda.is_available()} "
                          f"and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")  # fmt: skip
        assert DEVICE.type == "cuda"
    else:
        assert COMPILED or os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------ helpers

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# (param, grad, scale) dtype sets
DTYPE_SETS = [("f32", "f32", "f32"), ("bf16", "bf16", "bf16"), ("f16", "f16", "f32"), ("f32", "bf16", "f32"),
              ("bf16", "f32", "f32")]  # fmt: skip


def _neighbours(mk, mb, vk, vb):
    def book(kind, b, signed):
        if not 2 <= b <= 8:
            return None
        return get_codebook(kind if b in (2, 3, 4) or kind != "log" else "pow2", b, signed)

    return (book(mk, mb - 1, True), book(mk, mb + 1, True), book(vk, vb - 1, False), book(vk, vb + 1, False))


def _on(books, dev):
    return tuple(None if b is None else get_codebook(b.kind, b.bits, b.signed, dev) for b in books)


def _random_state(n, bits, kind, signed, block, sdtype, gen):
    """A packed state with arbitrary codes (the never-produced top signed code included) and scales
    over several decades."""
    st = PackedState.zeros(n, bits=bits, kind=kind, signed=signed, block_size=block, scale_dtype=sdtype)
    st.codes.copy_(torch.randint(0, 256, tuple(st.codes.shape), generator=gen, dtype=torch.int64).to(torch.uint8))
    nb = st.scale.numel()
    st.scale.copy_((torch.rand(nb, generator=gen) * torch.pow(10.0, -6 * torch.rand(nb, generator=gen))).to(sdtype))
    return st


def _grads(n, steps, gdtype, gen, block):
    """Magnitudes over seven decades, exact zeros and (with more than two blocks) a zero block."""
    out = []
    for _ in range(steps):
        x = torch.randn(n, generator=gen) * torch.pow(10.0, -5.0 + 6.0 * torch.rand(n, generator=gen))
        x[torch.rand(n, generator=gen) < 0.05] = 0.0
        if n > 2 * block:
            x[block : 2 * block] = 0.0
        out.append(x.to(gdtype))
    return out


def _copy(tensors, dev):
    return [t.clone().to(dev) for t in tensors]


def _cpu(tensors):
    return [t.detach().cpu() for t in tensors]


def assert_bits_equal(want, got, names):
    """Equal bit for bit (dtype, shape and every bit; NaN payloads included)."""
    for a, b, name in zip(want, got, names):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_floating_point():
            iview = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = a.view(iview), b.view(iview)
        diff = (a != b).nonzero()
        assert diff.numel() == 0, f"{MODE}: {name} differs at {diff.shape[0]} positions, first {diff[:5].tolist()}"


def _stats_close(want, got, name):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12, msg=lambda m: f"{MODE}: {name}: {m}")


def test_comparison_detects_a_single_bit():
    """The comparison fails on one flipped bit (of a code byte, a bf16 scale or an fp32 parameter)."""
    for t in (torch.randint(0, 256, (4, 3, 8), dtype=torch.uint8), torch.rand(7).to(torch.bfloat16), torch.randn(9)):
        u = t.clone()
        u.view(torch.uint8).view(-1)[3] ^= 1
        with pytest.raises(AssertionError, match="differs at 1 positions"):
            assert_bits_equal([t], [u], ["x"])
    assert_bits_equal([torch.tensor([float("nan")])], [torch.tensor([float("nan")])], ["nan"])


# ------------------------------------------------------------------------------------ unit launches


def run_unit(fn, dev, *, mb, vb, mk=None, vk=None, dt=("f32", "f32", "f32"), stochastic=False, n=None, block=64,
             steps=3, offset=0, stats=False, probe=False, phase0=0, seed=0, wd=0.1, adamw=True):  # fmt: skip
    """``steps`` steps of one unit on ``dev`` from a random state; returns CPU copies of params,
    codes, scales and the statistics."""
    mk = mk or AUTO_CODEBOOK["exp_avg"][mb]
    vk = vk or AUTO_CODEBOOK["exp_avg_sq"][vb]
    n = n if n is not None else (20_011 if COMPILED else 300)
    pdtype, gdtype, sdtype = (DTYPES[x] for x in dt)
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(pdtype)
    m = _random_state(n, mb, mk, True, block, sdtype, gen)
    v = _random_state(n, vb, vk, False, block, sdtype, gen)
    grads = _grads(n, steps, gdtype, gen, block)
    p, mc, ms, vc, vs = _copy([p, m.codes, m.scale, v.codes, v.scale], dev)
    mcb, vcb = get_codebook(mk, mb, True, dev), get_codebook(vk, vb, False, dev)
    st = torch.zeros(3, device=dev) if stats else None
    ns = torch.zeros(6, device=dev) if probe else None
    books = _on(_neighbours(mk, mb, vk, vb), dev) if probe else None
    for step in range(1, steps + 1):
        sc = step_scalars(lr=1e-2 * step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, step=step, adamw=adamw)
        fn(p, grads[step - 1].to(dev), mc, ms, vc, vs, mcb, vcb, sc, block_size=block, stochastic=stochastic,
           rng_key=rng_key(seed, step, 77), index_offset=offset, stats=st, neighbor_codebooks=books,
           neighbor_stats=ns, sample_phase=phase0 + step - 1)  # fmt: skip
    return _cpu([p, mc, ms, vc, vs]), (None if st is None else st.cpu()), (None if ns is None else ns.cpu())


def both_units(**kw):
    want = run_unit(torch_packed_adam_step, torch.device("cpu"), **kw)
    got = run_unit(triton_packed_adam_step, DEVICE, **kw)
    assert_bits_equal(want[0], got[0], ["param", "exp_avg codes", "exp_avg scale", "exp_avg_sq codes", "exp_avg_sq scale"])
    assert bool((want[0][2].float() > 0).any()) and bool((want[0][4].float() > 0).any())
    for i, name in ((1, "stats"), (2, "neighbour stats")):
        if want[i] is not None:
            _stats_close(want[i], got[i], name)
    return want, got


WIDTH_PAIRS = [(b, b) for b in ALL_BITS] + [(2, 8), (8, 2), (3, 5), (5, 3), (4, 6), (7, 2)]
# each width pair with both roundings (the dtype sets in turn), and every dtype set at 4/4 with both
WIDTH_CASES = [(w, sr, DTYPE_SETS[(i + sr) % len(DTYPE_SETS)]) for i, w in enumerate(WIDTH_PAIRS) for sr in (False, True)]
WIDTH_CASES += [((4, 4), sr, dt) for dt in DTYPE_SETS for sr in (False, True) if ((4, 4), sr, dt) not in WIDTH_CASES]
WIDTH_TINY = [WIDTH_CASES[6], WIDTH_CASES[15], WIDTH_CASES[17]]


@pytest.mark.parametrize("bits,stochastic,dt", pick(WIDTH_CASES, WIDTH_TINY),
                         ids=lambda x: "-".join(x) if isinstance(x, tuple) and isinstance(x[0], str) else
                         (f"m{x[0]}v{x[1]}" if isinstance(x, tuple) else ("sr" if x else "rn")))  # fmt: skip
def test_unit_every_width_rounding_and_dtype(bits, stochastic, dt):
    mb, vb = bits
    both_units(mb=mb, vb=vb, dt=dt, stochastic=stochastic, seed=mb * 10 + vb, wd=0.1 if (mb + vb) % 4 else 0.0,
               adamw=mb % 2 == 0)  # fmt: skip


KIND_CASES = [(b, mk, vk) for b in ALL_BITS for mk in valid_kinds(b, True) for vk in valid_kinds(b, False)]
KIND_TINY = [(2, "linear", "log"), (3, "pow2", "linear"), (8, "linear", "pow2")]


@pytest.mark.parametrize("bits,mk,vk", pick(KIND_CASES, KIND_TINY), ids=lambda x: str(x))
def test_unit_every_codebook(bits, mk, vk):
    both_units(mb=bits, vb=bits, mk=mk, vk=vk, stochastic=(bits + len(mk) + len(vk)) % 2 == 1, seed=bits,
               dt=DTYPE_SETS[bits % len(DTYPE_SETS)])  # fmt: skip


BLOCKS = [32, 64, 128, 256, 512, 1024, 2048]
SHAPE_CASES = [(n, b) for b in BLOCKS for n in (1, b - 1, 5 * b + 3, 40 * 1024 + 17)]
SHAPE_TINY = [(1, 32), (5 * 128 + 3, 128), (2047, 2048)]


@pytest.mark.parametrize("n,block", pick(SHAPE_CASES, SHAPE_TINY), ids=lambda x: str(x))
def test_unit_sizes_and_block_sizes(n, block):
    both_units(mb=3, vb=5, n=n, block=block, stochastic=True, stats=True, seed=n % 97)


PHASE_CASES = [(ph, mb, vb, vk) for ph in range(SAMPLE_STRIDE) for mb, vb, vk in ((4, 4, "pow2"), (3, 3, "log"),
                                                                                  (8, 2, "linear"), (2, 3, "log"))]
PHASE_TINY = [(1, 4, 4, "pow2"), (2, 3, 3, "log")]


@pytest.mark.parametrize("phase,mb,vb,vk", pick(PHASE_CASES, PHASE_TINY), ids=lambda x: str(x))
def test_unit_statistics_and_probe_every_phase(phase, mb, vb, vk):
    """The sampled error statistics and the neighbouring-width probe, at every sample phase, over
    enough programs that every phase samples some (and the step's bits are unchanged by them)."""
    block = 128
    g = launch_shape(block)[0]
    n = (3 * SAMPLE_STRIDE * g * block + 77) if COMPILED else (SAMPLE_STRIDE * g * block // 4 + 5)
    if not COMPILED:
        block = 32  # more programs at a tiny size: G = 32 blocks of 32 per program
        n = SAMPLE_STRIDE * launch_shape(block)[0] * block + 5
    want, _ = both_units(mb=mb, vb=vb, vk=vk, n=n, block=block, stochastic=phase % 2 == 1, stats=True, probe=True,
                         phase0=phase, seed=phase)  # fmt: skip
    assert float(want[1][2]) > 0 and float(want[2][4]) > 0
    plain = run_unit(torch_packed_adam_step, torch.device("cpu"), mb=mb, vb=vb, vk=vk, n=n, block=block,
                     stochastic=phase % 2 == 1, phase0=phase, seed=phase)  # fmt: skip
    assert_bits_equal(plain[0], want[0], ["param", "m codes", "m scale", "v codes", "v scale"])


OFFSETS = [2**31 - 1000, 2**31, 2**31 + 12345, 2**32 - 300, 2**32 + 7, 3 * 2**32 + 5 * 2**31 + 1]
OFFSET_CASES = [(off, dt) for off in OFFSETS for dt in (DTYPE_SETS[0], DTYPE_SETS[1])]
OFFSET_TINY = [(2**31 - 1000, DTYPE_SETS[0]), (2**32 - 300, DTYPE_SETS[1])]


@pytest.mark.parametrize("offset,dt", pick(OFFSET_CASES, OFFSET_TINY), ids=lambda x: str(x))
def test_unit_shard_offsets_past_2_31(offset, dt):
    """Stochastic rounding draws from the element's global index: shard offsets past 2**31 and
    2**32 (and shards crossing them) give the twin's bits, and the offset does matter."""
    want, _ = both_units(mb=4, vb=4, dt=dt, stochastic=True, offset=offset, seed=3)
    other = run_unit(torch_packed_adam_step, torch.device("cpu"), mb=4, vb=4, dt=dt, stochastic=True,
                     offset=offset + 2**31, seed=3)  # fmt: skip
    assert not torch.equal(want[0][1], other[0][1])


# ------------------------------------------------------------------------------------ grouped launches

GROUP_SIZES = [0, 1, 127, 128 * 5 + 3, 1000, 64, 1024 * 5 + 37]


def run_group(fn, dev, *, mb, vb, vk, stochastic, probe, dt=("f32", "f32", "f32"), block=64, steps=2,
              big=False):  # fmt: skip
    pdtype, gdtype, sdtype = (DTYPES[x] for x in dt)
    gen = torch.Generator().manual_seed(mb * 100 + vb)
    mk = "pow2"
    mcb, vcb = get_codebook(mk, mb, True, dev), get_codebook(vk, vb, False, dev)
    sizes = GROUP_SIZES + ([70_001, 3] if big else [])
    units = []
    for n in sizes:
        p = torch.randn(n, generator=gen).to(pdtype)
        m = _random_state(n, mb, mk, True, block, sdtype, gen)
        v = _random_state(n, vb, vk, False, block, sdtype, gen)
        units.append(_copy([p, m.codes, m.scale, v.codes, v.scale], dev))
    books = _on(_neighbours(mk, mb, vk, vb), dev) if probe else None
    stats = torch.zeros(len(units), 3, device=dev)
    nstats = torch.zeros(len(units), 6, device=dev) if probe else None
    for step in range(1, steps + 1):
        entries = []
        for i, (p, mc, ms, vc, vs) in enumerate(units):
            g = (torch.randn(p.numel(), generator=gen) * 10.0 ** (i % 7 - 3)).to(gdtype).to(dev)
            sc = step_scalars(lr=1e-2 * (i + 1), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 * (i % 2),
                              step=step + i, adamw=i != 3)  # fmt: skip
            entries.append(GroupEntry(p, g, mc, ms, vc, vs, sc, rng_key(5, step, i), 3_000_000_000 * (i % 2) + 7 * i))
        fn(entries, mcb, vcb, block_size=block, stochastic=stochastic, stats=stats, neighbor_codebooks=books,
           neighbor_stats=nstats, sample_phase=step - 1)  # fmt: skip
    return [_cpu(u) for u in units], stats.cpu(), (None if nstats is None else nstats.cpu())


GROUP_CASES = [(mb, vb, vk, sr, probe, DTYPE_SETS[(i + sr + probe) % 3], 64)
               for i, (mb, vb, vk) in enumerate(((4, 4, "pow2"), (3, 5, "pow2"), (2, 2, "log"), (8, 3, "log"),
                                                 (6, 7, "linear")))
               for sr, probe in ((False, False), (True, True), (False, True))]
GROUP_CASES += [(4, 4, "pow2", True, True, DTYPE_SETS[0], 256), (3, 4, "log", False, False, DTYPE_SETS[1], 1024)]
GROUP_TINY = [GROUP_CASES[4], GROUP_CASES[6]]


@pytest.mark.parametrize("mb,vb,vk,stochastic,probe,dt,block", pick(GROUP_CASES, GROUP_TINY), ids=lambda x: str(x))
def test_group_launch(mb, vb, vk, stochastic, probe, dt, block):
    """One launch over a mixed-length group (empty, one element, short tails, many programs; per-entry
    scalars, keys and offsets past 2**31) gives the twin's bits."""
    kw = dict(mb=mb, vb=vb, vk=vk, stochastic=stochastic, probe=probe, dt=dt, block=block, big=COMPILED)
    want = run_group(torch_packed_adam_group_step, torch.device("cpu"), **kw)
    got = run_group(triton_packed_adam_group_step, DEVICE, **kw)
    for i, (a, b) in enumerate(zip(want[0], got[0])):
        assert_bits_equal(a, b, [f"entry {i} {x}" for x in ("param", "m codes", "m scale", "v codes", "v scale")])
    assert bool((want[1][1:, 2] > 0).all()) and bool((want[1][0] == 0).all())
    _stats_close(want[1], got[1], "group stats")
    if probe:
        _stats_close(want[2], got[2], "group neighbour stats")


# ------------------------------------------------------------------------------------ factored step

FACTORED_SHAPES = [((37, 41), 32, None), ((300, 257), 256, None), ((13, 50), 64, 77), ((130, 500), 128, 777)]
FACTORED_CASES = [(mb, kind, (i + j) % 2 == 1, (i + j) % 3 != 0, DTYPE_SETS[(i + j) % 3], *FACTORED_SHAPES[j])
                  for i, (mb, kind) in enumerate(((2, "pow2"), (4, "pow2"), (5, "pow2"), (8, "linear"), (3, "linear")))
                  for j in range(len(FACTORED_SHAPES))]  # fmt: skip
FACTORED_TINY = [FACTORED_CASES[0], FACTORED_CASES[14]]


def run_factored(fn, dev, *, mb, kind, stochastic, stats, dt, shape, block, offset, steps=3):
    """Pass 1 (the row/column statistics: torch reductions, whose order is the device's) runs on the
    CPU for both sides, so the comparison pins the kernel (``test_factored_pass_one_on_the_device``
    compares pass 1 itself)."""
    from stquant_megatron.kernels.torch_adam import factored_ema, factored_partial_sums

    pdtype, gdtype, sdtype = (DTYPES[x] for x in dt)
    rows, cols = shape
    at = 0 if offset is None else offset
    n = rows * cols if offset is None else (rows * cols - offset) // 2
    gen = torch.Generator().manual_seed(mb + rows)
    p = torch.randn(n, generator=gen).to(pdtype)
    m = _random_state(n, mb, kind, True, block, sdtype, gen)
    row, col = torch.rand(rows, generator=gen) * 1e-4, torch.rand(cols, generator=gen) * 1e-4
    p, mc, ms = _copy([p, m.codes, m.scale], dev)
    cb = get_codebook(kind, mb, True, dev)
    books = _on((get_codebook(kind, mb - 1, True) if mb > 2 else None,
                 get_codebook(kind, mb + 1, True) if mb < 8 else None, None, None), dev) if stats else None  # fmt: skip
    st = torch.zeros(3, device=dev) if stats else None
    ns = torch.zeros(6, device=dev) if stats else None
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 3 - 2)).to(gdtype)
        sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step, adamw=step != 2)
        sums = factored_partial_sums(p.cpu(), grad, sc, rows, cols, at)
        if offset is not None:  # a shard: the other shards' part of the all-reduce
            sums += torch.rand(rows + cols, generator=gen)
        inv = factored_ema(row, col, sums, sc)
        fn(p, grad.to(dev), mc, ms, row.to(dev), col.to(dev), cb, sc, block_size=block, stochastic=stochastic,
           rng_key=99 + step, stats=st, neighbor_codebooks=books, neighbor_stats=ns, sample_phase=step - 1,
           inv_mean=inv.to(dev), index_offset=at)  # fmt: skip
    return _cpu([p, mc, ms]), (None if st is None else st.cpu()), (None if ns is None else ns.cpu())


@pytest.mark.parametrize("mb,kind,stochastic,stats,dt,shape,block,offset", pick(FACTORED_CASES, FACTORED_TINY),
                         ids=lambda x: str(x))  # fmt: skip
def test_factored_step(mb, kind, stochastic, stats, dt, shape, block, offset):
    kw = dict(mb=mb, kind=kind, stochastic=stochastic, stats=stats, dt=dt, shape=shape, block=block, offset=offset)
    want = run_factored(torch_factored_adam_step, torch.device("cpu"), **kw)
    got = run_factored(triton_factored_adam_step, DEVICE, **kw)
    assert_bits_equal(want[0], got[0], ["param", "m codes", "m scale"])
    assert bool((want[0][2].float() > 0).any())
    if stats:
        _stats_close(want[1], got[1], "stats")
        _stats_close(want[2], got[2], "neighbour stats")


def test_factored_pass_one_on_the_device():
    """Pass 1 of the factored step (row/column sums of g**2, then the averages) is torch code: on the
    device it runs in the device's reduction order, so it is compared to rounding, not bit for bit."""
    from stquant_megatron.kernels.torch_adam import factored_ema, factored_partial_sums

    rows, cols = (300, 257) if COMPILED else (13, 50)
    gen = torch.Generator().manual_seed(2)
    p, g = torch.randn(rows * cols, generator=gen), torch.randn(rows * cols, generator=gen)
    row, col = torch.rand(rows, generator=gen), torch.rand(cols, generator=gen)
    sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3, adamw=False)
    want = factored_partial_sums(p, g, sc, rows, cols)
    got = factored_partial_sums(p.to(DEVICE), g.to(DEVICE), sc, rows, cols).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    r2, c2 = row.clone().to(DEVICE), col.clone().to(DEVICE)
    inv_want = factored_ema(row, col, want, sc)
    inv_got = factored_ema(r2, c2, want.to(DEVICE), sc).cpu()
    torch.testing.assert_close(inv_got, inv_want, rtol=1e-5, atol=0)
    torch.testing.assert_close(r2.cpu(), row, rtol=1e-6, atol=0)
