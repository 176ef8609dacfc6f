"""docs/integration.md, "Adding a model family": its code blocks run as written, and the adapter they define is
checked against the dense model (CPU, fp32). Each test restores the adapter registry the section adds to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ras_models
from ras_models import ModelAdapter, RASConfig, apply_ras, register_adapter, supported_models
from ras_models import adapter as adapter_module

DOC = Path(__file__).resolve().parents[1] / "docs" / "integration.md"
SECTION = "## Adding a model family"
STEPS = 6


def _section_code() -> str:
    """The python code blocks of the section, in order."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC.name} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "the section has no python code block"
    return "\n".join(blocks)


@pytest.fixture
def doc(monkeypatch, torch_backend):
    """The namespace the section's code leaves behind (the registry is restored afterwards)."""
    monkeypatch.setattr(adapter_module, "_registered", dict(adapter_module._registered))
    namespace: dict = {}
    exec(compile(_section_code(), str(DOC), "exec"), namespace)
    return namespace


def _generate(model, latents, caption, handle=None, trace=None):
    """The section's Euler loop; with a handle, RAS observes every step's output."""
    with torch.no_grad():
        for step in range(STEPS):
            velocity = model(latents, caption, torch.full((len(latents),), 1000 - 150 * step)).sample
            if trace is not None:
                trace.append(velocity.clone())
            if handle is not None:
                handle.observe(velocity)
            latents = latents - velocity / STEPS
    return latents


def _config(ratio: float) -> RASConfig:
    return RASConfig(num_steps=STEPS, warmup_steps=2, reset_steps=(4,), sample_ratio=ratio)


def _modules(model, name):
    return [block.get_submodule(name) for block in model.transformer_blocks]


def test_section_registers_and_runs_the_family(doc):
    model = doc["model"]
    assert isinstance(doc["handle"], ras_models.RASHandle)
    assert "PixArtTransformer2DModel" in supported_models()
    assert "forward" not in vars(model), "leaving the with block must remove RAS"
    assert doc["latents"].shape == (1, 4, 16, 16) and torch.isfinite(doc["latents"]).all()
    with apply_ras(model) as handle:  # no config: the adapter's preset
        assert handle.session.config == RASConfig()
        assert all(type(m.processor).__name__ == "PixArtSelfAttention" for m in _modules(model, "attn1"))
        assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in _modules(model, "attn2"))
        with pytest.raises(ValueError, match="attention_mask"):
            model(doc["latents"], doc["caption"], torch.tensor([999]), attention_mask=torch.ones(1, 64))


def test_ratio_one_reproduces_the_dense_model(doc):
    model, caption = doc["model"], torch.randn(2, 5, 12)
    noise = torch.randn(2, 4, 16, 16)
    dense = _generate(model, noise, caption)
    with apply_ras(model, _config(1.0)) as handle:
        ras = _generate(model, noise, caption, handle)
    torch.testing.assert_close(ras, dense, atol=1e-5, rtol=0)


def test_ras_steps_recompute_only_the_active_tokens(doc):
    model, caption = doc["model"], torch.randn(2, 5, 12)
    noise = torch.randn(2, 4, 16, 16)
    dense = _generate(model, noise, caption)
    trace, actives = [], []
    with apply_ras(model, _config(0.25)) as handle:
        observe = handle.observe

        def record(guided):
            observe(guided)
            actives.append(handle.session.active)

        handle.observe = record
        ras = _generate(model, noise, caption, handle, trace)
    assert (ras - dense).abs().max() > 1e-3
    patches = [v.unfold(2, 2, 2).unfold(3, 2, 2).flatten(2, 3).flatten(3) for v in trace]  # [B, C, N, 4]
    for step in range(STEPS):
        active = actives[step - 1] if step else None
        if step in (0, 1, 4):  # warm-up and reset steps: dense
            assert active is None
            continue
        assert active.shape == (2, 64 - int(0.75 * 64))
        computed = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, active, True)
        now, before = patches[step].transpose(1, 2), patches[step - 1].transpose(1, 2)  # [B, N, C, 4]
        assert torch.equal(now[~computed], before[~computed])
        assert (now[computed] - before[computed]).abs().amax(dim=(1, 2)).min() > 0


def test_remove_restores_the_model_exactly(doc):
    model, caption = doc["model"], torch.randn(1, 5, 12)
    noise = torch.randn(1, 4, 16, 16)
    dense = _generate(model, noise, caption)
    processors = dict(model.attn_processors)
    attributes = {id(m): dict(vars(m)) for m in model.modules()}
    handle = apply_ras(model, _config(0.25))
    assert not torch.equal(_generate(model, noise, caption, handle), dense)
    handle.remove()
    assert all(p is processors[name] for name, p in model.attn_processors.items())
    for m in model.modules():
        assert vars(m).keys() == attributes[id(m)].keys()
        assert all(vars(m)[k] is v for k, v in attributes[id(m)].items() if k not in ("_parameters", "_buffers"))
    assert torch.equal(_generate(model, noise, caption), dense)


def test_default_rope_keeps_the_active_rows_of_each_table(doc):
    model = doc["model"]
    with apply_ras(model, _config(0.25)) as handle, torch.no_grad():
        for _ in range(2):  # the dense steps choose the first RAS step's tokens
            handle.observe(model(torch.randn(1, 4, 16, 16), torch.randn(1, 5, 12), torch.tensor([999])).sample)
        handle.session.begin_step(1, 16, 16, "cpu")
        cos, sin = torch.randn(1, 64, 1, 8), torch.randn(1, 64, 1, 8)
        rows = ModelAdapter(handle, model).rope(lambda: (cos, sin))
        active = handle.session.active[0]
        assert isinstance(rows, tuple) and torch.equal(rows[0], cos[:, active]) and torch.equal(rows[1], sin[:, active])


def test_register_adapter_checks_its_argument(doc):
    pixart = doc["PixArtAdapter"]
    for bad in (object, ModelAdapter, "PixArtAdapter"):
        with pytest.raises(TypeError, match="subclass of ras_models.ModelAdapter"):
            register_adapter(bad)
    incomplete = type("Incomplete", (ModelAdapter,), {"transformer_class": torch.nn.Linear, "family": "x"})
    with pytest.raises(TypeError, match="Incomplete must declare gather_at"):
        register_adapter(incomplete)
    no_processor = type("NoProcessor", (pixart,), {"processors": {}})
    with pytest.raises(ValueError, match="no RAS processor for its 'self' attention"):
        register_adapter(no_processor)
    with pytest.raises(ValueError, match="Attention kind"):
        ras_models.Attention("blocks.*.attn", "full", torch.nn.Module)
