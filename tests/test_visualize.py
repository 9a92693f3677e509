"""trainer.results.visualize: the validation grid hook, views from other angles, relighting conventions."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from trainer.results import visualize as vis
from trainer.model.config import ModelConfig
from trainer.results.demo import LIGHTS
from trainer.model.unsup3d import Unsup3D
from trainer.render.renderer import Renderer, RendererConfig


def tiny_model(seed: int = 0) -> Unsup3D:
    torch.manual_seed(seed)
    config = ModelConfig(depth_nf=8, albedo_nf=8, conf_nf=8, depth_zdim=16, albedo_zdim=16, conf_zdim=16,
                         light_nf=8, view_nf=8)
    return Unsup3D(config)


def dome(size: int = 64) -> torch.Tensor:
    """[1, S, S] a bump nearest at the centre (depth 0.95), 1.05 at the corners' radius."""
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    r2 = ((u - (size - 1) / 2) ** 2 + (v - (size - 1) / 2) ** 2) / (size / 2) ** 2
    return (0.95 + 0.1 * r2.clamp(max=1)).unsqueeze(0)


def test_validation_grid_has_one_row_per_image_and_keeps_the_mode(tmp_path):
    model = tiny_model()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    for training in (True, False):
        model.train(training)
        path = vis.save_validation_grid(model, images, tmp_path / "visuals" / f"step_{int(training)}.png", scale=2)
        assert model.training is training
        with Image.open(path) as img:
            assert img.size == vis.grid_size(len(vis.VALIDATION_COLUMNS), 3, 128, "header")
            assert img.size == (10 * 128 + 9 * vis.GAP, 3 * 128 + 2 * vis.GAP + vis.CAPTION_HEIGHT)
            assert img.mode == "RGB"
    assert all(p.grad is None for p in model.parameters())
    assert not list((tmp_path / "visuals").glob("*.tmp"))


def test_validation_grid_of_a_model_without_confidence_and_a_fixed_set(tmp_path, synthetic_root):
    model = tiny_model()
    model.confidence_net = None
    images = vis.validation_images(synthetic_root, count=4)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, vis.validation_images(synthetic_root, "val", count=4))  # the same set every time
    # no val split: the first images of the training split
    train_first = vis.validation_images(synthetic_root, ("nope", "train"), count=2)
    assert train_first.shape == (2, 3, 64, 64) and not torch.equal(train_first, images[:2])
    with pytest.raises(ValueError, match="no images"):
        vis.validation_images(synthetic_root, ("nope",))
    path = vis.save_validation_grid(model, images, tmp_path / "grid.png", scale=1)
    with Image.open(path) as img:
        assert img.size == vis.grid_size(len(vis.VALIDATION_COLUMNS), 4, 64, "header")


def test_the_canonical_view_comes_back_and_a_surface_seen_from_behind_is_background():
    renderer = Renderer(RendererConfig())
    depth = torch.full((1, 64, 64), 1.0)
    normal = renderer.normals(depth)
    colours = torch.rand(1, 3, 64, 64) * 2 - 1
    t = torch.zeros(1, 3)
    image, visible = vis.render_canonical_view(renderer, depth, colours, normal, torch.eye(3)[None], t)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert visible[:, 2:-2, 2:-2].min() == 1
    assert torch.allclose(image[inner], colours[inner], atol=1e-4)
    # turned by 150 degrees the plane shows its back: all background, none of its colours
    image, visible = vis.render_canonical_view(renderer, depth, colours, normal, vis.yaw_rotation(150.0, 1), t)
    assert visible.sum() == 0 and torch.all(image == vis.BACKGROUND)


def test_the_named_lights_light_the_side_they_are_named_after():
    renderer = Renderer(RendererConfig())
    normal = renderer.normals(dome())
    albedo = torch.ones(1, 3, 64, 64)
    sides = {"left": (slice(None), slice(8, 24)), "right": (slice(None), slice(40, 56)),
             "top": (slice(8, 24), slice(None)), "bottom": (slice(40, 56), slice(None))}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    for name, x, y in LIGHTS:
        if name == "front":
            continue
        _, shading = renderer.shade(albedo, normal, torch.zeros(1), torch.ones(1), vis.light_direction_from(x, y)[None])
        s = shading[0, 0]
        assert s[sides[name]].mean() > s[sides[opposite[name]]].mean() + 0.3, name


def test_relighting_and_novel_views_have_one_image_per_light_and_yaw():
    model = tiny_model().eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    out = vis.decompose(model, images)
    directions = torch.stack([vis.light_direction_from(x, y) for _, x, y in LIGHTS])
    relit = vis.relight(model, out, directions)
    views = vis.novel_views(model, out, (-30.0, 0.0, 30.0))
    assert relit.shape == (len(LIGHTS), 2, 3, 64, 64) and views.shape == (3, 2, 3, 64, 64)
    assert torch.isfinite(relit).all() and torch.isfinite(views).all()
    # the model's own light direction gives back its reconstruction
    own = vis.Lighting.from_raw(out.light)
    again = vis.relight(model, out, own.direction[:1])[0, :1]
    assert torch.allclose(again, vis.reconstruction(model, out)[:1], atol=1e-5)


def test_yaw_rotation_turns_about_the_vertical_axis():
    R = vis.yaw_rotation(90.0, 2)
    assert R.shape == (2, 3, 3)
    x = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(R[0] @ x, torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(R[0] @ torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    assert math.isclose(float(torch.linalg.det(R[0])), 1.0, rel_tol=1e-6)


def test_map_pictures_have_the_map_size():
    depth = dome()[0]
    assert vis.depth_to_pil(depth, 0.9, 1.1).size == (64, 64)
    assert vis.confidence_to_pil(torch.rand(1, 16, 16) + 0.1).size == (16, 16)
    assert vis.normals_to_pil(torch.zeros(64, 64, 3)).size == (64, 64)
    near = vis.depth_to_pil(depth, 0.9, 1.1).getpixel((32, 32))
    far = vis.depth_to_pil(depth, 0.9, 1.1).getpixel((0, 0))
    assert near[0] > far[0]  # near is bright
    grid = vis.grid([[("a", Image.new("RGB", (8, 8)))], [("b", Image.new("RGB", (8, 8))), None]], 32)
    assert grid.size == (64 + vis.GAP, 2 * (32 + vis.CAPTION_HEIGHT) + vis.GAP) == vis.grid_size(2, 2, 32)
