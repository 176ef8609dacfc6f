"""Helpers shared by the test files: device choice, Triton availability, NaN-poisoned outputs, and the comparisons
that more than one file makes (attention against the fp32 reference, region selections on random data)."""

from __future__ import annotations

import collections
import contextlib
import os
import types

import pytest
import torch
import torch.nn.functional as F

from ras_kernels._backend import device_of
from ras_kernels.attention import reference as attention_reference
from ras_kernels.select import reference as select_reference

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton kernels can run here: on a GPU, or on the CPU through the interpreter.
TRITON_RUNNABLE = HAS_TRITON and (HAS_CUDA or INTERPRET)
# Where the Triton path runs in this session.
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="Triton needs CUDA or TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def compiled_variants(fn) -> int:
    """Compiled specialisations of a @triton.jit / @gluon.jit function (its per-device kernel caches, triton 3.x
    layout)."""
    try:
        return sum(len(entry[0]) for entry in fn.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        pytest.skip("this Triton version keeps no per-device kernel cache to inspect")


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """A tensor full of NaN, so any element a kernel fails to write shows up in the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# Attention: the error rule of tests/test_cached_kv_attention.py.
ATTENTION_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def sdpa_baseline(q, k, v, scale, mask=None):
    """PyTorch SDPA at the inputs' dtype on pre-concatenated keys: the error baseline. It runs on contiguous copies:
    it measures rounding at the dtype, not layouts, and on strided fuzz inputs (d = 72, fp16, H200, torch 2.11) the
    baseline itself came out with NaN."""
    group = q.shape[2] // k.shape[2]
    kk = k.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    vv = v.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    attn_mask = None if mask is None else mask[:, None, None, :]
    with device_of(q):  # SDPA's memory-efficient kernel picks its variant by the current device's properties
        out = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous(), kk, vv, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


def assert_attention_close(out, ref, base, dtype):
    """Max error of ``out`` vs the fp32 ``ref`` <= 2 x that of the SDPA baseline ``base`` (+ floor)."""
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten or poisoned element?)"
    err = (out.float() - ref).abs().max().item()
    base_err = (base.float() - ref).abs().max().item()
    assert err <= 2 * base_err + ATTENTION_FLOOR[dtype], f"error {err:.3g} vs SDPA {base_err:.3g}"


def expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, scale, extra_mask=None):
    """fp32 reference output/LSE, the caches after the write (in the input dtype), and the SDPA baseline."""
    kc, vc = k_cache.clone(), v_cache.clone()
    attention_reference.write_cache(kc, idx, k_new)
    attention_reference.write_cache(vc, idx, v_new)
    ke, ve = extra
    f = lambda x: None if x is None else x.float()  # noqa: E731
    ref, lse = attention_reference.cached_kv_attention(
        q.float(), f(k_new), f(v_new), k_cache.float(), v_cache.float(), idx,
        k_extra=f(ke), v_extra=f(ve), extra_mask=extra_mask, scale=scale, return_lse=True,
    )  # fmt: skip
    k_all, v_all, mask = kc, vc, None
    if ke is not None:
        k_all, v_all = torch.cat([kc, ke], 1), torch.cat([vc, ve], 1)
        if extra_mask is not None:
            mask = torch.cat([torch.ones(kc.shape[:2], dtype=torch.bool, device=kc.device), extra_mask], 1)
    base = sdpa_baseline(q, k_all, v_all, scale if scale is not None else q.shape[-1] ** -0.5, mask)
    return ref, lse, kc, vc, base


# Region selection on random data (see tests/test_select_regions.py).
def check_index_shape(out, b, k, n):
    """A selection: [B, K] int64, every index in [0, N), strictly ascending per sample."""
    assert out.dtype == torch.int64 and tuple(out.shape) == (b, k)
    assert bool(((out >= 0) & (out < n)).all()), "index out of range (unwritten slot?)"
    if k > 1:
        assert bool((out[:, 1:] > out[:, :-1]).all()), "indices not strictly ascending"


def assert_same_selection_values(signal, k, counters, ours, ours_c, ref, ref_c, *, previous=None, scores=None, **kw):
    """Random data: selected priorities equal as multisets; counters equal except on boundary swaps. Metric delta:
    ``previous`` and ``scores`` (as they were before the call) give the reference's token scores."""
    p, metric = kw.get("patch_size", 2), kw.get("metric", "std")
    scale, mode = kw.get("starvation_scale", 0.1), kw.get("mode", "reference")
    r = select_reference.region_scores(signal, p, metric, previous=previous, scores=scores)
    prio = select_reference.priorities(r, counters, scale, mode)
    b, n = prio.shape
    check_index_shape(ours, b, k, n)
    torch.testing.assert_close(
        prio.gather(1, ours).sort(dim=1).values, prio.gather(1, ref).sort(dim=1).values, rtol=2e-6, atol=1e-30
    )
    if counters is not None:
        in_ours = torch.zeros(b, n, dtype=torch.bool, device=prio.device).scatter_(1, ours, True)
        in_ref = torch.zeros(b, n, dtype=torch.bool, device=prio.device).scatter_(1, ref, True)
        swapped = in_ours ^ in_ref
        assert int(swapped.sum()) <= max(2, b * n // 100), "more than a few boundary swaps"
        assert torch.equal(ours_c[~swapped], ref_c[~swapped])
        assert torch.equal(ours_c[swapped], counters[swapped] + (~in_ours[swapped]).to(counters.dtype))


def backend_cases(cases, triton) -> list:
    """(case, backend) parameters: every case on the plain-PyTorch path, the ``triton`` ones also on the Triton
    kernels (skipped where Triton cannot run: no GPU and no interpreter)."""
    marks = [] if TRITON_RUNNABLE else [pytest.mark.skip(reason="Triton needs CUDA or TRITON_INTERPRET=1")]
    params = [pytest.param(case, "torch", id=f"{case}-torch") for case in cases]
    return params + [pytest.param(case, "triton", id=f"{case}-triton", marks=marks) for case in triton]


def fake_cuda_graphs(monkeypatch) -> types.SimpleNamespace:
    """CUDA graph bookkeeping on the CPU: every "capture" records its pool and replays by running the step eagerly;
    no-grad steps use the graphs whatever their device. Returns the record: ``pools`` (one item per capture) and
    ``emptied`` (one item per ``torch.cuda.empty_cache``). As PyTorch's allocator does, a capture into a pool all of
    whose graphs were destroyed fails."""
    from ras_models import RASHandle, graphs

    record = types.SimpleNamespace(pools=[], emptied=[])
    live = collections.Counter()  # pool -> graphs alive

    class FakeGraph:
        pool = None  # set once captured

        def __init__(self, fn, args, kwargs, pool):
            if pool in live and live[pool] == 0:
                raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED (capture into a released pool)")
            self.fn, self.pool = fn, pool
            live[pool] += 1
            record.pools.append(pool)

        def __del__(self):
            if self.pool is not None:
                live[self.pool] -= 1

        def replay(self, args, kwargs):
            return self.fn(*args, **kwargs)

    monkeypatch.setattr(graphs, "_Graph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: record.emptied.append(True))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(
        RASHandle, "_use_graphs", lambda self, hidden_states: self.graphs is not None and not torch.is_grad_enabled()
    )
    return record
