"""RAS adapter for diffusers' ``FluxTransformer2DModel`` (Flux.1) under ``FluxPipeline``.

Tokens: FluxPipeline packs the latent [B, 16, H, W] into [B, HW/4, 64], one token per 2x2 patch in (c, 2, 2) order,
row-major over the (H/2, W/2) grid that ``img_ids`` lists. The session works on that latent with patch size 2: the
grid is read from ``img_ids`` once per generation (one host sync), and the packed guided output handed to
``scheduler.step`` is unpacked to [P, 16, H, W] for the selection.

Declared on the adapter layer (``ras_models.adapter``): the gather point ``x_embedder`` (its inputs' active rows:
the embedding is per token), the rotary source ``pos_embed`` (the frequencies of the text rows and of the active
image rows, one row per head for the fused QK-norm + RoPE), every joint attention (double-stream: text and active
image queries over the text keys and the layer's whole-image K/V cache; single-stream: the same for the block's
concatenated [text; active image] rows), the scatter point ``proj_out``, fused block forwards (the same maths with the
elementwise work fused: LayerNorm + modulation, gate + residual + LayerNorm + modulation, QK RMS-norm + RoPE; the
single-stream output projection without the [attention, MLP] concatenation), and ``cache_context_calls`` (the call
names: with ``true_cfg_scale > 1`` the pipeline's "cond" and "uncond" calls keep their own caches and compute the
step's one active set). The K/V caches hold image keys after QK-norm and RoPE.

Under diffusers' Ulysses context parallelism (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=S))``,
before or after ``apply_ras``, with ``RASConfig(shards=S)``): Flux's ``_cp_plan`` splits the transformer's inputs
(image and text tokens, their ids) at the root's forward and gathers the output of ``proj_out``, through diffusers'
hooks (HookRegistry), which replace those modules' ``forward``. RAS's patches of these two modules sit beneath the
hooks, between them and the module (``ras_models.handle._places``), whichever came first: the patched root forward
sees this rank's shard (its img_ids are all-gathered once per generation to place the tokens), ``proj_out``'s scatter
fills this rank's N / S rows of the output cache and diffusers' gather then assembles all N. Between the two,
everything works on the rank's rows; ``RASSession.attend`` does the Ulysses exchange (docs/parallel.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock
from einops import rearrange

from ras_kernels import adaptive_norm, gated_residual, gated_residual_norm

from .adapter import Attention, ModelAdapter, RASProcessor
from .config import RASConfig

TOKEN_PATCH = 2  # one token is a 2x2 patch of the unpacked latent


def _norm_rope(x: torch.Tensor, norm, rope: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head QK RMS-norm and RoPE of x [B, L, H * d] in one pass; rope [1 or B, L * H, d / 2] complex holds each
    head row's frequencies. Returns [B, L, H, d]."""
    b, length, _ = x.shape
    rows = x.view(b, -1, head_dim)  # one row per (token, head): the norm acts on each head's d channels
    out = adaptive_norm(rows, norm="rms", weight=norm.weight, eps=norm.eps, rope=rope)
    return out.view(b, length, -1, head_dim)


class FluxRASAttnProcessor(RASProcessor):
    """Joint attention of the text and active image rows over the text keys and the layer's whole-image K/V cache.

    ``image_rotary_emb`` is what the patched ``pos_embed`` returns: the complex RoPE frequencies [1 or B, (T + K) * H,
    d / 2] of the [text; active image] rows, repeated per head.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("RAS Flux attention takes no attention_mask (FluxPipeline passes none)")
        rope, d = image_rotary_emb, attn.head_dim
        if encoder_hidden_states is None:  # single-stream block: rows are [text; active image]
            text = hidden_states.shape[1] - self.session.num_active
            q = _norm_rope(attn.to_q(hidden_states), attn.norm_q, rope, d)
            k = _norm_rope(attn.to_k(hidden_states), attn.norm_k, rope, d)
            v = attn.to_v(hidden_states).unflatten(-1, (-1, d))
            out = self.session.attend(
                self.key, q, k[:, text:], v[:, text:], k_extra=k[:, :text], v_extra=v[:, :text], image_queries=text
            )
            return out.flatten(2)
        text = encoder_hidden_states.shape[1]
        text_rope, image_rope = rope.split([text * attn.heads, rope.shape[1] - text * attn.heads], dim=1)
        q = _norm_rope(attn.to_q(hidden_states), attn.norm_q, image_rope, d)
        k = _norm_rope(attn.to_k(hidden_states), attn.norm_k, image_rope, d)
        v = attn.to_v(hidden_states).unflatten(-1, (-1, d))
        tq = _norm_rope(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q, text_rope, d)
        tk = _norm_rope(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k, text_rope, d)
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, d))
        out = self.session.attend(self.key, torch.cat([tq, q], dim=1), k, v, k_extra=tk, v_extra=tv, image_queries=text)
        out = out.flatten(2)
        return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux blocks clip fp16 streams to the finite range."""
    return x.clip_(-65504, 65504) if x.dtype == torch.float16 else x


