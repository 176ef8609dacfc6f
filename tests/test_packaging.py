"""Packaging: ``ras_kernels`` imports and runs without diffusers or einops (they belong to the ``models`` extra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Importing a module mapped to None in sys.modules raises ImportError, as if it were not installed.
SCRIPT = """
import sys
sys.modules["diffusers"] = None
sys.modules["einops"] = None
import torch
import ras_kernels
x = torch.randn(2, 8, 4)
idx = torch.tensor([[1, 5], [0, 7]])
assert torch.equal(ras_kernels.gather_tokens(x, idx), x[torch.arange(2)[:, None], idx])
import ras_models  # the controller imports; only apply_ras needs diffusers
try:
    ras_models.apply_ras(torch.nn.Linear(2, 2))
except ImportError as err:
    assert "ras-kernels[models]" in str(err), err
else:
    raise AssertionError("apply_ras without diffusers did not raise ImportError")
print("ok")
"""


def test_kernels_import_without_diffusers():
    env = {**os.environ, "RAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_core_dependencies_exclude_model_libraries():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "diffusers" not in core and "einops" not in core
    models = " ".join(project["optional-dependencies"]["models"])
    assert "diffusers" in models and "einops" in models
