"""The synthetic synface generator: layout, encoding, symmetry, shape content, determinism."""

from __future__ import annotations

import filecmp
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.render import geometry
from trainer.data.synface import SynfaceFolder, decode_depth_png
from trainer.data.synthetic import generate_synface, main_generate
from trainer.data.synthetic_params import SyntheticConfig, sample_params
from trainer.data.synthetic_render import _hsv_to_rgb, render_objects, sample_objects

SMALL = dict(num_train=6, num_val=3, num_test=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here, as generate_synface uses: on the shared 2-core machines a 2-thread
    torch slows down many times over when other processes compete for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _objects(n=16, seed=0, **kw):
    g = torch.Generator()
    g.manual_seed(seed)
    return sample_objects(n, SyntheticConfig(**kw), g)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synface")
    cfg = SyntheticConfig(**SMALL, seed=3)
    counts = generate_synface(str(root), cfg)
    return root, cfg, counts


def test_sample_objects_is_deterministic_for_a_seed():
    a, b, c = _objects(seed=1), _objects(seed=1), _objects(seed=2)
    for key in ("canon_depth", "canon_albedo", "light", "view"):
        assert torch.equal(a[key], b[key]), key
        assert not torch.allclose(a[key], c[key]), key


def test_sample_objects_shapes_and_ranges():
    o = _objects(n=32)
    assert o["canon_depth"].shape == (32, 64, 64)
    assert o["canon_albedo"].shape == (32, 3, 64, 64)
    assert o["light"].shape == (32, 4) and o["view"].shape == (32, 6)
    assert o["canon_depth"].min() >= 0.9 and o["canon_depth"].max() <= 1.1
    assert o["canon_albedo"].min() >= -1 and o["canon_albedo"].max() <= 1
    assert o["light"].abs().max() <= 1 and o["view"].abs().max() <= 1
    # The nearest point of each object is close to min_depth, as the model's range expects.
    assert o["canon_depth"].amin(dim=(1, 2)).max() < 0.93
    # Angles inside the configured (narrower than the model's 60 degree) ranges, and varied.
    deg = o["view"][:, :3] * 60
    assert deg[:, 0].abs().max() <= 15 + 1e-4 and deg[:, 1].abs().max() <= 30 + 1e-4 and deg[:, 2].abs().max() <= 10 + 1e-4
    assert deg[:, 1].std() > 8 and deg[:, 0].std() > 4
    assert o["view"][:, 5].abs().max() == 0  # no z translation for faces
    # Light: ambient and diffuse in [0, 1]; direction varies.
    k = (o["light"][:, :2] + 1) / 2
    assert k.min() >= 0 and k.max() <= 1
    assert o["light"][:, 2:].std(dim=0).min() > 0.2


def test_canonical_objects_are_symmetric_up_to_bounded_detail():
    for asym in (0.1, 0.3):
        o = _objects(n=32, asymmetry=asym)
        d = o["canon_depth"]
        diff = (d - d.flip(-1)).abs().amax(dim=(1, 2))
        bound = asym * (1.1 - 0.9)
        assert diff.max() <= bound + 1e-6
        # ... but not exactly symmetric: every object carries some asymmetric detail.
        assert diff.min() > 0.1 * bound
        relief = d.amax(dim=(1, 2)) - d.amin(dim=(1, 2))
        assert (diff < relief).all()
    # The albedo has asymmetric blemishes too, and is symmetric without them.
    a = _objects(n=8)["canon_albedo"]
    assert (a - a.flip(-1)).abs().amax() > 0.05
    d = _objects(n=8, asymmetry=0.0, albedo_asymmetry=0.0)
    assert torch.equal(d["canon_depth"], d["canon_depth"].flip(-1))
    assert torch.equal(d["canon_albedo"], d["canon_albedo"].flip(-1))


def test_objects_carry_shape():
    o = _objects(n=16)
    fg = o["canon_mask"] > 0.5
    for i in range(16):
        depth = o["canon_depth"][i][fg[i]]
        assert depth.std() > 0.008  # more than 10 PNG levels of variation
        assert depth.max() - depth.min() > 0.04
    # Not all objects are the same shape.
    assert (o["canon_depth"] - o["canon_depth"].mean(0)).abs().mean() > 0.003


def test_identity_view_renders_the_canonical_depth():
    from trainer.render.renderer import Renderer, RendererConfig

    o = _objects(n=4)
    R, t = geometry.view_to_rotation_translation(torch.zeros(4, 6))
    assert torch.allclose(R, torch.eye(3).expand(4, 3, 3))
    view_depth = Renderer(RendererConfig(image_size=64)).render_depth(o["canon_depth"], R, t)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert (view_depth[inner] - o["canon_depth"][inner]).abs().max() < 1e-4

    # The whole generation path (2x supersampled, pooled, masked) with an identity view gives the
    # canonical depth on the object, and background outside it.
    cfg = SyntheticConfig()
    g = torch.Generator()
    g.manual_seed(0)
    p = sample_params(4, cfg, g)
    for key in ("pitch", "yaw", "roll", "trans"):
        p[key] = torch.zeros_like(p[key])
    g.manual_seed(0)
    canon = sample_objects(4, cfg, g)
    out = render_objects(p, cfg)
    obj = out["object"]
    inside = canon["canon_mask"] > 0.5
    assert (obj == inside).float().mean() > 0.99
    both = obj & inside
    err = (out["depth"] - canon["canon_depth"]).abs()[both]
    assert err.mean() < 1e-3 and err.max() < 6e-3
    assert (out["depth"][~obj] > 1.1).all()


def test_layout_and_files(small_set):
    root, cfg, counts = small_set
    assert counts == {"train": 6, "val": 3, "test": 3}
    for split, n in counts.items():
        images = sorted((root / split / "image").glob("*_image.png"))
        depths = sorted((root / split / "depth").glob("*_depth.png"))
        assert len(images) == n and len(depths) == n
        assert [p.name[: -len("_image.png")] for p in images] == [p.name[: -len("_depth.png")] for p in depths]
        for p in images:
            with Image.open(p) as im:
                assert im.mode == "RGB" and im.size == (64, 64)
    # The project's reader takes the folder as it is.
    folder = SynfaceFolder(root, "val")
    assert len(folder) == 3 and folder[0]["image"].shape == (3, 64, 64) and folder[0]["depth"].shape == (64, 64)


def test_depth_pngs_encode_object_and_background(small_set):
    root, _, _ = small_set
    for path in sorted((root / "train" / "depth").glob("*_depth.png")):
        raw = np.asarray(Image.open(path))
        byte = raw[..., 0]
        assert (raw == byte[..., None]).all()
        depth = decode_depth_png(raw)
        obj = byte > 0
        # Background is exactly byte 0 (1.1, far) and is what the evaluation masks out.
        assert np.allclose(depth[~obj], 1.1)
        mask_gt = depth < depth.max()
        assert (mask_gt == obj).all()
        assert depth[obj].min() >= 0.9 and depth[obj].max() < 1.1
        # The object covers a reasonable part of the frame, is not a constant, and is near 0.9.
        assert 0.2 < obj.mean() < 0.8
        assert depth[obj].std() > 0.008
        assert depth[obj].min() < 0.95
        # Border rows/columns are mostly background (the object sits inside the frame).
        border = np.concatenate([byte[0], byte[-1], byte[:, 0], byte[:, -1]])
        assert (border == 0).mean() > 0.7


def test_images_look_like_lit_objects_on_background(small_set):
    root, _, _ = small_set
    for path in sorted((root / "train" / "image").glob("*_image.png")):
        name = path.name[: -len("_image.png")]
        image = np.asarray(Image.open(path)).astype(np.float64)
        obj = np.asarray(Image.open(root / "train" / "depth" / f"{name}_depth.png"))[..., 0] > 0
        lum = image.mean(axis=2)
        assert lum.max() - lum.min() > 60  # a real range of values
        assert lum[obj].std() > 5  # shading and albedo vary across the object
        # Default background is black; the object is brighter than it.
        far = ~obj
        far[1:-1, 1:-1] &= ~obj[:-2, 1:-1] & ~obj[2:, 1:-1] & ~obj[1:-1, :-2] & ~obj[1:-1, 2:]
        assert image[far].max() <= 2
        assert lum[obj].mean() > 20


def test_views_and_images_vary(small_set):
    root, _, _ = small_set
    depths = np.stack([np.asarray(Image.open(p))[..., 0] for p in sorted((root / "train" / "depth").glob("*.png"))])
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "train" / "image").glob("*.png"))])
    assert len({d.tobytes() for d in depths}) == len(depths)
    assert images.astype(float).std(axis=0).mean() > 10
    # Yaw moves the object's silhouette: centroids of the masks differ between images.
    cols = [np.nonzero(d)[1].mean() for d in depths]
    assert max(cols) - min(cols) > 1.0


