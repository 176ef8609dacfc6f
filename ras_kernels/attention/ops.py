"""Public ``cached_kv_attention`` and ``flash_attention``: validation, the Triton launchers, the op definitions."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .._backend import (
    FLOAT_DTYPES,
    RASOp,
    cdiv,
    check_no_overlap,
    check_tensor,
    check_unit_stride,
    env_choice,
    next_pow2,
    validate_index,
)
from . import reference

# The kernel's head dims: d = 2^a or 2^a + 2^b with 2^b >= 8, 16 <= d <= 256 (it splits d into two power-of-two
# pieces). Other head dims are zero-padded to the next one, or run the reference past 256 (see _kernel_head_dim).
HEAD_DIMS = (16, 24, 32, 40, 48, 64, 72, 80, 96, 128, 136, 144, 160, 192, 256)


def _check_head_dim(d: int) -> None:
    if d < 1:
        raise ValueError(f"head dim d (the last dimension of q) must be >= 1, got {d}")


def _kernel_head_dim(d: int) -> int | None:
    """The head dim the Triton kernel runs a head dim ``d`` at: d itself when it is one of HEAD_DIMS, else the next
    one (q, k and v zero-padded: the extra columns add 0 to every score and give output columns that are sliced
    off, so the result is the same), or None past 256 (the reference runs instead). Warns once per such d (in eager
    calls: torch.compile cannot trace a warning)."""
    width = next((w for w in HEAD_DIMS if w >= d), None)
    if width != d and not torch.compiler.is_compiling():
        _warn_head_dim(d, width)
    return width


@functools.cache
def _warn_head_dim(d: int, width: int | None) -> None:
    if width is None:
        how = f"d > {HEAD_DIMS[-1]}: the plain-PyTorch reference (fp32) runs instead"
    else:
        how = f"q, k and v are zero-padded to {width} on every call (same result, plus padded copies of the K/V cache)"
    kernel_dims = ", ".join(map(str, HEAD_DIMS))
    warnings.warn(
        f"ras_kernels attention: head dim {d} is not a Triton kernel head dim ({kernel_dims}); {how}",
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside ras_kernels, seen from warnings.warn's caller (the user's call)."""
    package = str(Path(__file__).parents[1]) + os.sep
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _check_scale(scale) -> None:
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")


def _check_key_mask(name: str, mask, b: int, t: int, device: torch.device) -> None:
    check_tensor(name, mask, ndim=2, dtypes=(torch.bool,), device=device)
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"{name} must have shape (B, T) = {(b, t)}, got {tuple(mask.shape)}")


FP8 = torch.float8_e4m3fn


@functools.cache
def _has_fp8(device: torch.device) -> bool:
    """Whether Triton converts e4m3 on this device: CUDA compute capability 8.9 or newer (and the interpreter)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _check_cache_scales(k_cache, k_cache_scale, v_cache_scale) -> None:
    """fp8 caches need their row scales [B, N, Hkv] fp32 (and a kernel head dim); other caches take none."""
    b, n, hkv, d = k_cache.shape
    if k_cache.dtype != FP8:
        if k_cache_scale is not None or v_cache_scale is not None:
            raise ValueError(
                f"k_cache_scale and v_cache_scale go with float8_e4m3fn caches only; the caches are {k_cache.dtype}"
            )
        return
    if d not in HEAD_DIMS:
        dims = ", ".join(map(str, HEAD_DIMS))
        raise ValueError(f"float8_e4m3fn caches need a head dim the kernel runs ({dims}), got {d}")
    if not _has_fp8(k_cache.device):
        raise ValueError(f"float8_e4m3fn caches need CUDA compute capability 8.9 or newer, got {_arch(k_cache.device)}")
    for name, t in (("k_cache_scale", k_cache_scale), ("v_cache_scale", v_cache_scale)):
        if t is None:
            raise ValueError(f"{name} [B, N, Hkv] float32 is required with float8_e4m3fn caches")
        check_tensor(name, t, ndim=3, dtypes=(torch.float32,), device=k_cache.device)
        if tuple(t.shape) != (b, n, hkv):
            raise ValueError(f"{name} must have shape (B, N, Hkv) = {(b, n, hkv)}, got {tuple(t.shape)}")
        check_no_overlap(name, t)


def validate_attention_args(
    q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, scale, extra_mask=None, return_lse=False,
    k_cache_scale=None, v_cache_scale=None,
) -> None:  # fmt: skip
    """Check every argument of :func:`cached_kv_attention`."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, lq, hq, d = q.shape
    _check_head_dim(d)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype, FP8), device=q.device)
    n, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must have shape (B={b}, N, Hkv, d={d}), got {tuple(k_cache.shape)}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=q.device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    check_no_overlap("k_cache", k_cache)
    check_no_overlap("v_cache", v_cache)
    _check_cache_scales(k_cache, k_cache_scale, v_cache_scale)
    validate_index("idx", idx, b, n, q.device, distinct=True)
    kk = idx.shape[1]
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
        if tuple(t.shape) != (b, kk, hkv, d):
            raise ValueError(f"{name} must have shape (B, K, Hkv, d) = {(b, kk, hkv, d)}, got {tuple(t.shape)}")
    if (k_extra is None) != (v_extra is None):
        raise ValueError("k_extra and v_extra must be given together")
    if k_extra is not None:
        check_tensor("k_extra", k_extra, ndim=4, dtypes=(q.dtype,), device=q.device)
        t = k_extra.shape[1]
        if tuple(k_extra.shape) != (b, t, hkv, d):
            raise ValueError(f"k_extra must have shape (B, T, Hkv, d) = {(b, t, hkv, d)}, got {tuple(k_extra.shape)}")
        check_tensor("v_extra", v_extra, ndim=4, dtypes=(q.dtype,), device=q.device)
        if v_extra.shape != k_extra.shape:
            raise ValueError(f"v_extra shape {tuple(v_extra.shape)} differs from k_extra {tuple(k_extra.shape)}")
    if extra_mask is not None:
        if k_extra is None:
            raise ValueError("extra_mask needs k_extra and v_extra")
        _check_key_mask("extra_mask", extra_mask, b, k_extra.shape[1], q.device)
    _check_scale(scale)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_unit_stride(name, t)
    if k_extra is not None:
        check_unit_stride("k_extra", k_extra)
        check_unit_stride("v_extra", v_extra)
    requested_attention_path()


