"""The main job: whole pipeline calls, dense and with RAS, side by side, and a comparison table.

Every time is the wall clock of the call users make, ``pipe(prompt_embeds=..., ..., output_type="latent")``, on the
model family's diffusers pipeline (published scheduler) around a transformer with random weights (a tiny one on
CPU; the published SD3-medium / Lumina-Next-SFT / Flux.1-dev / Wan 2.1 T2V 1.3B or 14B layout on a CUDA GPU). Prompts
are random embeddings of the published shapes: text encoding and VAE decoding, the same for dense and RAS, are outside
the timed call. Each run:
one warm-up call (compiles, autotunes, captures every step shape's CUDA graph; for the dense eager baseline of a
one-transformer pipeline, whose steps all have one shape, a call of at most 2 steps), then ``--repeats`` timed calls;
min / median / max, speedups by median against the dense pipeline in the same process. Speed does not depend on
weight values; the PSNR column says how far each RAS result lands from the dense result of the same seed
(meaningful for trained weights).

    python -m bench.e2e                               # SD3 layout, ratios 1.0 / 0.5 / 0.25 / 0.125 (+ dense
                                                      # torch.compile on a GPU); on a CPU: bench.demo_cpu, the
                                                      # shipped trained model dense and with RAS, and a PNG grid
    python -m bench.e2e --model lumina --ratio 0.25   # Lumina-Next layout
    python -m bench.e2e --model flux --ratio 0.25 0.125 --taylorseer 3 5   # Flux.1-dev layout, diffusers' TaylorSeer
    python -m bench.e2e --model wan --frames 81       # Wan 2.1 T2V 1.3B layout, 480x832, 81 frames, 50 steps
    python -m bench.e2e --model wan-14b --frames 81 --resolution 720x1280   # Wan 2.1 T2V 14B layout
    python -m bench.e2e --model wan-14b --steps 12 --extrapolate-to 50     # a short run, plus 50-step estimates
    python -m bench.e2e --model wan-a14b --steps 12 --extrapolate-to 50    # Wan 2.2 A14B: two 14B experts
    python -m bench.e2e --pretrained /path/to/stable-diffusion-3-medium-diffusers --prompt "a cat"
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, replace

import torch

from bench import demo_cpu
from bench.common import Timing, attention_path, resolve_dtype
from bench.pipelines import (
    LAYOUTS,
    TWO_EXPERTS,
    Loop,
    build_pipeline,
    build_transformer,
    encode_prompt,
    family_of,
    height_width,
    num_tokens,
    preset,
    prompt_inputs,
    ras_steps,
    timed_call,
)
from ras_kernels.attention.ops import ATTENTION_PATHS, requested_attention_path
from ras_kernels.select.ops import METRICS
from ras_models import apply_ras

TIMED = 'whole pipe(...) calls, output_type="latent"; text encoding and VAE decoding are outside the timed call'


@dataclass
class Result:
    name: str
    tokens: float  # share of image tokens computed over the run
    call_ms: list[float]  # each timed pipe(...) call, wall clock
    step_ms: list[float]  # per denoising step, the median over the timed calls
    latents: torch.Tensor
    ras_steps: list[bool] | None = None  # which steps were RAS steps (None: all dense)
    peak_mib: float | None = None
    ratio: float | None = None  # RAS sample ratio (None: a dense run)
    schedule: str | None = None
    loop_ms: float | None = None  # one generation of the benches' own loop (--loop)

    @property
    def total_ms(self) -> float:
        """Median wall clock of the timed pipe(...) calls."""
        return statistics.median(self.call_ms)

    def _median_step_ms(self, ras: bool) -> float | None:
        """Median time of the RAS steps (``ras``) or of the dense ones; None when the run had none of them."""
        kinds = self.ras_steps or [False] * len(self.step_ms)
        times = [t for t, kind in zip(self.step_ms, kinds, strict=False) if kind == ras]
        return statistics.median(times) if times else None

    @property
    def dense_step_ms(self) -> float | None:
        """Median time of the dense steps alone (every step of a dense run; a RAS run's warm-up and reset steps)."""
        return self._median_step_ms(False)

    @property
    def ras_step_ms(self) -> float | None:
        """Median time of the RAS steps alone (dense warm-up and reset steps excluded)."""
        return self._median_step_ms(True)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = torch.mean((x - ref) ** 2).item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


COMPILED = "diffusers dense torch.compile"
TAYLORSEER = "diffusers TaylorSeer, interval {}"


def table(results: list[Result], dense: Result) -> str:
    """The comparison: one row per run, speedups (by median) over the dense pipeline; a column for the benches' own
    loop when it ran, and one over the dense torch.compile run when there is one."""
    compiled = next((r for r in results if r.name == COMPILED), None)
    loop = dense.loop_ms is not None
    head = (
        "| run | tokens computed | pipe(...) ms min / median / max | speedup | median ms/step | "
        "median RAS-step ms (vs dense step) | peak MiB | PSNR vs dense (dB) |"
    )
    head += " own loop speedup |" * loop + " vs torch.compile |" * (compiled is not None)
    lines = [head, "|---" * head.count(" |") + "|"]
    dense_step = statistics.median(dense.step_ms)
    for r in results:
        ras = "-" if r.ras_step_ms is None else f"{r.ras_step_ms:.2f} ({r.ras_step_ms / dense_step:.2f}x)"
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        line = (
            f"| {r.name} | {100 * r.tokens:.1f}% | {Timing(r.call_ms).spread(1)} | "
            f"{dense.total_ms / r.total_ms:.2f}x | {statistics.median(r.step_ms):.2f} | {ras} | {peak} | "
            f"{psnr(r.latents, dense.latents):.1f} |"
        )
        if loop:
            line += " - |" if r.loop_ms is None else f" {dense.loop_ms / r.loop_ms:.2f}x |"
        if compiled is not None:
            line += f" {compiled.total_ms / r.total_ms:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def estimated_ms(result: Result, ras_steps: list[bool]) -> float:
    """A call of the generation whose steps are ``ras_steps`` (True: a RAS step), from ``result``'s measured
    medians: its time outside the steps, plus each step at the median of ``result``'s steps of that kind."""
    dense_step, ras_step = result.dense_step_ms, result.ras_step_ms
    if (ras_step is None and any(ras_steps)) or (dense_step is None and not all(ras_steps)):
        raise ValueError(f"{result.name} did not time every kind of step the schedule to estimate has")
    outside = result.total_ms - sum(result.step_ms)
    return outside + sum(ras_step if ras else dense_step for ras in ras_steps)


def extrapolated_table(results: list[Result], dense: Result, schedule_of) -> str:
    """Estimated calls of a longer generation: ``schedule_of(result)`` gives its steps (True: a RAS step) for each
    row; rows whose steps are not uniform in time (TaylorSeer's full and predicted steps) are left out."""
    rows = [r for r in results if not r.name.startswith(TAYLORSEER.format(""))]
    base = estimated_ms(dense, schedule_of(dense))
    lines = [
        "| run | measured call ms (median) | dense-step ms | RAS-step ms | estimated call ms | estimated speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense_step = "-" if r.dense_step_ms is None else f"{r.dense_step_ms:.2f}"
        ras = "-" if r.ras_step_ms is None else f"{r.ras_step_ms:.2f}"
        est = estimated_ms(r, schedule_of(r))
        lines.append(f"| {r.name} | {r.total_ms:.1f} | {dense_step} | {ras} | {est:.1f} | {base / est:.2f}x |")
    return "\n".join(lines)


def _compiled_blocks(transformer) -> list:
    """Regional torch.compile of the transformer blocks (the repeated part, compiled once and reused by every block,
    as diffusers' ``compile_repeated_blocks`` does); returns the blocks to undo it with :func:`_uncompile`."""
    names = ("transformer_blocks", "single_transformer_blocks", "layers", "blocks")
    blocks = [block for name in names for block in getattr(transformer, name, ())]
    for block in blocks:
        block.compile()
    return blocks


def _uncompile(blocks: list) -> None:
    for block in blocks:
        block._compiled_call_impl = None


def write_json(path: str, model: str, resolution, repeats: int, results: list[Result], dense: Result) -> None:
    """The table's numbers for bench.plot_e2e: one record per run, times in ms."""
    import diffusers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k not in ("latents", "ras_steps")}
        row.update(total_ms=r.total_ms, ras_step_ms=r.ras_step_ms, speedup=dense.total_ms / r.total_ms)
        if r.loop_ms is not None:
            row["loop_speedup"] = dense.loop_ms / r.loop_ms
        rows.append(row)
    record = {
        "model": model,
        "resolution": resolution,
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "timed": f"{TIMED}; median of {repeats} after one warm-up call",
        "dense_step_ms": statistics.median(dense.step_ms),
        "runs": rows,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


class Bench:
    """Dense, compiled and RAS runs of one pipeline at one size, each timed through ``pipe(...)``."""

    def __init__(self, pipe, inputs: dict, *, size, steps: int, repeats: int, seed: int, loop: Loop | None,
                 frames: int | None = None):  # fmt: skip
        self.pipe, self.inputs, self.size, self.steps, self.frames = pipe, inputs, size, steps, frames
        self.repeats, self.seed, self.loop = repeats, seed, loop
        self.device = pipe._execution_device
        self.n = num_tokens(pipe, size, frames)

    @property
    def label(self) -> str:
        """The generation's size, e.g. "1024x1024" or "480x832, 81 frames"."""
        height, width = height_width(self.size)
        return f"{height}x{width}" + (f", {self.frames} frames" if self.frames is not None else "")

    def measure(self, name: str, handle=None, config=None, *, loop: bool = True, warmup_steps=None) -> Result:
        """One warm-up call (``warmup_steps`` steps, default the generation's), then the timed calls (peak memory
        over them) and, with ``--loop`` and ``loop``, the own loop."""

        def call(label: str, steps: int = self.steps):
            # Video calls take seconds to minutes: their steps are printed as they end.
            progress = f"{name}, {label}" if self.frames is not None else None
            latents, wall_ms, step_ms = timed_call(
                self.pipe, self.inputs, steps=steps, size=self.size, seed=self.seed, frames=self.frames,
                progress=progress,
            )  # fmt: skip
            print(f"  {name}: {label} {wall_ms:.1f} ms", file=sys.stderr, flush=True)
            return latents, wall_ms, step_ms

        # Every step shape of the benches' schedules occurs at least twice in a generation, so the warm-up call also
        # captures every CUDA graph (a shape's first call runs eagerly, its second is captured).
        call("warm-up call", warmup_steps or self.steps)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        calls = [call(f"call {k + 1}/{self.repeats}") for k in range(self.repeats)]
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        loop_ms = None
        if self.loop is not None and loop:
            self.loop.run(self.steps, handle, progress=f"own loop, warm-up, {name}")
            loop_ms = sum(self.loop.run(self.steps, handle, progress=f"own loop, {name}")[1])
        step_ms = [statistics.median(times) for times in zip(*(c[2] for c in calls), strict=True)]
        result = Result(name, 1.0, [c[1] for c in calls], step_ms, calls[0][0].float(), peak_mib=peak, loop_ms=loop_ms)
        if config is not None:
            result.ras_steps = ras_steps(self.pipe, config)
            counts = config.token_schedule(self.n)
            result.tokens = sum(k if ras else self.n for ras, k in zip(result.ras_steps, counts, strict=True))
            result.tokens /= self.steps * self.n
            result.ratio, result.schedule = config.sample_ratio, config.schedule
        return result

    def run(
        self,
        configs: list,
        *,
        compile_baseline: bool,
        graph_modes: list[bool],
        taylorseer: list[int],
        attention_paths: list[str],
    ) -> tuple[list[Result], Result]:
        # Every dense step has one shape: two steps warm it up (a whole dense 14B 720p call takes minutes), unless a
        # second expert (Wan 2.2 A14B) takes over later in the generation.
        two_experts = getattr(self.pipe, "transformer_2", None) is not None
        dense = self.measure("diffusers dense eager", warmup_steps=None if two_experts else min(2, self.steps))
        results = [dense]
        if compile_baseline:
            blocks = _compiled_blocks(self.pipe.transformer)
            # The warm-up call compiles. No own-loop run: its inputs would make torch.compile recompile.
            results.append(self.measure(COMPILED, loop=False))
            _uncompile(blocks)
        for interval in taylorseer:
            from diffusers import TaylorSeerCacheConfig

            # diffusers' defaults otherwise: 3 full steps first, first-order Taylor prediction in between.
            self.pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=interval))
            try:
                results.append(self.measure(TAYLORSEER.format(interval), loop=False))
            finally:
                self.pipe.transformer.disable_cache()
        for path, config, graphs in itertools.product(attention_paths, configs, graph_modes):
            if path == "cudnn" and config.metric == "attention":
                print(
                    f"skipped: ratio {config.sample_ratio}, metric attention with attention cudnn (PyTorch's "
                    "SDPA returns no log-sum-exp; the call would run the portable kernel)",
                    file=sys.stderr,
                )
                continue
            details = [config.schedule, "CUDA graphs" if graphs else "eager"]
            if config.kv_cache is not None:
                details.append(f"{config.kv_cache} K/V caches")
            if config.metric != "std":
                details.append(f"metric {config.metric}")
            if path != "auto":  # RAS_ATTENTION (docs/cached_kv_attention.md)
                details.append(f"attention {path}")
            label = f"RAS ratio {config.sample_ratio} ({', '.join(details)})"
            with attention_path(path), apply_ras(self.pipe, config, cuda_graphs=graphs) as handle:
                results.append(self.measure(label, handle, config))
        return results, dense


