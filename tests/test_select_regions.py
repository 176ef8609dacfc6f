"""``select_regions`` on the Triton path against the plain-PyTorch reference (``ras_kernels/select/reference.py``).

Two kinds of comparison:
* tie-free inputs (``tie_free_signal``: every token's log-priority ``k * ((rank_t + 1/2) / N + sign * D_t)`` is
  distinct by a margin far above fp32 rounding for any integer counters) must give identical indices and
  identical counters, step after step;
* random inputs may hold near-ties that two correct fp32 implementations order differently (another summation
  order), so there the reference's priorities of our selection, as a sorted multiset, must equal those of the
  reference's selection, and the counters must agree everywhere except on such swapped tokens.
Exact ties (identical tokens) are computed identically by both, so they must match exactly (index order).
CPU runs execute the kernels under TRITON_INTERPRET=1 on small shapes; ``gpu`` tests do the full sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from ras_kernels import select_regions
from ras_kernels.select import ops, reference
from ras_kernels.select.ops import validate_select_args

from ._utils import DEVICE, TRITON_RUNNABLE, assert_same_selection_values, check_index_shape, requires_cuda

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------------- helpers
def tie_free_video(b, c, grid, patch, scale, metric, device=DEVICE):
    """A [B, C, *size] fp32 signal, size = grid * patch per dimension (2 entries: an image [B, C, H, W]; 3: a
    video [B, C, T, H, W]), whose token scores are exp(scale * (perm_t + 0.5) / N) (a random permutation).

    Every pixel of token t is ``a_t * z + offset``: z has zero mean and unbiased std 1 (metric std; the offset
    is a random per-pixel shift the std ignores) or unit L2 norm (metric l2, no offset), so R_t = a_t.
    """
    n = math.prod(grid)
    perm = torch.stack([torch.randperm(n) for _ in range(b)]).double()
    a = torch.exp(scale * (perm + 0.5) / n).reshape(b, *grid)
    for dim, p in enumerate(patch, start=1):
        a = a.repeat_interleave(p, dim)  # [B, *size]: each pixel's a
    z = torch.randn(c, dtype=torch.float64)
    if metric == "std":
        z = (z - z.mean()) / z.std()
        offset = 0.5 * torch.randn(b, 1, *a.shape[1:], dtype=torch.float64)
    else:
        z = z / z.norm()
        offset = 0.0
    x = a[:, None] * z.reshape(1, c, *[1] * len(grid)) + offset
    return x.float().to(device)


def tie_free_delta(b, c, grid, patch, scale, device=DEVICE):
    """(signal, previous, scores) for metric delta with tie-free priorities: about a third of the tokens are copied
    from ``previous`` (change 0: their score exp(scale * j_t / N), j a random permutation, carries over), the others
    changed by :func:`tie_free_video`'s l2 signal (change exp(scale * (perm_t + 1/2) / N)). Carried and fresh scores
    lie on interleaved grids, so log-priorities differ by at least scale / 2N for any integer counters."""
    size = tuple(g * p for g, p in zip(grid, patch, strict=True))
    n = math.prod(grid)
    previous = torch.randn(b, c, *size, device=device)
    copied = torch.rand(b, *grid, device=device) < 1 / 3
    for dim, p in enumerate(patch, start=1):
        copied = copied.repeat_interleave(p, dim)
    signal = torch.where(copied[:, None], previous, previous + tie_free_video(b, c, grid, patch, scale, "l2", device))
    perm = torch.stack([torch.randperm(n, device=device) for _ in range(b)])
    return signal, previous, torch.exp(scale * perm.float() / n)


def tie_free_signal(b, c, h, w, p, scale, metric, device=DEVICE):
    """An image [B, C, H, W] with p x p patches: :func:`tie_free_video` on the (H / p, W / p) token grid."""
    return tie_free_video(b, c, (h // p, w // p), (p, p), scale, metric, device)


def run_both(signal, k, counters=None, **kw):
    """(ours, ours_counters, ref, ref_counters): the public op (Triton path) and the reference on copies."""
    ours_c = counters.clone() if counters is not None else None
    ref_c = counters.clone() if counters is not None else None
    ours = select_regions(signal, k, counters=ours_c, **kw)
    ref = reference.select_regions(signal, k, counters=ref_c, **kw)
    return ours, ours_c, ref, ref_c


# ------------------------------------------------------------------------------------ tie-free: exact match
@pytest.mark.parametrize("high_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("metric", ["std", "l2"])
@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_tie_free_multi_step_matches_reference(mode, metric, high_ratio, triton_backend):
    b, c, h, w, p, scale = 2, 4, 12, 16, 2, 0.5
    n = (h // p) * (w // p)
    counters = torch.randint(0, 3, (b, n), dtype=torch.int32, device=DEVICE)
    ref_c = counters.clone()
    initial = counters.clone()
    for k in (n // 3, 1, n - 5):  # several steps; counters carry over and become non-zero
        x = tie_free_signal(b, c, h, w, p, scale, metric)
        kw = dict(patch_size=p, metric=metric, starvation_scale=scale, mode=mode, high_ratio=high_ratio)
        ours = select_regions(x, k, counters=counters, **kw)
        ref = reference.select_regions(x, k, counters=ref_c, **kw)
        check_index_shape(ours, b, k, n)
        assert torch.equal(ours, ref)
        assert torch.equal(counters, ref_c)
    assert int((counters - initial).sum()) == b * (3 * n - (n // 3 + 1 + n - 5))  # every step moved them


SHAPES = [
    # (B, C, H, W, p, K): non-square latents, p = 1 / 2 / 4, K = 1 and K = N, N = 1, 63 and 97 tokens
    pytest.param(1, 4, 2, 2, 2, 1, id="N1"),
    pytest.param(2, 3, 7, 9, 1, 63, id="N63-K=N-p1"),
    pytest.param(2, 5, 1, 97, 1, 1, id="N97-K1-p1"),
    pytest.param(3, 16, 8, 24, 4, 5, id="p4-nonsquare"),
    pytest.param(2, 2, 26, 14, 2, 45, id="p2-nonsquare"),
    pytest.param(1, 6, 9, 12, 3, 11, id="p3"),
]


@pytest.mark.parametrize("b,c,h,w,p,k", SHAPES)
@pytest.mark.parametrize("with_counters", [False, True])
def test_shapes_tie_free(b, c, h, w, p, k, with_counters, triton_backend):
    n = (h // p) * (w // p)
    x = tie_free_signal(b, c, h, w, p, 0.5, "std")
    counters = torch.randint(0, 4, (b, n), device=DEVICE) if with_counters else None
    kw = dict(patch_size=p, starvation_scale=0.5, high_ratio=0.3)
    ours, ours_c, ref, ref_c = run_both(x, k, counters, **kw)
    check_index_shape(ours, b, k, n)
    assert torch.equal(ours, ref)
    if with_counters:
        assert torch.equal(ours_c, ref_c)


def test_non_contiguous_inputs(triton_backend):
    """A channel slice of a larger tensor, H/W transposed (last stride != 1) and strided counters."""
    b, c, h, w, p = 2, 4, 8, 12, 2
    n = (h // p) * (w // p)
    base = tie_free_signal(b, c, w, h, p, 0.5, "std")  # [B, C, W, H]
    big = torch.randn(b, c + 3, w, h, device=DEVICE)
    big[:, 2 : 2 + c] = base
    x = big[:, 2 : 2 + c].transpose(2, 3)  # [B, C, H, W], non-contiguous in every dim
    assert not x.is_contiguous() and x.stride(-1) != 1
    store = torch.randint(0, 5, (b, 2 * n), dtype=torch.int64, device=DEVICE)
    counters = store[:, ::2]
    ref_c = counters.clone()
    neighbours = store[:, 1::2].clone()
    ours = select_regions(x, 9, patch_size=p, counters=counters, starvation_scale=0.5)
    ref = reference.select_regions(x, 9, patch_size=p, counters=ref_c, starvation_scale=0.5)
    assert torch.equal(ours, ref)
    assert torch.equal(counters, ref_c)
    assert torch.equal(store[:, 1::2], neighbours)  # only the strided counters were written


def test_registered_op_matches_public_function(triton_backend):
    """torch.ops.ras_kernels.select_regions (what torch.compile traces) runs the same kernels."""
    x = tie_free_signal(2, 4, 8, 8, 2, 0.5, "l2")
    counters = torch.randint(0, 3, (2, 16), device=DEVICE)
    op_c = counters.clone()
    got = torch.ops.ras_kernels.select_regions(x, 6, [2, 2], "l2", op_c, 0.5, "paper", 0.3, 1, None, None, None)
    kw = dict(patch_size=2, metric="l2", mode="paper", starvation_scale=0.5, high_ratio=0.3)
    ours, ours_c, _, _ = run_both(x, 6, counters, **kw)
    assert torch.equal(got, ours) and torch.equal(op_c, ours_c)


def test_channel_chunks(triton_backend):
    """C = 70 > 16 channels: several unrolled channel blocks, with a ragged last one."""
    x = tie_free_signal(2, 70, 6, 8, 2, 0.5, "std")
    n = 12
    counters = torch.randint(0, 3, (2, n), device=DEVICE)
    ours, ours_c, ref, ref_c = run_both(x, 5, counters, patch_size=2, starvation_scale=0.5)
    assert torch.equal(ours, ref) and torch.equal(ours_c, ref_c)


# --------------------------------------------------------------------------------- video [B, C, T, H, W]
VIDEO_SHAPES = [
    # (B, C, token grid (T/pt, H/ph, W/pw), patch (pt, ph, pw), K): odd grids, pt = 1 and pt > 1, rectangular
    pytest.param(2, 4, (3, 5, 7), (1, 2, 2), 40, id="wan-patch"),
    pytest.param(1, 3, (3, 5, 7), (2, 1, 1), 1, id="pt2-K1"),
    pytest.param(3, 16, (5, 3, 3), (3, 2, 1), 45, id="pt3-K=N"),
    pytest.param(2, 5, (1, 7, 9), (2, 3, 2), 62, id="T1-token-pt2"),
    pytest.param(1, 20, (7, 1, 1), (1, 1, 3), 3, id="C20-grid7x1x1"),
    pytest.param(1, 2, (1, 1, 1), (2, 2, 2), 1, id="N1"),
]


@pytest.mark.parametrize("b,c,grid,patch,k", VIDEO_SHAPES)
@pytest.mark.parametrize("metric,mode,high_ratio", [("std", "reference", 0.3), ("l2", "paper", 1.0)])
def test_video_tie_free_matches_reference(b, c, grid, patch, k, metric, mode, high_ratio, triton_backend):
    n = math.prod(grid)
    counters = torch.randint(0, 4, (b, n), dtype=torch.int32, device=DEVICE)
    ref_c = counters.clone()
    kw = dict(patch_size=patch, metric=metric, starvation_scale=0.5, mode=mode, high_ratio=high_ratio)
    for kk in (k, max(1, k // 2)):  # two steps, the counters carried over
        x = tie_free_video(b, c, grid, patch, 0.5, metric)
        ours = select_regions(x, kk, counters=counters, **kw)
        ref = reference.select_regions(x, kk, counters=ref_c, **kw)
        check_index_shape(ours, b, kk, n)
        assert torch.equal(ours, ref)
        assert torch.equal(counters, ref_c)


@pytest.mark.parametrize("patch", [(1, 2, 2), (1, 1, 3)])
def test_video_with_pt1_is_the_image_of_stacked_frames(patch, triton_backend):
    """pt = 1: the tokens of [B, C, T, H, W] are those of the image [B, C, T*H, W] with (ph, pw) patches, in the same
    order. Random data: both go through the same per-token arithmetic, so even near-ties must come out equal."""
    b, c, t, h, w = 2, 4, 3, 10, 6
    x = torch.randn(b, c, t, h, w, device=DEVICE)
    n = t * (h // patch[1]) * (w // patch[2])
    counters = torch.randint(0, 4, (b, n), device=DEVICE)
    image_c = counters.clone()
    kw = dict(metric="std", starvation_scale=0.1, high_ratio=0.3)
    video = select_regions(x, n // 3, patch_size=patch, counters=counters, **kw)
    image = select_regions(x.reshape(b, c, t * h, w), n // 3, patch_size=patch[1:], counters=image_c, **kw)
    assert torch.equal(video, image) and torch.equal(counters, image_c)


def test_video_non_contiguous_inputs(triton_backend):
    """Every other frame of a channels-last video (no unit stride anywhere in [B, C, T, H, W]) and strided
    counters; the kernels read the view in place."""
    b, c, grid, patch = 2, 3, (3, 3, 5), (2, 2, 1)
    n = math.prod(grid)
    video = tie_free_video(b, c, grid, patch, 0.5, "std")  # [B, C, 6, 6, 5]
    store = torch.randn(b, 2 * video.shape[2], *video.shape[3:], c, device=DEVICE)  # [B, 2T, H, W, C]
    x = store.movedim(-1, 1)[:, :, ::2]
    x.copy_(video)
    assert x.stride(1) == 1 and x.stride(-1) == c and not x.is_contiguous()
    cstore = torch.randint(0, 5, (b, 3 * n), dtype=torch.int32, device=DEVICE)
    counters = cstore[:, ::3]
    ref_c = counters.clone()
    untouched = cstore[:, 1::3].clone()
    ours = select_regions(x, 20, patch_size=patch, counters=counters, starvation_scale=0.5, mode="paper")
    ref = reference.select_regions(x, 20, patch_size=patch, counters=ref_c, starvation_scale=0.5, mode="paper")
    assert torch.equal(ours, ref) and torch.equal(counters, ref_c)
    assert torch.equal(cstore[:, 1::3], untouched)


def test_registered_op_takes_a_video(triton_backend):
    x = tie_free_video(2, 4, (3, 3, 5), (2, 1, 2), 0.5, "std")
    counters = torch.randint(0, 3, (2, 45), device=DEVICE)
    op_c = counters.clone()
    got = torch.ops.ras_kernels.select_regions(
        x, 11, [2, 1, 2], "std", op_c, 0.5, "reference", 0.3, 1, None, None, None
    )
    ref_c = counters.clone()
    ref = reference.select_regions(x, 11, patch_size=(2, 1, 2), counters=ref_c, starvation_scale=0.5, high_ratio=0.3)
    assert torch.equal(got, ref) and torch.equal(op_c, ref_c)


# ---------------------------------------------------------------------------------- the selection stage, keys given
def _tied_keys(b: int, n: int) -> torch.Tensor:
    """[b, n] uint32 keys as int64: 80% from a pool of 7 (with the extreme keys 0 and 2**32 - 1: large tie groups
    across both band boundaries), the rest distinct."""
    pool = torch.cat([torch.tensor([0, 2**32 - 1]), torch.randint(0, 2**32, (5,))])
    return torch.where(torch.rand(b, n) < 0.8, pool[torch.randint(0, 7, (b, n))], torch.randint(0, 2**32, (b, n)))


def _check_band_stage(keys64: torch.Tensor, tuning: dict | None) -> None:
    """ops.launch_band against a stable sort of the keys as unsigned numbers, over band positions and sizes from
    K = 1 to K = N, with counters carried over."""
    b, n = keys64.shape
    keys = torch.where(keys64 >= 2**31, keys64 - 2**32, keys64).to(torch.int32).to(DEVICE)  # uint32 bit patterns
    counters = torch.randint(0, 3, (b, n), dtype=torch.int32, device=DEVICE)
    before = counters.clone()
    order = torch.sort(keys64, dim=1, stable=True).indices
    for k, high_ratio in ((max(n // 2, 1), 0.3), (1, 1.0), (max(n - 1, 1), 0.0), (n, 0.5)):
        start = reference.band_start(n, k, high_ratio)
        expected = order[:, start : start + k].sort(dim=1).values
        got = ops.launch_band(keys, counters, k, start, tuning)
        assert torch.equal(got.cpu(), expected)
        dropped = torch.ones(b, n, dtype=torch.int32).scatter_(1, expected, 0)
        assert torch.equal(counters.cpu(), before.cpu() + dropped)
        before = counters.clone()


ONE_PROGRAM = {"split_block": 0, "bits": 4, "warps": 16}  # the radix select of rows under ops.SPLIT_FROM keys
# The split select over 8192-key programs: the default's code with a quarter of its programs (each replays the
# completed passes, which is what costs time under the interpreter); 2048-key programs run on the GPU at these N.
SPLIT_8192 = {"split_block": 8192}


@pytest.mark.parametrize(
    "n, tuning",
    [(75600, SPLIT_8192), (131072, SPLIT_8192), (75600, ONE_PROGRAM), (131072, ONE_PROGRAM)],
    ids=["wan720p-split", "max-split", "wan720p-one-program", "max-one-program"],
)
def test_band_stage_at_the_largest_rows(n, tuning, triton_backend):
    """The selection stage (radix select + compaction) alone on N = 75,600 (Wan 720p, 21 x 45 x 80 tokens) and
    N = 2**17 keys: the split select (the default there; one launch per 8-bit digit) and one program per row
    re-reading 16384-key chunks each pass; up to 16 compaction programs. Fast under the interpreter, unlike the
    score stage at this size."""
    _check_band_stage(_tied_keys(2, n), tuning)


@pytest.mark.parametrize("n", [1, 300])
@pytest.mark.parametrize("bits", [8, 4])
def test_band_stage_split_over_programs(n, bits, triton_backend):
    """The split radix select on short rows: 128-key programs (a partial last one), 8- and 4-bit digits, large tie
    groups and the extreme keys, K = 1 to N."""
    _check_band_stage(_tied_keys(2, n), {"split_block": 128, "bits": bits, "warps": 4})


# ---------------------------------------------------------------------------------------------- exact ties
@pytest.mark.parametrize("metric", ["std", "l2"])
def test_constant_signal_ties_break_by_index(metric, triton_backend):
    b, c, h, w, p, k = 2, 4, 10, 6, 2, 7
    n = (h // p) * (w // p)
    x = torch.full((b, c, h, w), 0.75, device=DEVICE)
    x[:, 1] = -0.25  # the same channel vector at every pixel: every token identical, R > 0
    for high_ratio, counters in (
        (0.0, torch.zeros(b, n, dtype=torch.int64, device=DEVICE)),
        (0.3, torch.full((b, n), 2, dtype=torch.int32, device=DEVICE)),
        (1.0, None),
    ):
        ours, ours_c, ref, ref_c = run_both(x, k, counters, patch_size=p, metric=metric, high_ratio=high_ratio)
        start = reference.band_start(n, k, high_ratio)
        expected = torch.arange(start, start + k, device=DEVICE).expand(b, k)
        assert torch.equal(ref, expected)
        assert torch.equal(ours, expected)
        if counters is not None:
            assert torch.equal(ours_c, ref_c)


def test_zero_score_ties_ignore_counters(triton_backend):
    """A signal constant over channels (a stride-0 view; C = 4 keeps the mean exact) has std 0, so
    R * exp(k D) = 0 for every D: one big tie."""
    b, c, h, w, p, k = 2, 4, 6, 8, 2, 5
    n = (h // p) * (w // p)
    x = torch.randn(b, 1, h, w, device=DEVICE).expand(b, c, h, w)
    counters = torch.randint(0, 6, (b, n), device=DEVICE)
    ours, ours_c, ref, ref_c = run_both(x, k, counters, patch_size=p, high_ratio=0.3)
    start = reference.band_start(n, k, 0.3)
    assert torch.equal(ours, torch.arange(start, start + k, device=DEVICE).expand(b, k))
    assert torch.equal(ours, ref) and torch.equal(ours_c, ref_c)


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_tie_groups_break_by_index(mode, triton_backend):
    """Tokens are copies of 3 patterns (per-pixel std 1, 2, 4) with counters 0/1: large exact-tie groups on the
    band boundaries, so the tie rule (lower index first) decides which members of a group are active.

    The expectation is the spec in float64 on the known group priorities s_g * exp(+-0.1 D): the reference itself
    is not used here because torch's CPU reductions may round two identical tokens differently (seen: 1 ulp),
    which turns an exact tie into a near-tie; our kernel computes identical tokens identically.
    """
    b, c, h, w, p = 2, 3, 12, 12, 2
    n = (h // p) * (w // p)
    scales = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    patterns = torch.randn(3, c, p, p, dtype=torch.float64)
    patterns = (patterns - patterns.mean(dim=1, keepdim=True)) / patterns.std(dim=1, keepdim=True)
    patterns = patterns * scales[:, None, None, None]
    which = torch.randint(0, 3, (b, n))
    tiles = patterns[which]  # [B, N, C, p, p]
    x = tiles.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    x = x.float().to(DEVICE)
    sign = 1.0 if mode == "reference" else -1.0
    for k, high_ratio in ((n // 2, 0.3), (5, 1.0), (n - 3, 0.0), (17, 0.5)):
        counters = torch.randint(0, 2, (b, n))
        prio = scales[which] * torch.exp(sign * 0.1 * counters.double())  # equal (g, D) -> bitwise equal
        order = torch.sort(prio, dim=1, stable=True).indices
        start = reference.band_start(n, k, high_ratio)
        expected = order[:, start : start + k].sort(dim=1).values
        dropped = torch.ones(b, n, dtype=torch.bool).scatter_(1, expected, False)
        ours_c = counters.clone().to(DEVICE)
        ours = select_regions(x, k, counters=ours_c, patch_size=p, mode=mode, high_ratio=high_ratio)
        assert torch.equal(ours.cpu(), expected)
        assert torch.equal(ours_c.cpu(), counters + dropped.long())


# ----------------------------------------------------------------------------------- random data: values
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("metric", ["std", "l2"])
def test_random_values_match_reference(dtype, metric, triton_backend):
    b, c, h, w, p = 2, 8, 16, 20, 2
    n = (h // p) * (w // p)
    x = torch.randn(b, c, h, w, device=DEVICE).to(dtype)
    counters = torch.randint(0, 4, (b, n), dtype=torch.int32, device=DEVICE)
    for mode, k, high_ratio in (("reference", 31, 0.3), ("paper", 64, 1.0), ("reference", 1, 0.0)):
        kw = dict(patch_size=p, metric=metric, mode=mode, high_ratio=high_ratio)
        ours, ours_c, ref, ref_c = run_both(x, k, counters, **kw)
        assert_same_selection_values(x, k, counters, ours, ours_c, ref, ref_c, **kw)


def test_random_without_counters_and_k_equals_n(triton_backend):
    x = torch.randn(3, 4, 12, 8, device=DEVICE)
    n = 24
    for k in (n, n - 1, 1):
        ours, _, ref, _ = run_both(x, k, None, patch_size=2, high_ratio=0.3)
        assert_same_selection_values(x, k, None, ours, None, ref, None, patch_size=2)
    assert torch.equal(select_regions(x, n, patch_size=2), torch.arange(n, device=DEVICE).expand(3, n))


def test_nan_scores_rank_last(triton_backend):
    """A NaN token sorts after every number (as in torch.sort): high_ratio 1 drops it first."""
    x = tie_free_signal(1, 4, 8, 8, 2, 0.5, "std")
    x[0, 2, 4, 5] = float("nan")  # token (2, 2) = index 10
    ours, _, ref, _ = run_both(x, 15, None, patch_size=2, high_ratio=1.0)
    assert torch.equal(ours, ref)
    assert 10 not in ours[0].tolist()


# ----------------------------------------------------------------------------------------- argument checks
def _sig(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_ARGS = [
    # (signal, num_active, kwargs, exception, message fragment)
    pytest.param([[1.0]], 1, {}, TypeError, "signal must be a torch.Tensor", id="signal-type"),
    pytest.param(_sig(4, 8, 8), 1, {}, ValueError, "signal must have 4 dimensions", id="signal-ndim"),
    pytest.param(torch.ones(1, 4, 8, 8, dtype=torch.int32), 1, {}, TypeError, "signal must have dtype", id="dtype"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": 2.0}, TypeError, "patch_size must be an int", id="p-type"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": 0}, ValueError, "patch_size must be in", id="p-zero"),
    pytest.param(_sig(1, 4, 8, 6), 1, {"patch_size": 4}, ValueError, "divisible by patch_size", id="p-divides"),
    pytest.param(_sig(1, 4, 0, 8), 1, {}, ValueError, "no tokens", id="no-tokens"),
    pytest.param(_sig(1, 4, 8, 8), True, {}, TypeError, "num_active must be an int", id="k-bool"),
    pytest.param(_sig(1, 4, 8, 8), 2.0, {}, TypeError, "num_active must be an int", id="k-float"),
    pytest.param(_sig(1, 4, 8, 8), 0, {}, ValueError, r"num_active must be in \[1, 16\]", id="k-zero"),
    pytest.param(_sig(1, 4, 8, 8), 17, {}, ValueError, r"num_active must be in \[1, 16\]", id="k-too-big"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"metric": "var"}, ValueError, "metric must be one of", id="metric"),
    pytest.param(_sig(1, 1, 8, 8), 1, {}, ValueError, "at least 2 channels", id="std-one-channel"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"mode": "fast"}, ValueError, "mode must be one of", id="mode"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"high_ratio": 1.5}, ValueError, "high_ratio must be", id="hr-big"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"high_ratio": -0.1}, ValueError, "high_ratio must be", id="hr-neg"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"high_ratio": "0.3"}, ValueError, "high_ratio must be", id="hr-str"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"high_ratio": True}, ValueError, "high_ratio must be", id="hr-bool"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"starvation_scale": -1.0}, ValueError, "starvation_scale", id="k-neg"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"starvation_scale": float("inf")}, ValueError, "starvation_scale", id="inf"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"starvation_scale": float("nan")}, ValueError, "starvation_scale", id="nan"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"starvation_scale": "0.1"}, ValueError, "starvation_scale", id="k-str"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"counters": [0] * 16}, TypeError, "counters must be a torch", id="c-type"),
    pytest.param(
        _sig(1, 4, 8, 8), 1, {"counters": torch.zeros(16, dtype=torch.int32)}, ValueError, "2 dimensions", id="c-ndim"
    ),
    pytest.param(
        _sig(1, 4, 8, 8), 1, {"counters": torch.zeros(1, 16)}, TypeError, "counters must have dtype", id="c-dt"
    ),
    pytest.param(
        _sig(1, 4, 8, 8), 1, {"counters": torch.zeros(1, 15, dtype=torch.int64)}, ValueError, "shape", id="c-shape"
    ),
    pytest.param(
        _sig(1, 4, 8, 8),
        1,
        {"counters": torch.zeros(1, 16, dtype=torch.int64, device="meta")},
        ValueError,
        "counters is on meta",
        id="c-device",
    ),
    pytest.param(
        _sig(2, 4, 8, 8),
        1,
        {"counters": torch.zeros(1, 16, dtype=torch.int64).expand(2, 16)},
        ValueError,
        "counters is written in place",
        id="c-expanded",
    ),
    pytest.param(
        _sig(2, 4, 8, 8),
        1,
        {"counters": torch.zeros(24, dtype=torch.int64).as_strided((2, 16), (8, 1))},
        ValueError,
        "counters is written in place",
        id="c-overlapping-rows",
    ),
    pytest.param(_sig(1, 0, 8, 8), 1, {"metric": "l2"}, ValueError, "at least one channel", id="no-channels"),
    # patch tuples and videos [B, C, T, H, W]
    pytest.param(_sig(4, 8), 1, {}, ValueError, r"4 dimensions \[B, C, H, W\] or 5", id="signal-2d"),
    pytest.param(_sig(1, 2, 2, 2, 2, 2), 1, {}, ValueError, r"or 5 \[B, C, T, H, W\]", id="signal-6d"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": (2, 2, 2)}, ValueError, r"2 entries \(ph, pw\)", id="p-len"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": (2, 0)}, ValueError, r"patch_size\[1\] must be in", id="p0"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": (2.0, 2)}, TypeError, r"patch_size\[0\] must be an int", id="pf"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": (True, 2)}, TypeError, r"patch_size\[0\] must be an", id="pb"),
    pytest.param(_sig(1, 4, 8, 8), 1, {"patch_size": "2"}, TypeError, r"an int or a \(ph, pw\) tuple", id="p-str"),
    pytest.param(_sig(1, 4, 8, 6), 1, {"patch_size": (2, 4)}, ValueError, r"\(8, 6\) must be divisible", id="p-rect"),
    pytest.param(
        _sig(1, 4, 2, 8, 8), 1, {}, TypeError, r"a \(pt, ph, pw\) tuple of ints for a 5-D signal", id="v-int-p"
    ),
    pytest.param(_sig(1, 4, 2, 8, 8), 1, {"patch_size": (2, 2)}, ValueError, "3 entries", id="v-p-len"),
    pytest.param(_sig(1, 4, 2, 8, 8), 1, {"patch_size": (1, 2, -1)}, ValueError, r"patch_size\[2\]", id="v-p-neg"),
    pytest.param(
        _sig(1, 4, 3, 8, 8),
        1,
        {"patch_size": (2, 2, 2)},
        ValueError,
        r"signal size \(T, H, W\) = \(3, 8, 8\) must be divisible by patch_size \(2, 2, 2\)",
        id="v-t-divides",
    ),
    pytest.param(_sig(1, 4, 0, 8, 8), 1, {"patch_size": (1, 2, 2)}, ValueError, "no tokens", id="v-no-frames"),
    pytest.param(
        _sig(1, 4, 2, 4, 4), 9, {"patch_size": [1, 2, 2]}, ValueError, r"num_active must be in \[1, 8\]", id="v-k"
    ),
    pytest.param(_sig(1, 1, 2, 4, 4), 1, {"patch_size": (1, 2, 2)}, ValueError, "at least 2 channels", id="v-std-c1"),
    pytest.param(
        _sig(2, 4, 3, 4, 6),
        1,
        {"patch_size": (1, 2, 2), "counters": torch.zeros(2, 16, dtype=torch.int32)},
        ValueError,
        r"counters must have shape \(B, N\) = \(2, 18\)",
        id="v-counters",
    ),
]


@pytest.mark.parametrize("signal,num_active,kwargs,exc,match", BAD_ARGS)
def test_bad_arguments_raise(signal, num_active, kwargs, exc, match, torch_backend):
    with pytest.raises(exc, match=match):
        select_regions(signal, num_active, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend, monkeypatch):
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", backend)
    counters = torch.zeros(0, 16, dtype=torch.int32, device=DEVICE)
    out = select_regions(torch.randn(0, 4, 8, 8, device=DEVICE), 5, counters=counters)
    assert out.shape == (0, 5) and out.dtype == torch.int64


def test_validate_returns_token_count():
    assert validate_select_args(_sig(1, 4, 8, 12), 3, 2, "std", None, 0.1, "reference", 0.5) == 24
    assert validate_select_args(_sig(1, 4, 8, 12), 3, (4, 1), "std", None, 0.1, "reference", 0.5) == 24
    assert validate_select_args(_sig(1, 4, 6, 10, 14), 3, [2, 2, 2], "l2", None, 0.1, "paper", 0.5) == 105


def test_triton_path_rejects_too_many_tokens(triton_backend):
    x = torch.zeros(1, 2, 2, 256, 257, device=DEVICE)  # N = 131584 > 2**17 with (1, 1, 1) patches
    with pytest.raises(ValueError, match="N <= 131072"):
        select_regions(x, 5, patch_size=(1, 1, 1))


# ------------------------------------------------------------------------------------------ GPU, full size
GPU_SIZES = [
    # (B, token grid, patch): images (2 entries), videos (3)
    pytest.param(2, (64, 64), (2, 2), id="B2-N4096"),
    pytest.param(8, (64, 64), (2, 2), id="B8-N4096"),
    pytest.param(2, (128, 128), (2, 2), id="B2-N16384"),
    pytest.param(8, (128, 128), (2, 2), id="B8-N16384"),
    pytest.param(2, (256, 256), (1, 1), id="B2-N65536"),
    pytest.param(1, (21, 45, 80), (1, 2, 2), id="B1-wan720p-N75600"),
    pytest.param(2, (21, 45, 80), (1, 2, 2), id="B2-wan720p-N75600"),
    pytest.param(2, (4, 128, 256), (2, 1, 1), id="B2-video-pt2-N131072"),
]


def _force_select(monkeypatch, split: bool) -> None:
    """Every select_regions call takes the split radix select (split) or one program per row (not), whatever N."""
    monkeypatch.setattr(ops, "SPLIT_FROM", 1 if split else 1 << 40)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
@pytest.mark.parametrize("b,grid,patch", GPU_SIZES)
def test_gpu_full_size(b, grid, patch, split, triton_backend, monkeypatch):
    _force_select(monkeypatch, split)
    n = math.prod(grid)
    # Tie-free, several steps: exact indices and counters (k = 0.5: log-gap 0.5 / N >= 3.8e-6, ~30 ulp).
    counters = torch.zeros(b, n, dtype=torch.int32, device="cuda")
    ref_c = counters.clone()
    for ratio, high_ratio, mode in ((0.5, 0.3, "reference"), (0.25, 1.0, "paper"), (0.125, 0.0, "reference")):
        k = n - int((1 - ratio) * n)
        x = tie_free_video(b, 16, grid, patch, 0.5, "std", device="cuda")
        kw = dict(patch_size=patch, mode=mode, high_ratio=high_ratio, starvation_scale=0.5)
        torch.empty(b * k, dtype=torch.int64, device="cuda").fill_(-1)  # dirty the allocator: unwritten = -1
        ours = select_regions(x, k, counters=counters, **kw)
        ref = reference.select_regions(x, k, counters=ref_c, **kw)
        check_index_shape(ours, b, k, n)
        assert torch.equal(ours, ref)
        assert torch.equal(counters, ref_c)
    # Random bf16 data with counters: values as multisets.
    size = [g * p for g, p in zip(grid, patch, strict=True)]
    x = torch.randn(b, 16, *size, device="cuda", dtype=torch.bfloat16)
    counters = torch.randint(0, 6, (b, n), device="cuda")
    for metric in ("std", "l2"):
        kw = dict(patch_size=patch, metric=metric, high_ratio=0.3)
        ours, ours_c, ref, ref_c = run_both(x, n // 4, counters, **kw)
        assert_same_selection_values(x, n // 4, counters, ours, ours_c, ref, ref_c, **kw)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "b, grid, patch, split",
    [(2, (64, 64), (2, 2), False), (2, (21, 45, 80), (1, 2, 2), False), (2, (21, 45, 80), (1, 2, 2), True)],
    ids=["N4096", "wan720p", "wan720p-split"],
)
def test_gpu_cuda_graph_replay(b, grid, patch, split, triton_backend, monkeypatch):
    """Captured once, replayed on new signals: the one-program select (N = 4096 and 75,600) and the split one
    (N = 75,600, its histogram buffer zeroed inside the graph)."""
    _force_select(monkeypatch, split)
    c, n = 16, math.prod(grid)
    k = n // 4
    static_x = tie_free_video(b, c, grid, patch, 0.5, "std", device="cuda")  # log-gap 0.5 / N: ~30 ulp
    counters = torch.zeros(b, n, dtype=torch.int64, device="cuda")
    kw = dict(patch_size=patch, high_ratio=0.3, starvation_scale=0.5)  # tie-free: the signal's log-gap scale
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        select_regions(static_x, k, counters=counters, **kw)  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = select_regions(static_x, k, counters=counters, **kw)
    counters.zero_()
    ref_c = counters.clone()
    for _ in range(3):
        new_x = tie_free_video(b, c, grid, patch, 0.5, "std", device="cuda")
        static_x.copy_(new_x)
        graph.replay()
        ref = reference.select_regions(new_x, k, counters=ref_c, **kw)
        assert torch.equal(static_out, ref)
        assert torch.equal(counters, ref_c)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
def test_gpu_no_recompile_per_k_and_compile_traces(split, triton_backend, monkeypatch):
    from ras_kernels.select import kernels

    _force_select(monkeypatch, split)
    x = torch.randn(2, 16, 64, 64, device="cuda")
    n = 1024
    video = torch.randn(1, 16, 21, 90, 160, device="cuda")  # 75,600 tokens
    jits = (
        kernels.region_keys_kernel,
        kernels.band_bounds_kernel,
        kernels.band_pass_kernel,
        kernels.band_compact_kernel,
    )

    def compiled_variants():
        try:
            return [sum(len(v[0]) for v in k.device_caches.values()) for k in jits]
        except (AttributeError, TypeError, IndexError):  # another Triton's cache layout: skip the count
            return None

    sizes = []
    for k in (1, 16, 17, 512, 1000, n):
        ref = reference.select_regions(x, k)
        ours = select_regions(x, k)
        assert_same_selection_values(x, k, None, ours, None, ref, None)
        kv = 73 * k + 1  # 74 ... 74,753 of 75,600
        ref = reference.select_regions(video, kv, patch_size=(1, 2, 2))
        ours = select_regions(video, kv, patch_size=(1, 2, 2))
        assert_same_selection_values(video, kv, None, ours, None, ref, None, patch_size=(1, 2, 2))
        sizes.append(compiled_variants())
    assert all(v == sizes[0] for v in sizes), f"a kernel recompiled for a new K: {sizes}"

    # The registered op traces (functionalised in-place counters) under torch.compile.
    counters = torch.zeros(2, n, dtype=torch.int32, device="cuda")
    ref_c = counters.clone()
    op = torch.ops.ras_kernels.select_regions
    fn = torch.compile(
        lambda s, c: op(s, 300, [2, 2], "std", c, 0.1, "reference", 1.0, 1, None, None, None),
        backend="aot_eager",
        fullgraph=True,
    )
    ours = fn(x, counters)
    ref = reference.select_regions(x, 300, counters=ref_c)
    assert_same_selection_values(x, 300, torch.zeros_like(ref_c), ours, counters, ref, ref_c)


# ------------------------------------------------------------------------------------ shards (sequence-parallel)
@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("high_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("metric", ["std", "delta"])
def test_shards_select_within_each_run_of_tokens(metric, shards, high_ratio, video, triton_backend):
    """The spec of ``shards`` = P, independent of the op's sharded code: P consecutive runs of N / P tokens, each a
    band of whole token rows here, so run s is the sub-signal of rows [s H / P, (s + 1) H / P) (an image) or of
    frames [s T / P, ...) (a video), and keeps K / P of its tokens as the unsharded op chooses them on that
    sub-signal with that run's counters (and, metric delta, that run's previous signal and scores, a strided view
    updated in place). The Triton path and the reference both match it exactly (tie-free data)."""
    b, c, scale, mode = 2, 4, 0.5, "paper"
    grid, patch = ((3 * shards, 2, 3), (1, 2, 2)) if video else ((4 * shards, 5), (2, 2))
    n, k = math.prod(grid), 3 * shards
    if metric == "delta":
        x, previous, scores = tie_free_delta(b, c, grid, patch, scale)
    else:
        x, previous, scores = tie_free_video(b, c, grid, patch, scale, "std"), None, None
    counters = torch.randint(0, 3, (b, n), dtype=torch.int32, device=DEVICE)
    kw = dict(patch_size=patch, metric=metric, starvation_scale=scale, mode=mode, high_ratio=high_ratio)
    expected, expected_c = [], counters.clone()
    expected_s = None if scores is None else scores.clone()
    run, rows = n // shards, x.shape[2] // shards
    for s in range(shards):
        part = x[:, :, s * rows : (s + 1) * rows]
        part_c = expected_c[:, s * run : (s + 1) * run]  # a view: updated in place
        delta = {}
        if metric == "delta":
            delta = {
                "previous": previous[:, :, s * rows : (s + 1) * rows],
                "scores": expected_s[:, s * run : (s + 1) * run],
            }
        expected.append(select_regions(part, k // shards, counters=part_c, **delta, **kw) + s * run)
    expected = torch.cat(expected, dim=1)
    for op in (select_regions, reference.select_regions):
        got_c = counters.clone()
        got_s = None if scores is None else scores.clone()
        delta = {} if metric != "delta" else {"previous": previous, "scores": got_s}
        got = op(x, k, counters=got_c, shards=shards, **delta, **kw)
        check_index_shape(got, b, k, n)
        assert torch.equal(got, expected), op
        assert torch.equal(got_c, expected_c), op
        if metric == "delta":
            torch.testing.assert_close(got_s, expected_s, rtol=1e-6, atol=0)


def test_shards_are_validated():
    x = torch.randn(1, 4, 8, 8, device=DEVICE)  # N = 16 tokens of 2 x 2
    with pytest.raises(ValueError, match="shards=3 must divide both the token count N=16 and num_active=6"):
        select_regions(x, 6, shards=3)
    with pytest.raises(ValueError, match="shards=2 must divide both the token count N=16 and num_active=5"):
        select_regions(x, 5, shards=2)
    with pytest.raises(ValueError, match="shards must be in >= 1, got 0"):
        select_regions(x, 4, shards=0)
    with pytest.raises(TypeError, match="shards must be an int, got bool"):
        select_regions(x, 4, shards=True)
    token_major = torch.zeros(16, 2, dtype=torch.int32, device=DEVICE).t()  # [B, N] with strides (1, 2)
    with pytest.raises(ValueError, match=r"counters must be viewable as \[B \* shards, N / shards\]"):
        select_regions(torch.randn(2, 4, 8, 8, device=DEVICE), 4, shards=2, counters=token_major)


# ------------------------------------------------------------------------------------------- metric "random"
def _lowbias32_py(x: int) -> int:
    """The documented hash, in plain Python integers (independent of the tensor code under test)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _random_score_py(seed: int, b: int, t: int) -> float:
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    v = _lowbias32_py(lo ^ _lowbias32_py(hi ^ _lowbias32_py((b + 0x9E3779B9) & 0xFFFFFFFF)))
    return (_lowbias32_py(v ^ t) >> 8) * 2.0**-24


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32, 7 * 2**32 + 3, -2])
def test_random_scores_are_the_documented_hash(seed):
    b, n = 3, 40
    got = reference.random_scores(_seed(seed), b, n).cpu()
    expected = torch.tensor([[_random_score_py(seed % 2**64, i, t) for t in range(n)] for i in range(b)])
    assert got.dtype == torch.float32 and torch.equal(got, expected.float())
    assert bool(((got >= 0) & (got < 1)).all())
    assert torch.equal(got.double() * 2**24, (got.double() * 2**24).round())  # 24-bit grid: exact in fp32


