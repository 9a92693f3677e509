"""`unsup3d evaluate`: SIDE and MAD (SPEC 6) of a checkpoint on a synface-layout folder, next to two
baselines computed in the same run on the same images and masks: a constant depth map, and the
pixelwise average ground-truth depth of the training split.

Besides the JSON-ready summary, evaluation keeps every image's values (PerImage) and the inputs,
renders and errors of the images the model does worst on (by SIDE), from which trainer.results.report
writes a human report (report.md, error histograms, worst cases as panels).

evaluate_checkpoints scores every checkpoint kept in a run's checkpoints folder on the same images
and draws their learning curve (trainer/results/learning_curve.py, shared with the training loop's
validation in trainer/loop/validation.py, which uses depth_metrics and fixed_subset from here too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.loop.checkpoint import CheckpointError
from trainer.loop.checkpoint_load import load_checkpoint
from trainer.loop.safe_files import one_line
from trainer.model.config import ModelConfig
from trainer.config_loading import ConfigError, from_dict, parse_yaml
from trainer.results.metrics import evaluation_mask, mad_error, normal_angles, side_error, summarize
from trainer.model.unsup3d import Unsup3D
from trainer.loop.device import resolve_device
from trainer.render.geometry import intrinsics
from trainer.data.synface import DEFAULT_MAX_PIXELS, SynfaceFolder

log = logging.getLogger(__name__)

REFERENCE_EPS = 1e-7


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[Unsup3D, ModelConfig, int]:
    """Rebuild the model a checkpoint was trained with, from the config stored inside it."""
    state = load_checkpoint(checkpoint, map_location=device)
    for key in ("config_yaml", "model"):
        if key not in state:
            raise CheckpointError(f"{checkpoint} has no '{key}' entry: not a checkpoint written by unsup3d train")
    # Only the model section matters here; the rest may hold sections of other packages.
    stored = parse_yaml(state["config_yaml"], f"{checkpoint} (its config)")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{checkpoint}: its stored config is not a mapping")
    try:
        model_config = from_dict(ModelConfig, stored.get("model"), "model")
    except ConfigError as error:
        raise CheckpointError(f"{checkpoint}: its stored model config is unusable: {error}") from error
    model = Unsup3D(model_config).to(device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model its config describes "
                              f"({weights_mismatch(model.state_dict(), state['model'], error)})") from error
    model.eval()
    return model, model_config, int(state.get("step", 0))


def weights_mismatch(expected: dict, found, error: BaseException) -> str:
    """The first difference between a model's state dict and a checkpoint's, and how many there are."""
    if not isinstance(found, dict):
        return f"the weights are a {type(found).__name__}, not a state dict"
    problems = []
    for key, value in expected.items():
        other = found.get(key)
        if other is None:
            problems.append(f"missing {key}")
        elif not isinstance(other, torch.Tensor) or other.shape != value.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            problems.append(f"{key} is {shape} in the checkpoint, {tuple(value.shape)} in the model")
    problems += [f"unexpected {key}" for key in found if key not in expected]
    if not problems:
        return one_line(error)
    more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
    return problems[0] + more


def average_training_depth(data_dir: Path, image_size: int, on_error: str, **limits) -> torch.Tensor | None:
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        return None
    folder = SynfaceFolder(str(data_dir), "train", image_size=image_size, on_error=on_error, **limits)
    total, count = torch.zeros(image_size, image_size), 0
    for batch in folder.batches(256):
        total += batch["depth"].sum(0)
        count += batch["depth"].shape[0]
    return total / count if count else None


METHODS = ("model", "constant_depth", "average_train_depth")
METRICS = ("side_x1e-2", "mad_deg_reference", "mad_deg_exact")


def depth_metrics(depth: torch.Tensor, recon_mask: torch.Tensor, gt: torch.Tensor,
                  K: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({metric: per-image values [B] on the CPU, in reported units (SIDE x1e-2, MAD degrees)}, the mask).

    depth: the prediction in the input view [B, S, S]; recon_mask: where it is rendered (all ones for
    the baselines); gt: ground-truth depth (float64). The one place both evaluate and the training
    loop's validation (trainer/loop/validation.py) compute SIDE and the two MADs, so their numbers agree.
    """
    mask = evaluation_mask(recon_mask, gt)
    K = K.to(gt)
    values = {
        "side_x1e-2": side_error(depth, gt, mask).cpu() * 100,  # reported x1e-2
        "mad_deg_reference": mad_error(depth, gt, mask, K, eps=REFERENCE_EPS).cpu(),
        "mad_deg_exact": mad_error(depth, gt, mask, K, eps=None).cpu(),
    }
    return values, mask


