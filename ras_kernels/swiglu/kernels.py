"""Triton kernel for the SwiGLU activation: one pass reading both projections and writing their gated product.

A program owns a tile of ``BLOCK_R`` rows x ``BLOCK_F`` columns of the [R, F] inputs (leading dimensions
flattened); the row count and the row strides are excluded from specialisation (the token count changes per
diffusion step).
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_gate_r", "stride_up_r", "ROWS"])
def swiglu_kernel(
    out_ptr,
    gate_ptr,
    up_ptr,
    stride_gate_r,
    stride_up_r,
    ROWS,
    F: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """``out[r, f] = silu(gate[r, f]) * up[r, f]`` in fp32, rounded to out's dtype; out [R, F] contiguous."""
    num_col_blocks = tl.cdiv(F, BLOCK_F)
    pid = tl.program_id(0)
    rows = (pid // num_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % num_col_blocks) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < ROWS)[:, None] & (cols < F)[None, :]
    g = tl.load(gate_ptr + rows[:, None] * stride_gate_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_up_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rows[:, None] * F + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
