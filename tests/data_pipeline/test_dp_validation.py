"""Nothing lost silently: every kind of bad input is converted or skipped, counted by reason, logged with
shard and key, and each epoch's delivered + skipped is checked against the manifest."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest

from dp_helpers import encode, png16_rgb, random_rgb
from data_pipeline.config import LoaderConfig
from data_pipeline.loader import TrainLoader
from data_pipeline.shards import DatasetInfo, ShardWriter
from data_pipeline.storage import LocalStorage

SIZE = 16


def jpg(rng, height=SIZE, width=SIZE, mode=None):
    return encode(random_rgb(rng, height, width), "JPEG", mode=mode, quality=90)


def write_dataset(folder, groups, image_ext="jpg", has_depth=False):
    """One shard per group of (key, components); returns the manifest."""
    writer = ShardWriter(LocalStorage(folder), samples_per_shard=10_000)
    for group in groups:
        for key, components in group:
            writer.add(key, components)
        writer.flush()
    components = [image_ext, "json"] + (["depth.png"] if has_depth else [])
    return writer.finish(DatasetInfo(category="test", split="train", source={"kind": "test"}, image_size=SIZE,
                                     image_ext=image_ext, components=sorted(components), has_depth=has_depth))


def good_group(rng, prefix, count):
    return [(f"{prefix}{i}", {"jpg": jpg(rng), "json": b"{}"}) for i in range(count)]


def header_offset(tar_bytes: bytes, member: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return tar.getmember(member).offset


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    big = jpg(rng, 30, 30)
    truncated_jpg = big[: len(big) * 9 // 10]  # header intact, scan cut short
    sample_level = [
        ("good1", {"jpg": jpg(rng), "json": b"{}"}),
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 this is no jpeg" * 20, "json": b"{}"}),
        ("garbage", {"jpg": rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "json": b"{}"}),
        ("truncated", {"jpg": truncated_jpg, "json": b"{}"}),
        ("gray", {"jpg": jpg(rng, mode="L"), "json": b"{}"}),
        ("cmyk", {"jpg": jpg(rng, mode="CMYK"), "json": b"{}"}),
        ("rgba", {"png": encode(np.dstack([random_rgb(rng, SIZE, SIZE), np.full((SIZE, SIZE), 7, np.uint8)])),
                  "json": b"{}"}),
        ("rgb16", {"png": png16_rgb(np.full((SIZE, SIZE, 3), 0x8000, np.uint16)), "json": b"{}"}),
        ("gray16", {"png": encode(np.full((SIZE, SIZE), 0xFF00, np.uint16)), "json": b"{}"}),
        ("wrongsize", {"jpg": jpg(rng, 24, 20), "json": b"{}"}),
        ("nocomponent", {"json": b"{}"}),
        ("huge", {"jpg": jpg(rng, 64, 64), "json": b"{}"}),
        ("good2", {"jpg": jpg(rng), "json": b"{}"}),
    ]
    groups = [sample_level] + [good_group(rng, f"s{n}_", 4) for n in range(1, 7)] + [good_group(rng, "s7_", 3)]
    manifest = write_dataset(folder, groups)
    names = [s.name for s in manifest.shards]
    # shard 1: truncated in the middle of the third sample's image.
    data = (folder / names[1]).read_bytes()
    (folder / names[1]).write_bytes(data[:header_offset(data, "s1_2.jpg") + 512 + 100])
    # shard 2: the third sample's header checksum destroyed (webdataset alone would stop there silently).
    data = bytearray((folder / names[2]).read_bytes())
    offset = header_offset(bytes(data), "s2_2.jpg")
    data[offset + 148:offset + 156] = b"9999999\x00"
    (folder / names[2]).write_bytes(bytes(data))
    # shard 3: zero bytes.  shard 4: gone.
    (folder / names[3]).write_bytes(b"")
    (folder / names[4]).unlink()
    # shard 5: a byte of metadata changed: intact tar, wrong checksum.
    data = bytearray((folder / names[5]).read_bytes())
    offset = header_offset(bytes(data), "s5_1.json") + 512
    data[offset] = ord("[")
    (folder / names[5]).write_bytes(bytes(data))
    # shard 7: a valid tar without members where the manifest expects 3 samples.
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w", format=tarfile.USTAR_FORMAT).close()
    (folder / names[7]).write_bytes(empty.getvalue())
    return folder


def run_epoch(folder, **overrides):
    options = dict(shards=str(folder), batch_size=4, image_size=SIZE, shuffle=False, num_workers=2,
                   max_image_pixels=32 * 32)
    options.update(overrides)
    with TrainLoader(LoaderConfig(**options)) as loader:
        batches = list(loader)
        report = loader.last_epoch_report
    keys = [k for b in batches for k in b["key"]]
    for batch in batches:
        assert batch["image"].shape == (len(batch["key"]), 3, SIZE, SIZE)
    return keys, report, batches


def test_every_bad_input_is_converted_or_skipped_and_counted(bad_dataset, caplog):
    caplog.set_level(logging.INFO)
    keys, report, batches = run_epoch(bad_dataset)
    assert report["skipped"] == {"corrupt_image": 2, "truncated_image": 1, "missing_component": 1, "too_large": 1,
                                 "truncated_tar": 2, "corrupt_tar": 2, "empty_shard": 4 + 3, "missing_shard": 4,
                                 "checksum_mismatch": 4}
    assert report["converted"] == {"grayscale": 2, "cmyk": 1, "alpha": 1, "16bit": 2, "wrong_size": 1}
    assert report["shard_events"] == {"truncated_tar": 1, "corrupt_tar": 1, "empty_shard": 2, "missing_shard": 1,
                                      "checksum_mismatch": 1}
    assert sorted(keys) == sorted(["good1", "gray", "cmyk", "rgba", "rgb16", "gray16", "wrongsize", "good2",
                                   "s1_0", "s1_1", "s2_0", "s2_1", "s6_0", "s6_1", "s6_2", "s6_3"])
    assert report["expected"] == 13 + 6 * 4 + 3 and report["difference"] == 0
    assert report["delivered"] + sum(report["skipped"].values()) == report["expected"]
    # Converted samples arrive right: 16-bit keeps its high byte (0x80 -> about 0), gray stays gray.
    rows = {k: b["image"][i] for b in batches for i, k in enumerate(b["key"])}
    assert abs(float(rows["rgb16"].mean()) - (0x80 / 127.5 - 1)) < 0.01
    assert abs(float(rows["gray16"].mean()) - (0xFF / 127.5 - 1)) < 0.01
    assert float((rows["gray"][0] - rows["gray"][1]).abs().max()) < 0.02
    # Every skip is logged with its shard and key.
    text = caplog.text
    for reason, key, shard in [("corrupt_image", "corrupt", 0), ("corrupt_image", "garbage", 0),
                               ("truncated_image", "truncated", 0),
                               ("missing_component", "nocomponent", 0), ("too_large", "huge", 0)]:
        assert f"reason={reason} shard={bad_dataset / f'shard-{shard:06d}.tar'} key={key}" in text
    for reason, shard, lost_keys in [("truncated_tar", 1, "s1_2, s1_3"), ("corrupt_tar", 2, "s2_2, s2_3"),
                                     ("missing_shard", 4, "s4_0, s4_1, s4_2, s4_3"), ("checksum_mismatch", 5, "s5_0")]:
        assert f"reason={reason} shard={bad_dataset / f'shard-{shard:06d}.tar'} key=*" in text
        assert f"keys: {lost_keys}" in text
    assert "DATA ACCOUNTING MISMATCH" not in text


def test_damaged_shards_skipped_whole_on_request(bad_dataset):
    keys, report, _ = run_epoch(bad_dataset, on_damaged_shard="skip")
    assert report["skipped"]["truncated_tar"] == 4 and report["skipped"]["corrupt_tar"] == 4
    assert not any(k.startswith(("s1_", "s2_")) for k in keys) and report["difference"] == 0


def test_checksums_can_be_left_unverified(bad_dataset):
    keys, report, _ = run_epoch(bad_dataset, verify_checksums=False)
    assert "checksum_mismatch" not in report["skipped"] and {"s5_0", "s5_1", "s5_2", "s5_3"} <= set(keys)
    assert report["difference"] == 0


def test_manifest_disagreement_is_a_loud_warning(tmp_path, caplog):
    rng = np.random.default_rng(1)
    manifest = write_dataset(tmp_path, [good_group(rng, "a", 4), good_group(rng, "b", 4)])
    # The manifest claims more samples than an intact shard holds, and fewer than another holds.
    manifest.shards[0].samples = 6
    manifest.shards[1].samples = 3
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    _, report, _ = run_epoch(tmp_path)
    assert report["delivered"] == 8 and report["expected"] == 9 and report["difference"] == 1
    assert "DATA ACCOUNTING MISMATCH epoch 0 rank 0: delivered 8 + skipped 0 = 8, but the manifest holds 9" in caplog.text
    assert "difference +1" in caplog.text


def test_depth_problems(tmp_path):
    rng = np.random.default_rng(2)

    def depth_png(height=SIZE, width=SIZE, mode="L"):
        return encode(rng.integers(0, 256, (height, width), dtype=np.uint8), mode=mode)

    def sample(depth):
        components = {"png": encode(random_rgb(rng, SIZE, SIZE)), "json": b"{}"}
        if depth is not None:
            components["depth.png"] = depth
        return components

    write_dataset(tmp_path, [[("ok", sample(depth_png())), ("rgbdepth", sample(depth_png(mode="RGB"))),
                              ("nodepth", sample(None)), ("baddepth", sample(b"\x89PNG\r\n\x1a\n broken")),
                              ("smalldepth", sample(depth_png(8, 8))),
                              ("depth16", sample(encode(np.full((SIZE, SIZE), 0x4000, np.uint16))))]],
                  image_ext="png", has_depth=True)
    keys, report, batches = run_epoch(tmp_path)
    assert sorted(keys) == ["depth16", "ok", "rgbdepth"]
    assert report["skipped"] == {"missing_component": 1, "corrupt_depth": 1, "depth_size_mismatch": 1}
    assert report["converted"] == {"depth_channel0": 1, "depth_16bit": 1} and report["difference"] == 0
    depth16 = {k: b["depth"][i] for b in batches for i, k in enumerate(b["key"])}["depth16"]
    assert torch_close(depth16, 1.1 - 0.2 * 0x40 / 255)


def torch_close(tensor, value):
    return float((tensor - value).abs().max()) < 1e-5


def test_no_input_crashes_or_hangs_the_pipeline(tmp_path, caplog):
    """Random damage to a shard (byte flips, cuts, garbage, zeroed runs): every epoch ends, the intact shard is
    delivered whole, and any sample not accounted for by a reason raises the loud warning."""
    rng = np.random.default_rng(3)
    manifest = write_dataset(tmp_path, [good_group(rng, "a", 6), good_group(rng, "b", 6)])
    original = (tmp_path / manifest.shards[0].name).read_bytes()
    for trial in range(24):
        data = bytearray(original)
        kind = trial % 4
        if kind == 0:  # flip random bytes anywhere (headers, JPEG data, padding)
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 40))):
                data[position] = int(rng.integers(0, 256))
        elif kind == 1:  # cut anywhere
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # garbage
            data = bytearray(rng.integers(0, 256, size=int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        else:  # a zeroed run
            start = int(rng.integers(0, len(data)))
            end = min(len(data), start + int(rng.integers(1, 2048)))
            data[start:end] = bytes(end - start)
        (tmp_path / manifest.shards[0].name).write_bytes(bytes(data))
        for verify in (True, False):
            caplog.clear()
            keys, report, _ = run_epoch(tmp_path, verify_checksums=verify)
            assert {f"b{i}" for i in range(6)} <= set(keys)
            assert report["expected"] == 12
            if report["difference"] != 0:
                assert "DATA ACCOUNTING MISMATCH" in caplog.text
            if verify and bytes(data) != original:
                # Checked shards: every damaged shard is recognised, so nothing goes unaccounted.
                assert sum(report["shard_events"].values()) >= 1
