"""Benchmark of select_regions against its plain-PyTorch reference (CUDA only).

    python -m bench.bench_select            # the table: ceilings, SD3-like sizes (C=16, p=2), Wan 720p; K=N/2
    python -m bench.bench_select --sweep    # also band-select launch variants and the per-kernel split

Both sides are timed as CUDA-graph replays (no host launch cost for either; the op has no host sync, so it
captures), min / median / max of triton's do_bench runs with the L2 flushed between runs; the eager time of the
public op (host dispatch + two launches) is printed beside them. starvation_scale = 0 while timing, so the counters
that every replay increments never overflow exp(); the kernels execute the same instructions for any scale. Bytes =
signal read + counters read and written + indices written (the 4-byte key scratch is not counted).
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch

from bench.common import Row, format_table, graph_replay, measure_ceilings, median_ms, print_header
from ras_kernels import select_regions
from ras_kernels.select import ops, reference

# (B, C, latent size, patch, dtype): 128x128 latent = SD3/Lumina at 1024^2 (N = 4096), 256x256 = 2048^2
# (N = 16384); a video [B, 16, 21, 90, 160] with (1, 2, 2) patches = Wan 720p, 81 frames (N = 75,600; target
# <= 150 us on an H200, one prompt: its CFG pair shares the index set).
WAN_720P = (16, (21, 90, 160), (1, 2, 2))
SHAPES = [
    (2, 16, (128, 128), 2, torch.bfloat16),
    (2, 16, (128, 128), 2, torch.float32),
    (8, 16, (128, 128), 2, torch.bfloat16),
    (2, 16, (256, 256), 2, torch.bfloat16),
    (2, 16, (256, 256), 2, torch.float32),
    (8, 16, (256, 256), 2, torch.bfloat16),
    (2, 16, (256, 256), 1, torch.bfloat16),
    (1, *WAN_720P, torch.bfloat16),
    (1, *WAN_720P, torch.float32),
    (2, *WAN_720P, torch.bfloat16),
]
KW = dict(metric="std", mode="reference", high_ratio=0.3, starvation_scale=0.0)


def _patch_list(size, p) -> list[int]:
    """The patch as the registered op takes it: one entry per latent dimension."""
    return [p] * len(size) if isinstance(p, int) else list(p)


def _inputs(b, c, size, p, dtype):
    n = math.prod(s // q for s, q in zip(size, _patch_list(size, p), strict=True))
    x = torch.randn(b, c, *size, device="cuda", dtype=dtype)
    counters = torch.randint(0, 8, (b, n), device="cuda", dtype=torch.int32)
    return x, counters, n


def _shape(b, c, size, p, dtype, k) -> str:
    n = math.prod(s // q for s, q in zip(size, _patch_list(size, p), strict=True))
    dims = "x".join(map(str, size))
    return f"B={b} C={c} {dims} p={p} N={n} K={k} {str(dtype).replace('torch.', '')}"


def rows(ceilings: dict) -> list[Row]:
    out = []
    for b, c, size, p, dtype in SHAPES:
        x, counters, n = _inputs(b, c, size, p, dtype)
        k = n // 2
        ours = graph_replay(partial(select_regions, x, k, patch_size=p, counters=counters, **KW))
        base = graph_replay(partial(reference.select_regions, x, k, patch_size=p, counters=counters, **KW))
        work = x.numel() * x.element_size() + 2 * counters.numel() * 4 + b * k * 8
        out.append(
            Row(
                "select_regions",
                _shape(b, c, size, p, dtype, k),
                median_ms(ours),
                median_ms(base),
                "reference (torch.sort)",
                "GB/s",
                work,
                ceilings["GB/s"],
            )
        )
    return out


def eager_table() -> str:
    lines = [
        "| shape | ours eager ms min / median / max | ours through torch.ops | reference eager |",
        "|---|---|---|---|",
    ]
    for b, c, size, p, dtype in SHAPES:
        x, counters, n = _inputs(b, c, size, p, dtype)
        k = n // 2
        ours = median_ms(partial(select_regions, x, k, patch_size=p, counters=counters, **KW))
        patch = _patch_list(size, p)
        # Every schema argument (the schema has no defaults): shards 1; seed, previous, scores unused by "std".
        op_args = (x, k, patch, KW["metric"], counters, KW["starvation_scale"], KW["mode"], KW["high_ratio"], 1)
        op_args += (None, None, None)
        op = median_ms(partial(torch.ops.ras_kernels.select_regions, *op_args))
        base = median_ms(partial(reference.select_regions, x, k, patch_size=p, counters=counters, **KW))
        lines.append(f"| {_shape(b, c, size, p, dtype, k)} | {ours.spread()} | {op.spread()} | {base.spread()} |")
    return "\n".join(lines)


def _kernel_split(b, c, size, p, dtype) -> str:
    """GPU time per kernel launch, from the profiler (mean over 50 calls), and the launches per call (the split
    radix select launches its kernel once per digit)."""
    x, counters, n = _inputs(b, c, size, p, dtype)
    fn = partial(select_regions, x, n // 2, patch_size=p, counters=counters, **KW)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
    parts = []
    for ev in prof.key_averages():
        if "kernel" in ev.key and ev.count >= 50:
            dev_us = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
            parts.append(f"{ev.key}: {dev_us:.1f} us x {ev.count // 50}")
    return f"{_shape(b, c, size, p, dtype, n // 2)}: " + ", ".join(parts)


# (C, latent size, patch) -> launch variants, at B = 2 (images) or 1 (the video), bf16.
SWEEP = {
    (16, (128, 128), 2): [
        dict(),
        dict(warps=8),
        dict(warps=32),
        dict(bits=2),
        dict(bits=8),
        dict(out_block=512, out_warps=4),
        dict(out_block=2048, out_warps=8),
    ],
    (16, (256, 256), 2): [
        dict(),  # the split select over 2048-key programs (ops.SPLIT_FROM = 16384 keys)
        dict(split_block=4096),
        dict(split_block=0, bits=4, warps=16),  # one program per row
        dict(split_block=0, bits=4, warps=32),
        dict(split_block=0, bits=4, warps=16, chunk=8192),
        dict(out_block=1024, out_warps=4),
        dict(out_block=4096, out_warps=16),
    ],
    WAN_720P: [
        dict(),  # the split select: 2048-key programs of 8 warps, 8-bit digits
        dict(split_block=1024, warps=4),
        dict(split_block=4096),
        dict(split_block=4096, warps=4),
        dict(bits=4),
        dict(split_block=0, bits=4, warps=16),  # one program per row (session 18: 0.19 ms for the whole op)
        dict(out_block=4096, out_warps=16),
        dict(out_block=16384, out_warps=16),
    ],
}


def sweep() -> str:
    """Band-select launch variants on the same input; each must return exactly the default's indices."""
    lines = ["| N | tuning | full op, graph replay, ms min / median / max |", "|---|---|---|"]
    for (c, size, p), variants in SWEEP.items():
        x, counters, n = _inputs(2 if len(size) == 2 else 1, c, size, p, torch.bfloat16)
        band = reference.band_start(n, n // 2, 0.3)
        expected = ops.launch_select(x, None, n // 2, band, p, False, 0.0)
        for tuning in variants:
            cfg = ops.select_tuning(n)
            cfg.update(tuning)
            try:
                got = ops.launch_select(x, None, n // 2, band, p, False, 0.0, tuning)
                same = "" if torch.equal(got, expected) else " MISMATCH"
                fn = graph_replay(partial(ops.launch_select, x, counters, n // 2, band, p, False, 0.0, tuning))
                ms = f"{median_ms(fn).spread()}{same}"
            except Exception as e:  # a variant that fails to compile must not hide the others
                ms = f"failed: {type(e).__name__}: {str(e)[:200]}"
            lines.append(f"| {n} | {cfg} | {ms} |")
    splits = [_kernel_split(2, 16, (side, side), 2, torch.bfloat16) for side in (128, 256)]
    splits.append(_kernel_split(1, *WAN_720P, torch.bfloat16))
    return "\n".join(lines) + "\n\n" + "\n".join(splits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time band-select launch variants")
    args = parser.parse_args(argv)
    ceilings = measure_ceilings()
    print_header(ceilings)
    print(format_table(rows(ceilings)) + "\n")
    print(eager_table() + "\n")
    if args.sweep:
        print(sweep())


if __name__ == "__main__":
    main()
