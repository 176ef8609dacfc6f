"""Triton kernels for attention over a refreshed K/V cache (only ``@triton.jit`` functions live here).

Layout of every [B, L, H, d] tensor: batch stride, row stride and head stride are passed; the last (d) stride is 1.
A head dimension that is not a power of two is handled as two power-of-two pieces, ``d = D0 + REST``
(e.g. 72 = 64 + 8): both pieces are separate ``tl.dot`` operands, so the padding costs at most 80/72 of the work
instead of the 128/72 of one padded block (see attn_fwd_kernel).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_active"])
def cache_write_kernel(
    k_cache_ptr,
    v_cache_ptr,
    k_new_ptr,
    v_new_ptr,
    idx_ptr,
    stride_k_cache_b,
    stride_k_cache_n,
    stride_k_cache_h,
    stride_v_cache_b,
    stride_v_cache_n,
    stride_v_cache_h,
    stride_k_new_b,
    stride_k_new_k,
    stride_k_new_h,
    stride_v_new_b,
    stride_v_new_k,
    stride_v_new_h,
    stride_idx_b,
    stride_idx_k,
    n_active,
    n_tokens,
    HEAD_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``k_cache[b, idx[b, j], h, :] = k_new[b, j, h, :]`` and the same for v, in place.

    k_new/v_new: [B, K, Hkv, d]; k_cache/v_cache: [B, N, Hkv, d]; idx: [B, K] int32/int64 (distinct per row).
    Grid: (cdiv(K, BLOCK_K), Hkv, B). Indices outside [0, N) are skipped (never written out of bounds).
    """
    pid_k = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs_k < n_active
    rows = tl.load(idx_ptr + b * stride_idx_b + offs_k * stride_idx_k, mask=ok, other=0).to(tl.int64)
    ok = ok & (rows >= 0) & (rows < n_tokens)
    offs_d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_src = k_new_ptr + b * stride_k_new_b + h * stride_k_new_h + offs_k[:, None] * stride_k_new_k
    k_dst = k_cache_ptr + b * stride_k_cache_b + h * stride_k_cache_h + rows[:, None] * stride_k_cache_n
    tl.store(k_dst + offs_d[None, :], tl.load(k_src + offs_d[None, :], mask=m2), mask=m2)
    v_src = v_new_ptr + b * stride_v_new_b + h * stride_v_new_h + offs_k[:, None] * stride_v_new_k
    v_dst = v_cache_ptr + b * stride_v_cache_b + h * stride_v_cache_h + rows[:, None] * stride_v_cache_n
    tl.store(v_dst + offs_d[None, :], tl.load(v_src + offs_d[None, :], mask=m2), mask=m2)


