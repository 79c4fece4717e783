"""Codebooks (``formats/codebooks.py``) and the rounding that uses them (``kernels/torch_adam.py``:
``encode`` / ``decode`` / ``quantize_blocks`` / ``dequantize_blocks``)."""

from __future__ import annotations

import math

import pytest
import torch

from stquant_megatron.formats.codebooks import (
    KINDS, LOG_STEP, MAX_BITS, MIN_BITS, check_kind, get_codebook, level_values,
)  # fmt: skip
from stquant_megatron.kernels.common import rng_key
from stquant_megatron.kernels.torch_adam import decode, dequantize_blocks, encode, quantize_blocks, uniforms

from conftest import ALL_BITS, ALL_CODEBOOKS

INVALID = (
    [("log", b, True) for b in ALL_BITS]  # log is unsigned only
    + [("log", b, False) for b in ALL_BITS if b not in LOG_STEP]  # and 2..4 bits only
    + [(k, b, s) for k in ("linear", "pow2") for b in (0, 1, 9, 16) for s in (True, False)]
    + [("foo", 4, True), ("Linear", 4, False), ("", 8, False)]
)


def _ids(c):
    return f"{c[0]}-{c[1]}-{'signed' if c[2] else 'unsigned'}"


def test_allowed_set_is_what_the_docs_say():
    assert KINDS == ("linear", "pow2", "log")
    assert (MIN_BITS, MAX_BITS) == (2, 8)
    assert sorted(LOG_STEP) == [2, 3, 4]
    # 7 widths x (linear, pow2) x (signed, unsigned) + log at 3 widths, unsigned
    assert len(ALL_CODEBOOKS) == 7 * 2 * 2 + 3


@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=_ids)
def test_codebook_shapes_and_sorted(cfg):
    kind, bits, signed = cfg
    check_kind(kind, bits, signed)  # does not raise
    cb = get_codebook(kind, bits, signed)
    n = 2**bits
    assert (cb.kind, cb.bits, cb.signed) == cfg
    assert cb.qmap.dtype == torch.float32 and cb.qmap.shape == (n,)
    assert cb.bounds.dtype == torch.float32 and cb.bounds.shape == (n - 1,)
    assert cb.levels == (n - 1 if signed else n)
    assert cb.offset == (2 ** (bits - 1) - 1 if signed else 0)
    levels = cb.qmap[: cb.levels]
    assert bool((levels[1:] > levels[:-1]).all()), "levels must be strictly increasing"
    assert bool((cb.qmap[1:] >= cb.qmap[:-1]).all()), "qmap must be sorted"
    assert float(levels[-1]) == 1.0
    # the unused top signed code repeats +1
    assert bool((cb.qmap[cb.levels :] == 1.0).all())
    # bounds: levels 1 .. levels-1, +inf padded
    assert torch.equal(cb.bounds[: cb.levels - 1], levels[1:])
    assert bool(torch.isinf(cb.bounds[cb.levels - 1 :]).all())
    # cached, and the same object on a second call
    assert get_codebook(kind, bits, signed) is cb


@pytest.mark.parametrize("cfg", [c for c in ALL_CODEBOOKS if c[2]], ids=_ids)
def test_signed_exact_zero_and_symmetric(cfg):
    cb = get_codebook(*cfg)
    L = cb.offset
    q = cb.qmap
    assert float(q[L]) == 0.0
    assert float(q[0]) == -1.0 and float(q[2 * L]) == 1.0
    for k in range(L + 1):
        assert float(q[L + k]) == -float(q[L - k]), k
    assert int((q == 0).sum()) == 1


@pytest.mark.parametrize("cfg", [c for c in ALL_CODEBOOKS if not c[2]], ids=_ids)
def test_unsigned_is_zero_free(cfg):
    """v never decodes to zero: no level is 0, decoding any code gives > 0, and so does quantizing
    zeros and tiny values in a block with a positive scale."""
    cb = get_codebook(*cfg)
    assert bool((cb.qmap > 0).all())
    codes = torch.arange(2**cb.bits, dtype=torch.int64).to(torch.uint8)
    assert bool((decode(codes, cb) > 0).all())
    x = torch.tensor([[0.0, 1e-38, 1e-30, 1e-12, 1e-6, 1e-3, 0.5, 2.0] * 4])
    q, scale = quantize_blocks(x, cb, torch.float32)
    assert float(scale[0]) == 2.0
    out = dequantize_blocks(q, scale, cb)
    assert bool((out > 0).all()), out
    assert float(out[0, 7]) == 2.0  # the block maximum is exact