def test_generation_is_deterministic_and_independent_of_batching(tmp_path, small_set):
    root, cfg, _ = small_set
    other = SyntheticConfig(**SMALL, seed=3, batch_size=2)
    generate_synface(str(tmp_path / "a"), other, splits=("val",))
    cmp = filecmp.dircmp(root / "val" / "image", tmp_path / "a" / "val" / "image")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    cmp = filecmp.dircmp(root / "val" / "depth", tmp_path / "a" / "val" / "depth")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    # A different seed gives different data; splits differ from each other.
    generate_synface(str(tmp_path / "b"), SyntheticConfig(**SMALL, seed=4), splits=("val",))
    a = (root / "val" / "image" / "000000_image.png").read_bytes()
    assert a != (tmp_path / "b" / "val" / "image" / "000000_image.png").read_bytes()
    assert a != (root / "test" / "image" / "000000_image.png").read_bytes()


def test_main_generate(tmp_path):
    torch.set_num_threads(2)
    try:
        counts = main_generate(str(tmp_path), image_size=32, num_train=2, num_val=1, num_test=0, seed=0)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert counts == {"train": 2, "val": 1, "test": 0}
    with Image.open(tmp_path / "train" / "image" / "000001_image.png") as im:
        assert im.size == (32, 32)
    assert Path(tmp_path / "val" / "depth" / "000000_depth.png").exists()
    assert threads == 2  # generation restores the caller's thread count


