"""Validation during training (train.eval_every): SIDE and MAD (SPEC 6) of the model on a fixed
subset of a split with ground-truth depth, beside the constant-depth and average-training-depth
baselines, recorded in metrics.jsonl, in the Prometheus metrics and in the log, and drawn as
<out_dir>/learning_curve.png (trainer/results/learning_curve.py).

What: train.eval_data (default: data.root when the run trains from that folder; a run streaming
shards validates only when eval_data is set), split train.eval_split (default "val", else "test"),
train.eval_images pairs of it evenly spaced by name (evaluate.fixed_subset: the same images every
time, and the ones `unsup3d evaluate --images N` picks). The metrics are evaluate's own
(evaluate.depth_metrics), so the numbers agree with `unsup3d evaluate` on the same images. Without
such a split validation is off, and the run says why, once.

When: before the first step of a run that starts from step 0 (the untrained model), every
eval_every steps, and at the last step of the run. The baselines do not depend on the model: they
are computed once, at the start of the run, and recorded (kind "validation_baselines"); a resumed
run reuses that record when its validation set is the same (same split, image size and names).

Why it leaves training alone (exact resume): only rank 0 validates, between steps, under
torch.no_grad, with the nets in eval mode and put back into the mode they were in; it reads its own
images (never the training data stream), draws no random numbers, and calls the nets' decompose
directly (not through the DeepSpeed engine, so no engine hook, counter or step timer sees it).
The other ranks wait for rank 0 at the next step's gradient all-reduce. Under DeepSpeed's bf16/fp16
weights (engine.mixed_precision "deepspeed") the nets run in that dtype (renderer and metrics in
float32/float64 as always), so the numbers can differ slightly from `unsup3d evaluate` on the
float32 weights of model.pt; with float32 weights they are the same.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import check_eval_settings
from trainer.results.evaluate import (METRICS, average_training_depth, baseline_predictions, depth_metrics, fixed_subset,
                              metric_block)
from trainer.results.learning_curve import (BASELINES, BASELINES_KIND, VALIDATION_KIND, curve_from_records,
                                    plot_learning_curve, read_records)
from trainer.model.unsup3d import Unsup3D
from trainer.render.geometry import intrinsics
from trainer.data.synface import SynfaceError, SynfaceFolder

log = logging.getLogger(__name__)

CURVE_FILE = "learning_curve.png"
DEFAULT_SPLITS = ("val", "test")


@dataclass
class ValidationSet:
    """The fixed images of validation, on the CPU: images [N, 3, S, S] in [-1, 1], depth [N, S, S]."""

    root: Path
    split: str
    names: list[str]
    images: torch.Tensor
    depth: torch.Tensor
    available: int  # readable pairs in the split
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def digest(self) -> str:
        """Identifies the set (split, image size and names) in the records, to match them on resume."""
        text = f"{self.split}\n{self.images.shape[-1]}\n" + "\n".join(self.names)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _split_folder(root: Path, split: str, image_size: int) -> SynfaceFolder | None:
    if not ((root / split / "image").is_dir() and (root / split / "depth").is_dir()):
        return None
    try:
        folder = SynfaceFolder(str(root), split, image_size=image_size, on_error="skip")
    except SynfaceError:
        return None
    return folder if len(folder) else None


def load_validation_set(root: str | Path, split: str | None, count: int, image_size: int) -> ValidationSet | str:
    """The validation set, or why there is none (a sentence). split None: "val", else "test".
    Unreadable or unpaired files are skipped (and logged) as `unsup3d evaluate` does by default."""
    root = Path(root)
    candidates = (split,) if split else DEFAULT_SPLITS
    for name in candidates:
        folder = _split_folder(root, name, image_size)
        if folder is None:
            continue
        available = len(folder)
        folder.select(fixed_subset(available, count))
        items = [folder[i] for i in range(len(folder))]
        return ValidationSet(root, name, [it["name"] for it in items], torch.stack([it["image"] for it in items]),
                             torch.stack([it["depth"] for it in items]), available, dict(folder.skipped))
    wanted = " or ".join(f"'{c}'" for c in candidates)
    return (f"{root} has no split {wanted} with image/depth pairs "
            "(<split>/image/<name>_image.png with <split>/depth/<name>_depth.png)")


@torch.no_grad()
def score_model(model: Unsup3D, vset: ValidationSet, batch_size: int) -> dict:
    """{metric: {"mean", "std", "n"}} of the model on the set; the model's mode is restored afterwards."""
    parameter = next(model.parameters())
    size = vset.images.shape[-1]
    K = intrinsics(size, dtype=torch.float64)
    collected: dict[str, list] = {m: [] for m in METRICS}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(vset), batch_size):
            image = vset.images[start:start + batch_size].to(device=parameter.device, dtype=parameter.dtype)
            gt = vset.depth[start:start + batch_size].to(parameter.device, torch.float64)
            out = model.decompose(image)  # untimed: validation is not training time
            b = image.shape[0]
            depth = out.view_depth[:b]
            values, _ = depth_metrics(depth.double(), model.renderer.recon_mask(depth), gt, K)
            for metric, v in values.items():
                collected[metric].append(v)
    finally:
        model.train(was_training)
    return metric_block(collected)


