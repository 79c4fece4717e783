"""Triton kernel of the factored step (packed ``exp_avg``, factored ``exp_avg_sq``), twin of
``torch_adam.torch_factored_adam_step``.

Pass 1 (row and column statistics of g**2) is ``torch_adam.factored_moment_update`` on both backends:
reductions in PyTorch, the same bits everywhere. Pass 2, here, is the fused step of ``_step_body``
(``triton_adam.py``) with the second moment of element (i, j) read as ``(row[i] * col[j]) * (1 / mean(row))``
instead of decoded, and nothing stored for it; the statistics and the probe cover ``exp_avg`` only.
"""

from __future__ import annotations

import torch

from ..formats.codebooks import KINDS, Codebook
from .common import MAX_BLOCK_SIZE, SAMPLE_STRIDE, StepScalars
from .torch_adam import factored_moment_update
from .triton_adam import HAS_TRITON, _launch_opts, _maxnreg_option, _neighbor_args

_MAXNREG = _maxnreg_option(128) if HAS_TRITON else {}  # headroom: no spills under every declared Triton

MAX_COLS = 2**31 - 2**16
"""Columns of a factored matrix the kernel indexes with 32-bit arithmetic (a column index plus one program's elements)."""

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_adam import (
        _FMAX, _SAMPLE, _bmax, _cast_rne, _decode, _encode, _nearest_value, _pack, _prescale, _scale_cast, _total,
        _uniforms, _unpack,
    )  # fmt: skip

    @triton.jit(do_not_specialize=["numel", "num_blocks", "cols", "index_offset", "key", "phase"])
    def _factored_adam_kernel(
        p_ptr, g_ptr,  # param (fp32/bf16/fp16) and grad, numel elements, contiguous
        mc_ptr, ms_ptr,  # exp_avg codes uint8[num_blocks, bits, BLOCK/8] and scales [num_blocks]
        row_ptr, col_ptr, inv_ptr,  # fp32 [rows], [cols], 0-d 1 / mean(row): updated by pass 1
        mq_ptr, mb_ptr,  # codebook qmap / bounds (log kind only)
        partial_ptr,  # fp32[num_programs, 3] per-program error sums (WITH_STATS)
        npartial_ptr,  # fp32[num_programs, 6] per-program probe sums (exp_avg b-1, b+1; 0, 0; b; 0)
        q0_ptr, b0_ptr, q1_ptr, b1_ptr,  # exp_avg's neighbour codebook tables
        numel: tl.int64, num_blocks: tl.int64, cols: tl.int64, index_offset: tl.int64, key: tl.uint32,
        beta1, omb1, eps, l2, decay, step_size, inv_bc2,
        phase: tl.int32,  # statistics: programs with (pid + phase) % SAMPLE_STRIDE == 0
        BLOCK: tl.constexpr, G: tl.constexpr, EVEN: tl.constexpr,
        M_BITS: tl.constexpr, M_KIND: tl.constexpr, STOCHASTIC: tl.constexpr, WITH_STATS: tl.constexpr,
        N0_BITS: tl.constexpr, N0_KIND: tl.constexpr, N1_BITS: tl.constexpr, N1_KIND: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blk0 = pid.to(tl.int64) * G
        base = blk0 * BLOCK
        W: tl.constexpr = BLOCK // 8
        h = tl.arange(0, 2)[:, None, None, None]
        r = tl.arange(0, G)[None, :, None, None]
        w = tl.arange(0, W)[None, None, :, None]
        i = h * 4 + tl.arange(0, 4)[None, None, None, :]
        loc4 = r * BLOCK + w * 8 + h * 4
        loc = loc4 + tl.arange(0, 4)[None, None, None, :]
        r2 = tl.arange(0, G)[:, None]
        w2 = tl.arange(0, W)[None, :]
        rem = tl.minimum(numel - base, G * BLOCK).to(tl.int32)
        brem = tl.minimum(num_blocks - blk0, G).to(tl.int32)
        if EVEN:
            inside = tl.broadcast_to(loc4 < rem, loc.shape)
        else:
            inside = loc < rem
        blk_ok = r < brem
        blk_ok2 = r2 < brem
        p_ptr += base
        g_ptr += base
        ms_ptr += blk0
        mc_ptr += blk0 * (M_BITS * (BLOCK // 8))

        p = tl.load(p_ptr + loc, mask=inside).to(tl.float32)
        g = tl.load(g_ptr + loc, mask=inside).to(tl.float32)
        ms = tl.load(ms_ptr + r, mask=blk_ok, other=0.0).to(tl.float32)
        m = _decode(_unpack(mc_ptr, r, w, i, blk_ok, M_BITS, W), M_BITS, M_KIND, True, mq_ptr) * ms
        # element (row0 + dr, cj) of the flattened [rows, cols] matrix: 64-bit arithmetic once per program,
        # 32-bit per element (cols < 2**31 - 2**16, checked by the launcher)
        start = base + index_offset
        row0 = start // cols
        c = (start - row0 * cols).to(tl.int32) + loc
        cols32 = cols.to(tl.int32)
        dr = c // cols32
        v = tl.load(row_ptr + row0 + dr, mask=inside, other=0.0) * tl.load(col_ptr + (c - dr * cols32), mask=inside, other=0.0)
        v = v * tl.load(inv_ptr)

        g = g + p * l2
        m = m * beta1 + g * omb1
        p = p * decay
        denom = tl.sqrt_rn(v) * inv_bc2 + eps
        upd = tl.div_rn(m, denom)
        p = p - upd * step_size
        tl.store(p_ptr + loc, _cast_rne(p, p_ptr.dtype.element_ty), mask=inside)
        m = tl.where(inside & (tl.abs(m) <= _FMAX), m, 0.0)  # stored exp_avg finite: NaN/inf -> 0

        if STOCHASTIC:
            um, _ = _uniforms(start, loc, key)  # index in the matrix, as the twin
        else:
            um = m
        m_scale = _scale_cast(_bmax(tl.abs(m)), ms_ptr.dtype.element_ty)
        tl.store(ms_ptr + r, m_scale, mask=blk_ok)
        sm = m_scale.to(tl.float32)
        sm = tl.where(sm > 0, sm, 1.0)
        pm, _ = _prescale(sm)
        inv_sm = tl.div_rn(1.0, sm * pm)
        x = (m * pm) * inv_sm
        m_code = _encode(x, um, m, M_BITS, M_KIND, True, mq_ptr, mb_ptr, STOCHASTIC)

        _pack(mc_ptr, m_code, r2, w2, blk_ok2, i, M_BITS, W)

        if WITH_STATS:
            if ((pid + phase) & (_SAMPLE - 1)) == 0:  # a sampled program (the others' sums stay 0)
                # as in triton_adam._error_sums: no cancellation, the GPU's approximate division
                rden = 1.0 / denom
                mq = _decode(m_code, M_BITS, M_KIND, True, mq_ptr) * sm
                err_m = tl.where(inside, (mq - m) * rden, 0.0)
                ref = tl.where(inside, upd, 0.0)
                em2 = _total(err_m * err_m)
                tl.store(partial_ptr + pid * 3 + 0, em2)
                tl.store(partial_ptr + pid * 3 + 2, _total(ref * ref))
                if N0_BITS + N1_BITS > 0:
                    # neighbouring widths of exp_avg with this block's scale, nearest rounding, nothing stored
                    if N0_BITS > 0:
                        e0 = tl.where(inside, (_nearest_value(x, N0_BITS, N0_KIND, q0_ptr, b0_ptr) * sm - m) * rden, 0.0)
                        tl.store(npartial_ptr + pid * 6 + 0, _total(e0 * e0))
                    if N1_BITS > 0:
                        e1 = tl.where(inside, (_nearest_value(x, N1_BITS, N1_KIND, q1_ptr, b1_ptr) * sm - m) * rden, 0.0)
                        tl.store(npartial_ptr + pid * 6 + 1, _total(e1 * e1))
                    em2n = em2  # the current width with nearest rounding too (triton_adam._error_sums)
                    if STOCHASTIC:
                        en = tl.where(inside, (_nearest_value(x, M_BITS, M_KIND, mq_ptr, mb_ptr) * sm - m) * rden, 0.0)
                        em2n = _total(en * en)
                    tl.store(npartial_ptr + pid * 6 + 4, em2n)


def triton_factored_adam_step(
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
    """Same contract as ``torch_factored_adam_step`` (``compile`` is ignored)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: pip install triton, or use backend='torch'")
    mcb = exp_avg_codebook
    assert exp_avg_codes.shape[1] == mcb.bits and index_offset + param.numel() <= row.numel() * col.numel()
    assert param.is_contiguous() and grad.is_contiguous()
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size={block_size} is above the kernel's limit {MAX_BLOCK_SIZE}")
    if col.numel() >= MAX_COLS:
        raise ValueError(f"a factored matrix with {col.numel()} columns is above the kernel's limit {MAX_COLS}; "
                         "use exp_avg_sq_format='packed' or backend='torch'")  # fmt: skip
    if inv_mean is None:
        inv_mean = factored_moment_update(param, grad, row, col, scalars)
    numel, nblocks = param.numel(), exp_avg_codes.shape[0]
    G, opts = _launch_opts(block_size)
    opts.update(_MAXNREG)
    grid = (triton.cdiv(nblocks, G),)
    if grid[0] == 0:
        return
    dev = param.device
    with_stats = stats is not None
    partial = torch.zeros((grid[0], 3) if with_stats else (1, 3), dtype=torch.float32, device=dev)
    nbrs = neighbor_codebooks[:2] if (with_stats and neighbor_stats is not None) else (None, None)
    npartial = torch.zeros((grid[0], 6) if any(cb is not None for cb in nbrs) else (1, 6), dtype=torch.float32,
                           device=dev)  # fmt: skip
    tables, consts = _neighbor_args(mcb, nbrs)  # exp_avg's two neighbours: N0, N1
    s = scalars
    _factored_adam_kernel[grid](
        param, grad, exp_avg_codes, exp_avg_scale, row, col, inv_mean, mcb.qmap, mcb.bounds, partial, npartial,
        *tables, numel, nblocks, col.numel(), index_offset, rng_key,
        s.beta1, s.one_minus_beta1, s.eps, s.l2, s.decay, s.step_size, s.inv_bias_correction2_sqrt,
        sample_phase % SAMPLE_STRIDE,
        BLOCK=block_size, G=G, EVEN=numel % 4 == 0, M_BITS=mcb.bits, M_KIND=KINDS.index(mcb.kind),
        STOCHASTIC=stochastic, WITH_STATS=with_stats, **consts, **opts,
    )  # fmt: skip
    if with_stats:
        stats.add_(partial.sum(0))
        if neighbor_stats is not None:
            neighbor_stats.add_(npartial.sum(0))
