"""The evaluation report: markdown table, per-image histograms, worst cases as panels, per-image CSV."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from cluster.cli import main as cli_main
from trainer.results.evaluate import PerImage, WorstCase
from trainer.results.report import HISTOGRAM_SIZE, PANEL_COLUMNS, histogram, worst_case_panel, write_report
from trainer.results.visualize import GAP


@pytest.fixture(scope="module")
def tiny_run(tiny_trained_run):
    return tiny_trained_run


def fake_results(values: dict[str, list[float]]) -> tuple[dict, PerImage]:
    per_image = PerImage(names=[f"img{i}" for i in range(len(values["side_x1e-2"]))])
    results = {"checkpoint": "c.pt", "step": 7, "data": "d", "split": "test", "images": len(per_image.names),
               "skipped": {}, "notes": {"side_x1e-2": "note"}}
    for method in ("model", "constant_depth", "average_train_depth"):
        per_image.values[method] = {k: list(v) for k, v in values.items()}
        block = {}
        for k, v in values.items():
            finite = [x for x in v if math.isfinite(x)]
            block[k] = {"mean": sum(finite) / len(finite), "std": 0.1, "n": len(finite)}
        results[method] = block
    return results, per_image


def test_histogram_draws_any_values_at_its_size(tmp_path):
    for i, series in enumerate(({"model": [1.0, 2.0, 2.5, float("nan")], "constant_depth": [3.0]},
                                {"model": [2.0, 2.0, 2.0]}, {"model": []}, {"model": [float("nan")]})):
        figure = histogram(series, "title", "x")
        figure.savefig(tmp_path / f"{i}.png", format="png")
        with Image.open(tmp_path / f"{i}.png") as image:
            assert image.size == HISTOGRAM_SIZE


def test_histogram_bars_count_the_finite_values():
    """The model's bars hold every finite value once; the baseline is an outline on the same bins."""
    figure = histogram({"model": [1.0, 2.0, 2.5, float("nan"), 2.6], "constant_depth": [3.0, 1.0]}, "t", "x", bins=4)
    axes = figure.axes[0]
    bars = [patch.get_height() for patch in axes.patches if type(patch).__name__ == "Rectangle"]
    assert sum(bars) == 4 and len(bars) == 4
    assert [line.get_xdata()[0] for line in axes.get_lines()] == pytest.approx([(1.0 + 2.0 + 2.5 + 2.6) / 4, 2.0])


def test_write_report_from_results_without_a_model(tmp_path):
    values = {"side_x1e-2": [0.8, 0.9, float("nan"), 1.5], "mad_deg_reference": [16.0, 17.0, float("nan"), 20.0],
              "mad_deg_exact": [12.0, 13.0, float("nan"), 15.0]}
    results, per_image = fake_results(values)
    size = 32
    case = WorstCase("img3", 1.5, 15.0, torch.zeros(3, size, size), torch.zeros(3, size, size),
                     torch.ones(size, size), torch.ones(size, size), torch.ones(size, size),
                     torch.full((size, size), float("nan")))
    path = write_report(results, per_image, tmp_path / "report", [case])
    text = path.read_text()
    assert "| model | 0.800" not in text  # the mean, not the first value
    assert "| model | 1.067 ± 0.100 (n=3)" in text
    assert "constant depth (baseline)" in text and "average training depth (baseline)" in text
    for name in ("side_histogram.png", "mad_histogram.png", "worst_01_img3.png", "per_image.csv"):
        assert f"({name})" in text and (tmp_path / "report" / name).is_file(), name
    with Image.open(tmp_path / "report" / "worst_01_img3.png") as img:
        assert img.size == (len(PANEL_COLUMNS) * 2 * size + (len(PANEL_COLUMNS) - 1) * GAP, 2 * size + 16)
    rows = list(csv.reader(open(tmp_path / "report" / "per_image.csv")))
    assert len(rows) == 5 and rows[0][0] == "name" and rows[3][1] == "nan"
    assert json.loads((tmp_path / "report" / "results.json").read_text())["step"] == 7


