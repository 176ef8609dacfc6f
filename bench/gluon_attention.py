"""A probe, not an op: the cached-K/V attention written in Gluon with FlashAttention-3's intra-warpgroup overlap.

    python -m bench.gluon_attention     (an sm_90 GPU; Triton 3.6+, whose ``triton.experimental.gluon`` it uses)

Why it exists (docs/benchmarks.md, session 21): compiled for sm_90 by Triton 3.6, the shipped Hopper kernel
(``attn_fwd_tma_kernel``) waits for every score GEMM right after issuing it (``wgmma.wait_group 0``: Triton makes a
dot asynchronous across the softmax only when its result is another dot's accumulator), its ``warp_specialize`` loop
is not partitioned on sm_90, and an 8-warp CTA's two warpgroups meet at a ``bar.sync`` before every TMA load. So the
tensor cores idle during each softmax. Gluon exposes ``warpgroup_mma(is_async=True)`` and ``warpgroup_mma_wait(n)``,
so this kernel issues the scores of key tile j, then the PV product of tile j - 1, waits for the scores only, and
runs tile j's softmax while that PV product is still on the tensor cores (one warpgroup per CTA, two CTAs per SM).

The probe times it against the shipped Hopper kernel and cuDNN's SDPA alone at the benchmark shapes (head dims 64
and 128), checking each output against SDPA. It is not wired into the op: it lacks head dim 72, fp8 caches and the
interpreter, and at head dim 128 it stays below cuDNN (see the benchmarks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
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


ROWS = gl.constexpr(64)  # query rows per consumer warpgroup (one m64 wgmma row block)


@gluon.jit
def _release(desc, extra_desc, smem, ready, empty, b, hk, tile, n_cache_tiles, n_tiles, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr, HAS_EXTRA: gl.constexpr, WS: gl.constexpr):  # fmt: skip
    """Key tile ``tile``'s slot is no longer read by this warpgroup: with WS arrive on the slot's empty barrier (the
    loader warp refills it once every consumer has), else load tile + STAGES into it."""
    if WS:
        mbarrier.arrive(empty.index(tile % STAGES), count=1)
    else:
        _load_tile(desc, extra_desc, smem, ready, b, hk, tile + STAGES, n_cache_tiles, n_tiles, BLOCK_N, STAGES,
                   HAS_EXTRA)  # fmt: skip


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
def _attend_rows(q_desc, o_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, lse_ptr, mask_ptr, stride_mask_b,
                 stride_mask_t, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, h, hk, pid_bh,
                 row_m, lq, n_keys, n_extra, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, Q_IN_REGS: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_MASK: gl.constexpr,
                 WS: gl.constexpr):  # fmt: skip
    """One warpgroup's ROWS query rows from row_m: out and lse over every key tile in the rings.

    Per key tile j: issue S_j = Q K_j^T; issue O += P_{j-1} V_{j-1}; wait for S_j only (``warpgroup_mma_wait(1)``);
    release K_j's slot; softmax of S_j while the PV GEMM runs; wait for it; release V_{j-1}'s slot; rescale O by the
    new running max. Q_IN_REGS: the score GEMM reads Q from registers, so only K crosses shared memory per tile.
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
    _release(k_desc, k_extra_desc, k_smem, k_ready, k_empty, b, hk, 0, n_cache_tiles, n_tiles, BLOCK_N, STAGES,
             HAS_EXTRA, WS)  # fmt: skip
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
        _release(k_desc, k_extra_desc, k_smem, k_ready, k_empty, b, hk, j, n_cache_tiles, n_tiles, BLOCK_N, STAGES,
                 HAS_EXTRA, WS)  # fmt: skip
        s = _masked_scores(s, j, n_cache_tiles, n_keys, n_extra, mask_ptr, stride_mask_b, stride_mask_t, b, offs_n,
                           BLOCK_N, HAS_MASK)  # fmt: skip
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, HAS_MASK)
        acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v_prev])[0]
        _release(v_desc, v_extra_desc, v_smem, v_ready, v_empty, b, hk, j - 1, n_cache_tiles, n_tiles, BLOCK_N,
                 STAGES, HAS_EXTRA, WS)  # fmt: skip
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
    offs_m = row_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(lse_ptr + pid_bh.to(gl.int64) * lq + offs_m, lse, mask=offs_m < lq)
    tma.store_wait(0)


