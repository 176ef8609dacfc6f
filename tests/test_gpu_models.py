"""Adapters on a CUDA GPU: Triton ops against the plain-PyTorch path, CUDA graphs against eager, no host sync."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from ras_models import RASConfig, apply_ras

from ._models import tiny_lumina_transformer, tiny_sd3_transformer
from ._utils import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def _inputs(family: str, transformer, latent: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    if family == "sd3":
        kwargs = {
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
            "pooled_projections": torch.randn(2, 16, generator=g),
        }
    else:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 3:] = False
        kwargs = {
            "encoder_hidden_states": torch.randn(2, 6, 24, generator=g),
            "encoder_mask": mask,
            "image_rotary_emb": get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384),
            "cross_attention_kwargs": {"base_sequence_length": 16},
        }
    return x, kwargs


def _generate(family, transformer, x, kwargs, handle, steps):
    """A CFG flow-matching loop over a bare transformer; returns the final latents."""
    x = x.clone()
    if handle is not None:
        handle.reset()
    for i in range(steps):
        sigma, nxt = 1 - i / steps, 1 - (i + 1) / steps
        t = torch.full((2,), sigma * 1000 if family == "sd3" else 1 - sigma, device=x.device)
        out = transformer(torch.cat([x, x]), timestep=t, return_dict=False, **kwargs)[0][:, : x.shape[1]]
        uncond, cond = out.chunk(2)
        guided = uncond + 4.0 * (cond - uncond)
        if handle is not None:
            handle.observe(guided)
        x = x + (nxt - sigma) * guided
    return x


def _model(family):
    model = tiny_sd3_transformer() if family == "sd3" else tiny_lumina_transformer()
    if family == "lumina":
        with torch.no_grad():
            model.pad_token.normal_()
    return model.cuda().to(torch.float16)


CONFIG = RASConfig(num_steps=10, warmup_steps=2, reset_steps=(6,), sample_ratio=0.25)


class _SameSelections:
    """Records the active sets a run selects; inside ``replayed()`` a run is handed them, in order, instead of
    selecting its own. With the same tokens chosen, the Triton and the plain-PyTorch runs differ only by their
    kernels' rounding, which a tight bound can check: left to select on their own, a near-tie of two fp16 scores
    (random weights drawn from a fresh seed) can send them down different paths."""

    def __init__(self, monkeypatch):
        from ras_models import session

        self.recorded: list[torch.Tensor] = []
        self._replay = None
        select = session.select_regions

        def select_or_replay(*args, **kwargs):
            if self._replay is not None:
                return next(self._replay)
            active = select(*args, **kwargs)
            self.recorded.append(active.clone())
            return active

        monkeypatch.setattr(session, "select_regions", select_or_replay)

    @contextlib.contextmanager
    def replayed(self):
        self._replay = iter(self.recorded)
        try:
            yield
        finally:
            assert next(self._replay, None) is None, "the replaying run selected fewer times than the recorded one"
            self._replay, self.recorded = None, []


def _assert_kernels_close(eager, reference):
    """fp16, the same selections, different attention / norm kernels (each step's rounding carried on)."""
    assert (eager.float() - reference.float()).abs().max() < 0.02 * reference.float().abs().max()


# The selection rules and the forecast of left-out tokens keep state on the device (metric "random": its seed;
# "delta": the previous output and scores; reuse "linear": the step and the output history) that every replay
# must read and advance without the host.
FAMILY_OPTIONS = [
    pytest.param("sd3", {}, id="sd3"),
    pytest.param("lumina", {}, id="lumina"),
    pytest.param("sd3", {"reuse": "linear"}, id="sd3-reuse-linear"),
    pytest.param("sd3", {"metric": "random", "seed": 3}, id="sd3-metric-random"),
    pytest.param("sd3", {"metric": "delta"}, id="sd3-metric-delta"),
    pytest.param("sd3", {"metric": "attention"}, id="sd3-metric-attention"),
    pytest.param("lumina", {"metric": "attention"}, id="lumina-metric-attention"),
]


@pytest.mark.parametrize("family, options", FAMILY_OPTIONS)
def test_cuda_graphs_match_eager_and_triton_matches_torch(family, options, monkeypatch):
    config = replace(CONFIG, **options)
    model = _model(family)
    x, kwargs = _inputs(family, model, 32)
    x = x.cuda().half()
    # The RoPE table stays on the host, as LuminaPipeline passes it (the model moves it itself).
    kwargs = {k: (v.cuda() if torch.is_tensor(v) and k != "image_rotary_emb" else v) for k, v in kwargs.items()}
    kwargs = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    selections = _SameSelections(monkeypatch)
    with torch.no_grad():
        with apply_ras(model, config, cuda_graphs=False) as h:
            eager = _generate(family, model, x, kwargs, h, 10)
        monkeypatch.setenv("RAS_BACKEND", "torch")
        with selections.replayed(), apply_ras(model, config, cuda_graphs=False) as h:
            reference = _generate(family, model, x, kwargs, h, 10)
        monkeypatch.setenv("RAS_BACKEND", "auto")
        with apply_ras(model, config, cuda_graphs=True) as h:
            graphed = [_generate(family, model, x, kwargs, h, 10) for _ in range(3)]
            assert len(h.graphs) == 2  # dense and one RAS shape, captured once and replayed afterwards
    _assert_kernels_close(eager, reference)
    for out in graphed:  # the same kernels replayed: exact
        torch.testing.assert_close(out, eager, atol=0, rtol=0)


@pytest.mark.parametrize("family, options", FAMILY_OPTIONS)
def test_generation_without_host_sync(family, options):
    config = replace(CONFIG, **options)
    model = _model(family)
    x, kwargs = _inputs(family, model, 32)
    x = x.cuda().half()
    kwargs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    kwargs = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
    with torch.no_grad(), apply_ras(model, config, cuda_graphs=True) as h:
        _generate(family, model, x, kwargs, h, 10)  # first generation: eager runs and captures
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _generate(family, model, x, kwargs, h, 10)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_lumina_pipeline_rope_table_reaches_the_graphs_on_the_device(monkeypatch):
    """Through LuminaPipeline with CUDA graphs: the transformer's steps (eager and captured) receive the RoPE table
    on the device, so graph replays never copy it from the host; with the builder memoised the latents equal those
    of the table rebuilt every step."""
    from diffusers.pipelines.lumina import pipeline_lumina

    from bench.pipelines import build_pipeline, generate, prompt_inputs

    builder = pipeline_lumina.get_2d_rotary_pos_embed_lumina
    pipe = build_pipeline(_model("lumina"))
    devices = []
    pipe.transformer.patch_embedder.register_forward_pre_hook(lambda module, args: devices.append(args[1].device))
    inputs = prompt_inputs(pipe.transformer, 1, seed=0) | {"scaling_watershed": 0.5}

    def run():
        return [generate(pipe, inputs, steps=10, size=96, seed=0) for _ in range(2)]

    with torch.no_grad(), apply_ras(pipe, CONFIG, cuda_graphs=True) as h:
        with monkeypatch.context() as m:
            m.setattr(pipeline_lumina, "get_2d_rotary_pos_embed_lumina", builder)  # rebuilt every step, on the host
            per_step = run()
        memoised = run()
        assert len(h.graphs) == 2  # dense and one RAS shape: the same device-table layout in every step
    assert devices and {d.type for d in devices} == {"cuda"}  # eager and captured steps alike
    for out in per_step + memoised:
        torch.testing.assert_close(out, per_step[0], atol=0, rtol=0)


def _flux_pipeline():
    """A tiny FluxPipeline with head dim 64 (the attention kernel's tuned sizes), fp16 on the GPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        axes_dims_rope=(8, 28, 28),
    )
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer, **none)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda", torch.float16)


def _check_pipeline(pipe, config: RASConfig, generate, graphs: int, monkeypatch) -> None:
    """``generate()`` dense, with RAS on the Triton kernels eagerly, on the torch path with the same selections, and
    three times with CUDA graphs (``graphs`` held after each: captured in the first, replayed after, except that
    Wan 2.2 drops an expert's graphs with its caches when the other expert starts and captures them again in the
    next generation): the graphs replay the eager result exactly, the two backends differ only by rounding, RAS
    changed the result, and remove() restored the model."""
    selections = _SameSelections(monkeypatch)
    with torch.no_grad():
        dense = generate()
        with apply_ras(pipe, config, cuda_graphs=False):
            eager = generate()
        monkeypatch.setenv("RAS_BACKEND", "torch")
        with selections.replayed(), apply_ras(pipe, config, cuda_graphs=False):
            reference = generate()
        monkeypatch.setenv("RAS_BACKEND", "auto")
        with apply_ras(pipe, config, cuda_graphs=True) as h:
            graphed = [generate()]
            captured = len(h.graphs)
            graphed += [generate() for _ in range(2)]
            assert captured == len(h.graphs) == graphs  # no graph accumulates over generations
        again = generate()
    torch.testing.assert_close(again, dense, atol=0, rtol=0)  # remove() restored the model
    assert (reference.float() - dense.float()).abs().max() > 1e-2  # RAS ran
    _assert_kernels_close(eager, reference)
    for out in graphed:
        torch.testing.assert_close(out, eager, atol=0, rtol=0)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_flux_pipeline_graphs_match_eager_and_triton_matches_torch(true_cfg_scale, monkeypatch):
    """Through FluxPipeline, non-square, two prompts; with true_cfg_scale > 1 two calls per step ("cond" and
    "uncond"), each with its own caches and graphs."""
    pipe = _flux_pipeline()
    g = torch.Generator().manual_seed(0)
    prompts = {
        "prompt_embeds": torch.randn(2, 6, 24, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 16, generator=g),
    }
    if true_cfg_scale > 1:
        prompts |= {
            "negative_prompt_embeds": torch.randn(2, 6, 24, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(2, 16, generator=g),
        }
    prompts = {k: v.to("cuda", torch.float16) for k, v in prompts.items()}

    def generate():
        generator = torch.Generator().manual_seed(1)
        return pipe(
            **prompts, height=256, width=384, num_inference_steps=10, true_cfg_scale=true_cfg_scale,
            generator=generator, output_type="latent",
        ).images  # fmt: skip

    _check_pipeline(pipe, CONFIG, generate, 2 if true_cfg_scale == 1 else 4, monkeypatch)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("family", ["sd3", "lumina", "flux"])
def test_model_on_a_second_device(family):
    """The model on cuda:1 while cuda:0 is current: eager steps and CUDA graph capture and replay run on the model's
    device, and give what the same model gives on cuda:0."""
    torch.cuda.set_device(0)
    if family == "flux":
        pipe = _flux_pipeline()
        g = torch.Generator().manual_seed(0)
        prompts = {"prompt_embeds": torch.randn(1, 6, 24, generator=g), "pooled_prompt_embeds": torch.randn(1, 16)}

        def run(device):
            pipe.to(device)
            inputs = {k: v.to(device, torch.float16) for k, v in prompts.items()}
            generator = torch.Generator().manual_seed(1)
            return pipe(**inputs, height=256, width=256, num_inference_steps=10, generator=generator,
                        output_type="latent").images  # fmt: skip
    else:
        model = _model(family)
        x, kwargs = _inputs(family, model, 32)

        def run(device):
            model.to(device)
            args = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            args = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}
            return _generate(family, model, x.to(device).half(), args, handle, 10)

    outs = {}
    with torch.no_grad():
        for device in ("cuda:0", "cuda:1"):
            with apply_ras(pipe if family == "flux" else model, CONFIG, cuda_graphs=True) as handle:
                outs[device] = [run(device) for _ in range(2)]  # eager + capture, then replay
                assert len(handle.graphs) == 2
    assert torch.cuda.current_device() == 0
    assert all(out.device == torch.device("cuda:1") for out in outs["cuda:1"])
    for out in outs["cuda:1"]:
        torch.testing.assert_close(out.cpu(), outs["cuda:0"][0].cpu(), atol=1e-3, rtol=1e-3)


def _wan_pipeline():
    """A tiny Wan 2.2 layout WanPipeline (two experts) with head dim 64, fp16 on the GPU."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    def expert():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
            text_dim=24, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=64,
        )  # fmt: skip

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=expert(),
        transformer_2=expert(), boundary_ratio=0.875,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda", torch.float16)


def test_wan_pipeline_graphs_match_eager_and_triton_matches_torch(monkeypatch):
    """Through WanPipeline with two experts and CFG (four calls per step shape: two experts x "cond" / "uncond"),
    a non-square 9-frame video: CUDA graphs replay what the eager Triton path computes, which is close to the
    plain-PyTorch path; remove() restores the dense pipeline exactly."""
    pipe = _wan_pipeline()
    g = torch.Generator().manual_seed(0)
    prompts = {name: torch.randn(2, 7, 24, generator=g) for name in ("prompt_embeds", "negative_prompt_embeds")}
    prompts = {k: v.to("cuda", torch.float16) for k, v in prompts.items()}
    config = RASConfig.wan(num_steps=10, warmup_steps=2, reset_steps=(6,), sample_ratio=0.25)

    def generate():
        generator = torch.Generator().manual_seed(1)
        return pipe(
            **prompts, num_frames=9, height=128, width=192, num_inference_steps=10, guidance_scale=5.0,
            generator=generator, output_type="latent",
        ).frames  # fmt: skip

    # Held after a generation: the second expert's, 2 calls x (dense, RAS) step shapes (the first expert's 4 are
    # dropped at the switch).
    _check_pipeline(pipe, config, generate, 4, monkeypatch)