def _double_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):  # fmt: skip
    """diffusers' ``FluxTransformerBlock.forward`` with its elementwise work fused: per stream one LayerNorm +
    modulation, one gate + residual + LayerNorm + modulation, one gate + residual."""
    kwargs = joint_attention_kwargs or {}
    norm1, norm1_context = block.norm1, block.norm1_context
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = norm1.linear(norm1.silu(temb)).chunk(6, dim=1)
    mods = norm1_context.linear(norm1_context.silu(temb)).chunk(6, dim=1)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = mods
    x = adaptive_norm(hidden_states, scale, shift, eps=norm1.norm.eps)
    context = adaptive_norm(encoder_hidden_states, c_scale, c_shift, eps=norm1_context.norm.eps)
    attn_output, context_attn_output = block.attn(
        hidden_states=x, encoder_hidden_states=context, image_rotary_emb=image_rotary_emb, **kwargs
    )
    hidden_states, x = gated_residual_norm(hidden_states, attn_output, gate, scale_mlp, shift_mlp, eps=block.norm2.eps)
    hidden_states = gated_residual(hidden_states, block.ff(x), gate_mlp)
    encoder_hidden_states, context = gated_residual_norm(
        encoder_hidden_states, context_attn_output, c_gate, c_scale_mlp, c_shift_mlp, eps=block.norm2_context.eps
    )
    encoder_hidden_states = gated_residual(encoder_hidden_states, block.ff_context(context), c_gate_mlp)
    return _clip_fp16(encoder_hidden_states), hidden_states


