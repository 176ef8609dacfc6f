"""Benchmark of cached_kv_attention / attention against PyTorch SDPA (CUDA only).

    python -m bench.bench_attention            # the table (ceilings, SD3, Lumina and Flux shapes)
    python -m bench.bench_attention --paths    # the RAS_ATTENTION paths (portable, hopper, cudnn) on the model shapes
    python -m bench.bench_attention --sweep    # every kernel config on every shape, for tuning
    python -m bench.bench_attention --tune ras_kernels/attention/tuned_configs.json
                                               # the shipped table: fastest config per autotune key
    python -m bench.bench_attention --tune-hopper ras_kernels/attention/hopper_configs.json
                                               # the same for the Hopper kernel (RAS_ATTENTION=hopper)
    python -m bench.bench_attention --fp8-probe  # the Hopper kernel with e4m3 Q / K (and V) against bf16

Both sides are timed as CUDA-graph replays (so host launch overhead is not counted for either), min / median / max of
triton's do_bench runs with the L2 flushed between runs. FLOPs = 4 * Lq * Lk * Hq * d * B. The SDPA baseline runs on
the equivalent pre-concatenated inputs ([B, L, H, d] tensors seen as [B, H, L, d] views, GQA heads repeated
beforehand, none of that timed) with the fastest of its cuDNN / flash / memory-efficient backends, each tried
explicitly. The "full op" rows add the cache write to ours and index_copy_ + torch.cat to the PyTorch path.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from bench.common import Row, attention_path, device_name, format_table, graph_ms, measure_ceilings

DTYPE = torch.bfloat16


def _best_sdpa(q, k, v, backends=None) -> tuple[float, str]:
    """Fastest SDPA backend on [B, L, H, d] inputs (viewed as [B, H, L, d]); k/v already have q's head count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    names = {
        SDPBackend.CUDNN_ATTENTION: "cuDNN",
        SDPBackend.FLASH_ATTENTION: "flash",
        SDPBackend.EFFICIENT_ATTENTION: "efficient",
    }
    best = (math.inf, "none")
    for backend in backends or names:
        try:
            with sdpa_kernel(backend):
                ms = graph_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        except RuntimeError:
            continue
        best = min(best, (ms, f"SDPA {names[backend]}"))
    return best


def _inputs(b, n, kk, t, hq, hkv, d, lq=None):
    g = dict(dtype=DTYPE, device="cuda")
    lq = kk + t if lq is None else lq
    q = torch.randn(b, lq, hq, d, **g)
    kc, vc = torch.randn(b, n, hkv, d, **g), torch.randn(b, n, hkv, d, **g)
    kn, vn = torch.randn(b, kk, hkv, d, **g), torch.randn(b, kk, hkv, d, **g)
    idx = torch.stack([torch.randperm(n, device="cuda")[:kk] for _ in range(b)]).sort(dim=1).values
    ke, ve = (torch.randn(b, t, hkv, d, **g), torch.randn(b, t, hkv, d, **g)) if t else (None, None)
    return q, kn, vn, kc, vc, idx, ke, ve


def _concat(kc, vc, ke, ve, group):
    k = kc if ke is None else torch.cat([kc, ke], 1)
    v = vc if ve is None else torch.cat([vc, ve], 1)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    return k, v


SD3 = dict(b=2, n=4096, t=333, hq=24, hkv=24, d=64)
LUMINA = dict(b=2, n=4096, t=0, hq=32, hkv=8, d=72)
FLUX = dict(b=1, n=4096, t=512, hq=24, hkv=24, d=128)


def _shapes():
    for kk in (512, 1024, 2048, 4096):
        yield "SD3", dict(SD3, kk=kk)
    for kk in (1024, 2048, 4096):
        yield "Lumina", dict(LUMINA, kk=kk)
    for kk in (1024, 4096):
        yield "Flux", dict(FLUX, kk=kk)


def _shape_str(name, s) -> str:
    lq, lk = s["kk"] + s["t"], s["n"] + s["t"]
    return f"{name} B={s['b']} H={s['hq']}/{s['hkv']} d={s['d']} Lq={lq} Lk={lk}"


