"""Public ``gather_tokens`` / ``scatter_tokens``: validation, Triton launchers, torch.library ops, dispatch."""

from __future__ import annotations

import math

import torch

from .._backend import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    device_of,
    row_strides,
    triton_path,
    validate_index,
)
from . import reference


def _check_batch(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have batch 1 (shared) or B={batch}, got shape {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Launchers (Triton path)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
        block_d = min((cap, cap // 2, cap // 4), key=lambda w: (_cdiv(d, w) * w - d, -w))
    block_r = min(128, max(1, 8192 // (block_d * element_size)))
    vectors = block_r * block_d * element_size // 16  # 16-byte accesses per tile
    num_warps = max(1, min(4, vectors // 32))
    return block_r, block_d, num_warps


def _gather_launch(out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, add: torch.Tensor | None) -> None:
    """Fill ``out`` [B, K, D] (contiguous, x's dtype) with the gathered rows."""
    from . import kernels

    batch, k = idx.shape
    d = x.shape[2]
    if out.numel() == 0:
        return
    sxb, sxn = row_strides(x)
    sab, san = row_strides(add) if add is not None else (0, 0)
    block_r, block_d, num_warps = _launch_config(d, x.element_size())
    grid = (_cdiv(k, block_r) * _cdiv(d, block_d), batch)
    with device_of(x):
        kernels.gather_rows_kernel[grid](
            out,
            x,
            add if add is not None else x,  # never read when HAS_ADD is False
            idx,
            sxb,
            sxn,
            sab,
            san,
            idx.stride(0),
            idx.stride(1),
            k,
            d,
            HAS_ADD=add is not None,
            ALIGN=_align(sxb, sxn, sab, san),
            EVEN_D=d % block_d == 0,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )


def _scatter_launch(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """Write ``src`` [B, K, D] into rows ``idx`` of ``dst`` [B, N, D] in place."""
    from . import kernels

    batch, k = idx.shape
    d = dst.shape[2]
    if src.numel() == 0:
        return
    sdb, sdn = row_strides(dst)
    ssb, ssk = row_strides(src)
    block_r, block_d, num_warps = _launch_config(d, dst.element_size())
    grid = (_cdiv(k, block_r) * _cdiv(d, block_d), batch)
    with device_of(dst):
        kernels.scatter_rows_kernel[grid](
            dst,
            src,
            idx,
            sdb,
            sdn,
            ssb,
            ssk,
            idx.stride(0),
            idx.stride(1),
            k,
            d,
            ALIGN=_align(sdb, sdn, ssb, ssk),
            EVEN_D=d % block_d == 0,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )


def _gather_triton(x: torch.Tensor, idx: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty((idx.shape[0], idx.shape[1], x.shape[2]), dtype=x.dtype, device=x.device)
    _gather_launch(out, x, idx, add)
    return out


# torch.library ops, so torch.compile treats each launch as one opaque op (a fake implementation gives the output's
# shape, and the schema declares the in-place write to dst). custom_op rather than triton_op + wrap_triton: the
# latter tries to run the kernel on fake tensors under TRITON_INTERPRET=1 and so breaks torch.compile on CPU.
# Explicit schemas keep the registration independent of annotation handling across torch versions.
# Eager calls (CUDA-graph capture included) launch directly: the op's Python dispatch would cost more host time
# than the kernel's GPU time at SD3 sizes.
@torch.library.custom_op(
    "ras_kernels::gather_tokens", mutates_args=(), schema="(Tensor x, Tensor idx, Tensor? add) -> Tensor"
)
def _gather_op(x: torch.Tensor, idx: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    return _gather_triton(x, idx, add)


@_gather_op.register_fake
def _(x, idx, add):
    return x.new_empty((idx.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op(
    "ras_kernels::scatter_tokens", mutates_args=("dst",), schema="(Tensor(a!) dst, Tensor idx, Tensor src) -> ()"
)
def _scatter_op(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    _scatter_launch(dst, idx, src)


@_scatter_op.register_fake
def _(dst, idx, src):
    return None


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
    triton_fn = triton_path("gather_tokens", _gather_op, _gather_triton, x.device, {"x": x, "add": add})
    if triton_fn is not None:
        return triton_fn(x, idx, add)
    return reference.gather_tokens(x, idx, add=add)


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
    triton_fn = triton_path("scatter_tokens", _scatter_op, _scatter_launch, dst.device, {"dst": dst, "src": src})
    if triton_fn is not None:
        triton_fn(dst, idx, src)
        return dst
    return reference.scatter_tokens(dst, idx, src)
