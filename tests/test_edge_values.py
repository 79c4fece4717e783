"""Edge values of the fused step: subnormal, tiny, huge and zero scales, moments, parameters and
gradients; NaN/inf under ``nonfinite="unchecked"``; long zero-gradient runs. docs/gpu_semantics.md
lists what each test pins.

The interpreter (``TRITON_INTERPRET=1``) runs the kernel's arithmetic in numpy; where numpy agrees
with the compiled PTX, kernel-vs-twin parity is a proof. Where it does not (the interpreter's own
bf16 -> fp32 conversion garbles subnormals), the twin is checked against an exact bit-level reference
written here, and the compiled kernel's PTX for the exact instruction (``test_ptx_*``, compiled ahead
of time by ``benchmarks/gpu_compile.py``'s machinery, no GPU needed). Every expected value below is
computed independently of the code under test (plain fp32/fp64 arithmetic or integer bit operations).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from stquant_megatron.formats.codebooks import get_codebook
from stquant_megatron.formats.packing import pack_codes, unpack_codes
from stquant_megatron.kernels import step_scalars, torch_packed_adam_step, triton_packed_adam_step
from stquant_megatron.kernels.torch_adam import dequantize_blocks, quantize_blocks, torch_factored_adam_step
from stquant_megatron.kernels.triton_factored import triton_factored_adam_step

from conftest import valid_kinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLT_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]
BF16_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7F0000))[0]
BLOCK = 64


def bits32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).view(torch.int32)


def bf16_to_f32_ref(t: torch.Tensor) -> list[float]:
    """Exact bf16 -> fp32, by Python integers: the 16 bits are the top half of the fp32."""
    return [struct.unpack("<f", struct.pack("<I", (int(b) & 0xFFFF) << 16))[0] for b in t.view(torch.int16).tolist()]


def f32_to_bf16_bits_ref(x: float) -> int:
    """fp32 -> bf16 bits, round to nearest even, by Python integers (finite x >= 0)."""
    b = struct.unpack("<I", struct.pack("<f", x))[0]
    lo, hi = b & 0xFFFF, b >> 16
    if lo > 0x8000 or (lo == 0x8000 and hi & 1):
        hi += 1
    return hi


def make_state(numel, bits, kind, signed, scale, scale_dtype=torch.float32, seed=0, codes=None):
    cb = get_codebook(kind, bits, signed)
    nb = -(-numel // BLOCK)
    g = torch.Generator().manual_seed(seed)
    if codes is None:
        top = 2**bits - 1 if signed else 2**bits  # the unused top signed code excluded
        codes = torch.randint(0, top, (nb, BLOCK), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    s = torch.full((nb,), scale, dtype=torch.float32).to(scale_dtype) if not torch.is_tensor(scale) else scale.to(scale_dtype)
    return cb, packed, s


class Run:
    """One scenario run through the twin and the kernel (on clones), for bitwise comparison."""

    def __init__(self, p, mk="linear", mb=4, vk="linear", vb=4, m_scale=1e-3, v_scale=1e-6, scale_dtype=torch.float32,
                 m_codes=None, v_codes=None, seed=0):  # fmt: skip
        self.p = p
        self.mcb, self.mc, self.ms = make_state(p.numel(), mb, mk, True, m_scale, scale_dtype, seed, m_codes)
        self.vcb, self.vc, self.vs = make_state(p.numel(), vb, vk, False, v_scale, scale_dtype, seed + 1, v_codes)

    def run(self, fn, grads, *, stochastic=False, wd=0.0, adamw=True, lr=1e-3):
        p, mc, ms, vc, vs = (t.clone() for t in (self.p, self.mc, self.ms, self.vc, self.vs))
        for step, g in enumerate(grads, start=1):
            sc = step_scalars(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, step=step, adamw=adamw)
            fn(p, g, mc, ms, vc, vs, self.mcb, self.vcb, sc, block_size=BLOCK, stochastic=stochastic,
               rng_key=1234 + step)  # fmt: skip
        return p, mc, ms, vc, vs

    def both(self, grads, **kw):
        grads = list(grads)
        a = self.run(torch_packed_adam_step, grads, **kw)
        b = self.run(triton_packed_adam_step, grads, **kw)
        return a, b


def assert_bitwise(a, b):
    names = ("param", "exp_avg codes", "exp_avg scale", "exp_avg_sq codes", "exp_avg_sq scale")
    for name, x, y in zip(names, a, b):
        if x.is_floating_point():
            x, y = x.view(torch.int16 if x.element_size() == 2 else torch.int32), y.view(
                torch.int16 if y.element_size() == 2 else torch.int32)
        diff = (x != y).sum().item()
        assert diff == 0, f"{name}: {diff} of {x.numel()} differ between the twin and the kernel"


def nearest_codes_ref(x64: torch.Tensor, cb) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 reference of nearest rounding: for each normalized value, the set of acceptable codes
    (the nearest level, and a neighbour within 1e-6 of a tie), as a [n, levels] mask."""
    q = cb.qmap.to(torch.float64)[: cb.levels]
    d = (x64[:, None] - q[None, :]).abs()
    best = d.min(1, keepdim=True).values
    ok = d <= best * (1 + 1e-6) + 1e-300
    return ok, q


