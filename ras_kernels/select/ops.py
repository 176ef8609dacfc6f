"""Public ``select_regions``: validation and backend dispatch."""

from __future__ import annotations

import math

import torch

from .._backend import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from . import reference

METRICS = ("std", "l2")
MODES = ("reference", "paper")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {accepted}, got {value}")
    return value


def validate_select_args(
    signal, num_active, patch_size, metric, counters, starvation_scale, mode, high_ratio
) -> int:
    """Check every argument of :func:`select_regions`; return the token count N."""
    check_tensor("signal", signal, ndim=4, dtypes=FLOAT_DTYPES)
    b, c, h, w = signal.shape
    _check_int("patch_size", patch_size, 1)
    if h % patch_size or w % patch_size:
        raise ValueError(f"signal height and width ({h}, {w}) must be divisible by patch_size={patch_size}")
    n = (h // patch_size) * (w // patch_size)
    if n == 0:
        raise ValueError(f"signal has no tokens (shape {tuple(signal.shape)})")
    _check_int("num_active", num_active, 1, n)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "std" and c < 2:
        raise ValueError(f"metric='std' needs at least 2 channels (unbiased std), signal has C={c}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(high_ratio, (int, float)) or isinstance(high_ratio, bool) or not 0.0 <= high_ratio <= 1.0:
        raise ValueError(f"high_ratio must be a float in [0, 1], got {high_ratio!r}")
    if (
        not isinstance(starvation_scale, (int, float))
        or isinstance(starvation_scale, bool)
        or not math.isfinite(starvation_scale)
        or starvation_scale < 0
    ):
        raise ValueError(f"starvation_scale must be a finite float >= 0, got {starvation_scale!r}")
    if counters is not None:
        check_tensor("counters", counters, ndim=2, dtypes=INDEX_DTYPES, device=signal.device)
        if tuple(counters.shape) != (b, n):
            raise ValueError(f"counters must have shape (B, N) = ({b}, {n}), got {tuple(counters.shape)}")
    return n


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
    """Choose the ``num_active`` patch tokens each sample recomputes at the next RAS step.

    Args:
        signal: [B, C, H, W] float tensor, the guided model output of the step just taken.
        num_active: K, the number of tokens to keep, 1 <= K <= N = (H / patch_size) * (W / patch_size).
        patch_size: p; token t covers the p x p latent pixels of patch t in row-major patch order.
        metric: ``"std"`` (unbiased channel std per pixel) or ``"l2"`` (channel L2 norm per pixel).
        counters: optional [B, N] int32/int64 starvation counts D, updated in place (+1 for every dropped token).
        starvation_scale: k >= 0 in the priority ``R * exp(+-k D)``.
        mode: ``"reference"`` (``exp(+k D)``, the public code's rule) or ``"paper"`` (``exp(-k D)``).
        high_ratio: share in [0, 1] of the dropped tokens taken from the highest priorities; the rest
            come from the lowest, and the K tokens in between stay active.

    Returns:
        [B, K] int64 token indices, ascending. Equal priorities rank by token index (stable sort).
    """
    validate_select_args(signal, num_active, patch_size, metric, counters, starvation_scale, mode, high_ratio)
    return reference.select_regions(
        signal,
        num_active,
        patch_size=patch_size,
        metric=metric,
        counters=counters,
        starvation_scale=float(starvation_scale),
        mode=mode,
        high_ratio=float(high_ratio),
    )
