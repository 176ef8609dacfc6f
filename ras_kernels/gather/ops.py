"""Public ``gather_tokens`` / ``scatter_tokens``: validation and backend dispatch."""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from . import reference


def validate_index(name: str, idx: object, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Check ``idx`` is a [batch, K] int32/int64 tensor with 1 <= K <= num_tokens on ``device``."""
    check_tensor(name, idx, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if idx.shape[0] != batch:
        raise ValueError(f"{name} has batch {idx.shape[0]}, expected {batch}")
    if not 1 <= idx.shape[1] <= num_tokens:
        raise ValueError(f"{name} must select between 1 and N={num_tokens} tokens, got K={idx.shape[1]}")
    return idx


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of each sample: x [B, N, D], idx [B, K] (int32/int64) -> [B, K, D].

    Indices are not range-checked on the device (that would need a host sync); out-of-range indices are
    undefined behaviour, as in ``torch.gather`` on CUDA.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    validate_index("idx", idx, x.shape[0], x.shape[1], x.device)
    return reference.gather_tokens(x, idx)


def scatter_tokens(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Write src [B, K, D] into rows ``idx`` [B, K] of dst [B, N, D] in place; returns ``dst``.

    Indices within a sample must be distinct (as :func:`select_regions` returns them).
    """
    check_tensor("dst", dst, ndim=3, dtypes=FLOAT_DTYPES)
    validate_index("idx", idx, dst.shape[0], dst.shape[1], dst.device)
    check_tensor("src", src, ndim=3, dtypes=(dst.dtype,), device=dst.device)
    expected = (dst.shape[0], idx.shape[1], dst.shape[2])
    if tuple(src.shape) != expected:
        raise ValueError(f"src must have shape (B, K, D) = {expected}, got {tuple(src.shape)}")
    return reference.scatter_tokens(dst, idx, src)
