"""Randomised inputs for every public op: the Triton path against the plain-PyTorch reference.

Each fuzz test draws ``CASES`` cases from ``random.Random(seed)`` (and torch's generator, seeded the same), where
the seed is the test's fresh torch seed from conftest unless ``RAS_FUZZ_SEED`` is set to replay a printed one. A
case draws shapes (awkward sizes included: 1, odd, K = 1 and K = N), dtypes (fp32 / fp16 / bf16, mixed where the
op allows it), layouts (contiguous, rows inside a wider buffer, every other row, batch and row axes swapped) and
index patterns (sorted or not, int32 / int64, transposed, one index row shared by the batch). About one case in
four is instead made invalid in one documented way and must raise the documented error, before any launch.
Tolerances are those of the op's own test file. Every case prints what it drew (shown with a failure).

Also here, over the same draws: the Triton path refuses inputs that require grad while the reference keeps
autograd, and (GPU, 2 devices) every op runs on its tensors' device, not the current one.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from ras_kernels import (
    adaptive_norm,
    cached_kv_attention,
    flash_attention,
    gated_residual,
    gated_residual_norm,
    gather_tokens,
    scatter_tokens,
    select_regions,
    swiglu,
)
from ras_kernels.attention import reference as attention_ref
from ras_kernels.gather import reference as gather_ref
from ras_kernels.norm import reference as norm_ref
from ras_kernels.select import reference as select_ref
from ras_kernels.swiglu import reference as swiglu_ref

from ._utils import (
    DEVICE,
    HAS_CUDA,
    TRITON_RUNNABLE,
    assert_attention_close,
    assert_same_selection_values,
    expected_cached_attention,
    sdpa_baseline,
)

CASES = 16 if HAS_CUDA else 24  # per op, in the fuzz test (on a GPU most cases compile a kernel variant)
BAD_SHARE = 0.25
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX = (torch.int32, torch.int64)
# Elementwise ops: fp32 exact up to rounding, half precisions 2 ulps of the output dtype (the interpreter
# truncates fp32 -> bf16), as in tests/test_norm.py (swiglu's own tolerances are tighter; these cover both).
# fp32: the kernels fuse multiply-adds, so a residual add that cancels (h = r + g * v near 0) keeps a few more ulps of
# the operands than torch's two roundings; normalising a short row (D = 1) then carries that error to the output.
TOL = {torch.float32: (5e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# Head dims: kernel ones (split and not) and ones the Triton path zero-pads (8, 12, 33, 100).
HEAD_DIMS = (8, 12, 16, 33, 40, 64, 72, 100)


@dataclass
class Case:
    """One draw: the op's arguments, how to call it, how to check its result, documented misuses of it."""

    desc: str
    args: dict
    call: Callable[[dict], object]
    check: Callable[[dict, object], None]
    grad: str  # a float input the op is differentiable in (on the reference path)
    bad: list[tuple[str, dict, type, str]] = field(default_factory=list)  # (what, overrides, error, message)


