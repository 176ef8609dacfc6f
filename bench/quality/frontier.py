"""The speed-quality frontier of the Flux and Wan studies (issue 14): RAS against fewer dense steps and diffusers'
step caches.

``python -m bench.quality.evaluate --weights bench/quality/weights-flux`` (or ``weights-wan``) runs it (the weights'
``arch`` picks this path); ``python -m bench.quality.frontier docs/frontier.json --out docs/frontier.png`` redraws
the plot from the records the run wrote. All runs sample the same prompts from the same noise through
``FluxPipeline`` or ``WanPipeline`` (:class:`~bench.quality.evaluate.PipelineSampler`) and are compared with the
dense run at the longest step count S:

* ``dense S steps``: the reference; ``RAS 1.0 (all tokens)``: the RAS code path computing every token;
* ``RAS r reference`` (the ``RASConfig.flux`` or ``RASConfig.wan`` preset's schedule, resets moved to S steps in
  proportion, with the std metric and mode reference: the public code's rule), ``RAS r metric-random``
  (``metric="random"``), ``RAS r metric-delta`` (``metric="delta"``), ``RAS r metric-attention``
  (``metric="attention"``: the band rule computes the lowest attention log-sum-exps), ``RAS r
  metric-attention-high`` (the same with ``high_ratio`` 0.05: mostly the highest) and ``RAS r forecast``
  (``reuse="linear"``) at each ratio r;
* ``dense N steps (equal time)``: as many dense steps as fit in the time of ``RAS r reference``;
* ``FirstBlockCache t`` (``FirstBlockCacheConfig(threshold=t)``: the blocks after the first are skipped while the
  first block's output residual changes by less than t, relative) and ``TaylorSeer i``
  (``TaylorSeerCacheConfig(cache_interval=i, disable_cache_before_step=warm-up, max_order=1)``: attention outputs
  extrapolated by a first-order Taylor series between full steps every i);
* stacks: ``dense M steps`` and ``RAS r v, M steps`` (RAS on fewer steps, M = ``--stack-steps``, for each variant v
  of ``--stack-variants``: by default the std rule and the attention rule, the closest one in session 15's run).

diffusers 0.42.1's other caches are left out: MagCache needs magnitude ratios calibrated per checkpoint and
scheduler (its published ratios are Flux.1-dev's), FasterCache's defaults target guidance-distilled or CFG-batched
video models and need per-model tuning of its skip ranges. Both caches used here support Wan in diffusers 0.42.1
(FirstBlockCache through its registry entry for ``WanTransformerBlock``; TaylorSeer through the attention modules
named in ``TAYLORSEER_MODULES``: its default patterns are matched whole, so ``^blocks.*attn`` misses Wan's ``attn1``
and ``attn2`` and, left to them, TaylorSeer changes nothing on Wan); RAS refuses to run together with a
diffusers cache, so each is its own run.

The metric columns and plot panels follow the architecture (``METRICS``): Flux's per-object errors
(``evaluate.object_errors``) or Wan's video errors (``evaluate.video_errors``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from ras_models import apply_ras

from .evaluate import Run, environment, ras_config

CATEGORIES = {  # category -> colour of its points
    "dense, fewer steps": (90, 90, 90),
    "RAS std": (31, 119, 180),
    "RAS random": (255, 127, 14),
    "RAS delta": (23, 190, 207),
    "RAS attention": (227, 119, 194),
    "RAS attention, highest": (23, 100, 60),
    "RAS forecast": (140, 86, 75),
    "RAS fp8 caches": (188, 189, 34),
    "RAS on fewer steps": (148, 103, 189),
    "FirstBlockCache": (44, 160, 44),
    "TaylorSeer": (214, 39, 40),
}
METRICS = {  # arch -> the sample metrics of its table: (key, column header, scale, digits)
    "flux": (
        ("loc_px", "localisation error (px)", 1, 2),
        ("found", "objects found (%)", 100, 1),
        ("detail_err", "detail error", 1, 3),
        ("objects", "objects ok (%)", 100, 1),
    ),
    "wan": (
        ("traj_px", "trajectory error (px)", 1, 2),
        ("found", "objects found (%)", 100, 1),
        ("flicker", "static flicker", 1, 4),
    ),
}
LAYOUTS = {"flux": "Flux.1-dev", "wan": "Wan 2.1 1.3B"}  # arch -> the published layout its speeds are modelled on
PUBLISHED = {  # arch -> the bench.e2e record of that layout's per-step times (evaluate's --published default)
    "flux": "docs/e2e-results/flux-1024-session11.json",
    "wan": "docs/e2e-results/wan-1.3b-50steps-session12.json",
}
# arch -> TaylorSeerCacheConfig.cache_identifiers (None: diffusers' defaults, which cover Flux's blocks)
TAYLORSEER_MODULES = {"flux": None, "wan": [r"^blocks\.\d+\.attn[12]$"]}
PANELS = {  # arch -> the plot's panels (metric key, label)
    "flux": (("psnr", "PSNR vs dense (dB)"), ("loc_px", "localisation error (px)"), ("detail_err", "detail error")),
    "wan": (("psnr", "PSNR vs dense (dB)"), ("traj_px", "trajectory error (px)"), ("flicker", "static flicker")),
}


def arch_of(recs: list[dict]) -> str:
    """The architecture of a run's records: Wan's carry the trajectory error."""
    return "wan" if any("traj_px" in r["metrics"] for r in recs) else "flux"


@contextlib.contextmanager
def cached(transformer, config):
    """A diffusers cache on ``transformer`` while the context is open."""
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


def taylorseer(interval: int, warmup: int, family: str):
    """The frontier's TaylorSeer: full steps every ``interval`` after ``warmup`` dense ones, first order, on the
    family's attention modules (``TAYLORSEER_MODULES``)."""
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup,
        max_order=1,
        cache_identifiers=TAYLORSEER_MODULES[family],
    )


