"""Flux.1 adapter on a tiny random-weight FluxPipeline (CPU, fp32).

The oracle shares no code with the adapter: it replaces the transformer's forward by a plain-PyTorch re-implementation
of one RAS call, written from the spec and diffusers' Flux blocks. Per call it keeps, per layer, a K/V cache of image
keys after QK-norm and RoPE (complex-number rotation), writes the active rows, attends [text; active image] queries
over [text; whole cached image] keys, and keeps every token's computed outputs with their steps: a token left out
of a step outputs its last one (reuse "copy") or the line through its last two at the step index (reuse "linear").
With ``true_cfg_scale > 1`` the first and second call of a step ("cond", "uncond") keep separate state. The next
step's tokens come from the guided output handed to ``scheduler.step``, unpacked with diffusers' own
``_unpack_latents``. With metric "attention" a token's score is the log-sum-exp of its image query's scaled scores
over all keys of a layer (text and whole cached image), mean over heads, summed over every layer and call of the step
(a prompt's batch rows summed); a token the step did not compute keeps its last score.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ras_kernels.select.reference import select_regions as reference_select
from ras_models import RASConfig, apply_ras, supported_models

from ._models import tiny_flux_pipeline
from ._utils import DEVICE, backend_cases

ATOL = 1e-4  # the same computation in another order (fp32)
TEXT, JOINT, POOLED = 6, 24, 16  # text tokens, prompt embedding width, pooled width of tiny_flux_transformer


def _prompts(count: int, negative: bool = False) -> dict:
    embeds = {"prompt_embeds": torch.randn(count, TEXT, JOINT), "pooled_prompt_embeds": torch.randn(count, POOLED)}
    if negative:
        embeds.update(negative_prompt_embeds=torch.randn(count, TEXT, JOINT))
        embeds.update(negative_pooled_prompt_embeds=torch.randn(count, POOLED))
    return embeds


def _run(pipe, prompts: dict, size: dict, steps: int, **kwargs):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out = pipe(**prompts, **size, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs)
    return out.images


def _spec_count(cfg: dict, step: int, n: int) -> int | None:
    """Active tokens at ``step`` of a static schedule (None = dense)."""
    if step >= cfg["steps"] or step < cfg["warmup"] or step in cfg["resets"] or step > cfg.get("end", cfg["steps"]):
        return None
    return n - int((1 - cfg["ratio"]) * n)


def _rotate(x, freqs):
    """RoPE as a complex rotation of consecutive channel pairs: x [B, L, H, d], freqs [1 or B, L, d/2] complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, :, None]).flatten(-2).to(x.dtype)


