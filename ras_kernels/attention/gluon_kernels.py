"""Gluon kernels for the cached-K/V attention on Hopper (only ``@gluon.jit`` functions live here).

The Hopper path of the op (RAS_ATTENTION=hopper, and ``auto`` on sm_90) at head dims 64 and 128 with 16-bit q / k /
v. Written in Gluon (``triton.experimental.gluon``, Triton 3.6+) rather than Triton because the schedule needs what
Triton's compiler does not give this loop on sm_90 (docs/benchmarks.md, session 21: compiled by Triton 3.6, the
Triton TMA kernel waits for every score GEMM right after issuing it, its ``warp_specialize`` loop is not partitioned,
and an 8-warp CTA's warpgroups meet at a ``bar.sync`` before every TMA load): asynchronous wgmma with a wait that
leaves the PV GEMM in flight under the softmax, and FlashAttention-3's warp specialisation: two consumer warpgroups
sharing the K / V rings, fed by one loader warp through ready / empty mbarriers.
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
def _load_tile(desc, extra_desc, smem, bars, b, hk, tile, n_cache_tiles, n_tiles, BLOCK_N: gl.constexpr,
               STAGES: gl.constexpr, HAS_EXTRA: gl.constexpr):  # fmt: skip
    """Start the TMA load of key tile ``tile`` (a cache tile below n_cache_tiles, then the extra rows' tiles) into
    ring slot tile % STAGES, arming that slot's barrier; nothing past the last tile."""
    slot = tile % STAGES
    ok = tile < n_tiles
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=ok)
    _tma_load(desc, [b, tile * BLOCK_N, hk, 0], bar, smem.index(slot), pred=ok & (tile < n_cache_tiles))
    if HAS_EXTRA:
        row = (tile - n_cache_tiles) * BLOCK_N
        _tma_load(extra_desc, [b, row, hk, 0], bar, smem.index(slot), pred=ok & (tile >= n_cache_tiles))


