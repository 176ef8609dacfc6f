"""Tiny random-weight diffusers pipelines for CPU tests: nothing is downloaded.

Text encoders are built from ``transformers`` configs and the tokenizers from an in-memory word-level vocabulary,
so the pipelines run their real prompt-encoding code.
"""

from __future__ import annotations

import torch

WORDS = "a an the red green blue cat dog house tree on under big small photo of painting".split()


def word_tokenizer(max_length: int):
    """A fast tokenizer over ``WORDS`` with pad/bos/eos/unk tokens; pads and truncates to ``max_length``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _clip_encoder(hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return CLIPTextModelWithProjection(config).eval()


def _tiny_vae(levels: int = 1):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        shift_factor=0.0,
    ).eval()


def tiny_sd3_transformer(*, sd35: bool = False, patch_size: int = 2, num_layers: int = 3):
    """SD3-layout MMDiT (SD3.5 layout: QK RMS-norm and a dual-attention first block)."""
    from diffusers import SD3Transformer2DModel

    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=patch_size,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=32,
        **extra,
    ).eval()


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(WORDS) + 4,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=2,
    )
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline(*, sd35: bool = False, patch_size: int = 2, t5: bool = False):
    """StableDiffusion3Pipeline with two tiny CLIP encoders and, with ``t5``, a tiny T5 (without it diffusers
    feeds zeros in its place; a pipeline saved that way cannot be loaded back)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(sd35=sd35, patch_size=patch_size),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(),
        text_encoder=_clip_encoder(16, 8),
        tokenizer=word_tokenizer(16),
        text_encoder_2=_clip_encoder(16, 8),
        tokenizer_2=word_tokenizer(16),
        text_encoder_3=_t5_encoder(32) if t5 else None,
        tokenizer_3=word_tokenizer(16) if t5 else None,
    )


def tiny_lumina_transformer(*, patch_size: int = 2, num_layers: int = 3):
    """Lumina-Next layout: GQA (4 query / 2 kv heads), QK-norm, 2-D RoPE, learned sigma."""
    from diffusers import LuminaNextDiT2DModel

    return LuminaNextDiT2DModel(
        sample_size=8,
        patch_size=patch_size,
        in_channels=4,
        hidden_size=64,
        num_layers=num_layers,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        learn_sigma=True,
        qk_norm=True,
        cross_attention_dim=24,
    ).eval()


def tiny_lumina_pipeline(*, patch_size: int = 2):
    """LuminaPipeline with a tiny Gemma text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaPipeline
    from transformers import GemmaConfig, GemmaModel

    gemma = GemmaModel(
        GemmaConfig(
            vocab_size=len(WORDS) + 4,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=12,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    transformer = tiny_lumina_transformer(patch_size=patch_size)
    with torch.no_grad():
        # The pad token starts uninitialised (torch.empty) in diffusers; give it defined values.
        transformer.pad_token.normal_()
    return LuminaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(),
        text_encoder=gemma,
        tokenizer=word_tokenizer(32),
    )


def tiny_flux_transformer(*, guidance_embeds: bool = False):
    """Flux.1 layout: 2 double- and 2 single-stream blocks, QK RMS-norm, 3-axis RoPE over text and image ids, patch 1
    on FluxPipeline's packed 64-channel tokens (2x2 patches of a 16-channel latent)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_flux_pipeline(*, guidance_embeds: bool = False):
    """FluxPipeline without text encoders or VAE (pass prompt_embeds/pooled_prompt_embeds and output_type="latent";
    the pipeline's default vae factor 8 makes a 128x128 image a 16x16 latent, 8x8 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux_transformer(guidance_embeds=guidance_embeds),
    )


def tiny_wan_transformer(*, in_channels: int = 4, image_dim: int | None = None, num_layers: int = 2):
    """Wan 2.1 layout: 2 heads x 16 (3-axis RoPE over frames, rows, columns: 8 + 4 + 4 channels), QK RMS-norm across
    heads, cross-attention norm, patch (1, 2, 2). With ``image_dim``, the I2V layout: image-embedding keys in every
    cross-attention (``in_channels`` then counts the condition channels WanImageToVideoPipeline concatenates)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        image_dim=image_dim,
        added_kv_proj_dim=32 if image_dim is not None else None,
        rope_max_seq_len=32,
    ).eval()


def _wan_scheduler():
    """Wan's published scheduler (UniPC, flow prediction, shift 3)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_wan_pipeline(*, experts: int = 1, boundary_ratio: float = 0.875):
    """WanPipeline without text encoder, tokenizer or VAE (pass prompt_embeds [P, L, 16] and, with CFG,
    negative_prompt_embeds; output_type="latent": the default vae factors 4 / 8 make 9 frames of 64 x 96 a latent of
    3 x 8 x 12, 3 x 4 x 6 tokens). ``experts=2``: the Wan 2.2 A14B layout, ``transformer_2`` after the boundary."""
    from diffusers import WanPipeline

    second = {"transformer_2": tiny_wan_transformer(), "boundary_ratio": boundary_ratio} if experts == 2 else {}
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=_wan_scheduler(), transformer=tiny_wan_transformer(),
        **second,
    )  # fmt: skip


def tiny_wan_i2v_pipeline():
    """WanImageToVideoPipeline (Wan 2.1 I2V layout) with a tiny Wan VAE (4 latent channels), a tiny CLIP vision
    encoder (5 image tokens of width 8) and no text encoder: pass prompt_embeds [P, 512, 16] (the I2V attention
    splits the image keys off at 512 text tokens) and an image."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    ).eval()
    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16
    )
    return WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=_wan_scheduler(),
        image_encoder=CLIPVisionModel(vision).eval(),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        transformer=tiny_wan_transformer(in_channels=4 + 4 + 4, image_dim=8),  # latents, frame mask, condition
    )
