"""The loss terms of SPEC 4 on small examples whose values are computed by hand in the comments."""

import math

import pytest
import torch

from trainer.model.losses import perceptual_loss, photometric_loss, pool_mask, smoothness_loss

SQRT2 = math.sqrt(2)
LOG2 = math.log(2)


def img(rows):
    """[1, 1, H, W] from a nested list."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# ---------------------------------------------------------------------------------------------
# photometric


def test_photometric_plain_l1():
    # |0.5 - 0| = 0.5, |-0.5 - 0.5| = 1.0  ->  mean 0.75
    assert photometric_loss(img([[0.5, -0.5]]), img([[0.0, 0.5]])).item() == pytest.approx(0.75)


def test_photometric_with_sigma():
    # sigma 1: sqrt2 * 0.5 / 1 + log 1 = 0.707107
    # sigma 2: sqrt2 * 1.0 / 2 + log 2 = 0.707107 + 0.693147 = 1.400254
    # mean = 1.053680
    loss = photometric_loss(img([[0.5, -0.5]]), img([[0.0, 0.5]]), sigma=img([[1.0, 2.0]]))
    assert loss.item() == pytest.approx((SQRT2 * 0.5 + SQRT2 / 2 + LOG2) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(1.053680, abs=1e-6)


def test_photometric_with_sigma_and_mask():
    # mask keeps only pixel 0: 0.707107
    loss = photometric_loss(img([[0.5, -0.5]]), img([[0.0, 0.5]]), sigma=img([[1.0, 2.0]]), mask=img([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(SQRT2 * 0.5, rel=1e-6)


def test_photometric_mask_denominator_counts_channels():
    # 3 channels; pixel 0 errors 0.1, 0.2, 0.3; pixel 1 errors 1, 1, 1 (masked out).
    # Reference: sum(l m) / sum(m expanded over channels) = 0.6 / 3 = 0.2, the channel mean at pixel 0
    # (not 0.6, which a denominator without channels would give).
    recon = torch.tensor([[0.1, 1.0], [0.2, 1.0], [0.3, 1.0]])[None, :, None, :]
    target = torch.zeros_like(recon)
    mask_4d = torch.tensor([[[[1.0, 0.0]]]])
    assert photometric_loss(recon, target, mask=mask_4d).item() == pytest.approx(0.2, rel=1e-6)
    # [B, H, W] and boolean masks mean the same
    assert photometric_loss(recon, target, mask=mask_4d[:, 0].bool()).item() == pytest.approx(0.2, rel=1e-6)


def test_photometric_mask_pools_the_batch():
    # image 0: 1 masked pixel with error 1; image 1: 3 masked pixels with error 0.
    # pooled over the batch: 1 / 4 = 0.25 (a per-image mean would give 0.5)
    recon = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])[:, None, None, :]
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])[:, None, None, :]
    assert photometric_loss(recon, torch.zeros_like(recon), mask=mask).item() == pytest.approx(0.25)


def test_photometric_sigma_gradient_vanishes_at_the_laplace_optimum():
    # d/dsigma [sqrt2 e / sigma + log sigma] = 0 at sigma = sqrt2 e: e = 0.5 -> sigma 0.707107
    sigma = img([[SQRT2 * 0.5]]).requires_grad_()
    photometric_loss(img([[0.5]]), img([[0.0]]), sigma=sigma).backward()
    assert abs(sigma.grad.item()) < 1e-5


def test_photometric_is_float32_whatever_the_input():
    a = torch.zeros(1, 3, 2, 2, dtype=torch.bfloat16)
    assert photometric_loss(a, a + 1).dtype == torch.float32
    assert photometric_loss(a.double(), a.double() + 1).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# perceptual

# f_hat - f = [[1, 2], [0, 3]], squared [[1, 4], [0, 9]]
DIFF = torch.tensor([[1.0, 2.0], [0.0, 3.0]])[None, None]


def test_perceptual_plain_mse():
    # (1 + 4 + 0 + 9) / 4 = 3.5
    assert perceptual_loss(DIFF, torch.zeros_like(DIFF)).item() == pytest.approx(3.5)


def test_perceptual_with_sigma():
    # sigma [[1, 2], [0.5, 1]]:
    #   1 / (2*1)    + log 1   = 0.5
    #   4 / (2*4)    + log 2   = 0.5 + 0.693147
    #   0 / (2*0.25) + log 0.5 = -0.693147
    #   9 / (2*1)    + log 1   = 4.5
    # sum 5.5 (the logs cancel), mean 1.375
    sigma = torch.tensor([[1.0, 2.0], [0.5, 1.0]])[None, None]
    assert perceptual_loss(DIFF, torch.zeros_like(DIFF), sigma=sigma).item() == pytest.approx(1.375, rel=1e-6)


def soft_mask_8px():
    """[1, 1, 8, 8]; its 4x4 quadrants hold 16, 8, 0 and 4 ones -> pooled [[1, 0.5], [0, 0.25]]."""
    m = torch.zeros(8, 8)
    m[:4, :4] = 1  # top-left: all 16
    m[:4, 4:6] = 1  # top-right: 8 of 16
    m[4:6, 4:6] = 1  # bottom-right: 4 of 16
    return m[None, None]


def test_pool_mask_is_a_soft_weight():
    pooled = pool_mask(soft_mask_8px(), (2, 2))
    assert torch.equal(pooled, torch.tensor([[1.0, 0.5], [0.0, 0.25]])[None, None])


def test_perceptual_with_soft_mask():
    # sum(l m) = 1*1 + 4*0.5 + 0*0 + 9*0.25 = 5.25, sum(m) = 1.75 -> 3.0
    loss = perceptual_loss(DIFF, torch.zeros_like(DIFF), mask=soft_mask_8px())
    assert loss.item() == pytest.approx(3.0, rel=1e-6)
    # A second channel with zero error: the denominator counts channels -> 5.25 / 3.5 = 1.5
    two = torch.cat([DIFF, torch.zeros_like(DIFF)], dim=1)
    assert perceptual_loss(two, torch.zeros_like(two), mask=soft_mask_8px()[:, 0]).item() == pytest.approx(1.5, rel=1e-6)


def test_perceptual_with_sigma_and_mask():
    # l = [[0.5, 1.193147], [-0.693147, 4.5]] (above), m = [[1, 0.5], [0, 0.25]]
    # sum(l m) = 0.5 + 0.596574 + 0 + 1.125 = 2.221574, / 1.75 = 1.269471
    sigma = torch.tensor([[1.0, 2.0], [0.5, 1.0]])[None, None]
    loss = perceptual_loss(DIFF, torch.zeros_like(DIFF), sigma=sigma, mask=soft_mask_8px())
    assert loss.item() == pytest.approx((0.5 + 0.5 * (0.5 + LOG2) + 0.25 * 4.5) / 1.75, rel=1e-6)
    assert loss.item() == pytest.approx(1.269471, abs=1e-6)


def test_perceptual_64px_mask_pools_4x4_to_16px():
    feats = torch.randn(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :32] = 1  # top half -> top 8 rows of the 16x16 grid
    loss = perceptual_loss(feats, torch.zeros_like(feats), mask=mask)
    assert loss.item() == pytest.approx((feats[:, :, :8] ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# smoothness


def test_smoothness_hand_example():
    # d = [[0, 1, 3], [2, 2, 2]]
    # vertical steps |2-0|, |2-1|, |2-3| = 2, 1, 1   -> mean 4/3
    # horizontal steps 1, 2 (row 0) and 0, 0 (row 1) -> mean 3/4
    # (4/3 + 3/4) / (1.1 - 0.9) = 2.083333 / 0.2 = 10.416667
    d = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])[None]
    assert smoothness_loss(d, 0.9, 1.1).item() == pytest.approx(10.416667, rel=1e-5)
    assert smoothness_loss(d[:, None], 0.9, 1.1).item() == pytest.approx(10.416667, rel=1e-5)


def test_smoothness_of_a_constant_depth_is_zero():
    assert smoothness_loss(torch.full((2, 8, 8), 1.04), 0.9, 1.1).item() == 0.0