def validate_plain_attention_args(q, k, v, key_mask, scale, return_lse) -> None:
    """Check every argument of :func:`attention`."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    b, _, hq, d = q.shape
    _check_head_dim(d)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    lk, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must have shape (B={b}, L, Hkv, d={d}), got {tuple(k.shape)}")
    if lk < 1:
        raise ValueError("k must hold at least one key (L >= 1)")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k {tuple(k.shape)}")
    if key_mask is not None:
        _check_key_mask("key_mask", key_mask, b, lk, q.device)
    _check_scale(scale)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_unit_stride(name, t)
    requested_attention_path()


# ----------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------


def _split_head_dim(d: int) -> tuple[int, int]:
    """d = D0 + rest, D0 the largest power of two <= d; D1 = max(rest, 16) is the width of the second QK piece
    (0 if none); the second PV piece is exactly rest wide (the kernel's DV1)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (0 if rest == 0 else max(16, rest))


def _lq_bucket(lq: int) -> int:
    """The autotuner's key for the query length: the next power of two, so K changing per step does not retune."""
    return min(max(64, 1 << max(lq - 1, 1).bit_length()), 1 << 16)


def tuned_config_key(d: int, lq_bucket: int, has_extra: bool, has_mask: bool, kv_fp8: bool = False) -> str:
    """The key of the shipped config table (tuned_configs.json): the autotuner's key, 16-bit dtypes alike; fp8 K/V
    keys end in ``-fp8`` (their tiles are converted in registers, so the best config differs)."""
    key = f"d{d}-lq{lq_bucket}-{'extra' if has_extra else 'noextra'}-{'mask' if has_mask else 'nomask'}"
    return key + "-fp8" if kv_fp8 else key


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs on the GPU; the autotuner picks per key.
GPU_CONFIGS = (
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
)
# One fixed config where autotuning is impossible (interpreter) or not worth it (fp32, exact-precision dots).
_FP32_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


def _width(d: int) -> int:
    d0, d1 = _split_head_dim(d)
    return d0 + d1


def _default_config(d: int) -> dict:
    """The config used with RAS_ATTN_AUTOTUNE=0 (no autotuning, e.g. for quick GPU test runs)."""
    w = _width(d)
    if w <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if w <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


_AUTOTUNE_MODES = ("1", "0", "tune")


def _chosen_config(
    device: torch.device, d: int, lq_bucket: int, has_extra: bool, has_mask: bool, kv_fp8: bool = False
) -> dict | None:
    """The launch config from ``RAS_ATTN_AUTOTUNE``: unset or ``1``, the shipped table's entry for this card's
    architecture (tuned_configs.json, written by ``python -m bench.bench_attention --tune``), else None (the
    autotuner, whose results Triton caches on disk); ``0``, one fixed config per head dim; ``tune``, always None."""
    mode = os.environ.get("RAS_ATTN_AUTOTUNE", "1").strip()
    if mode not in _AUTOTUNE_MODES:
        raise ValueError(f"RAS_ATTN_AUTOTUNE must be one of {', '.join(_AUTOTUNE_MODES)}; got {mode!r}")
    if mode == "0":
        return _default_config(d)
    if mode == "tune":
        return None
    entry = _shipped_configs(_arch(device)).get(tuned_config_key(d, lq_bucket, has_extra, has_mask, kv_fp8))
    if entry is None:
        return None
    bm, bn, warps, stages = entry
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


@functools.cache
def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.cache
def _shipped_configs(arch: str, table: str = "tuned_configs.json") -> dict[str, list[int]]:
    """A shipped table's configs (the portable kernel's, or the Hopper kernel's ``hopper_configs.json``) when it was
    tuned on ``arch`` (H100 and H200 share sm90), else none."""
    record = json.loads(Path(__file__).with_name(table).read_text())
    return record["configs"] if record["arch"] == arch else {}


@functools.cache
def _tuned_attn_kernel():
    import triton

    from . import kernels

    def prune(configs, named_args, **kwargs):
        # Large head dims do not fit 128 x 128 tiles in registers / shared memory.
        meta = {**named_args, **kwargs}
        width = meta["D0"] + (meta["D1"] if meta["SPLIT"] else 0)
        kept = [c for c in configs if width <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return kept or configs

    return triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in GPU_CONFIGS
        ],
        key=["lq_bucket", "HEAD_DIM", "HAS_EXTRA", "HAS_MASK", "KV_FP8"],
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,  # on disk, in Triton's cache: a new process does not re-tune
    )(kernels.attn_fwd_kernel)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its offset and batch/row/head strides are multiples of 8 elements (the kernel's alignment
    hints rely on it; true for contiguous tensors and for views of fused projections), else an aligned copy."""
    if t.storage_offset() % 8 == 0 and all(st % 8 == 0 for st in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _attention_launch_args(
    q, k, v, k_extra, v_extra, extra_mask, scale: float, return_lse: bool, k_scale=None, v_scale=None
):
    """Allocate out [B, Lq, Hq, d] (and lse [B, Hq, Lq] fp32 when asked); the kernel's keyword arguments and grid.
    ``k_scale``/``v_scale`` [B, N, Hkv]: the row scales of fp8 k/v."""
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    if k_extra is not None:
        k_extra, v_extra = _aligned(k_extra), _aligned(v_extra)
    out = torch.empty((b, lq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, lq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    has_extra = k_extra is not None and k_extra.shape[1] > 0
    ke, ve = (k_extra, v_extra) if has_extra else (k, v)  # never read without HAS_EXTRA
    has_mask = has_extra and extra_mask is not None
    # Bool masks are read as bytes (a zero-copy view).
    mask = extra_mask.view(torch.uint8) if has_mask else ke  # never read without HAS_MASK
    fp8 = k.dtype == FP8
    ks, vs = (k_scale, v_scale) if fp8 else (lse, lse)  # never read without KV_FP8
    scale_strides = {
        f"stride_{name}_scale_{dim}": t.stride(i) if fp8 else 0
        for name, t in (("k", ks), ("v", vs))
        for i, dim in enumerate("bnh")
    }
    d0, d1 = _split_head_dim(d)
    args = dict(
        out_ptr=out, lse_ptr=lse, q_ptr=q, k_ptr=k, v_ptr=v, k_extra_ptr=ke, v_extra_ptr=ve, mask_ptr=mask,
        k_scale_ptr=ks, v_scale_ptr=vs, **scale_strides,
        stride_q_b=q.stride(0), stride_q_l=q.stride(1), stride_q_h=q.stride(2),
        stride_k_b=k.stride(0), stride_k_n=k.stride(1), stride_k_h=k.stride(2),
        stride_v_b=v.stride(0), stride_v_n=v.stride(1), stride_v_h=v.stride(2),
        stride_k_extra_b=ke.stride(0), stride_k_extra_t=ke.stride(1), stride_k_extra_h=ke.stride(2),
        stride_v_extra_b=ve.stride(0), stride_v_extra_t=ve.stride(1), stride_v_extra_h=ve.stride(2),
        stride_mask_b=mask.stride(0) if has_mask else 0, stride_mask_t=mask.stride(1) if has_mask else 0,
        lq=lq, lq_bucket=_lq_bucket(lq), n_keys=k.shape[1], n_extra=ke.shape[1] if has_extra else 0,
        heads_q=hq, group=hq // hkv, qk_scale=scale * math.log2(math.e),
    )  # fmt: skip
    consts = {
        "HEAD_DIM": d,
        "D0": d0,
        "D1": max(d1, 16),
        "DV1": (d - d0) or 16,
        "SPLIT": d1 > 0,
        "HAS_EXTRA": has_extra,
        "HAS_MASK": has_mask,
        "STORE_LSE": return_lse,
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
        "KV_FP8": fp8,
    }

    def grid(meta):
        return (cdiv(lq, meta["BLOCK_M"]), b * hq)

    return out, lse, args, consts, grid


def _launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_extra: torch.Tensor | None,
    v_extra: torch.Tensor | None,
    extra_mask: torch.Tensor | None,
    scale: float,
    return_lse: bool,
    config: dict | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the attention kernel (at a kernel head dim) on the current device; ``config`` (BLOCK_M, BLOCK_N,
    num_warps, num_stages) bypasses the shipped table and the autotuner; fp8 k/v come with their row scales."""
    from . import kernels

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and q.dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot returns garbage (its fp32 and fp16 dots are right): run the fp32 kernel on
        # fp32 copies (fp8 caches as they are) and round the output once, as the reference does.
        up = [t if t is None or t.dtype == FP8 else t.float() for t in (q, k, v, k_extra, v_extra)]
        out, lse = _launch_attention(*up, extra_mask, scale, return_lse, config, k_scale, v_scale)
        return out.to(torch.bfloat16), lse
    out, lse, args, consts, grid = _attention_launch_args(
        q, k, v, k_extra, v_extra, extra_mask, scale, return_lse, k_scale, v_scale
    )
    if out.numel() == 0:
        return out, lse
    if interpret:
        # The interpreter cannot autotune (no driver): one small fixed config.
        config = _INTERPRET_CONFIG
    elif q.dtype == torch.float32:
        config = _FP32_CONFIG
    elif config is None:
        config = _chosen_config(
            q.device, consts["HEAD_DIM"], _lq_bucket(q.shape[1]), consts["HAS_EXTRA"], consts["HAS_MASK"],
            consts["KV_FP8"],
        )  # fmt: skip
    if config is None:
        _tuned_attn_kernel()[grid](**args, **consts)
    else:
        kernels.attn_fwd_kernel[grid](**args, **consts, **config)
    return out, lse


