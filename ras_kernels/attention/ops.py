"""Public ``cached_kv_attention``: validation and backend dispatch."""

from __future__ import annotations

import math

import torch

from .._backend import FLOAT_DTYPES, check_tensor
from ..gather.ops import validate_index
from . import reference


def validate_attention_args(q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, scale) -> None:
    """Check every argument of :func:`cached_kv_attention`."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, lq, hq, d = q.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    n, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must have shape (B={b}, N, Hkv, d={d}), got {tuple(k_cache.shape)}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    validate_index("idx", idx, b, n, q.device)
    kk = idx.shape[1]
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
        if tuple(t.shape) != (b, kk, hkv, d):
            raise ValueError(f"{name} must have shape (B, K, Hkv, d) = {(b, kk, hkv, d)}, got {tuple(t.shape)}")
    if (k_extra is None) != (v_extra is None):
        raise ValueError("k_extra and v_extra must be given together")
    if k_extra is not None:
        check_tensor("k_extra", k_extra, ndim=4, dtypes=(q.dtype,), device=q.device)
        t = k_extra.shape[1]
        if tuple(k_extra.shape) != (b, t, hkv, d):
            raise ValueError(f"k_extra must have shape (B, T, Hkv, d) = {(b, t, hkv, d)}, got {tuple(k_extra.shape)}")
        check_tensor("v_extra", v_extra, ndim=4, dtypes=(q.dtype,), device=q.device)
        if v_extra.shape != k_extra.shape:
            raise ValueError(f"v_extra shape {tuple(v_extra.shape)} differs from k_extra {tuple(k_extra.shape)}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")


def cached_kv_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    idx: torch.Tensor,
    *,
    k_extra: torch.Tensor | None = None,
    v_extra: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of the active (and text) queries over a whole-image K/V cache refreshed in place.

    Writes ``k_new``/``v_new`` [B, K, Hkv, d] into ``k_cache``/``v_cache`` [B, N, Hkv, d] at rows ``idx`` [B, K],
    then returns softmax(q k^T * scale) v for q [B, Lq, Hq, d] over the keys/values [cache rows 0..N-1, then
    ``k_extra``/``v_extra`` [B, T, Hkv, d] rows], shape [B, Lq, Hq, d]. Hq must be a multiple of Hkv (query head
    h reads kv head h // (Hq / Hkv)). ``scale`` defaults to 1 / sqrt(d). All tensors share one float dtype.
    """
    validate_attention_args(q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, scale)
    return reference.cached_kv_attention(
        q, k_new, v_new, k_cache, v_cache, idx, k_extra=k_extra, v_extra=v_extra, scale=scale
    )
