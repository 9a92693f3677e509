"""The human side of `unsup3d evaluate`: a markdown report with the metric table, histograms of the
per-image errors and the worst cases drawn as panels.

Files written to the report folder:
- report.md: what was evaluated, the table (mean +- std and n per method and metric), the plots, the
  worst cases;
- side_histogram.png, mad_histogram.png: the model's per-image errors as bars, the baselines' as
  outlines, their means as dashed lines (matplotlib, as the learning curves);
- worst_<rank>_<name>.png: input, reconstruction, rendered and true depth, their normals and the
  angle between them, for the images the model does worst on by SIDE;
- per_image.csv: every image's values for every method, to sort and plot elsewhere;
- results.json: the summary dict as evaluate returns it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from trainer.results import visualize as vis
from trainer.render.geometry import depth_to_normals, intrinsics
from trainer.results.json_text import json_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHOD_TITLES = {
    "model": "model",
    "constant_depth": "constant depth (baseline)",
    "average_train_depth": "average training depth (baseline)",
}
METRIC_TITLES = {
    "side_x1e-2": "SIDE (x1e-2)",
    "mad_deg_reference": "MAD (deg), reference normalisation",
    "mad_deg_exact": "MAD (deg), exact normalisation",
}
COLOURS = {"model": "tab:blue", "constant_depth": "tab:red", "average_train_depth": "tab:green"}
HISTOGRAM_SIZE = (640, 360)
PANEL_COLUMNS = ("input", "reconstruction", "depth (model)", "depth (truth)", "normals (model)",
                 "normals (truth)", "angle error")


# --------------------------------------------------------------------------------------------
# Histogram


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def histogram(series: dict[str, Sequence[float]], title: str, xlabel: str, bins: int = 20,
              size: tuple[int, int] = HISTOGRAM_SIZE) -> Figure:
    """Per-image values of several methods on one axis: the first series as filled bars, the others as
    outlines, all on the same bins; every series' mean as a dashed vertical line. NaN values are left
    out. A matplotlib Figure on the Agg canvas (no pyplot, no display), `size` pixels at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.set(title=title, xlabel=xlabel, ylabel="images")
    clean = {name: _finite(v) for name, v in series.items()}
    everything = [v for vs in clean.values() for v in vs]
    if not everything:
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")
        return figure
    low, high = min(everything), max(everything)
    if high - low < 1e-9:  # one value: a bin of width 1 around it
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    for k, (name, values) in enumerate(clean.items()):
        colour = COLOURS.get(name, "tab:gray")
        label = METHOD_TITLES.get(name, name)
        if not values:
            continue
        if k == 0:
            axes.hist(values, bins=edges, color=colour, alpha=0.35, edgecolor=colour, label=label)
        else:
            axes.hist(values, bins=edges, histtype="step", color=colour, linewidth=2, label=label)
        axes.axvline(sum(values) / len(values), color=colour, linestyle="--", linewidth=1.5)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8, loc="best", title="dashed: mean", title_fontsize=8)
    return figure


# --------------------------------------------------------------------------------------------
# Worst cases


def worst_case_panel(case, near: float = 0.9, far: float = 1.1, tile: int | None = None,
                     angle_scale: float = 45.0) -> Image.Image:
    """One row of PANEL_COLUMNS tiles for an evaluate.WorstCase (tile: default twice the image size).

    Depth tiles share the fixed range [near, far] (near bright); the angle error runs black -> red
    -> yellow over [0, angle_scale] degrees, grey outside the evaluation mask.
    """
    size = case.image.shape[-1]
    tile = tile or 2 * size
    K = intrinsics(size, dtype=torch.float64)
    normals = depth_to_normals(torch.stack([case.pred_depth, case.gt_depth]).double(), K).float()
    tiles = [
        vis.image_to_pil(case.image),
        vis.image_to_pil(case.recon),
        vis.depth_to_pil(case.pred_depth, near, far),
        vis.depth_to_pil(case.gt_depth, near, far),
        vis.normals_to_pil(normals[0]),
        vis.normals_to_pil(normals[1]),
        vis.error_to_pil(case.angle_error, angle_scale),
    ]
    return vis.grid([list(zip(PANEL_COLUMNS, tiles))], tile)


