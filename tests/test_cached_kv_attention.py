"""cached_kv_attention / attention: Triton kernels against the fp32 reference.

Error rule (flash-attention's): the kernel's max error against the fp32 reference may be at most about twice the
error of PyTorch's own SDPA at the same input dtype (plus a tiny floor for fp32). CPU runs use small shapes under
TRITON_INTERPRET=1 (bf16 inputs included: the launcher runs the interpreter's kernel on fp32 copies, its bf16 dots
being wrong); the GPU sweep adds full sizes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ras_kernels.attention import ops, reference

from ._utils import (
    DEVICE,
    TRITON_RUNNABLE,
    assert_attention_close,
    compiled_variants,
    expected_cached_attention,
    requires_cuda,
    requires_triton,
    sdpa_baseline,
)


def _randperm_rows(b, n, k, dtype, device):
    return torch.stack([torch.randperm(n, device=device)[:k] for _ in range(b)]).to(dtype)


def _case(b, n, kk, t, hq, hkv, d, dtype, *, lq=None, device=DEVICE, idx_dtype=torch.int64):
    """Random inputs; Lq defaults to K + T (active image queries + text queries, the SD3 layout)."""
    lq = kk + t if lq is None else lq
    g = dict(dtype=dtype, device=device)
    q = torch.randn(b, lq, hq, d, **g)
    k_cache, v_cache = torch.randn(b, n, hkv, d, **g), torch.randn(b, n, hkv, d, **g)
    k_new, v_new = torch.randn(b, kk, hkv, d, **g), torch.randn(b, kk, hkv, d, **g)
    idx = _randperm_rows(b, n, kk, idx_dtype, device)
    extra = (torch.randn(b, t, hkv, d, **g), torch.randn(b, t, hkv, d, **g)) if t else (None, None)
    return q, k_new, v_new, k_cache, v_cache, idx, extra


CPU_CASES = [
    # (B, N, K, T, Hq, Hkv, d, dtype)
    pytest.param(1, 1, 1, 0, 2, 2, 64, torch.float32, id="N1-K1"),
    pytest.param(2, 63, 1, 5, 4, 2, 72, torch.float16, id="N63-K1-T5-gqa-d72"),
    pytest.param(2, 63, 63, 0, 4, 2, 64, torch.float16, id="N63-KeqN"),
    pytest.param(1, 97, 40, 5, 4, 2, 72, torch.float32, id="N97-K40-T5-d72-fp32"),
    pytest.param(2, 97, 97, 5, 2, 2, 64, torch.float16, id="N97-KeqN-T5"),
    pytest.param(1, 70, 9, 3, 2, 1, 40, torch.float16, id="d40-split-32+8"),
    pytest.param(1, 40, 40, 0, 2, 2, 96, torch.float16, id="d96-split-64+32"),
    pytest.param(1, 33, 5, 0, 2, 2, 128, torch.float32, id="d128"),
    pytest.param(2, 63, 1, 5, 4, 2, 72, torch.bfloat16, id="bf16-N63-K1-T5-gqa-d72"),
    pytest.param(1, 70, 30, 3, 2, 1, 64, torch.bfloat16, id="bf16-N70-K30-T3"),
]


@requires_triton
@pytest.mark.parametrize("b, n, kk, t, hq, hkv, d, dtype", CPU_CASES)
def test_matches_reference_and_updates_cache(triton_backend, b, n, kk, t, hq, hkv, d, dtype):
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(b, n, kk, t, hq, hkv, d, dtype)
    ref, ref_lse, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, None)
    out, lse = ops.cached_kv_attention(
        q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1], return_lse=True
    )
    assert_attention_close(out, ref, base, dtype)
    # Cache rows at idx hold k_new/v_new exactly; every other row is untouched.
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_extra_mask(triton_backend, dtype):
    b, n, kk, t, hq, hkv, d = 2, 40, 20, 37, 4, 2, 64
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(b, n, kk, t, hq, hkv, d, dtype, idx_dtype=torch.int32)
    mask = torch.rand(b, t, device=DEVICE) < 0.5
    mask[1] = False  # a sample whose text keys are all padding: only the cache is visible
    ref, ref_lse, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, 0.3, mask)
    out, lse = ops.cached_kv_attention(
        q, k_new, v_new, k_cache, v_cache, idx,
        k_extra=extra[0], v_extra=extra[1], extra_mask=mask, scale=0.3, return_lse=True,
    )  # fmt: skip
    assert_attention_close(out, ref, base, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


@requires_triton
def test_strided_views(triton_backend):
    """q, new k/v, caches and extras as views of fused buffers (unit last stride only); writes land in the buffer."""
    b, n, kk, t, hq, hkv, d, dtype = 2, 50, 30, 5, 4, 2, 72, torch.float16
    g = dict(dtype=dtype, device=DEVICE)
    qkv = torch.randn(b, kk + t, 3, hq, d, **g)  # e.g. linear_out.view(B, L, 3, H, d)
    q = qkv[:, :, 0]
    new = torch.randn(b, kk, hkv, 2, d, **g)
    k_new, v_new = new[:, :, :, 0], new[:, :, :, 1]
    kv = torch.randn(b, n, 2, hkv, d, **g)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    ext = torch.randn(b, t + 3, hkv, 2, d, **g)[:, 3:]
    ke, ve = ext[..., 0, :], ext[..., 1, :]
    idx = _randperm_rows(b, n, kk, torch.int64, DEVICE).repeat_interleave(2, dim=1)[:, ::2]  # strided idx
    assert not (q.is_contiguous() or k_cache.is_contiguous() or ke.is_contiguous() or idx.is_contiguous())
    ref, _, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, (ke, ve), None)
    out = ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=ke, v_extra=ve)
    assert_attention_close(out, ref, base, dtype)
    assert torch.equal(kv[:, :, 0], kc) and torch.equal(kv[:, :, 1], vc)


@requires_triton
def test_misaligned_views(triton_backend):
    """Views whose offset / strides are not multiples of 8 elements are copied before the launch (same answer)."""
    b, n, kk, t, hq, hkv, d, dtype = 1, 30, 12, 3, 2, 1, 72, torch.float16
    g = dict(dtype=dtype, device=DEVICE)
    q = torch.randn(b * (kk + t) * hq * d + 3, **g)[3:].view(b, kk + t, hq, d)  # storage offset 3
    wide = torch.randn(b, n, hkv, d + 4, **g)  # row/head strides d + 4 = 76, not a multiple of 8
    k_cache, v_cache = wide[..., :d], torch.randn(b, n, hkv, d, **g)
    k_new, v_new = torch.randn(b, kk, hkv, d, **g), torch.randn(b, kk, hkv, d, **g)
    ke, ve = torch.randn(b, t, hkv, d, **g), torch.randn(b, t, hkv, d, **g)
    idx = _randperm_rows(b, n, kk, torch.int64, DEVICE)
    ref, _, kc, _, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, (ke, ve), None)
    out = ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=ke, v_extra=ve)
    assert_attention_close(out, ref, base, dtype)
    assert torch.equal(wide[..., :d], kc)  # the cache write still lands in the caller's (misaligned) view


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_plain_attention(triton_backend, dtype):
    b, lq, lk, hq, hkv, d = 2, 33, 70, 4, 2, 72
    g = dict(dtype=dtype, device=DEVICE)
    q, k, v = torch.randn(b, lq, hq, d, **g), torch.randn(b, lk, hkv, d, **g), torch.randn(b, lk, hkv, d, **g)
    scale = math.sqrt(math.log(4096) / math.log(1024)) / math.sqrt(d)  # Lumina-style explicit scale
    ref, ref_lse = reference.attention(q.float(), k.float(), v.float(), scale, return_lse=True)
    out, lse = ops.flash_attention(q, k, v, scale=scale, return_lse=True)
    assert_attention_close(out, ref, sdpa_baseline(q, k, v, scale), dtype)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)


@requires_triton
@pytest.mark.filterwarnings("ignore:divide by zero")  # the interpreter's log2(0) for the fully masked sample
def test_plain_attention_key_mask(triton_backend):
    """Masked keys are invisible; a sample with every key masked gets zeros and lse = -inf (no NaN)."""
    b, lq, lk, hq, hkv, d, dtype = 3, 20, 45, 2, 1, 64, torch.float16
    g = dict(dtype=dtype, device=DEVICE)
    q, k, v = torch.randn(b, lq, hq, d, **g), torch.randn(b, lk, hkv, d, **g), torch.randn(b, lk, hkv, d, **g)
    mask = torch.rand(b, lk, device=DEVICE) < 0.6
    mask[0, :40] = False  # only the tail tile has visible keys
    mask[0, 44] = True
    mask[2] = False
    ref, ref_lse = reference.attention(q.float(), k.float(), v.float(), d**-0.5, mask, return_lse=True)
    out, lse = ops.flash_attention(q, k, v, key_mask=mask, return_lse=True)
    assert_attention_close(out[:2], ref[:2], sdpa_baseline(q[:2], k[:2], v[:2], d**-0.5, mask[:2]), dtype)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isneginf(lse[2]).all()
    torch.testing.assert_close(lse[:2], ref_lse[:2], atol=2e-3, rtol=1e-4)


@requires_triton
def test_triton_and_torch_backends_agree(monkeypatch):
    """The public function gives the same answer through both backends (here fp32, so only rounding differs)."""
    monkeypatch.setenv("RAS_BACKEND", "torch")
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(1, 30, 10, 4, 2, 2, 64, torch.float32)
    kc, vc = k_cache.clone(), v_cache.clone()
    want = ops.cached_kv_attention(q, k_new, v_new, kc, vc, idx, k_extra=extra[0], v_extra=extra[1])
    monkeypatch.setenv("RAS_BACKEND", "triton")
    got = ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


# ----------------------------------------------------------------------------------------------------------------
# Error paths (checked before any launch, on both backends)
# ----------------------------------------------------------------------------------------------------------------


def _good(dtype=torch.float32, d=64):
    q, k_new, v_new, k_cache, v_cache, idx, _ = _case(1, 8, 3, 0, 4, 2, d, dtype, device="cpu")
    ke, ve = torch.randn(1, 5, 2, d, dtype=dtype), torch.randn(1, 5, 2, d, dtype=dtype)
    return dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, idx=idx), ke, ve


def _call(args, **kw):
    a = args
    return ops.cached_kv_attention(a["q"], a["k_new"], a["v_new"], a["k_cache"], a["v_cache"], a["idx"], **kw)


@pytest.mark.parametrize(
    "mutate, kw, exc, match",
    [
        (lambda a: a.update(q=a["q"].int()), {}, TypeError, "q must have dtype"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), {}, TypeError, "k_cache must have dtype"),
        (lambda a: a.update(q=a["q"][:, :, :3]), {}, ValueError, "multiple of kv heads"),
        (lambda a: a.update(k_new=a["k_new"][:, :2]), {}, ValueError, "k_new must have shape"),
        (lambda a: a.update(idx=a["idx"].float()), {}, TypeError, "idx must have dtype"),
        (lambda a: a.update(q=a["q"].mT.contiguous().mT), {}, ValueError, "q must have unit stride in its last"),
        (lambda a: a.update(q=a["q"][..., :0]), {}, ValueError, "head dim d .* must be >= 1"),
        # Caches are written in place: an expanded (stride-0) or self-overlapping cache would mix samples / rows.
        (lambda a: a.update(k_cache=a["k_cache"][:1].expand(2, -1, -1, -1)), {}, ValueError, "k_cache must have"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :1].expand(-1, 8, -1, -1)), {}, ValueError, "k_cache is written"),
        (
            lambda a: a.update(v_cache=a["v_cache"].as_strided((1, 8, 2, 64), (64, 64, 64, 1))),
            {},
            ValueError,
            "v_cache is written in place",
        ),
        # Index values are checked on the host for CPU tensors: in range, distinct (rows written in place).
        (lambda a: a["idx"].__setitem__((0, 1), 8), {}, ValueError, r"idx holds token indices outside \[0, N=8\)"),
        (lambda a: a["idx"].__setitem__((0, 1), -1), {}, ValueError, "idx holds token indices outside"),
        (lambda a: a["idx"].__setitem__((0, 2), a["idx"][0, 0]), {}, ValueError, "idx must hold distinct"),
        (lambda a: None, {"scale": -1.0}, ValueError, "scale must be"),
        (lambda a: None, {"scale": float("nan")}, ValueError, "scale must be"),
        (lambda a: None, {"return_lse": 1}, TypeError, "return_lse must be a bool"),
        (lambda a: None, {"extra_mask": torch.ones(1, 5, dtype=torch.bool)}, ValueError, "extra_mask needs k_extra"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors(monkeypatch, backend, mutate, kw, exc, match):
    monkeypatch.setenv("RAS_BACKEND", backend)
    args, _, _ = _good()
    mutate(args)
    with pytest.raises(exc, match=match):
        _call(args, **kw)


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (torch.ones(1, 5), TypeError, "extra_mask must have dtype"),
        (torch.ones(1, 4, dtype=torch.bool), ValueError, r"extra_mask must have shape \(B, T\)"),
        (torch.ones(5, dtype=torch.bool), ValueError, "extra_mask must have 2 dimensions"),
    ],
)
def test_extra_mask_errors(mask, exc, match):
    args, ke, ve = _good()
    with pytest.raises(exc, match=match):
        _call(args, k_extra=ke, v_extra=ve, extra_mask=mask)


@pytest.mark.parametrize("d", [8, 12, 100, 264])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_any_head_dim(monkeypatch, backend, d):
    """Head dims the kernel has no variant for: the reference takes them; the Triton path zero-pads d <= 256 to the
    next kernel head dim and runs the reference past 256, with one warning per head dim."""
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", backend)
    dtype = torch.float16
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(2, 37, 9, 4, 4, 2, d, dtype)
    ref, ref_lse, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, None)
    ops._warn_head_dim.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out, lse = ops.cached_kv_attention(
                q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1], return_lse=True
            )
            plain = ops.flash_attention(q, kc, vc, return_lse=False)
    assert_attention_close(out, ref, base, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    plain_ref = reference.attention(q.float(), kc.float(), vc.float(), d**-0.5)
    assert_attention_close(plain, plain_ref, sdpa_baseline(q, kc, vc, d**-0.5), dtype)
    messages = [str(w.message) for w in caught if f"head dim {d}" in str(w.message)]
    if backend == "torch":
        assert messages == []
    else:
        assert len(messages) == 1, messages
        assert ("zero-padded" if d <= 256 else "reference (fp32) runs instead") in messages[0]


def test_plain_attention_errors():
    q, k, v = torch.randn(1, 4, 4, 64), torch.randn(1, 6, 2, 64), torch.randn(1, 6, 2, 64)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        ops.flash_attention(q, k, v, key_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="v shape"):
        ops.flash_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="at least one key"):
        ops.flash_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ops.flash_attention(q[:, :, :3], k, v)


# ----------------------------------------------------------------------------------------------------------------
# GPU: full sizes, bf16 and fp16, SD3 and Lumina shapes, CUDA graphs, torch.compile, no recompile per K
# ----------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    # (B, N, K, T, Hq, Hkv, d)
    pytest.param(2, 4096, 1024, 333, 24, 24, 64, id="sd3-K1024"),
    pytest.param(2, 4096, 4096, 333, 24, 24, 64, id="sd3-dense"),
    pytest.param(8, 4096, 512, 333, 24, 24, 64, id="sd3-B8"),
    pytest.param(2, 16384, 2048, 333, 24, 24, 64, id="sd3-N16384"),
    pytest.param(2, 4096, 1024, 0, 32, 8, 72, id="lumina-K1024"),
    pytest.param(8, 4096, 777, 0, 32, 8, 72, id="lumina-B8-K777"),
    pytest.param(2, 16384, 2048, 0, 32, 8, 72, id="lumina-N16384"),
    pytest.param(2, 4000, 1000, 77, 32, 8, 72, id="d72-tail-tiles"),
    pytest.param(2, 4096, 1000, 77, 24, 8, 128, id="flux-d128"),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, n, kk, t, hq, hkv, d", GPU_CASES)
def test_gpu_full_size(triton_backend, b, n, kk, t, hq, hkv, d, dtype):
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(b, n, kk, t, hq, hkv, d, dtype, device="cuda")
    scale = None if d != 72 else math.sqrt(math.log(n) / math.log(1024)) / math.sqrt(d)
    ref, ref_lse, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, scale)
    out, lse = ops.cached_kv_attention(
        q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1], scale=scale, return_lse=True
    )
    assert_attention_close(out, ref, base, dtype)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_lumina_dense_and_caption_mask(triton_backend, dtype):
    """Lumina dense self-attention (4096 x 4096, GQA 32/8, d 72) and its masked caption cross-attention."""
    g = dict(dtype=dtype, device="cuda")
    b, n, hq, hkv, d, t = 2, 4096, 32, 8, 72, 256
    q, k, v = torch.randn(b, n, hq, d, **g), torch.randn(b, n, hkv, d, **g), torch.randn(b, n, hkv, d, **g)
    assert_attention_close(ops.flash_attention(q, k, v), reference.attention(q.float(), k.float(), v.float(), d**-0.5),
                 sdpa_baseline(q, k, v, d**-0.5), dtype)  # fmt: skip
    kt, vt = torch.randn(b, t, hkv, d, **g), torch.randn(b, t, hkv, d, **g)
    lengths = torch.tensor([100, 256], device="cuda")
    mask = torch.arange(t, device="cuda")[None, :] < lengths[:, None]
    ref = reference.attention(q.float(), kt.float(), vt.float(), d**-0.5, mask)
    out = ops.flash_attention(q, kt, vt, key_mask=mask)
    assert_attention_close(out, ref, sdpa_baseline(q, kt, vt, d**-0.5, mask), dtype)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32(triton_backend):
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(2, 1000, 300, 33, 8, 4, 72, torch.float32, device="cuda")
    ref, _, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, None)
    out = ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1])
    assert_attention_close(out, ref, base, torch.float32)
    assert torch.equal(k_cache, kc)


def _tail_case(d, dtype, masked):
    """Query, cache and extra rows that all end in partial tiles for 64- and 128-row blocks (N = 200, T = 37,
    Lq = 150), GQA 4:2, optionally a random extra-key mask with one sample whose extra keys are all hidden."""
    g = dict(dtype=dtype, device="cuda")
    b, n, t, lq, hq, hkv = 2, 200, 37, 150, 4, 2
    q = torch.randn(b, lq, hq, d, **g)
    k, v = torch.randn(b, n, hkv, d, **g), torch.randn(b, n, hkv, d, **g)
    ke, ve = torch.randn(b, t, hkv, d, **g), torch.randn(b, t, hkv, d, **g)
    mask = None
    if masked:
        mask = torch.rand(b, t, device="cuda") < 0.5
        mask[1] = False
    k_all, v_all = torch.cat([k, ke], 1), torch.cat([v, ve], 1)
    full_mask = None if mask is None else torch.cat([torch.ones(b, n, dtype=torch.bool, device="cuda"), mask], 1)
    ref, ref_lse = reference.attention(q.float(), k_all.float(), v_all.float(), d**-0.5, full_mask, return_lse=True)
    base = sdpa_baseline(q, k_all, v_all, d**-0.5, full_mask)
    return (q, k, v, ke, ve, mask), ref, ref_lse, base


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d", [64, 72, 80, 96])
def test_gpu_every_config(d):
    """Every autotuner config (any can win on some card), on tail tiles of every segment, for SD3's head dim and
    the split ones: those crashed or gave wrong columns only for some configs and only in partial tiles on H200
    (triton 3.6)."""
    for i, (bm, bn, w, st) in enumerate(ops.GPU_CONFIGS):
        (q, k, v, ke, ve, mask), ref, ref_lse, base = _tail_case(d, torch.bfloat16, masked=i % 2 == 1)
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        out, lse = ops._launch_attention(q, k, v, ke, ve, mask, d**-0.5, True, cfg)
        torch.cuda.synchronize()
        assert_attention_close(out, ref, base, torch.bfloat16)
        torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d", [dd for dd in ops.HEAD_DIMS if dd not in (72, 80, 96)])
def test_gpu_every_head_dim(d):
    """Each accepted head dim (default config, fp16) on tail tiles with a masked extra segment."""
    (q, k, v, ke, ve, mask), ref, ref_lse, base = _tail_case(d, torch.float16, masked=True)
    out, lse = ops._launch_attention(q, k, v, ke, ve, mask, d**-0.5, True, ops._default_config(d))
    torch.cuda.synchronize()
    assert_attention_close(out, ref, base, torch.float16)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("path, d", [("triton", 64), ("hopper", 64), ("hopper", 72)])
def test_gpu_new_k_reuses_the_kernel(triton_backend, monkeypatch, path, d):
    """K (hence Lq) changes every step: a new value must reuse the compiled kernel, in the portable kernel's Lq bucket
    and on the Hopper path (the Gluon kernel, at 64 and at the split head dim 72), also where Lq becomes a multiple of
    16 (K = 1011 with 333 extra rows: Lq = 1344), which Triton would otherwise specialise on."""
    from ras_kernels.attention import kernels

    kernel = kernels.attn_fwd_kernel
    if path == "hopper":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Hopper kernels need an sm_90 GPU")
        kernel = kernels.attn_fwd_tma_kernel
        if d in ops.GLUON_CONFIGS:
            from ras_kernels.attention import gluon_kernels

            kernel = gluon_kernels.attn_fwd_gluon_kernel
    monkeypatch.setenv("RAS_ATTENTION", path)
    for kk in (1000, 1001, 1011, 1017):
        q, k_new, v_new, k_cache, v_cache, idx, extra = _case(2, 4096, kk, 333, 8, 8, d, torch.bfloat16, device="cuda")
        ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1])
        torch.cuda.synchronize()
        if kk == 1000:
            before = compiled_variants(kernel)
    assert before >= 1 and compiled_variants(kernel) == before


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_and_compile(triton_backend, monkeypatch):
    """The ops replay inside a CUDA graph (bit-identical) and run under torch.compile (fullgraph; Inductor passes
    the float scale as fp64, which the kernel casts to fp32); the autotuner runs (as on cards the shipped table
    does not cover)."""
    monkeypatch.setenv("RAS_ATTN_AUTOTUNE", "tune")
    monkeypatch.setenv("RAS_ATTENTION", "triton")  # the portable kernel's autotuner (auto: the Hopper kernel on sm_90)
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(2, 4096, 1024, 333, 24, 24, 64, torch.bfloat16, device="cuda")

    def step(q, k_new, v_new, k_cache, v_cache, idx, ke, ve):
        return ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=ke, v_extra=ve)

    args = (q, k_new, v_new, k_cache, v_cache, idx, *extra)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    want = step(*args)  # also autotunes outside the capture
    kc_want, vc_want = k_cache.clone(), v_cache.clone()
    k_cache.copy_(kc0)
    v_cache.copy_(vc0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.equal(k_cache, kc_want) and torch.equal(v_cache, vc_want)
    k_cache.copy_(kc0)
    v_cache.copy_(vc0)
    got_c = torch.compile(step, fullgraph=True)(*args)
    # Inductor benchmarks the autotuner's configs itself and may pick another tile shape (another summation
    # order) than the eager autotuner: equal up to bf16 rounding, not bit for bit.
    torch.testing.assert_close(got_c, want)
    assert torch.equal(k_cache, kc_want) and torch.equal(v_cache, vc_want)


def test_shipped_configs(monkeypatch):
    """The shipped table holds kernel configs the autotuner could pick, covers every attention call of the SD3 and
    Lumina-Next presets at 1024^2 and 2048^2, and applies only on the architecture it was tuned on."""
    from ras_models import RASConfig

    record = json.loads((Path(ops.__file__).parent / "tuned_configs.json").read_text())
    table = ops._shipped_configs(record["arch"])
    assert table and all(tuple(cfg) in ops.GPU_CONFIGS for cfg in table.values())
    assert ops._shipped_configs("sm00") == {}
    monkeypatch.setenv("RAS_ATTN_AUTOTUNE", "1")  # what users run (the test suite defaults to 0)
    monkeypatch.setattr(ops, "_arch", lambda device: record["arch"])
    for n in (4096, 16384):
        for ratio in (1.0, 0.5, 0.25, 0.125):
            ks = {n, *RASConfig.sd3(sample_ratio=ratio).token_schedule(n)}
            ks |= set(RASConfig.lumina_next(sample_ratio=ratio, schedule="static").token_schedule(n))
            if ratio == 0.5 and n == 4096:  # the dynamic schedule (Lumina-Next's preset) is tuned for N = 4096
                ks |= set(RASConfig.lumina_next(sample_ratio=ratio).token_schedule(n))
            for kk in ks:
                calls = [(64, kk + 333, True, False), (72, kk, False, False), (72, kk, True, True)]
                for d, lq, extra, mask in calls:  # SD3 joint; Lumina-Next self and (masked) cross attention
                    config = ops._chosen_config(None, d, ops._lq_bucket(lq), extra, mask)
                    assert config is not None, (d, lq, extra, mask)
                    key = ops.tuned_config_key(d, ops._lq_bucket(lq), extra, mask)
                    assert [config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")] == table[key]
    # fp8 caches have keys of their own: a 16-bit entry never applies to them (the table has none: the autotuner).
    assert ops._chosen_config(None, 128, 2048, True, False) is not None
    assert ops._chosen_config(None, 128, 2048, True, False, kv_fp8=True) is None
    monkeypatch.setattr(ops, "_arch", lambda device: "sm00")  # another card: the autotuner
    assert ops._chosen_config(None, 64, 1024, True, False) is None
    monkeypatch.setenv("RAS_ATTN_AUTOTUNE", "0")
    assert ops._chosen_config(None, 64, 1024, True, False) == ops._default_config(64)
    monkeypatch.setenv("RAS_ATTN_AUTOTUNE", "tune")
    monkeypatch.setattr(ops, "_arch", lambda device: record["arch"])
    assert ops._chosen_config(None, 64, 1024, True, False) is None
    monkeypatch.setenv("RAS_ATTN_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="RAS_ATTN_AUTOTUNE"):
        ops._chosen_config(None, 64, 1024, True, False)


@requires_triton
def test_hopper_configs(monkeypatch):
    """The Hopper path's launcher: at head dims 64, 72 and 128 a 16-bit call with no key mask and no config runs
    the Gluon kernel; the Triton TMA kernel takes a key mask, an explicit config and mixed dtypes (the fp8 probe),
    with its shipped table's entry for the call's key, the head dim's default for a key the table lacks, and the
    table holding candidate configs only (launches are recorded, not run)."""
    from ras_kernels.attention import kernels

    record = json.loads((Path(ops.__file__).parent / "hopper_configs.json").read_text())
    shipped = ops._shipped_configs(record["arch"], "hopper_configs.json")
    assert all(tuple(cfg) in ops.HOPPER_CANDIDATES for cfg in shipped.values())
    assert all(tuple(cfg) in ops.HOPPER_CANDIDATES for cfg in ops.HOPPER_DEFAULTS.values())
    launches, gluon = [], []

    class Recorder:
        def __getitem__(self, grid):
            keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "WARP_SPECIALIZE")
            return lambda **kw: launches.append((grid, tuple(kw[k] for k in keys)))

    table = {"d72-lq1024-extra-mask": [64, 128, 4, 3, False]}
    monkeypatch.setattr(kernels, "attn_fwd_tma_kernel", Recorder())
    monkeypatch.setattr(ops, "_launch_gluon", lambda out, lse, q, *a: gluon.append(q.shape[-1]))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_arch", lambda device: "sm90")
    monkeypatch.setattr(ops, "_shipped_configs", lambda arch, name="tuned_configs.json": table)

    def launch(d, config=None, q_dtype=torch.float16, extra=True, masked=False):
        q, k, v = torch.zeros(1, 900, 2, d, dtype=q_dtype), torch.zeros(1, 100, 2, d), torch.zeros(1, 100, 2, d)
        ke, ve = (torch.zeros(1, 5, 2, d), torch.zeros(1, 5, 2, d)) if extra else (None, None)
        mask = torch.tensor([[True, False, True, True, False]]) if masked else None
        ops._launch_hopper(q, k.half(), v.half(), ke, ve, mask, 0.125, False, config)

    launch(72, masked=True)
    launch(128, masked=True)
    assert launches == [((15, 2), (64, 128, 4, 3, False)), ((8, 2), ops.HOPPER_DEFAULTS[128])]
    launch(64)
    launch(72)
    launch(128, extra=False)
    assert gluon == [64, 72, 128] and len(launches) == 2
    launch(64, config=ops.HOPPER_CANDIDATES[0])
    launch(128, q_dtype=torch.float8_e4m3fn)
    assert gluon == [64, 72, 128]
    assert launches[2:] == [((8, 2), ops.HOPPER_CANDIDATES[0]), ((8, 2), ops.HOPPER_DEFAULTS[128])]


_GLUON_COMPILE = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from ras_kernels.attention import gluon_kernels, ops

d = int(sys.argv[1])
block_n, stages, q_in_regs = ops.GLUON_CONFIGS[d]
d0, d1 = ops.HOPPER_SPLITS[d]

def desc(rows, width):
    layout = gl.NVMMASharedLayout.get_default_for([1, rows, 1, width], gl.bfloat16)
    return f"tensordesc<bf16[1,{rows},1,{width}],{layout!r}>"

const = dict(D0=d0, D1=d1, BLOCK_N=block_n, STAGES=stages, Q_IN_REGS=q_in_regs, HAS_EXTRA=True)
rows = gluon_kernels.ROWS.value
sig = {}
for suffix, width in (("", d0), ("1", d1 or d0)):
    sig |= {f"{name}{suffix}_desc": desc(rows, width) for name in ("q", "o")}
    sig |= {f"{name}{suffix}_desc": desc(block_n, width) for name in ("k", "v")}
    sig |= {f"{name}{suffix}_extra_desc": desc(block_n, width) for name in ("k", "v")}
sig |= {"lse_ptr": "*fp32", "qk_scale": "fp32"} | {k: "constexpr" for k in const}
sig |= {n: "i32" for n in ("lq", "n_keys", "n_extra", "heads_q", "group", "store_lse")}
src = GluonASTSource(gluon_kernels.attn_fwd_gluon_kernel, sig, const)
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
waits = re.findall(r"wgmma\\.wait_group\\.sync\\.aligned\\s+(\\d+)", ptx)
print(json.dumps({"waits": waits, "setmaxnreg": "setmaxnreg" in ptx}))
"""


