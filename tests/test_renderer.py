"""Tests of trainer.render.renderer (SPEC 3): depth rendering, inverse warp, flip symmetry, shading,
masks, supersampling, precision under autocast, gradients and the sizes the project trains at."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.render import geometry
from trainer.render.rasterizer import grid_faces, rasterize_depth
from trainer.render.renderer import Renderer, RendererConfig, supersampled_intrinsics


def smooth_depth(batch: int, size: int, seed: int, amplitude: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[:, 0]
    return (1 + 0.1 * amplitude * smooth.clamp(-1, 1)).to(dtype)


def view(angles_degrees, t, dtype=torch.float32):
    angles = torch.tensor(angles_degrees, dtype=torch.float64).view(-1, 3) * math.pi / 180
    return geometry.euler_to_rotation(angles).to(dtype), torch.tensor(t, dtype=dtype).view(-1, 3)


def identity_view(batch: int):
    return torch.eye(3).expand(batch, 3, 3), torch.zeros(batch, 3)


def rays(size: int, dtype=torch.float64) -> torch.Tensor:
    """K^-1 [u, v, 1] for every pixel, [H, W, 3]."""
    return geometry.pixel_grid(size, size, dtype=dtype) @ torch.linalg.inv(geometry.intrinsics(size, dtype=dtype)).T


def plane_depth(size: int, normal, offset: float) -> torch.Tensor:
    """z of the plane n . P = offset along every pixel ray (float64)."""
    n = torch.tensor(normal, dtype=torch.float64)
    return offset / (rays(size) @ n)


# -- config ------------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = RendererConfig()
    assert (cfg.image_size, cfg.min_depth, cfg.max_depth, cfg.supersample) == (64, 0.9, 1.1, 1)
    assert cfg.far_depth == pytest.approx(1.2) and cfg.near_depth == pytest.approx(0.8)
    with pytest.raises(ValueError):
        RendererConfig(min_depth=1.1, max_depth=0.9)
    with pytest.raises(ValueError):
        RendererConfig(supersample=0)
    assert cfg.pixel_centre == "integer"
    with pytest.raises(ValueError, match="pixel_centre"):
        RendererConfig(pixel_centre="half")
    assert cfg.zbuffer == "auto"
    with pytest.raises(ValueError, match="zbuffer must be one of"):
        RendererConfig(zbuffer="c")
    with pytest.raises(ValueError, match="image_size"):
        Renderer(RendererConfig(image_size=16)).render_depth(torch.ones(1, 8, 8), *identity_view(1))


def test_supersampled_camera_pools_onto_the_1x_pixels():
    K = geometry.intrinsics(64, dtype=torch.float64)
    K2 = supersampled_intrinsics(K, 2)
    point = torch.tensor([0.031, -0.02, 1.0], dtype=torch.float64)
    u1 = geometry.project(point, K)
    u2 = geometry.project(point, K2)
    # The 2x2 block of sub-pixels (2i, 2i+1) is centred on 1x pixel i: u2 = 2 u1 + 0.5.
    torch.testing.assert_close(u2, 2 * u1 + 0.5)
    # The reference's 2x camera is its 1x projection scaled by 2; sampled at j + 0.5 (the
    # rasteriser's pixel_offset), sub-pixels 2i and 2i+1 sit at i + 1/4 and i + 3/4.
    K2_reference = supersampled_intrinsics(K, 2, "reference")
    torch.testing.assert_close(geometry.project(point, K2_reference), 2 * u1)
    torch.testing.assert_close(supersampled_intrinsics(K, 1, "reference"), K)


# -- render_depth and warp_canonical ----------------------------------------------------------------


def test_identity_view_reproduces_canonical_depth_and_image():
    size = 32
    renderer = Renderer(RendererConfig(image_size=size))
    depth = smooth_depth(2, size, seed=1)
    R, t = identity_view(2)
    rendered = renderer.render_depth(depth, R, t)
    assert rendered.shape == depth.shape and rendered.dtype == torch.float32
    # Border pixels sit exactly on the mesh boundary: covered or not depending on rounding.
    interior = (slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(rendered[interior], depth[interior], rtol=0, atol=1e-5)
    mask = renderer.recon_mask(rendered)
    assert mask[interior].all()

    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    warped = renderer.warp_canonical(image, rendered, R, t)
    assert warped.shape == image.shape
    covered = mask.bool()[:, None].expand_as(image)
    torch.testing.assert_close(warped[covered], image[covered], rtol=0, atol=1e-4)


def test_tilted_plane_matches_ray_plane_intersection():
    """A plane tilted in the canonical frame, seen from a rotated and shifted view."""
    size = 32
    renderer = Renderer(RendererConfig(image_size=size))
    normal, offset = [0.25, -0.15, 1.0], 1.0
    canon = plane_depth(size, normal, offset)
    assert canon.min() > 0.9 and canon.max() < 1.1
    R, t = view([12.0, -20.0, 7.0], [0.01, -0.015, 0.02], dtype=torch.float64)

    # In the view frame: n' = R n, and n' . P' = offset - n . c + n' . (c + t), c the rotation centre.
    n = torch.tensor(normal, dtype=torch.float64)
    c = torch.tensor(geometry.ROTATION_CENTRE, dtype=torch.float64)
    n_view = R[0] @ n
    offset_view = offset - n @ c + n_view @ (c + t[0])
    expected = offset_view / (rays(size) @ n_view)

    for dtype in (torch.float32, torch.float64):
        rendered = renderer.render_depth(canon[None].to(dtype), R.to(dtype), t.to(dtype))[0]
        assert rendered.dtype == dtype
        covered = renderer.recon_mask(rendered).bool()
        assert covered.float().mean() > 0.5
        error = (rendered[covered].double() - expected[covered]).abs().max().item()
        assert error < 1e-5, error


def test_supersampled_tilted_plane_matches_analytic_depth_away_from_the_silhouette():
    size = 24
    renderer = Renderer(RendererConfig(image_size=size, supersample=2))
    normal, offset = [-0.2, 0.3, 1.0], 1.0
    canon = plane_depth(size, normal, offset).float()[None]
    R, t = view([-8.0, 10.0, 3.0], [0.005, 0.0, 0.0])
    rendered = renderer.render_depth(canon, R, t)[0].double()
    n = torch.tensor(normal, dtype=torch.float64)
    c = torch.tensor(geometry.ROTATION_CENTRE, dtype=torch.float64)
    n_view = R[0].double() @ n
    expected = (offset - n @ c + n_view @ (c + t[0].double())) / (rays(size) @ n_view)
    covered = renderer.recon_mask(rendered).bool()
    assert covered.float().mean() > 0.5
    # The four sub-samples at +-1/4 px average to the pixel centre's depth up to curvature (~1e-8).
    assert (rendered[covered] - expected[covered]).abs().max() < 1e-5


@pytest.mark.parametrize("supersample", [1, 2])
def test_reference_pixel_centre_samples_the_half_pixel_shifted_ray(supersample):
    """pixel_centre "reference" (SPEC 3.4): pixel (r, c) reads the tilted plane's depth on the ray
    through (c + 0.5, r + 0.5), not (c, r); with supersample 2 the sub-pixels at +1/4 and +3/4
    average to it up to curvature (~1e-8). Only the rasteriser moves: the warp still reads (c, r)."""
    size = 24
    renderer = Renderer(RendererConfig(image_size=size, supersample=supersample, pixel_centre="reference"))
    integer = Renderer(RendererConfig(image_size=size, supersample=supersample))
    normal, offset = [0.25, -0.15, 1.0], 1.0
    canon = plane_depth(size, normal, offset)
    R, t = view([12.0, -20.0, 7.0], [0.01, -0.015, 0.02], dtype=torch.float64)
    n = torch.tensor(normal, dtype=torch.float64)
    c = torch.tensor(geometry.ROTATION_CENTRE, dtype=torch.float64)
    n_view = R[0] @ n
    offset_view = offset - n @ c + n_view @ (c + t[0])
    K_inv = torch.linalg.inv(geometry.intrinsics(size, dtype=torch.float64))
    shifted_rays = (geometry.pixel_grid(size, size, dtype=torch.float64) + torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)) @ K_inv.T
    expected = offset_view / (shifted_rays @ n_view)
    expected_integer = offset_view / (rays(size) @ n_view)
    for dtype in (torch.float32, torch.float64):
        rendered = renderer.render_depth(canon[None].to(dtype), R.to(dtype), t.to(dtype))[0].double()
        covered = renderer.recon_mask(rendered).bool()
        assert covered.float().mean() > 0.5
        error = (rendered[covered] - expected[covered]).abs().max().item()
        assert error < 1e-5, error
        # The half-pixel shift is far larger than that tolerance, and the integer renderer has none.
        assert (rendered[covered] - expected_integer[covered]).abs().median() > 1e-4
        plain = integer.render_depth(canon[None].to(dtype), R.to(dtype), t.to(dtype))[0].double()
        both = covered & integer.recon_mask(plain).bool()
        assert (plain[both] - expected_integer[both]).abs().max() < 1e-5


def test_gradcheck_depth_and_view_to_rendered_depth():
    size = 6
    renderer = Renderer(RendererConfig(image_size=size))
    depth = smooth_depth(1, size, seed=3, amplitude=0.5, dtype=torch.float64).requires_grad_()
    angles = torch.tensor([[0.21, -0.33, 0.12]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.004, -0.006, 0.01]], dtype=torch.float64, requires_grad=True)

    def render(depth, angles, t):
        return renderer.render_depth(depth, geometry.euler_to_rotation(angles), t)

    # The view must be generic: no pixel centre within reach of an edge, so the winning faces do not
    # change under gradcheck's perturbations (1e-6). Check it with perturbations 10x larger.
    def winners(depth, angles, t):
        vertices = geometry.transform_points(
            geometry.depth_to_points(depth, geometry.intrinsics(size, dtype=torch.float64)).reshape(1, -1, 3),
            geometry.euler_to_rotation(angles),
            t,
        )
        return rasterize_depth(vertices, grid_faces(size, size), geometry.intrinsics(size), size, size)[1]

    reference = winners(depth.detach(), angles.detach(), t.detach())
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        jitter = [1e-5 * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in (depth, angles, t)]
        moved = [x.detach() + dx for x, dx in zip((depth, angles, t), jitter)]
        assert torch.equal(winners(*moved), reference)
    rendered = render(depth, angles, t)
    covered = renderer.recon_mask(rendered).bool()
    assert covered.sum() >= 10 and (rendered[covered] < 1.19).all(), "covered pixels must not be clamped"

    assert torch.autograd.gradcheck(render, (depth, angles, t), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_flipped_branch_is_the_mirror_image():
    """Flipped canonical depth seen with the mirrored view (a, -b, -g), (-tx, ty, tz) = flipped rendering.

    The two meshes triangulate each quad along opposite diagonals, so they agree exactly only where
    the quads are planar: a depth with 1/d = f(u) + g(v) has planar quads (P = d K^-1 [u, v, 1]).
    """
    size = 24
    renderer = Renderer(RendererConfig(image_size=size))
    generator = torch.Generator().manual_seed(4)
    f = 0.04 * (torch.rand(3, 1, 5, generator=generator) * 2 - 1)
    g = 0.04 * (torch.rand(3, 5, 1, generator=generator) * 2 - 1)
    f = torch.nn.functional.interpolate(f, size=size, mode="linear", align_corners=True)[:, 0]
    g = torch.nn.functional.interpolate(g.transpose(1, 2), size=size, mode="linear", align_corners=True)[:, 0]
    depth = 1 / (1 + f[:, None, :] + g[:, :, None])

    angles = torch.tensor([[20.0, 35.0, -10.0], [-40.0, -15.0, 25.0], [5.0, 55.0, 40.0]])
    t = torch.tensor([[0.01, -0.005, 0.02], [-0.02, 0.01, 0.0], [0.015, 0.0, -0.01]])
    mirrored_angles = angles * torch.tensor([1.0, -1.0, -1.0])
    mirrored_t = t * torch.tensor([-1.0, 1.0, 1.0])
    R = geometry.euler_to_rotation(torch.deg2rad(angles))
    R_mirrored = geometry.euler_to_rotation(torch.deg2rad(mirrored_angles))

    rendered = renderer.render_depth(depth, R, t)
    rendered_flipped = renderer.render_depth(depth.flip(-1), R_mirrored, mirrored_t)
    expected = rendered.flip(-1)
    mask, mask_expected = renderer.recon_mask(rendered_flipped), renderer.recon_mask(expected)
    assert mask.mean() > 0.5
    assert (mask != mask_expected).sum() == 0
    torch.testing.assert_close(rendered_flipped, expected, rtol=0, atol=1e-5)


def test_flipping_canonical_depth_flips_the_identity_rendering():
    size = 20
    renderer = Renderer(RendererConfig(image_size=size))
    depth = smooth_depth(2, size, seed=5) + 0.01 * torch.rand(2, size, size, generator=torch.Generator().manual_seed(6))
    R, t = identity_view(2)
    rendered = renderer.render_depth(depth, R, t)
    rendered_flipped = renderer.render_depth(depth.flip(-1), R, t)
    interior = (slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(rendered_flipped[interior], rendered.flip(-1)[interior], rtol=0, atol=1e-6)


# -- normals, shading, mask ---------------------------------------------------------------------------


def test_normals_wrap_geometry_with_this_size_camera():
    size = 16
    renderer = Renderer(RendererConfig(image_size=size))
    depth = smooth_depth(2, size, seed=7)
    expected = geometry.depth_to_normals(depth, geometry.intrinsics(size))
    torch.testing.assert_close(renderer.normals(depth), expected)
    expected_reference_eps = geometry.depth_to_normals(depth, geometry.intrinsics(size), eps=1e-7)
    torch.testing.assert_close(renderer.normals(depth, eps=1e-7), expected_reference_eps)
    flat = renderer.normals(torch.ones(1, size, size))
    torch.testing.assert_close(flat, torch.tensor([0.0, 0.0, 1.0]).expand_as(flat), rtol=0, atol=1e-5)


def test_shade_hand_computed_values():
    renderer = Renderer(RendererConfig(image_size=2))
    albedo = torch.tensor([0.2, -0.6, 1.0]).view(1, 3, 1, 1).expand(2, 3, 1, 2).clone()
    normals = torch.zeros(2, 1, 2, 3)
    normals[:, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # faces the camera
    normals[:, 0, 1] = torch.tensor([0.0, 0.0, -1.0])  # faces away: no diffuse light
    k_a = torch.tensor([0.3, 0.0])
    k_d = torch.tensor([0.5, 1.0])
    s = 1 / math.sqrt(2)
    light = torch.tensor([[s, 0.0, s], [0.0, 0.0, 1.0]])
    image, shading = renderer.shade(albedo, normals, k_a, k_d, light)
    assert image.shape == (2, 3, 1, 2) and shading.shape == (2, 1, 1, 2)
    expected_shading = torch.tensor([[0.3 + 0.5 * s, 0.3], [1.0, 0.0]]).view(2, 1, 1, 2)
    torch.testing.assert_close(shading, expected_shading)
    a = torch.tensor([0.2, -0.6, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(image, ((a + 1) / 2 * expected_shading) * 2 - 1)
    # Hand-computed: albedo 0.2 lit by 0.3 + 0.5/sqrt(2) gives 0.6 * 0.65355 * 2 - 1.
    assert image[0, 0, 0, 0].item() == pytest.approx(0.6 * (0.3 + 0.5 * s) * 2 - 1)
    assert image[1, 2, 0, 1].item() == pytest.approx(-1.0)


def test_recon_mask_marks_covered_pixels():
    renderer = Renderer(RendererConfig(image_size=4))
    depth = torch.tensor([0.8, 1.0, 1.19, 1.2]).view(1, 1, 4).expand(1, 4, 4)
    mask = renderer.recon_mask(depth)
    assert mask.dtype == torch.float32
    assert mask[0, 0].tolist() == [1.0, 1.0, 1.0, 0.0]

    size = 16
    renderer = Renderer(RendererConfig(image_size=size))
    R, t = view([0.0, 0.0, 0.0], [0.05, 0.0, 0.0])  # shifted right: the left columns see background
    rendered = renderer.render_depth(smooth_depth(1, size, seed=8), R, t)
    mask = renderer.recon_mask(rendered)
    assert rendered.max().item() == pytest.approx(1.2) and rendered.min() >= 0.8 - 1e-6
    assert mask[0, :, 0].sum() == 0 and mask[0, :, -2].sum() == size
    assert torch.equal(mask.bool(), rendered < renderer.cfg.far_depth)


# -- supersampling, precision, sizes ----------------------------------------------------------------


def test_supersample_2_shape_and_sanity():
    size = 32
    depth = smooth_depth(2, size, seed=9)
    R, t = view([[15.0, -25.0, 5.0], [-10.0, 30.0, -20.0]], [[0.01, 0.0, 0.0], [-0.01, 0.01, 0.0]])
    plain = Renderer(RendererConfig(image_size=size)).render_depth(depth, R, t)
    renderer = Renderer(RendererConfig(image_size=size, supersample=2))
    smooth = renderer.render_depth(depth, R, t)
    assert smooth.shape == (2, size, size) and smooth.dtype == torch.float32
    assert smooth.min() >= 0.8 - 1e-6 and smooth.max() <= 1.2 + 1e-6
    both = renderer.recon_mask(smooth).bool() & renderer.recon_mask(plain).bool()
    # Pixels with any background sub-pixel leave the mask, so the 2x mask is a bit smaller.
    covered_plain, covered_smooth = renderer.recon_mask(plain).sum(), renderer.recon_mask(smooth).sum()
    assert 0.8 * covered_plain <= covered_smooth <= covered_plain
    # Where both are covered they agree closely, except at occlusion edges, where the 2x2 average
    # mixes the near and the far surface.
    difference = (smooth - plain).abs()[both]
    assert difference.median() < 1e-3 and (difference < 0.01).float().mean() > 0.95


def test_float32_under_bf16_autocast():
    size = 16
    renderer = Renderer(RendererConfig(image_size=size))
    depth = smooth_depth(2, size, seed=10)
    R, t = view([[10.0, 20.0, 0.0], [0.0, -15.0, 5.0]], [[0.0, 0.01, 0.0], [0.01, 0.0, 0.0]])
    image = torch.rand(2, 3, size, size) * 2 - 1
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.2, 1.0], [-0.1, 0.4, 1.0]]), dim=-1)
    k = torch.tensor([0.4, 0.6])

    def run(d, img):
        rendered = renderer.render_depth(d, R, t)
        normals = renderer.normals(d)
        shaded, shading = renderer.shade(img, normals, k, k, light)
        return rendered, normals, shaded, shading, renderer.warp_canonical(shaded, rendered, R, t)

    reference = run(depth, image)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        # Inside autocast the nets hand over bf16 tensors.
        outputs = run(depth.to(torch.bfloat16), image.to(torch.bfloat16))
    for out, ref in zip(outputs, reference):
        assert out.dtype == torch.float32
    # Same computation from bf16-rounded inputs: float32 arithmetic, so only the input rounding shows.
    exact = run(depth.to(torch.bfloat16).float(), image.to(torch.bfloat16).float())
    for out, ref in zip(outputs, exact):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_float64_is_not_downcast():
    size = 8
    renderer = Renderer(RendererConfig(image_size=size))
    R, t = view([5.0, 5.0, 0.0], [0.0, 0.0, 0.0], dtype=torch.float64)
    depth = smooth_depth(1, size, seed=11, dtype=torch.float64)
    rendered = renderer.render_depth(depth, R, t)
    assert rendered.dtype == torch.float64
    image = torch.rand(1, 3, size, size, dtype=torch.float64)
    assert renderer.warp_canonical(image, rendered, R, t).dtype == torch.float64
    assert renderer.normals(depth).dtype == torch.float64
    # float32 depth with a float64 view is computed in float64 too.
    assert renderer.render_depth(depth.float(), R, t).dtype == torch.float64


@pytest.mark.parametrize("size", [64, 128, 256])
def test_forward_and_backward_at_training_sizes(size):
    renderer = Renderer(RendererConfig(image_size=size))
    depth = smooth_depth(2, size, seed=size).requires_grad_()
    image = (torch.rand(2, 3, size, size) * 2 - 1).requires_grad_()
    R, t = view([[20.0, -30.0, 10.0], [-15.0, 25.0, -5.0]], [[0.02, -0.01, 0.0], [-0.01, 0.02, 0.0]])
    rendered = renderer.render_depth(depth, R, t)
    mask = renderer.recon_mask(rendered)
    warped = renderer.warp_canonical(image, rendered, R, t)
    assert rendered.shape == (2, size, size) and warped.shape == (2, 3, size, size)
    assert mask.mean() > 0.5
    loss = (warped * mask[:, None]).mean() + (rendered * mask).mean()
    loss.backward()
    assert torch.isfinite(depth.grad).all() and depth.grad.abs().sum() > 0
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_supersample_2_backward_is_finite():
    size = 16
    renderer = Renderer(RendererConfig(image_size=size, supersample=2))
    depth = smooth_depth(2, size, seed=12).requires_grad_()
    R, t = view([[25.0, -10.0, 5.0], [-20.0, 30.0, 0.0]], [[0.01, 0.0, 0.0], [0.0, -0.01, 0.0]])
    rendered = renderer.render_depth(depth, R, t)
    (rendered * renderer.recon_mask(rendered)).sum().backward()
    assert torch.isfinite(depth.grad).all() and depth.grad.abs().sum() > 0


def test_camera_argument_replaces_the_default_camera():
    """A size*2 renderer on the supersampled camera of a size-pixel image, pooled by the caller,
    equals the size-pixel renderer with supersample=2."""
    size = 12
    K2 = supersampled_intrinsics(geometry.intrinsics(size, dtype=torch.float64), 2)
    fine = Renderer(RendererConfig(image_size=2 * size), camera=K2)
    coarse = Renderer(RendererConfig(image_size=size, supersample=2))
    R, t = view([10.0, -12.0, 4.0], [0.01, 0.0, 0.0])
    normal = torch.tensor([0.1, -0.2, 1.0], dtype=torch.float64)
    plane = plane_depth(size, normal.tolist(), 1.0).float()[None]
    # The same plane sampled at the fine camera's pixels (a finer mesh of the same surface).
    fine_rays = geometry.pixel_grid(2 * size, 2 * size, dtype=torch.float64) @ torch.linalg.inv(K2).T
    fine_plane = (1.0 / (fine_rays @ normal)).float()[None]
    pooled = torch.nn.functional.avg_pool2d(fine.render_depth(fine_plane, R, t)[:, None], 2)[:, 0]
    expected = coarse.render_depth(plane, R, t)
    covered = (pooled < 1.2) & coarse.recon_mask(expected).bool()
    assert covered.float().mean() > 0.5
    torch.testing.assert_close(pooled[covered], expected[covered], rtol=0, atol=1e-5)


def test_the_coordinate_plane_geometry_computes_the_point_geometry():
    """The renderer's planes (x, y, z) give what the [..., 3] functions give, up to rounding."""
    generator = torch.Generator().manual_seed(11)
    depth = 1 + 0.1 * torch.rand(3, 6, 9, generator=generator, dtype=torch.float64)
    angles = torch.rand(3, 3, generator=generator, dtype=torch.float64) - 0.5
    R, t = geometry.euler_to_rotation(angles), torch.rand(3, 3, generator=generator, dtype=torch.float64) * 0.1
    K = geometry.intrinsics(9, 6, dtype=torch.float64)
    points = geometry.depth_to_points(depth, K)
    planes = geometry.depth_to_point_planes(depth, K)
    torch.testing.assert_close(torch.stack(planes, -1), points, rtol=1e-12, atol=1e-12)
    moved = geometry.transform_point_planes(planes, R, t)
    torch.testing.assert_close(torch.stack(moved, -1), geometry.transform_points(points, R, t), rtol=1e-12, atol=1e-12)
    back = geometry.inverse_transform_point_planes(moved, R, t)
    torch.testing.assert_close(torch.stack(back, -1), points, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(geometry.project_planes(moved, K), -1),
                               geometry.project(geometry.transform_points(points, R, t), K), rtol=1e-12, atol=1e-12)
