"""The realistic face generator: MakeHuman's CC0 head, written in the synface layout with its truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.face_generator import generate_faces, read_truth
from trainer.data.face_render import render_faces
from trainer.data.face_sampling import FaceConfig, _rng, sample_face
from trainer.data.head_model import load_head_model
from trainer.render import geometry
from trainer.render.renderer import Renderer, RendererConfig
from trainer.data.synface import FAR_DEPTH, NEAR_DEPTH, SynfaceFolder


@pytest.fixture(scope="module")
def head():
    return load_head_model()


def _people(head, cfg, n, split="train", **override):
    params = [sample_face(head, cfg, _rng(cfg.seed, split, i)) for i in range(n)]
    for p in params:
        p.update(override)
    return params


def test_head_model_has_a_head_with_its_parts(head):
    assert head.vertices.shape[1] == 3 and head.triangles.max() < head.num_vertices
    assert head.basis.shape[1:] == head.vertices.shape
    # Identity sliders of every facial region, sided ones for both sides; expressions of 3 ethnic variants.
    names = {s.name for s in head.identity}
    assert any("nose" in n for n in names) and any("chin" in n for n in names) and any("eye" in n for n in names)
    assert {s.side for s in head.identity} == {"", "l", "r"}
    assert all(len(units) > 20 and "mouth-open" in units for units in head.expression.values())
    for region in ("lips", "brows", "sclera", "iris", "pupil", "teeth"):
        assert head.regions[region].max() == 1.0, region
    # The mesh is left-right symmetric: MakeHuman's base is, and the generator's symmetry depends on it.
    v = head.vertices
    mirrored = v * np.array([-1, 1, 1], np.float32)
    nearest = np.min(np.linalg.norm(v[:500, None] - mirrored[None], axis=-1), axis=1)
    assert np.quantile(nearest, 0.95) < 1e-3


def test_generate_writes_the_synface_layout_deterministically_at_64_and_128(tmp_path):
    for size in (64, 128):
        a, b = tmp_path / f"a{size}", tmp_path / f"b{size}"
        generate_faces(str(a), FaceConfig(image_size=size, num_train=5, num_val=0, num_test=3, batch_size=4))
        generate_faces(str(b), FaceConfig(image_size=size, num_train=5, num_val=0, num_test=3, batch_size=2))
        for split, n in (("train", 5), ("test", 3)):
            folder = SynfaceFolder(str(a), split, image_size=size)
            assert len(folder) == n
            for name in ("000000", f"{n - 1:06d}"):
                for kind in ("image", "depth"):
                    pa = a / split / kind / f"{name}_{kind}.png"
                    pb = b / split / kind / f"{name}_{kind}.png"
                    assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb))), pa
            item = folder[0]
            depth = item["depth"]
            face = depth < FAR_DEPTH
            # A face fills a good part of the frame, inside the model's depth range, nose nearest.
            assert 0.3 < face.float().mean() < 0.9
            assert NEAR_DEPTH <= depth[face].min() < 0.95 and depth[face].max() < FAR_DEPTH
            truth = read_truth(str(a), split)
            assert list(truth["names"]) == [f"{i:06d}" for i in range(n)]
            assert truth["view"].shape == (n, 6) and truth["light"].shape == (n, 4)
            assert truth["canonical_depth"].shape == (n, size, size)
        assert not (a / "val").exists() or read_truth(str(a), "val") is None


def test_another_seed_gives_other_people(head):
    cfg = FaceConfig()
    a = sample_face(head, cfg, _rng(0, "train", 0))
    b = sample_face(head, FaceConfig(seed=1), _rng(1, "train", 0))
    assert not np.allclose(a["weights"], b["weights"])


def test_poses_and_lights_cover_the_configured_ranges(head):
    cfg = FaceConfig(max_yaw_degrees=40, max_pitch_degrees=20, max_roll_degrees=10)
    p = _people(head, cfg, 200)
    yaw, pitch, roll = (np.array([q[k] for q in p]) for k in ("yaw", "pitch", "roll"))
    assert np.abs(yaw).max() <= 40 and np.abs(yaw).max() > 35
    assert np.abs(pitch).max() <= 20 and np.abs(roll).max() <= 10
    # Most people have hair; some expressions are asymmetric: weights of left/right units differ.
    assert 0.6 < np.mean([q["has_hair"] for q in p]) < 0.95


def test_frontal_canonical_depth_equals_the_view_depth_and_pose_turns_the_face(head):
    cfg = FaceConfig(image_size=64, render_scale=1, max_translation=0.0)
    p = _people(head, cfg, 2, yaw=0.0, pitch=0.0, roll=0.0)
    out = render_faces(head, p, cfg)
    assert torch.allclose(out["depth"], out["canonical_depth"])
    # The model's own renderer, turning the frontal depth map by the recorded view, draws the depth
    # the generator drew for the turned face (so the recorded yaw has the model's sign and centre).
    q = _people(head, cfg, 2, yaw=25.0, pitch=-10.0, roll=5.0)
    turned = render_faces(head, q, cfg)
    renderer = Renderer(RendererConfig(image_size=64))
    R, t = geometry.view_to_rotation_translation(turned["view"], max_angle_degrees=60.0, xy_range=0.1, z_range=0.0)
    redrawn = renderer.render_depth(out["canonical_depth"].clamp(max=1.1), R, t)
    for i in range(2):
        inner = turned["depth"][i] < 1.04  # the face, away from where the background plane can come
        err_model = (turned["depth"][i] - redrawn[i])[inner].abs().median()
        err_frontal = (turned["depth"][i] - out["depth"][i])[inner].abs().median()
        assert err_model < 0.004 and err_frontal > 2 * err_model, (err_model, err_frontal)


def test_light_is_inside_the_models_lambertian_model(head):
    """The generator's shading is what the model's renderer computes from the true depth with the true
    light, and not what it computes with the light mirrored (so the direction's sign convention holds)."""
    cfg = FaceConfig(image_size=64, render_scale=1)
    p = _people(head, cfg, 4, yaw=0.0, pitch=0.0, roll=0.0, trans=np.zeros(2), k_ambient=0.2, k_diffuse=0.8,
                light_xy=np.array([0.7, -0.5]))
    out = render_faces(head, p, cfg)
    renderer = Renderer(RendererConfig(image_size=64))
    normals = renderer.normals(out["canonical_depth"].clamp(max=1.1))
    face = out["depth"] < 1.05
    inner = face.clone()
    inner[:, 1:-1, 1:-1] &= face[:, :-2, 1:-1] & face[:, 2:, 1:-1] & face[:, 1:-1, :-2] & face[:, 1:-1, 2:]

    def model_shading(light_xy):
        direction = torch.nn.functional.normalize(torch.tensor([*light_xy, 1.0]), dim=0)
        return 0.2 + 0.8 * (normals * direction).sum(-1).clamp_min(0)

    right, mirrored = model_shading([0.7, -0.5]), model_shading([-0.7, -0.5])
    for i in range(4):
        got = out["shading"][i][inner[i]]
        corr = torch.corrcoef(torch.stack([got, right[i][inner[i]]]))[0, 1]
        corr_mirrored = torch.corrcoef(torch.stack([got, mirrored[i][inner[i]]]))[0, 1]
        assert corr > 0.8 and corr_mirrored < corr - 0.3, (corr, corr_mirrored)
        assert (got - right[i][inner[i]]).abs().median() < 0.08
