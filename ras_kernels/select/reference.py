"""Plain-PyTorch reference for region selection: the spec, in fp32, readable.

Shapes: ``signal`` [B, C, H, W] (image) or [B, C, T, H, W] (video); N = (H / ph) * (W / pw) patch tokens of an
image, (T / pt) * (H / ph) * (W / pw) of a video, in row-major (t, h, w) patch order; ``counters`` [B, N]; the
result [B, K] holds token indices sorted ascending. Every signal rank and patch shape the public op validates is
supported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_video(signal: torch.Tensor, patch_size: int | Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The signal as a [B, C, T, H, W] view (an image gets T = 1) and its patch as (pt, ph, pw).

    ``patch_size``: an int p ((1, p, p)) or (ph, pw) for an image, (pt, ph, pw) for a video; assumed validated.
    """
    if signal.dim() == 4:
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        return signal.unsqueeze(2), (1, int(ph), int(pw))
    pt, ph, pw = patch_size
    return signal, (int(pt), int(ph), int(pw))


def band_start(num_tokens: int, num_active: int, high_ratio: float) -> int:
    """Rank of the first active token once priorities are sorted ascending.

    Of the ``skip = N - K`` dropped tokens, ``int(skip * (1 - high_ratio))`` are the lowest-priority ones and the
    rest the highest, so the active tokens are ranks ``[start, start + K)``. Host arithmetic shared by every backend.
    """
    skip = num_tokens - num_active
    return int(skip * (1.0 - high_ratio))


def region_scores(signal: torch.Tensor, patch_size: int | Sequence[int], metric: str) -> torch.Tensor:
    """Per-token score R [B, N] (fp32): per-pixel (voxel) channel std (unbiased) or L2 norm, averaged over each
    patch."""
    x, (pt, ph, pw) = as_video(signal.float(), patch_size)
    per_voxel = x.std(dim=1, unbiased=True) if metric == "std" else x.pow(2).sum(dim=1).sqrt()
    b, t, h, w = per_voxel.shape
    patches = per_voxel.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw)
    return patches.mean(dim=(2, 4, 6)).reshape(b, -1)


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
    patch_size: int | Sequence[int] = 2,
    metric: str = "std",
    counters: torch.Tensor | None = None,
    starvation_scale: float = 0.1,
    mode: str = "reference",
    high_ratio: float = 1.0,
    shards: int = 1,
) -> torch.Tensor:
    """Active token indices [B, num_active] (int64, ascending); ``counters`` += 1 where a token is dropped.

    Ties in priority are broken by token index: a stable ascending sort, so the lower index ranks first. With
    ``shards`` = P the tokens form P consecutive runs of N / P (in token order) and each run keeps num_active / P of
    its own tokens by the same rule (the band rule applied within the run), as P ranks of a sequence-parallel run
    would each choose from their own part of the sequence.
    """
    prio = priorities(region_scores(signal, patch_size, metric), counters, starvation_scale, mode)
    b, n = prio.shape
    run, keep = n // shards, num_active // shards
    order = torch.sort(prio.reshape(b * shards, run), dim=1, stable=True).indices
    start = band_start(run, keep, high_ratio)
    offsets = torch.arange(shards, device=prio.device).repeat(b).unsqueeze(1) * run
    active = (order[:, start : start + keep].sort(dim=1).values + offsets).reshape(b, num_active)
    if counters is not None:
        dropped = torch.ones(b, n, dtype=torch.bool, device=prio.device)
        dropped.scatter_(1, active, False)
        counters += dropped.to(counters.dtype)
    return active
