"""pytest-benchmark timings of the fused DiT norms (CUDA only): ``pytest bench/test_bench_norm.py``.

Each benchmarked call synchronises, so the numbers include host launch overhead; bench_norm.py gives the GPU-only
(CUDA-graph) numbers next to diffusers' unfused ops.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("rows", [1024, 4096])
def test_bench_gated_residual_norm_sd3(benchmark, rows):
    from ras_kernels import gated_residual_norm

    x, attn = torch.randn(2, 2, rows, 1536, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = torch.randn(2, 3 * 1536, device="cuda", dtype=torch.bfloat16).chunk(3, dim=1)
    fn = synced(lambda: gated_residual_norm(x, attn, gate, scale, shift))
    fn()  # compile outside the timing
    benchmark(fn)


@pytest.mark.parametrize("rows", [1024, 4096])
def test_bench_unfused_sd3(benchmark, rows):
    """diffusers' unfused ops for the same work, for comparison in the same session."""
    x, attn = torch.randn(2, 2, rows, 1536, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = torch.randn(2, 3 * 1536, device="cuda", dtype=torch.bfloat16).chunk(3, dim=1)

    def unfused():
        h = x + gate.unsqueeze(1) * attn
        return h, torch.nn.functional.layer_norm(h, (1536,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    fn = synced(unfused)
    fn()
    benchmark(fn)
