"""``PackedState``: zeros, copy_/dequantize, requantize, to_dict/from_dict, nbytes."""

from __future__ import annotations

import io

import pytest
import torch

from stquant_megatron.formats.codebooks import get_codebook
from stquant_megatron.formats.packing import codes_nbytes, num_blocks, unpack_codes
from stquant_megatron.state import PackedState

from conftest import ALL_BITS, ALL_CODEBOOKS, valid_kinds

NUMELS = [0, 1, 33, 129, 1000]


def _values(numel: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Moment-like values: magnitudes over several decades, some zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.pow(10.0, -4 * torch.rand(numel, generator=g))
    x[torch.rand(numel, generator=g) < 0.1] = 0.0
    return x if signed else x * x


def _max_error_bound(cb, scale: torch.Tensor) -> torch.Tensor:
    """Per-block bound on |x - dequantize(quantize(x))|: half the widest gap between adjacent
    levels, or (unsigned, zero-free) the smallest level, whichever is larger, times the scale."""
    q = cb.qmap[: cb.levels]
    half_gap = float((q[1:] - q[:-1]).max()) / 2
    bound = max(half_gap, float(q[0])) if not cb.signed else half_gap
    return bound * scale.float()


@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=lambda c: f"{c[0]}-{c[1]}-{'s' if c[2] else 'u'}")
def test_zeros(cfg, numel):
    kind, bits, signed = cfg
    st = PackedState.zeros(numel, bits=bits, kind=kind, signed=signed, block_size=64)
    nb = num_blocks(numel, 64)
    assert st.codes.shape == (nb, bits, 8) and st.codes.dtype == torch.uint8
    assert st.scale.shape == (nb,) and st.scale.dtype == torch.float32
    assert (st.bits, st.signed, st.numel, st.block_size) == (bits, signed, numel, 64)
    assert st.codebook is get_codebook(kind, bits, signed, torch.device("cpu"))
    # zero scales decode to exact zeros, whatever the (zero-free) codebook
    assert torch.equal(st.dequantize(), torch.zeros(numel))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("cfg", ALL_CODEBOOKS, ids=lambda c: f"{c[0]}-{c[1]}-{'s' if c[2] else 'u'}")
def test_copy_dequantize_error_bounded(cfg, numel, scale_dtype):
    """|x - dequantize(copy_(x))| <= (half a level step, or the smallest unsigned level) x scale,
    and every value is the nearest representable one (brute force over scale * qmap)."""
    kind, bits, signed = cfg
    block = 32
    st = PackedState.zeros(numel, bits=bits, kind=kind, signed=signed, block_size=block, scale_dtype=scale_dtype)
    x = _values(numel, signed, seed=numel + bits)
    assert st.copy_(x) is st
    out = st.dequantize()
    assert out.shape == (numel,) and out.dtype == torch.float32
    nb = num_blocks(numel, block)
    pad = nb * block - numel
    xb = torch.nn.functional.pad(x, (0, pad)).view(nb, block)
    ob = torch.nn.functional.pad(out, (0, pad)).view(nb, block)
    absmax = xb.abs().amax(1)
    assert torch.equal(st.scale, absmax.to(scale_dtype))
    err = (xb - ob).abs()
    bound = _max_error_bound(st.codebook, st.scale)
    # a bf16 scale may round the absmax down: values above the scale clamp to it
    bound = bound + (absmax - st.scale.float()).clamp_min(0)
    assert bool((err <= bound[:, None] * (1 + 1e-6) + 1e-30).all())
    # nearest: no other representable value is closer (up to fp32 rounding of x / scale)
    cand = st.scale.float()[:, None] * st.codebook.qmap[: st.codebook.levels][None, :]
    dmin = (xb[..., None] - cand[:, None, :]).abs().min(-1).values
    assert bool((err <= dmin + 1e-6 * absmax[:, None] + 1e-30).all())
    # the block maximum is exact with fp32 scales
    if scale_dtype == torch.float32 and numel:
        i = xb.abs().argmax(1)
        assert torch.equal(ob.gather(1, i[:, None]).abs(), absmax[:, None])