_SPECIALISATION = """
import json
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
from triton.runtime.jit import create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor
from ras_kernels.attention import gluon_kernels, kernels

backend = make_backend(GPUTarget("cuda", 90, 32))
t = torch.zeros(2, 1344, 8, 64, dtype=torch.bfloat16)
scalars = dict(lse_ptr=t, heads_q=8, group=1, qk_scale=0.18, HAS_EXTRA=True)

def gluon_desc(rows, width):
    block = [1, rows, 1, width]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return GluonDescriptor(t, list(t.shape), list(t.stride()), block, layout)

def tma_desc(width):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 64, 1, width])

pairs = (("q", "q1"), ("k", "k1"), ("v", "v1"), ("k_extra", "k1_extra"), ("v_extra", "v1_extra"))
gluon_args = dict(D0=64, D1=16, BLOCK_N=128, STAGES=4, Q_IN_REGS=True)
for name, name1 in pairs + (("o", "o1"),):
    rows = 64 if name in ("q", "o") else 128
    gluon_args[f"{name}_desc"], gluon_args[f"{name1}_desc"] = gluon_desc(rows, 64), gluon_desc(rows, 16)
tma_args = dict(mask_ptr=t, stride_mask_b=0, stride_mask_t=0, HAS_MASK=False)
for name, name1 in pairs + (("out", "out1"),):
    tma_args[f"{name}_desc"], tma_args[f"{name1}_desc"] = tma_desc(64), tma_desc(16)
tma_args |= dict(D0=64, D1=16, BLOCK_M=128, BLOCK_N=64, NUM_STAGES=3, WARP_SPECIALIZE=False, STORE_LSE=False)
same = {}
for name, fn, args in (("gluon", gluon_kernels.attn_fwd_gluon_kernel, gluon_args),
                       ("tma", kernels.attn_fwd_tma_kernel, tma_args)):
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    keys = set()
    for lq, n, e, lse in ((1333, 4096, 333, 0), (1344, 4096, 333, 0), (1333, 4095, 333, 0), (1333, 4096, 336, 0),
                          (1333, 4096, 333, 1)):
        flag = {"store_lse": lse} if name == "gluon" else {}  # the Triton kernel's STORE_LSE is a constexpr
        keys.add(str(binder(**args, **scalars, lq=lq, n_keys=n, n_extra=e, **flag)[1]))
    same[name] = len(keys) == 1
print(json.dumps(same))
"""