# ----------------------------------------------------------------------------- tiny fp32 scales


def test_issue_repro_log_codebook_tiny_v_scale_zero_grad():
    """Issue 17: 4-bit log exp_avg_sq, v scale 1e-41, zero gradient: 1 / scale was +inf and
    0 * inf = NaN; the kernel sent NaN to code 0, the twin to the top code."""
    p = torch.randn(256, generator=torch.Generator().manual_seed(3))
    r = Run(p, vk="log", vb=4, v_scale=1e-41)
    a, b = r.both([torch.zeros(256)])
    assert_bitwise(a, b)


@pytest.mark.parametrize("kind,bits", [("log", 2), ("log", 3), ("log", 4), ("linear", 4), ("pow2", 4), ("pow2", 8)])
@pytest.mark.parametrize("scale", [1e-41, 2.0**-149, 2.0**-128, 2.0**-127, 2.0**-65, 2.0**-64, 1e-30])
def test_tiny_v_scale_codes_are_the_nearest_levels(kind, bits, scale):
    """Twin and kernel agree for tiny (subnormal included) exp_avg_sq scales, and the codes are the
    nearest levels of v / scale computed in fp64 (independent of the fp32 reciprocal)."""
    p = torch.randn(128, generator=torch.Generator().manual_seed(5))
    r = Run(p, vk=kind, vb=bits, v_scale=scale)
    g = torch.zeros(128)
    a, b = r.both([g])
    assert_bitwise(a, b)
    # the reference: v = decode(old code) * scale * beta2, exactly as fp32 (one rounding each)
    old = unpack_codes(r.vc, bits).view(-1)
    v = (r.vcb.qmap[old.to(torch.int64)] * torch.tensor(scale, dtype=torch.float32)) * torch.tensor(0.999, dtype=torch.float32)
    v = v.view(-1, BLOCK)
    new_scale = v.amax(1)
    assert torch.equal(a[4], new_scale), "the scale is the block's absmax"
    x64 = (v.to(torch.float64) / torch.where(new_scale > 0, new_scale, 1.0).to(torch.float64)[:, None]).view(-1)
    ok, _ = nearest_codes_ref(x64, r.vcb)
    got = unpack_codes(a[3], bits).view(-1).to(torch.int64)
    good = ok[torch.arange(got.numel()), got]
    assert bool(good.all()), f"{int((~good).sum())} codes are not a nearest level (first at {int((~good).nonzero()[0])})"


@pytest.mark.parametrize("kind,bits", [("linear", 4), ("pow2", 4), ("pow2", 8), ("linear", 2)])
@pytest.mark.parametrize("scale", [1e-41, 2.0**-140, 2.0**-128, 2.0**-64])
def test_tiny_m_scale_codes_are_the_nearest_levels(kind, bits, scale):
    p = torch.randn(128, generator=torch.Generator().manual_seed(6))
    r = Run(p, mk=kind, mb=bits, m_scale=scale)
    a, b = r.both([torch.zeros(128)])
    assert_bitwise(a, b)
    old = unpack_codes(r.mc, bits).view(-1).to(torch.int64)
    m = (r.mcb.qmap[old] * torch.tensor(scale, dtype=torch.float32)) * torch.tensor(0.9, dtype=torch.float32)
    m = m.view(-1, BLOCK)
    s = m.abs().amax(1)
    assert torch.equal(a[2], s)
    x64 = (m.to(torch.float64) / torch.where(s > 0, s, 1.0).to(torch.float64)[:, None]).view(-1)
    ok, _ = nearest_codes_ref(x64, r.mcb)
    got = unpack_codes(a[1], bits).view(-1).to(torch.int64)
    assert bool(ok[torch.arange(got.numel()), got].all())