def test_copy_accepts_any_float_dtype_and_shape():
    x = torch.randn(10, 13)
    a = PackedState.zeros(130, bits=5, kind="pow2", signed=True, block_size=32).copy_(x)
    b = PackedState.zeros(130, bits=5, kind="pow2", signed=True, block_size=32).copy_(x.reshape(-1).double())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    c = PackedState.zeros(130, bits=5, kind="pow2", signed=True, block_size=32).copy_(x.bfloat16())
    assert torch.equal(c.dequantize(), PackedState.zeros(130, bits=5, kind="pow2", signed=True, block_size=32)
                       .copy_(x.bfloat16().float()).dequantize())  # fmt: skip


def test_copy_wrong_numel_raises():
    st = PackedState.zeros(100, bits=4, kind="linear", signed=True, block_size=32)
    before = st.codes.clone(), st.scale.clone()
    with pytest.raises(ValueError, match="100"):
        st.copy_(torch.randn(101))
    assert torch.equal(st.codes, before[0]) and torch.equal(st.scale, before[1])


def test_chunked_conversion_equals_unchunked(monkeypatch):
    import stquant_megatron.state as state_mod

    x = _values(5000, True, seed=3)
    a = PackedState.zeros(5000, bits=3, kind="pow2", signed=True, block_size=32).copy_(x)
    monkeypatch.setattr(state_mod, "CHUNK_ELEMENTS", 64)
    b = PackedState.zeros(5000, bits=3, kind="pow2", signed=True, block_size=32).copy_(x)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.dequantize(), b.dequantize())
    b.requantize(6, "linear")
    monkeypatch.setattr(state_mod, "CHUNK_ELEMENTS", 1 << 18)
    a.requantize(6, "linear")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


REQ = [(s, ob, ok, nb, nk) for s in (True, False) for ob in ALL_BITS for nb in ALL_BITS
       for ok in valid_kinds(ob, s)[-1:] for nk in valid_kinds(nb, s)[:1] + valid_kinds(nb, s)[-1:]]  # fmt: skip


@pytest.mark.parametrize("signed,old_bits,old_kind,new_bits,new_kind", REQ)
def test_requantize_equals_fresh_quantization_of_dequantized(signed, old_bits, old_kind, new_bits, new_kind):
    numel, block = 300, 64
    for scale_dtype in (torch.float32, torch.bfloat16):
        st = PackedState.zeros(numel, bits=old_bits, kind=old_kind, signed=signed, block_size=block,
                               scale_dtype=scale_dtype)  # fmt: skip
        st.copy_(_values(numel, signed, seed=old_bits))
        old_codes = st.codes
        dense = st.dequantize()
        fresh = PackedState.zeros(numel, bits=new_bits, kind=new_kind, signed=signed, block_size=block,
                                  scale_dtype=scale_dtype).copy_(dense)  # fmt: skip
        st.requantize(new_bits, new_kind)
        assert (st.bits, st.codebook.kind, st.signed, st.numel, st.block_size) == (new_bits, new_kind, signed, numel, block)
        assert st.codes.shape == (num_blocks(numel, block), new_bits, block // 8)
        assert st.scale.dtype == scale_dtype
        assert torch.equal(st.codes, fresh.codes)
        assert torch.equal(st.scale, fresh.scale)
        if new_bits != old_bits:
            assert st.codes is not old_codes


def test_requantize_same_width_is_idempotent():
    st = PackedState.zeros(500, bits=4, kind="pow2", signed=False, block_size=32).copy_(_values(500, False))
    codes, scale = st.codes.clone(), st.scale.clone()
    st.requantize(4, "pow2")
    assert torch.equal(st.codes, codes) and torch.equal(st.scale, scale)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [("pow2", 3, True), ("log", 2, False), ("linear", 8, False), ("pow2", 7, True)])
def test_to_dict_from_dict_exact(cfg, scale_dtype):
    kind, bits, signed = cfg
    st = PackedState.zeros(1001, bits=bits, kind=kind, signed=signed, block_size=128, scale_dtype=scale_dtype)
    st.copy_(_values(1001, signed))
    d = st.to_dict()
    assert d["bits"] == bits and d["codebook"] == kind and d["signed"] == signed
    assert d["numel"] == 1001 and d["block_size"] == 128
    # plain values and tensors only: survives torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    d2 = torch.load(buf, weights_only=True)
    back = PackedState.from_dict(d2, torch.device("cpu"))
    assert torch.equal(back.codes, st.codes) and torch.equal(back.scale, st.scale)
    assert back.scale.dtype == scale_dtype
    assert (back.bits, back.codebook.kind, back.signed, back.numel, back.block_size) == (
        bits, kind, signed, 1001, 128)  # fmt: skip
    assert back.codebook is st.codebook
    assert torch.equal(back.dequantize(), st.dequantize())
    assert back.nbytes == st.nbytes


