"""RAS adapter for diffusers' ``WanTransformer3DModel`` (Wan 2.1 / 2.2 video) under ``WanPipeline`` and
``WanImageToVideoPipeline``.

Tokens: one token per (1, 2, 2) patch of the latent video [B, C, T, H, W]; the Conv3d patch embedding's output is
flattened (t, h, w) row-major. That is the row-major 2x2-patch order of the same latent folded to [B, C, T * H, W]
(H is even, so no patch straddles two frames), so the session runs with patch size 2 on the fold: ``begin_call``
gives ``latent_size=(T * H, W)`` and ``to_latents`` folds the guided output [P, C, T, H, W] that the pipeline hands
to ``scheduler.step``. A token's score is then the spec's: the mean over its 2x2 latent pixels of the channel std.

Declared on the adapter layer (``ras_models.adapter``): the gather point ``patch_embedding`` (the active rows of its
output, shaped so that the model's own ``flatten(2).transpose(1, 2)`` yields [B, K, D]), the rotary source ``rope``
(the rows of its (cos, sin) tables [1, N, 1, d] for the active tokens), every block's self-attention ``attn1`` (QK
RMS-norm across heads and RoPE as diffusers' ``WanAttnProcessor`` applies them, fused in one pass for q and one for
k, then the layer's K/V cache: keys after QK-norm and RoPE), every cross-attention ``attn2`` with diffusers'
processor (the K active queries over the whole text, and for I2V over the image-embedding keys too), the scatter
point ``proj_out`` (all N rows before the unpatchify), every block's fused ``forward`` (the same maths with the
per-token elementwise work, which diffusers runs in fp32 op by op, in fused kernels: LayerNorm + modulation, gate +
residual + LayerNorm), and ``cache_context_calls``: the pipelines run CFG as two calls per step, "cond" and
"uncond", each with its own caches, both computing the step's one active set.

Two experts (Wan 2.2 A14B: ``transformer`` for the high-noise steps, ``transformer_2`` after the pipeline's
boundary): ``apply_ras(pipe)`` patches both, through a second handle that shares the first's session and CUDA
graphs and is removed with it. Calls are named (expert, cache context), so each expert keeps its own caches, and an
expert's first step in a generation is dense (the session's rule for a call that has not run yet); the next step's
set is chosen by the usual rule.

Under diffusers' Ulysses context parallelism (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=S))``,
before or after ``apply_ras``, with ``RASConfig(shards=S)``): Wan's ``_cp_plan`` splits the output of ``rope`` and
the input of ``blocks.0`` along the sequence and gathers the output of ``proj_out``, through diffusers' hooks, and
RAS's patches sit beneath them (``ras_models.handle._places``). So every rank embeds all N tokens and gathers all K
active rows (of the embedding and of the rotary tables, with the global indices); the split then hands rank r the
r-th K / S of them, which per-shard selection makes exactly the active rows of its own shard (the set is ascending).
The blocks run on those rows, ``RASSession.attend`` does the Ulysses exchange for the self-attention (the
cross-attention keeps diffusers' processor, which runs it locally: every rank holds the whole text), ``proj_out``'s
scatter fills this rank's N / S rows of the output cache and diffusers' gather assembles all N (docs/parallel.md).

Refused: patch sizes other than (1, 2, 2), per-token timesteps (Wan 2.2 TI2V's ``expand_timesteps``), attention
processors other than ``WanAttnProcessor``, diffusers' caches.
"""

from __future__ import annotations

import weakref

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ras_kernels import adaptive_norm, gated_residual, gated_residual_norm

from .adapter import Attention, ModelAdapter, RASProcessor, install, refuse_submodule_hooks
from .config import RASConfig
from .handle import RASHandle

PATCH = (1, 2, 2)  # the only patch size the fold maps to the session's 2-D patches