def run_frontier(sampler, args, num_tokens: int) -> list[Run]:
    from diffusers.hooks import FirstBlockCacheConfig

    steps = args.steps[0]
    transformer = sampler.models.transformer
    family = sampler.models.arch  # the RAS preset: RASConfig.flux or RASConfig.wan
    runs: list[Run] = []

    def run(name: str, kind: str, n: int, method=None, config=None, ratio=None, variant=None) -> Run:
        images, seconds = sampler.generate(n, method)
        tokens = sum(config.token_schedule(num_tokens)) / (n * num_tokens) if config is not None else 1.0
        out = Run(name, steps, n, kind, images, seconds, tokens, ratio, variant)
        print(f"[eval] {name} ({n} steps): {seconds:.3f} s", file=sys.stderr, flush=True)
        runs.append(out)
        return out

    def ras(n: int, ratio: float, variant: str, kind: str, name: str) -> Run:
        config = ras_config(n, ratio, num_tokens, variant, family=family)
        method = lambda pipe: apply_ras(pipe, config, cuda_graphs=sampler.graphs)  # noqa: E731
        return run(name, kind, n, method, config, ratio, variant)

    dense = run(f"dense {steps} steps", "dense", steps)
    if args.floor:
        ras(steps, 1.0, "reference", "floor", "RAS 1.0 (all tokens)")
    for ratio in args.ratios:
        for variant in args.variants:
            ras(steps, ratio, variant, "ras", f"RAS {ratio:g} {variant}")

    def dense_at(n: int) -> Run:  # fewer dense steps, run once per step count
        match = next((r for r in runs if r.kind == "equal-time" and r.steps == n), None)
        return match or run(f"dense {n} steps", "equal-time", n)

    per_step = dense.seconds / steps
    for base in [r for r in runs if r.kind == "ras" and r.variant == args.variants[0]]:
        fewer = min(steps - 1, max(1, round(base.seconds / per_step)))
        dense_at(fewer).metrics.setdefault("equal_to", []).append(f"{base.ratio:g}")
    warmup = ras_config(steps, 0.5, num_tokens, "reference", family=family).warmup_steps
    for threshold in args.first_block_cache:
        config = FirstBlockCacheConfig(threshold=threshold)
        run(f"FirstBlockCache {threshold:g}", "cache", steps, lambda pipe, c=config: cached(transformer, c))
    for interval in args.taylorseer:
        config = taylorseer(interval, warmup, family)
        run(f"TaylorSeer {interval}", "cache", steps, lambda pipe, c=config: cached(transformer, c))
    if args.stack_steps:
        m = args.stack_steps
        dense_at(m)
        for variant in args.stack_variants:
            for ratio in args.stack_ratios:
                ras(m, ratio, variant, "stack", f"RAS {ratio:g} {variant}, {m} steps")
    return runs


