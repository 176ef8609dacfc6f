"""Triton kernel for the fused DiT norms: one pass over a tile of rows for gate + residual + norm + modulation
(+ RoPE).

A program owns ``BLOCK_R`` whole rows (``BLOCK_D`` >= D, so the row statistics are one in-register reduction);
the grid walks the B * L rows. The row count and every stride are excluded from specialisation (the active-token
count changes per diffusion step); ``D`` and the feature switches are compile-time constants.
"""

import triton
import triton.language as tl


@triton.jit
def _normalize(v, mask, D: tl.constexpr, NORM: tl.constexpr, eps):
    """Row-wise LayerNorm (NORM == 1) or RMSNorm (NORM == 2) of an fp32 tile [BLOCK_R, BLOCK_D] (masked lanes 0)."""
    if NORM == 1:
        mean = tl.sum(v, axis=1) / D
        v = tl.where(mask, v - mean[:, None], 0.0)
    var = tl.sum(v * v, axis=1) / D
    return v * tl.rsqrt(var + eps)[:, None]


@triton.jit(
    do_not_specialize=[
        "stride_x_b",
        "stride_x_l",
        "stride_residual_b",
        "stride_residual_l",
        "stride_gate_b",
        "stride_scale_b",
        "stride_shift_b",
        "stride_rope_b",
        "stride_rope_l",
        "L",
        "ROWS",
    ]
)
def fused_norm_kernel(
    y_ptr,
    h_ptr,
    x_ptr,
    residual_ptr,
    gate_ptr,
    branch_weight_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    rope_ptr,
    stride_x_b,
    stride_x_l,
    stride_residual_b,
    stride_residual_l,
    stride_gate_b,
    stride_scale_b,
    stride_shift_b,
    stride_rope_b,
    stride_rope_l,
    L,
    ROWS,
    eps,
    branch_eps,
    D: tl.constexpr,
    RESIDUAL: tl.constexpr,
    GATE: tl.constexpr,
    BRANCH_NORM: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ROPE_HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows r = (b, l) of x [B, L, D]; every per-sample tensor [Bm, D] is read at row ``b`` (stride 0 broadcasts).

    With RESIDUAL (the branch is x):
        v = rms_norm(x) * bw          if BRANCH_NORM, else x
        v = g * v                     g = gate (GATE == 1) or tanh(gate) (GATE == 2)
        h = residual + v              stored to h [B, L, D] contiguous, then read back rounded
    Without, h = x. Then, if NORM (1 layer, 2 rms):
        y = norm(h) * weight + bias, * (1 + scale) + shift, RoPE   stored to y [B, L, D] contiguous
    RoPE (ROPE_HALF = head_dim / 2 > 0) rotates the pairs (y[2i], y[2i+1]) of each head by
    rope[b, l, i % ROPE_HALF] = (cos, sin) (fp32 [Br, L, ROPE_HALF, 2]). Statistics and arithmetic in fp32.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < ROWS
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    b = rows // L
    l_ = rows % L
    out_offs = rows[:, None] * D + cols[None, :]

    v = tl.load(x_ptr + (b * stride_x_b + l_ * stride_x_l)[:, None] + cols[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    if RESIDUAL:
        if BRANCH_NORM:
            v = _normalize(v, mask, D, 2, branch_eps)
            v *= tl.load(branch_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATE > 0:
            g = tl.load(gate_ptr + (b * stride_gate_b)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if GATE == 2:
                g = 1.0 - 2.0 / (tl.exp(2.0 * g) + 1.0)  # tanh; exact limits +-1 where exp over/underflows
            v *= g
        r = tl.load(
            residual_ptr + (b * stride_residual_b + l_ * stride_residual_l)[:, None] + cols[None, :],
            mask=mask,
            other=0.0,
        )
        h = (r.to(tl.float32) + v).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + out_offs, h, mask=mask)
        v = h.to(tl.float32)
    if NORM > 0:
        y = _normalize(v, mask, D, NORM, eps)
        if HAS_WEIGHT:
            y *= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            s = tl.load(scale_ptr + (b * stride_scale_b)[:, None] + cols[None, :], mask=mask, other=0.0)
            y *= 1.0 + s.to(tl.float32)
        if HAS_SHIFT:
            y += tl.load(shift_ptr + (b * stride_shift_b)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROPE_HALF > 0:
            # Pair i of the row is frequency i % ROPE_HALF of its head; split the tile into its even / odd lanes.
            pairs = tl.arange(0, BLOCK_D // 2)
            pair_mask = row_mask[:, None] & (pairs < D // 2)[None, :]
            p_offs = (b * stride_rope_b + l_ * stride_rope_l)[:, None] + 2 * (pairs % ROPE_HALF)[None, :]
            cos = tl.load(rope_ptr + p_offs, mask=pair_mask, other=1.0)
            sin = tl.load(rope_ptr + p_offs + 1, mask=pair_mask, other=0.0)
            even, odd = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_D // 2, 2)))
            y = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_R, BLOCK_D))
        tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