def score_baselines(vset: ValidationSet, average_depth: torch.Tensor | None, batch_size: int = 256) -> dict:
    """{method: metric block} of the two baselines on the set (on the CPU; average depth None: absent)."""
    size = vset.images.shape[-1]
    K = intrinsics(size, dtype=torch.float64)
    collected = {m: {metric: [] for metric in METRICS} for m in BASELINES}
    for start in range(0, len(vset), batch_size):
        gt = vset.depth[start:start + batch_size].double()
        for method, (depth, recon_mask) in baseline_predictions(gt, average_depth).items():
            values, _ = depth_metrics(depth, recon_mask, gt, K)
            for metric, v in values.items():
                collected[method][metric].append(v)
    return {m: metric_block(collected[m]) for m in BASELINES if collected[m]["side_x1e-2"]}


def _short(block: dict) -> str:
    return (f"SIDE {block['side_x1e-2']['mean']:.4f} x1e-2, MAD {block['mad_deg_exact']['mean']:.2f} deg exact / "
            f"{block['mad_deg_reference']['mean']:.2f} reference")


class Validator:
    """The training loop's validation (see the module doc). Active on rank 0 only; elsewhere every
    call is a no-op. `record` appends a record to metrics.jsonl; `monitor` is the TrainMonitor."""

    def __init__(self, config, out_dir: Path, is_main: bool, trains_from_root: bool,
                 record: Callable[[dict], None], monitor):
        cfg = config.train
        try:  # also when set in code rather than read from YAML
            check_eval_settings(cfg.eval_every, cfg.eval_images)
        except ValueError as error:
            raise ValueError(f"train.{error}") from None
        self.config = config
        self.every = cfg.eval_every or 0
        self.out_dir = Path(out_dir)
        self.active = bool(self.every) and is_main
        self.trains_from_root = trains_from_root
        self.record = record
        self.monitor = monitor
        self.set: ValidationSet | None = None
        self.baselines: dict | None = None
        self._plotted_step: int | None = None
        self._last_step: int | None = None
        self._plot_failed = False

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def curve_path(self) -> Path:
        return self.out_dir / CURVE_FILE

    def start(self, model: Unsup3D, step: int) -> None:
        """At the start of a run (resumed or not): load the set, the baselines (reused from metrics.jsonl
        when recorded for the same set), and score the untrained model when the run starts at step 0."""
        if not self.active:
            return
        cfg = self.config.train
        root = cfg.eval_data or (self.config.data.root if self.trains_from_root else None)
        if root is None:
            log.warning("validation is off (train.eval_every %d): this run streams its data instead of reading "
                        "data.root; set train.eval_data to a folder with ground-truth depth (synface layout) "
                        "to validate on it", self.every)
            return
        started = time.perf_counter()
        found = load_validation_set(root, cfg.eval_split, cfg.eval_images, self.config.model.image_size)
        if isinstance(found, str):
            log.warning("validation is off (train.eval_every %d): %s", self.every, found)
            return
        self.set = found
        previous = [r for r in read_records(self.metrics_path) if r.get("set") == found.digest]
        baselines = next((r for r in reversed(previous) if r.get("kind") == BASELINES_KIND), None)
        if baselines is None:
            average = average_training_depth(found.root, self.config.model.image_size, "skip")
            baselines = {"kind": BASELINES_KIND, "step": step, "set": found.digest, "data": str(found.root),
                         "split": found.split, "images": len(found), "available": found.available,
                         **score_baselines(found, average)}
            if average is None:
                baselines["average_train_depth"] = f"not computed: {found.root / 'train'} holds no image/depth pairs"
            baselines["seconds"] = time.perf_counter() - started
            self.record(baselines)
            reused = ""
        else:
            reused = f" (recorded at step {baselines['step']})"
        self.baselines = baselines
        self.monitor.validation_baselines(baselines, len(found))
        log.info("validation every %d steps on %d of %d image/depth pairs of %s (split %s); baselines%s: "
                 "constant depth %s; average train depth %s", self.every, len(found), found.available, found.root,
                 found.split, reused, _short(baselines["constant_depth"]),
                 _short(baselines["average_train_depth"]) if isinstance(baselines.get("average_train_depth"), dict)
                 else baselines.get("average_train_depth"))
        last = next((r for r in reversed(previous) if r.get("kind") == VALIDATION_KIND and r.get("step", 0) <= step), None)
        if last is not None:  # the gauges show the last point until the next one
            self.monitor.validated(int(last["step"]), last["model"], float(last.get("seconds", 0.0)))
        if step == 0:
            self.validate(model, 0)

    def due(self, step: int, total_steps: int) -> bool:
        return self.set is not None and (step % self.every == 0 or step == total_steps)

    def validate(self, model: Unsup3D, step: int) -> float:
        """Score the model now (step `step`), record the point and redraw the curve; returns the
        seconds it took. A failure is logged and training goes on."""
        started = time.perf_counter()
        try:
            block = score_model(model, self.set, self.config.data.batch_size)
        except Exception as error:  # noqa: BLE001 - a measurement must not end a long run
            log.warning("validation at step %d failed, training goes on: %s", step, error)
            return time.perf_counter() - started
        seconds = time.perf_counter() - started
        self.record({"kind": VALIDATION_KIND, "step": step, "set": self.set.digest, "split": self.set.split,
                     "images": len(self.set), "model": block, "seconds": seconds})
        self.monitor.validated(step, block, seconds)
        self._last_step = step
        base = self.baselines
        average = base.get("average_train_depth")
        log.info("validation step %d (%s, %d images, %.1f s): %s | constant depth SIDE %.4f MAD %.2f exact | "
                 "average train depth %s", step, self.set.split, len(self.set), seconds, _short(block),
                 base["constant_depth"]["side_x1e-2"]["mean"], base["constant_depth"]["mad_deg_exact"]["mean"],
                 f"SIDE {average['side_x1e-2']['mean']:.4f} MAD {average['mad_deg_exact']['mean']:.2f} exact"
                 if isinstance(average, dict) else "n/a")
        self.plot()
        return time.perf_counter() - started

    def plot(self) -> Path | None:
        """Redraw out_dir/learning_curve.png from metrics.jsonl (every point of this validation set)."""
        if self.set is None or self._plot_failed:
            return None
        records = [r for r in read_records(self.metrics_path) if r.get("set") == self.set.digest]
        curve = curve_from_records(records, title=f"{self.out_dir.name}: {self.set.split} split, {len(self.set)} images")
        try:
            path = plot_learning_curve(curve, self.curve_path)
        except ImportError as error:
            log.warning("no learning curve: %s (pip install matplotlib)", error)
            self._plot_failed = True
            return None
        except Exception as error:  # noqa: BLE001 - a picture must not end a long run
            log.warning("drawing the learning curve failed: %s", error)
            return None
        self._plotted_step = self._last_step
        return path

    def close(self) -> None:
        """At the end of the run: make sure the curve shows every point (e.g. a resumed run that had none)."""
        if self.set is not None and (self._plotted_step is None or self._plotted_step != self._last_step):
            self.plot()


__all__ = ["CURVE_FILE", "ValidationSet", "Validator", "load_validation_set", "score_baselines",
           "score_model"]