def test_hopper_kernels_compile_once_for_every_lq():
    """K, hence Lq, changes from step to step, and the cache length and extra-row count from model to model: the
    Hopper kernels' specialisation key (what Triton compiles a variant per) is the same whether Lq, n_keys or
    n_extra is a multiple of 16 or not (``do_not_specialize``), so a new K never compiles a second variant in the
    middle of a generation; the Gluon kernel's is also the same with and without lse (a runtime flag). Computed
    with Triton's own argument binder for sm_90 on any machine (in a fresh process: TRITON_INTERPRET=1 makes every
    kernel an interpreted function, which has no binder)."""
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SPECIALISATION], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"gluon": True, "tma": True}


@pytest.mark.parametrize("d", sorted(ops.GLUON_CONFIGS))
def test_gluon_kernel_compiles_for_sm90_with_the_softmax_under_the_pv_gemm(d):
    """The Hopper path's Gluon kernel compiles for sm_90 with the installed Triton on any machine (Triton ships
    ptxas; in a fresh process, since TRITON_INTERPRET=1 makes every kernel an interpreted function) and keeps what
    it exists for: a score GEMM whose wait leaves the PV GEMM in flight under the softmax (``wgmma.wait_group 1``;
    2 at a split head dim, whose PV is two GEMMs), and warp-specialised partitions (the loader warp hands registers
    to the consumers: ``setmaxnreg``)."""
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", _GLUON_COMPILE, str(d)]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    pv_gemms = 2 if ops.HOPPER_SPLITS[d][1] else 1
    assert str(pv_gemms) in facts["waits"], facts
    assert facts["setmaxnreg"]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
