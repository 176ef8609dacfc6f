"""Benchmark of the fused DiT norms against diffusers' unfused PyTorch ops (CUDA only).

    python -m bench.bench_norm

Shapes of a RAS step at ratio 0.25 (B = 2, 1024 active tokens): SD3-medium (D = 1536) and Lumina-Next (D = 2304, 32
heads of 72, RoPE). Both sides are timed as CUDA-graph replays (no host overhead on either side), min / median / max
of triton's do_bench runs with the L2 flushed between runs. Bytes = the tensors our kernel reads and writes once
(modulation vectors, weights and RoPE tables included). Baselines are the expressions diffusers' blocks evaluate
(``nn.LayerNorm`` / diffusers' ``RMSNorm`` modules, ``apply_rotary_emb``), which launch one kernel per operator.
"""

from __future__ import annotations

import torch

from bench.common import Row, format_table, graph_ms, measure_ceilings, print_header
from ras_kernels import adaptive_norm, gated_residual, gated_residual_norm

DTYPE = torch.bfloat16
DEVICE = "cuda"
B, L = 2, 1024


def _nbytes(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sd3_rows(bw: float) -> list[Row]:
    d = 1536
    g = dict(device=DEVICE, dtype=DTYPE)
    x, attn = torch.randn(B, L, d, **g), torch.randn(B, L, d, **g)
    shift, scale, gate = torch.randn(B, 3 * d, **g).chunk(3, dim=1)
    ln = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    shape = f"B={B} L={L} D={d} bf16"
    out = []

    ours = graph_ms(lambda: adaptive_norm(x, scale, shift))
    base = graph_ms(lambda: ln(x) * (1 + scale[:, None]) + shift[:, None])
    out.append(
        Row(
            "adaptive_norm (LN + shift/scale)",
            shape,
            ours,
            base,
            "LayerNorm, *(1+s), +t",
            "GB/s",
            _nbytes(x, x, scale, shift),
            bw,
        )
    )

    def unfused():
        h = x + gate.unsqueeze(1) * attn
        return h, ln(h) * (1 + scale[:, None]) + shift[:, None]

    ours = graph_ms(lambda: gated_residual_norm(x, attn, gate, scale, shift))
    out.append(
        Row(
            "gated_residual_norm (SD3)",
            shape,
            ours,
            graph_ms(unfused),
            "diffusers block ops",
            "GB/s",
            _nbytes(x, attn, x, x, gate, scale, shift),
            bw,
        )
    )

    ours = graph_ms(lambda: gated_residual(x, attn, gate))
    base = graph_ms(lambda: x + gate.unsqueeze(1) * attn)
    out.append(Row("gated_residual", shape, ours, base, "x + g * y", "GB/s", _nbytes(x, attn, x, gate), bw))
    return out


def _lumina_rows(bw: float) -> list[Row]:
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    d, heads, head_dim = 2304, 32, 72
    g = dict(device=DEVICE, dtype=DTYPE)
    x, branch = torch.randn(B, L, d, **g), torch.randn(B, L, d, **g)
    gate, scale = torch.randn(B, 2 * d, **g).chunk(2, dim=1)
    # Inference weights (no grad): the Triton ops refuse a weight that requires grad (they have no backward pass).
    post, pre = (RMSNorm(d, eps=1e-5).to(**g).requires_grad_(False) for _ in range(2))
    shape = f"B={B} L={L} D={d} bf16"
    out = []

    def unfused():
        h = x + gate.unsqueeze(1).tanh() * post(branch)
        return h, pre(h) * (1 + scale.unsqueeze(1))

    ours = graph_ms(
        lambda: gated_residual_norm(
            x,
            branch,
            gate,
            scale,
            tanh_gate=True,
            branch_weight=post.weight,
            branch_eps=1e-5,
            norm="rms",
            weight=pre.weight,
            eps=1e-5,
        )
    )
    out.append(
        Row(
            "gated_residual_norm (Lumina)",
            shape,
            ours,
            graph_ms(unfused),
            "diffusers block ops",
            "GB/s",
            _nbytes(x, branch, x, x, gate, scale, post.weight, pre.weight),
            bw,
        )
    )

    q = torch.randn(B, L, d, **g)
    qk_norm = torch.nn.LayerNorm(d, eps=1e-5).to(**g).requires_grad_(False)
    angles = torch.randn(B, L, head_dim // 2, device=DEVICE)
    rope = torch.polar(torch.ones_like(angles), angles)
    ours = graph_ms(
        lambda: adaptive_norm(q, norm="layer", weight=qk_norm.weight, bias=qk_norm.bias, eps=1e-5, rope=rope)
    )
    base = graph_ms(lambda: apply_rotary_emb(qk_norm(q).view(B, L, heads, head_dim), rope, use_real=False).to(DTYPE))
    out.append(
        Row(
            "adaptive_norm (QK LN + RoPE)",
            shape,
            ours,
            base,
            "LayerNorm, apply_rotary_emb",
            "GB/s",
            _nbytes(q, q, rope),
            bw,
        )
    )
    return out


def rows(ceilings: dict) -> list[Row]:
    """SD3 and Lumina-Next block norms at RAS-step sizes."""
    return _sd3_rows(ceilings["GB/s"]) + _lumina_rows(ceilings["GB/s"])


def main() -> None:
    ceilings = measure_ceilings()
    print_header(ceilings)
    print(format_table(rows(ceilings)))


if __name__ == "__main__":
    main()
