"""Bounded memory on any input (issue 15, item 3): prepare, evaluate, demo and the training folder read
each image's size from its header before decoding; images above the pixel limit or below the minimum
size are skipped, counted and named; evaluate skips depth maps of another size than their image."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main as cli_main

GIANT = 12000  # 144 M pixels: 432 MB as RGB if it were ever decoded
# Our own header check replaces PIL's decompression-bomb warning (which would add lines to stderr).
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")


def giant_png(path: Path, side: int = GIANT) -> Path:
    """A valid PNG header announcing side x side RGB pixels, with no pixel data: only a header check
    can call it too large (decoding it would fail as unreadable, or cost gigabytes if it were real)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def photo(path: Path, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_the_giant_header_is_what_pil_reports(tmp_path):
    with pytest.warns(Image.DecompressionBombWarning), Image.open(giant_png(tmp_path / "giant.png")) as img:
        assert img.size == (GIANT, GIANT)


def test_prepare_skips_giant_and_tiny_images_by_name(tmp_path, caplog):
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare_dataset

    photos = tmp_path / "photos"
    photos.mkdir()
    giant_png(photos / "giant.png")
    photo(photos / "tiny.png", 4)
    photo(photos / "fine.png", 64)
    caplog.set_level(logging.WARNING, logger="data_pipeline.prepare")
    manifest = prepare_dataset(PrepareConfig(source="folder", input=str(photos), output=str(tmp_path / "shards"),
                                             category="things", image_size=32))
    assert manifest.num_samples == 1
    assert manifest.dataset.prepare_skipped == {"too_large": 1, "too_small": 1}
    assert "giant.png: too_large" in caplog.text and "tiny.png: too_small" in caplog.text


def write_pair(split: Path, name: str, image_size: int, depth_size: int | None = None) -> None:
    (split / "image").mkdir(parents=True, exist_ok=True)
    (split / "depth").mkdir(parents=True, exist_ok=True)
    photo(split / "image" / f"{name}_image.png", image_size)
    depth = np.full((depth_size or image_size,) * 2, 128, dtype=np.uint8)
    Image.fromarray(depth).save(split / "depth" / f"{name}_depth.png")


def small_checkpoint(tmp_path: Path) -> Path:
    """A single-file checkpoint of an untrained small model (no training needed to evaluate one)."""
    from trainer.config import RunConfig, dump_config
    from trainer.model.config import ModelConfig
    from trainer.model.unsup3d import Unsup3D

    config = RunConfig()
    config.model = ModelConfig(depth_nf=8, albedo_nf=8, conf_nf=8, depth_zdim=16, albedo_zdim=16, conf_zdim=16,
                               light_nf=8, view_nf=8)
    path = tmp_path / "untrained.pt"
    torch.save({"model": Unsup3D(config.model).state_dict(), "config_yaml": dump_config(config), "step": 0}, path)
    return path


def test_evaluate_skips_giant_tiny_and_mismatched_pairs_by_name(tmp_path, capsys, caplog):
    test = tmp_path / "data" / "test"
    for i in range(2):
        write_pair(test, f"good{i}", 64)
    write_pair(test, "small", 48)  # above the minimum (32): upscaled, counted
    write_pair(test, "tiny", 8)  # below half of 64: skipped
    write_pair(test, "mismatch", 64, depth_size=32)
    giant_png(test / "image" / "giant_image.png")
    giant_png(test / "depth" / "giant_depth.png")
    caplog.set_level(logging.WARNING, logger="trainer.data.synface")
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(small_checkpoint(tmp_path)), "--data", str(tmp_path / "data"),
                     "--no-report", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 3 and results["upscaled"] == 1
    assert results["skipped"] == {"too_large": 1, "too_small": 1, "depth_size_mismatch": 1}
    for name in ("giant_image.png", "tiny_image.png", "mismatch_depth.png"):
        assert name in caplog.text
    capsys.readouterr()
    # the limits are options: a lower minimum keeps the tiny pair
    assert cli_main(["evaluate", "--checkpoint", str(small_checkpoint(tmp_path)), "--data", str(tmp_path / "data"),
                     "--no-report", "--output", str(out), "--min-image-size", "8"]) == 0
    assert json.loads(out.read_text())["images"] == 4
    capsys.readouterr()


def test_demo_skips_giant_and_tiny_inputs_by_name(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    giant_png(inputs / "giant.png")
    photo(inputs / "tiny.png", 3)
    photo(inputs / "fine.png", 80)
    assert cli_main(["demo", "--checkpoint", str(small_checkpoint(tmp_path)), "--input", str(inputs),
                     "--out", str(tmp_path / "out"), "--gif-frames", "2", "--tile", "32", "--yaws=0"]) == 0
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert summary["images"] == 1 and summary["skipped_by_reason"] == {"too_large": 1, "too_small": 1}
    assert "too_large" in summary["skipped"][str(inputs / "giant.png")]
    assert "too_small" in summary["skipped"][str(inputs / "tiny.png")]
    capsys.readouterr()


def test_the_training_folder_skips_and_counts_instead_of_upscaling_a_one_pixel_image(tmp_path):
    from data_pipeline.folder_cache import FolderCacheConfig, prepared_folder

    train = tmp_path / "data" / "train"
    for i in range(4):
        write_pair(train, f"good{i}", 64)
    write_pair(train, "dot", 1)
    giant_png(train / "image" / "giant_image.png", 20000)  # past PIL's own hard limit: still too_large
    giant_png(train / "depth" / "giant_depth.png", 20000)
    entry = prepared_folder(FolderCacheConfig(root=str(tmp_path / "data"), image_size=64))
    assert entry.manifest.dataset.prepare_skipped == {"too_small": 1, "too_large": 1}
    assert entry.manifest.num_samples == 4
    assert sorted(entry.skipped) == ["train/image/dot_image.png", "train/image/giant_image.png"]
