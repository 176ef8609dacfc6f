"""The README's main job (bench/e2e.py) on CPU: random-weight loop and the local from_pretrained path."""

from __future__ import annotations

import re

import pytest

from bench import e2e

from ._models import tiny_sd3_pipeline


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| run") and len(cells) == 9:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("model", ["sd3", "lumina"])
def test_random_weight_loop_prints_comparison(model, capsys, torch_backend):
    e2e.main(["--model", model, "--steps", "6", "--ratio", "0.5", "0.25", "--resolution", "128", "--device", "cpu"])
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 3 and "diffusers dense eager" in rows
    for name, (steps, tokens, step_ms, ras_ms, total, speedup, _, psnr) in rows.items():
        assert steps == "6"
        assert float(step_ms) > 0 and float(total) > 0 and speedup.endswith("x")
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
        ]
    )
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"pipeline dense", "RAS ratio 0.5 (static)"}
    assert re.fullmatch(r"\d+\.\d%", rows["RAS ratio 0.5 (static)"][1])


def test_table_adds_the_torch_compile_column():
    """With a dense torch.compile run in the results, every row also gets its speedup over that run."""
    import torch

    def run(name, ms):
        return e2e.Result(name, 1.0, [ms] * 4, torch.zeros(1, 4, 2, 2))

    dense, compiled, ours = run("diffusers dense eager", 10.0), run(e2e.COMPILED, 8.0), run("RAS", 2.0)
    lines = e2e.table([dense, compiled, ours], dense).splitlines()
    assert lines[0].endswith("| vs torch.compile |") and lines[1].count("---") == 10
    assert lines[2].endswith("| 0.80x |") and lines[3].endswith("| 1.00x |") and lines[4].endswith("| 4.00x |")
    assert "vs torch.compile" not in e2e.table([dense, ours], dense)


def test_json_and_speedup_plot(tmp_path, capsys, torch_backend):
    """--json records every run of the table; bench.plot_e2e turns the records into one PNG panel per file."""
    import json

    from PIL import Image

    from bench import plot_e2e

    record = tmp_path / "sd3.json"
    e2e.main(["--steps", "6", "--ratio", "1.0", "0.5", "--resolution", "128", "--device", "cpu", "--json", str(record)])
    rows = _rows(capsys.readouterr().out)
    data = json.loads(record.read_text())
    assert data["model"] == "sd3" and data["resolution"] == 128
    assert [r["name"] for r in data["runs"]] == list(rows)
    assert [r["ratio"] for r in data["runs"]] == [None, 1.0, 0.5]
    for run in data["runs"]:
        assert float(rows[run["name"]][4]) == round(run["total_ms"], 1)
    png = tmp_path / "speedup.png"
    plot_e2e.main([str(record), str(record), "--out", str(png)])
    assert Image.open(png).size == (2 * plot_e2e.W, plot_e2e.H)
