"""RAS in a small custom DiT through RASSession alone (the code docs/integration.md walks through)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ras_models import RASConfig, RASSession


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, ras: RASSession | None, layer: int):
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b l (three h d) -> three b l h d", three=3, h=self.heads)
        if ras is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        else:
            o = ras.attend(layer, q, k, v)  # whole-image K/V cache, refreshed at the active rows
        x = x + self.proj(o.flatten(2))
        return x + self.mlp(self.norm2(x))


class TinyDiT(nn.Module):
    def __init__(self, channels=4, patch=2, dim=32, heads=2, layers=2, grid=8):
        super().__init__()
        self.p = patch
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.1)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, x, ras: RASSession | None = None):
        b, c, h, w = x.shape
        tokens = rearrange(x, "b c (y p) (x q) -> b (y x) (p q c)", p=self.p, q=self.p)
        hidden = self.embed(tokens) + self.pos
        if ras is not None:
            ras.begin_step(b, h, w, x.device)
            hidden = ras.gather(hidden)  # [B, N, D] -> [B, K, D]
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, ras, i)
        out = self.out(hidden)
        if ras is not None:
            out = ras.scatter_output(out)  # [B, K, F] -> [B, N, F], cached rows for the rest
        return rearrange(out, "b (y x) (p q c) -> b c (y p) (x q)", y=h // self.p, p=self.p, q=self.p)


def sample(model, noise, steps, ras=None, trace=None):
    x = noise.clone()
    if ras is not None:
        ras.reset()
    for _i in range(steps):
        v = model(x, ras)
        if trace is not None:
            trace.append(v.clone())
        if ras is not None:
            ras.observe(v)  # no CFG here: the model output is the guided output
        x = x + v / steps
    return x


@pytest.mark.parametrize("reuse", ["copy", "linear"])
def test_ratio_one_reproduces_plain_model(reuse, torch_backend):
    model = TinyDiT().eval()
    noise = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        plain = sample(model, noise, 6)
        ras = sample(
            model,
            noise,
            6,
            RASSession(
                RASConfig(num_steps=6, warmup_steps=1, reset_steps=(), sample_ratio=1.0, reuse=reuse), patch_size=2
            ),
        )
    torch.testing.assert_close(ras, plain, atol=1e-5, rtol=0)


def test_inactive_tokens_reuse_their_last_output(torch_backend):
    model = TinyDiT().eval()
    noise = torch.randn(2, 4, 16, 16)
    session = RASSession(RASConfig(num_steps=6, warmup_steps=2, reset_steps=(4,), sample_ratio=0.25), patch_size=2)
    trace: list[torch.Tensor] = []
    actives = []
    original_observe = session.observe

    def observe(v):
        original_observe(v)
        actives.append(None if session.active is None else session.active.clone())

    session.observe = observe
    with torch.no_grad():
        out = sample(model, noise, 6, session, trace)
        dense = sample(model, noise, 6)
    assert (out - dense).abs().max() > 1e-3
    for step in (2, 3, 5):  # the RAS steps
        active = actives[step - 1]
        assert active.shape == (2, 64 - int(0.75 * 64))
        inactive = torch.ones(2, 64, dtype=torch.bool)
        inactive.scatter_(1, active, False)
        now = rearrange(trace[step], "b c (y p) (x q) -> b (y x) (p q c)", p=2, q=2)
        before = rearrange(trace[step - 1], "b c (y p) (x q) -> b (y x) (p q c)", p=2, q=2)
        assert torch.equal(now[inactive], before[inactive])
        assert not torch.equal(now[~inactive], before[~inactive])


def test_delta_metric_state(torch_backend, monkeypatch):
    """RASConfig(metric="delta") through RASSession: each selection gets the guided output of the previous observe as
    ``previous`` (a dense step's observe refreshes it too) and the session's scores. The first observe compares with
    zeros (warmup_steps=1: it selects), so the first RAS step gets the l2 metric's choice. After a RAS step the
    tokens it did not recompute keep their scores and the others get new ones. With keep_buffers a second generation
    repeats the first (the state starts from zero again) and memory_bytes counts the two buffers; without, they are
    freed when the generation ends."""
    from ras_kernels.select import reference
    from ras_models import session as session_module

    config = RASConfig(metric="delta", num_steps=6, warmup_steps=1, reset_steps=(3,), sample_ratio=0.25)
    model, noise = TinyDiT().eval(), torch.randn(2, 4, 16, 16)  # 64 tokens
    std = RASSession(RASConfig(num_steps=6, warmup_steps=1, reset_steps=(3,), sample_ratio=0.25), 2, keep_buffers=True)
    with torch.no_grad():
        sample(model, noise, 6, std)
    calls, observed = [], []
    select = session_module.select_regions

    def spy(signal, num_active, **kwargs):
        before = [kwargs[name].clone() for name in ("previous", "scores", "counters")]
        active = select(signal, num_active, **kwargs)
        calls.append((len(observed) - 1, signal.clone(), *before, kwargs["scores"].clone(), active))
        return active

    monkeypatch.setattr(session_module, "select_regions", spy)

    def generate(ras):
        observe = ras.observe

        def record(guided):
            observed.append(guided.clone())
            observe(guided)

        ras.observe = record
        calls.clear()
        observed.clear()
        with torch.no_grad():
            return sample(model, noise, 6, ras), [c[-1] for c in calls]

    ras = RASSession(config, patch_size=2, keep_buffers=True)
    first, first_sets = generate(ras)
    assert [c[0] for c in calls] == [0, 1, 3, 4]  # the observes before the RAS steps 1, 2, 4, 5
    for i, (step, signal, previous, scores, counters, after, active) in enumerate(calls):
        assert torch.equal(signal, observed[step])
        if step == 0:  # the generation's first observe: the change from zeros, i.e. the l2 metric
            assert not previous.any() and not scores.any()
            kw = dict(patch_size=2, counters=counters, starvation_scale=0.1, high_ratio=config.high_ratio)
            assert torch.equal(active, reference.select_regions(signal, active.shape[1], metric="l2", **kw))
            assert bool((after > 0).all())
            continue
        assert torch.equal(previous, observed[step - 1])  # step 2 selects nothing, yet refreshes previous for 3
        recomputed = torch.ones_like(after, dtype=torch.bool)  # a dense step recomputes every token
        if calls[i - 1][0] == step - 1:  # step was a RAS step
            recomputed = torch.zeros_like(recomputed).scatter_(1, calls[i - 1][-1], True)
            assert not bool(recomputed.all())
        assert torch.equal(after[~recomputed], scores[~recomputed])  # carried over
        assert not bool((after[recomputed] == scores[recomputed]).any())  # a fresh change

    delta_bytes = noise.numel() * 4 + 2 * 64 * 4  # previous [P, C, H, W] and scores [P, N], fp32
    assert ras.memory_bytes() == std.memory_bytes() + delta_bytes
    again, again_sets = generate(ras)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(first_sets, again_sets, strict=True))

    ras = RASSession(config, patch_size=2)
    again, _ = generate(ras)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert ras.memory_bytes() == 0


def test_attention_metric_state(torch_backend, monkeypatch):
    """RASConfig(metric="attention") through RASSession, CFG batched as [cond; uncond] (B = 2P: batch row r belongs to
    prompt r % P): the scores each selection gets are, per prompt, the sum over the step's layers and over the
    prompt's batch rows of the log-sum-exps attention returned (mean over heads) at the tokens the step computed, the
    previous scores elsewhere (zeros before the first step). With keep_buffers a second generation repeats the first,
    also after a generation aborted mid-step (its partial sums are zeroed by reset), and memory_bytes counts the
    buffers ([B, K] sums per active count K, [P, N] scores); without keep_buffers they are freed at the end."""
    from ras_models import session as session_module

    config = RASConfig(metric="attention", num_steps=6, warmup_steps=1, reset_steps=(3,), sample_ratio=0.25)
    model, noise = TinyDiT().eval(), torch.randn(2, 4, 16, 16)  # P = 2 prompts of 64 tokens, K = 16
    std = RASSession(replace(config, metric="std"), patch_size=2, keep_buffers=True)
    with torch.no_grad():  # the same caches, without metric attention's buffers
        sample(model, torch.cat([noise, noise]), 6, std)
    lses, selections = [], []
    attention, select = session_module.cached_kv_attention, session_module.select_regions

    def spy_attention(*args, **kwargs):
        out, lse = attention(*args, **kwargs)
        lses.append(lse.clone())
        return out, lse

    def spy_select(signal, num_active, **kwargs):
        selections.append(kwargs["scores"].clone())
        return select(signal, num_active, **kwargs)

    monkeypatch.setattr(session_module, "cached_kv_attention", spy_attention)
    monkeypatch.setattr(session_module, "select_regions", spy_select)

    def generate(ras, steps=6):
        x = noise.clone()
        ras.reset()
        expected, carried = torch.zeros(2, 64), 0
        selections.clear()
        for _ in range(steps):
            lses.clear()
            cond, uncond = model(torch.cat([x, x]), ras).chunk(2)
            guided = uncond + 2.0 * (cond - uncond)
            computed = ras.kv_index[:2].clone()  # each prompt's computed tokens (both halves compute the same)
            sums = torch.zeros(4, computed.shape[1])
            for lse in lses:  # one per layer; q holds the image queries only
                sums += lse.mean(dim=1)
            expected.scatter_(1, computed, sums.view(2, 2, -1).sum(dim=0))
            carried += 2 * 64 - computed.numel()
            before = len(selections)
            ras.observe(guided)
            if len(selections) > before:
                torch.testing.assert_close(selections[-1], expected, rtol=1e-6, atol=1e-6)
            x = x + guided / 6
        assert len(lses) == 2 and carried > 0  # two layers; RAS steps left tokens out, whose scores carried over
        return x, [s.clone() for s in selections]

    with torch.no_grad():
        ras = RASSession(config, patch_size=2, keep_buffers=True)
        first, first_scores = generate(ras)
        assert len(first_scores) == 4  # the observes before the RAS steps 1, 2, 4, 5
        attention_bytes = (4 * 64 + 4 * 16 + 2 * 64) * 4  # sums [B, N] (dense) and [B, K], scores [P, N]; fp32
        assert ras.memory_bytes() == std.memory_bytes() + attention_bytes
        again, again_scores = generate(ras)
        torch.testing.assert_close(again, first, atol=0, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(first_scores, again_scores, strict=True))
        ras.reset()
        ras.begin_step(4, 16, 16, "cpu")
        model.blocks[0](ras.gather(model.embed(torch.randn(4, 64, 16))), ras, 0)  # partial sums, then abandoned
        again, _ = generate(ras)
        torch.testing.assert_close(again, first, atol=0, rtol=0)
        ras = RASSession(config, patch_size=2)
        again, _ = generate(ras)
        torch.testing.assert_close(again, first, atol=0, rtol=0)
        assert ras.memory_bytes() == 0


def test_attend_image_queries_is_validated(torch_backend):
    ras = RASSession(RASConfig(metric="attention", num_steps=4, warmup_steps=1, reset_steps=()), patch_size=2)
    ras.begin_step(1, 8, 8, "cpu")  # 16 tokens, dense
    q, kv = torch.randn(1, 18, 2, 8), torch.randn(1, 16, 2, 8)  # 16 image queries and 2 more rows
    with pytest.raises(TypeError, match="image_queries must be an int, got float"):
        ras.attend(0, q, kv, kv, image_queries=1.0)
    with pytest.raises(ValueError, match=r"image_queries must be in \[0, 2\], got 3"):
        ras.attend(0, q, kv, kv, image_queries=3)
    with pytest.raises(ValueError, match=r"image_queries must be in \[0, 2\], got -1"):
        ras.attend(0, q, kv, kv, image_queries=-1)
    assert ras.attend(0, q, kv, kv, image_queries=2).shape == q.shape


def _run_calls(session, values, switch, history):
    """One generation of a model-free "transformer" through ``session``: call "a" at steps < ``switch``, call "b"
    from there on (as Wan 2.2's two experts), each returning ``values[step]`` [B, N, F] at its active rows. Returns
    the rows scatter_output gave per step, and appends each computed (step, row, value) to ``history[call]`` (a
    dict token -> list) so that the forecast can be recomputed independently."""
    b, n, f = values.shape[1:]
    outputs = []
    for step in range(session.config.num_steps):
        call = "a" if step < switch else "b"
        session.begin_step(b, 16, 16, "cpu", call)
        rows = session.batch_index
        new = values[step].gather(1, rows[..., None].expand(-1, -1, f))
        outputs.append(session.scatter_output(new).clone())
        for i in range(b):
            for j, token in enumerate(rows[i].tolist()):
                history[call].setdefault((i, token), []).append((step, new[i, j].double()))
        guided = rearrange(outputs[-1], "b (y x) (p q c) -> b c (y p) (x q)", y=8, p=2, q=2)
        session.observe(guided)
    return outputs


def _forecast_spec(history: list, step: int) -> torch.Tensor:
    """A token's output at ``step`` under reuse "linear", from its computed (step, value) pairs in this generation:
    the value if computed at ``step``, else the line through its last two computations at ``step`` (the last value
    when it has one)."""
    (s2, v2) = history[-1]
    if s2 == step or len(history) < 2:
        return v2
    s1, v1 = history[-2]
    return v2 + (v2 - v1) * (step - s2) / (s2 - s1)


def test_linear_reuse_forecasts_each_token_from_its_last_two_computations(torch_backend, poison_allocations):
    """reuse="linear" against a float64 spec written from the definition, over two generations in kept buffers
    (CUDA graphs keep them): the second expert-like call "b" starts later in the second generation, so stale step
    stamps from the first would feed the forecast if a call's first step did not reset them. Values that are linear
    in the step index are forecast exactly (up to rounding); "copy" would give the last computed value."""
    config = RASConfig(num_steps=10, warmup_steps=2, reset_steps=(6,), sample_ratio=0.25, reuse="linear")
    session = RASSession(config, patch_size=2, keep_buffers=True)
    g = torch.Generator().manual_seed(0)
    random = torch.randn(10, 2, 64, 16, generator=g)
    a, slope = torch.randint(-8, 8, (1, 2, 64, 16), generator=g), torch.randint(-4, 4, (1, 2, 64, 16), generator=g)
    linear = (a + slope * torch.arange(10).view(10, 1, 1, 1)).float()
    forecasts = 0
    for values, switch in ((random, 4), (random, 7), (linear, 10)):  # linear: call "a" only
        session.reset()
        history = {"a": {}, "b": {}}
        outputs = _run_calls(session, values, switch, history)
        for step, out in enumerate(outputs):
            calls = history["a" if step < switch else "b"]
            expected = torch.stack(
                [torch.stack([_forecast_spec([h for h in calls[(i, t)] if h[0] <= step], step) for t in range(64)])
                 for i in range(2)]
            )  # fmt: skip
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
            if values is linear:  # up to fp32 rounding of factors such as 2/3
                torch.testing.assert_close(out, values[step], atol=1e-4, rtol=1e-6)
            forecasts += int((out != values[step]).any()) if values is random else 0
    assert forecasts > 0  # the random values' RAS steps did not simply recompute everything