def log_lse(log: list, rows, q, k) -> None:
    """Metric attention, one layer: append (batch row, token indices [K], score [K]) to ``log`` for every batch row,
    the score of image query j the log-sum-exp over all keys of q_j . k / sqrt(d), mean over heads. q [B, K, H, d]
    are the image queries of the tokens ``rows`` [B, K]; k [B, L, H, d] every key the layer attends over."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1).mean(dim=1)  # [B, K]
    log.extend((i, rows[i], lse[i]) for i in range(q.shape[0]))


def attention_scores(scores, log: list, prompts: int, n: int):
    """Metric attention after a step: each prompt's per-token sums of the step's ``log`` (batch row r belongs to
    prompt r % P) replace ``scores`` [P, N] (zeros if None) where the step computed the token; ``log`` is emptied."""
    scores = torch.zeros(prompts, n) if scores is None else scores.cpu()  # the oracle keeps the scores on the host
    fresh, computed = torch.zeros_like(scores), torch.zeros_like(scores, dtype=torch.bool)
    for i, rows, lse in log:
        fresh[i % prompts].index_add_(0, rows.cpu(), lse.cpu())
        computed[i % prompts, rows.cpu()] = True
    log.clear()
    return torch.where(computed, fresh, scores)


def reused_outputs(history: dict, rows, out, n: int, step: int, cfg: dict) -> torch.Tensor:
    """One call's output [B, n, F] at ``step``, given its computed rows ``out`` [B, K, F] at token indices ``rows``
    [B, K]; ``history`` maps (batch row, token) to the call's computed (step, output) pairs so far in the generation
    and gains this step's. A token left out outputs its last computed output (reuse "copy") or, with "linear", the
    line through its last two at ``step`` (the last one while it has only one)."""
    for i in range(out.shape[0]):
        for j, token in enumerate(rows[i].tolist()):
            history.setdefault((i, token), []).append((step, out[i, j].double()))

    def reused(pairs: list) -> torch.Tensor:
        s2, v2 = pairs[-1]
        if s2 == step or cfg.get("reuse", "copy") == "copy" or len(pairs) < 2:
            return v2
        s1, v1 = pairs[-2]
        return v2 + (v2 - v1) * (step - s2) / (s2 - s1)

    rows_out = [torch.stack([reused(history[(i, token)]) for token in range(n)]) for i in range(out.shape[0])]
    return torch.stack(rows_out).to(out.dtype)


class FluxOracle:
    """A FluxPipeline whose transformer runs RAS literally (see the module docstring)."""

    def __init__(self, pipe, cfg: dict, size: dict):
        self.pipe, self.t, self.cfg = pipe, pipe.transformer, cfg
        self.latent_hw = (size["height"] // 8, size["width"] // 8)  # FluxPipeline without a VAE: factor 8
        self.step_fn, self.set_timesteps = pipe.scheduler.step, pipe.scheduler.set_timesteps
        self.t.forward = self._forward
        pipe.scheduler.step = self._step
        # FluxPipeline inspects set_timesteps' parameters: keep the original's signature.
        pipe.scheduler.set_timesteps = functools.wraps(self.set_timesteps)(functools.partial(self._set_timesteps))

    def close(self):
        del self.t.forward, self.pipe.scheduler.step, self.pipe.scheduler.set_timesteps

    def _set_timesteps(self, *args, **kwargs):
        self.step, self.calls, self.active, self.counters, self.state = 0, 0, None, None, {}
        self.lse_log, self.scores = [], None  # metric attention
        return self.set_timesteps(*args, **kwargs)

    def _forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None, joint_attention_kwargs=None, return_dict=True):  # fmt: skip
        t = self.t
        state = self.state.setdefault(self.calls, {"kv": {}})  # the step's first call is "cond", the second "uncond"
        self.calls += 1
        b, n, _ = hidden_states.shape
        if self.active is None:
            rows = torch.arange(n, device=hidden_states.device).repeat(b, 1)
        else:
            rows = self.active.repeat(b // len(self.active), 1)
        x = torch.take_along_dim(t.x_embedder(hidden_states), rows[..., None], dim=1)
        if guidance is None:
            temb = t.time_text_embed(timestep * 1000, pooled_projections)
        else:
            temb = t.time_text_embed(timestep * 1000, guidance * 1000, pooled_projections)
        c = t.context_embedder(encoder_hidden_states)
        text = c.shape[1]
        cos, sin = t.pos_embed(torch.cat([txt_ids, img_ids]))
        freqs = torch.complex(cos[:, ::2], sin[:, ::2])  # the table repeats each pair's angle twice
        text_freqs, image_freqs = freqs[None, :text], freqs[text:][rows]

        def attend(layer, attn, image_qkv, text_qkv):
            q, k, v = (p.unflatten(-1, (-1, attn.head_dim)) for p in image_qkv)
            tq, tk, tv = (p.unflatten(-1, (-1, attn.head_dim)) for p in text_qkv)
            q, k = _rotate(attn.norm_q(q), image_freqs), _rotate(attn.norm_k(k), image_freqs)
            norm_tq, norm_tk = (
                (attn.norm_q, attn.norm_k) if layer[0] == "single" else (attn.norm_added_q, attn.norm_added_k)
            )
            tq, tk = _rotate(norm_tq(tq), text_freqs), _rotate(norm_tk(tk), text_freqs)
            if self.active is None:  # a dense step (re)creates the caches
                state["kv"][layer] = tuple(k.new_full((b, n, *k.shape[2:]), float("nan")) for _ in "kv")
            k_cache, v_cache = state["kv"][layer]
            for i in range(b):
                k_cache[i, rows[i]], v_cache[i, rows[i]] = k[i], v[i]
            if self.cfg.get("metric") == "attention":
                log_lse(self.lse_log, rows, q, torch.cat([tk, k_cache], 1))
            q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k_cache], 1), torch.cat([tv, v_cache], 1)
            out = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v))).transpose(1, 2)
            return out.flatten(2)

        for i, block in enumerate(t.transformer_blocks):
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
            a = block.attn
            out = attend(("double", i), a, (a.to_q(nx), a.to_k(nx), a.to_v(nx)),
                         (a.add_q_proj(nc), a.add_k_proj(nc), a.add_v_proj(nc)))  # fmt: skip
            x = x + gate_msa[:, None] * a.to_out[0](out[:, text:])
            x = x + gate_mlp[:, None] * block.ff(block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
            c = c + c_gate_msa[:, None] * a.to_add_out(out[:, :text])
            c_mlp = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            c = c + c_gate_mlp[:, None] * block.ff_context(c_mlp)
        for i, block in enumerate(t.single_transformer_blocks):
            h = torch.cat([c, x], 1)
            nh, gate = block.norm(h, emb=temb)
            a = block.attn
            q, k, v = a.to_q(nh), a.to_k(nh), a.to_v(nh)
            out = attend(
                ("single", i), a, (q[:, text:], k[:, text:], v[:, text:]), (q[:, :text], k[:, :text], v[:, :text])
            )
            h = h + gate[:, None] * block.proj_out(torch.cat([out, block.act_mlp(block.proj_mlp(nh))], 2))
            c, x = h[:, :text], h[:, text:]
        out = t.proj_out(t.norm_out(x, temb))
        return (reused_outputs(state.setdefault("history", {}), rows, out, n, self.step, self.cfg),)

    def _step(self, model_output, *args, **kwargs):
        h, w = self.latent_hw
        latents = type(self.pipe)._unpack_latents(model_output, 8 * h, 8 * w, 8)  # [P, 16, H, W]
        n = (h // 2) * (w // 2)
        metric = self.cfg.get("metric", "std")
        if metric == "attention":
            self.scores = attention_scores(self.scores, self.lse_log, latents.shape[0], n).to(latents.device)
        count = _spec_count(self.cfg, self.step + 1, n)
        if count is None:
            self.active = None
        else:
            if self.counters is None:
                self.counters = torch.zeros(latents.shape[0], n, dtype=torch.int64, device=latents.device)
            self.active = reference_select(
                latents,
                count,
                patch_size=2,
                metric=metric,
                counters=self.counters,
                scores=self.scores,
                starvation_scale=0.1,
                mode=self.cfg["mode"],
                high_ratio=self.cfg["high_ratio"],
            )
        self.step += 1
        self.calls = 0
        return self.step_fn(model_output, *args, **kwargs)


CASES = {
    # name: (guidance_embeds, prompts, true CFG, image size, spec settings)
    "1prompt-guidance": (
        True, 1, False, {"height": 128, "width": 128},
        {"steps": 8, "warmup": 2, "resets": (5,), "ratio": 0.5, "high_ratio": 0.3, "mode": "reference"},
    ),
    "2prompts-paper-nonsquare": (
        False, 2, False, {"height": 128, "width": 192},
        {"steps": 8, "warmup": 2, "resets": (4,), "ratio": 0.25, "high_ratio": 1.0, "mode": "paper", "end": 6},
    ),
    "2prompts-truecfg-nonsquare": (
        True, 2, True, {"height": 192, "width": 128},
        {"steps": 7, "warmup": 2, "resets": (4,), "ratio": 0.5, "high_ratio": 0.3, "mode": "reference"},
    ),
    "2prompts-truecfg-linear": (
        True, 2, True, {"height": 128, "width": 192},
        {"steps": 8, "warmup": 2, "resets": (5,), "ratio": 0.25, "high_ratio": 1.0, "mode": "reference",
         "reuse": "linear"},
    ),
    "2prompts-truecfg-attention": (
        True, 2, True, {"height": 128, "width": 192},
        {"steps": 8, "warmup": 2, "resets": (5,), "ratio": 0.5, "high_ratio": 0.3, "mode": "reference",
         "metric": "attention"},
    ),
}  # fmt: skip


def _config(cfg: dict) -> RASConfig:
    return RASConfig(
        num_steps=cfg["steps"],
        warmup_steps=cfg["warmup"],
        reset_steps=cfg["resets"],
        sample_ratio=cfg["ratio"],
        high_ratio=cfg["high_ratio"],
        mode=cfg["mode"],
        end_step=cfg.get("end"),
        kv_cache=cfg.get("kv_cache"),
        reuse=cfg.get("reuse", "copy"),
        metric=cfg.get("metric", "std"),
    )


# Every case on the plain-PyTorch path; four (both modes, both reuses, metric attention; the interpreter is slow) also
# on Triton.
@pytest.mark.parametrize(
    "case,backend",
    backend_cases(
        CASES,
        (
            "2prompts-paper-nonsquare",
            "2prompts-truecfg-nonsquare",
            "2prompts-truecfg-linear",
            "2prompts-truecfg-attention",
        ),
    ),
)
def test_ras_generation_matches_spec_oracle(case, backend, monkeypatch):
    monkeypatch.setenv("RAS_BACKEND", backend)
    guidance_embeds, count, true_cfg, size, cfg = CASES[case]
    device = DEVICE if backend == "triton" else "cpu"
    pipe = tiny_flux_pipeline(guidance_embeds=guidance_embeds).to(device)
    prompts = {k: v.to(device) for k, v in _prompts(count, negative=true_cfg).items()}
    extra = {"true_cfg_scale": 3.0} if true_cfg else {}
    dense = _run(pipe, prompts, size, cfg["steps"], **extra)
    with apply_ras(pipe, _config(cfg), cuda_graphs=False) as handle:
        calls = []
        handle.session.begin_step = _recording(handle.session.begin_step, calls)
        ras = _run(pipe, prompts, size, cfg["steps"], **extra)
    assert calls == (["cond", "uncond"] if true_cfg else ["cond"]) * cfg["steps"]
    oracle = FluxOracle(pipe, cfg, size)
    try:
        expected = _run(pipe, prompts, size, cfg["steps"], **extra)
    finally:
        oracle.close()
    assert (expected - dense).abs().max() > 1e-3, "the schedule never dropped a token: the test would prove nothing"
    torch.testing.assert_close(ras, expected, atol=ATOL, rtol=0)


def _recording(begin_step, calls: list):
    def record(*args, **kwargs):
        begin_step(*args, **kwargs)
        calls.append(args[4] if len(args) > 4 else kwargs.get("call"))

    return record


@pytest.mark.parametrize("guidance_embeds,true_cfg", [(False, False), (True, True)], ids=["plain", "guidance-truecfg"])
def test_ratio_one_reproduces_unpatched_pipeline(guidance_embeds, true_cfg, torch_backend):
    pipe = tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    prompts, size = _prompts(2, negative=true_cfg), {"height": 128, "width": 192}
    extra = {"true_cfg_scale": 3.0} if true_cfg else {}
    dense = _run(pipe, prompts, size, 6, **extra)
    with apply_ras(pipe, RASConfig.flux(num_steps=6, warmup_steps=1, reset_steps=(), sample_ratio=1.0)):
        ras = _run(pipe, prompts, size, 6, **extra)
    torch.testing.assert_close(ras, dense, atol=1e-5, rtol=0)


def _transformer_inputs(batch: int, tokens: tuple[int, int]) -> dict:
    rows, cols = tokens
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).flatten(0, 1)
    return {
        "hidden_states": torch.randn(batch, rows * cols, 64),
        "encoder_hidden_states": torch.randn(batch, TEXT, JOINT),
        "pooled_projections": torch.randn(batch, POOLED),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1),
        "txt_ids": torch.zeros(TEXT, 3),
    }


def test_remove_restores_bit_exactly(torch_backend):
    pipe = tiny_flux_pipeline()
    t, s, cls = pipe.transformer, pipe.scheduler, type(pipe)
    prompts, size = _prompts(1, negative=True), {"height": 128, "width": 128}
    inputs = _transformer_inputs(2, (8, 6))
    with torch.no_grad():
        before = t(**inputs).sample
    dense = _run(pipe, prompts, size, 6, true_cfg_scale=2.0)
    state = {k: v.clone() for k, v in t.state_dict().items()}
    modules = list(t.modules())
    attrs = {id(m): dict(vars(m)) for m in modules}
    processors = {name: p for name, p in t.attn_processors.items()}
    sched_attrs = dict(vars(s))

    handle = apply_ras(pipe, RASConfig.flux(num_steps=6, warmup_steps=2, reset_steps=(), sample_ratio=0.5))
    first = _run(pipe, prompts, size, 6, true_cfg_scale=2.0)
    assert torch.equal(first, _run(pipe, prompts, size, 6, true_cfg_scale=2.0)), "generations must repeat"
    assert (first - dense).abs().max() > 1e-3
    assert handle.session.memory_bytes() == 0, "caches must be released when a generation ends"
    handle.remove()

    assert t.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in t.state_dict().items())
    assert all(p is processors[name] for name, p in t.attn_processors.items())
    for m in modules:
        assert vars(m).keys() == attrs[id(m)].keys(), type(m).__name__
        assert all(vars(m)[k] is v for k, v in attrs[id(m)].items() if k not in ("_parameters", "_buffers", "_modules"))
    assert vars(s).keys() == sched_attrs.keys() and type(pipe) is cls
    with torch.no_grad():
        assert torch.equal(t(**inputs).sample, before)
    assert torch.equal(_run(pipe, prompts, size, 6, true_cfg_scale=2.0), dense)


def test_bare_transformer_observes_packed_output(torch_backend):
    pipe = tiny_flux_pipeline()
    t = pipe.transformer
    inputs = _transformer_inputs(2, (4, 6))
    with apply_ras(t, RASConfig.flux(num_steps=4, warmup_steps=1, reset_steps=())) as handle, torch.no_grad():
        out = t(**inputs).sample
        assert handle.session.shape_key[1:3] == (8, 12)
        with pytest.raises(RuntimeError, match="observe"):
            t(**inputs)
        handle.observe(out)
        ras = t(**inputs).sample
        assert handle.session.num_active == 24 - int(0.75 * 24)
        with pytest.raises(ValueError, match="packed output"):
            handle.observe(out[:, :5])
    assert ras.shape == out.shape


def test_unsupported_uses_raise(torch_backend):
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    assert "FluxTransformer2DModel" in supported_models()
    pipe = tiny_flux_pipeline()
    t = pipe.transformer
    attn = t.single_transformer_blocks[1].attn
    processor = attn.processor
    attn.set_processor(FluxIPAdapterAttnProcessor(32, 8))
    with pytest.raises(ValueError, match="FluxIPAdapterAttnProcessor"):
        apply_ras(pipe)
    assert "forward" not in vars(t), "a refused apply_ras must leave the model unpatched"
    attn.set_processor(processor)

    inputs = _transformer_inputs(1, (4, 4))
    with apply_ras(pipe, RASConfig.flux(num_steps=4, warmup_steps=1, reset_steps=())), torch.no_grad():
        with pytest.raises(ValueError, match="controlnet_block_samples"):
            t(**inputs, controlnet_block_samples=[torch.zeros(1, 16, 32)])
        with pytest.raises(ValueError, match="img_ids"):
            t(**{**inputs, "img_ids": inputs["img_ids"].flip(0)})
        t.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        with pytest.raises(ValueError, match="disable_cache"):
            t(**inputs)
        t.disable_cache()
        with pytest.raises(ValueError, match="num_steps=4"):
            _run(pipe, _prompts(1), {"height": 64, "width": 64}, 5)


def test_flux_preset_is_the_default(torch_backend):
    config = RASConfig.flux()
    assert (config.num_steps, config.warmup_steps, config.reset_steps) == (28, 4, (12, 20))
    assert (config.sample_ratio, config.schedule) == (0.25, "static")
    with apply_ras(tiny_flux_pipeline()) as handle:
        assert handle.session.config == config and handle.session.patch_size == 2
