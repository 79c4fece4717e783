"""Triton kernel of the fused packed-Adam step (GPU path), twin of ``torch_adam.py``.

One program handles ``G`` consecutive blocks of ``BLOCK`` elements of one unit (``launch_shape``
picks ``G`` and the warps from the block size: 8 elements per thread). Tensors are
``[2, G, W, 4]`` (``W = BLOCK / 8`` bytes per plane; element ``8 w + 4 h + j``): the 8 elements whose
bits share a byte of each bit plane belong to one thread, so unpacking (one multiplication per 4
planes) and packing happen in registers, without shared memory or layout conversions. For each
block, in registers: unpack the bit planes of both moments, dequantize, apply Adam/AdamW to the
fp32 parameter, take the new block absmax, quantize (nearest or stochastic), pack, store. Nothing
but the packed state and the parameter/gradient is read or written.

Bytes moved per element: param read+write (8) + grad read (4, or 2 for bf16) + exp_avg codes
read+write (2 * m_bits / 8) + exp_avg_sq codes read+write (2 * v_bits / 8) + scales
(4 * 4 / BLOCK) -> 14.1 B at 4/4 bits with fp32 grads, against 28 B for fp32 Adam.

Arithmetic is written operation for operation like the PyTorch twin, with IEEE-rounded division
and square root (``div_rn``, ``sqrt_rn``) where they are used (one division and one or two roots
per element on the common path; blocks are normalized by a per-block reciprocal), so the packed
codes match bit for bit (proved in
``tests/test_kernels.py`` under ``TRITON_INTERPRET=1``). Bit widths and codebook kinds are
``constexpr`` from closed sets (widths 2..8 and 3 kinds per moment, plus the neighbouring widths
of the scheduler's probe step): a bounded set of specializations. Per-step and per-unit integers
(RNG keys, index offset, sizes) are typed and never specialized (``do_not_specialize``), so a whole
run compiles each configuration once. FMA contraction is off at launch (``enable_fp_fusion=False``):
the twin rounds every product and sum, and so does the GPU. ``benchmarks/gpu_compile.py`` compiles
every specialization ahead of time for sm_80 and sm_90 and checks all of this.

On a statistics step every ``SAMPLE_STRIDE``-th program (the step's ``phase`` rotates which) also
measures the scheduler's error sums, the probe's included, from its registers (``_error_sums``);
the others step and leave.

Two launch paths share one body: ``triton_packed_adam_step`` (one unit) and
``triton_packed_adam_group_step`` (one launch over a table of units sharing widths, codebooks,
dtypes and rounding; no host sync).
"""

from __future__ import annotations

import torch

from ..formats.codebooks import KINDS, LOG_STEP, Codebook
from .common import (
    BF16_MAX, FP16_MAX, FP32_MAX, HASH_MUL1, HASH_MUL2, MAX_BLOCK_SIZE, PRESCALE_HIGH, PRESCALE_LOW, SAMPLE_STRIDE,
    GroupEntry, StepScalars, check_group, launch_shape,
)  # fmt: skip

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False

_TL_DTYPES = {}

