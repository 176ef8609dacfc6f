"""The selection reference against the spec written out literally (Python loops, float64), on the torch path."""

from __future__ import annotations

import math

import pytest
import torch

from ras_kernels import select_regions


def literal_select(signal, k, p, metric, counters, scale, mode, high_ratio):
    """Spec section 4, one token at a time. Returns (sorted active indices, updated counters) per sample."""
    b, c, h, w = signal.shape
    x = signal.double()
    out, new_counters = [], counters.clone()
    for s in range(b):
        prio = []
        for ty in range(h // p):
            for tx in range(w // p):
                vals = []
                for yy in range(ty * p, ty * p + p):
                    for xx in range(tx * p, tx * p + p):
                        ch = [x[s, ci, yy, xx].item() for ci in range(c)]
                        if metric == "std":
                            mean = sum(ch) / c
                            vals.append(math.sqrt(sum((v - mean) ** 2 for v in ch) / (c - 1)))
                        else:
                            vals.append(math.sqrt(sum(v * v for v in ch)))
                r = sum(vals) / len(vals)
                d = counters[s, ty * (w // p) + tx].item()
                prio.append(r * math.exp((1 if mode == "reference" else -1) * scale * d))
        n = len(prio)
        ranked = sorted(range(n), key=lambda t: (prio[t], t))
        skip = n - k
        low = int(skip * (1 - high_ratio))
        active = sorted(ranked[low : low + k])
        out.append(active)
        for t in range(n):
            if t not in active:
                new_counters[s, t] += 1
    return torch.tensor(out), new_counters


CASES = [
    # (B, C, H, W, p, K, metric, mode, high_ratio)
    (2, 4, 8, 8, 2, 5, "std", "reference", 1.0),
    (1, 3, 6, 10, 2, 7, "std", "reference", 0.3),
    (2, 5, 4, 12, 1, 20, "l2", "paper", 0.5),
    (1, 2, 8, 16, 4, 3, "std", "paper", 1.0),
    (2, 4, 8, 8, 4, 1, "l2", "reference", 0.0),
    (1, 4, 8, 8, 2, 16, "std", "reference", 0.3),  # K = N
    (1, 4, 2, 2, 2, 1, "std", "paper", 0.3),  # N = 1
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-{c[7]}-p{c[4]}-K{c[5]}-hr{c[8]}" for c in CASES])
def test_reference_selection_follows_spec(case, torch_backend):
    b, c, h, w, p, k, metric, mode, high_ratio = case
    n = (h // p) * (w // p)
    counters = torch.randint(0, 6, (b, n), dtype=torch.int32)
    for _ in range(3):  # several steps: the counters feed back into the priorities
        signal = torch.randn(b, c, h, w)
        expected, expected_counters = literal_select(signal, k, p, metric, counters, 0.1, mode, high_ratio)
        got = select_regions(
            signal,
            k,
            patch_size=p,
            metric=metric,
            counters=counters,
            starvation_scale=0.1,
            mode=mode,
            high_ratio=high_ratio,
        )
        assert got.dtype == torch.int64 and torch.equal(got, expected)
        assert torch.equal(counters, expected_counters)


def test_ties_break_by_token_index(torch_backend):
    signal = torch.ones(1, 4, 8, 8)  # every score 0
    got = select_regions(signal, 5, high_ratio=0.5)  # skip 11: drop 5 lowest ranks (indices 0..4) and 6 highest
    assert got.tolist() == [[5, 6, 7, 8, 9]]


def test_starvation_sign_differs_between_modes(torch_backend):
    signal = torch.zeros(1, 2, 2, 4)
    signal[:, 0] = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # equal scores for both tokens
    counters = torch.tensor([[3, 0]])
    ref = select_regions(signal, 1, counters=counters.clone(), mode="reference")
    paper = select_regions(signal, 1, counters=counters.clone(), mode="paper")
    assert ref.tolist() == [[1]]  # exp(+kD) raises the starved token's value: it stays dropped
    assert paper.tolist() == [[0]]  # exp(-kD) lowers it: it comes back


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_active": 0}, ValueError, "num_active"),
        ({"num_active": 17}, ValueError, "num_active"),
        ({"num_active": 2.0}, TypeError, "num_active"),
        ({"patch_size": 3}, ValueError, "patch_size"),
        ({"patch_size": 0}, ValueError, "patch_size"),
        ({"metric": "var"}, ValueError, "metric"),
        ({"mode": "x"}, ValueError, "mode"),
        ({"high_ratio": 1.5}, ValueError, "high_ratio"),
        ({"starvation_scale": -1.0}, ValueError, "starvation_scale"),
        ({"counters": torch.zeros(1, 15, dtype=torch.int32)}, ValueError, "counters"),
        ({"counters": torch.zeros(1, 16)}, TypeError, "counters"),
    ],
)
def test_invalid_arguments_raise(kwargs, exc, match, torch_backend):
    args = {"num_active": 4, **kwargs}
    with pytest.raises(exc, match=match):
        select_regions(torch.randn(1, 4, 8, 8), args.pop("num_active"), **args)


def test_std_needs_two_channels_and_int_signal_rejected(torch_backend):
    with pytest.raises(ValueError, match="channels"):
        select_regions(torch.randn(1, 1, 4, 4), 2)
    with pytest.raises(TypeError, match="signal"):
        select_regions(torch.zeros(1, 4, 4, 4, dtype=torch.int32), 2)
