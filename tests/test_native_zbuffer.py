"""The C z-buffer (trainer/render/zbuffer.c) gives the PyTorch fast path's result bit for bit, and the
rasteriser falls back to PyTorch, with one warning, where it cannot be built."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from trainer.render import geometry, native_zbuffer
from trainer.render.rasterizer import grid_faces, rasterize_depth, rasterize_depth_brute_force


def grid_mesh(batch, height, width, generator, noise, max_angle):
    coarse = torch.rand(batch, 1, 4, 4, generator=generator) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)[:, 0]
    depth = 1 + 0.1 * (smooth + noise * (torch.rand(batch, height, width, generator=generator) * 2 - 1)).clamp(-1, 1)
    angles = (torch.rand(batch, 3, generator=generator) * 2 - 1) * math.radians(max_angle)
    t = (torch.rand(batch, 3, generator=generator) * 2 - 1) * 0.1
    K = geometry.intrinsics(width, height)
    points = geometry.depth_to_points(depth, K).reshape(batch, -1, 3)
    return geometry.transform_points(points, geometry.euler_to_rotation(angles), t), grid_faces(height, width), K


def assert_native_is_the_torch_path(vertices, faces, K, height, width, **kwargs):
    torch_depth, torch_face = rasterize_depth(vertices, faces, K, height, width, zbuffer="torch", **kwargs)
    depth, face = rasterize_depth(vertices, faces, K, height, width, zbuffer="native", **kwargs)
    assert torch.equal(face, torch_face), f"{(face != torch_face).sum()} pixels have another winning face"
    assert torch.equal(depth, torch_depth)
    return face


def test_this_machine_builds_it():
    """CI and the set-up script's machines have a C compiler: the fast z-buffer must be what they run."""
    assert native_zbuffer.compiler() is not None
    assert native_zbuffer.available()


@pytest.mark.parametrize("size,noise,max_angle", [(64, 0.0, 30), (64, 0.05, 60), (17, 1.0, 60), (32, 0.3, 89)])
def test_grid_meshes_from_every_angle(size, noise, max_angle):
    generator = torch.Generator().manual_seed(size + int(100 * noise) + max_angle)
    vertices, faces, K = grid_mesh(6, size, size, generator, noise, max_angle)
    face = assert_native_is_the_torch_path(vertices, faces, K, size, size)
    assert (face >= 0).any() and (face < 0).any()


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_a_supersampled_non_square_image_and_the_half_pixel_offset(offset):
    generator = torch.Generator().manual_seed(5)
    vertices, faces, K = grid_mesh(3, 9, 14, generator, 0.2, 45)
    K2 = K.clone()
    K2[:2] *= 2
    assert_native_is_the_torch_path(vertices, faces, K2, 18, 28, pixel_offset=offset)


def test_a_triangle_soup_with_huge_off_screen_degenerate_and_near_plane_triangles():
    size = 24
    K = geometry.intrinsics(size)
    f, c = K[0, 0].item(), K[0, 2].item()

    def at(u, v, z):
        return [(u - c) / f * z, (v - c) / f * z, z]

    vertices = torch.tensor([
        at(-4e4, -4e4, 1.1), at(8e4, -3e4, 1.1), at(-3e4, 8e4, 1.1),  # covers everything, far
        at(1.3, 2.2, 1.0), at(22.7, 21.4, 1.0), at(22.9, 20.1, 0.95),  # thin sliver
        at(5, 5, 0.9), at(5, 5, 0.9), at(5, 5, 0.9),  # a point: zero area
        at(3, 3, 0.9), at(10, 10, 0.9), at(17, 17, 0.9),  # a line: zero area
        [0.0, 0.0, 1e-4], at(10, 3, 0.9), at(3, 10, 0.9),  # one vertex before the near plane
        at(100, 100, 1.0), at(140, 100, 1.0), at(100, 140, 1.0),  # off screen
        at(2, 2, 0.95), at(12, 2, 0.95), at(2, 12, 0.95),  # ties with the next one
        at(2, 2, 0.95), at(12, 2, 0.95), at(2, 12, 0.95),
        at(20, 3, 1.05), at(3, 20, 1.05), at(20, 20, 1.05),  # the other winding
    ]).unsqueeze(0)
    faces = torch.arange(vertices.shape[1]).view(-1, 3)
    face = assert_native_is_the_torch_path(vertices, faces, K, size, size)
    assert (face >= 0).all()
    assert torch.equal(face, rasterize_depth_brute_force(vertices, faces, K, size, size)[1])
    assert not ((face == 2) | (face == 3)).any(), "zero-area triangles cover nothing"
    assert not (face == 7).any(), "the tie goes to the lower face index"