def baseline_predictions(gt: torch.Tensor, average_depth: torch.Tensor | None) -> dict[str, tuple]:
    """{method: (depth, recon mask)} of the two baselines for ground truth gt [B, S, S]: a constant
    depth map, and the average training depth (absent when there is none); both cover the image."""
    full = torch.ones_like(gt)
    predictions = {"constant_depth": (torch.ones_like(gt), full)}
    if average_depth is not None:
        predictions["average_train_depth"] = (average_depth.to(gt).expand_as(gt), full)
    return predictions


def metric_block(values: dict[str, list[torch.Tensor]]) -> dict:
    """{metric: summarize(...)} of per-image values collected batch by batch (reported units)."""
    return {metric: summarize(torch.cat(values[metric])) for metric in METRICS}


def fixed_subset(total: int, count: int | None) -> list[int]:
    """`count` indices evenly spaced over range(total) (all of them when count is None or >= total).

    Deterministic and without randomness: the same images every time, spread over a split sorted by
    name (so a split whose names group similar images is still sampled across)."""
    if count is None or count >= total:
        return list(range(total))
    if count < 1:
        raise ValueError(f"the number of images must be at least 1, got {count}")
    return [i * total // count for i in range(count)]


@dataclass
class PerImage:
    """Every evaluated image's metrics: values[method][metric] is a list aligned with names (NaN = empty mask)."""

    names: list[str] = field(default_factory=list)
    values: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {m: {k: [] for k in METRICS} for m in METHODS})


@dataclass
class WorstCase:
    """What the report draws for one of the images the model does worst on (CPU tensors, one image)."""

    name: str
    side: float  # x1e-2
    mad: float  # degrees, exact normalisation
    image: torch.Tensor  # [3, S, S] in [-1, 1]
    recon: torch.Tensor  # [3, S, S] the model's reconstruction in the input view
    pred_depth: torch.Tensor  # [S, S] rendered in the input view
    gt_depth: torch.Tensor  # [S, S]
    mask: torch.Tensor  # [S, S] the evaluation mask
    angle_error: torch.Tensor  # [S, S] degrees between the normals, NaN outside the mask


class _WorstCases:
    """Keeps the k images with the largest model SIDE seen so far (NaN SIDE never counts as worst)."""

    def __init__(self, k: int):
        self.k = k
        self.cases: list[WorstCase] = []

    def offer(self, names, side, mad, image, recon, pred, gt, mask, angles) -> None:
        if self.k <= 0:
            return
        key = torch.nan_to_num(side, nan=-float("inf"))
        for i in key.topk(min(self.k, key.numel())).indices.tolist():
            if not torch.isfinite(key[i]):
                continue
            case = WorstCase(names[i], float(side[i]), float(mad[i]), image[i].float().cpu(), recon[i].float().cpu(),
                             pred[i].float().cpu(), gt[i].float().cpu(), mask[i].float().cpu(),
                             torch.where(mask[i] > 0, angles[i], torch.full_like(angles[i], float("nan"))).float().cpu())
            self.cases.append(case)
        self.cases.sort(key=lambda c: -c.side)
        del self.cases[self.k:]


def default_report_dir(checkpoint: str | Path, split: str, step: int) -> Path:
    """<run>/reports/<split>_step_<N>: beside the checkpoints folder the checkpoint came from.

    The checkpoint may be the checkpoints folder, a file in it or a per-step folder in it; anything
    else gets its reports beside itself.
    """
    path = Path(checkpoint)
    run = path if path.is_dir() else path.parent
    for candidate in (path, *list(path.parents)[:2]):
        if candidate.name == "checkpoints":
            run = candidate.parent
            break
    return run / "reports" / f"{split}_step_{step:08d}"