def _report(args, bench: Bench, family: str, configs: list, description: str) -> None:
    device = bench.device
    compile_baseline = device.type == "cuda" if args.compile_baseline is None else args.compile_baseline
    graph_modes = {"on": [True], "off": [False], "both": [False, True]}[args.graphs if device.type == "cuda" else "off"]
    batch = {"flux": "batch 1 (distilled guidance)", "wan": "CFG as two calls per step"}.get(family, "CFG batch 2")
    print(
        f"{family}: {description}, {device}, {bench.pipe.transformer.dtype}, {bench.label} ({bench.n} image "
        f"tokens), {bench.steps} steps, {batch}; timed: {TIMED}; median of {args.repeats} after one warm-up call",
        file=sys.stderr,
    )
    results, dense = bench.run(
        configs,
        compile_baseline=compile_baseline,
        graph_modes=graph_modes,
        taylorseer=args.taylorseer,
        attention_paths=args.attention or [requested_attention_path()],
    )
    print(f"Timed: {TIMED} (the same for dense and RAS); median of {args.repeats} calls after one warm-up.\n")
    print(table(results, dense))
    if args.extrapolate_to:
        steps = args.extrapolate_to

        def schedule_of(result: Result) -> list[bool]:
            if result.ratio is None:
                return [False] * steps
            return ras_steps(bench.pipe, preset(family, steps, result.ratio, bench.n, result.schedule))

        print(
            f"\nEstimated {steps}-step calls, NOT measured: each run's time outside the steps of its measured "
            f"{bench.steps}-step calls, plus the {steps}-step preset schedule's dense and RAS steps at the medians of "
            "its measured dense and RAS steps:\n"
        )
        print(extrapolated_table(results, dense, schedule_of))
    if args.json:
        write_json(args.json, family, bench.size, args.repeats, results, dense)


