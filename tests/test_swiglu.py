"""swiglu: Triton kernel against the fp32 plain-PyTorch reference (and diffusers' Lumina-Next feed-forward).

CPU runs need TRITON_INTERPRET=1 (tiny shapes); the ``gpu`` tests run Lumina-Next's size, CUDA-graph capture and
torch.compile. Tolerances: fp32 1e-6 relative; half precisions 1 ulp of the output dtype (one rounding of the fp32
result; the interpreter truncates fp32 -> bf16 instead of rounding).
"""

from __future__ import annotations

import pytest
import torch

from ras_kernels import swiglu
from ras_kernels.swiglu import reference
from tests._utils import DEVICE, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 8e-3), torch.float16: (1e-3, 1e-3)}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.is_contiguous() and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape", [(1,), (3, 1), (2, 5, 96), (4, 1500), (2, 3, 2049), (0, 8), (3, 0), (2, 0, 5)], ids=str
)
def test_swiglu_matches_reference(triton_backend, shape, dtype):
    gate = (4 * torch.randn(shape, device=DEVICE)).to(dtype)
    up = torch.randn(shape, device=DEVICE).to(dtype)
    _close(swiglu(gate, up), reference.swiglu(gate, up))


def test_strided_rows_and_mixed_dtypes(triton_backend):
    """Both halves of one wide projection (strided rows), up in fp32 with a bf16 gate."""
    both = torch.randn(2, 7, 2 * 48, device=DEVICE).to(torch.bfloat16)
    gate, up = both[..., :48], both[..., 48:].float()
    _close(swiglu(gate, up), reference.swiglu(gate, up))


def test_reference_matches_diffusers_feed_forward():
    from diffusers.models.attention import LuminaFeedForward

    ff = LuminaFeedForward(dim=32, inner_dim=64, multiple_of=16)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = ff(x)
        torch.testing.assert_close(ff.linear_2(reference.swiglu(ff.linear_1(x), ff.linear_3(x))), expected)


def test_torch_compile_sees_through(triton_backend):
    gate, up = torch.randn(2, 3, 40, device=DEVICE), torch.randn(2, 3, 40, device=DEVICE)
    compiled = torch.compile(lambda g, u: swiglu(g, u) * 2, fullgraph=True, backend="aot_eager")
    _close(compiled(gate, up), reference.swiglu(gate, up) * 2)


@pytest.mark.parametrize(
    "gate,up,error,match",
    [
        ([1.0], torch.randn(2), TypeError, "gate must be a torch.Tensor"),
        (torch.randn(2, 4), torch.randn(2, 5), ValueError, "same shape"),
        (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4), TypeError, "gate must have dtype"),
        (torch.randn(2, 4), torch.ones(2, 4, dtype=torch.int32), TypeError, "up must have dtype"),
        (torch.randn(4, 2).mT, torch.randn(2, 4), ValueError, "gate must have unit stride"),
        (torch.randn(2, 3, 4), torch.randn(3, 2, 4).transpose(0, 1), ValueError, "up must be viewable"),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, "at least one dimension"),
    ],
)
def test_swiglu_errors(gate, up, error, match):
    with pytest.raises(error, match=match):
        swiglu(gate, up)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 1023, 8192])
def test_gpu_lumina_size(triton_backend, rows):
    gate, up = torch.randn(2, 2, rows, 6144, device="cuda", dtype=torch.bfloat16)
    _close(swiglu(gate, up), reference.swiglu(gate, up))


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_and_inductor(triton_backend):
    gate, up = torch.randn(2, 2, 1024, 6144, device="cuda", dtype=torch.bfloat16)
    swiglu(gate, up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = swiglu(gate, up)
    gate.normal_()
    graph.replay()
    _close(captured, reference.swiglu(gate, up))
    _close(torch.compile(lambda g, u: swiglu(g, u), fullgraph=True)(gate, up), reference.swiglu(gate, up))