def _flops(s) -> float:
    return 4.0 * (s["kk"] + s["t"]) * (s["n"] + s["t"]) * s["hq"] * s["d"] * s["b"]


def _shape_rows(name: str, s: dict, tf: float) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ras_kernels.attention import ops

    q, kn, vn, kc, vc, idx, ke, ve = _inputs(**s)
    scale = s["d"] ** -0.5
    group = s["hq"] // s["hkv"]
    shape = _shape_str(name, s)
    ours = graph_ms(lambda: ops._launch_attention(q, kc, vc, ke, ve, None, scale, False))
    k_all, v_all = _concat(kc, vc, ke, ve, group)
    base_ms, base_name = _best_sdpa(q, k_all, v_all)
    out = [Row("attention kernel", shape, ours, base_ms, base_name, "TFLOP/s", _flops(s), tf)]
    if s["kk"] not in (1024, 4096):
        return out
    # The whole op (cache write + attention) against the plain-PyTorch RAS path with the same SDPA backend.
    ours_full = graph_ms(lambda: ops.cached_kv_attention(q, kn, vn, kc, vc, idx, k_extra=ke, v_extra=ve, scale=scale))
    backends = {"SDPA cuDNN": SDPBackend.CUDNN_ATTENTION, "SDPA flash": SDPBackend.FLASH_ATTENTION}
    rows_idx = idx[0].long()  # one index set for the CFG pair (the RAS spec), so index_copy_ on dim 1 works

    def torch_path():
        kc.index_copy_(1, rows_idx, kn)
        vc.index_copy_(1, rows_idx, vn)
        k_all, v_all = _concat(kc, vc, ke, ve, group)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2))

    with sdpa_kernel(backends.get(base_name, SDPBackend.EFFICIENT_ATTENTION)):
        base_full = graph_ms(torch_path)
    base_full_name = f"index_copy_+cat+{base_name}"
    out.append(Row("cached_kv_attention", shape, ours_full, base_full, base_full_name, "TFLOP/s", _flops(s), tf))
    return out


# fp8 K/V caches (RASConfig(kv_cache="fp8")) against bf16 caches, the whole op: Flux and Wan 2.1 1.3B / 14B at a
# quarter of the tokens active (480x832x81: 32,760 tokens).
FP8_SHAPES = (
    ("Flux", dict(FLUX, kk=1024)),
    ("Wan 1.3B", dict(b=1, n=32760, kk=8190, t=0, hq=12, hkv=12, d=128)),
    ("Wan 14B", dict(b=1, n=32760, kk=8190, t=0, hq=40, hkv=40, d=128)),
)


def _fp8_rows(name: str, s: dict, tf: float) -> list[Row]:
    from ras_kernels.attention import ops, reference

    q, kn, vn, kc, vc, idx, ke, ve = _inputs(**s)
    scale = s["d"] ** -0.5
    (kc8, ks), (vc8, vs) = reference.quantize_fp8(kc), reference.quantize_fp8(vc)
    extra = dict(k_extra=ke, v_extra=ve, scale=scale)
    bf16 = graph_ms(lambda: ops.cached_kv_attention(q, kn, vn, kc, vc, idx, **extra))
    rows = []
    # The default path (on sm_90: a 16-bit copy of the caches read by cuDNN / the Hopper kernel), then the portable
    # kernel's dequantize-on-load.
    for label, path in (("fp8 caches", "auto"), ("fp8 caches, portable kernel", "triton")):
        with attention_path(path):
            fp8 = graph_ms(
                lambda: ops.cached_kv_attention(q, kn, vn, kc8, vc8, idx, k_cache_scale=ks, v_cache_scale=vs, **extra)
            )
        rows.append(Row(f"cached_kv_attention {label}", _shape_str(name, s), fp8, bf16, "bf16 caches", "TFLOP/s",
                        _flops(s), tf))  # fmt: skip
    return rows