@gluon.jit
def _masked_scores(s, tile, n_cache_tiles, n_keys, n_extra, mask_ptr, stride_mask_b, stride_mask_t, b,
                   offs_n, BLOCK_N: gl.constexpr, HAS_MASK: gl.constexpr):  # fmt: skip
    """The scores of key tile ``tile`` with keys past its segment's end (and, HAS_MASK, masked extra keys) at -inf."""
    in_cache = tile < n_cache_tiles
    start = gl.where(in_cache, tile, tile - n_cache_tiles) * BLOCK_N
    limit = gl.where(in_cache, n_keys, n_extra) - start
    if HAS_MASK:
        key_ok = offs_n < limit
        if tile >= n_cache_tiles:
            rows = (start + offs_n).to(gl.int64)
            key_ok = key_ok & (gl.load(mask_ptr + b * stride_mask_b + rows * stride_mask_t, mask=key_ok, other=0) != 0)
        s = gl.where(key_ok[None, :], s, float("-inf"))
    elif limit < BLOCK_N:
        s = gl.where((offs_n < limit)[None, :], s, float("-inf"))
    return s


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, HAS_MASK: gl.constexpr):
    """Online softmax (log2 domain) of one tile's raw scores: (p, alpha, new running max, new running sum). With
    HAS_MASK a row may have seen no key yet (max -inf): it subtracts 0 instead, so p and alpha are 0, not NaN."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_sub = m_new
    if HAS_MASK:
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _load_ring(k_desc, v_desc, k_extra_desc, v_extra_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk,
               n_keys, n_extra, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_EXTRA: gl.constexpr):  # fmt: skip
    """The loader partition (one warp) of the warp-specialised kernel: every key tile's K and V into the rings, each
    slot once both consumer warpgroups have released its previous tile."""
    n_cache_tiles = gl.cdiv(n_keys, BLOCK_N)
    n_tiles = n_cache_tiles + gl.cdiv(n_extra, BLOCK_N)
    for t in range(n_tiles):
        phase = ((t // STAGES) & 1) ^ 1  # the release of tile t - STAGES
        mbarrier.wait(k_empty.index(t % STAGES), phase, pred=t >= STAGES)
        _load_tile(k_desc, k_extra_desc, k_smem, k_ready, b, hk, t, n_cache_tiles, n_tiles, BLOCK_N, STAGES, HAS_EXTRA)
        mbarrier.wait(v_empty.index(t % STAGES), phase, pred=t >= STAGES)
        _load_tile(v_desc, v_extra_desc, v_smem, v_ready, b, hk, t, n_cache_tiles, n_tiles, BLOCK_N, STAGES, HAS_EXTRA)


@gluon.jit
def _attend_rows(q_desc, o_desc, lse_ptr, mask_ptr, stride_mask_b, stride_mask_t, q_smem, q_bar, k_smem, v_smem,
                 k_ready, v_ready, k_empty, v_empty, b, h, pid_bh, row_m, lq, n_keys, n_extra, qk_scale,
                 HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_IN_REGS: gl.constexpr,
                 HAS_MASK: gl.constexpr, STORE_LSE: gl.constexpr):  # fmt: skip
    """A consumer partition: one warpgroup's ROWS query rows from row_m, out and lse over every key tile in the
    rings (cache tiles, then extra tiles).

    Per key tile j: issue S_j = Q K_j^T; issue O += P_{j-1} V_{j-1}; wait for S_j only (``warpgroup_mma_wait(1)``);
    release K_j's slot; softmax of S_j while the PV GEMM runs; wait for it; release V_{j-1}'s slot; rescale O by the
    new running max. A release is one arrive on the slot's empty barrier. Q_IN_REGS: the score GEMM reads Q from
    registers, so only K crosses shared memory per tile.
    """
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    n_cache_tiles = gl.cdiv(n_keys, BLOCK_N)
    n_tiles = n_cache_tiles + gl.cdiv(n_extra, BLOCK_N)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, row_m, h, 0], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)
    q2 = q_smem.reshape([ROWS, HEAD_DIM])
    q_op = q2
    if Q_IN_REGS:
        q_op = q2.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))

    # Tile 0: its scores alone (acc is zero, nothing to overlap).
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_op, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero, use_acc=False)
    mbarrier.arrive(k_empty.index(0), count=1)
    s = _masked_scores(s, 0, n_cache_tiles, n_keys, n_extra, mask_ptr, stride_mask_b, stride_mask_t, b, offs_n,
                       BLOCK_N, HAS_MASK)  # fmt: skip
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, HAS_MASK)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    for j in range(1, n_tiles):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        k_t = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q_op, k_t, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        v_prev = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
        acc_tok = warpgroup_mma(p_op, v_prev, acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok, q_op, k_t])[0]
        mbarrier.arrive(k_empty.index(slot), count=1)  # K_j's slot is free for the loader
        s = _masked_scores(s, j, n_cache_tiles, n_keys, n_extra, mask_ptr, stride_mask_b, stride_mask_t, b, offs_n,
                           BLOCK_N, HAS_MASK)  # fmt: skip
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, HAS_MASK)
        acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v_prev])[0]
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc)

    # Epilogue: normalise (a row with no visible key keeps acc = 0), store out through Q's buffer, and lse.
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    q2.store((acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]).to(dtype))
    fence_async_shared()
    _tma_store(o_desc, [b, row_m, h, 0], q_smem)
    if STORE_LSE:
        offs_m = row_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(lse_ptr + pid_bh.to(gl.int64) * lq + offs_m, lse, mask=offs_m < lq)
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["lq", "n_keys", "n_extra"])  # a new K (Lq) or cache length: no recompile
def attn_fwd_gluon_kernel(q_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, o_desc, lse_ptr, mask_ptr,
                          stride_mask_b, stride_mask_t, lq, n_keys, n_extra, heads_q, group, qk_scale,
                          HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          Q_IN_REGS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_MASK: gl.constexpr,
                          STORE_LSE: gl.constexpr):  # fmt: skip
    """The op of attn_fwd_tma_kernel at head dims 64 and 128, 16-bit: out = softmax(q k^T * scale) v over the cache
    rows then the extra rows (masked by the uint8 key mask when HAS_MASK), and lse.

    Every [B, L, H, d] tensor is read (and out written) through host-side 4-D tensor descriptors: blocks
    [1, ROWS, 1, d] for q and out, [1, BLOCK_N, 1, d] for k, v and the extra rows (rows past a tensor load as zeros
    and are not stored). Query head h reads kv head h // group; qk_scale = scale * log2(e); with STORE_LSE, lse
    [B, Hq, Lq] fp32 (natural log; -inf for a row that sees no key, whose out is 0); n_keys + n_extra >= 1.
    Grid (cdiv(Lq, 2 * ROWS), B * Hq), 4 warps, plus the partitions' 5: a CTA is two consumer warpgroups on
    consecutive ROWS-row blocks (the default partition and a worker; _attend_rows) sharing STAGES-deep K and V rings
    in shared memory, and one loader warp (_load_ring), with a ready and an empty mbarrier per slot.
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
            (_attend_rows, (q_desc, o_desc, lse_ptr, mask_ptr, stride_mask_b, stride_mask_t, q_smem.index(0),
                            q_bars.index(0), k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, h, pid_bh, row_m,
                            lq, n_keys, n_extra, qk_scale, HEAD_DIM, BLOCK_N, STAGES, Q_IN_REGS, HAS_MASK, STORE_LSE)),
            (_attend_rows, (q_desc, o_desc, lse_ptr, mask_ptr, stride_mask_b, stride_mask_t, q_smem.index(1),
                            q_bars.index(1), k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, h, pid_bh,
                            row_m + ROWS, lq, n_keys, n_extra, qk_scale, HEAD_DIM, BLOCK_N, STAGES, Q_IN_REGS,
                            HAS_MASK, STORE_LSE)),
            (_load_ring, (k_desc, v_desc, k_extra_desc, v_extra_desc, k_smem, v_smem, k_ready, v_ready, k_empty,
                          v_empty, b, hk, n_keys, n_extra, BLOCK_N, STAGES, HAS_EXTRA)),
        ],
        [4, 1],  # warps of the second consumer and of the loader (the default partition has the kernel's 4)
        [232, 24],  # their registers: the loader gives most of its share to the consumers
    )  # fmt: skip
