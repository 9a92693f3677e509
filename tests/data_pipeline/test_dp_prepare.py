"""prepare: every source, the shard/manifest/index format, and that DALI's own reader accepts the tars."""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp_helpers import encode, make_synface, png16_rgb, random_rgb
from data_pipeline.cli import add_prepare_subcommand
from data_pipeline.config import LoaderConfig, PrepareConfig
from trainer.config_loading import ConfigError, from_dict, load_yaml_config
from data_pipeline.prepare import crop_with_replicate, prepare_dataset, prepare_synthetic
from data_pipeline.shards import Manifest, encode_tar


def read_manifest(folder: Path) -> Manifest:
    return Manifest.from_json((folder / "manifest.json").read_text())


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_folder_source_converts_skips_and_shards(tmp_path, caplog):
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    (photos / "sub dir").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(encode(random_rgb(rng, 30, 40), "JPEG"))  # landscape: centre square
    (photos / "b.png").write_bytes(encode(random_rgb(rng, 24, 24), "PNG", mode="L"))  # grayscale
    (photos / "c.png").write_bytes(encode(np.dstack([random_rgb(rng, 24, 24), np.full((24, 24), 9, np.uint8)])))
    (photos / "d.jpg").write_bytes(encode(random_rgb(rng, 24, 24), "JPEG", mode="CMYK"))
    (photos / "e.png").write_bytes(png16_rgb(np.full((24, 24, 3), 0xABCD, np.uint16)))
    (photos / "sub dir" / "f.bmp").write_bytes(encode(random_rgb(rng, 24, 30), "BMP"))
    (photos / "sub dir" / "g.jpg").write_bytes(encode(random_rgb(rng, 24, 24), "JPEG")[:200])  # truncated
    (photos / "h.jpg").write_bytes(b"not an image at all")
    (photos / "notes.txt").write_text("ignored")
    out = tmp_path / "shards"
    manifest = prepare_dataset(PrepareConfig(source="folder", input=str(photos), output=str(out), category="dogs",
                                             samples_per_shard=2, image_size=20))
    assert manifest.num_samples == 6
    assert [s.samples for s in manifest.shards] == [2, 2, 2]
    dataset = manifest.dataset
    assert (dataset.category, dataset.split, dataset.image_size, dataset.image_ext) == ("dogs", "train", 20, "jpg")
    assert dataset.source["kind"] == "folder" and not dataset.has_depth
    assert dataset.prepare_skipped == {"truncated_image": 1, "unreadable_image": 1}
    assert dataset.prepare_converted == {"grayscale": 1, "alpha": 1, "cmyk": 1, "16bit": 1}
    assert "sub dir/g.jpg" in caplog.text and "h.jpg" in caplog.text
    on_disk = read_manifest(out)
    assert on_disk == manifest
    for shard in manifest.shards:
        data = (out / shard.name).read_bytes()
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
        assert (out / shard.index).read_text().startswith(f"v1.2 {shard.samples}\n")
    keys = [name.split(".")[0] for shard in manifest.shards for name in tar_members(out / shard.name)]
    assert sorted(set(keys)) == ["a", "b", "c", "d", "e", "sub_dir_f"]
    with tarfile.open(out / manifest.shards[2].name) as tar:
        image = Image.open(tar.extractfile("e.jpg"))
        assert image.size == (20, 20) and image.mode == "RGB"
        assert abs(int(np.asarray(image)[10, 10, 0]) - 0xAB) <= 3  # 16-bit kept its high byte, not clipped to 255


def test_shards_are_deterministic_and_index_matches_dali_tool(tmp_path):
    from wds2idx import IndexCreator

    src = tmp_path / "syn"
    make_synface(src, 5, 16)
    outs = []
    for name in ("one", "two"):
        prepare_dataset(PrepareConfig(source="synface", input=str(src), output=str(tmp_path / name),
                                      category="faces", samples_per_shard=3))
        outs.append(read_manifest(tmp_path / name))
    assert [s.sha256 for s in outs[0].shards] == [s.sha256 for s in outs[1].shards]
    shard = tmp_path / "one" / outs[0].shards[0].name
    with IndexCreator(str(shard), str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "dali.idx").read_text() == (tmp_path / "one" / outs[0].shards[0].index).read_text()


def test_dali_webdataset_reader_accepts_the_shards(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    src = tmp_path / "syn"
    make_synface(src, 7, 16)
    out = tmp_path / "shards"
    manifest = prepare_dataset(PrepareConfig(source="synface", input=str(src), output=str(out), category="faces",
                                             samples_per_shard=3))
    paths = [str(out / s.name) for s in manifest.shards]
    indexes = [str(out / s.index) for s in manifest.shards]

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def reader():
        image, depth, meta = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=["png", "depth.png", "json"],
                                                   missing_component_behavior="error")
        return fn.decoders.image(image, output_type=types.RGB), fn.decoders.image(depth, output_type=types.GRAY), meta

    pipe = reader()
    pipe.build()
    images, depths, metas = pipe.run()
    sources = sorted(json.loads(np.array(metas[i]).tobytes())["source"] for i in range(7))
    assert sources == [f"train/image/obj{i:04d}_image.png" for i in range(7)]
    for i in range(7):
        assert np.array(images[i]).shape == (16, 16, 3) and np.array(depths[i]).shape == (16, 16, 1)


