"""Public ``swiglu``: validation, the Triton launcher, torch.library op, dispatch."""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES, check_tensor, check_unit_stride, device_of, triton_path
from . import reference


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """t [..., F] as [R, F] rows without a copy (any row stride, unit column stride)."""
    f = t.shape[-1]
    check_unit_stride(name, t)
    if t.numel() == 0:  # no row to read (and view(-1, 0) would be ambiguous)
        return t.new_empty((0, f))
    try:
        return t.view(-1, f)
    except RuntimeError:
        raise ValueError(
            f"{name} must be viewable as [rows, F] (leading dimensions mergeable), got strides {tuple(t.stride())}"
        ) from None


def _launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from . import kernels

    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2 = _rows("gate", gate), _rows("up", up)
    rows, f = g2.shape
    block_f = min(1024, 1 << (f - 1).bit_length())
    block_r = max(1, 2048 // block_f)
    grid = (-(-rows // block_r) * -(-f // block_f),)
    with device_of(gate):
        kernels.swiglu_kernel[grid](
            out, g2, u2, g2.stride(0), u2.stride(0), rows, F=f, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4
        )
    return out


# A torch.library op, so torch.compile treats the launch as one opaque op (as for the other ops of this package).
@torch.library.custom_op("ras_kernels::swiglu", mutates_args=(), schema="(Tensor gate, Tensor up) -> Tensor")
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _launch(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one pass: the activation of a SwiGLU feed-forward, ``w2(swiglu(w1 x, w3 x))``.

    gate, up [..., F] of the same shape (float32/bfloat16/float16, up's dtype may differ); rows may be strided,
    the last dimension contiguous. Returns a contiguous tensor of gate's shape and dtype, computed in fp32.
    The Triton path has no backward (see ``RAS_BACKEND``).
    """
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=FLOAT_DTYPES, device=gate.device)
    if gate.dim() == 0 or up.shape != gate.shape:
        raise ValueError(
            f"gate and up must have the same shape [..., F] with at least one dimension, got {tuple(gate.shape)} "
            f"and {tuple(up.shape)}"
        )
    _rows("gate", gate)
    _rows("up", up)
    triton_fn = triton_path("swiglu", _swiglu_op, _launch, gate.device, {"gate": gate, "up": up})
    if triton_fn is not None:
        return triton_fn(gate, up)
    return reference.swiglu(gate, up)
