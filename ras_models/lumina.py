"""RAS adapter for diffusers' ``LuminaNextDiT2DModel`` (Lumina-Next-SFT).

Patched on the instance only: ``patch_embedder`` (gather the active token rows and their RoPE rows),
``norm_out`` (merge the active rows into the per-token output cache so unpatchify sees all N), the self- and
cross-attention processors of every layer, and ``forward`` (begins the step).

Self-attention: q/k after QK-norm and RoPE; the cache holds post-RoPE, GQA-compressed k/v [B, N, Hkv, d]. The
proportional-attention scale ``sqrt(log_base(N)) / sqrt(d)`` uses the full image token count N. The self-attention
mask LuminaPatchEmbed builds is all-true, so none is applied. Cross-attention: only the queries are reduced; the
caption keys/values are full and the caption padding mask applies.
"""

from __future__ import annotations

import math

from ras_kernels import flash_attention

from .handle import RASHandle


def _project(attn, hidden_states, context, query_rope, key_rope):
    """q [B, L, H, d], k/v [B, S, Hkv, d] as diffusers' LuminaAttnProcessor2_0 forms them."""
    from diffusers.models.embeddings import apply_rotary_emb

    b = hidden_states.shape[0]
    q = attn.to_q(hidden_states)
    k = attn.to_k(context)
    v = attn.to_v(context)
    dtype = q.dtype
    d = q.shape[-1] // attn.heads
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q = q.view(b, -1, attn.heads, d)
    k = k.view(b, -1, k.shape[-1] // d, d)
    v = v.view(b, -1, v.shape[-1] // d, d)
    if query_rope is not None:
        q = apply_rotary_emb(q, query_rope, use_real=False)
    if key_rope is not None:
        k = apply_rotary_emb(k, key_rope, use_real=False)
    return q.to(dtype), k.to(dtype), v


class LuminaRASAttnProcessor:
    """Lumina-Next attention on the active tokens.

    With a layer ``key``: self-attention over that layer's whole-image K/V cache, with the proportional scale of
    the full N. Without one: cross-attention of the active tokens (with their RoPE rows) over the full, padded
    caption.
    """

    def __init__(self, handle: RASHandle, key: str | None = None):
        self.session = handle.session
        self.key = key

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask=None,
        query_rotary_emb=None,
        key_rotary_emb=None,
        base_sequence_length=None,
    ):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states, query_rotary_emb, key_rotary_emb)
        if self.key is None:
            mask = None if attention_mask is None else attention_mask.bool()
            return flash_attention(q, k, v, key_mask=mask, scale=attn.scale)
        scale = attn.scale
        if base_sequence_length is not None:
            scale = math.sqrt(math.log(self.session.num_tokens, base_sequence_length)) * attn.scale
        return self.session.attend(self.key, q, k, v, scale=scale)


def patch_lumina(handle: RASHandle, transformer) -> None:
    """Patch one ``LuminaNextDiT2DModel`` instance for RAS (see the module docstring)."""
    from diffusers.models.attention_processor import LuminaAttnProcessor2_0

    session = handle.session
    for i, layer in enumerate(transformer.layers):
        for name in ("attn1", "attn2"):
            processor = getattr(layer, name).processor
            if type(processor) is not LuminaAttnProcessor2_0:
                raise ValueError(
                    f"layers.{i}.{name} uses {type(processor).__name__}; RAS supports Lumina-Next attention with "
                    "diffusers' LuminaAttnProcessor2_0 only"
                )

    def forward(original, hidden_states, *args, **kwargs):
        return handle.run_step(original, hidden_states, *args, **kwargs)

    def patch_embedder(original, x, freqs_cis):
        tokens, mask, sizes, rope = original(x, freqs_cis)
        return session.gather(tokens), mask, sizes, session.gather_rows(rope)

    def norm_out(original, x, *args, **kwargs):
        return session.scatter_output(original(x, *args, **kwargs))

    cross = LuminaRASAttnProcessor(handle)
    for i, layer in enumerate(transformer.layers):
        handle.patch(layer.attn1, "processor", LuminaRASAttnProcessor(handle, f"layers.{i}.attn1"))
        handle.patch(layer.attn2, "processor", cross)
    handle.wrap_method(transformer.patch_embedder, "forward", patch_embedder)
    handle.wrap_method(transformer.norm_out, "forward", norm_out)
    handle.wrap_method(transformer, "forward", forward)