@gluon.jit
def attn_fwd_gluon_kernel(q_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, o_desc, lse_ptr, mask_ptr,
                          stride_mask_b, stride_mask_t, lq, n_keys, n_extra, heads_q, group, qk_scale,
                          HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          Q_IN_REGS: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, HAS_EXTRA: gl.constexpr,
                          HAS_MASK: gl.constexpr):  # fmt: skip
    """out = softmax(q k^T * scale) v over the cache rows then the extra rows, and lse, as attn_fwd_tma_kernel
    ([1, rows, 1, d] descriptor blocks, ROWS rows for q / out, BLOCK_N for k / v; query head h reads kv head
    h // group; qk_scale = scale * log2(e); lse [B, Hq, Lq] fp32); head dim 64 or 128, 16-bit, n_keys + n_extra >= 1.
    Grid (cdiv(Lq, ROWS * consumers), B * Hq), 4 warps.

    One consumer warpgroup (_attend_rows) issuing its own TMA loads, two CTAs to an SM; or, WARP_SPECIALIZE, FA3's
    layout: two consumer warpgroups on consecutive ROWS-row blocks sharing the K / V rings, fed by a loader warp
    (_load_ring), with empty barriers in place of the single warpgroup's program order.
    """
    CONSUMERS: gl.constexpr = 2 if WARP_SPECIALIZE else 1
    dtype: gl.constexpr = q_desc.dtype
    qk_scale = qk_scale.to(gl.float32)
    pid_bh = gl.program_id(1)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    row_m = gl.program_id(0) * (CONSUMERS * ROWS)

    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    fence_async_shared()

    if WARP_SPECIALIZE:
        gl.warp_specialize(
            [
                (_attend_rows, (q_desc, o_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, lse_ptr, mask_ptr,
                                stride_mask_b, stride_mask_t, q_smem.index(0), q_bars.index(0), k_smem, v_smem,
                                k_ready, v_ready, k_empty, v_empty, b, h, hk, pid_bh, row_m, lq, n_keys, n_extra,
                                qk_scale, HEAD_DIM, BLOCK_N, STAGES, Q_IN_REGS, HAS_EXTRA, HAS_MASK, True)),
                (_attend_rows, (q_desc, o_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, lse_ptr, mask_ptr,
                                stride_mask_b, stride_mask_t, q_smem.index(1), q_bars.index(1), k_smem, v_smem,
                                k_ready, v_ready, k_empty, v_empty, b, h, hk, pid_bh, row_m + ROWS, lq, n_keys,
                                n_extra, qk_scale, HEAD_DIM, BLOCK_N, STAGES, Q_IN_REGS, HAS_EXTRA, HAS_MASK, True)),
                (_load_ring, (k_desc, v_desc, k_extra_desc, v_extra_desc, k_smem, v_smem, k_ready, v_ready, k_empty,
                              v_empty, b, hk, n_keys, n_extra, BLOCK_N, STAGES, HAS_EXTRA)),
            ],
            [4, 1],  # warps of the second consumer and of the loader (the default partition has the kernel's 4)
            [232, 24],  # their registers: the loader gives its share to the consumers
        )  # fmt: skip
    else:
        n_cache_tiles = gl.cdiv(n_keys, BLOCK_N)
        n_tiles = n_cache_tiles + gl.cdiv(n_extra, BLOCK_N)
        for i in gl.static_range(STAGES):
            _load_tile(k_desc, k_extra_desc, k_smem, k_ready, b, hk, i, n_cache_tiles, n_tiles, BLOCK_N, STAGES,
                       HAS_EXTRA)  # fmt: skip
            _load_tile(v_desc, v_extra_desc, v_smem, v_ready, b, hk, i, n_cache_tiles, n_tiles, BLOCK_N, STAGES,
                       HAS_EXTRA)  # fmt: skip
        _attend_rows(q_desc, o_desc, k_desc, v_desc, k_extra_desc, v_extra_desc, lse_ptr, mask_ptr, stride_mask_b,
                     stride_mask_t, q_smem.index(0), q_bars.index(0), k_smem, v_smem, k_ready, v_ready, k_empty,
                     v_empty, b, h, hk, pid_bh, row_m, lq, n_keys, n_extra, qk_scale, HEAD_DIM, BLOCK_N, STAGES,
                     Q_IN_REGS, HAS_EXTRA, HAS_MASK, False)  # fmt: skip


# (BLOCK_N, STAGES, Q in registers, warp-specialised) the probe times per head dim: one consumer warpgroup per CTA,
# sized so two CTAs fit an SM (one CTA's softmax then overlaps the other's GEMMs), or FA3's two consumers and a
# loader warp per CTA (one CTA per SM).
CONFIGS = {
    64: ((128, 3, False, False), (128, 3, False, True), (128, 4, True, True), (64, 4, True, True)),
    128: ((64, 3, True, False), (128, 2, True, True), (64, 4, True, True), (128, 2, False, True)),
}