@pytest.mark.parametrize("configs", ["shipped", "candidates"])
def test_gpu_hopper_kernels_at_tails(configs, d, dtype):
    """The Hopper path's kernels at head dim d on tail shapes: a cache shorter than one key tile, a partial last tile,
    a few extra keys, masked extra keys, no cache rows at all, Lq off the query tile, grouped heads; out and lse
    against the fp32 reference. "shipped": what the path runs (the Gluon kernel without a key mask, the Triton
    TMA kernel's table config with one); "candidates": every config of the Triton TMA kernel
    (ops.hopper_candidates). (On Triton 3.6, d 72 once computed a lone partial tile wrong and wrote out of bounds:
    session 19.)"""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel needs an sm_90 GPU")
    g = dict(dtype=dtype, device="cuda")
    cases = ((63, 5, 6, False), (200, 0, 130, False), (129, 77, 200, True), (0, 130, 65, True), (0, 130, 65, False))
    for n, t, lq, masked in cases:
        q, k, v = torch.randn(2, lq, 4, d, **g), torch.randn(2, n, 2, d, **g), torch.randn(2, n, 2, d, **g)
        ke, ve = (torch.randn(2, t, 2, d, **g), torch.randn(2, t, 2, d, **g)) if t else (None, None)
        mask = torch.rand(2, t, device="cuda") < 0.5 if masked else None
        k_all, v_all = (torch.cat([k, ke], 1), torch.cat([v, ve], 1)) if t else (k, v)
        key_mask = None if mask is None else torch.cat([torch.ones(2, n, dtype=torch.bool, device="cuda"), mask], 1)
        ref, ref_lse = reference.attention(q.float(), k_all.float(), v_all.float(), d**-0.5, key_mask, return_lse=True)
        base = sdpa_baseline(q, k_all, v_all, d**-0.5, key_mask)
        for cfg in (None,) if configs == "shipped" else ops.hopper_candidates(d):
            out, lse = ops._launch_hopper(q, k, v, ke, ve, mask, d**-0.5, True, cfg)
            torch.cuda.synchronize()
            assert_attention_close(out, ref, base, dtype)
            torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4, msg=lambda m, cfg=cfg: f"{cfg}: {m}")


