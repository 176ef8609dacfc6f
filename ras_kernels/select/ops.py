"""Public ``select_regions``: validation, the Triton launcher and its torch.library op, backend dispatch."""

from __future__ import annotations

import math

import torch

from .._backend import FLOAT_DTYPES, INDEX_DTYPES, check_no_overlap, check_tensor, device_of, use_triton
from . import reference

try:
    import triton
    from torch.library import triton_op, wrap_triton

    from . import kernels
except ImportError:  # the reference path still works without Triton
    triton = None

METRICS = ("std", "l2")
MODES = ("reference", "paper")
# The size the Triton path is tuned and tested for (one program per row; its packed counters would allow 2**21 - 1).
MAX_TRITON_TOKENS = 65536


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {accepted}, got {value}")
    return value


def validate_select_args(signal, num_active, patch_size, metric, counters, starvation_scale, mode, high_ratio) -> int:
    """Check every argument of :func:`select_regions`; return the token count N."""
    check_tensor("signal", signal, ndim=4, dtypes=FLOAT_DTYPES)
    b, c, h, w = signal.shape
    if c < 1:
        raise ValueError(f"signal must have at least one channel, got shape {tuple(signal.shape)}")
    _check_int("patch_size", patch_size, 1)
    if h % patch_size or w % patch_size:
        raise ValueError(f"signal height and width ({h}, {w}) must be divisible by patch_size={patch_size}")
    n = (h // patch_size) * (w // patch_size)
    if n == 0:
        raise ValueError(f"signal has no tokens (shape {tuple(signal.shape)})")
    _check_int("num_active", num_active, 1, n)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "std" and c < 2:
        raise ValueError(f"metric='std' needs at least 2 channels (unbiased std), signal has C={c}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(high_ratio, (int, float)) or isinstance(high_ratio, bool) or not 0.0 <= high_ratio <= 1.0:
        raise ValueError(f"high_ratio must be a float in [0, 1], got {high_ratio!r}")
    if (
        not isinstance(starvation_scale, (int, float))
        or isinstance(starvation_scale, bool)
        or not math.isfinite(starvation_scale)
        or starvation_scale < 0
    ):
        raise ValueError(f"starvation_scale must be a finite float >= 0, got {starvation_scale!r}")
    if counters is not None:
        check_tensor("counters", counters, ndim=2, dtypes=INDEX_DTYPES, device=signal.device)
        if tuple(counters.shape) != (b, n):
            raise ValueError(f"counters must have shape (B, N) = ({b}, {n}), got {tuple(counters.shape)}")
        check_no_overlap("counters", counters)
    return n


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def select_tuning(num_tokens: int) -> dict:
    """Launch parameters of the two selection kernels for rows of ``num_tokens`` keys (shape-only, host side).

    Bounds: one program per row with up to 16 warps; up to 32 keys per thread stay in registers across the
    radix passes, longer rows are re-read from L2 in chunks of 16384 each pass. Compaction: about 8 programs per
    row (each re-counts the blocks before its own, so fewer, larger blocks keep that loop short).
    """
    block = max(_next_pow2(num_tokens), 16)
    out_block = min(max(1024, block // 8), 8192)
    return {
        "bits": 4,
        "warps": min(16, max(4, block // 256)),
        "chunk": min(block, 16384),
        "out_block": out_block,
        "out_warps": min(16, max(4, out_block // 256)),
    }


def launch_select(
    signal: torch.Tensor,
    counters: torch.Tensor | None,
    num_active: int,
    rank_lo: int,
    patch_size: int,
    use_l2: bool,
    signed_scale: float,
    tuning: dict | None = None,
    traceable: bool = True,
) -> torch.Tensor:
    """Launch the three kernels on validated arguments; returns [B, num_active] int64 indices, ascending.

    ``tuning`` overrides entries of :func:`select_tuning` (the benchmark compares variants with it).
    ``traceable`` wraps the kernels with ``wrap_triton`` (needed under torch.compile / make_fx tracing);
    plain eager calls launch them directly, which skips the higher-order-op dispatch.
    """
    wrap = wrap_triton if traceable else (lambda kernel: kernel)
    b, c, h, w = signal.shape
    p = patch_size
    wt = w // p
    n = (h // p) * wt
    dev = signal.device
    keys = torch.empty((b, n), dtype=torch.int32, device=dev)
    state = torch.empty((b, 8), dtype=torch.int32, device=dev)
    out = torch.empty((b, num_active), dtype=torch.int64, device=dev)
    cnt = counters if counters is not None else keys  # a dummy pointer when HAS_COUNTERS is off
    cnt_strides = (counters.stride(0), counters.stride(1)) if counters is not None else (0, 0)

    with device_of(signal):  # Triton launches on the current device, not necessarily the tensors' one
        p2 = _next_pow2(p * p)
        # 256 pixels per program (2 per thread), all channels of a pixel in one thread.
        block_t = max(1, min(256 // p2, _next_pow2(n)))
        wrap(kernels.region_keys_kernel)[(triton.cdiv(n, block_t), b)](
            signal,
            cnt,
            keys,
            signal.stride(0),
            signal.stride(1),
            signal.stride(2),
            signal.stride(3),
            cnt_strides[0],
            cnt_strides[1],
            keys.stride(0),
            c,
            n,
            wt,
            signed_scale,
            P=p,
            P2=p2,
            BLOCK_T=block_t,
            L2=use_l2,
            C_BLOCK=min(c, 16),
            HAS_COUNTERS=counters is not None,
            num_warps=4,
        )

        cfg = select_tuning(n)
        cfg.update(tuning or {})
        wrap(kernels.band_bounds_kernel)[(b,)](
            keys,
            state,
            keys.stride(0),
            state.stride(0),
            n,
            rank_lo,
            rank_lo + num_active - 1,
            CHUNK=cfg["chunk"],
            NUM_CHUNKS=triton.cdiv(n, cfg["chunk"]),
            BITS=cfg["bits"],
            num_warps=cfg["warps"],
        )
        wrap(kernels.band_compact_kernel)[(triton.cdiv(n, cfg["out_block"]), b)](
            keys,
            state,
            cnt,
            out,
            keys.stride(0),
            state.stride(0),
            cnt_strides[0],
            cnt_strides[1],
            out.stride(0),
            n,
            HAS_COUNTERS=counters is not None,
            BLOCK=cfg["out_block"],
            num_warps=cfg["out_warps"],
        )
    return out


if triton is not None:
    # triton_op keeps both kernels visible to torch.compile and CUDA graph capture; in eager mode (also on CPU
    # tensors under TRITON_INTERPRET=1) it simply runs the function below.
    @triton_op("ras_kernels::select_regions", mutates_args={"counters"})
    def _select_regions_op(
        signal: torch.Tensor,
        counters: torch.Tensor | None,
        num_active: int,
        rank_lo: int,
        patch_size: int,
        use_l2: bool,
        signed_scale: float,
    ) -> torch.Tensor:
        return launch_select(signal, counters, num_active, rank_lo, patch_size, use_l2, signed_scale)


def select_regions(
    signal: torch.Tensor,
    num_active: int,
    *,
    patch_size: int = 2,
    metric: str = "std",
    counters: torch.Tensor | None = None,
    starvation_scale: float = 0.1,
    mode: str = "reference",
    high_ratio: float = 1.0,
) -> torch.Tensor:
    """Choose the ``num_active`` patch tokens each sample recomputes at the next RAS step.

    Args:
        signal: [B, C, H, W] float tensor, the guided model output of the step just taken.
        num_active: K, the number of tokens to keep, 1 <= K <= N = (H / patch_size) * (W / patch_size).
        patch_size: p; token t covers the p x p latent pixels of patch t in row-major patch order.
        metric: ``"std"`` (unbiased channel std per pixel) or ``"l2"`` (channel L2 norm per pixel).
        counters: optional [B, N] int32/int64 starvation counts D, updated in place (+1 for every dropped token).
        starvation_scale: k >= 0 in the priority ``R * exp(+-k D)``.
        mode: ``"reference"`` (``exp(+k D)``, the public code's rule) or ``"paper"`` (``exp(-k D)``).
        high_ratio: share in [0, 1] of the dropped tokens taken from the highest priorities; the rest
            come from the lowest, and the K tokens in between stay active.

    Returns:
        [B, K] int64 token indices, ascending. Equal priorities rank by token index (stable sort).

    The Triton path (CUDA tensors) is three launches without host synchronisation, so it can be captured in a
    CUDA graph; it supports N <= 65536. The selection is not differentiable on either path (integer indices), so a
    ``signal`` that requires grad is fine.
    """
    n = validate_select_args(signal, num_active, patch_size, metric, counters, starvation_scale, mode, high_ratio)
    if signal.shape[0] == 0:
        return torch.empty((0, num_active), dtype=torch.int64, device=signal.device)
    # No autograd inputs: the indices have no gradient on either path.
    if use_triton("select_regions", signal.device, {}):
        if n > MAX_TRITON_TOKENS:
            raise ValueError(
                f"the Triton select_regions supports N <= {MAX_TRITON_TOKENS} tokens, got N={n}; "
                "use a larger patch_size or RAS_BACKEND=torch"
            )
        sign = 1.0 if mode == "reference" else -1.0
        args = (
            signal,
            counters,
            num_active,
            reference.band_start(n, num_active, float(high_ratio)),
            patch_size,
            metric == "l2",
            sign * float(starvation_scale),
        )
        if torch.compiler.is_compiling():
            return torch.ops.ras_kernels.select_regions(*args)
        # Eager (CUDA graph capture included): the same kernels without the custom-op dispatch cost.
        return launch_select(*args, traceable=False)
    return reference.select_regions(
        signal,
        num_active,
        patch_size=patch_size,
        metric=metric,
        counters=counters,
        starvation_scale=float(starvation_scale),
        mode=mode,
        high_ratio=float(high_ratio),
    )
