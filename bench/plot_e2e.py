"""Speedup vs sample ratio from bench.e2e JSON files, as a PNG (Pillow, which diffusers already requires).

    python -m bench.plot_e2e sd3.json lumina.json --out docs/speedup.png

One panel per file: for each static-schedule RAS run with CUDA graphs, the speedup of the whole ``pipe(...)`` call
(median) and the RAS-step speedup over the dense pipeline's step, plus the dense torch.compile run as a horizontal
line.
"""

from __future__ import annotations

import argparse
import json

from PIL import Image, ImageDraw

W, H, MARGIN = 520, 380, 56
COLORS = {"pipe(...) call": (31, 119, 180), "RAS step": (214, 39, 40), "dense torch.compile": (120, 120, 120)}


def _series(record: dict) -> dict[str, list[tuple[float, float]]]:
    dense_step = record["dense_step_ms"]
    gen, step = [], []
    for run in record["runs"]:
        if run["ratio"] is None or run["schedule"] != "static" or "CUDA graphs" not in run["name"]:
            continue
        gen.append((run["ratio"], run["speedup"]))
        step.append((run["ratio"], dense_step / (run["ras_step_ms"] or run["total_ms"] / len(run["step_ms"]))))
    return {"pipe(...) call": sorted(gen), "RAS step": sorted(step)}


def _panel(record: dict) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    series = _series(record)
    compiled = [r["speedup"] for r in record["runs"] if r["name"] == "diffusers dense torch.compile"]
    ys = [y for pts in series.values() for _, y in pts] + compiled + [1.0]
    top = max(ys) * 1.1
    ratios = [0.125, 0.25, 0.5, 1.0]

    def xy(ratio: float, speedup: float) -> tuple[float, float]:
        x = MARGIN + (W - 2 * MARGIN) * ratios.index(ratio) / (len(ratios) - 1) if ratio in ratios else MARGIN
        return x, H - MARGIN - (H - 2 * MARGIN) * speedup / top

    draw.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    for r in ratios:
        x, _ = xy(r, 0)
        draw.text((x - 12, H - MARGIN + 6), f"{r:g}", fill="black")
    for tick in range(0, int(top) + 1, 1 if top <= 10 else 5):
        _, y = xy(ratios[0], tick)
        draw.line([MARGIN - 4, y, MARGIN, y], fill="black")
        draw.text((MARGIN - 30, y - 6), f"{tick}x", fill="black")
    draw.text((W // 2 - 40, H - MARGIN + 22), "sample ratio", fill="black")
    steps = len(record["runs"][0]["step_ms"])
    title = f"{record['model']} {record['resolution']}^2, {steps} steps, {record['device']}: speedup over dense"
    draw.text((MARGIN, 12), title, fill="black")
    for speed in compiled:
        _, y = xy(ratios[0], speed)
        draw.line([MARGIN, y, W - MARGIN, y], fill=COLORS["dense torch.compile"], width=1)
    for name, pts in series.items():
        coords = [xy(r, s) for r, s in pts]
        if len(coords) > 1:
            draw.line(coords, fill=COLORS[name], width=2)
        for (x, y), (_, s) in zip(coords, pts, strict=True):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[name])
            draw.text((x + 5, y - 14), f"{s:.2f}x", fill=COLORS[name])
    for k, name in enumerate(COLORS):  # legend in one row between the title and the plot
        x = MARGIN + 140 * k
        draw.line([x, 38, x + 20, 38], fill=COLORS[name], width=2)
        draw.text((x + 24, 32), name, fill=COLORS[name])
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="files written by python -m bench.e2e --json")
    parser.add_argument("--out", default="docs/speedup.png")
    args = parser.parse_args(argv)
    panels = []
    for path in args.json:
        with open(path) as f:
            panels.append(_panel(json.load(f)))
    sheet = Image.new("RGB", (W * len(panels), H), "white")
    for k, panel in enumerate(panels):
        sheet.paste(panel, (k * W, 0))
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
