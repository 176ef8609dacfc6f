"""RAS adapter for diffusers' ``LuminaNextDiT2DModel`` (Lumina-Next-SFT).

Declared on the adapter layer (``ras_models.adapter``): the gather point ``patch_embedder`` (the active token rows and
their RoPE rows), the scatter point ``norm_out``, the self- and cross-attention of every layer, and every layer's
fused ``forward`` (the same maths with the elementwise work fused: RMSNorm + modulation, tanh gates + post-norm +
residual + the next RMSNorm, QK LayerNorm + RoPE, SwiGLU).

Self-attention: q/k after QK-norm and RoPE; the cache holds post-RoPE, GQA-compressed k/v [B, N, Hkv, d]. The
proportional-attention scale ``sqrt(log_base(N)) / sqrt(d)`` uses the full image token count N. The self-attention
mask LuminaPatchEmbed builds is all-true, so none is applied. Cross-attention: only the queries are reduced; the
caption keys/values are full and the caption padding mask applies.

RoPE table: LuminaPipeline builds a 384 x 384 x d/2 complex64 table on the host every step (42 MB at d = 72) and the
model copies it to the device. While any handle is applied, the pipeline module's builder is memoised (same
arguments, same tensor object; a generation uses one or two tables, before and after the scaling watershed), and the
adapter keeps one device copy per host table (swapped in before each step), so neither the host work nor the copy
repeats per step.
"""

from __future__ import annotations

import collections
import math

import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.activations import FP32SiLU
from diffusers.models.attention import LuminaFeedForward
from diffusers.models.attention_processor import LuminaAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import LuminaRMSNormZero, RMSNorm
from torch.utils.weak import WeakIdKeyDictionary

from ras_kernels import adaptive_norm, flash_attention, gated_residual, gated_residual_norm, swiglu

from .adapter import Attention, ModelAdapter, RASProcessor
from .config import RASConfig
from .handle import RASHandle

_ROPE_BUILDER = "get_2d_rotary_pos_embed_lumina"  # the name LuminaPipeline calls every step
_ROPE_TABLES = 4  # distinct tables memoised: a generation uses one or two, so two resolutions fit