@pytest.mark.parametrize("scale", [2.0**64, 2.0**100, 2.0**126, 1e38])
def test_huge_scales_keep_full_precision(scale):
    """A huge scale: 1 / scale is subnormal (few bits); the prescale keeps the normalized values
    exact to fp32, so the codes are the fp64 nearest levels. Twin and kernel agree."""
    p = torch.randn(128, generator=torch.Generator().manual_seed(7))
    r = Run(p, mk="linear", mb=8, vk="linear", vb=8, m_scale=scale, v_scale=scale)
    a, b = r.both([torch.zeros(128)])
    assert_bitwise(a, b)
    for codes, cb, beta, stored in ((r.vc, r.vcb, 0.999, a[3]), (r.mc, r.mcb, 0.9, a[1])):
        old = unpack_codes(codes, 8).view(-1).to(torch.int64)
        x = ((cb.qmap[old] * torch.tensor(scale, dtype=torch.float32)) * torch.tensor(beta, dtype=torch.float32)).view(-1, BLOCK)
        s = x.abs().amax(1)
        x64 = (x.to(torch.float64) / s.to(torch.float64)[:, None]).view(-1)
        ok, _ = nearest_codes_ref(x64, cb)
        got = unpack_codes(stored, 8).view(-1).to(torch.int64)
        assert bool(ok[torch.arange(got.numel()), got].all())


def test_factored_tiny_m_scale():
    """The factored kernel normalizes exp_avg like the packed one (tiny scale, zero gradient)."""
    n, cols = 256, 16
    p = torch.randn(n, generator=torch.Generator().manual_seed(8))
    mcb, mc, ms = make_state(n, 4, "linear", True, 1e-41)
    outs = []
    for fn in (torch_factored_adam_step, triton_factored_adam_step):
        pp, c, s = p.clone(), mc.clone(), ms.clone()
        row, col = torch.full((n // cols,), 1e-3), torch.full((cols,), 1e-3)
        sc = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, adamw=True)
        fn(pp, torch.zeros(n), c, s, row, col, mcb, sc, block_size=BLOCK)
        outs.append((pp, c, s))
    for x, y in zip(*outs):
        assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x, y.view(torch.uint8) if y.is_floating_point() else y)
    assert not torch.isnan(outs[0][2]).any()


# ----------------------------------------------------------------------------- long zero-gradient runs


@pytest.mark.parametrize("vk,vb", [("log", 4), ("log", 2), ("pow2", 4), ("linear", 3)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_long_zero_gradient_run_twin(vk, vb, scale_dtype):
    """4000 zero-gradient steps on the twin (a frozen row): scales decay through the subnormal
    range to 0 without NaN or inf; every code stays a valid level, and an all-zero moment block ends
    with scale 0. (The kernel runs the same from the decayed state in the next test.)"""
    n = 128
    p = torch.randn(n, generator=torch.Generator().manual_seed(9))
    # exp_avg from 1 (0.9**4000 underflows); exp_avg_sq from 2**-125 (0.999**4000 = 2**-5.8: subnormal). A bf16
    # exp_avg_sq scale does not decay at all (0.999 * s rounds back to s: its top code stays the top level),
    # so it starts subnormal (2**-130) and stays there
    v0 = 2.0**-125 if scale_dtype == torch.float32 else 2.0**-130
    r = Run(p, mk="pow2", mb=4, vk=vk, vb=vb, m_scale=1.0, v_scale=v0, scale_dtype=scale_dtype)
    pp, mc, ms, vc, vs = (t.clone() for t in (r.p, r.mc, r.ms, r.vc, r.vs))
    g = torch.zeros(n)
    seen_sub = False
    for step in range(1, 4001):
        sc = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=step, adamw=True)
        torch_packed_adam_step(pp, g, mc, ms, vc, vs, r.mcb, r.vcb, sc, block_size=BLOCK)
        s = vs.to(torch.float32)
        assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(ms.to(torch.float32)).all()), step
        assert bool(torch.isfinite(pp).all()), step
        seen_sub |= bool(((s > 0) & (s < 2.0**-126)).any())
    assert seen_sub, "the run went through subnormal exp_avg_sq scales"
    # 0.9 * k * tiny rounds back to k * tiny for k <= 4: exp_avg sticks at a few subnormal ulps (as an
    # fp32 exp_avg would), it does not reach 0
    tiny = 2.0**-149 if scale_dtype == torch.float32 else 2.0**-133  # the dtype's smallest subnormal
    assert 0.0 < float(ms.to(torch.float32).max()) <= 4 * tiny
    assert int(unpack_codes(vc, vb).max()) < 2**vb


