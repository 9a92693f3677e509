"""`unsup3d train` from a folder in data.root goes through the shard stream: the folder is prepared once
into cached shards, a bad image is skipped by name and counted, and a resume through them is exact.
(The cache itself: tests/data_pipeline/test_dp_folder_cache.py.)"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import torch

from cluster.cli import main as cli_main
from data_pipeline.folder_cache import CACHE_ENV, CACHE_FOLDER
from test_resume_config import fast_config
from trainer.config import dump_config
from trainer.loop.checkpoint_load import load_checkpoint


def stream_dataset_id(entry) -> str:
    """The id the data pipeline's loader puts in its state: which shards it streamed."""
    manifest = json.loads((entry / "manifest.json").read_text())
    return hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()[:16]


def test_the_embedded_default_path_streams_the_folder_through_its_cached_shards(tiny_trained_run, synthetic_root):
    """tiny_trained_run is `unsup3d train --config run.yaml` with no flag: an embedded Ray and its worker."""
    (entry,) = [p for p in (synthetic_root / CACHE_FOLDER).iterdir() if p.name.startswith("train-")]
    data = load_checkpoint(tiny_trained_run / "checkpoints")["data"]
    assert data["dataset"] == stream_dataset_id(entry)
    assert data["epoch"] == 0 and data["offset"] == 8 and data["version"] == 1


def test_no_ray_skips_a_bad_image_by_name_reuses_the_cache_and_resumes_exactly(synthetic_root, tmp_path, caplog,
                                                                               capsys, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    root = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(synthetic_root / split, root / split)
    (root / "train" / "image" / "zz_bad_image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(root / "train" / "depth" / "000000_depth.png", root / "train" / "depth" / "zz_bad_depth.png")

    def run(name, steps):
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(fast_config(root, tmp_path / name, max_steps=steps, log_every=1)))
        assert cli_main(["train", "--no-ray", "--config", str(path)]) == 0

    caplog.set_level(logging.INFO)
    run("straight", 6)
    assert "first use of this folder" in caplog.text
    assert "1 files skipped (unreadable_image 1): train/image/zz_bad_image.png" in caplog.text
    (entry,) = (root / CACHE_FOLDER).iterdir()
    assert json.loads((entry / "manifest.json").read_text())["dataset"]["prepare_skipped"] == {"unreadable_image": 1}

    caplog.clear()
    run("resumed", 3)
    run("resumed", 6)
    assert "unchanged since its shards were prepared" in caplog.text and "first use" not in caplog.text
    assert caplog.text.count("train/image/zz_bad_image.png") == 2  # named again on every reuse
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints")
    assert straight["step"] == resumed["step"] == 6 and straight["data"] == resumed["data"]
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    capsys.readouterr()
