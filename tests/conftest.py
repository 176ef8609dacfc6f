"""Shared test set-up: fresh random seeds and backend switches.

CPU runs execute the Triton kernels under ``TRITON_INTERPRET=1`` (set by the README's test command before
anything imports Triton); tests marked ``gpu`` need CUDA and run the full-size sweep. On a GPU the attention kernel
runs its fixed per-head-dim config unless ``RAS_ATTN_AUTOTUNE`` is set: autotuning every small test shape would take
tens of minutes. Every autotuner config is tested explicitly (head dims 64, 72, 80, 96), and one test runs the
autotuner itself.
"""

from __future__ import annotations

import os

import pytest
import torch

from ._utils import TRITON_RUNNABLE

os.environ.setdefault("RAS_ATTN_AUTOTUNE", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: full-size checks that need a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_seed():
    """A different seed every run (printed with a failure), so kernels are checked on fresh random data."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield


@torch.no_grad()  # Inductor's own allocations (e.g. its pad_mm patterns) can be leaves that require grad
def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype != torch.bool:
        return t.fill_(torch.iinfo(t.dtype).max)
    return t


@pytest.fixture
def poison_allocations(monkeypatch):
    """Every ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` made during the test comes filled with NaN
    (integers: their largest value), so an output or workspace element an op fails to write shows up as a wrong or
    non-finite result instead of whatever the allocator's memory held."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: _poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: _poison(empty_like(*args, **kwargs)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *args, **kwargs: _poison(new_empty(self, *args, **kwargs))
    )


@pytest.fixture
def triton_backend(monkeypatch, poison_allocations):
    """Force the Triton path of the public ops for one test (with NaN-poisoned allocations)."""
    if not TRITON_RUNNABLE:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RAS_BACKEND", "triton")


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the plain-PyTorch reference path of the public ops for one test."""
    monkeypatch.setenv("RAS_BACKEND", "torch")
