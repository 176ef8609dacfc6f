"""Plain-PyTorch reference for token gather and scatter (the spec the Triton kernels are tested against).

Shapes: ``idx`` [B, K] token indices (int32 or int64, in [0, N)); gather reads ``x`` [Bx, N, D] and optionally
``add`` [Ba, N, D], where a batch of 1 is shared by all B samples, and returns [B, K, D] in x's dtype; scatter
writes ``src`` [B, K, D] into ``dst`` [B, N, D] in place.
"""

from __future__ import annotations

import torch


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j]]`` for every sample b of ``idx``; a batch of 1 in ``t`` is broadcast."""
    t = t.expand(idx.shape[0], -1, -1)
    return torch.gather(t, 1, idx.long().unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, j] = x[b, idx[b, j]]``, or with ``add``: ``round_to_x_dtype(fp32(x[b, i]) + fp32(add[b, i]))``.

    Equivalent to ``(x + add)[:, idx]`` (as SD3 computes patch embedding + position embedding) but only the K
    selected rows of either input are read.
    """
    out = _rows(x, idx)
    if add is not None:
        out = (out.float() + _rows(add, idx).float()).to(x.dtype)
    return out


def scatter_tokens(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst[b, idx[b, j]] = src[b, j]`` in place; returns ``dst``. Rows not in ``idx`` are left untouched."""
    return dst.scatter_(1, idx.long().unsqueeze(-1).expand(-1, -1, dst.shape[-1]), src)