def _complex_rope(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan RoPE tables (cos, sin) [1, L, 1, d], each channel pair's angle held twice, as the complex
    frequencies [1, L, d / 2] (complex64) that ``adaptive_norm`` rotates each head's interleaved pairs by."""
    return torch.complex(cos[:, :, 0, 0::2].float(), sin[:, :, 0, 1::2].float())


class WanRASAttnProcessor(RASProcessor):
    """Self-attention of the active tokens over the layer's whole-video K/V cache (post-norm, post-RoPE keys)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "RAS Wan self-attention takes no encoder_hidden_states or attention_mask (WanTransformerBlock passes "
                "neither)"
            )
        if attn.fused_projections:  # transformer.fuse_qkv_projections()
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # RMS-norm across heads, then RoPE on each head's interleaved pairs: one pass each for q and k (in fp32,
        # rounded once; diffusers rounds after the norm and rotates in the tables' fp64).
        rope = None if rotary_emb is None else _complex_rope(*rotary_emb)
        query, key = (
            adaptive_norm(t, norm="rms", weight=norm.weight, eps=norm.eps, rope=rope)
            for t, norm in ((query, attn.norm_q), (key, attn.norm_k))
        )
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = self.session.attend(self.key, query, key, value).flatten(2).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """diffusers' ``WanTransformerBlock.forward`` (temb [B, 6, D]) with its elementwise work in fused kernels, in
    fp32 as diffusers computes it: LayerNorm + modulation; gate + residual + the cross-attention LayerNorm; residual
    + LayerNorm + modulation; gate + residual."""
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).unbind(1)
    x = adaptive_norm(hidden_states, scale_msa, shift_msa, eps=block.norm1.eps)
    attn_output = block.attn1(x, None, None, rotary_emb)
    if isinstance(block.norm2, torch.nn.Identity):  # cross_attn_norm=False
        hidden_states = x = gated_residual(hidden_states, attn_output, gate_msa)
    else:
        norm2 = block.norm2
        hidden_states, x = gated_residual_norm(
            hidden_states, attn_output, gate_msa, weight=norm2.weight, bias=norm2.bias, eps=norm2.eps
        )
    attn_output = block.attn2(x, encoder_hidden_states, None, None)
    hidden_states, x = gated_residual_norm(hidden_states, attn_output, None, c_scale, c_shift, eps=block.norm3.eps)
    return gated_residual(hidden_states, block.ffn(x), c_gate)


def _check_block(name: str, block) -> None:
    """The fused block forward and self-attention reproduce diffusers' for this norm layout only."""

    def fp32_layer_norm(norm, affine: bool) -> bool:
        return type(norm) is FP32LayerNorm and norm.elementwise_affine == affine

    def rms_norm(norm) -> bool:  # the self-attention's QK norm, across heads
        return type(norm) is torch.nn.RMSNorm and norm.elementwise_affine and norm.eps is not None

    norm2_known = type(block.norm2) is torch.nn.Identity or fp32_layer_norm(block.norm2, True)
    qk_known = rms_norm(block.attn1.norm_q) and rms_norm(block.attn1.norm_k)
    if not (fp32_layer_norm(block.norm1, False) and norm2_known and fp32_layer_norm(block.norm3, False) and qk_known):
        raise ValueError(f"{name} has a norm layout RAS does not know (Wan 2.1 / 2.2 WanTransformerBlock expected)")


class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2 (see the module docstring). ``expert`` names the transformer's calls (its attribute on the
    pipeline); ``leader`` is the first expert's adapter, which holds the generation's latent grid for both."""

    transformer_class = WanTransformer3DModel
    family = "Wan"
    preset = RASConfig.wan
    token_patch = PATCH[1]  # on the folded latent [B, C, T * H, W]
    gather_at = "patch_embedding"
    rope_at = "rope"
    attention = (
        Attention("blocks.*.attn1", "self", WanAttnProcessor),
        Attention("blocks.*.attn2", "cross", WanAttnProcessor),
    )
    processors = {"self": WanRASAttnProcessor}  # attn2 keeps diffusers' processor: K queries over the full text
    processor_hint = " (reset with transformer.set_attn_processor(WanAttnProcessor()))"
    scatter_at = "proj_out"
    fused_blocks = {"blocks.*": _block_forward}
    check_fused = staticmethod(_check_block)
    cache_context_calls = True
    context_parallel = True

    def __init__(self, handle: RASHandle, transformer: torch.nn.Module, expert: str = "transformer", leader=None):
        super().__init__(handle, transformer)
        self.expert = expert
        self.leader = leader if leader is not None else self
        self.grid: tuple[int, int, int] | None = None  # (T, H, W) of the latent now sampled (on the leader)
        self.pipe = None  # weak reference to the pipeline, with patch_pipeline
        self.second: torch.nn.Module | None = None  # the patched transformer_2

    def check(self) -> None:
        if tuple(self.transformer.config.patch_size) != PATCH:
            raise ValueError(
                f"RAS supports Wan with patch_size {PATCH} (one token per 1x2x2 latent patch), got "
                f"{tuple(self.transformer.config.patch_size)}"
            )

    def gather(self, original, x):
        tokens = original(x).flatten(2).transpose(1, 2)  # [B, N, D], as the model flattens it
        rows = self.session.gather(tokens.contiguous())  # [B, K, D]
        return rows.transpose(1, 2)[..., None, None]  # the model's flatten(2).transpose(1, 2) gives [B, K, D] back

    def begin_call(self, arguments: dict[str, object]) -> dict[str, object]:
        latents, timestep = arguments["hidden_states"], arguments["timestep"]
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 1:
            raise ValueError(
                f"RAS does not support per-token timesteps (timestep of shape {tuple(timestep.shape)}: Wan 2.2 TI2V's "
                "expand_timesteps); every active-token step needs one timestep per sample"
            )
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(
                f"hidden_states must be latents [B, C, T, H, W], got {getattr(latents, 'shape', type(latents))}"
            )
        frames, height, width = latents.shape[2:]
        if height % PATCH[1] or width % PATCH[2]:
            raise ValueError(f"latent height and width ({height}, {width}) must be divisible by the patch size 2")
        self._check_second()
        self._retire_other_expert()
        self.leader.grid = (frames, height, width)
        return {"latent_size": (frames * height, width), "call": (self.expert, self.context)}

    def to_latents(self, guided: torch.Tensor) -> torch.Tensor:
        """The guided output [P, C, T, H, W] folded to [P, C, T * H, W] (the session's latent)."""
        grid = self.leader.grid
        if self.session.num_tokens is None or grid is None:  # before any step: observe() refuses it
            return guided
        if not isinstance(guided, torch.Tensor) or tuple(guided.shape[2:]) != grid or guided.dim() != 5:
            raise ValueError(
                f"guided must be the output [P, C, {', '.join(map(str, grid))}] of this step, got "
                f"{getattr(guided, 'shape', type(guided))}"
            )
        return guided.flatten(2, 3)

    # ---- Wan 2.2: the second expert ----
    def patch_pipeline(self, pipe: object) -> None:
        """Patch ``pipe.transformer_2`` too, if there is one: a second handle on the same session and graphs."""
        self.pipe = weakref.ref(pipe)
        second = getattr(pipe, "transformer_2", None)
        if second is None:
            return
        if second is self.transformer:
            raise ValueError("pipe.transformer_2 is pipe.transformer; RAS needs two expert objects (or none)")
        if type(second) is not type(self.transformer):
            raise TypeError(
                f"pipe.transformer_2 must be a {type(self.transformer).__name__} like pipe.transformer, got "
                f"{type(second).__name__}"
            )
        if getattr(second, "_ras_handle", None) is not None:
            raise RuntimeError("RAS is already applied to pipe.transformer_2; call remove() on its handle first")
        refuse_submodule_hooks(second, "transformer_2")
        graphs = self.handle.graphs is not None
        handle = RASHandle(self.session, second, cuda_graphs=graphs, context_parallel=self.context_parallel)
        handle.graphs = self.handle.graphs  # one set: graph keys name the expert, and abort() clears them all
        self.handle.on_remove(handle.remove)  # first: a failure below is undone by apply_ras's remove()
        install(type(self)(handle, second, expert="transformer_2", leader=self))
        handle.patch(second, "_ras_handle", self.handle)
        self.second = second

    def _retire_other_expert(self) -> None:
        """Wan 2.2, at an expert's first call in a generation: free the other expert's caches and step graphs. The
        pipeline runs the experts one after the other (the first above its boundary timestep, the second below), so
        an expert's caches are never read once the other has started; holding both would double the cache memory
        (A14B at 480x832, 81 frames: 100 GiB instead of 50 GiB, more than an H200 holds beside the weights). The
        cost: each generation captures each expert's step graphs again, once per step shape, at its first steps
        (which are dense anyway)."""
        leader = self.leader
        if leader.second is None or any(call[0] == self.expert for call in self.session.seen_calls):
            return
        other = leader.expert if self is not leader else "transformer_2"

        def retired(call) -> bool:
            return call[0] == other

        self.session.retire_calls(retired)
        if self.handle.graphs is not None:
            self.handle.graphs.drop_keys(lambda key: retired(key[0]))

    def _check_second(self) -> None:
        pipe = self.pipe() if self.pipe is not None else None
        if pipe is not None and getattr(pipe, "transformer_2", None) is not self.second:
            raise RuntimeError(
                "pipe.transformer_2 was replaced after apply_ras; call remove() on the RAS handle and apply RAS again"
            )
