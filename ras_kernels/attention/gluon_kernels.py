"""Gluon kernels for the cached-K/V attention on Hopper (only ``@gluon.jit`` functions live here).

The Hopper path of the op (RAS_ATTENTION=hopper, and ``auto`` on sm_90) at head dims 64, 72 and 128 with 16-bit q /
k / v and no key mask. Written in Gluon (``triton.experimental.gluon``, Triton 3.6+) rather than Triton because the
schedule needs what Triton's compiler does not give this loop on sm_90 (docs/benchmarks.md, session 21: compiled by
Triton 3.6, the Triton TMA kernel waits for every score GEMM right after issuing it, its ``warp_specialize`` loop is
not partitioned, and an 8-warp CTA's warpgroups meet at a ``bar.sync`` before every TMA load): asynchronous wgmma
with a wait that leaves the PV GEMM in flight under the softmax, and FlashAttention-3's warp specialisation: two
consumer warpgroups sharing the K / V rings, fed by one loader warp through ready / empty mbarriers.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global; later releases
# async_load / async_store.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

ROWS = gl.constexpr(64)  # query rows per consumer warpgroup (one m64 wgmma row block); a CTA has two


@gluon.jit
def _load_tile(desc, extra_desc, desc1, extra_desc1, smem, smem1, bars, b, hk, tile, n_cache_tiles, n_tiles,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_EXTRA: gl.constexpr, D0: gl.constexpr,
               D1: gl.constexpr):  # fmt: skip
    """Start the TMA load of key tile ``tile`` (a cache tile below n_cache_tiles, then the extra rows' tiles) into
    ring slot tile % STAGES, arming that slot's barrier; nothing past the last tile. With D1, columns D0..D0+D1 go
    to the second ring (smem1) under the same barrier."""
    slot = tile % STAGES
    ok = tile < n_tiles
    bar = bars.index(slot)
    in_cache = ok & (tile < n_cache_tiles)
    in_extra = ok & (tile >= n_cache_tiles)
    row = (tile - n_cache_tiles) * BLOCK_N
    if D1 > 0:
        mbarrier.expect(bar, desc.block_type.nbytes + desc1.block_type.nbytes, pred=ok)
        _tma_load(desc1, [b, tile * BLOCK_N, hk, D0], bar, smem1.index(slot), pred=in_cache)
        if HAS_EXTRA:
            _tma_load(extra_desc1, [b, row, hk, D0], bar, smem1.index(slot), pred=in_extra)
    else:
        mbarrier.expect(bar, desc.block_type.nbytes, pred=ok)
    _tma_load(desc, [b, tile * BLOCK_N, hk, 0], bar, smem.index(slot), pred=in_cache)
    if HAS_EXTRA:
        _tma_load(extra_desc, [b, row, hk, 0], bar, smem.index(slot), pred=in_extra)


@gluon.jit
def _tail_scores(s, tile, n_cache_tiles, n_keys, n_extra, offs_n, BLOCK_N: gl.constexpr):
    """The scores of key tile ``tile`` with the keys past its segment's end (cache rows, then extra rows) at -inf."""
    in_cache = tile < n_cache_tiles
    limit = gl.where(in_cache, n_keys, n_extra) - gl.where(in_cache, tile, tile - n_cache_tiles) * BLOCK_N
    if limit < BLOCK_N:
        s = gl.where((offs_n < limit)[None, :], s, float("-inf"))
    return s


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale):
    """Online softmax (log2 domain) of one tile's raw scores: (p, alpha, new running max, new running sum). Every
    tile has at least one key, so the new max is finite."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _load_ring(k_desc, v_desc, k_extra_desc, v_extra_desc, k1_desc, v1_desc, k1_extra_desc, v1_extra_desc, k_smem,
               v_smem, k1_smem, v1_smem, k_ready, v_ready, k_empty, v_empty, b, hk, n_keys, n_extra,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_EXTRA: gl.constexpr, D0: gl.constexpr,
               D1: gl.constexpr):  # fmt: skip
    """The loader partition (one warp) of the warp-specialised kernel: every key tile's K and V into the rings, each
    slot once both consumer warpgroups have released its previous tile."""
    n_cache_tiles = gl.cdiv(n_keys, BLOCK_N)
    n_tiles = n_cache_tiles + gl.cdiv(n_extra, BLOCK_N)
    for t in range(n_tiles):
        phase = ((t // STAGES) & 1) ^ 1  # the release of tile t - STAGES
        mbarrier.wait(k_empty.index(t % STAGES), phase, pred=t >= STAGES)
        _load_tile(k_desc, k_extra_desc, k1_desc, k1_extra_desc, k_smem, k1_smem, k_ready, b, hk, t,
                   n_cache_tiles, n_tiles, BLOCK_N, STAGES, HAS_EXTRA, D0, D1)  # fmt: skip
        mbarrier.wait(v_empty.index(t % STAGES), phase, pred=t >= STAGES)
        _load_tile(v_desc, v_extra_desc, v1_desc, v1_extra_desc, v_smem, v1_smem, v_ready, b, hk, t,
                   n_cache_tiles, n_tiles, BLOCK_N, STAGES, HAS_EXTRA, D0, D1)  # fmt: skip


@gluon.jit
def _attend_rows(q_desc, o_desc, q1_desc, o1_desc, lse_ptr, q_smem, q1_smem, q_bar, k_smem, v_smem, k1_smem,
                 v1_smem, k_ready, v_ready, k_empty, v_empty, b, h, pid_bh, row_m, lq, n_keys, n_extra, qk_scale,
                 store_lse, D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 Q_IN_REGS: gl.constexpr):  # fmt: skip
    """A consumer partition: one warpgroup's ROWS query rows from row_m, out and lse over every key tile in the
    rings (cache tiles, then extra tiles).

    Per key tile j: issue S_j = Q K_j^T; issue O += P_{j-1} V_{j-1}; wait for S_j only (``warpgroup_mma_wait``
    leaving the PV GEMMs in flight); release K_j's slot; softmax of S_j while the PV GEMM runs; wait for it; release
    V_{j-1}'s slot; rescale O by the new running max. A release is one arrive on the slot's empty barrier. Q_IN_REGS:
    the score GEMM reads Q from registers, so only K crosses shared memory per tile. With D1 the head dim is D0 + D1
    columns (D1 of them past the tensor's last one, zeros): S adds a second GEMM over the D1 columns, O is two
    accumulators (D0 and D1 wide), each with its own PV GEMM.
    """
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D0, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    n_cache_tiles = gl.cdiv(n_keys, BLOCK_N)
    n_tiles = n_cache_tiles + gl.cdiv(n_extra, BLOCK_N)
    q2 = q_smem.reshape([ROWS, D0])
    if D1 > 0:
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D1, 16]
        )
        p1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=2)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes + q1_desc.block_type.nbytes)
        _tma_load(q1_desc, [b, row_m, h, D0], q_bar, q1_smem)
        q1_2 = q1_smem.reshape([ROWS, D1])
        acc1 = gl.zeros([ROWS, D1], gl.float32, o1_layout)
    else:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, row_m, h, 0], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)
    q_op = q2
    if Q_IN_REGS:
        q_op = q2.load(q_layout)
    if D1 > 0:
        q1_op = q1_2
        if Q_IN_REGS:
            q1_op = q1_2.load(q_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([ROWS, D0], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))

    # Tile 0: its scores alone (acc is zero, nothing to overlap).
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_op, k_smem.index(0).reshape([BLOCK_N, D0]).permute((1, 0)), s_zero, use_acc=False)
    if D1 > 0:
        s = warpgroup_mma(q1_op, k1_smem.index(0).reshape([BLOCK_N, D1]).permute((1, 0)), s)
    mbarrier.arrive(k_empty.index(0), count=1)
    s = _tail_scores(s, 0, n_cache_tiles, n_keys, n_extra, offs_n, BLOCK_N)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    if D1 > 0:
        p1_op = gl.convert_layout(p.to(dtype), p1_layout)

    for j in range(1, n_tiles):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        k_t = k_smem.index(slot).reshape([BLOCK_N, D0]).permute((1, 0))
        s_tok = warpgroup_mma(q_op, k_t, s_zero, use_acc=False, is_async=True)
        if D1 > 0:
            k1_t = k1_smem.index(slot).reshape([BLOCK_N, D1]).permute((1, 0))
            s_tok = warpgroup_mma(q1_op, k1_t, s_tok, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        v_prev = v_smem.index(prev).reshape([BLOCK_N, D0])
        acc_tok = warpgroup_mma(p_op, v_prev, acc, is_async=True)
        if D1 > 0:
            v1_prev = v1_smem.index(prev).reshape([BLOCK_N, D1])
            acc1_tok = warpgroup_mma(p1_op, v1_prev, acc1, is_async=True)
            s = warpgroup_mma_wait(2, deps=[s_tok, q_op, q1_op, k_t, k1_t])[0]
        else:
            s = warpgroup_mma_wait(1, deps=[s_tok, q_op, k_t])[0]
        mbarrier.arrive(k_empty.index(slot), count=1)  # K_j's slot is free for the loader
        s = _tail_scores(s, j, n_cache_tiles, n_keys, n_extra, offs_n, BLOCK_N)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
        if D1 > 0:
            acc, acc1 = warpgroup_mma_wait(0, deps=[acc_tok, acc1_tok, p_op, p1_op, v_prev, v1_prev])[:2]
            acc1 = acc1 * gl.convert_layout(alpha, gl.SliceLayout(1, o1_layout))[:, None]
            p1_op = gl.convert_layout(p.to(dtype), p1_layout)
        else:
            acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v_prev])[0]
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, D0]), acc)

    # Epilogue: normalise (l_i >= 1: the running max's own term), store out through Q's buffers, and lse.
    q2.store((acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]).to(dtype))
    if D1 > 0:
        acc1 = warpgroup_mma(p1_op, v1_smem.index(last).reshape([BLOCK_N, D1]), acc1)
        q1_2.store((acc1 / gl.convert_layout(l_i, gl.SliceLayout(1, o1_layout))[:, None]).to(dtype))
    fence_async_shared()
    _tma_store(o_desc, [b, row_m, h, 0], q_smem)
    if D1 > 0:
        _tma_store(o1_desc, [b, row_m, h, D0], q1_smem)
    if store_lse:
        offs_m = row_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(lse_ptr + pid_bh.to(gl.int64) * lq + offs_m, lse, mask=offs_m < lq)
    tma.store_wait(0)


# Not specialised on Lq (a new K), the key counts or whether lse is stored: one compiled variant serves them all.
@gluon.jit(do_not_specialize=["lq", "n_keys", "n_extra", "store_lse"])
def attn_fwd_gluon_kernel(q_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, o_desc, q1_desc, k1_desc, v1_desc,
                          k1_extra_desc, v1_extra_desc, o1_desc, lse_ptr, lq, n_keys, n_extra, heads_q, group,
                          qk_scale, store_lse, D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, Q_IN_REGS: gl.constexpr, HAS_EXTRA: gl.constexpr):  # fmt: skip
    """The op of attn_fwd_tma_kernel, 16-bit: out = softmax(q k^T * scale) v over the cache rows then the extra rows
    (no key mask: masked calls take attn_fwd_tma_kernel), and lse.

    Every [B, L, H, d] tensor is read (and out written) through host-side 4-D tensor descriptors: blocks [1, ROWS,
    1, D0] for q and out, [1, BLOCK_N, 1, D0] for k, v and the extra rows (rows past a tensor load as zeros and are
    not stored). The head dim d is D0 (D1 = 0; 64 or 128) or, as attn_fwd_tma_kernel splits it, D0 + D1 with d < D0
    + D1 (72 as 64 + 16): the *1 descriptors' D1-wide blocks read columns D0..D0+D1 (the ones past d as zeros, not
    stored); with D1 = 0 they are placeholders, never read. Query head h reads kv head h // group; qk_scale = scale
    * log2(e); where store_lse (a runtime flag, not a constexpr: at head dim 72 the variant compiled without the
    store ran 4-7% slower than the one with it, docs/benchmarks.md session 24), lse [B, Hq, Lq] fp32 (natural log);
    n_keys + n_extra >= 1. Grid (cdiv(Lq, 2 * ROWS), B * Hq), 4 warps, plus the partitions' 5: a CTA is two
    consumer warpgroups on consecutive ROWS-row blocks (the default partition and a worker; _attend_rows) sharing
    STAGES-deep K and V rings in shared memory, and one loader warp (_load_ring), with a ready and an empty mbarrier
    per slot.
    """
    dtype: gl.constexpr = q_desc.dtype
    qk_scale = qk_scale.to(gl.float32)
    pid_bh = gl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    row_m = gl.program_id(0) * (2 * ROWS)

    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if D1 > 0:
        q1_smem = gl.allocate_shared_memory(dtype, [2] + q1_desc.block_type.shape, q1_desc.layout)
        k1_smem = gl.allocate_shared_memory(dtype, [STAGES] + k1_desc.block_type.shape, k1_desc.layout)
        v1_smem = gl.allocate_shared_memory(dtype, [STAGES] + v1_desc.block_type.shape, v1_desc.layout)
    else:  # placeholders, never read
        q1_smem = q_smem
        k1_smem = k_smem
        v1_smem = v_smem
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_attend_rows, (q_desc, o_desc, q1_desc, o1_desc, lse_ptr,
                            q_smem.index(0), q1_smem.index(0), q_bars.index(0), k_smem, v_smem, k1_smem, v1_smem,
                            k_ready, v_ready, k_empty, v_empty, b, h, pid_bh, row_m, lq, n_keys, n_extra, qk_scale,
                            store_lse, D0, D1, BLOCK_N, STAGES, Q_IN_REGS)),
            (_attend_rows, (q_desc, o_desc, q1_desc, o1_desc, lse_ptr,
                            q_smem.index(1), q1_smem.index(1), q_bars.index(1), k_smem, v_smem, k1_smem, v1_smem,
                            k_ready, v_ready, k_empty, v_empty, b, h, pid_bh, row_m + ROWS, lq, n_keys, n_extra,
                            qk_scale, store_lse, D0, D1, BLOCK_N, STAGES, Q_IN_REGS)),
            (_load_ring, (k_desc, v_desc, k_extra_desc, v_extra_desc, k1_desc, v1_desc, k1_extra_desc, v1_extra_desc,
                          k_smem, v_smem, k1_smem, v1_smem, k_ready, v_ready, k_empty, v_empty, b, hk, n_keys,
                          n_extra, BLOCK_N, STAGES, HAS_EXTRA, D0, D1)),
        ],
        [4, 1],  # warps of the second consumer and of the loader (the default partition has the kernel's 4)
        [232, 24],  # their registers: the loader gives most of its share to the consumers
    )  # fmt: skip
