"""Depth evaluation of SPEC 6: the scale-invariant depth error (SIDE) and the mean angle deviation of
normals (MAD), their mask, per-image summaries and the two trivial baselines.

Every metric is per image ([B] tensors) and computed in float64: these are numbers to compare
across runs and papers, and the cost is negligible. Depth maps are [B, H, W] (a [B, 1, H, W] map is
accepted too) in the input view, i.e. the rendered ("recon") depth, not the canonical one.

Two conventions of the reference are kept on purpose and one is exposed as an option:
- the masks are eroded by 1 px with out-of-image pixels counting as background, so the image border
  is never evaluated;
- MAD with eps=1e-7 normalizes normals as n / (|n| + eps). At 64 px |n| is about 3e-5, which
  shortens every normal: two identical depth maps then score several degrees instead of 0, how many
  depending on the shape (|n| grows with depth and tilt): 6.52 deg for a fronto-parallel plane at
  depth 1 (acos(r^2), r = |n| / (|n| + eps), |n| = 4/f^2), 5.62 deg for a face-like dome at 64 px,
  near the "about 5.5" of SPEC 6 (tests/test_metrics.py pins both). The paper's numbers include
  this bias, so report MAD with eps=1e-7 to compare with the paper and with eps=None (exact) beside
  it, saying which is which.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from trainer.render.geometry import depth_to_normals, intrinsics

REFERENCE_NORMAL_EPS = 1e-7


def _as_maps(*maps: torch.Tensor) -> list[torch.Tensor]:
    """[B, H, W] float64 views of [B, H, W] or [B, 1, H, W] maps (bool masks become 0/1)."""
    out = []
    for m in maps:
        if m.dim() == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if m.dim() != 3:
            raise ValueError(f"expected a map [B, H, W] or [B, 1, H, W], got {tuple(m.shape)}")
        out.append(m.to(torch.float64))
    shapes = {tuple(m.shape) for m in out}
    if len(shapes) != 1:
        raise ValueError(f"maps differ in shape: {sorted(shapes)}")
    return out


def erode(mask: torch.Tensor) -> torch.Tensor:
    """1-px erosion of a 0/1 mask [B, H, W]: a pixel stays only if its whole 3x3 neighbourhood is inside.

    Out-of-image neighbours count as outside (zero padding), as in the reference's
    avg_pool2d(mask, 3, stride=1, padding=1) > 0.99, so border pixels are always removed.
    """
    (mask,) = _as_maps(mask)
    outside = 1.0 - F.pad(mask.unsqueeze(1), (1, 1, 1, 1), value=0.0)
    return 1.0 - F.max_pool2d(outside, kernel_size=3, stride=1).squeeze(1)


def evaluation_mask(pred_recon_mask: torch.Tensor | None, gt_depth: torch.Tensor) -> torch.Tensor:
    """m = erode(d_gt < max(d_gt)) * erode(pred_recon_mask), [B, H, W] float64 of 0/1.

    max(d_gt) is per image. (The reference took the max over the whole batch; the two agree whenever
    every image has a background pixel, which in the synface encoding is byte 0 = 1.1, the largest
    encodable depth.) pred_recon_mask None means the prediction covers the image (the baselines).
    """
    (gt,) = _as_maps(gt_depth)
    gt_max = gt.flatten(1).amax(dim=1).view(-1, 1, 1)
    mask = erode((gt < gt_max).to(torch.float64))
    if pred_recon_mask is not None:
        (pred_mask,) = _as_maps(pred_recon_mask)
        mask = mask * erode((pred_mask > 0.5).to(torch.float64))
    return mask


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).flatten(1).sum(dim=1)


def side_error(pred_depth: torch.Tensor, gt_depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SIDE per image [B]: sqrt(sum m (D - mean_m D)^2 / sum m), D = log d_pred - log d_gt.

    Invariant to a global scale of d_pred (it shifts D by a constant). Reported x1e-2 elsewhere.
    An image with an empty mask gives NaN (no pixel to evaluate), as in the reference.
    """
    pred, gt, mask = _as_maps(pred_depth, gt_depth, mask)
    diff = pred.log() - gt.log()
    count = mask.flatten(1).sum(dim=1)
    mean = (_masked_sum(diff, mask) / count).view(-1, 1, 1)
    return (_masked_sum((diff - mean) ** 2, mask) / count).sqrt()


