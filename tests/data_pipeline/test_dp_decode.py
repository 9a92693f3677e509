"""DALI decode + augmentation: exact values, flips, depth units, resizing, device choice, failure recovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dp_helpers import encode, make_synface, random_rgb
from data_pipeline.config import LoaderConfig, PrepareConfig
from data_pipeline.dali_decode import DaliDecoder, resolve_decode_device
from data_pipeline.loader import TrainLoader, flip_decision
from data_pipeline.prepare import prepare_dataset


@pytest.fixture(scope="module")
def synface(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    make_synface(root / "src", 6, 16)
    prepare_dataset(PrepareConfig(source="synface", input=str(root / "src"), output=str(root / "shards"),
                                  category="faces", samples_per_shard=4))
    return root


def test_batches_match_the_source_pixels_flips_and_depth_units(synface):
    keys = [f"obj{i:04d}" for i in range(6)]
    seed = next(s for s in range(100) if 2 <= sum(flip_decision(s, 0, k, 0.5) for k in keys) <= 4)
    config = LoaderConfig(shards=str(synface / "shards"), batch_size=4, image_size=16, seed=seed, shuffle=False,
                          hflip_probability=0.5)
    flipped = 0
    with TrainLoader(config, device="cpu") as loader:
        batches = list(loader)
        assert loader.decoder_device == "cpu"
    assert [len(b["key"]) for b in batches] == [4, 2]
    for batch in batches:
        assert set(batch) == {"image", "depth", "key"}
        assert batch["image"].dtype == torch.float32 and batch["image"].device.type == "cpu"
        for row, key in enumerate(batch["key"]):
            image = np.asarray(Image.open(synface / "src" / "train" / "image" / f"{key}_image.png"))
            depth = np.asarray(Image.open(synface / "src" / "train" / "depth" / f"{key}_depth.png"))[:, :, 0]
            if flip_decision(seed, 0, key, 0.5):
                image, depth = image[:, ::-1], depth[:, ::-1]
                flipped += 1
            expected = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
            assert torch.allclose(batch["image"][row], expected, atol=1e-6)
            expected_depth = torch.from_numpy(1 + 0.1 * ((1 - depth.astype(np.float32) / 255) * 2 - 1))
            assert torch.allclose(batch["depth"][row], expected_depth, atol=1e-6)
            assert torch.allclose(batch["depth"][row][:2], torch.tensor(1.1))  # background 0 -> far, 1.1
    assert 2 <= flipped <= 4


def test_resize_to_the_training_size_and_no_depth(synface):
    config = LoaderConfig(shards=str(synface / "shards"), batch_size=6, image_size=8, with_depth=False)
    with TrainLoader(config) as loader:
        (batch,) = list(loader)
    assert set(batch) == {"image", "key"} and batch["image"].shape == (6, 3, 8, 8)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_depth_requested_but_absent_is_an_error(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(encode(random_rgb(np.random.default_rng(0), 16, 16)))
    prepare_dataset(PrepareConfig(source="folder", input=str(tmp_path / "photos"), output=str(tmp_path / "s"),
                                  category="x", image_size=16))
    with pytest.raises(ValueError, match="no depth"):
        TrainLoader(LoaderConfig(shards=str(tmp_path / "s"), with_depth=True))


def test_decode_device_choice():
    assert resolve_decode_device("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode_device("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="mixed"):
        resolve_decode_device("mixed", torch.device("cpu"))
    if torch.cuda.is_available():  # only on GPU machines
        assert resolve_decode_device("auto", torch.device("cuda")) == "mixed"


def test_decoder_recovers_from_inputs_dali_rejects():
    rng = np.random.default_rng(0)
    good = encode(random_rgb(rng, 12, 12), "JPEG", quality=95)
    gif = encode(random_rgb(rng, 12, 12), "GIF")  # PIL reads GIF; DALI's decoder does not
    decoder = DaliDecoder(image_size=12, max_batch_size=4, with_depth=False)
    tensors, failures = decoder.decode([good, gif, good], [False, False, True])
    assert failures == [] and decoder.rebuilds == 1
    assert tensors["image"].shape == (3, 3, 12, 12)
    assert torch.allclose(tensors["image"][2], tensors["image"][0].flip(-1), atol=0.02)
    # Bytes neither PIL nor DALI can read are dropped and reported; the others are delivered.
    tensors, failures = decoder.decode([good, b"\xff\xd8\xff garbage", good], [False, False, False])
    assert [f.index for f in failures] == [1] and tensors["image"].shape == (2, 3, 12, 12)
    # And the pipeline works normally afterwards.
    tensors, failures = decoder.decode([good], [False])
    assert failures == [] and tensors["image"].shape == (1, 3, 12, 12)
    decoder.close()