class Draw:
    """Random sizes, dtypes, layouts and indices from one seeded generator; ``notes`` records what was drawn."""

    def __init__(self, rng: random.Random, device: str):
        self.rng, self.device, self.notes = rng, device, []
        self.cpu = torch.device(device).type == "cpu"

    def size(self, lo: int, cpu_hi: int, gpu_hi: int) -> int:
        return self.rng.randint(lo, cpu_hi if self.cpu else gpu_hi)

    def count(self, n: int) -> int:
        """K: 1, N or in between."""
        return self.rng.choice([1, n, self.rng.randint(1, n)])

    def dtype(self, name: str) -> torch.dtype:
        dt = self.rng.choice(DTYPES)
        self.notes.append(f"{name}:{str(dt)[6:]}")
        return dt

    def choice(self, name: str, options):
        value = self.rng.choice(options)
        self.notes.append(f"{name}={value}")
        return value

    def randn(self, name: str, shape, dtype, scale: float = 1.0) -> torch.Tensor:
        """Random values in a random layout with a unit last stride."""
        t = (scale * torch.randn(shape, device=self.device)).to(dtype)
        return self.layout(name, t)

    def layout(self, name: str, t: torch.Tensor, kinds=("contiguous", "wide", "rows", "batch-major")) -> torch.Tensor:
        kinds = [k for k in kinds if (k != "rows" or t.dim() >= 2) and (k != "batch-major" or t.dim() >= 3)]
        kind = self.rng.choice(kinds)
        self.notes.append(f"{name}{tuple(t.shape)}:{kind}")
        if kind == "contiguous":
            return t
        if kind == "wide":  # rows padded inside a wider buffer (e.g. one chunk of a fused projection)
            buf = torch.empty(*t.shape[:-1], t.shape[-1] + self.rng.randint(1, 9), dtype=t.dtype, device=t.device)
            view = buf[..., : t.shape[-1]]
        elif kind == "rows":  # every other row
            view = torch.empty(*t.shape[:-2], 2 * t.shape[-2], t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2, :]
        else:  # batch and row axes swapped in memory
            view = torch.empty(t.shape[1], t.shape[0], *t.shape[2:], dtype=t.dtype, device=t.device).transpose(0, 1)
        return view.copy_(t)

    def index(self, b: int, n: int, k: int, *, distinct: bool) -> torch.Tensor:
        if distinct:
            rows = torch.stack([torch.randperm(n, device=self.device)[:k] for _ in range(b)])
        else:
            rows = torch.randint(0, n, (b, k), device=self.device)
        if self.rng.random() < 0.5:
            rows = rows.sort(dim=1).values
        rows = rows.to(self.rng.choice(INDEX))
        kind = self.rng.choice(["contiguous", "transposed", "shared"])
        self.notes.append(f"idx{(b, k)}:{str(rows.dtype)[6:]}:{kind}")
        if kind == "transposed":
            return rows.t().contiguous().t()
        if kind == "shared":  # one index row for the whole batch (a CFG pair), batch stride 0
            return rows[:1].expand(b, k)
        return rows

    def desc(self, op: str) -> str:
        return f"{op}: " + " ".join(self.notes)


def _last_stride_2(t: torch.Tensor) -> torch.Tensor:
    """t's values with a last stride of 2 (not accepted by any op)."""
    return torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2].copy_(t)


