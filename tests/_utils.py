"""Helpers shared by the test files: device choice, Triton availability, NaN-poisoned outputs."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton kernels can run here: on a GPU, or on the CPU through the interpreter.
TRITON_RUNNABLE = HAS_TRITON and (HAS_CUDA or INTERPRET)
# Where the Triton path runs in this session.
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="Triton needs CUDA or TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """A tensor full of NaN, so any element a kernel fails to write shows up in the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
