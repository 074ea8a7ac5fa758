"""Gram tiles, core ranks and the greedy max-min chain in one launch ("last CTA done").

Grid ``(tiles², B)``; CTA ``(rt, ct, b)`` owns the ``BLOCK_G × BLOCK_G`` tile of row ``b``:

1. ``G = (S V)_r (S V)_cᵀ`` with ``tl.dot``, ``S`` the tokens' power-of-two ``scale``
   (exact). A tile whose tokens all lie in spec's raw band (fp16: always) dots the tokens as
   given and scales the fp32 result, the same numbers; only a tile holding a token outside it
   scales its operands in the K loop, which then waits for each step's dot (the scaled copy
   goes through registers). 16-bit products are exact in fp32, fp32 inputs use
   ``input_precision="ieee"`` (tf32 would flip near-ties). Only tiles with ``r <= c`` compute
   it and fill both ``(r, c)`` and ``(c, r)``: half the FLOPs, and symmetric bit for bit by
   construction.
   Divided by the two scaled norms (IEEE ``div_rn``). Gram path: stored as ``M[r, c]`` =
   similarity of token ``c`` to a pick ``r`` (2.0 for a non-finite ``c``, 0.0 for a
   non-finite ``r``: SPEC conventions).
   ``NEED_ISO`` (some row may have ``k_core = 0``): row maxima of ``G`` off the diagonal
   over usable columns, the most-isolated seed's scores, one partial per column tile.
2. Core ranks: ``#{c in tile: key_c > key_r}`` per ``r``, one partial per column tile;
   the rank of a token among the row's relevance keys is their sum, and the core is
   ``rank < k_core``, its pick order the rank. O(N²) compares spread over all CTAs
   instead of a ``k_core``-step argmax chain.
3. ``atomic_add(counter[b], 1)`` (acq_rel, gpu scope, after a CTA barrier so that all
   of the CTA's stores are ordered before it). The CTA that sees the last arrival selects
   row ``b`` alone: no CTA ever waits, so this also runs in the sequential interpreter.
   It reads other CTAs' scratch with ``.cg`` loads (L2, never a stale L1 line).

The selecting CTA keeps the state ``s`` (similarity to the selected set; +inf once a
token is taken or beyond the row) in a global ``(B, N)`` buffer walked in
``BLOCK_S`` chunks, so any ``N`` fits; for ``N <= BLOCK_S`` that is one chunk whose
store/load pairs stay in the same thread and hit L1. The core's rows are gathered
``CORE_BLOCK`` at a time (independent loads). Each greedy step is one pass:
load ``s`` and the pick's row of ``M``, take the max, store, and reduce the packed
``(s, index)`` keys to the next pick. Streaming path (``STORE_GRAM=False``, when one
row's ``M`` exceeds the scratch budget): the row is recomputed as ``V v_jᵀ`` from ``visual``.

Memory traffic per row: ``N·D`` inputs read by every upper tile's rows and columns (L2), ``4·N²``
bytes of Gram written once, then per greedy step one ``4·N``-byte Gram row and the
``4·N``-byte state through the selecting CTA; the chain of ``k_b - k_core`` dependent steps,
not bandwidth, bounds LLaVA sizes. Streaming path: ``N·D`` inputs per step through one CTA
(a fallback for rows whose matrix does not fit). Measured times: ``bench/results``.
"""
import functools

import numpy as np
import triton
import triton.language as tl

from .primitives import in_raw_band, key_index, min_key, scaled_operand

INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
# No multiply-add here is worth fusing (the Gram is tl.dot, cosines are IEEE divisions), and
# fusing alpha·k_b + 0.5 into one fma would round k_core differently from the reference.
FP_FUSION = False


@functools.lru_cache(maxsize=256)  # a call's host time: ~0.6 µs of NumPy conversions each time
def split_fp64(x: float) -> tuple[float, float, float]:
    """Three fp32 values whose fp64 sum is exactly ``x`` (24 + 24 + 5 of its 53 bits; a
    remainder below fp32's range only occurs for |x| < 1e-29, where k_core is 0 anyway)."""
    hi = float(np.float32(x))
    mid = float(np.float32(x - hi))
    return hi, mid, float(np.float32(x - hi - mid))


# The -1 padding's store width (int64 slots a store of the whole CTA).
PAD_BLOCK = tl.constexpr(1024)


@triton.jit
def _padding_trips(k, k_b):
    """How many ``PAD_BLOCK``-wide stores pad ``k - k_b`` slots, counted in int64: k may be up to
    2^31 - 1, where the int32 sum inside ``cdiv`` (k - k_b + PAD_BLOCK - 1) wraps negative and the
    loop would run no trip at all."""
    return tl.cdiv((k - k_b).to(tl.int64), PAD_BLOCK)


