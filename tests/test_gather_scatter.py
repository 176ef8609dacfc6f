"""gather_tokens / scatter_tokens: Triton kernels against the plain-PyTorch reference (exact equality).

CPU runs need TRITON_INTERPRET=1 and keep every grid small; the tests marked ``gpu`` run SD3-size shapes, CUDA-graph
capture, torch.compile and the one-compile-for-every-K check on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from ras_kernels import gather_tokens, scatter_tokens
from ras_kernels.gather import ops, reference
from tests._utils import DEVICE, INTERPRET, TRITON_RUNNABLE, compiled_variants, poisoned, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (B, N, D, K): N = 1, 63, 97; K = 1 and K = N; D = 1, 8, 72 (Lumina head_dim), a multi-block even row
# (1536 = SD3 hidden) and a multi-block row with a masked tail (600).
SHAPES = [
    pytest.param(1, 1, 8, 1, id="N1"),
    pytest.param(2, 63, 72, 1, id="N63-K1-D72"),
    pytest.param(2, 97, 40, 97, id="N97-KN"),
    pytest.param(3, 17, 1, 5, id="D1"),
    pytest.param(1, 33, 1536, 7, id="D1536"),
    pytest.param(2, 20, 600, 9, id="D600-tail"),
]


def _distinct_idx(b: int, n: int, k: int, dtype=torch.int64, device=DEVICE) -> torch.Tensor:
    """K distinct tokens per sample in random order (scatter needs them distinct)."""
    return torch.rand(b, n, device=device).argsort(dim=1)[:, :k].to(dtype)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, *, equal_nan: bool = False) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=equal_nan)


# ---------------------------------------------------------------------------------------------------------------
# gather


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_gather_matches_reference(triton_backend, b, n, d, k, dtype):
    x = torch.randn(b, n, d, device=DEVICE).to(dtype)
    idx_dtype = torch.int32 if (n + d) % 2 else torch.int64
    idx = torch.randint(0, n, (b, k), device=DEVICE, dtype=idx_dtype)  # repeats allowed in a gather
    expected = reference.gather_tokens(x, idx)

    out = ops._gather_launch(x, idx, None)
    _assert_same(out, expected)

    result = gather_tokens(x, idx)
    assert result.is_contiguous() and result.dtype == dtype
    _assert_same(result, expected)


@pytest.mark.parametrize("add_dtype", DTYPES, ids=["add-fp32", "add-bf16", "add-fp16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("add_batch", ["shared", "per-sample"])
def test_gather_add_matches_reference(triton_backend, dtype, add_dtype, add_batch):
    b, n, d, k = 2, 45, 72, 30
    x = (4 * torch.randn(b, n, d, device=DEVICE)).to(dtype)
    add = torch.randn(1 if add_batch == "shared" else b, n, d, device=DEVICE).to(add_dtype)
    idx = _distinct_idx(b, n, k, torch.int32).sort(dim=1).values
    expected = reference.gather_tokens(x, idx, add=add)

    out = ops._gather_launch(x, idx, add)
    _assert_same(out, expected)
    _assert_same(gather_tokens(x, idx, add=add), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_gather_add_rounds_like_torch(triton_backend):
    """bf16 output of the fp32 sum: ties to even, carries into the exponent, overflow, inf, NaN, subnormals."""
    special = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFF8000, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F800000, 0xFF800000,
         0x7FC00000, 0x7F800001, 0x00008000, 0x00018000, 0x80000000, 0xBF808001],
        dtype=torch.uint32,
    ).view(torch.float32)  # fmt: skip
    values = torch.cat([special, torch.randn(50) * 10.0 ** torch.randint(-30, 30, (50,))])
    n = values.numel()
    add = values.reshape(1, n, 1).to(DEVICE)
    x = torch.zeros(1, n, 1, dtype=torch.bfloat16, device=DEVICE)
    idx = torch.arange(n, device=DEVICE).reshape(1, n)
    out = gather_tokens(x, idx, add=add)
    _assert_same(out, reference.gather_tokens(x, idx, add=add), equal_nan=True)
    _assert_same(out, add.to(torch.bfloat16), equal_nan=True)


def test_gather_broadcast_batch(triton_backend):
    """x with batch 1 (a position or RoPE table shared by every sample), each sample with its own indices."""
    b, n, d, k = 3, 50, 24, 12
    table = torch.randn(1, n, d, device=DEVICE)
    idx = _distinct_idx(b, n, k)
    expected = reference.gather_tokens(table, idx)
    _assert_same(gather_tokens(table, idx), expected)
    add = torch.randn(b, n, d, device=DEVICE)
    out = ops._gather_launch(table, idx, add)
    _assert_same(out, reference.gather_tokens(table, idx, add=add))


def test_gather_strided_views(triton_backend):
    """x a slice of a wider buffer, add with batch and token axes swapped, idx shared by a CFG pair (stride 0)."""
    b, n, d, k = 2, 37, 40, 11
    buf = torch.randn(b, n + 5, d + 8, device=DEVICE, dtype=torch.float16)
    x = buf[:, 3 : 3 + n, 4 : 4 + d]
    add = torch.randn(n, b, d, device=DEVICE, dtype=torch.float16).transpose(0, 1)
    idx = _distinct_idx(1, n, k).expand(b, k)
    assert not x.is_contiguous() and not add.is_contiguous() and idx.stride(0) == 0
    _assert_same(gather_tokens(x, idx), reference.gather_tokens(x, idx))
    _assert_same(gather_tokens(x, idx, add=add), reference.gather_tokens(x, idx, add=add))
    idx_t = torch.randint(0, n, (k, b), device=DEVICE).t()  # strided index tensor
    _assert_same(gather_tokens(x, idx_t), reference.gather_tokens(x, idx_t))


def test_reference_gather_is_the_literal_spec():
    b, n, d, k = 2, 9, 5, 4
    x = torch.randn(1, n, d, dtype=torch.bfloat16)
    add = torch.randn(b, n, d)
    idx = torch.randint(0, n, (b, k))
    out = reference.gather_tokens(x, idx, add=add)
    for s in range(b):
        for j in range(k):
            t = int(idx[s, j])
            _assert_same(out[s, j], (x[0, t].float() + add[s, t]).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# scatter


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_scatter_matches_reference(triton_backend, b, n, d, k, dtype):
    dst = torch.randn(b, n, d, device=DEVICE).to(dtype)
    dst[:, ::3] = float("nan")  # untouched rows must stay exactly as they were, NaN included
    src = torch.randn(b, k, d, device=DEVICE).to(dtype)
    idx = _distinct_idx(b, n, k, torch.int32 if n % 2 else torch.int64)
    expected = reference.scatter_tokens(dst.clone(), idx, src)
    result = scatter_tokens(dst, idx, src)
    assert result is dst
    _assert_same(dst, expected, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scatter_every_row_of_a_poisoned_cache(triton_backend, dtype):
    """K = N writes every row: nothing may stay NaN (a dense step refreshing the whole cache)."""
    b, n, d = 2, 63, 72
    dst = poisoned((b, n, d), dtype)
    src = torch.randn(b, n, d, device=DEVICE).to(dtype)
    idx = _distinct_idx(b, n, n)
    scatter_tokens(dst, idx, src)
    _assert_same(dst, reference.scatter_tokens(poisoned((b, n, d), dtype), idx, src))


def test_scatter_strided_views(triton_backend):
    """dst is the image part of a cache with a text slot and padding columns; src a transposed view."""
    b, n, d, k, text = 2, 41, 24, 13, 5
    cache = torch.randn(b, text + n, d + 8, device=DEVICE, dtype=torch.bfloat16)
    before = cache.clone()
    dst = cache[:, text:, :d]
    src = torch.randn(k, b, d, device=DEVICE, dtype=torch.bfloat16).transpose(0, 1)
    idx = _distinct_idx(1, n, k).expand(b, k)
    expected = reference.scatter_tokens(before.clone()[:, text:, :d], idx, src)
    scatter_tokens(dst, idx, src)
    _assert_same(dst, expected)
    _assert_same(cache[:, :text], before[:, :text])  # text slot untouched
    _assert_same(cache[:, :, d:], before[:, :, d:])  # padding columns untouched


def test_gather_then_scatter_round_trip(triton_backend):
    b, n, d, k = 2, 30, 16, 10
    x = torch.randn(b, n, d, device=DEVICE)
    idx = _distinct_idx(b, n, k)
    cache = poisoned((b, n, d), x.dtype)
    scatter_tokens(cache, idx, gather_tokens(x, idx))
    for s in range(b):
        _assert_same(cache[s, idx[s]], x[s, idx[s]])
    assert int(cache.isnan().all(dim=-1).sum()) == b * (n - k)


def test_torch_backend_matches_triton(monkeypatch):
    if not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    b, n, d, k = 2, 19, 12, 7
    x, add = torch.randn(b, n, d, device=DEVICE), torch.randn(1, n, d, device=DEVICE)
    idx = _distinct_idx(b, n, k)
    src = torch.randn(b, k, d, device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RAS_BACKEND", backend)
        dst = torch.zeros(b, n, d, device=DEVICE)
        results.append((gather_tokens(x, idx, add=add), scatter_tokens(dst, idx, src)))
    _assert_same(results[0][0], results[1][0])
    _assert_same(results[0][1], results[1][1])


def test_torch_compile_sees_through(triton_backend):
    """Both ops trace as torch.library ops (fake implementations, declared mutation of dst) in one graph; a new K
    and a new N (a recompile with symbolic sizes: the in-place checks must trace them) keep it one graph."""
    b, d = 2, 16

    def step(x, pos, idx, cache):
        h = gather_tokens(x, idx, add=pos) * 2
        scatter_tokens(cache, idx, h)
        return h.sum(dim=-1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for n, kk in ((24, 6), (24, 9), (40, 9)):
        x, pos = torch.randn(b, n, d, device=DEVICE), torch.randn(1, n, d, device=DEVICE)
        idx = _distinct_idx(b, n, kk)
        cache, expected_cache = torch.zeros(b, n, d, device=DEVICE), torch.zeros(b, n, d, device=DEVICE)
        out = compiled(x, pos, idx, cache)
        h = reference.gather_tokens(x, idx, add=pos) * 2
        reference.scatter_tokens(expected_cache, idx, h)
        _assert_same(cache, expected_cache)
        _assert_same(out, h.sum(dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# errors


def _gather_args(**over):
    args = dict(x=torch.randn(2, 10, 8), idx=torch.zeros(2, 3, dtype=torch.int64), add=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(10, 8)), ValueError, "x must have 3 dimensions"),
        (dict(x=torch.zeros(2, 10, 8, dtype=torch.int32)), TypeError, r"x must have dtype in \(float32"),
        (dict(idx=torch.zeros(2, 3)), TypeError, r"idx must have dtype in \(int32, int64\)"),
        (dict(idx=torch.zeros(3, dtype=torch.int64)), ValueError, "idx must have 2 dimensions"),
        (dict(idx=torch.zeros(2, 0, dtype=torch.int64)), ValueError, "idx must select between 1 and N=10"),
        (dict(idx=torch.zeros(2, 11, dtype=torch.int64)), ValueError, "idx must select between 1 and N=10"),
        (dict(x=torch.randn(3, 10, 8)), ValueError, "x must have batch 1 .* or B=2"),
        (dict(x=torch.randn(2, 8, 10).transpose(1, 2)), ValueError, "x must have unit stride"),
        (dict(add=torch.randn(2, 10, 7)), ValueError, r"add must have shape \(B or 1, N, D\)"),
        (dict(add=torch.randn(3, 10, 8)), ValueError, "add must have batch 1"),
        (dict(add=torch.zeros(1, 10, 8, dtype=torch.int64)), TypeError, "add must have dtype"),
        (dict(add=torch.randn(1, 8, 10).transpose(1, 2)), ValueError, "add must have unit stride"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_gather_rejects_bad_input(over, exc, match):
    args = _gather_args(**over)
    with pytest.raises(exc, match=match):
        gather_tokens(args["x"], args["idx"], add=args["add"])


def _scatter_args(**over):
    idx = torch.tensor([[0, 1, 2], [9, 5, 3]], dtype=torch.int32)
    args = dict(dst=torch.randn(2, 10, 8), idx=idx, src=torch.randn(2, 3, 8))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(dst=torch.randn(10, 8)), ValueError, "dst must have 3 dimensions"),
        (dict(idx=torch.zeros(1, 3, dtype=torch.int32)), ValueError, "idx has batch 1, expected 2"),
        (dict(src=torch.randn(2, 3, 8, dtype=torch.float16)), TypeError, r"src must have dtype in \(float32\)"),
        (dict(src=torch.randn(2, 4, 8)), ValueError, r"src must have shape \(B, K, D\) = \(2, 3, 8\)"),
        (dict(dst=torch.randn(2, 8, 10).transpose(1, 2)), ValueError, "dst must have unit stride"),
        (dict(src=torch.randn(2, 8, 3).transpose(1, 2)), ValueError, "src must have unit stride"),
        # dst is written in place: a broadcast or otherwise self-overlapping view would mix samples / rows.
        (dict(dst=torch.randn(1, 10, 8).expand(2, 10, 8)), ValueError, "dst is written in place"),
        (dict(dst=torch.randn(2, 1, 8).expand(2, 10, 8)), ValueError, "dst is written in place"),
        (dict(dst=torch.randn(2, 10, 8).as_strided((2, 10, 8), (40, 4, 1))), ValueError, "dst is written in place"),
        (dict(idx=torch.tensor([[0, 1, 2], [3, 10, 4]])), ValueError, r"idx holds token indices outside \[0, N=10\)"),
        (dict(idx=torch.tensor([[0, 1, 0], [3, 5, 4]])), ValueError, "idx must hold distinct token indices"),
    ],
)
def test_scatter_rejects_bad_input(over, exc, match):
    args = _scatter_args(**over)
    with pytest.raises(exc, match=match):
        scatter_tokens(args["dst"], args["idx"], args["src"])


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])],
)
@pytest.mark.parametrize("bad", [-1, 10], ids=["negative", "N"])
def test_index_values_checked(monkeypatch, device, bad):
    """CPU indices are always range-checked on the host (an out-of-range row would read or write outside the
    tensor); CUDA indices only with RAS_DEBUG=1, since reading them needs a host sync. Scatter also needs them
    distinct. Both backends, both ops."""
    x, dst, src = (torch.randn(*shape, device=device) for shape in ((2, 10, 8), (2, 10, 8), (2, 3, 8)))
    idx = torch.tensor([[0, 1, 2], [3, bad, 4]], device=device)
    repeated = torch.tensor([[0, 1, 2], [3, 4, 3]], device=device)
    if device == "cuda":
        monkeypatch.setenv("RAS_DEBUG", "1")
    triton = INTERPRET if device == "cpu" else TRITON_RUNNABLE  # Triton takes CPU tensors in the interpreter only
    for backend in ("torch", "triton") if triton else ("torch",):
        monkeypatch.setenv("RAS_BACKEND", backend)
        with pytest.raises(ValueError, match=r"idx holds token indices outside \[0, N=10\)"):
            gather_tokens(x, idx)
        with pytest.raises(ValueError, match=r"idx holds token indices outside \[0, N=10\)"):
            scatter_tokens(dst, idx, src)
        with pytest.raises(ValueError, match="idx must hold distinct token indices"):
            scatter_tokens(dst, repeated, src)
        _assert_same(gather_tokens(x, repeated), reference.gather_tokens(x, repeated))  # repeats are fine to read
    ok = torch.tensor([[0, 1, 9], [3, 5, 4]], device=device)
    _assert_same(gather_tokens(x, ok), reference.gather_tokens(x, ok))


# ---------------------------------------------------------------------------------------------------------------
# GPU: full size, graphs, compile, recompiles


SD3 = dict(b=2, n=4096, d=1536)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("k", [1, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_sd3_sizes(triton_backend, k, dtype):
    b, n, d = SD3["b"], SD3["n"], SD3["d"]
    x = torch.randn(b, n, d, device="cuda").to(dtype)
    pos = torch.randn(1, n, d, device="cuda").to(dtype)
    idx = _distinct_idx(b, n, k, device="cuda").sort(dim=1).values
    out = ops._gather_launch(x, idx, pos)
    _assert_same(out, reference.gather_tokens(x, idx, add=pos))
    _assert_same(gather_tokens(x, idx), reference.gather_tokens(x, idx))
    cache = poisoned((b, n, d), dtype, "cuda")
    src = torch.randn(b, k, d, device="cuda").to(dtype)
    expected = reference.scatter_tokens(cache.clone(), idx, src)
    scatter_tokens(cache, idx, src)
    _assert_same(cache, expected, equal_nan=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d", [72, 2304, 1000])
def test_gpu_other_widths(triton_backend, d):
    b, n, k = 2, 4096, 1500
    x = torch.randn(b, n + 3, d + 8, device="cuda", dtype=torch.bfloat16)[:, 3:, :d]
    idx = _distinct_idx(b, n, k, torch.int32, device="cuda")
    _assert_same(gather_tokens(x, idx), reference.gather_tokens(x, idx))
    pos = torch.randn(1, n, d, device="cuda")
    _assert_same(gather_tokens(x, idx, add=pos), reference.gather_tokens(x, idx, add=pos))
    cache = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(b, k, d, device="cuda", dtype=torch.bfloat16)
    expected = reference.scatter_tokens(cache.clone(), idx, src)
    _assert_same(scatter_tokens(cache, idx, src), expected)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay_with_new_indices(triton_backend):
    """Capture gather(+add) and scatter once, then replay with new index values: no host sync, no stale args."""
    b, n, d, k = 2, 4096, 1536, 1024
    x = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(1, n, d, device="cuda", dtype=torch.bfloat16)
    idx = _distinct_idx(b, n, k, device="cuda")
    cache = torch.zeros(b, n, d, device="cuda", dtype=torch.bfloat16)
    gather_tokens(x, idx, add=pos)  # compile outside the capture
    scatter_tokens(cache, idx, gather_tokens(x, idx))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = gather_tokens(x, idx, add=pos)
        scatter_tokens(cache, idx, h)
    for _ in range(2):
        idx.copy_(_distinct_idx(b, n, k, device="cuda"))
        cache.zero_()
        graph.replay()
        expected_h = reference.gather_tokens(x, idx, add=pos)
        _assert_same(h, expected_h)
        _assert_same(cache, reference.scatter_tokens(torch.zeros_like(cache), idx, expected_h))


@pytest.mark.gpu
@requires_cuda
def test_gpu_torch_compile_inductor(triton_backend):
    b, n, d = 2, 4096, 1536
    x = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(1, n, d, device="cuda", dtype=torch.bfloat16)

    def step(x, pos, idx, cache):
        h = gather_tokens(x, idx, add=pos)
        scatter_tokens(cache, idx, h * 2)
        return h

    compiled = torch.compile(step, fullgraph=True)
    for k in (1024, 2048):
        idx = _distinct_idx(b, n, k, device="cuda")
        cache, expected_cache = torch.zeros_like(x), torch.zeros_like(x)
        h = compiled(x, pos, idx, cache)
        expected_h = reference.gather_tokens(x, idx, add=pos)
        reference.scatter_tokens(expected_cache, idx, expected_h * 2)
        _assert_same(h, expected_h)
        _assert_same(cache, expected_cache)


@pytest.mark.gpu
@requires_cuda
def test_gpu_one_compile_for_every_k(triton_backend):
    """A new active-token count K (every diffusion step) reuses the compiled kernels."""
    from ras_kernels.gather import kernels

    b, n, d = 2, 4096, 264  # a width no other test uses, so the first call compiles
    x = torch.randn(b, n, d, device="cuda", dtype=torch.float16)
    cache = torch.zeros_like(x)
    counts = []
    for k in (1, 7, 1000, 1024, 2047, 4096):
        idx = _distinct_idx(b, n, k, device="cuda")
        scatter_tokens(cache, idx, gather_tokens(x, idx))
        counts.append((compiled_variants(kernels.gather_rows_kernel), compiled_variants(kernels.scatter_rows_kernel)))
    assert len(set(counts)) == 1, counts