def _video(family: str, args, full: bool) -> tuple[object, int | None]:
    """The generation's size and frame count: images ``--resolution`` (default 1024 published, 256 tiny); Wan
    ``--resolution`` (default 480x832 published, WanPipeline's default, 64x96 tiny) and ``--frames`` (default 81
    published, 9 tiny)."""
    if family != "wan":
        return args.resolution or (1024 if full else 256), None
    return args.resolution or ((480, 832) if full else (64, 96)), args.frames or (81 if full else 9)


def _ulysses_device(args) -> torch.device:
    """``--ulysses P``: join the process group torchrun set up (or the caller's; NCCL on CUDA, else gloo), one rank
    per GPU (``LOCAL_RANK``); only rank 0 prints."""
    import os

    import torch.distributed as dist

    device = torch.device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != args.ulysses:
        raise ValueError(f"--ulysses {args.ulysses} needs as many processes, got {dist.get_world_size()}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
    if dist.get_rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    return device


def ras_configs(family: str, args, num_tokens: int, shards: int = 1) -> list:
    """The RAS runs' configs: for each ``--metric`` (the preset's when not given), the family's preset at each
    ``--ratio`` (``--steps``, ``--schedule``), with ``--kv-cache`` and ``shards``."""
    presets = [preset(family, args.steps, r, num_tokens, args.schedule) for r in args.ratio]
    return [
        replace(config, kv_cache=args.kv_cache, metric=metric or config.metric, shards=shards)
        for metric in args.metric or [None]
        for config in presets
    ]


def run_random_weights(args) -> None:
    device = _ulysses_device(args) if args.ulysses > 1 else torch.device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    dtype = resolve_dtype(args.dtype, device)
    family = LAYOUTS[args.model][0]
    size, frames = _video(family, args, full)
    transformer = build_transformer(args.model, full, device, dtype)
    two_experts = TWO_EXPERTS.get(args.model)
    second = build_transformer(args.model, full, device, dtype) if two_experts else None
    pipe = build_pipeline(transformer, second, two_experts)
    n = num_tokens(pipe, size, frames)
    configs = ras_configs(family, args, n, shards=args.ulysses)
    description = f"{args.model}, {'published' if full else 'tiny'} config, random weights"
    if args.ulysses > 1:
        from diffusers import ContextParallelConfig

        # The dense baseline runs under the same context parallelism; RAS picks K / P tokens per shard.
        for model in (transformer, second):
            if model is not None:
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=args.ulysses))
        description += f", diffusers Ulysses context parallelism over {args.ulysses} processes (rank 0's times)"
    steps = configs[0].num_steps
    loop = None
    if args.loop and family in ("sd3", "lumina"):  # Flux and Wan: pipe(...) only
        loop = Loop(transformer, size // pipe.vae_scale_factor, args.seed)
    inputs = prompt_inputs(transformer, 1, args.seed)
    bench = Bench(pipe, inputs, size=size, steps=steps, repeats=args.repeats, seed=args.seed, loop=loop, frames=frames)
    _report(args, bench, family, configs, description)


def run_pretrained(args) -> None:
    from diffusers import DiffusionPipeline

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or "bf16", device)
    pipe = DiffusionPipeline.from_pretrained(args.pretrained, dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe.transformer)
    size, frames = _video(family, args, True)
    n = num_tokens(pipe, size, frames)
    configs = ras_configs(family, args, n)
    with torch.no_grad():
        inputs = encode_prompt(pipe, args.prompt)
    steps = configs[0].num_steps
    bench = Bench(pipe, inputs, size=size, steps=steps, repeats=args.repeats, seed=args.seed, loop=None, frames=frames)
    _report(args, bench, family, configs, f"{args.pretrained} (prompt {args.prompt!r})")