@pytest.mark.parametrize("vk,vb", [("log", 4), ("pow2", 4)])
def test_zero_gradient_through_underflow_kernel_equals_twin(vk, vb):
    """The kernel on fewer steps: 40 zero-gradient steps take exp_avg_sq's scale from just above 2**-128
    to below it (where 1 / scale overflowed) and exp_avg's from 2**-120 into the subnormals."""
    p = torch.randn(128, generator=torch.Generator().manual_seed(10))
    r = Run(p, mk="linear", mb=4, vk=vk, vb=vb, m_scale=2.0**-120, v_scale=2.0**-128 * 1.02)
    g = [torch.zeros(128)] * 40
    a, b = r.both(g)
    assert_bitwise(a, b)
    assert float(a[4].max()) < 2.0**-128


# ----------------------------------------------------------------------------- bf16 scales, subnormal


def test_twin_bf16_scale_decode_is_exact_on_subnormals():
    """The interpreter garbles bf16 subnormals (0x0001 -> 0, 0x0060 -> 5.88e-39); the twin must not:
    dequantization with every subnormal bf16 scale equals codes times the exact bits << 16."""
    cb = get_codebook("linear", 4, True)
    scale_bits = torch.tensor(list(range(0x0001, 0x0080)) + [0x8040 & 0x7FFF, 0x0080, 0x7F7F], dtype=torch.int32)
    scale = scale_bits.to(torch.int16).view(torch.bfloat16)
    codes = torch.full((scale.numel(), BLOCK), 14, dtype=torch.uint8)  # level +1
    got = dequantize_blocks(codes, scale, cb)[:, 0]
    ref = torch.tensor(bf16_to_f32_ref(scale), dtype=torch.float32)
    assert torch.equal(bits32(got), bits32(ref * cb.qmap[14]))


def test_twin_bf16_scale_rounding_is_exact_on_subnormals():
    """The stored bf16 scale of a block is the fp32 absmax rounded to nearest even on its bits,
    subnormals included, and saturates at the largest finite bf16 instead of rounding to inf."""
    cb = get_codebook("linear", 4, True)
    g = torch.Generator().manual_seed(11)
    vals = torch.cat([torch.rand(200, generator=g) * 2.0**-126, torch.rand(50, generator=g) * 2.0**-133,
                      torch.tensor([9e-39, 1e-45, 2.0**-126, BF16_MAX, FLT_MAX, 3.3961e38])])  # fmt: skip
    x = torch.zeros(vals.numel(), BLOCK)
    x[:, 3] = vals
    x[:, 7] = -vals * 0.5
    _, scale = quantize_blocks(x, cb, torch.bfloat16)
    want = [min(f32_to_bf16_bits_ref(v), 0x7F7F) for v in vals.tolist()]
    got = [int(b) & 0xFFFF for b in scale.view(torch.int16).tolist()]
    assert got == want


def test_bf16_scales_normal_range_kernel_equals_twin():
    """bf16 scales away from the subnormals (where the interpreter is exact): bitwise parity, tiny
    fp32 moments included (bf16 params: the stored parameter rounds on its bits, as the GPU)."""
    p = (torch.randn(256, generator=torch.Generator().manual_seed(12)) * 1e-30).to(torch.bfloat16)
    r = Run(p, mk="pow2", mb=4, vk="log", vb=4, m_scale=2.0**-100, v_scale=2.0**-120, scale_dtype=torch.bfloat16)
    g = torch.randn(256, generator=torch.Generator().manual_seed(13)) * 1e-20
    a, b = r.both([g.to(torch.bfloat16), torch.zeros(256, dtype=torch.bfloat16)])
    assert_bitwise(a, b)