def _launch_hopper(q, k, v, k_extra, v_extra, extra_mask, scale: float, return_lse: bool, config=None):
    """The Hopper path (RAS_ATTENTION hopper, or auto on sm_90; an eligible call: see path_ineligible) on the current
    device: at the head dims of GLUON_CONFIGS with q, k and v of one dtype and no key mask, the warp-specialised
    Gluon kernel (gluon_kernels.attn_fwd_gluon_kernel); otherwise (a key mask, the interpreter, an explicit
    ``config``, the fp8 probe's e4m3 q) attn_fwd_tma_kernel, where ``config`` (one of HOPPER_CANDIDATES) bypasses the
    shipped table. Masked calls (Lumina's cross-attention over its padded caption) stay on the Triton kernel: the
    Gluon kernel with a mask path (a per-tile mask load between its score GEMM's wait and its softmax) ran at
    0.68-1.01x cuDNN against the Triton kernel's 0.93-1.36x at 256-2048 masked keys (docs/benchmarks.md, session 23;
    the cause not profiled)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from . import kernels

    b, lq, hq, d = q.shape
    out = torch.empty(q.shape, dtype=v.dtype, device=q.device)  # v's dtype: q's, but in bench_attention --fp8-probe
    lse = torch.empty((b, hq, lq) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    has_extra = k_extra is not None and k_extra.shape[1] > 0
    has_mask = has_extra and extra_mask is not None
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    gluon = config is None and not interpret and not has_mask and d in GLUON_CONFIGS and q.dtype == k.dtype == v.dtype
    if k.shape[1] == 0:  # no cache rows (flash_attention with a key mask): a descriptor needs >= 1 row, never read
        k, v = k_extra, v_extra
        n_keys = 0
    else:
        n_keys = k.shape[1]
    ke, ve = (k_extra, v_extra) if has_extra else (k, v)  # never read without HAS_EXTRA
    mask = extra_mask.view(torch.uint8) if has_mask else lse  # never read without HAS_MASK
    n_extra = ke.shape[1] if has_extra else 0
    if gluon:
        _launch_gluon(out, lse, q, k, v, ke, ve, n_keys, n_extra, has_extra, scale, return_lse)
        return out, lse
    if interpret:
        config = _HOPPER_INTERPRET_CONFIG
    elif config is None:
        key = tuned_config_key(d, _lq_bucket(lq), has_extra, has_mask)
        config = _shipped_configs(_arch(q.device), "hopper_configs.json").get(key, HOPPER_DEFAULTS[d])
    block_m, block_n, warps, stages, ws = config
    d0, d1 = HOPPER_SPLITS[d]

    def descs(t, rows):  # the d0-wide tiles and, when d1, the d1-wide ones from column d0 (see the kernel)
        full = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, d0])
        return full, TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, d1]) if d1 else full

    (o0, o1), (q0, q1) = descs(out, block_m), descs(q, block_m)
    (k0, k1), (v0, v1), (ke0, ke1), (ve0, ve1) = (descs(t, block_n) for t in (k, v, ke, ve))
    kernels.attn_fwd_tma_kernel[(cdiv(lq, block_m), b * hq)](
        out_desc=o0, out1_desc=o1, lse_ptr=lse, q_desc=q0, q1_desc=q1, k_desc=k0, k1_desc=k1, v_desc=v0, v1_desc=v1,
        k_extra_desc=ke0, k1_extra_desc=ke1, v_extra_desc=ve0, v1_extra_desc=ve1, mask_ptr=mask,
        stride_mask_b=mask.stride(0) if has_mask else 0, stride_mask_t=mask.stride(1) if has_mask else 0,
        lq=lq, n_keys=n_keys, n_extra=n_extra, heads_q=hq, group=hq // k.shape[2],
        qk_scale=scale * math.log2(math.e), D0=d0, D1=d1, HAS_EXTRA=has_extra, HAS_MASK=has_mask,
        STORE_LSE=return_lse, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages, WARP_SPECIALIZE=ws,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def _launch_gluon(out, lse, q, k, v, ke, ve, n_keys: int, n_extra: int, has_extra: bool, scale: float,
                  return_lse: bool) -> None:  # fmt: skip
    """attn_fwd_gluon_kernel into out (and lse) with GLUON_CONFIGS' config for the head dim, split as HOPPER_SPLITS
    says; arguments as _launch_hopper prepares them (k / v the extra rows when the cache has none, ke / ve
    placeholders without extra rows)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_kernels import ROWS, attn_fwd_gluon_kernel

    b, lq, hq, d = q.shape
    block_n, stages, q_in_regs = GLUON_CONFIGS[d]
    d0, d1 = HOPPER_SPLITS[d]
    element = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[q.dtype]

    def descs(t, rows):  # the d0-wide blocks and, when d1, the d1-wide ones (read from column d0 by the kernel)
        def desc(width):
            block = [1, rows, 1, width]
            layout = gl.NVMMASharedLayout.get_default_for(block, element)
            return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)

        full = desc(d0)
        return full, desc(d1) if d1 else full

    rows = ROWS.value
    (q0, q1), (o0, o1) = descs(q, rows), descs(out, rows)
    (k0, k1), (v0, v1), (ke0, ke1), (ve0, ve1) = (descs(t, block_n) for t in (k, v, ke, ve))
    attn_fwd_gluon_kernel[(cdiv(lq, 2 * rows), b * hq)](
        q0, k0, v0, ke0, ve0, o0, q1, k1, v1, ke1, ve1, o1, lse, lq, n_keys, n_extra, hq, hq // k.shape[2],
        scale * math.log2(math.e), int(return_lse), D0=d0, D1=d1, BLOCK_N=block_n, STAGES=stages,
        Q_IN_REGS=q_in_regs, HAS_EXTRA=has_extra, num_warps=4,
    )  # fmt: skip


