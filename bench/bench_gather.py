"""Benchmark of gather_tokens / scatter_tokens against PyTorch at SD3 sizes (CUDA only).

    python -m bench.bench_gather            # the table (ceilings, B=2, N=4096, D=1536 bf16, K = 1024/2048/4096)
    python -m bench.bench_gather --sweep    # also other launch configs (BLOCK_R, BLOCK_D, num_warps), for tuning

Both sides are timed as CUDA-graph replays (host launch overhead counted for neither), min / median / max of
triton's do_bench runs with the L2 flushed between runs. Bytes = (rows read + rows written) x D x element size +
index bytes, counted for our op (a shared position table counts once per sample that reads it). Baselines, fastest
shown: gather: ``torch.gather`` with an expanded index (the reference) or ``index_select`` on the flattened rows;
gather + add: SD3's order, ``x + pos`` over all N rows then ``index_select``; scatter: ``scatter_`` (the reference)
or ``index_copy_`` on the flattened rows. The flattened row numbers ``idx + b * N`` are prepared outside the timing,
which favours the baselines.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.common import Row, format_table, graph_ms, measure_ceilings, print_header
from ras_kernels import gather_tokens, scatter_tokens
from ras_kernels.gather import ops, reference

SD3 = dict(b=2, n=4096, d=1536)
KS = (1024, 2048, 4096)
DTYPE = torch.bfloat16
DEVICE = "cuda"


def _fastest(**candidates) -> tuple[float, str]:
    return min((graph_ms(fn), name) for name, fn in candidates.items())


def _inputs(b: int, n: int, d: int, k: int, dtype=DTYPE):
    g = dict(device=DEVICE, dtype=dtype)
    x, pos = torch.randn(b, n, d, **g), torch.randn(1, n, d, **g)
    # int64, ascending: what select_regions returns
    idx = torch.rand(b, n, device=DEVICE).argsort(dim=1)[:, :k].sort(dim=1).values
    flat = (idx + n * torch.arange(b, device=DEVICE)[:, None]).flatten()
    src, cache = torch.randn(b, k, d, **g), torch.randn(b, n, d, **g)
    return x, pos, idx, flat, src, cache


def _bytes(rows_moved: int, b: int, k: int, d: int, elsize: int, idx: torch.Tensor) -> float:
    return rows_moved * b * k * d * elsize + idx.numel() * idx.element_size()


def _shape(b, n, d, k, dtype=DTYPE) -> str:
    return f"B={b} K={k} N={n} D={d} {str(dtype).replace('torch.', '')}"


def _rows_at(k: int, bw: float) -> list[Row]:
    b, n, d = SD3["b"], SD3["n"], SD3["d"]
    x, pos, idx, flat, src, cache = _inputs(b, n, d, k)
    el, shape = x.element_size(), _shape(b, n, d, k)
    idx3 = idx.unsqueeze(-1).expand(-1, -1, d)
    x2, cache2, src2 = x.view(b * n, d), cache.view(b * n, d), src.view(b * k, d)
    out = []

    assert torch.equal(gather_tokens(x, idx), reference.gather_tokens(x, idx))
    base, name = _fastest(
        **{"torch.gather": lambda: torch.gather(x, 1, idx3), "index_select": lambda: x2.index_select(0, flat)}
    )
    ours = graph_ms(lambda: gather_tokens(x, idx))
    out.append(Row("gather_tokens", shape, ours, base, name, "GB/s", _bytes(2, b, k, d, el, idx), bw))

    assert torch.equal(gather_tokens(x, idx, add=pos), reference.gather_tokens(x, idx, add=pos))
    base = graph_ms(lambda: (x + pos).view(b * n, d).index_select(0, flat))
    ours = graph_ms(lambda: gather_tokens(x, idx, add=pos))
    out.append(
        Row("gather_tokens(add=pos)", shape, ours, base, "x+pos, index_select", "GB/s", _bytes(3, b, k, d, el, idx), bw)
    )

    expected = reference.scatter_tokens(cache.clone(), idx, src)
    assert torch.equal(scatter_tokens(cache, idx, src), expected)
    base, name = _fastest(
        **{"scatter_": lambda: cache.scatter_(1, idx3, src), "index_copy_": lambda: cache2.index_copy_(0, flat, src2)}
    )
    ours = graph_ms(lambda: scatter_tokens(cache, idx, src))
    out.append(Row("scatter_tokens", shape, ours, base, name, "GB/s", _bytes(2, b, k, d, el, idx), bw))
    return out


def rows(ceilings: dict) -> list[Row]:
    """gather, gather + position add, scatter at SD3 sizes; each checked against the reference before timing."""
    return [row for k in KS for row in _rows_at(k, ceilings["GB/s"])]


# (BLOCK_R, BLOCK_D, num_warps) for D = 1536 bf16; the default heuristic picks (8, 512, 4).
SWEEP_KS = (1024, 4096)
SWEEP = [(4, 512, 4), (16, 512, 4), (16, 512, 8), (32, 512, 8), (16, 256, 4)]


def _sweep_case(label: str, fn, shape: str, work: float, bw: float) -> list[Row]:
    default, base = ops._launch_config, graph_ms(fn)
    out = []
    for cfg in SWEEP:
        ops._launch_config = lambda *_, cfg=cfg: cfg
        try:
            ms = graph_ms(fn)
        finally:
            ops._launch_config = default
        out.append(
            Row(f"{label} R={cfg[0]} D={cfg[1]} w={cfg[2]}", shape, ms, base, "default config", "GB/s", work, bw)
        )
    return out


def sweep(ceilings: dict) -> list[Row]:
    """Our ops under each launch config in SWEEP, against the default config (shown as the baseline)."""
    b, n, d = SD3["b"], SD3["n"], SD3["d"]
    bw, out = ceilings["GB/s"], []
    for k in SWEEP_KS:
        x, pos, idx, _, src, cache = _inputs(b, n, d, k)
        shape, el = _shape(b, n, d, k), x.element_size()
        out += _sweep_case("gather", partial(gather_tokens, x, idx), shape, _bytes(2, b, k, d, el, idx), bw)
        out += _sweep_case(
            "gather+add", partial(gather_tokens, x, idx, add=pos), shape, _bytes(3, b, k, d, el, idx), bw
        )
        out += _sweep_case("scatter", partial(scatter_tokens, cache, idx, src), shape, _bytes(2, b, k, d, el, idx), bw)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print_header(ceilings)
    print(format_table(rows(ceilings)))
    if args.sweep:
        print("\nlaunch-config sweep (baseline = the default config):\n")
        print(format_table(sweep(ceilings)))


if __name__ == "__main__":
    main()