def _good_dict():
    st = PackedState.zeros(200, bits=4, kind="pow2", signed=True, block_size=64)
    st.copy_(torch.randn(200))
    return st.to_dict()


MALFORMED = {
    "missing codes": lambda d: d.pop("codes"),
    "missing bits": lambda d: d.pop("bits"),
    "missing numel": lambda d: d.pop("numel"),
    "bits None": lambda d: d.update(bits=None),
    "bits out of range": lambda d: d.update(bits=9),
    "bits disagree with codes": lambda d: d.update(bits=5),
    "unknown codebook": lambda d: d.update(codebook="foo"),
    "log for signed": lambda d: d.update(codebook="log"),
    "codes not a tensor": lambda d: d.update(codes=[1, 2, 3]),
    "codes wrong dtype": lambda d: d.update(codes=d["codes"].to(torch.int32)),
    "codes wrong shape": lambda d: d.update(codes=d["codes"][:-1]),
    "codes flat": lambda d: d.update(codes=d["codes"].reshape(-1)),
    "scale not a tensor": lambda d: d.update(scale=1.0),
    "scale wrong dtype": lambda d: d.update(scale=d["scale"].half()),
    "scale wrong shape": lambda d: d.update(scale=d["scale"][:-1]),
    "numel too large": lambda d: d.update(numel=257),
    "numel negative": lambda d: d.update(numel=-1, codes=d["codes"][:0], scale=d["scale"][:0]),
    "block_size zero": lambda d: d.update(block_size=0),
    "block_size not a multiple of 8": lambda d: d.update(block_size=12, numel=4, codes=torch.zeros(1, 4, 1, dtype=torch.uint8),
                                                         scale=torch.zeros(1)),  # fmt: skip
    "not a dict": None,
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_from_dict_rejects_malformed(name):
    if MALFORMED[name] is None:
        with pytest.raises(ValueError):
            PackedState.from_dict(["codes"], torch.device("cpu"))  # type: ignore[arg-type]
        return
    d = _good_dict()
    MALFORMED[name](d)
    with pytest.raises(ValueError):
        PackedState.from_dict(d, torch.device("cpu"))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", [0, 1, 1000, 4097])
@pytest.mark.parametrize("block", [32, 128, 4096])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nbytes_exact(bits, numel, block, scale_dtype):
    st = PackedState.zeros(numel, bits=bits, kind="pow2", signed=False, block_size=block, scale_dtype=scale_dtype)
    nb = num_blocks(numel, block)
    scale_bytes = nb * (4 if scale_dtype == torch.float32 else 2)
    assert st.nbytes == codes_nbytes(numel, bits, block) + scale_bytes
    assert st.nbytes == st.codes.untyped_storage().nbytes() + st.scale.untyped_storage().nbytes()
    st.requantize(2 if bits > 2 else 8, "pow2")
    assert st.nbytes == codes_nbytes(numel, st.bits, block) + scale_bytes


def test_codes_are_the_packed_nearest_codes():
    """The stored codes are pack_codes of the nearest codes (and unpack to codes < 2**bits)."""
    st = PackedState.zeros(256, bits=3, kind="linear", signed=True, block_size=128)
    x = torch.linspace(-1, 1, 256)
    st.copy_(x)
    codes = unpack_codes(st.codes, 3).view(-1).long()
    assert int(codes.max()) <= 6  # the top signed code (7) is never produced
    expected = torch.round(x / x.view(2, 128).abs().amax(1).repeat_interleave(128) * 3).long() + 3
    # rounding ties (exact midpoints) may go either way
    assert int((codes - expected).abs().max()) <= 1
    assert int((codes != expected).sum()) <= 4


def test_repr():
    r = repr(PackedState.zeros(10, bits=3, kind="log", signed=False, block_size=32))
    assert "numel=10" in r and "bits=3" in r and "'log'" in r
