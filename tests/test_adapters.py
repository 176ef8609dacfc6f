"""SD3 / SD3.5 / Lumina-Next adapters on tiny random-weight pipelines (CPU, fp32).

The oracle follows the spec literally and shares no code with the adapters: it runs the unpatched model densely
on every step, replaces the inactive tokens' keys/values by the ones cached from the step that last computed them
(forward hooks on the self-attention ``to_k``/``to_v`` projections: the QK-norm and RoPE after them act per
token, so substituting their inputs substitutes their outputs), and takes the inactive tokens' outputs (pixels)
from the previous step's output. Active rows then see exactly what a RAS step computes. With metric "delta" it keeps
the spec's state literally: at every step (the session updates the scores only when it selects) each token's score
becomes its change from the previous step's guided output, or stays where that change is 0; the first step's change
is measured from zeros.
"""

from __future__ import annotations

import pytest
import torch

from ras_kernels.select.reference import region_scores as reference_scores
from ras_kernels.select.reference import select_regions as reference_select
from ras_models import RASConfig, apply_ras, supported_models

from ._models import tiny_lumina_pipeline, tiny_sd3_pipeline
from ._utils import DEVICE, backend_cases

SD3_SIZE = {"height": 16, "width": 16}  # vae factor 1 -> 16x16 latent
LUMINA_SIZE = {"height": 128, "width": 128}  # Lumina's fixed vae factor 8 -> 16x16 latent
# Outputs of the same computation in another order (fp32): the adapters' attention runs in fp32 like diffusers'.
ATOL = 1e-4


def _run(pipe, prompts, size, steps, seed=7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, generator=generator, output_type="latent", **size).images


