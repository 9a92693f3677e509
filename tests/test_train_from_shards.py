"""`unsup3d train` on sharded data: prepare shards with the CLI, train from them through the DALI
pipeline, resume with the stream position restored."""

from __future__ import annotations

import json

import torch
import yaml

from cluster.cli import main as cli_main
from trainer.loop.checkpoint_load import load_checkpoint


def job_yaml(tmp_path, shards, max_steps):
    config = {
        "model": {"depth_nf": 8, "depth_zdim": 16, "albedo_nf": 8, "albedo_zdim": 16, "light_nf": 8, "view_nf": 8,
                  "conf_nf": 8, "conf_zdim": 16},
        "perceptual": {"backbone": "none"},
        "loss": {"lam_perc": 0.0},
        "data": {"batch_size": 8},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": max_steps, "log_every": 1, "checkpoint_every": 100},
        "stream": {"shards": str(shards), "batch_size": 8, "image_size": 64, "seed": 3, "num_workers": 1,
                   "dali_threads": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prepare_then_train_from_shards_and_resume(synthetic_root, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert cli_main(["prepare", "--source", "synface", "--input", str(synthetic_root), "--output", str(shards),
                     "--category", "synthetic", "--samples-per-shard", "40"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 96

    assert cli_main(["train", "--config", str(job_yaml(tmp_path, shards, 3))]) == 0
    first = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert first["step"] == 3 and first["data"]["epoch"] == 0 and first["data"]["cursor"] + first["data"]["offset"] > 0

    # the same command with a longer run resumes from step 3 and crosses an epoch boundary (96 / 8 = 12 steps)
    assert cli_main(["train", "--config", str(job_yaml(tmp_path, shards, 14))]) == 0
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert resumed["step"] == 14 and resumed["data"]["epoch"] == 1
    assert not all(torch.equal(first["model"][k], resumed["model"][k]) for k in first["model"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15))
    capsys.readouterr()


def test_stream_and_model_sizes_must_agree(tmp_path, capsys):
    path = job_yaml(tmp_path, tmp_path, 1)
    text = yaml.safe_load(path.read_text())
    text["stream"]["image_size"] = 128
    path.write_text(yaml.safe_dump(text))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "stream.image_size" in capsys.readouterr().err
