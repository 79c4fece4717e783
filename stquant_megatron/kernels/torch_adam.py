"""PyTorch twin of the fused packed-Adam step: the CPU path and the reference.

``torch_packed_adam_step`` has the same signature as ``triton_packed_adam_step``
(``kernels/triton_adam.py``) and produces the same packed codes, bit for bit. It walks a unit in
chunks of whole blocks; per chunk it unpacks and dequantizes both moments, applies the Adam or
AdamW update to the parameter, requantizes and packs. Temporaries are O(chunk), never a whole
fp32 moment tensor.

Per chunk the work is one function, ``_adam_chunk``. Eagerly it runs as a sequence of PyTorch
ops; ``compile=True`` fuses it with ``torch.compile`` (one compiled function per (bits, bits,
rounding, tail, stats, dtypes) variant, ``_compiled``; shapes are dynamic, runtime scalars are
tensors so nothing recompiles per step), bit-identical to eager. ``compile=None`` (the optimizer's
default) compiles the units of at least one chunk on the CPU, where the one-time compile pays back
within a few steps, and stays eager for small units and where compiling fails.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch

from ..formats.packing import pack_codes, unpack_codes
from ..formats.codebooks import Codebook, level_values
from .common import (
    BF16_MAX, FP16_MAX, FP32_MAX, HASH_MUL1, HASH_MUL2, MASK32, PRESCALE_HIGH, PRESCALE_LOW, SQRT_FP32_MAX,
    GroupEntry, StepScalars, check_group, launch_shape, sampled_programs,
)  # fmt: skip

CHUNK_ELEMENTS = 1 << 18  # 256K elements: fp32 temporaries of 1 MiB, cache friendly on CPU
ROW_CHUNK_ELEMENTS = 1 << 18
"""Pass 1 of a factored step sums g**2 over chunks of about this many elements (whole rows); the
summation order, and so every bit of the statistics, follows from it on every backend."""


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * HASH_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_MUL2) & MASK32
    return x ^ (x >> 16)


def uniforms(index: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two counter-based uniforms in [0, 1) per element, for exp_avg and exp_avg_sq, from int64 global
    element indices and a 32-bit key: one lowbias32 round ``h = mix32(lo ^ mix32(key ^ hi))`` (lo, hi:
    the index's 32-bit words; the kernels hash the high word once per program), split into its high
    and low 16 bits. 16 bits bound the bias of stochastic rounding to 2**-16 of a level."""
    h = _mix32((index & MASK32) ^ _mix32(key ^ (index >> 32)))
    return (h >> 16).to(torch.float32) * (1.0 / 65536), (h & 0xFFFF).to(torch.float32) * (1.0 / 65536)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (Triton's ``sqrt_rn``).

    PyTorch's CPU fp32 ``sqrt`` is vectorized with a 1-ulp approximation; the square root of an
    fp32 value taken in fp64 and rounded back is exact (fp64 has more than 2 * 24 + 2 bits).
    """
    if x.device.type == "cpu":
        return torch.sqrt(x.to(torch.float64)).to(torch.float32)
    return torch.sqrt(x)


def scale_to_dtype(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A block's fp32 absmax (finite, >= 0) -> its stored scale: rounded to nearest even, saturated at
    the dtype's largest finite value (the kernel's ``_scale_cast``). bf16 is rounded on the fp32 bits,
    subnormals included (not by ``Tensor.to``, whose vectorized CPU path need not keep them)."""
    if dtype == torch.float32:
        return absmax
    if dtype == torch.bfloat16:
        b = absmax.clamp_max(BF16_MAX).view(torch.int32)
        r = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
        return r.to(torch.int16).view(torch.bfloat16)
    return absmax.clamp_max(FP16_MAX if dtype == torch.float16 else torch.finfo(dtype).max).to(dtype)


def scale_to_fp32(scale: torch.Tensor) -> torch.Tensor:
    """Stored scales -> fp32, exactly (bf16: its bits shifted into the top half of an fp32, subnormals
    included; the kernel's ``.to(tl.float32)`` compiles to the exact ``cvt.f32.bf16``)."""
    if scale.dtype == torch.bfloat16:
        return (scale.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return scale.to(torch.float32)


def prescale(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block powers of two (pre, sqrt(pre)) for fp32 scales ``s`` > 0 (the kernel's ``_prescale``):
    2**64 below 2**-64, 2**-64 from 2**64, else 1. The block's elements are normalized as
    ``(x * pre) * (1 / (s * pre))``: both scalings are exact, ``1 / (s * pre)`` is a normal fp32 number
    (``1 / s`` alone is +inf below 2**-128, and 0 * inf = NaN), and with pre = 1 every bit is as
    ``x * (1 / s)``."""
    low, high = s < PRESCALE_LOW, s >= PRESCALE_HIGH
    one = torch.ones_like(s)
    pre = torch.where(low, PRESCALE_HIGH, torch.where(high, PRESCALE_LOW, one))
    rpre = torch.where(low, 2.0**32, torch.where(high, 2.0**-32, one))
    return pre, rpre


def finite_moments(m, v, rv, inside=None):
    """The moments as stored (the kernel does the same after the parameter update, which keeps
    whatever NaN/inf it produced): exp_avg NaN or +-inf -> 0; exp_avg_sq NaN -> 0, +inf -> FP32_MAX
    (and ``rv``, its square root, -> sqrt_rn(FP32_MAX)); ``inside`` False -> 0 (padding). So no
    scale is NaN or inf and no NaN reaches the encoder."""
    ok_m = m.abs() <= FP32_MAX
    ok_v = v == v
    if inside is not None:
        ok_m, ok_v = ok_m & inside, ok_v & inside
    m = torch.where(ok_m, m, 0.0)
    v = torch.where(ok_v, v.clamp_max(FP32_MAX), 0.0)
    rv = torch.where(ok_v, rv.clamp_max(SQRT_FP32_MAX), 0.0) if rv is not None else None
    return m, v, rv


def approx_sqrt(a: torch.Tensor, bits: int) -> torch.Tensor:
    """sqrt(a) for a >= 0 (Triton's ``_approx_sqrt``, every fp32 operation as in the kernel): a
    bit-level reciprocal square root, within 3.5 %, refined by one Newton step (within 0.18 %) above
    4 bits.

    The nearest rounding of the signed ``pow2`` kind brackets ``x`` with it. With levels k / L
    squared, the root-domain error is below 0.035 * 7 = 0.25 level at 4 bits and 0.0018 * 127 = 0.23
    level at 8 bits; the value-space midpoint of levels k and k+1 lies in the root domain between
    k + 0.5 and k + 0.71, so a lower neighbour off by one (x within that error of a level) still
    rounds to the same, nearest, level as the exact bracket. Stochastic rounding needs the exact
    bracket and keeps ``sqrt_rn``."""
    y = (0x5F375A86 - (a.view(torch.int32) >> 1)).view(torch.float32)
    if bits > 4:
        y = y * (1.5 - ((0.5 * a) * y) * y)
    return a * y


def encode(x: torch.Tensor, cb: Codebook, u: torch.Tensor | None, root: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized fp32 values -> uint8 codes (nearest if ``u`` is None, else stochastic).

    ``root``: ``sqrt(x) * 2**bits``, used by the unsigned ``pow2`` kind to find the lower neighbour
    (``quantize_blocks`` passes the root of the raw value times ``sqrt(1 / scale) * 2**bits``, as the
    fused step does with its ``sqrt(v)``); ``sqrt_rn(x) * 2**bits`` if None (the same bits: the
    factor is a power of two)."""
    bits = cb.bits
    if cb.kind == "log":
        lo = torch.searchsorted(cb.bounds, x, right=True).clamp_max(cb.levels - 2)
        qlo, qhi = cb.qmap[lo], cb.qmap[lo + 1]
        lo = lo.to(torch.float32)
    else:
        if cb.signed:
            top = float(2 ** (bits - 1) - 1)
            if cb.kind == "linear":
                t = x * top
            else:
                t = (sqrt_rn(x.abs()) if u is not None else approx_sqrt(x.abs(), bits)) * top
                t = torch.where(x < 0, -t, t)
            lo = torch.floor(t).clamp(-top, top - 1.0)
        else:
            n = float(2**bits)
            if cb.kind == "linear":
                t = x * n - 1.0
            else:
                t = (sqrt_rn(x) * n if root is None else root) - 1.0
            lo = torch.floor(t).clamp(0.0, n - 2.0)
        qlo = level_values(lo, cb.kind, bits, cb.signed)
        qhi = level_values(lo + 1.0, cb.kind, bits, cb.signed)
    if u is None:
        up = (x - qlo) > (qhi - x)
    else:
        up = u * (qhi - qlo) < x - qlo  # u < (x - qlo) / (qhi - qlo) without a division
    return (lo + up.to(torch.float32) + float(cb.offset)).to(torch.uint8)


def decode(codes: torch.Tensor, cb: Codebook) -> torch.Tensor:
    """uint8 codes -> normalized fp32 values."""
    if cb.kind == "log":
        return cb.qmap[codes.to(torch.int64)]
    return level_values(codes.to(torch.float32) - float(cb.offset), cb.kind, cb.bits, cb.signed)


def quantize_blocks(
    x: torch.Tensor, cb: Codebook, scale_dtype: torch.dtype, u: torch.Tensor | None = None,
    root: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[nb, block]`` -> (uint8 codes ``[nb, block]``, absmax scale ``[nb]``).

    ``x`` (finite: ``finite_moments``) is normalized by a multiplication with the fp32 reciprocal of its
    block's scale, after an exact power-of-two ``prescale`` where the scale is tiny or huge; the
    unsigned ``pow2`` kind brackets ``sqrt(x)`` as ``sqrt(x_raw) * (sqrt(1 / scale) * 2**bits)`` (``root``:
    ``sqrt_rn`` of the raw ``x`` if the caller has it, as the step does from its denominator). The
    scale saturates at the scale dtype's largest finite value (``scale_to_dtype``)."""
    absmax = x.abs().amax(1) if cb.signed else x.amax(1)
    scale = scale_to_dtype(absmax, scale_dtype)
    s = scale_to_fp32(scale)
    s = torch.where(s > 0, s, torch.ones_like(s))
    pre, rpre = prescale(s)
    one = torch.ones_like(s)
    inv = one / (s * pre)  # one division per block; the kernel multiplies by the same fp32 reciprocal
    if cb.kind == "pow2" and not cb.signed:
        root = ((sqrt_rn(x) if root is None else root) * rpre[:, None]) * (sqrt_rn(inv) * float(2**cb.bits))[:, None]
    else:
        root = None
    return encode((x * pre[:, None]) * inv[:, None], cb, u, root), scale


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, cb: Codebook) -> torch.Tensor:
    """uint8 codes ``[nb, block]`` and scale ``[nb]`` -> fp32 ``[nb, block]``."""
    return decode(codes, cb) * scale_to_fp32(scale)[:, None]


def root_dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, cb: Codebook) -> torch.Tensor:
    """sqrt of ``dequantize_blocks`` (unsigned codebooks), as the error statistics use it: for ``pow2``
    the level's root ``(i + 1) / N`` times ``sqrt(scale)``, no square root per element (the kernel's
    ``_root_dequant``); otherwise the correctly rounded root of the dequantized value."""
    if cb.kind == "pow2" and not cb.signed:
        return ((codes.to(torch.float32) + 1.0) * (1.0 / 2**cb.bits)) * sqrt_rn(scale_to_fp32(scale))[:, None]
    return sqrt_rn(dequantize_blocks(codes, scale, cb))


def _adam_chunk(
    p: torch.Tensor,  # fp32 [nb, block]
    g: torch.Tensor,  # fp32 or bf16 [nb, block]
    mc: torch.Tensor,  # uint8 [nb, m_bits, block/8]
    ms: torch.Tensor,  # [nb]
    vc: torch.Tensor,
    vs: torch.Tensor,
    mcb: Codebook,
    vcb: Codebook,
    hyper: torch.Tensor,  # fp32 [10], StepScalars order
    first_index: torch.Tensor,  # int64 0-d: global index of p[0, 0]
    key: torch.Tensor,  # int64 0-d: RNG key of the step and unit
    valid: torch.Tensor,  # int64 0-d: elements of the chunk inside the tensor
    stochastic: bool,
    has_tail: bool,
    rows: torch.Tensor | None = None,  # int64: the chunk's rows (blocks) the statistics sample, or None
    neighbors: tuple | None = None,  # with rows: (exp_avg b-1, b+1, exp_avg_sq b-1, b+1) codebooks or None
):
    beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2 = (hyper[i] for i in range(9))
    g = g.to(torch.float32)
    g = g + p * l2
    m = dequantize_blocks(unpack_codes(mc, mcb.bits), ms, mcb)
    v = dequantize_blocks(unpack_codes(vc, vcb.bits), vs, vcb)
    m = m * beta1 + g * omb1
    v = v * beta2 + (g * g) * omb2
    p = p * decay
    rv = sqrt_rn(v)
    denom = rv * inv_bc2 + eps
    p = p - (m / denom) * step_size
    offset = torch.arange(p.numel(), device=p.device).view(p.shape) if has_tail or stochastic else None
    # padding past the tensor's end holds zero moments, so it never sets a scale; NaN/inf are stored finite
    m, v, rv = finite_moments(m, v, rv, (offset < valid) if has_tail else None)
    if stochastic:
        index = first_index + offset
        um, uv = uniforms(index, key)
    else:
        um = uv = None
    m_codes, m_scale = quantize_blocks(m, mcb, ms.dtype, um)
    v_codes, v_scale = quantize_blocks(v, vcb, vs.dtype, uv, root=rv)
    stats = nstats = None
    if rows is not None:
        # On the sampled rows: the damage of each moment's quantization to the update direction
        # U = m / denom, written without cancellation: (mq - m) / denom and U * (denom - dq) / dq.
        pm, pv, pden = m[rows], v[rows], denom[rows]
        pref = pm / pden
        rden = 1.0 / pden
        err_m = (dequantize_blocks(m_codes[rows], m_scale[rows], mcb) - pm) * rden
        dq = root_dequantize_blocks(v_codes[rows], v_scale[rows], vcb) * inv_bc2 + eps
        err_v = pref * ((pden - dq) / dq)
        em2, ev2 = (err_m * err_m).sum(), (err_v * err_v).sum()
        stats = torch.stack([em2, ev2, (pref * pref).sum()])
    if rows is not None and neighbors is not None:
        # The same damage at the neighbouring widths (nearest rounding; nothing is stored).
        sums = []
        for i, cb in enumerate(neighbors):
            if cb is None:
                sums.append(torch.zeros((), dtype=torch.float32, device=p.device))
            elif i < 2:
                e = (dequantize_blocks(*quantize_blocks(pm, cb, ms.dtype), cb) - pm) * rden
                sums.append((e * e).sum())
            else:
                dqn = root_dequantize_blocks(*quantize_blocks(pv, cb, vs.dtype), cb) * inv_bc2 + eps
                e = pref * ((pden - dqn) / dqn)
                sums.append((e * e).sum())
        # The error at the current width over the same sample and with the same (nearest) rounding:
        # the probe's ratios E(b-1)/E(b) and E(b)/E(b+1) then compare like with like. (With stochastic
        # rounding the stored codes' error is about twice nearest rounding's at every width; measured
        # against nearest-rounded neighbours it would make every move look better than it is.)
        if um is not None:
            e = (dequantize_blocks(*quantize_blocks(pm, mcb, ms.dtype), mcb) - pm) * rden
            dqn = root_dequantize_blocks(*quantize_blocks(pv, vcb, vs.dtype), vcb) * inv_bc2 + eps
            en = pref * ((pden - dqn) / dqn)
            nstats = torch.stack([*sums, (e * e).sum(), (en * en).sum()])
        else:
            nstats = torch.stack([*sums, em2, ev2])
    return p, pack_codes(m_codes, mcb.bits), m_scale, pack_codes(v_codes, vcb.bits), v_scale, stats, nstats


def _factored_chunk(
    p: torch.Tensor,  # fp32 [nb, block]
    g: torch.Tensor,  # fp32 or bf16 [nb, block]
    mc: torch.Tensor,  # uint8 [nb, m_bits, block/8]
    ms: torch.Tensor,  # [nb]
    row: torch.Tensor,  # fp32 [rows]: updated row statistics (factored_moment_update)
    col: torch.Tensor,  # fp32 [cols]
    inv_mean: torch.Tensor,  # fp32 0-d: 1 / mean(row)
    mcb: Codebook,
    hyper: torch.Tensor,  # fp32 [10], StepScalars order
    matrix_index: torch.Tensor,  # int64 0-d: index of p[0, 0] in the flattened [rows, cols] matrix (and RNG index)
    key: torch.Tensor,  # int64 0-d: RNG key of the step and unit
    valid: torch.Tensor,  # int64 0-d: elements of the chunk inside the tensor
    stochastic: bool,
    has_tail: bool,
    rows: torch.Tensor | None = None,  # int64: the chunk's rows (blocks) the statistics sample, or None
    neighbors: tuple | None = None,  # with rows: (exp_avg b-1, b+1, -, -) codebooks or None
):
    """``_adam_chunk`` for a unit whose exp_avg_sq is factored: v(i, j) = (row[i] * col[j]) * inv_mean;
    the statistics and the probe cover exp_avg (the exp_avg_sq sums are 0)."""
    beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2 = (hyper[i] for i in range(9))
    offset = torch.arange(p.numel(), device=p.device).view(p.shape)
    index = matrix_index + torch.minimum(offset, valid - 1)  # padding reads the last element's statistics
    r = torch.div(index, col.numel(), rounding_mode="floor")
    v = (row[r] * col[index - r * col.numel()]) * inv_mean
    g = g.to(torch.float32)
    g = g + p * l2
    m = dequantize_blocks(unpack_codes(mc, mcb.bits), ms, mcb)
    m = m * beta1 + g * omb1
    p = p * decay
    denom = sqrt_rn(v) * inv_bc2 + eps
    p = p - (m / denom) * step_size
    m = finite_moments(m, v, None, (offset < valid) if has_tail else None)[0]
    um = uniforms(matrix_index + offset, key)[0] if stochastic else None
    m_codes, m_scale = quantize_blocks(m, mcb, ms.dtype, um)
    zero = torch.zeros((), dtype=torch.float32, device=p.device)
    stats = nstats = None
    if rows is not None:
        pm, pden = m[rows], denom[rows]
        pref = pm / pden
        rden = 1.0 / pden
        err_m = (dequantize_blocks(m_codes[rows], m_scale[rows], mcb) - pm) * rden
        em2 = (err_m * err_m).sum()
        stats = torch.stack([em2, zero, (pref * pref).sum()])
        if neighbors is not None:
            sums = []
            for cb in neighbors[:2]:
                if cb is None:
                    sums.append(zero)
                else:
                    e = (dequantize_blocks(*quantize_blocks(pm, cb, ms.dtype), cb) - pm) * rden
                    sums.append((e * e).sum())
            if um is not None:  # the current width with nearest rounding too (see _adam_chunk)
                e = (dequantize_blocks(*quantize_blocks(pm, mcb, ms.dtype), mcb) - pm) * rden
                em2 = (e * e).sum()
            nstats = torch.stack([*sums, zero, zero, em2, zero])
    return p, pack_codes(m_codes, mcb.bits), m_scale, stats, nstats


def _variant(x):
    """What a compiled chunk function specializes on in argument ``x``: a tensor's dtype, device and
    trailing sizes (the leading one, the chunk's blocks or the sampled rows, is dynamic), a
    codebook's (kind, bits, signed), Python scalars and None themselves."""
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.device.type, tuple(x.shape[1:]))
    if isinstance(x, Codebook):
        return (x.kind, x.bits, x.signed)
    if isinstance(x, (tuple, list)):
        return tuple(_variant(v) for v in x)
    return x


@functools.lru_cache(maxsize=None)
def _compiled(fn, variant):
    """``fn`` compiled for one ``variant`` (``_variant`` of its arguments): widths, codebooks, dtypes,
    rounding, tail, statistics. Dynamo keeps a function's graphs, and counts its recompiles against
    ``torch._dynamo.config.recompile_limit`` (8), per code object; one shared ``fn`` would pass the
    limit within a scheduled run (the width pairs alone are 49) and print a warning on every call of
    every variant past it. So each variant compiles a copy of ``fn``'s code under a name of its own:
    one graph per copy (a few at most, for dynamic sizes of 0 and 1), the same graph as before, the
    same numbers. The number of variants is bounded by the widths, kinds and flags."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__v{_compiled.cache_info().currsize}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(own, dynamic=True, fullgraph=True)


_COMPILE_FAILED: list[str] = []
"""The first torch.compile failure of this process (auto mode then stays eager)."""
_EAGER_VARIANTS: set = set()
"""(fn, variant) pairs that passed dynamo's recompile limit anyway: they run eager from then on."""


def use_compile(compile: bool | None, numel: int, device: torch.device) -> bool:
    """``compile``: True / False, or None = auto: CPU units of at least one chunk, while compiling works."""
    if compile is not None:
        return compile
    return device.type == "cpu" and numel >= CHUNK_ELEMENTS and not _COMPILE_FAILED


def _run_chunk(fn, compiled: bool, auto: bool, *args):
    if not compiled:
        return fn(*args)
    variant = _variant(args)
    if (fn, variant) in _EAGER_VARIANTS:
        return fn(*args)
    try:
        return _compiled(fn, variant)(*args)
    except Exception as e:  # no C++ toolchain, an unsupported torch, ...: auto mode falls back to eager
        if type(e).__name__ == "FailOnRecompileLimitHit":
            # not expected (one variant per compiled function): this variant runs eager from now on,
            # with one line per process and function, instead of asking dynamo (and printing its
            # warning) again on every call
            if not any(f is fn for f, _ in _EAGER_VARIANTS):
                warnings.warn(f"stquant: torch.compile of {fn.__name__} hit dynamo's recompile limit; such "
                              "variants run eager", RuntimeWarning, stacklevel=4)  # fmt: skip
            _EAGER_VARIANTS.add((fn, variant))
            return fn(*args)
        if not auto:
            raise
        _COMPILE_FAILED.append(f"{type(e).__name__}: {e}"[:300])
        warnings.warn(f"stquant: torch.compile of the CPU step failed ({_COMPILE_FAILED[0]}); running eager "
                      "(set STQuantConfig(compile=False) to skip the attempt)", RuntimeWarning, stacklevel=4)  # fmt: skip
        return fn(*args)


def _rows(stats, b0: int, b1: int, block_size: int, phase: int, dev) -> torch.Tensor | None:
    """The rows (blocks, from ``b0``) of chunk ``b0 .. b1`` in sampled programs (``sampled_programs``);
    None without statistics or without a sampled program."""
    progs = sampled_programs(b0, b1, block_size, phase) if stats is not None else range(0)
    if not progs:
        return None
    g = launch_shape(block_size)[0]
    first = torch.arange(len(progs), dtype=torch.int64) * (progs.step * g) + (progs.start * g - b0)
    rows = (first[:, None] + torch.arange(g, dtype=torch.int64)[None, :]).view(-1)
    return rows[(rows >= 0) & (rows < b1 - b0)].to(dev)


def _block_chunks(flat_p: torch.Tensor, flat_g: torch.Tensor, nblocks: int, block_size: int):
    """Chunks of whole blocks of a unit: (b0, b1, e0, e1, p, g, pad) with p and g zero-padded to
    whole blocks (``pad`` elements past the unit's end in its last, partial block)."""
    numel = flat_p.numel()
    chunk_blocks = max(1, CHUNK_ELEMENTS // block_size)
    for b0 in range(0, nblocks, chunk_blocks):
        b1 = min(nblocks, b0 + chunk_blocks)
        e0, e1 = b0 * block_size, min(numel, b1 * block_size)
        p, g = flat_p[e0:e1], flat_g[e0:e1]
        pad = (b1 - b0) * block_size - (e1 - e0)
        if pad:
            p = torch.nn.functional.pad(p, (0, pad))
            g = torch.nn.functional.pad(g, (0, pad))
        yield b0, b1, e0, e1, p, g, pad


def torch_packed_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_scale: torch.Tensor,
    exp_avg_codebook,
    exp_avg_sq_codebook,
    scalars: StepScalars,
    *,
    block_size: int,
    stochastic: bool = False,
    rng_key: int = 0,
    index_offset: int = 0,
    stats: torch.Tensor | None = None,
    neighbor_codebooks: tuple | None = None,
    neighbor_stats: torch.Tensor | None = None,
    sample_phase: int = 0,
    compile: bool | None = False,
) -> None:
    """One fused Adam/AdamW step on a packed unit, in place.

    Args:
        param: the fp32 (or bf16) parameter, any shape, contiguous; updated in place.
        grad: its gradient, same numel, fp32 or bf16.
        exp_avg_codes / exp_avg_sq_codes: uint8 ``[num_blocks, bits, block_size // 8]``; updated.
        exp_avg_scale / exp_avg_sq_scale: fp32 or bf16 ``[num_blocks]``; updated.
        exp_avg_codebook / exp_avg_sq_codebook: ``formats.codebooks.Codebook`` on the device.
        scalars: ``kernels.common.step_scalars(...)``.
        block_size: elements per scale block (power of two, >= 32).
        stochastic: stochastic instead of nearest rounding.
        rng_key: 32-bit key of the unit's random stream this step (``common.rng_key``).
        index_offset: global index of ``param``'s first element within its unit (shards).
        stats: fp32 ``[3]`` or None; if given, adds (sum err_m^2, sum err_v^2, sum U^2) over the
            sampled programs to it: every ``SAMPLE_STRIDE``-th program of ``launch_shape(block_size)``
            blocks, those with ``(k + sample_phase) % SAMPLE_STRIDE == 0`` (k: program index within
            ``param``).
        neighbor_codebooks: with ``stats``, the codebooks one width below and above each moment's,
            ``(exp_avg b-1, exp_avg b+1, exp_avg_sq b-1, exp_avg_sq b+1)`` (None where out of range).
        neighbor_stats: fp32 ``[6]``; adds sum err^2 at those widths (nearest rounding, not stored),
            then at the current widths (exp_avg, exp_avg_sq), over the same sample.
        sample_phase: which programs the statistics sample this step (the scheduler rotates it).
        compile: run each chunk through ``torch.compile`` (PyTorch path only; ignored by Triton);
            None = auto (``use_compile``: CPU units of at least one chunk).
    """
    mcb, vcb = exp_avg_codebook, exp_avg_sq_codebook
    assert exp_avg_codes.shape[1] == mcb.bits and exp_avg_sq_codes.shape[1] == vcb.bits
    dev = param.device
    hyper = torch.tensor(list(scalars), dtype=torch.float32, device=dev)
    key = torch.tensor(rng_key, dtype=torch.int64, device=dev)
    compiled = use_compile(compile, param.numel(), param.device)
    flat_p, flat_g = param.view(-1), grad.view(-1)
    for b0, b1, e0, e1, p, g, pad in _block_chunks(flat_p, flat_g, exp_avg_codes.shape[0], block_size):
        p32 = p.to(torch.float32).view(b1 - b0, block_size)
        first = torch.tensor(index_offset + e0, dtype=torch.int64, device=dev)
        valid = torch.tensor(e1 - e0, dtype=torch.int64, device=dev)
        tensors = (p32, g.view(b1 - b0, block_size), exp_avg_codes[b0:b1], exp_avg_scale[b0:b1],
                   exp_avg_sq_codes[b0:b1], exp_avg_sq_scale[b0:b1])  # fmt: skip
        if compiled:  # views would make the graph guard on each unit's base shape: one compile per unit
            tensors = tuple(t.clone() for t in tensors)
        new_p, mc, ms, vc, vs, st, nst = _run_chunk(
            _adam_chunk, compiled, compile is None, *tensors,
            mcb, vcb, hyper, first, key, valid, stochastic, pad > 0,
            _rows(stats, b0, b1, block_size, sample_phase, dev), neighbor_codebooks if neighbor_stats is not None else None,
        )  # fmt: skip
        flat_p[e0:e1].copy_(new_p.view(-1)[: e1 - e0])
        exp_avg_codes[b0:b1].copy_(mc)
        exp_avg_scale[b0:b1].copy_(ms)
        exp_avg_sq_codes[b0:b1].copy_(vc)
        exp_avg_sq_scale[b0:b1].copy_(vs)
        if st is not None:
            stats.add_(st)
        if nst is not None:
            neighbor_stats.add_(nst)


def torch_packed_adam_group_step(
    entries: list[GroupEntry],
    exp_avg_codebook: Codebook,
    exp_avg_sq_codebook: Codebook,
    *,
    block_size: int,
    stochastic: bool = False,
    stats: torch.Tensor | None = None,
    neighbor_codebooks: tuple | None = None,
    neighbor_stats: torch.Tensor | None = None,
    sample_phase: int = 0,
    compile: bool | None = False,
) -> None:
    """``torch_packed_adam_step`` on every entry of a group (twin of the one-launch Triton group step).

    Args:
        entries: ``GroupEntry`` per unit; all share the widths of the codebooks, the dtypes (param,
            grad, scales), ``block_size`` and rounding.
        stats: fp32 ``[len(entries), 3]`` or None; row i gets entry i's sums (see the unit step).
        neighbor_codebooks / neighbor_stats: as in the unit step, ``neighbor_stats`` fp32 ``[len(entries), 6]``.
    """
    check_group(entries, exp_avg_codebook, exp_avg_sq_codebook, stats, neighbor_stats)
    for i, en in enumerate(entries):
        if en.param.numel() == 0:
            continue
        torch_packed_adam_step(
            en.param, en.grad, en.exp_avg_codes, en.exp_avg_scale, en.exp_avg_sq_codes, en.exp_avg_sq_scale,
            exp_avg_codebook, exp_avg_sq_codebook, en.scalars, block_size=block_size, stochastic=stochastic,
            rng_key=en.rng_key, index_offset=en.index_offset, stats=None if stats is None else stats[i],
            neighbor_codebooks=neighbor_codebooks, neighbor_stats=None if neighbor_stats is None else neighbor_stats[i],
            sample_phase=sample_phase,
            compile=compile,
        )  # fmt: skip


def matrix_partial_sums(values, n: int, rows: int, cols: int, index_offset: int = 0,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Sums per row and per column of the full ``[rows, cols]`` matrix, over the ``n`` elements held
    here (``index_offset ..`` of the flattened matrix: a shard, whose first and last rows may be
    partial), as one fp32 ``[rows + cols]`` vector (rows first); ``values(a, b)`` gives elements
    ``a:b`` of the shard in fp32. The sums of every shard add up to the full matrix's. Walks whole rows
    in chunks of ``ROW_CHUNK_ELEMENTS`` (O(chunk) scratch), so the summation order, and the bits, do
    not depend on the backend."""
    if index_offset < 0 or index_offset + n > rows * cols:
        raise ValueError(f"a shard of {n} elements at {index_offset} does not fit a [{rows}, {cols}] matrix")
    out = torch.zeros(rows + cols, dtype=torch.float32, device=device)
    row_sum, col_sum = out[:rows], out[rows:]
    chunk_rows = max(1, ROW_CHUNK_ELEMENTS // cols)
    t = 0
    while t < n:
        r, c = divmod(index_offset + t, cols)
        if c or n - t < cols:  # a partial row: the shard's first or last
            k = min(cols - c, n - t)
            x = values(t, t + k)
            row_sum[r] += x.sum()
            col_sum[c : c + k] += x
        else:
            k = min(chunk_rows, (n - t) // cols) * cols
            x = values(t, t + k).view(-1, cols)
            row_sum[r : r + x.shape[0]] += x.sum(1)
            col_sum += x.sum(0)
        t += k
    return out


def factored_partial_sums(param: torch.Tensor, grad: torch.Tensor, scalars: StepScalars, rows: int, cols: int,
                          index_offset: int = 0) -> torch.Tensor:
    """Pass 1a of a factored unit's step: ``matrix_partial_sums`` of g**2 (g with Adam's L2 term)
    over the elements held here; all-reduced over the shards when the matrix is split."""
    flat_g, flat_p = grad.reshape(-1), param.reshape(-1)

    def squares(a: int, b: int) -> torch.Tensor:
        g = flat_g[a:b].to(torch.float32)
        if scalars.l2:
            g = g + flat_p[a:b].to(torch.float32) * scalars.l2
        return g * g

    return matrix_partial_sums(squares, flat_g.numel(), rows, cols, index_offset, grad.device)


def factored_ema(row: torch.Tensor, col: torch.Tensor, sums: torch.Tensor, scalars: StepScalars) -> torch.Tensor:
    """Pass 1b: the exponential averages of each row's and column's mean of g**2 from the full
    matrix's ``sums`` (``factored_partial_sums``, all-reduced over shards), in place; returns
    ``1 / mean(row)`` (fp32 0-d, 0 while every row is 0), without a host sync."""
    rows, cols = row.numel(), col.numel()
    row.mul_(scalars.beta2).add_((sums[:rows] * (1.0 / cols)) * scalars.one_minus_beta2)
    col.mul_(scalars.beta2).add_((sums[rows:] * (1.0 / rows)) * scalars.one_minus_beta2)
    mean = row.mean()
    return torch.where(mean > 0, 1.0 / mean, torch.zeros_like(mean))


def factored_moment_update(param: torch.Tensor, grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                           scalars: StepScalars) -> torch.Tensor:
    """Pass 1 of a whole (unsharded) factored unit: ``factored_ema`` of its ``factored_partial_sums``."""
    if param.numel() != row.numel() * col.numel():
        raise ValueError(f"{param.numel()} elements are a shard of a [{row.numel()}, {col.numel()}] matrix: "
                         "all-reduce factored_partial_sums over the shards, then factored_ema")  # fmt: skip
    return factored_ema(row, col, factored_partial_sums(param, grad, scalars, row.numel(), col.numel()), scalars)


def torch_factored_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    exp_avg_codebook: Codebook,
    scalars: StepScalars,
    *,
    block_size: int,
    stochastic: bool = False,
    rng_key: int = 0,
    stats: torch.Tensor | None = None,
    neighbor_codebooks: tuple | None = None,
    neighbor_stats: torch.Tensor | None = None,
    compile: bool | None = False,
    inv_mean: torch.Tensor | None = None,
    index_offset: int = 0,
    sample_phase: int = 0,
) -> None:
    """One fused step of a unit with packed ``exp_avg`` and factored ``exp_avg_sq`` (``FactoredState``).

    As ``torch_packed_adam_step``, except: ``row`` / ``col`` are the fp32 ``[rows]`` / ``[cols]``
    statistics of the full matrix, and the second moment of its element (i, j) is
    ``(row[i] * col[j]) * (1 / mean(row))``. ``stats`` / ``neighbor_stats`` get the exp_avg sums;
    their exp_avg_sq entries stay 0.

    A whole unit (``inv_mean`` None): pass 1 (``factored_moment_update``) runs here. A shard of the
    matrix (elements ``index_offset ..`` of it, flattened): the caller has run pass 1 over all shards
    (``factored_partial_sums``, all-reduced, then ``factored_ema``) and gives its ``1 / mean(row)``.
    """
    mcb = exp_avg_codebook
    assert exp_avg_codes.shape[1] == mcb.bits and index_offset + param.numel() <= row.numel() * col.numel()
    dev = param.device
    if inv_mean is None:
        inv_mean = factored_moment_update(param, grad, row, col, scalars)
    hyper = torch.tensor(list(scalars), dtype=torch.float32, device=dev)
    key = torch.tensor(rng_key, dtype=torch.int64, device=dev)
    compiled = use_compile(compile, param.numel(), dev)
    flat_p, flat_g = param.view(-1), grad.view(-1)
    for b0, b1, e0, e1, p, g, pad in _block_chunks(flat_p, flat_g, exp_avg_codes.shape[0], block_size):
        tensors = (p.to(torch.float32).view(b1 - b0, block_size), g.view(b1 - b0, block_size),
                   exp_avg_codes[b0:b1], exp_avg_scale[b0:b1])  # fmt: skip
        if compiled:
            tensors = tuple(t.clone() for t in tensors)
        new_p, mc, ms, st, nst = _run_chunk(
            _factored_chunk, compiled, compile is None, *tensors, row, col, inv_mean, mcb, hyper,
            torch.tensor(e0 + index_offset, dtype=torch.int64, device=dev),
            key, torch.tensor(e1 - e0, dtype=torch.int64, device=dev),
            stochastic, pad > 0, _rows(stats, b0, b1, block_size, sample_phase, dev),
            neighbor_codebooks if neighbor_stats is not None else None,
        )  # fmt: skip
        flat_p[e0:e1].copy_(new_p.view(-1)[: e1 - e0])
        exp_avg_codes[b0:b1].copy_(mc)
        exp_avg_scale[b0:b1].copy_(ms)
        if st is not None:
            stats.add_(st)
        if nst is not None:
            neighbor_stats.add_(nst)


def dense_adam_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, scalars: StepScalars
) -> None:
    """Adam/AdamW on fp32 moments (units below ``min_numel``), with the fused step's arithmetic."""
    beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2 = scalars
    p = param.to(torch.float32)
    g = grad.to(torch.float32)
    if l2:
        g = g + p * l2
    exp_avg.mul_(beta1).add_(g * omb1)
    exp_avg_sq.mul_(beta2).add_((g * g) * omb2)
    if decay != 1.0:
        p = p * decay
    p = p - (exp_avg / (sqrt_rn(exp_avg_sq) * inv_bc2 + eps)) * step_size
    param.copy_(p)
