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


MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # added to the sample index so that (sample 0, seed 0) avoids lowbias32's fixed point 0


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors x in [0, 2**32) and a constant c < 2**32, without int64 overflow: the
    product is split at 16 bits of c (each partial product < 2**48)."""
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash (a bijection of uint32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_scores(seed: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
    """Per-token score R [B, N] (fp32) of metric ``random``: uniform in [0, 1) from a counter-based hash.

    With H = lowbias32, lo / hi the low / high 32 bits of ``seed[0]`` (an int64 read on its device, no host sync):
        v_b  = H(lo ^ H(hi ^ H((b + 0x9E3779B9) mod 2**32)))      (one value per sample b)
        bits = H(v_b ^ t)                                         (token t, 0 <= t < N)
        R    = (bits >> 8) * 2**-24                               (the top 24 bits: exact in fp32)
    The Triton kernel computes the same bits in uint32 arithmetic.
    """
    s = seed.reshape(1).to(torch.int64)
    lo, hi = s & MASK32, (s >> 32) & MASK32
    b = torch.arange(batch, dtype=torch.int64, device=seed.device)
    v = lowbias32(lo ^ lowbias32(hi ^ lowbias32((b + GOLDEN32) & MASK32)))  # [B]
    t = torch.arange(num_tokens, dtype=torch.int64, device=seed.device)
    bits = lowbias32(v[:, None] ^ t[None, :])
    return (bits >> 8).to(torch.float32) * 2.0**-24


def region_scores(
    signal: torch.Tensor,
    patch_size: int | Sequence[int],
    metric: str,
    seed: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token score R [B, N] (fp32): per-pixel (voxel) channel std (unbiased) or L2 norm, averaged over each
    patch; for metric ``random``, :func:`random_scores` of ``seed`` (the signal only gives B and N).

    Metric ``delta``: the change d = the L2 metric of ``signal - previous`` (fp32), except that a token with d == 0
    exactly (not recomputed: its signal equals ``previous`` bit for bit) keeps its entry of ``scores`` [B, N] (its
    last observed change). ``scores`` is only read here; :func:`select_regions` writes R back into it.

    Metric ``attention``: R is ``scores`` [B, N] itself (read only; the signal gives only B and N).
    """
    if metric == "attention":
        return scores
    if metric == "delta":
        change = region_scores(signal.float() - previous.float(), patch_size, "l2")
        return torch.where(change == 0, scores, change)
    x, (pt, ph, pw) = as_video(signal.float() if metric != "random" else signal, patch_size)
    if metric == "random":
        n = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        return random_scores(seed, x.shape[0], n)
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
    seed: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Active token indices [B, num_active] (int64, ascending); ``counters`` += 1 where a token is dropped.

    Ties in priority are broken by token index: a stable ascending sort, so the lower index ranks first. With
    ``shards`` = P the tokens form P consecutive runs of N / P (in token order) and each run keeps num_active / P of
    its own tokens by the same rule (the band rule applied within the run), as P ranks of a sequence-parallel run
    would each choose from their own part of the sequence.

    ``metric="random"`` draws the scores from ``seed`` ([1] int64, :func:`random_scores`), then adds 1 to it in place.
    ``metric="delta"`` ranks each token's change from ``previous`` (the carry-over of :func:`region_scores`) and
    writes those scores into ``scores`` ([B, N] fp32) in place. ``metric="attention"`` ranks ``scores`` as given
    (read only).
    """
    r = region_scores(signal, patch_size, metric, seed, previous, scores)
    prio = priorities(r, counters, starvation_scale, mode)
    if metric == "random":
        seed += 1
    if metric == "delta":
        scores.copy_(r.detach())  # state, not a result: no autograd history in it
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
