"""One-screen kernel benchmark table: every ras_kernels op against its PyTorch baseline (CUDA only).

    python -m bench.kernels [--markdown FILE]

Measures the card's ceilings first (large device copy, 8192^3 bf16 GEMM), then each op module's rows
(bench/bench_select.py, bench_gather.py, bench_norm.py, bench_swiglu.py, bench_attention.py), all in one
process. For the gather/scatter rows it also times a plain device copy of the same byte count: at these sizes
(13-75 MB) a fixed per-launch cost is part of any kernel, and the size-matched copy shows how much of the
large-copy ceiling is reachable at all.
"""

from __future__ import annotations

import argparse
import importlib

import torch
import triton

from bench.common import Row, device_name, format_table, measure_ceilings, median_ms

MODULES = (
    "bench.bench_select",
    "bench.bench_gather",
    "bench.bench_norm",
    "bench.bench_swiglu",
    "bench.bench_attention",
)


def size_matched_copy_ms(nbytes: float) -> float:
    """Median time of a device-to-device copy moving ``nbytes`` in total (half read, half written)."""
    half = max(int(nbytes // 4), 1)  # bf16 elements in each of source and destination
    src = torch.randn(half, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    ceilings = measure_ceilings()
    header = (
        f"{device_name()}, torch {torch.__version__}, triton {triton.__version__}; ceilings: device copy "
        f"{ceilings['GB/s']:.0f} GB/s, bf16 GEMM {ceilings['TFLOP/s']:.0f} TFLOP/s"
    )
    rows: list[Row] = []
    for name in MODULES:
        rows += importlib.import_module(name).rows(ceilings)
    copies = [
        "| op | shape | bytes | ours (ms) | size-matched copy (ms) | ours / copy time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.op.startswith(("gather", "scatter")):  # row copies (selection and norms compute as well)
            copy = size_matched_copy_ms(r.work)
            copies.append(
                f"| {r.op} | {r.shape} | {r.work / 1e6:.1f} MB | {r.ours_ms:.4f} | {copy:.4f} | "
                f"{r.ours_ms / copy:.2f} |"
            )
    text = f"{header}\n\n{format_table(rows)}\n\n{chr(10).join(copies)}\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
