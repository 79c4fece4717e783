"""Bit-plane packing (``formats/packing.py``): round trips, the layout itself, exact sizes."""

from __future__ import annotations

import pytest
import torch

from stquant_megatron.formats.packing import codes_nbytes, num_blocks, pack_codes, unpack_codes
from stquant_megatron.state import PackedState

from conftest import ALL_BITS


def _random_codes(nb: int, block: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (nb, block), generator=g, dtype=torch.int64).to(torch.uint8)


def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, written out element by element: plane j, byte e // 8, bit e % 8
    holds bit j of code e."""
    nb, block = codes.shape
    out = [[[0] * (block // 8) for _ in range(bits)] for _ in range(nb)]
    for b in range(nb):
        for e in range(block):
            c = int(codes[b, e])
            for j in range(bits):
                out[b][j][e // 8] |= ((c >> j) & 1) << (e % 8)
    return torch.tensor(out, dtype=torch.uint8).view(nb, bits, block // 8)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("nb", [0, 1, 3, 7])
@pytest.mark.parametrize("block", [32, 128, 256])
def test_round_trip_every_width(bits, nb, block):
    codes = _random_codes(nb, block, bits, seed=bits * 100 + nb)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (nb, bits, block // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_extreme_codes(bits):
    """All-zero, all-max and alternating codes survive (no bit bleeds between lanes or planes)."""
    top = 2**bits - 1
    rows = [
        torch.zeros(64, dtype=torch.uint8),
        torch.full((64,), top, dtype=torch.uint8),
        torch.tensor([0, top] * 32, dtype=torch.uint8),
        torch.tensor([top, 0] * 32, dtype=torch.uint8),
        torch.arange(64, dtype=torch.int64).remainder(2**bits).to(torch.uint8),
    ]
    codes = torch.stack(rows)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_layout_matches_documented_bit_planes(bits):
    codes = _random_codes(3, 64, bits, seed=bits)
    assert torch.equal(pack_codes(codes, bits), _reference_pack(codes, bits))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_layout_single_bits(bits):
    """Setting one bit j of one code e lights exactly plane j, byte e // 8, bit e % 8 (and unpack reads it back)."""
    block = 64
    for e in (0, 1, 7, 8, 13, 63):
        for j in range(bits):
            codes = torch.zeros(2, block, dtype=torch.uint8)
            codes[1, e] = 1 << j
            packed = pack_codes(codes, bits)
            expected = torch.zeros(2, bits, block // 8, dtype=torch.uint8)
            expected[1, j, e // 8] = 1 << (e % 8)
            assert torch.equal(packed, expected), (e, j)
            assert torch.equal(unpack_codes(expected, bits), codes), (e, j)


def test_unpack_rejects_wrong_width():
    packed = pack_codes(_random_codes(2, 32, 4), 4)
    with pytest.raises(AssertionError):
        unpack_codes(packed, 5)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", [0, 1, 31, 33, 127, 128, 129, 1000, 4097])
@pytest.mark.parametrize("block", [32, 128, 512])
def test_codes_nbytes_exact(bits, numel, block):
    padded = num_blocks(numel, block) * block
    assert padded >= numel and padded - numel < block
    assert padded * bits % 8 == 0
    assert codes_nbytes(numel, bits, block) == padded * bits // 8
    # and it is what a packed state really allocates
    st = PackedState.zeros(numel, bits=bits, kind="linear", signed=True, block_size=block)
    assert st.codes.numel() * st.codes.element_size() == codes_nbytes(numel, bits, block)


def test_num_blocks():
    assert [num_blocks(n, 128) for n in (0, 1, 127, 128, 129, 256, 257)] == [0, 1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("numel", [0, 1, 31, 33, 129, 1000])
def test_awkward_lengths_through_packed_state(bits, numel):
    """Lengths 0, 1, and not a multiple of 32 or of the block: values that sit exactly on codebook
    levels come back exactly (so any lost, shifted or cross-block bit of the packing would show)."""
    block = 64
    st = PackedState.zeros(numel, bits=bits, kind="linear", signed=True, block_size=block)
    g = torch.Generator().manual_seed(numel + bits)
    top = 2 ** (bits - 1) - 1
    k = torch.randint(-top, top + 1, (numel,), generator=g)
    k[::block] = top  # every block holds the level +1, so every block scale is exactly 1
    x = k.to(torch.float32) * (1.0 / top)  # the signed linear levels, as the codebook computes them
    st.copy_(x)
    assert torch.equal(st.scale, torch.ones(num_blocks(numel, block)))
    out = st.dequantize()
    assert out.shape == (numel,)
    assert torch.equal(out, x)
    assert torch.equal(unpack_codes(st.codes, bits).view(-1)[:numel].to(torch.int64), k + top)
