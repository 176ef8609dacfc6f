"""What the end-to-end benches run: diffusers pipelines around random-weight transformers, and timed calls of them.

Every speed number of ``bench.e2e``, ``bench.first_call`` and ``bench.soak`` is the wall-clock time of the call users
make, ``pipe(prompt_embeds=..., ..., output_type="latent")``, on a ``StableDiffusion3Pipeline`` / ``LuminaPipeline``
/ ``FluxPipeline`` / ``WanPipeline`` built around the transformer (published layout, random weights: speed does not
depend on weight values) with the published scheduler and no text encoders, tokenizers or VAE. Prompts come as random
embeddings of the published shapes, so text encoding and VAE decoding, the same for dense and RAS, are outside every
timed call. A generation's ``size`` is the image side (``height = width``) or ``(height, width)``; Wan takes
``frames`` too (WanPipeline without a VAE uses the Wan VAE's factors: 4 in time, 8 in space).

``Loop`` is the benches' own CFG sampling loop over the bare transformer, for step profiles and as a cross-check
(SD3 and Lumina-Next).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time

import torch

from ras_models import RASConfig

# Published transformer layouts (random weights): SD3-medium and Lumina-Next-SFT; tiny ones for the CPU.
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
SD3_TINY = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    out_channels=16,
    pos_embed_max_size=96,
)
LUMINA_NEXT_SFT = dict(
    sample_size=128,
    patch_size=2,
    in_channels=4,
    hidden_size=2304,
    num_layers=24,
    num_attention_heads=32,
    num_kv_heads=8,
    multiple_of=256,
    learn_sigma=True,
    qk_norm=True,
    cross_attention_dim=2048,
)
LUMINA_TINY = dict(
    sample_size=32,
    patch_size=2,
    in_channels=4,
    hidden_size=128,
    num_layers=4,
    num_attention_heads=4,
    num_kv_heads=2,
    multiple_of=32,
    learn_sigma=True,
    qk_norm=True,
    cross_attention_dim=64,
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)
# Wan 2.1 T2V 1.3B and 14B (diffusers' convert_wan_to_diffusers.py configs); Wan 2.2 A14B's two experts each have the
# 14B layout.
WAN_2_1_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN_2_1_14B = dict(WAN_2_1_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN_TINY = dict(WAN_2_1_1_3B, num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=64, ffn_dim=256,
                num_layers=4)  # fmt: skip
# bench model name -> (family, published layout, tiny layout)
LAYOUTS = {
    "sd3": ("sd3", SD3_MEDIUM, SD3_TINY),
    "lumina": ("lumina", LUMINA_NEXT_SFT, LUMINA_TINY),
    "flux": ("flux", FLUX_DEV, FLUX_TINY),
    "wan": ("wan", WAN_2_1_1_3B, WAN_TINY),
    "wan-14b": ("wan", WAN_2_1_14B, WAN_TINY),
    "wan-a14b": ("wan", WAN_2_1_14B, WAN_TINY),
}
# Wan 2.2 T2V A14B: two experts of the 14B layout; the pipeline hands the steps below timestep 0.875 x 1000 to the
# second (low-noise) expert, and its scheduler shifts by 12 (the published T2V A14B configs).
TWO_EXPERTS = {"wan-a14b": dict(boundary_ratio=0.875, flow_shift=12.0)}
# Text tokens per prompt: SD3 77 CLIP + 256 T5 (joint dim 4096, pooled 2048); Lumina-Next 256 Gemma-2B tokens;
# Flux.1-dev 512 T5 tokens (pooled CLIP 768); Wan 512 umT5 tokens.
TEXT_TOKENS = {"sd3": 333, "lumina": 256, "flux": 512, "wan": 512}
NEGATIVE_TOKENS = 64  # Lumina's negative prompt: its caption mask keeps this many of the 256 tokens
# The published scheduler configs: FlowMatchEulerDiscreteScheduler with shift 3.0 for SD3-medium, the default for
# Lumina-Next-SFT (diffusers' conversion script builds FlowMatchEulerDiscreteScheduler()), resolution-dependent shift
# for Flux.1-dev; UniPCMultistepScheduler with flow prediction and shift 3.0 for Wan 2.1 T2V (diffusers' conversion
# script; 5.0 is the recommendation for 720p).
SCHEDULERS = {
    "sd3": dict(shift=3.0),
    "lumina": dict(),
    "flux": dict(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "wan": dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0),
}  # fmt: skip
# guidance_scale: classifier-free guidance for SD3 and Lumina (batch [uncond, cond]) and Wan (two calls per step);
# Flux.1-dev's distilled guidance (one call per step, batch = prompts).
GUIDANCE = {"sd3": 5.0, "lumina": 5.0, "flux": 3.5, "wan": 5.0}
FAMILIES = {
    "SD3Transformer2DModel": "sd3",
    "LuminaNextDiT2DModel": "lumina",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
}


def family_of(transformer) -> str:
    return FAMILIES[type(transformer).__name__]


def build_transformer(model: str, full: bool, device, dtype):
    """The published layout (``full``) or a tiny one of a bench model (a key of ``LAYOUTS``), random weights."""
    import diffusers

    family, published, tiny = LAYOUTS[model]
    cls = getattr(diffusers, next(name for name, f in FAMILIES.items() if f == family))
    with torch.device(device):
        transformer = cls(**(published if full else tiny))
    if family == "lumina":
        with torch.no_grad():
            transformer.pad_token.normal_()  # created uninitialised by diffusers
    # The model's fp32 modules (Wan: RoPE, time embedder, modulation tables, norms) stay fp32, as from_pretrained with
    # a torch_dtype keeps them.
    keep = set(transformer._keep_in_fp32_modules or ())
    for name, tensor in itertools.chain(transformer.named_parameters(), transformer.named_buffers()):
        tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return transformer.eval()


def build_pipeline(transformer, transformer_2=None, two_experts: dict | None = None):
    """The family's pipeline around ``transformer``: published scheduler, no text encoders, tokenizers or VAE. Wan
    2.2: ``transformer_2`` and its ``two_experts`` settings (a value of ``TWO_EXPERTS``)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        LuminaPipeline,
        StableDiffusion3Pipeline,
        UniPCMultistepScheduler,
        WanPipeline,
    )

    family = family_of(transformer)
    scheduler_class = UniPCMultistepScheduler if family == "wan" else FlowMatchEulerDiscreteScheduler
    experts = two_experts or {}
    scheduler_config = dict(SCHEDULERS[family], **{k: v for k, v in experts.items() if k == "flow_shift"})
    scheduler = scheduler_class(**scheduler_config)
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, text_encoder_3=None, tokenizer_3=None, **none
        )
    elif family == "flux":
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, **none)
    elif family == "wan":
        pipe = WanPipeline(
            transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
            transformer_2=transformer_2, boundary_ratio=experts.get("boundary_ratio"),
        )  # fmt: skip
    else:
        pipe = LuminaPipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_inputs(transformer, prompts: int, seed: int) -> dict[str, torch.Tensor]:
    """Random prompt embeddings of the published shapes for ``prompts`` prompts, as ``pipe(**inputs)`` takes them
    (on the transformer's device, in its dtype; Lumina's caption masks as int64, as its tokenizer returns them;
    Flux.1-dev, guidance-distilled, takes no negative prompt)."""
    family, cfg = family_of(transformer), transformer.config
    device, dtype = transformer.device, transformer.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = TEXT_TOKENS[family]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if family == "sd3":
        return {
            "prompt_embeds": randn(prompts, t, cfg.joint_attention_dim),
            "negative_prompt_embeds": randn(prompts, t, cfg.joint_attention_dim),
            "pooled_prompt_embeds": randn(prompts, cfg.pooled_projection_dim),
            "negative_pooled_prompt_embeds": randn(prompts, cfg.pooled_projection_dim),
        }
    if family == "flux":
        return {
            "prompt_embeds": randn(prompts, t, cfg.joint_attention_dim),
            "pooled_prompt_embeds": randn(prompts, cfg.pooled_projection_dim),
        }
    if family == "wan":
        return {
            "prompt_embeds": randn(prompts, t, cfg.text_dim),
            "negative_prompt_embeds": randn(prompts, t, cfg.text_dim),
        }
    negative_mask = torch.zeros(prompts, t, dtype=torch.int64, device=device)
    negative_mask[:, :NEGATIVE_TOKENS] = 1
    return {
        "prompt_embeds": randn(prompts, t, cfg.cross_attention_dim),
        "prompt_attention_mask": torch.ones(prompts, t, dtype=torch.int64, device=device),
        "negative_prompt_embeds": randn(prompts, t, cfg.cross_attention_dim),
        "negative_prompt_attention_mask": negative_mask,
    }


