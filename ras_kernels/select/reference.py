"""Plain-PyTorch reference for region selection: the spec, in fp32, readable.

Shapes: ``signal`` [B, C, H, W]; N = (H / p) * (W / p) patch tokens in row-major patch order;
``counters`` [B, N]; the result [B, K] holds token indices sorted ascending.
"""

from __future__ import annotations

import torch


def band_start(num_tokens: int, num_active: int, high_ratio: float) -> int:
    """Rank of the first active token once priorities are sorted ascending.

    Of the ``skip = N - K`` dropped tokens, ``int(skip * (1 - high_ratio))`` are the lowest-priority ones and the
    rest the highest, so the active tokens are ranks ``[start, start + K)``. Host arithmetic shared by every backend.
    """
    skip = num_tokens - num_active
    return int(skip * (1.0 - high_ratio))


def region_scores(signal: torch.Tensor, patch_size: int, metric: str) -> torch.Tensor:
    """Per-token score R [B, N] (fp32): per-pixel channel std (unbiased) or L2 norm, averaged over each patch."""
    x = signal.float()
    per_pixel = x.std(dim=1, unbiased=True) if metric == "std" else x.pow(2).sum(dim=1).sqrt()
    b, h, w = per_pixel.shape
    p = patch_size
    patches = per_pixel.reshape(b, h // p, p, w // p, p)
    return patches.mean(dim=(2, 4)).reshape(b, -1)


def priorities(scores: torch.Tensor, counters: torch.Tensor | None, starvation_scale: float, mode: str) -> torch.Tensor:
    """``R * exp(+k D)`` in ``reference`` mode, ``R * exp(-k D)`` in ``paper`` mode (fp32)."""
    if counters is None:
        return scores
    sign = 1.0 if mode == "reference" else -1.0
    return scores * torch.exp(sign * starvation_scale * counters.float())


def select_regions(
    signal: torch.Tensor,
    num_active: int,
    *,
    patch_size: int = 2,
    metric: str = "std",
    counters: torch.Tensor | None = None,
    starvation_scale: float = 0.1,
    mode: str = "reference",
    high_ratio: float = 1.0,
) -> torch.Tensor:
    """Active token indices [B, num_active] (int64, ascending); ``counters`` += 1 where a token is dropped.

    Ties in priority are broken by token index: a stable ascending sort, so the lower index ranks first.
    """
    prio = priorities(region_scores(signal, patch_size, metric), counters, starvation_scale, mode)
    b, n = prio.shape
    order = torch.sort(prio, dim=1, stable=True).indices
    start = band_start(n, num_active, high_ratio)
    active = order[:, start : start + num_active].sort(dim=1).values
    if counters is not None:
        dropped = torch.ones(b, n, dtype=torch.bool, device=prio.device)
        dropped.scatter_(1, active, False)
        counters += dropped.to(counters.dtype)
    return active