# ------------------------------------------------------------------------------------------------ fp8 K/V caches
def _fp8_case(b, n, kk, t, hq, hkv, d, dtype, device=DEVICE):
    """Random inputs with e4m3 caches: every row a random vector quantized with its own scale."""
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(b, n, kk, t, hq, hkv, d, dtype, device=device)
    (kc, ks), (vc, vs) = reference.quantize_fp8(k_cache), reference.quantize_fp8(v_cache)
    return q, k_new, v_new, kc, vc, ks, vs, idx, extra


def _check_quantized_rows(cache, cache_scale, before, before_scale, idx, new):
    """The fp8 spec on the written rows, independent of quantize_fp8's code: scale = the row's largest magnitude /
    448, every value within half an e4m3 step (3 mantissa bits, relative 2^-4; absolute 2^-10 x scale for the
    subnormals) of new / scale; every other row untouched."""
    rows = torch.arange(cache.shape[0], device=cache.device)[:, None]
    written = torch.zeros(cache.shape[:2], dtype=torch.bool, device=cache.device)
    written[rows, idx.long()] = True
    new64 = new.double()
    amax = new64.abs().amax(dim=-1)
    torch.testing.assert_close(cache_scale[rows, idx.long()].double(), amax / 448, rtol=1e-6, atol=0)
    exact = new64 / (amax / 448)[..., None]
    stored = cache[rows, idx.long()].double()
    assert bool(((stored - exact).abs() <= exact.abs() * 2**-4 + 2**-10).all())
    assert torch.equal(cache.view(torch.uint8)[~written], before.view(torch.uint8)[~written])
    assert torch.equal(cache_scale[~written], before_scale[~written])


