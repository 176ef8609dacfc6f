"""Flux under RAS with what Flux users already use: torch.compile, model CPU offload, diffusers' caches, LoRA.

Each either composes (the same latents as the run without the twist, or as the dense pipeline at ratio 1.0) or is
refused with an error that names the conflict, before anything runs. CPU, tiny random-weight FluxPipeline, the
plain-PyTorch path.
"""

from __future__ import annotations

import pytest
import torch

from ras_models import RASConfig, apply_ras

from ._models import tiny_flux_pipeline

CONFIG = RASConfig.flux(num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=0.5)
SIZE = {"height": 128, "width": 192}
# LoRA on every kind of layer RAS touches or runs: the gather point, attention projections, the double block's
# feed-forward, the single block's fused-away output projection and its MLP, the scatter point.
LORA_TARGETS = (
    "x_embedder",
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.proj_mlp",
    "proj_out",
)
ATTENTION_TARGETS = ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.attn.to_v")


def _pipe():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompts() -> dict:
    g = torch.Generator().manual_seed(3)
    embeds, pooled = torch.randn(2, 6, 24, generator=g), torch.randn(2, 16, generator=g)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _run(pipe, prompts, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out = pipe(**prompts, **SIZE, num_inference_steps=6, generator=generator, output_type="latent", **kwargs)
    return out.images


def _lora(transformer, targets, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA in diffusers' key format, large enough to change the output."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name in targets:
        layer = transformer.get_submodule(name)
        weights[f"transformer.{name}.lora_A.weight"] = 0.5 * torch.randn(2, layer.in_features, generator=g)
        weights[f"transformer.{name}.lora_B.weight"] = 0.5 * torch.randn(layer.out_features, 2, generator=g)
    return weights


# ---- torch.compile ----


@pytest.mark.parametrize("when", ["before", "after"])
def test_compiled_transformer_gives_the_uncompiled_result(when, torch_backend):
    """``transformer.compile()`` (in place; dynamo's eager backend keeps the test fast: it traces our patched code
    as Inductor would, without generating kernels), before or after apply_ras."""
    pipe, prompts = _pipe(), _prompts()
    dense = _run(pipe, prompts)
    with apply_ras(pipe, CONFIG):
        expected = _run(pipe, prompts)
    if when == "before":
        pipe.transformer.compile(backend="eager")
    with apply_ras(pipe, CONFIG):
        if when == "after":
            pipe.transformer.compile(backend="eager")
        got = [_run(pipe, prompts) for _ in range(2)]
    for out in got:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_run(pipe, prompts), dense, atol=1e-5, rtol=0)


def test_compiled_wrapper_is_refused_with_the_fix(torch_backend):
    pipe = _pipe()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with pytest.raises(TypeError, match=r"_orig_mod.*compile\(\)"):
        apply_ras(pipe)


# ---- enable_model_cpu_offload ----


@pytest.mark.parametrize("when", ["before", "after"])
def test_model_cpu_offload_composes(when, torch_backend):
    pipe, prompts = _pipe(), _prompts()
    with apply_ras(pipe, CONFIG):
        expected = _run(pipe, prompts)
    if when == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    with apply_ras(pipe, CONFIG):
        if when == "after":
            pipe.enable_model_cpu_offload(device="cpu")
        assert "_hf_hook" in vars(pipe.transformer), "the offload hook must be installed for this test to mean anything"
        got = [_run(pipe, prompts) for _ in range(2)]
    for out in got:
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


# ---- diffusers' caches ----


def test_diffusers_cache_is_refused_at_apply(torch_backend):
    from diffusers import TaylorSeerCacheConfig

    pipe = _pipe()
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2))
    with pytest.raises(ValueError, match="disable_cache"):
        apply_ras(pipe, CONFIG)
    assert "forward" not in vars(pipe.transformer), "a refused apply_ras must leave the model unpatched"
    pipe.transformer.disable_cache()
    with apply_ras(pipe, CONFIG):
        _run(pipe, _prompts())


# ---- LoRA (needs peft, as diffusers' load_lora_weights does) ----


def test_lora_loaded_before_apply_composes(torch_backend):
    """Unfused LoRA layers (peft) on every kind of layer: at ratio 1.0 RAS reproduces the dense LoRA pipeline, and at
    0.5 it gives what it gives on a model whose weights hold the fused LoRA (no peft layers at all)."""
    pytest.importorskip("peft", reason="LoRA loading needs peft (a test dependency)")
    pipe, prompts = _pipe(), _prompts()
    plain = _run(pipe, prompts)
    pipe.load_lora_weights(_lora(pipe.transformer, LORA_TARGETS))
    dense = _run(pipe, prompts)
    assert (dense - plain).abs().max() > 1e-2, "the LoRA must change the output for this test to mean anything"
    with apply_ras(pipe, RASConfig.flux(num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=1.0)):
        # fp32 in another order over 6 steps: differences reach ~1.5e-5 on some seeds.
        torch.testing.assert_close(_run(pipe, prompts), dense, atol=1e-4, rtol=0)
    with apply_ras(pipe, CONFIG):
        unfused = _run(pipe, prompts)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    assert type(pipe.transformer.x_embedder) is torch.nn.Linear
    with apply_ras(pipe, CONFIG):
        torch.testing.assert_close(_run(pipe, prompts), unfused, atol=1e-4, rtol=0)


def test_lora_loaded_after_apply(torch_backend):
    """On layers RAS only calls (attention projections): works, as if loaded first. On a module RAS wraps (the
    gather point): the next call raises, naming it; so does unloading such a LoRA while RAS is applied."""
    pytest.importorskip("peft", reason="LoRA loading needs peft (a test dependency)")
    pipe, prompts = _pipe(), _prompts()
    pipe.load_lora_weights(_lora(pipe.transformer, ATTENTION_TARGETS), adapter_name="first")
    with apply_ras(pipe, CONFIG):
        expected = _run(pipe, prompts)
    pipe.unload_lora_weights()
    with apply_ras(pipe, CONFIG):
        pipe.load_lora_weights(_lora(pipe.transformer, ATTENTION_TARGETS), adapter_name="first")
        torch.testing.assert_close(_run(pipe, prompts), expected, atol=1e-5, rtol=0)
        pipe.load_lora_weights(_lora(pipe.transformer, ("x_embedder",)), adapter_name="second")
        with pytest.raises(RuntimeError, match="x_embedder"):
            _run(pipe, prompts)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(_lora(pipe.transformer, ("x_embedder",)))
    with apply_ras(pipe, CONFIG):
        _run(pipe, prompts)
        pipe.unload_lora_weights()
        with pytest.raises(RuntimeError, match="x_embedder"):
            _run(pipe, prompts)
