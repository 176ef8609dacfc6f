"""The RAS quality tool: dense vs RAS variants from the same seeds; writes a report and an image grid.

    python -m bench.quality.evaluate --weights bench/quality/weights --samples 256

For each step count (default 28 and 10) it samples the same prompts from the same initial noise with:

* dense: every token every step (the reference of that step count);
* RAS at each ratio (default 0.5 / 0.25 / 0.125), one run per selection variant:
  ``reference`` (the SD3 preset: R * exp(+k D), high_ratio 0.3, k = 0.1), ``paper`` (R * exp(-k D)),
  ``no-starvation`` (k = 0), ``random`` (uniformly random tokens: see :func:`ras_config`);
* ``RAS 1.0``: the RAS code path computing every token (the numerical floor of the PSNR/SSIM columns);
* equal time: dense sampling with fewer steps, as many as fit in the measured time of the ``reference`` RAS run.

Each run is compared with the dense run of its step count: PSNR and SSIM (mean over samples), the task scores of the
scene classifier (``model.score``), and the speedup (dense time / run time, whole batched generation, same card,
same process). Timed runs follow an untimed warm-up pass on CUDA (Triton autotuning and CUDA-graph capture).

Flux and Wan weights take the frontier path instead (``frontier``): sampling through FluxPipeline or WanPipeline
(:class:`PipelineSampler`), RAS against fewer dense steps and diffusers' caches, scored by :func:`object_errors`
(Flux) or :func:`video_errors` (Wan, clips).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import resolve_dtype
from ras_models import RASConfig, apply_ras

from . import data
from . import model as qmodel
from .train import _sync

VARIANTS = ("reference", "paper", "no-starvation", "random")
FRONTIER_VARIANTS = (  # the Flux and Wan studies (through their pipelines)
    "reference",
    "metric-random",
    "metric-delta",
    "metric-attention",
    "metric-attention-high",
    "forecast",
)
# Run only when named (--variants): fp8 K/V caches need CUDA compute capability 8.9 (or the CPU) and a kernel head dim.
EXTRA_VARIANTS = ("fp8-cache",)
ALL_VARIANTS = tuple(dict.fromkeys((*VARIANTS, *FRONTIER_VARIANTS, *EXTRA_VARIANTS)))
EVAL_SEED_OFFSET = 10_000  # evaluation scenes and noise never share a seed with training streams
RANDOM_METRIC_SEED = 7  # RASConfig.seed of the metric-random variant
# high_ratio of the metric-attention-high variant: nearly all dropped tokens come from the lowest scores, so a RAS
# step computes (mostly) the highest attention log-sum-exps, the opposite end of the band from the presets' 1.0.
ATTENTION_HIGH_RATIO = 0.05


def ras_config(steps: int, ratio: float, num_tokens: int, variant: str, family: str = "sd3") -> RASConfig:
    """The RAS settings of one variant: the family's preset (SD3 and Flux at 28 steps: warm-up 4, resets 12 and 20;
    SD3 high_ratio 0.3; k 0.1; other step counts move the resets proportionally, as ``bench.e2e``) with:

    * ``reference``: the std metric and mode "reference" (priority R * exp(+k D)): the public code's rule (Flux's
      preset itself uses metric attention);
    * ``paper``: mode "paper" (priority R * exp(-k D));
    * ``no-starvation``: starvation_scale 0 (ranking by R alone, same band);
    * ``random``: starvation_scale 0 and high_ratio 1; the tool hands ``observe`` Gaussian noise instead of the
      model output, so every RAS step drops the tokens of highest noise score: a uniformly random set, drawn afresh
      every step and for every prompt (same warm-up, resets and token counts as the other variants);
    * ``metric-random``: the package's ``metric="random"`` (a uniform random score per token, fresh every RAS step,
      seed ``RANDOM_METRIC_SEED``; the starvation priority and the band apply unchanged);
    * ``metric-delta``: ``metric="delta"`` (each token's last observed change of the guided output);
    * ``metric-attention``: ``metric="attention"`` (each token's attention log-sum-exp, mean over heads, summed over
      the step's self-attention layers and calls; kept while the token is left out);
    * ``metric-attention-high``: the same with high_ratio ``ATTENTION_HIGH_RATIO`` (the band keeps mostly the
      highest scores instead of the lowest);
    * ``forecast``: ``reuse="linear"`` (left-out tokens get the line through their last two computed outputs
      instead of a copy; the selection as ``reference``);
    * ``fp8-cache``: ``kv_cache="fp8"`` (e4m3 K/V caches with per-(token, head) scales; the selection as
      ``reference``).
    """
    from bench.e2e import preset

    if variant not in ALL_VARIANTS:
        raise ValueError(f"variant must be one of {ALL_VARIANTS}, got {variant!r}")
    config = preset(family, steps, ratio, num_tokens)
    overrides = {
        "reference": {"metric": "std"},
        "paper": {"mode": "paper"},
        "no-starvation": {"starvation_scale": 0.0},
        "random": {"starvation_scale": 0.0, "high_ratio": 1.0},
        "metric-random": {"metric": "random", "seed": RANDOM_METRIC_SEED},
        "metric-delta": {"metric": "delta"},
        "metric-attention": {"metric": "attention"},
        "metric-attention-high": {"metric": "attention", "high_ratio": ATTENTION_HIGH_RATIO},
        "forecast": {"metric": "std", "reuse": "linear"},
        "fp8-cache": {"metric": "std", "kv_cache": "fp8"},
    }[variant]
    return dataclasses.replace(config, **overrides)


# ---- metrics ----
def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR [B] in dB of images in [-1, 1] mapped to [0, 1] (peak 1; capped at 100 dB)."""
    a, b = _unit(x), _unit(ref)
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, ref: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-sample SSIM [B] (Wang et al. 2004) of images in [-1, 1] mapped to [0, 1]: Gaussian window 11 / 1.5,
    K1 = 0.01, K2 = 0.03, per channel over the valid windows, averaged over channels and positions; in float64.
    Clips [B, C, F, H, W]: the mean over their frames."""
    if x.dim() == 5:
        fold = (x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])
        frames = (t.transpose(1, 2).reshape(fold) for t in (x, ref))
        return ssim(*frames, window, sigma).view(x.shape[0], x.shape[2]).mean(dim=1)
    a, b = _unit(x).double(), _unit(ref).double()
    c = a.shape[1]
    w = _gaussian_window(window, sigma, c, a.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(dim=1).float()


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


COLOUR_TOLERANCE = 0.25  # RGB distance in [0, 1] units; the closest background (green at 1.5x) is 0.37 from its object
MIN_PIXELS = 3  # fewer pixels of the requested colour in the cell: the object is missing


def object_errors(images: torch.Tensor, scenes: data.Scenes, style: str) -> dict[str, torch.Tensor]:
    """Per-object errors of ``images`` [B, 3, S, S] in [-1, 1] against the requested ``scenes``, as per-scene means
    [B] over the requested objects:

    * ``loc_px``: distance in pixels between the requested position (the centre of the caption's cell) and the
      centroid of the pixels within ``COLOUR_TOLERANCE`` of the requested colour inside that cell; an object with
      fewer than ``MIN_PIXELS`` such pixels counts as missing, at half a cell side (a centroid inside the cell is
      never farther along an axis).
    * ``found``: share of the requested objects found.
    * ``detail_err``: |log2(E / E_render)| with E the energy of horizontal pixel differences in the object's cell
      and E_render that of the requested scene's render (``data.render``) there: 0 when a sample carries as much
      fine detail where the object is as the data does, 1 at half or twice as much. The detail style's backgrounds
      are vertical gradients and flat walls, with no horizontal differences, so E is the object's edges and stripes;
      a sum over the cell does not depend on where in its cell the object sits.

    Why these rather than the classifier's accuracy or a Fréchet distance on its features: the classifier is trained
    on blurred and warped scenes to read content, so it is blind to 1-pixel stripes, and its accuracy saturated
    (98-99% for every variant of the SD3 study); a Fréchet distance needs thousands of samples per variant and
    mixes every error into one number. These are continuous (no saturation), need no trained model, and hold
    known answers (a render of the requested scene scores ``loc_px`` at most the jitter and ``detail_err`` 0).
    """
    s, dev = images.shape[-1], images.device
    scenes = scenes.to(dev)
    x, ref = _unit(images), _unit(data.render(scenes, s, style))
    rgb = torch.tensor(data.COLOUR_RGB, device=dev)[scenes.colour]  # [B, M, 3]
    edges = torch.tensor([round(k * s / 3) for k in range(4)], device=dev)
    yy, xx = torch.meshgrid(torch.arange(s, device=dev), torch.arange(s, device=dev), indexing="ij")
    x_diff, ref_diff = ((t[..., 1:] - t[..., :-1]).pow(2).sum(dim=1) for t in (x, ref))  # [B, S, S - 1]
    loc, found, detail = [], [], []
    for j in range(data.MAX_OBJECTS):
        cell = scenes.cell[:, j]
        row, col = cell // 3, cell % 3
        inside = (yy >= edges[row, None, None]) & (yy < edges[row + 1, None, None])
        inside = inside & (xx >= edges[col, None, None]) & (xx < edges[col + 1, None, None])  # [B, S, S]
        mask = inside & ((x - rgb[:, j, :, None, None]).norm(dim=1) < COLOUR_TOLERANCE)
        count = mask.sum(dim=(1, 2)).float()
        cy = (mask * (yy + 0.5)).sum(dim=(1, 2)) / count.clamp(min=1)
        cx = (mask * (xx + 0.5)).sum(dim=(1, 2)) / count.clamp(min=1)
        distance = torch.hypot(cx - (col + 0.5) * s / 3, cy - (row + 0.5) * s / 3)
        hit = count >= MIN_PIXELS
        loc.append(torch.where(hit, distance, s / 6))
        found.append(hit.float())
        pairs = inside[..., 1:] & inside[..., :-1]  # horizontal neighbours both in the cell
        energy, energy_ref = (x_diff * pairs).sum(dim=(1, 2)), (ref_diff * pairs).sum(dim=(1, 2))
        detail.append((energy / energy_ref.clamp(min=1e-6)).clamp(min=1e-3).log2().abs())
    present = scenes.present.float()
    count = present.sum(dim=1)
    return {
        name: (torch.stack(values, dim=1) * present).sum(dim=1) / count
        for name, values in (("loc_px", loc), ("found", found), ("detail_err", detail))
    }


def video_errors(videos: torch.Tensor, scenes: data.Scenes) -> dict[str, torch.Tensor]:
    """Errors of clips ``videos`` [B, 3, F, S, S] in [-1, 1] against the requested video ``scenes``, per clip [B]:

    * ``traj_px``: trajectory error, whether each object is where the caption's motion puts it in every frame. Per
      frame and requested object: the distance in pixels between the object's true centre in the render of the
      requested clip (``data.positions``: start cell, jitter, constant velocity) and the centroid of the pixels
      within ``COLOUR_TOLERANCE`` of the requested colour inside a window one cell side wide centred there; an
      object with fewer than ``MIN_PIXELS`` such pixels in a frame is missing there and counts half the window side
      (a centroid inside the window is never farther along an axis). Mean over frames and objects. The jitter is not
      in the caption, so a model that follows the caption exactly can be up to ``data.JITTER`` x S per axis off;
      the render itself scores below a pixel (a triangle's centroid is 1/6 of its radius from its centre, a striped
      object's lies on its bright columns). The windows of two objects never reach the other object
      (``data.COMPATIBLE`` keeps their paths a cell side apart along one axis), so two objects of one colour do not
      mix. Why: it reads the motion (a static or wrongly moving object scores the distance it lags) and the binding
      of colour to trajectory, continuously, with no trained model.
    * ``found``: share of (frame, object) pairs in which the object was found.
    * ``flicker``: mean absolute frame-to-frame change, in [0, 1] units, of the pixels that are background in every
      frame of the render of the requested clip (they equal the render of the clip without its objects); mean over
      those pixels, channels and the F - 1 frame pairs. 0 for a perfectly static background, as the data's; region-
      adaptive sampling refreshes the background tokens rarely, and stale or drifting cached tokens show up here.
    """
    if videos.dim() != 5 or videos.shape[1] != 3 or videos.shape[3] != videos.shape[4]:
        raise ValueError(f"videos must be clips [B, 3, F, S, S], got {tuple(videos.shape)}")
    frames, s = videos.shape[2], videos.shape[-1]
    dev = videos.device
    scenes = scenes.to(dev)
    x = _unit(videos)  # [B, 3, F, S, S]
    centres = data.positions(scenes, frames) * s  # [B, M, F, 2] in pixels
    rgb = torch.tensor(data.COLOUR_RGB, device=dev)[scenes.colour]  # [B, M, 3]
    pix = torch.arange(s, device=dev, dtype=torch.float32) + 0.5
    half = s / 6
    errors, found = [], []
    for j in range(data.MAX_OBJECTS):
        cx, cy = centres[:, j, :, 0, None, None], centres[:, j, :, 1, None, None]  # [B, F, 1, 1]
        inside = ((pix.view(1, 1, s, 1) - cy).abs() < half) & ((pix.view(1, 1, 1, s) - cx).abs() < half)
        colour = (x - rgb[:, j, :, None, None, None]).norm(dim=1) < COLOUR_TOLERANCE  # [B, F, S, S]
        mask = (inside & colour).float()
        count = mask.sum(dim=(2, 3))  # [B, F]
        my = (mask * pix.view(1, 1, s, 1)).sum(dim=(2, 3)) / count.clamp(min=1)
        mx = (mask * pix.view(1, 1, 1, s)).sum(dim=(2, 3)) / count.clamp(min=1)
        hit = count >= MIN_PIXELS
        errors.append(torch.where(hit, torch.hypot(mx - cx[..., 0, 0], my - cy[..., 0, 0]), half).mean(dim=1))
        found.append(hit.float().mean(dim=1))
    present = scenes.present.float()
    count = present.sum(dim=1)
    empty = scenes[:]
    empty.count = torch.zeros_like(scenes.count)
    render = data.render(scenes, s, "video", frames)
    background = (render - data.render(empty, s, "video", frames)).abs().amax(dim=(1, 2)) == 0  # [B, S, S]
    change = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2))  # [B, S, S]
    flicker = (change * background).sum(dim=(1, 2)) / background.sum(dim=(1, 2)).clamp(min=1)
    return {
        "traj_px": (torch.stack(errors, dim=1) * present).sum(dim=1) / count,
        "found": (torch.stack(found, dim=1) * present).sum(dim=1) / count,
        "flicker": flicker,
    }


def sample_errors(images: torch.Tensor, scenes: data.Scenes, style: str) -> dict[str, torch.Tensor]:
    """The style's per-sample errors: :func:`video_errors` for clips, :func:`object_errors` for images."""
    return video_errors(images, scenes) if style == "video" else object_errors(images, scenes, style)


# ---- sampling ----
class Sampler:
    """Batched CFG sampling (flow-matching Euler, uniform sigmas) of fixed prompts from fixed initial noise.

    The transformer batch of a chunk of P prompts is [unconditional x P; conditional x P] (diffusers' layout: row r
    belongs to prompt r % P); the latent state is float32, the model runs in ``dtype``.
    """

    def __init__(self, models, ids: torch.Tensor, noise: torch.Tensor, *, guidance, device, dtype, batch, graphs):
        self.models, self.guidance, self.device, self.dtype = models, guidance, device, dtype
        self.graphs = graphs and device.type == "cuda"
        self.chunks = []
        uncond = torch.full_like(ids[:batch], data.PAD_ID)
        with torch.no_grad():
            for lo in range(0, ids.shape[0], batch):
                chunk = ids[lo : lo + batch].to(device)
                states, pooled = models.encoder(torch.cat([uncond[: chunk.shape[0]].to(device), chunk]))
                x = noise[lo : lo + batch].to(device, torch.float32)
                self.chunks.append((x, states.to(dtype), pooled.to(dtype)))
        self.dense_graphs = None
        if self.graphs:
            from ras_models.graphs import StepGraphs

            self.dense_graphs = StepGraphs()
        self._dense_warm = False

    def _forward(self, handle, x_in, t, states, pooled):
        kwargs = dict(encoder_hidden_states=states, pooled_projections=pooled, timestep=t, return_dict=False)
        transformer = self.models.transformer
        if handle is None and self.dense_graphs is not None:
            return self.dense_graphs.run("dense", transformer, x_in, **kwargs)[0]
        return transformer(x_in, **kwargs)[0]

    def _generate_chunk(self, chunk, steps: int, handle, noise_gen, step_ms: list[float] | None) -> torch.Tensor:
        x, states, pooled = chunk
        x = x.clone()
        p = x.shape[0]
        if handle is not None:
            handle.reset()
        for i in range(steps):
            start = time.perf_counter()
            sigma, sigma_next = 1 - i / steps, 1 - (i + 1) / steps
            t = torch.full((2 * p,), sigma * 1000, device=self.device)
            out = self._forward(handle, torch.cat([x, x]).to(self.dtype), t, states, pooled).float()
            uncond, cond = out.chunk(2)
            guided = uncond + self.guidance * (cond - uncond)
            if handle is not None:
                if noise_gen is not None:
                    handle.observe(torch.randn(guided.shape, generator=noise_gen, device=self.device))
                else:
                    handle.observe(guided)
            x = x + (sigma_next - sigma) * guided
            if step_ms is not None:
                _sync(self.device)
                step_ms.append((time.perf_counter() - start) * 1e3)
        return x

    @torch.no_grad()
    def generate(
        self, steps: int, handle=None, random_seed: int | None = None, step_ms: list[float] | None = None
    ) -> tuple[torch.Tensor, float]:
        """All prompts' images [N, 3, S, S] (CPU float32) and the seconds the timed pass took.

        On CUDA an untimed pass over the first chunk comes first (autotuning, graph capture); every pass of a
        ``random`` run draws the same noise signals (generator re-seeded). ``step_ms``, if given, receives the
        milliseconds of every step of the timed pass (one entry per step and chunk; each step synchronised)."""

        def noise_gen():
            if random_seed is None:
                return None
            return torch.Generator(self.device).manual_seed(random_seed)

        if self.device.type == "cuda" and (handle is not None or not self._dense_warm):
            self._generate_chunk(self.chunks[0], steps, handle, noise_gen(), None)
            self._dense_warm = self._dense_warm or handle is None
        gen = noise_gen()
        outputs = []
        _sync(self.device)
        start = time.perf_counter()
        for chunk in self.chunks:
            outputs.append(self._generate_chunk(chunk, steps, handle, gen, step_ms))
        _sync(self.device)
        seconds = time.perf_counter() - start
        return torch.cat(outputs).cpu(), seconds

    def close(self) -> None:
        if self.dense_graphs is not None:
            self.dense_graphs.clear()


class PipelineSampler:
    """Sampling through diffusers' own pipelines: ``FluxPipeline`` (the Flux study) or ``WanPipeline`` (the Wan
    study). No text encoders and no VAE, so the pipeline takes the caption encoder's states as ``prompt_embeds``
    (the all-padding caption's as ``negative_prompt_embeds``) and the initial noise as ``latents``, and returns
    latents (``output_type="latent"``), which are the images or clips. The scheduler is
    ``FlowMatchEulerDiscreteScheduler`` with shift 1 and no dynamic shifting.

    * Flux: the latents are packed (2 x 2 patches); FluxPipeline passes its own uniform sigmas 1 - i / S (those of
      :class:`Sampler`); classifier-free guidance is its ``true_cfg_scale`` (a "cond" and an "uncond" transformer call
      of P prompts each per step); the pipeline keeps its latents in the model dtype; height = width = 8 x S.
    * Wan: the latents are the clips [P, 3, F, S, S]; WanPipeline takes the scheduler's default timesteps, sigmas
      linspace(1, 1/1000, steps) then 0 (so its last step runs from sigma 0.001 to 0); classifier-free guidance is
      its ``guidance_scale`` (a "cond" and an "uncond" call per step, above 1); it keeps its latents in float32.
      Without a VAE it falls back to the Wan VAE's factors, so it is asked for height = width = 8 x S and
      num_frames = 4 x (F - 1) + 1 (``model.WAN_VAE_FACTOR_*``); given latents, it does not check them against
      those (the tests do).

    ``generate(steps, method)`` runs each chunk of prompts inside ``method(pipe)`` (a context manager factory: RAS
    or a diffusers cache; ``None`` for dense), entered once for the warm-up and the timed pass.
    """

    def __init__(self, models, ids: torch.Tensor, noise: torch.Tensor, *, guidance, device, dtype, batch, graphs):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, WanPipeline

        self.models, self.guidance, self.device = models, guidance, device
        self.graphs = graphs and device.type == "cuda"  # RAS's cuda_graphs (the pipeline itself runs eagerly)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        self.wan = models.arch == "wan"
        side = noise.shape[-1]
        if self.wan:
            self.pipe = WanPipeline(
                tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=models.transformer
            )
            self.size = dict(
                height=side * qmodel.WAN_VAE_FACTOR_SPATIAL,
                width=side * qmodel.WAN_VAE_FACTOR_SPATIAL,
                num_frames=qmodel.WAN_VAE_FACTOR_TEMPORAL * (noise.shape[2] - 1) + 1,
            )
        else:
            self.pipe = FluxPipeline(
                scheduler=scheduler,
                vae=None,
                text_encoder=None,
                tokenizer=None,
                text_encoder_2=None,
                tokenizer_2=None,
                transformer=models.transformer,
            )
            self.size = dict(height=side * qmodel.FLUX_VAE_FACTOR, width=side * qmodel.FLUX_VAE_FACTOR)
        self.pipe.set_progress_bar_config(disable=True)
        self.chunks = []
        with torch.no_grad():
            for lo in range(0, ids.shape[0], batch):
                chunk = ids[lo : lo + batch].to(device)
                states, pooled = models.encoder(chunk)
                uncond, uncond_pooled = models.encoder(torch.full_like(chunk, data.PAD_ID))
                inputs = dict(prompt_embeds=states.to(dtype), negative_prompt_embeds=uncond.to(dtype))
                x = noise[lo : lo + batch].to(device, torch.float32 if self.wan else dtype)
                if self.wan:
                    inputs["latents"] = x
                else:
                    inputs["latents"] = FluxPipeline._pack_latents(x, *x.shape)
                    inputs["pooled_prompt_embeds"] = pooled.to(dtype)
                    inputs["negative_pooled_prompt_embeds"] = uncond_pooled.to(dtype)
                self.chunks.append(inputs)

    def _generate_chunk(self, inputs: dict, steps: int) -> torch.Tensor:
        guidance = {"guidance_scale" if self.wan else "true_cfg_scale": self.guidance}
        out = self.pipe(
            **inputs, **guidance, **self.size, num_inference_steps=steps, output_type="latent", return_dict=False
        )[0]
        if self.wan:
            return out.float()
        side = self.size["height"]
        return self.pipe._unpack_latents(out, side, side, qmodel.FLUX_VAE_FACTOR).float()

    @torch.no_grad()
    def generate(self, steps: int, method=None) -> tuple[torch.Tensor, float]:
        """All prompts' images [N, 3, S, S] (CPU float32) and the seconds the timed pass took (after an untimed pass
        over the first chunk on CUDA)."""
        with contextlib.nullcontext() if method is None else method(self.pipe):
            if self.device.type == "cuda":
                self._generate_chunk(self.chunks[0], steps)
            _sync(self.device)
            start = time.perf_counter()
            outputs = [self._generate_chunk(chunk, steps) for chunk in self.chunks]
            _sync(self.device)
            seconds = time.perf_counter() - start
        return torch.cat(outputs).cpu(), seconds

    def close(self) -> None:
        pass


def make_sampler(models, ids, noise, *, guidance, device, dtype, batch, graphs):
    """The architecture's sampler: :class:`Sampler` (SD3, its own Euler loop) or :class:`PipelineSampler` (Flux and
    Wan, diffusers' FluxPipeline and WanPipeline)."""
    cls = Sampler if models.arch == "sd3" else PipelineSampler
    return cls(models, ids, noise, guidance=guidance, device=device, dtype=dtype, batch=batch, graphs=graphs)


@dataclasses.dataclass
class Run:
    name: str
    group: int  # the step count of the dense reference it is compared with
    steps: int
    kind: str  # "dense", "ras", "floor" (RAS 1.0) or "equal-time"
    images: torch.Tensor
    seconds: float
    tokens: float  # share of image tokens computed over the generation
    ratio: float | None = None
    variant: str | None = None
    metrics: dict = dataclasses.field(default_factory=dict)


def run_all(sampler: Sampler, args, num_tokens: int) -> list[Run]:
    runs: list[Run] = []

    def say(run: Run) -> None:
        print(f"[eval] {run.name} ({run.steps} steps): {run.seconds:.3f} s", file=sys.stderr, flush=True)

    def dense(steps: int, group: int, name: str, kind: str) -> Run:
        images, seconds = sampler.generate(steps)
        run = Run(name, group, steps, kind, images, seconds, 1.0)
        say(run)
        return run

    def ras(steps: int, ratio: float, variant: str, kind: str = "ras") -> Run:
        config = ras_config(steps, ratio, num_tokens, variant)
        seed = args.seed + EVAL_SEED_OFFSET + 7 if variant == "random" else None
        with apply_ras(sampler.models.transformer, config, cuda_graphs=sampler.graphs) as handle:
            images, seconds = sampler.generate(steps, handle, random_seed=seed)
        share = sum(config.token_schedule(num_tokens)) / (steps * num_tokens)
        name = f"RAS {ratio:g} {variant}" if kind == "ras" else "RAS 1.0 (all tokens)"
        run = Run(name, steps, steps, kind, images, seconds, share, ratio, variant)
        say(run)
        return run

    for steps in args.steps:
        reference = dense(steps, steps, f"dense {steps} steps", "dense")
        group = [reference]
        if args.floor:
            group.append(ras(steps, 1.0, "reference", kind="floor"))
        for ratio in args.ratios:
            group.extend(ras(steps, ratio, variant) for variant in args.variants)
        per_step = reference.seconds / steps
        equal: dict[int, Run] = {}
        base_variant = "reference" if "reference" in args.variants else args.variants[0]
        for run in [r for r in group if r.kind == "ras" and r.variant == base_variant]:
            fewer = min(steps, max(1, round(run.seconds / per_step)))
            if fewer not in equal:
                if fewer == steps:
                    equal[fewer] = dataclasses.replace(
                        reference, name=f"dense {steps} steps", kind="equal-time", metrics={}
                    )
                else:
                    equal[fewer] = dense(fewer, steps, f"dense {fewer} steps", "equal-time")
            equal[fewer].metrics.setdefault("equal_to", []).append(f"{run.ratio:g}")
        group.extend(equal.values())
        runs.extend(group)
    return runs


@torch.no_grad()
def score_runs(runs: list[Run], models, scenes: data.Scenes, device, batch: int) -> None:
    """Fill ``run.metrics``: per-sample PSNR/SSIM vs the dense run of the group, classifier task scores (not for
    Wan, which has no classifier), the style's errors (:func:`sample_errors`); each with its standard error."""
    targets = data.labels(scenes)
    dense = {r.group: r for r in runs if r.kind == "dense"}
    for run in runs:
        ref = dense[run.group]
        per: dict[str, list[torch.Tensor]] = {}
        for lo in range(0, run.images.shape[0], batch):
            x = run.images[lo : lo + batch].to(device)
            values = sample_errors(x, scenes[lo : lo + batch], models.style)
            if models.classifier is not None:
                tgt = {k: v[lo : lo + batch].to(device) for k, v in targets.items()}
                values.update(qmodel.score(models.classifier(x.clamp(-1, 1)), tgt))
            if run is not ref:
                y = ref.images[lo : lo + batch].to(device)
                values["psnr"], values["ssim"] = psnr(x, y), ssim(x, y)
            for key, value in values.items():
                per.setdefault(key, []).append(value.cpu())
        for key, parts in per.items():
            values = torch.cat(parts)
            run.metrics[key] = values.mean().item()
            run.metrics[key + "_se"] = (values.std().item() / math.sqrt(values.numel())) if values.numel() > 1 else 0.0


# ---- output ----
def write_png(path: str | Path, image: torch.Tensor) -> None:
    """Write ``image`` [H, W, 3] uint8 as an RGB PNG (zlib + struct; no imaging library needed)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 tensor [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    h, w, _ = image.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), image.reshape(h, w * 3)], dim=1)  # filter byte 0

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = zlib.compress(rows.contiguous().numpy().tobytes(), 9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def grid_columns(runs: list[Run]) -> list[Run]:
    """Grid columns for the first step count: dense, the reference variant at every ratio, the other variants and
    the equal-time dense run at the lowest ratio."""
    group = runs[0].group
    mine = [r for r in runs if r.group == group]
    ras = [r for r in mine if r.kind == "ras"]
    columns = [r for r in mine if r.kind == "dense"]
    if not ras:
        return columns
    base = "reference" if any(r.variant == "reference" for r in ras) else ras[0].variant
    lowest = min(r.ratio for r in ras)
    columns += [r for r in ras if r.variant == base]
    columns += [r for r in ras if r.ratio == lowest and r.variant != base]
    columns += [r for r in mine if r.kind == "equal-time" and f"{lowest:g}" in r.metrics.get("equal_to", [])]
    return columns


def make_grid(columns: list[Run], samples: int, scale: int = 2, gap: int = 4) -> torch.Tensor:
    """Rows = the first ``samples`` prompts, columns = ``columns``; uint8 [H, W, 3] on a white background. A clip
    [3, F, S, S] shows as its frames side by side."""
    first = columns[0].images
    h, w = first.shape[-2] * scale, first.shape[-1] * scale * (first.shape[2] if first.dim() == 5 else 1)
    rows = min(samples, first.shape[0])
    height = rows * h + (rows + 1) * gap
    width = len(columns) * w + (len(columns) + 1) * gap
    canvas = torch.full((height, width, 3), 255, dtype=torch.uint8)
    for c, run in enumerate(columns):
        for r in range(rows):
            img = _unit(run.images[r]).mul(255).round().to(torch.uint8)
            if img.dim() == 4:  # [3, F, S, S] -> [3, S, F * S]
                img = img.permute(0, 2, 1, 3).flatten(2)
            img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0)
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y : y + h, x : x + w] = img
    return canvas


def _pct(run: Run, key: str) -> str:
    return f"{100 * run.metrics[key]:.1f} ± {100 * run.metrics[key + '_se']:.1f}"


def table(runs: list[Run], group: int) -> str:
    mine = [r for r in runs if r.group == group]
    dense = next(r for r in mine if r.kind == "dense")
    lines = [
        "| run | steps | tokens computed | time (s) | speedup | PSNR vs dense (dB) | SSIM vs dense | "
        "scene ok (%) | objects ok (%) | attributes ok (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in mine:
        name = r.name
        if r.kind == "equal-time":
            name += f" (equal time: RAS {', '.join(r.metrics['equal_to'])})"
        if r.kind == "dense":
            quality = "reference | reference"
        else:
            quality = f"{r.metrics['psnr']:.2f} | {r.metrics['ssim']:.4f}"
        lines.append(
            f"| {name} | {r.steps} | {100 * r.tokens:.1f}% | {r.seconds:.3f} | {dense.seconds / r.seconds:.2f}x | "
            f"{quality} | {_pct(r, 'scene')} | {_pct(r, 'objects')} | {_pct(r, 'attributes')} |"
        )
    return "\n".join(lines)


def summary(runs: list[Run], groups: list[int], ratios: list[float]) -> list[str]:
    """Findings computed from the tables (no judgement beyond the numbers)."""
    lines = []
    for group in groups:
        mine = [r for r in runs if r.group == group]
        dense = next(r for r in mine if r.kind == "dense")
        for ratio in ratios:
            ras = [r for r in mine if r.kind == "ras" and r.ratio == ratio]
            if not ras:
                continue
            by_task = max(ras, key=lambda r: r.metrics["scene"])
            by_psnr = max(ras, key=lambda r: r.metrics["psnr"])
            text = (
                f"- {group} steps, ratio {ratio:g}: highest scene score `{by_task.variant}` "
                f"({100 * by_task.metrics['scene']:.1f}% vs dense {100 * dense.metrics['scene']:.1f}%), highest PSNR "
                f"`{by_psnr.variant}` ({by_psnr.metrics['psnr']:.2f} dB)"
            )
            base = next((r for r in ras if r.variant == "reference"), None)
            equal = [r for r in mine if r.kind == "equal-time" and f"{ratio:g}" in r.metrics.get("equal_to", [])]
            if base is not None and equal:
                e = equal[0]
                text += (
                    f"; `reference` ({dense.seconds / base.seconds:.2f}x, scene {100 * base.metrics['scene']:.1f}%) "
                    f"vs dense {e.steps} steps at equal time ({dense.seconds / e.seconds:.2f}x, scene "
                    f"{100 * e.metrics['scene']:.1f}%)"
                )
            lines.append(text + ".")
    return lines


def environment(device) -> str:
    import diffusers

    parts = [f"torch {torch.__version__}", f"diffusers {diffusers.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{name}; " + ", ".join(parts)


def write_report(path: Path, grid_path: Path, runs, args, models, device, dtype, captions, columns) -> None:
    training = models.training or {}
    cfg = models.config["dit"]
    n_params = sum(p.numel() for p in models.transformer.parameters())
    groups = list(args.steps)
    link = os.path.relpath(grid_path, start=path.parent)
    num_tokens = (models.image_size // cfg["patch_size"]) ** 2
    schedules = "; ".join(
        f"{steps} steps: dense warm-up steps 0-{c.warmup_steps - 1}, dense resets at {list(c.reset_steps)}"
        for steps in groups
        for c in [ras_config(steps, 0.5, num_tokens, "reference")]
    )
    lines = [
        "# RAS quality study (issue 5)",
        "",
        "Generated by `python -m bench.quality.evaluate` "
        f"(`{' '.join(['--weights', str(args.weights), '--samples', str(args.samples)])}`); every number below was "
        "measured by that run. The model is the project's own small SD3-architecture DiT trained on procedural "
        "scenes (`bench/quality`), so absolute scores say nothing about SD3 itself; what carries over is the "
        "comparison between the RAS variants and the baselines on one trained model.",
        "",
        "## Setup",
        f"- Device: {environment(device)}; model dtype {str(dtype).split('.')[-1]}; CUDA graphs "
        f"{'on (RAS and dense)' if args.graphs and device.type == 'cuda' else 'off'}.",
        f"- Model: `SD3Transformer2DModel`, pixel space {models.image_size}x{models.image_size}x3, patch "
        f"{cfg['patch_size']} ({(models.image_size // cfg['patch_size']) ** 2} image tokens), {cfg['num_layers']} "
        f"blocks, width {cfg['num_attention_heads'] * cfg['attention_head_dim']} ({cfg['num_attention_heads']} heads "
        f"x {cfg['attention_head_dim']}), {n_params / 1e6:.1f} M parameters; caption encoder over a "
        f"{models.encoder.embed.num_embeddings}-word vocabulary.",
        f"- Training: {training.get('dit_steps', '?')} DiT steps (batch {training.get('batch', '?')}, seed "
        f"{training.get('seed', '?')}, {training.get('dit_seconds', '?')} s on {training.get('device', '?')}); "
        f"final loss {training.get('dit_loss_last200', '?')}; reproduce with `{training.get('reproduce', '?')}`.",
        f"- Task classifier ({training.get('classifier_steps', '?')} steps, on augmented scenes): on clean held-out "
        f"scenes {training.get('classifier_clean', '?')}.",
        "- CFG scale chosen after training from dense samples of held-out prompts (scale: their scores): "
        f"{training.get('validation', 'not run')}.",
        f"- Sampling: {args.samples} prompts (evaluation seed {args.seed}), CFG scale {args.guidance:g}, "
        f"flow-matching Euler with uniform sigmas, batches of {args.batch} prompts (transformer batch "
        f"{2 * args.batch}); RAS schedule: the `RASConfig.sd3` preset (high_ratio 0.3, k = 0.1, static), resets "
        f"moved proportionally for other step counts: {schedules}.",
        "",
        "## Variants",
        "- `reference`: the preset, mode `reference` (priority R·exp(+kD), the public code's rule).",
        "- `paper`: mode `paper` (priority R·exp(−kD), the paper's stated intent).",
        "- `no-starvation`: starvation_scale 0 (ranking by the output's per-token channel std R alone).",
        "- `random`: uniformly random active tokens, drawn afresh every RAS step and for every prompt: the tool "
        "hands `observe()` Gaussian noise instead of the model output, with starvation_scale 0 and high_ratio 1. "
        "Same schedule and token counts as the others.",
        "- `RAS 1.0 (all tokens)`: the RAS code path (K/V caches, gathers) computing every token: the numerical "
        "floor of the PSNR/SSIM columns.",
        "- `dense N steps (equal time)`: dense sampling with as many steps as fit in the measured time of the "
        "`reference` run at that ratio (N = round(time / dense time per step)); the baseline a user could pick "
        "instead of RAS.",
        "",
        "## Metrics",
        "- PSNR (peak 1, images mapped to [0, 1]) and SSIM (Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, mean over "
        "channels) against the dense run of the same step count, from the same seed; mean over samples.",
        "- Task scores, by the scene classifier against the requested scene (mean ± standard error over samples): "
        "*scene ok* = every grid cell read as requested (empty, or the requested shape in the requested colour) and "
        "the right background colour; *objects ok* = share of requested objects with the right shape and colour in "
        "place; *attributes ok* = share right among object sizes, object textures and the background texture.",
        "- Time: the whole batched generation (all prompts, transformer + CFG + selection + Euler update), after an "
        "untimed warm-up pass; speedup = dense time of the same step count / run time.",
        "",
    ]
    for group in groups:
        lines += [f"## {group} steps", "", table(runs, group), ""]
    lines += ["## Summary (computed from the tables)", "", *summary(runs, groups, list(args.ratios)), ""]
    legend = ", ".join(
        r.name + (f" (equal time: RAS {', '.join(r.metrics['equal_to'])})" if r.kind == "equal-time" else "")
        for r in columns
    )
    lines += [
        "## Image grid",
        "",
        f"![dense vs RAS variants]({link})",
        "",
        f"Columns ({columns[0].steps} steps): {legend}. Rows (prompts):",
        "",
        *[f"{i + 1}. {c}" for i, c in enumerate(captions)],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="bench/quality/weights", help="folder written by bench.quality.train")
    p.add_argument(
        "--json", default=None, help="Flux, Wan: the runs' records (default docs/frontier.json, -wan.json for Wan)"
    )
    p.add_argument("--plot", default=None, help="Flux, Wan: the frontier plot (default docs/frontier.png, -wan.png)")
    p.add_argument(
        "--published",
        default=None,
        help="Flux, Wan: the bench.e2e record of the published layout whose per-step times model each run's time "
        "there (the report's equal-time table and the plot's -published.png; default frontier.PUBLISHED's, 'none': "
        "left out)",
    )
    p.add_argument(
        "--first-block-cache", type=float, nargs="*", default=[0.05, 0.2], help="Flux, Wan: FirstBlockCache thresholds"
    )
    p.add_argument("--taylorseer", type=int, nargs="*", default=[2, 4], help="Flux, Wan: TaylorSeer cache intervals")
    p.add_argument(
        "--stack-steps", type=int, default=None, help="Flux, Wan: steps of RAS on fewer steps (default S / 2)"
    )
    p.add_argument("--stack-ratios", type=float, nargs="*", default=[0.5, 0.25], help="Flux, Wan: their ratios")
    p.add_argument(
        "--stack-variants",
        nargs="+",
        choices=FRONTIER_VARIANTS,
        default=["reference", "metric-attention"],
        help="Flux, Wan: their variants",
    )
    p.add_argument("--samples", type=int, default=256, help="prompts (default 256)")
    p.add_argument("--batch", type=int, default=128, help="prompts per transformer call (default 128)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default 28 10; Flux, Wan: 28)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=ALL_VARIANTS,
        default=None,
        help="default: VARIANTS, FRONTIER_VARIANTS (Flux, Wan)",
    )
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True, help="the RAS 1.0 row")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the training record's, or 4)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (prompts and initial noise)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on CUDA, else fp32")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="CUDA graphs (CUDA only)")
    p.add_argument("--report", default=None, help="default docs/quality.md; Flux: docs/frontier.md; Wan: -wan.md")
    p.add_argument(
        "--grid", default=None, help="default docs/quality_grid.png; Flux: docs/frontier_grid.png; Wan: -wan_grid.png"
    )
    p.add_argument("--grid-samples", type=int, default=6)
    return p


def main(argv: list[str] | None = None) -> list[Run]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples < 1 or args.batch < 1 or args.grid_samples < 1:
        parser.error("--samples, --batch and --grid-samples must be >= 1")
    args.batch = min(args.batch, args.samples)
    if args.samples % args.batch:
        parser.error(f"--samples ({args.samples}) must be a multiple of --batch ({args.batch}): equal timed batches")
    if not qmodel.has_weights(args.weights):
        parser.error(f"no trained weights in {args.weights}: run `python -m bench.quality.train --out {args.weights}`")
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = qmodel.load(args.weights, device, dtype)
    frontier_run = models.arch in ("flux", "wan")  # through the diffusers pipeline: the frontier
    args.steps = args.steps or ([28] if frontier_run else [28, 10])
    args.variants = args.variants or list(FRONTIER_VARIANTS if frontier_run else VARIANTS)
    stem = "docs/frontier" + ("-wan" if models.arch == "wan" else "")
    args.report = args.report or (stem + ".md" if frontier_run else "docs/quality.md")
    args.grid = args.grid or (stem + "_grid.png" if frontier_run else "docs/quality_grid.png")
    args.json = args.json or stem + ".json"
    args.plot = args.plot or stem + ".png"
    if frontier_run:
        from .frontier import PUBLISHED

        args.stack_steps = args.stack_steps if args.stack_steps is not None else args.steps[0] // 2
        args.published = None if args.published == "none" else args.published or PUBLISHED[models.arch]
        if args.published and not Path(args.published).is_file():
            parser.error(f"--published: no such file {args.published} (a bench.e2e --json record, or 'none')")
    if any(s < 2 for s in args.steps) or (frontier_run and args.stack_steps == 1):
        parser.error("--steps and --stack-steps values must be >= 2")
    if any(not 0 < r <= 1 for r in [*args.ratios, *args.stack_ratios]):
        parser.error("--ratios and --stack-ratios values must be in (0, 1]")
    if args.guidance is None:
        args.guidance = float(models.training.get("guidance", 4.0))
    size = models.image_size
    gen = torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET)
    scenes = data.sample_scenes(args.samples, gen, models.style)
    ids, captions = data.tokens(scenes), data.captions(scenes)
    noise = torch.randn(args.samples, *models.sample_shape, generator=gen)
    print(
        f"[eval] {environment(device)}; {models.arch}, {args.samples} prompts, steps {args.steps}, ratios "
        f"{args.ratios}, variants {args.variants}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    sampler = make_sampler(
        models, ids, noise, guidance=args.guidance, device=device, dtype=dtype, batch=args.batch, graphs=args.graphs
    )
    try:
        if frontier_run:
            from .frontier import run_frontier

            runs = run_frontier(sampler, args, models.num_tokens)
        else:
            runs = run_all(sampler, args, models.num_tokens)
    finally:
        sampler.close()
    score_runs(runs, models, scenes, device, args.batch)
    columns = grid_columns(runs)
    write_png(args.grid, make_grid(columns, args.grid_samples))
    rows = min(args.grid_samples, args.samples)
    if frontier_run:
        from . import frontier

        render = sample_errors(data.render(scenes, size, models.style, models.frames), scenes, models.style)
        recs = frontier.write(runs, args, models, device, {k: v.mean().item() for k, v in render.items()})
        print("\n" + frontier.table(recs))
        written = f"{args.report}, {args.json}, {args.plot} and {args.grid}"
    else:
        write_report(Path(args.report), Path(args.grid), runs, args, models, device, dtype, captions[:rows], columns)
        for group in args.steps:
            print(f"\n{group} steps\n{table(runs, group)}")
        print("\n" + "\n".join(summary(runs, list(args.steps), list(args.ratios))))
        written = f"{args.report} and {args.grid}"
    elapsed = time.perf_counter() - start
    print(f"[eval] {len(runs)} runs in {elapsed:.0f} s; wrote {written}", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