# ----------------------------------------------------------------------------- params and grads at the edges


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_subnormal_huge_and_zero_params_and_grads(pdtype, stochastic):
    """Parameters and gradients mixing 0, -0, subnormal, tiny, normal and huge (finite) values: twin and
    kernel agree bitwise (fp32 / bf16 / fp16 parameters; every stored scale finite)."""
    gen = torch.Generator().manual_seed(14)
    n = 4 * BLOCK
    edge = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 2.0**-126, 1e-20, 1.0, -1.0, 1e15, -3e18, 1e19])
    if pdtype == torch.bfloat16:  # bf16 subnormals: the interpreter garbles them (test_twin_bf16_*, test_ptx_*)
        edge = edge.where(edge.abs() >= 2.0**-126, edge.sign() * 2.0**-125)
    pick = torch.randint(0, edge.numel(), (n,), generator=gen)
    p = edge[pick] * torch.rand(n, generator=gen)
    if pdtype == torch.bfloat16:
        p = p.where(p.abs() >= 2.0**-126, p.sign() * 2.0**-125)
    p = p.to(pdtype)
    grads = [edge[torch.randint(0, edge.numel(), (n,), generator=gen)] for _ in range(3)]
    grads[1][BLOCK : 2 * BLOCK] = 0.0
    grads = [x.to(pdtype if pdtype != torch.float16 else torch.float32) for x in grads]
    r = Run(p, mk="pow2", mb=4, vk="pow2", vb=4, m_scale=0.0, v_scale=0.0)
    a, b = r.both(grads, stochastic=stochastic, wd=0.01)
    assert_bitwise(a, b)
    assert bool(torch.isfinite(a[2]).all()) and bool(torch.isfinite(a[4]).all())


@pytest.mark.parametrize("mk,vk", [(mk, vk) for mk in valid_kinds(3, True) for vk in valid_kinds(3, False)])
def test_every_codebook_kind_with_extreme_scales(mk, vk):
    """Every codebook kind, scales spanning subnormal to huge in one tensor (one per block)."""
    n = 6 * BLOCK
    p = torch.randn(n, generator=torch.Generator().manual_seed(15))
    scales = torch.tensor([1e-44, 2.0**-130, 1e-20, 1.0, 2.0**70, 1e38])
    r = Run(p, mk=mk, mb=3, vk=vk, vb=3, m_scale=scales, v_scale=scales)
    g = torch.randn(n, generator=torch.Generator().manual_seed(16)) * 1e-25
    a, b = r.both([g, torch.zeros(n)], stochastic=False)
    assert_bitwise(a, b)
    a, b = r.both([g], stochastic=True)
    assert_bitwise(a, b)


# ----------------------------------------------------------------------------- NaN / inf (nonfinite="unchecked")


def _nonfinite_case(g_vals):
    n = 2 * BLOCK
    p = torch.randn(n, generator=torch.Generator().manual_seed(17))
    g = torch.randn(n, generator=torch.Generator().manual_seed(18))
    g[: len(g_vals)] = torch.tensor(g_vals)
    g[BLOCK:] = float("nan")  # a whole block of NaN
    r = Run(p, mk="linear", mb=4, vk="linear", vb=4, m_scale=0.0, v_scale=0.0)  # zero state: m = g / 10
    return r, g


@pytest.mark.parametrize("fn", [torch_packed_adam_step, triton_packed_adam_step], ids=["twin", "kernel"])
def test_nonfinite_gradients_defined_behaviour(fn):
    """NaN / inf gradients (nonfinite="unchecked", Megatron's setting): the parameter is non-finite
    where the gradient is, so Megatron's own checks see it; the stored moments are finite: exp_avg
    NaN/inf -> 0, exp_avg_sq NaN -> 0, inf -> the largest fp32; no scale is NaN or inf. Expected values
    by plain fp32 arithmetic on the zero state (m = 0.1 g, v = 0.001 g**2)."""
    r, g = _nonfinite_case([float("nan"), float("inf"), float("-inf"), 1e20])
    p, mc, ms, vc, vs = r.run(fn, [g])
    assert torch.isnan(p[0]) and not torch.isfinite(p[1]) and not torch.isfinite(p[2])
    assert bool(torch.isnan(p[BLOCK:]).all())
    assert bool(torch.isfinite(p[3:BLOCK]).all()), "a finite gradient whose square overflows leaves a finite param"
    omb1, omb2 = torch.tensor(0.1, dtype=torch.float32), torch.tensor(0.001, dtype=torch.float32)
    gf = g[:BLOCK].clone()
    gf[:3] = 0.0
    m_ref = gf * omb1
    v_ref = (gf * gf) * omb2
    v_ref[3] = FLT_MAX  # 1e40 * 0.001 overflows: inf -> FLT_MAX
    v_ref[1] = FLT_MAX  # inf gradient
    v_ref[2] = FLT_MAX
    assert float(ms[0]) == float(m_ref.abs().max()) and float(ms[1]) == 0.0
    assert float(vs[0]) == FLT_MAX and float(vs[1]) == 0.0
    mcode = unpack_codes(mc, 4)
    vcode = unpack_codes(vc, 4)
    assert mcode[0, 0] == 7 and mcode[0, 1] == 7 and mcode[0, 2] == 7, "exp_avg NaN/inf -> level 0 (code 7)"
    assert bool((mcode[1] == 7).all()) and bool((vcode[1] == 0).all())
    assert vcode[0, 0] == 0 and vcode[0, 1] == 15 and vcode[0, 3] == 15


