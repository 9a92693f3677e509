"""Synface-layout folders: the depth encoding, writing, reading, and what other tools' files look like."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.synface import SynfaceError, SynfaceFolder, decode_depth_png, encode_depth_png, write_sample

S = 8  # small images keep these tests fast


def sample(seed, size=S):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    depth = np.full((size, size), 1.1)
    depth[2:-2, 2:-2] = 0.9 + 0.15 * rng.random((size - 4, size - 4))
    return image, depth


@pytest.fixture
def folder(tmp_path):
    for i, name in enumerate(["b", "a", "c"]):
        write_sample(tmp_path, "test", name, *sample(i))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# encoding


def test_depth_encoding_endpoints():
    # white (255) = 0.9 near, black (0) = 1.1 far; background 1.1 is exactly byte 0
    enc = encode_depth_png(np.array([[0.9, 1.0, 1.1, 1.3, 0.5]]))
    assert enc.shape == (1, 5, 3) and enc.dtype == np.uint8
    # 1.0 -> x = 0.5 -> 127.5, rounded half to even: 128; out-of-range values clamp
    assert enc[0, :, 0].tolist() == [255, 128, 0, 0, 255]
    assert (enc[..., 0] == enc[..., 1]).all() and (enc[..., 0] == enc[..., 2]).all()
    dec = decode_depth_png(enc)
    assert dec[0, 0] == pytest.approx(0.9) and dec[0, 2] == pytest.approx(1.1)


def test_depth_round_trip_within_half_a_step():
    d = np.linspace(0.9, 1.1, 101).reshape(1, -1)
    back = decode_depth_png(encode_depth_png(d))
    assert np.abs(back - d).max() <= 0.2 / 255 / 2 + 1e-6  # half a byte step
    # values on the byte grid round-trip (up to float32)
    grid = decode_depth_png(np.arange(256, dtype=np.uint8)[None])
    np.testing.assert_allclose(decode_depth_png(encode_depth_png(grid)), grid, atol=1e-6)


def test_decode_formula():
    # byte 51: x = 0.2, d = 1 + 0.1 ((1 - 0.2) 2 - 1) = 1.06
    assert decode_depth_png(np.array([[51]], dtype=np.uint8))[0, 0] == pytest.approx(1.06)


# ---------------------------------------------------------------------------------------------
# reading what was written


def test_round_trip_sorted_by_name(folder):
    data = SynfaceFolder(folder, "test", image_size=S)
    assert len(data) == 3 and [data[i]["name"] for i in range(3)] == ["a", "b", "c"]
    image, depth = sample(1)  # "a" was written from seed 1
    item = data[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
    torch.testing.assert_close(item["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1)
    assert item["depth"].shape == (S, S)
    np.testing.assert_allclose(item["depth"].numpy(), depth, atol=0.2 / 255 / 2 + 1e-6)
    assert (item["depth"][0] == decode_depth_png(np.zeros((1, 1), np.uint8))[0, 0]).all()  # background


def test_batches(folder):
    batches = list(SynfaceFolder(folder, "test", image_size=S).batches(2))
    assert [b["name"] for b in batches] == [["a", "b"], ["c"]]
    assert batches[0]["image"].shape == (2, 3, S, S) and batches[0]["depth"].shape == (2, S, S)
    assert len(list(SynfaceFolder(folder, "test", image_size=S).batches(2, drop_last=True))) == 1


def test_extra_files_are_ignored(folder):
    (folder / "test" / "image" / "notes.txt").write_text("hello")
    (folder / "test" / "image" / "a_image.jpg").write_bytes(b"x")
    (folder / "test" / "image" / "._a_image.png").write_bytes(b"mac resource fork")
    (folder / "test" / "README").write_text("x")
    assert len(SynfaceFolder(folder, "test", image_size=S)) == 3


def test_images_only(folder):
    (folder / "test" / "image" / "d_image.png").write_bytes((folder / "test" / "image" / "a_image.png").read_bytes())
    data = SynfaceFolder(folder, "test", image_size=S, load_depth=False)
    assert len(data) == 4 and "depth" not in data[0]


# ---------------------------------------------------------------------------------------------
# errors and skipping


def test_missing_split_names_the_path(tmp_path):
    with pytest.raises(SynfaceError, match=str(tmp_path / "val")):
        SynfaceFolder(tmp_path, "val")


def test_missing_depth_folder_names_the_path(folder):
    for p in (folder / "test" / "depth").iterdir():
        p.unlink()
    (folder / "test" / "depth").rmdir()
    with pytest.raises(SynfaceError, match="depth"):
        SynfaceFolder(folder, "test", image_size=S)


def test_missing_depth_raises_or_skips(folder, caplog):
    missing = folder / "test" / "depth" / "b_depth.png"
    missing.unlink()
    with pytest.raises(SynfaceError, match="b_image.png"):
        SynfaceFolder(folder, "test", image_size=S)
    with caplog.at_level(logging.WARNING, logger="trainer.data.synface"):
        data = SynfaceFolder(folder, "test", image_size=S, on_error="skip")
    assert [data[i]["name"] for i in range(len(data))] == ["a", "c"]
    assert data.skipped == {"missing_depth": 1}
    assert "b_image.png" in caplog.text


def test_missing_image_raises_or_skips(folder):
    (folder / "test" / "image" / "c_image.png").unlink()
    with pytest.raises(SynfaceError, match="c_depth.png"):
        SynfaceFolder(folder, "test", image_size=S)
    assert SynfaceFolder(folder, "test", image_size=S, on_error="skip").skipped == {"missing_image": 1}


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_png_raises_or_skips(folder, caplog, kind):
    bad = folder / "test" / "image" / "b_image.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not a png at all" if kind == "garbage" else data[: len(data) // 2])
    strict = SynfaceFolder(folder, "test", image_size=S)  # lazy: the listing is fine
    with pytest.raises(SynfaceError, match="b_image.png"):
        strict[1]
    with caplog.at_level(logging.WARNING, logger="trainer.data.synface"):
        lenient = SynfaceFolder(folder, "test", image_size=S, on_error="skip")
    assert len(lenient) == 2 and lenient.skipped == {"unreadable_image": 1}
    assert "b_image.png" in caplog.text


def test_corrupt_depth_is_skipped(folder):
    (folder / "test" / "depth" / "a_depth.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = SynfaceFolder(folder, "test", image_size=S, on_error="skip")
    assert data.skipped == {"unreadable_depth": 1} and len(data) == 2


def test_bad_on_error_value(folder):
    with pytest.raises(ValueError, match="on_error"):
        SynfaceFolder(folder, "test", on_error="ignore")


# ---------------------------------------------------------------------------------------------
# files written by other tools


def test_other_modes_and_sizes(tmp_path):
    root = tmp_path / "other"
    (root / "test" / "image").mkdir(parents=True)
    (root / "test" / "depth").mkdir(parents=True)
    img_dir, dep_dir = root / "test" / "image", root / "test" / "depth"
    big = 2 * S

    # RGBA image (alpha dropped) with a single-channel 'L' depth
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba).save(img_dir / "a_image.png")
    Image.fromarray(np.full((S, S), 255, np.uint8)).save(dep_dir / "a_depth.png")

    # grayscale image at twice the size (bilinear down keeps a constant colour) and a 16-bit depth
    Image.fromarray(np.full((big, big), 51, np.uint8)).save(img_dir / "b_image.png")
    depth16 = np.zeros((big, big), np.uint16)
    depth16[: big // 2] = 65535  # top half near (0.9), bottom half background (1.1)
    Image.fromarray(depth16).save(dep_dir / "b_depth.png")
    assert Image.open(dep_dir / "b_depth.png").mode.startswith("I")

    # palette image and an RGB depth with a foreground step, both at twice the size
    Image.fromarray(np.full((big, big, 3), 255, np.uint8)).convert("P").save(img_dir / "c_image.png")
    step = np.zeros((big, big, 3), np.uint8)
    step[:, : big // 2] = 128
    Image.fromarray(step).save(dep_dir / "c_depth.png")

    # 16-bit grayscale image: scaled to 8 bits, not clipped
    Image.fromarray(np.full((S, S), 65535, np.uint16)).save(img_dir / "d_image.png")
    Image.fromarray(np.zeros((S, S), np.uint8)).save(dep_dir / "d_depth.png")

    data = SynfaceFolder(root, "test", image_size=S)
    a, b, c, d = (data[i] for i in range(4))
    for item in (a, b, c, d):
        assert item["image"].shape == (3, S, S) and item["depth"].shape == (S, S)
    # RGBA -> RGB: 200 / 127.5 - 1 = 0.568627 in channel 0, 0 -> -1 elsewhere
    assert a["image"][0].allclose(torch.tensor(200 / 127.5 - 1)) and a["image"][1:].eq(-1).all()
    assert a["depth"].allclose(torch.tensor(0.9))
    # grayscale -> RGB, resized: still 51 everywhere
    assert b["image"].allclose(torch.tensor(51 / 127.5 - 1), atol=1e-6)
    # 16-bit depth: 65535 -> 0.9, 0 -> 1.1; nearest resize keeps only those two values
    assert b["depth"].unique().numel() == 2
    assert b["depth"][: S // 2].allclose(torch.tensor(0.9)) and b["depth"][S // 2 :].allclose(torch.tensor(1.1))
    # palette white -> 1.0; the depth step stays sharp after the nearest resize
    assert c["image"].allclose(torch.tensor(1.0))
    # byte 128: d = 1 + 0.1 ((1 - 128/255) 2 - 1) = 0.999608
    assert c["depth"][:, : S // 2].allclose(torch.tensor(0.999608)) and c["depth"][:, S // 2 :].allclose(torch.tensor(1.1))
    # 16-bit white image -> 255 -> 1.0
    assert d["image"].allclose(torch.tensor(1.0))
