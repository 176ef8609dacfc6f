"""Plain-PyTorch reference for token gather and scatter.

Shapes: ``x``/``dst`` [B, N, D]; ``idx`` [B, K] token indices (int32 or int64); ``src`` and the gather result
[B, K, D].
"""

from __future__ import annotations

import torch


def _expand(idx: torch.Tensor, dim: int) -> torch.Tensor:
    return idx.long().unsqueeze(-1).expand(-1, -1, dim)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = x[b, idx[b, j]]``."""
    return torch.gather(x, 1, _expand(idx, x.shape[-1]))


def scatter_tokens(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst[b, idx[b, j]] = src[b, j]`` in place; returns ``dst``."""
    return dst.scatter_(1, _expand(idx, dst.shape[-1]), src)