def _resolution(text: str) -> int | tuple[int, int]:
    """``--resolution``: a side ("1024") or HEIGHTxWIDTH ("480x832")."""
    sides = [int(side) for side in text.lower().split("x")]
    if len(sides) > 2 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected a side or HEIGHTxWIDTH, got {text!r}")
    return sides[0] if len(sides) == 1 else tuple(sides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=tuple(LAYOUTS),
        default="sd3",
        help="model layout (default sd3; wan: Wan 2.1 T2V 1.3B, wan-14b: 14B, wan-a14b: Wan 2.2 T2V A14B, two "
        "experts of the 14B layout)",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        nargs="+",
        default=[1.0, 0.5, 0.25, 0.125],
        help="RAS sample ratios to compare with dense (default 1.0 0.5 0.25 0.125; 1.0 runs every token through "
        "the RAS path)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the preset's 28 / 30 / 50 for Wan)"
    )
    parser.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        help="image side in pixels, or HEIGHTxWIDTH; latent = resolution / 8 (default 1024 on GPU, 256 on CPU; Wan "
        "480x832 on GPU, 64x96 on CPU)",
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="Wan: frames per video, 4k + 1 (default 81 on GPU, 9 on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed pipe(...) calls per run (default 3)")
    parser.add_argument(
        "--loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time one generation of the benches' own sampling loop over the bare transformer per run (a "
        "speedup column; SD3 and Lumina-Next with random weights only, not the baselines; default on)",
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
        help="also time the dense pipeline with its transformer blocks under torch.compile (default on a GPU; "
        "compiling takes a minute or two)",
    )
    parser.add_argument(
        "--taylorseer",
        type=int,
        nargs="*",
        default=[],
        metavar="INTERVAL",
        help="also time the dense pipeline under diffusers' TaylorSeer cache at these cache intervals (e.g. 3 5)",
    )
    parser.add_argument(
        "--extrapolate-to",
        type=int,
        default=None,
        metavar="STEPS",
        help="also print each run's estimated call for a STEPS-step generation (the preset at STEPS steps) from the "
        "measured per-step times of this shorter run, labelled as an estimate (e.g. Wan 14B: --steps 12 "
        "--extrapolate-to 50)",
    )
    parser.add_argument(
        "--ulysses",
        type=int,
        default=1,
        metavar="P",
        help="Flux and Wan under diffusers' Ulysses context parallelism over P processes, launched by torchrun "
        "(e.g. torchrun --nproc-per-node 2 -m bench.e2e --model wan --ulysses 2): dense and RAS (shards=P) alike, "
        "eager (no CUDA graphs, no compiled or TaylorSeer baseline); rank 0 prints",
    )
    parser.add_argument(
        "--kv-cache",
        choices=("fp8",),
        default=None,
        help="RASConfig.kv_cache of the RAS runs: fp8 K/V caches (half the memory, a slower attention op; for "
        "layouts whose bf16 caches do not fit, e.g. Wan 14B at 720p); default: the model's dtype",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        nargs="+",
        default=None,
        help="RASConfig.metric of the RAS runs, one run per metric and ratio against the same dense baseline "
        "(default: the preset's: attention for Flux, std for the others)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_PATHS,
        nargs="+",
        default=None,
        help="the RAS runs' attention path (RAS_ATTENTION: auto, triton, hopper, cudnn), one run per path, metric "
        "and ratio against the same dense baseline (default: RAS_ATTENTION's value, else auto)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (for bench.plot_e2e)")
    parser.add_argument("--pretrained", default=None, help="local diffusers pipeline folder (real weights)")
    parser.add_argument("--prompt", default="a photo of a red cat on a blue sofa")
    parser.add_argument("--seed", type=int, default=0)
    demo_cpu.add_arguments(parser)
    args = parser.parse_args(argv)
    for r in args.ratio:
        if not 0 < r <= 1:
            parser.error(f"--ratio values must be in (0, 1], got {r}")
    if args.resolution is not None and any(side % 16 for side in height_width(args.resolution)):
        parser.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.frames is not None and (args.frames < 1 or args.frames % 4 != 1 or LAYOUTS[args.model][0] != "wan"):
        parser.error(f"--frames (Wan only) must be 4k + 1, got {args.frames}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.extrapolate_to is not None and args.extrapolate_to < 2:
        parser.error(f"--extrapolate-to must be at least 2 steps, got {args.extrapolate_to}")
    if args.ulysses < 1:
        parser.error(f"--ulysses must be at least 1, got {args.ulysses}")
    if args.ulysses > 1:
        if LAYOUTS[args.model][0] not in ("flux", "wan") or args.pretrained:
            parser.error("--ulysses runs the random-weight Flux and Wan layouts only")
        if args.taylorseer or args.compile_baseline:
            parser.error("--ulysses runs no TaylorSeer or compiled baseline")
        args.graphs, args.compile_baseline = "off", False
    if args.pretrained:
        run_pretrained(args)
    elif demo_cpu.applies(args) and args.ulysses == 1:
        demo_cpu.run(args)
    else:
        run_random_weights(args)


if __name__ == "__main__":
    main()
