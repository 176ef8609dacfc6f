"""Plain-PyTorch reference for the SwiGLU activation (the spec the Triton kernel is tested against).

``gate`` and ``up`` [..., F], the two projections of a gated feed-forward (Lumina-Next's ``linear_1`` and
``linear_3``); the result, in gate's dtype, is ``silu(gate) * up`` computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
