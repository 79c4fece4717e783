"""Triton kernel of the fused packed-Adam step (GPU path), twin of ``torch_adam.py``.

One program handles ``GROUP`` consecutive blocks of ``BLOCK`` elements of one unit. For each
block, in registers: unpack the bit planes of both moments, dequantize, apply Adam/AdamW to the
fp32 parameter, take the new block absmax, quantize (nearest or stochastic), pack, store. Nothing
but the packed state and the parameter/gradient is read or written.

Bytes moved per element: param read+write (8) + grad read (4, or 2 for bf16) + exp_avg codes
read+write (2 * m_bits / 8) + exp_avg_sq codes read+write (2 * v_bits / 8) + scales
(4 * 4 / BLOCK) -> 14.1 B at 4/4 bits with fp32 grads, against 28 B for fp32 Adam.

Arithmetic is written operation for operation like the PyTorch twin, with IEEE-rounded division
and square root (``div_rn``, ``sqrt_rn``), so the packed codes match bit for bit (proved in
``tests/test_kernels.py`` under ``TRITON_INTERPRET=1``). Bit widths and codebook kinds are
``constexpr`` from closed sets (widths 2..8 and 3 kinds per moment, plus the neighbouring widths
of the scheduler's probe step): a bounded set of specializations, never per-step recompiles.
"""

from __future__ import annotations

import torch

from ..formats.codebooks import KINDS, LOG_STEP, Codebook
from .common import HASH_MUL1, HASH_MUL2, MASK32, PROBE_STRIDE, StepScalars

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False

GROUP = 4  # blocks per program