def test_synface_layout_carries_depth_channel0(tmp_path):
    src = tmp_path / "syn"
    make_synface(src, 3, 16, split="test")
    out = tmp_path / "shards"
    manifest = prepare_dataset(PrepareConfig(source="synface", input=str(src), output=str(out), category="faces",
                                             split="test", samples_per_shard=10))
    assert manifest.dataset.has_depth and manifest.dataset.components == ["depth.png", "json", "png"]
    assert manifest.dataset.image_ext == "png" and manifest.dataset.image_size == 16
    with tarfile.open(out / manifest.shards[0].name) as tar:
        stored = np.asarray(Image.open(tar.extractfile("obj0001.depth.png")))
        image = np.asarray(Image.open(tar.extractfile("obj0001.png")))
    source_depth = np.asarray(Image.open(src / "test" / "depth" / "obj0001_depth.png"))[:, :, 0]
    np.testing.assert_array_equal(stored, source_depth)
    np.testing.assert_array_equal(image, np.asarray(Image.open(src / "test" / "image" / "obj0001_image.png")))


def test_synface_missing_depth_is_skipped_and_counted(tmp_path):
    src = tmp_path / "syn"
    make_synface(src, 3, 16)
    (src / "train" / "depth" / "obj0002_depth.png").unlink()
    manifest = prepare_dataset(PrepareConfig(source="synface", input=str(src), output=str(tmp_path / "o"),
                                             category="faces"))
    assert manifest.num_samples == 2 and manifest.dataset.prepare_skipped == {"missing_depth": 1}


def test_centre_crop_presets(tmp_path):
    rng = np.random.default_rng(2)
    cats = tmp_path / "cats"
    cats.mkdir()
    big = random_rgb(rng, 190, 200)
    (cats / "big.png").write_bytes(encode(big))
    (cats / "small.png").write_bytes(encode(random_rgb(rng, 100, 120)))
    args = argparse.ArgumentParser().add_subparsers()
    parser = add_prepare_subcommand(args)
    parsed = parser.parse_args(["--source", "folder", "--preset", "cats", "--input", str(cats), "--output",
                                str(tmp_path / "out"), "--category", "cats", "--format", "png"])
    assert parsed.func(parsed) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest.dataset.image_size == 170 and manifest.num_samples == 1
    assert manifest.dataset.prepare_skipped == {"smaller_than_crop": 1}
    with tarfile.open(tmp_path / "out" / manifest.shards[0].name) as tar:
        stored = np.asarray(Image.open(tar.extractfile("big.png")))
    np.testing.assert_array_equal(stored, big[10:180, 15:185])  # torchvision CenterCrop placement


