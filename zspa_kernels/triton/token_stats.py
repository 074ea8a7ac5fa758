"""Per-token statistics: scale, norm, finiteness and the packed relevance key.

For each token ``i`` of row ``b`` (grid: ``(cdiv(N, BLOCK_R), B)``), with ``s_i = 2**-e_i``
the power-of-two scale of ``spec`` (exact; it keeps squares of any finite token in range):

    scale[b, i]    = s_i
    norm[b, i]     = max(||s_i v_i||, 1e-6 · s_i)           (fp32, the norm in the token's scale)
    finite[b, i]   = no NaN/Inf in v_i
    key[b, i]      = max_key(r_i, i), r_i the cosine relevance (SPEC §1 step 2);
                     -2.0 for a non-finite token; INT64_MIN beyond the row's length

Cosines are ``(s_i v_i · s_p p) / (norm_i · norm_p)`` with IEEE division and square root:
the scales cancel exactly, and exact ties stay ties. ``mean``: ``p`` is one pooled vector, the
caller's or :func:`pool_prompt`'s mean of the valid prompt rows (a non-finite ``p`` acts as
zero); ``max``: the best cosine over valid prompt rows (a non-finite row scores 0), 0 when no row
is valid.

A launch of its own, because every Gram tile ranks its tokens by these keys: each key is
computed once. Traffic: ``visual`` read twice (three times for ``max``; the repeats hit L2),
``T·D`` prompt reads per CTA for ``max``, ``D`` for ``mean`` (a per-token prompt is pooled by
:func:`pool_prompt`'s launch first), ``17·N`` bytes written. The first CTA of each row also zeroes
the row's arrival counter for the Gram kernel (no memset launch, no state between calls).
"""
import torch
import triton
import triton.language as tl

from .. import spec
from .primitives import finite_abs, max_key, nonfinite, pow2_scale, scaled_operand

NORM_EPS = tl.constexpr(spec.NORM_EPS)
NONFINITE_RELEVANCE = tl.constexpr(spec.NONFINITE_RELEVANCE)
FLOAT32_MAX = tl.constexpr(torch.finfo(torch.float32).max)
# The pooling launch (:func:`pool_prompt`) holds 128 features a CTA and takes 32 prompt rows a
# step (each a 1-D load, all in flight together).
POOL_LAUNCH_ROWS, POOL_LAUNCH_BLOCK_D = 32, 128
# Sums of squares and dots as fused multiply-adds (one rounding a term, as nvcc compiles the
# cuda backend's): what every Triton up to 3.9 did by default and the first GPU run checked.
# Passed at each launch because Triton 3.10 turns the default off (3.9 warns when it is unset).
FP_FUSION = True