def test_worst_case_panel_marks_the_unevaluated_pixels_grey():
    size = 16
    error = torch.full((size, size), float("nan"))
    error[4:12, 4:12] = 45.0
    case = WorstCase("x", 1.0, 2.0, torch.zeros(3, size, size), torch.zeros(3, size, size), torch.ones(size, size),
                     torch.ones(size, size), torch.ones(size, size), error)
    panel = worst_case_panel(case, tile=size)
    x0 = (len(PANEL_COLUMNS) - 1) * (size + GAP)
    strip = 16
    assert panel.getpixel((x0 + 1, strip + 1)) == (128, 128, 128)
    assert panel.getpixel((x0 + 8, strip + 8)) == (255, 255, 0)  # 45 degrees and more: yellow


def test_cli_evaluate_writes_the_report_with_the_worst_cases(tiny_run, synthetic_root, tmp_path, capsys):
    out = tmp_path / "eval.json"
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--checkpoint", str(tiny_run / "checkpoints"), "--data", str(synthetic_root),
                     "--output", str(out), "--report-dir", str(report), "--worst", "3", "--batch-size", "10"]) == 0
    results = json.loads(out.read_text())
    assert results["report"] == str(report / "report.md")
    text = (report / "report.md").read_text()
    assert "| model |" in text and "## The 3 worst images by SIDE" in text
    worst = sorted(report.glob("worst_*.png"))
    assert len(worst) == 3
    rows = list(csv.DictReader(open(report / "per_image.csv")))
    assert len(rows) == results["images"] == 24
    sides = sorted((float(r["model/side_x1e-2"]) for r in rows), reverse=True)
    # the panels are the three largest SIDEs, across batches (batch size 10), worst first
    listed = [float(line.split("|")[3]) for line in text.splitlines() if line.startswith("| 1 |") or
              line.startswith("| 2 |") or line.startswith("| 3 |")]
    assert listed == pytest.approx(sides[:3], abs=1e-3)
    mean = sum(float(r["model/side_x1e-2"]) for r in rows) / len(rows)
    assert mean == pytest.approx(results["model"]["side_x1e-2"]["mean"], rel=1e-6)
    for path in worst:
        with Image.open(path) as img:
            assert img.size == (len(PANEL_COLUMNS) * 128 + (len(PANEL_COLUMNS) - 1) * GAP, 128 + 16)
    capsys.readouterr()


def test_cli_evaluate_report_goes_beside_the_checkpoints_by_default(tiny_run, synthetic_root, capsys):
    assert cli_main(["evaluate", "--checkpoint", str(tiny_run / "checkpoints"), "--data", str(synthetic_root),
                     "--no-report"]) == 0
    assert "report" not in json.loads(capsys.readouterr().out)
    assert not (tiny_run / "reports").exists()
    assert cli_main(["evaluate", "--checkpoint", str(tiny_run / "checkpoints"), "--data", str(synthetic_root),
                     "--worst", "0"]) == 0
    results = json.loads(capsys.readouterr().out)
    expected = tiny_run / "reports" / f"test_step_{results['step']:08d}" / "report.md"
    assert results["report"] == str(expected) and expected.is_file()
    assert not list(expected.parent.glob("worst_*.png"))


def test_default_report_dir_finds_the_run_from_any_checkpoint_path(tmp_path):
    from trainer.results.evaluate import default_report_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004.pt").write_bytes(b"")
    expected = run / "reports" / "test_step_00000004"
    for path in (run / "checkpoints", run / "checkpoints" / "step_00000004.pt", run / "checkpoints" / "step_00000004"):
        assert default_report_dir(path, "test", 4) == expected, path
    (tmp_path / "loose.pt").write_bytes(b"")
    assert default_report_dir(tmp_path / "loose.pt", "val", 1) == tmp_path / "reports" / "val_step_00000001"
