"""`unsup3d demo` on real photos that ship inside scikit-image: panels, textured meshes, GIFs.

The checkpoint is made by the public training entry point (`unsup3d train`, one step of a tiny
model), so these tests follow whatever format training writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main as cli_main
from trainer.results.demo import LIGHTS, DemoOptions, load_photo, summary_size
from trainer.results.mesh import write_textured_mesh
from trainer.render.geometry import intrinsics
from trainer.data.synface import ImageSizeError

TILE, GIF_FRAMES, YAWS = 64, 6, (-30.0, 0.0, 30.0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_trained_run):
    return tiny_trained_run / "checkpoints"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos of other sizes and formats: skimage's astronaut (512x512 PNG) and chelsea the cat
    (451x300, saved as JPEG), loaded from the installed package with no download."""
    from skimage import data  # the test extra installs scikit-image; its sample photos ship in the wheel

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image extension
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # skipped and reported
    return folder


@pytest.fixture(scope="module")
def demo_out(tiny_checkpoint, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    argv = ["demo", "--checkpoint", str(tiny_checkpoint), "--input", str(photos), "--out", str(out),
            "--device", "cpu", "--tile", str(TILE), "--gif-frames", str(GIF_FRAMES),
            "--yaws=" + ",".join(str(y) for y in YAWS)]
    assert cli_main(argv) == 0
    return out


def read_obj(path: Path) -> dict:
    """A small OBJ parser, independent of trainer.results.mesh: v, vt, vn, faces (1-based triples), mtllib, usemtl."""
    parsed = {"v": [], "vt": [], "vn": [], "f": [], "mtllib": None, "usemtl": None}
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        key, rest = parts[0], parts[1:]
        if key in ("v", "vt", "vn"):
            parsed[key].append([float(x) for x in rest])
        elif key == "f":
            parsed["f"].append([tuple(int(i) for i in corner.split("/")) for corner in rest])
        elif key in ("mtllib", "usemtl"):
            parsed[key] = rest[0]
    return parsed


def test_demo_writes_every_panel_at_the_tile_size(demo_out):
    summary = json.loads((demo_out / "demo.json").read_text())
    assert summary["images"] == 2 and set(summary["outputs"]) == {"astronaut", "chelsea"}
    assert list(summary["skipped"]) == [str(Path(summary["outputs"]["astronaut"]["input"]).parent / "broken.png")]
    assert summary["device"] == "cpu"
    expected = {"input", "recon", "recon_flip", "canonical", "albedo", "depth", "normals", "shading",
                "conf_photometric", "conf_photometric_flip", "conf_perceptual", "conf_perceptual_flip"}
    expected |= {f"relight_{name}" for name, _, _ in LIGHTS}
    expected |= {"view_yaw-30", "view_yaw+0", "view_yaw+30"}
    for name in ("astronaut", "chelsea"):
        folder = demo_out / name
        assert {Path(p).stem for p in summary["outputs"][name]["panels"]} == expected
        for stem in expected:
            with Image.open(folder / f"{stem}.png") as img:
                assert img.size == (TILE, TILE) and img.mode == "RGB", stem
        with Image.open(folder / "summary.png") as img:
            assert img.size == summary_size(DemoOptions(tile=TILE, yaws=YAWS))


def test_the_panels_show_the_photo_and_the_views_turn(demo_out, photos):
    folder = demo_out / "astronaut"
    shown = np.asarray(Image.open(folder / "input.png"), dtype=np.float64)
    photo = np.asarray(Image.open(photos / "astronaut.png").resize((TILE, TILE), Image.LANCZOS), dtype=np.float64)
    assert np.abs(shown - photo).mean() < 12  # the input panel is the photo at the model's resolution
    front = np.asarray(Image.open(folder / "view_yaw+0.png"), dtype=np.float64)
    side = np.asarray(Image.open(folder / "view_yaw+30.png"), dtype=np.float64)
    assert np.abs(front - side).mean() > 1  # another view, not a copy


def test_the_mesh_loads_back_with_the_grid_counts_and_uvs_in_the_unit_square(demo_out):
    folder = demo_out / "chelsea"
    obj = read_obj(folder / "mesh.obj")
    size = 64
    assert len(obj["v"]) == size * size and all(len(v) == 3 for v in obj["v"])
    assert len(obj["vt"]) == size * size and len(obj["vn"]) == size * size
    assert len(obj["f"]) == 2 * (size - 1) * (size - 1)
    uv = np.array(obj["vt"])
    assert uv.min() >= 0 and uv.max() <= 1
    faces = np.array([[corner[0] for corner in face] for face in obj["f"]])
    assert faces.min() == 1 and faces.max() == size * size
    assert all(len(corner) == 3 for face in obj["f"] for corner in face)  # v/vt/vn everywhere
    # the material file names the texture, which is the albedo at the model's resolution
    mtl = (folder / obj["mtllib"]).read_text().split()
    assert obj["usemtl"] in mtl and "map_Kd" in mtl
    texture = mtl[mtl.index("map_Kd") + 1]
    with Image.open(folder / texture) as img:
        assert img.size == (size, size)


def test_mesh_geometry_faces_the_viewer_and_matches_the_camera(tmp_path):
    size = 16
    depth = torch.full((size, size), 1.05)
    depth[4:12, 4:12] = 0.95  # a raised square
    K = intrinsics(size, dtype=torch.float64)
    from trainer.render.geometry import depth_to_normals

    normals = depth_to_normals(depth[None].double(), K)[0]
    albedo = torch.zeros(3, size, size)
    files = write_textured_mesh(tmp_path / "m.obj", depth, albedo, K, normals)
    assert (files.vertices, files.faces) == (size * size, 2 * (size - 1) ** 2)
    obj = read_obj(files.obj)
    v = np.array(obj["v"])
    # pixel (row 0, col 0) back-projected: x = -c/f d, y = -c/f d (camera), flipped to y-up, z about 1 - d
    f, c = float(K[0, 0]), float(K[0, 2])
    assert np.allclose(v[0], [-c / f * 1.05, c / f * 1.05, 1 - 1.05], atol=1e-5)
    # every face is wound counter-clockwise seen from +z (the viewer), agreeing with the vertex normals
    tri = np.array([[v[i - 1] for i, _, _ in face] for face in obj["f"]])
    face_normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flat = np.abs(face_normal[:, 2]) > 0.9 * np.linalg.norm(face_normal, axis=1)
    assert flat.sum() > 0 and (face_normal[flat, 2] > 0).all()
    vn = np.array(obj["vn"])
    assert np.allclose(vn[0], [0, 0, 1]) and (vn[:, 2] >= 0).all()


def test_the_gif_has_the_expected_frames(demo_out):
    with Image.open(demo_out / "astronaut" / "rotation.gif") as gif:
        assert gif.n_frames == GIF_FRAMES
        assert gif.size == (2 * TILE, TILE)
        assert gif.info.get("loop") == 0
    summary = json.loads((demo_out / "demo.json").read_text())
    assert summary["outputs"]["astronaut"]["gif"] == {"file": "rotation.gif", "frames": GIF_FRAMES}
    with Image.open(demo_out / "astronaut" / "rotation.gif") as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.float64))
    assert np.abs(frames[1] - frames[0]).mean() > 0.5  # it moves