FP8_CASES = [
    # (B, N, K, T, Hq, Hkv, d, dtype)
    pytest.param(2, 37, 9, 5, 4, 2, 64, torch.float32, id="d64-gqa-fp32"),
    pytest.param(2, 63, 20, 0, 2, 2, 72, torch.float16, id="d72-split-fp16"),
    pytest.param(1, 70, 70, 3, 2, 1, 128, torch.bfloat16, id="d128-dense-bf16"),
]


@requires_triton
@pytest.mark.parametrize("b, n, kk, t, hq, hkv, d, dtype", FP8_CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("path", ["triton", "hopper"])
def test_fp8_caches(triton_backend, monkeypatch, recwarn, b, n, kk, t, hq, hkv, d, dtype, masked, path):
    """fp8 caches: the written rows follow the quantization spec; the output is the fp32 attention over the
    dequantized caches (values x scales) within the usual error rule; the torch path stores the same bytes. With
    RAS_ATTENTION=triton the portable kernel dequantizes on load; with hopper the caches go through a 16-bit copy
    to the Hopper kernel wherever it runs (the interpreter in fp16, an sm_90 GPU in fp16 / bf16)."""
    monkeypatch.setenv("RAS_ATTENTION", path)
    hopper_runs = path == "hopper" and (
        dtype == torch.float16
        if DEVICE == "cpu"
        else dtype != torch.float32 and torch.cuda.get_device_capability() == (9, 0)
    )
    calls = []
    launch = ops._launch_hopper
    monkeypatch.setattr(ops, "_launch_hopper", lambda *a: calls.append(a[1].dtype) or launch(*a))
    q, k_new, v_new, kc, vc, ks, vs, idx, extra = _fp8_case(b, n, kk, t, hq, hkv, d, dtype)
    mask = None
    if masked and t:
        mask = torch.rand(b, t, device=DEVICE) < 0.5
    before = [x.clone() for x in (kc, vc, ks, vs)]
    torch_caches = [x.clone() for x in (kc, vc, ks, vs)]
    out, lse = ops.cached_kv_attention(
        q, k_new, v_new, kc, vc, idx, k_extra=extra[0], v_extra=extra[1], extra_mask=mask, return_lse=True,
        k_cache_scale=ks, v_cache_scale=vs,
    )  # fmt: skip
    assert calls == ([dtype] if hopper_runs else [])  # the Hopper kernel reads the 16-bit copy
    _check_quantized_rows(kc, ks, before[0], before[2], idx, k_new)
    _check_quantized_rows(vc, vs, before[1], before[3], idx, v_new)
    k_deq, v_deq = kc.float() * ks[..., None], vc.float() * vs[..., None]
    f = lambda x: None if x is None else x.float()  # noqa: E731
    no_write = idx[:, :0]
    ref, ref_lse = reference.cached_kv_attention(
        q.float(), k_deq[:, :0, :, :], v_deq[:, :0], k_deq, v_deq, no_write,
        k_extra=f(extra[0]), v_extra=f(extra[1]), extra_mask=mask, return_lse=True,
    )  # fmt: skip
    if path == "hopper":
        # RAS_ATTENTION=hopper reads fp8 caches through a 16-bit copy (values x scales rounded once to dtype), on
        # the Hopper kernel and on the portable one where the Hopper kernel cannot run; in bf16 that rounding alone
        # moves lse by up to ~3.6e-3 at d = 128 (1% of seeds past the tolerance below: met in session 20 on the GPU
        # and on CPU), so this path's lse is checked against the attention over that copy.
        k16 = k_deq.to(dtype).float()
        _, ref_lse = reference.cached_kv_attention(
            q.float(), k16[:, :0], v_deq[:, :0], k16, v_deq, no_write,
            k_extra=f(extra[0]), v_extra=f(extra[1]), extra_mask=mask, return_lse=True,
        )  # fmt: skip
    k_all, v_all = k_deq.to(dtype), v_deq.to(dtype)
    keys = None
    if extra[0] is not None:
        k_all, v_all = torch.cat([k_all, extra[0]], 1), torch.cat([v_all, extra[1]], 1)
        if mask is not None:
            keys = torch.cat([torch.ones(b, n, dtype=torch.bool, device=DEVICE), mask], 1)
    base = sdpa_baseline(q, k_all, v_all, d**-0.5, keys)
    assert_attention_close(out, ref, base, dtype)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)
    monkeypatch.setenv("RAS_BACKEND", "torch")
    ops.cached_kv_attention(
        q, k_new, v_new, torch_caches[0], torch_caches[1], idx, k_extra=extra[0], v_extra=extra[1],
        extra_mask=mask, k_cache_scale=torch_caches[2], v_cache_scale=torch_caches[3],
    )  # fmt: skip
    for ours, theirs in zip((kc, vc, ks, vs), torch_caches, strict=True):
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.pop("k_cache_scale"), "k_cache_scale .* is required with float8_e4m3fn caches"),
        (lambda a: a.update(v_cache_scale=a["v_cache_scale"].half()), "v_cache_scale must have dtype"),
        (lambda a: a.update(k_cache_scale=a["k_cache_scale"][:, :3]), r"k_cache_scale must have shape \(B, N, Hkv\)"),
        (lambda a: a.update(v_cache=a["v_cache"].float()), "v_cache must have dtype"),
        (
            lambda a: a.update(k_cache=a["k_cache"].float(), v_cache=a["v_cache"].float()),
            "k_cache_scale and v_cache_scale go with float8_e4m3fn caches only",
        ),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_cache_errors(monkeypatch, backend, change, match):
    monkeypatch.setenv("RAS_BACKEND", backend)
    q, k_new, v_new, kc, vc, ks, vs, idx, _ = _fp8_case(1, 8, 3, 0, 4, 2, 64, torch.float32, device="cpu")
    args = dict(k_cache=kc, v_cache=vc, k_cache_scale=ks, v_cache_scale=vs)
    change(args)
    with pytest.raises((TypeError, ValueError), match=match):
        ops.cached_kv_attention(q, k_new, v_new, args.pop("k_cache"), args.pop("v_cache"), idx, **args)


