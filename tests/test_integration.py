"""RAS in a small custom DiT through RASSession alone (the code docs/integration.md walks through)."""

from __future__ import annotations

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


def test_ratio_one_reproduces_plain_model(torch_backend):
    model = TinyDiT().eval()
    noise = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        plain = sample(model, noise, 6)
        ras = sample(
            model,
            noise,
            6,
            RASSession(RASConfig(num_steps=6, warmup_steps=1, reset_steps=(), sample_ratio=1.0), patch_size=2),
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
