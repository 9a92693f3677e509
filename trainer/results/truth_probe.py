"""What a checkpoint has learned, against the face generator's truth (<split>/truth.npz).

SIDE and MAD say how close the depth in the input view is; they do not say whether the model reads
each photo's own pose, light and shape or draws one template. This probe correlates, over the images
of a split:
- the predicted yaw, pitch and roll (view net, degrees) with the generator's pose;
- the predicted light direction x and y (light net, raw) with the generator's;
- each image's canonical depth departure from the mean canonical depth with the truth's
  (`depth_departure`): per image, both maps lose their own mean over a common face region, then
  the split's mean map; the correlation of what is left is averaged over images. 0 means one
  template for every face; 1 means every face's own shape, up to scale.
- the same over the face's interior only (`depth_departure_interior`: the region eroded by
  INTERIOR_ERODE pixels). On the generated faces about 95% of the truth's departure variance lies in
  the outer ring of the region, where heads of different sizes curve away (the outline); the
  interior correlation says whether the model reads the face's own relief (nose, brows, cheeks).
  It is a diagnostic beside depth_departure, not a replacement for it.

Correlations are Pearson's r; a value near 0 is "not learned" (a constant prediction counts as 0), a
negative one a flipped convention.
The model's canonical frame is its own: the depth departure compares maps pixel by pixel, so it is
meaningful only where the learned canonical view is roughly frontal and centred, as the flip
symmetry makes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.results.evaluate import load_model
from trainer.data.face_generator import read_truth
from trainer.data.synface import FAR_DEPTH, SynfaceFolder

# The face region of the depth departure: pixels that are on the face in at least this share of
# the truth's canonical maps.
COMMON_REGION_SHARE = 0.95
# Pixels removed from the face region's edge for the interior correlation (64 px faces: the outline
# ring where the truth's departures are dominated by head size).
INTERIOR_ERODE = 6


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    # A constant prediction carries no information about the truth: 0, not undefined.
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _erode(region: np.ndarray, pixels: int) -> np.ndarray:
    """region shrunk by `pixels` (4-neighbourhood), nothing kept at the image border."""
    for _ in range(pixels):
        r = np.zeros_like(region)
        r[1:-1, 1:-1] = region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
        region = r
    return region


def _departures(pred: np.ndarray, truth: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps inside region, less each image's own mean, then less the split's mean map."""
    p = pred[:, region].astype(np.float64)
    t = truth[:, region].astype(np.float64)
    p -= p.mean(1, keepdims=True)
    t -= t.mean(1, keepdims=True)
    p -= p.mean(0, keepdims=True)
    t -= t.mean(0, keepdims=True)
    return p, t


def _mean_per_image(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.nanmean([pearson(p[i], t[i]) for i in range(p.shape[0])]))


def depth_departure_correlation(pred: np.ndarray, truth: np.ndarray, truth_fore: np.ndarray) -> dict:
    """pred, truth [N, H, W] canonical depths; truth_fore [N, H, W] bool. See the module docstring."""
    # Erode by one pixel: silhouettes vary between people and must not count as shape.
    region = _erode(truth_fore.mean(0) >= COMMON_REGION_SHARE, 1)
    if region.sum() < 10:
        return {"depth_departure": float("nan"), "region_pixels": int(region.sum())}
    p, t = _departures(pred, truth, region)
    result = {"depth_departure": _mean_per_image(p, t), "depth_departure_pooled": pearson(p, t),
              "region_pixels": int(region.sum())}
    interior = _erode(region, INTERIOR_ERODE)
    if interior.sum() >= 10:
        pi, ti = _departures(pred, truth, interior)
        result["depth_departure_interior"] = _mean_per_image(pi, ti)
    return result


def probe(checkpoint: str, data: str, split: str = "test", device: str = "cpu", batch_size: int = 64) -> dict:
    """Correlations of a checkpoint's predictions with <data>/<split>/truth.npz (see the module docstring)."""
    model, model_config, step = load_model(checkpoint, torch.device(device))
    return {"step": step, **probe_model(model, model_config, data, split, device, batch_size)}


@torch.no_grad()
def probe_model(model, model_config, data: str, split: str = "test", device: str = "cpu", batch_size: int = 64) -> dict:
    """probe() of a model in memory (e.g. an untrained one, for the step-0 line)."""
    truth = read_truth(data, split)
    if truth is None:
        raise FileNotFoundError(f"{Path(data) / split / 'truth.npz'}: no generator truth (made by unsup3d generate "
                                f"--kind faces)")
    model.eval()
    index = {str(n): i for i, n in enumerate(truth["names"])}
    folder = SynfaceFolder(data, split, image_size=model_config.image_size, on_error="raise")
    rows, views, lights, depths = [], [], [], []
    for batch in folder.batches(batch_size):
        # Images the generator did not write (added to the folder later) have no truth: left out.
        keep = [i for i, name in enumerate(batch["name"]) if name in index]
        if not keep:
            continue
        out = model.decompose(batch["image"][keep].to(device))
        rows.extend(index[batch["name"][i]] for i in keep)
        views.append(out.view.cpu().numpy())
        lights.append(out.light.cpu().numpy())
        depths.append(out.canon_depth[:len(keep)].cpu().numpy())
    if not rows:
        raise ValueError(f"{Path(data) / split}: none of its images is named in truth.npz")
    rows = np.asarray(rows)
    view, light, depth = np.concatenate(views), np.concatenate(lights), np.concatenate(depths)
    angle = model_config.max_rotation_degrees
    pose = truth["pose_degrees"][rows]  # yaw, pitch, roll
    canon = truth["canonical_depth"][rows].astype(np.float32)
    result = {
        "images": int(len(rows)),
        "yaw": pearson(view[:, 1] * angle, pose[:, 0]),
        "pitch": pearson(view[:, 0] * angle, pose[:, 1]),
        "roll": pearson(view[:, 2] * angle, pose[:, 2]),
        "light_x": pearson(light[:, 2], truth["light"][rows, 2]),
        "light_y": pearson(light[:, 3], truth["light"][rows, 3]),
        "yaw_spread_ratio": float(np.std(view[:, 1] * angle) / max(np.std(pose[:, 0]), 1e-9)),
    }
    result.update(depth_departure_correlation(depth, canon, canon < FAR_DEPTH))
    return result