def encode_prompt(pipe, prompt: str) -> dict[str, torch.Tensor]:
    """``prompt`` (and an empty negative prompt) through a real pipeline's text encoders, as ``pipe(**inputs)``
    takes them; done once, outside the timed calls."""
    device = pipe._execution_device
    family = family_of(pipe.transformer)
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt, device=device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "wan":
        embeds, negative = pipe.encode_prompt(prompt, "", do_classifier_free_guidance=True, device=device)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    if family == "sd3":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, prompt, prompt, device=device, do_classifier_free_guidance=True
        )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
    embeds, mask, negative, negative_mask = pipe.encode_prompt(prompt, True, device=device, clean_caption=False)
    return {
        "prompt_embeds": embeds,
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": negative,
        "negative_prompt_attention_mask": negative_mask,
    }


def preset(family: str, steps: int | None, ratio: float, num_tokens: int, schedule: str | None = None) -> RASConfig:
    """The family's preset; other step counts move the resets proportionally, and the dynamic schedule's
    token steps (tuned for N = 4096) scale with N so the active share still falls from ~69% to ~31%."""
    base = {"sd3": RASConfig.sd3, "lumina": RASConfig.lumina_next, "flux": RASConfig.flux, "wan": RASConfig.wan}[family]
    overrides = {} if schedule is None else {"schedule": schedule}
    config = base(sample_ratio=ratio, **overrides)
    if steps is not None and steps != config.num_steps:
        resets = tuple(round(r * steps / config.num_steps) for r in config.reset_steps)
        overrides.update(
            num_steps=steps,
            reset_steps=tuple(r for r in resets if r < steps),
            warmup_steps=min(config.warmup_steps, steps - 1),
        )
    if config.schedule == "dynamic" and num_tokens != 4096:
        overrides.update(
            dynamic_step=max(1, config.dynamic_step * num_tokens // 4096),
            dynamic_multiple=max(1, config.dynamic_multiple * num_tokens // 4096),
        )
    return base(sample_ratio=ratio, **overrides)


def expert_switch_step(pipe, steps: int) -> int | None:
    """Wan 2.2: the first of ``steps`` steps that the pipeline hands to ``transformer_2`` (its timestep below
    ``boundary_ratio`` x the scheduler's training timesteps), or None with one expert."""
    boundary_ratio = getattr(pipe.config, "boundary_ratio", None)
    if getattr(pipe, "transformer_2", None) is None or boundary_ratio is None:
        return None
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    return next((i for i, t in enumerate(scheduler.timesteps.tolist()) if t < boundary), None)


def ras_steps(pipe, config: RASConfig) -> list[bool]:
    """Which steps of ``config`` run as RAS steps through ``pipe``: the schedule's, except Wan 2.2's first step of
    ``transformer_2``, which is dense (that expert has no caches yet)."""
    steps = [config.is_ras_step(i) for i in range(config.num_steps)]
    switch = expert_switch_step(pipe, config.num_steps)
    if switch is not None:
        steps[switch] = False
    return steps


def height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a generation ``size``: an image side or (height, width)."""
    return (size, size) if isinstance(size, int) else tuple(size)


def num_tokens(pipe, size: int | tuple[int, int], frames: int | None = None) -> int:
    """Image tokens of a generation at ``size`` (FluxPipeline packs 2x2 latent patches into a token; Wan: the tokens
    of all ``frames`` // 4 + 1 latent frames, one per 1x2x2 latent patch)."""
    height, width = height_width(size)
    family = family_of(pipe.transformer)
    if family == "wan":
        _, ph, pw = pipe.transformer.config.patch_size
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        spatial = pipe.vae_scale_factor_spatial
        return latent_frames * (height // spatial // ph) * (width // spatial // pw)
    patch = 2 if family == "flux" else pipe.transformer.config.patch_size
    return (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)


def generate(pipe, inputs: dict, *, steps: int, size, seed: int, callback=None, frames: int | None = None):
    """One ``pipe(...)`` call at ``size`` (Wan: of ``frames`` frames); the final latents."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    family = family_of(pipe.transformer)
    height, width = height_width(size)
    video = {"num_frames": frames} if family == "wan" else {}
    out = pipe(
        **inputs,
        **video,
        num_inference_steps=steps,
        height=height,
        width=width,
        guidance_scale=GUIDANCE[family],
        output_type="latent",
        generator=generator,
        callback_on_step_end=callback,
    )
    return out.frames if family == "wan" else out.images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Per-step times of one pipeline call from marks at its start and at each ``callback_on_step_end``: CUDA events
    on a GPU (nothing synchronises inside the call), the host clock on the CPU."""

    def __init__(self, device: torch.device, progress: str | None = None, steps: int = 0):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.progress, self.steps = progress, steps  # with a label: "label step i/steps" on stderr as steps end

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, pipe, step, timestep, tensors) -> dict:
        self.mark()
        if self.progress is not None:  # host-side only: nothing waits for the GPU
            end = "\n" if step + 1 == self.steps else ""
            print(f"\r  {self.progress} step {step + 1}/{self.steps}", end=end, file=sys.stderr, flush=True)
        return {}

    def step_ms(self) -> list[float]:
        """Milliseconds of each step (the first includes the call's set-up); call after synchronising."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in itertools.pairwise(self.marks)]
        return [(b - a) * 1e3 for a, b in itertools.pairwise(self.marks)]


def timed_call(pipe, inputs: dict, *, steps: int, size, seed: int, frames: int | None = None, progress=None):
    """One ``pipe(...)`` call: its latents, its wall-clock milliseconds (device synchronised before and after) and
    its per-step milliseconds. ``progress``: a label to print each finished step under (long calls)."""
    device = pipe._execution_device
    clock = StepClock(device, progress, steps)
    synchronize(device)
    start = time.perf_counter()
    clock.mark()
    latents = generate(pipe, inputs, steps=steps, size=size, seed=seed, callback=clock, frames=frames)
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    return latents, wall_ms, clock.step_ms()


class Loop:
    """The benches' own CFG sampling loop over a bare transformer (flow-matching Euler, batch [uncond, cond]), the
    same for dense and RAS runs; prompts from :func:`prompt_inputs`."""

    def __init__(self, transformer, latent: int, seed: int):
        self.family, self.transformer, self.device = family_of(transformer), transformer, transformer.device
        if self.family in ("flux", "wan"):
            raise ValueError(f"the own loop covers SD3 and Lumina-Next; time {self.family} through pipe(...) alone")
        cfg = transformer.config
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.noise = torch.randn(1, cfg.in_channels, latent, latent, generator=g).to(self.device, transformer.dtype)
        inputs = prompt_inputs(transformer, 1, seed)

        def pair(name: str) -> torch.Tensor:
            return torch.cat([inputs[f"negative_{name}"], inputs[name]])

        if self.family == "sd3":
            self.kwargs = {
                "encoder_hidden_states": pair("prompt_embeds"),
                "pooled_projections": pair("pooled_prompt_embeds"),
            }
        else:
            from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

            self.kwargs = {
                "encoder_hidden_states": pair("prompt_embeds"),
                "encoder_mask": pair("prompt_attention_mask"),
                "image_rotary_emb": get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384).to(self.device),
                "cross_attention_kwargs": {"base_sequence_length": (cfg.sample_size * 8 // 16) ** 2},
            }

    def run(self, steps: int, handle=None, progress: str = "", on_step=None) -> tuple[torch.Tensor, list[float]]:
        """One generation; ``on_step(i)``, if given, is called before step i (e.g. to start a profiler)."""
        x = self.noise.clone()
        times = []
        if handle is not None:
            handle.reset()
        for i in range(steps):
            if on_step is not None:
                on_step(i)
            sigma, sigma_next = 1 - i / steps, 1 - (i + 1) / steps
            synchronize(self.device)
            start = time.perf_counter()
            with torch.no_grad():
                t = torch.full((2,), sigma * 1000 if self.family == "sd3" else 1 - sigma, device=self.device)
                out = self.transformer(torch.cat([x, x]), timestep=t, return_dict=False, **self.kwargs)[0]
                out = out[:, : x.shape[1]]
                uncond, cond = out.chunk(2)
                guided = uncond + GUIDANCE[self.family] * (cond - uncond)
                if handle is not None:
                    handle.observe(guided)
                velocity = guided if self.family == "sd3" else -guided
                x = x + (sigma_next - sigma) * velocity
            synchronize(self.device)
            times.append((time.perf_counter() - start) * 1e3)
            print(f"\r  {progress} step {i + 1}/{steps}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        return x.float(), times


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--full`` as the GPU benches take them: the published layout on a GPU, a tiny one on a CPU."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=torch.cuda.is_available(),
        help="published model config (default on a GPU) or a tiny one (default on the CPU)",
    )
