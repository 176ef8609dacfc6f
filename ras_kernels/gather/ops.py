"""Public ``gather_tokens`` / ``scatter_tokens``: validation, the Triton launchers, the op definitions."""

from __future__ import annotations

import math

import torch

from .._backend import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    RASOp,
    cdiv,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    row_strides,
    validate_index,
)
from . import reference


def _check_batch(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have batch 1 (shared) or B={batch}, got shape {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Launchers (Triton path)


def _align(*strides: int) -> int:
    """Largest power of two <= 16 dividing every stride: row offsets are multiples of it (vector accesses)."""
    g = math.gcd(*strides)
    return min(16, g & -g) if g else 16


def _launch_config(d: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) from the row width only, never from K (one compiled kernel for every K).

    A program moves a tile of about 8 KiB: up to 1 KiB of each of BLOCK_R rows. Wider rows are split into column
    blocks, choosing among 1/4, 1/2 and 1 KiB the width that pads the fewest columns (D = 1536 bf16 -> 3 x 512,
    D = 2304 bf16 -> 9 x 256), so no lanes idle on a masked tail. At SD3 sizes (B = 2, K >= 1024, D = 1536 bf16)
    this gives >= 768 programs, several per SM on a 132-SM card.
    """
    cap = 1024 // element_size
    width = 1 << max(0, d - 1).bit_length()  # next power of two
    if width <= cap:
        block_d = width
    else:
        block_d = min((cap, cap // 2, cap // 4), key=lambda w: (cdiv(d, w) * w - d, -w))
    block_r = min(128, max(1, 8192 // (block_d * element_size)))
    vectors = block_r * block_d * element_size // 16  # 16-byte accesses per tile
    num_warps = max(1, min(4, vectors // 32))
    return block_r, block_d, num_warps


def _gather_launch(x: torch.Tensor, idx: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    from . import kernels

    batch, k = idx.shape
    d = x.shape[2]
    out = torch.empty((batch, k, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    sxb, sxn = row_strides(x)
    sab, san = row_strides(add) if add is not None else (0, 0)
    block_r, block_d, num_warps = _launch_config(d, x.element_size())
    kernels.gather_rows_kernel[(cdiv(k, block_r) * cdiv(d, block_d), batch)](
        out_ptr=out,
        x_ptr=x,
        add_ptr=add if add is not None else x,  # never read when HAS_ADD is False
        idx_ptr=idx,
        stride_x_b=sxb,
        stride_x_n=sxn,
        stride_add_b=sab,
        stride_add_n=san,
        stride_idx_b=idx.stride(0),
        stride_idx_k=idx.stride(1),
        K=k,
        D=d,
        HAS_ADD=add is not None,
        ALIGN=_align(sxb, sxn, sab, san),
        EVEN_D=d % block_d == 0,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def _scatter_launch(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    from . import kernels

    batch, k = idx.shape
    d = dst.shape[2]
    if src.numel() == 0:
        return
    sdb, sdn = row_strides(dst)
    ssb, ssk = row_strides(src)
    block_r, block_d, num_warps = _launch_config(d, dst.element_size())
    kernels.scatter_rows_kernel[(cdiv(k, block_r) * cdiv(d, block_d), batch)](
        dst_ptr=dst,
        src_ptr=src,
        idx_ptr=idx,
        stride_dst_b=sdb,
        stride_dst_n=sdn,
        stride_src_b=ssb,
        stride_src_k=ssk,
        stride_idx_b=idx.stride(0),
        stride_idx_k=idx.stride(1),
        K=k,
        D=d,
        ALIGN=_align(sdb, sdn, ssb, ssk),
        EVEN_D=d % block_d == 0,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


_GATHER = RASOp(
    "gather_tokens",
    schema="(Tensor x, Tensor idx, Tensor? add) -> Tensor",
    launch=_gather_launch,
    reference=reference.gather_tokens,
    fake=lambda x, idx, add: x.new_empty((idx.shape[0], idx.shape[1], x.shape[2])),
    differentiable=("x", "add"),
)
_SCATTER = RASOp(
    "scatter_tokens",
    schema="(Tensor(a!) dst, Tensor idx, Tensor src) -> ()",
    launch=_scatter_launch,
    reference=reference.scatter_tokens,
    fake=lambda dst, idx, src: None,
    mutates_args=("dst",),
    differentiable=("dst", "src"),
)


# ---------------------------------------------------------------------------------------------------------------
# Public ops


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``idx`` of each sample, optionally plus the same rows of ``add``.

    x [Bx, N, D] and add [Ba, N, D] (float32/bfloat16/float16, add's dtype may differ from x's; a batch of 1 is
    shared by all samples, e.g. a position table), idx [B, K] int32/int64 -> [B, K, D] contiguous in x's dtype:
    ``out[b, j] = x[b, idx[b, j]] (+ add[b, idx[b, j]], summed in fp32 and rounded to x's dtype)``.
    Inputs may be strided views as long as the last dimension is contiguous.

    Indices must lie in [0, N) (repeats are fine). They are checked on the host for CPU tensors; for CUDA tensors
    only with ``RAS_DEBUG=1`` (the check needs a host sync), otherwise out-of-range indices are undefined
    behaviour, as in ``torch.gather`` on CUDA. The Triton path has no backward (see ``RAS_BACKEND``).
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("idx", idx, ndim=2, dtypes=INDEX_DTYPES, device=x.device)
    batch = idx.shape[0]
    _check_batch("x", x, batch)
    check_unit_stride("x", x)
    if add is not None:
        check_tensor("add", add, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        _check_batch("add", add, batch)
        if add.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"add must have shape (B or 1, N, D) = (*, {x.shape[1]}, {x.shape[2]}), got {tuple(add.shape)}"
            )
        check_unit_stride("add", add)
    validate_index("idx", idx, batch, x.shape[1], x.device)
    return _GATHER(x, idx, add)


def scatter_tokens(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write src [B, K, D] into rows ``idx`` [B, K] of dst [B, N, D] in place; returns ``dst``.

    dst and src may be strided views with a contiguous last dimension; rows of dst not in ``idx`` are untouched.
    dst must not overlap itself (no broadcast view). Indices must lie in [0, N) and be distinct within a sample (as
    :func:`select_regions` returns them), checked as for :func:`gather_tokens` (CPU tensors always, CUDA tensors
    with ``RAS_DEBUG=1``); unchecked repeats on CUDA leave unspecified which write lands.
    """
    check_tensor("dst", dst, ndim=3, dtypes=FLOAT_DTYPES)
    validate_index("idx", idx, dst.shape[0], dst.shape[1], dst.device, distinct=True)
    check_tensor("src", src, ndim=3, dtypes=(dst.dtype,), device=dst.device)
    expected = (dst.shape[0], idx.shape[1], dst.shape[2])
    if tuple(src.shape) != expected:
        raise ValueError(f"src must have shape (B, K, D) = {expected}, got {tuple(src.shape)}")
    check_unit_stride("dst", dst)
    check_unit_stride("src", src)
    check_no_overlap("dst", dst)
    _SCATTER(dst, idx, src)
    return dst
