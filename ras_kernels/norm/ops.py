"""Public fused DiT norms: validation, the Triton launcher, the op definitions.

``adaptive_norm``, ``gated_residual`` and ``gated_residual_norm`` cover the per-token elementwise work of an
adaLN DiT block (SD3's LayerNorm + shift/scale and gate + residual; Lumina-Next's RMSNorm sandwich with tanh gates,
QK LayerNorm + RoPE) in one memory pass each. They share one kernel; see ``reference.py`` for the spec.
"""

from __future__ import annotations

import torch

from .._backend import (
    FLOAT_DTYPES,
    RASOp,
    cdiv,
    check_float,
    check_tensor,
    check_unit_stride,
    next_pow2,
    row_strides,
)
from . import reference

MAX_D = 16384  # one row per register tile


def _check_rows(name: str, t: torch.Tensor, batch: int, length: int, d: int, device: torch.device) -> None:
    check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    if tuple(t.shape) != (batch, length, d):
        raise ValueError(f"{name} must have shape (B, L, D) = {(batch, length, d)}, got {tuple(t.shape)}")
    check_unit_stride(name, t)


def _check_per_sample(name: str, t: object, batch: int, d: int, device: torch.device) -> None:
    if t is None:
        return
    check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if t.shape[0] not in (1, batch) or t.shape[1] != d:
        raise ValueError(f"{name} must have shape (B or 1, D) = ({batch} or 1, {d}), got {tuple(t.shape)}")
    check_unit_stride(name, t)


def _check_vector(name: str, t: object, d: int, device: torch.device) -> None:
    if t is None:
        return
    check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    if t.shape[0] != d:
        raise ValueError(f"{name} must have shape (D,) = ({d},), got {tuple(t.shape)}")
    check_unit_stride(name, t)


def _check_norm(norm: object) -> None:
    if norm not in reference.NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, reference.NORMS))}; got {norm!r}")


def _check_x(name: str, x: object) -> torch.Tensor:
    check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)
    d = x.shape[2]
    if not 1 <= d <= MAX_D:
        raise ValueError(f"{name} must have 1 <= D <= {MAX_D} features, got {d}")
    check_unit_stride(name, x)
    return x


def _check_rope(rope: object, x: torch.Tensor) -> None:
    if rope is None:
        return
    check_tensor("rope", rope, ndim=3, dtypes=(torch.complex64,), device=x.device)
    b, n, d = x.shape
    half = rope.shape[2]
    if rope.shape[0] not in (1, b) or rope.shape[1] != n or half < 1 or d % (2 * half):
        raise ValueError(
            f"rope must have shape (B or 1, L, head_dim / 2) with D = {d} a multiple of head_dim, "
            f"got {tuple(rope.shape)}"
        )
    check_unit_stride("rope", rope)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (Triton path)


def _batch_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.shape[0] == 1 else t.stride(0)


