"""The local shard cache of a data folder: prepared once, reused, rebuilt when the folder changes, safe
when two runs prepare it at once; and the loader's PIL decoding where DALI is not installed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dp_helpers import ROOT, make_synface, random_rgb
from data_pipeline.config import LoaderConfig
from data_pipeline.folder_cache import CACHE_ENV, CACHE_FOLDER, FolderCacheConfig, prepared_folder
from data_pipeline.loader import TrainLoader

SANDBOX = ROOT / "benchmarks" / "gpu_check_sandbox"  # sitecustomize.py: hides modules as if not installed


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / CACHE_FOLDER).iterdir())


def test_prepared_once_reused_and_rebuilt_when_the_folder_changes(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    make_synface(tmp_path, 10, 16)
    config = FolderCacheConfig(root=str(tmp_path), image_size=16)
    caplog.set_level(logging.INFO, logger="data_pipeline.folder_cache")

    first = prepared_folder(config)
    assert not first.reused and "first use of this folder" in caplog.text
    assert Path(first.path).parent == tmp_path / CACHE_FOLDER and first.manifest.num_samples == 10
    assert first.manifest.dataset.has_depth and len(first.manifest.shards) == 5  # 10 images: 2 per shard
    assert first.manifest.dataset.source["fingerprint"] in first.path

    caplog.clear()
    again = prepared_folder(config)
    assert again.reused and again.path == first.path and "unchanged since its shards were prepared" in caplog.text
    assert json.loads((Path(first.path) / "manifest.json").read_text()) == json.loads(
        (Path(again.path) / "manifest.json").read_text())

    # One image rewritten (new bytes, new mtime) and one added: a new entry, the log says what changed,
    # the old entry is gone.
    image = tmp_path / "train" / "image" / "obj0003_image.png"
    Image.fromarray(random_rgb(np.random.default_rng(9), 16, 16)).save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    make_synface(tmp_path / "more", 1, 16, seed=5)
    for kind in ("image", "depth"):
        (tmp_path / "more" / "train" / kind / f"obj0000_{kind}.png").rename(
            tmp_path / "train" / kind / f"extra_{kind}.png")
    caplog.clear()
    rebuilt = prepared_folder(config)
    assert not rebuilt.reused and rebuilt.path != first.path and rebuilt.manifest.num_samples == 11
    assert "the folder changed since its shards were prepared" in caplog.text
    assert "2 added (train/depth/extra_depth.png, train/image/extra_image.png)" in caplog.text
    assert "1 modified (train/image/obj0003_image.png)" in caplog.text
    assert entries(tmp_path) == [Path(rebuilt.path).name]

    # Another training size is another entry (the size is part of the fingerprint).
    other = prepared_folder(FolderCacheConfig(root=str(tmp_path), image_size=8))
    assert other.path != rebuilt.path and other.manifest.dataset.image_size == 8


def test_an_incomplete_entry_is_rebuilt_and_two_runs_preparing_at_once_share_one(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    make_synface(tmp_path, 6, 16)
    config = FolderCacheConfig(root=str(tmp_path), image_size=16)
    results, errors = [], []

    def prepare():
        try:
            results.append(prepared_folder(config))
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len({r.path for r in results}) == 1
    assert entries(tmp_path) == [Path(results[0].path).name]  # no temporary folder left behind

    shard = Path(results[0].path) / results[0].manifest.shards[0].name
    shard.unlink()  # a damaged entry is not reused
    repaired = prepared_folder(config)
    assert not repaired.reused and repaired.path == results[0].path and shard.is_file()


def test_plain_images_skips_named_and_a_cache_elsewhere(tmp_path, monkeypatch, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(random_rgb(rng, 20, 30)).save(photos / f"p{i}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # as for a folder this user cannot write (the default there)
    caplog.set_level(logging.INFO, logger="data_pipeline")
    entry = prepared_folder(FolderCacheConfig(root=str(photos), image_size=16))
    assert entry.path.startswith(str(tmp_path / "cache")) and not (photos / CACHE_FOLDER).exists()
    assert entry.manifest.num_samples == 5 and not entry.manifest.dataset.has_depth
    assert entry.manifest.dataset.prepare_skipped == {"unreadable_image": 1}
    assert list(entry.skipped) == ["broken.jpg"]
    caplog.clear()
    again = prepared_folder(FolderCacheConfig(root=str(photos), image_size=16))
    assert again.reused and "1 files skipped (unreadable_image 1): broken.jpg" in caplog.text


def _pil_batches_script(shards: str, out: str) -> str:
    return f"""
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from data_pipeline.config import LoaderConfig
from data_pipeline.loader import TrainLoader
batches = []
for keep in (False, True):  # two loaders: the fallback is announced once
    with TrainLoader(LoaderConfig(shards={shards!r}, batch_size=4, image_size=16, seed=1, keep_in_memory=keep)) as loader:
        assert loader.decoder_device == "cpu"
        batches.append(list(loader))
torch.save(batches, {out!r})
"""


def test_without_dali_the_same_loader_decodes_with_pil_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    make_synface(tmp_path, 10, 16)
    entry = prepared_folder(FolderCacheConfig(root=str(tmp_path), image_size=16))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SANDBOX), str(ROOT)]),
           "UNSUP3D_HIDE_MODULES": "nvidia.dali"}
    out = tmp_path / "pil.pt"
    done = subprocess.run([sys.executable, "-c", _pil_batches_script(entry.path, str(out))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("DALI is not installed") == 1, done.stderr[-3000:]
    pil, pil_kept = torch.load(out)
    with TrainLoader(LoaderConfig(shards=entry.path, batch_size=4, image_size=16, seed=1)) as loader:
        dali = list(loader)
    assert len(dali) == 3
    for batches in (pil, pil_kept):
        assert [b["key"] for b in batches] == [b["key"] for b in dali]
        for a, b in zip(batches, dali):  # the same pixels, flips and depth units as DALI's
            assert torch.allclose(a["image"], b["image"], atol=1e-6)
            assert torch.allclose(a["depth"], b["depth"], atol=1e-6)


def test_kept_in_memory_later_epochs_equal_a_fresh_decode_and_resume_exactly(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    make_synface(tmp_path, 10, 16)
    (tmp_path / "train" / "image" / "obj0004_image.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    entry = prepared_folder(FolderCacheConfig(root=str(tmp_path), image_size=16))  # 9 images, 5 shards

    def loader(keep):
        return TrainLoader(LoaderConfig(shards=entry.path, batch_size=2, image_size=16, seed=4, keep_in_memory=keep))

    with loader(False) as fresh, loader(True) as kept:
        for epoch in range(3):  # epoch 0 decodes, epochs 1 and 2 come from memory
            a, b = list(fresh), list(kept)
            assert [x["key"] for x in a] == [x["key"] for x in b] and sum(len(x["key"]) for x in b) == 9
            for x, y in zip(a, b):
                assert torch.allclose(x["image"], y["image"], atol=1e-6) and torch.allclose(x["depth"], y["depth"])
        state = None
        expected = []
        for i, batch in enumerate(kept):  # epoch 3: stop after two batches, resume in a new loader
            if i == 1:
                state = kept.state_dict()  # what the trainer has taken: batches 0 and 1
            if i >= 2:
                expected.append(batch)
    with loader(True) as resumed:
        resumed.load_state_dict(state)
        again = list(resumed)  # decodes from the shards: the same bytes as the batches kept in memory
    assert [x["key"] for x in again] == [x["key"] for x in expected]
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["depth"], y["depth"]) for x, y in zip(again, expected))