def _needs_grad(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _misc_bad(op: str, args: dict, grad: str, *, unit: tuple[str, ...] = ()) -> list:
    """Misuses every op shares: a tensor that requires grad (Triton path) and a non-unit last stride."""
    bad = [(f"{grad} requires grad", {grad: _needs_grad(args[grad])}, RuntimeError, f"{op}: {grad} requires grad")]
    for name in unit:
        if args[name].shape[-1] > 1:
            bad.append(
                (f"{name} last stride 2", {name: _last_stride_2(args[name])}, ValueError, f"{name} must have unit")
            )
    return bad


def _index_bad(dr: Draw, idx: torch.Tensor, n: int, *, distinct: bool) -> list:
    """Index misuses: K = 0, K > N, a float index, and (CPU: checked on the host) out-of-range / repeated values."""
    b, k = idx.shape
    bad = [
        ("K = 0", {"idx": idx[:, :0]}, ValueError, "idx must select between 1 and N"),
        ("K > N", {"idx": torch.zeros(b, n + 1, dtype=idx.dtype, device=idx.device)}, ValueError, "idx must select"),
        ("float idx", {"idx": idx.float()}, TypeError, r"idx must have dtype in \(int32, int64\)"),
    ]
    if dr.cpu:
        high = idx.clone()
        high[-1, -1] = n
        bad.append(("idx = N", {"idx": high}, ValueError, "idx holds token indices outside"))
        if distinct and k > 1:
            rep = idx.clone()
            rep[0, -1] = rep[0, 0]
            bad.append(("repeated idx", {"idx": rep}, ValueError, "idx must hold distinct"))
    return bad


def _overlapping(t: torch.Tensor) -> torch.Tensor | None:
    """An expanded (stride-0) view of t's shape over its own first batch or row, or None when t has no such axis."""
    if t.shape[0] > 1:
        return t[:1].expand(t.shape)
    if t.shape[1] > 1:
        return t[:, :1].expand(t.shape)
    return None


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.is_contiguous()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------
# One draw per op


def draw_gather_tokens(dr: Draw) -> Case:
    b, n, d = dr.size(1, 3, 4), dr.size(1, 70, 4096), dr.choice("D", [1, 8, 72, dr.size(1, 200, 2304)])
    k = dr.count(n)
    x = dr.randn("x", (dr.choice("Bx", [1, b]), n, d), dr.dtype("x"), 4.0)
    add = None
    if dr.rng.random() < 0.5:
        add = dr.randn("add", (dr.choice("Ba", [1, b]), n, d), dr.dtype("add"))
    args = {"x": x, "idx": dr.index(b, n, k, distinct=False), "add": add}
    expected = gather_ref.gather_tokens(x, args["idx"], add=add)

    def check(a, out):
        assert out.is_contiguous()
        _exact(out, expected)

    bad = _misc_bad("gather_tokens", args, "x", unit=("x",)) + _index_bad(dr, args["idx"], n, distinct=False)
    bad.append(("x 2-D", {"x": x[0]}, ValueError, "x must have 3 dimensions"))
    return Case(
        dr.desc("gather_tokens"), args, lambda a: gather_tokens(a["x"], a["idx"], add=a["add"]), check, "x", bad
    )


def draw_scatter_tokens(dr: Draw) -> Case:
    b, n, d = dr.size(1, 3, 4), dr.size(1, 70, 4096), dr.choice("D", [1, 8, 72, dr.size(1, 200, 2304)])
    k = dr.count(n)
    dtype = dr.dtype("dst/src")
    dst, src = dr.randn("dst", (b, n, d), dtype), dr.randn("src", (b, k, d), dtype)
    args = {"dst": dst, "idx": dr.index(b, n, k, distinct=True), "src": src}
    expected = gather_ref.scatter_tokens(dst.clone(), args["idx"], src)

    def check(a, out):
        assert out is a["dst"]
        _exact(out, expected)

    bad = _misc_bad("scatter_tokens", args, "src", unit=("dst", "src")) + _index_bad(dr, args["idx"], n, distinct=True)
    if (overlap := _overlapping(dst)) is not None:
        bad.append(("broadcast dst", {"dst": overlap}, ValueError, "dst is written in place"))
    other = torch.float16 if dtype != torch.float16 else torch.float32
    bad.append(("src dtype", {"src": src.to(other)}, TypeError, "src must have dtype"))
    bad.append(("src rows", {"src": torch.cat([src, src[:, :1]], 1)}, ValueError, r"src must have shape \(B, K, D\)"))
    return Case(
        dr.desc("scatter_tokens"), args, lambda a: scatter_tokens(a["dst"], a["idx"], a["src"]), check, "src", bad
    )


def draw_select_regions(dr: Draw) -> Case:
    b = dr.size(1, 3, 4)
    if dr.rng.random() < 0.4:  # a video [B, C, T, H, W], (pt, ph, pw) patches
        p = dr.choice("p", [(1, 2, 2), (2, 1, 1), (2, 2, 2), (3, 1, 2), (1, 1, 3)])
        grid = (dr.size(1, 3, 21), dr.size(1, 6, 45), dr.size(1, 6, 80))
    else:  # an image [B, C, H, W], p x p patches
        p = dr.choice("p", [1, 2, 3])
        grid = (dr.size(1, 8, 64), dr.size(1, 8, 64))
    patch = (p, p) if isinstance(p, int) else p
    size, n = [g * q for g, q in zip(grid, patch, strict=True)], math.prod(grid)
    metric = dr.choice("metric", ["std", "l2", "delta"])
    c = dr.size(2 if metric == "std" else 1, 8, 16)
    signal = dr.randn("signal", (b, c, *size), dr.dtype("signal"))
    if dr.rng.random() < 0.25:  # H and W swapped in memory: no unit last stride, which select accepts
        swapped = torch.empty(b, c, *size[:-2], size[-1], size[-2], dtype=signal.dtype, device=signal.device)
        signal = swapped.transpose(-2, -1).copy_(signal)
        dr.notes.append("signal:hw-transposed")
    previous = scores = None
    if metric == "delta":  # about a third of the tokens not recomputed: their voxels equal the previous signal's
        copied = torch.rand(b, *grid, device=dr.device) < 0.3
        for dim, q in enumerate(patch, start=1):
            copied = copied.repeat_interleave(q, dim)
        changed = (signal.float() + torch.randn(signal.shape, device=dr.device)).to(signal.dtype)
        previous = dr.layout("previous", torch.where(copied[:, None], signal, changed))
        scores = dr.layout("scores", torch.rand(b, n, device=dr.device))
    counters = None
    if dr.rng.random() < 0.7:
        counters = dr.layout("counters", torch.randint(0, 4, (b, n), device=dr.device).to(dr.choice("cnt", INDEX)))
    k = dr.count(n)
    kw = dict(
        patch_size=p,
        metric=metric,
        starvation_scale=dr.choice("scale", [0.0, 0.1, 0.5]),
        mode=dr.choice("mode", ["reference", "paper"]),
        high_ratio=dr.choice("high", [0.0, 1.0, round(dr.rng.random(), 3)]),
    )
    before = None if counters is None else counters.clone()
    ref_c = None if counters is None else counters.clone()
    scores_before = None if scores is None else scores.clone()
    ref_s = None if scores is None else scores.clone()
    ref = select_ref.select_regions(signal, k, counters=ref_c, previous=previous, scores=ref_s, **kw)

    def check(a, out):
        delta = {"previous": previous, "scores": scores_before}
        assert_same_selection_values(signal, k, before, out, a["counters"], ref, ref_c, **delta, **kw)
        if scores is not None:  # updated in place: the same changes, carried-over entries exactly
            torch.testing.assert_close(a["scores"], ref_s, rtol=1e-5, atol=1e-6)

    args = {"signal": signal, "k": k, "counters": counters, "previous": previous, "scores": scores}
    bad = [
        ("K = 0", {"k": 0}, ValueError, "num_active must be in"),
        ("K > N", {"k": n + 1}, ValueError, "num_active must be in"),
        ("W = 0", {"signal": signal[..., :0]}, ValueError, "no tokens"),
    ]
    if patch[-1] > 1:
        bad.append(("p does not divide W", {"signal": signal[..., 1:]}, ValueError, "divisible by patch_size"))
    if counters is not None:
        if (overlap := _overlapping(counters)) is not None:
            bad.append(("broadcast counters", {"counters": overlap}, ValueError, "counters is written in place"))
        bad.append(("float counters", {"counters": counters.float()}, TypeError, "counters must have dtype"))
    if metric == "std":
        bad.append(("std over 1 channel", {"signal": signal[:, :1]}, ValueError, "at least 2 channels"))
    if metric == "delta":
        bad.append(("no previous", {"previous": None}, ValueError, "metric='delta' needs previous"))
        bad.append(("previous cropped", {"previous": previous[..., :-1]}, ValueError, "previous must have the signal"))
        bad.append(("float64 scores", {"scores": scores.double()}, TypeError, "scores must have dtype"))
        bad.append(("scores of N + 1", {"scores": scores.new_zeros(b, n + 1)}, ValueError, "scores must have shape"))
    else:
        bad.append(("scores", {"scores": torch.zeros(b, n, device=dr.device)}, ValueError, "scores is used only"))

    def call(a):
        delta = {"previous": a["previous"], "scores": a["scores"]}
        return select_regions(a["signal"], a["k"], counters=a["counters"], **delta, **kw)

    return Case(dr.desc("select_regions"), args, call, check, "signal", bad)


def _heads(dr: Draw) -> tuple[int, int, int]:
    hkv = dr.size(1, 2, 8)
    return hkv * dr.size(1, 3, 4), hkv, dr.choice("d", list(HEAD_DIMS) + ([] if dr.cpu else [128, 136, 256, 264]))


def draw_cached_kv_attention(dr: Draw) -> Case:
    b, n = dr.size(1, 2, 4), dr.size(1, 80, 4096)
    hq, hkv, d = _heads(dr)
    k = dr.count(n)
    t = dr.choice("T", [0, dr.size(1, 20, 333)])
    lq = dr.choice("Lq", [k + t, dr.size(1, 40, 2048)])
    dtype = dr.dtype("all")
    q = dr.randn("q", (b, lq, hq, d), dtype)
    k_new, v_new = dr.randn("k_new", (b, k, hkv, d), dtype), dr.randn("v_new", (b, k, hkv, d), dtype)
    k_cache, v_cache = dr.randn("k_cache", (b, n, hkv, d), dtype), dr.randn("v_cache", (b, n, hkv, d), dtype)
    extra, mask = (None, None), None
    if t:
        extra = (dr.randn("k_extra", (b, t, hkv, d), dtype), dr.randn("v_extra", (b, t, hkv, d), dtype))
        if dr.rng.random() < 0.5:
            mask = torch.rand(b, t, device=dr.device) < 0.6
    scale = dr.choice("scale", [None, round(dr.rng.uniform(0.05, 0.3), 4)])
    idx = dr.index(b, n, k, distinct=True)
    ref, ref_lse, kc, vc, base = expected_cached_attention(q, k_new, v_new, k_cache, v_cache, idx, extra, scale, mask)
    args = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, idx=idx)
    args.update(k_extra=extra[0], v_extra=extra[1], extra_mask=mask, scale=scale)

    def call(a):
        kw = {key: a[key] for key in ("k_extra", "v_extra", "extra_mask", "scale")}
        return cached_kv_attention(
            a["q"], a["k_new"], a["v_new"], a["k_cache"], a["v_cache"], a["idx"], **kw, return_lse=True
        )

    def check(a, result):
        out, lse = result
        assert_attention_close(out, ref, base, dtype)
        torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL[dtype], rtol=1e-3)
        _exact(a["k_cache"], kc)
        _exact(a["v_cache"], vc)

    bad = _misc_bad("cached_kv_attention", args, "q", unit=("q", "k_cache")) + _index_bad(dr, idx, n, distinct=True)
    for name in ("k_cache", "v_cache"):
        if (overlap := _overlapping(args[name])) is not None:
            bad.append((f"broadcast {name}", {name: overlap}, ValueError, f"{name} is written in place"))
    bad.append(("k_new rows", {"k_new": torch.cat([k_new, k_new[:, :1]], 1)}, ValueError, "k_new must have shape"))
    bad.append(("scale < 0", {"scale": -0.1}, ValueError, "scale must be"))
    if hkv > 1:
        q_heads = torch.randn(b, lq, hq + 1, d, device=dr.device).to(dtype)
        bad.append(("Hq % Hkv", {"q": q_heads}, ValueError, "multiple of kv heads"))
    if not t:
        no_extra = torch.ones(b, 1, dtype=torch.bool, device=dr.device)
        bad.append(("mask without extra", {"extra_mask": no_extra}, ValueError, "extra_mask needs k_extra"))
    return Case(dr.desc("cached_kv_attention"), args, call, check, "q", bad)


