"""Tests of trainer.render.rasterizer (and its pixel_candidates): the fast rasteriser against the brute-force reference, and the
properties the renderer relies on (coverage, perspective-correct depth, gradients, no NaN)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.render import geometry, native_zbuffer, pixel_candidates, rasterizer
from trainer.render.rasterizer import grid_faces, rasterize_depth, rasterize_depth_brute_force


def random_depth(batch: int, size: int, generator: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Depth maps in [0.9, 1.1]: smooth random relief plus optional per-pixel noise (folds, occlusions)."""
    coarse = torch.rand(batch, 1, 4, 4, generator=generator) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    jitter = noise * (torch.rand(batch, size, size, generator=generator) * 2 - 1)
    return 1 + 0.1 * (smooth + jitter).clamp(-1, 1)


def random_view(batch: int, generator: torch.Generator, max_angle: float = 60.0, max_shift: float = 0.1):
    """(R, t) with angles up to max_angle degrees and translations up to max_shift (the model's ranges)."""
    angles = (torch.rand(batch, 3, generator=generator) * 2 - 1) * math.radians(max_angle)
    t = (torch.rand(batch, 3, generator=generator) * 2 - 1) * max_shift
    return geometry.euler_to_rotation(angles), t


def view_vertices(depth: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The grid mesh's vertices [B, H*W, 3] in the camera frame of the view (R, t)."""
    b, h, w = depth.shape
    points = geometry.depth_to_points(depth, geometry.intrinsics(w, h).to(depth)).reshape(b, h * w, 3)
    return geometry.transform_points(points, R, t)


def both_rasterisers(vertices, faces, K, height, width):
    """(PyTorch fast path, brute force); the C z-buffer, where this machine builds it, must equal the fast path."""
    args = (vertices, faces, K, height, width)
    fast = rasterize_depth(*args, zbuffer="torch")
    if native_zbuffer.available() and vertices.dtype == torch.float32:
        native = rasterize_depth(*args, zbuffer="native")
        assert torch.equal(native[1], fast[1]) and torch.equal(native[0], fast[0])
    return fast, rasterize_depth_brute_force(*args)


def assert_same_rendering(fast, brute):
    (depth, face), (depth_ref, face_ref) = fast, brute
    assert torch.equal(face >= 0, face_ref >= 0), "coverage differs"
    # Both paths share the edge test, the depth formula and the tie-break (lower face index at
    # equal float32 depth), so even ambiguous pixels (on shared edges) get the same winner.
    assert torch.equal(face, face_ref), f"{(face != face_ref).sum()} pixels have another winning face"
    covered = face >= 0
    assert torch.isfinite(depth[covered]).all()
    assert torch.isinf(depth[~covered]).all() and (depth[~covered] > 0).all()
    assert (depth[covered] - depth_ref[covered]).abs().max().item() <= 1e-5 if covered.any() else True


# ---------------------------------------------------------------------------------------------


def test_grid_faces_layout():
    h, w = 3, 4
    faces = grid_faces(h, w)
    assert faces.shape == (2 * (h - 1) * (w - 1), 3) and faces.dtype == torch.long
    quads = (h - 1) * (w - 1)
    # Quad (0, 0): TL=0, TR=1, BL=w, BR=w+1; first triangles (TL, BL, TR), then (TR, BL, BR).
    assert faces[0].tolist() == [0, w, 1]
    assert faces[quads].tolist() == [1, w, w + 1]
    # Quad (row 1, col 2).
    q = 1 * (w - 1) + 2
    tl = 1 * w + 2
    assert faces[q].tolist() == [tl, tl + w, tl + 1]
    assert faces[quads + q].tolist() == [tl + 1, tl + w, tl + w + 1]
    assert int(faces.max()) == h * w - 1


@pytest.mark.parametrize("size", [8, 13, 20])
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_fast_matches_brute_force_on_random_meshes_and_views(size, noise):
    generator = torch.Generator().manual_seed(1000 * size + int(10 * noise))
    for _ in range(2):
        depth = random_depth(3, size, generator, noise)
        R, t = random_view(3, generator)
        K = geometry.intrinsics(size)
        fast, brute = both_rasterisers(view_vertices(depth, R, t), grid_faces(size, size), K, size, size)
        assert_same_rendering(fast, brute)


def test_fast_matches_brute_force_in_a_2x_image_and_non_square():
    """The supersampled case (the 1x mesh in a 2x image) and H != W."""
    generator = torch.Generator().manual_seed(7)
    h, w = 9, 12
    coarse = torch.rand(2, 1, 3, 3, generator=generator) * 2 - 1
    depth = 1 + 0.1 * torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[:, 0]
    R, t = random_view(2, generator, max_angle=30, max_shift=0.03)
    K = geometry.intrinsics(w, h)
    K2 = K.clone()
    K2[:2] *= 2
    K2[:2, 2] += 0.5
    fast, brute = both_rasterisers(view_vertices(depth, R, t), grid_faces(h, w), K2, 2 * h, 2 * w)
    assert_same_rendering(fast, brute)
    assert (fast[1] >= 0).float().mean() > 0.3


def test_chunked_processing_gives_the_same_result(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    size = 16
    depth = random_depth(3, size, generator, noise=0.5)
    R, t = random_view(3, generator)
    args = (view_vertices(depth, R, t), grid_faces(size, size), geometry.intrinsics(size), size, size)
    reference = rasterize_depth(*args, zbuffer="torch")
    monkeypatch.setattr(rasterizer, "FACE_CHUNK_CPU", 37)
    monkeypatch.setattr(pixel_candidates, "CANDIDATE_CHUNK", 50)
    monkeypatch.setattr(rasterizer, "BRUTE_FORCE_CHUNK", 999)
    assert_same_rendering(rasterize_depth(*args, zbuffer="torch"), reference)
    assert_same_rendering(rasterize_depth_brute_force(*args), reference)


def test_box_and_scanline_enumeration_agree(monkeypatch):
    """Every triangle through the scanline path, then every triangle through the box path."""
    generator = torch.Generator().manual_seed(4)
    size = 14
    depth = random_depth(2, size, generator, noise=1.0)
    R, t = random_view(2, generator)
    args = (view_vertices(depth, R, t), grid_faces(size, size), geometry.intrinsics(size), size, size)
    reference = rasterize_depth_brute_force(*args)
    monkeypatch.setattr(pixel_candidates, "BOX_MAX_AREA", 0)
    assert_same_rendering(rasterize_depth(*args, zbuffer="torch"), reference)
    monkeypatch.setattr(pixel_candidates, "BOX_MAX_AREA", 10**9)
    assert_same_rendering(rasterize_depth(*args, zbuffer="torch"), reference)


def test_huge_and_thin_triangles_keep_their_full_coverage():
    """A triangle covering the whole image behind small ones, and a long diagonal sliver."""
    size = 24
    K = geometry.intrinsics(size)
    f, c = K[0, 0].item(), K[0, 2].item()

    def at(u, v, z):  # camera-frame point seen at pixel (u, v) with depth z
        return [(u - c) / f * z, (v - c) / f * z, z]

    vertices = torch.tensor(
        [
            at(-40, -40, 1.1), at(80, -30, 1.1), at(-30, 80, 1.1),  # huge, far
            at(1.3, 2.2, 1.0), at(22.7, 21.4, 1.0), at(22.9, 20.1, 0.95),  # thin sliver, near
            at(5.5, 14.5, 0.9), at(9.5, 14.5, 0.9), at(5.5, 18.5, 0.9),  # small, nearest
        ]
    ).unsqueeze(0)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    fast, brute = both_rasterisers(vertices, faces, K, size, size)
    assert_same_rendering(fast, brute)
    face = fast[1][0]
    assert (face >= 0).all(), "the huge triangle covers every pixel"
    # Pixels strictly inside: 6 for the small triangle; the sliver crosses the image diagonally.
    assert (face == 2).sum() >= 6 and (face == 1).sum() >= 12


def test_depth_is_perspective_correct_on_a_slanted_triangle():
    """Depth at every covered pixel equals the ray-plane intersection (1/z interpolation, not z)."""
    size = 16
    K = geometry.intrinsics(size, dtype=torch.float64)
    vertices = torch.tensor([[-0.08, -0.07, 0.85], [0.09, -0.05, 1.15], [-0.02, 0.09, 1.05]], dtype=torch.float64)
    depth, face = rasterize_depth(vertices[None], torch.tensor([[0, 1, 2]]), K, size, size)
    normal = torch.linalg.cross(vertices[1] - vertices[0], vertices[2] - vertices[0])
    rays = geometry.pixel_grid(size, size, dtype=torch.float64) @ torch.linalg.inv(K).T
    expected = (normal @ vertices[0]) / (rays @ normal)
    covered = face[0] >= 0
    assert covered.sum() > 20
    assert depth.dtype == torch.float64
    torch.testing.assert_close(depth[0][covered], expected[covered], rtol=0, atol=1e-12)


def test_gradients_reach_only_the_winning_face():
    generator = torch.Generator().manual_seed(5)
    size = 10
    depth = random_depth(1, size, generator)
    R, t = random_view(1, generator, max_angle=20, max_shift=0.02)
    vertices = view_vertices(depth, R, t).detach().requires_grad_()
    faces = grid_faces(size, size)
    rendered, face = rasterize_depth(vertices, faces, geometry.intrinsics(size), size, size)
    row, col = 5, 4
    assert face[0, row, col] >= 0
    rendered[0, row, col].backward()
    touched = vertices.grad[0].abs().sum(-1).nonzero().flatten()
    assert set(touched.tolist()) <= set(faces[face[0, row, col]].tolist())
    assert len(touched) >= 2


def test_degenerate_triangles_do_not_produce_nan():
    """Zero-area triangles (repeated or collinear vertices) and an edge-on quad: finite depth and grads."""
    size = 12
    K = geometry.intrinsics(size)
    vertices = torch.tensor(
        [
            [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0],  # a point
            [-0.05, 0.0, 1.0], [0.0, 0.0, 1.0], [0.05, 0.0, 1.0],  # collinear through pixel centres
            [-0.03, -0.03, 0.9], [-0.03, -0.03, 1.1], [-0.03, 0.03, 1.0],  # edge-on: projects to a line
            [-0.08, -0.08, 1.05], [0.08, -0.08, 1.05], [-0.08, 0.08, 1.05],  # an ordinary triangle
        ]
    ).unsqueeze(0).requires_grad_()
    faces = torch.arange(12).view(4, 3)
    for raster in (rasterize_depth, rasterize_depth_brute_force):
        depth, face = raster(vertices, faces, K, size, size)
        covered = face >= 0
        assert torch.isfinite(depth[covered]).all() and not torch.isnan(depth).any()
        (grad,) = torch.autograd.grad(depth[covered].sum(), vertices)
        assert torch.isfinite(grad).all()
        assert (face == 3).sum() > 10


def test_vertices_behind_the_near_plane_are_not_drawn():
    size = 8
    K = geometry.intrinsics(size)
    vertices = torch.tensor([[[-0.1, -0.1, 0.0], [0.1, -0.1, 1.0], [0.0, 0.1, 1.0]]], requires_grad=True)
    depth, face = rasterize_depth(vertices, torch.tensor([[0, 1, 2]]), K, size, size)
    assert (face == -1).all() and torch.isinf(depth).all()
    depth.clamp(max=2.0).sum().backward()
    assert torch.isfinite(vertices.grad).all()


def test_background_is_positive_infinity_and_dtypes():
    size = 8
    vertices = torch.tensor([[[-0.01, -0.01, 1.0], [0.01, -0.01, 1.0], [0.0, 0.01, 1.0]]])
    faces = torch.tensor([[0, 1, 2]])
    K = geometry.intrinsics(size)
    depth, face = rasterize_depth(vertices, faces, K, size, size)
    assert depth.dtype == torch.float32 and face.dtype == torch.long
    assert torch.isposinf(depth[face < 0]).all()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        depth_autocast, _ = rasterize_depth(vertices.to(torch.bfloat16).float(), faces, K, size, size)
    assert depth_autocast.dtype == torch.float32
    assert torch.equal(depth_autocast, depth)
    depth64, _ = rasterize_depth(vertices.double(), faces, K, size, size)
    assert depth64.dtype == torch.float64


@pytest.mark.parametrize("size", [9, 16])
def test_fast_matches_brute_force_when_pixel_centres_sit_on_vertices_and_edges(size):
    """Identity view: every vertex projects onto a pixel centre up to rounding, so most pixels lie
    on shared edges. The enumeration margin must keep every pixel the edge test accepts."""
    generator = torch.Generator().manual_seed(size)
    depth = random_depth(2, size, generator, noise=0.3)
    R = torch.eye(3).expand(2, 3, 3)
    t = torch.zeros(2, 3)
    K = geometry.intrinsics(size)
    fast, brute = both_rasterisers(view_vertices(depth, R, t), grid_faces(size, size), K, size, size)
    assert_same_rendering(fast, brute)
    assert (fast[1][:, 1:-1, 1:-1] >= 0).all()


# -- pixel_offset: the reference's half-pixel sampling (SPEC 3.4) ----------------------------------


@pytest.mark.parametrize("factor", [1, 2])
def test_fast_matches_brute_force_with_half_pixel_offset(factor):
    """pixel_offset moves the samples of both paths alike: same winners, same depths, bit for bit."""
    generator = torch.Generator().manual_seed(40 + factor)
    size = 12
    for noise in (0.0, 0.5):
        depth = random_depth(2, size, generator, noise)
        R, t = random_view(2, generator)
        K = geometry.intrinsics(size)
        K[:2] *= factor  # the reference's supersampled camera: its 1x projection scaled
        args = (view_vertices(depth, R, t), grid_faces(size, size), K, factor * size, factor * size)
        fast = rasterize_depth(*args, pixel_offset=0.5)
        brute = rasterize_depth_brute_force(*args, pixel_offset=0.5)
        assert_same_rendering(fast, brute)
        covered = fast[1] >= 0
        assert torch.equal(fast[0][covered], brute[0][covered])
        assert not torch.equal(fast[1], rasterize_depth(*args)[1]), "the offset moved no sample"


def test_pixel_offset_samples_the_shifted_ray():
    """A slanted triangle: depth at pixel (r, c) is the plane's depth on the ray through (c + o, r + o)."""
    size = 16
    K = geometry.intrinsics(size, dtype=torch.float64)
    vertices = torch.tensor([[-0.08, -0.07, 0.85], [0.09, -0.05, 1.15], [-0.02, 0.09, 1.05]], dtype=torch.float64)
    normal = torch.linalg.cross(vertices[1] - vertices[0], vertices[2] - vertices[0])
    for offset in (0.5, 0.25):
        depth, face = rasterize_depth(vertices[None], torch.tensor([[0, 1, 2]]), K, size, size, pixel_offset=offset)
        shifted = geometry.pixel_grid(size, size, dtype=torch.float64) + torch.tensor([offset, offset, 0.0], dtype=torch.float64)
        expected = (normal @ vertices[0]) / ((shifted @ torch.linalg.inv(K).T) @ normal)
        covered = face[0] >= 0
        assert covered.sum() > 20
        torch.testing.assert_close(depth[0][covered], expected[covered], rtol=0, atol=1e-12)
