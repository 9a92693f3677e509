"""The composed model: output mappings, both branches, float32 rendering under autocast, all sizes train."""

from __future__ import annotations

import pytest
import torch

from trainer.model.config import LossConfig, ModelConfig
from trainer.model.unsup3d import Unsup3D, Unsup3DLoss, map_range
from trainer.model.perceptual import PerceptualConfig, build_perceptual_net
from trainer.render.geometry import depth_to_points, intrinsics


def small_model_config(size: int = 64, **overrides) -> ModelConfig:
    return ModelConfig(image_size=size, depth_nf=8, depth_zdim=16, albedo_nf=8, albedo_zdim=16,
                       light_nf=8, view_nf=8, conf_nf=8, conf_zdim=16, **overrides)


def test_map_range():
    x = torch.tensor([-1.0, 0.0, 1.0])
    assert torch.allclose(map_range(x, 0.9, 1.1), torch.tensor([0.9, 1.0, 1.1]))


def test_decomposition_shapes_ranges_and_branches():
    torch.manual_seed(0)
    model = Unsup3D(small_model_config())
    image = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = model.decompose(image)
    b = 3
    assert out.canon_depth.shape == (2 * b, 64, 64) and out.canon_albedo.shape == (2 * b, 3, 64, 64)
    assert out.recon_image.shape == (2 * b, 3, 64, 64) and out.recon_mask.shape == (2 * b, 1, 64, 64)
    assert out.sigma_photometric.shape == (2 * b, 1, 64, 64) and out.sigma_perceptual.shape == (2 * b, 1, 16, 16)
    # canonical depth within [min, max]; the 2 outer columns overwritten with the border depth
    assert out.canon_depth.min() >= 0.9 and out.canon_depth.max() <= 1.1
    assert torch.allclose(out.canon_depth[:, :, :2], torch.tensor(1.04))
    assert torch.allclose(out.canon_depth[:, :, -2:], torch.tensor(1.04))
    # the flipped branch holds the mirrored canonical maps, and the mask is shared and detached
    assert torch.equal(out.canon_depth[b:], out.canon_depth[:b].flip(-1))
    assert torch.equal(out.canon_albedo[b:], out.canon_albedo[:b].flip(-1))
    assert torch.equal(out.recon_mask[:b], out.recon_mask[b:]) 
    # mean-centred raw depth: the canonical depth before the border overwrite averages near the middle
    assert out.canon_depth_raw.mean().item() == pytest.approx(1.0, abs=0.02)


