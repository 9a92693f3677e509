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


def test_a_folder_with_fewer_usable_images_than_a_batch_is_refused_with_the_count_and_the_skips(
        synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    root = tmp_path / "data"
    for kind in ("image", "depth"):
        (root / "train" / kind).mkdir(parents=True)
        for name in sorted((synthetic_root / "train" / kind).iterdir())[:3]:
            shutil.copy(name, root / "train" / kind / name.name)
    (root / "train" / "image" / "zz_bad_image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(root / "train" / "depth" / "000000_depth.png", root / "train" / "depth" / "zz_bad_depth.png")
    path = tmp_path / "few.yaml"
    path.write_text(dump_config(fast_config(root, tmp_path / "run", max_steps=2)))
    assert cli_main(["train", "--no-ray", "--config", str(path)]) != 0
    err = capsys.readouterr().err
    assert "holds 3 usable images, fewer than one batch of" in err and "(data.batch_size)" in err
    assert "train/image/zz_bad_image.png" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_resume_over_a_changed_folder_is_refused_unless_asked_then_goes_on_from_the_epochs_start(
        synthetic_root, tmp_path, capsys, caplog, monkeypatch):
    """Continuing a trained model on more faces: the saved data state names other shards, so a plain
    resume must refuse (it could not replay the same samples) and data.on_dataset_change: restart_epoch
    must go on with the model, optimizer and step over the grown folder, from the saved epoch's start."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    root = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(synthetic_root / split, root / split)

    def run(steps, **data):
        config = fast_config(root, tmp_path / "run", max_steps=steps, log_every=1)
        for key, value in data.items():
            setattr(config.data, key, value)
        path = tmp_path / "run.yaml"
        path.write_text(dump_config(config))
        return cli_main(["train", "--no-ray", "--config", str(path)])

    assert run(3) == 0
    before = load_checkpoint(tmp_path / "run" / "checkpoints")
    for kind in ("image", "depth"):  # the folder grows by four images
        for name in sorted((root / "train" / kind).iterdir())[:4]:
            shutil.copy(name, root / "train" / kind / f"more_{name.name}")
    capsys.readouterr()
    assert run(5) != 0
    assert "on_dataset_change: restart_epoch" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoints")["step"] == 3  # nothing trained, nothing written

    caplog.set_level(logging.WARNING, logger="data_pipeline.loader")
    assert run(5, on_dataset_change="restart_epoch") == 0
    after = load_checkpoint(tmp_path / "run" / "checkpoints")
    entries = sorted((root / CACHE_FOLDER).iterdir(), key=lambda p: p.stat().st_mtime)
    assert after["step"] == 5 and after["data"]["dataset"] == stream_dataset_id(entries[-1]) != before["data"]["dataset"]
    assert after["data"]["epoch"] == before["data"]["epoch"]
    # two batches into the new epoch (the counters restart with it)
    assert after["data"]["counters"]["delivered"] == 2 * fast_config(root, tmp_path).data.batch_size
    assert f"saved over dataset {before['data']['dataset']}" in caplog.text and "on_dataset_change=restart_epoch" in caplog.text
    capsys.readouterr()
