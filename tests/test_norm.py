"""adaptive_norm / gated_residual / gated_residual_norm: Triton kernel against the fp32 plain-PyTorch reference.

CPU runs need TRITON_INTERPRET=1 (tiny shapes); the ``gpu`` tests run the SD3 and Lumina-Next sizes, CUDA-graph
capture and torch.compile. Tolerances: fp32 1e-5; half precisions 2 ulps of the output dtype relative (the
interpreter rounds fp32 -> bf16 by truncation, and a residual stream 1 ulp apart normalises 1 ulp apart).
"""

from __future__ import annotations

import pytest
import torch

from ras_kernels import adaptive_norm, gated_residual, gated_residual_norm
from ras_kernels.norm import ops, reference
from tests._utils import DEVICE, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}

# (B, L, D): D = 1, 8, 72 (Lumina head dim), 600 (masked tail), 1536 (SD3 hidden); L = 1 and odd.
SHAPES = [
    pytest.param(1, 1, 1, id="D1"),
    pytest.param(2, 5, 8, id="D8"),
    pytest.param(3, 7, 72, id="D72-B3"),
    pytest.param(2, 3, 600, id="D600"),
    pytest.param(1, 2, 1536, id="D1536"),
]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.is_contiguous()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _modulation(b: int, d: int, dtype, count: int) -> list[torch.Tensor]:
    """Per-sample vectors cut from one [B, count * D] projection, as adaLN chunks them (batch stride count * D)."""
    return list((0.5 * torch.randn(b, count * d, device=DEVICE)).to(dtype).chunk(count, dim=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,n,d", SHAPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaptive_norm_matches_reference(triton_backend, b, n, d, norm, dtype):
    x = (3 * torch.randn(b, n, d, device=DEVICE) + 1).to(dtype)
    scale, shift = _modulation(b, d, dtype, 2)
    weight, bias = torch.randn(d, device=DEVICE).to(dtype), torch.randn(d, device=DEVICE).to(dtype)
    for kwargs in ({}, {"scale": scale}, {"scale": scale, "shift": shift[:1]}, {"weight": weight, "bias": bias}):
        expected = reference.adaptive_norm(x, norm=norm, eps=1e-5, **kwargs)
        _close(adaptive_norm(x, norm=norm, eps=1e-5, **kwargs), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rope_batch", [1, 2], ids=["shared-rope", "per-sample-rope"])
def test_adaptive_norm_rope_matches_reference(triton_backend, dtype, rope_batch):
    """QK-norm + RoPE as Lumina-Next applies them: LayerNorm across heads, then each head's pairs rotated."""
    b, n, heads, head_dim = 2, 9, 3, 24
    x = torch.randn(b, 2 * n, heads * head_dim, device=DEVICE).to(dtype)[:, ::2]  # strided rows
    weight, bias = torch.randn(heads * head_dim, device=DEVICE), torch.randn(heads * head_dim, device=DEVICE)
    angles = 10 * torch.randn(rope_batch, n, head_dim // 2, device=DEVICE)
    rope = torch.polar(torch.ones_like(angles), angles)
    expected = reference.adaptive_norm(x, norm="layer", weight=weight, bias=bias, eps=1e-5, rope=rope)
    _close(adaptive_norm(x, norm="layer", weight=weight, bias=bias, eps=1e-5, rope=rope), expected)


def test_rope_reference_matches_diffusers():
    """The reference rotation is diffusers' apply_rotary_emb(use_real=False) on [B, L, H, d]."""
    from diffusers.models.embeddings import apply_rotary_emb

    b, n, heads, head_dim = 2, 5, 4, 16
    x = torch.randn(b, n, heads * head_dim)
    rope = torch.polar(torch.ones(1, n, head_dim // 2), torch.randn(1, n, head_dim // 2))
    expected = apply_rotary_emb(x.view(b, n, heads, head_dim), rope, use_real=False).reshape(b, n, -1)
    torch.testing.assert_close(reference._rotate(x, rope), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,n,d", SHAPES)
@pytest.mark.parametrize("gate_kind", ["none", "gate", "tanh", "post-norm-tanh"])
def test_gated_residual_matches_reference(triton_backend, b, n, d, gate_kind, dtype):
    residual = (4 * torch.randn(b, n, d, device=DEVICE)).to(dtype)
    branch = torch.randn(b, n, d, device=DEVICE).to(dtype)
    gate = None if gate_kind == "none" else _modulation(b, d, dtype, 3)[1]
    kwargs = {"tanh_gate": "tanh" in gate_kind}
    if gate_kind == "post-norm-tanh":
        kwargs.update(branch_weight=torch.randn(d, device=DEVICE).to(dtype), branch_eps=1e-5)
    _close(gated_residual(residual, branch, gate, **kwargs), reference.gated_residual(residual, branch, gate, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,n,d", SHAPES)
@pytest.mark.parametrize("model", ["sd3", "lumina"])
def test_gated_residual_norm_matches_reference(triton_backend, b, n, d, model, dtype):
    residual = (4 * torch.randn(b, n, d, device=DEVICE)).to(dtype)
    branch = torch.randn(b, n, d, device=DEVICE).to(dtype)
    if model == "sd3":  # h = x + gate * attn; LayerNorm(h) * (1 + scale) + shift
        _, gate, scale, shift = _modulation(b, d, dtype, 4)
        kwargs = {"norm": "layer"}
    else:  # h = x + tanh(gate) * rms(attn) * w2; rms(h) * w1 * (1 + scale)
        gate, scale, shift = _modulation(b, d, dtype, 2) + [None]
        weights = torch.randn(2, d, device=DEVICE).to(dtype)
        kwargs = {"norm": "rms", "tanh_gate": True, "branch_weight": weights[0], "weight": weights[1], "eps": 1e-5}
    h, y = gated_residual_norm(residual, branch, gate, scale, shift, **kwargs)
    h_ref, y_ref = reference.gated_residual_norm(residual, branch, gate, scale, shift, **kwargs)
    _close(h, h_ref)
    _close(
        y,
        reference.adaptive_norm(
            h, scale, shift, norm=kwargs["norm"], weight=kwargs.get("weight"), eps=kwargs.get("eps", 1e-6)
        ),
    )
    _close(y, y_ref)


def test_mixed_branch_dtype(triton_backend):
    """An fp32 branch (e.g. an attention output kept in fp32) into a bf16 residual stream."""
    residual = torch.randn(2, 4, 40, device=DEVICE).to(torch.bfloat16)
    branch, gate = torch.randn(2, 4, 40, device=DEVICE), torch.randn(2, 40, device=DEVICE)
    _close(gated_residual(residual, branch, gate), reference.gated_residual(residual, branch, gate))


def test_torch_compile_sees_through(triton_backend):
    """The ops trace as torch.library ops in one graph."""
    b, n, d = 2, 3, 16

    def block(x, attn, mods):
        shift, scale, gate = mods.chunk(3, dim=1)
        h, y = gated_residual_norm(x, attn, gate, scale, shift)
        return gated_residual(h, adaptive_norm(y, norm="rms"), gate)

    x, attn = torch.randn(b, n, d, device=DEVICE), torch.randn(b, n, d, device=DEVICE)
    mods = torch.randn(b, 3 * d, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    shift, scale, gate = mods.chunk(3, dim=1)
    h, y = reference.gated_residual_norm(x, attn, gate, scale, shift)
    _close(compiled(x, attn, mods), reference.gated_residual(h, reference.adaptive_norm(y, norm="rms"), gate))


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.randn(4, 8)}, ValueError, "x must have 3 dimensions"),
        ({"x": torch.randn(1, 2, 8, dtype=torch.float64)}, TypeError, "x must have dtype"),
        ({"x": torch.randn(1, 2, 8)[..., ::2]}, ValueError, "x must have unit stride"),
        ({"x": torch.randn(1, 1, ops.MAX_D + 1)}, ValueError, "x must have 1 <= D"),
        ({"norm": "batch"}, ValueError, "norm must be one of"),
        ({"scale": torch.randn(3, 8)}, ValueError, "scale must have shape"),
        ({"shift": torch.randn(2, 4)}, ValueError, "shift must have shape"),
        ({"weight": torch.randn(4)}, ValueError, "weight must have shape"),
        ({"bias": torch.randn(8, dtype=torch.float64)}, TypeError, "bias must have dtype"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"eps": "1e-6"}, TypeError, "eps must be a float"),
        ({"rope": torch.randn(1, 2, 4)}, TypeError, "rope must have dtype"),
        ({"rope": torch.ones(1, 2, 3, dtype=torch.complex64)}, ValueError, "rope must have shape"),
        ({"rope": torch.ones(1, 3, 2, dtype=torch.complex64)}, ValueError, "rope must have shape"),
        ({"rope": torch.ones(1, 2, 4, dtype=torch.complex64).mT}, ValueError, "rope must have"),
        ({"rope": torch.ones(1, 2, 8, dtype=torch.complex64)[..., ::2]}, ValueError, "rope must have unit stride"),
    ],
)
def test_adaptive_norm_errors(kwargs, error, match):
    args = {"x": torch.randn(2, 2, 8), **kwargs}
    with pytest.raises(error, match=match):
        adaptive_norm(args.pop("x"), **args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"branch": torch.randn(2, 3, 8)}, ValueError, "branch must have shape"),
        ({"branch": [1.0]}, TypeError, "branch must be a torch.Tensor"),
        ({"gate": torch.randn(2, 8, 1)}, ValueError, "gate must have 2 dimensions"),
        ({"branch_weight": torch.randn(7)}, ValueError, "branch_weight must have shape"),
        ({"branch_eps": -1.0}, ValueError, "branch_eps must be > 0"),
        ({"norm": None}, ValueError, "norm must be one of"),
        ({"gate": torch.randn(2, 8), "tanh_gate": "yes"}, TypeError, "tanh_gate must be a bool"),
    ],
)
def test_gated_residual_norm_errors(kwargs, error, match):
    args = {"residual": torch.randn(2, 2, 8), "branch": torch.randn(2, 2, 8), **kwargs}
    with pytest.raises(error, match=match):
        gated_residual_norm(args.pop("residual"), args.pop("branch"), **args)


# ---------------------------------------------------------------------------------------------------------------
# GPU: model sizes, graphs, compile


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 1023, 2048 + 333])
@pytest.mark.parametrize("d", [1536, 2304])
def test_gpu_block_sizes(triton_backend, rows, d):
    dtype = torch.bfloat16
    residual = (4 * torch.randn(2, rows, d, device="cuda")).to(dtype)
    branch = torch.randn(2, rows, d, device="cuda").to(dtype)
    gate, scale, shift = _modulation(2, d, dtype, 3)
    h, y = gated_residual_norm(residual, branch, gate, scale, shift)
    _close(h, reference.gated_residual(residual, branch, gate))
    _close(y, reference.adaptive_norm(h, scale, shift))