def _single_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):  # fmt: skip
    """diffusers' ``FluxSingleTransformerBlock.forward`` with one LayerNorm + modulation pass, the output projection
    of [attention, MLP] as two GEMMs into one result (no concatenated copy; a plain ``nn.Linear`` only) and one gate +
    residual pass."""
    text = encoder_hidden_states.shape[1]
    residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    norm = block.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    x = adaptive_norm(residual, scale, shift, eps=norm.norm.eps)
    mlp = block.act_mlp(block.proj_mlp(x))
    attn_output = block.attn(hidden_states=x, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    proj = block.proj_out
    if type(proj) is torch.nn.Linear:
        weight, dim = proj.weight, attn_output.shape[-1]
        out = F.linear(mlp, weight[:, dim:], proj.bias)
        out = torch.addmm(out.flatten(0, 1), attn_output.flatten(0, 1), weight[:, :dim].t()).view_as(out)
    else:  # e.g. a LoRA layer wrapping it: its own forward, on the concatenation
        out = proj(torch.cat([attn_output, mlp], dim=2))
    hidden_states = _clip_fp16(gated_residual(residual, out, gate))
    return hidden_states[:, :text], hidden_states[:, text:]


def _check_block(name: str, block) -> None:
    """The fused block forwards and attention reproduce diffusers' for these norm layouts only."""
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    def plain_layer_norm(norm) -> bool:
        return type(norm) is torch.nn.LayerNorm and not norm.elementwise_affine

    attn = block.attn
    if isinstance(block, FluxSingleTransformerBlock):
        ada, norms, qk = (block.norm,), (), (attn.norm_q, attn.norm_k)
        known = type(block.norm) is AdaLayerNormZeroSingle
    else:
        ada, norms = (block.norm1, block.norm1_context), (block.norm2, block.norm2_context)
        qk = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
        known = all(type(n) is AdaLayerNormZero and n.emb is None for n in ada)
    known = known and all(plain_layer_norm(n.norm) for n in ada) and all(plain_layer_norm(n) for n in norms)
    if not known or any(type(n) is not torch.nn.RMSNorm or n.eps is None for n in qk):
        raise ValueError(
            f"{name} has a norm layout RAS does not know (Flux.1 FluxTransformerBlock / FluxSingleTransformerBlock "
            "expected)"
        )


def _latent_size(img_ids: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(H, W) of the unpacked latent whose 2x2 patches ``img_ids`` [tokens, 3] lists row-major, as FluxPipeline makes
    them (column 0 free, columns 1 and 2 the patch row and column). Syncs with the device."""
    if not isinstance(img_ids, torch.Tensor):
        raise TypeError(
            f"RAS needs img_ids (a tensor [{tokens}, 3]) to place Flux's tokens, got {type(img_ids).__name__}"
        )
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids  # diffusers still accepts batched ids
    rows, cols = (int(v) + 1 for v in ids[-1, 1:].tolist()) if ids.shape[0] == tokens else (0, 0)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).flatten(0, 1)
    if rows * cols != tokens or not torch.equal(ids[:, 1:], grid.to(ids)):
        raise ValueError(
            f"img_ids must list the row-major 2x2-patch grid of the {tokens} packed image tokens, as FluxPipeline "
            "makes them; RAS cannot map other token layouts to latent patches"
        )
    return TOKEN_PATCH * rows, TOKEN_PATCH * cols


def _all_ids(ids: object, group) -> object:
    """Every rank's shard of ``ids`` [n, 3] (2-D: the ids diffusers' context parallelism splits) in rank order."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return ids  # _latent_size explains what it needs
    shards = [torch.empty_like(ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, ids.contiguous(), group=group)
    return torch.cat(shards)


class FluxAdapter(ModelAdapter):
    transformer_class = FluxTransformer2DModel
    family = "Flux"
    preset = RASConfig.flux
    token_patch = TOKEN_PATCH
    gather_at = "x_embedder"
    rope_at = "pos_embed"
    attention = (
        Attention("transformer_blocks.*.attn", "joint", FluxAttnProcessor),
        Attention("single_transformer_blocks.*.attn", "joint", FluxAttnProcessor),
    )
    processors = {"joint": FluxRASAttnProcessor}
    processor_hint = " (IP-Adapter is not supported; reset with transformer.set_default_attn_processor())"
    scatter_at = "proj_out"
    fused_blocks = {"transformer_blocks.*": _double_block_forward, "single_transformer_blocks.*": _single_block_forward}
    check_fused = staticmethod(_check_block)
    unsupported = dict.fromkeys(
        ("controlnet_block_samples", "controlnet_single_block_samples"), "ControlNet residuals cover every image token"
    )
    cache_context_calls = True
    context_parallel = True

    def check(self) -> None:
        if self.transformer.config.patch_size != 1:
            raise ValueError(
                "RAS supports Flux with patch_size 1 on FluxPipeline's packed 2x2 tokens, got "
                f"{self.transformer.config.patch_size}"
            )

    def gather(self, original, x):
        return original(self.session.gather(x))  # the embedding is per token: gather its inputs, the narrower rows

    def rope(self, original, ids):
        """The RoPE frequencies of the [text; active image] rows, one row per (token, head) for the fused QK-norm +
        RoPE: [1 or B, (T + K) * H, d / 2] complex."""
        cos, sin = original(ids)  # [T + N, d] each, every pair's angle twice
        freqs = torch.complex(cos[:, ::2], sin[:, ::2])
        text = ids.shape[0] - self.session.shard_tokens
        image = self.session.gather_rows(freqs[None, text:])  # [1 or B, K, d / 2]
        rows = torch.cat([freqs[None, :text].expand(image.shape[0], -1, -1), image], dim=1)
        heads = self.transformer.config.num_attention_heads
        return rows[:, :, None].expand(-1, -1, heads, -1).flatten(1, 2)

    def begin_call(self, arguments: dict[str, object]) -> dict[str, object]:
        session, tokens = self.session, arguments["hidden_states"].shape[1]
        if session.shape_key is None or tokens != session.shard_tokens:  # once per generation
            ids, sharding = arguments.get("img_ids"), session.sharding
            if sharding is not None:  # this rank's shard of the tokens: place them with every rank's ids
                ids, tokens = _all_ids(ids, sharding.group), tokens * sharding.size
            size = _latent_size(ids, tokens)
        else:
            size = session.shape_key[1:3]
        return {"latent_size": size, "call": self.context}

    def to_latents(self, guided: torch.Tensor) -> torch.Tensor:
        """The packed guided output [P, N, C * 4] as latents [P, C, H, W]."""
        session = self.session
        if session.num_tokens is None:  # before any step: observe() refuses it
            return guided
        if guided.dim() != 3 or guided.shape[1] != session.num_tokens:
            raise ValueError(
                f"guided must be the packed output [P, {session.num_tokens}, C] of this step, got {tuple(guided.shape)}"
            )
        width = session.shape_key[2] // TOKEN_PATCH
        return rearrange(guided, "b (y x) (c p q) -> b c (y p) (x q)", x=width, p=TOKEN_PATCH, q=TOKEN_PATCH)
