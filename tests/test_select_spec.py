"""Region selection against the spec written out literally (Python loops, float64).

Images (spec section 4) on the torch path; videos (section 8: [B, C, T, H, W] with a (pt, ph, pw) patch, tokens in
row-major (t, h, w) order) and rectangular image patches on both paths, on odd token grids.
"""

from __future__ import annotations

import math

import pytest
import torch

from ras_kernels import select_regions

from ._utils import TRITON_RUNNABLE


def literal_select(signal, k, patch, metric, counters, scale, mode, high_ratio):
    """Spec sections 4 and 8, one token at a time, on a video [B, C, T, H, W] with patch (pt, ph, pw) (an image is
    the video with T = 1 and pt = 1). Returns (sorted active indices [B, K], updated counters or None)."""
    b, c, t, h, w = signal.shape
    pt, ph, pw = patch
    x = signal.double().tolist()  # x[sample][channel][t][h][w]
    sign = 1 if mode == "reference" else -1
    out, new_counters = [], None if counters is None else counters.clone()
    for s in range(b):
        prio = []  # appended in token order: t-major, then h, then w
        for tz in range(t // pt):
            for ty in range(h // ph):
                for tx in range(w // pw):
                    vals = []
                    for zz in range(tz * pt, tz * pt + pt):
                        for yy in range(ty * ph, ty * ph + ph):
                            for xx in range(tx * pw, tx * pw + pw):
                                ch = [x[s][ci][zz][yy][xx] for ci in range(c)]
                                if metric == "std":
                                    mean = sum(ch) / c
                                    vals.append(math.sqrt(sum((v - mean) ** 2 for v in ch) / (c - 1)))
                                else:
                                    vals.append(math.sqrt(sum(v * v for v in ch)))
                    r = sum(vals) / len(vals)
                    d = 0 if counters is None else counters[s, len(prio)].item()
                    prio.append(r * math.exp(sign * scale * d))
        n = len(prio)
        ranked = sorted(range(n), key=lambda i: (prio[i], i))
        skip = n - k
        low = int(skip * (1 - high_ratio))
        active = sorted(ranked[low : low + k])
        out.append(active)
        if counters is not None:
            for i in range(n):
                if i not in active:
                    new_counters[s, i] += 1
    return torch.tensor(out, dtype=torch.int64), new_counters


def check_against_spec(signal, k, patch, metric, counters, scale, mode, high_ratio):
    """select_regions (on the backend in force) against :func:`literal_select` for an image (``patch`` p or
    (ph, pw)) or a video (``patch`` (pt, ph, pw)): the indices, and ``counters`` (if any) updated in place."""
    if signal.dim() == 5:
        video, patch3 = signal, tuple(patch)
    else:
        video, patch3 = signal.unsqueeze(2), (1, patch, patch) if isinstance(patch, int) else (1, *patch)
    expected, expected_counters = literal_select(video, k, patch3, metric, counters, scale, mode, high_ratio)
    got = select_regions(
        signal,
        k,
        patch_size=patch,
        metric=metric,
        counters=counters,
        starvation_scale=scale,
        mode=mode,
        high_ratio=high_ratio,
    )
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), expected)
    if counters is not None:
        assert torch.equal(counters, expected_counters)


CASES = [
    # (B, C, H, W, p, K, metric, mode, high_ratio)
    (2, 4, 8, 8, 2, 5, "std", "reference", 1.0),
    (1, 3, 6, 10, 2, 7, "std", "reference", 0.3),
    (2, 5, 4, 12, 1, 20, "l2", "paper", 0.5),
    (1, 2, 8, 16, 4, 3, "std", "paper", 1.0),
    (2, 4, 8, 8, 4, 1, "l2", "reference", 0.0),
    (1, 4, 8, 8, 2, 16, "std", "reference", 0.3),  # K = N
    (1, 4, 2, 2, 2, 1, "std", "paper", 0.3),  # N = 1
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-{c[7]}-p{c[4]}-K{c[5]}-hr{c[8]}" for c in CASES])
def test_reference_selection_follows_spec(case, torch_backend):
    b, c, h, w, p, k, metric, mode, high_ratio = case
    n = (h // p) * (w // p)
    counters = torch.randint(0, 6, (b, n), dtype=torch.int32)
    for _ in range(3):  # several steps: the counters feed back into the priorities
        check_against_spec(torch.randn(b, c, h, w), k, p, metric, counters, 0.1, mode, high_ratio)


def test_ties_break_by_token_index(torch_backend):
    signal = torch.ones(1, 4, 8, 8)  # every score 0
    got = select_regions(signal, 5, high_ratio=0.5)  # skip 11: drop 5 lowest ranks (indices 0..4) and 6 highest
    assert got.tolist() == [[5, 6, 7, 8, 9]]


def test_starvation_sign_differs_between_modes(torch_backend):
    signal = torch.zeros(1, 2, 2, 4)
    signal[:, 0] = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # equal scores for both tokens
    counters = torch.tensor([[3, 0]])
    ref = select_regions(signal, 1, counters=counters.clone(), mode="reference")
    paper = select_regions(signal, 1, counters=counters.clone(), mode="paper")
    assert ref.tolist() == [[1]]  # exp(+kD) raises the starved token's value: it stays dropped
    assert paper.tolist() == [[0]]  # exp(-kD) lowers it: it comes back


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_active": 0}, ValueError, "num_active"),
        ({"num_active": 17}, ValueError, "num_active"),
        ({"num_active": 2.0}, TypeError, "num_active"),
        ({"patch_size": 3}, ValueError, "patch_size"),
        ({"patch_size": 0}, ValueError, "patch_size"),
        ({"metric": "var"}, ValueError, "metric"),
        ({"mode": "x"}, ValueError, "mode"),
        ({"high_ratio": 1.5}, ValueError, "high_ratio"),
        ({"starvation_scale": -1.0}, ValueError, "starvation_scale"),
        ({"counters": torch.zeros(1, 15, dtype=torch.int32)}, ValueError, "counters"),
        ({"counters": torch.zeros(1, 16)}, TypeError, "counters"),
    ],
)
def test_invalid_arguments_raise(kwargs, exc, match, torch_backend):
    args = {"num_active": 4, **kwargs}
    with pytest.raises(exc, match=match):
        select_regions(torch.randn(1, 4, 8, 8), args.pop("num_active"), **args)


def test_std_needs_two_channels_and_int_signal_rejected(torch_backend):
    with pytest.raises(ValueError, match="channels"):
        select_regions(torch.randn(1, 1, 4, 4), 2)
    with pytest.raises(TypeError, match="signal"):
        select_regions(torch.zeros(1, 4, 4, 4, dtype=torch.int32), 2)


# ------------------------------------------------------------------------------------------ video, both paths
@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", request.param)
    return request.param


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


VIDEO_CASES = [
    # (B, C, token grid, patch, K, metric, mode, high_ratio, counters dtype, signal dtype, channels-last)
    # A 2-entry grid/patch is an image [B, C, H, W] with a rectangular patch (ph, pw).
    (2, 4, (3, 5, 7), (1, 2, 2), 40, "std", "reference", 0.3, torch.int32, torch.float32, False),  # Wan's patch
    (1, 3, (3, 5, 7), (2, 1, 1), 1, "std", "paper", 1.0, torch.int64, torch.float32, True),
    (3, 5, (3, 5, 7), (2, 3, 2), 104, "l2", "reference", 0.0, torch.int32, torch.float32, False),  # K = N - 1
    (2, 2, (5, 3, 1), (3, 1, 2), 15, "std", "paper", 0.5, torch.int64, torch.float32, True),  # K = N
    (1, 16, (1, 5, 7), (1, 1, 1), 17, "l2", "paper", 0.3, None, torch.float32, False),
    (2, 6, (7, 1, 3), (1, 3, 3), 10, "std", "reference", 1.0, torch.int32, torch.bfloat16, True),
    (1, 3, (1, 1, 1), (2, 2, 2), 1, "std", "reference", 0.3, torch.int64, torch.float32, False),  # N = 1
    (2, 4, (5, 7), (1, 3), 12, "std", "reference", 0.3, torch.int32, torch.float32, True),  # image, 1 x 3 patches
    (1, 3, (3, 5), (3, 2), 7, "l2", "paper", 1.0, torch.int64, torch.float16, False),  # image, 3 x 2 patches
]


def _case_id(case):
    b, c, grid, patch, k, metric, mode, hr, cnt, dtype, last = case
    dims = "x".join(map(str, grid))
    return f"B{b}-C{c}-grid{dims}-p{''.join(map(str, patch))}-K{k}-{metric}-{mode}-hr{hr}-{str(dtype)[6:]}" + (
        "-cl" if last else ""
    )


@pytest.mark.parametrize("case", VIDEO_CASES, ids=[_case_id(c) for c in VIDEO_CASES])
def test_video_selection_follows_spec(case, backend):
    """Random signals, three steps with the counters carried over (in place), on odd token grids."""
    b, c, grid, patch, k, metric, mode, high_ratio, cnt_dtype, dtype, channels_last = case
    dev = _device(backend)
    size = tuple(g * p for g, p in zip(grid, patch, strict=True))
    n = math.prod(grid)
    counters = None if cnt_dtype is None else torch.randint(0, 6, (b, n), dtype=cnt_dtype, device=dev)
    for _ in range(3):
        if channels_last:  # channels innermost in memory: the layout a [B, T, H, W, C] tensor permuted gives
            signal = torch.randn(b, *size, c, device=dev).to(dtype).movedim(-1, 1)
        else:
            signal = torch.randn(b, c, *size, device=dev).to(dtype)
        check_against_spec(signal, k, patch, metric, counters, 0.5, mode, high_ratio)


@pytest.mark.parametrize("metric", ["std", "l2"])
@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_video_exact_ties_break_by_token_index(metric, mode, backend):
    """Tokens of three groups whose voxel scores are exact in binary floating point: every voxel of a group-g token
    has the channels (m + a_g, m, m - a_g) (std a_g) or (3 a_g, 4 a_g, 0) (L2 norm 5 a_g) in a random order, m a
    random multiple of 1/4; with counters 0/1 that makes large groups of exactly equal priorities, so the tie rule
    (lower token index first) decides which members of a group straddling a band boundary are active."""
    b, grid, patch = 2, (3, 5, 7), (1, 2, 2)
    dev = _device(backend)
    n = math.prod(grid)
    size = tuple(g * p for g, p in zip(grid, patch, strict=True))
    scales = torch.tensor([0.5, 1.0, 2.0])
    which = torch.randint(0, 3, (b, *grid))
    a = scales[which]
    for dim, p in zip((1, 2, 3), patch, strict=True):
        a = a.repeat_interleave(p, dim)  # [B, T, H, W]: each voxel's a
    if metric == "std":
        base = torch.tensor([1.0, 0.0, -1.0])
        offset = torch.randint(-8, 9, (b, *size)).float() / 4
    else:
        base = torch.tensor([3.0, 4.0, 0.0])
        offset = torch.zeros(b, *size)
    order = torch.rand(b, *size, 3).argsort(dim=-1)  # a random channel order per voxel
    channels = base[order] * a[..., None] + offset[..., None]  # [B, T, H, W, 3]
    signal = channels.movedim(-1, 1).contiguous().to(dev)
    for k, high_ratio in ((n // 2, 0.3), (5, 1.0), (n - 3, 0.0), (17, 0.5)):
        check_against_spec(signal, k, patch, metric, torch.randint(0, 2, (b, n), device=dev), 0.1, mode, high_ratio)
