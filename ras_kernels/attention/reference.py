"""Plain-PyTorch reference for attention over a per-layer K/V cache.

Shapes: ``q`` [B, Lq, Hq, d]; ``k_new``/``v_new`` [B, K, Hkv, d]; ``k_cache``/``v_cache`` [B, N, Hkv, d];
``idx`` [B, K]; ``k_extra``/``v_extra`` [B, T, Hkv, d]; result [B, Lq, Hq, d]. Query head h reads kv head
``h // (Hq / Hkv)`` (grouped-query attention, as ``repeat_interleave`` on the head dimension).
"""

from __future__ import annotations

import torch


def write_cache(cache: torch.Tensor, idx: torch.Tensor, new: torch.Tensor) -> None:
    """``cache[b, idx[b, j]] = new[b, j]`` for every head, in place."""
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None]
    cache[rows, idx.long()] = new


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v in fp32 with GQA; q [B, Lq, Hq, d], k/v [B, Lk, Hkv, d]; returns q's dtype.

    ``mask``: optional [B, Lk] bool, False for keys no query may see; a query that sees no key gets zeros.
    ``return_lse``: also return logsumexp of the scaled scores over the visible keys, [B, Hq, Lq] fp32 (natural
    log; -inf where no key is visible).
    """
    group = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        # softmax of an all -inf row is NaN: such a query sees nothing and gets zeros.
        probs = torch.where(torch.isneginf(lse)[..., None], 0.0, probs)
    out = (probs @ vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


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
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Write k_new/v_new into the caches at ``idx``, then attend q over [cache rows 0..N-1, extra rows].

    ``extra_mask`` [B, T] bool hides the extra keys where False (cache rows are always visible);
    ``return_lse`` also returns the [B, Hq, Lq] fp32 log-sum-exp of the scaled scores.
    """
    write_cache(k_cache, idx, k_new)
    write_cache(v_cache, idx, v_new)
    k, v, mask = k_cache, v_cache, None
    if k_extra is not None:
        k = torch.cat([k, k_extra], dim=1)
        v = torch.cat([v, v_extra], dim=1)
        if extra_mask is not None:
            visible = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
            mask = torch.cat([visible, extra_mask], dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return attention(q, k, v, scale, mask, return_lse=return_lse)