def test_the_models_own_renderer_explains_the_data():
    """A zero-loss solution exists: the sampled canonical depth, albedo, light and view, rendered
    by the model's 64 px renderer as the model does, reproduce the generated image on the object."""
    from trainer.render.renderer import Renderer, RendererConfig

    cfg = SyntheticConfig()
    g = torch.Generator()
    g.manual_seed(11)
    p = sample_params(8, cfg, g)
    g.manual_seed(11)
    o = sample_objects(8, cfg, g)
    out = render_objects(p, cfg)
    assert torch.equal(out["view"], o["view"]) and torch.equal(out["light"], o["light"])

    renderer = Renderer(RendererConfig(image_size=64))
    R, t = geometry.view_to_rotation_translation(o["view"], max_angle_degrees=60, xy_range=0.1, z_range=0)
    light = o["light"]
    direction = torch.cat([light[:, 2:], torch.ones(8, 1)], 1)
    direction = direction / direction.norm(dim=1, keepdim=True)
    canon_image, _ = renderer.shade(
        o["canon_albedo"], renderer.normals(o["canon_depth"]), (light[:, 0] + 1) / 2, (light[:, 1] + 1) / 2, direction
    )
    view_depth = renderer.render_depth(o["canon_depth"], R, t)
    image = renderer.warp_canonical(canon_image, view_depth, R, t)
    # Compare away from the silhouette (anti-aliasing and the background blend differ there).
    obj = out["object"].float()[:, None]
    inner = (-torch.nn.functional.max_pool2d(-obj, 5, 1, 2))[:, 0] > 0.5
    err = (image.clamp(-1, 1) - out["image"]).abs().mean(1)[inner]
    assert err.mean() < 0.03
    derr = (view_depth - out["depth"]).abs()[inner]
    assert derr.mean() < 2e-3
    assert renderer.recon_mask(view_depth)[out["object"]].min() == 1


@pytest.mark.parametrize("background", ["plain", "noise"])
def test_backgrounds(background):
    cfg = SyntheticConfig(background=background)
    g = torch.Generator()
    g.manual_seed(0)
    out = render_objects(sample_params(4, cfg, g), cfg)
    black = SyntheticConfig()
    g.manual_seed(0)
    ref = render_objects(sample_params(4, black, g), black)
    # The background choice changes only the background: same objects, same depth.
    assert torch.equal(out["depth"], ref["depth"]) and torch.equal(out["object"], ref["object"])
    obj = out["object"][:, None].expand(-1, 3, -1, -1)
    far = ~(torch.nn.functional.max_pool2d(out["object"][:, None].float(), 5, 1, 2)[:, 0] > 0)
    bg = out["image"].permute(0, 2, 3, 1)[far]
    assert bg.mean() > -0.9  # not black
    per_image = [out["image"][i][:, far[i]].std(dim=1).max() for i in range(4)]
    if background == "plain":
        assert max(per_image) < 1e-5
    else:
        assert min(per_image) > 0.02
    inner = obj & (-torch.nn.functional.max_pool2d(-out["object"][:, None].float(), 5, 1, 2) > 0.5).expand(-1, 3, -1, -1)
    assert torch.allclose(out["image"][inner], ref["image"][inner], atol=1e-6)


def test_config_is_validated():
    with pytest.raises(ValueError):
        SyntheticConfig(background="checkerboard")
    with pytest.raises(ValueError):
        SyntheticConfig(base_depth_range=(1.05, 1.2))
    assert math.isclose(SyntheticConfig().max_yaw_degrees, 30.0)


def test_skin_hues_change_only_the_base_colour():
    any_hue, skin = SyntheticConfig(), SyntheticConfig(albedo_hues="skin")
    g = torch.Generator()
    g.manual_seed(0)
    p_any = sample_params(16, any_hue, g)
    g.manual_seed(0)
    p_skin = sample_params(16, skin, g)
    # The same random draws: every parameter but the hue is identical, the hue is mapped into [0, 0.1].
    assert all(torch.equal(p_any[k], p_skin[k]) for k in p_any if k != "hue")
    assert torch.allclose(p_skin["hue"], p_any["hue"] * 0.1) and p_any["hue"].max() > 0.5
    base = _hsv_to_rgb(p_skin["hue"], p_skin["sat"], p_skin["val"])
    assert (base[:, 0] >= base[:, 1]).all() and (base[:, 1] >= base[:, 2]).all()  # reds to oranges
    with pytest.raises(ValueError, match="albedo_hues"):
        SyntheticConfig(albedo_hues="blue")
