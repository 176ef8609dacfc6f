"""Triton kernels of ``select_regions``: parallel scores, radix select of the band per row, parallel compaction.

Only ``@triton.jit`` functions live here; validation, allocation and launch are in ``ops.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lowbias32(x):
    """The "lowbias32" integer hash of uint32 values (multiplications wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _region_scores(
    x_ptr,
    prev_ptr,
    b,
    tok,
    tok_ok,
    stride_x_b,
    stride_x_c,
    stride_x_t,
    stride_x_h,
    stride_x_w,
    stride_prev_b,
    stride_prev_c,
    stride_prev_t,
    stride_prev_h,
    stride_prev_w,
    C,
    HT,
    WT,
    PT: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    PV2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    L2: tl.constexpr,
    DELTA: tl.constexpr,
    C_BLOCK: tl.constexpr,
):
    """R [BLOCK_T] fp32 of the tokens ``tok`` of sample ``b`` (metric std or l2, or with DELTA (and L2) the change
    d of metric delta before its carry-over; see ``region_keys_kernel``)."""
    row = tok // WT  # tt * HT + th
    tt = row // HT
    th = row - tt * HT
    tw = tok - row * WT
    sub = tl.arange(0, PV2)
    t = tt[:, None] * PT + (sub // (PH * PW))[None, :]
    h = th[:, None] * PH + ((sub // PW) % PH)[None, :]
    w = tw[:, None] * PW + (sub % PW)[None, :]
    pix_ok = tok_ok[:, None] & (sub < PT * PH * PW)[None, :]
    pix_ptr = (
        x_ptr + b * stride_x_b + t.to(tl.int64) * stride_x_t + h.to(tl.int64) * stride_x_h + w.to(tl.int64) * stride_x_w
    )
    if DELTA:
        prev_pix_ptr = (
            prev_ptr
            + b * stride_prev_b
            + t.to(tl.int64) * stride_prev_t
            + h.to(tl.int64) * stride_prev_h
            + w.to(tl.int64) * stride_prev_w
        )

    # Channels run in registers: C_BLOCK unrolled loads per pixel are in flight together and the channel sums
    # need no cross-thread reduction. std is two-pass (mean, then squared deviations; the second pass re-reads
    # from L1), as accurate as torch's.
    acc = tl.zeros((BLOCK_T, PV2), dtype=tl.float32)
    zero = tl.zeros((), dtype=tl.int32)  # keeps the channel number a tensor (the interpreter needs one)
    for c0 in range(0, C, C_BLOCK):
        for j in tl.static_range(C_BLOCK):
            c = zero + c0 + j
            ok = tl.where(c < C, pix_ok, False)
            v = tl.load(pix_ptr + c.to(tl.int64) * stride_x_c, mask=ok, other=0.0).to(tl.float32)
            if DELTA:
                v -= tl.load(prev_pix_ptr + c.to(tl.int64) * stride_prev_c, mask=ok, other=0.0).to(tl.float32)
            acc += v * v if L2 else v
    if L2:
        s = tl.sqrt_rn(acc)
    else:
        mean = tl.div_rn(acc, tl.full((BLOCK_T, PV2), 0, tl.float32) + C.to(tl.float32))
        m2 = tl.zeros((BLOCK_T, PV2), dtype=tl.float32)
        for c0 in range(0, C, C_BLOCK):
            for j in tl.static_range(C_BLOCK):
                c = zero + c0 + j
                ok = tl.where(c < C, pix_ok, False)
                v = tl.load(pix_ptr + c.to(tl.int64) * stride_x_c, mask=ok, other=0.0).to(tl.float32)
                d = tl.where(ok, v - mean, 0.0)
                m2 += d * d
        s = tl.sqrt_rn(tl.div_rn(m2, tl.full((BLOCK_T, PV2), 0, tl.float32) + (C - 1).to(tl.float32)))
    s = tl.where(pix_ok, s, 0.0)
    prio = tl.div_rn(tl.sum(s, axis=1), tl.full((BLOCK_T,), PT * PH * PW, tl.float32))
    return prio


@triton.jit
def region_keys_kernel(
    keys_ptr,
    scores_ptr,
    x_ptr,
    prev_ptr,
    counters_ptr,
    seed_ptr,
    stride_keys_b,
    stride_scores_b,
    stride_scores_n,
    stride_x_b,
    stride_x_c,
    stride_x_t,
    stride_x_h,
    stride_x_w,
    stride_prev_b,
    stride_prev_c,
    stride_prev_t,
    stride_prev_h,
    stride_prev_w,
    stride_counters_b,
    stride_counters_n,
    C,
    N,
    HT,
    WT,
    signed_scale,
    PT: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    PV2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    L2: tl.constexpr,
    RANDOM: tl.constexpr,
    DELTA: tl.constexpr,
    ATTENTION: tl.constexpr,
    C_BLOCK: tl.constexpr,
    HAS_COUNTERS: tl.constexpr,
):
    """Order-preserving uint32 sort keys of the token priorities.

    x: [B, C, T, H, W] (fp32/bf16/fp16, any strides; an image is a view with T = 1); counters: [B, N] int32/int64
    starvation counts D (read only); keys: [B, N] int32 holding uint32 bit patterns (written). Tokens are (PT, PH, PW)
    patches in row-major (t, h, w) order over a (N / (HT * WT), HT, WT) token grid: token
    n = (tt * HT + th) * WT + tw covers voxels [PT*tt, PT*tt + PT) x [PH*th, PH*th + PH) x [PW*tw, PW*tw + PW).
    Per voxel s = unbiased channel std (fp32, two-pass) or, with L2, the channel L2 norm; R = mean of s over
    the patch; priority = R * exp(signed_scale * D) with signed_scale = +k (``reference`` mode) or -k
    (``paper``), or R alone without counters.
    key = bits(priority) | 0x80000000 for priority >= 0 and ~bits otherwise (ascending keys = ascending
    priorities); -0 is folded into +0 and every NaN maps to 0xFFFFFFFF, so NaNs rank last as in torch.sort.
    Grid: (cdiv(N, BLOCK_T), B); PV2 = next_pow2(PT * PH * PW) voxel slots per token; C_BLOCK channels unrolled.
    RANDOM (metric ``random``): x is not read; R = (H(v_b ^ n) >> 8) * 2**-24 with H = lowbias32 and
    v_b = H(lo ^ H(hi ^ H(b + 0x9E3779B9))), lo / hi the 32-bit halves of seed[0] (int64, read only here; the
    launcher increments it), as ``reference.random_scores``.
    DELTA (metric ``delta``, with L2): s is the channel L2 norm of x - prev (prev: the previous signal, x's shape,
    any strides), so R is the token's change d; where d == 0 exactly (the token was not recomputed) R is the token's
    entry of scores ([B, N] fp32, any strides) instead, and R is written back there (before the starvation factor),
    as ``reference.region_scores``.
    ATTENTION (metric ``attention``): x is not read; R is the token's entry of scores ([B, N] fp32, any strides; read
    only).
    """
    b = tl.program_id(1).to(tl.int64)
    # Token and voxel coordinates in int32 (N <= 2**21): a 64-bit division per element costs more than the loads.
    # The divisions by the grid sizes are per token; the per-voxel ones are by constants.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < N
    if RANDOM:
        s = tl.load(seed_ptr)
        lo = (s & 0xFFFFFFFF).to(tl.uint32)
        hi = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
        v = _lowbias32(lo ^ _lowbias32(hi ^ _lowbias32(b.to(tl.uint32) + 0x9E3779B9)))
        bits = _lowbias32(v ^ tok.to(tl.uint32))
        prio = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
    elif ATTENTION:
        prio = tl.load(scores_ptr + b * stride_scores_b + tok.to(tl.int64) * stride_scores_n, mask=tok_ok, other=0.0)
    else:
        prio = _region_scores(
            x_ptr,
            prev_ptr,
            b,
            tok,
            tok_ok,
            stride_x_b,
            stride_x_c,
            stride_x_t,
            stride_x_h,
            stride_x_w,
            stride_prev_b,
            stride_prev_c,
            stride_prev_t,
            stride_prev_h,
            stride_prev_w,
            C,
            HT,
            WT,
            PT,
            PH,
            PW,
            PV2,
            BLOCK_T,
            L2,
            DELTA,
            C_BLOCK,
        )
        if DELTA:
            # d == 0 only if every voxel equals the previous signal: a copied (not recomputed) token keeps its last
            # observed change. NaN != 0, so a NaN change is stored and ranks last, as a NaN score of any metric.
            s_ptr = scores_ptr + b * stride_scores_b + tok.to(tl.int64) * stride_scores_n
            prio = tl.where(prio == 0.0, tl.load(s_ptr, mask=tok_ok, other=0.0), prio)
            tl.store(s_ptr, prio, mask=tok_ok)

    if HAS_COUNTERS:
        d_ptr = counters_ptr + b * stride_counters_b + tok.to(tl.int64) * stride_counters_n
        d_cnt = tl.load(d_ptr, mask=tok_ok, other=0).to(tl.float32)
        # Same fp32 argument as the reference; exp in fp64 so the rounded factor matches torch's exp.
        arg = signed_scale * d_cnt
        prio = prio * tl.exp(arg.to(tl.float64)).to(tl.float32)

    prio = tl.where(prio == 0.0, 0.0, prio)
    bits = prio.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    key = tl.where(prio != prio, 0xFFFFFFFF, key)
    tl.store(keys_ptr + b * stride_keys_b + tok, key.to(tl.int32, bitcast=True), mask=tok_ok)


@triton.jit
def _radix_step(hist, t_lo, t_hi, r_lo, r_hi, same, shift, R: tl.constexpr):
    """One radix digit for both boundaries from a [2R] histogram of the keys matching their prefixes.

    Bins [0, R): digits of the keys matching the low boundary's prefix t_lo; [R, 2R): the high one's (empty while
    both prefixes agree, ``same``: then both boundaries read the first half). A bin lies wholly below a boundary
    iff its inclusive count is <= the boundary's remaining rank r: the digit is the number of such bins and r
    drops by their total. Returns the extended prefixes, ranks, ``same`` and the chosen buckets' sizes.
    """
    bins = tl.arange(0, 2 * R)
    lo_half = bins < R
    cum = tl.cumsum(hist, 0)
    base_hi = tl.where(same, 0, R)
    cum_hi = cum - tl.where(same, 0, tl.sum(tl.where(lo_half, hist, 0), 0))
    q_lo = lo_half & (cum <= r_lo)
    q_hi = (bins >= base_hi) & (bins < base_hi + R) & (cum_hi <= r_hi)
    # (rank drop << 10 | digit) for both boundaries in one int64 reduction.
    item = (hist.to(tl.int64) << 10) | 1
    packed = tl.sum(tl.where(q_lo, item, 0) + tl.where(q_hi, item << 32, 0), 0)
    d_lo = (packed & 1023).to(tl.int32)
    d_hi = ((packed >> 32) & 1023).to(tl.int32)
    size = tl.sum(
        tl.where(bins == d_lo, hist.to(tl.int64), 0) + tl.where(bins == base_hi + d_hi, hist.to(tl.int64) << 32, 0), 0
    )
    t_lo = t_lo | (d_lo.to(tl.uint32) << shift)
    t_hi = t_hi | (d_hi.to(tl.uint32) << shift)
    r_lo = r_lo - ((packed >> 10) & 0x3FFFFF).to(tl.int32)
    r_hi = r_hi - ((packed >> 42) & 0x3FFFFF).to(tl.int32)
    same = same & (d_lo == d_hi)
    return t_lo, t_hi, r_lo, r_hi, same, (size & 0xFFFFFFFF).to(tl.int32), (size >> 32).to(tl.int32)


@triton.jit
def _load_keys(key_row, idx, N):
    # Padding slots get the largest key: with their indices >= N they rank after every real token, so they never
    # reach the band (ranks < N) and need no further mask.
    return tl.load(key_row + idx, mask=idx < N, other=-1).to(tl.uint32, bitcast=True)


@triton.jit
def _digit_histogram(keys, decided, t_lo, t_hi, shift, R: tl.constexpr, mask):
    """The [2R] histogram _radix_step takes: the digit at ``shift`` of the keys (where ``mask``) whose decided bits
    match the low boundary's prefix (bins [0, R)) or the high one's (bins [R, 2R))."""
    head = keys & decided
    in_lo = head == t_lo
    in_hi = head == t_hi  # equals in_lo while the prefixes agree, so those keys are counted once
    digit = ((keys >> shift) & (R - 1)).to(tl.int32)
    return tl.histogram(tl.where(in_lo, digit, digit + R), 2 * R, mask=(in_lo | in_hi) & mask)


@triton.jit
def _store_bounds(s_row, t_lo, t_hi, r_lo, r_hi):
    """A row's [8] int32 scratch: (T_lo, T_hi, r_lo, r_hi, T_lo == T_hi), as band_compact_kernel reads it."""
    tl.store(s_row + 0, t_lo.to(tl.int32, bitcast=True))
    tl.store(s_row + 1, t_hi.to(tl.int32, bitcast=True))
    tl.store(s_row + 2, r_lo)
    tl.store(s_row + 3, r_hi)
    tl.store(s_row + 4, (t_lo == t_hi).to(tl.int32))


# K changes every step: the ranks must not specialise a compile (Triton would for 1 or multiples of 16).
@triton.jit(do_not_specialize=["rank_lo", "rank_hi"])
def band_bounds_kernel(
    state_ptr,
    keys_ptr,
    stride_state_b,
    stride_keys_b,
    N,
    rank_lo,
    rank_hi,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    BITS: tl.constexpr,
):
    """The keys at sorted ranks rank_lo and rank_hi of one row, and their ranks among equal keys.

    keys: [B, N] int32 (uint32 bit patterns from ``region_keys_kernel``); state: [B, 8] int32, written
    (T_lo, T_hi, r_lo, r_hi, T_lo == T_hi): T = the key at that rank when keys are sorted ascending with ties by
    index, r = its rank among the tokens keyed T. Grid: (B,); CHUNK * NUM_CHUNKS >= N (one chunk: the keys
    stay in registers across the passes; several: each pass re-reads them from L2).

    Radix select of both ranks at once, BITS bits per pass from the top, with a 2 * 2**BITS bin histogram per
    pass (``_radix_step``). It stops early once both chosen buckets hold a single key: that key is then read
    directly instead of finishing its remaining digits.
    """
    row = tl.program_id(0).to(tl.int64)
    key_row = keys_ptr + row * stride_keys_b
    offs = tl.arange(0, CHUNK)
    if NUM_CHUNKS == 1:
        keys_all = _load_keys(key_row, offs, N)

    R: tl.constexpr = 1 << BITS
    same = tl.full((), 1, tl.int1)  # both prefixes are still equal
    r_lo = rank_lo.to(tl.int32)
    r_hi = rank_hi.to(tl.int32)
    t_lo = tl.zeros((), dtype=tl.uint32)  # prefixes decided so far
    t_hi = tl.zeros((), dtype=tl.uint32)
    decided = tl.zeros((), dtype=tl.uint32)  # mask of the bits decided so far
    shift = tl.full((), 32, dtype=tl.uint32)
    unique = tl.full((), 0, tl.int1)
    while (shift > 0) & (~unique):
        shift -= BITS
        hist = tl.zeros((2 * R,), dtype=tl.int32)
        for c in range(NUM_CHUNKS):
            if NUM_CHUNKS == 1:
                keys = keys_all
            else:
                keys = _load_keys(key_row, c * CHUNK + offs, N)
            hist += _digit_histogram(keys, decided, t_lo, t_hi, shift, R, True)
        t_lo, t_hi, r_lo, r_hi, same, n_lo, n_hi = _radix_step(hist, t_lo, t_hi, r_lo, r_hi, same, shift, R)
        decided = decided | ((R - 1) << shift)
        unique = (n_lo == 1) & (n_hi == 1)

    if unique & (shift > 0):
        # Both buckets hold one key each (then r_lo = r_hi = 0): sum the keys under each prefix.
        found = tl.zeros((), dtype=tl.int64)
        for c in range(NUM_CHUNKS):
            if NUM_CHUNKS == 1:
                keys = keys_all
            else:
                keys = _load_keys(key_row, c * CHUNK + offs, N)
            head = keys & decided
            k64 = keys.to(tl.int64)
            found += tl.sum(tl.where(head == t_lo, k64, 0) + tl.where(head == t_hi, k64 << 32, 0), 0)
        t_lo = (found & 0xFFFFFFFF).to(tl.uint32)
        t_hi = (found >> 32).to(tl.uint32)

    _store_bounds(state_ptr + row * stride_state_b, t_lo, t_hi, r_lo, r_hi)


# The pass index and the ranks are runtime values: one compile serves every pass and every K.
@triton.jit(do_not_specialize=["rank_lo", "rank_hi", "pass_index"])
def band_pass_kernel(
    state_ptr,
    hist_ptr,
    keys_ptr,
    stride_state_b,
    stride_hist_b,
    stride_keys_b,
    N,
    rank_lo,
    rank_hi,
    pass_index,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass of band_bounds_kernel's radix select with each row split over programs (rows too long for one).

    hist: [B, 32 // BITS, 2 * 2**BITS] int32, zeroed before pass 0. Launched once per pass, pass_index = 0, 1, ...,
    32 // BITS - 1 with grid (cdiv(N, BLOCK), B): each program first replays the passes before its own from their
    completed histograms (every program derives the same prefixes and ranks), then adds its BLOCK keys' digit
    histogram into hist[:, pass_index] with atomics. A last launch with pass_index = 32 // BITS and grid (1, B)
    replays every pass and writes state as band_bounds_kernel does. No early stop: every digit is counted.
    """
    row = tl.program_id(1).to(tl.int64)
    R: tl.constexpr = 1 << BITS
    bins = tl.arange(0, 2 * R)
    h_row = hist_ptr + row * stride_hist_b
    same = tl.full((), 1, tl.int1)
    r_lo = rank_lo.to(tl.int32)
    r_hi = rank_hi.to(tl.int32)
    t_lo = tl.zeros((), dtype=tl.uint32)
    t_hi = tl.zeros((), dtype=tl.uint32)
    decided = tl.zeros((), dtype=tl.uint32)
    shift = tl.full((), 32, dtype=tl.uint32)
    for p in range(pass_index):
        shift -= BITS
        hist = tl.load(h_row + p * (2 * R) + bins)
        t_lo, t_hi, r_lo, r_hi, same, _, _ = _radix_step(hist, t_lo, t_hi, r_lo, r_hi, same, shift, R)
        decided = decided | ((R - 1) << shift)

    if shift > 0:
        shift -= BITS
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keys = _load_keys(keys_ptr + row * stride_keys_b, idx, N)
        hist = _digit_histogram(keys, decided, t_lo, t_hi, shift, R, idx < N)
        tl.atomic_add(h_row + pass_index * (2 * R) + bins, hist, mask=hist != 0)
    else:
        _store_bounds(state_ptr + row * stride_state_b, t_lo, t_hi, r_lo, r_hi)


@triton.jit(do_not_specialize=["stride_out_b"])
def band_compact_kernel(
    out_ptr,
    counters_ptr,
    keys_ptr,
    state_ptr,
    stride_out_b,
    stride_counters_b,
    stride_counters_n,
    stride_keys_b,
    stride_state_b,
    N,
    HAS_COUNTERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write the active tokens' indices in ascending order and count the dropped ones.

    keys: [B, N] int32; state: [B, 8] from ``band_bounds_kernel``; out: [B, K] int64 (K = active count, the
    row stride stays unspecialised since K changes every step); counters: [B, N] int32/int64, += 1 where dropped.
    Grid: (cdiv(N, BLOCK), B). Token t with e_lo(t) earlier tokens keyed T_lo (e_hi for T_hi) is active iff
        (key > T_lo or (key == T_lo and e_lo >= r_lo)) and (key < T_hi or (key == T_hi and e_hi <= r_hi)),
    and its output slot is the number of active tokens before it. One int64 prefix sum packs three 21-bit
    counts (keys strictly inside (T_lo, T_hi), keys == T_lo, keys == T_hi); a program first counts them over
    the blocks before its own (re-reading those keys, cheap next to a cross-program scan).
    """
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    key_row = keys_ptr + row * stride_keys_b
    s_row = state_ptr + row * stride_state_b
    t_lo = tl.load(s_row + 0).to(tl.uint32, bitcast=True)
    t_hi = tl.load(s_row + 1).to(tl.uint32, bitcast=True)
    r_lo = tl.load(s_row + 2)
    r_hi = tl.load(s_row + 3)
    same = tl.load(s_row + 4) != 0
    offs = tl.arange(0, BLOCK)

    acc = tl.zeros((BLOCK,), dtype=tl.int64)
    for start in range(0, pid * BLOCK, BLOCK):
        keys = tl.load(key_row + start + offs).to(tl.uint32, bitcast=True)
        acc += (
            ((keys > t_lo) & (keys < t_hi)).to(tl.int64)
            | ((keys == t_lo).to(tl.int64) << 21)
            | ((keys == t_hi).to(tl.int64) << 42)
        )
    carry = tl.sum(acc, 0)

    idx = pid * BLOCK + offs
    valid = idx < N
    keys = _load_keys(key_row, idx, N)
    eq_lo = keys == t_lo
    eq_hi = keys == t_hi
    mid = (keys > t_lo) & (keys < t_hi)
    flags = mid.to(tl.int64) | (eq_lo.to(tl.int64) << 21) | (eq_hi.to(tl.int64) << 42)
    before = carry + tl.cumsum(flags, 0) - flags
    n_mid = before & 0x1FFFFF
    e_lo = ((before >> 21) & 0x1FFFFF).to(tl.int32)
    e_hi = (before >> 42).to(tl.int32)
    lo_part = tl.maximum(e_lo - r_lo, 0)
    hi_part = tl.minimum(e_hi, r_hi + 1)
    active_diff = mid | (eq_lo & (e_lo >= r_lo)) | (eq_hi & (e_hi <= r_hi))
    active_same = eq_lo & (e_lo >= r_lo) & (e_lo <= r_hi)
    active = tl.where(same, active_same, active_diff)
    pos = tl.where(same, tl.minimum(lo_part, r_hi - r_lo + 1).to(tl.int64), n_mid + lo_part + hi_part)
    tl.store(out_ptr + row * stride_out_b + pos, idx.to(tl.int64), mask=active)
    if HAS_COUNTERS:
        cnt_ptrs = counters_ptr + row * stride_counters_b + idx.to(tl.int64) * stride_counters_n
        cnt = tl.load(cnt_ptrs, mask=valid, other=0)
        tl.store(cnt_ptrs, cnt + (~active).to(cnt.dtype), mask=valid)