def rows(ceilings: dict) -> list[Row]:
    out = []
    for name, s in _shapes():
        out += _shape_rows(name, s, ceilings["TFLOP/s"])
    if torch.cuda.get_device_capability() >= (8, 9):
        for name, s in FP8_SHAPES:
            out += _fp8_rows(name, s, ceilings["TFLOP/s"])
    return out


# The whole cached op (cache write + attention) per RAS_ATTENTION path, at the layouts' RAS and dense shapes.
PATH_SHAPES = (
    ("SD3 0.25", dict(SD3, kk=1024)),
    ("SD3 dense", dict(SD3, kk=4096)),
    ("Flux 0.25", dict(FLUX, kk=1024)),
    ("Flux dense", dict(FLUX, kk=4096)),
    ("Wan 1.3B 0.25", dict(b=1, n=32760, kk=8190, t=0, hq=12, hkv=12, d=128)),
    ("Wan 1.3B dense", dict(b=1, n=32760, kk=32760, t=0, hq=12, hkv=12, d=128)),
    ("Wan 14B 0.25", dict(b=1, n=32760, kk=8190, t=0, hq=40, hkv=40, d=128)),
    ("Lumina 0.25", dict(LUMINA, kk=1024)),
    ("Lumina dense", dict(LUMINA, kk=4096)),
)


def _path_cells(name: str, s: dict) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ras_kernels.attention import ops

    q, kn, vn, kc, vc, idx, ke, ve = _inputs(**s)
    stats = {}
    for path in PATHS:
        with attention_path(path):
            stats[path] = graph_ms(lambda: ops.cached_kv_attention(q, kn, vn, kc, vc, idx, k_extra=ke, v_extra=ve))
    k_all, v_all = _concat(kc, vc, ke, ve, s["hq"] // s["hkv"])
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_all, v_all))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        stats["sdpa"] = graph_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    cells = [f"{name} ({_shape_str(name, s).split(' ', 1)[1]})"]
    cells += [f"{stats[key].spread(3)} ({_flops(s) / stats[key] / 1e9:.0f})" for key in (*PATHS, "sdpa")]
    cells += [f"{stats['triton'] / stats[p]:.2f}x" for p in PATHS[1:]]
    return cells + [f"{stats['sdpa'] / stats['hopper']:.2f}x"]


PATHS = ("triton", "hopper", "cudnn")


def paths() -> None:
    """The cached op through each RAS_ATTENTION path (bf16, CUDA-graph replays) next to cuDNN's SDPA alone on the
    pre-concatenated keys (no cache write, no concatenation: a floor for any path), TFLOP/s of the medians, and the
    speed ratios of the medians."""
    print("| shape | " + " | ".join(f"{n} ms min / median / max (TFLOP/s)" for n in PATHS), end="")
    print(" | cuDNN SDPA alone | hopper / triton | cudnn / triton | hopper / cuDNN SDPA alone |")
    print("|" + "---|" * 8)
    for name, s in PATH_SHAPES:
        print("| " + " | ".join(_path_cells(name, s)) + " |", flush=True)


SWEEP_CONFIGS = ((128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 4, 2))