def test_nonfinite_kernel_equals_twin():
    for vals in ([float("nan")] * 5, [float("inf"), 1.0, float("-inf")], [3e19, -3e19, 1e38]):
        r, g = _nonfinite_case(vals)
        for kw in (dict(), dict(stochastic=True), dict(wd=0.1, adamw=False)):
            a, b = r.both([g, torch.randn(2 * BLOCK)], **kw)
            assert_bitwise([x.nan_to_num() if x.is_floating_point() and x.numel() == 2 * BLOCK else x for x in a],
                           [x.nan_to_num() if x.is_floating_point() and x.numel() == 2 * BLOCK else x for x in b])


def test_nonfinite_param_with_finite_grad():
    """A NaN parameter with weight decay (L2): the gradient term is NaN, the moments are stored as 0,
    the parameter stays NaN; twin and kernel agree."""
    p = torch.randn(BLOCK, generator=torch.Generator().manual_seed(19))
    p[5] = float("nan")
    p[6] = float("inf")
    r = Run(p, m_scale=1e-3, v_scale=1e-6)
    a, b = r.both([torch.randn(BLOCK)], wd=0.1, adamw=False)
    assert torch.isnan(a[0][5]) and not torch.isfinite(a[0][6])
    nz = lambda t: t.nan_to_num() if t.is_floating_point() else t  # noqa: E731
    assert_bitwise([nz(x) for x in a], [nz(x) for x in b])
    assert bool(torch.isfinite(a[2]).all()) and bool(torch.isfinite(a[4]).all())


# ----------------------------------------------------------------------------- the compiled kernel's PTX


def _compile_ptx_report(spec_kwargs: dict) -> dict:
    """Compile one specialization for sm_90 (ahead of time, no GPU) in a subprocess without the
    interpreter; returns gpu_compile's result plus the PTX instructions of interest."""
    code = (
        "import json, re, sys; sys.path.insert(0, 'benchmarks'); import gpu_compile as gc\n"
        f"spec = gc.Spec(**{spec_kwargs!r})\n"
        "k, a, kw = gc.launch(spec)\n"
        "r = gc.compile_call(k, a, kw, 90)\n"
        "ptx = gc.last_ptx(k, a, kw, 90)\n"
        "r['cvt_bf16'] = sorted(set(re.findall(r'cvt(?:\\.[a-z0-9]+)*\\.f32\\.bf16', ptx)))\n"
        "r['ftz_lines'] = gc.ftz_instructions(ptx)\n"
        "print('JSON' + json.dumps(r))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("JSON", 1)[1])


@pytest.mark.slow
def test_ptx_bf16_scales_use_the_exact_conversion_and_no_ftz():
    """bf16 scales and parameters (the path the interpreter cannot prove on subnormals): the compiled
    kernel converts bf16 -> fp32 with the exact ``cvt.f32.bf16`` (no ``.ftz``), and no instruction on
    its own path flushes subnormals (``tl.floor`` compiled with enable_reflect_ftz=False)."""
    r = _compile_ptx_report(dict(path="group", pdtype="bf16", gdtype="bf16", sdtype="bf16", m_kind="pow2",
                                 v_kind="log", m_bits=4, v_bits=4))  # fmt: skip
    assert r["ok"], r.get("error")
    assert r["cvt_bf16"] == ["cvt.f32.bf16"], r["cvt_bf16"]
    assert r["ftz_lines"] == [], r["ftz_lines"][:5]