def test_renderer_and_losses_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = Unsup3D(small_model_config())
    criterion = Unsup3DLoss(LossConfig(), build_perceptual_net(PerceptualConfig()), model.config)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decompose(image)
        terms = criterion(image, out)
    assert out.recon_image.requires_grad and not out.recon_mask.requires_grad  # the mask is detached
    for tensor in (out.canon_depth, out.view_depth, out.recon_image, out.canon_normal, terms["total"]):
        assert tensor.dtype == torch.float32
    terms["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_no_confidence_means_plain_l1_and_no_sigma():
    model = Unsup3D(small_model_config(use_confidence=False))
    assert model.confidence_net is None
    out = model.decompose(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.sigma_photometric is None and out.sigma_perceptual is None
    terms = Unsup3DLoss(LossConfig(lam_perc=0.0, lam_smooth=0.1), None, model.config)(torch.zeros(2, 3, 64, 64), out)
    assert set(terms) == {"photometric", "photometric_flip", "smooth", "total"}


@pytest.mark.parametrize("size", [64, 128, 256])
def test_every_size_trains_a_step(size):
    torch.manual_seed(0)
    config = small_model_config(size)
    model = Unsup3D(config)
    criterion = Unsup3DLoss(LossConfig(), build_perceptual_net(PerceptualConfig()), config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    image = torch.rand(2, 3, size, size) * 2 - 1
    before = [p.detach().clone() for p in model.parameters()]
    terms = criterion(image, model.decompose(image))
    terms["total"].backward()
    optimizer.step()
    assert torch.isfinite(terms["total"])
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)  # every net gets gradient


def test_depth_prior_starts_convex_symmetric_and_stays_out_of_checkpoints():
    torch.manual_seed(0)
    flat = Unsup3D(small_model_config(depth_init_scale=0.0))
    torch.manual_seed(0)
    prior = Unsup3D(small_model_config(depth_init_scale=0.0, depth_prior=0.5))
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        d_flat = flat.decompose(image).canon_depth_raw
        d_prior = prior.decompose(image).canon_depth_raw
    assert torch.allclose(d_flat, torch.ones_like(d_flat))  # zero last conv: flat at the mid depth
    centre, corner = d_prior[:, 32, 32], d_prior[:, 2, 2]
    assert (centre < corner - 0.03).all()  # nearer in the middle: a convex bump of about 0.05
    assert torch.allclose(d_prior, d_prior.flip(-1), atol=1e-6)  # symmetric: no side is favoured
    assert "depth_prior" not in prior.state_dict()
    flat.load_state_dict(prior.state_dict())  # same weights either way
    with pytest.raises(ValueError, match="depth_prior"):
        small_model_config(depth_prior=-1.0)


def test_view_init_scale_zero_starts_frontal_and_still_learns_the_pose():
    torch.manual_seed(0)
    model = Unsup3D(small_model_config(view_init_scale=0.0))
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model.decompose(image)
    assert torch.equal(out.view, torch.zeros_like(out.view))  # every pose starts at exactly zero
    loss = Unsup3DLoss(LossConfig(lam_perc=0.0), None, model.config)(image, out)["total"]
    loss.backward()
    head = model.view_net.network[-2].weight
    assert head.grad is not None and head.grad.abs().sum() > 0  # a zero head still gets gradient


def test_shading_normal_eps_dims_the_diffuse_term_by_the_reference_amount_and_keeps_gradients():
    """shading_normal_eps 1e-7 (the reference's n / (|n| + eps), SPEC 3.6): same directions, normals
    shorter by eps / (|n| + eps), about 0.3% at 64 px, and the diffuse shading by as much."""
    torch.manual_seed(0)
    exact = Unsup3D(small_model_config(use_confidence=False, depth_init_scale=0.01))
    reference = Unsup3D(small_model_config(use_confidence=False, depth_init_scale=0.01, shading_normal_eps=1e-7))
    reference.load_state_dict(exact.state_dict())
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out_exact = exact.decompose(image)
    out = reference.decompose(image)
    assert torch.equal(out.canon_depth, out_exact.canon_depth) and torch.equal(out.view_depth, out_exact.view_depth)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    length = out.canon_normal[inner].norm(dim=-1).detach()
    torch.testing.assert_close(out_exact.canon_normal[inner].norm(dim=-1), torch.ones_like(length))
    torch.testing.assert_close(out.canon_normal[inner].detach() / length[..., None], out_exact.canon_normal[inner])
    # Expected: L / (L + eps) with L = |t_u x t_v| (SPEC 3.6), from the same depth map.
    points = depth_to_points(out.canon_depth.detach(), intrinsics(64))
    raw = torch.cross(points[:, 1:-1, 2:] - points[:, 1:-1, :-2], points[:, 2:, 1:-1] - points[:, :-2, 1:-1], dim=-1)
    raw_length = raw.norm(dim=-1)
    torch.testing.assert_close(length, raw_length / (raw_length + 1e-7))
    # About 0.3% where the depth is nearly flat (depth_init_scale 0.01); less where it is steep, as
    # next to the border columns, since a slanted surface has a longer |t_u x t_v|.
    shortening = (1 - length)[:, :, 2:-2]
    assert 0.002 < shortening.mean() < 0.004 and shortening.min() > 0, shortening.mean()
    # S = k_a + k_d max(0, <n, l>): the diffuse part scales with the normal's length.
    k_a = ((out.light[:, 0] + 1) / 2).repeat(2).view(-1, 1, 1).detach()
    diffuse, diffuse_exact = out.canon_shading[:, 0].detach() - k_a, out_exact.canon_shading[:, 0] - k_a
    torch.testing.assert_close(diffuse[inner], diffuse_exact[inner] * length, rtol=1e-5, atol=1e-7)
    lit = diffuse_exact[inner][:, :, 2:-2] > 1e-3
    relative = 1 - diffuse[inner][:, :, 2:-2][lit] / diffuse_exact[inner][:, :, 2:-2][lit]
    assert 0.002 < relative.mean() < 0.004, relative.mean()
    # Gradients still reach the depth net through the shortened normals.
    Unsup3DLoss(LossConfig(lam_perc=0.0), None, reference.config)(image, out)["total"].backward()
    grads = [p.grad for p in reference.depth_net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_mirrored_pose_term_is_zero_for_a_mirror_consistent_pose_and_trains_the_view_and_light_nets():
    torch.manual_seed(0)
    model = Unsup3D(small_model_config())
    model.mirrored_pose = True
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model.decompose(image)
    assert out.view_mirrored.shape == (2, 6) and out.light_mirrored.shape == (2, 4)
    # A mirror-symmetric image: its mirror is itself, so yaw, roll, tx and light x must be 0 for a zero term.
    loss = Unsup3DLoss(LossConfig(lam_perc=0.0, lam_pose_flip=1.0), None, model.config)
    terms = loss(image, out)
    assert terms["pose_flip"] > 0
    terms["total"].backward()
    assert model.view_net.network[0].weight.grad.abs().sum() > 0
    assert model.light_net.network[0].weight.grad.abs().sum() > 0
    # The term compares the mirrored image's pose with the mirror of the original's.
    from trainer.model.unsup3d import MIRROR_LIGHT_SIGNS, MIRROR_VIEW_SIGNS, mirrored_pose_loss

    out.view_mirrored = out.view.detach() * torch.tensor(MIRROR_VIEW_SIGNS)
    out.light_mirrored = out.light.detach() * torch.tensor(MIRROR_LIGHT_SIGNS)
    assert mirrored_pose_loss(out) == 0
    # Off by default: no extra forward passes and no term.
    plain = Unsup3D(small_model_config())
    assert plain.decompose(image).view_mirrored is None


def test_depth_blur_removes_a_checkerboard_and_keeps_a_smooth_bump():
    from trainer.model.unsup3d import gaussian_blur

    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = ((rows // 2 + cols // 2) % 2).float()[None] * 2 - 1
    bump = torch.exp(-((rows - 32.0) ** 2 + (cols - 32.0) ** 2) / 200.0)[None]
    assert gaussian_blur(checker, 1.5)[:, 8:-8, 8:-8].abs().max() < 0.1
    assert (gaussian_blur(bump, 1.5) - bump).abs().max() < 0.02
    model = Unsup3D(small_model_config(depth_blur=1.5))
    out = model.decompose(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert out.canon_depth.shape == (2, 64, 64)
