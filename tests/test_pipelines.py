"""bench.pipelines (random-weight pipelines without encoders, timed calls), bench.first_call / bench.soak at tiny
size, and the Lumina adapter's RoPE table: built once per distinct table while RAS is applied, same results."""

from __future__ import annotations

import csv
import gc

import pytest
import torch

from bench import e2e, pipelines, soak
from ras_models import RASConfig, apply_ras

from ._models import (
    tiny_flux_transformer,
    tiny_lumina_pipeline,
    tiny_lumina_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_wan_transformer,
)

BUILDER = "get_2d_rotary_pos_embed_lumina"


def _lumina_pipeline():
    transformer = tiny_lumina_transformer()
    with torch.no_grad():
        transformer.pad_token.normal_()  # created uninitialised by diffusers
    return pipelines.build_pipeline(transformer)


TINY = {"sd3": tiny_sd3_transformer, "lumina": tiny_lumina_transformer, "flux": tiny_flux_transformer}


@pytest.mark.parametrize("family", ["sd3", "lumina", "flux"])
def test_pipeline_without_encoders_runs_on_prompt_embeddings(family, torch_backend):
    transformer = TINY[family]()
    pipe = pipelines.build_pipeline(transformer)
    for key, value in pipelines.SCHEDULERS[family].items():
        assert pipe.scheduler.config[key] == value
    assert pipe.vae is None and pipe.text_encoder is None and pipe.tokenizer is None
    inputs = pipelines.prompt_inputs(transformer, 2, seed=0)
    assert inputs["prompt_embeds"].shape[:2] == (2, pipelines.TEXT_TOKENS[family])
    if family == "lumina":
        assert inputs["negative_prompt_attention_mask"].sum(1).tolist() == [pipelines.NEGATIVE_TOKENS] * 2
    latents, wall_ms, step_ms = pipelines.timed_call(pipe, inputs, steps=3, size=64, seed=0)
    # FluxPipeline returns its packed latents: one token of 64 channels per 2x2 patch of the 8x8 latent.
    shape = (2, 16, 64) if family == "flux" else (2, transformer.config.in_channels, 8, 8)
    assert latents.shape == shape and pipelines.num_tokens(pipe, 64) == 16  # 8x8 latent, 2x2 patches
    assert len(step_ms) == 3 and all(t > 0 for t in step_ms) and sum(step_ms) <= wall_ms
    again = pipelines.generate(pipe, inputs, steps=3, size=64, seed=0)
    torch.testing.assert_close(again, latents, atol=0, rtol=0)


def test_wan_pipeline_without_encoders_runs_on_prompt_embeddings(torch_backend, capsys):
    """WanPipeline without a VAE: the Wan VAE's factors (4 in time, 8 in space) give the latent video's shape."""
    transformer = tiny_wan_transformer()
    pipe = pipelines.build_pipeline(transformer)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert all(pipe.scheduler.config[key] == value for key, value in pipelines.SCHEDULERS["wan"].items())
    inputs = pipelines.prompt_inputs(transformer, 2, seed=0)
    assert inputs["prompt_embeds"].shape == inputs["negative_prompt_embeds"].shape == (2, 512, 16)
    latents, wall_ms, step_ms = pipelines.timed_call(
        pipe, inputs, steps=3, size=(64, 96), seed=0, frames=5, progress="dense"
    )
    assert latents.shape == (2, 4, 2, 8, 12) and pipelines.num_tokens(pipe, (64, 96), frames=5) == 2 * 4 * 6
    assert len(step_ms) == 3 and sum(step_ms) <= wall_ms
    assert capsys.readouterr().err.endswith("\r  dense step 1/3\r  dense step 2/3\r  dense step 3/3\n")
    again = pipelines.generate(pipe, inputs, steps=3, size=(64, 96), seed=0, frames=5)
    torch.testing.assert_close(again, latents, atol=0, rtol=0)


@pytest.mark.parametrize("model", ["wan", "wan-14b"])
def test_wan_layouts(model):
    """The published layouts: Wan 2.1 T2V 1.3B and 14B (the layout of each Wan 2.2 A14B expert)."""
    family, published, tiny = pipelines.LAYOUTS[model]
    heads, ffn, layers = (12, 8960, 30) if model == "wan" else (40, 13824, 40)
    assert family == "wan" and published["attention_head_dim"] == 128 and published["text_dim"] == 4096
    assert (published["num_attention_heads"], published["ffn_dim"], published["num_layers"]) == (heads, ffn, layers)
    assert published["patch_size"] == tiny["patch_size"] == (1, 2, 2) and published["in_channels"] == 16


