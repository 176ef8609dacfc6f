"""Public ``swiglu``: validation, the Triton launcher, the op definition."""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPES, RASOp, cdiv, check_tensor, check_unit_stride, next_pow2
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
    block_f = min(1024, next_pow2(f))
    block_r = max(1, 2048 // block_f)
    kernels.swiglu_kernel[(cdiv(rows, block_r) * cdiv(f, block_f),)](
        out_ptr=out, gate_ptr=g2, up_ptr=u2, stride_gate_r=g2.stride(0), stride_up_r=u2.stride(0), ROWS=rows, F=f,
        BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4,
    )  # fmt: skip
    return out


_SWIGLU = RASOp(
    "swiglu",
    schema="(Tensor gate, Tensor up) -> Tensor",
    launch=_launch,
    reference=reference.swiglu,
    fake=lambda gate, up: torch.empty_like(gate, memory_format=torch.contiguous_format),
    differentiable=("gate", "up"),
)


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
    return _SWIGLU(gate, up)