if HAS_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    # module constants used inside kernels must be constexpr for the real compiler
    _MUL1: tl.constexpr = tl.constexpr(HASH_MUL1)
    _MUL2: tl.constexpr = tl.constexpr(HASH_MUL2)
    _SAMPLE: tl.constexpr = tl.constexpr(SAMPLE_STRIDE)
    # edge values (twin: torch_adam.finite_moments / prescale / scale_to_dtype; docs/gpu_semantics.md)
    _FMAX: tl.constexpr = tl.constexpr(FP32_MAX)
    _BF16_MAX: tl.constexpr = tl.constexpr(BF16_MAX)
    _FP16_MAX: tl.constexpr = tl.constexpr(FP16_MAX)
    _PRE_LO: tl.constexpr = tl.constexpr(PRESCALE_LOW)
    _PRE_HI: tl.constexpr = tl.constexpr(PRESCALE_HIGH)

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32 (products wrap mod 2**32, shifts are logical: the twin's int64 & MASK32)
        x = x ^ (x >> 16)
        x = x * _MUL1
        x = x ^ (x >> 15)
        x = x * _MUL2
        return x ^ (x >> 16)

    @triton.jit
    def _uniforms(start, loc, key):
        # the twin's uniforms(start + loc, key): start int64 (the program's first global index), loc
        # int32 offsets within the program. The high word is hashed per program (it carries at most
        # once within a program), so each element costs one mix32 for both moments' numbers.
        s_lo = start.to(tl.uint32)
        s_hi = (start >> 32).to(tl.uint32)
        lo = s_lo + loc.to(tl.uint32)
        k = key.to(tl.uint32)
        kh = tl.where(lo < s_lo, _mix32(k ^ (s_hi + 1)), _mix32(k ^ s_hi))
        h = _mix32(lo ^ kh)
        return (h >> 16).to(tl.float32) * (1.0 / 65536.0), (h & 0xFFFF).to(tl.float32) * (1.0 / 65536.0)

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
    def _scale_cast(amax, DTYPE: tl.constexpr):
        # a block's absmax (finite, >= 0) -> its stored scale, saturated at the dtype's largest finite
        # value (a bf16/fp16 scale never rounds to inf; twin: scale_to_dtype)
        if DTYPE == tl.bfloat16:
            amax = tl.minimum(amax, _BF16_MAX)
        elif DTYPE == tl.float16:
            amax = tl.minimum(amax, _FP16_MAX)
        return _cast_rne(amax, DTYPE)

    @triton.jit
    def _prescale(s):
        # per-block power of two pre (and its square root) that keeps 1 / (s * pre) a normal fp32 number:
        # 2**64 below 2**-64, 2**-64 from 2**64, else 1 (then every bit is as without it). Elements are
        # normalized as (x * pre) * div_rn(1, s * pre): exact scalings, one rounding as for normal scales
        # (twin: prescale)
        pre = tl.where(s < _PRE_LO, _PRE_HI, tl.where(s >= _PRE_HI, _PRE_LO, 1.0))
        rpre = tl.where(s < _PRE_LO, 4294967296.0, tl.where(s >= _PRE_HI, 1.0 / 4294967296.0, 1.0))
        return pre, rpre

    @triton.jit
    def _approx_sqrt(a, BITS: tl.constexpr):
        # sqrt(a), a >= 0: a bit-level reciprocal square root (within 3.5 %), refined by one Newton step
        # (within 0.18 %) above 4 bits; fp32 products as in the twin. Nearest rounding needs the lower
        # neighbour only to within a quarter level: the rounding step then picks the same (nearest)
        # code as from the exact bracket.
        y = (0x5F375A86 - (a.to(tl.int32, bitcast=True) >> 1)).to(tl.float32, bitcast=True)
        if BITS > 4:
            y = y * (1.5 - ((0.5 * a) * y) * y)
        return a * y

    @triton.jit
    def _levels(k, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr):
        # level value of fp32 level index k (linear / pow2); same expression as codebooks.level_values
        if SIGNED:
            s = k * (1.0 / (2 ** (BITS - 1) - 1))
        else:
            s = (k + 1.0) * (1.0 / 2**BITS)
        if KIND == 1:
            s = s * tl.abs(s)
        return s

    @triton.jit
    def _decode(code, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr, qmap_ptr):
        if KIND == 2:
            return tl.load(qmap_ptr + code)
        offset: tl.constexpr = (2 ** (BITS - 1) - 1) if SIGNED else 0
        return _levels(code.to(tl.float32) - offset, BITS, KIND, SIGNED)

    @triton.jit
    def _bracket(x, root, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr, qmap_ptr, bounds_ptr,
                 EXACT_ROOT: tl.constexpr):
        # the levels around x: lo (level index, fp32), q(lo), q(lo + 1)
        if KIND == 2:
            # exact branchless binary search: lo = #{bounds <= x}, bounds sorted, +inf padded
            pos = tl.zeros(x.shape, tl.int32)
            for i in tl.static_range(BITS):
                cand = tl.load(bounds_ptr + pos + (2 ** (BITS - 1 - i) - 1))
                pos = pos + tl.where(cand <= x, 2 ** (BITS - 1 - i), 0)
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
                    if EXACT_ROOT:
                        t = tl.sqrt_rn(tl.abs(x)) * top
                    else:
                        t = _approx_sqrt(tl.abs(x), BITS) * top
                    t = tl.where(x < 0, -t, t)
                lo = tl.minimum(tl.maximum(tl.floor(t), -top), top - 1.0)
            else:
                n: tl.constexpr = 2**BITS
                if KIND == 0:
                    t = x * n - 1.0
                else:
                    t = root - 1.0  # root: sqrt(x) * n, computed by the caller
                lo = tl.minimum(tl.maximum(tl.floor(t), 0.0), n - 2.0)
            qlo = _levels(lo, BITS, KIND, SIGNED)
            qhi = _levels(lo + 1.0, BITS, KIND, SIGNED)
        return lo, qlo, qhi

    @triton.jit
    def _encode(x, u, root, BITS: tl.constexpr, KIND: tl.constexpr, SIGNED: tl.constexpr, qmap_ptr, bounds_ptr,
                STOCHASTIC: tl.constexpr):
        # stochastic rounding needs the exact bracket; nearest rounding does not (docs/formats.md)
        lo, qlo, qhi = _bracket(x, root, BITS, KIND, SIGNED, qmap_ptr, bounds_ptr, STOCHASTIC)
        if STOCHASTIC:
            up = u * (qhi - qlo) < x - qlo  # u < (x - qlo) / (qhi - qlo) without a division
        else:
            up = (x - qlo) > (qhi - x)
        offset: tl.constexpr = (2 ** (BITS - 1) - 1) if SIGNED else 0
        return (lo + up.to(tl.float32) + offset).to(tl.int32)

    @triton.jit
    def _gather4(codes_ptr, r, w, iu, blk_ok, J0: tl.constexpr, NJ: tl.constexpr, BITS: tl.constexpr,
                 W: tl.constexpr):
        # planes J0 .. J0+NJ-1 of byte w -> bytes 0 .. NJ-1 of one word; then bit i of each byte
        # (bits 8k + i) -> bits 28 + k by one multiplication (the partial products land on distinct
        # bits: no carries), so element i's 4-bit code is the top nibble
        word = tl.zeros((1, r.shape[1], W, 1), tl.uint32)
        for j in tl.static_range(NJ):
            plane = tl.load(codes_ptr + (r * BITS + J0 + j) * W + w, mask=blk_ok)  # [1, G, W, 1]; past the end: unused
            word = word | (plane.to(tl.uint32) << (8 * j))
        return ((word & (0x01010101 << iu)) * (0x10204080 >> iu)) >> 28

    @triton.jit
    def _unpack(codes_ptr, r, w, i, blk_ok, BITS: tl.constexpr, W: tl.constexpr):
        # codes (this program's first block): uint8[G, BITS, W]; element 8 * w + i of block r is bit i
        # of byte w of each plane. Tensors are [2, G, W, 4] (i = 4 * h + j): the 8 elements of a byte
        # belong to one thread (the two halves of a byte are the outer dimension, which no thread or
        # warp splits), so unpacking and packing stay in registers.
        iu = i.to(tl.uint32)
        code = _gather4(codes_ptr, r, w, iu, blk_ok, 0, min(BITS, 4), BITS, W)
        if BITS > 4:
            code = code | (_gather4(codes_ptr, r, w, iu, blk_ok, 4, BITS - 4, BITS, W) << 4)
        return code.to(tl.int32)

    @triton.jit
    def _spread4(c, iu):
        # 4-bit values -> bit j moved to bit 8 * j + i (the shifted copies do not overlap: no carries;
        # the shift by i rides on the multiplier, exact mod 2**32 for the bits kept)
        return (c.to(tl.uint32) * (0x204081 << iu)) & (0x01010101 << iu)

    @triton.jit
    def _pack(codes_ptr, code, r2, w2, blk_ok2, i, BITS: tl.constexpr, W: tl.constexpr):
        # bit j of the 8 codes of a byte -> byte j of one word per 4 planes, summed over the byte's
        # 8 elements (distinct bits: the sum is an OR); one reduction per 4 planes, no per-plane pass
        iu = i.to(tl.uint32)
        lo = tl.sum(tl.sum(_spread4(code if BITS <= 4 else code & 15, iu), axis=3), axis=0)  # [G, W]: planes 0..3
        for j in tl.static_range(min(BITS, 4)):
            tl.store(codes_ptr + (r2 * BITS + j) * W + w2, ((lo >> (8 * j)) & 0xFF).to(tl.uint8), mask=blk_ok2)
        if BITS > 4:
            hi = tl.sum(tl.sum(_spread4(code >> 4, iu), axis=3), axis=0)  # planes 4..7
            for j in tl.static_range(BITS - 4):
                tl.store(codes_ptr + (r2 * BITS + 4 + j) * W + w2, ((hi >> (8 * j)) & 0xFF).to(tl.uint8),
                         mask=blk_ok2)  # fmt: skip

    @triton.jit
    def _bmax(x):
        # per-block max of a [2, G, W, 4] tensor, kept as [1, G, 1, 1] (in-thread axes first)
        return tl.max(tl.max(tl.max(x, axis=3, keep_dims=True), axis=0, keep_dims=True), axis=2, keep_dims=True)

    @triton.jit
    def _total(x):
        return tl.sum(tl.sum(tl.sum(tl.sum(x, axis=3), axis=0), axis=1), axis=0)

    @triton.jit
    def _nearest_value(x, BITS: tl.constexpr, KIND: tl.constexpr, qmap_ptr, bounds_ptr):
        # decode(encode(x)) of a signed codebook with nearest rounding, without the code: the same
        # level expressions, so the same bits as decoding the code
        lo, qlo, qhi = _bracket(x, x, BITS, KIND, True, qmap_ptr, bounds_ptr, False)
        return tl.where((x - qlo) > (qhi - x), qhi, qlo)

    @triton.jit
    def _requant_v(v, inv, rv, BITS: tl.constexpr, KIND: tl.constexpr, qmap_ptr, bounds_ptr):
        # codes of exp_avg_sq quantized (nearest) at another width with the block's reciprocal scale
        # inv: the neighbouring-width probe (rv: sqrt(v), the pow2 root). The scale does not depend on
        # the width: one per moment. (exp_avg's neighbours: _nearest_value, without codes.)
        if KIND == 1:
            rv = rv * (tl.sqrt_rn(inv) * 2**BITS)
        return _encode(v * inv, v, rv, BITS, KIND, False, qmap_ptr, bounds_ptr, False)

    @triton.jit
    def _root_dequant(code, s, BITS: tl.constexpr, KIND: tl.constexpr, qmap_ptr):
        # sqrt of the dequantized exp_avg_sq (twin: root_dequantize_blocks); pow2: the level's root
        # (i + 1) / N times sqrt(scale), no square root per element
        if KIND == 1:
            return ((code.to(tl.float32) + 1.0) * (1.0 / 2**BITS)) * tl.sqrt_rn(s)
        return tl.sqrt_rn(_decode(code, BITS, KIND, False, qmap_ptr) * s)

    @triton.jit
    def _error_sums(
        partial_ptr, npartial_ptr, out_row, inside,
        m, xm, vp, rvp, denom, ref, m_code, v_code, sm, sv, inv_sv, inv_bc2, eps, mq_ptr, mb_ptr, vq_ptr, vb_ptr,
        q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,
        M_BITS: tl.constexpr, M_KIND: tl.constexpr, V_BITS: tl.constexpr, V_KIND: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        N0_BITS: tl.constexpr, N0_KIND: tl.constexpr, N1_BITS: tl.constexpr, N1_KIND: tl.constexpr,
        N2_BITS: tl.constexpr, N2_KIND: tl.constexpr, N3_BITS: tl.constexpr, N3_KIND: tl.constexpr,
    ):
        # A sampled program's statistics, from the step's registers: the damage of each moment's
        # quantization to the update direction ref = m / denom, then (probe step) the same damage at the
        # neighbouring widths with the same block scales, nearest rounding, nothing stored. m, xm (m
        # normalized), vp, rvp (v and sqrt(v) times the block's prescale) are zero outside the tensor;
        # ref is not. The errors are written without cancellation,
        # (mq - m) / denom and ref * (denom - dq) / dq, so the GPU's approximate division (2 ulp; not
        # div_rn: these are sums, compared with the twin's at 1e-5, not bits) keeps them accurate.
        rden = 1.0 / denom
        ref = tl.where(inside, ref, 0.0)
        mq = _decode(m_code, M_BITS, M_KIND, True, mq_ptr) * sm
        err_m = tl.where(inside, (mq - m) * rden, 0.0)
        dq = _root_dequant(v_code, sv, V_BITS, V_KIND, vq_ptr) * inv_bc2 + eps
        err_v = ref * ((denom - dq) / dq)
        em2 = _total(err_m * err_m)
        ev2 = _total(err_v * err_v)
        tl.store(partial_ptr + out_row * 3 + 0, em2)
        tl.store(partial_ptr + out_row * 3 + 1, ev2)
        tl.store(partial_ptr + out_row * 3 + 2, _total(ref * ref))
        if N0_BITS + N1_BITS + N2_BITS + N3_BITS > 0:
            zero = tl.zeros(m.shape, tl.float32)
            e0 = zero
            e1 = zero
            e2 = zero
            e3 = zero
            if N0_BITS > 0:
                mq0 = _nearest_value(xm, N0_BITS, N0_KIND, q0_ptr, b0_ptr) * sm
                e0 = tl.where(inside, (mq0 - m) * rden, 0.0)
            if N1_BITS > 0:
                mq1 = _nearest_value(xm, N1_BITS, N1_KIND, q1_ptr, b1_ptr) * sm
                e1 = tl.where(inside, (mq1 - m) * rden, 0.0)
            if N2_BITS > 0:
                dq2 = _root_dequant(_requant_v(vp, inv_sv, rvp, N2_BITS, N2_KIND, q2_ptr, b2_ptr), sv, N2_BITS, N2_KIND, q2_ptr) * inv_bc2 + eps
                e2 = ref * ((denom - dq2) / dq2)
            if N3_BITS > 0:
                dq3 = _root_dequant(_requant_v(vp, inv_sv, rvp, N3_BITS, N3_KIND, q3_ptr, b3_ptr), sv, N3_BITS, N3_KIND, q3_ptr) * inv_bc2 + eps
                e3 = ref * ((denom - dq3) / dq3)
            # the four sums in one reduction (side by side in registers: one exchange between warps);
            # an absent width sums zeros, as the buffer holds
            x = tl.join(tl.join(e0 * e0, e1 * e1), tl.join(e2 * e2, e3 * e3))  # [2, G, W, 4, 2, 2]
            t = tl.sum(tl.sum(tl.sum(tl.sum(x, axis=3), axis=0), axis=1), axis=0)  # [2, 2]: t[i, j] = sum k = 2 j + i
            tl.store(npartial_ptr + out_row * 6 + tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :] * 2, t)
            # the current widths on the same sample and with the same (nearest) rounding: the probe's
            # ratios compare like with like (the twin's _adam_chunk says why)
            em2n = em2
            ev2n = ev2
            if STOCHASTIC:
                en = tl.where(inside, (_nearest_value(xm, M_BITS, M_KIND, mq_ptr, mb_ptr) * sm - m) * rden, 0.0)
                em2n = _total(en * en)
                dqn = _root_dequant(_requant_v(vp, inv_sv, rvp, V_BITS, V_KIND, vq_ptr, vb_ptr), sv, V_BITS, V_KIND, vq_ptr) * inv_bc2 + eps
                evn = ref * ((denom - dqn) / dqn)
                ev2n = _total(evn * evn)
            tl.store(npartial_ptr + out_row * 6 + 4, em2n)
            tl.store(npartial_ptr + out_row * 6 + 5, ev2n)

    @triton.jit
    def _step_body(
        p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr,  # this unit's tensors
        mq_ptr, mb_ptr, vq_ptr, vb_ptr,
        partial_ptr, npartial_ptr, out_row,
        q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,
        numel, num_blocks, index_offset, key, lpid,  # lpid: program index within the unit
        row,  # grouped launch: this unit's row of addresses (scale addresses are read again to store)
        beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2, phase,
        BLOCK: tl.constexpr, G: tl.constexpr, EVEN: tl.constexpr,
        M_BITS: tl.constexpr, M_KIND: tl.constexpr, V_BITS: tl.constexpr, V_KIND: tl.constexpr,
        STOCHASTIC: tl.constexpr, WITH_STATS: tl.constexpr,
        N0_BITS: tl.constexpr, N0_KIND: tl.constexpr, N1_BITS: tl.constexpr, N1_KIND: tl.constexpr,
        N2_BITS: tl.constexpr, N2_KIND: tl.constexpr, N3_BITS: tl.constexpr, N3_KIND: tl.constexpr,
    ):
        # 64-bit arithmetic once per program (bases); 32-bit per element (local offsets)
        blk0 = lpid.to(tl.int64) * G  # first block of the program
        base = blk0 * BLOCK  # first element
        W: tl.constexpr = BLOCK // 8  # bytes per plane of a block
        h = tl.arange(0, 2)[:, None, None, None]  # [2, 1, 1, 1] half of a byte
        r = tl.arange(0, G)[None, :, None, None]  # [1, G, 1, 1] block within the program
        w = tl.arange(0, W)[None, None, :, None]  # [1, 1, W, 1] byte within a plane
        i = h * 4 + tl.arange(0, 4)[None, None, None, :]  # [2, 1, 1, 4] bit within the byte
        loc4 = r * BLOCK + w * 8 + h * 4  # [2, G, W, 1] first element of each run of 4
        loc = loc4 + tl.arange(0, 4)[None, None, None, :]  # [2, G, W, 4] int32 element within the program
        r2 = tl.arange(0, G)[:, None]  # [G, 1] and [1, W]: the packed bytes
        w2 = tl.arange(0, W)[None, :]
        rem = tl.minimum(numel - base, G * BLOCK).to(tl.int32)
        brem = tl.minimum(num_blocks - blk0, G).to(tl.int32)
        if EVEN:  # numel % 4 == 0: a run of 4 is all in or all out (one mask per vector access)
            inside = tl.broadcast_to(loc4 < rem, loc.shape)
        else:
            inside = loc < rem
        blk_ok = r < brem  # [1, G, 1, 1]
        blk_ok2 = r2 < brem
        p_ptr += base
        g_ptr += base
        ms_ptr += blk0
        vs_ptr += blk0
        mc_ptr += blk0 * (M_BITS * (BLOCK // 8))
        vc_ptr += blk0 * (V_BITS * (BLOCK // 8))

        # past the end: undefined values, masked out of everything below (moments, stores, sums)
        p = tl.load(p_ptr + loc, mask=inside).to(tl.float32)
        g = tl.load(g_ptr + loc, mask=inside).to(tl.float32)
        ms = tl.load(ms_ptr + r, mask=blk_ok, other=0.0).to(tl.float32)
        vs = tl.load(vs_ptr + r, mask=blk_ok, other=0.0).to(tl.float32)
        m = _decode(_unpack(mc_ptr, r, w, i, blk_ok, M_BITS, W), M_BITS, M_KIND, True, mq_ptr) * ms
        v = _decode(_unpack(vc_ptr, r, w, i, blk_ok, V_BITS, W), V_BITS, V_KIND, False, vq_ptr) * vs

        g = g + p * l2
        m = m * beta1 + g * omb1
        v = v * beta2 + (g * g) * omb2
        rv = tl.sqrt_rn(v)
        denom = rv * inv_bc2 + eps
        upd = tl.div_rn(m, denom)
        p = p * decay - upd * step_size
        tl.store(p_ptr + loc, _cast_rne(p, p_ptr.dtype.element_ty), mask=inside)
        # stored moments are finite (twin: finite_moments): exp_avg NaN/inf -> 0; exp_avg_sq NaN -> 0,
        # inf -> the largest fp32. The parameter above keeps whatever NaN/inf the step produced.
        # v = +inf is clamped in its block's scale only (below): its code is the top one either way
        # (docs/gpu_semantics.md, "Non-finite values"), so no per-element minimum.
        m = tl.where(inside & (tl.abs(m) <= _FMAX), m, 0.0)
        okv = inside & (v == v)
        v = tl.where(okv, v, 0.0)
        rv = tl.where(okv, rv, 0.0)  # sqrt(v), reused by the pow2 quantizer of v

        if STOCHASTIC:
            um, uv = _uniforms(index_offset + base, loc, key)  # global index = index_offset + base + loc
        else:
            um = m
            uv = v
        m_scale = _scale_cast(_bmax(tl.abs(m)), ms_ptr.dtype.element_ty)  # [1, G, 1, 1]
        v_scale = _scale_cast(tl.minimum(_bmax(v), _FMAX), vs_ptr.dtype.element_ty)  # +inf -> the largest fp32
        if row is None:
            ms_st = ms_ptr
            vs_st = vs_ptr
        else:  # read after the parameter store (which may alias): no 64-bit address lives across the
            # out-of-line division and root calls (ptxas spilled one on sm_90)
            ms_st = tl.load(row + 3).to(tl.pointer_type(ms_ptr.dtype.element_ty)) + blk0
            vs_st = tl.load(row + 5).to(tl.pointer_type(vs_ptr.dtype.element_ty)) + blk0
        tl.store(ms_st + r, m_scale, mask=blk_ok)
        tl.store(vs_st + r, v_scale, mask=blk_ok)
        sm = m_scale.to(tl.float32)
        sv = v_scale.to(tl.float32)
        sm = tl.where(sm > 0, sm, 1.0)
        sv = tl.where(sv > 0, sv, 1.0)
        # normalized by a multiplication with the block's reciprocal scale (one division per block),
        # prescaled by a power of two where the scale is tiny or huge (_prescale)
        pm, _ = _prescale(sm)
        pv, rpv = _prescale(sv)
        inv_sm = tl.div_rn(1.0, sm * pm)
        xm = (m * pm) * inv_sm
        m_code = _encode(xm, um, m, M_BITS, M_KIND, True, mq_ptr, mb_ptr, STOCHASTIC)
        inv_sv = tl.div_rn(1.0, sv * pv)
        vp = v * pv
        rvp = rv * rpv  # sqrt(v * pv), exactly (used by the probe's pow2 quantizers only)
        v_root = rv
        if V_KIND == 1:  # sqrt of the normalized v times 2**bits: sqrt(v) * (sqrt(1 / scale) * 2**bits)
            # = (rv * rpv) * k of the twin: rv * rpv and rpv * k are exact (powers of two on normal
            # numbers: rv >= 2**-75, rpv * k in [2**-62, 2**83]), one per-block product instead of one per element
            v_root = rv * (rpv * (tl.sqrt_rn(inv_sv) * 2**V_BITS))
        v_code = _encode(vp * inv_sv, uv, v_root, V_BITS, V_KIND, False, vq_ptr, vb_ptr, STOCHASTIC)
        _pack(mc_ptr, m_code, r2, w2, blk_ok2, i, M_BITS, W)
        _pack(vc_ptr, v_code, r2, w2, blk_ok2, i, V_BITS, W)

        if WITH_STATS:
            if ((lpid + phase) & (_SAMPLE - 1)) == 0:  # a sampled program (the others' sums stay 0)
                _error_sums(
                    partial_ptr, npartial_ptr, out_row, inside,
                    m, xm, vp, rvp, denom, upd, m_code, v_code, sm, sv, inv_sv, inv_bc2, eps,
                    mq_ptr, mb_ptr, vq_ptr, vb_ptr,
                    q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,
                    M_BITS, M_KIND, V_BITS, V_KIND, STOCHASTIC,
                    N0_BITS, N0_KIND, N1_BITS, N1_KIND, N2_BITS, N2_KIND, N3_BITS, N3_KIND,
                )  # fmt: skip

    # Per-step integers are typed and never specialized: one compile per configuration per run.
    _NOSPEC = ["numel", "num_blocks", "index_offset", "key", "phase"]

    @triton.jit(do_not_specialize=_NOSPEC)
    def _packed_adam_kernel(
        p_ptr, g_ptr,  # param (fp32/bf16/fp16) and grad, numel elements, contiguous
        mc_ptr, ms_ptr, vc_ptr, vs_ptr,  # packed codes uint8[num_blocks, bits, BLOCK/8] and scales [num_blocks]
        mq_ptr, mb_ptr, vq_ptr, vb_ptr,  # codebook qmap / bounds (log kind only)
        partial_ptr,  # fp32[num_programs, 3] per-program error sums (WITH_STATS)
        npartial_ptr,  # fp32[num_programs, 6] per-program error sums at neighbouring widths, then at b, sampled
        q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,  # neighbour codebook tables
        numel: tl.int64, num_blocks: tl.int64, index_offset: tl.int64, key: tl.uint32,
        beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2,
        phase: tl.int32,  # statistics: programs with (pid + phase) % SAMPLE_STRIDE == 0
        BLOCK: tl.constexpr, G: tl.constexpr, EVEN: tl.constexpr,
        M_BITS: tl.constexpr, M_KIND: tl.constexpr, V_BITS: tl.constexpr, V_KIND: tl.constexpr,
        STOCHASTIC: tl.constexpr, WITH_STATS: tl.constexpr,
        # neighbouring widths (0 = absent): exp_avg b-1, b+1, exp_avg_sq b-1, b+1, and their kinds
        N0_BITS: tl.constexpr, N0_KIND: tl.constexpr, N1_BITS: tl.constexpr, N1_KIND: tl.constexpr,
        N2_BITS: tl.constexpr, N2_KIND: tl.constexpr, N3_BITS: tl.constexpr, N3_KIND: tl.constexpr,
    ):
        pid = tl.program_id(0)
        _step_body(
            p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr, mq_ptr, mb_ptr, vq_ptr, vb_ptr,
            partial_ptr, npartial_ptr, pid, q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,
            numel, num_blocks, index_offset, key, pid, None,
            beta1, omb1, beta2, omb2, eps, l2, decay, step_size, inv_bc2, phase,
            BLOCK, G, EVEN, M_BITS, M_KIND, V_BITS, V_KIND, STOCHASTIC, WITH_STATS,
            N0_BITS, N0_KIND, N1_BITS, N1_KIND, N2_BITS, N2_KIND, N3_BITS, N3_KIND,
        )  # fmt: skip

    @triton.jit(do_not_specialize=["phase"])
    def _packed_adam_group_kernel(
        meta_ptr,  # int64[E, 11]: addresses p, g, mc, ms, vc, vs; numel, num_blocks, index_offset, key,
        #            first program
        hyper_ptr,  # fp32[E, 9]: StepScalars of each entry
        prog_ptr,  # int32[num_programs]: entry of each program
        mq_ptr, mb_ptr, vq_ptr, vb_ptr,
        partial_ptr, npartial_ptr,
        q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,
        phase: tl.int32,  # statistics: programs with (program within the entry + phase) % SAMPLE_STRIDE == 0
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr,  # every param and grad address is a multiple of 16 bytes: vector loads
        BLOCK: tl.constexpr, G: tl.constexpr, EVEN: tl.constexpr,
        M_BITS: tl.constexpr, M_KIND: tl.constexpr, V_BITS: tl.constexpr, V_KIND: tl.constexpr,
        STOCHASTIC: tl.constexpr, WITH_STATS: tl.constexpr,
        N0_BITS: tl.constexpr, N0_KIND: tl.constexpr, N1_BITS: tl.constexpr, N1_KIND: tl.constexpr,
        N2_BITS: tl.constexpr, N2_KIND: tl.constexpr, N3_BITS: tl.constexpr, N3_KIND: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ent = tl.load(prog_ptr + pid).to(tl.int64)
        row = meta_ptr + ent * 11
        hy = hyper_ptr + ent * 9
        p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
        _step_body(
            p_ptr, g_ptr,
            tl.load(row + 2).to(tl.pointer_type(tl.uint8)), tl.load(row + 3).to(tl.pointer_type(S_DTYPE)),
            tl.load(row + 4).to(tl.pointer_type(tl.uint8)), tl.load(row + 5).to(tl.pointer_type(S_DTYPE)),
            mq_ptr, mb_ptr, vq_ptr, vb_ptr,
            partial_ptr, npartial_ptr, pid, q0_ptr, b0_ptr, q1_ptr, b1_ptr, q2_ptr, b2_ptr, q3_ptr, b3_ptr,
            tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
            pid - tl.load(row + 10).to(tl.int32), row,
            tl.load(hy + 0), tl.load(hy + 1), tl.load(hy + 2), tl.load(hy + 3), tl.load(hy + 4),
            tl.load(hy + 5), tl.load(hy + 6), tl.load(hy + 7), tl.load(hy + 8), phase,
            BLOCK, G, EVEN, M_BITS, M_KIND, V_BITS, V_KIND, STOCHASTIC, WITH_STATS,
            N0_BITS, N0_KIND, N1_BITS, N1_KIND, N2_BITS, N2_KIND, N3_BITS, N3_KIND,
        )  # fmt: skip


def _neighbor_args(mcb, nbrs):
    tables, consts = [], {}
    for i, cb in enumerate(nbrs):
        tables += [cb.qmap, cb.bounds] if cb is not None else [mcb.qmap, mcb.bounds]
        consts[f"N{i}_BITS"] = cb.bits if cb is not None else 0
        consts[f"N{i}_KIND"] = KINDS.index(cb.kind) if cb is not None else 0
    return tables, consts


def _reflect_ftz_option() -> dict:
    # libdevice without flush-to-zero (tl.floor: cvt.rmi.f32.f32, not .ftz), where this Triton has the option
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # pragma: no cover - no CUDA backend
        return {}
    return {"enable_reflect_ftz": False} if "enable_reflect_ftz" in getattr(CUDAOptions, "__dataclass_fields__", {}) else {}


_FTZ_OPTS = _reflect_ftz_option() if HAS_TRITON else {}


def _maxnreg_option(n: int) -> dict:
    """A register cap of ``n`` where this Triton has the option. Without an explicit cap, ptxas of triton
    3.6 compiles the factored kernel's probe step (sm_90) at 80 registers with 8 bytes of spills; with
    headroom it takes 93 and spills nothing (3.9: 80 -> 90, no spills either way)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # pragma: no cover - no CUDA backend
        return {}
    return {"maxnreg": n} if "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {}) else {}


def _launch_opts(block_size: int) -> tuple[int, dict]:
    g, warps = launch_shape(block_size)
    # no FMA contraction: the twin rounds every product and sum (bit-identity on GPUs); no flush to zero
    # of subnormals in libdevice (the twin keeps them; benchmarks/gpu_compile.py checks for .ftz)
    return g, dict(num_warps=warps, enable_fp_fusion=False, **_FTZ_OPTS)


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
    rng_key: int = 0,
    index_offset: int = 0,
    stats: torch.Tensor | None = None,
    neighbor_codebooks: tuple | None = None,
    neighbor_stats: torch.Tensor | None = None,
    sample_phase: int = 0,
    compile: bool | None = False,
) -> None:
    """Same contract as ``torch_packed_adam_step`` (``compile`` is ignored)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: pip install triton, or use backend='torch'")
    mcb, vcb = exp_avg_codebook, exp_avg_sq_codebook
    assert exp_avg_codes.shape[1] == mcb.bits and exp_avg_sq_codes.shape[1] == vcb.bits
    assert param.is_contiguous() and grad.is_contiguous()
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size={block_size} is above the kernel's limit {MAX_BLOCK_SIZE}")
    numel = param.numel()
    nblocks = exp_avg_codes.shape[0]
    G, opts = _launch_opts(block_size)
    grid = (triton.cdiv(nblocks, G),)
    if grid[0] == 0:
        return
    with_stats = stats is not None
    partial = torch.zeros((grid[0], 3) if with_stats else (1, 3), dtype=torch.float32, device=param.device)
    nbrs = neighbor_codebooks if (with_stats and neighbor_stats is not None) else (None,) * 4
    npartial = torch.zeros((grid[0], 6) if any(cb is not None for cb in nbrs) else (1, 6),
                           dtype=torch.float32, device=param.device)  # fmt: skip
    tables, consts = _neighbor_args(mcb, nbrs)
    _packed_adam_kernel[grid](
        param, grad, exp_avg_codes, exp_avg_scale, exp_avg_sq_codes, exp_avg_sq_scale,
        mcb.qmap, mcb.bounds, vcb.qmap, vcb.bounds, partial, npartial, *tables,
        numel, nblocks, index_offset, rng_key, *scalars, sample_phase % SAMPLE_STRIDE,
        BLOCK=block_size, G=G, EVEN=numel % 4 == 0,
        M_BITS=mcb.bits, M_KIND=KINDS.index(mcb.kind), V_BITS=vcb.bits, V_KIND=KINDS.index(vcb.kind),
        STOCHASTIC=stochastic, WITH_STATS=with_stats, **consts, **opts,
    )  # fmt: skip
    if with_stats:
        stats.add_(partial.sum(0))
        if neighbor_stats is not None:
            neighbor_stats.add_(npartial.sum(0))


def _addr(t: torch.Tensor) -> int:
    return t.data_ptr() if t.numel() else 0


def triton_packed_adam_group_step(
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
    """Same contract as ``torch_packed_adam_group_step``: one launch for the whole group."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: pip install triton, or use backend='torch'")
    mcb, vcb = exp_avg_codebook, exp_avg_sq_codebook
    check_group(entries, mcb, vcb, stats, neighbor_stats)
    if not entries:
        return
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size={block_size} is above the kernel's limit {MAX_BLOCK_SIZE}")
    dev = entries[0].param.device
    G, opts = _launch_opts(block_size)
    meta, hyper, progs = [], [], []
    first = 0
    for i, en in enumerate(entries):
        nb = en.exp_avg_codes.shape[0]
        n_prog = -(-nb // G)
        meta.append([
            _addr(en.param), _addr(en.grad), _addr(en.exp_avg_codes), _addr(en.exp_avg_scale),
            _addr(en.exp_avg_sq_codes), _addr(en.exp_avg_sq_scale), en.param.numel(), nb, en.index_offset,
            en.rng_key, first,
        ])  # fmt: skip
        hyper.append(list(en.scalars))
        progs.append(torch.full((n_prog,), i, dtype=torch.int32))
        first += n_prog
    if first == 0:
        return
    pin = dev.type == "cuda"
    meta_t = torch.tensor(meta, dtype=torch.int64)
    hyper_t = torch.tensor(hyper, dtype=torch.float32)
    prog_t = torch.cat(progs)
    if pin:
        meta_t, hyper_t, prog_t = meta_t.pin_memory(), hyper_t.pin_memory(), prog_t.pin_memory()
    meta_t, hyper_t, prog_t = (t.to(dev, non_blocking=True) for t in (meta_t, hyper_t, prog_t))
    with_stats = stats is not None
    partial = torch.zeros((first, 3) if with_stats else (1, 3), dtype=torch.float32, device=dev)
    nbrs = neighbor_codebooks if (with_stats and neighbor_stats is not None) else (None,) * 4
    npartial = torch.zeros((first, 6) if any(cb is not None for cb in nbrs) else (1, 6), dtype=torch.float32,
                           device=dev)  # fmt: skip
    tables, consts = _neighbor_args(mcb, nbrs)
    e0 = entries[0]
    _packed_adam_group_kernel[(first,)](
        meta_t, hyper_t, prog_t, mcb.qmap, mcb.bounds, vcb.qmap, vcb.bounds, partial, npartial, *tables,
        sample_phase % SAMPLE_STRIDE,
        P_DTYPE=_TL_DTYPES[e0.param.dtype], G_DTYPE=_TL_DTYPES[e0.grad.dtype], S_DTYPE=_TL_DTYPES[e0.exp_avg_scale.dtype],
        ALIGNED=all(row[0] % 16 == 0 and row[1] % 16 == 0 for row in meta),
        BLOCK=block_size, G=G, EVEN=all(row[6] % 4 == 0 for row in meta),  # every numel a multiple of 4
        M_BITS=mcb.bits, M_KIND=KINDS.index(mcb.kind), V_BITS=vcb.bits, V_KIND=KINDS.index(vcb.kind),
        STOCHASTIC=stochastic, WITH_STATS=with_stats, **consts, **opts,
    )  # fmt: skip
    if with_stats:
        idx = prog_t.to(torch.int64)
        stats.index_add_(0, idx, partial)
        if neighbor_stats is not None:
            neighbor_stats.index_add_(0, idx, npartial)