@triton.jit
def _softmax_update(qk, m_i, l_i, key_ok, qk_scale, MASKED: tl.constexpr, GUARD: tl.constexpr):
    """The online-softmax step of one key tile's raw scores ``qk`` [BM, BN] (log2 domain): returns the tile's
    probabilities p (against the new running max), the factor alpha that rescales the accumulator, and the updated
    running max and sum (m_new, l_i). When MASKED, keys outside ``key_ok`` [BN] get a score of -inf; GUARD protects
    rows that have seen no visible key yet (m_i = -inf), which only happens when whole tiles can be masked."""
    if MASKED:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if GUARD:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attn_tile(
    acc0,
    acc1,
    m_i,
    l_i,
    q0,
    q1,
    k_ptrs0,
    k_ptrs1,
    v_ptrs0,
    v_ptrs1,
    ks_ptrs,
    vs_ptrs,
    key_ok,
    qk_scale,
    SPLIT: tl.constexpr,
    MASKED: tl.constexpr,
    GUARD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SCALED: tl.constexpr,
):
    """One key tile of the online softmax (log2 domain): returns the updated (acc0, acc1, m_i, l_i).

    q0 [BM, D0], q1 [BM, D1]; the pointer blocks address [BN, D0] / [BN, D1] of K and [BN, D0] / [BN, DV1] of V.
    K/V loads are never masked (the caller points every row of the tile at an existing key row); MASKED, GUARD:
    see _softmax_update. SCALED: K and V are fp8 rows
    times the fp32 row scales at ``ks_ptrs`` / ``vs_ptrs`` [BN]: the tiles are converted to q's dtype for the
    dots, the K scales multiply the scores and the V scales the probabilities (a per-key factor commutes with
    both dots).
    """
    k0 = tl.load(k_ptrs0)
    if SCALED:
        k0 = k0.to(q0.dtype)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
    if SPLIT:
        k1 = tl.load(k_ptrs1)
        if SCALED:
            k1 = k1.to(q1.dtype)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
    if SCALED:
        qk = qk * tl.load(ks_ptrs)[None, :]
    p, alpha, m_new, l_i = _softmax_update(qk, m_i, l_i, key_ok, qk_scale, MASKED, GUARD)
    v0 = tl.load(v_ptrs0)
    if SCALED:
        v0 = v0.to(q0.dtype)
        p = p * tl.load(vs_ptrs)[None, :]
    p = p.to(v0.dtype)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
    if SPLIT:
        v1 = tl.load(v_ptrs1)
        if SCALED:
            v1 = v1.to(q0.dtype)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attn_masked_rows(
    acc0,
    acc1,
    m_i,
    l_i,
    q0,
    q1,
    k_base,
    v_base,
    ks_base,
    vs_base,
    stride_k_n,
    stride_v_n,
    stride_ks_n,
    stride_vs_n,
    mask_base,
    stride_mask_t,
    lo,
    hi,
    qk_scale,
    cols0,
    cols_k1,
    cols_v1,
    SPLIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key rows lo..hi-1 of one segment (k_base/v_base, and with SCALED the row scales ks_base/vs_base, point at
    its row 0), in tiles whose rows past ``hi`` are clamped to row hi - 1 (loads stay unmasked, see attn_fwd_kernel)
    and get a score of -inf; with HAS_MASK the uint8 key mask at ``mask_base + row * stride_mask_t`` hides keys
    too. Returns the updated (acc0, acc1, m_i, l_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        rel = tl.minimum(offs_n, hi - 1 - start)
        row0 = tl.cast(start, tl.int64)
        k_t = k_base + row0 * stride_k_n + tl.multiple_of(rel * stride_k_n, 8)[:, None]
        v_t = v_base + row0 * stride_v_n + tl.multiple_of(rel * stride_v_n, 8)[:, None]
        key_ok = offs_n < hi - start
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_base + (row0 + offs_n) * stride_mask_t, mask=key_ok, other=0) != 0)
        acc0, acc1, m_i, l_i = _attn_tile(
            acc0, acc1, m_i, l_i, q0, q1,
            k_t + cols0[None, :], k_t + cols_k1[None, :], v_t + cols0[None, :], v_t + cols_v1[None, :],
            ks_base + (row0 + rel) * stride_ks_n, vs_base + (row0 + rel) * stride_vs_n,
            key_ok, qk_scale, SPLIT, True, HAS_MASK, DOT_PREC, SCALED,
        )  # fmt: skip
    return acc0, acc1, m_i, l_i


