"""The loss terms of SPEC 4: photometric, perceptual and depth smoothness.

Images are in [-1, 1]. Every function returns a scalar tensor computed in float32 (the inputs are
cast), so the losses do not depend on the nets' autocast dtype; the model combines the terms with
the weights of LossConfig.

Masked means follow the reference exactly: the mask is broadcast over channels and the loss is
sum(l * m) / sum(m * C) over all of the batch, i.e. the channel mean of l weighted by m. (The
reference expanded m to l's shape before both sums; that is the same number.) The batch is pooled,
not averaged per image: an image with a larger mask weighs more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-7


def _as_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A float32 mask [B, 1, H, W] from [B, 1, H, W] or [B, H, W] (bool or float)."""
    if mask is None:
        return None
    mask = mask.to(torch.float32)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != like.shape[0]:
        raise ValueError(f"mask must be [B, 1, H, W] or [B, H, W] for a loss map {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum(l * m) / sum(m) with m [B, 1, h, w] broadcast over l's C channels (counted in the denominator)."""
    if mask is None:
        return loss.mean()
    mask = mask.expand_as(loss)
    return (loss * mask).sum() / mask.sum()


def photometric_loss(recon, target, sigma=None, mask=None, eps: float = EPS) -> torch.Tensor:
    """L1 between images [B, C, H, W], or with sigma [B, 1, H, W] the Laplacian NLL without constant:

    l = sqrt(2) |recon - target| / (sigma + eps) + log(sigma + eps), per pixel and channel,
    then the masked mean (module docstring); mask [B, 1, H, W] or [B, H, W].
    """
    recon, target = recon.to(torch.float32), target.to(torch.float32)
    loss = (recon - target).abs()
    if sigma is not None:
        sigma = sigma.to(torch.float32) + eps
        loss = loss * math.sqrt(2) / sigma + sigma.log()
    return _masked_mean(loss, _as_mask(mask, loss))


def pool_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool an image-resolution mask [B, 1, H, W] to (h, w) = size as soft weights.

    The kernel is (H // h, W // w) like the reference (4x4 from 64 px to 16 px); sizes that do not
    divide evenly lose the last rows/columns, as average pooling with that kernel does.
    """
    h, w = size
    kh, kw = mask.shape[-2] // h, mask.shape[-1] // w
    if kh < 1 or kw < 1:
        raise ValueError(f"mask {tuple(mask.shape[-2:])} is smaller than the feature map {size}")
    return F.avg_pool2d(mask, kernel_size=(kh, kw), stride=(kh, kw))


def perceptual_loss(feat_recon, feat_target, sigma=None, mask=None, eps: float = EPS) -> torch.Tensor:
    """MSE between features [B, C, h, w], or with sigma [B, 1, h, w] the Gaussian NLL without constant:

    l = (f_hat - f)^2 / (2 sigma^2 + eps) + log(sigma + eps), then the masked mean with the
    image-resolution mask [B, 1, H, W] (or [B, H, W]) average-pooled to (h, w) as soft weights.
    """
    feat_recon, feat_target = feat_recon.to(torch.float32), feat_target.to(torch.float32)
    loss = (feat_recon - feat_target) ** 2
    if sigma is not None:
        sigma = sigma.to(torch.float32)
        loss = loss / (2 * sigma**2 + eps) + (sigma + eps).log()
    mask = _as_mask(mask, loss)
    if mask is not None:
        mask = pool_mask(mask, loss.shape[-2:])
    return _masked_mean(loss, mask)


def smoothness_loss(canon_depth, min_depth: float, max_depth: float) -> torch.Tensor:
    """mean |d(i+1, j) - d(i, j)| + mean |d(i, j+1) - d(i, j)|, each divided by (max - min).

    canon_depth [B, H, W] or [B, 1, H, W]: the canonical depth before the border overwrite (the
    border columns are constant and would add spurious steps). Dividing by the depth range makes
    the weight independent of it.
    """
    depth = canon_depth.to(torch.float32)
    scale = float(max_depth) - float(min_depth)
    dy = (depth[..., 1:, :] - depth[..., :-1, :]).abs().mean()
    dx = (depth[..., :, 1:] - depth[..., :, :-1]).abs().mean()
    return dy / scale + dx / scale