def _launch_cache_write(k_cache, v_cache, idx, k_new, v_new) -> None:
    """``k_cache[b, idx[b, j]] = k_new[b, j]`` (and v) in place, on the current device; any head dim."""
    from . import kernels

    b, kk, hkv, d = k_new.shape
    if b == 0 or kk == 0 or hkv == 0:
        return
    block_k = 64
    kernels.cache_write_kernel[(cdiv(kk, block_k), hkv, b)](
        k_cache_ptr=k_cache, v_cache_ptr=v_cache, k_new_ptr=k_new, v_new_ptr=v_new, idx_ptr=idx,
        stride_k_cache_b=k_cache.stride(0), stride_k_cache_n=k_cache.stride(1), stride_k_cache_h=k_cache.stride(2),
        stride_v_cache_b=v_cache.stride(0), stride_v_cache_n=v_cache.stride(1), stride_v_cache_h=v_cache.stride(2),
        stride_k_new_b=k_new.stride(0), stride_k_new_k=k_new.stride(1), stride_k_new_h=k_new.stride(2),
        stride_v_new_b=v_new.stride(0), stride_v_new_k=v_new.stride(1), stride_v_new_h=v_new.stride(2),
        stride_idx_b=idx.stride(0), stride_idx_k=idx.stride(1),
        n_active=kk, n_tokens=k_cache.shape[1],
        HEAD_DIM=d, BLOCK_K=block_k, BLOCK_D=next_pow2(d),
    )  # fmt: skip