def _sweep_cells(name: str, s: dict, configs) -> list[str]:
    from ras_kernels.attention import ops

    q, _, _, kc, vc, _, ke, ve = _inputs(**s)
    scale = s["d"] ** -0.5
    k_all, v_all = _concat(kc, vc, ke, ve, s["hq"] // s["hkv"])
    base_ms, base_name = _best_sdpa(q, k_all, v_all)
    cells = [_shape_str(name, s), f"{_flops(s) / base_ms / 1e9:.0f} ({base_name[5:]})"]
    for bm, bn, w, st in configs:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        try:
            ms = graph_ms(lambda cfg=cfg: ops._launch_attention(q, kc, vc, ke, ve, None, scale, False, cfg))
            cells.append(f"{_flops(s) / ms / 1e9:.0f}")
        except Exception as e:  # noqa: BLE001 - out of resources etc.
            cells.append(type(e).__name__[:12])
    return cells


def sweep() -> None:
    """Time every candidate config of the attention kernel on every shape (TFLOP/s), next to the best SDPA."""
    from ras_kernels.attention import ops

    configs = sorted(set(ops.GPU_CONFIGS) | set(SWEEP_CONFIGS))
    header = ["shape", "SDPA best"] + [f"{bm}x{bn} w{w} s{st}" for bm, bn, w, st in configs]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, s in _shapes():
        print("| " + " | ".join(_sweep_cells(name, s, configs)) + " |", flush=True)


# Shape families for the shipped table: (name, B, N cache rows, T extra rows, Hq, Hkv, d, extra masked, fp8 K/V).
TUNE_FAMILIES = (
    ("SD3 joint", 2, 4096, 333, 24, 24, 64, False, False),
    ("Lumina self", 2, 4096, 0, 32, 8, 72, False, False),
    ("Lumina cross", 2, 0, 256, 32, 8, 72, True, False),
    ("d=128 joint", 2, 4096, 512, 24, 24, 128, False, False),
    ("d=128 self", 1, 4096, 0, 12, 12, 128, False, False),  # Wan
    ("d=128 joint fp8", 2, 4096, 512, 24, 24, 128, False, True),  # RASConfig(kv_cache="fp8"); sm >= 8.9
    ("d=128 self fp8", 1, 4096, 0, 12, 12, 128, False, True),
)
TUNE_BUCKETS = tuple(1 << i for i in range(6, 16))  # query-length buckets 64 .. 32768


def tune(path: str) -> None:
    """Time every config of ``ops.GPU_CONFIGS`` for each autotune key of the shape families above (bf16, CUDA-graph
    replays) and write the fastest per key to ``path``: the table ``ras_kernels.attention`` ships, so a first call
    on this card's architecture does not autotune. The key ignores B, N and the head counts (as the autotuner's)."""
    from ras_kernels.attention import ops, reference

    major, minor = torch.cuda.get_device_capability()
    table = {}
    for name, b, n, t, hq, hkv, d, masked, fp8 in TUNE_FAMILIES:
        if fp8 and (major, minor) < (8, 9):
            continue
        for bucket in TUNE_BUCKETS:
            lq = max(1, bucket * 3 // 4)
            q, _, _, kc, vc, _, ke, ve = _inputs(b, n, 0, t, hq, hkv, d, lq=lq)
            scales = (None, None)
            if fp8:
                (kc, ks), (vc, vs) = reference.quantize_fp8(kc), reference.quantize_fp8(vc)
                scales = (ks, vs)
            mask = torch.rand(b, t, device="cuda") < 0.8 if masked else None
            if masked:
                mask[:, 0] = True
            args = (q, kc, vc, ke, ve, mask, d**-0.5, False)

            def launch(cfg, args=args, scales=scales):
                bm, bn, warps, stages = cfg
                config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                ops._launch_attention(*args, config, *scales)

            key = ops.tuned_config_key(d, ops._lq_bucket(lq), t > 0, masked, fp8)
            table[key] = _fastest(ops.GPU_CONFIGS, launch, f"{name:13s} Lq={lq:6d} key {key}")
    _write_table(path, table)


def _fastest(configs, launch, label: str) -> list:
    """The config of ``configs`` whose ``launch(config)`` replays fastest from a CUDA graph (configs that do not fit
    the shape are skipped), printed after ``label``."""
    timings = []
    for cfg in configs:
        try:
            ms = graph_ms(lambda cfg=cfg: launch(cfg))
        except Exception:  # noqa: BLE001 - a config that does not fit this shape (out of resources)
            continue
        timings.append((ms, list(cfg)))
    ms, best = min(timings)
    print(f"{label}: {best} {ms * 1e3:.1f} us", flush=True)
    return best


def _write_table(path: str, table: dict) -> None:
    """A shipped config table: this card's architecture and versions, then one line per key (so a re-tune reads as
    a small diff)."""
    import json

    import triton

    major, minor = torch.cuda.get_device_capability()
    record = {
        "arch": f"sm{major}{minor}",
        "measured_on": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "configs": {},
    }
    with open(path, "w") as f:
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table.items()))
        f.write(json.dumps(record, indent=1).replace('"configs": {}', '"configs": {\n' + body + "\n }") + "\n")
    print(f"wrote {len(table)} configs to {path}")


