"""The main job: a full sampling loop dense and with RAS, side by side, and a comparison table.

Default: an SD3-architecture transformer with random weights (a tiny one on CPU; the SD3-medium config on a CUDA
GPU), CFG batch 2, the model family's RAS preset. Speed does not depend on weight values; the PSNR column says how
far each RAS result lands from the dense result of the same seed (meaningful for trained weights).

    python -m bench.e2e                               # SD3 layout, ratios 1.0 / 0.5 / 0.25 / 0.125 (+ dense
                                                      # torch.compile on a GPU)
    python -m bench.e2e --model lumina --ratio 0.25   # Lumina-Next layout
    python -m bench.e2e --pretrained /path/to/stable-diffusion-3-medium-diffusers --prompt "a cat"
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from bench.common import resolve_dtype
from ras_models import RASConfig, apply_ras

# Published layouts (random weights): SD3-medium and Lumina-Next-SFT.
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
TEXT_TOKENS = {"sd3": 333, "lumina": 256}
GUIDANCE = 5.0


@dataclass
class Result:
    name: str
    tokens: float  # share of image tokens computed over the run
    step_ms: list[float]
    latents: torch.Tensor
    ras_steps: list[bool] | None = None  # which steps were RAS steps (None: all dense)
    peak_mib: float | None = None
    ratio: float | None = None  # RAS sample ratio (None: a dense run)
    schedule: str | None = None

    @property
    def total_ms(self) -> float:
        return sum(self.step_ms)

    @property
    def ras_step_ms(self) -> float | None:
        """Median time of the RAS steps alone (dense warm-up and reset steps excluded)."""
        if not self.ras_steps or not any(self.ras_steps):
            return None
        return statistics.median(t for t, ras in zip(self.step_ms, self.ras_steps, strict=False) if ras)


class Loop:
    """A CFG sampling loop of a bare transformer (flow-matching Euler), the same for dense and RAS runs."""

    def __init__(self, family: str, transformer, latent: int, device, dtype, seed: int):
        self.family, self.transformer, self.device = family, transformer, device
        cfg = transformer.config
        g = torch.Generator(device="cpu").manual_seed(seed)
        t = TEXT_TOKENS[family]
        self.noise = torch.randn(1, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
        if family == "sd3":
            self.kwargs = {
                "encoder_hidden_states": torch.randn(2, t, cfg.joint_attention_dim, generator=g).to(device, dtype),
                "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g).to(device, dtype),
            }
        else:
            from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

            mask = torch.ones(2, t, dtype=torch.bool)
            mask[1, t // 4 :] = False  # the negative prompt is shorter: a padded caption
            self.kwargs = {
                "encoder_hidden_states": torch.randn(2, t, cfg.cross_attention_dim, generator=g).to(device, dtype),
                "encoder_mask": mask.to(device),
                "image_rotary_emb": get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384).to(device),
                "cross_attention_kwargs": {"base_sequence_length": (cfg.sample_size * 8 // 16) ** 2},
            }

    def run(self, steps: int, handle=None, progress: str = "", on_step=None) -> tuple[torch.Tensor, list[float]]:
        """One generation; ``on_step(i)``, if given, is called before step i (e.g. to start a profiler)."""
        x = self.noise.clone()
        times = []
        if handle is not None:
            handle.reset()
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for i in range(steps):
            if on_step is not None:
                on_step(i)
            sigma, sigma_next = 1 - i / steps, 1 - (i + 1) / steps
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                t = torch.full((2,), sigma * 1000 if self.family == "sd3" else 1 - sigma, device=self.device)
                out = self.transformer(torch.cat([x, x]), timestep=t, return_dict=False, **self.kwargs)[0]
                out = out[:, : x.shape[1]]
                uncond, cond = out.chunk(2)
                guided = uncond + GUIDANCE * (cond - uncond)
                if handle is not None:
                    handle.observe(guided)
                velocity = guided if self.family == "sd3" else -guided
                x = x + (sigma_next - sigma) * velocity
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            print(f"\r  {progress} step {i + 1}/{steps}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        return x.float(), times


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((x - ref) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def build_transformer(family: str, full: bool, device, dtype):
    from diffusers import LuminaNextDiT2DModel, SD3Transformer2DModel

    cls, config = {
        "sd3": (SD3Transformer2DModel, SD3_MEDIUM if full else SD3_TINY),
        "lumina": (LuminaNextDiT2DModel, LUMINA_NEXT_SFT if full else LUMINA_TINY),
    }[family]
    with torch.device(device):
        model = cls(**config)
    if family == "lumina":
        with torch.no_grad():
            model.pad_token.normal_()  # created uninitialised by diffusers
    return model.to(dtype).eval()


def preset(family: str, steps: int | None, ratio: float, num_tokens: int, schedule: str | None = None) -> RASConfig:
    """The family's preset; other step counts move the resets proportionally, and the dynamic schedule's
    token steps (tuned for N = 4096) scale with N so the active share still falls from ~69% to ~31%."""
    base = RASConfig.sd3 if family == "sd3" else RASConfig.lumina_next
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


COMPILED = "diffusers dense torch.compile"


def table(results: list[Result], dense: Result) -> str:
    """The comparison: one row per run, speedups over the dense eager run (and over the dense torch.compile run,
    when there is one, in a last column)."""
    compiled = next((r for r in results if r.name == COMPILED), None)
    extra = ("", "") if compiled is None else (" vs torch.compile |", "---|")
    lines = [
        "| run | steps | tokens computed | median ms/step | median RAS-step ms (vs dense step) | total ms | "
        f"speedup | peak MiB | PSNR vs dense (dB) |{extra[0]}",
        f"|---|---|---|---|---|---|---|---|---|{extra[1]}",
    ]
    dense_step = statistics.median(dense.step_ms)
    for r in results:
        ras = "-" if r.ras_step_ms is None else f"{r.ras_step_ms:.2f} ({r.ras_step_ms / dense_step:.2f}x)"
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        line = (
            f"| {r.name} | {len(r.step_ms)} | {100 * r.tokens:.1f}% | {statistics.median(r.step_ms):.2f} | {ras} | "
            f"{r.total_ms:.1f} | {dense.total_ms / r.total_ms:.2f}x | {peak} | {psnr(r.latents, dense.latents):.1f} |"
        )
        if compiled is not None:
            line += f" {compiled.total_ms / r.total_ms:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def _compiled_blocks(transformer) -> list:
    """Regional torch.compile of the transformer blocks (the repeated part, compiled once and reused by every block,
    as diffusers' ``compile_repeated_blocks`` does); returns the blocks to undo it with :func:`_uncompile`."""
    blocks = list(getattr(transformer, "transformer_blocks", None) or transformer.layers)
    for block in blocks:
        block.compile()
    return blocks


def _uncompile(blocks: list) -> None:
    for block in blocks:
        block._compiled_call_impl = None


def write_json(path: str, model: str, resolution: int, results: list[Result], dense: Result) -> None:
    """The table's numbers for bench.plot_e2e: one record per run, times in ms."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k not in ("latents", "ras_steps")}
        row.update(total_ms=r.total_ms, ras_step_ms=r.ras_step_ms, speedup=dense.total_ms / r.total_ms)
        rows.append(row)
    record = {
        "model": model,
        "resolution": resolution,
        "device": device,
        "torch": torch.__version__,
        "dense_step_ms": statistics.median(dense.step_ms),
        "runs": rows,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def _measure(loop: Loop, steps: int, handle, label: str) -> tuple[torch.Tensor, list[float], float | None]:
    """One timed generation (after the caller's warm-up) and its peak memory in MiB (CUDA only)."""
    cuda = loop.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    latents, times = loop.run(steps, handle, progress=label)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return latents, times, peak


def run_random_weights(args) -> None:
    device = torch.device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    dtype = resolve_dtype(args.dtype, device)
    latent = args.resolution // 8 if args.resolution else (128 if full else 32)
    transformer = build_transformer(args.model, full, device, dtype)
    loop = Loop(args.model, transformer, latent, device, dtype, args.seed)
    n = (latent // transformer.config.patch_size) ** 2
    configs = [preset(args.model, args.steps, r, n, args.schedule) for r in args.ratio]
    steps = configs[0].num_steps
    print(
        f"{args.model}: {'published' if full else 'tiny'} config, random weights, {device}, {dtype}, "
        f"latent {latent}x{latent} ({n} image tokens), {steps} steps, CFG batch 2",
        file=sys.stderr,
    )
    loop.run(min(2, steps), progress="warm-up dense")
    latents, times, peak = _measure(loop, steps, None, "dense")
    dense = Result("diffusers dense eager", 1.0, times, latents, peak_mib=peak)
    results = [dense]
    compile_baseline = device.type == "cuda" if args.compile_baseline is None else args.compile_baseline
    if compile_baseline:
        blocks = _compiled_blocks(transformer)
        loop.run(steps, progress="warm-up dense torch.compile")  # compiles
        latents, times, peak = _measure(loop, steps, None, "dense torch.compile")
        results.append(Result(COMPILED, 1.0, times, latents, peak_mib=peak))
        _uncompile(blocks)
    graph_modes = {"on": [True], "off": [False], "both": [False, True]}[args.graphs if device.type == "cuda" else "off"]
    for config in configs:
        for graphs in graph_modes:
            label = f"RAS ratio {config.sample_ratio} ({config.schedule}{', CUDA graphs' if graphs else ', eager'})"
            with apply_ras(transformer, config, cuda_graphs=graphs) as handle:
                loop.run(steps, handle, progress=f"warm-up {label}")  # a whole generation: every shape captured
                latents, times, peak = _measure(loop, steps, handle, label)
            share = sum(config.token_schedule(n)) / (steps * n)
            ras_steps = [config.is_ras_step(i) for i in range(steps)]
            results.append(Result(label, share, times, latents, ras_steps, peak, config.sample_ratio, config.schedule))
    print(table(results, dense))
    if args.json:
        write_json(args.json, args.model, latent * 8, results, dense)


def run_pretrained(args) -> None:
    from diffusers import DiffusionPipeline

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or "bf16", device)
    pipe = DiffusionPipeline.from_pretrained(args.pretrained, torch_dtype=dtype, local_files_only=True).to(device)
    family = "sd3" if type(pipe.transformer).__name__.startswith("SD3") else "lumina"
    size = args.resolution or 1024
    n = (size // pipe.vae_scale_factor // pipe.transformer.config.patch_size) ** 2
    steps = preset(family, args.steps, 0.5, n).num_steps

    def generate():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(
            args.prompt, height=size, width=size, num_inference_steps=steps, generator=generator, output_type="latent"
        ).images

    generate()  # warm-up
    results = []
    for ratio in [None, *args.ratio]:
        config = None if ratio is None else preset(family, args.steps, ratio, n, args.schedule)
        handle = None if config is None else apply_ras(pipe, config)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            latents = generate()
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = (time.perf_counter() - start) * 1e3
        finally:
            if handle is not None:
                handle.remove()
        share = 1.0 if config is None else sum(config.token_schedule(n)) / (steps * n)
        name = "pipeline dense" if config is None else f"RAS ratio {ratio} ({config.schedule})"
        results.append(Result(name, share, [total / steps] * steps, latents.float()))  # per step: the mean
    print(table(results, results[0]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd3", "lumina"), default="sd3", help="model family (default sd3)")
    parser.add_argument(
        "--ratio",
        type=float,
        nargs="+",
        default=[1.0, 0.5, 0.25, 0.125],
        help="RAS sample ratios to compare with dense (default 1.0 0.5 0.25 0.125; 1.0 runs every token through "
        "the RAS path)",
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's 28 / 30)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels, latent = resolution / 8 (default 1024 on GPU, 256 on CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="published model config (default on GPU) or a tiny one (default on CPU)",
    )
    parser.add_argument(
        "--schedule",
        choices=("static", "dynamic"),
        default=None,
        help="override the preset's schedule (SD3 static, Lumina-Next dynamic)",
    )
    parser.add_argument(
        "--graphs",
        choices=("on", "off", "both"),
        default="on",
        help="RAS runs with CUDA graphs (default), eagerly, or both",
    )
    parser.add_argument(
        "--compile-baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time dense diffusers with its transformer blocks under torch.compile (default on a GPU; "
        "compiling takes a minute or two)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (for bench.plot_e2e)")
    parser.add_argument("--pretrained", default=None, help="local diffusers pipeline folder (real weights)")
    parser.add_argument("--prompt", default="a photo of a red cat on a blue sofa")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for r in args.ratio:
        if not 0 < r <= 1:
            parser.error(f"--ratio values must be in (0, 1], got {r}")
    if args.resolution is not None and args.resolution % 16:
        parser.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.pretrained:
        run_pretrained(args)
    else:
        run_random_weights(args)


if __name__ == "__main__":
    main()