@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=_ids)
def test_level_values_closed_forms(cfg):
    """qmap equals the closed forms of the module docstring (computed here in float64), and
    ``level_values`` / ``decode`` (the encoder's and the kernel's path) equal qmap exactly."""
    kind, bits, signed = cfg
    cb = get_codebook(*cfg)
    n = 2**bits
    if signed:
        L = 2 ** (bits - 1) - 1
        k = torch.arange(-L, L + 1, dtype=torch.float64)
        s = k / L
    else:
        k = torch.arange(n, dtype=torch.float64)
        s = (k + 1) / n
    if kind == "linear":
        want = s
    elif kind == "pow2":
        want = s * s.abs()
    else:
        want = torch.exp2(-(n - 1 - k) * LOG_STEP[bits])
    got = cb.qmap[: cb.levels].double()
    if signed:  # k * (1/L) in fp32 may be one ulp from k / L
        torch.testing.assert_close(got, want, rtol=2.0**-22, atol=0.0)
    else:  # power-of-two denominators: exact
        assert torch.equal(got, want.float().double())
    # the function the encoder and kernel use, on fp32 level indices
    assert torch.equal(level_values(k.float(), kind, bits, signed), cb.qmap[: cb.levels])
    codes = torch.arange(cb.levels, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(decode(codes, cb), cb.qmap[: cb.levels])


@pytest.mark.parametrize("cfg", INVALID, ids=_ids)
def test_invalid_combinations_raise(cfg):
    with pytest.raises(ValueError):
        check_kind(*cfg)
    with pytest.raises(ValueError):
        get_codebook(*cfg)


def test_invalid_messages_are_clear():
    with pytest.raises(ValueError, match="unknown"):
        get_codebook("foo", 4, True)
    with pytest.raises(ValueError, match="bits=9"):
        get_codebook("linear", 9, True)
    with pytest.raises(ValueError, match="log"):
        get_codebook("log", 5, False)


# ------------------------------------------------------------------------------ rounding


def _probe_values(cb) -> torch.Tensor:
    """Random values over the codebook range, every level, every midpoint and its fp32
    neighbours, the ends, and (unsigned) values below the smallest level."""
    g = torch.Generator().manual_seed(cb.bits * 7 + KINDS.index(cb.kind))
    q = cb.qmap[: cb.levels]
    lo = -1.0 if cb.signed else 0.0
    rand = torch.rand(4000, generator=g) * (1.0 - lo) + lo
    # log-spaced magnitudes, to probe the dense low end of pow2 / log codebooks
    mags = torch.exp2(-torch.rand(4000, generator=g) * 30)
    if cb.signed:
        mags = mags * torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0)
    mid = (q[1:] + q[:-1]) / 2
    near = torch.cat([torch.nextafter(mid, torch.full_like(mid, 2.0)), torch.nextafter(mid, torch.full_like(mid, -2.0))])
    extra = torch.tensor([lo, 1.0, 0.0, 1e-30, 1e-45])
    x = torch.cat([rand, mags, q, mid, near, extra])
    if not cb.signed:
        x = x.clamp_min(0.0)
    return x


@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=_ids)
def test_nearest_rounding_picks_nearest_level(cfg):
    cb = get_codebook(*cfg)
    x = _probe_values(cb)
    codes = encode(x, cb, None)
    assert codes.dtype == torch.uint8
    assert int(codes.max()) < cb.levels, "codes stay in range (the top signed code is never produced)"
    q = cb.qmap[: cb.levels].double()
    d = (x.double()[:, None] - q[None, :]).abs()
    dmin = d.min(1).values
    dgot = d.gather(1, codes.long()[:, None]).squeeze(1)
    # ties (and fp32 rounding of x - q within a few ulps of a tie) may go either way
    tol = 2.0**-22 * x.double().abs()
    bad = dgot > dmin + tol
    assert not bool(bad.any()), (x[bad][:5], codes[bad][:5], dgot[bad][:5], dmin[bad][:5])
    # levels themselves are reproduced exactly
    lev_codes = encode(cb.qmap[: cb.levels], cb, None)
    assert torch.equal(lev_codes.long(), torch.arange(cb.levels))
    # and decode(encode(x)) is the nearest value
    assert torch.equal(decode(codes, cb).double(), q[codes.long()])