@pytest.mark.gpu
@requires_cuda
def test_gpu_lumina_qk_norm_rope(triton_backend):
    b, n, heads, kv_heads, head_dim = 2, 1024, 32, 8, 72
    rope = torch.polar(torch.ones(b, n, head_dim // 2, device="cuda"), torch.randn(b, n, head_dim // 2, device="cuda"))
    for h in (heads, kv_heads):
        x = torch.randn(b, n, h * head_dim, device="cuda", dtype=torch.bfloat16)
        w, bias = torch.randn(2, h * head_dim, device="cuda", dtype=torch.bfloat16)
        expected = reference.adaptive_norm(x, norm="layer", weight=w, bias=bias, eps=1e-5, rope=rope)
        _close(adaptive_norm(x, norm="layer", weight=w, bias=bias, eps=1e-5, rope=rope), expected)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_and_inductor(triton_backend):
    b, n, d = 2, 1024, 1536
    x = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16)
    attn = torch.randn_like(x)
    mods = torch.randn(b, 3 * d, device="cuda", dtype=torch.bfloat16)

    def block(x, attn, mods):
        shift, scale, gate = mods.chunk(3, dim=1)
        h, y = gated_residual_norm(x, attn, gate, scale, shift)
        return gated_residual(h, y, gate)

    expected = block(x, attn, mods)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block(x, attn, mods)
    x.normal_()
    graph.replay()
    _close(captured, block(x, attn, mods))
    assert not torch.equal(captured, expected)
    _close(torch.compile(block, fullgraph=True)(x, attn, mods), block(x, attn, mods))