def normal_angles(pred_depth, gt_depth, K=None, eps: float | None = None) -> torch.Tensor:
    """Angle in degrees [B, H, W] between the normals (geometry.depth_to_normals) of two depth maps.

    eps=None: exact unit normals and the angle 2 atan2(|n1 - n2|, |n1 + n2|) (Kahan's formula for
    unit vectors), which is exactly 0 for identical normals and accurate for small angles (acos of a
    dot product near 1 is not, and a cross product can leave FMA rounding residue).
    eps=1e-7: the reference's way, n / (|n| + eps) and acos(clamp(n1 . n2, -1, 1)); the shortened
    normals make the dot product < 1 even for identical maps.
    """
    pred, gt = _as_maps(pred_depth, gt_depth)
    if K is None:
        K = intrinsics(pred.shape[-1], pred.shape[-2], dtype=torch.float64)
    K = K.to(torch.float64)
    n1 = depth_to_normals(pred, K, eps=eps)
    n2 = depth_to_normals(gt, K, eps=eps)
    if eps is None:
        radians = 2 * torch.atan2((n1 - n2).norm(dim=-1), (n1 + n2).norm(dim=-1))
    else:
        radians = (n1 * n2).sum(-1).clamp(-1.0, 1.0).acos()
    return radians * (180.0 / math.pi)


def mad_error(pred_depth, gt_depth, mask, K=None, eps: float | None = None) -> torch.Tensor:
    """MAD per image [B]: masked mean angle (degrees) between the normals of d_pred and d_gt.

    K: the camera matrix (geometry.intrinsics of the image size when None). eps: None for exact
    normalization, REFERENCE_NORMAL_EPS (1e-7) for the paper's way (module docstring).
    """
    angles = normal_angles(pred_depth, gt_depth, K, eps=eps)
    (mask,) = _as_maps(mask)
    return _masked_sum(angles, mask) / mask.flatten(1).sum(dim=1)


def summarize(values: torch.Tensor | Iterable[float], ddof: int = 1) -> dict:
    """{"mean", "std", "n"} over per-image values.

    std uses ddof=1 (Bessel's correction) by default because the reference's summary was
    torch.Tensor.std, which is unbiased (not numpy's ddof=0). With fewer than ddof + 1 values std
    is NaN. NaN values (images with an empty mask) are dropped and not counted in n.
    """
    v = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64).flatten()
    v = v[~v.isnan()]
    n = v.numel()
    mean = v.mean().item() if n else float("nan")
    if n > ddof:
        std = ((v - v.mean()) ** 2).sum().div(n - ddof).sqrt().item()
    else:
        std = float("nan")
    return {"mean": mean, "std": std, "n": n}


def constant_depth_baseline(like: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """The "constant null depth" prediction: a map of `value` shaped like `like` ([B, H, W]).

    The value does not matter: SIDE is scale invariant and a constant map is a fronto-parallel plane
    whose normals are all (0, 0, 1) whatever its depth, so both metrics are the same for any c > 0.
    1.0 is the middle of the canonical depth range. Evaluate it with pred_recon_mask None.
    """
    (like,) = _as_maps(like)
    return torch.full_like(like, float(value))


def average_depth_baseline(depths: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """The pixelwise mean [H, W] of ground-truth depth maps (the training split's, for this baseline).

    depths: a tensor [N, H, W] or an iterable of batches [B, H, W] (e.g. from
    SynfaceFolder.batches), so a large split streams through in float64. Background pixels are
    averaged in like any other (their depth is the far value), i.e. the plain pixelwise mean.
    Expand it to [B, H, W] and evaluate it with pred_recon_mask None.
    """
    if isinstance(depths, torch.Tensor):
        depths = [depths]
    total, count = None, 0
    for batch in depths:
        (batch,) = _as_maps(batch)
        total = batch.sum(0) if total is None else total + batch.sum(0)
        count += batch.shape[0]
    if count == 0:
        raise ValueError("average_depth_baseline: no depth maps given")
    return total / count