@torch.no_grad()
def evaluate_detailed(checkpoint: str, data: str, split: str = "test", batch_size: int = 64, device: str = "auto",
                      on_error: str = "skip", worst: int = 8, images: int | None = None,
                      average_depths: dict | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                      min_image_size: int | None = None) -> tuple[dict, PerImage, list[WorstCase]]:
    """(the JSON-ready summary of evaluate, every image's values, the `worst` images by model SIDE).

    images: evaluate only that many of the split's pairs, evenly spaced by name (fixed_subset: the
    same choice as the training loop's validation); None: all. average_depths: a cache {image size:
    average training depth or None} filled here when the size is missing, so that scoring several
    checkpoints reads the training split once. Images above max_image_pixels or below
    min_image_size (default half the model's resolution) and depth maps of another size than their
    image are skipped and counted (or raise with on_error="raise").
    """
    torch_device = resolve_device(device)
    model, model_config, step = load_model(checkpoint, torch_device)
    size = model_config.image_size
    data_dir = Path(data)
    limits = {"max_pixels": max_image_pixels, "min_size": min_image_size}
    folder = SynfaceFolder(str(data_dir), split, image_size=size, on_error=on_error, **limits)
    if len(folder) == 0:
        raise ValueError(f"{data_dir / split} holds no usable image/depth pairs (skipped: {dict(folder.skipped) or 'none'})")
    available = len(folder)
    folder.select(fixed_subset(available, images))
    K = intrinsics(size, dtype=torch.float64)
    average_depths = {} if average_depths is None else average_depths
    if size not in average_depths:
        average_depths[size] = average_training_depth(data_dir, size, on_error, **limits)
    average_depth = average_depths[size]

    names = METHODS
    collected = {n: {metric: [] for metric in METRICS} for n in names}
    per_image = PerImage()
    worst_cases = _WorstCases(worst)
    count = 0
    for batch in folder.batches(batch_size):
        image = batch["image"].to(torch_device)
        gt = batch["depth"].to(torch_device).double()
        out = model.decompose(image)
        b = image.shape[0]
        pred = out.view_depth[:b].double()
        predictions = {"model": (pred, model.renderer.recon_mask(out.view_depth[:b]))}
        predictions.update(baseline_predictions(gt, average_depth))
        per_image.names += batch["name"]
        for name, (depth, recon_mask) in predictions.items():
            values, mask = depth_metrics(depth, recon_mask, gt, K)
            for metric, v in values.items():
                collected[name][metric].append(v)
                per_image.values[name][metric] += v.tolist()
            if name == "model" and worst > 0:
                angles = normal_angles(depth, gt, K.to(gt), eps=None)
                recon = _reconstruction(model, out, b)
                worst_cases.offer(batch["name"], values["side_x1e-2"], values["mad_deg_exact"], image, recon,
                                  depth, gt, mask, angles)
        count += b

    results = {
        "checkpoint": str(checkpoint),
        "step": step,
        "data": str(data_dir),
        "split": split,
        "images": count,
        "skipped": dict(folder.skipped),
        "upscaled": folder.upscaled,
        "notes": {
            "side_x1e-2": "scale-invariant depth error x 1e-2, per image then mean and std over images",
            "mad_deg_reference": "mean angle deviation of normals normalised as n/(|n|+1e-7) like the reference (the paper's numbers)",
            "mad_deg_exact": "the same with exactly normalised normals",
        },
    }
    if images is not None and images < available:
        results["subset"] = f"{count} of {available} pairs, evenly spaced by name"
    for name in names:
        if collected[name]["side_x1e-2"]:
            results[name] = metric_block(collected[name])
    if average_depth is None:
        results["average_train_depth"] = f"not computed: {data_dir / 'train'} does not exist"
        del per_image.values["average_train_depth"]
    return results, per_image, worst_cases.cases


def _reconstruction(model, out, batch: int) -> torch.Tensor:
    """The model's input-view image of the original branch, white where nothing is rendered."""
    from trainer.results.visualize import reconstruction

    return reconstruction(model, out)[:batch]


def evaluate(checkpoint: str, data: str, split: str = "test", batch_size: int = 64, device: str = "auto",
             on_error: str = "skip", report_dir: str | Path | None = None, worst: int = 8,
             images: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
             min_image_size: int | None = None) -> dict:
    """Evaluate; returns a JSON-ready dict. on_error='skip' skips and counts unreadable pairs, 'raise' stops.

    report_dir: also write the human report there (trainer.results.report; "auto" = default_report_dir);
    the dict then names report.md under "report". worst: how many worst images the report draws.
    images: only that many pairs, evenly spaced by name (fixed_subset); None: the whole split.
    """
    results, per_image, worst_cases = evaluate_detailed(checkpoint, data, split, batch_size, device, on_error,
                                                        worst if report_dir is not None else 0, images=images,
                                                        max_image_pixels=max_image_pixels,
                                                        min_image_size=min_image_size)
    add_truth_correlation(results, checkpoint, data, split, batch_size, device)
    if report_dir is not None:
        from trainer.results.report import write_report

        if str(report_dir) == "auto":
            report_dir = default_report_dir(checkpoint, split, results["step"])
        results["report"] = str(write_report(results, per_image, report_dir, worst_cases))
    return results


