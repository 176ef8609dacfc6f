"""Triton kernels for token gather / scatter (row copies through an index).

Both kernels move a tile of ``BLOCK_R`` rows x ``BLOCK_D`` columns per program: grid axis 0 walks
(row block, column block) pairs, axis 1 the batch. Only the last dimension is assumed contiguous; every other
stride is a runtime argument. ``K`` and the strides (those of K-shaped tensors change with K) are excluded from
specialisation, so a new active-token count per diffusion step reuses the compiled kernel; the launcher passes
``ALIGN`` instead (the largest power of two, at most 16, dividing every row and batch stride), which gives the
compiler back the alignment it needs for 16-byte vector accesses. The row width ``D`` is a compile-time constant
(fixed per model), so column masks of widths such as 72 still allow vector accesses.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(idx_ptr, stride_idx_b, stride_idx_k, K, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sample ``b`` (int64), row numbers ``rows`` [BLOCK_R] (positions in 0..K), their tokens
    ``tok = idx[b, rows]`` (int64, 0 where masked), the row mask [BLOCK_R] and columns [BLOCK_D]."""
    num_col_blocks = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    pid_r = pid // num_col_blocks
    pid_d = pid % num_col_blocks
    b = tl.program_id(1).to(tl.int64)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < K
    tok = tl.load(idx_ptr + b * stride_idx_b + rows * stride_idx_k, mask=row_mask, other=0).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, rows, tok, row_mask, cols


@triton.jit
def _round_to_bf16(v):
    """fp32 -> bf16 rounded to nearest, ties to even, as torch rounds; bit-exact on every backend (the Triton
    interpreter's fp32 -> bf16 cast truncates). NaN stays NaN; values past the bf16 range round to +-inf."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(v != v, v.to(tl.bfloat16), rounded)


@triton.jit(
    do_not_specialize=["stride_x_b", "stride_x_n", "stride_add_b", "stride_add_n", "stride_idx_b", "stride_idx_k", "K"]
)
def gather_rows_kernel(
    out_ptr,
    x_ptr,
    add_ptr,
    idx_ptr,
    stride_x_b,
    stride_x_n,
    stride_add_b,
    stride_add_n,
    stride_idx_b,
    stride_idx_k,
    K,
    D: tl.constexpr,
    HAS_ADD: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[b, j, :] = x[b, idx[b, j], :]`` (+ ``add[b, idx[b, j], :]`` summed in fp32, rounded to out's dtype).

    out: [B, K, D] contiguous; x: [Bx, N, D], add: [Ba, N, D] with batch stride 0 when broadcast (Bx or Ba = 1);
    idx: [B, K] int32/int64 in [0, N). Last dimension contiguous everywhere.
    """
    b, rows, tok, row_mask, cols = _tile(idx_ptr, stride_idx_b, stride_idx_k, K, D, BLOCK_R, BLOCK_D)
    if EVEN_D:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols < D)[None, :]
    x_rows = tl.multiple_of(b * stride_x_b + tok * stride_x_n, ALIGN)
    vals = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask)
    if HAS_ADD:
        a_rows = tl.multiple_of(b * stride_add_b + tok * stride_add_n, ALIGN)
        extra = tl.load(add_ptr + a_rows[:, None] + cols[None, :], mask=mask)
        vals = vals.to(tl.float32) + extra.to(tl.float32)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            vals = _round_to_bf16(vals)
        else:
            vals = vals.to(out_ptr.dtype.element_ty)
    # out is allocated contiguous by the launcher, so its row stride is D.
    out_rows = (b * K + rows) * D
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], vals, mask=mask)


@triton.jit(
    do_not_specialize=[
        "stride_dst_b",
        "stride_dst_n",
        "stride_src_b",
        "stride_src_k",
        "stride_idx_b",
        "stride_idx_k",
        "K",
    ]
)
def scatter_rows_kernel(
    dst_ptr,
    src_ptr,
    idx_ptr,
    stride_dst_b,
    stride_dst_n,
    stride_src_b,
    stride_src_k,
    stride_idx_b,
    stride_idx_k,
    K,
    D: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dst[b, idx[b, j], :] = src[b, j, :]`` in place.

    dst: [B, N, D]; src: [B, K, D]; idx: [B, K] int32/int64 in [0, N), distinct within a sample (with repeats,
    which write lands is unspecified). Last dimension contiguous everywhere. Rows of dst not in idx are untouched.
    """
    b, rows, tok, row_mask, cols = _tile(idx_ptr, stride_idx_b, stride_idx_k, K, D, BLOCK_R, BLOCK_D)
    if EVEN_D:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (cols < D)[None, :]
    s_rows = tl.multiple_of(b * stride_src_b + rows * stride_src_k, ALIGN)
    vals = tl.load(src_ptr + s_rows[:, None] + cols[None, :], mask=mask)
    d_rows = tl.multiple_of(b * stride_dst_b + tok * stride_dst_n, ALIGN)
    tl.store(dst_ptr + d_rows[:, None] + cols[None, :], vals, mask=mask)