def category(record: dict) -> str | None:
    kind, name = record["kind"], record["name"]
    if kind == "equal-time":
        return "dense, fewer steps"
    if kind == "stack":
        return "RAS on fewer steps"
    if kind == "ras":
        variants = {
            "metric-random": "RAS random",
            "metric-delta": "RAS delta",
            "metric-attention": "RAS attention",
            "metric-attention-high": "RAS attention, highest",
            "forecast": "RAS forecast",
            "fp8-cache": "RAS fp8 caches",
        }
        return variants.get(record["variant"], "RAS std")
    if kind == "cache":
        return name.split()[0]
    return None  # the reference and the floor: not points of the frontier


def records(runs: list[Run]) -> list[dict]:
    """The runs as JSON-ready dicts (no images), with their speedup over the dense reference."""
    dense = next(r for r in runs if r.kind == "dense")
    out = []
    for r in runs:
        out.append(
            {
                "name": r.name,
                "kind": r.kind,
                "steps": r.steps,
                "ratio": r.ratio,
                "variant": r.variant,
                "seconds": round(r.seconds, 4),
                "speedup": round(dense.seconds / r.seconds, 4),
                "tokens": round(r.tokens, 4),
                "metrics": dict(r.metrics),
            }
        )
    for record in out:
        record["category"] = category(record)
    return out


def pm(m: dict, key: str, scale: float = 1, digits: int = 2) -> str:
    """A sample metric with its standard error."""
    return f"{scale * m[key]:.{digits}f} ± {scale * m[key + '_se']:.{digits}f}"


def published_times(e2e: dict, family: str) -> dict:
    """Measured times of the published layout (Flux.1-dev, Wan 2.1 1.3B) from a ``bench.e2e`` JSON record, in ms:
    ``dense``: (diffusers' median step, the call's time outside its steps); per measured ratio r: (the median
    dense step and the median RAS step of the RAS run, its time outside the steps). Which steps of a RAS run are
    RAS steps follows from the family's preset at the run's step count."""
    from statistics import median

    from bench.pipelines import preset

    dense = next(r for r in e2e["runs"] if r["ratio"] is None and "eager" in r["name"])
    times = {"dense": (median(dense["step_ms"]), dense["total_ms"] - sum(dense["step_ms"]))}
    for run in e2e["runs"]:
        if run["ratio"] is None:
            continue
        config = preset(family, len(run["step_ms"]), run["ratio"], 1)
        ras = [ms for i, ms in enumerate(run["step_ms"]) if config.is_ras_step(i)]
        full = [ms for i, ms in enumerate(run["step_ms"]) if not config.is_ras_step(i)]
        times[run["ratio"]] = (median(full), median(ras), run["total_ms"] - sum(run["step_ms"]))
    return times


def published_ms(record: dict, times: dict, family: str) -> float | None:
    """A frontier run's modelled time on the published layout: its dense and RAS steps at the measured per-step
    times (the RAS rules cost as the std rule: same token counts). None where no time was measured: diffusers'
    caches, and ratios the ``bench.e2e`` record lacks."""
    from bench.pipelines import preset

    steps = record["steps"]
    if record["kind"] in ("dense", "equal-time"):
        step, outside = times["dense"]
        return outside + steps * step
    if record["kind"] not in ("ras", "stack") or record["ratio"] not in times:
        return None
    full, ras, outside = times[record["ratio"]]
    config = preset(family, steps, record["ratio"], 1)
    n_ras = sum(config.is_ras_step(i) for i in range(steps))
    return outside + (steps - n_ras) * full + n_ras * ras


def published(recs: list[dict], e2e: dict, family: str) -> list[dict]:
    """The records whose time ``published_ms`` models, their ``speedup`` the modelled one on the published layout
    (the dense reference included, at 1)."""
    times = published_times(e2e, family)
    dense_ms = published_ms(next(r for r in recs if r["kind"] == "dense"), times, family)
    out = []
    for r in recs:
        ms = published_ms(r, times, family)
        if ms is not None:
            out.append({**r, "speedup": dense_ms / ms})
    return out