def test_photos_of_any_size_become_model_inputs(tmp_path):
    Image.new("RGB", (300, 120), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("L", (17, 40), 0).save(tmp_path / "small_gray.bmp")
    wide = load_photo(tmp_path / "wide.png", 64)
    with pytest.raises(ImageSizeError, match="too_small"):  # 17 px: below half the model's 64 px by default
        load_photo(tmp_path / "small_gray.bmp", 64)
    gray = load_photo(tmp_path / "small_gray.bmp", 64, min_size=16)
    assert wide.shape == gray.shape == (3, 64, 64)
    assert torch.allclose(wide[0], torch.ones(64, 64)) and torch.allclose(gray, -torch.ones(3, 64, 64))


def test_demo_without_readable_images_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_bytes(b"no jpeg")
    code = cli_main(["demo", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "in"),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no readable images" in err and str(tmp_path / "in") in err
    assert cli_main(["demo", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "out")]) == 2
    assert cli_main(["demo", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "in"),
                     "--out", str(tmp_path / "out"), "--yaws", "left"]) == 2


def test_gif_yaws_never_repeat_a_frame_and_reach_both_sides():
    from trainer.results.demo import gif_yaws

    for n in range(2, 41):
        yaws = gif_yaws(DemoOptions(gif_frames=n, gif_max_yaw=45.0))
        assert len(yaws) == n
        assert all(abs(yaws[i] - yaws[(i + 1) % n]) > 1e-6 for i in range(n)), n
        if n >= 4:
            assert max(yaws) > 30 and min(yaws) < -30, n


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_asking_for_cuda_without_one_is_a_clear_error(tiny_checkpoint, photos, tmp_path, capsys):
    assert cli_main(["demo", "--checkpoint", str(tiny_checkpoint), "--input", str(photos), "--out",
                     str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
