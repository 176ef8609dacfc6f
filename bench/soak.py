"""Soak: many generations in one process through ``pipe(...)`` with RAS, switching ratio, resolution and batch.

    python -m bench.soak [--model sd3] [--generations 100] [--ratios 0.5 0.25] [--resolutions 768 1024]
                         [--batches 1 2] [--ratio-every 10] [--max-shapes N] [--csv soak.csv]

Generation g (0-based) runs ratio ``ratios[(g // ratio_every) % len(ratios)]`` (RAS is removed and applied again at
every block of ``ratio_every`` generations), resolution ``resolutions[g % len(resolutions)]`` and
``batches[(g // len(resolutions)) % len(batches)]`` prompts, on the pipeline bench.e2e builds (published layout on a
GPU, random weights, static schedule). After each generation it records the wall time, ``memory_allocated``, the
generation's peak (``max_memory_allocated`` since the generation began), the RAS caches' bytes and the number of
captured CUDA graphs (``len(handle.graphs)``) in a CSV file, and prints a summary: memory first / last / max, graphs
max. ``--max-shapes`` sets apply_ras's cap on the generation shapes (batch, resolution) whose graphs and caches are
held (the default resolutions and batches make 4 shapes).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch

from bench.common import resolve_dtype
from bench.pipelines import (
    add_device_arguments,
    build_pipeline,
    build_transformer,
    num_tokens,
    preset,
    prompt_inputs,
    timed_call,
)
from ras_models import apply_ras

FIELDS = ("generation", "ratio", "resolution", "batch", "ms", "allocated_mib", "peak_mib", "cache_mib", "graphs")


def soak(args) -> tuple[list[dict], int]:
    """The generations' log rows and the cap on held shapes the handles ran with."""
    device = torch.device(args.device)
    transformer = build_transformer(args.model, args.full, device, resolve_dtype(None, device))
    pipe = build_pipeline(transformer)
    inputs = {b: prompt_inputs(transformer, b, seed=b) for b in args.batches}
    smallest = min(num_tokens(pipe, size) for size in args.resolutions)
    configs = {r: preset(args.model, args.steps, r, smallest, "static") for r in args.ratios}
    extra = {} if args.max_shapes is None else {"max_shapes": args.max_shapes}
    cuda = device.type == "cuda"
    rows, handle, cap = [], None, None
    try:
        for g in range(args.generations):
            ratio = args.ratios[(g // args.ratio_every) % len(args.ratios)]
            size = args.resolutions[g % len(args.resolutions)]
            batch = args.batches[(g // len(args.resolutions)) % len(args.batches)]
            if g % args.ratio_every == 0:
                if handle is not None:
                    handle.remove()
                handle = apply_ras(pipe, configs[ratio], **extra)
                cap = handle.session.max_shapes
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ms = timed_call(pipe, inputs[batch], steps=configs[ratio].num_steps, size=size, seed=g)[1]
            row = dict(generation=g, ratio=ratio, resolution=size, batch=batch, ms=round(ms, 1))
            row.update(
                allocated_mib=round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else "",
                peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else "",
                cache_mib=round(handle.session.memory_bytes() / 2**20, 1),
                graphs=len(handle.graphs),
            )
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
    finally:
        if handle is not None:
            handle.remove()
    return rows, cap


def summary(rows: list[dict], cap: int) -> str:
    lines = [f"generations: {len(rows)}; median ms {statistics.median(r['ms'] for r in rows):.1f}"]
    if rows[0]["allocated_mib"] != "":
        allocated = [r["allocated_mib"] for r in rows]
        lines.append(
            f"memory_allocated MiB: first {allocated[0]:.0f}, last {allocated[-1]:.0f}, max {max(allocated):.0f}; "
            f"peak of a generation max {max(r['peak_mib'] for r in rows):.0f} MiB"
        )
    lines.append(
        f"RAS caches MiB max {max(r['cache_mib'] for r in rows):.0f}; captured graphs max "
        f"{max(r['graphs'] for r in rows)} (max_shapes {cap})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd3", "lumina"), default="sd3")
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="prompts per call (default 1 2)")
    parser.add_argument("--ratio-every", type=int, default=10, help="generations between re-applications of RAS")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's 28 / 30)")
    parser.add_argument(
        "--max-shapes",
        type=int,
        default=None,
        help="apply_ras's max_shapes: generation shapes whose graphs and caches are held (default: apply_ras's)",
    )
    parser.add_argument("--csv", default="soak.csv", help="per-generation log (default soak.csv)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    for size in args.resolutions:
        if size % 16:
            parser.error(f"--resolutions must be multiples of 16, got {size}")
    if args.generations < 1 or args.ratio_every < 1:
        parser.error("--generations and --ratio-every must be at least 1")
    rows, cap = soak(args)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"bench.soak: {args.model}, {args.device}, ratios {args.ratios} (RAS re-applied every {args.ratio_every}), "
        f"resolutions {args.resolutions}, batches {args.batches}; log {args.csv}"
    )
    print(summary(rows, cap))


if __name__ == "__main__":
    main()
