"""Plain-PyTorch reference for attention over a per-layer K/V cache.

Shapes: ``q`` [B, Lq, Hq, d]; ``k_new``/``v_new`` [B, K, Hkv, d]; ``k_cache``/``v_cache`` [B, N, Hkv, d];
``idx`` [B, K]; ``k_extra``/``v_extra`` [B, T, Hkv, d]; result [B, Lq, Hq, d]. Query head h reads kv head
``h // (Hq / Hkv)`` (grouped-query attention, as ``repeat_interleave`` on the head dimension).

fp8 caches (``float8_e4m3fn``) hold each (row, head) of K and V as e4m3 values times an fp32 scale kept beside the
cache ([B, N, Hkv]): see :func:`quantize_fp8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import device_of

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] as (e4m3 values [..., d], fp32 scales [...]): each row's scale is its largest magnitude / 448 (1 for
    an all-zero row), and x / scale, clamped to +-448, is rounded to the nearest e4m3 value. x ~ values * scale."""
    amax = x.float().abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    values = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


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
    # Contiguous fp32 copies: torch's memory-efficient kernel finds no variant for some strided fp32 inputs.
    qf, kf, vf = (t.float().transpose(1, 2).contiguous() for t in (q, k, v))
    # fp32 in, fp32 accumulation: torch's fused attention gives softmax(q k^T * scale) v without materialising the
    # [Lq, Lk] scores (the CPU path of every RAS step runs this reference).
    keys = None if mask is None else mask[:, None, None, :]
    with device_of(q):  # the fused kernels pick their variant by the current device's properties
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=keys, scale=scale, enable_gqa=group > 1)
    if mask is not None:
        # A query that sees no key gets zeros (the fused softmax of an all-masked row is NaN).
        out = torch.where(mask.any(dim=1)[:, None, None, None], out, 0.0)
    result = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)  # [B, Lq, Hq, d], as the kernel
    result.copy_(out.transpose(1, 2))
    if not return_lse:
        return result
    scores = qf @ kf.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~keys, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return result, lse


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
    k_cache_scale: torch.Tensor | None = None,
    v_cache_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Write k_new/v_new into the caches at ``idx``, then attend q over [cache rows 0..N-1, extra rows].

    ``extra_mask`` [B, T] bool hides the extra keys where False (cache rows are always visible);
    ``return_lse`` also returns the [B, Hq, Lq] fp32 log-sum-exp of the scaled scores. fp8 caches: k_new/v_new are
    quantized (:func:`quantize_fp8`) into the caches and ``k_cache_scale``/``v_cache_scale`` [B, N, Hkv], and the
    attention reads the dequantized caches.
    """
    if k_cache.dtype == torch.float8_e4m3fn:
        for cache, cache_scale, new in ((k_cache, k_cache_scale, k_new), (v_cache, v_cache_scale, v_new)):
            values, row_scale = quantize_fp8(new)
            write_cache(cache, idx, values)
            write_cache(cache_scale, idx, row_scale)
        k, v = (cache.float() * s[..., None] for cache, s in ((k_cache, k_cache_scale), (v_cache, v_cache_scale)))
    else:
        write_cache(k_cache, idx, k_new)
        write_cache(v_cache, idx, v_new)
        k, v = k_cache, v_cache
    mask = None
    if k_extra is not None:
        k = torch.cat([k, k_extra.to(k.dtype)], dim=1)
        v = torch.cat([v, v_extra.to(v.dtype)], dim=1)
        if extra_mask is not None:
            visible = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
            mask = torch.cat([visible, extra_mask], dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return attention(q, k, v, scale, mask, return_lse=return_lse)
