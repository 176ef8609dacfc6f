"""pytest-benchmark timings of select_regions (CUDA only): ``pytest bench/test_bench_select.py``.

Each benchmarked call synchronises, so the numbers include host launch overhead (validation, dispatch, two
Triton launches); bench_select.py gives the GPU-only (CUDA-graph) numbers next to the PyTorch reference.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KW = dict(patch_size=2, metric="std", mode="reference", high_ratio=0.3, starvation_scale=0.0)


def _inputs(b, side):
    n = (side // 2) ** 2
    x = torch.randn(b, 16, side, side, device="cuda", dtype=torch.bfloat16)
    counters = torch.zeros(b, n, device="cuda", dtype=torch.int32)
    return x, counters, n


@pytest.mark.parametrize("b,side", [(2, 128), (2, 256), (8, 128)], ids=["B2-N4096", "B2-N16384", "B8-N4096"])
def test_bench_select_regions(benchmark, b, side):
    from ras_kernels import select_regions

    x, counters, n = _inputs(b, side)
    fn = synced(lambda: select_regions(x, n // 2, counters=counters, **KW))
    fn()  # compile outside the timing
    benchmark(fn)


@pytest.mark.parametrize("b,side", [(2, 128), (2, 256)], ids=["B2-N4096", "B2-N16384"])
def test_bench_select_reference(benchmark, b, side):
    from ras_kernels.select.reference import select_regions

    x, counters, n = _inputs(b, side)
    fn = synced(lambda: select_regions(x, n // 2, counters=counters, **KW))
    fn()
    benchmark(fn)