@triton.jit(do_not_specialize=["lq", "lq_bucket"])
def attn_fwd_kernel(
    out_ptr,
    lse_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    k_extra_ptr,
    v_extra_ptr,
    mask_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_q_b,
    stride_q_l,
    stride_q_h,
    stride_k_b,
    stride_k_n,
    stride_k_h,
    stride_v_b,
    stride_v_n,
    stride_v_h,
    stride_k_extra_b,
    stride_k_extra_t,
    stride_k_extra_h,
    stride_v_extra_b,
    stride_v_extra_t,
    stride_v_extra_h,
    stride_mask_b,
    stride_mask_t,
    stride_k_scale_b,
    stride_k_scale_n,
    stride_k_scale_h,
    stride_v_scale_b,
    stride_v_scale_n,
    stride_v_scale_h,
    lq,
    lq_bucket,
    n_keys,
    n_extra,
    heads_q,
    group,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    DV1: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = softmax(q [k; k_extra]^T * scale) [v; v_extra], without concatenating the two key segments.

    q: [B, Lq, Hq, d]; k/v: [B, N, Hkv, d] (the cache, N = n_keys, may be 0); k_extra/v_extra: [B, T, Hkv, d]
    (T = n_extra, used when HAS_EXTRA); mask: [B, T] uint8, 0 hides that extra key from every query (HAS_MASK);
    out: [B, Lq, Hq, d] contiguous; lse: [B, Hq, Lq] fp32, natural log-sum-exp of the scaled scores (STORE_LSE).
    Query head h reads kv head h // group. qk_scale = scale * log2(e) (softmax computed with exp2).
    KV_FP8: k/v are float8_e4m3fn, row (b, n, h) of each standing for its values times k_scale / v_scale [B, N, Hkv]
    fp32 (the extra rows stay in q's dtype).
    Head dim d = D0 + REST, D0 a power of two, REST = 0 or a power of two >= 8 (SPLIT when REST > 0):
    scores = q[:, :D0] k[:, :D0]^T + q1 k[:, d-D1:]^T, where the D1 = max(REST, 16)-wide window q1 is q[:, d-D1:]
    with the columns it shares with the first piece zeroed (a dot needs K >= 16, and the window stays inside the
    row, so no column mask); the output's last REST columns come from a DV1 = REST-wide PV dot (N = 8 is allowed).
    A query row that sees no key at all gets out = 0 and lse = -inf.
    Grid: (cdiv(Lq, BLOCK_M), B * Hq). ``lq_bucket`` is unused here: it is the autotuner's key.
    """
    REST: tl.constexpr = HEAD_DIM - D0
    OFF1: tl.constexpr = HEAD_DIM - D1
    # torch.compile (Inductor) passes a Python float as fp64: keep the softmax state and the accumulators fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = tl.arange(0, D1)
    offs_v1 = tl.arange(0, DV1)
    cols_k1 = OFF1 + offs_d1
    cols_v1 = D0 + offs_v1
    m_ok = offs_m < lq

    # No dot operand is ever loaded with a mask: rows past the end are clamped to the last row (their output is
    # never stored, their scores are -inf). Masked K/V tiles made triton 3.6 on sm_90 stage the operands through
    # register -> shared copies whose buffers alias (the tail-tile K0/K1/V0/V1 tiles all at one offset), which
    # gave wrong values in the narrow second piece and illegal shared-memory reads (compute-sanitizer, H200).
    # Unmasked loads keep every K/V tile on the cp.async pipeline, the path the full tiles take.
    # Every batch/row/head stride is a multiple of 8 elements (the launcher guarantees it): the hints let the
    # compiler use 16-byte vector loads and cp.async when a stride (e.g. d = 72) is not a multiple of 16, the
    # only divisibility Triton infers by itself.
    rows_q = tl.minimum(offs_m, lq - 1)
    q_off = tl.multiple_of(b * stride_q_b + h * stride_q_h, 8)
    k_off = tl.multiple_of(b * stride_k_b + hk * stride_k_h, 8)
    v_off = tl.multiple_of(b * stride_v_b + hk * stride_v_h, 8)
    q_base = q_ptr + q_off + tl.multiple_of(rows_q * stride_q_l, 8)[:, None]
    q0 = tl.load(q_base + offs_d0[None, :])
    q1 = q0
    if SPLIT:
        q1 = tl.load(q_base + cols_k1[None, :])
        if D1 > REST:
            q1 = tl.where((offs_d1 >= D1 - REST)[None, :], q1, 0.0).to(q0.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, DV1], dtype=tl.float32)

    # Segment 1: the cache rows 0..N-1; full tiles with no mask at all, then the tail rows (one clamped tile).
    k_base = k_ptr + k_off
    v_base = v_ptr + v_off
    rows_k = tl.multiple_of(offs_n * stride_k_n, 8)[:, None]
    rows_v = tl.multiple_of(offs_n * stride_v_n, 8)[:, None]
    k_ptrs0 = k_base + rows_k + offs_d0[None, :]
    v_ptrs0 = v_base + rows_v + offs_d0[None, :]
    k_ptrs1 = k_base + rows_k + cols_k1[None, :]
    v_ptrs1 = v_base + rows_v + cols_v1[None, :]
    ks_base = k_scale_ptr + b * stride_k_scale_b + hk * stride_k_scale_h
    vs_base = v_scale_ptr + b * stride_v_scale_b + hk * stride_v_scale_h
    ks_ptrs = ks_base + offs_n * stride_k_scale_n
    vs_ptrs = vs_base + offs_n * stride_v_scale_n
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for _start in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _attn_tile(
            acc0, acc1, m_i, l_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, ks_ptrs, vs_ptrs, m_ok, qk_scale,
            SPLIT, False, False, DOT_PREC, KV_FP8,
        )  # fmt: skip
        k_ptrs0 += BLOCK_N * stride_k_n
        k_ptrs1 += BLOCK_N * stride_k_n
        v_ptrs0 += BLOCK_N * stride_v_n
        v_ptrs1 += BLOCK_N * stride_v_n
        ks_ptrs += BLOCK_N * stride_k_scale_n
        vs_ptrs += BLOCK_N * stride_v_scale_n
    acc0, acc1, m_i, l_i = _attn_masked_rows(
        acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, ks_base, vs_base, stride_k_n, stride_v_n, stride_k_scale_n,
        stride_v_scale_n, mask_ptr, 0, n_full, n_keys, qk_scale, offs_d0, cols_k1, cols_v1, SPLIT, False, DOT_PREC,
        KV_FP8, BLOCK_N,
    )  # fmt: skip

    # Segment 2: the extra rows (text / caption keys), every tile masked (bounds and the optional key mask).
    if HAS_EXTRA:
        k_extra_base = k_extra_ptr + tl.multiple_of(b * stride_k_extra_b + hk * stride_k_extra_h, 8)
        v_extra_base = v_extra_ptr + tl.multiple_of(b * stride_v_extra_b + hk * stride_v_extra_h, 8)
        acc0, acc1, m_i, l_i = _attn_masked_rows(
            acc0, acc1, m_i, l_i, q0, q1, k_extra_base, v_extra_base, ks_base, vs_base, stride_k_extra_t,
            stride_v_extra_t, 0, 0, mask_ptr + b * stride_mask_b, stride_mask_t, 0, n_extra, qk_scale, offs_d0,
            cols_k1, cols_v1, SPLIT, HAS_MASK, DOT_PREC, False, BLOCK_N,
        )  # fmt: skip

    # Epilogue: normalise (a row with no visible key keeps acc = 0), store out and the natural-log LSE.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    stride_out_l = heads_q * HEAD_DIM
    out_base = out_ptr + tl.multiple_of(b * lq * stride_out_l + h * HEAD_DIM, 8) + offs_m[:, None] * stride_out_l
    tl.store(out_base + offs_d0[None, :], (acc0 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
    if SPLIT:
        tl.store(out_base + cols_v1[None, :], (acc1 / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + pid_bh * lq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_tma_tile(
    acc,
    acc1,
    m_i,
    l_i,
    q,
    q1,
    k_desc,
    v_desc,
    k1_desc,
    v1_desc,
    b,
    row,
    hk,
    key_ok,
    qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    GUARD: tl.constexpr,
):
    """One key tile of the online softmax (log2 domain) for attn_fwd_tma_kernel: the [BLOCK_N, D0] K and V tiles
    at rows row.. of kv head hk in batch b, read through their descriptors (rows past the tensor come back as
    zeros), and when D1 > 0 the [BLOCK_N, D1] tiles of the columns from D0 on (q1, acc1: that piece of q and of the
    output). MASKED, GUARD: see _softmax_update. Returns the updated (acc, acc1, m_i, l_i)."""
    k = k_desc.load([b, row, hk, 0]).reshape(BLOCK_N, D0)
    qk = tl.dot(q, tl.trans(k))
    if D1 > 0:
        k1 = k1_desc.load([b, row, hk, D0]).reshape(BLOCK_N, D1)
        qk = tl.dot(q1, tl.trans(k1), qk)
    p, alpha, m_new, l_i = _softmax_update(qk, m_i, l_i, key_ok, qk_scale, MASKED, GUARD)
    v = v_desc.load([b, row, hk, 0]).reshape(BLOCK_N, D0)
    p = p.to(v.dtype)
    acc = tl.dot(p, v, acc * alpha[:, None])
    if D1 > 0:
        v1 = v1_desc.load([b, row, hk, D0]).reshape(BLOCK_N, D1)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
    return acc, acc1, m_new, l_i


@triton.jit(do_not_specialize=["lq", "n_keys", "n_extra"])  # a new K (Lq) or cache length: no recompile
def attn_fwd_tma_kernel(
    out_desc,
    out1_desc,
    lse_ptr,
    q_desc,
    q1_desc,
    k_desc,
    k1_desc,
    v_desc,
    v1_desc,
    k_extra_desc,
    k1_extra_desc,
    v_extra_desc,
    v1_extra_desc,
    mask_ptr,
    stride_mask_b,
    stride_mask_t,
    lq,
    n_keys,
    n_extra,
    heads_q,
    group,
    qk_scale,
    D0: tl.constexpr,
    D1: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """The op of attn_fwd_kernel for Hopper (RAS_ATTENTION=hopper): head dims 64, 72 and 128, 16-bit q / k / v.

    Every [B, L, H, d] tensor is read (and out written) through host-side 4-D tensor descriptors (TMA on sm_90):
    no pointer arithmetic, rows and columns past the tensor come back as zeros and are not stored. Head dim
    d = D0 + rest: the ``*_desc`` descriptors have block [1, rows, 1, D0] (columns 0..D0); when D1 > 0 (d = 72:
    D0 = 64, D1 = 16) the ``*1_desc`` ones have block [1, rows, 1, D1] at column D0, whose columns past d load as
    zeros (they add nothing to a score or an output column) and are clipped on the store; with D1 = 0 they are
    never read. The cache's full key tiles run in one ``tl.range`` loop that Triton pipelines (NUM_STAGES) and
    may warp-specialise (WARP_SPECIALIZE: producer warps issue the loads, consumer warps the dots and the softmax);
    then its tail tile and the extra rows, masked (bounds, and the uint8 key mask when HAS_MASK). lse, query head
    mapping (h reads kv head h // group), qk_scale (scale * log2(e)) and the grid (cdiv(Lq, BLOCK_M), B * Hq) are
    as in attn_fwd_kernel; out [B, Lq, Hq, d] contiguous, lse [B, Hq, Lq] fp32 (STORE_LSE).
    """
    W1: tl.constexpr = D1 if D1 > 0 else 16  # the width of q1 / acc1, unused placeholders when D1 == 0
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes a Python float as fp64 (see attn_fwd_kernel)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    row_m = pid_m * BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([b, row_m, h, 0]).reshape(BLOCK_M, D0)
    q1 = tl.zeros([BLOCK_M, W1], dtype=q.dtype)
    if D1 > 0:
        q1 = q1_desc.load([b, row_m, h, D0]).reshape(BLOCK_M, D1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, W1], dtype=tl.float32)
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
        acc, acc1, m_i, l_i = _attn_tma_tile(
            acc, acc1, m_i, l_i, q, q1, k_desc, v_desc, k1_desc, v1_desc, b, start, hk, offs_n, qk_scale,
            D0, D1, BLOCK_N, False, False,
        )  # fmt: skip
    if D1 > 0:
        # The cache's partial last tile in a loop (of at most one trip) that Triton pipelines like the extra keys'
        # loop: loaded outside a pipelined loop, the D1-wide tiles came out wrong on Triton 3.6 (session 19, H200).
        # Head dims without D1 keep the straight-line tile: the loop form does not compile with their
        # warp-specialised 4-warp default (see ops.hopper_candidates).
        for start in range(n_full, n_keys, BLOCK_N):
            acc, acc1, m_i, l_i = _attn_tma_tile(
                acc, acc1, m_i, l_i, q, q1, k_desc, v_desc, k1_desc, v1_desc, b, start, hk, offs_n < n_keys - start,
                qk_scale, D0, D1, BLOCK_N, True, False,
            )  # fmt: skip
    elif n_full < n_keys:
        acc, acc1, m_i, l_i = _attn_tma_tile(
            acc, acc1, m_i, l_i, q, q1, k_desc, v_desc, k1_desc, v1_desc, b, n_full, hk, offs_n < n_keys - n_full,
            qk_scale, D0, D1, BLOCK_N, True, False,
        )  # fmt: skip
    if HAS_EXTRA:
        mask_base = mask_ptr + tl.cast(b, tl.int64) * stride_mask_b
        for start in range(0, n_extra, BLOCK_N):
            key_ok = offs_n < n_extra - start
            if HAS_MASK:
                rows = tl.cast(start, tl.int64) + offs_n
                key_ok = key_ok & (tl.load(mask_base + rows * stride_mask_t, mask=key_ok, other=0) != 0)
            acc, acc1, m_i, l_i = _attn_tma_tile(
                acc, acc1, m_i, l_i, q, q1, k_extra_desc, v_extra_desc, k1_extra_desc, v1_extra_desc, b, start, hk,
                key_ok, qk_scale, D0, D1, BLOCK_N, True, HAS_MASK,
            )  # fmt: skip

    # Epilogue: normalise (a row with no visible key keeps acc = 0), store out (rows past Lq are clipped) and lse.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(out_desc.dtype)
    out_desc.store([b, row_m, h, 0], out.reshape(1, BLOCK_M, 1, D0))
    if D1 > 0:
        out1 = (acc1 / l_safe[:, None]).to(out_desc.dtype)
        out1_desc.store([b, row_m, h, D0], out1.reshape(1, BLOCK_M, 1, D1))
    if STORE_LSE:
        offs_m = row_m + tl.arange(0, BLOCK_M)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + tl.cast(pid_bh, tl.int64) * lq + offs_m, lse, mask=offs_m < lq)
