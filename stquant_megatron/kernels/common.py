"""What the Triton kernel and its PyTorch twin share: scalar preparation and the RNG hash.

Both paths take the same fp32-rounded scalars, computed once on the host here, so their
arithmetic is identical operation for operation.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

MASK32 = 0xFFFFFFFF
# lowbias32 multipliers (C. Wellons, "Hash Prospector"): a 32-bit integer hash with good avalanche.
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B
# The error statistics (scheduler input) of a step, the neighbouring-width probe included, are
# measured on every SAMPLE_STRIDE-th program of a unit (``launch_shape``: G blocks; program index
# within the tensor or shard, plus the step's ``sample_phase``): the same sample in both backends.
SAMPLE_STRIDE = 4  # a power of two (the kernels test the phase with a mask)
# Block sizes the fused step supports (powers of two); every one is compiled ahead of time for sm_80 and
# sm_90 without spills by benchmarks/gpu_compile.py (the launch scales warps with the block).
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 32, 2048  # 4096 is not compiled by the check (it spilled with the probe at 32 warps)

# Edge values (docs/gpu_semantics.md), the same constants in the kernel and the twin:
FP32_MAX = 3.4028234663852886e38  # largest finite fp32: an infinite exp_avg_sq is stored as this
SQRT_FP32_MAX = 1.8446742974197924e19  # sqrt_rn(FP32_MAX), the fp32 square root of it
BF16_MAX = 3.3895313892515355e38  # largest finite bf16 (0x7F7F): bf16 scales saturate here
FP16_MAX = 65504.0
# A block scale s outside [PRESCALE_LOW, PRESCALE_HIGH) normalizes its elements as
# (x * pre) * (1 / (s * pre)), pre = PRESCALE_HIGH below and PRESCALE_LOW above: 1 / s alone is +inf
# below 2**-128 (then 0 * inf = NaN) and subnormal (imprecise) above 2**126.
PRESCALE_LOW, PRESCALE_HIGH = 2.0**-64, 2.0**64


def launch_shape(block_size: int) -> tuple[int, int]:
    """(blocks per program, warps) for a block size: 8 elements per thread (each thread owns whole
    packed bytes: the 8 consecutive elements whose bits share a byte of every plane), at least 1024
    elements per program, so registers stay bounded (no spills at any allowed block size, checked by
    ``benchmarks/gpu_compile.py``) and a block's absmax stays within one program."""
    g = max(1, 1024 // block_size)
    warps = g * block_size // 256
    return g, warps


def sampled_programs(b0: int, b1: int, block_size: int, phase: int) -> range:
    """The programs over blocks ``b0 .. b1 - 1`` of a unit whose statistics are measured this step:
    program ``k`` (blocks ``k * G .. k * G + G - 1``, ``G`` from ``launch_shape``) is sampled when
    ``(k + phase) % SAMPLE_STRIDE == 0``."""
    g = launch_shape(block_size)[0]
    k0, k1 = b0 // g, -(-b1 // g)
    return range(k0 + (-(k0 + phase)) % SAMPLE_STRIDE, k1, SAMPLE_STRIDE)


def f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (what a Triton fp32 scalar argument holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


class StepScalars(NamedTuple):
    """Per-step scalars of one Adam update, already rounded to fp32."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    l2: float
    """L2 weight decay added to the gradient (Adam); 0 for AdamW."""
    decay: float
    """Decoupled weight-decay factor 1 - lr * wd (AdamW); 1 for Adam."""
    step_size: float
    """lr / (1 - beta1**step)."""
    inv_bias_correction2_sqrt: float
    """1 / sqrt(1 - beta2**step) (a multiplier: PyTorch divides by a scalar through its
    reciprocal, so a division here could not be matched bit for bit)."""


def step_scalars(
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, adamw: bool
) -> StepScalars:
    return StepScalars(
        beta1=f32(beta1),
        one_minus_beta1=f32(1.0 - beta1),
        beta2=f32(beta2),
        one_minus_beta2=f32(1.0 - beta2),
        eps=f32(eps),
        l2=0.0 if adamw else f32(weight_decay),
        decay=f32(1.0 - lr * weight_decay) if adamw else 1.0,
        step_size=f32(lr / (1.0 - beta1**step)),
        inv_bias_correction2_sqrt=f32(1.0 / math.sqrt(1.0 - beta2**step)),
    )


def mix32(x: int) -> int:
    """lowbias32 on a Python int (host side of the RNG)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * HASH_MUL1) & MASK32
    x ^= x >> 15
    x = (x * HASH_MUL2) & MASK32
    x ^= x >> 16
    return x


def unit_id(name: str) -> int:
    """A 32-bit id of a unit name, identical on every rank and across runs."""
    return zlib.crc32(name.encode())


def rng_key(seed: int, step: int, unit: int) -> int:
    """The 32-bit key of one (seed, step, unit) random stream.

    The per-element random numbers (one for exp_avg, one for exp_avg_sq) are one hash of the key and
    the global element index (see ``uniforms`` in the kernels), so they do not depend on how the
    tensor is sharded or chunked.
    """
    return mix32(mix32(mix32(seed) ^ step) ^ unit)


class GroupEntry(NamedTuple):
    """One unit of a grouped step (``*_packed_adam_group_step``): its tensors and per-step values.

    Every entry of a group shares the widths, codebooks, dtypes (param, grad, scales), block size and
    rounding; the scalars (learning rate, step count), RNG keys and index offset are per entry.
    """

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg_codes: torch.Tensor
    exp_avg_scale: torch.Tensor
    exp_avg_sq_codes: torch.Tensor
    exp_avg_sq_scale: torch.Tensor
    scalars: StepScalars
    rng_key: int = 0
    index_offset: int = 0


def check_group(entries, mcb, vcb, stats, neighbor_stats) -> None:
    """What every entry of a group must share (clear errors before any launch)."""
    n = len(entries)
    for name, t, cols in (("stats", stats, 3), ("neighbor_stats", neighbor_stats, 6)):
        if t is not None and tuple(t.shape) != (n, cols):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; a group of {n} entries needs ({n}, {cols})")
    if not entries:
        return
    first = entries[0]
    want = (first.param.dtype, first.grad.dtype, first.exp_avg_scale.dtype, first.param.device)
    for i, en in enumerate(entries):
        got = (en.param.dtype, en.grad.dtype, en.exp_avg_scale.dtype, en.param.device)
        if got != want or en.exp_avg_sq_scale.dtype != first.exp_avg_scale.dtype:
            raise ValueError(
                f"group entry {i} has (param, grad, scale dtype, device) {got}, entry 0 has {want}: "
                "group units by dtypes and device (optim.group_key does)"
            )
        if en.exp_avg_codes.shape[1] != mcb.bits or en.exp_avg_sq_codes.shape[1] != vcb.bits:
            raise ValueError(
                f"group entry {i} has {en.exp_avg_codes.shape[1]}/{en.exp_avg_sq_codes.shape[1]}-bit codes, "
                f"the group's codebooks are {mcb.bits}/{vcb.bits}-bit"
            )
        if not (en.param.is_contiguous() and en.grad.is_contiguous()):
            raise ValueError(f"group entry {i}: param and grad must be contiguous (pass .contiguous() copies)")
        if en.grad.numel() != en.param.numel():
            raise ValueError(f"group entry {i}: grad has {en.grad.numel()} elements, param {en.param.numel()}")
