"""Bit-plane packing of b-bit codes (the only byte math in the package).

Layout of one unit's codes: ``uint8[num_blocks, bits, block_size // 8]``. Within a block, plane
``j`` holds bit ``j`` of every code; element ``e`` of the block sits in byte ``e // 8`` of each
plane, at bit ``e % 8``. Every width 2..8 thus costs exactly ``bits`` bits per element (no
rounding of 3 or 5 bits up to a byte), every width uses the same aligned loads, and one unpack
loop serves all widths. Tensors are padded to whole blocks: at most ``block_size - 1`` padding
elements per unit.

The PyTorch functions move 8 codes at a time as one int64 word (code e of a group of 8 in byte e
of the word): unpacking looks each plane byte up in a 256-entry table of its 8 bits spread to the
low bit of 8 bytes; packing masks bit j of every byte and gathers the 8 bits into the top byte with
one multiplication by 0x0102040810204080 (bit 8i moves to bit 56 + i; no two partial products
meet, so nothing carries into the top byte).
"""

from __future__ import annotations

import torch

_SPREAD = ((28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, 0x0101010101010101))
_LOW_BITS = 0x0101010101010101
_GATHER_MUL = 0x0102040810204080


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def codes_nbytes(numel: int, bits: int, block_size: int) -> int:
    """Bytes of packed codes for ``numel`` elements at ``bits`` (whole blocks)."""
    return num_blocks(numel, block_size) * bits * block_size // 8


def _spread(x: torch.Tensor) -> torch.Tensor:
    """int64 holding one byte -> bit i of that byte moved to bit 8*i."""
    for shift, mask in _SPREAD:
        x = (x | (x << shift)) & mask
    return x


def _gather(y: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_spread``: bit 8*i of y -> bit i of the result (other bits ignored)."""
    return (((y & _LOW_BITS) * _GATHER_MUL) >> 56) & 0xFF  # int64 wraps: only the top byte is kept


_SPREAD_TABLE = _spread(torch.arange(256, dtype=torch.int64))  # byte -> its 8 bits at bits 0, 8, ..., 56


def _spread_table(device: torch.device) -> torch.Tensor:
    return _SPREAD_TABLE if device.type == "cpu" else _SPREAD_TABLE.to(device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8[nb, block]`` codes in [0, 2**bits) -> ``uint8[nb, bits, block // 8]`` bit planes."""
    nb, block = codes.shape
    words = codes.to(torch.uint8).contiguous().view(torch.int64).view(nb, 1, block // 8)
    planes = torch.arange(bits, dtype=torch.int64, device=codes.device).view(1, bits, 1)
    return _gather(words >> planes).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8[nb, bits, block // 8]`` bit planes -> ``uint8[nb, block]`` codes."""
    nb, b, nbytes = packed.shape
    assert b == bits, (b, bits)
    words = _spread_table(packed.device)[packed.long()]
    out = words[:, 0]
    for j in range(1, bits):
        out = out | (words[:, j] << j)
    return out.view(torch.uint8).view(nb, nbytes * 8)
