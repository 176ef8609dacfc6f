"""Backend choice and the input checks shared by every op.

Each public op runs either its plain-PyTorch reference (``reference.py`` beside it) or its Triton kernels.
The choice is made per call, on the host, before anything is launched:

* ``RAS_BACKEND=torch``  always the reference;
* ``RAS_BACKEND=triton`` always Triton (CPU tensors need ``TRITON_INTERPRET=1``); an error if Triton is missing;
* unset or ``auto``      Triton for CUDA tensors when Triton imports, the reference otherwise.
"""

from __future__ import annotations

import contextlib
import os

import torch

_BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend() -> str:
    """The value of ``RAS_BACKEND`` (default ``auto``), validated."""
    value = os.environ.get("RAS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"RAS_BACKEND must be one of {', '.join(_BACKENDS)}; got {value!r}")
    return value


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` runs its Triton kernels."""
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("RAS_BACKEND=triton but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"RAS_BACKEND=triton with tensors on {device.type}: Triton runs on CUDA tensors, "
                "or on CPU tensors only under TRITON_INTERPRET=1"
            )
        return True
    return device.type == "cuda" and _triton_available()


def triton_path(op, launcher, device: torch.device):
    """The Triton entry point of an op for tensors on ``device``: the plain launcher for an eager call (CUDA-graph
    capture included: no custom-op dispatch cost), the registered torch.library op while torch.compile traces (one
    opaque node), None when the plain-PyTorch reference runs instead."""
    if not use_triton(device):
        return None
    return op if torch.compiler.is_compiling() else launcher


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a tensor of the given kind."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({accepted}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_unit_stride(name: str, t: torch.Tensor) -> None:
    """The kernels address rows through strides but need each row contiguous (unit stride in the last dimension)."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride in its last dimension (rows contiguous), got strides {tuple(t.stride())}"
        )


def row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a [B, N, D] tensor, 0 for a dimension of size 1 (never stepped along)."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