def draw_flash_attention(dr: Draw) -> Case:
    b, lq, lk = dr.size(1, 2, 4), dr.size(1, 40, 4096), dr.size(1, 100, 4096)
    hq, hkv, d = _heads(dr)
    dtype = dr.dtype("all")
    q, k, v = (
        dr.randn(name, (b, length, h, d), dtype) for name, length, h in (("q", lq, hq), ("k", lk, hkv), ("v", lk, hkv))
    )
    mask = None
    if dr.rng.random() < 0.5:
        mask = torch.rand(b, lk, device=dr.device) < 0.6
        mask[:, dr.rng.randrange(lk)] = True  # every sample sees a key (SDPA, the baseline, gives NaN otherwise)
    scale = dr.choice("scale", [None, round(dr.rng.uniform(0.05, 0.3), 4)])
    s = d**-0.5 if scale is None else scale
    ref, ref_lse = attention_ref.attention(q.float(), k.float(), v.float(), s, mask, return_lse=True)
    base = sdpa_baseline(q, k, v, s, mask)

    def check(a, result):
        out, lse = result
        assert_attention_close(out, ref, base, dtype)
        torch.testing.assert_close(lse, ref_lse, atol=LSE_TOL[dtype], rtol=1e-3)

    args = dict(q=q, k=k, v=v, key_mask=mask, scale=scale)
    bad = _misc_bad("flash_attention", args, "k", unit=("q", "v"))
    bad.append(("no key", {"k": k[:, :0], "v": v[:, :0], "key_mask": None}, ValueError, "at least one key"))
    bad.append(("mask length", {"key_mask": torch.ones(b, lk + 1, dtype=torch.bool, device=dr.device)}, ValueError,
                "key_mask must have shape"))  # fmt: skip
    bad.append(("v dtype", {"v": v.to(torch.float16 if dtype != torch.float16 else torch.float32)}, TypeError,
                "v must have dtype"))  # fmt: skip

    def call(a):
        return flash_attention(a["q"], a["k"], a["v"], key_mask=a["key_mask"], scale=a["scale"], return_lse=True)

    return Case(dr.desc("flash_attention"), args, call, check, "q", bad)