class _MemoisedRope:
    """Stands in for ``get_2d_rotary_pos_embed_lumina`` in diffusers' LuminaPipeline module while any RAS handle
    holds it: the same arguments return the same tensor, built once by the module's own function.

    Reference-counted: the first hold installs it, the last release puts the module's function object back (unless
    something replaced the stand-in since) and drops the tables, whatever order handles are removed in.
    """

    def __init__(self):
        self.holds = 0
        self.original = None
        self.tables: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    def __call__(self, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        table = self.tables.pop(key, None)
        if table is None:
            table = self.original(*args, **kwargs)
        self.tables[key] = table  # most recently used last
        if len(self.tables) > _ROPE_TABLES:
            self.tables.popitem(last=False)
        return table

    def hold(self) -> None:
        from diffusers.pipelines.lumina import pipeline_lumina  # needs transformers: imported when a Lumina is patched

        if self.holds == 0:
            self.original = getattr(pipeline_lumina, _ROPE_BUILDER)
            setattr(pipeline_lumina, _ROPE_BUILDER, self)
        self.holds += 1

    def release(self) -> None:
        from diffusers.pipelines.lumina import pipeline_lumina

        self.holds -= 1
        if self.holds == 0:
            if getattr(pipeline_lumina, _ROPE_BUILDER) is self:  # a value someone put there since stays, as patches do
                setattr(pipeline_lumina, _ROPE_BUILDER, self.original)
            self.original = None
            self.tables.clear()


_MEMOISED_ROPE = _MemoisedRope()


class _DeviceTables:
    """One device copy per host table and image size, kept while that tensor lives and is unchanged (its version
    counter): the RoPE table a pipeline hands the transformer every step is then copied to the device once per table,
    not once per step (by the model, or before each CUDA graph replay). Only the rows the image uses are copied (the
    model slices ``table[:rows, :cols]``, which leaves such a copy whole): 1.2 MB instead of 42 MB at 1024^2."""

    def __init__(self):
        self.copies = WeakIdKeyDictionary()

    def __call__(self, table: torch.Tensor, device: torch.device, rows: int, cols: int) -> torch.Tensor:
        if table.device == device:
            return table
        version, copies = self.copies.get(table, (None, None))
        if version != table._version:
            version, copies = table._version, {}
            self.copies[table] = (version, copies)
        key = (device, rows, cols)
        if key not in copies:
            copies[key] = table[:rows, :cols].to(device)
        return copies[key]


def _norm_rope(x, norm, rope, d):
    """QK-norm (LayerNorm across heads) and RoPE of x [B, L, H * d] in one pass -> [B, L, H, d]."""
    b = x.shape[0]
    if norm is not None:
        x = adaptive_norm(x, norm="layer", weight=norm.weight, bias=norm.bias, eps=norm.eps, rope=rope)
    elif rope is not None:
        return apply_rotary_emb(x.view(b, -1, x.shape[-1] // d, d), rope, use_real=False).to(x.dtype)
    return x.view(b, -1, x.shape[-1] // d, d)


def _project(attn, hidden_states, context, query_rope, key_rope):
    """q [B, L, H, d], k/v [B, S, Hkv, d] as diffusers' LuminaAttnProcessor2_0 forms them."""
    q = attn.to_q(hidden_states)
    k = attn.to_k(context)
    v = attn.to_v(context)
    d = q.shape[-1] // attn.heads
    q = _norm_rope(q, attn.norm_q, query_rope, d)
    k = _norm_rope(k, attn.norm_k, key_rope, d)
    return q, k, v.view(*v.shape[:2], -1, d)


class LuminaRASAttnProcessor(RASProcessor):
    """Lumina-Next attention on the active tokens.

    With a layer ``key``: self-attention over that layer's whole-image K/V cache, with the proportional scale of
    the full N. Without one: cross-attention of the active tokens (with their RoPE rows) over the full, padded
    caption.
    """

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


def _layer_forward(
    layer,
    hidden_states,
    attention_mask,
    image_rotary_emb,
    encoder_hidden_states,
    encoder_mask,
    temb,
    cross_attention_kwargs=None,
):
    """diffusers' ``LuminaNextDiTBlock.forward`` with its elementwise work in fused kernels: the input RMSNorm +
    modulation, the tanh-gated mix of self- and cross-attention, and per sub-layer one post-RMSNorm + tanh gate +
    residual (+ the next RMSNorm + modulation), and the feed-forward's SwiGLU activation."""
    kwargs = cross_attention_kwargs or {}
    norm1 = layer.norm1
    scale_msa, gate_msa, scale_mlp, gate_mlp = norm1.linear(norm1.silu(temb)).chunk(4, dim=1)
    x = adaptive_norm(hidden_states, scale_msa, norm="rms", weight=norm1.norm.weight, eps=norm1.norm.eps)
    self_out = layer.attn1(
        hidden_states=x,
        encoder_hidden_states=x,
        attention_mask=attention_mask,
        query_rotary_emb=image_rotary_emb,
        key_rotary_emb=image_rotary_emb,
        **kwargs,
    )
    norm_c = layer.norm1_context
    context = adaptive_norm(encoder_hidden_states, norm="rms", weight=norm_c.weight, eps=norm_c.eps)
    cross_out = layer.attn2(
        hidden_states=x,
        encoder_hidden_states=context,
        attention_mask=encoder_mask,
        query_rotary_emb=image_rotary_emb,
        key_rotary_emb=None,
        **kwargs,
    )
    head_gate = layer.gate.repeat_interleave(layer.head_dim)[None]  # per head -> per channel
    mixed = gated_residual(self_out.flatten(2), cross_out.flatten(2), head_gate, tanh_gate=True)
    hidden_states, x = gated_residual_norm(
        hidden_states,
        layer.attn2.to_out[0](mixed),
        gate_msa,
        scale_mlp,
        tanh_gate=True,
        branch_weight=layer.norm2.weight,
        branch_eps=layer.norm2.eps,
        norm="rms",
        weight=layer.ffn_norm1.weight,
        eps=layer.ffn_norm1.eps,
    )
    ff, post = layer.feed_forward, layer.ffn_norm2
    mlp = ff.linear_2(swiglu(ff.linear_1(x), ff.linear_3(x)))
    return gated_residual(hidden_states, mlp, gate_mlp, tanh_gate=True, branch_weight=post.weight, branch_eps=post.eps)


def _check_layer(name: str, layer) -> None:
    """The fused layer forward reproduces diffusers' for this norm layout only."""
    post_norms = (layer.norm2, layer.ffn_norm2)
    if (
        type(layer.norm1) is not LuminaRMSNormZero
        or any(type(n) is not RMSNorm for n in (layer.norm1.norm, layer.norm1_context, layer.ffn_norm1, *post_norms))
        or any(n.weight is None for n in post_norms)
        or any(
            type(norm) is not torch.nn.LayerNorm
            for attn in (layer.attn1, layer.attn2)
            for norm in (attn.norm_q, attn.norm_k)
            if norm is not None
        )
        or type(layer.feed_forward) is not LuminaFeedForward
        or type(layer.feed_forward.silu) is not FP32SiLU
    ):
        raise ValueError(f"{name} has a norm layout RAS does not know (Lumina-Next LuminaNextDiTBlock expected)")


class LuminaAdapter(ModelAdapter):
    transformer_class = LuminaNextDiT2DModel
    family = "Lumina-Next"
    preset = RASConfig.lumina_next
    gather_at = "patch_embedder"
    attention = (
        Attention("layers.*.attn1", "self", LuminaAttnProcessor2_0),
        Attention("layers.*.attn2", "cross", LuminaAttnProcessor2_0),
    )
    processors = {"self": LuminaRASAttnProcessor, "cross": LuminaRASAttnProcessor}
    scatter_at = "norm_out"
    fused_blocks = {"layers.*": _layer_forward}
    check_fused = staticmethod(_check_layer)

    def __init__(self, handle: RASHandle, transformer: torch.nn.Module):
        super().__init__(handle, transformer)
        self.rope_on_device = _DeviceTables()

    def gather(self, original, x, freqs_cis):
        tokens, mask, sizes, rope = original(x, freqs_cis)
        return self.session.gather(tokens), mask, sizes, self.session.gather_rows(rope)

    def begin_call(self, arguments: dict[str, object]) -> dict[str, object]:
        if "image_rotary_emb" in arguments:
            latent, p = arguments["hidden_states"], self.transformer.config.patch_size
            size = (latent.device, latent.shape[-2] // p, latent.shape[-1] // p)
            arguments["image_rotary_emb"] = self.rope_on_device(arguments["image_rotary_emb"], *size)
        return {}

    def patch_more(self) -> None:
        # apply_ras hands adapters the transformer only, so the builder is memoised for bare-transformer handles
        # too; it replaces the name in LuminaPipeline's module only, and returns the same values.
        _MEMOISED_ROPE.hold()
        self.handle.on_remove(_MEMOISED_ROPE.release)