def add_truth_correlation(results: dict, checkpoint: str, data: str, split: str, batch_size: int, device: str) -> None:
    """When the split holds the face generator's truth (truth.npz), add results["truth_correlation"]:
    how the predicted pose, light and per-image depth correlate with it, over the whole split
    (trainer/results/truth_probe.py)."""
    from trainer.data.face_generator import read_truth
    from trainer.results.truth_probe import probe

    if read_truth(data, split) is None:
        return
    results["truth_correlation"] = {k: v for k, v in probe(checkpoint, data, split, str(resolve_device(device)),
                                                           batch_size).items() if k != "step"}


def checkpoints_in(folder: str | Path) -> list[Path]:
    """Every checkpoint kept in a run's checkpoints folder (or the run folder holding one), oldest
    first: the step_N directories trainer/loop/checkpoint.py writes, and single-file step_N.pt of earlier versions."""
    from trainer.loop.checkpoint import STATE_FILE, CheckpointManager

    folder = Path(folder)
    if (folder / STATE_FILE).is_file() or folder.is_file():
        raise CheckpointError(f"{folder} is one checkpoint; --all-checkpoints takes the folder that holds them "
                              f"({folder.parent})")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoints folder {folder} does not exist")
    if (folder / "checkpoints").is_dir() and not any(folder.glob("step_*")):
        folder = folder / "checkpoints"
    manager = CheckpointManager(folder)
    found = manager.checkpoints() + manager.legacy_checkpoints()
    if not found:
        raise CheckpointError(f"no checkpoint found in {folder}")
    return sorted(found, key=lambda p: int(p.name.split("_")[1].split(".")[0]))


def default_curve_path(folder: str | Path, split: str) -> Path:
    """<run>/reports/<split>_learning_curve.png, beside the checkpoints folder."""
    folder = Path(folder)
    run = folder.parent if folder.name == "checkpoints" else folder
    return run / "reports" / f"{split}_learning_curve.png"


def evaluate_checkpoints(folder: str | Path, data: str, split: str = "test", batch_size: int = 64, device: str = "auto",
                         on_error: str = "skip", images: int | None = None, curve: str | Path | None = None) -> dict:
    """Evaluate every checkpoint kept in `folder` on the same images, oldest first, and draw the
    learning curve (trainer/results/learning_curve.py) of their scores against the step.

    Writes the PNG to `curve` (default_curve_path when None) and, beside it, a JSON of every point
    (the same name with .json). Returns that JSON's dict: "points" (step and the model's means),
    "baselines" (computed once: they do not depend on the model), "evaluations" (each checkpoint's
    evaluate() dict), "curve" and "json" (the files written). No per-checkpoint report is written.
    """
    from trainer.results.json_text import json_text
    from trainer.results.learning_curve import curve_from_evaluations, plot_learning_curve

    paths = checkpoints_in(folder)
    averages: dict = {}  # average training depth by image size, read once
    evaluations = []
    for path in paths:
        results, _, _ = evaluate_detailed(str(path), data, split, batch_size, device, on_error, worst=0, images=images,
                                          average_depths=averages)
        add_truth_correlation(results, str(path), data, split, batch_size, device)
        log.info("%s: step %d SIDE %.4f x1e-2, MAD %.2f deg exact / %.2f reference", path.name, results["step"],
                 results["model"]["side_x1e-2"]["mean"], results["model"]["mad_deg_exact"]["mean"],
                 results["model"]["mad_deg_reference"]["mean"])
        evaluations.append(results)
    learning_curve = curve_from_evaluations(evaluations)
    png = Path(curve) if curve is not None else default_curve_path(paths[0].parent, split)
    out = {"checkpoints": str(paths[0].parent), "data": str(data), "split": split,
           "images": evaluations[0]["images"], "points": learning_curve.points, "baselines": learning_curve.baselines,
           "curve": str(png), "json": str(png.with_suffix(".json")), "evaluations": evaluations}
    plot_learning_curve(learning_curve, png)
    png.with_suffix(".json").write_text(json_text(out, indent=2) + "\n")
    return out