# Shape families of the Hopper kernel's table: its head dims, 16-bit caches (fp8 caches reach it as a 16-bit copy).
HOPPER_TUNE_FAMILIES = tuple(f for f in TUNE_FAMILIES if f[6] in (64, 72, 128) and not f[8] and not f[7])
HOPPER_TUNE_BUCKETS = TUNE_BUCKETS[2:]  # 256 .. 32768: a RAS step's queries (a key outside takes the default)


def tune_hopper(path: str) -> None:
    """As :func:`tune`, for the Hopper kernel (RAS_ATTENTION=hopper): time each of ``ops.hopper_candidates(d)`` per
    key of the families above and write the fastest per key to ``path`` (the shipped hopper_configs.json)."""
    from ras_kernels.attention import ops

    table = {}
    for name, b, n, t, hq, hkv, d, _, _ in HOPPER_TUNE_FAMILIES:
        for bucket in HOPPER_TUNE_BUCKETS:
            lq = max(1, bucket * 3 // 4)
            q, _, _, kc, vc, _, ke, ve = _inputs(b, n, 0, t, hq, hkv, d, lq=lq)
            args = (q, kc, vc, ke, ve, None, d**-0.5, False)
            key = ops.tuned_config_key(d, ops._lq_bucket(lq), t > 0, False)
            label = f"{name:13s} Lq={lq:6d} key {key}"
            table[key] = _fastest(
                ops.hopper_candidates(d), lambda cfg, args=args: ops._launch_hopper(*args, cfg), label
            )
    _write_table(path, table)


# The fp8-attention probe (issue 13, item 3: ship e4m3 attention only at >= 1.3x bf16): RAS and dense shapes at head
# dims 64 and 128 (at 72 an e4m3 row of 72 bytes is no multiple of 16, which a TMA descriptor needs).
FP8_PROBE_SHAPES = tuple(p for p in PATH_SHAPES if p[0] in ("SD3 0.25", "SD3 dense", "Flux dense", "Wan 1.3B 0.25"))
FP8_VARIANTS = ("bf16", "e4m3 Q, K", "e4m3 Q, K, V")


def _per_tensor_e4m3(*xs: torch.Tensor | None) -> tuple[list, float]:
    """The tensors (None passes through) as e4m3 values and the one fp32 scale (their largest magnitude / 448)
    that the values are multiplied by."""
    from ras_kernels.attention.reference import FP8_MAX

    scale = max(x.float().abs().amax().item() for x in xs if x is not None) / FP8_MAX
    return [None if x is None else (x.float() / scale).to(torch.float8_e4m3fn) for x in xs], scale


def _fp8_probe_cells(name: str, s: dict) -> list[str]:
    from ras_kernels.attention import ops

    q, _, _, kc, vc, _, ke, ve = _inputs(**s)
    scale = s["d"] ** -0.5
    ((q8,), sq), ((k8, ke8), sk), ((v8, ve8), _) = (_per_tensor_e4m3(*t) for t in ((q,), (kc, ke), (vc, ve)))
    args = {
        "bf16": (q, kc, vc, ke, ve, None, scale, False),
        "e4m3 Q, K": (q8, k8, vc, ke8, ve, None, scale * sq * sk, False),
        "e4m3 Q, K, V": (q8, k8, v8, ke8, ve8, None, scale * sq * sk, False),
    }
    cells, times = [f"{name} ({_shape_str(name, s).split(' ', 1)[1]})"], {}
    for variant in FP8_VARIANTS:
        try:
            # The default launch first (bf16: the Gluon kernel at 64 / 128; e4m3: the Triton kernel's table config):
            # a variant that does not compile says why. The timings below are the Triton kernel's candidates.
            ops._launch_hopper(*args[variant])
            best = _fastest(ops.hopper_candidates(s["d"]), lambda cfg, a=args[variant]: ops._launch_hopper(*a, cfg),
                            f"  {name} {variant}")  # fmt: skip
            times[variant] = graph_ms(lambda a=args[variant], c=best: ops._launch_hopper(*a, c))
            cells.append(f"{times[variant].spread(3)} ({_flops(s) / times[variant] / 1e9:.0f})")
        except Exception as e:  # noqa: BLE001 - reported in the table: the variant does not compile
            cells.append(f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
    ref = ops._launch_hopper(*args["bf16"])[0].float()
    qk8 = "e4m3 Q, K"
    err = (ops._launch_hopper(*args[qk8])[0].float() - ref).abs().max().item() if qk8 in times else math.nan
    casts = graph_ms(lambda: [(t.float() * (1 / sc)).to(torch.float8_e4m3fn) for t, sc in ((q, sq), (kc, sk))])
    cells += [f"{times['bf16'] / times[v]:.2f}x" if v in times else "-" for v in FP8_VARIANTS[1:]]
    return cells + [f"{err:.3f} (out max {ref.abs().max().item():.2f})", f"{casts:.3f}"]


def fp8_probe() -> None:
    """The Hopper kernel on e4m3 Q and K (V, P and out bf16; one per-tensor scale each, folded into the softmax
    scale), and on e4m3 Q, K and V (P and out e4m3), against bf16: each variant with its fastest of
    ``ops.hopper_candidates`` (CUDA-graph replays of the kernel alone, TFLOP/s of the medians). Per-tensor scales
    cost nothing per tile, so this bounds a per-block-scaled kernel from above; the quantisation itself (a pass over
    Q and the cache's K, here torch casts) would come on top. Error: the e4m3 Q / K output against bf16's."""
    print("| shape | " + " | ".join(f"{v} ms min / median / max (TFLOP/s)" for v in FP8_VARIANTS), end="")
    print(" | e4m3 Q, K / bf16 | e4m3 Q, K, V / bf16 | e4m3 Q, K max abs error | Q, K casts ms |")
    print("|" + "---|" * 8)
    for name, s in FP8_PROBE_SHAPES:
        print("| " + " | ".join(_fp8_probe_cells(name, s)) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", action="store_true", help="the RAS_ATTENTION paths on the model shapes")
    parser.add_argument("--sweep", action="store_true", help="time every kernel config on every shape")
    parser.add_argument("--tune", metavar="JSON", help="write the fastest config per autotune key to this file")
    parser.add_argument("--tune-hopper", metavar="JSON", help="the same for the Hopper kernel's candidates")
    parser.add_argument("--fp8-probe", action="store_true", help="the Hopper kernel on e4m3 Q / K (/ V) against bf16")
    a = parser.parse_args()
    import triton

    print(f"{device_name()}, torch {torch.__version__}, triton {triton.__version__}, {str(DTYPE)[6:]}")
    if a.paths:
        paths()
        return
    if a.sweep:
        sweep()
        return
    if a.tune:
        tune(a.tune)
        return
    if a.tune_hopper:
        tune_hopper(a.tune_hopper)
        return
    if a.fp8_probe:
        fp8_probe()
        return
    ceilings = measure_ceilings()
    print(f"ceilings: {ceilings['GB/s']:.0f} GB/s copy, {ceilings['TFLOP/s']:.0f} TFLOP/s bf16 GEMM")
    # Row by row, so a long run shows progress.
    for i, (name, s) in enumerate(_shapes()):
        lines = format_table(_shape_rows(name, s, ceilings["TFLOP/s"])).splitlines()
        print("\n".join(lines if i == 0 else lines[2:]), flush=True)
    if torch.cuda.get_device_capability() >= (8, 9):
        for name, s in FP8_SHAPES:
            print("\n".join(format_table(_fp8_rows(name, s, ceilings["TFLOP/s"])).splitlines()[2:]), flush=True)
    from ras_kernels.attention import ops

    for key, cfg in ops._tuned_attn_kernel().cache.items():
        print(f"autotuned {key[:4]}: {cfg}")


if __name__ == "__main__":
    main()
