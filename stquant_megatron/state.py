"""``PackedState``: one moment of one parameter (shard) in packed b-bit form.

Holds ``codes`` (uint8 bit planes, see ``formats/packing.py``), ``scale`` (one absmax per block),
and the codebook. Every width 2..8 uses this one class. Conversions to and from dense fp32 walk
the tensor chunk by chunk, so they never hold more than one chunk in fp32 besides the output.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .formats.codebooks import MAX_BITS, MIN_BITS, Codebook, get_codebook
from .formats.packing import num_blocks, pack_codes, unpack_codes
from .kernels.torch_adam import CHUNK_ELEMENTS, dequantize_blocks, quantize_blocks

_SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _integer(value: Any, field: str, where: str) -> int:
    """A whole-number field of a saved state (``to_dict`` writes Python ints): anything else, a float
    such as 3.5, a bool or a string, is a damaged entry, not something to round."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} has {field}={value!r} ({type(value).__name__}); it must be an int")
    return int(value)


class PackedState:
    """A packed moment: ``codes`` uint8 ``[num_blocks, bits, block_size // 8]``, ``scale`` ``[num_blocks]``."""

    __slots__ = ("codes", "scale", "codebook", "numel", "block_size")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, codebook: Codebook, numel: int, block_size: int):
        self.codes, self.scale, self.codebook = codes, scale, codebook
        self.numel, self.block_size = numel, block_size

    @classmethod
    def zeros(
        cls, numel: int, *, bits: int, kind: str, signed: bool, block_size: int,
        scale_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> PackedState:  # fmt: skip
        """An all-zero moment (zero scales decode to exact zeros whatever the codebook)."""
        nb = num_blocks(numel, block_size)
        codes = torch.zeros((nb, bits, block_size // 8), dtype=torch.uint8, device=device)
        scale = torch.zeros(nb, dtype=scale_dtype, device=device)
        return cls(codes, scale, get_codebook(kind, bits, signed, torch.device(device)), numel, block_size)

    @property
    def bits(self) -> int:
        return self.codebook.bits

    @property
    def signed(self) -> bool:
        return self.codebook.signed

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated: codes plus scales."""
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def _chunks(self):
        step = max(1, CHUNK_ELEMENTS // self.block_size)
        for b0 in range(0, self.codes.shape[0], step):
            b1 = min(self.codes.shape[0], b0 + step)
            yield b0, b1, b0 * self.block_size, min(self.numel, b1 * self.block_size)

    def dequantize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense fp32 values, shape ``[numel]``, on ``device`` (default: the state's), chunk by chunk."""
        out = torch.empty(self.numel, dtype=torch.float32, device=device or self.codes.device)
        for b0, b1, e0, e1 in self._chunks():
            x = dequantize_blocks(unpack_codes(self.codes[b0:b1], self.bits), self.scale[b0:b1], self.codebook)
            out[e0:e1] = x.view(-1)[: e1 - e0]
        return out

    def blocks(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 ``[len(index), block_size]``: the dequantized blocks ``index`` (padding included)."""
        return dequantize_blocks(unpack_codes(self.codes[index], self.bits), self.scale[index], self.codebook)

    def values(self, a: int, b: int) -> torch.Tensor:
        """fp32 elements ``a .. b`` (dequantized), O(b - a) scratch."""
        b0, b1 = a // self.block_size, -(-b // self.block_size)
        x = dequantize_blocks(unpack_codes(self.codes[b0:b1], self.bits), self.scale[b0:b1], self.codebook)
        return x.view(-1)[a - b0 * self.block_size : b - b0 * self.block_size]

    def copy_(self, dense: torch.Tensor) -> PackedState:
        """Quantize ``dense`` (numel elements, any float dtype) into this state, nearest rounding."""
        flat = dense.reshape(-1)
        if flat.numel() != self.numel:
            raise ValueError(f"cannot load {flat.numel()} values into a packed state of {self.numel} elements")
        return self.fill_(lambda a, b: flat[a:b])

    def fill_(self, values) -> PackedState:
        """Quantize ``values(a, b)`` (elements ``a .. b``, any float dtype) into this state chunk by
        chunk (O(chunk) scratch), nearest rounding."""
        for b0, b1, e0, e1 in self._chunks():
            x = values(e0, e1).to(device=self.codes.device, dtype=torch.float32)
            x = torch.nn.functional.pad(x, (0, (b1 - b0) * self.block_size - (e1 - e0)))
            codes, scale = quantize_blocks(x.view(b1 - b0, self.block_size), self.codebook, self.scale.dtype)
            self.codes[b0:b1] = pack_codes(codes, self.bits)
            self.scale[b0:b1] = scale
        return self

    def recoded_nbytes(self, bits: int, block_size: int | None = None, scale_dtype: torch.dtype | None = None) -> int:
        """Bytes this state would take at another width (block size, scale type)."""
        bs = block_size or self.block_size
        nb = num_blocks(self.numel, bs)
        return nb * bits * (bs // 8) + nb * torch.empty((), dtype=scale_dtype or self.scale.dtype).element_size()

    def recode(
        self, bits: int, kind: str, *, block_size: int | None = None, scale_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> PackedState:
        """A new state holding these values at another width, codebook, block size or scale type (on
        ``device``, default this state's): dequantize, quantize (nearest), chunk by chunk, so the
        scratch memory besides the new codes is one chunk, not the tensor."""
        dev = torch.device(device) if device is not None else self.codes.device
        cb = get_codebook(self.codebook.kind, self.bits, self.signed, dev)
        bs = block_size or self.block_size
        new = PackedState.zeros(
            self.numel, bits=bits, kind=kind, signed=self.signed, block_size=bs,
            scale_dtype=scale_dtype or self.scale.dtype, device=dev,
        )  # fmt: skip
        if bs == self.block_size:
            for b0, b1, e0, e1 in self._chunks():
                x = dequantize_blocks(unpack_codes(self.codes[b0:b1].to(dev), self.bits), self.scale[b0:b1].to(dev), cb)
                x.view(-1)[e1 - e0 :] = 0.0  # padding holds zeros, as after copy_ and the fused step
                codes, scale = quantize_blocks(x, new.codebook, new.scale.dtype)
                new.codes[b0:b1] = pack_codes(codes, bits)
                new.scale[b0:b1] = scale
            return new
        step = max(bs, self.block_size, CHUNK_ELEMENTS)  # a multiple of both block sizes (powers of two)
        for e0 in range(0, self.numel, step):
            e1 = min(self.numel, e0 + step)
            s0, s1 = e0 // self.block_size, -(-e1 // self.block_size)
            x = dequantize_blocks(unpack_codes(self.codes[s0:s1].to(dev), self.bits), self.scale[s0:s1].to(dev), cb)
            x = x.view(-1)
            x = x[: e1 - e0]
            n0, n1 = e0 // bs, -(-e1 // bs)
            x = torch.nn.functional.pad(x, (0, (n1 - n0) * bs - (e1 - e0))).view(n1 - n0, bs)
            codes, scale = quantize_blocks(x, new.codebook, new.scale.dtype)
            new.codes[n0:n1] = pack_codes(codes, bits)
            new.scale[n0:n1] = scale
        return new

    def requantize(self, bits: int, kind: str, *, stage_on_host: bool = False) -> None:
        """Re-code in place at a new width (``recode``). The unit briefly holds its old and new codes;
        with ``stage_on_host`` the old codes move to host memory first and their device buffers are
        released before the new ones are allocated, so the device holds one chunk of scratch besides
        the new codes (GPU runs: the device peak stays within the budget)."""
        if not stage_on_host:
            new = self.recode(bits, kind)
        else:
            dev = self.codes.device
            host = PackedState(self.codes.to("cpu", copy=True), self.scale.to("cpu", copy=True),
                               get_codebook(self.codebook.kind, self.bits, self.signed, "cpu"), self.numel,
                               self.block_size)  # fmt: skip
            self.codes = self.scale = None  # the optimizer holds no other reference: the device memory is free
            new = host.recode(bits, kind, device=dev)
        self.codes, self.scale, self.codebook = new.codes, new.scale, new.codebook

    def to_(self, device: torch.device | str) -> PackedState:
        """Move codes, scales and the codebook's tables to ``device``, in place (like ``nn.Module.to``;
        Megatron's ``offload_to_cpu`` / ``restore_from_cpu`` only move plain tensors). Returns self."""
        device = torch.device(device)
        self.codes, self.scale = self.codes.to(device), self.scale.to(device)
        self.codebook = get_codebook(self.codebook.kind, self.bits, self.signed, device)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loads with ``torch.load(..., weights_only=True)``."""
        return {
            "codes": self.codes, "scale": self.scale, "bits": self.bits, "codebook": self.codebook.kind,
            "signed": self.signed, "numel": self.numel, "block_size": self.block_size,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device, where: str = "packed state entry") -> PackedState:
        """Rebuild from ``to_dict()``; raises ValueError (naming ``where``) on any inconsistency."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} should be a dict from PackedState.to_dict(); got {type(d).__name__}")
        try:
            bits, numel, block_size = (_integer(d[k], k, where) for k in ("bits", "numel", "block_size"))
            kind, signed, codes, scale = d["codebook"], d["signed"], d["codes"], d["scale"]
        except KeyError as e:
            raise ValueError(f"{where} is malformed ({e!r}); keys found: {sorted(map(str, d))}") from None
        if not isinstance(kind, str) or not isinstance(signed, bool):
            raise ValueError(f"{where} has codebook={kind!r}, signed={signed!r}; codebook must be a kind name (str), "
                             "signed a bool")  # fmt: skip
        if numel < 0 or block_size < 8 or block_size & (block_size - 1):
            raise ValueError(f"{where} has numel={numel}, block_size={block_size}; "
                             "need numel >= 0 and a block size that is a power of two >= 8")  # fmt: skip
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"{where} has bits={bits}; allowed widths are {MIN_BITS}..{MAX_BITS}")
        try:
            cb = get_codebook(kind, bits, signed, device)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        nb = num_blocks(numel, block_size)
        want = (nb, bits, block_size // 8)
        if not torch.is_tensor(codes) or codes.dtype != torch.uint8 or tuple(codes.shape) != want:
            got = (codes.dtype, tuple(codes.shape)) if torch.is_tensor(codes) else type(codes)
            raise ValueError(f"{where}: codes should be uint8 {want} for numel={numel}, bits={bits}; got {got}")
        if not torch.is_tensor(scale) or scale.dtype not in _SCALE_DTYPES.values() or tuple(scale.shape) != (nb,):
            got = (scale.dtype, tuple(scale.shape)) if torch.is_tensor(scale) else type(scale)
            raise ValueError(f"{where}: scale should be fp32/bf16 ({nb},); got {got}")
        if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            bad = scale[~(torch.isfinite(scale) & (scale >= 0))][:3].tolist()
            raise ValueError(f"{where}: block scales must be finite and >= 0 (absmax values); found {bad}")
        return cls(codes.to(device).contiguous(), scale.to(device).contiguous(), cb, numel, block_size)

    def __repr__(self) -> str:
        return (
            f"PackedState(numel={self.numel}, bits={self.bits}, codebook={self.codebook.kind!r}, "
            f"signed={self.signed}, block_size={self.block_size}, scale={self.scale.dtype}, nbytes={self.nbytes})"
        )


class FactoredState:
    """A factored second moment (``exp_avg_sq`` of a matrix): row and column statistics, no codes.

    The unit is viewed as ``[rows, cols]`` (``rows = shape[0]``). ``row`` holds the exponential
    average of each row's mean of g**2, ``col`` that of each column's mean, and the second moment
    of element (i, j) is the rank-1 estimate ``row[i] * col[j] * (1 / mean(row))`` (Adafactor,
    Shazeer & Stern 2018, section 3: exact when g**2 is itself rank one). It costs 4 bytes per row
    and column, about 0 bits per element: the scheduler's "0-bit" width of a 2-D ``exp_avg_sq``.
    """

    __slots__ = ("row", "col", "numel", "shape", "offset")
    bits = 0
    signed = False

    def __init__(self, row: torch.Tensor, col: torch.Tensor, offset: int = 0, numel: int | None = None):
        """``row`` / ``col``: the full matrix's statistics. A shard (Megatron's distributed optimizer)
        holds elements ``offset .. offset + numel`` of the flattened matrix, and every shard keeps the
        same (all-reduced) statistics."""
        self.row, self.col = row, col
        self.shape = (row.numel(), col.numel())
        self.offset = int(offset)
        self.numel = self.shape[0] * self.shape[1] - self.offset if numel is None else int(numel)
        if self.offset < 0 or self.numel < 0 or self.offset + self.numel > self.shape[0] * self.shape[1]:
            raise ValueError(f"a shard of {self.numel} elements at {self.offset} does not fit a {self.shape} matrix")

    @property
    def sharded(self) -> bool:
        return self.numel != self.shape[0] * self.shape[1]

    @staticmethod
    def factor_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
        """``(rows, cols)`` of a tensor shape that can be factored (2-D or more, both sides > 1), else None."""
        if len(shape) < 2 or shape[0] < 2:
            return None
        cols = 1
        for s in shape[1:]:
            cols *= int(s)
        return (int(shape[0]), cols) if cols >= 2 else None

    @classmethod
    def zeros(cls, shape: tuple[int, int], device: torch.device | str = "cpu", offset: int = 0,
              numel: int | None = None) -> FactoredState:
        rows, cols = shape
        z = lambda n: torch.zeros(n, dtype=torch.float32, device=device)  # noqa: E731
        return cls(z(rows), z(cols), offset, numel)

    @property
    def nbytes(self) -> int:
        return (self.row.numel() + self.col.numel()) * 4

    def inv_mean_row(self) -> torch.Tensor:
        """fp32 0-d ``1 / mean(row)`` (0 while every row is 0), on the state's device, without a host sync."""
        mean = self.row.mean()
        return torch.where(mean > 0, 1.0 / mean, torch.zeros_like(mean))

    def dequantize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense fp32 estimate of the elements held, shape ``[numel]``, on ``device`` (default: the state's)."""
        return self.values(0, self.numel).to(device or self.row.device)

    def values(self, a: int, b: int) -> torch.Tensor:
        """The fp32 estimate of held elements ``a .. b`` (scratch: the rows they touch)."""
        cols = self.shape[1]
        g0, g1 = self.offset + a, self.offset + b
        r0, r1 = g0 // cols, -(-g1 // cols)  # the rows the elements touch
        v = (self.row[r0:r1, None] * self.col[None, :]) * self.inv_mean_row()
        start = g0 - r0 * cols
        return v.reshape(-1)[start : start + (b - a)]

    def copy_(self, dense: torch.Tensor) -> FactoredState:
        """Factor a dense second moment of the whole matrix: row and column means (exact for a rank-one
        ``dense``). A shard's statistics need every shard's values: ``factored_partial_sums`` of each, all-reduced."""
        if self.sharded:
            raise ValueError(f"a shard ({self.numel} of {self.shape[0] * self.shape[1]} elements) cannot be factored "
                             "from its own values: all-reduce the shards' factored_partial_sums "
                             "(STQuantAdamW.finish_factored_load)")  # fmt: skip
        if dense.numel() != self.numel:
            raise ValueError(f"cannot load {dense.numel()} values into a factored state of {self.shape}")
        v = dense.reshape(self.shape).to(device=self.row.device, dtype=torch.float32)
        self.row.copy_(v.mean(1))
        self.col.copy_(v.mean(0))
        return self

    def to_(self, device: torch.device | str) -> FactoredState:
        """Move the row and column statistics to ``device``, in place (``PackedState.to_``). Returns self."""
        self.row, self.col = self.row.to(device), self.col.to(device)
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {"factored": True, "row": self.row, "col": self.col}
        if self.sharded:
            out.update(offset=self.offset, numel=self.numel)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device, where: str = "factored state entry") -> FactoredState:
        try:
            row, col = d["row"], d["col"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where} is malformed ({e!r}); keys found: {sorted(d)}") from None
        for name, t in (("row", row), ("col", col)):
            if not torch.is_tensor(t) or t.dtype != torch.float32 or t.dim() != 1:
                got = (t.dtype, tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"{where}: {name} should be a 1-D fp32 tensor; got {got}")
            if not bool((torch.isfinite(t) & (t >= 0)).all()):
                raise ValueError(f"{where}: {name} statistics must be finite and >= 0 (means of g**2)")
        offset = _integer(d.get("offset", 0), "offset", where)
        numel = None if d.get("numel") is None else _integer(d["numel"], "numel", where)
        try:
            return cls(row.to(device).contiguous().clone(), col.to(device).contiguous().clone(), offset, numel)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def __repr__(self) -> str:
        shard = f", offset={self.offset}, numel={self.numel}" if self.sharded else ""
        return f"FactoredState(shape={self.shape}{shard}, nbytes={self.nbytes})"


QUANTIZED_STATES = (PackedState, FactoredState)
"""Moment storage that is not a plain fp32 tensor (both have ``dequantize``, ``copy_``, ``nbytes``, ``to_dict``, ``to_``)."""


def state_from_dict(d: dict[str, Any], device: torch.device, where: str) -> PackedState | FactoredState:
    """``PackedState`` or ``FactoredState`` from its ``to_dict()``."""
    if isinstance(d, dict) and d.get("factored"):
        return FactoredState.from_dict(d, device, where)
    return PackedState.from_dict(d, device, where)
