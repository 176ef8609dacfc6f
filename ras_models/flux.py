"""RAS adapter for diffusers' ``FluxTransformer2DModel`` (Flux.1) under ``FluxPipeline``.

Tokens: FluxPipeline packs the latent [B, 16, H, W] into [B, HW/4, 64], one token per 2x2 patch in (c, 2, 2) order,
row-major over the (H/2, W/2) grid that ``img_ids`` lists. The session works on that latent with patch size 2: the
grid is read from ``img_ids`` once per generation (one host sync), and the packed guided output handed to
``scheduler.step`` is unpacked to [P, 16, H, W] for the selection.

Declared on the adapter layer (``ras_models.adapter``): the gather point ``x_embedder`` (its inputs' active rows:
the embedding is per token), the rotary source ``pos_embed`` (the text RoPE rows as they are, the image rows of the
active tokens), every joint attention (double-stream: text and active image queries over the text keys and the
layer's whole-image K/V cache; single-stream: the same for the block's concatenated [text; active image] rows), the
scatter point ``proj_out``, and ``cache_context`` (names the call: with ``true_cfg_scale > 1`` the pipeline's "cond"
and "uncond" calls keep their own caches and compute the step's one active set). The K/V caches hold image keys after
QK-norm and RoPE. The blocks run unchanged: their per-token work sees fewer rows.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from einops import rearrange

from .adapter import Attention, ModelAdapter, RASProcessor
from .config import RASConfig
from .handle import RASHandle

TOKEN_PATCH = 2  # one token is a 2x2 patch of the unpacked latent


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux rotary embedding (interleaved pairs, fp32) of x [B, L, H, d] with row tables [1 or B, L, d]."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos[:, :, None] + rotated.float() * sin[:, :, None]).to(x.dtype)


class FluxRASAttnProcessor(RASProcessor):
    """Joint attention of the text and active image rows over the text keys and the layer's whole-image K/V cache.

    ``image_rotary_emb`` is what the patched ``pos_embed`` returns: ((text cos, text sin), (image cos, image sin)).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("RAS Flux attention takes no attention_mask (FluxPipeline passes none)")
        (text_cos, text_sin), (image_cos, image_sin) = image_rotary_emb
        q, k, v = (proj(hidden_states).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is None:  # single-stream block: rows are [text; active image]
            text = hidden_states.shape[1] - self.session.num_active
            (tq, q), (tk, k), (tv, v) = (t.split([text, t.shape[1] - text], dim=1) for t in (q, k, v))
        else:
            text = encoder_hidden_states.shape[1]
            tq, tk, tv = (
                proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        tq, tk = _rope(tq, text_cos, text_sin), _rope(tk, text_cos, text_sin)
        q, k = _rope(q, image_cos, image_sin), _rope(k, image_cos, image_sin)
        out = self.session.attend(self.key, torch.cat([tq, q], dim=1), k, v, k_extra=tk, v_extra=tv).flatten(2)
        if encoder_hidden_states is None:
            return out
        return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])


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
    unsupported = dict.fromkeys(
        ("controlnet_block_samples", "controlnet_single_block_samples"), "ControlNet residuals cover every image token"
    )

    def __init__(self, handle: RASHandle, transformer: torch.nn.Module):
        super().__init__(handle, transformer)
        self.call = None  # the cache context ("cond" / "uncond") the pipeline runs the transformer under

    def check(self) -> None:
        if self.transformer.config.patch_size != 1:
            raise ValueError(
                "RAS supports Flux with patch_size 1 on FluxPipeline's packed 2x2 tokens, got "
                f"{self.transformer.config.patch_size}"
            )

    def gather(self, original, x):
        return original(self.session.gather(x))  # the embedding is per token: gather its inputs, the narrower rows

    def rope(self, original, ids):
        cos, sin = original(ids)
        text = ids.shape[0] - self.session.num_tokens
        image = self.session.gather_rows(torch.cat((cos[text:], sin[text:]), dim=-1)[None])
        return (cos[None, :text], sin[None, :text]), image.chunk(2, dim=-1)

    def begin_call(self, arguments: dict[str, object]) -> dict[str, object]:
        if self.transformer.is_cache_enabled:
            raise ValueError("RAS does not compose with diffusers' caches; call transformer.disable_cache() first")
        session, tokens = self.session, arguments["hidden_states"].shape[1]
        if session.shape_key is None or tokens != session.num_tokens:  # once per generation
            size = _latent_size(arguments.get("img_ids"), tokens)
        else:
            size = session.shape_key[1:3]
        return {"latent_size": size, "call": self.call}

    def patch_more(self) -> None:
        self.handle.wrap_method(self.transformer, "cache_context", contextlib.contextmanager(self._cache_context))

    def _cache_context(self, original, name, *args, **kwargs):
        with original(name, *args, **kwargs):
            outer, self.call = self.call, name
            try:
                yield
            finally:
                self.call = outer

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