@triton.jit
def _row_bounds(lengths_ptr, stride_l, b, N, k, alpha_hi, alpha_mid, alpha_lo, HAS_LENGTHS: tl.constexpr):
    """``n``, ``k_b = min(k, n)`` and ``k_core = clamp(floor(alpha·k_b + 0.5), 0, k_b)`` in fp64,
    as the reference. ``alpha`` arrives as three fp32 scalars whose fp64 sum is exact (see
    :func:`split_fp64`): Triton versions differ in whether an fp64 argument can be declared."""
    n = N
    if HAS_LENGTHS:
        n = tl.minimum(tl.maximum(tl.load(lengths_ptr + b * stride_l).to(tl.int32), 1), N)
    k_b = tl.minimum(n, k)
    # Two roundings, as in the reference: the launch disables fp fusion, else this is one fma.
    alpha = (tl.cast(alpha_hi, tl.float64) + tl.cast(alpha_mid, tl.float64)) + tl.cast(alpha_lo, tl.float64)
    k_core = tl.floor(alpha * k_b.to(tl.float64) + 0.5).to(tl.int32)
    return n, k_b, tl.minimum(tl.maximum(k_core, 0), k_b)


@triton.jit
def _similarity_rows(js, js_ok, idx, in_n, b, N, D, gram_ptr, visual_ptr, norm_ptr, scale_ptr, finite_ptr,
                     stride_vb, stride_vn, stride_vd,
                     STORE_GRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(len(js), BLOCK_S)``: similarity of tokens ``idx`` to each pick ``js`` (SPEC
    conventions for non-finite tokens); ``-inf`` on rows where ``js_ok`` is false."""
    if STORE_GRAM:
        rows = tl.load(gram_ptr + (b * N + js.to(tl.int64))[:, None] * N + idx[None, :],
                       mask=js_ok[:, None] & in_n[None, :], other=float("-inf"), cache_modifier=".cg")
    else:
        v_b = visual_ptr + b * stride_vb
        d_offs = tl.arange(0, BLOCK_D)
        scale_j = tl.load(scale_ptr + b * N + js, mask=js_ok, other=1.0, cache_modifier=".cg")
        scale_c = tl.load(scale_ptr + b * N + idx, mask=in_n, other=1.0, cache_modifier=".cg")
        acc = tl.zeros([js.shape[0], idx.shape[0]], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + d_offs
            d_ok = (d < D)[None, :]
            vj = tl.load(v_b + js.to(tl.int64)[:, None] * stride_vn + d[None, :] * stride_vd,
                         mask=js_ok[:, None] & d_ok, other=0.0).to(tl.float32) * scale_j[:, None]
            vc = tl.load(v_b + idx.to(tl.int64)[:, None] * stride_vn + d[None, :] * stride_vd,
                         mask=in_n[:, None] & d_ok, other=0.0).to(tl.float32) * scale_c[:, None]
            acc += tl.sum(vj[:, None, :] * vc[None, :, :], 2)
        norm_c = tl.load(norm_ptr + b * N + idx, mask=in_n, other=1.0, cache_modifier=".cg")
        fin_c = tl.load(finite_ptr + b * N + idx, mask=in_n, other=1, cache_modifier=".cg") != 0
        norm_j = tl.load(norm_ptr + b * N + js, mask=js_ok, other=1.0, cache_modifier=".cg")
        fin_j = tl.load(finite_ptr + b * N + js, mask=js_ok, other=1, cache_modifier=".cg") != 0
        rows = tl.div_rn(acc, norm_j[:, None] * norm_c[None, :])
        rows = tl.where(fin_c[None, :], tl.where(fin_j[:, None], rows, 0.0), 2.0)
        rows = tl.where(js_ok[:, None], rows, float("-inf"))
    return rows


@triton.jit
def _tile_dot(v_b, rows, cols, r_ok, c_ok, scale_r, scale_c, D, stride_vn, stride_vd, SCALE: tl.constexpr,
              DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """``V_rows V_colsᵀ`` of one Gram tile (fp32), the operands scaled by their tokens' ``scale``
    in the K loop if ``SCALE``, else taken as given."""
    d_offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_G, BLOCK_G], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + d_offs
        d_ok = (d < D)[None, :]
        a = tl.load(v_b + rows.to(tl.int64)[:, None] * stride_vn + d[None, :] * stride_vd,
                    mask=r_ok[:, None] & d_ok, other=0.0)
        c = tl.load(v_b + cols.to(tl.int64)[:, None] * stride_vn + d[None, :] * stride_vd,
                    mask=c_ok[:, None] & d_ok, other=0.0)
        acc = tl.dot(scaled_operand(a, scale_r, SCALE, DOT_UPCAST),
                     tl.trans(scaled_operand(c, scale_c, SCALE, DOT_UPCAST)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _select_row(
    b, n, k_b, k_core, N, D, k, stride_order, n_tiles,
    visual_ptr, norm_ptr, scale_ptr, finite_ptr, gram_ptr, iso_ptr, rank_ptr, state_ptr, order_ptr, out_ptr,
    stride_vb, stride_vn, stride_vd,
    STORE_GRAM: tl.constexpr, NEED_ISO: tl.constexpr, PICK_ORDER: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CORE_BLOCK: tl.constexpr,
):
    """Core by rank, then the greedy chain, then the output, for row ``b`` (one CTA)."""
    INF = float("inf")
    offs = tl.arange(0, BLOCK_S)
    row_state = state_ptr + b * N
    row_order = order_ptr + b * stride_order

    # Initial state; core tokens land at their rank in the pick order.
    for c0 in range(0, N, BLOCK_S):
        idx = c0 + offs
        in_n = idx < N
        rank = tl.zeros([BLOCK_S], tl.int32)
        for t in range(0, n_tiles):
            rank += tl.load(rank_ptr + (b * n_tiles + t) * N + idx, mask=in_n, other=0, cache_modifier=".cg")
        core = (idx < n) & (rank < k_core)
        tl.store(row_order + rank, idx.to(tl.int64), mask=core)
        s = tl.full([BLOCK_S], float("-inf"), tl.float32)
        if NEED_ISO:
            iso = tl.full([BLOCK_S], float("-inf"), tl.float32)
            for t in range(0, n_tiles):
                iso = tl.maximum(iso, tl.load(iso_ptr + (b * n_tiles + t) * N + idx, mask=in_n,
                                              other=float("-inf"), cache_modifier=".cg"))
            fin = tl.load(finite_ptr + b * N + idx, mask=in_n, other=1, cache_modifier=".cg") != 0
            s = tl.where(k_core == 0, tl.where(fin, iso, 2.0), s)
        s = tl.where((idx < n) & ~core, s, INF)
        tl.store(row_state + idx, s, mask=in_n)
    tl.debug_barrier()  # core picks and state written by other threads of this CTA

    # Similarity to the core, CORE_BLOCK rows per gather (independent reads, no chain),
    # and the first pick's key.
    best = tl.full([], INT64_MAX, tl.int64)
    core_offs = tl.arange(0, CORE_BLOCK)
    for c0 in range(0, N, BLOCK_S):
        idx = c0 + offs
        in_n = idx < N
        s = tl.load(row_state + idx, mask=in_n, other=INF)
        for t0 in range(0, k_core, CORE_BLOCK):
            cs_ok = t0 + core_offs < k_core
            cs = tl.load(row_order + t0 + core_offs, mask=cs_ok, other=0).to(tl.int32)
            rows = _similarity_rows(cs, cs_ok, idx, in_n, b, N, D, gram_ptr, visual_ptr, norm_ptr, scale_ptr,
                                    finite_ptr,
                                    stride_vb, stride_vn, stride_vd, STORE_GRAM, BLOCK_D)
            s = tl.where(s == INF, INF, tl.maximum(s, tl.max(rows, 0)))
        tl.store(row_state + idx, s, mask=in_n)
        best = tl.minimum(best, tl.min(tl.where(in_n, min_key(s, idx), INT64_MAX), 0))
    tl.debug_barrier()  # likewise: the state may be stored and loaded under different mappings

    # The chain: pick the least similar free token, fold its row into the state.
    for t in range(k_core, k_b):
        j = key_index(best)
        tl.store(row_order + t, j.to(tl.int64))
        js = tl.zeros([1], tl.int32) + j
        best = tl.full([], INT64_MAX, tl.int64)
        for c0 in range(0, N, BLOCK_S):
            idx = c0 + offs
            in_n = idx < N
            s = tl.load(row_state + idx, mask=in_n, other=INF)
            row = tl.max(_similarity_rows(js, js >= 0, idx, in_n, b, N, D, gram_ptr, visual_ptr, norm_ptr,
                                          scale_ptr, finite_ptr, stride_vb, stride_vn, stride_vd, STORE_GRAM, BLOCK_D), 0)
            # t == 0 only with an empty core: the isolation scores are replaced, not maxed.
            s = tl.where((s == INF) | (idx == j), INF, tl.where(t == 0, row, tl.maximum(s, row)))
            tl.store(row_state + idx, s, mask=in_n)
            best = tl.minimum(best, tl.min(tl.where(in_n, min_key(s, idx), INT64_MAX), 0))
        # The compiler may store the state under another thread mapping than it loads it:
        # order this step's stores before the next step's (and the output pass's) loads.
        tl.debug_barrier()

    row_out = out_ptr + b * k
    if not PICK_ORDER:
        # Ascending kept indices: compact the taken tokens (state +inf inside the row).
        base = 0
        for c0 in range(0, N, BLOCK_S):
            idx = c0 + offs
            taken = (tl.load(row_state + idx, mask=idx < N, other=0.0) == INF) & (idx < n)
            flags = taken.to(tl.int32)
            tl.store(row_out + base + tl.cumsum(flags, 0) - 1, idx.to(tl.int64), mask=taken)
            base += tl.sum(flags, 0)
    # The -1 padding after the k_b kept tokens (both layouts), here rather than as a fill by the
    # launcher, which would be a kernel launch of its own on the op's critical path. 1024-wide
    # stores (4 int64 a thread): none when k_b = k, one when k <= N + 1024, and k far beyond N
    # (k = 100000, N = 5) is 98 coalesced stores, not a walk in steps of a small BLOCK_S.
    # Trip count and offsets in int64: k may be up to 2^31 - 1, where int32 would wrap.
    pad = tl.arange(0, PAD_BLOCK)
    for i in range(0, _padding_trips(k, k_b)):
        at = pad.to(tl.int64) + k_b + i * PAD_BLOCK
        tl.store(row_out + at, tl.full([PAD_BLOCK], -1, tl.int64), mask=at < k)


@triton.jit
def _gram_select_kernel(
    visual_ptr, lengths_ptr, norm_ptr, scale_ptr, finite_ptr, key_ptr, counter_ptr,
    gram_ptr, iso_ptr, rank_ptr, state_ptr, order_ptr, out_ptr,
    N, D, k, alpha_hi, alpha_mid, alpha_lo, n_tiles,
    stride_vb, stride_vn, stride_vd, stride_l, stride_order,
    STORE_GRAM: tl.constexpr, NEED_ISO: tl.constexpr, PICK_ORDER: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, SCALE_OPERANDS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CORE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rt = pid // n_tiles
    ct = pid % n_tiles
    rows = rt * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = ct * BLOCK_G + tl.arange(0, BLOCK_G)
    r_ok = rows < N
    c_ok = cols < N
    n, k_b, k_core = _row_bounds(lengths_ptr, stride_l, b, N, k, alpha_hi, alpha_mid, alpha_lo, HAS_LENGTHS)
    stats_r = b * N + rows
    stats_c = b * N + cols
    partial = (b * n_tiles + ct) * N + rows

    if STORE_GRAM or NEED_ISO:
        if rt <= ct:
            # Half the tiles do the dot: (rt, ct) with rt <= ct computes V_r V_cᵀ once and fills its
            # mirror (ct, rt) too, so the Gram is symmetric bit for bit (cos(i, j) and cos(j, i) are
            # the same division) and exact ties between duplicates stay ties; a diagonal tile takes
            # its lower triangle from its upper one (the dot need not be symmetric itself).
            v_b = visual_ptr + b * stride_vb
            scale_r = tl.load(scale_ptr + stats_r, mask=r_ok, other=1.0)
            scale_c = tl.load(scale_ptr + stats_c, mask=c_ok, other=1.0)
            # A tile whose tokens all lie in the raw band (spec: every model's features) takes
            # the dot of the tokens as given, then the exact power-of-two scales; only a tile
            # holding a token outside it scales the operands in the loop. Scaling an operand
            # there costs a trip through registers every step: the step's tensor-core dot must
            # then wait for that copy (no overlap with the next), where raw operands go from
            # the asynchronous copies to the tensor cores directly.
            raw = tl.min(in_raw_band(scale_r).to(tl.int32), 0) * tl.min(in_raw_band(scale_c).to(tl.int32), 0)
            if (not SCALE_OPERANDS) or (raw != 0):
                acc = _tile_dot(v_b, rows, cols, r_ok, c_ok, scale_r, scale_c, D, stride_vn, stride_vd,
                                False, DOT_UPCAST, DOT_PRECISION, BLOCK_G, BLOCK_D)
                acc = acc * scale_r[:, None] * scale_c[None, :]
            else:
                acc = _tile_dot(v_b, rows, cols, r_ok, c_ok, scale_r, scale_c, D, stride_vn, stride_vd,
                                True, DOT_UPCAST, DOT_PRECISION, BLOCK_G, BLOCK_D)
            local = tl.arange(0, BLOCK_G)
            acc = tl.where((rt < ct) | (local[:, None] <= local[None, :]), acc, tl.trans(acc))
            norm_r = tl.load(norm_ptr + stats_r, mask=r_ok, other=1.0)
            norm_c = tl.load(norm_ptr + stats_c, mask=c_ok, other=1.0)
            fin_r = tl.load(finite_ptr + stats_r, mask=r_ok, other=1) != 0
            fin_c = tl.load(finite_ptr + stats_c, mask=c_ok, other=1) != 0
            cos = tl.div_rn(acc, norm_r[:, None] * norm_c[None, :])
            mirror = rt < ct
            if STORE_GRAM:
                both_ok = r_ok[:, None] & c_ok[None, :]
                m = tl.where(fin_c[None, :], tl.where(fin_r[:, None], cos, 0.0), 2.0)
                tl.store(gram_ptr + (b * N + rows.to(tl.int64))[:, None] * N + cols[None, :], m, mask=both_ok)
                if mirror:  # M[c, r]: token r's similarity to pick c, stored along r
                    m_t = tl.trans(tl.where(fin_r[:, None], tl.where(fin_c[None, :], cos, 0.0), 2.0))
                    tl.store(gram_ptr + (b * N + cols.to(tl.int64))[:, None] * N + rows[None, :], m_t,
                             mask=c_ok[:, None] & r_ok[None, :])
            if NEED_ISO:
                usable_c = (cols < n) & fin_c
                others = usable_c[None, :] & (rows[:, None] != cols[None, :])
                tl.store(iso_ptr + partial, tl.max(tl.where(others, cos, float("-inf")), 1), mask=r_ok)
                if mirror:  # the mirror tile's partial: columns' maxima over usable rows
                    usable_r = (rows < n) & fin_r
                    tl.store(iso_ptr + (b * n_tiles + rt) * N + cols,
                             tl.max(tl.where(usable_r[:, None], cos, float("-inf")), 0), mask=c_ok)

    key_r = tl.load(key_ptr + stats_r, mask=r_ok, other=0)
    key_c = tl.load(key_ptr + stats_c, mask=c_ok, other=-INT64_MAX - 1)
    tl.store(rank_ptr + partial, tl.sum((key_c[None, :] > key_r[:, None]).to(tl.int32), 1), mask=r_ok)

    tl.debug_barrier()  # every thread's stores precede the release below
    arrived = tl.atomic_add(counter_ptr + b, 1, sem="acq_rel", scope="gpu")
    if arrived == n_tiles * n_tiles - 1:
        _select_row(b, n, k_b, k_core, N, D, k, stride_order, n_tiles,
                    visual_ptr, norm_ptr, scale_ptr, finite_ptr, gram_ptr, iso_ptr, rank_ptr, state_ptr, order_ptr,
                    out_ptr,
                    stride_vb, stride_vn, stride_vd,
                    STORE_GRAM, NEED_ISO, PICK_ORDER, BLOCK_S, BLOCK_D, CORE_BLOCK)


def launch_gram_select(visual, lengths, stats, scratch, order, out, k, core_ratio, pick_order, plan):
    """The single selection launch; ``stats`` and ``scratch`` come from :mod:`.select`."""
    B, N, D = visual.shape
    norm, scale, finite, key, counter = stats
    gram, iso, rank, state = scratch
    grid = (plan.tiles * plan.tiles, B)
    _gram_select_kernel[grid](
        visual, visual if lengths is None else lengths, norm, scale, finite, key, counter,
        gram, iso, rank, state, order, out,
        N, D, k, *split_fp64(core_ratio), plan.tiles,
        *visual.stride(), 0 if lengths is None else lengths.stride(0), order.stride(0),
        STORE_GRAM=plan.path == "gram", NEED_ISO=plan.need_isolation, PICK_ORDER=pick_order,
        HAS_LENGTHS=lengths is not None, DOT_PRECISION=plan.dot_precision, DOT_UPCAST=plan.dot_upcast,
        SCALE_OPERANDS=plan.scale_operands, BLOCK_G=plan.block_tile, BLOCK_D=plan.block_d, BLOCK_S=plan.block_select, CORE_BLOCK=plan.core_block,
        num_warps=plan.num_warps_tile, num_stages=plan.num_stages_tile,
        enable_fp_fusion=FP_FUSION,
    )