def test_celeba_bounding_boxes_with_replicate_padding(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "CelebA"
    (root / "img_celeba").mkdir(parents=True)
    images = {}
    for i in range(1, 5):
        images[i] = random_rgb(rng, 40, 30)
        (root / "img_celeba" / f"{i:06d}.jpg").write_bytes(encode(images[i], "JPEG", quality=100, subsampling=0))
    # The reference's format: name split x y w h; box 4 reaches outside the image (replicate padding).
    (root / "celeba_crop_bbox.txt").write_text(
        "000001.jpg 0 5 5 20 20\n000002.jpg 0 0 10 30 30\n000003.jpg 1 2 2 10 10\n000004.jpg 0 -6 -4 16 16\n")
    out = tmp_path / "train"
    manifest = prepare_dataset(PrepareConfig(source="celeba", input=str(root), output=str(out), category="faces",
                                             split="train", samples_per_shard=2, image_size=16, image_format="png"))
    assert manifest.num_samples == 3 and manifest.dataset.image_size == 16
    assert manifest.dataset.source["kind"] == "celeba"
    with tarfile.open(out / manifest.shards[1].name) as tar:
        stored = np.asarray(Image.open(tar.extractfile("000004.png")))
        meta = json.load(tar.extractfile("000004.json"))
    assert meta["bbox"] == [-6, -4, 16, 16]
    decoded = np.asarray(Image.open(root / "img_celeba" / "000004.jpg"))
    expected = crop_with_replicate(decoded, (-6, -4, 10, 12))
    np.testing.assert_array_equal(stored, expected)  # 16x16 box stored at 16 px: no resampling
    assert (expected[:4, :6] == decoded[0, 0]).all()  # the padded corner repeats the corner pixel
    # CelebA's own layout: list_bbox_celeba.txt (count, header, name x y w h) + list_eval_partition.txt.
    (root / "celeba_crop_bbox.txt").unlink()
    (root / "list_bbox_celeba.txt").write_text("4\nimage_id x_1 y_1 width height\n000001.jpg 5 5 20 20\n"
                                               "000002.jpg 0 10 30 30\n000003.jpg 2 2 10 10\n000004.jpg 1 1 9 9\n")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 2\n000004.jpg 2\n")
    # 9-10 px boxes stored at 128 px: refused by default (too_small: below half of 128), kept when asked for
    with pytest.raises(ValueError, match="too_small"):
        prepare_dataset(PrepareConfig(source="celeba", input=str(root), output=str(tmp_path / "test"),
                                      category="faces", split="test"))
    manifest = prepare_dataset(PrepareConfig(source="celeba", input=str(root), output=str(tmp_path / "test"),
                                             category="faces", split="test", min_image_size=8))
    assert manifest.num_samples == 2 and manifest.dataset.image_size == 128  # the paper's 128 px pre-crop


def test_synthetic_source_uses_the_callable(tmp_path):
    seen = []

    def generate(root: Path) -> None:
        seen.append(root)
        make_synface(root, 4, 16, split="train", seed=5)

    manifest = prepare_synthetic(generate, PrepareConfig(source="synface", input="", output=str(tmp_path / "o"),
                                                         category="synthetic", samples_per_shard=3), "test generator")
    assert manifest.num_samples == 4 and manifest.dataset.has_depth
    assert manifest.dataset.source["kind"] == "synthetic" and manifest.dataset.source["generator"] == "test generator"
    assert not seen[0].exists()  # the temporary folder is gone


def test_cli_synthetic_needs_and_uses_a_generator(tmp_path, capsys):
    calls = []

    def generator(root, args):
        calls.append(args.num_samples)
        make_synface(root, args.num_samples, 16)

    for gen in (None, generator):
        parser = add_prepare_subcommand(argparse.ArgumentParser().add_subparsers(), synthetic_generator=gen)
        args = parser.parse_args(["--source", "synthetic", "--output", str(tmp_path / "o"), "--category", "synthetic",
                                  "--num-samples", "3"])
        if gen is None:
            with pytest.raises(ValueError, match="generator"):
                args.func(args)
        else:
            assert args.func(args) == 0
    assert calls == [3]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 3


def test_encode_tar_rejects_keys_with_dots():
    with pytest.raises(ValueError, match="no dots"):
        encode_tar([("a.b", {"jpg": b"x"})])


def test_configs_are_strict_and_name_the_key(tmp_path):
    """data_pipeline's sections go through the project's one strict loader (trainer/config_loading.py)."""
    config = from_dict(LoaderConfig, {"shards": "s3://b/p", "batch_size": 8, "s3": {"endpoint_url": "http://x"}})
    assert config.batch_size == 8 and config.s3.endpoint_url == "http://x" and config.retry.max_attempts == 10
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize' \(known keys of data: "):
        from_dict(LoaderConfig, {"shards": "x", "batchsize": 8}, "data")
    with pytest.raises(ConfigError, match=r"data.retry.max_attempts: expected an integer"):
        from_dict(LoaderConfig, {"shards": "x", "retry": {"max_attempts": "3"}}, "data")
    with pytest.raises(ConfigError, match=r"^data.on_damaged_shard = 'ignore': must be one of salvage, skip$"):
        from_dict(LoaderConfig, {"shards": "x", "on_damaged_shard": "ignore"}, "data")
    with pytest.raises(ConfigError, match="on_damaged_shard"):
        LoaderConfig(shards="x", on_damaged_shard="ignore")
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  shards: /d\n  image_size: 32\n  retry: {initial_backoff_s: -1}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: data.retry.initial_backoff_s = -1.0: must be a finite number >= 0"):
        load_yaml_config(LoaderConfig, path, section="data")
    path.write_text("data:\n  shards: /d\n  image_size: 32\n")
    assert load_yaml_config(LoaderConfig, path, section="data").image_size == 32
    with pytest.raises(ConfigError, match=r"run.yaml: no section 'stream'"):
        load_yaml_config(LoaderConfig, path, section="stream")
    with pytest.raises(ConfigError, match="source"):
        PrepareConfig(source="web", input="", output="o", category="c")


def test_synface_preset_crops_image_and_depth_alike(tmp_path):
    src = tmp_path / "syn"
    make_synface(src, 2, 180, split="val")
    parser = add_prepare_subcommand(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--source", "synface", "--preset", "synface", "--input", str(src), "--split", "val",
                              "--output", str(tmp_path / "out"), "--category", "faces", "--image-size", "64"])
    assert args.func(args) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest.dataset.image_size == 64 and manifest.dataset.source["crop"] == 170
    with tarfile.open(tmp_path / "out" / manifest.shards[0].name) as tar:
        stored_depth = Image.open(tar.extractfile("obj0000.depth.png"))
        stored_image = Image.open(tar.extractfile("obj0000.png"))
        assert stored_depth.mode == "L" and stored_depth.size == stored_image.size == (64, 64)
        source = Image.open(src / "val" / "depth" / "obj0000_depth.png").getchannel(0)
        expected = source.crop((5, 5, 175, 175)).resize((64, 64), Image.BILINEAR)
        np.testing.assert_array_equal(np.asarray(stored_depth), np.asarray(expected))
