"""pytest-benchmark timings of gather_tokens / scatter_tokens (CUDA only): ``pytest bench/test_bench_gather.py``.

Each benchmarked call synchronises, so the numbers include host launch overhead (validation, dispatch, Triton
launch); bench_gather.py gives the GPU-only (CUDA-graph) numbers next to the PyTorch baselines.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sd3_inputs(k):
    from bench.bench_gather import SD3, _inputs

    return _inputs(SD3["b"], SD3["n"], SD3["d"], k)


@pytest.mark.parametrize("k", [1024, 2048, 4096])
def test_bench_gather_tokens(benchmark, k):
    from ras_kernels import gather_tokens

    x, _, idx, _, _, _ = _sd3_inputs(k)
    fn = synced(lambda: gather_tokens(x, idx))
    fn()  # compile outside the timing
    benchmark(fn)


@pytest.mark.parametrize("k", [1024, 4096])
def test_bench_gather_tokens_add(benchmark, k):
    from ras_kernels import gather_tokens

    x, pos, idx, _, _, _ = _sd3_inputs(k)
    fn = synced(lambda: gather_tokens(x, idx, add=pos))
    fn()
    benchmark(fn)


@pytest.mark.parametrize("k", [1024, 2048, 4096])
def test_bench_scatter_tokens(benchmark, k):
    from ras_kernels import scatter_tokens

    _, _, idx, _, src, cache = _sd3_inputs(k)
    fn = synced(lambda: scatter_tokens(cache, idx, src))
    fn()
    benchmark(fn)


@pytest.mark.parametrize("k", [1024, 4096])
def test_bench_torch_index_select(benchmark, k):
    """The plain-PyTorch gather baseline, for comparison in the same session."""
    x, _, _, flat, _, _ = _sd3_inputs(k)
    x2 = x.view(-1, x.shape[-1])
    fn = synced(lambda: x2.index_select(0, flat))
    fn()
    benchmark(fn)