def gluon_attention(q, k, v, k_extra, v_extra, extra_mask, scale: float, config) -> tuple[torch.Tensor, torch.Tensor]:
    """attn_fwd_gluon_kernel on [B, L, H, d] bf16 / fp16 tensors as ops._launch_hopper takes them (k_extra / v_extra
    and the [B, T] bool extra_mask optional); returns (out, lse)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block_n, stages, q_in_regs, ws = config
    b, lq, hq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    has_extra = k_extra is not None and k_extra.shape[1] > 0
    has_mask = has_extra and extra_mask is not None
    if k.shape[1] == 0:  # no cache rows: a descriptor needs one, never read
        k, v = k_extra, v_extra
    elem = gl.float16 if q.dtype == torch.float16 else gl.bfloat16

    def desc(t, rows):
        block = [1, rows, 1, d]
        return TensorDescriptor(
            t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, elem)
        )

    ke, ve = (k_extra, v_extra) if has_extra else (k, v)
    mask = extra_mask.view(torch.uint8) if has_mask else lse
    rows = ROWS.value
    attn_fwd_gluon_kernel[(triton.cdiv(lq, rows * (2 if ws else 1)), b * hq)](
        desc(q, rows), desc(k, block_n), desc(v, block_n), desc(ke, block_n), desc(ve, block_n), desc(out, rows),
        lse, mask, mask.stride(0) if has_mask else 0, mask.stride(1) if has_mask else 0, lq,
        k.shape[1] if k is not k_extra else 0, ke.shape[1] if has_extra else 0, hq, hq // k.shape[2],
        scale * math.log2(math.e), HEAD_DIM=d, BLOCK_N=block_n, STAGES=stages, Q_IN_REGS=q_in_regs,
        WARP_SPECIALIZE=ws, HAS_EXTRA=has_extra, HAS_MASK=has_mask, num_warps=4,
    )  # fmt: skip
    return out, lse


def _check(config, b, n, t, lq, hq, hkv, d, masked: bool) -> float:
    """Largest output / lse error of the probe kernel against the fp32 reference on fresh random data."""
    from ras_kernels.attention import reference

    g = dict(dtype=torch.bfloat16, device="cuda")
    q, k, v = torch.randn(b, lq, hq, d, **g), torch.randn(b, n, hkv, d, **g), torch.randn(b, n, hkv, d, **g)
    ke, ve = torch.randn(b, t, hkv, d, **g), torch.randn(b, t, hkv, d, **g)
    mask = torch.rand(b, t, device="cuda") < 0.5 if masked else None
    if masked:
        mask[0] = False  # batch 0 sees no extra key
    out, lse = gluon_attention(q, k, v, ke, ve, mask, d**-0.5, config)
    full = None if mask is None else torch.cat([torch.ones(b, n, dtype=torch.bool, device="cuda"), mask], 1)
    ref, ref_lse = reference.attention(q, torch.cat([k, ke], 1), torch.cat([v, ve], 1), d**-0.5, full, return_lse=True)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)), "rows with no visible key differ"
    return max((out.float() - ref.float()).abs().max().item(), (lse[fin] - ref_lse[fin]).abs().max().item())


def _row(name: str, s: dict) -> str:
    """One table row: the shipped Hopper kernel, the probe's fastest config and cuDNN alone, kernels alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.bench_attention import _concat, _flops, _inputs, _shape_str
    from bench.common import graph_ms
    from ras_kernels.attention import ops

    q, _, _, kc, vc, _, ke, ve = _inputs(**s)
    scale = s["d"] ** -0.5
    shipped = graph_ms(lambda: ops._launch_hopper(q, kc, vc, ke, ve, None, scale, True))
    times = {c: graph_ms(lambda c=c: gluon_attention(q, kc, vc, ke, ve, None, scale, c)) for c in CONFIGS[s["d"]]}
    best = min(times, key=times.get)
    print(f"  {name}: " + ", ".join(f"{c} {t:.3f} ms" for c, t in times.items()), flush=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, *_concat(kc, vc, ke, ve, s["hq"] // s["hkv"])))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = graph_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    tf = _flops(s) / 1e9
    cells = [f"{name} ({_shape_str(name, s).split(' ', 1)[1]})", f"{shipped.spread(3)} ({tf / shipped:.0f})"]
    cells += [f"{best} {times[best].spread(3)} ({tf / times[best]:.0f})", f"{cudnn.spread(3)} ({tf / cudnn:.0f})"]
    return "| " + " | ".join(cells + [f"{shipped / times[best]:.2f}x", f"{cudnn / times[best]:.2f}x"]) + " |"


CHECK_CASES = (  # (b, n, t, lq, hq, hkv, masked): tails, GQA, no cache rows, a batch that sees no extra key
    (1, 300, 77, 200, 4, 2, True),
    (2, 0, 130, 65, 2, 1, True),
    (1, 1000, 5, 300, 6, 6, False),
)


def main() -> None:
    from bench.bench_attention import PATH_SHAPES
    from bench.common import device_name

    print(f"# {device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("Max abs error of out and lse against the fp32 reference (bf16):")
    for d, configs in CONFIGS.items():
        for cfg in configs:
            for b, n, t, lq, hq, hkv, masked in CHECK_CASES:
                err = _check(cfg, b, n, t, lq, hq, hkv, d, masked)
                print(f"  d={d} {cfg} b={b} n={n} t={t} lq={lq} h={hq}/{hkv} masked={masked}: {err:.4f}", flush=True)
    print()
    print(
        "| shape | shipped Hopper kernel ms min / median / max (TFLOP/s) | Gluon probe's fastest config, ms (TFLOP/s) ",
        end="",
    )
    print("| cuDNN SDPA alone | Gluon / shipped | Gluon / cuDNN |")
    print("|" + "---|" * 6)
    for name, s in PATH_SHAPES:
        if s["d"] in CONFIGS:
            print(_row(name, s), flush=True)


if __name__ == "__main__":
    main()
