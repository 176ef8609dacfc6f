"""Plain-PyTorch reference for the fused DiT norms (the spec the Triton kernels are tested against).

Shapes: rows ``x`` / ``residual`` / ``branch`` [B, L, D]; per-sample modulation ``scale`` / ``shift`` / ``gate``
[Bm, D] with Bm in {1, B} (broadcast over the L rows); ``weight`` / ``bias`` / ``branch_weight`` [D]; RoPE
frequencies ``rope`` [Br, L, D_head / 2] complex with Br in {1, B}, applied per head to interleaved pairs. Everything
is computed in fp32 and rounded to x's dtype once at the end; a residual stream ``h`` is rounded before it is
normalised, as the unfused model code normalises the stored stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("layer", "rms")


def _normalize(
    v: torch.Tensor, norm: str, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``norm(v) * weight + bias`` of fp32 rows: LayerNorm (biased variance) or RMSNorm, one fused torch op each."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    if norm == "layer":
        return F.layer_norm(v, v.shape[-1:], w, b, eps)
    y = F.rms_norm(v, v.shape[-1:], w, eps)
    return y if b is None else y + b


def _per_sample(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()[:, None, :]


def _rotate(y: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each head's consecutive pairs (y[2i], y[2i+1]) by the complex frequency rope[..., i]."""
    b, n, d = y.shape
    half = rope.shape[-1]
    pairs = torch.view_as_complex(y.reshape(b, n, d // (2 * half), half, 2).contiguous())
    return torch.view_as_real(pairs * rope.to(torch.complex64)[:, :, None, :]).reshape(b, n, d)


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
    """``rope(norm(x) * weight + bias) * (1 + scale) + shift``, each factor optional; see the module docstring."""
    y = _normalize(x.float(), norm, eps, weight, bias)
    if scale is not None and shift is not None:
        y = torch.addcmul(_per_sample(shift), y, 1 + _per_sample(scale))
    elif scale is not None:
        y = y * (1 + _per_sample(scale))
    elif shift is not None:
        y = y + _per_sample(shift)
    if rope is not None:
        y = _rotate(y, rope)
    return y.to(x.dtype)


def gated_residual(
    residual: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    tanh_gate: bool = False,
    branch_weight: torch.Tensor | None = None,
    branch_eps: float = 1e-6,
) -> torch.Tensor:
    """``h = residual + g * b`` with ``g = gate`` (or ``tanh(gate)``; 1 without a gate) and ``b = branch``, or
    ``b = rms_norm(branch) * branch_weight`` when ``branch_weight`` is given; in residual's dtype."""
    v = branch.float()
    if branch_weight is not None:
        v = _normalize(v, "rms", branch_eps, branch_weight)
    if gate is None:
        return (residual.float() + v).to(residual.dtype)
    g = _per_sample(gate)
    return torch.addcmul(residual.float(), v, torch.tanh(g) if tanh_gate else g).to(residual.dtype)


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
    """``(h, adaptive_norm(h, scale, shift, ...))`` with ``h = gated_residual(residual, branch, gate, ...)``."""
    h = gated_residual(residual, branch, gate, tanh_gate=tanh_gate, branch_weight=branch_weight, branch_eps=branch_eps)
    return h, adaptive_norm(h, scale, shift, norm=norm, weight=weight, bias=bias, eps=eps)
