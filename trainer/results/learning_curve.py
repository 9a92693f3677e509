"""The learning curve of a run: validation SIDE and MAD (SPEC 6) against the training step, with the
two baselines as horizontal lines, drawn into one PNG.

Two sources, one drawing (plot_learning_curve):
- a run's metrics.jsonl (curve_from_metrics): the records the training loop writes every
  train.eval_every steps (kind "validation"; the one at step 0 is the untrained model) and its
  baselines record (kind "validation_baselines"); see trainer/loop/validation.py;
- `unsup3d evaluate --all-checkpoints` (curve_from_evaluations): one evaluate() dict per checkpoint.

matplotlib is used through its object API on the Agg canvas (no pyplot, no global backend), so
drawing is safe inside a training process and on machines without a display.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("side_x1e-2", "mad_deg_reference", "mad_deg_exact")
BASELINES = ("constant_depth", "average_train_depth")
VALIDATION_KIND = "validation"
BASELINES_KIND = "validation_baselines"
BASELINE_STYLE = {"constant_depth": ("tab:red", "constant depth"),
                  "average_train_depth": ("tab:green", "average train depth")}


@dataclass
class Curve:
    """points: [{"step": int, metric: mean over images, ...}] sorted by step, one per step.
    baselines: {method: {metric: mean}} for the methods that were computed."""

    points: list[dict] = field(default_factory=list)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    title: str = ""


def _means(block: dict) -> dict[str, float]:
    """{metric: mean} of a metric block {metric: {"mean", "std", "n"}} (evaluate's and the records')."""
    return {metric: float(block[metric]["mean"]) for metric in METRICS if isinstance(block.get(metric), dict)}


def read_records(path: str | Path) -> list[dict]:
    """Every JSON record of a metrics.jsonl; a line being written (or torn by a crash) is skipped."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _one_per_step(points: Iterable[dict]) -> list[dict]:
    """The last point of each step (a resumed run redoes the steps after its checkpoint), by step."""
    by_step = {int(p["step"]): p for p in points}
    return [by_step[s] for s in sorted(by_step)]


def curve_from_records(records: list[dict], title: str = "") -> Curve:
    """The validation points and baselines among metrics.jsonl records.

    Only points of the validation set of the last baselines record count (its "set" digest), so a
    run resumed with another eval_split or eval_images does not mix two sets on one curve."""
    baselines = [r for r in records if r.get("kind") == BASELINES_KIND]
    last = baselines[-1] if baselines else None
    points = [r for r in records if r.get("kind") == VALIDATION_KIND
              and (last is None or r.get("set") == last.get("set")) and isinstance(r.get("model"), dict)]
    curve = Curve(title=title)
    curve.points = [{"step": int(r["step"]), **_means(r["model"])} for r in _one_per_step(points)]
    if last is not None:
        curve.baselines = {m: _means(last[m]) for m in BASELINES if isinstance(last.get(m), dict)}
        if not title:
            curve.title = f"{last.get('split')} split, {last.get('images')} images"
    return curve


def curve_from_metrics(path: str | Path, title: str = "") -> Curve:
    """The learning curve recorded in a run's metrics.jsonl."""
    return curve_from_records(read_records(path), title)


def curve_from_evaluations(evaluations: list[dict], title: str = "") -> Curve:
    """The learning curve of evaluate() dicts of several checkpoints of one run (on the same images)."""
    curve = Curve(title=title)
    curve.points = [{"step": int(e["step"]), **_means(e["model"])} for e in _one_per_step(evaluations)]
    if evaluations:
        first = evaluations[0]
        curve.baselines = {m: _means(first[m]) for m in BASELINES if isinstance(first.get(m), dict)}
        if not title:
            curve.title = f"{first.get('split')} split, {first.get('images')} images, checkpoints"
    return curve


def _finite(values: list[float]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def plot_learning_curve(curve: Curve, path: str | Path) -> Path:
    """Draw SIDE (left) and MAD with exact (solid) and reference (dashed) normalisation (right)
    against the step; baselines as horizontal lines; the step-0 point marked "untrained".
    Written to a temporary file and renamed, so a reader never sees a half-written PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    side_axes, mad_axes = figure.subplots(1, 2)
    steps = [p["step"] for p in curve.points]

    def series(metric: str) -> list[float]:
        return [p.get(metric, float("nan")) for p in curve.points]

    side = series("side_x1e-2")
    side_axes.plot(steps, side, "o-", color="tab:blue", label="model")
    mad_axes.plot(steps, series("mad_deg_exact"), "o-", color="tab:blue", label="model, exact normals")
    mad_axes.plot(steps, series("mad_deg_reference"), "s--", color="tab:blue", alpha=0.7,
                  label="model, reference normals (n/(|n|+1e-7))")
    for method, values in curve.baselines.items():
        colour, name = BASELINE_STYLE.get(method, ("tab:gray", method))
        if "side_x1e-2" in values:
            side_axes.axhline(values["side_x1e-2"], color=colour, linestyle="-", linewidth=1, label=name)
        if "mad_deg_exact" in values:
            mad_axes.axhline(values["mad_deg_exact"], color=colour, linestyle="-", linewidth=1, label=f"{name}, exact")
        if "mad_deg_reference" in values:
            mad_axes.axhline(values["mad_deg_reference"], color=colour, linestyle="--", linewidth=1,
                             label=f"{name}, reference")
    if steps and steps[0] == 0:
        for axes, value in ((side_axes, side[0]), (mad_axes, curve.points[0].get("mad_deg_exact"))):
            if value is not None and math.isfinite(value):
                axes.annotate("untrained", (0, value), textcoords="offset points", xytext=(6, 6), fontsize=8)
    side_axes.set(title="SIDE (x1e-2, lower is better)", xlabel="step", ylabel="SIDE x1e-2")
    mad_axes.set(title="MAD (degrees, lower is better)", xlabel="step", ylabel="degrees")
    for axes in (side_axes, mad_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    if not curve.points or not _finite(side):
        side_axes.text(0.5, 0.5, "no validation points yet", transform=side_axes.transAxes, ha="center")
    if curve.title:
        figure.suptitle(curve.title, fontsize=10)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


__all__ = ["BASELINES_KIND", "Curve", "VALIDATION_KIND", "curve_from_evaluations", "curve_from_metrics",
           "curve_from_records", "plot_learning_curve", "read_records"]
