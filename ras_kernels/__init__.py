"""Region-Adaptive Sampling kernels: model-agnostic ops for sparse DiT steps.

Every op validates its inputs on the host and then runs Triton kernels (CUDA tensors) or its plain-PyTorch
reference (``<op>/reference.py``); ``RAS_BACKEND=torch|triton`` forces one.
"""

from .attention.ops import cached_kv_attention, flash_attention
from .gather.ops import gather_tokens, scatter_tokens
from .norm.ops import adaptive_norm, gated_residual, gated_residual_norm
from .select.ops import select_regions
from .swiglu.ops import swiglu

__all__ = [
    "adaptive_norm",
    "cached_kv_attention",
    "flash_attention",
    "gather_tokens",
    "gated_residual",
    "gated_residual_norm",
    "scatter_tokens",
    "select_regions",
    "swiglu",
]
__version__ = "0.1.0"