def test_wan_through_bench_e2e(capsys, torch_backend):
    """bench.e2e --model wan times pipe(...) calls (no own loop) of the tiny layout: dense and RAS rows."""
    e2e.main(
        ["--model", "wan", "--steps", "10", "--ratio", "0.5", "--frames", "5", "--resolution", "32x48"]
        + ["--device", "cpu", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip() for row in rows] == ["diffusers dense eager", "RAS ratio 0.5 (static, eager)"]
    tokens = float(rows[1].split("|")[2].strip().rstrip("%"))
    # 50-step preset at 10 steps: 7 warm-up, resets 4 and 7: 8 dense steps of 12 tokens, 2 RAS steps of 6.
    assert tokens == pytest.approx(100 * (8 * 12 + 2 * 6) / (10 * 12), abs=0.05)


def test_wan_two_experts_through_bench_e2e(capsys, monkeypatch, torch_backend):
    """bench.e2e --model wan-a14b: Wan 2.2's two experts in one WanPipeline; the step the pipeline first hands to
    transformer_2 (observed here by a hook on it) runs dense, and the tokens column counts it so. The dense
    baseline warms up with a whole call (the second expert takes over late in it)."""
    built, call_steps = [], []

    def build(*args, **kwargs):
        built.append(pipelines.build_pipeline(*args, **kwargs))
        return built[-1]

    def timed(*args, steps, **kwargs):
        call_steps.append(steps)
        return pipelines.timed_call(*args, steps=steps, **kwargs)

    monkeypatch.setattr(e2e, "build_pipeline", build)
    monkeypatch.setattr(e2e, "timed_call", timed)
    steps, size, frames = 20, (32, 48), 5
    e2e.main(
        ["--model", "wan-a14b", "--steps", str(steps), "--ratio", "0.5", "--frames", str(frames)]
        + ["--resolution", "32x48", "--device", "cpu", "--repeats", "1"]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| RAS")]
    assert call_steps == [steps] * 4  # dense and RAS: a warm-up call and one timed call each
    pipe = built[0]
    assert pipe.transformer_2 is not None and pipe.transformer_2 is not pipe.transformer
    step, switch = [0], []
    pipe.transformer_2.register_forward_pre_hook(lambda module, args: switch.append(step[0]) if not switch else None)

    def count(pipe, i, timestep, tensors):
        step[0] = i + 1
        return {}

    inputs = pipelines.prompt_inputs(pipe.transformer, 1, seed=0)
    with torch.no_grad():
        pipelines.generate(pipe, inputs, steps=steps, size=size, seed=0, callback=count, frames=frames)
    config = pipelines.preset("wan", steps, 0.5, pipelines.num_tokens(pipe, size, frames))
    dense = [not config.is_ras_step(i) or i == switch[0] for i in range(steps)]
    assert config.is_ras_step(switch[0]), "choose steps so that the switch lands on a RAS step"
    tokens = float(rows[0].split("|")[2].strip().rstrip("%"))
    assert tokens == pytest.approx(100 * (sum(dense) + 0.5 * (steps - sum(dense))) / steps, abs=0.05)


@pytest.mark.parametrize("factory", [tiny_sd3_pipeline, tiny_lumina_pipeline], ids=["sd3", "lumina"])
def test_encoded_prompt_gives_the_prompt_call_result(factory, torch_backend):
    """bench.e2e --pretrained encodes the prompt once, outside the timed calls: same latents as pipe(prompt)."""
    pipe = factory()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        inputs = pipelines.encode_prompt(pipe, "a red cat")
    direct = pipe(
        "a red cat",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=pipelines.GUIDANCE[pipelines.family_of(pipe.transformer)],
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    torch.testing.assert_close(pipelines.generate(pipe, inputs, steps=2, size=64, seed=0), direct)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_lumina_rope_table_built_once_per_table_with_identical_results(ratio, monkeypatch, torch_backend):
    """At 96^2 (scaling factor 1.5 over the model's 64^2) with the watershed mid-run, a generation uses two tables.
    With RAS applied each is built once (not once per step) and the latents equal those of the table rebuilt every
    step; remove() puts the pipeline module's own function back and dense diffusers is unchanged."""
    from diffusers.pipelines.lumina import pipeline_lumina

    built = []
    builder = getattr(pipeline_lumina, BUILDER)

    def counting(*args, **kwargs):
        built.append((args, tuple(sorted(kwargs.items()))))
        return builder(*args, **kwargs)

    monkeypatch.setattr(pipeline_lumina, BUILDER, counting)
    pipe = _lumina_pipeline()
    inputs = pipelines.prompt_inputs(pipe.transformer, 1, seed=0) | {"scaling_watershed": 0.5}

    def generate():
        return pipelines.generate(pipe, inputs, steps=6, size=96, seed=0)

    dense = generate()
    assert len(built) == 6 and len(set(built)) == 2  # two distinct tables, rebuilt every step
    config = RASConfig(num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=ratio)
    with apply_ras(pipe, config):
        assert getattr(pipeline_lumina, BUILDER) is not counting
        with monkeypatch.context() as m:
            m.setattr(pipeline_lumina, BUILDER, counting)  # as before: the table rebuilt every step
            built.clear()
            per_step = generate()
            assert len(built) == 6
        built.clear()
        memoised = [generate() for _ in range(2)]
        assert len(built) == 2 and len(set(built)) == 2  # each table once, over both generations
    for out in memoised:
        torch.testing.assert_close(out, per_step, atol=0, rtol=0)
    if ratio == 0.5:
        assert (per_step - dense).abs().max() > 1e-3  # RAS ran
    assert getattr(pipeline_lumina, BUILDER) is counting
    built.clear()
    torch.testing.assert_close(generate(), dense, atol=0, rtol=0)
    assert len(built) == 6


@pytest.mark.parametrize("first", ["applied first", "applied last"])
def test_rope_memo_is_reference_counted(first, torch_backend):
    """Installed while any handle holds it, whatever order handles are removed in; then the module's own function
    object is back."""
    from diffusers.pipelines.lumina import pipeline_lumina

    from ras_models import lumina

    original = getattr(pipeline_lumina, BUILDER)
    config = RASConfig(num_steps=6, warmup_steps=2, reset_steps=())
    a = apply_ras(tiny_lumina_transformer(), config)
    memo = getattr(pipeline_lumina, BUILDER)
    assert memo is not original and memo(8, 4, 4) is memo(8, 4, 4)
    b = apply_ras(tiny_lumina_transformer(), config)
    assert getattr(pipeline_lumina, BUILDER) is memo
    (a if first == "applied first" else b).remove()
    assert getattr(pipeline_lumina, BUILDER) is memo
    (b if first == "applied first" else a).remove()
    assert getattr(pipeline_lumina, BUILDER) is original
    assert lumina._MEMOISED_ROPE.holds == 0 and not lumina._MEMOISED_ROPE.tables


def test_rope_memo_keeps_the_last_tables_only(torch_backend):
    from diffusers.pipelines.lumina import pipeline_lumina

    from ras_models import lumina

    with apply_ras(tiny_lumina_transformer(), RASConfig(num_steps=6, warmup_steps=2, reset_steps=())):
        memo = getattr(pipeline_lumina, BUILDER)
        first = memo(8, 4, 4, linear_factor=1.0)
        for factor in range(2, lumina._ROPE_TABLES + 2):
            memo(8, 4, 4, linear_factor=float(factor))
        assert len(memo.tables) == lumina._ROPE_TABLES
        rebuilt = memo(8, 4, 4, linear_factor=1.0)
        assert rebuilt is not first and torch.equal(rebuilt, first)


def test_device_copy_per_host_table():
    """One device copy per live, unchanged host tensor and image size, holding the rows the image uses (meta stands
    in for the GPU)."""
    from ras_models.lumina import _DeviceTables

    tables, meta = _DeviceTables(), torch.device("meta")
    host = torch.randn(6, 5, 2, dtype=torch.complex64)
    copy = tables(host, meta, 4, 3)
    assert copy.device == meta and copy.shape == (4, 3, 2) and tables(host, meta, 4, 3) is copy
    assert tables(host, meta, 2, 2).shape == (2, 2, 2)  # another image size: its own copy
    assert torch.equal(tables(host, torch.device("cpu"), 4, 3), host)  # already on the device: the table itself
    assert tables(host.clone(), meta, 4, 3) is not copy  # another host tensor
    host.mul_(2)
    changed = tables(host, meta, 4, 3)
    assert changed is not copy and tables(host, meta, 4, 3) is changed  # changed in place: copied again, once
    del host
    gc.collect()
    assert len(tables.copies) == 0  # the copies live as long as their host tensors


def test_soak_log(tmp_path, capsys, torch_backend):
    """Ratio blocks (RAS re-applied), alternating resolution and batch, one CSV row per generation."""
    log = tmp_path / "soak.csv"
    soak.main(
        ["--generations", "6", "--steps", "4", "--resolutions", "64", "128", "--ratio-every", "4", "--device", "cpu"]
        + ["--no-full", "--max-shapes", "3", "--csv", str(log)]
    )
    rows = list(csv.DictReader(log.open()))
    assert [r["ratio"] for r in rows] == ["0.5"] * 4 + ["0.25"] * 2
    assert [r["resolution"] for r in rows] == ["64", "128"] * 3
    assert [r["batch"] for r in rows] == ["1", "1", "2", "2", "1", "1"]
    assert all(float(r["ms"]) > 0 and r["graphs"] == "0" for r in rows)  # no CUDA graphs on the CPU
    out = capsys.readouterr().out
    assert "generations: 6" in out and "captured graphs max 0 (max_shapes 3)" in out  # the cap reached apply_ras