def equal_time_table(recs: list[dict], e2e: dict, family: str) -> str:
    """RAS against fewer dense steps at equal time on the published layout: each RAS run's modelled speedup
    (``published_ms``), the dense step count N* that fits in its modelled time, and the measured dense run with the
    most steps not above N* (it takes no longer, so RAS must beat it to win at equal time)."""
    times = published_times(e2e, family)
    key, label = METRICS[family][0][:2]
    reference = next(r for r in recs if r["kind"] == "dense")
    dense_ms = published_ms(reference, times, family)
    step, outside = times["dense"]
    fewer = sorted((r for r in recs if r["kind"] == "equal-time"), key=lambda r: r["steps"])
    lines = [
        f"| run | modelled speedup | dense steps at equal time | dense run compared | PSNR RAS / dense (dB) | "
        f"difference (dB) | {label} RAS / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        ms = published_ms(r, times, family)
        if r["kind"] not in ("ras", "stack") or ms is None:
            continue
        n_star = (ms - outside) / step
        rival = next((d for d in reversed(fewer) if d["steps"] <= n_star), None)
        if rival is None:
            lines.append(f"| {r['name']} | {dense_ms / ms:.2f}x | {n_star:.1f} | none measured | | | |")
            continue
        a, b = r["metrics"], rival["metrics"]
        lines.append(
            f"| {r['name']} | {dense_ms / ms:.2f}x | {n_star:.1f} | dense {rival['steps']} steps | "
            f"{a['psnr']:.2f} / {b['psnr']:.2f} | {a['psnr'] - b['psnr']:+.2f} | {pm(a, key)} / {pm(b, key)} |"
        )
    return "\n".join(lines)


def table(recs: list[dict]) -> str:
    metrics = METRICS[arch_of(recs)]
    header = " | ".join(label for _, label, _, _ in metrics)
    lines = [
        f"| run | steps | tokens computed | time (s) | speedup | PSNR vs dense (dB) | SSIM vs dense | {header} |",
        "|---|---|---|---|---|---|---|" + "---|" * len(metrics),
    ]

    for r in recs:
        m = r["metrics"]
        name = r["name"] + (f" (equal time: RAS {', '.join(m['equal_to'])})" if "equal_to" in m else "")
        quality = "reference | reference" if r["kind"] == "dense" else f"{m['psnr']:.2f} | {m['ssim']:.4f}"
        values = " | ".join(pm(m, key, scale, digits) for key, _, scale, digits in metrics)
        lines.append(
            f"| {name} | {r['steps']} | {100 * r['tokens']:.1f}% | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
            f"{quality} | {values} |"
        )
    return "\n".join(lines)


W, H, MARGIN = 420, 360, 56


def _panel(recs: list[dict], key: str, label: str, xlabel: str) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    points = [(r["speedup"], r["metrics"][key], r) for r in recs if r["category"] and key in r["metrics"]]
    xs = [x for x, _, _ in points] + [1.0]
    ys = [y for _, y, _ in points]
    x_hi = max(xs) * 1.05
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y_hi - y_lo) * 0.1 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            MARGIN + (W - 2 * MARGIN) * x / x_hi,
            H - MARGIN - (H - 2 * MARGIN) * (y - y_lo) / (y_hi - y_lo),
        )

    draw.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    for tick in range(0, int(x_hi) + 1):
        x, _ = xy(tick, y_lo)
        draw.line([x, H - MARGIN, x, H - MARGIN + 4], fill="black")
        draw.text((x - 8, H - MARGIN + 6), f"{tick}x", fill="black")
    for k in range(5):
        value = y_lo + (y_hi - y_lo) * k / 4
        _, y = xy(0, value)
        draw.line([MARGIN - 4, y, MARGIN, y], fill="black")
        draw.text((6, y - 6), f"{value:.3g}", fill="black")
    draw.text((W // 2 - 3 * len(xlabel), H - MARGIN + 22), xlabel, fill="black")
    draw.text((MARGIN, 12), label, fill="black")
    for x, y, r in points:
        px, py = xy(x, y)
        colour = CATEGORIES[r["category"]]
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((px + 4, py - 12), _tag(r), fill=colour)
    return img


def _tag(record: dict) -> str:
    """A point's label: a dense run's step count, a cache's setting, a RAS run's ratio."""
    if record["kind"] == "equal-time":
        return str(record["steps"])
    if record["kind"] == "cache":
        return record["name"].split()[-1]
    return f"{record['ratio']:g}"


def plot(recs: list[dict], path: str | Path, xlabel: str = "speedup over dense") -> None:
    """Speedup vs each of the architecture's ``PANELS``, every variant a point coloured by category, labelled by
    its ratio, its cache setting or (dense) its step count; a legend row below."""
    panels = [_panel(recs, key, label, xlabel) for key, label in PANELS[arch_of(recs)]]
    sheet = Image.new("RGB", (W * len(panels), H + 30), "white")
    for k, panel in enumerate(panels):
        sheet.paste(panel, (k * W, 0))
    draw = ImageDraw.Draw(sheet)
    for k, (name, colour) in enumerate(CATEGORIES.items()):
        x = MARGIN + 135 * k
        draw.ellipse([x, H + 8, x + 8, H + 16], fill=colour)
        draw.text((x + 12, H + 5), name, fill=colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def write(runs: list[Run], args, models, device, render_floor: dict) -> list[dict]:
    """Write the records (``args.json``), the plot (``args.plot``) and the report (``args.report``)."""
    recs = records(runs)
    for path in (args.json, args.plot, args.report):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(recs, indent=2) + "\n")
    plot(recs, args.plot)
    training = models.training or {}
    floor = ", ".join(f"{k} {v:.3f}" for k, v in render_floor.items())
    if models.arch == "wan":
        title, metric_fn, model_name = "Wan-architecture video study", "video_errors", "WanTransformer3DModel"
        sampling = (
            f"`WanPipeline` with CFG {args.guidance:g} (cond and uncond calls), its default sigmas "
            "linspace(1, 0.001, S) then 0"
        )
    else:
        title, metric_fn, model_name = "Flux-architecture study", "object_errors", "FluxTransformer2DModel"
        sampling = f"`FluxPipeline` with true CFG {args.guidance:g}, uniform sigmas"
    lines = [
        f"# Speed-quality frontier: {title} (issue 14)",
        "",
        f"Generated by `python -m bench.quality.evaluate --weights {args.weights} --samples {args.samples}` on "
        f"{environment(device)}; every number below was measured by that run. Variants and metrics: "
        f"`bench/quality/frontier.py` and `bench.quality.evaluate.{metric_fn}`; the study: docs/quality.md.",
        "",
        f"- Model: `{model_name}` trained for {training.get('dit_steps', '?')} steps "
        f"({training.get('dit_seconds', '?')} s); reproduce with `{training.get('reproduce', '?')}`.",
        f"- Sampling: {args.samples} prompts of {models.style} scenes, {sampling}; RAS CUDA graphs "
        f"{'on' if args.graphs else 'off'}, the pipeline eager.",
        f"- Metrics of the requested scenes' own renders (the floor of the sample metrics): {floor}.",
        "",
        table(recs),
        "",
        f"![speed-quality frontier]({os.path.relpath(args.plot, start=Path(args.report).parent)})",
        "",
        f"Samples (first prompts; columns as in docs/quality.md's grid): "
        f"![samples]({os.path.relpath(args.grid, start=Path(args.report).parent)})",
        "",
    ]
    if args.published:
        e2e = json.loads(Path(args.published).read_text())
        modelled = args.plot.removesuffix(".png") + "-published.png"
        plot(published(recs, e2e, models.arch), modelled, f"modelled speedup, {LAYOUTS[models.arch]} layout")
        lines += [
            f"## Equal time on the {LAYOUTS[models.arch]} layout (modelled)",
            "",
            f"Each run's time modelled from the per-step times `{args.published}` measured (dense steps, RAS steps, "
            "outside the steps; `frontier.published_ms`), against the measured dense run with the most steps that "
            "fits in it. diffusers' caches have no such times and are left out.",
            "",
            equal_time_table(recs, e2e, models.arch),
            "",
            f"![modelled frontier]({os.path.relpath(modelled, start=Path(args.report).parent)})",
            "",
        ]
    Path(args.report).write_text("\n".join(lines))
    return recs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Redraw the frontier plot from an evaluation's JSON records.")
    parser.add_argument("json", help="the records bench.quality.evaluate wrote (--json)")
    parser.add_argument("--out", default="docs/frontier.png")
    parser.add_argument(
        "--published",
        default=None,
        help="a bench.e2e JSON record of the published layout (docs/e2e-results/): print the equal-time table of "
        "RAS against fewer dense steps at its modelled speeds, and draw the runs it models at those speeds",
    )
    args = parser.parse_args(argv)
    recs = json.loads(Path(args.json).read_text())
    if args.published:
        e2e, family = json.loads(Path(args.published).read_text()), arch_of(recs)
        print(equal_time_table(recs, e2e, family))
        plot(published(recs, e2e, family), args.out, f"modelled speedup, {LAYOUTS[family]} layout")
    else:
        plot(recs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
