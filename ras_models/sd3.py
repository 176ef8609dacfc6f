"""RAS adapter for diffusers' ``SD3Transformer2DModel`` (SD3-medium; SD3.5 with QK-norm and dual attention).

Declared on the adapter layer (``ras_models.adapter``): the gather point ``pos_embed`` (the active rows after patch +
position embedding, fused into one pass), the scatter point ``proj_out``, every joint attention (K/V cache, text keys
as extra rows; SD3.5's ``attn2`` is image self-attention with its own cache), every block's fused ``forward`` (the
same maths with the per-token elementwise work fused: adaLN LayerNorm + modulation, gate + residual + the next
LayerNorm), and the forward arguments RAS refuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from einops import rearrange

from ras_kernels import adaptive_norm, gated_residual, gated_residual_norm

from .adapter import Attention, ModelAdapter, RASProcessor
from .config import RASConfig


class SD3RASAttnProcessor(RASProcessor):
    """Joint attention of the active image tokens (+ text tokens) over the layer's whole-image K/V cache."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("RAS SD3 attention takes no attention_mask (SD3 pipelines pass none)")
        b, n_img, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        d = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d) for t in (q, k, v))
        # The per-head norms act on the last dimension, so the [B, L, H, d] layout gives diffusers' result.
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is None:
            out = self.session.attend(self.key, q, k, v)
            text_out = None
        else:
            tq = attn.add_q_proj(encoder_hidden_states).view(b, -1, heads, d)
            tk = attn.add_k_proj(encoder_hidden_states).view(b, -1, heads, d)
            tv = attn.add_v_proj(encoder_hidden_states).view(b, -1, heads, d)
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            out = self.session.attend(self.key, torch.cat([q, tq], dim=1), k, v, k_extra=tk, v_extra=tv)
            out, text_out = out[:, :n_img], out[:, n_img:]
        out = attn.to_out[1](attn.to_out[0](out.reshape(b, n_img, heads * d)))
        if text_out is None:
            return out
        text_out = text_out.reshape(b, -1, heads * d)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def _block_forward(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """diffusers' ``JointTransformerBlock.forward`` with its elementwise work in fused kernels: per stream one
    LayerNorm + modulation, one gate + residual + LayerNorm + modulation, one gate + residual."""
    if block._chunk_size is not None:
        raise ValueError("RAS does not support chunked feed-forward (set_chunk_feed_forward); reset it to None")
    kwargs = joint_attention_kwargs or {}
    norm1, norm1_context = block.norm1, block.norm1_context
    mods = norm1.linear(norm1.silu(temb)).chunk(9 if block.use_dual_attention else 6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    x = adaptive_norm(hidden_states, scale_msa, shift_msa, eps=norm1.norm.eps)
    if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), no gates, no context feed-forward
        c_scale, c_shift = norm1_context.linear(norm1_context.silu(temb).to(hidden_states.dtype)).chunk(2, dim=1)
    else:
        c_mods = norm1_context.linear(norm1_context.silu(temb)).chunk(6, dim=1)
        c_shift, c_scale = c_mods[:2]
    context = adaptive_norm(encoder_hidden_states, c_scale, c_shift, eps=norm1_context.norm.eps)

    attn_output, context_attn_output = block.attn(hidden_states=x, encoder_hidden_states=context, **kwargs)
    if block.use_dual_attention:
        shift_msa2, scale_msa2, gate_msa2 = mods[6:]
        attn_output2 = block.attn2(
            hidden_states=adaptive_norm(hidden_states, scale_msa2, shift_msa2, eps=norm1.norm.eps), **kwargs
        )
        hidden_states = gated_residual(hidden_states, attn_output, gate_msa)
        attn_output, gate_msa = attn_output2, gate_msa2
    hidden_states, x = gated_residual_norm(
        hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp, eps=block.norm2.eps
    )
    hidden_states = gated_residual(hidden_states, block.ff(x), gate_mlp)
    if block.context_pre_only:
        return None, hidden_states
    c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods[2:]
    encoder_hidden_states, context = gated_residual_norm(
        encoder_hidden_states, context_attn_output, c_gate_msa, c_scale_mlp, c_shift_mlp, eps=block.norm2_context.eps
    )
    encoder_hidden_states = gated_residual(encoder_hidden_states, block.ff_context(context), c_gate_mlp)
    return encoder_hidden_states, hidden_states


def _check_block(name: str, block) -> None:
    """The fused block forward reproduces diffusers' for these norm layouts only."""
    norm1 = SD35AdaLayerNormZeroX if block.use_dual_attention else AdaLayerNormZero
    context = AdaLayerNormContinuous if block.context_pre_only else AdaLayerNormZero
    layer_norms = [getattr(block.norm1, "norm", None), getattr(block.norm1_context, "norm", None), block.norm2]
    layer_norms += [block.norm2_context] if not block.context_pre_only else []
    if (
        type(block.norm1) is not norm1
        or getattr(block.norm1, "emb", None) is not None
        or type(block.norm1_context) is not context
        or getattr(block.norm1_context, "emb", None) is not None
        or any(type(n) is not torch.nn.LayerNorm or n.elementwise_affine for n in layer_norms)
    ):
        raise ValueError(f"{name} has a norm layout RAS does not know (SD3 / SD3.5 JointTransformerBlock expected)")


class SD3Adapter(ModelAdapter):
    transformer_class = SD3Transformer2DModel
    family = "SD3"
    preset = RASConfig.sd3
    gather_at = "pos_embed"
    attention = (
        Attention("transformer_blocks.*.attn", "joint", JointAttnProcessor2_0),
        Attention("transformer_blocks.*.attn2", "self", JointAttnProcessor2_0),  # SD3.5 dual attention
    )
    processors = {"joint": SD3RASAttnProcessor, "self": SD3RASAttnProcessor}
    processor_hint = " (reset with transformer.set_default_attn_processor() or unfuse QKV)"
    scatter_at = "proj_out"
    fused_blocks = {"transformer_blocks.*": _block_forward}
    check_fused = staticmethod(_check_block)
    unsupported = dict.fromkeys(
        ("block_controlnet_hidden_states", "skip_layers"), "the active token count differs per step"
    )

    def gather(self, original, latent):
        embed = self.transformer.pos_embed
        if not (embed.pos_embed is not None and embed.pos_embed_max_size and embed.flatten and not embed.layer_norm):
            return super().gather(original, latent)
        # The stride-p patch convolution is a per-patch linear map; its rows and the cropped sin-cos table's rows
        # are then gathered and summed in one pass (no full-N add, no transpose copy).
        p = embed.patch_size
        patches = rearrange(latent, "b c (y p) (x q) -> b (y x) (c p q)", p=p, q=p)
        tokens = F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias)
        return self.session.gather(tokens, add=embed.cropped_pos_embed(*latent.shape[-2:]))
