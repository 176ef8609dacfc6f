"""The README's main job (bench/e2e.py) on CPU: random-weight pipelines, the local from_pretrained path and the CPU
demo on the trained quality model (bench/demo_cpu.py)."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from bench import demo_cpu, e2e

from ._models import tiny_sd3_pipeline

COLUMNS = 8  # run, tokens, pipe(...) min / median / max, speedup, ms/step, RAS-step ms, peak MiB, PSNR


def _rows(text: str, extra: int = 0) -> dict[str, list[str]]:
    """Table rows by run name (``extra``: columns after the fixed ones)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| run") and len(cells) == COLUMNS + extra:
            rows[cells[0]] = cells[1:]
    return rows


def _calls(text: str) -> list[float]:
    return [float(x) for x in text.split(" / ")]


@pytest.mark.parametrize("model", ["sd3", "lumina"])
def test_random_weights_time_pipeline_calls(model, capsys, monkeypatch, torch_backend):
    """Every timed number comes from the family's diffusers pipeline call: warm-up + repeats per run, the dense
    eager baseline warming up with a 2-step call (its steps all have one shape), the RAS runs with whole calls."""
    from diffusers import LuminaPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if model == "sd3" else LuminaPipeline
    calls = []
    original = cls.__call__

    def counting(self, *args, **kwargs):
        calls.append((kwargs["output_type"], kwargs["num_inference_steps"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    e2e.main(
        ["--model", model, "--steps", "6", "--ratio", "0.5", "0.25", "--resolution", "128", "--device", "cpu"]
        + ["--repeats", "2"]
    )
    out = capsys.readouterr().out
    assert "text encoding and VAE decoding are outside the timed call" in out
    rows = _rows(out, extra=1)  # + the own loop's speedup
    assert list(rows) == [
        "diffusers dense eager",
        f"RAS ratio 0.5 ({'static' if model == 'sd3' else 'dynamic'}, eager)",
        f"RAS ratio 0.25 ({'static' if model == 'sd3' else 'dynamic'}, eager)",
    ]
    assert calls == [("latent", 2)] + [("latent", 6)] * (2 + 2 * (1 + 2))
    for name, (tokens, calls_ms, speedup, step_ms, ras_ms, peak, psnr, loop) in rows.items():
        low, median, high = _calls(calls_ms)
        assert 0 < low <= median <= high
        assert float(step_ms) > 0 and speedup.endswith("x") and loop.endswith("x") and peak == "-"
        if name != "diffusers dense eager":
            assert float(ras_ms.split()[0]) > 0
            assert float(tokens.rstrip("%")) < 100
            assert psnr != "inf" and float(psnr) > 0  # RAS changed the result, but not into noise


def test_pretrained_pipeline_path(tmp_path, capsys, torch_backend):
    tiny_sd3_pipeline(t5=True).save_pretrained(tmp_path)
    e2e.main(
        [
            "--pretrained",
            str(tmp_path),
            "--steps",
            "6",
            "--ratio",
            "0.5",
            "--resolution",
            "32",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--repeats",
            "1",
        ]
    )
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"diffusers dense eager", "RAS ratio 0.5 (static, eager)"}
    assert re.fullmatch(r"\d+\.\d%", rows["RAS ratio 0.5 (static, eager)"][0])
    assert rows["diffusers dense eager"][6] == "inf"


def test_ras_configs_apply_the_run_options():
    """--kv-cache, --metric (one run per metric and ratio) and the Ulysses degree reach every RAS run's config; the
    rest is the family's preset."""
    import argparse

    from bench.pipelines import preset

    args = argparse.Namespace(steps=20, ratio=[0.5, 0.25], schedule=None, kv_cache="fp8", metric=["random", "delta"])
    configs = e2e.ras_configs("wan", args, 1560, shards=2)
    assert [(c.metric, c.sample_ratio) for c in configs] == [
        ("random", 0.5),
        ("random", 0.25),
        ("delta", 0.5),
        ("delta", 0.25),
    ]
    assert all(c.kv_cache == "fp8" and c.shards == 2 for c in configs)
    expected = preset("wan", 20, 0.25, 1560)
    assert (configs[1].num_steps, configs[1].reset_steps) == (expected.num_steps, expected.reset_steps)
    args.kv_cache = args.metric = None
    config = e2e.ras_configs("wan", args, 1560)[0]
    assert config.kv_cache is None and config.metric == expected.metric


def test_table_adds_loop_and_torch_compile_columns():
    """With own-loop times, a speedup column for them; with a dense torch.compile run, every row also gets its
    speedup over that run (by median) in a last column."""
    import torch

    def run(name, calls, loop_ms=None):
        return e2e.Result(name, 1.0, calls, [calls[0] / 4] * 4, torch.zeros(1, 4, 2, 2), loop_ms=loop_ms)

    dense, compiled, ours = run("diffusers dense eager", [10.0, 9.0, 30.0]), run(e2e.COMPILED, [8.0]), run("RAS", [2.0])
    lines = e2e.table([dense, compiled, ours], dense).splitlines()
    assert lines[0].endswith("| PSNR vs dense (dB) | vs torch.compile |") and lines[1].count("---") == COLUMNS + 1
    assert "| 9.0 / 10.0 / 30.0 | 1.00x |" in lines[2]
    assert lines[2].endswith("| 0.80x |") and lines[3].endswith("| 1.00x |") and lines[4].endswith("| 4.00x |")
    assert "| 5.00x |" in lines[4]  # over the dense median, 10 ms
    assert "vs torch.compile" not in e2e.table([dense, ours], dense)
    dense.loop_ms, ours.loop_ms = 100.0, 20.0  # the compiled run has no own-loop time
    lines = e2e.table([dense, compiled, ours], dense).splitlines()
    assert lines[0].endswith("| own loop speedup | vs torch.compile |")
    assert lines[3].endswith("| - | 1.00x |") and lines[4].endswith("| 5.00x | 4.00x |")


def test_kernel_table_reports_min_median_max():
    """The kernel benchmarks' times (bench.common.Timing): the median computes as the float, the run's min and max
    ride along, and the table prints all three while rates and speedups use the medians."""
    import random

    from bench.common import Row, Timing, format_table

    odd = [random.uniform(0.01, 5.0) for _ in range(9)]
    even = [random.uniform(0.01, 5.0) for _ in range(6)]
    t, u = Timing(odd), Timing(even)
    assert float(t) == sorted(odd)[4] and (t.lo, t.hi) == (min(odd), max(odd))
    assert float(u) == pytest.approx((sorted(even)[2] + sorted(even)[3]) / 2)
    assert 2 * t == pytest.approx(2 * sorted(odd)[4])
    with pytest.raises(ValueError, match="at least one time"):
        Timing([])
    row = Row("op", "shape", t, u, "baseline", "GB/s", 3e6, 100.0)
    line = format_table([row]).splitlines()[2]
    assert f"| {min(odd):.4f} / {sorted(odd)[4]:.4f} / {max(odd):.4f} |" in line
    assert f"| {min(even):.4f} / {float(u):.4f} / {max(even):.4f} |" in line
    assert f"| {float(u) / float(t):.2f}x | {3e6 / (float(t) * 1e-3) / 1e9:.0f} GB/s |" in line
    plain = format_table([Row("op", "shape", 2.0, 3.0, "baseline", "GB/s", 1e6, 1.0)]).splitlines()[2]
    assert "| 2.0000 | baseline | 3.0000 | 1.50x |" in plain  # a plain median prints alone


def test_json_and_speedup_plot(tmp_path, capsys, torch_backend):
    """--json records every run of the table; bench.plot_e2e turns the records into one PNG panel per file."""
    import json

    from PIL import Image

    from bench import plot_e2e

    record = tmp_path / "sd3.json"
    e2e.main(
        ["--steps", "6", "--ratio", "1.0", "0.5", "--resolution", "128", "--device", "cpu", "--json", str(record)]
        + ["--repeats", "2", "--no-loop"]
    )
    rows = _rows(capsys.readouterr().out)
    data = json.loads(record.read_text())
    assert data["model"] == "sd3" and data["resolution"] == 128 and "pipe(...)" in data["timed"]
    assert [r["name"] for r in data["runs"]] == list(rows)
    assert [r["ratio"] for r in data["runs"]] == [None, 1.0, 0.5]
    for run in data["runs"]:
        assert len(run["call_ms"]) == 2 and len(run["step_ms"]) == 6 and run["loop_ms"] is None
        assert _calls(rows[run["name"]][1])[1] == round(run["total_ms"], 1)
    png = tmp_path / "speedup.png"
    plot_e2e.main([str(record), str(record), "--out", str(png)])
    assert Image.open(png).size == (2 * plot_e2e.W, plot_e2e.H)


def _demo_args(**overrides) -> argparse.Namespace:
    """bench.e2e's arguments as the CPU demo sees them (defaults of a plain ``make demo`` on a CPU)."""
    args = dict(device="cpu", model="sd3", full=None, resolution=None, pretrained=None, steps=None, seed=0)
    args.update(ratio=[1.0, 0.5, 0.25, 0.125], scenes=3, out="demo-cpu.png")
    return argparse.Namespace(**{**args, **overrides})


def test_cpu_demo_runs_only_when_nothing_else_is_asked():
    assert demo_cpu.applies(_demo_args())
    for other in (dict(full=False), dict(resolution=128), dict(model="lumina"), dict(pretrained="p")):
        assert not demo_cpu.applies(_demo_args(**other)), other
    assert not demo_cpu.applies(_demo_args(device="cuda"))


def test_cpu_demo_trained_model_table_and_grid(tmp_path, capsys, torch_backend):
    """The CPU demo at its smallest: the notice first, a row per run, a grid of scenes x runs; RAS at ratio 1.0
    (every token through the RAS path) reproduces dense, a lower ratio changes the images but not into noise."""
    from PIL import Image

    png = tmp_path / "grid.png"
    runs = demo_cpu.run(_demo_args(steps=6, ratio=[1.0, 0.25], scenes=2, out=str(png)))
    out = capsys.readouterr().out
    assert out.startswith(demo_cpu.NOTICE) and "docs/benchmarks.md" in demo_cpu.NOTICE
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip() for row in rows] == ["dense", "RAS 1.0", "RAS 0.25"]
    assert f"Image grid: {png.resolve()}" in out
    tile = 2 * runs[0].images.shape[-1]  # make_grid: scale 2, gap 4
    assert Image.open(png).size == (3 * tile + 4 * 4, 2 * tile + 3 * 4)
    dense, full, low = runs
    assert [len(r.step_ms) for r in runs] == [6, 6, 6] and full.tokens == 1.0 and low.tokens < 1.0
    assert full.metrics["psnr"] > 80 and full.metrics["ssim"] > 0.9999
    assert (full.images - dense.images).abs().max() < 1e-3
    assert 20 < low.metrics["psnr"] < 60


def test_cpu_default_reaches_the_demo(monkeypatch):
    """``make demo`` on a CPU (no --full / --resolution / --pretrained) runs the trained-model demo; asking for the
    random-weight benchmark does not."""
    from bench import demo_cpu

    calls = []
    monkeypatch.setattr(demo_cpu, "run", lambda args: calls.append(args))
    monkeypatch.setattr(e2e, "run_random_weights", lambda args: calls.append("random weights"))
    e2e.main(["--device", "cpu"])
    e2e.main(["--device", "cpu", "--no-full"])
    assert len(calls) == 2 and calls[0] != "random weights" and calls[1] == "random weights"


def test_extrapolated_calls_from_measured_steps():
    """The estimate of a longer generation: the measured call's time outside its steps, plus each step of the
    longer schedule at the median of the measured steps of its kind; a run missing a kind of step is refused."""
    import torch

    dense = e2e.Result("diffusers dense eager", 1.0, [100.0, 110.0, 90.0], [20.0, 22.0, 18.0, 20.0], torch.zeros(1))
    ras = e2e.Result("RAS", 0.5, [50.0], [20.0, 9.0, 20.0, 5.0], torch.zeros(1), ras_steps=[False, True, False, True])
    longer = [False, True, True, True, False, True]  # 2 dense and 4 RAS steps
    assert e2e.estimated_ms(dense, [False] * 6) == 100.0 - 80.0 + 6 * 20.0
    assert e2e.estimated_ms(ras, longer) == 50.0 - 54.0 + 2 * 20.0 + 4 * 7.0
    with pytest.raises(ValueError, match="did not time every kind of step"):
        e2e.estimated_ms(dense, longer)
    lines = e2e.extrapolated_table([dense, ras], dense, lambda r: longer if r is ras else [False] * 6).splitlines()
    assert lines[2] == "| diffusers dense eager | 100.0 | 20.00 | - | 140.0 | 1.00x |"
    assert lines[3] == "| RAS | 50.0 | 20.00 | 7.00 | 64.0 | 2.19x |"


def test_extrapolate_to_prints_labelled_estimates(capsys, torch_backend):
    e2e.main(["--steps", "6", "--ratio", "0.5", "--resolution", "128", "--device", "cpu", "--repeats", "1"]
             + ["--no-loop", "--extrapolate-to", "12"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Estimated 12-step calls, NOT measured" in out
    estimates = out.split("NOT measured")[1]
    assert "| diffusers dense eager |" in estimates and "| RAS ratio 0.5 (static, eager) |" in estimates


def test_metrics_and_attention_paths_share_one_dense_baseline(tmp_path, capsys, monkeypatch):
    """--metric and --attention take several values: one RAS run per path, metric and ratio, against one dense run,
    each labelled with its rule and path (auto, the default, unlabelled); RAS_ATTENTION is back to the caller's
    value after the runs."""
    monkeypatch.delenv("RAS_ATTENTION", raising=False)
    tiny_sd3_pipeline(t5=True).save_pretrained(tmp_path)
    args = ["--pretrained", str(tmp_path), "--steps", "6", "--ratio", "0.5", "--resolution", "32"]
    args += ["--dtype", "fp32", "--device", "cpu", "--repeats", "1", "--metric", "std", "random"]
    e2e.main([*args, "--attention", "auto", "cudnn"])
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {
        "diffusers dense eager",
        "RAS ratio 0.5 (static, eager)",
        "RAS ratio 0.5 (static, eager, metric random)",
        "RAS ratio 0.5 (static, eager, attention cudnn)",
        "RAS ratio 0.5 (static, eager, metric random, attention cudnn)",
    }
    assert "RAS_ATTENTION" not in os.environ