def _attend(
    q, k, v, k_extra, v_extra, extra_mask, scale: float, return_lse: bool, width: int, k_scale=None, v_scale=None,
    path: str = "triton",
):  # fmt: skip
    """The attention kernel at kernel head dim ``width`` >= d (see _kernel_head_dim): zero columns appended to q,
    k and v add nothing to any score, and the output's extra columns (zero) are sliced off. fp8 k/v (with their row
    scales) always come at a kernel head dim (validate_attention_args). ``path`` "hopper" (an eligible call, so
    width == d): the Hopper kernel."""
    if path == "hopper":
        return _launch_hopper(q, k, v, k_extra, v_extra, extra_mask, scale, return_lse)
    d = q.shape[-1]
    if width != d:
        q, k, v, k_extra, v_extra = (
            None if t is None else F.pad(t, (0, width - d)) for t in (q, k, v, k_extra, v_extra)
        )
    out, lse = _launch_attention(q, k, v, k_extra, v_extra, extra_mask, scale, return_lse, None, k_scale, v_scale)
    if width != d:
        out = out[..., :d].contiguous()
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# The attention paths (RAS_ATTENTION): the portable kernel, the Hopper kernel, cuDNN
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_PATHS = ("auto", "triton", "hopper", "cudnn")
# The head dims each opt-in path runs, as measured on the H200 (docs/benchmarks.md, session 15): cuDNN at head dim
# 64 is slower than the portable kernel once SD3's text keys are concatenated, so it takes 128 only.
PATH_HEAD_DIMS = {"hopper": (64, 72, 128), "cudnn": (128,)}
# The Hopper kernel's head-dim split (D0, D1): D0-wide tiles, plus D1-wide ones from column D0 (72 = 64 + 8, read
# as a 16-wide TMA box whose last 8 columns lie past the row and load as zeros; both Hopper kernels split it so).
HOPPER_SPLITS = {64: (64, 0), 72: (64, 16), 128: (128, 0)}
# RAS_ATTENTION=auto (the default) on an sm_90 GPU: the Hopper path at each head dim it runs. At 64 it made pipe(...)
# fastest (docs/benchmarks.md, session 16: SD3 1.04x the portable kernel's generation at 0.25, with the Triton TMA
# kernel); at Lumina-Next's 72 it is the faster op (session 20, bench_attention --paths: 1.36x the portable kernel at
# the 0.25 shape, 1.07x dense; session 24, with the Gluon kernel: 1.51x and 1.16x; cuDNN has no path there); at 128
# the Gluon kernel replaced cuDNN in session 21 on the kernel alone: 1.11-1.12x cuDNN's SDPA at Wan's shapes,
# 0.98-0.99x at Flux's, where the cudnn path's whole op took 1.24x cuDNN alone's time (the text keys' concatenation);
# in session 22 the op on it took 1.04-1.16x less time than the cudnn path at every Flux and Wan shape
# (bench_attention --paths; Wan's pipe(...) not re-measured). An ineligible call, another head dim or another device
# runs the portable kernel.
AUTO_PATHS = {64: "hopper", 72: "hopper", 128: "hopper"}
# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp-specialised key loop) of the Triton TMA kernel (attn_fwd_tma_kernel:
# the Hopper path's masked calls, and wherever _launch_hopper does not take the Gluon kernel): the candidates that
# ``python -m bench.bench_attention --tune-hopper`` times per key of the shipped table (hopper_configs.json, keys as
# tuned_config_key), and per head dim the one a key missing from the table takes (at 64 and 128 the fastest at the
# Wan, Flux and SD3 shapes in session 15's probe on the H200; at 72 see hopper_candidates: 0.230 ms at Lumina-Next's
# 0.25 shape, session 20). The interpreter runs small tiles.
HOPPER_CANDIDATES = (
    (128, 64, 4, 3, True),
    (128, 64, 4, 3, False),
    (128, 64, 8, 3, False),
    (128, 64, 8, 4, True),
    (128, 128, 8, 3, False),
    (128, 128, 8, 2, True),
    (64, 64, 4, 3, False),
    (64, 128, 4, 3, False),
)
HOPPER_DEFAULTS = {64: (128, 64, 4, 3, True), 72: (128, 64, 4, 3, False), 128: (128, 128, 8, 3, False)}
# The warp-specialised Gluon kernel's (BLOCK_N, STAGES, Q held in registers) per head dim: it runs the Hopper path's
# 16-bit calls without a key mask at these head dims (see _launch_hopper). The fastest of the probed configs on the
# H200 (docs/benchmarks.md, session 21, kernel alone): at 64, 0.172 / 0.548 ms at SD3's 0.25 / dense shapes; at 128,
# within 1% of the fastest at Wan's shapes, and 6% faster at Flux dense than with Q read from shared memory. At 72
# (session 23, 64 + 16 columns): 0.186 / 0.772 ms at Lumina's 0.25 / dense shapes, 1.17x / 1.15x cuDNN against the
# Triton TMA kernel's 1.01x / 1.07x. Three consumer warpgroups a CTA were slower at both head dims (session 22: they
# spill at 128 registers a thread).
GLUON_CONFIGS = {64: (128, 4, True), 72: (128, 4, True), 128: (128, 2, True)}
_HOPPER_INTERPRET_CONFIG = (32, 32, 4, 1, False)


