"""First-call cost: the first ``pipe(...)`` call of a fresh process, with an empty and with a warm Triton cache.

    python -m bench.first_call [--models sd3 lumina] [--ratios 0.5 0.25] [--steady 3] [--resolution 1024]

Each measurement is a fresh Python process (``subprocess``) that builds the pipeline as bench.e2e does (published
layout, random weights, no text encoders or VAE), applies RAS (the preset's schedule unless ``--schedule``) or not,
and times its first ``pipe(...)`` call, in which Triton compiles the kernels (and autotunes those the shipped config
table does not cover) and step shapes run eagerly or are captured in CUDA graphs, then the second call and the
median of the next ``--steady`` calls. Each RAS ratio runs twice: with an empty ``TRITON_CACHE_DIR`` (a cold
machine), then with the cache that run left (what users meet after their first run). Dense diffusers runs no Triton
kernel, so it runs once. Process start-up, imports and model building are not part of any number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.common import resolve_dtype
from bench.pipelines import add_device_arguments


def measure(args) -> dict[str, float]:
    """In this process: the first and the steady ``pipe(...)`` call of ``args.child`` = (model, ratio or 0)."""
    from bench.pipelines import build_pipeline, build_transformer, num_tokens, preset, prompt_inputs, timed_call
    from ras_models import apply_ras

    model, ratio = args.child[0], float(args.child[1])
    device = torch.device(args.device)
    transformer = build_transformer(model, args.full, device, resolve_dtype(None, device))
    pipe = build_pipeline(transformer)
    inputs = prompt_inputs(transformer, 1, seed=0)
    config = preset(model, args.steps, ratio or 1.0, num_tokens(pipe, args.resolution), args.schedule)
    if ratio:
        apply_ras(pipe, config)

    def call() -> float:
        return timed_call(pipe, inputs, steps=config.num_steps, size=args.resolution, seed=0)[1]

    first, second = call(), call()
    return {"first_ms": first, "second_ms": second, "steady_ms": statistics.median(call() for _ in range(args.steady))}


def spawn(args, model: str, ratio: float, cache_dir: str) -> dict[str, float]:
    """:func:`measure` in a fresh Python process whose Triton cache is ``cache_dir``."""
    argv = [sys.executable, "-m", "bench.first_call", "--child", model, str(ratio), "--device", args.device]
    argv += ["--resolution", str(args.resolution), "--steady", str(args.steady)]
    argv += [] if args.schedule is None else ["--schedule", args.schedule]
    argv += ["--full" if args.full else "--no-full"] + ([] if args.steps is None else ["--steps", str(args.steps)])
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    print(
        f"  {model} {'dense' if not ratio else f'RAS {ratio}'}: first {record['first_ms']:.0f} ms, second "
        f"{record['second_ms']:.0f} ms, steady "
        f"{record['steady_ms']:.0f} ms (process {time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return record


def table(rows: list[tuple[str, str, dict, dict | None]]) -> str:
    """Rows (model, run, empty-cache record or None, warm-cache record or None) in seconds."""
    lines = [
        "| model | run | first call, empty Triton cache (s) | first call, warm cache (s) | second call (s) | "
        "steady call (s) | first - steady, empty / warm cache (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, run, cold, warm in rows:
        last = warm or cold
        steady = last["steady_ms"] / 1e3
        firsts = [None if r is None else r["first_ms"] / 1e3 for r in (cold, warm)]
        cells = ["-" if f is None else f"{f:.2f}" for f in firsts]
        gaps = " / ".join("-" if f is None else f"{f - steady:.2f}" for f in firsts)
        lines.append(
            f"| {model} | {run} | {cells[0]} | {cells[1]} | {last['second_ms'] / 1e3:.2f} | {steady:.2f} | {gaps} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("sd3", "lumina"), default=["sd3", "lumina"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25], help="RAS ratios (default 0.5 0.25)")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's 28 / 30)")
    parser.add_argument("--steady", type=int, default=3, help="calls after the second; their median (default 3)")
    parser.add_argument(
        "--schedule",
        choices=("static", "dynamic"),
        default=None,
        help="override the preset's schedule (SD3 static, Lumina-Next dynamic)",
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="a Triton cache an earlier run filled: measure the warm-cache first call only (no empty-cache run)",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "RATIO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(
        f"bench.first_call: {args.resolution}x{args.resolution}, {args.schedule or 'preset'} schedules, "
        f"{args.device}; one fresh process "
        "per number; times are whole pipe(...) calls (text encoding and VAE decoding outside), steady = median of "
        f"{args.steady} calls after the second\n"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="ras-first-call-") as root:
        for model in args.models:
            rows.append((model, "dense diffusers", spawn(args, model, 0.0, os.path.join(root, f"{model}-dense")), None))
            for ratio in args.ratios:
                if args.cache_dir:  # an already filled cache: the warm case only
                    rows.append((model, f"RAS {ratio}", None, spawn(args, model, ratio, args.cache_dir)))
                    continue
                cache = os.path.join(root, f"{model}-{ratio}")  # empty: the first process fills it
                cold = spawn(args, model, ratio, cache)
                rows.append((model, f"RAS {ratio}", cold, spawn(args, model, ratio, cache)))
    print(table(rows))
    print("\nDense diffusers runs no Triton kernel: one process, the empty-cache column.")


if __name__ == "__main__":
    main()
