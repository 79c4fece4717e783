"""The fused step: the Triton kernel (``TRITON_INTERPRET=1``, set in conftest) is bit-identical to
its PyTorch twin; the twin matches a plain reference; the stochastic-rounding RNG is
reproducible and independent of sharding and chunking."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import stquant_megatron.kernels.torch_adam as torch_adam
from stquant_megatron.config import AUTO_CODEBOOK
from stquant_megatron.formats.codebooks import get_codebook
from stquant_megatron.formats.packing import num_blocks, pack_codes, unpack_codes
from stquant_megatron.kernels import (
    get_step_fn, rng_key, step_scalars, torch_packed_adam_step, triton_packed_adam_step, unit_id,
)  # fmt: skip
from stquant_megatron.kernels.common import f32, mix32
from stquant_megatron.kernels.torch_adam import dequantize_blocks, quantize_blocks, uniforms
from stquant_megatron.state import PackedState

from conftest import ALL_BITS, valid_kinds

import triton  # noqa: E402  (after conftest set TRITON_INTERPRET=1)
import triton.language as tl  # noqa: E402

from stquant_megatron.kernels.triton_adam import _cast_rne  # noqa: E402

assert os.environ.get("TRITON_INTERPRET") == "1", (
    "these tests run the Triton kernel on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it unless "
    "STQUANT_REQUIRE_COMPILED=1); the compiled kernels on a GPU: tests/test_gpu_parity.py (bash tests/run_tests.sh --gpu)"
)

WIDTH_PAIRS = [(b, b) for b in ALL_BITS] + [(2, 8), (8, 2), (3, 5), (5, 3), (4, 6), (7, 2)]


class Case:
    """One fused-step scenario: a parameter, a gradient stream and a packed state."""

    def __init__(
        self, *, mb=4, vb=4, mk=None, vk=None, numel=1000, block=128, stochastic=False, gdtype=torch.float32,
        pdtype=torch.float32, wd=0.1, adamw=True, steps=3, lr=1e-2, random_state=False, seed=0,
        scale_dtype=torch.float32, grad_range=(-3.0, 1.0),
    ):  # fmt: skip
        self.mk = mk or AUTO_CODEBOOK["exp_avg"][mb]
        self.vk = vk or AUTO_CODEBOOK["exp_avg_sq"][vb]
        self.mb, self.vb, self.numel, self.block = mb, vb, numel, block
        self.stochastic, self.gdtype, self.pdtype, self.wd, self.adamw = stochastic, gdtype, pdtype, wd, adamw
        self.steps, self.lr, self.random_state, self.seed, self.scale_dtype = steps, lr, random_state, seed, scale_dtype
        self.grad_range = grad_range

    def init(self):
        g = torch.Generator().manual_seed(self.seed)
        p = torch.randn(self.numel, generator=g).to(self.pdtype)
        m = PackedState.zeros(self.numel, bits=self.mb, kind=self.mk, signed=True, block_size=self.block,
                              scale_dtype=self.scale_dtype)  # fmt: skip
        v = PackedState.zeros(self.numel, bits=self.vb, kind=self.vk, signed=False, block_size=self.block,
                              scale_dtype=self.scale_dtype)  # fmt: skip
        if self.random_state:  # arbitrary codes (the top signed code included) and scales
            for st in (m, v):
                nb = st.codes.shape[0]
                st.codes.copy_(torch.randint(0, 256, tuple(st.codes.shape), generator=g, dtype=torch.int64).to(torch.uint8))
                st.scale.copy_((torch.rand(nb, generator=g) * 1e-2).to(self.scale_dtype))
        return p, m, v

    def grads(self):
        """Gradients with magnitudes over several decades, exact zeros and (if >1 block) a zero block."""
        g = torch.Generator().manual_seed(self.seed + 1)
        lo, hi = self.grad_range
        for _ in range(self.steps):
            x = torch.randn(self.numel, generator=g) * torch.pow(10.0, lo + (hi - lo) * torch.rand(self.numel, generator=g))
            x[torch.rand(self.numel, generator=g) < 0.05] = 0.0
            if self.numel > 2 * self.block:
                x[self.block : 2 * self.block] = 0.0
            yield x.to(self.gdtype)

    def run(self, fn, **kw):
        p, m, v = self.init()
        stats = torch.zeros(3)
        for step, grad in enumerate(self.grads(), start=1):
            sc = step_scalars(lr=self.lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=self.wd, step=step,
                              adamw=self.adamw)  # fmt: skip
            fn(p, grad, m.codes, m.scale, v.codes, v.scale, m.codebook, v.codebook, sc, block_size=self.block,
               stochastic=self.stochastic, rng_key=rng_key(self.seed, step, 77), stats=stats, **kw)  # fmt: skip
        return p, m, v, stats


def assert_same(a, b, stats_rtol=1e-5):
    pa, ma, va, sa = a
    pb, mb, vb, sb = b
    assert pa.dtype == pb.dtype
    assert torch.equal(ma.codes, mb.codes), "exp_avg codes differ"
    assert torch.equal(va.codes, vb.codes), "exp_avg_sq codes differ"
    assert torch.equal(ma.scale, mb.scale), "exp_avg scales differ"
    assert torch.equal(va.scale, vb.scale), "exp_avg_sq scales differ"
    assert torch.equal(pa, pb), f"params differ by up to {(pa.float() - pb.float()).abs().max()}"
    # stats are float sums taken in a different order (per program, then summed): close, not equal
    torch.testing.assert_close(sa, sb, rtol=stats_rtol, atol=1e-12)


def _both(case, **kw):
    a = case.run(torch_packed_adam_step, **kw)
    b = case.run(triton_packed_adam_step, **kw)
    # the state really moved (a test of all-zero states would prove little)
    assert bool((a[1].scale > 0).any()) and bool((a[2].scale > 0).any())
    assert bool(a[3][2] > 0)
    return a, b


# ------------------------------------------------------------------ Triton == PyTorch, bit for bit


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16], ids=["g32", "gbf16"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("bits", WIDTH_PAIRS, ids=[f"m{a}v{b}" for a, b in WIDTH_PAIRS])
def test_triton_equals_torch_every_width(bits, stochastic, gdtype):
    mb, vb = bits
    case = Case(mb=mb, vb=vb, stochastic=stochastic, gdtype=gdtype, wd=0.1 if (mb + vb) % 4 else 0.0,
                adamw=(mb % 2 == 0), seed=mb * 10 + vb)  # fmt: skip
    assert_same(*_both(case))


KIND_CASES = [
    (b, mk, vk) for b in ALL_BITS for mk in valid_kinds(b, True) for vk in valid_kinds(b, False)
]


@pytest.mark.parametrize("bits,mk,vk", KIND_CASES, ids=[f"{b}-{m}-{v}" for b, m, v in KIND_CASES])
def test_triton_equals_torch_every_codebook(bits, mk, vk):
    stochastic = (bits + len(mk) + len(vk)) % 2 == 1
    case = Case(mb=bits, vb=bits, mk=mk, vk=vk, numel=300, block=64, stochastic=stochastic, seed=bits, steps=2)
    assert_same(*_both(case))


SHAPES = [(1000, 128), (129, 32), (1, 128), (700, 256), (4099, 512)]
# with weight_decay=0, AdamW and Adam-L2 are the same update: one case covers both
DECAY = [(0.0, True), (0.1, True), (0.1, False)]


@pytest.mark.parametrize("numel,block", SHAPES, ids=[f"n{n}b{b}" for n, b in SHAPES])
@pytest.mark.parametrize("wd,adamw", DECAY, ids=["wd0", "adamw_wd0.1", "adam_l2_wd0.1"])
def test_triton_equals_torch_decay_and_shapes(numel, block, wd, adamw):
    case = Case(mb=3, vb=4, numel=numel, block=block, wd=wd, adamw=adamw, stochastic=True, seed=numel)
    assert_same(*_both(case))


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_triton_equals_torch_from_arbitrary_state(stochastic):
    """Arbitrary codes (including the never-produced top signed code) and scales decode alike."""
    for mb, vb, vk in ((2, 2, "log"), (5, 3, "pow2"), (8, 8, "linear")):
        case = Case(mb=mb, vb=vb, vk=vk, numel=515, block=64, random_state=True, stochastic=stochastic, seed=mb)
        assert_same(*_both(case))


@pytest.mark.parametrize("pdtype", [torch.bfloat16], ids=["pbf16"])
def test_triton_equals_torch_bf16_params_and_scales(pdtype):
    case = Case(mb=4, vb=4, pdtype=pdtype, gdtype=torch.bfloat16, scale_dtype=torch.bfloat16, stochastic=True)
    a, b = _both(case)
    assert a[0].dtype == torch.bfloat16 and a[1].scale.dtype == torch.bfloat16
    assert_same(a, b)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o, mask=o < n)
    tl.store(y_ptr + o, _cast_rne(x, y_ptr.dtype.element_ty), mask=o < n)


def test_triton_bf16_cast_rounds_to_nearest_even():
    """The kernel's fp32 -> bf16 store rounds like PyTorch (nearest, ties to even; NaN, inf and
    subnormals kept), also under the interpreter, whose own cast truncates."""
    one = 1.0 + 2.0**-8  # exactly halfway between two bf16 values
    specials = [one, 1.0 + 3 * 2.0**-8, -one, 1.0 + 2.0**-8 + 2.0**-20, float("inf"), float("-inf"), float("nan"),
                3.4e38, -3.4e38, 1e-40, -1e-42, 0.0, -0.0]  # fmt: skip
    x = torch.cat([torch.tensor(specials), torch.randn(1000) * torch.pow(10.0, torch.randint(-30, 30, (1000,)).float())])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), BLOCK=2048)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16)[~x.isnan()], want.view(torch.int16)[~x.isnan()])
    assert bool(y[x.isnan()].isnan().all())
    # fp32 destinations are untouched
    y32 = torch.empty(x.numel())
    _cast_kernel[(1,)](x, y32, x.numel(), BLOCK=2048)
    assert torch.equal(y32[~x.isnan()], x[~x.isnan()])


def test_triton_equals_torch_extreme_magnitudes():
    """Gradients from 1e-20 (squares are fp32 subnormals) to 1e5, many steps at 2 and 8 bits."""
    for mb, vb in ((2, 2), (8, 8), (4, 3)):
        case = Case(mb=mb, vb=vb, numel=520, block=32, steps=4, stochastic=mb == 4, grad_range=(-20.0, 5.0))
        assert_same(*_both(case))


def test_stats_close_and_meaningful():
    case = Case(mb=3, vb=3, numel=1000, stochastic=False)
    a, b = _both(case)
    torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=0.0)
    # the three sums are positive, and the error of 3-bit moments is a fraction of |U|^2
    assert bool((a[3] > 0).all())
    assert float(a[3][0]) < float(a[3][2]) and float(a[3][1]) < float(a[3][2])
    # no stats requested: nothing else changes
    p, m, v = case.init()
    grad = next(case.grads())
    sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1, adamw=True)
    torch_packed_adam_step(p, grad, m.codes, m.scale, v.codes, v.scale, m.codebook, v.codebook, sc, block_size=128)
    p2, m2, v2 = case.init()
    st = torch.zeros(3)
    torch_packed_adam_step(p2, grad, m2.codes, m2.scale, v2.codes, v2.scale, m2.codebook, v2.codebook, sc,
                           block_size=128, stats=st)  # fmt: skip
    assert torch.equal(p, p2) and torch.equal(m.codes, m2.codes) and torch.equal(v.codes, v2.codes)


def test_compiled_twin_equals_eager():
    """``compile=True`` gives the same codes, scales and params as eager, bit for bit.

    (Measured bit-identical with torch 2.13 on CPU: the compiled graph keeps the fp64 square root
    of ``sqrt_rn`` and the same operation order. Stats are sums in a different order: close.)
    """
    case = Case(mb=4, vb=4, numel=1000, stochastic=True, wd=0.1, steps=3)
    a = case.run(torch_packed_adam_step)
    b = case.run(torch_packed_adam_step, compile=True)
    assert_same(a, b)


def test_compiled_variants_stay_within_dynamo_recompile_limit(monkeypatch):
    """A scheduled run moves units across widths: more (width pair, tail, rounding) variants than
    dynamo's ``recompile_limit`` (8) per function. Each variant compiles a function of its own, so
    none passes the limit: no ``torch._dynamo hit config.recompile_limit`` warning (one per call of
    every later variant before), no warning of ours, every variant compiled and bit-identical to eager.
    Dynamo's own ``eager`` backend keeps it quick; the recompile limit is dynamo's, not inductor's."""
    import logging
    import warnings

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{"backend": "eager", **kw}))
    torch_adam._compiled.cache_clear()  # compiled with the eager backend: dropped again below

    class Limit(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                self.messages.append(record.getMessage())

    handler = Limit()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    pairs = [(b, b) for b in ALL_BITS] + [(2, 8), (8, 2), (3, 5)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning of ours fails the test too
            for i, (mb, vb) in enumerate(pairs):
                case = Case(mb=mb, vb=vb, numel=1000, stochastic=i % 3 == 0, steps=1)  # 1000: a partial last block
                assert_same(case.run(torch_packed_adam_step, compile=True), case.run(torch_packed_adam_step))
    finally:
        logger.removeHandler(handler)
        torch_adam._compiled.cache_clear()
    assert len(pairs) > 8 and not handler.messages, f"{len(handler.messages)} warnings, first: {handler.messages[:1]}"


# ------------------------------------------------------------------ the twin against a plain reference


def _plain_levels(kind: str, bits: int, signed: bool, top: bool = False) -> torch.Tensor:
    """The documented levels (docs/formats.md, "Codebooks"), sorted, fp32, in code order. ``top``:
    also the signed top code 2^b - 1 (never produced; decoded by the same formula, k = L + 1)."""
    if signed:
        L = 2 ** (bits - 1) - 1
        s = torch.arange(-L, L + 1 + int(top), dtype=torch.float32) * (1.0 / L)
        return s if kind == "linear" else s * s.abs()
    n = 2**bits
    q = (torch.arange(n, dtype=torch.float32) + 1) * (1.0 / n)
    return q if kind == "linear" else q * q


def _plain_unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [nb, bits, block/8] -> int64 [nb, block]: plane j holds bit j; element e in byte e // 8, bit e % 8."""
    nb, _, nbytes = codes.shape
    bit = (codes.long()[..., None] >> torch.arange(8)) & 1  # [nb, bits, block/8, 8]: element 8 * byte + k
    planes = bit.reshape(nb, bits, nbytes * 8)
    return (planes << torch.arange(bits)[None, :, None]).sum(1)


def _plain_mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 holding 32-bit words."""
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _plain_quantize(x: torch.Tensor, levels: torch.Tensor, signed: bool, u: torch.Tensor | None):
    """fp32 [nb, block] -> (int64 codes, fp32 absmax scale) by the documented rule: x * (1/scale), the
    bracketing levels q(lo) <= x < q(lo+1) (clamped into the codebook), then nearest (ties low) or
    stochastic ``u * (q(lo+1) - q(lo)) < x - q(lo)``."""
    scale = x.abs().amax(1) if signed else x.amax(1)
    inv = torch.ones_like(scale) / torch.where(scale > 0, scale, torch.ones_like(scale))
    y = x * inv[:, None]
    lo = (torch.searchsorted(levels, y.contiguous(), right=True) - 1).clamp(0, levels.numel() - 2)
    qlo, qhi = levels[lo], levels[lo + 1]
    up = (y - qlo > qhi - y) if u is None else (u * (qhi - qlo) < y - qlo)
    return lo + up.long(), scale


@pytest.mark.parametrize("kinds", [("linear", "linear"), ("pow2", "pow2")])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam_l2"])
def test_torch_step_matches_plain_reference(stochastic, adamw, kinds):
    """One step = decode the old state, fp32 Adam/AdamW, quantize the new moments blockwise (padding
    holds zero moments), written here in plain torch from docs/formats.md (levels, bit planes, the
    rounding rule, the lowbias32 counter hash): no code of the package builds the expectation."""
    numel, block, lr, wd, mb, vb = 1000, 128, 1e-2, 0.1, 5, 3
    case = Case(mb=mb, vb=vb, mk=kinds[0], vk=kinds[1], numel=numel, block=block, random_state=True,
                stochastic=stochastic, adamw=adamw)  # fmt: skip
    p, m, v = case.init()
    mlev, vlev = _plain_levels(kinds[0], mb, True), _plain_levels(kinds[1], vb, False)
    mdec = _plain_levels(kinds[0], mb, True, top=True)  # the random state holds top codes too
    nb = num_blocks(numel, block)
    pad = nb * block - numel
    for step, g in enumerate(case.grads(), start=1):
        sc = step_scalars(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, step=step, adamw=adamw)
        key = rng_key(3, step, 5)
        m0 = (mdec[_plain_unpack(m.codes, mb)] * m.scale[:, None]).view(-1)[:numel]
        v0 = (vlev[_plain_unpack(v.codes, vb)] * v.scale[:, None]).view(-1)[:numel]
        gg = g.float() + p * sc.l2
        m1 = m0 * sc.beta1 + gg * sc.one_minus_beta1
        v1 = v0 * sc.beta2 + (gg * gg) * sc.one_minus_beta2
        denom = torch.sqrt(v1.double()).float() * sc.inv_bias_correction2_sqrt + sc.eps
        p_ref = p * sc.decay - (m1 / denom) * sc.step_size
        um = uv = None
        if stochastic:
            i = torch.arange(nb * block, dtype=torch.int64).view(nb, block)
            h = _plain_mix32((i & 0xFFFFFFFF) ^ _plain_mix32(key ^ (i >> 32)))
            um, uv = (h >> 16).float() / 65536, (h & 0xFFFF).float() / 65536
        mc, ms = _plain_quantize(torch.nn.functional.pad(m1, (0, pad)).view(nb, block), mlev, True, um)
        vc, vs = _plain_quantize(torch.nn.functional.pad(v1, (0, pad)).view(nb, block), vlev, False, uv)
        # fused step
        torch_packed_adam_step(p, g, m.codes, m.scale, v.codes, v.scale, m.codebook, v.codebook, sc,
                               block_size=block, stochastic=stochastic, rng_key=key)  # fmt: skip
        assert torch.equal(p, p_ref)
        assert torch.equal(m.scale, ms) and torch.equal(v.scale, vs)
        assert torch.equal(_plain_unpack(m.codes, mb), mc), int((_plain_unpack(m.codes, mb) != mc).sum())
        assert torch.equal(_plain_unpack(v.codes, vb), vc), int((_plain_unpack(v.codes, vb) != vc).sum())
        assert int(mc.unique().numel()) > 2 and int(vc.unique().numel()) > 2  # not a degenerate case


def test_first_step_is_exact_adam():
    """From a zero state the first update is fp32 Adam exactly (the old moments decode to 0):
    p - lr * g / (|g| + eps') up to fp32 rounding."""
    p0 = torch.randn(300)
    g = torch.randn(300)
    p = p0.clone()
    m = PackedState.zeros(300, bits=2, kind="linear", signed=True, block_size=64)
    v = PackedState.zeros(300, bits=2, kind="log", signed=False, block_size=64)
    sc = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, adamw=True)
    torch_packed_adam_step(p, g, m.codes, m.scale, v.codes, v.scale, m.codebook, v.codebook, sc, block_size=64)
    torch.testing.assert_close(p, p0 - 1e-3 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ reproducible, sharding-free RNG


@pytest.mark.parametrize("start", [0, 2**32 - 100_000, 3 * 2**32 + 12345])
def test_uniforms_range_distribution_and_independence(start):
    """Both numbers of an element are uniform 16-bit values, uncorrelated with each other and with
    the next element's (counters are consecutive global indices, the hardest input for a hash);
    also across the 2**32 carry of the index's low word."""
    key = torch.tensor(rng_key(0, 1, 2))
    n = 200_000
    um, uv = uniforms(torch.arange(start, start + n, dtype=torch.int64), key)
    for u in (um, uv):
        assert u.dtype == torch.float32
        assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
        assert torch.equal(u * 2**16, torch.floor(u * 2**16))  # 16-bit values
        hist = torch.histc(u, bins=20, min=0.0, max=1.0)
        # each bin expects 10000 +- 98 (sd); 6 sd
        assert bool(((hist - 10000).abs() < 600).all()), hist
        assert abs(float(u.double().mean()) - 0.5) < 0.005  # sd of the mean: 0.00065
        # serial correlation: sd 1 / sqrt(n) = 0.0022; 6 sd
        x = u.double() - 0.5
        assert abs(float((x[1:] * x[:-1]).mean() / x.var())) < 0.014
    a, b = um.double() - 0.5, uv.double() - 0.5
    assert abs(float((a * b).mean() / (a.std() * b.std()))) < 0.014
    # joint 4x4 histogram of (um, uv): each cell expects n / 16 = 12500 +- 108
    cells = torch.bincount((um * 4).long() * 4 + (uv * 4).long(), minlength=16)
    assert bool(((cells - n / 16).abs() < 650).all()), cells


def test_uniform_depends_only_on_index_and_key():
    key = torch.tensor(rng_key(11, 7, unit_id("layer.0.weight")))

    def uniform(index, key):
        return torch.stack(uniforms(index, key))

    n = 5000
    whole = uniform(torch.arange(n, dtype=torch.int64), key)
    # any split into shards, each given its global indices, reproduces the whole
    for cut in (1, 128, 2500, 4999):
        a = uniform(torch.arange(0, cut, dtype=torch.int64), key)
        b = uniform(torch.arange(cut, n, dtype=torch.int64), key)
        assert torch.equal(torch.cat([a, b], 1), whole)
    # elementwise: a permuted index vector gives permuted values
    perm = torch.randperm(n)
    assert torch.equal(uniform(perm, key), whole[:, perm])
    # beyond 2**32 the high word matters (no aliasing of index and index + 2**32)
    big = torch.arange(2**32 - 4, 2**32 + 4, dtype=torch.int64)
    ub = uniform(big, key)
    assert torch.equal(ub, torch.cat([uniform(i.view(1), key) for i in big], 1))
    assert not torch.equal(uniform(big, key), uniform(big - 2**32, key))
    # another key gives another stream
    assert not torch.equal(whole, uniform(torch.arange(n, dtype=torch.int64), key + 1))


def test_rng_key_components():
    base = rng_key(1, 2, 3)
    assert base == rng_key(1, 2, 3)
    assert 0 <= base < 2**32
    others = {rng_key(2, 2, 3), rng_key(1, 3, 3), rng_key(1, 2, 4)}
    assert base not in others and len(others) == 3
    assert unit_id("decoder.layers.0.mlp.weight") == zlib.crc32(b"decoder.layers.0.mlp.weight")
    assert unit_id("a") != unit_id("b")
    assert mix32(0) == 0 and mix32(1) != 1
    assert f32(0.1) != 0.1 and f32(f32(0.1)) == f32(0.1)


@pytest.mark.parametrize("fn", [torch_packed_adam_step, triton_packed_adam_step], ids=["torch", "triton"])
def test_same_seed_step_unit_index_same_codes(fn):
    a = Case(mb=3, vb=3, numel=1000, stochastic=True, seed=4).run(fn)
    b = Case(mb=3, vb=3, numel=1000, stochastic=True, seed=4).run(fn)
    assert_same(a, b, stats_rtol=0)
    # another seed (another rng key) changes the codes, not the nearest-rounded ones
    c = Case(mb=3, vb=3, numel=1000, stochastic=True, seed=4)
    p, m, v = c.init()
    p2, m2, v2 = c.init()
    g = next(c.grads())
    sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, adamw=True)
    fn(p, g, m.codes, m.scale, v.codes, v.scale, m.codebook, v.codebook, sc, block_size=128, stochastic=True,
       rng_key=1)  # fmt: skip
    fn(p2, g, m2.codes, m2.scale, v2.codes, v2.scale, m2.codebook, v2.codebook, sc, block_size=128,
       stochastic=True, rng_key=3)  # fmt: skip
    assert torch.equal(p, p2)  # the update uses the old (zero) state: the same
    assert not torch.equal(m.codes, m2.codes) and not torch.equal(v.codes, v2.codes)
    assert torch.equal(m.scale, m2.scale)  # scales are absmaxes: rounding does not change them


@pytest.mark.parametrize("fn", [torch_packed_adam_step, triton_packed_adam_step], ids=["torch", "triton"])
def test_sharded_equals_whole(fn):
    """A unit stepped whole, or as two shards split on a block boundary with ``index_offset``,
    gives the same params, codes and scales; without the offset the second shard differs."""
    numel, block, cut = 1000, 128, 512  # 512 = 4 blocks
    case = Case(mb=4, vb=4, numel=numel, block=block, stochastic=True, steps=3)
    whole = case.run(fn)

    def sharded(offset_of_second):
        p, m, v = case.init()
        nbc = cut // block
        for step, g in enumerate(case.grads(), start=1):
            sc = step_scalars(lr=case.lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=case.wd, step=step,
                              adamw=True)  # fmt: skip
            key = rng_key(case.seed, step, 77)
            for sl, bl, off in ((slice(0, cut), slice(0, nbc), 0), (slice(cut, numel), slice(nbc, None), offset_of_second)):
                ps, gs = p[sl].clone(), g[sl].clone()
                mc, ms, vc, vs = m.codes[bl].clone(), m.scale[bl].clone(), v.codes[bl].clone(), v.scale[bl].clone()
                fn(ps, gs, mc, ms, vc, vs, m.codebook, v.codebook, sc, block_size=block, stochastic=True,
                   rng_key=key, index_offset=off)  # fmt: skip
                p[sl], m.codes[bl], m.scale[bl], v.codes[bl], v.scale[bl] = ps, mc, ms, vc, vs
        return p, m, v

    p, m, v = sharded(cut)
    assert torch.equal(p, whole[0])
    assert torch.equal(m.codes, whole[1].codes) and torch.equal(m.scale, whole[1].scale)
    assert torch.equal(v.codes, whole[2].codes) and torch.equal(v.scale, whole[2].scale)
    p, m, v = sharded(0)  # wrong offset: other random numbers in the second shard
    assert not torch.equal(m.codes[cut // block :], whole[1].codes[cut // block :])
    assert torch.equal(m.codes[: cut // block], whole[1].codes[: cut // block])


def test_chunking_does_not_change_results(monkeypatch):
    """The twin walks a unit in chunks; the chunk size changes nothing (stochastic included)."""
    case = Case(mb=3, vb=5, numel=1000, block=32, stochastic=True)
    a = case.run(torch_packed_adam_step)
    monkeypatch.setattr(torch_adam, "CHUNK_ELEMENTS", 64)  # 2 blocks per chunk, 16 chunks
    b = case.run(torch_packed_adam_step)
    assert_same(a, b)


# ------------------------------------------------------------------ backend selection


def test_get_step_fn(monkeypatch):
    cpu = torch.device("cpu")
    assert get_step_fn("torch", cpu) is torch_packed_adam_step
    assert get_step_fn("auto", cpu) is torch_packed_adam_step
    assert get_step_fn("triton", cpu) is triton_packed_adam_step  # TRITON_INTERPRET=1
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        get_step_fn("triton", cpu)


def test_dequantize_of_packed_state_matches_unpack():
    st = PackedState.zeros(200, bits=6, kind="pow2", signed=True, block_size=64)
    st.copy_(torch.randn(200))
    out = dequantize_blocks(unpack_codes(st.codes, 6), st.scale, get_codebook("pow2", 6, True)).view(-1)[:200]
    assert torch.equal(out, st.dequantize())


@pytest.mark.parametrize("m_bits,v_bits,v_kind", [(4, 4, "log"), (2, 8, "pow2"), (8, 3, "log"), (5, 6, "linear")])
def test_neighbor_width_probe_matches_between_backends(m_bits, v_bits, v_kind):
    """The error probe one width below/above (scheduler input): same codes, close sums, zeros off range."""
    from stquant_megatron.formats.codebooks import get_codebook
    from stquant_megatron.formats.packing import num_blocks
    from stquant_megatron.kernels.common import step_scalars
    from stquant_megatron.kernels.torch_adam import torch_packed_adam_step
    from stquant_megatron.kernels.triton_adam import triton_packed_adam_step

    def run(fn):
        gen = torch.Generator().manual_seed(0)
        n, block = 1000, 128
        p = torch.randn(n, generator=gen)
        nb = num_blocks(n, block)
        mc, ms = torch.zeros(nb, m_bits, block // 8, dtype=torch.uint8), torch.zeros(nb)
        vc, vs = torch.zeros(nb, v_bits, block // 8, dtype=torch.uint8), torch.zeros(nb)
        st, ns = torch.zeros(3), torch.zeros(6)
        books = tuple(
            get_codebook(kind if 2 <= b <= 4 or kind != "log" else "pow2", b, signed) if 2 <= b <= 8 else None
            for kind, b, signed in (("pow2", m_bits - 1, True), ("pow2", m_bits + 1, True),
                                    (v_kind, v_bits - 1, False), (v_kind, v_bits + 1, False))
        )  # fmt: skip
        for step in (1, 2):
            g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4
            sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=step, adamw=True)
            fn(p, g, mc, ms, vc, vs, get_codebook("pow2", m_bits, True), get_codebook("pow2", v_bits, False), sc,
               block_size=block, stats=st, neighbor_codebooks=books, neighbor_stats=ns)  # fmt: skip
        return mc, vc, st, ns, books

    a, b = run(torch_packed_adam_step), run(triton_packed_adam_step)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[3], b[3], rtol=1e-5, atol=1e-6)
    for i, book in enumerate(a[4]):
        assert (a[3][i] == 0) == (book is None)  # measured exactly where the width exists
    assert a[3][4] > 0 and a[3][5] > 0  # the current widths on the same sample
    # (on the sampled blocks, same codebook kind) one bit less hurts more than one bit more
    if a[4][0] is not None and a[4][1] is not None:
        assert a[3][0] > a[3][1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_probe_compares_nearest_with_nearest_under_stochastic_rounding(backend):
    """With stochastic rounding the probe's error at the current width is nearest rounding's, as at the
    neighbouring widths: the same sums as a nearest-rounding step over the same values, while the
    stored codes' own error (the window statistics) is stochastic rounding's, larger."""
    from stquant_megatron.formats.codebooks import get_codebook
    from stquant_megatron.formats.packing import num_blocks
    from stquant_megatron.kernels.common import step_scalars
    from stquant_megatron.kernels.torch_adam import torch_packed_adam_step
    from stquant_megatron.kernels.triton_adam import triton_packed_adam_step

    fn = torch_packed_adam_step if backend == "torch" else triton_packed_adam_step

    def run(stochastic):
        gen = torch.Generator().manual_seed(3)
        n, block = 4096, 128
        p = torch.randn(n, generator=gen)
        nb = num_blocks(n, block)
        mc, ms = torch.zeros(nb, 3, block // 8, dtype=torch.uint8), torch.zeros(nb)
        vc, vs = torch.zeros(nb, 3, block // 8, dtype=torch.uint8), torch.zeros(nb)
        st, ns = torch.zeros(3), torch.zeros(6)
        books = (get_codebook("pow2", 2, True), get_codebook("pow2", 4, True), get_codebook("pow2", 2, False),
                 get_codebook("pow2", 4, False))  # fmt: skip
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4
        sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1, adamw=True)
        fn(p, g, mc, ms, vc, vs, get_codebook("pow2", 3, True), get_codebook("pow2", 3, False), sc,
           block_size=block, stochastic=stochastic, rng_key=11, stats=st, neighbor_codebooks=books, neighbor_stats=ns)  # fmt: skip
        return st, ns

    (st_n, ns_n), (st_s, ns_s) = run(False), run(True)
    torch.testing.assert_close(ns_s, ns_n, rtol=1e-6, atol=0)  # first step from zero: the same m and v
    assert torch.equal(ns_n[4:], st_n[:2])  # nearest: the probe's current width is the stored codes' error
    assert st_s[0] > 1.3 * st_n[0] and st_s[1] > st_n[1], (st_s, st_n)  # stochastic rounding's own error is larger


def _nearest_level(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Nearest codebook value by brute force over the levels (independent of the encoders)."""
    levels = torch.unique(qmap)
    return levels[(x[..., None] - levels).abs().argmin(-1)]


def _full_errors(m, v, denom_fn, bits_m, bits_v, block):
    """E(b) of each moment over the whole unit, from dense fp32 moments (plain PyTorch, fp64 sums)."""
    from stquant_megatron.formats.codebooks import get_codebook

    def quant(x, cb):
        xb = x.view(-1, block)
        s = (xb.abs() if cb.signed else xb).amax(1, keepdim=True)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return (_nearest_level(xb / s, cb.qmap) * s).view(-1)

    ref = m / denom_fn(v)
    out = {}
    for b in (bits_m - 1, bits_m, bits_m + 1):
        if 2 <= b <= 8:
            e = quant(m, get_codebook("pow2", b, True)) / denom_fn(v) - ref
            out[("m", b)] = float((e.double() ** 2).sum())
    for b in (bits_v - 1, bits_v, bits_v + 1):
        if 2 <= b <= 8:
            e = m / denom_fn(quant(v, get_codebook("pow2", b, False))) - ref
            out[("v", b)] = float((e.double() ** 2).sum())
    return out, float((ref.double() ** 2).sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("m_bits,v_bits", [(4, 4), (3, 6), (7, 3)])
def test_sampled_statistics_agree_with_full_unit_measurement(backend, m_bits, v_bits):
    """The statistics sample every SAMPLE_STRIDE-th program; against E(b-1), E(b), E(b+1) measured over
    the whole unit from dense moments:
    - the same step at the SAMPLE_STRIDE phases measures every element once: the four sums add up to
      the full-unit sums within 1 % (quantization of dense moments here vs in the step);
    - at each phase the sample's E(b) = err / ref, and the probe's ratios E(b-1)/E(b) and
      E(b)/E(b+1), agree with the full unit's within 20 % (8 of 32 programs, 64 of 256 blocks);
    - the statistics change nothing of the step."""
    from stquant_megatron.formats.codebooks import get_codebook
    from stquant_megatron.kernels.common import SAMPLE_STRIDE, step_scalars
    from stquant_megatron.kernels.torch_adam import torch_packed_adam_step
    from stquant_megatron.kernels.triton_adam import triton_packed_adam_step
    from stquant_megatron.state import PackedState

    fn = torch_packed_adam_step if backend == "torch" else triton_packed_adam_step
    gen = torch.Generator().manual_seed(1)
    block, nb = 128, 256
    n = block * nb
    p = torch.randn(n, generator=gen)
    mst = PackedState.zeros(n, bits=m_bits, kind="pow2", signed=True, block_size=block)
    vst = PackedState.zeros(n, bits=v_bits, kind="pow2", signed=False, block_size=block)
    # heavy-tailed, block-varying gradients, like a real layer
    g_scale = torch.rand(nb, 1, generator=gen).pow(3).expand(nb, block).reshape(-1) + 1e-3
    grads = [torch.randn(n, generator=gen) * g_scale for _ in range(3)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, adamw=True)
    for step, g in enumerate(grads[:2], start=1):
        fn(p, g, mst.codes, mst.scale, vst.codes, vst.scale, mst.codebook, vst.codebook,
           step_scalars(step=step, **kw), block_size=block)  # fmt: skip
    sc = step_scalars(step=3, **kw)
    # the dense reference of step 3, computed independently of the kernels
    m0, v0, g = mst.dequantize(), vst.dequantize(), grads[2]
    m1 = m0 * sc.beta1 + g * sc.one_minus_beta1
    v1 = v0 * sc.beta2 + g * g * sc.one_minus_beta2

    def denom_fn(v):
        return v.double().sqrt().float() * sc.inv_bias_correction2_sqrt + sc.eps

    full, ref2 = _full_errors(m1, v1, denom_fn, m_bits, v_bits, block)
    books = tuple(
        get_codebook("pow2", b, signed) if 2 <= b <= 8 else None
        for b, signed in ((m_bits - 1, True), (m_bits + 1, True), (v_bits - 1, False), (v_bits + 1, False))
    )  # fmt: skip
    plain = [t.clone() for t in (p, mst.codes, mst.scale, vst.codes, vst.scale)]
    fn(*plain[:1], g, *plain[1:], mst.codebook, vst.codebook, sc, block_size=block)
    total = torch.zeros(3, dtype=torch.float64)
    for phase in range(SAMPLE_STRIDE):
        out = [t.clone() for t in (p, mst.codes, mst.scale, vst.codes, vst.scale)]
        st, ns = torch.zeros(3), torch.zeros(6)
        fn(*out[:1], g, *out[1:], mst.codebook, vst.codebook, sc, block_size=block, stats=st,
           neighbor_codebooks=books, neighbor_stats=ns, sample_phase=phase)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(out, plain))
        assert 0 < float(st[2]) < 0.5 * ref2  # a sample, not the unit
        total += st.double()
        assert float(st[0] / st[2]) == pytest.approx(full[("m", m_bits)] / ref2, rel=0.2)
        assert float(st[1] / st[2]) == pytest.approx(full[("v", v_bits)] / ref2, rel=0.2)
        assert torch.equal(ns[4:], st[:2])  # the current widths on the same sample
        for moment, bits, lo, hi, at in (("m", m_bits, 0, 1, 4), ("v", v_bits, 2, 3, 5)):
            if (moment, bits - 1) in full:
                probe_down = float(ns[lo] / ns[at])
                assert probe_down == pytest.approx(full[(moment, bits - 1)] / full[(moment, bits)], rel=0.2), moment
            else:
                assert ns[lo] == 0
            if (moment, bits + 1) in full:
                probe_up = float(ns[at] / ns[hi])
                assert probe_up == pytest.approx(full[(moment, bits)] / full[(moment, bits + 1)], rel=0.2), moment
            else:
                assert ns[hi] == 0
    assert float(total[0]) == pytest.approx(full[("m", m_bits)], rel=0.01)
    assert float(total[1]) == pytest.approx(full[("v", v_bits)], rel=0.01)
    assert float(total[2]) == pytest.approx(ref2, rel=1e-4)


# ------------------------------------------------------------------ grouped launch (one launch per width group)

GROUP_SIZES = [0, 1, 127, 128 * 5 + 3, 1000, 64, 1024 * 5 + 37]  # empty, one element, short tail, several blocks, programs


def _group_run(group_fn, *, mb, vb, vk, stochastic, probe, pdtype=torch.float32, gdtype=torch.float32,
               sdtype=torch.float32, block=64, steps=2):  # fmt: skip
    from stquant_megatron.kernels import GroupEntry

    gen = torch.Generator().manual_seed(mb * 100 + vb)
    mcb, vcb = get_codebook("pow2", mb, True), get_codebook(vk, vb, False)
    units = []
    for i, n in enumerate(GROUP_SIZES):
        p = torch.randn(n, generator=gen).to(pdtype)
        m = PackedState.zeros(n, bits=mb, kind="pow2", signed=True, block_size=block, scale_dtype=sdtype)
        v = PackedState.zeros(n, bits=vb, kind=vk, signed=False, block_size=block, scale_dtype=sdtype)
        units.append((p, m, v))
    books = tuple(
        get_codebook(kind if (kind != "log" or 2 <= b <= 4) else "pow2", b, signed) if 2 <= b <= 8 else None
        for kind, b, signed in (("pow2", mb - 1, True), ("pow2", mb + 1, True), (vk, vb - 1, False), (vk, vb + 1, False))
    )  # fmt: skip
    stats = torch.zeros(len(units), 3)
    nstats = torch.zeros(len(units), 6) if probe else None
    for step in range(1, steps + 1):
        entries = []
        for i, (p, m, v) in enumerate(units):
            g = (torch.randn(p.numel(), generator=gen) * 10.0 ** (i - 3)).to(gdtype)
            sc = step_scalars(lr=1e-2 * (i + 1), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 * (i % 2),
                              step=step + i, adamw=i != 3)  # fmt: skip
            entries.append(GroupEntry(p, g, m.codes, m.scale, v.codes, v.scale, sc, rng_key(5, step, i),
                                      3_000_000_000 * (i % 2) + 7 * i))
        group_fn(entries, mcb, vcb, block_size=block, stochastic=stochastic, stats=stats,
                 neighbor_codebooks=books if probe else None, neighbor_stats=nstats,
                 sample_phase=step - 1)  # fmt: skip
    return units, stats, nstats


GROUP_CASES = [(4, 4, "pow2", False, False), (3, 5, "pow2", True, True), (2, 2, "log", True, False),
               (8, 3, "log", False, True), (6, 7, "linear", True, True)]  # fmt: skip


@pytest.mark.parametrize("mb,vb,vk,stochastic,probe", GROUP_CASES, ids=[f"m{c[0]}v{c[1]}{c[2]}{'-sr' * c[3]}{'-probe' * c[4]}" for c in GROUP_CASES])
def test_group_step_triton_equals_torch(mb, vb, vk, stochastic, probe):
    """One launch over a mixed-length group (empty, 1 element, short tail, several blocks; per-entry
    scalars, keys and offsets beyond 2**32) gives the twin's params, codes and scales bit for bit."""
    from stquant_megatron.kernels import torch_packed_adam_group_step, triton_packed_adam_group_step

    a = _group_run(torch_packed_adam_group_step, mb=mb, vb=vb, vk=vk, stochastic=stochastic, probe=probe)
    b = _group_run(triton_packed_adam_group_step, mb=mb, vb=vb, vk=vk, stochastic=stochastic, probe=probe)
    for (pa, ma, va), (pb, mb_, vb_) in zip(a[0], b[0]):
        assert torch.equal(pa, pb) and torch.equal(ma.codes, mb_.codes) and torch.equal(va.codes, vb_.codes)
        assert torch.equal(ma.scale, mb_.scale) and torch.equal(va.scale, vb_.scale)
    assert bool((a[1][1:, 2] > 0).all()) and bool((a[1][0] == 0).all())  # the empty entry has no error
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-12)
    if probe:
        torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-12)
        assert bool((a[2][1:, 4] >= 0).all()) and float(a[2][:, 4].sum()) > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_step_equals_unit_steps(backend):
    """The group entry point is the unit step on every entry (bf16 params, grads and scales)."""
    from stquant_megatron.kernels import torch_packed_adam_group_step, triton_packed_adam_group_step

    unit_fn = torch_packed_adam_step if backend == "torch" else triton_packed_adam_step
    group_fn = torch_packed_adam_group_step if backend == "torch" else triton_packed_adam_group_step

    def as_units(entries, mcb, vcb, *, stats, neighbor_stats, **kw):
        for i, en in enumerate(entries):
            unit_fn(en.param, en.grad, en.exp_avg_codes, en.exp_avg_scale, en.exp_avg_sq_codes, en.exp_avg_sq_scale,
                    mcb, vcb, en.scalars, rng_key=en.rng_key, index_offset=en.index_offset, stats=stats[i],
                    neighbor_stats=None if neighbor_stats is None else neighbor_stats[i], **kw)  # fmt: skip

    kw = dict(mb=4, vb=4, vk="pow2", stochastic=True, probe=True, pdtype=torch.bfloat16, gdtype=torch.bfloat16,
              sdtype=torch.bfloat16)  # fmt: skip
    a = _group_run(group_fn, **kw)
    b = _group_run(as_units, **kw)
    for (pa, ma, va), (pb, mb_, vb_) in zip(a[0], b[0]):
        assert torch.equal(pa, pb) and torch.equal(ma.codes, mb_.codes) and torch.equal(va.codes, vb_.codes)
        assert torch.equal(ma.scale, mb_.scale) and torch.equal(va.scale, vb_.scale)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_step_rejects_mixed_groups(backend):
    from stquant_megatron.kernels import GroupEntry, torch_packed_adam_group_step, triton_packed_adam_group_step

    fn = torch_packed_adam_group_step if backend == "torch" else triton_packed_adam_group_step
    mcb, vcb = get_codebook("pow2", 4, True), get_codebook("pow2", 4, False)
    sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, adamw=True)

    def entry(pdtype, bits=4):
        m = PackedState.zeros(100, bits=bits, kind="pow2", signed=True, block_size=64)
        v = PackedState.zeros(100, bits=4, kind="pow2", signed=False, block_size=64)
        return GroupEntry(torch.zeros(100, dtype=pdtype), torch.zeros(100), m.codes, m.scale, v.codes, v.scale, sc)

    with pytest.raises(ValueError, match="group entry 1 has .*dtype"):
        fn([entry(torch.float32), entry(torch.bfloat16)], mcb, vcb, block_size=64)
    with pytest.raises(ValueError, match="group entry 0 has 3/4-bit codes"):
        fn([entry(torch.float32, bits=3)], mcb, vcb, block_size=64)
    with pytest.raises(ValueError, match=r"stats has shape \(1, 3\); a group of 2 entries needs \(2, 3\)"):
        fn([entry(torch.float32), entry(torch.float32)], mcb, vcb, block_size=64, stats=torch.zeros(1, 3))


def test_auto_compile_policy_and_fallback(monkeypatch, recwarn):
    """compile=None (the default): compiled only for CPU units of at least one chunk; a failing
    compile falls back to eager once, with a warning, and gives the eager result."""
    import stquant_megatron.kernels.torch_adam as ta

    cpu = torch.device("cpu")
    assert ta.use_compile(None, ta.CHUNK_ELEMENTS, cpu) and not ta.use_compile(None, ta.CHUNK_ELEMENTS - 1, cpu)
    assert not ta.use_compile(None, 1 << 30, torch.device("meta")) and ta.use_compile(True, 1, cpu)
    case = Case(mb=4, vb=3, numel=3000, steps=2)
    want = case.run(ta.torch_packed_adam_step)

    def broken(fn, variant):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ta, "_compiled", broken)
    monkeypatch.setattr(ta, "CHUNK_ELEMENTS", 1024)  # the 3000-element unit now counts as large
    monkeypatch.setattr(ta, "_COMPILE_FAILED", [])
    got = case.run(ta.torch_packed_adam_step, compile=None)
    assert_same(want, got)
    assert ta._COMPILE_FAILED and any("running eager" in str(w.message) for w in recwarn.list)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):  # compile=True does not hide the failure
        case.run(ta.torch_packed_adam_step, compile=True)



def test_recompile_limit_runs_that_variant_eager_and_keeps_compiling(monkeypatch, recwarn):
    """A variant past dynamo's recompile limit (not expected: each variant compiles a function of its
    own) runs eager from then on, gives the eager result, warns once in one line, and does not switch
    compilation off for the other variants."""
    import torch._dynamo.exc as dynamo_exc

    import stquant_megatron.kernels.torch_adam as ta

    case = Case(mb=4, vb=3, numel=3000, steps=2)
    want = case.run(ta.torch_packed_adam_step)
    calls = []

    def limited(fn, variant):
        def run(*args):
            calls.append(variant)
            raise dynamo_exc.FailOnRecompileLimitHit("recompile_limit reached")

        return run

    monkeypatch.setattr(ta, "_compiled", limited)
    monkeypatch.setattr(ta, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(ta, "_COMPILE_FAILED", [])
    monkeypatch.setattr(ta, "_EAGER_VARIANTS", set())
    got = case.run(ta.torch_packed_adam_step, compile=None)
    assert_same(want, got)
    # 3 chunks x 2 steps, fewer variants (a partial last block or not, sampled rows or not): each
    # variant asked the compiled path once, then ran eager without asking again
    assert 2 <= len(calls) < 6 and len(set(calls)) == len(calls), len(calls)
    assert not ta._COMPILE_FAILED and not any("running eager" in str(w.message) for w in recwarn.list)
    limit = [str(w.message) for w in recwarn.list if "recompile limit" in str(w.message)]
    assert len(limit) == 1 and "\n" not in limit[0], limit
    assert ta.use_compile(None, ta.CHUNK_ELEMENTS, torch.device("cpu"))

def test_sampled_rows_follow_the_program_definition():
    """The twin's sampled rows of a chunk (blocks of programs k with (k + phase) % SAMPLE_STRIDE == 0,
    G blocks per program) against the definition written out block by block."""
    from stquant_megatron.kernels.common import SAMPLE_STRIDE, launch_shape
    from stquant_megatron.kernels.torch_adam import _rows

    for block in (32, 64, 128, 1024, 2048):
        g = launch_shape(block)[0]
        for b0, b1 in ((0, 1), (0, 5), (0, 77), (g * 8, g * 11 + 1), (256, 1000)):
            for phase in range(SAMPLE_STRIDE):
                want = [b - b0 for b in range(b0, b1) if (b // g + phase) % SAMPLE_STRIDE == 0]
                got = _rows(torch.zeros(3), b0, b1, block, phase, "cpu")
                assert ([] if got is None else got.tolist()) == want, (block, b0, b1, phase)
    assert _rows(None, 0, 100, 128, 0, "cpu") is None  # no statistics: no rows