def hopper_candidates(d: int) -> tuple:
    """The HOPPER_CANDIDATES the Hopper kernel compiles at head dim ``d``: at 72 (D1 > 0) not a warp-specialised
    4-warp key loop, which Triton 3.6 failed to compile next to the kernel's tail-tile loop (session 19, H200)."""
    return tuple(c for c in HOPPER_CANDIDATES if not (HOPPER_SPLITS[d][1] and c[4] and c[2] == 4))


def requested_attention_path() -> str:
    """The value of ``RAS_ATTENTION`` (default ``auto``: see AUTO_PATHS), validated."""
    return env_choice("RAS_ATTENTION", ATTENTION_PATHS, "auto")


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA reads a tensor whose base address and outer strides are multiples of 16 bytes."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1])


def path_ineligible(path: str, q, k, v, k_extra, v_extra, key_mask, return_lse: bool) -> str | None:
    """Why an attention launch cannot take ``path`` ("hopper" or "cudnn"), or None when it can.

    Both need 16-bit q, k and v of one dtype (no fp8 caches) and a head dim in ``PATH_HEAD_DIMS[path]``.
    hopper: CUDA compute capability 9.0 (or the interpreter, fp16 only: its bf16 dots are wrong), and every tensor
    TMA-ready (16-byte aligned base and outer strides). cudnn: cuDNN SDPA available and enabled, as many kv heads as
    query heads, no key mask and no lse (PyTorch's SDPA returns neither).
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if path == "hopper" and not interpret and not (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return "a device other than an sm_90 GPU"
    if path == "cudnn" and not (
        q.is_cuda and torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()
    ):
        return "cuDNN SDPA not available on this device"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype:
        return f"{q.dtype} queries and {k.dtype} keys (fp16 / bf16 only)"
    if path == "hopper" and interpret and q.dtype == torch.bfloat16:
        return "bf16 under TRITON_INTERPRET (its bf16 dots are wrong)"
    if q.shape[-1] not in PATH_HEAD_DIMS[path]:
        return f"head dim {q.shape[-1]} (the {path} path runs {PATH_HEAD_DIMS[path]})"
    if path == "hopper":
        if not all(_tma_ready(t) for t in (q, k, v, k_extra, v_extra) if t is not None):
            return "a tensor not 16-byte aligned for TMA"
        return None
    if k.shape[2] != q.shape[2]:
        return "grouped-query heads"
    if key_mask is not None:
        return "a key mask"
    if return_lse:
        return "return_lse"
    return None


@functools.cache
def _warn_other_path(path: str, reason: str) -> None:
    warnings.warn(
        f"RAS_ATTENTION={path}: a call with {reason} runs the portable Triton kernel", stacklevel=_caller_stacklevel()
    )


def _auto_candidate(q) -> str:
    """The path ``auto`` tries for q before the call's eligibility: AUTO_PATHS' path for its head dim on an sm_90 GPU
    (not under the interpreter), else "triton"."""
    on_sm90 = q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
    if not on_sm90 or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return AUTO_PATHS.get(q.shape[-1], "triton")


def _attention_path(q, k, v, k_extra, v_extra, key_mask, return_lse: bool) -> str:
    """The path this launch takes: under ``auto``, AUTO_PATHS' path for an eligible call on an sm_90 GPU, else
    "triton" (the portable kernel), silently; under an explicit path, that path when the call is eligible, else
    "triton" with one warning per reason (in eager calls)."""
    path = requested_attention_path()
    if path == "auto":
        path = _auto_candidate(q)
        if path == "triton":
            return path
        return path if path_ineligible(path, q, k, v, k_extra, v_extra, key_mask, return_lse) is None else "triton"
    if path == "triton":
        return path
    reason = path_ineligible(path, q, k, v, k_extra, v_extra, key_mask, return_lse)
    if reason is None:
        return path
    if not torch.compiler.is_compiling():
        _warn_other_path(path, reason)
    return "triton"


def _fp8_through_16_bit(q) -> bool:
    """Whether fp8 caches are read through a 16-bit copy (_dequantized) by a 16-bit path instead of the portable
    kernel's dequantize-on-load: under ``auto`` on an sm_90 GPU at a head dim AUTO_PATHS has a path for, and under
    an explicit ``hopper`` / ``cudnn`` (which then runs where the 16-bit call is eligible, see _attention_path).
    The portable kernel converts every e4m3 tile in registers before its dots, which ran the op at 0.22-0.45x of
    its bf16-cache speed on the H200 (docs/benchmarks.md, session 13); the copy costs one pass over the cache (read
    1 byte, write 2, then 2 + 2 per element) and one layer's 16-bit K and V of transient memory."""
    path = requested_attention_path()
    return (_auto_candidate(q) if path == "auto" else path) != "triton"