@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=_ids)
def test_stochastic_rounding_unbiased_and_neighbours_only(cfg):
    """For values strictly between two levels, stochastic rounding gives only the two neighbours,
    both occur, and the mean over N draws is within 5 standard errors of the value.

    Tolerance: a draw is qlo or qhi with P(qhi) = (x - qlo) / (qhi - qlo), so the standard error of
    the mean of N draws is at most (qhi - qlo) / (2 sqrt N); the 16-bit uniform adds a bias of at
    most (qhi - qlo) / 2**16. Both numbers of an element (exp_avg's and exp_avg_sq's) are checked. 5 standard errors + that bias: a false failure has probability
    < 1e-6 per value (and the draws are deterministic, from the package's hash RNG).
    """
    cb = get_codebook(*cfg)
    q = cb.qmap[: cb.levels]
    g = torch.Generator().manual_seed(cb.bits + 100 * cb.signed)
    # 24 values: a fraction t in (0.05, 0.95) of the way between random adjacent levels
    i = torch.randint(0, cb.levels - 1, (24,), generator=g)
    t = 0.05 + 0.9 * torch.rand(24, generator=g)
    qlo, qhi = q[i], q[i + 1]
    x = qlo + t * (qhi - qlo)
    assert bool(((x > qlo) & (x < qhi)).all())
    N = 20000
    index = torch.arange(24 * N, dtype=torch.int64).view(24, N)
    for u in uniforms(index, torch.tensor(rng_key(1, 2, 3))):
        codes = encode(x[:, None].expand(24, N).contiguous(), cb, u)
        vals = decode(codes, cb)
        is_lo, is_hi = vals == qlo[:, None], vals == qhi[:, None]
        assert bool((is_lo | is_hi).all()), "stochastic rounding must pick one of the two neighbours"
        assert bool(is_lo.any(1).all() and is_hi.any(1).all())
        mean = vals.double().mean(1)
        gap = (qhi - qlo).double()
        tol = 5 * gap / (2 * math.sqrt(N)) + gap * 2.0**-15
        err = (mean - x.double()).abs()
        assert bool((err <= tol).all()), (err / gap).max()
    # empirical P(up) also matches (a sharper statement of the same thing)
    p_up = is_hi.double().mean(1)
    p_want = ((x - qlo) / (qhi - qlo)).double()
    assert bool(((p_up - p_want).abs() <= 5 * 0.5 / math.sqrt(N)).all())


@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=_ids)
def test_stochastic_rounding_keeps_levels_exact(cfg):
    """A value that is a level never moves, whatever the random number."""
    cb = get_codebook(*cfg)
    q = cb.qmap[: cb.levels]
    u = torch.rand(cb.levels, 64)
    codes = encode(q[:, None].expand(-1, 64).contiguous(), cb, u)
    assert torch.equal(codes.long(), torch.arange(cb.levels)[:, None].expand(-1, 64))


@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=_ids)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_quantize_blocks_scale_and_error(cfg, scale_dtype):
    """Scale = block absmax (signed) or max (unsigned) in the scale dtype; an all-zero block has
    scale 0 and decodes to exact zeros; the dequantized value is within the nearest-level error."""
    cb = get_codebook(*cfg)
    g = torch.Generator().manual_seed(cb.bits)
    x = torch.randn(6, 64, generator=g) * torch.exp2(torch.arange(6.0) * 5 - 10)[:, None]
    if not cb.signed:
        x = x * x
    x[3] = 0.0
    codes, scale = quantize_blocks(x, cb, scale_dtype)
    absmax = x.abs().amax(1)
    assert scale.dtype == scale_dtype
    assert torch.equal(scale, absmax.to(scale_dtype))
    out = dequantize_blocks(codes, scale, cb)
    assert torch.equal(out[3], torch.zeros(64))
    s = scale.float().clamp_min(1e-38)[:, None]
    # brute-force nearest in normalized units; x / s is computed in fp32 by the quantizer
    xn = (x / s).double()
    q = cb.qmap[: cb.levels].double()
    dmin = (xn[..., None] - q).abs().min(-1).values
    err = (out.double() / s.double() - xn).abs()
    assert bool((err <= dmin + 2.0**-20).all())


@pytest.mark.parametrize("bits", range(2, 9))
def test_nearest_pow2_bracket_from_approximate_root_gives_exact_nearest_codes(bits):
    """The signed pow2 nearest rounding brackets x with ``approx_sqrt`` (no IEEE square root); the
    codes equal those from the correctly rounded root at levels, midpoints and their 16 ulps around,
    and at random values."""
    import stquant_megatron.kernels.torch_adam as ta

    cb = get_codebook("pow2", bits, True)
    q = cb.qmap[: cb.levels]
    base = torch.cat([q, (q[1:] + q[:-1]) / 2, torch.rand(20000, generator=torch.Generator().manual_seed(bits)) * 2 - 1,
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40])])  # fmt: skip
    xs = [base]
    for direction in (2.0, -2.0):
        x = base
        for _ in range(16):
            x = torch.nextafter(x, torch.full_like(x, direction))
            xs.append(x)
    x = torch.cat(xs).clamp(-1.0, 1.0)
    top = float(2 ** (bits - 1) - 1)
    exact = torch.floor(torch.where(x < 0, -1.0, 1.0) * (ta.sqrt_rn(x.abs()) * top)).clamp(-top, top - 1.0)
    qlo = level_values(exact, "pow2", bits, True)
    qhi = level_values(exact + 1.0, "pow2", bits, True)
    want = (exact + ((x - qlo) > (qhi - x)).to(torch.float32) + float(cb.offset)).to(torch.uint8)
    assert torch.equal(encode(x, cb, None), want)