def _modulation(dr: Draw, name: str, b: int, d: int) -> torch.Tensor | None:
    """An optional per-sample [B or 1, D] vector (adaLN scale / shift / gate)."""
    if dr.rng.random() < 0.4:
        return None
    return dr.randn(name, (dr.choice(f"B{name}", [1, b]), d), dr.dtype(name), 0.5)


def _affine(dr: Draw, name: str, d: int, offset: float) -> torch.Tensor | None:
    """An optional [D] parameter around ``offset`` (a norm weight near 1, a bias near 0)."""
    if dr.rng.random() < 0.4:
        return None
    return dr.layout(name, (offset + 0.5 * torch.randn(d, device=dr.device)).to(dr.dtype(name)))


def _rope(dr: Draw, b: int, length: int, d: int):
    halves = [h for h in range(1, d // 2 + 1) if d % (2 * h) == 0]
    if not halves or dr.rng.random() < 0.5:
        return None
    half = dr.choice("rope_half", halves)
    angles = 10 * torch.rand(dr.choice("Brope", [1, b]), length, half, device=dr.device)
    return torch.polar(torch.ones_like(angles), angles)


def _norm_bad(dr: Draw, op: str, args: dict, grad: str, rows: tuple[str, ...]) -> list:
    x = args[rows[0]]
    bad = _misc_bad(op, args, grad, unit=rows)
    bad.append((f"{rows[0]} 2-D", {rows[0]: x[0]}, ValueError, f"{rows[0]} must have 3 dimensions"))
    bad.append((f"{rows[0]} fp64", {rows[0]: x.double()}, TypeError, f"{rows[0]} must have dtype"))
    return bad


def _norm_shape(dr: Draw) -> tuple[int, int, int]:
    return dr.size(1, 3, 4), dr.size(1, 20, 4096), dr.choice("D", [1, 8, 72, dr.size(1, 300, 3072)])


def _norm_kwargs(dr: Draw, b: int, d: int) -> dict:
    """The adaLN modulation and the norm's own arguments, shared by adaptive_norm and gated_residual_norm."""
    return dict(
        scale=_modulation(dr, "scale", b, d),
        shift=_modulation(dr, "shift", b, d),
        norm=dr.choice("norm", ["layer", "rms"]),
        weight=_affine(dr, "weight", d, 1.0),
        bias=_affine(dr, "bias", d, 0.0),
        eps=dr.choice("eps", [1e-6, 1e-5]),
    )


def draw_adaptive_norm(dr: Draw) -> Case:
    b, length, d = _norm_shape(dr)
    x = dr.randn("x", (b, length, d), dr.dtype("x"), 3.0)
    kw = dict(_norm_kwargs(dr, b, d), rope=_rope(dr, b, length, d))
    expected = norm_ref.adaptive_norm(x, **kw)
    args = {"x": x, **kw}
    bad = _norm_bad(dr, "adaptive_norm", args, "x", ("x",))
    bad.append(("scale width", {"scale": torch.randn(b, d + 1, device=dr.device)}, ValueError, "scale must have shape"))
    bad.append(("eps 0", {"eps": 0.0}, ValueError, "eps must be > 0"))
    bad.append(("norm name", {"norm": "batch"}, ValueError, "norm must be one of"))
    bad.append(("real rope", {"rope": torch.ones(1, length, 1, device=dr.device)}, TypeError, "rope must have dtype"))
    return Case(dr.desc("adaptive_norm"), args, lambda a: adaptive_norm(**a), lambda a, out: _close(out, expected),
                "x", bad)  # fmt: skip


def _residual_args(dr: Draw) -> dict:
    b, length, d = _norm_shape(dr)
    return dict(
        residual=dr.randn("residual", (b, length, d), dr.dtype("residual"), 2.0),
        branch=dr.randn("branch", (b, length, d), dr.dtype("branch")),
        gate=_modulation(dr, "gate", b, d),
        tanh_gate=dr.choice("tanh", [False, True]),
        branch_weight=_affine(dr, "branch_weight", d, 1.0),
        branch_eps=dr.choice("branch_eps", [1e-6, 1e-5]),
    )


def _residual_bad(dr: Draw, op: str, args: dict) -> list:
    res = args["residual"]
    bad = _norm_bad(dr, op, args, "branch", ("residual", "branch"))
    bad.append(("branch rows", {"branch": res[:, :0]}, ValueError, "branch must have shape"))
    bad.append(("gate 3-D", {"gate": torch.randn(1, 1, res.shape[2], device=dr.device)}, ValueError,
                "gate must have 2 dimensions"))  # fmt: skip
    bad.append(("tanh_gate str", {"tanh_gate": "yes"}, TypeError, "tanh_gate must be a bool"))
    bad.append(("branch_eps < 0", {"branch_eps": -1.0}, ValueError, "branch_eps must be > 0"))
    return bad


def draw_gated_residual(dr: Draw) -> Case:
    args = _residual_args(dr)
    expected = norm_ref.gated_residual(**args)
    return Case(dr.desc("gated_residual"), args, lambda a: gated_residual(**a), lambda a, out: _close(out, expected),
                "branch", _residual_bad(dr, "gated_residual", args))  # fmt: skip


def draw_gated_residual_norm(dr: Draw) -> Case:
    args = _residual_args(dr)
    b, _, d = args["residual"].shape
    args.update(_norm_kwargs(dr, b, d))
    h_ref, y_ref = norm_ref.gated_residual_norm(**args)

    def check(a, out):
        _close(out[0], h_ref)
        _close(out[1], y_ref)

    bad = _residual_bad(dr, "gated_residual_norm", args)
    bad.append(("shift batch", {"shift": torch.randn(b + 1, d, device=dr.device)}, ValueError, "shift must have shape"))
    return Case(dr.desc("gated_residual_norm"), args, lambda a: gated_residual_norm(**a), check, "branch", bad)


def draw_swiglu(dr: Draw) -> Case:
    lead = [dr.size(1, 4, 64) for _ in range(dr.rng.randint(0, 2))]
    shape = (*lead, dr.choice("F", [1, 96, dr.size(1, 300, 6144)]))
    kinds = ("contiguous", "wide", "rows")  # leading dims stay mergeable into rows
    gate = dr.layout("gate", (4 * torch.randn(shape, device=dr.device)).to(dr.dtype("gate")), kinds)
    up = dr.layout("up", torch.randn(shape, device=dr.device).to(dr.dtype("up")), kinds)
    expected = swiglu_ref.swiglu(gate, up)
    args = {"gate": gate, "up": up}
    bad = _misc_bad("swiglu", args, "gate", unit=("gate", "up"))
    bad.append(("shapes differ", {"up": torch.randn(*shape[:-1], shape[-1] + 1, device=dr.device)}, ValueError,
                "same shape"))  # fmt: skip
    bad.append(("up int", {"up": up.to(torch.int32)}, TypeError, "up must have dtype"))
    if len(shape) == 3 and shape[0] > 1 and shape[1] > 1:
        swapped = torch.empty(shape[1], shape[0], shape[2], dtype=up.dtype, device=dr.device).transpose(0, 1)
        bad.append(("rows not mergeable", {"up": swapped.copy_(up)}, ValueError, "up must be viewable"))
    return Case(dr.desc("swiglu"), args, lambda a: swiglu(**a), lambda a, out: _close(out, expected), "gate", bad)


DRAWS = {
    "select_regions": draw_select_regions,
    "gather_tokens": draw_gather_tokens,
    "scatter_tokens": draw_scatter_tokens,
    "cached_kv_attention": draw_cached_kv_attention,
    "flash_attention": draw_flash_attention,
    "adaptive_norm": draw_adaptive_norm,
    "gated_residual": draw_gated_residual,
    "gated_residual_norm": draw_gated_residual_norm,
    "swiglu": draw_swiglu,
}


@pytest.fixture
def fuzz_rng() -> random.Random:
    seed = int(os.environ.get("RAS_FUZZ_SEED", torch.initial_seed()))
    torch.manual_seed(seed)
    print(f"fuzz seed {seed} (RAS_FUZZ_SEED={seed} replays this test's cases)")
    return random.Random(seed)


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.filterwarnings("ignore:ras_kernels attention. head dim")
@pytest.mark.parametrize("op", list(DRAWS))
def test_fuzz_triton_matches_reference(op, triton_backend, fuzz_rng):
    for i in range(CASES):
        case = DRAWS[op](Draw(fuzz_rng, DEVICE))
        if fuzz_rng.random() < BAD_SHARE:
            what, overrides, error, match = fuzz_rng.choice(case.bad)
            print(f"case {i}: {case.desc}; invalid: {what}")
            with pytest.raises(error, match=match):
                case.call({**case.args, **overrides})
        else:
            print(f"case {i}: {case.desc}")
            case.check(case.args, case.call(case.args))


@pytest.mark.filterwarnings("ignore:ras_kernels attention. head dim")
@pytest.mark.parametrize("op", list(DRAWS))
def test_every_op_traces_as_one_node_under_torch_compile(op, triton_backend, fuzz_rng):
    """Each op's registered torch.library op (its fake implementation for shapes, its declared in-place writes)
    under ``torch.compile(fullgraph=True)``: the compiled call gives what the eager call's check expects, in-place
    outputs included (AOT autograd's functionalisation writes them back only if the schema declares them)."""
    torch._dynamo.reset()
    case = DRAWS[op](Draw(fuzz_rng, DEVICE))
    print(case.desc)
    compiled = torch.compile(case.call, fullgraph=True, backend="aot_eager")
    case.check(case.args, compiled(case.args))


@pytest.mark.filterwarnings("ignore:ras_kernels attention. head dim")
@pytest.mark.parametrize("op", [op for op in DRAWS if op != "select_regions"])
def test_triton_path_refuses_autograd_reference_keeps_it(op, monkeypatch, fuzz_rng):
    """The kernels have no backward: with grad mode on, an input that requires grad is an error naming the op and
    the input (under no_grad the same call runs); the reference path returns a differentiable result."""
    case = DRAWS[op](Draw(fuzz_rng, DEVICE))
    print(case.desc)
    args = {**case.args, case.grad: _needs_grad(case.args[case.grad])}
    if TRITON_RUNNABLE:
        monkeypatch.setenv("RAS_BACKEND", "triton")
        with pytest.raises(RuntimeError, match=f"{op}: {case.grad} requires grad.*RAS_BACKEND=torch"):
            case.call(args)
        with torch.no_grad():
            case.check(args, case.call(args))
    monkeypatch.setenv("RAS_BACKEND", "torch")
    out = case.call(args)
    first = out[0] if isinstance(out, (tuple, list)) else out
    first.float().square().sum().backward()
    grad = args[case.grad].grad
    assert grad is not None and grad.shape == args[case.grad].shape and torch.isfinite(grad).all()


def test_select_regions_accepts_a_signal_that_requires_grad(triton_backend, fuzz_rng):
    """Indices have no gradient on either path, so select_regions (unlike the other ops) takes such a signal."""
    case = draw_select_regions(Draw(fuzz_rng, DEVICE))
    print(case.desc)
    case.check(case.args, case.call({**case.args, "signal": _needs_grad(case.args["signal"])}))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.filterwarnings("ignore:ras_kernels attention. head dim")
@pytest.mark.parametrize("op", list(DRAWS))
def test_gpu_every_op_on_a_second_device(op, triton_backend, fuzz_rng):
    """Tensors on cuda:1 while cuda:0 is current: each launch must run on its tensors' device."""
    torch.cuda.set_device(0)
    for i in range(3):
        case = DRAWS[op](Draw(fuzz_rng, "cuda:1"))
        print(f"case {i}: {case.desc}")
        out = case.call(case.args)
        torch.cuda.synchronize("cuda:1")
        case.check(case.args, out)
        assert torch.cuda.current_device() == 0