def test_long_slivers_walked_by_scanline_spans_lose_no_pixel():
    """Triangles whose boxes hold more than BOX_MAX_AREA pixels are walked by row spans in C: long thin
    slivers at every slope, with horizontal and vertical edges, ends on pixel centres and both windings,
    must win exactly the pixels of the brute-force rasteriser (which tests every pixel)."""
    size = 96
    K = geometry.intrinsics(size)
    f, c = K[0, 0].item(), K[0, 2].item()
    generator = torch.Generator().manual_seed(11)
    corners = []
    for i in range(40):
        u0, v0, u1, v1 = (torch.rand(4, generator=generator) * (size + 20) - 10).tolist()
        if i % 8 == 0:
            v1 = v0  # a horizontal sliver
        if i % 8 == 1:
            u1 = u0  # a vertical one
        if i % 8 == 2:
            u0, v0, u1, v1 = (float(round(x)) for x in (u0, v0, u1, v1))  # ends on pixel centres
        width = 0.3 + 2 * torch.rand(1, generator=generator).item()
        normal_u, normal_v = v1 - v0, u0 - u1
        norm = math.hypot(normal_u, normal_v) or 1.0
        u2, v2 = (u0 + u1) / 2 + width * normal_u / norm, (v0 + v1) / 2 + width * normal_v / norm
        z = 0.8 + 0.4 * torch.rand(1, generator=generator).item()
        tri = [(u0, v0), (u1, v1), (u2, v2)] if i % 2 else [(u1, v1), (u0, v0), (u2, v2)]
        corners += [[(u - c) / f * z, (v - c) / f * z, z] for u, v in tri]
    vertices = torch.tensor(corners).unsqueeze(0)
    faces = torch.arange(vertices.shape[1]).view(-1, 3)
    face = assert_native_is_the_torch_path(vertices, faces, K, size, size)
    assert (face >= 0).sum() > 1000
    assert torch.equal(face, rasterize_depth_brute_force(vertices, faces, K, size, size)[1])


def test_bad_face_indices_are_named():
    vertices = torch.rand(1, 3, 3) + torch.tensor([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="outside 0..2"):
        rasterize_depth(vertices, torch.tensor([[0, 1, 3]]), geometry.intrinsics(8), 8, 8, zbuffer="native")
    with pytest.raises(ValueError, match="zbuffer must be one of"):
        rasterize_depth(vertices, torch.tensor([[0, 1, 2]]), geometry.intrinsics(8), 8, 8, zbuffer="fast")


def test_auto_uses_torch_for_float64_and_the_result_is_the_same():
    generator = torch.Generator().manual_seed(6)
    vertices, faces, K = grid_mesh(2, 12, 12, generator, 0.3, 40)
    assert not native_zbuffer.supports(vertices.double().reshape(-1, 3).T)
    with pytest.raises(ValueError, match="float32 CPU"):
        native_zbuffer.zbuffer(vertices.double().reshape(-1, 3).T.contiguous(), faces, 2, 12, 12)
    face64 = rasterize_depth(vertices.double(), faces, K, 12, 12)[1]
    assert torch.equal(face64, rasterize_depth(vertices.double(), faces, K, 12, 12, zbuffer="torch")[1])


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """native_zbuffer as in a new process, with an empty cache folder."""
    monkeypatch.setattr(native_zbuffer.LIBRARY, "_tried", False)
    monkeypatch.setattr(native_zbuffer.LIBRARY, "_library", None)
    monkeypatch.setenv("UNSUP3D_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_it_is_built_once_into_the_cache_folder(fresh_loader):
    assert native_zbuffer.available()
    built = list(fresh_loader.glob("zbuffer-*.so"))
    assert len(built) == 1 and not list(fresh_loader.glob("*.partial.so"))
    assert built[0] == native_zbuffer.library_path(native_zbuffer.compiler())


@pytest.mark.parametrize("command", [None, ["false"]], ids=["no compiler", "compiler fails"])
def test_without_a_working_compiler_the_torch_path_runs_after_one_warning(fresh_loader, monkeypatch, caplog, command):
    monkeypatch.setattr(native_zbuffer, "compiler", lambda: command)
    generator = torch.Generator().manual_seed(7)
    vertices, faces, K = grid_mesh(2, 10, 10, generator, 0.2, 30)
    with caplog.at_level(logging.WARNING, logger="trainer.render.native_zbuffer"):
        auto = rasterize_depth(vertices, faces, K, 10, 10)
        rasterize_depth(vertices, faces, K, 10, 10)
    warnings = [r for r in caplog.records if "PyTorch z-buffer" in r.getMessage()]
    assert len(warnings) == 1
    assert torch.equal(auto[1], rasterize_depth(vertices, faces, K, 10, 10, zbuffer="torch")[1])
    with pytest.raises(RuntimeError, match="not available"):
        rasterize_depth(vertices, faces, K, 10, 10, zbuffer="native")


def test_a_failing_compiler_is_named_with_the_source(tmp_path):
    with pytest.raises(RuntimeError, match="false failed on .*zbuffer.c"):
        native_zbuffer.build(["false"], tmp_path / "z.so")
    assert not list(tmp_path.iterdir()), "no partial file is left behind"


def test_a_compiled_rasteriser_hands_c_the_call_s_own_tensors():
    """Under torch.compile the C call stays opaque (torch.compiler.disable): traced, it was handed the
    data pointers of the tensors seen while tracing, and a compiled renderer corrupted the heap."""
    generator = torch.Generator().manual_seed(8)
    compiled = torch.compile(lambda v, f, K: rasterize_depth(v, f, K, 8, 8, zbuffer="native"))
    for _ in range(3):  # new tensors every call: stale pointers would read freed memory
        vertices, faces, K = grid_mesh(2, 8, 8, generator, 0.3, 40)
        depth, face = compiled(vertices.clone(), faces.clone(), K.clone())
        expected = rasterize_depth(vertices, faces, K, 8, 8, zbuffer="torch")
        assert torch.equal(face, expected[1]) and torch.equal(depth, expected[0])