def _launch(
    x: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    tanh_gate: bool = False,
    branch_weight: torch.Tensor | None = None,
    branch_eps: float = 1e-6,
    norm: str | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(h, y): h [B, L, D] when a residual is given, y [B, L, D] when a norm is; both contiguous in x's dtype
    (h in residual's dtype). The one kernel behind the three ops (x is the branch when a residual is given)."""
    from . import kernels

    b, n, d = x.shape
    h = None if residual is None else torch.empty((b, n, d), dtype=residual.dtype, device=x.device)
    y = None if norm is None else torch.empty((b, n, d), dtype=(x if h is None else h).dtype, device=x.device)
    rows = b * n
    if rows == 0:
        return h, y
    rope_real = None if rope is None else torch.view_as_real(rope)
    block_d = next_pow2(d)
    block_r = max(1, min(16, 2048 // block_d))
    num_warps = max(1, min(8, block_r * block_d // 256))
    sxb, sxl = row_strides(x)
    srb, srl = (0, 0) if residual is None else row_strides(residual)
    spb, spl = (0, 0) if rope_real is None else row_strides(rope_real)
    # A placeholder pointer (x) is never dereferenced: its switch is off.
    kernels.fused_norm_kernel[(cdiv(rows, block_r),)](
        y_ptr=y if y is not None else x,
        h_ptr=h if h is not None else x,
        x_ptr=x,
        residual_ptr=residual if residual is not None else x,
        gate_ptr=gate if gate is not None else x,
        branch_weight_ptr=branch_weight if branch_weight is not None else x,
        weight_ptr=weight if weight is not None else x,
        bias_ptr=bias if bias is not None else x,
        scale_ptr=scale if scale is not None else x,
        shift_ptr=shift if shift is not None else x,
        rope_ptr=rope_real if rope_real is not None else x,
        stride_x_b=sxb,
        stride_x_l=sxl,
        stride_residual_b=srb,
        stride_residual_l=srl,
        stride_gate_b=_batch_stride(gate),
        stride_scale_b=_batch_stride(scale),
        stride_shift_b=_batch_stride(shift),
        stride_rope_b=spb,
        stride_rope_l=spl,
        L=n,
        ROWS=rows,
        eps=eps,
        branch_eps=branch_eps,
        D=d,
        RESIDUAL=residual is not None,
        GATE=0 if gate is None else (2 if tanh_gate else 1),
        BRANCH_NORM=branch_weight is not None,
        NORM={None: 0, "layer": 1, "rms": 2}[norm],
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        ROPE_HALF=0 if rope is None else rope.shape[2],
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return h, y


def _adaptive_norm_launch(x, scale, shift, norm, weight, bias, eps, rope) -> torch.Tensor:
    return _launch(x, norm=norm, weight=weight, bias=bias, scale=scale, shift=shift, eps=eps, rope=rope)[1]


def _gated_residual_launch(residual, branch, gate, tanh_gate, branch_weight, branch_eps) -> torch.Tensor:
    return _launch(
        branch, residual=residual, gate=gate, tanh_gate=tanh_gate, branch_weight=branch_weight, branch_eps=branch_eps
    )[0]


def _gated_residual_norm_launch(
    residual, branch, gate, scale, shift, tanh_gate, branch_weight, branch_eps, norm, weight, bias, eps
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(
        branch,
        residual=residual,
        gate=gate,
        tanh_gate=tanh_gate,
        branch_weight=branch_weight,
        branch_eps=branch_eps,
        norm=norm,
        weight=weight,
        bias=bias,
        scale=scale,
        shift=shift,
        eps=eps,
    )


def _fake_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


_ADAPTIVE_NORM = RASOp(
    "adaptive_norm",
    schema="(Tensor x, Tensor? scale, Tensor? shift, str norm, Tensor? weight, Tensor? bias, float eps, "
    "Tensor? rope) -> Tensor",
    launch=_adaptive_norm_launch,
    reference=reference.adaptive_norm,
    fake=lambda x, scale, shift, norm, weight, bias, eps, rope: _fake_rows(x),
    differentiable=("x", "scale", "shift", "weight", "bias", "rope"),
)
# Two ops for the residual functions (one kernel): each has its own name in errors and its own output arity.
_GATED_RESIDUAL = RASOp(
    "gated_residual",
    schema="(Tensor residual, Tensor branch, Tensor? gate, bool tanh_gate, Tensor? branch_weight, float branch_eps) "
    "-> Tensor",
    launch=_gated_residual_launch,
    reference=reference.gated_residual,
    fake=lambda residual, branch, gate, tanh_gate, branch_weight, branch_eps: _fake_rows(residual),
    differentiable=("residual", "branch", "gate", "branch_weight"),
)
_GATED_RESIDUAL_NORM = RASOp(
    "gated_residual_norm",
    schema="(Tensor residual, Tensor branch, Tensor? gate, Tensor? scale, Tensor? shift, bool tanh_gate, "
    "Tensor? branch_weight, float branch_eps, str norm, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)",
    launch=_gated_residual_norm_launch,
    reference=reference.gated_residual_norm,
    fake=lambda residual, branch, gate, scale, shift, tanh_gate, branch_weight, branch_eps, norm, weight, bias, eps: (
        _fake_rows(residual),
        _fake_rows(residual),
    ),
    differentiable=("residual", "branch", "gate", "scale", "shift", "branch_weight", "weight", "bias"),
)


# ---------------------------------------------------------------------------------------------------------------
# Public ops


def _check_norm_args(b, d, device, norm, scale, shift, weight, bias, eps) -> float:
    _check_norm(norm)
    _check_per_sample("scale", scale, b, d, device)
    _check_per_sample("shift", shift, b, d, device)
    _check_vector("weight", weight, d, device)
    _check_vector("bias", bias, d, device)
    return check_float("eps", eps, positive=True)


def _check_residual_args(residual, branch, gate, tanh_gate, branch_weight, branch_eps) -> float:
    _check_x("residual", residual)
    b, n, d = residual.shape
    _check_rows("branch", branch, b, n, d, residual.device)
    _check_per_sample("gate", gate, b, d, residual.device)
    if not isinstance(tanh_gate, bool):
        raise TypeError(f"tanh_gate must be a bool, got {type(tanh_gate).__name__}")
    _check_vector("branch_weight", branch_weight, d, residual.device)
    return check_float("branch_eps", branch_eps, positive=True)


def adaptive_norm(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    norm: str = "layer",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rope(norm(x) * weight + bias) * (1 + scale) + shift`` in one pass; every factor is optional.

    x [B, L, D] (float32/bfloat16/float16, rows may be strided, last dimension contiguous); scale / shift [B or 1, D]
    (adaLN modulation, broadcast over the L rows); weight / bias [D] (the norm's affine parameters); ``norm`` is
    ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) over D; rope [B or 1, L, head_dim / 2] complex64 rotates each
    head's interleaved pairs (D a multiple of head_dim), as diffusers' ``apply_rotary_emb(use_real=False)``.
    Returns [B, L, D] contiguous in x's dtype; statistics and arithmetic in fp32.
    """
    _check_x("x", x)
    eps = _check_norm_args(x.shape[0], x.shape[2], x.device, norm, scale, shift, weight, bias, eps)
    _check_rope(rope, x)
    return _ADAPTIVE_NORM(x, scale, shift, norm, weight, bias, eps, rope)


def gated_residual(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    tanh_gate: bool = False,
    branch_weight: torch.Tensor | None = None,
    branch_eps: float = 1e-6,
) -> torch.Tensor:
    """``residual + g * branch`` with ``g = gate [B or 1, D]`` (``tanh(gate)`` with ``tanh_gate``; no gate: 1).

    With ``branch_weight`` [D] the branch is RMS-normalised first, ``rms_norm(branch, branch_eps) * branch_weight``
    (a post-norm, as Lumina-Next's ``norm2`` / ``ffn_norm2``). residual and branch [B, L, D]; returns [B, L, D]
    contiguous in residual's dtype, computed in fp32.
    """
    branch_eps = _check_residual_args(residual, branch, gate, tanh_gate, branch_weight, branch_eps)
    return _GATED_RESIDUAL(residual, branch, gate, tanh_gate, branch_weight, branch_eps)


def gated_residual_norm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    *,
    tanh_gate: bool = False,
    branch_weight: torch.Tensor | None = None,
    branch_eps: float = 1e-6,
    norm: str = "layer",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = gated_residual(residual, branch, gate, ...)`` and ``adaptive_norm(h, scale, shift, ...)`` in one pass.

    The block pattern "add the gated branch to the residual stream, then normalise and modulate the stream for the
    next sub-layer". Returns (h, y), both [B, L, D] contiguous in residual's dtype; y is computed from h as stored
    (rounded to its dtype), as the unfused code would.
    """
    branch_eps = _check_residual_args(residual, branch, gate, tanh_gate, branch_weight, branch_eps)
    b, _, d = residual.shape
    eps = _check_norm_args(b, d, residual.device, norm, scale, shift, weight, bias, eps)
    return _GATED_RESIDUAL_NORM(
        residual, branch, gate, scale, shift, tanh_gate, branch_weight, branch_eps, norm, weight, bias, eps
    )