if HAS_TRITON:

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = (x * HASH_MUL1) & MASK32
        x = x ^ (x >> 15)
        x = (x * HASH_MUL2) & MASK32
        return x ^ (x >> 16)

    @triton.jit
    def _uniform(index, key):
        h = _mix32((index & MASK32) ^ key)
        h = _mix32(h ^ (index >> 32))
        return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _cast_rne(x, DTYPE: tl.constexpr):
        # fp32 -> DTYPE rounding to nearest even, like PyTorch. bf16 is rounded on the fp32 bits and
        # its bit pattern stored directly, so the result does not depend on the backend's cast (the
        # CPU interpreter, TRITON_INTERPRET=1, truncates fp32 -> bf16 and flushes subnormals; GPUs
        # round to nearest even: the same bits as here).
        if DTYPE == tl.bfloat16:
            b = x.to(tl.int32, bitcast=True)
            r = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
            r = tl.where(x != x, 0x7FC0, r)  # NaN stays (a quiet) NaN
            return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _levels(k, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr, qmap_ptr, LOG_STEP_: tl.constexpr):
        # level value of fp32 level index k; same expression as codebooks.level_values
        if KIND == 2:
            s = tl.exp2((k - (2**BITS - 1)) * LOG_STEP_)  # unused: log levels come from qmap
        else:
            if SIGNED:
                s = k * (1.0 / (2 ** (BITS - 1) - 1))
            else:
                s = (k + 1.0) * (1.0 / 2**BITS)
            if KIND == 1:
                s = s * tl.abs(s)
        return s

    @triton.jit
    def _decode(code, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr, qmap_ptr, LOG_STEP_: tl.constexpr):
        if KIND == 2:
            return tl.load(qmap_ptr + code)
        offset: tl.constexpr = (2 ** (BITS - 1) - 1) if SIGNED else 0
        return _levels(code.to(tl.float32) - offset, BITS, KIND, SIGNED, qmap_ptr, LOG_STEP_)

    @triton.jit
    def _encode(x, u, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr, qmap_ptr, bounds_ptr,
                LOG_STEP_: tl.constexpr, STOCHASTIC: tl.constexpr):
        if KIND == 2:
            # exact branchless binary search: lo = #{bounds <= x}, bounds sorted, +inf padded
            pos = tl.zeros(x.shape, tl.int32)
            for i in tl.static_range(BITS):
                step: tl.constexpr = 2 ** (BITS - 1 - i)
                cand = tl.load(bounds_ptr + pos + (step - 1))
                pos = pos + tl.where(cand <= x, step, 0)
            pos = tl.minimum(pos, 2**BITS - 2)
            qlo = tl.load(qmap_ptr + pos)
            qhi = tl.load(qmap_ptr + pos + 1)
            lo = pos.to(tl.float32)
        else:
            if SIGNED:
                top: tl.constexpr = 2 ** (BITS - 1) - 1
                if KIND == 0:
                    t = x * top
                else:
                    t = tl.sqrt_rn(tl.abs(x)) * top * tl.where(x < 0, -1.0, 1.0)
                lo = tl.minimum(tl.maximum(tl.floor(t), -top), top - 1.0)
            else:
                n: tl.constexpr = 2**BITS
                if KIND == 0:
                    t = x * n - 1.0
                else:
                    t = tl.sqrt_rn(x) * n - 1.0
                lo = tl.minimum(tl.maximum(tl.floor(t), 0.0), n - 2.0)
            qlo = _levels(lo, BITS, KIND, SIGNED, qmap_ptr, LOG_STEP_)
            qhi = _levels(lo + 1.0, BITS, KIND, SIGNED, qmap_ptr, LOG_STEP_)
        if STOCHASTIC:
            up = u < tl.div_rn(x - qlo, qhi - qlo)
        else:
            up = (x - qlo) > (qhi - x)
        offset: tl.constexpr = (2 ** (BITS - 1) - 1) if SIGNED else 0
        return (lo + up.to(tl.float32) + offset).to(tl.int32)

    @triton.jit
    def _unpack(codes_ptr, blk, blk_ok, e, BITS: tl.constexpr, BLOCK: tl.constexpr):
        # codes: uint8[num_blocks, BITS, BLOCK // 8]; element e: byte e // 8, bit e % 8 of each plane
        code = tl.zeros(e.shape, tl.int32)
        for j in tl.static_range(BITS):
            ptr = codes_ptr + (blk * BITS + j) * (BLOCK // 8) + e // 8
            plane = tl.load(ptr, mask=blk_ok, other=0).to(tl.int32)
            code = code | (((plane >> (e % 8)) & 1) << j)
        return code

    @triton.jit
    def _pack(codes_ptr, code, blk_row, blk_ok_row, e, BITS: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr):
        byte = tl.arange(0, BLOCK // 8)
        for j in tl.static_range(BITS):
            bit = ((code >> j) & 1) << (e % 8)  # [G, BLOCK]
            packed = tl.sum(tl.reshape(bit, (G, BLOCK // 8, 8)), axis=2)
            ptr = codes_ptr + (blk_row * BITS + j) * (BLOCK // 8) + byte[None, :]
            tl.store(ptr, packed.to(tl.uint8), mask=blk_ok_row)

    @triton.jit
    def _requant_err(x, SIGNED: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr, qmap_ptr, bounds_ptr,
                     LOG_STEP_: tl.constexpr, scale_ptr):
        # x quantized (nearest) at another width and dequantized: the neighbouring-width probe
        if SIGNED:
            s = _cast_rne(tl.max(tl.abs(x), axis=1), scale_ptr.dtype.element_ty).to(tl.float32)[:, None]
        else:
            s = _cast_rne(tl.max(x, axis=1), scale_ptr.dtype.element_ty).to(tl.float32)[:, None]
        s = tl.where(s > 0, s, 1.0)
        code = _encode(tl.div_rn(x, s * (x * 0 + 1.0)), x, BITS, KIND, SIGNED, qmap_ptr, bounds_ptr, LOG_STEP_, False)
        return _decode(code, BITS, KIND, SIGNED, qmap_ptr, LOG_STEP_) * s

    @triton.jit
    def _packed_adam_kernel(
        p_ptr, g_ptr,  # param (fp32/bf16) and grad (fp32/bf16), numel elements, contiguous
        mc_ptr, ms_ptr, vc_ptr, vs_ptr,  # packed codes uint8[num_blocks, bits, BLOCK/8] and scales [num_blocks]
        mq_ptr, mb_ptr, vq_ptr, vb_ptr,  # codebook qmap / bounds (log kind only)
        partial_ptr,  # fp32[num_programs, 3] per-program error sums (WITH_STATS)
        npartial_ptr,  # fp32[num_programs, 6] per-program error sums at neighbouring widths, then at b, sampled
        q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,  # neighbour codebook tables
        numel, num_blocks, index_offset, key_m, key_v,
        beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2,
        BLOCK: tl.constexpr, G: tl.constexpr,
        M_BITS: tl.constexpr, M_KIND: tl.constexpr, V_BITS: tl.constexpr, V_KIND: tl.constexpr,
        M_LOG: tl.constexpr, V_LOG: tl.constexpr,
        STOCHASTIC: tl.constexpr, WITH_STATS: tl.constexpr,
        # neighbouring widths (0 = absent): exp_avg b-1, b+1, exp_avg_sq b-1, b+1, and their kinds
        N0_BITS: tl.constexpr, N0_KIND: tl.constexpr, N1_BITS: tl.constexpr, N1_KIND: tl.constexpr,
        N2_BITS: tl.constexpr, N2_KIND: tl.constexpr, N3_BITS: tl.constexpr, N3_KIND: tl.constexpr,
        N0_LOG: tl.constexpr, N1_LOG: tl.constexpr, N2_LOG: tl.constexpr, N3_LOG: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blk_row = (pid * G + tl.arange(0, G)).to(tl.int64)[:, None]  # [G, 1]
        blk_ok_row = blk_row < num_blocks
        e = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        offs = blk_row * BLOCK + e  # [G, BLOCK]
        blk = blk_row + e * 0
        blk_ok = blk < num_blocks
        inside = offs < numel

        p = tl.load(p_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        ms = tl.load(ms_ptr + blk_row, mask=blk_ok_row, other=0.0).to(tl.float32)
        vs = tl.load(vs_ptr + blk_row, mask=blk_ok_row, other=0.0).to(tl.float32)
        m = _decode(_unpack(mc_ptr, blk, blk_ok, e, M_BITS, BLOCK), M_BITS, M_KIND, True, mq_ptr, M_LOG) * ms
        v = _decode(_unpack(vc_ptr, blk, blk_ok, e, V_BITS, BLOCK), V_BITS, V_KIND, False, vq_ptr, V_LOG) * vs

        g = g + p * l2
        m = m * beta1 + g * omb1
        v = v * beta2 + (g * g) * omb2
        p = p * decay
        denom = tl.sqrt_rn(v) * inv_bc2 + eps
        p = p - tl.div_rn(m, denom) * step_size
        tl.store(p_ptr + offs, _cast_rne(p, p_ptr.dtype.element_ty), mask=inside)
        m = tl.where(inside, m, 0.0)
        v = tl.where(inside, v, 0.0)

        if STOCHASTIC:
            index = index_offset + offs
            um = _uniform(index, key_m)
            uv = _uniform(index, key_v)
        else:
            um = m
            uv = v
        m_scale = _cast_rne(tl.max(tl.abs(m), axis=1), ms_ptr.dtype.element_ty)
        v_scale = _cast_rne(tl.max(v, axis=1), vs_ptr.dtype.element_ty)
        tl.store(ms_ptr + blk_row, m_scale[:, None], mask=blk_ok_row)
        tl.store(vs_ptr + blk_row, v_scale[:, None], mask=blk_ok_row)
        sm = m_scale.to(tl.float32)[:, None]
        sv = v_scale.to(tl.float32)[:, None]
        sm = tl.where(sm > 0, sm, 1.0)
        sv = tl.where(sv > 0, sv, 1.0)
        m_code = _encode(tl.div_rn(m, sm * (e * 0 + 1.0)), um, M_BITS, M_KIND, True, mq_ptr, mb_ptr, M_LOG, STOCHASTIC)
        v_code = _encode(tl.div_rn(v, sv * (e * 0 + 1.0)), uv, V_BITS, V_KIND, False, vq_ptr, vb_ptr, V_LOG, STOCHASTIC)
        _pack(mc_ptr, m_code, blk_row, blk_ok_row, e, M_BITS, BLOCK, G)
        _pack(vc_ptr, v_code, blk_row, blk_ok_row, e, V_BITS, BLOCK, G)

        if WITH_STATS:
            mq = _decode(m_code, M_BITS, M_KIND, True, mq_ptr, M_LOG) * sm
            vq = _decode(v_code, V_BITS, V_KIND, False, vq_ptr, V_LOG) * sv
            ref = tl.div_rn(m, denom)
            err_m = tl.div_rn(mq, denom) - ref
            err_v = tl.div_rn(m, tl.sqrt_rn(vq) * inv_bc2 + eps) - ref
            err_m = tl.where(inside, err_m, 0.0)
            err_v = tl.where(inside, err_v, 0.0)
            ref = tl.where(inside, ref, 0.0)
            tl.store(partial_ptr + pid * 3 + 0, tl.sum(tl.sum(err_m * err_m, axis=1), axis=0))
            tl.store(partial_ptr + pid * 3 + 1, tl.sum(tl.sum(err_v * err_v, axis=1), axis=0))
            tl.store(partial_ptr + pid * 3 + 2, tl.sum(tl.sum(ref * ref, axis=1), axis=0))
            probe = inside & (blk % PROBE_STRIDE == 0)  # the sampled blocks, as in the twin
            if N0_BITS + N1_BITS + N2_BITS + N3_BITS > 0:  # the current widths on the same sample
                sm2 = tl.where(probe, err_m * err_m, 0.0)
                sv2 = tl.where(probe, err_v * err_v, 0.0)
                tl.store(npartial_ptr + pid * 6 + 4, tl.sum(tl.sum(sm2, axis=1), axis=0))
                tl.store(npartial_ptr + pid * 6 + 5, tl.sum(tl.sum(sv2, axis=1), axis=0))
            if N0_BITS > 0:
                e0 = tl.where(probe, tl.div_rn(_requant_err(m, True, N0_BITS, N0_KIND, q0_ptr, b0_ptr, N0_LOG, ms_ptr), denom) - ref, 0.0)
                tl.store(npartial_ptr + pid * 6 + 0, tl.sum(tl.sum(e0 * e0, axis=1), axis=0))
            if N1_BITS > 0:
                e1 = tl.where(probe, tl.div_rn(_requant_err(m, True, N1_BITS, N1_KIND, q1_ptr, b1_ptr, N1_LOG, ms_ptr), denom) - ref, 0.0)
                tl.store(npartial_ptr + pid * 6 + 1, tl.sum(tl.sum(e1 * e1, axis=1), axis=0))
            if N2_BITS > 0:
                vq2 = _requant_err(v, False, N2_BITS, N2_KIND, q2_ptr, b2_ptr, N2_LOG, vs_ptr)
                e2 = tl.where(probe, tl.div_rn(m, tl.sqrt_rn(vq2) * inv_bc2 + eps) - ref, 0.0)
                tl.store(npartial_ptr + pid * 6 + 2, tl.sum(tl.sum(e2 * e2, axis=1), axis=0))
            if N3_BITS > 0:
                vq3 = _requant_err(v, False, N3_BITS, N3_KIND, q3_ptr, b3_ptr, N3_LOG, vs_ptr)
                e3 = tl.where(probe, tl.div_rn(m, tl.sqrt_rn(vq3) * inv_bc2 + eps) - ref, 0.0)
                tl.store(npartial_ptr + pid * 6 + 3, tl.sum(tl.sum(e3 * e3, axis=1), axis=0))


def triton_packed_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_scale: torch.Tensor,
    exp_avg_codebook: Codebook,
    exp_avg_sq_codebook: Codebook,
    scalars: StepScalars,
    *,
    block_size: int,
    stochastic: bool = False,
    rng_keys: tuple[int, int] = (0, 0),
    index_offset: int = 0,
    stats: torch.Tensor | None = None,
    neighbor_codebooks: tuple | None = None,
    neighbor_stats: torch.Tensor | None = None,
    compile: bool = False,
) -> None:
    """Same contract as ``torch_packed_adam_step`` (``compile`` is ignored)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: pip install triton, or use backend='torch'")
    mcb, vcb = exp_avg_codebook, exp_avg_sq_codebook
    assert exp_avg_codes.shape[1] == mcb.bits and exp_avg_sq_codes.shape[1] == vcb.bits
    assert param.is_contiguous() and grad.is_contiguous()
    numel = param.numel()
    nblocks = exp_avg_codes.shape[0]
    grid = (triton.cdiv(nblocks, GROUP),)
    with_stats = stats is not None
    partial = torch.empty((grid[0], 3) if with_stats else (1, 3), dtype=torch.float32, device=param.device)
    nbrs = neighbor_codebooks if (with_stats and neighbor_stats is not None) else (None,) * 4
    npartial = torch.zeros((grid[0], 6) if any(cb is not None for cb in nbrs) else (1, 6),
                           dtype=torch.float32, device=param.device)  # fmt: skip
    tables, consts = [], {}
    for i, cb in enumerate(nbrs):
        tables += [cb.qmap, cb.bounds] if cb is not None else [mcb.qmap, mcb.bounds]
        consts[f"N{i}_BITS"] = cb.bits if cb is not None else 0
        consts[f"N{i}_KIND"] = KINDS.index(cb.kind) if cb is not None else 0
        consts[f"N{i}_LOG"] = LOG_STEP.get(cb.bits, 1.0) if cb is not None else 1.0
    _packed_adam_kernel[grid](
        param, grad, exp_avg_codes, exp_avg_scale, exp_avg_sq_codes, exp_avg_sq_scale,
        mcb.qmap, mcb.bounds, vcb.qmap, vcb.bounds, partial, npartial, *tables,
        numel, nblocks, index_offset, rng_keys[0], rng_keys[1], *scalars,
        BLOCK=block_size, G=GROUP,
        M_BITS=mcb.bits, M_KIND=KINDS.index(mcb.kind), V_BITS=vcb.bits, V_KIND=KINDS.index(vcb.kind),
        M_LOG=LOG_STEP.get(mcb.bits, 1.0), V_LOG=LOG_STEP.get(vcb.bits, 1.0),
        STOCHASTIC=stochastic, WITH_STATS=with_stats, **consts,
    )  # fmt: skip
    if with_stats:
        stats.add_(partial.sum(0))
        if neighbor_stats is not None:
            neighbor_stats.add_(npartial.sum(0))
