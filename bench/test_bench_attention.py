"""pytest-benchmark timings of cached_kv_attention / attention (CUDA only): ``pytest bench/test_bench_attention.py``.

Each benchmarked call synchronises, so the numbers include host launch overhead; bench_attention.py gives the
GPU-only (CUDA-graph) numbers next to SDPA.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import synced

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kk", [1024, 4096])
def test_bench_cached_kv_attention_sd3(benchmark, kk):
    from bench.bench_attention import SD3, _inputs
    from ras_kernels.attention.ops import cached_kv_attention

    q, kn, vn, kc, vc, idx, ke, ve = _inputs(**dict(SD3, kk=kk))
    fn = synced(lambda: cached_kv_attention(q, kn, vn, kc, vc, idx, k_extra=ke, v_extra=ve))
    fn()  # autotune outside the timing
    benchmark(fn)


def test_bench_attention_lumina_dense(benchmark):
    from bench.bench_attention import LUMINA, _inputs
    from ras_kernels import flash_attention

    q, _, _, kc, vc, _, _, _ = _inputs(**dict(LUMINA, kk=4096))
    fn = synced(lambda: flash_attention(q, kc, vc))
    fn()
    benchmark(fn)


def test_bench_sdpa_lumina_dense(benchmark):
    """The baseline for the row above: SDPA (default backend choice) on heads repeated beforehand."""
    import torch.nn.functional as F

    from bench.bench_attention import LUMINA, _inputs

    q, _, _, kc, vc, _, _, _ = _inputs(**dict(LUMINA, kk=4096))
    k, v = kc.repeat_interleave(4, dim=2).transpose(1, 2), vc.repeat_interleave(4, dim=2).transpose(1, 2)
    fn = synced(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k, v))
    fn()
    benchmark(fn)
