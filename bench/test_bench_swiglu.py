"""pytest-benchmark timings of the fused SwiGLU activation (CUDA only): ``pytest bench/test_bench_swiglu.py``.

Each benchmarked call synchronises, so the numbers include host launch overhead; bench_swiglu.py gives the GPU-only
(CUDA-graph) numbers next to diffusers' unfused activation.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("fused", [True, False], ids=["swiglu", "diffusers"])
@pytest.mark.parametrize("rows", [1024, 4096])
def test_bench_swiglu(benchmark, rows, fused):
    """Lumina-Next-SFT's feed-forward width at a RAS step's (1024) and a dense step's (4096) token count, B = 2."""
    from ras_kernels import swiglu

    gate, up = torch.randn(2, 2, rows, 6144, device="cuda", dtype=torch.bfloat16)
    if fused:
        fn = synced(lambda: swiglu(gate, up))
    else:
        fn = synced(lambda: torch.nn.functional.silu(gate.float()).to(gate.dtype) * up)
    fn()  # compile outside the timing
    benchmark(fn)