@triton.jit
def _prompt_row_mask(mask_ptr, b, t, T, stride_mb, stride_mt, HAS_MASK: tl.constexpr):
    ok = t < T
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _prompt_count(mask_ptr, b, T, stride_mb, stride_mt, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """The number of valid prompt rows of batch row ``b`` (fp32)."""
    t_offs = tl.arange(0, BLOCK_T)
    count = 0.0
    for t0 in range(0, T, BLOCK_T):
        count += tl.sum(_prompt_row_mask(mask_ptr, b, t0 + t_offs, T, stride_mb, stride_mt, HAS_MASK).to(tl.float32))
    return count


@triton.jit
def _pool_prompt_kernel(prompt_ptr, mask_ptr, pooled_ptr, D, T, pool_down, pool_up,
                        stride_pb, stride_pt, stride_pd, stride_mb, stride_mt,
                        HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """``pooled[b, 0, d]``: the mean of row ``b``'s valid prompt rows, ``BLOCK_D`` features a CTA
    (grid ``(B, cdiv(D, BLOCK_D))``: the batch on x, which has no 65535 limit); where a feature's
    sum of finite values overflows, the mean of the rows times ``pool_down = 2**-k``, scaled back
    by ``pool_up`` (``spec.pool_shift``). ``ROWS`` rows a step, each a 1-D load, added in row
    order in registers: no reduction across threads, and ⌈T / ROWS⌉ dependent steps, not T."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    p_row = prompt_ptr + b * stride_pb
    count = _prompt_count(mask_ptr, b, T, stride_mb, stride_mt, HAS_MASK, BLOCK_T)
    pooled = tl.zeros(d.shape, tl.float32)
    pooled_down = tl.zeros(d.shape, tl.float32)
    for t0 in range(0, T, ROWS):
        for j in tl.static_range(ROWS):
            t = t0 + j
            ok = _prompt_row_mask(mask_ptr, b, t, T, stride_mb, stride_mt, HAS_MASK)  # t < T too
            # Row t's features when t < T, none past it: one comparison. (`(d < D) & (t < T)`, a
            # block and a scalar, reaches Triton 3.9's interpreter as an int32 mask, which its load
            # rejects; compiled, both forms are a select and a compare.)
            p = tl.load(p_row + t * stride_pt + d * stride_pd, mask=d < tl.where(t < T, D, 0), other=0.0)
            p = p.to(tl.float32)
            pooled += tl.where(ok, p, 0.0)  # where, not *: masked rows may be NaN
            pooled_down += tl.where(ok, p * pool_down, 0.0)  # the select keeps the product out of an fma
    divisor = tl.maximum(count, 1.0)
    mean = tl.div_rn(pooled, divisor)  # IEEE: `/` compiles to an approximate div.full.f32
    rescaled = tl.div_rn(pooled_down, divisor) * pool_up
    rescaled = tl.where(nonfinite(rescaled) & ~nonfinite(pooled_down),
                        tl.where(rescaled > 0, FLOAT32_MAX, -FLOAT32_MAX), rescaled)  # saturated, as spec says
    tl.store(pooled_ptr + b * D + d, tl.where(nonfinite(mean), rescaled, mean), mask=d < D)


@triton.jit
def _token_stats_kernel(
    visual_ptr, prompt_ptr, mask_ptr, lengths_ptr,
    norm_ptr, scale_ptr, finite_ptr, key_ptr, counter_ptr,
    N, D, T,
    stride_vb, stride_vn, stride_vd, stride_l,
    stride_pb, stride_pt, stride_pd,
    stride_mb, stride_mt,
    MAX_RELEVANCE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, SCALE_OPERANDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    n = N
    if HAS_LENGTHS:
        n = tl.minimum(tl.maximum(tl.load(lengths_ptr + b * stride_l).to(tl.int32), 1), N)
    if pid == 0:
        tl.store(counter_ptr + b, 0)
    v_rows = visual_ptr + b * stride_vb + rows.to(tl.int64)[:, None] * stride_vn
    p_row = prompt_ptr + b * stride_pb
    t_offs = tl.arange(0, BLOCK_T)
    d_offs = tl.arange(0, BLOCK_D)
    if MAX_RELEVANCE:
        count = _prompt_count(mask_ptr, b, T, stride_mb, stride_mt, HAS_MASK, BLOCK_T)  # valid prompt rows

    # The D loops below accumulate elementwise in (rows × features) registers and reduce once
    # after the loop: a row reduction per feature chunk went through shared memory every
    # iteration, and on the H200 87% of this kernel's shared-memory wavefronts were bank
    # conflicts of those reductions (bench/results/2026-11-30-nvidia-h200.ncu.txt). With
    # STAGES > 1 their chunk loads are software-pipelined (asynchronous copies, STAGES - 1
    # chunks ahead): a CTA's 16 dependent chunk loads at LLaVA-1.5 no longer wait one by one.

    # Pass 0: each token's (and the pooled prompt's) power-of-two scale, for overflow-safe norms.
    amax2 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    p_amax1 = tl.zeros([BLOCK_D], tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        d = d0 + d_offs
        v = tl.load(v_rows + d[None, :] * stride_vd, mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        v = v.to(tl.float32)
        amax2 = tl.maximum(amax2, finite_abs(v))
        if not MAX_RELEVANCE:
            pooled = tl.load(p_row + d * stride_pd, mask=d < D, other=0.0).to(tl.float32)
            p_amax1 = tl.maximum(p_amax1, finite_abs(pooled))
    scale = pow2_scale(tl.max(amax2, 1))
    p_scale = pow2_scale(tl.max(p_amax1, 0))

    # Pass 1: norms and finiteness; for "mean" also the dot with the pooled prompt. Scaled,
    # a finite token's squares sum to at most D: a non-finite sum means a NaN or inf feature.
    sumsq2 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    dot2 = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    p_sumsq1 = tl.zeros([BLOCK_D], tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        d = d0 + d_offs
        v = tl.load(v_rows + d[None, :] * stride_vd, mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        y = v.to(tl.float32) * scale[:, None]
        sumsq2 += y * y
        if not MAX_RELEVANCE:
            pooled = tl.load(p_row + d * stride_pd, mask=d < D, other=0.0).to(tl.float32) * p_scale
            p_sumsq1 += pooled * pooled
            dot2 += y * pooled[None, :]
    sumsq = tl.sum(sumsq2, 1)
    finite = ~nonfinite(sumsq)
    norm = tl.maximum(tl.sqrt_rn(sumsq), scale * NORM_EPS)

    if MAX_RELEVANCE:
        # Pass 2: cosine to every prompt row on tensor cores (scaled inputs, fp32 accumulation).
        rel = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + t_offs
            t_ok = _prompt_row_mask(mask_ptr, b, t, T, stride_mb, stride_mt, HAS_MASK)
            t_amax2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + d_offs
                p = tl.load(p_row + t[:, None] * stride_pt + d[None, :] * stride_pd,
                            mask=(t < T)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
                t_amax2 = tl.maximum(t_amax2, finite_abs(p))
            t_scale = pow2_scale(tl.max(t_amax2, 1))
            acc = tl.zeros([BLOCK_R, BLOCK_T], tl.float32)
            t_sumsq2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + d_offs
                v = tl.load(v_rows + d[None, :] * stride_vd, mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
                p = tl.load(p_row + t[:, None] * stride_pt + d[None, :] * stride_pd,
                            mask=(t < T)[:, None] & (d < D)[None, :], other=0.0)
                acc = tl.dot(scaled_operand(v, scale, SCALE_OPERANDS, DOT_UPCAST),
                             tl.trans(scaled_operand(p, t_scale, SCALE_OPERANDS, DOT_UPCAST)), acc,
                             input_precision=DOT_PRECISION)
                p32 = p.to(tl.float32) * t_scale[:, None]
                t_sumsq2 += p32 * p32
            t_sumsq = tl.sum(t_sumsq2, 1)
            t_finite = ~nonfinite(t_sumsq)
            if not SCALE_OPERANDS:
                acc = acc * scale[:, None] * t_scale[None, :]
            cos = tl.div_rn(acc, norm[:, None] * tl.maximum(tl.sqrt_rn(t_sumsq), t_scale * NORM_EPS)[None, :])
            cos = tl.where(t_finite[None, :], cos, 0.0)  # a non-finite prompt row acts as zero
            rel = tl.maximum(rel, tl.max(tl.where(t_ok[None, :], cos, float("-inf")), 1))
        rel = tl.where(count > 0, rel, 0.0)
    else:
        p_sumsq = tl.sum(p_sumsq1, 0)
        rel = tl.div_rn(tl.sum(dot2, 1), norm * tl.maximum(tl.sqrt_rn(p_sumsq), p_scale * NORM_EPS))
        p_finite = ~nonfinite(p_sumsq)
        rel = tl.where(p_finite, rel, 0.0)  # a non-finite pooled prompt acts as zero

    rel = tl.where(finite, rel, NONFINITE_RELEVANCE)
    key = tl.where(rows < n, max_key(rel, rows), -0x7FFFFFFFFFFFFFFF - 1)
    out = b * N + rows
    tl.store(norm_ptr + out, norm, mask=row_ok)
    tl.store(scale_ptr + out, scale, mask=row_ok)
    tl.store(finite_ptr + out, finite.to(tl.int8), mask=row_ok)
    tl.store(key_ptr + out, key, mask=row_ok)


def launch_token_stats(visual, prompt, prompt_mask, lengths, norm, scale, finite, key, counter, relevance, plan):
    """Fill ``norm``, ``scale``, ``finite``, ``key`` ``(B, N)`` and zero ``counter`` ``(B,)``. For
    ``mean`` the prompt is one pooled vector a batch row (``(B, D)`` or ``(B, 1, D)``, no mask:
    :func:`pool_prompt`'s, where the caller gave rows)."""
    B, N, D = visual.shape
    prompt3 = prompt if prompt.dim() == 3 else prompt.unsqueeze(1)
    if relevance == "mean" and (prompt3.shape[1] != 1 or prompt_mask is not None):
        raise ValueError(f"prompt: relevance 'mean' takes one pooled row a batch row, without a mask (pool_prompt's); "
                         f"got {prompt3.shape[1]} rows{' and a mask' if prompt_mask is not None else ''}")
    mask = prompt3 if prompt_mask is None else prompt_mask.view(torch.uint8)
    grid = ((N + plan.block_rows - 1) // plan.block_rows, B)  # triton.cdiv costs ~1.5 µs of host time a call
    _token_stats_kernel[grid](
        visual, prompt3, mask, visual if lengths is None else lengths,
        norm, scale, finite, key, counter,
        N, D, prompt3.shape[1],
        *visual.stride(), 0 if lengths is None else lengths.stride(0), *prompt3.stride(),
        *(mask.stride() if prompt_mask is not None else (0, 0)),
        MAX_RELEVANCE=relevance == "max", HAS_MASK=prompt_mask is not None, HAS_LENGTHS=lengths is not None,
        DOT_PRECISION=plan.dot_precision, DOT_UPCAST=plan.dot_upcast, SCALE_OPERANDS=plan.scale_operands,
        BLOCK_R=plan.block_rows, BLOCK_T=plan.block_prompt, BLOCK_D=plan.block_d_stats,
        STAGES=plan.num_stages_stats, num_warps=plan.num_warps_stats,
        enable_fp_fusion=FP_FUSION,
    )


def pool_prompt(prompt, prompt_mask, plan):
    """``(B, 1, D)`` fp32: each batch row's mean of its valid prompt rows (``spec.pool_shift``'s
    rule), the one place this backend pools. For ``mean`` with a per-token prompt the caller
    passes this to :func:`launch_token_stats` instead of the rows (mask dropped): every statistics
    CTA then reads ``D`` pooled values a pass, not ``T·D`` prompt values in ⌈T/8⌉ dependent steps
    a feature chunk (at T = 24 that was 3 of every 4 L2 round trips of the launch; a long prompt
    made it T-fold). One launch of ``B × cdiv(D, 128)`` CTAs."""
    B, T, D = prompt.shape
    pooled = torch.empty(B, 1, D, dtype=torch.float32, device=prompt.device)
    mask = prompt if prompt_mask is None else prompt_mask.view(torch.uint8)
    k = spec.pool_shift(T)
    _pool_prompt_kernel[(B, (D + POOL_LAUNCH_BLOCK_D - 1) // POOL_LAUNCH_BLOCK_D)](
        prompt, mask, pooled, D, T, 2.0**-k, 2.0**k,
        *prompt.stride(), *(mask.stride() if prompt_mask is not None else (0, 0)),
        HAS_MASK=prompt_mask is not None, BLOCK_T=plan.block_prompt, BLOCK_D=POOL_LAUNCH_BLOCK_D,
        ROWS=POOL_LAUNCH_ROWS, num_warps=4, enable_fp_fusion=FP_FUSION,
    )
    return pooled
