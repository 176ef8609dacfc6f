"""Region selection against the spec written out literally (Python loops, float64).

Images (spec section 4) on the torch path; videos (section 8: [B, C, T, H, W] with a (pt, ph, pw) patch, tokens in
row-major (t, h, w) order) and rectangular image patches on both paths, on odd token grids; metric "delta" (each
token's change from the previous signal, carried over where it is 0) and metric "attention" (each token's given score)
on both paths, images and videos.
"""

from __future__ import annotations

import math

import pytest
import torch

from ras_kernels import select_regions

from ._utils import TRITON_RUNNABLE


def literal_select(signal, k, patch, metric, counters, scale, mode, high_ratio, previous=None, scores=None):
    """Spec sections 4 and 8, one token at a time, on a video [B, C, T, H, W] with patch (pt, ph, pw) (an image is
    the video with T = 1 and pt = 1). Metric delta: a voxel's value is the channel L2 norm of signal - previous, and
    a token whose mean of them is 0 takes its entry of ``scores`` instead. Metric attention: a token's R is its entry
    of ``scores`` (the signal is not read). Returns (sorted active indices [B, K],
    updated counters or None, updated scores (the R of every token, fp32) or None)."""
    b, c, t, h, w = signal.shape
    pt, ph, pw = patch
    x = signal.double().tolist()  # x[sample][channel][t][h][w]
    prev = None if previous is None else previous.double().tolist()
    sign = 1 if mode == "reference" else -1
    out, new_counters = [], None if counters is None else counters.clone()
    new_scores = None if scores is None else scores.clone()
    for s in range(b):
        prio = []  # appended in token order: t-major, then h, then w
        for tz in range(t // pt):
            for ty in range(h // ph):
                for tx in range(w // pw):
                    if metric == "attention":
                        r = scores[s, len(prio)].item()
                        d = 0 if counters is None else counters[s, len(prio)].item()
                        prio.append(r * math.exp(sign * scale * d))
                        continue
                    vals = []
                    for zz in range(tz * pt, tz * pt + pt):
                        for yy in range(ty * ph, ty * ph + ph):
                            for xx in range(tx * pw, tx * pw + pw):
                                ch = [x[s][ci][zz][yy][xx] for ci in range(c)]
                                if metric == "delta":
                                    ch = [v - prev[s][ci][zz][yy][xx] for ci, v in enumerate(ch)]
                                if metric == "std":
                                    mean = sum(ch) / c
                                    vals.append(math.sqrt(sum((v - mean) ** 2 for v in ch) / (c - 1)))
                                else:
                                    vals.append(math.sqrt(sum(v * v for v in ch)))
                    r = sum(vals) / len(vals)
                    if metric == "delta":
                        if r == 0:  # every voxel as before: not recomputed, the last observed change carries over
                            r = scores[s, len(prio)].item()
                        new_scores[s, len(prio)] = r
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
    return torch.tensor(out, dtype=torch.int64), new_counters, new_scores


def check_against_spec(signal, k, patch, metric, counters, scale, mode, high_ratio, previous=None, scores=None):
    """select_regions (on the backend in force) against :func:`literal_select` for an image (``patch`` p or
    (ph, pw)) or a video (``patch`` (pt, ph, pw)): the indices, and ``counters`` and ``scores`` (if any) updated in
    place."""
    if signal.dim() == 5:
        video, patch3 = signal, tuple(patch)
    else:
        video, patch3 = signal.unsqueeze(2), (1, patch, patch) if isinstance(patch, int) else (1, *patch)
    prev_video = None if previous is None else previous.reshape(video.shape)
    expected, expected_counters, expected_scores = literal_select(
        video, k, patch3, metric, counters, scale, mode, high_ratio, prev_video, scores
    )
    got = select_regions(
        signal,
        k,
        patch_size=patch,
        metric=metric,
        counters=counters,
        starvation_scale=scale,
        mode=mode,
        high_ratio=high_ratio,
        previous=previous,
        scores=scores,
    )
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), expected)
    if counters is not None:
        assert torch.equal(counters, expected_counters)
    if scores is not None:  # fp32 changes against float64 ones rounded to fp32; carried entries are exact
        torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=0)


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


# ---------------------------------------------------------------------------------------------- metric "delta"
DELTA_CASES = [
    # (B, C, token grid, patch, K, mode, high_ratio, counters dtype, signal dtype, channels-last)
    (2, 4, (3, 5, 7), (1, 2, 2), 40, "reference", 0.3, torch.int32, torch.float32, False),  # Wan's patch
    (1, 1, (5, 3, 1), (3, 1, 2), 15, "paper", 0.5, torch.int64, torch.float32, True),  # K = N, one channel
    (3, 5, (3, 5, 7), (2, 3, 2), 104, "paper", 0.0, None, torch.bfloat16, False),  # K = N - 1
    (2, 3, (7, 1, 3), (1, 3, 3), 1, "reference", 1.0, torch.int32, torch.float16, True),
    (2, 4, (5, 7), (1, 3), 12, "reference", 0.3, torch.int32, torch.float32, True),  # image, 1 x 3 patches
    (1, 3, (3, 5), (3, 2), 7, "paper", 1.0, torch.int64, torch.float16, False),  # image, 3 x 2 patches
    (2, 2, (7, 9), (2, 2), 30, "reference", 0.3, torch.int64, torch.float32, False),  # image, p = 2
    (1, 2, (1, 1), (2, 2), 1, "paper", 0.3, torch.int32, torch.float32, False),  # N = 1
]


def _delta_id(case):
    b, c, grid, patch, k, mode, hr, cnt, dtype, last = case
    return (
        f"B{b}-C{c}-grid{'x'.join(map(str, grid))}-p{''.join(map(str, patch))}-K{k}-{mode}-hr{hr}-{str(dtype)[6:]}"
        + ("-cl" if last else "")
    )