@pytest.mark.parametrize(
    "requested, sm90, d, through",
    [
        ("auto", True, 128, True),  # cuDNN's head dim
        ("auto", True, 64, True),  # the Hopper kernel's
        ("auto", True, 72, True),  # the Hopper kernel's (Lumina-Next)
        ("auto", True, 80, False),  # no auto path: the portable kernel dequantizes on load
        ("auto", False, 128, False),  # another GPU
        ("triton", True, 128, False),
        ("hopper", False, 64, True),  # asked for by name: the 16-bit call then runs where it is eligible
        ("cudnn", True, 128, True),
    ],
)
def test_fp8_caches_go_through_16_bit_where_a_16_bit_path_runs(monkeypatch, requested, sm90, d, through):
    monkeypatch.setenv("RAS_ATTENTION", requested)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops.torch.cuda, "get_device_capability", lambda device=None: (9, 0) if sm90 else (8, 9))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert ops._fp8_through_16_bit(torch.zeros(1, 4, 2, d, dtype=torch.bfloat16)) is through


def test_dequantized_copy_rounds_once():
    """The 16-bit copy is values x scale computed in fp32 and rounded once to q's dtype (not the product of the
    rounded scale)."""
    values, scale = reference.quantize_fp8(torch.randn(2, 9, 3, 64) * 5)
    for dtype in (torch.float16, torch.bfloat16):
        got = ops._dequantized(values, scale, dtype)
        assert got.dtype == dtype and torch.equal(got, (values.float() * scale[..., None]).to(dtype))
        assert not torch.equal(got, values.to(dtype) * scale[..., None].to(dtype))


def test_fp8_caches_need_a_kernel_head_dim():
    q, k_new, v_new, kc, vc, ks, vs, idx, _ = _fp8_case(1, 8, 3, 0, 2, 2, 100, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="float8_e4m3fn caches need a head dim the kernel runs"):
        ops.cached_kv_attention(q, k_new, v_new, kc, vc, idx, k_cache_scale=ks, v_cache_scale=vs)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d, hq, hkv, t", [(128, 12, 12, 0), (128, 24, 24, 512), (64, 24, 24, 333), (72, 32, 8, 0)])
def test_gpu_fp8_caches_full_size(triton_backend, d, hq, hkv, t):
    """fp8 caches at Wan / Flux / SD3 / Lumina-like sizes (N = 8192, K = N / 4, bf16): as the CPU test."""
    b, n, kk, dtype = 1, 8192, 2048, torch.bfloat16
    q, k_new, v_new, kc, vc, ks, vs, idx, extra = _fp8_case(b, n, kk, t, hq, hkv, d, dtype, device="cuda")
    before = [x.clone() for x in (kc, vc, ks, vs)]
    out = ops.cached_kv_attention(
        q, k_new, v_new, kc, vc, idx, k_extra=extra[0], v_extra=extra[1], k_cache_scale=ks, v_cache_scale=vs
    )
    _check_quantized_rows(kc, ks, before[0], before[2], idx, k_new)
    _check_quantized_rows(vc, vs, before[1], before[3], idx, v_new)
    k_deq, v_deq = kc.float() * ks[..., None], vc.float() * vs[..., None]
    f = lambda x: None if x is None else x.float()  # noqa: E731
    ref = reference.cached_kv_attention(
        q.float(), k_deq[:, :0], v_deq[:, :0], k_deq, v_deq, idx[:, :0], k_extra=f(extra[0]), v_extra=f(extra[1])
    )
    k_all, v_all = k_deq.to(dtype), v_deq.to(dtype)
    if t:
        k_all, v_all = torch.cat([k_all, extra[0]], 1), torch.cat([v_all, extra[1]], 1)
    assert_attention_close(out, ref, sdpa_baseline(q, k_all, v_all, d**-0.5, None), dtype)


# ---- RAS_ATTENTION: auto (the default), the portable kernel, the Hopper kernel and cuDNN paths ----


def test_attention_path_is_validated_before_any_launch(monkeypatch):
    monkeypatch.setenv("RAS_ATTENTION", "flash")
    q, k_new, v_new, k_cache, v_cache, idx, _ = _case(1, 16, 4, 0, 2, 2, 64, torch.float32)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="RAS_ATTENTION must be one of auto, triton, hopper, cudnn; got 'flash'"):
        ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx)
    with pytest.raises(ValueError, match="RAS_ATTENTION"):
        ops.flash_attention(q, k_cache, v_cache)
    assert torch.equal(k_cache, before)  # nothing written


def _path_args(d=128, hkv=2, dtype=torch.bfloat16, t=0, offset=0):
    """q [1, 4, 2, d], k / v [1, 8, hkv, d] (k starting ``offset`` elements into its storage), extras [1, t, ...]."""
    q = torch.zeros(1, 4, 2, d, dtype=dtype)
    k = torch.zeros(1 * 8 * hkv * d + offset, dtype=dtype)[offset:].view(1, 8, hkv, d)
    v = torch.zeros(1, 8, hkv, d, dtype=dtype)
    extra = (torch.zeros(1, t, hkv, d, dtype=dtype),) * 2 if t else (None, None)
    return q, k, v, *extra