def _dequantized(cache: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 ``cache`` [B, N, H, d] read back as ``cache * row_scale`` [B, N, H] in ``dtype`` (fp16 / bf16): the
    e4m3 values are exact there, and the product is computed in fp32 and rounded once."""
    return cache.to(dtype).mul_(row_scale.unsqueeze(-1))


def _cudnn_attend(q, k, v, k_extra, v_extra, scale: float) -> torch.Tensor:
    """cuDNN's SDPA over [k; k_extra] (one concatenated copy when there are extra keys), [B, Lq, H, d] in and
    out; the [B, L, H, d] tensors go in as [B, H, L, d] views."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if k_extra is not None:
        k, v = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Op definitions: both return (out, lse), lse [B, Hq, Lq] fp32 with return_lse, else an empty [0] fp32 tensor.
# ----------------------------------------------------------------------------------------------------------------


def _no_lse(q: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=torch.float32, device=q.device)


def _with_lse(result, q: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return result if return_lse else (result, _no_lse(q))


def _cached_reference(
    q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, extra_mask, scale: float, return_lse: bool,
    k_cache_scale, v_cache_scale,
):  # fmt: skip
    out = reference.cached_kv_attention(
        q, k_new, v_new, k_cache, v_cache, idx,
        k_extra=k_extra, v_extra=v_extra, extra_mask=extra_mask, scale=scale, return_lse=return_lse,
        k_cache_scale=k_cache_scale, v_cache_scale=v_cache_scale,
    )  # fmt: skip
    return _with_lse(out, q, return_lse)


def _cached_launch(
    q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, extra_mask, scale: float, return_lse: bool,
    k_cache_scale, v_cache_scale,
):  # fmt: skip
    width = _kernel_head_dim(q.shape[-1])
    if width is None:  # past the kernel's head dims (never with fp8 caches)
        return _cached_reference(
            q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, extra_mask, scale, return_lse, None, None
        )  # fmt: skip
    if k_cache.dtype == FP8:
        # The rows are quantized by the reference's own function (so both paths store the same bytes), their
        # scales written by index; the write kernel then copies the e4m3 rows like any others.
        (k_new, k_row_scale), (v_new, v_row_scale) = reference.quantize_fp8(k_new), reference.quantize_fp8(v_new)
        reference.write_cache(k_cache_scale, idx, k_row_scale)
        reference.write_cache(v_cache_scale, idx, v_row_scale)
    # The write kernel takes any head dim; stream order makes the attention launch wait for it.
    _launch_cache_write(k_cache, v_cache, idx, k_new, v_new)
    k, v = k_cache, v_cache
    if k_cache.dtype == FP8 and _fp8_through_16_bit(q):
        k, v = _dequantized(k_cache, k_cache_scale, q.dtype), _dequantized(v_cache, v_cache_scale, q.dtype)
        k_cache_scale = v_cache_scale = None
    path = _attention_path(q, k, v, k_extra, v_extra, extra_mask, return_lse)
    if path == "cudnn":
        return _cudnn_attend(q, k, v, k_extra, v_extra, scale), _no_lse(q)
    return _attend(
        q, k, v, k_extra, v_extra, extra_mask, scale, return_lse, width, k_cache_scale, v_cache_scale, path
    )  # fmt: skip


def _flash_reference(q, k, v, key_mask, scale: float, return_lse: bool):
    return _with_lse(reference.attention(q, k, v, scale, key_mask, return_lse=return_lse), q, return_lse)


def _flash_launch(q, k, v, key_mask, scale: float, return_lse: bool):
    width = _kernel_head_dim(q.shape[-1])
    if width is None:  # past the kernel's head dims
        return _flash_reference(q, k, v, key_mask, scale, return_lse)
    path = _attention_path(q, k, v, None, None, key_mask, return_lse)
    if path == "cudnn":
        return _cudnn_attend(q, k, v, None, None, scale), _no_lse(q)
    if key_mask is None:
        return _attend(q, k, v, None, None, None, scale, return_lse, width, path=path)
    # Masked keys go through the kernel's masked segment; the unmasked segment is empty.
    return _attend(q, k[:, :0], v[:, :0], k, v, key_mask, scale, return_lse, width, path=path)


def _fake_attention(q: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, lq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, lq) if return_lse else (0,), dtype=torch.float32)


_CACHED_KV_ATTENTION = RASOp(
    "cached_kv_attention",
    schema=(
        "(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor idx, Tensor? k_extra, "
        "Tensor? v_extra, Tensor? extra_mask, float scale, bool return_lse, Tensor(c!)? k_cache_scale, "
        "Tensor(d!)? v_cache_scale) -> (Tensor, Tensor)"
    ),
    launch=_cached_launch,
    reference=_cached_reference,
    fake=lambda q, *args: _fake_attention(q, args[-3]),
    mutates_args=("k_cache", "v_cache", "k_cache_scale", "v_cache_scale"),
    differentiable=("q", "k_new", "v_new", "k_cache", "v_cache", "k_extra", "v_extra"),
)
_FLASH_ATTENTION = RASOp(
    "flash_attention",
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale, bool return_lse) -> (Tensor, Tensor)",
    launch=_flash_launch,
    reference=_flash_reference,
    fake=lambda q, k, v, key_mask, scale, return_lse: _fake_attention(q, return_lse),
    differentiable=("q", "k", "v"),
)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def cached_kv_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    idx: torch.Tensor,
    *,
    k_extra: torch.Tensor | None = None,
    v_extra: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    k_cache_scale: torch.Tensor | None = None,
    v_cache_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the active (and text) queries over a whole-image K/V cache refreshed in place.

    Writes ``k_new``/``v_new`` [B, K, Hkv, d] into ``k_cache``/``v_cache`` [B, N, Hkv, d] at rows ``idx`` [B, K]
    (int32/int64, distinct per row), then returns softmax(q k^T * scale) v for q [B, Lq, Hq, d] over the
    keys/values [cache rows 0..N-1, then ``k_extra``/``v_extra`` [B, T, Hkv, d] rows], shape [B, Lq, Hq, d]
    (contiguous). Hq must be a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)). ``scale`` defaults
    to 1 / sqrt(d). All tensors share one float dtype (fp16/bf16; fp32 too) and may be strided views with a unit
    last stride; the caches must not overlap themselves (no broadcast view). Any head dim d >= 1: the Triton
    kernel runs ``HEAD_DIMS`` (tuned for 64, 72 and 128), zero-pads other d <= 256 to the next one and leaves
    d > 256 to the reference, warning once per such d. Indices are checked on the host for CPU tensors (and with
    ``RAS_DEBUG=1`` for CUDA ones). The Triton path has no backward (see ``RAS_BACKEND``).

    ``extra_mask``: optional [B, T] bool, False hides that extra key from every query (applied in the kernel).
    ``return_lse``: also return the log-sum-exp of the scaled scores, [B, Hq, Lq] fp32 (natural log).

    fp8 caches: ``k_cache``/``v_cache`` of dtype ``float8_e4m3fn`` (half the memory of bf16) with ``k_cache_scale``/
    ``v_cache_scale`` [B, N, Hkv] fp32, updated in place: each (row, head) of k_new/v_new is stored as e4m3 values
    and one scale (``reference.quantize_fp8``: its largest magnitude / 448), and the rows are read back as
    values x scale in q's dtype: by the portable kernel on load, or through a 16-bit copy of the caches where a
    16-bit path runs the call (see ``_fp8_through_16_bit``). Needs a kernel head dim (``HEAD_DIMS``) and, on CUDA,
    compute capability >= 8.9.
    """
    validate_attention_args(
        q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, scale, extra_mask, return_lse,
        k_cache_scale, v_cache_scale,
    )  # fmt: skip
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = _CACHED_KV_ATTENTION(
        q, k_new, v_new, k_cache, v_cache, idx, k_extra, v_extra, extra_mask, float(scale), return_lse,
        k_cache_scale, v_cache_scale,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v with grouped-query heads, no cache: the same kernel as :func:`cached_kv_attention`.

    q [B, Lq, Hq, d]; k/v [B, L, Hkv, d] (L >= 1); result [B, Lq, Hq, d] contiguous. ``key_mask``: optional [B, L]
    bool, False hides that key from every query; a query that sees no key at all gets zeros (and lse -inf).
    ``scale`` defaults to 1 / sqrt(d); ``return_lse`` also returns [B, Hq, Lq] fp32 (natural log). Head dims and
    backends as for :func:`cached_kv_attention`.
    """
    validate_plain_attention_args(q, k, v, key_mask, scale, return_lse)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = _FLASH_ATTENTION(q, k, v, key_mask, float(scale), return_lse)
    return (out, lse) if return_lse else out
