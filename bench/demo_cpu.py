"""The main job on a CPU: the quality study's trained DiT, sampled dense and with RAS; a table and an image grid.

Without a GPU every RAS op runs its plain-PyTorch reference on a small model (13 M parameters, 1024 image tokens),
so the times say little about a GPU, where the Triton kernels and CUDA graphs run (docs/benchmarks.md). What the
demo does show on any machine: RAS at ratio 1.0 reproduces dense, lower ratios compute fewer tokens in less time,
and the images (and the scenes the shipped classifier reads in them) stay close to dense.

The prompts are seeded scenes of the quality study (``bench.quality.data``), sampled together as one CFG batch with
the study's sampler, schedule (``RASConfig.sd3`` with the resets moved for the step count) and selection mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.quality import data, evaluate
from bench.quality import model as qmodel
from ras_models import RASConfig, apply_ras

WEIGHTS = Path(__file__).resolve().parent / "quality" / "weights"
DEFAULT_STEPS = 16  # dense + four ratios in about a minute on 2 CPU cores, three prompts
NOTICE = (
    "CPU demo: the quality study's small trained DiT on the plain-PyTorch path. Times of a small model on a CPU are "
    "not what a GPU gives (there the Triton kernels and CUDA graphs run): see docs/benchmarks.md for GPU numbers."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's own options (its other inputs are bench.e2e's --steps, --ratio and --seed)."""
    parser.add_argument("--scenes", type=int, default=3, help="CPU demo: prompts, the grid rows (default 3)")
    parser.add_argument("--out", default="demo-cpu.png", help="CPU demo: image grid to write (default demo-cpu.png)")


def applies(args: argparse.Namespace) -> bool:
    """Whether bench.e2e runs this demo: a CPU device and the SD3 family, with nothing asked of the random-weight
    benchmark (``--full`` / ``--no-full``, ``--resolution``) or of a pretrained pipeline."""
    return (
        torch.device(args.device).type == "cpu"
        and args.model == "sd3"
        and args.full is None
        and args.resolution is None
        and not args.pretrained
    )


@dataclass
class DemoRun:
    name: str
    config: RASConfig | None  # None: the dense run
    images: torch.Tensor  # [P, 3, S, S] in [-1, 1]
    step_ms: list[float]
    tokens: float  # share of image tokens computed over the generation
    metrics: dict = field(default_factory=dict)

    @property
    def ras_step_ms(self) -> float | None:
        """Median time of the RAS steps alone (dense warm-up and reset steps excluded); None without any."""
        ras = [t for i, t in enumerate(self.step_ms) if self.config is not None and self.config.is_ras_step(i)]
        return statistics.median(ras) if ras else None


def table(runs: list[DemoRun]) -> str:
    dense = runs[0]
    dense_step = statistics.median(dense.step_ms)
    lines = [
        "| run | tokens computed | ms/step: median (min-max) | RAS steps: median ms (vs dense step) | total s | "
        "speedup | PSNR vs dense (dB) | SSIM vs dense | scenes read right |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        step = f"{statistics.median(r.step_ms):.0f} ({min(r.step_ms):.0f}-{max(r.step_ms):.0f})"
        ras = "-" if r.ras_step_ms is None else f"{r.ras_step_ms:.0f} ({r.ras_step_ms / dense_step:.2f}x)"
        total, speedup = sum(r.step_ms) / 1e3, sum(dense.step_ms) / sum(r.step_ms)
        quality = "reference | reference" if r is dense else f"{r.metrics['psnr']:.1f} | {r.metrics['ssim']:.4f}"
        lines.append(
            f"| {r.name} | {100 * r.tokens:.1f}% | {step} | {ras} | {total:.2f} | {speedup:.2f}x | {quality} | "
            f"{r.metrics['scenes']} |"
        )
    return "\n".join(lines)


@torch.no_grad()
def run(args: argparse.Namespace) -> list[DemoRun]:
    """Sample ``args.scenes`` seeded scenes dense and at each of ``args.ratio``; print the table, write the grid."""
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 2 or args.scenes < 1:
        raise ValueError(f"the CPU demo needs --steps >= 2 and --scenes >= 1, got {steps} and {args.scenes}")
    print(NOTICE, flush=True)
    start = time.perf_counter()
    device = torch.device("cpu")
    models = qmodel.load(WEIGHTS, device)
    size = models.image_size
    num_tokens = (size // models.config["dit"]["patch_size"]) ** 2
    gen = torch.Generator().manual_seed(args.seed + evaluate.EVAL_SEED_OFFSET)
    scenes = data.sample_scenes(args.scenes, gen)
    noise = torch.randn(args.scenes, 3, size, size, generator=gen)
    sampler = evaluate.Sampler(
        models,
        data.tokens(scenes),
        noise,
        guidance=float(models.training.get("guidance", 4.0)),
        device=device,
        dtype=torch.float32,
        batch=args.scenes,
        graphs=False,
    )
    sampler.generate(1)  # warm-up: first-call allocations
    runs = []
    for ratio in [None, *args.ratio]:
        config = None if ratio is None else evaluate.ras_config(steps, ratio, num_tokens, "reference")
        step_ms: list[float] = []
        if config is None:
            images, _ = sampler.generate(steps, step_ms=step_ms)
            runs.append(DemoRun("dense", None, images, step_ms, 1.0))
        else:
            with apply_ras(models.transformer, config, cuda_graphs=False) as handle:
                images, _ = sampler.generate(steps, handle, step_ms=step_ms)
            share = sum(config.token_schedule(num_tokens)) / (steps * num_tokens)
            runs.append(DemoRun(f"RAS {ratio}", config, images, step_ms, share))
        print(f"  {runs[-1].name}: {sum(step_ms) / 1e3:.1f} s", flush=True)
    targets = data.labels(scenes)
    for r in runs:
        scores = qmodel.score(models.classifier(r.images.clamp(-1, 1)), targets)
        r.metrics["scenes"] = f"{int(scores['scene'].sum())}/{args.scenes}"
        r.metrics["psnr"] = evaluate.psnr(r.images, runs[0].images).mean().item()
        r.metrics["ssim"] = evaluate.ssim(r.images, runs[0].images).mean().item()
    evaluate.write_png(args.out, evaluate.make_grid(runs, args.scenes))
    schedule = evaluate.ras_config(steps, 1.0, num_tokens, "reference")  # the same warm-up and resets at every ratio
    print(
        f"\n{args.scenes} prompts x {steps} steps, CFG batch {2 * args.scenes}, {size}x{size} px ({num_tokens} image "
        f"tokens), {torch.get_num_threads()} CPU threads; RAS: dense steps 0-{schedule.warmup_steps - 1} and "
        f"{list(schedule.reset_steps)}, the others compute the ratio's share of tokens (mode {schedule.mode}).\n"
    )
    print(table(runs))
    print(f"\nImage grid: {Path(args.out).resolve()}")
    print(f"Columns: {', '.join(r.name for r in runs)}. Rows:")
    for i, caption in enumerate(data.captions(scenes)):
        print(f"{i + 1}. {caption}")
    print(f"\nDemo wall time {time.perf_counter() - start:.0f} s.")
    return runs