def _oracle_count(cfg: dict, step: int, n: int) -> int | None:
    """Active tokens at ``step`` straight from the spec (None = dense)."""
    if step < cfg["warmup"] or step in cfg["resets"] or step > cfg.get("end", cfg["steps"] - 1):
        return None
    skip = int((1 - cfg["ratio"]) * n)
    if cfg.get("dynamic"):
        group, size = cfg["dynamic"]
        skip += cfg["dynamic_step"] * (step // group - ((cfg["steps"] + cfg["warmup"]) // group) // 2)
        skip = min(max(skip // size * size, 0), n)
    return n - skip


class Oracle:
    """Dense pipeline run that applies the spec's substitutions (see the module docstring)."""

    def __init__(self, pipe, cfg: dict, self_attention_modules, patch_size: int):
        self.pipe, self.cfg, self.p = pipe, cfg, patch_size
        self.kv: dict[int, torch.Tensor] = {}
        self.handles = []
        for m in self_attention_modules:
            for proj in (m.to_k, m.to_v):
                self.handles.append(proj.register_forward_hook(self._substitute))
        transformer, scheduler = pipe.transformer, pipe.scheduler
        self.forward, self.step_fn, self.set_timesteps = transformer.forward, scheduler.step, scheduler.set_timesteps
        transformer.forward = self._forward
        scheduler.step = self._step
        scheduler.set_timesteps = self._set_timesteps

    def close(self):
        for h in self.handles:
            h.remove()
        del self.pipe.transformer.forward, self.pipe.scheduler.step, self.pipe.scheduler.set_timesteps

    def _set_timesteps(self, *args, **kwargs):
        self.step, self.active, self.counters, self.prev, self.kv = 0, None, None, None, {}
        self.guided, self.scores = None, None  # metric delta's previous guided output and scores
        return self.set_timesteps(*args, **kwargs)

    def _rows(self, batch):
        """[B, N] bool: tokens computed at this step, per batch row (CFG copies share the prompt's set)."""
        return self.mask.repeat(batch // self.mask.shape[0], 1)

    def _substitute(self, module, inputs, out):
        if self.active is not None:
            keep = self._rows(out.shape[0])[..., None]
            out = torch.where(keep, out, self.kv[id(module)])
        self.kv[id(module)] = out
        return out

    def _forward(self, hidden_states, *args, **kwargs):
        b, _, h, w = hidden_states.shape
        self.hw = (h // self.p, w // self.p)
        out = self.forward(hidden_states, *args, **kwargs)
        sample = out[0]
        if self.active is not None:
            pixels = self._rows(b).reshape(b, 1, *self.hw)
            pixels = pixels.repeat_interleave(self.p, 2).repeat_interleave(self.p, 3)
            sample = torch.where(pixels, sample, self.prev)
        self.prev = sample
        return (sample,)

    def _step(self, model_output, *args, **kwargs):
        n = self.hw[0] * self.hw[1]
        nxt = self.step + 1
        count = _oracle_count(self.cfg, nxt, n) if nxt < self.cfg["steps"] else None
        metric, delta = self.cfg.get("metric", "std"), {}
        if metric == "delta":
            if self.guided is None:  # the generation's first step: the change from zeros
                self.guided = torch.zeros_like(model_output)
                self.scores = torch.zeros(model_output.shape[0], n, device=model_output.device)
            delta = {"previous": self.guided, "scores": self.scores}
            if count is None:  # the rule at a step that selects nothing (select_regions applies it otherwise)
                self.scores.copy_(reference_scores(model_output, self.p, "delta", **delta))
        if count is None:
            self.active = None
        else:
            if self.counters is None:
                self.counters = torch.zeros(model_output.shape[0], n, dtype=torch.int64, device=model_output.device)
            self.active = reference_select(
                model_output,
                count,
                patch_size=self.p,
                metric=metric,
                counters=self.counters,
                starvation_scale=0.1,
                mode=self.cfg["mode"],
                high_ratio=self.cfg["high_ratio"],
                **delta,
            )
            self.mask = torch.zeros(model_output.shape[0], n, dtype=torch.bool, device=model_output.device)
            self.mask.scatter_(1, self.active, True)
        if metric == "delta":
            self.guided = model_output.clone()
        self.step = nxt
        return self.step_fn(model_output, *args, **kwargs)


def _self_attention(pipe):
    t = pipe.transformer
    if hasattr(t, "transformer_blocks"):
        return [m for b in t.transformer_blocks for m in (b.attn, getattr(b, "attn2", None)) if m is not None]
    return [layer.attn1 for layer in t.layers]


CASES = {
    # name: (pipeline factory, size, spec settings)
    "sd3-1prompt": (
        tiny_sd3_pipeline,
        SD3_SIZE,
        {"steps": 7, "warmup": 2, "resets": (4,), "ratio": 0.5, "high_ratio": 0.3, "mode": "reference"},
    ),
    "sd3-2prompts-paper-nonsquare": (
        tiny_sd3_pipeline,
        {"height": 16, "width": 24},
        {"steps": 8, "warmup": 2, "resets": (4,), "ratio": 0.25, "high_ratio": 1.0, "mode": "paper", "end": 6},
    ),
    "sd35-dual-attention": (
        lambda: tiny_sd3_pipeline(sd35=True),
        SD3_SIZE,
        {"steps": 8, "warmup": 2, "resets": (5,), "ratio": 0.5, "high_ratio": 0.3, "mode": "reference"},
    ),
    "sd3-patch4": (
        lambda: tiny_sd3_pipeline(patch_size=4),
        SD3_SIZE,
        {"steps": 8, "warmup": 2, "resets": (5,), "ratio": 0.5, "high_ratio": 0.5, "mode": "reference"},
    ),
    "lumina-1prompt-dynamic": (
        tiny_lumina_pipeline,
        LUMINA_SIZE,
        {
            "steps": 10,
            "warmup": 2,
            "resets": (6,),
            "ratio": 0.5,
            "high_ratio": 1.0,
            "mode": "reference",
            "dynamic": (2, 4),
            "dynamic_step": 8,
        },
    ),
    # Metric delta, warmup 1: the first selection comes from the first step's output (its change from zeros). Two
    # prompts and a reset (a dense step between two selections) on the plain-PyTorch path; the Triton case is
    # shorter (the interpreter takes seconds a step).
    "sd3-2prompts-delta": (
        tiny_sd3_pipeline,
        SD3_SIZE,
        {
            "steps": 8,
            "warmup": 1,
            "resets": (4,),
            "ratio": 0.5,
            "high_ratio": 0.3,
            "mode": "reference",
            "metric": "delta",
        },
    ),
    "sd3-delta": (
        tiny_sd3_pipeline,
        SD3_SIZE,
        {"steps": 5, "warmup": 1, "resets": (), "ratio": 0.5, "high_ratio": 0.3, "mode": "paper", "metric": "delta"},
    ),
    "lumina-2prompts-nonsquare": (
        tiny_lumina_pipeline,
        {"height": 128, "width": 96},
        {"steps": 8, "warmup": 2, "resets": (5,), "ratio": 0.5, "high_ratio": 0.3, "mode": "reference"},
    ),
}


def _config(cfg: dict) -> RASConfig:
    kwargs = {
        "num_steps": cfg["steps"],
        "warmup_steps": cfg["warmup"],
        "reset_steps": cfg["resets"],
        "sample_ratio": cfg["ratio"],
        "high_ratio": cfg["high_ratio"],
        "mode": cfg["mode"],
        "end_step": cfg.get("end"),
        "schedule": "static",
        "metric": cfg.get("metric", "std"),
    }
    if cfg.get("dynamic"):
        group, size = cfg["dynamic"]
        kwargs.update(schedule="dynamic", dynamic_group=group, dynamic_multiple=size, dynamic_step=cfg["dynamic_step"])
    return RASConfig(**kwargs)


# Every case on the plain-PyTorch path; three also on the Triton kernels (interpreter on CPU, or a GPU).
@pytest.mark.parametrize("case,backend", backend_cases(CASES, ("sd3-1prompt", "lumina-1prompt-dynamic", "sd3-delta")))
def test_ras_generation_matches_spec_oracle(case, backend, monkeypatch):
    monkeypatch.setenv("RAS_BACKEND", backend)
    # fp32 everywhere: keep cuDNN convolutions out of TF32 so the oracle's dense run is as exact as ours.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    factory, size, cfg = CASES[case]
    pipe = factory().to(DEVICE if backend == "triton" else "cpu")
    prompts = ["a red cat", "the big blue house"] if "2prompts" in case else "a red cat"
    dense = _run(pipe, prompts, size, cfg["steps"])
    with apply_ras(pipe, _config(cfg)):
        ras = _run(pipe, prompts, size, cfg["steps"])
    oracle = Oracle(pipe, cfg, _self_attention(pipe), pipe.transformer.config.patch_size)
    try:
        expected = _run(pipe, prompts, size, cfg["steps"])
    finally:
        oracle.close()
    assert (expected - dense).abs().max() > 1e-3, "the schedule never dropped a token: the test would prove nothing"
    torch.testing.assert_close(ras, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "factory,size",
    [
        (tiny_sd3_pipeline, SD3_SIZE),
        (lambda: tiny_sd3_pipeline(sd35=True), SD3_SIZE),
        (tiny_lumina_pipeline, LUMINA_SIZE),
    ],
    ids=["sd3", "sd35", "lumina"],
)
def test_ratio_one_reproduces_unpatched_pipeline(factory, size, torch_backend):
    pipe = factory()
    dense = _run(pipe, "a red cat", size, 6)
    config = RASConfig(num_steps=6, warmup_steps=1, reset_steps=(), sample_ratio=1.0)
    with apply_ras(pipe, config):
        ras = _run(pipe, "a red cat", size, 6)
    torch.testing.assert_close(ras, dense, atol=ATOL, rtol=0)


def test_shards_reach_the_selection(torch_backend, monkeypatch):
    """RASConfig(shards=2) through a pipeline: each RAS step selects with shards=2 (SD3's 8 x 8 tokens: two runs of
    32, each keeping 8 of its own), exactly as the reference does for that step's signal and counters."""
    from ras_kernels.select import reference as select_reference
    from ras_models import session

    steps = []
    select = session.select_regions

    def spy(signal, num_active, **kwargs):
        counters = kwargs["counters"].clone()
        active = select(signal, num_active, **kwargs)
        expected = select_reference.select_regions(signal, num_active, **{**kwargs, "counters": counters})
        steps.append((kwargs["shards"], active, expected))
        return active

    monkeypatch.setattr(session, "select_regions", spy)
    pipe = tiny_sd3_pipeline()
    with apply_ras(pipe, RASConfig(shards=2, num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=0.25)):
        _run(pipe, "a red cat", SD3_SIZE, 6)
    assert len(steps) == 4
    for shards, active, expected in steps:
        assert shards == 2 and active.shape[1] == 16 and bool(((active < 32).sum(dim=1) == 8).all())
        assert torch.equal(active, expected)


def test_random_metric_is_reproducible_per_seed(torch_backend, monkeypatch):
    """RASConfig(metric="random", seed=3) through a pipeline: each RAS step draws with the session's seed tensor
    (exactly the reference's selection for that step's signal, counters and seed), two generations with seed 3 give
    identical selections and outputs, and seed 4 gives other selections."""
    from ras_kernels.select import reference as select_reference
    from ras_models import session

    steps = []
    select = session.select_regions

    def spy(signal, num_active, **kwargs):
        counters, seed = kwargs["counters"].clone(), kwargs["seed"].clone()
        active = select(signal, num_active, **kwargs)
        expected = select_reference.select_regions(signal, num_active, **{**kwargs, "counters": counters, "seed": seed})
        assert torch.equal(active, expected) and torch.equal(seed, kwargs["seed"])  # the session's seed advanced
        steps.append((int(seed) - 1, active))
        return active

    monkeypatch.setattr(session, "select_regions", spy)
    pipe = tiny_sd3_pipeline()
    runs = []
    for seed, generations in ((3, 2), (4, 1)):  # two generations of one handle (one session), then another seed
        config = RASConfig(metric="random", seed=seed, num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=0.25)
        with apply_ras(pipe, config):
            for _ in range(generations):
                out = _run(pipe, "a red cat", SD3_SIZE, 6)
                runs.append((out, steps[:]))
                steps.clear()
    (out3, sel3), (again, sel3b), (out4, sel4) = runs
    assert [s for s, _ in sel3] == [s for s, _ in sel3b] == [(3 << 32) + i for i in range(4)]  # per generation
    assert [s for s, _ in sel4] == [(4 << 32) + i for i in range(4)]
    assert torch.equal(out3, again)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(sel3, sel3b, strict=True))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(sel3, sel4, strict=True))
    assert not torch.equal(out3, out4)


def _processors(transformer):
    return {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}


@pytest.mark.parametrize(
    "factory,size", [(tiny_sd3_pipeline, SD3_SIZE), (tiny_lumina_pipeline, LUMINA_SIZE)], ids=["sd3", "lumina"]
)
def test_remove_restores_and_generations_repeat(factory, size, torch_backend):
    pipe = factory()
    t, s, cls = pipe.transformer, pipe.scheduler, type(pipe)
    modules = list(t.modules())
    processors = _processors(t)
    instance_attrs = {id(m): dict(vars(m)) for m in modules}
    dense = _run(pipe, "a red cat", size, 6)
    sched_attrs = dict(vars(s))

    handle = apply_ras(pipe, RASConfig(num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=0.5))
    first = _run(pipe, "a red cat", size, 6)
    second = _run(pipe, "a red cat", size, 6)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert (first - dense).abs().max() > 1e-3
    assert handle.session.memory_bytes() == 0, "caches must be released when a generation ends"
    handle.remove()

    assert _processors(t).keys() == processors.keys()
    assert all(p is processors[name] for name, p in _processors(t).items())
    for m in modules:
        assert vars(m).keys() == instance_attrs[id(m)].keys()
        assert all(
            vars(m)[k] is v
            for k, v in instance_attrs[id(m)].items()
            if k not in ("_parameters", "_buffers", "_modules")
        )
    assert vars(s).keys() == sched_attrs.keys() and "step" not in vars(s) and "set_timesteps" not in vars(s)
    assert type(pipe) is cls
    torch.testing.assert_close(_run(pipe, "a red cat", size, 6), dense, atol=0, rtol=0)


def test_step_count_mismatch_raises(torch_backend):
    pipe = tiny_sd3_pipeline()
    with apply_ras(pipe, RASConfig(num_steps=6, warmup_steps=2, reset_steps=())):
        with pytest.raises(ValueError, match="num_steps=6"):
            _run(pipe, "a red cat", SD3_SIZE, 5)


def test_unsupported_model_raises():
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        apply_ras(torch.nn.Linear(2, 2))
    assert set(supported_models()) == {
        "SD3Transformer2DModel",
        "LuminaNextDiT2DModel",
        "FluxTransformer2DModel",
        "WanTransformer3DModel",
    }


def test_apply_twice_raises(torch_backend):
    pipe = tiny_sd3_pipeline()
    with apply_ras(pipe):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_ras(pipe.transformer)


def test_bare_transformer_needs_observe(torch_backend):
    pipe = tiny_sd3_pipeline()
    t = pipe.transformer
    handle = apply_ras(t, RASConfig(num_steps=4, warmup_steps=1, reset_steps=()))
    x = torch.randn(2, 4, 16, 16)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 5, 32),
        "pooled_projections": torch.randn(2, 16),
        "timestep": torch.tensor([1.0, 1.0]),
    }
    with torch.no_grad():
        out = t(x, **kwargs).sample
        with pytest.raises(RuntimeError, match="observe"):
            t(x, **kwargs)
        handle.observe(out[:1])
        t(x, **kwargs)
        assert not handle.session.is_dense and handle.session.num_active == 32
    handle.remove()


@pytest.mark.parametrize(
    "factory,path",
    [(tiny_sd3_pipeline, "transformer_blocks.0.norm2"), (tiny_lumina_pipeline, "layers.1.norm2")],
    ids=["sd3", "lumina"],
)
def test_unknown_norm_layout_raises(factory, path):
    """The fused block forwards reproduce the released norm layouts only; anything else is refused up front."""
    pipe = factory()
    parent, name = path.rsplit(".", 1)
    setattr(pipe.transformer.get_submodule(parent), name, torch.nn.Identity())
    with pytest.raises(ValueError, match="norm layout"):
        apply_ras(pipe)
    assert "forward" not in vars(pipe.transformer), "a refused apply_ras must leave the model unpatched"


def test_chunked_feed_forward_raises(torch_backend):
    pipe = tiny_sd3_pipeline()
    pipe.transformer.transformer_blocks[0].set_chunk_feed_forward(2, dim=1)
    with apply_ras(pipe, RASConfig(num_steps=4, warmup_steps=1, reset_steps=())):
        with pytest.raises(ValueError, match="chunked feed-forward"):
            _run(pipe, "a red cat", SD3_SIZE, 4)