def _random_signal(b, c, size, dtype, channels_last, device):
    if channels_last:  # channels innermost in memory
        return torch.randn(b, *size, c, device=device).to(dtype).movedim(-1, 1)
    return torch.randn(b, c, *size, device=device).to(dtype)


def _token_mask_to_voxels(mask, patch):
    """[B, *grid] per-token booleans -> [B, 1, *size] per voxel (broadcasting over channels)."""
    for dim, p in enumerate(patch, start=1):
        mask = mask.repeat_interleave(p, dim)
    return mask[:, None]


@pytest.mark.parametrize("case", DELTA_CASES, ids=[_delta_id(c) for c in DELTA_CASES])
def test_delta_selection_follows_spec(case, backend, poison_allocations):
    """Three steps as RAS runs them: each step recomputes a random ~60% of the tokens (fresh values) and copies the
    others bit for bit from the previous signal, so their change is 0 and their score carries over (from the
    random initial scores at the first step). Indices, counters and scores (in place) against the float64 spec."""
    b, c, grid, patch, k, mode, high_ratio, cnt_dtype, dtype, channels_last = case
    dev = _device(backend)
    size = tuple(g * p for g, p in zip(grid, patch, strict=True))
    n = math.prod(grid)
    counters = None if cnt_dtype is None else torch.randint(0, 6, (b, n), dtype=cnt_dtype, device=dev)
    scores = torch.rand(b, n, device=dev)
    previous = _random_signal(b, c, size, dtype, channels_last, dev)
    carried = 0
    for _ in range(3):
        copied = torch.rand(b, *grid, device=dev) < 0.4
        fresh = _random_signal(b, c, size, dtype, channels_last, dev)
        signal = torch.where(_token_mask_to_voxels(copied, patch), previous, fresh)
        before = scores.clone()
        check_against_spec(signal, k, patch, "delta", counters, 0.5, mode, high_ratio, previous, scores)
        copied = copied.reshape(b, n)
        assert torch.equal(scores[copied], before[copied])  # carried over bit for bit
        assert not bool((scores[~copied] == before[~copied]).any())  # every recomputed token has a new score
        carried += int(copied.sum())
        previous = signal
    assert carried > 0 or b * n < 4, "no token was carried over: the test would not exercise the rule"


@pytest.mark.parametrize("where", ["signal", "previous"])
def test_delta_one_changed_value_is_a_change(where, backend):
    """A token that differs from the previous signal in a single channel of a single voxel, by one ulp, has a change
    (tiny, not 0): its score is that change, not the carried one; every other token carries over."""
    dev = _device(backend)
    previous = torch.randn(2, 3, 6, 9, device=dev)  # (3, 3) patches: a 2 x 3 token grid
    signal = previous.clone()
    target = signal if where == "signal" else previous
    target[1, 2, 4, 5] = torch.nextafter(target[1, 2, 4, 5], torch.tensor(math.inf, device=dev))  # token (1, 1)
    scores = torch.rand(2, 6, device=dev) + 1.0
    before = scores.clone()
    check_against_spec(signal, 3, (3, 3), "delta", None, 0.1, "reference", 1.0, previous, scores)
    changed = torch.zeros(2, 6, dtype=torch.bool, device=dev)
    changed[1, 4] = True
    assert torch.equal(scores[~changed], before[~changed])
    assert 0 < float(scores[1, 4]) < 1e-6


# ------------------------------------------------------------------------------------------ metric "attention"
ATTENTION_CASES = [
    # (B, C, token grid, patch, K, mode, high_ratio, counters dtype)
    (2, 4, (3, 5, 7), (1, 2, 2), 40, "reference", 0.3, torch.int32),  # Wan's patch
    (1, 1, (5, 3, 1), (3, 1, 2), 15, "paper", 0.5, torch.int64),  # K = N, one channel
    (3, 2, (3, 5, 7), (2, 3, 2), 104, "paper", 0.0, None),  # K = N - 1
    (2, 4, (5, 7), (1, 3), 12, "reference", 1.0, torch.int32),  # image, 1 x 3 patches
    (2, 2, (7, 9), (2, 2), 1, "reference", 0.3, torch.int64),  # image, p = 2, K = 1
    (1, 2, (1, 1), (2, 2), 1, "paper", 0.3, torch.int32),  # N = 1
]


@pytest.mark.parametrize(
    "case", ATTENTION_CASES, ids=[f"B{c[0]}-grid{'x'.join(map(str, c[2]))}-K{c[4]}-hr{c[6]}" for c in ATTENTION_CASES]
)
def test_attention_selection_follows_spec(case, backend, poison_allocations):
    """Three steps with the counters carried over (in place): each token's R is its entry of ``scores`` (random
    numbers of both signs, as log-sum-exps summed over layers can be), read through a strided view and never written;
    the signal's values do not matter."""
    b, c, grid, patch, k, mode, high_ratio, cnt_dtype = case
    dev = _device(backend)
    size = tuple(g * p for g, p in zip(grid, patch, strict=True))
    n = math.prod(grid)
    counters = None if cnt_dtype is None else torch.randint(0, 6, (b, n), dtype=cnt_dtype, device=dev)
    for _ in range(3):
        signal = torch.full((b, c, *size), float("nan"), device=dev)  # never read
        scores = (3 * torch.randn(n, b, device=dev)).t()  # token-major: strides (1, B)
        before = scores.clone()
        check_against_spec(signal, k, patch, "attention", counters, 0.5, mode, high_ratio, None, scores)
        assert torch.equal(scores, before)