# --------------------------------------------------------------------------------------------
# Report


def _cell(block: dict | None) -> str:
    if not isinstance(block, dict):
        return "n/a"
    mean, std, n = block["mean"], block["std"], block["n"]
    std_text = "n/a" if not math.isfinite(std) else f"{std:.3f}"
    return f"{mean:.3f} ± {std_text} (n={n})"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]


def write_report(results: dict, per_image, out_dir: str | Path, worst_cases: Sequence = ()) -> Path:
    """Write the report folder (module docstring) and return the path of report.md.

    results: evaluate's dict; per_image: evaluate.PerImage; worst_cases: evaluate.WorstCase list,
    worst first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json_text(results, indent=2) + "\n")

    methods = [m for m in METHOD_TITLES if isinstance(results.get(m), dict)]
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        columns = [(m, k) for m in methods for k in METRIC_TITLES if m in per_image.values]
        writer.writerow(["name"] + [f"{m}/{k}" for m, k in columns])
        for i, name in enumerate(per_image.names):
            writer.writerow([name] + [f"{per_image.values[m][k][i]:.6g}" for m, k in columns])

    plots = {
        "side_histogram.png": ("side_x1e-2", "Per-image SIDE", "SIDE (x1e-2)"),
        "mad_histogram.png": ("mad_deg_exact", "Per-image MAD (exact normalisation)", "MAD (degrees)"),
    }
    for filename, (metric, title, xlabel) in plots.items():
        series = {m: per_image.values[m][metric] for m in methods if m in per_image.values}
        histogram(series, title, xlabel).savefig(out / filename, format="png")

    panels = []
    for rank, case in enumerate(worst_cases, start=1):
        filename = f"worst_{rank:02d}_{_safe_name(case.name)}.png"
        worst_case_panel(case).save(out / filename)
        panels.append((rank, case, filename))

    lines = [
        f"# Evaluation report: step {results.get('step')}",
        "",
        f"- checkpoint: `{results.get('checkpoint')}`",
        f"- data: `{results.get('data')}`, split `{results.get('split')}`",
        f"- images evaluated: {results.get('images')}"
        + (f"; skipped: {results['skipped']}" if results.get("skipped") else ""),
        "",
        "## Metrics (mean ± std over images)",
        "",
        "| method | " + " | ".join(METRIC_TITLES.values()) + " |",
        "|---|" + "---|" * len(METRIC_TITLES),
    ]
    for m in METHOD_TITLES:
        block = results.get(m)
        if isinstance(block, dict):
            lines.append(f"| {METHOD_TITLES[m]} | " + " | ".join(_cell(block.get(k)) for k in METRIC_TITLES) + " |")
        elif isinstance(block, str):
            lines.append(f"| {METHOD_TITLES[m]} | {block} |" + " |" * (len(METRIC_TITLES) - 1))
    lines += [""]
    for key, note in results.get("notes", {}).items():
        lines.append(f"- {METRIC_TITLES.get(key, key)}: {note}")
    lines += [
        "- std is over images with Bessel's correction; n counts images with a non-empty evaluation mask.",
        "",
        "## Per-image error distribution",
        "",
        "Model as filled bars, baselines as outlines, dashed lines at each method's mean.",
        "",
        "![SIDE histogram](side_histogram.png)",
        "",
        "![MAD histogram](mad_histogram.png)",
        "",
        "Every image's values: [per_image.csv](per_image.csv).",
        "",
    ]
    if panels:
        lines += [
            f"## The {len(panels)} worst images by SIDE",
            "",
            "Columns: " + ", ".join(PANEL_COLUMNS) + ". Depth: near is bright, on the fixed range 0.9 to 1.1. "
            "Angle error: black 0, red 22.5, yellow 45 degrees or more; grey is outside the evaluation mask.",
            "",
            "| rank | image | SIDE (x1e-2) | MAD exact (deg) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {rank} | {case.name} | {case.side:.3f} | {case.mad:.2f} |" for rank, case, _ in panels]
        lines.append("")
        for rank, case, filename in panels:
            lines += [f"### {rank}. {case.name}", "", f"![{case.name}]({filename})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