def test_random_reference_reads_then_advances_the_seed():
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    seed = _seed(41)
    counters = torch.zeros(2, 16, dtype=torch.int32, device=DEVICE)
    got = reference.select_regions(x, 5, metric="random", seed=seed, counters=counters, high_ratio=1.0)
    assert int(seed) == 42
    scores = reference.random_scores(_seed(41), 2, 16)
    expected = torch.sort(scores, dim=1, stable=True).indices[:, :5].sort(dim=1).values  # high_ratio 1: lowest K
    assert torch.equal(got, expected)
    assert torch.equal(counters, torch.ones_like(counters).scatter_(1, expected, 0))


@pytest.mark.parametrize("high_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["reference", "paper"])
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_random_triton_equals_reference(video, shards, mode, high_ratio, triton_backend):
    """Exact equality (indices, counters, seed after) over consecutive calls: the draws are the same bits on both
    paths, and the starvation factor is the same fp32 computation as for the other metrics."""
    b = 2
    if video:
        x, patch, n = torch.randn(b, 3, 4, 6, 4, device=DEVICE), (2, 2, 1), 24  # token grid 2 x 3 x 4
    else:
        x, patch, n = torch.randn(b, 1, 8, 10, device=DEVICE), (2, 2), 20  # C = 1: the signal is never read
    seed, ref_seed = _seed(2**33 + 5), _seed(2**33 + 5)
    counters = torch.randint(0, 3, (b, n), dtype=torch.int32, device=DEVICE)
    ref_c = counters.clone()
    kw = dict(patch_size=patch, metric="random", starvation_scale=0.5, mode=mode, high_ratio=high_ratio, shards=shards)
    picks = []
    for k in (n // 2, shards, n - shards):  # the draws advance with the seed; counters carry over
        ours = select_regions(x, k, counters=counters, seed=seed, **kw)
        ref = reference.select_regions(x, k, counters=ref_c, seed=ref_seed, **kw)
        check_index_shape(ours, b, k, n)
        assert torch.equal(ours, ref)
        assert torch.equal(counters, ref_c)
        assert torch.equal(seed, ref_seed)
        picks.append(ours)
    assert int(seed) == 2**33 + 8
    # Without counters too.
    again = select_regions(x, n // 2, seed=_seed(2**33 + 5), **kw)
    assert torch.equal(again, reference.select_regions(x, n // 2, seed=_seed(2**33 + 5), **kw))


def test_random_selection_depends_on_the_seed_not_the_signal(triton_backend):
    b, n, k = 2, 64, 20
    x = torch.randn(b, 4, 16, 16, device=DEVICE)
    other = torch.randn(b, 4, 16, 16, device=DEVICE) * 10 + 3  # another signal of the same shape
    kw = dict(patch_size=2, metric="random", high_ratio=0.3)
    first = select_regions(x, k, seed=_seed(9), **kw)
    assert torch.equal(first, select_regions(other, k, seed=_seed(9), **kw))
    assert torch.equal(first, reference.select_regions(other, k, seed=_seed(9), **kw))
    assert not torch.equal(first, select_regions(x, k, seed=_seed(10), **kw))
    assert not torch.equal(first, select_regions(x, k, seed=_seed(9 + 2**32), **kw))  # the high half matters
    assert not torch.equal(first[0], first[1])  # the samples draw independently
    seed = _seed(9)
    assert torch.equal(select_regions(x, k, seed=seed, **kw), first)
    assert not torch.equal(select_regions(x, k, seed=seed, **kw), first)  # the seed advanced: a new draw
    check_index_shape(first, b, k, n)


def test_random_selection_is_roughly_uniform():
    """N = 4096 tokens, K = N / 4, 4 fixed seeds x 2 samples: every decile of token indices holds about K / N of
    its tokens among the chosen (binomial std of a decile's share ~1.5%; bound 5%)."""
    n, k = 4096, 1024
    x = torch.zeros(2, 1, 64, 64, device=DEVICE)
    chosen = torch.zeros(n)
    for s in (0, 1, 2, 3):
        idx = reference.select_regions(x, k, patch_size=1, metric="random", seed=_seed(s), high_ratio=0.3)
        chosen += torch.zeros(2, n).scatter_(1, idx.cpu(), 1.0).sum(dim=0)
    share = torch.stack([part.sum() / (8 * part.numel()) for part in chosen.tensor_split(10)])
    assert bool(((share - k / n).abs() < 0.05).all()), share
    scores = reference.random_scores(_seed(0), 4, n)
    hist = torch.histc(scores, bins=10, min=0.0, max=1.0) / scores.numel()
    assert bool(((hist - 0.1).abs() < 0.02).all()), hist


def test_registered_op_advances_the_seed(triton_backend):
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    seed = _seed(3)
    got = torch.ops.ras_kernels.select_regions(x, 6, [2, 2], "random", None, 0.1, "reference", 0.3, 1, seed, None, None)
    assert int(seed) == 4
    assert torch.equal(got, reference.select_regions(x, 6, metric="random", seed=_seed(3), high_ratio=0.3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_random_empty_batch_advances_the_seed(backend, monkeypatch):
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", backend)
    seed = _seed(0)
    out = select_regions(torch.randn(0, 4, 8, 8, device=DEVICE), 5, metric="random", seed=seed)
    assert out.shape == (0, 5) and int(seed) == 1


SEED_ERRORS = [
    pytest.param({"metric": "random"}, ValueError, "metric='random' needs seed", id="missing"),
    pytest.param({"seed": torch.zeros(1, dtype=torch.int64)}, ValueError, "seed is used only with", id="std"),
    pytest.param({"metric": "l2", "seed": torch.zeros(1, dtype=torch.int64)}, ValueError, "seed is used", id="l2"),
    pytest.param({"metric": "random", "seed": 3}, TypeError, "seed must be a torch.Tensor", id="int"),
    pytest.param({"metric": "random", "seed": torch.zeros(1)}, TypeError, "seed must have dtype", id="float"),
    pytest.param(
        {"metric": "random", "seed": torch.zeros(1, dtype=torch.int32)}, TypeError, "seed must have dtype", id="i32"
    ),
    pytest.param(
        {"metric": "random", "seed": torch.zeros(2, dtype=torch.int64)}, ValueError, r"seed must have shape", id="2"
    ),
    pytest.param(
        {"metric": "random", "seed": torch.zeros((), dtype=torch.int64)}, ValueError, r"seed must have shape", id="0d"
    ),
    pytest.param(
        {"metric": "random", "seed": torch.zeros(1, dtype=torch.int64, device="meta")},
        ValueError,
        "seed is on meta",
        id="device",
    ),
]


@pytest.mark.parametrize("kwargs,exc,match", SEED_ERRORS)
def test_seed_is_validated(kwargs, exc, match, torch_backend):
    """Checked before any backend runs (CPU tensors; the device case is a meta seed)."""
    with pytest.raises(exc, match=match):
        select_regions(torch.randn(1, 4, 8, 8), 3, **kwargs)


# -------------------------------------------------------------------------------------------- metric "delta"
def test_delta_nan_ranks_last(triton_backend):
    """A NaN in the signal makes its token's change NaN, which is stored in scores and ranks after every number (as
    a NaN score of any metric); a NaN score carried over (change 0) ranks last too."""
    previous = torch.randn(2, 3, 8, 8, device=DEVICE)  # 16 tokens of 2 x 2
    signal = previous + torch.randn_like(previous)
    signal[:, :, 6:, 6:] = previous[:, :, 6:, 6:]  # token 15 not recomputed
    signal[0, 1, 2, 5] = float("nan")  # token (1, 2) = 6 of sample 0
    scores = torch.rand(2, 16, device=DEVICE)
    scores[1, 15] = float("nan")
    ref_scores = scores.clone()
    kw = dict(patch_size=2, metric="delta", previous=previous, high_ratio=1.0)  # drops the highest priority
    ours = select_regions(signal, 15, scores=scores, **kw)
    ref = reference.select_regions(signal, 15, scores=ref_scores, **kw)
    assert torch.equal(ours, ref)
    assert 6 not in ours[0].tolist() and 15 not in ours[1].tolist()
    assert bool(scores[0, 6].isnan()) and bool(scores[1, 15].isnan())
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, rtol=1e-6, atol=0)


def test_registered_op_declares_its_in_place_writes(triton_backend):
    """torch.library.opcheck: the op writes exactly the arguments its schema marks mutable (counters and scores for
    metric delta, counters and seed for random), and the fake implementation matches the real output. The delta op
    also equals the reference (scores included)."""
    op = torch.ops.ras_kernels.select_regions.default
    x = torch.randn(2, 3, 4, 6, device=DEVICE)  # 6 tokens of 2 x 2
    previous = x.clone()
    # Tokens 0-2 changed, each by its own amount (equal changes would tie their priorities), 3-5 carried over.
    previous[:, :, :2] += 0.5 + torch.rand_like(previous[:, :, :2])
    scores = torch.rand(2, 6, device=DEVICE)
    counters = torch.randint(0, 3, (2, 6), dtype=torch.int32, device=DEVICE)
    for args in (
        (x, 3, [2, 2], "delta", counters.clone(), 0.1, "reference", 0.3, 1, None, previous, scores.clone()),
        (x, 3, [2, 2], "random", counters.clone(), 0.1, "reference", 0.3, 1, _seed(5), None, None),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    ours_c, ours_s, ref_c, ref_s = counters.clone(), scores.clone(), counters.clone(), scores.clone()
    got = op(x, 3, [2, 2], "delta", ours_c, 0.1, "reference", 0.3, 1, None, previous, ours_s)
    kw = dict(metric="delta", previous=previous, high_ratio=0.3)
    assert torch.equal(got, reference.select_regions(x, 3, counters=ref_c, scores=ref_s, **kw))
    assert torch.equal(ours_c, ref_c)
    torch.testing.assert_close(ours_s, ref_s, rtol=1e-6, atol=0)
    assert torch.equal(ours_s[:, 3:], scores[:, 3:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delta_empty_batch(backend, monkeypatch):
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", backend)
    x = torch.randn(0, 4, 8, 8, device=DEVICE)
    out = select_regions(x, 5, metric="delta", previous=x.clone(), scores=torch.zeros(0, 16, device=DEVICE))
    assert out.shape == (0, 5)


_PREV, _SCORES = torch.zeros(1, 4, 8, 8), torch.zeros(1, 16)
DELTA_ERRORS = [
    pytest.param({"scores": _SCORES}, ValueError, "metric='delta' needs previous", id="no-previous"),
    pytest.param({"previous": _PREV}, ValueError, "metric='delta' needs scores", id="no-scores"),
    pytest.param({"metric": "std", "previous": _PREV}, ValueError, "previous is used only with", id="std-previous"),
    pytest.param({"metric": "l2", "scores": _SCORES}, ValueError, "scores is used only with", id="l2-scores"),
    pytest.param(
        {"metric": "random", "seed": torch.zeros(1, dtype=torch.int64), "previous": _PREV, "scores": _SCORES},
        ValueError,
        "previous is used only with metric='delta', got metric='random'",
        id="random",
    ),
    pytest.param({"previous": [[0.0]], "scores": _SCORES}, TypeError, "previous must be a torch.Tensor", id="p-type"),
    pytest.param(
        {"previous": _PREV.half(), "scores": _SCORES}, TypeError, r"previous must have dtype in \(float32\)", id="p-dt"
    ),
    pytest.param(
        {"previous": _PREV[..., :6], "scores": _SCORES},
        ValueError,
        r"previous must have the signal's shape \(1, 4, 8, 8\), got \(1, 4, 8, 6\)",
        id="p-shape",
    ),
    pytest.param({"previous": _PREV.to("meta"), "scores": _SCORES}, ValueError, "previous is on meta", id="p-device"),
    pytest.param({"previous": _PREV, "scores": _SCORES.double()}, TypeError, "scores must have dtype", id="s-f64"),
    pytest.param({"previous": _PREV, "scores": _SCORES.bfloat16()}, TypeError, "scores must have dtype", id="s-bf16"),
    pytest.param(
        {"previous": _PREV, "scores": _SCORES[:, :15]},
        ValueError,
        r"scores must have shape \(B, N\) = \(1, 16\)",
        id="s-shape",
    ),
    pytest.param({"previous": _PREV, "scores": _SCORES[0]}, ValueError, "scores must have 2 dimensions", id="s-1d"),
    pytest.param({"previous": _PREV, "scores": _SCORES.to("meta")}, ValueError, "scores is on meta", id="s-device"),
    pytest.param(
        {"previous": _PREV, "scores": torch.zeros(1, 1).expand(1, 16)},
        ValueError,
        "scores is written in place",
        id="s-expanded",
    ),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs,exc,match", DELTA_ERRORS)
def test_delta_arguments_are_validated(kwargs, exc, match, backend, monkeypatch):
    """Checked before any backend runs: a refused call leaves the counters untouched (CPU tensors; the device cases
    are meta tensors)."""
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", backend)
    counters = torch.zeros(1, 16, dtype=torch.int32)
    with pytest.raises(exc, match=match):
        select_regions(torch.randn(1, 4, 8, 8), 3, **{"metric": "delta", "counters": counters, **kwargs})
    assert not bool(counters.any())
    assert not bool(_SCORES.any())


# ---------------------------------------------------------------------------------------- metric "attention"
def tie_free_attention_scores(b, n, scale, device=DEVICE):
    """[B, N] fp32 scores +-exp(scale * (perm_t + 1/2) / N) with random signs: with integer counters and
    starvation_scale ``scale`` every priority +-exp(scale * ((perm_t + 1/2) / N +- D_t)) is distinct by far more than
    fp32 rounding, so any correct implementation orders them identically."""
    perm = torch.stack([torch.randperm(n, device=device) for _ in range(b)]).float()
    sign = torch.where(torch.rand(b, n, device=device) < 0.5, -1.0, 1.0)
    return sign * torch.exp(scale * (perm + 0.5) / n)


@pytest.mark.parametrize("high_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["reference", "paper"])
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_attention_triton_equals_reference(video, shards, mode, high_ratio, triton_backend):
    """Exact equality (indices, counters) over three consecutive calls with fresh tie-free scores of both signs; the
    scores are read, never written, and the signal (NaN here) is never read."""
    b = 2
    if video:
        x, patch, n = torch.full((b, 3, 4, 6, 4), float("nan"), device=DEVICE), (2, 2, 1), 24  # grid 2 x 3 x 4
    else:
        x, patch, n = torch.full((b, 1, 8, 10), float("nan"), device=DEVICE), (2, 2), 20
    counters = torch.randint(0, 3, (b, n), dtype=torch.int32, device=DEVICE)
    ref_c = counters.clone()
    kw = dict(patch_size=patch, metric="attention", starvation_scale=0.5, mode=mode, high_ratio=high_ratio)
    for k in (n // 2, shards, n - shards):
        scores = tie_free_attention_scores(b, n, 0.5)
        before = scores.clone()
        ours = select_regions(x, k, counters=counters, scores=scores, shards=shards, **kw)
        ref = reference.select_regions(x, k, counters=ref_c, scores=scores, shards=shards, **kw)
        check_index_shape(ours, b, k, n)
        assert torch.equal(ours, ref)
        assert torch.equal(counters, ref_c)
        assert torch.equal(scores, before)
    # Without counters, the K tokens of the highest scores are kept when high_ratio is 0 (the band's top).
    scores = tie_free_attention_scores(b, n, 0.5)
    top = select_regions(x, 5, scores=scores, **{**kw, "high_ratio": 0.0})
    assert torch.equal(top, scores.topk(5, dim=1).indices.sort(dim=1).values)


def test_attention_registered_op(triton_backend):
    """opcheck (schema: the op writes the counters only, scores are declared mutable but untouched; the fake) and the
    registered op equals the reference."""
    op = torch.ops.ras_kernels.select_regions.default
    x = torch.randn(2, 1, 4, 6, device=DEVICE)  # 6 tokens of 2 x 2
    scores = tie_free_attention_scores(2, 6, 0.1)
    counters = torch.randint(0, 3, (2, 6), dtype=torch.int32, device=DEVICE)
    args = (x, 3, [2, 2], "attention", counters.clone(), 0.1, "reference", 0.3, 1, None, None, scores)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    ours_c, ref_c = counters.clone(), counters.clone()
    got = op(x, 3, [2, 2], "attention", ours_c, 0.1, "reference", 0.3, 1, None, None, scores)
    kw = dict(metric="attention", scores=scores, high_ratio=0.3)
    assert torch.equal(got, reference.select_regions(x, 3, counters=ref_c, **kw))
    assert torch.equal(ours_c, ref_c)


ATTENTION_ERRORS = [
    pytest.param({}, ValueError, "metric='attention' needs scores", id="missing"),
    pytest.param(
        {"scores": _SCORES, "previous": _PREV},
        ValueError,
        "previous is used only with metric='delta', got metric='attention'",
        id="previous",
    ),
    pytest.param({"scores": _SCORES.double()}, TypeError, "scores must have dtype", id="f64"),
    pytest.param({"scores": _SCORES.bfloat16()}, TypeError, "scores must have dtype", id="bf16"),
    pytest.param({"scores": _SCORES[:, :15]}, ValueError, r"scores must have shape \(B, N\) = \(1, 16\)", id="shape"),
    pytest.param({"scores": _SCORES[0]}, ValueError, "scores must have 2 dimensions", id="1d"),
    pytest.param({"scores": _SCORES.to("meta")}, ValueError, "scores is on meta", id="device"),
    pytest.param({"scores": [[0.0] * 16]}, TypeError, "scores must be a torch.Tensor", id="type"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kwargs,exc,match", ATTENTION_ERRORS)
def test_attention_arguments_are_validated(kwargs, exc, match, backend, monkeypatch):
    """Checked before any backend runs; a refused call leaves the counters untouched."""
    if backend == "triton" and not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", backend)
    counters = torch.zeros(1, 16, dtype=torch.int32)
    with pytest.raises(exc, match=match):
        select_regions(torch.randn(1, 4, 8, 8), 3, **{"metric": "attention", "counters": counters, **kwargs})
    assert not bool(counters.any())


@pytest.mark.parametrize("metric", ["std", "l2", "random"])
def test_scores_are_refused_with_other_metrics(metric, torch_backend):
    seed = {"seed": torch.zeros(1, dtype=torch.int64)} if metric == "random" else {}
    match = f"scores is used only with metric='delta' or 'attention', got metric='{metric}'"
    with pytest.raises(ValueError, match=match):
        select_regions(torch.randn(1, 4, 8, 8), 3, metric=metric, scores=_SCORES, **seed)
