"""Benchmark of swiglu against diffusers' Lumina-Next activation, ``FP32SiLU(a) * b`` (CUDA only).

    python -m bench.bench_swiglu

Lumina-Next-SFT's feed-forward width (F = 6144) at the token counts of a RAS step at ratio 0.25 and of a dense step
(B = 2, 1024 / 4096 tokens), bf16. Both sides are timed as CUDA-graph replays, min / median / max of triton's
do_bench runs with the L2 flushed. Bytes = both inputs read once + the output written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Row, format_table, graph_ms, measure_ceilings, print_header
from ras_kernels import swiglu


def rows(ceilings: dict) -> list[Row]:
    out = []
    for tokens in (1024, 4096):
        gate, up = torch.randn(2, 2, tokens, 6144, device="cuda", dtype=torch.bfloat16)
        ours = graph_ms(lambda gate=gate, up=up: swiglu(gate, up))
        base = graph_ms(lambda gate=gate, up=up: F.silu(gate.float()).to(gate.dtype) * up)
        nbytes = 3 * gate.numel() * gate.element_size()
        shape = f"B=2 L={tokens} F=6144 bf16"
        out.append(Row("swiglu", shape, ours, base, "FP32SiLU(a) * b", "GB/s", nbytes, ceilings["GB/s"]))
    return out


def main() -> None:
    ceilings = measure_ceilings()
    print_header(ceilings)
    print(format_table(rows(ceilings)))


if __name__ == "__main__":
    main()
