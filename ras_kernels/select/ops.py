"""Public ``select_regions``: validation, the Triton launchers, the op definition."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._backend import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    RASOp,
    cdiv,
    check_int,
    check_no_overlap,
    check_tensor,
    next_pow2,
)
from . import reference

METRICS = ("std", "l2", "random", "delta", "attention")
MODES = ("reference", "paper")
# The largest N the Triton path takes: 2**17 covers Wan 720p (21 x 45 x 80 = 75,600 tokens). One program per row;
# above 16384 keys the radix select re-reads the row from L2 in 16384-key chunks (N = 2**17: 8 chunks), and the
# launch configuration of every N in (2**16, 2**17] equals that of N = 2**16 apart from that chunk count and the
# compaction grid. The packed counts in the kernels would allow 2**21 - 1; larger rows are untested (and slower).
MAX_TRITON_TOKENS = 1 << 17
_PATCH_NAMES = {4: "(ph, pw)", 5: "(pt, ph, pw)"}
_GRID_NAMES = {4: "(H, W)", 5: "(T, H, W)"}
_TENSOR_ARGS = {  # the tensors metrics "delta" and "attention" need, as their refusals describe them
    ("delta", "previous"): "the signal observed at the previous call (the signal's shape, dtype and device)",
    ("delta", "scores"): (
        "a [B, N] float32 tensor on the signal's device (each token's last observed change, updated in place)"
    ),
    ("attention", "scores"): "a [B, N] float32 tensor on the signal's device (each token's score, read only)",
}


def _check_patch(ndim: int, patch_size: object) -> tuple[int, ...]:
    """The patch sizes of a signal of rank ``ndim`` (4 or 5), one per grid dimension; raises naming patch_size."""
    names = _PATCH_NAMES[ndim]
    if isinstance(patch_size, (tuple, list)):
        if len(patch_size) != ndim - 2:
            raise ValueError(
                f"patch_size must have {ndim - 2} entries {names} for a {ndim}-D signal, got {tuple(patch_size)}"
            )
        return tuple(check_int(f"patch_size[{i}]", v, 1) for i, v in enumerate(patch_size))
    if ndim == 4 and not isinstance(patch_size, bool) and isinstance(patch_size, int):
        check_int("patch_size", patch_size, 1)
        return (patch_size, patch_size)
    accepted = "an int or a (ph, pw) tuple" if ndim == 4 else "a (pt, ph, pw) tuple"
    raise TypeError(
        f"patch_size must be {accepted} of ints for a {ndim}-D signal, got {type(patch_size).__name__} {patch_size!r}"
    )


def validate_select_args(
    signal,
    num_active,
    patch_size,
    metric,
    counters,
    starvation_scale,
    mode,
    high_ratio,
    shards=1,
    seed=None,
    previous=None,
    scores=None,
) -> int:
    """Check every argument of :func:`select_regions`; return the token count N."""
    check_tensor("signal", signal)
    if signal.dim() not in (4, 5):
        raise ValueError(
            f"signal must have 4 dimensions [B, C, H, W] or 5 [B, C, T, H, W], got shape {tuple(signal.shape)}"
        )
    check_tensor("signal", signal, dtypes=FLOAT_DTYPES)
    b, c = signal.shape[:2]
    if c < 1:
        raise ValueError(f"signal must have at least one channel, got shape {tuple(signal.shape)}")
    patch = _check_patch(signal.dim(), patch_size)
    grid = tuple(signal.shape[2:])
    if any(size % p for size, p in zip(grid, patch, strict=True)):
        raise ValueError(f"signal size {_GRID_NAMES[signal.dim()]} = {grid} must be divisible by patch_size {patch}")
    n = math.prod([size // p for size, p in zip(grid, patch, strict=True)])  # a list: dynamo traces it
    if n == 0:
        raise ValueError(f"signal has no tokens (shape {tuple(signal.shape)})")
    check_int("num_active", num_active, 1, n)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "std" and c < 2:
        raise ValueError(f"metric='std' needs at least 2 channels (unbiased std), signal has C={c}")
    if metric == "random":
        if seed is None:
            raise ValueError(
                "metric='random' needs seed: a [1] int64 tensor on the signal's device (advanced in place)"
            )
        check_tensor("seed", seed, dtypes=(torch.int64,), device=signal.device)
        if tuple(seed.shape) != (1,):
            raise ValueError(f"seed must have shape (1,), got {tuple(seed.shape)}")
    elif seed is not None:
        raise ValueError(f"seed is used only with metric='random', got metric={metric!r} and a seed")
    for name, t, users in (("previous", previous, ("delta",)), ("scores", scores, ("delta", "attention"))):
        if metric in users and t is None:
            raise ValueError(f"metric={metric!r} needs {name}: {_TENSOR_ARGS[metric, name]}")
        if metric not in users and t is not None:
            accepted = " or ".join(map(repr, users))
            raise ValueError(f"{name} is used only with metric={accepted}, got metric={metric!r} and a {name} tensor")
    if metric == "delta":
        check_tensor("previous", previous, dtypes=(signal.dtype,), device=signal.device)
        if previous.shape != signal.shape:
            raise ValueError(
                f"previous must have the signal's shape {tuple(signal.shape)}, got {tuple(previous.shape)}"
            )
    if scores is not None:
        check_tensor("scores", scores, ndim=2, dtypes=(torch.float32,), device=signal.device)
        if tuple(scores.shape) != (b, n):
            raise ValueError(f"scores must have shape (B, N) = ({b}, {n}), got {tuple(scores.shape)}")
        check_no_overlap("scores", scores)
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
    check_int("shards", shards, 1)
    if n % shards or num_active % shards:
        raise ValueError(
            f"shards={shards} must divide both the token count N={n} and num_active={num_active} (every shard keeps "
            "the same number of its own tokens)"
        )
    if shards > 1 and counters is not None and counters.shape[0] > 1 and counters.stride(0) != n * counters.stride(1):
        raise ValueError(
            f"with shards > 1, counters must be viewable as [B * shards, N / shards] (batch stride N x token stride), "
            f"got strides {tuple(counters.stride())}"
        )
    return n


# The split radix select (band_pass_kernel): each row over 2048-key programs, one launch per 8-bit digit. Rows of
# SPLIT_FROM keys or more take it (select_tuning): on the H200 the whole op took 0.058 ms at N = 75,600 (Wan 720p)
# against 0.194 ms for one program re-reading the row every pass, and 0.044 against 0.053 ms at N = 16384
# (docs/benchmarks.md, session 19).
SPLIT_TUNING = {"split_block": 2048, "bits": 8, "warps": 8}
SPLIT_FROM = 16384


def select_tuning(num_tokens: int) -> dict:
    """Launch parameters of the selection kernels for rows of ``num_tokens`` keys (shape-only, host side).

    Bounds: rows of SPLIT_FROM keys or more split over programs of SPLIT_TUNING["split_block"] keys (one launch
    per digit); shorter rows take one program per row with up to 16 warps, up to 32 keys per thread held in
    registers across the radix passes (``chunk``: the part of a row one pass reads at a time). Compaction: about 8
    programs per row (each re-counts the blocks before its own, so fewer, larger blocks keep that loop short).
    """
    block = max(next_pow2(num_tokens), 16)
    out_block = min(max(1024, block // 8), 8192)
    cfg = {
        "split_block": 0,
        "bits": 4,
        "warps": min(16, max(4, block // 256)),
        "chunk": min(block, 16384),
        "out_block": out_block,
        "out_warps": min(16, max(4, out_block // 256)),
    }
    if num_tokens >= SPLIT_FROM:
        cfg.update(SPLIT_TUNING)
    return cfg


def launch_select(
    signal: torch.Tensor,
    counters: torch.Tensor | None,
    num_active: int,
    rank_lo: int,
    patch_size: int | Sequence[int],
    use_l2: bool,
    signed_scale: float,
    tuning: dict | None = None,
    shards: int = 1,
    seed: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the selection kernels on validated arguments; returns [B, num_active] int64 indices, ascending.

    ``signal`` [B, C, H, W] with ``patch_size`` p or (ph, pw), or [B, C, T, H, W] with (pt, ph, pw): the kernels
    read either through a [B, C, T, H, W] view (strides only, never a copy).
    ``tuning`` overrides entries of :func:`select_tuning` (the benchmark compares variants with it).
    ``seed`` ([1] int64): metric ``random`` (``use_l2`` is then ignored and the signal gives only the shapes); it
    is read by the score kernel and then incremented in place (a device op, no host sync).
    ``previous`` (the signal's shape) and ``scores`` ([B, N] fp32): metric ``delta`` (with ``use_l2``): the score
    kernel reads the change from ``previous``, carries ``scores`` over where it is 0 and writes them back in place.
    ``scores`` without ``previous``: metric ``attention``, R is read from ``scores`` (never written; ``use_l2`` is
    ignored and the signal gives only the shapes).
    Launches on the current device (the op runs it under the signal's device).
    """
    from . import kernels

    x, (pt, ph, pw) = reference.as_video(signal, patch_size)
    prev = x if previous is None else reference.as_video(previous, patch_size)[0]  # never read without previous
    b, c, t, h, w = x.shape
    ht, wt = h // ph, w // pw
    n = (t // pt) * ht * wt
    keys = torch.empty((b, n), dtype=torch.int32, device=signal.device)
    pv2 = next_pow2(pt * ph * pw)
    attention = scores is not None and previous is None
    reads_signal = seed is None and not attention
    # 256 voxels per program (2 per thread), all channels of a voxel in one thread; random / attention: 256 tokens.
    block_t = max(1, min(256 // pv2 if reads_signal else 256, next_pow2(n)))
    kernels.region_keys_kernel[(cdiv(n, block_t), b)](
        keys_ptr=keys,
        scores_ptr=scores if scores is not None else keys,  # never touched unless DELTA or ATTENTION
        x_ptr=x,
        prev_ptr=prev,
        counters_ptr=counters if counters is not None else keys,  # never read when HAS_COUNTERS is False
        seed_ptr=seed if seed is not None else keys,  # never read when RANDOM is False
        stride_keys_b=keys.stride(0),
        stride_scores_b=scores.stride(0) if scores is not None else 0,
        stride_scores_n=scores.stride(1) if scores is not None else 0,
        stride_x_b=x.stride(0),
        stride_x_c=x.stride(1),
        stride_x_t=x.stride(2),
        stride_x_h=x.stride(3),
        stride_x_w=x.stride(4),
        stride_prev_b=prev.stride(0),
        stride_prev_c=prev.stride(1),
        stride_prev_t=prev.stride(2),
        stride_prev_h=prev.stride(3),
        stride_prev_w=prev.stride(4),
        stride_counters_b=counters.stride(0) if counters is not None else 0,
        stride_counters_n=counters.stride(1) if counters is not None else 0,
        C=c,
        N=n,
        HT=ht,
        WT=wt,
        signed_scale=signed_scale,
        PT=pt,
        PH=ph,
        PW=pw,
        PV2=pv2,
        BLOCK_T=block_t,
        L2=use_l2,
        RANDOM=seed is not None,
        DELTA=previous is not None,
        ATTENTION=attention,
        C_BLOCK=min(c, 16),
        HAS_COUNTERS=counters is not None,
        num_warps=4,
    )
    if seed is not None:
        seed.add_(1)  # after the score kernel read it (same stream); capturable
    if shards == 1:
        return launch_band(keys, counters, num_active, rank_lo, tuning)
    # Per shard: each run of N / shards tokens is a row of its own for the band stage (rank_lo is the run's).
    run = n // shards
    runs = counters.view(b * shards, run) if counters is not None else None
    local = launch_band(keys.view(b * shards, run), runs, num_active // shards, rank_lo, tuning)
    offsets = torch.arange(0, n, run, device=keys.device).repeat(b).unsqueeze(1)
    return (local + offsets).view(b, num_active)


def launch_band(
    keys: torch.Tensor,
    counters: torch.Tensor | None,
    num_active: int,
    rank_lo: int,
    tuning: dict | None = None,
) -> torch.Tensor:
    """The selection stage alone: the tokens at ranks [rank_lo, rank_lo + num_active) of each row of ``keys``.

    keys: [B, N] int32 holding uint32 sort keys (ascending key, then ascending index); counters as in
    :func:`launch_select` (+1 where dropped). Returns [B, num_active] int64 indices, ascending. Split from the
    score stage so that tests can drive the radix select at the largest N with chosen keys (ties included).
    Launches on the current device.
    """
    from . import kernels

    b, n = keys.shape
    state = torch.empty((b, 8), dtype=torch.int32, device=keys.device)
    out = torch.empty((b, num_active), dtype=torch.int64, device=keys.device)
    cfg = select_tuning(n)
    cfg.update(tuning or {})
    if cfg["split_block"]:
        passes = 32 // cfg["bits"]
        hist = torch.zeros((b, passes, 2 << cfg["bits"]), dtype=torch.int32, device=keys.device)
        for pass_index in range(passes + 1):  # the last launch only writes the bounds
            kernels.band_pass_kernel[(cdiv(n, cfg["split_block"]) if pass_index < passes else 1, b)](
                state_ptr=state,
                hist_ptr=hist,
                keys_ptr=keys,
                stride_state_b=state.stride(0),
                stride_hist_b=hist.stride(0),
                stride_keys_b=keys.stride(0),
                N=n,
                rank_lo=rank_lo,
                rank_hi=rank_lo + num_active - 1,
                pass_index=pass_index,
                BITS=cfg["bits"],
                BLOCK=cfg["split_block"],
                num_warps=cfg["warps"],
            )
    else:
        kernels.band_bounds_kernel[(b,)](
            state_ptr=state,
            keys_ptr=keys,
            stride_state_b=state.stride(0),
            stride_keys_b=keys.stride(0),
            N=n,
            rank_lo=rank_lo,
            rank_hi=rank_lo + num_active - 1,
            CHUNK=cfg["chunk"],
            NUM_CHUNKS=cdiv(n, cfg["chunk"]),
            BITS=cfg["bits"],
            num_warps=cfg["warps"],
        )
    kernels.band_compact_kernel[(cdiv(n, cfg["out_block"]), b)](
        out_ptr=out,
        counters_ptr=counters if counters is not None else keys,  # never touched when HAS_COUNTERS is False
        keys_ptr=keys,
        state_ptr=state,
        stride_out_b=out.stride(0),
        stride_counters_b=counters.stride(0) if counters is not None else 0,
        stride_counters_n=counters.stride(1) if counters is not None else 0,
        stride_keys_b=keys.stride(0),
        stride_state_b=state.stride(0),
        N=n,
        HAS_COUNTERS=counters is not None,
        BLOCK=cfg["out_block"],
        num_warps=cfg["out_warps"],
    )
    return out


def _launch(
    signal: torch.Tensor,
    num_active: int,
    patch_size: list[int],
    metric: str,
    counters: torch.Tensor | None,
    starvation_scale: float,
    starvation_mode: str,
    high_ratio: float,
    shards: int,
    seed: torch.Tensor | None,
    previous: torch.Tensor | None,
    scores: torch.Tensor | None,
) -> torch.Tensor:
    """The op's Triton path on validated arguments (``patch_size`` one int per grid dimension)."""
    n = math.prod([size // p for size, p in zip(signal.shape[2:], patch_size, strict=True)])
    if n > MAX_TRITON_TOKENS:  # checked before anything is allocated or launched
        raise ValueError(
            f"the Triton select_regions supports N <= {MAX_TRITON_TOKENS} tokens, got N={n}; "
            "use a larger patch_size or RAS_BACKEND=torch"
        )
    if signal.shape[0] == 0:
        if seed is not None:
            seed.add_(1)  # every call advances the seed, as the public function does for an empty batch
        return torch.empty((0, num_active), dtype=torch.int64, device=signal.device)
    sign = 1.0 if starvation_mode == "reference" else -1.0
    rank_lo = reference.band_start(n // shards, num_active // shards, high_ratio)
    return launch_select(
        signal,
        counters,
        num_active,
        rank_lo,
        patch_size,
        metric in ("l2", "delta"),
        sign * starvation_scale,
        shards=shards,
        seed=seed if metric == "random" else None,
        previous=previous if metric == "delta" else None,
        scores=scores if metric in ("delta", "attention") else None,
    )


def _reference(
    signal: torch.Tensor,
    num_active: int,
    patch_size: list[int],
    metric: str,
    counters: torch.Tensor | None,
    starvation_scale: float,
    starvation_mode: str,
    high_ratio: float,
    shards: int,
    seed: torch.Tensor | None,
    previous: torch.Tensor | None,
    scores: torch.Tensor | None,
) -> torch.Tensor:
    """The reference, taking the schema's argument names."""
    return reference.select_regions(
        signal,
        num_active,
        patch_size=patch_size,
        metric=metric,
        counters=counters,
        starvation_scale=starvation_scale,
        mode=starvation_mode,
        high_ratio=high_ratio,
        shards=shards,
        seed=seed,
        previous=previous,
        scores=scores,
    )


def _fake(
    signal,
    num_active,
    patch_size,
    metric,
    counters,
    starvation_scale,
    starvation_mode,
    high_ratio,
    shards,
    seed,
    previous,
    scores,
):
    return signal.new_empty((signal.shape[0], num_active), dtype=torch.int64)


# No defaults in the schema: torch 2.11's ADInplaceOrView kernel indexes mutated arguments by position, so a
# mutable argument left to its default (seed, scores) is out of range on CUDA: every call passes every argument.
# The public ``mode`` is ``starvation_mode`` in the schema: an op argument named ``mode`` collides with the
# ``mode`` parameter of torch.compile's redirect_to_mode ("got multiple values for argument 'mode'").
_SELECT = RASOp(
    "select_regions",
    schema=(
        "(Tensor signal, int num_active, int[] patch_size, str metric, Tensor(a!)? counters, float starvation_scale, "
        "str starvation_mode, float high_ratio, int shards, Tensor(b!)? seed, Tensor? previous, Tensor(c!)? scores) "
        "-> Tensor"
    ),
    launch=_launch,
    reference=_reference,
    fake=_fake,
    mutates_args=("counters", "seed", "scores"),
    # No differentiable inputs: the indices have no gradient on either path, so a signal requiring grad is fine.
)


def select_regions(
    signal: torch.Tensor,
    num_active: int,
    *,
    patch_size: int | Sequence[int] = 2,
    metric: str = "std",
    counters: torch.Tensor | None = None,
    starvation_scale: float = 0.1,
    mode: str = "reference",
    high_ratio: float = 1.0,
    shards: int = 1,
    seed: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose the ``num_active`` patch tokens each sample recomputes at the next RAS step.

    Args:
        signal: the guided model output of the step just taken: an image [B, C, H, W] or a video
            [B, C, T, H, W] (float32 / bfloat16 / float16, any strides).
        num_active: K, the number of tokens to keep, 1 <= K <= N (the token count below).
        patch_size: an image's patch, an int p (p x p) or a tuple (ph, pw); a video's, a tuple (pt, ph, pw)
            (an int is refused for a video: (1, p, p) and (p, p, p) are both plausible). Every size of the signal's
            grid must be divisible by its patch size. Tokens are the patches in row-major order: (h, w) for an
            image, N = (H / ph) * (W / pw); (t, h, w) for a video, N = (T / pt) * (H / ph) * (W / pw), the order of a
            Conv3d patch embedding followed by ``flatten(2)`` (diffusers' Wan). Token t covers its patch's latent
            pixels (voxels).
        metric: ``"std"`` (unbiased channel std per pixel, C >= 2) or ``"l2"`` (channel L2 norm per pixel); the
            score R of a token is the mean over its pixels. ``"random"``: R is a uniform pseudo-random number in
            [0, 1) per (sample, token), drawn afresh at every call from ``seed`` (a counter-based hash,
            ``reference.random_scores``; the signal's values are not read, it gives B and N). ``"delta"``: R is
            the token's change, the mean over its pixels of the channel L2 norm of ``signal - previous`` (fp32); a
            token whose change is exactly 0 (not recomputed: its signal equals ``previous`` bit for bit) keeps its
            last observed change from ``scores``, and the resulting R is written back into ``scores``.
            ``"attention"``: R is the token's entry of ``scores``, a score the caller computed (``RASSession``: the
            token's attention log-sum-exp, mean over heads, summed over the step's layers; any sign); the signal's
            values are not read, it gives B and N.
        counters: optional [B, N] int32/int64 starvation counts D, updated in place (+1 for every dropped token).
        starvation_scale: k >= 0 in the priority ``R * exp(+-k D)``.
        mode: ``"reference"`` (``exp(+k D)``, the public code's rule) or ``"paper"`` (``exp(-k D)``).
        high_ratio: share in [0, 1] of the dropped tokens taken from the highest priorities; the rest
            come from the lowest, and the K tokens in between stay active.
        shards: P >= 1 dividing N and K: the tokens form P consecutive runs of N / P (token order) and each keeps
            K / P of its own by the same rule (band included), the choice P ranks of a sequence-parallel run make
            from their own shards; 1 selects over the whole sequence.
        seed: metric ``"random"`` only (required there, refused otherwise): a [1] int64 tensor on the signal's
            device. Its low and high 32 bits key the draw; it is read on the device (no host sync) and then
            incremented in place by 1, so the next call (or a CUDA-graph replay) draws afresh.
        previous: metric ``"delta"`` only (required there, refused otherwise): the signal observed at the previous
            call, with the signal's shape, dtype and device (any strides); read only.
        scores: metric ``"delta"`` or ``"attention"`` only (required there, refused otherwise): [B, N] float32 on the
            signal's device (any strides, no two elements sharing memory). ``"delta"``: each token's last observed
            change (zeros at the start), read and updated in place (the R above, before the starvation factor).
            ``"attention"``: each token's R, read only.

    Returns:
        [B, K] int64 token indices, ascending. Equal priorities rank by token index (stable sort).

    The Triton path (CUDA tensors) is three launches (and ``seed.add_(1)`` for ``"random"``; ``"delta"`` writes
    ``scores`` in the first) without host synchronisation, so it can be captured in a CUDA graph; it reads every
    accepted signal rank, layout and patch shape in place (no copy) and supports N <= 131072
    (``MAX_TRITON_TOKENS``). The selection is not differentiable on either path (integer indices), so a ``signal``
    that requires grad is fine.
    """
    validate_select_args(
        signal,
        num_active,
        patch_size,
        metric,
        counters,
        starvation_scale,
        mode,
        high_ratio,
        shards,
        seed,
        previous,
        scores,
    )
    if signal.shape[0] == 0:  # no sample (the reference cannot reshape an empty batch)
        if seed is not None:
            seed.add_(1)  # every call advances the seed
        return torch.empty((0, num_active), dtype=torch.int64, device=signal.device)
    patch = [patch_size] * 2 if isinstance(patch_size, int) else [int(p) for p in patch_size]  # the op's int[]
    return _SELECT(
        signal,
        num_active,
        patch,
        metric,
        counters,
        float(starvation_scale),
        mode,
        float(high_ratio),
        shards,
        seed,
        previous,
        scores,
    )