@pytest.mark.parametrize(
    "path, change, reason",
    [
        ("cudnn", {}, "cuDNN SDPA not available"),  # CPU tensors, the device rule
        ("hopper", {}, "a device other than an sm_90 GPU"),
        ("cudnn", {"hkv": 1}, "grouped-query heads"),
        ("cudnn", {"d": 64}, "head dim 64 (the cudnn path runs (128,))"),
        ("hopper", {"d": 80}, "head dim 80 (the hopper path runs (64, 72, 128))"),
        ("cudnn", {"mask": True}, "a key mask"),
        ("cudnn", {"lse": True}, "return_lse"),
        ("hopper", {"dtype": torch.float32}, "fp16 / bf16 only"),
        ("cudnn", {"dtype": torch.float32}, "fp16 / bf16 only"),
        ("hopper", {"offset": 4}, "not 16-byte aligned for TMA"),
    ],
)
def test_path_eligibility(monkeypatch, path, change, reason):
    """Each rule refuses alone: with ``change`` the device rules are made to pass (as on an H200 with cuDNN), so
    only the changed property can refuse, and the unchanged call is eligible."""
    if change:
        monkeypatch.setattr(ops.torch.backends.cudnn, "is_available", lambda: True)
        monkeypatch.setattr(ops.torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
        monkeypatch.setattr(ops.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mask = torch.ones(1, 8, dtype=torch.bool) if change.get("mask") else None
    args = {k: v for k, v in change.items() if k in ("d", "hkv", "dtype", "offset")}
    assert reason in ops.path_ineligible(path, *_path_args(**args), mask, change.get("lse", False))
    if change:
        assert ops.path_ineligible(path, *_path_args(), None, False) is None


@pytest.mark.parametrize(
    "sm90, change, expected",
    [
        (True, {"d": 64}, "hopper"),
        (True, {}, "hopper"),  # head dim 128: the Gluon kernel
        (True, {"lse": True}, "hopper"),  # an lse (cuDNN returns none)
        (True, {"hkv": 1}, "hopper"),  # grouped heads (cuDNN refuses them)
        (True, {"offset": 4}, "triton"),  # not TMA-aligned
        (True, {"d": 64, "offset": 4}, "triton"),  # not TMA-aligned
        (True, {"d": 72}, "hopper"),  # Lumina's head dim
        (True, {"d": 72, "hkv": 1}, "hopper"),  # with grouped heads (cuDNN refuses them, the Hopper kernel not)
        (True, {"d": 80}, "triton"),  # no auto path
        (True, {"dtype": torch.float32}, "triton"),
        (False, {"d": 64}, "triton"),  # another GPU
        (False, {}, "triton"),
    ],
)
def test_auto_path_per_head_dim(monkeypatch, recwarn, sm90, change, expected):
    """RAS_ATTENTION unset (auto): on an sm_90 GPU with cuDNN (faked here) an eligible call takes the Hopper path at
    head dims 64, 72 and 128 (never cuDNN); every other call, and every call on another GPU, the portable kernel,
    with no warning (auto asks for nothing a call could refuse)."""
    monkeypatch.delenv("RAS_ATTENTION", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops.torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(ops.torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(ops.torch.cuda, "get_device_capability", lambda device=None: (9, 0) if sm90 else (8, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    ops._warn_other_path.cache_clear()
    args = {k: v for k, v in change.items() if k in ("d", "hkv", "dtype", "offset")}
    assert ops._attention_path(*_path_args(**args), None, change.get("lse", False)) == expected
    assert not recwarn.list


@requires_triton
@pytest.mark.parametrize("path", ["hopper", "cudnn"])
def test_an_ineligible_call_warns_and_runs_the_portable_kernel(triton_backend, monkeypatch, path):
    monkeypatch.setenv("RAS_ATTENTION", path)
    ops._warn_other_path.cache_clear()
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(1, 33, 5, 3, 2, 2, 72, torch.float32)
    ref, _, _, _, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, None)
    calls = []
    monkeypatch.setattr(ops, "_launch_hopper", lambda *a: calls.append(a))
    with pytest.warns(UserWarning, match=f"RAS_ATTENTION={path}: a call with .* runs the portable Triton kernel"):
        out = ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1])
    assert_attention_close(out, ref, base, torch.float32)
    assert not calls


HOPPER_CPU_CASES = [
    # (B, N, K, T, Hq, Hkv, d, masked): tail tiles (N, T, Lq not multiples of the tiles), GQA, d 64, 72 and 128
    pytest.param(2, 70, 21, 5, 4, 2, 64, False, id="tails-gqa-T5"),
    pytest.param(1, 64, 64, 0, 2, 2, 128, False, id="d128-KeqN"),
    pytest.param(1, 45, 9, 40, 2, 1, 64, True, id="masked-text"),
    pytest.param(2, 37, 11, 7, 4, 1, 72, True, id="d72-gqa-masked"),  # Lumina's head dim: 64 + a 16-wide tail
]


@requires_triton
@pytest.mark.parametrize("b, n, kk, t, hq, hkv, d, masked", HOPPER_CPU_CASES)
def test_hopper_path_matches_reference(triton_backend, monkeypatch, b, n, kk, t, hq, hkv, d, masked):
    """RAS_ATTENTION=hopper under the interpreter (fp16): the Hopper kernel runs (counted) and matches the
    reference, output, lse and cache, with extra keys, a key mask that hides whole tiles, GQA and tail tiles."""
    if not TRITON_RUNNABLE or DEVICE != "cpu":
        pytest.skip("the interpreter run of the Hopper kernel; GPUs run test_gpu_hopper_path")
    monkeypatch.setenv("RAS_ATTENTION", "hopper")
    calls = []
    launch = ops._launch_hopper
    monkeypatch.setattr(ops, "_launch_hopper", lambda *a: calls.append(1) or launch(*a))
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(b, n, kk, t, hq, hkv, d, torch.float16)
    mask = None
    if masked:
        mask = torch.rand(b, t) < 0.5
        mask[:, :32] = False  # the first extra tile (32 rows under the interpreter) fully hidden
    ref, ref_lse, kc, vc, base = expected_cached_attention(
        q, k_new, v_new, k_cache, v_cache, idx, extra, None, extra_mask=mask
    )
    out, lse = ops.cached_kv_attention(
        q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1], extra_mask=mask, return_lse=True
    )
    assert calls == [1]
    assert_attention_close(out, ref, base, torch.float16)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)
    # flash_attention with a key mask over all keys (an empty cache segment) and no visible key for sample 0
    key_mask = torch.rand(b, n) < 0.7
    key_mask[0] = False
    out, lse = ops.flash_attention(q, k_cache, v_cache, key_mask=key_mask, return_lse=True)
    want, want_lse = reference.attention(
        q.float(), k_cache.float(), v_cache.float(), d**-0.5, key_mask, return_lse=True
    )
    assert calls == [1, 1]
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=1e-4)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("path", ["hopper", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b, n, kk, t, hq, hkv, d",
    [
        pytest.param(2, 4096, 1024, 333, 24, 24, 64, id="sd3-d64"),
        pytest.param(2, 4000, 1000, 77, 24, 8, 64, id="gqa-tails-d64"),
        pytest.param(1, 4096, 1000, 512, 24, 24, 128, id="flux-d128"),
        pytest.param(1, 8190, 2047, 0, 12, 12, 128, id="wan-d128"),
        pytest.param(2, 4096, 1000, 0, 32, 8, 72, id="lumina-d72"),
    ],
)
def test_gpu_attention_paths(triton_backend, monkeypatch, path, b, n, kk, t, hq, hkv, d, dtype):
    """RAS_ATTENTION=hopper / cudnn on an H200: the path runs (counted) where eligible, the cached op (cache write
    included) and the plain op match the reference, and the cached op replays in a CUDA graph bit-identically."""
    if path == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernel needs an sm_90 GPU")
    monkeypatch.setenv("RAS_ATTENTION", path)
    # On an H200 every case is eligible for the Hopper kernel; cuDNN takes head dim 128 without grouped heads.
    eligible = path == "hopper" or (d == 128 and hq == hkv)
    calls = []
    name = "_launch_hopper" if path == "hopper" else "_cudnn_attend"
    real = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a: calls.append(1) or real(*a))
    q, k_new, v_new, k_cache, v_cache, idx, extra = _case(b, n, kk, t, hq, hkv, d, dtype, device="cuda")
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    ref, _, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, None)

    def step():
        return ops.cached_kv_attention(q, k_new, v_new, k_cache, v_cache, idx, k_extra=extra[0], v_extra=extra[1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ineligible cases warn once and run the portable kernel
        want = step()
        assert len(calls) == int(eligible)
        assert_attention_close(want, ref, base, dtype)
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
        k_cache.copy_(kc0)
        v_cache.copy_(vc0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want) and torch.equal(k_cache, kc)
        plain = ops.flash_attention(q, k_cache, v_cache)
    ref_plain = reference.attention(q.float(), k_cache.float(), v_cache.float(), d**-0.5)
    assert_attention_close(plain, ref_plain, sdpa_baseline(q, k_cache, v_cache, d**-0.5), dtype)
