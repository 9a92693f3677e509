"""A new category from a folder of photos to a trained, evaluated model, as the README describes it:
prepare shards, write a config from the template, train through Ray (embedded, loopback), evaluate."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: local nodes on 127.0.0.1 only
pytest.importorskip("ray")

from cluster.cli import main as cli_main  # noqa: E402
from cluster_helpers import TINY_MODEL  # noqa: E402


def test_photos_to_trained_and_evaluated_model(synthetic_root, tmp_path, capfd):
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((synthetic_root / "train" / "image").glob("*.png"))[:32]:
        shutil.copy(image, photos / image.name)
    shards = tmp_path / "widgets-shards"
    config = tmp_path / "configs" / "widgets.yaml"
    run = tmp_path / "runs" / "widgets"

    assert cli_main(["prepare", "--source", "folder", "--input", str(photos), "--output", str(shards),
                     "--category", "widgets", "--image-size", "64", "--samples-per-shard", "16"]) == 0
    assert cli_main(["new-category", "--category", "widgets", "--shards", str(shards), "--out", str(config),
                     "--out-dir", str(run), "--batch-size", "8"]) == 0
    written = yaml.safe_load(config.read_text())
    assert written["category"] == "widgets" and written["stream"]["shards"] == str(shards)
    # the README's "make it small for a first try" edit
    written["model"].update(TINY_MODEL)
    written["perceptual"] = {"backbone": "none"}
    written["loss"]["lam_perc"] = 0.0
    written["train"].update({"max_steps": 3, "log_every": 1, "device": "cpu"})
    written["stream"].update({"num_workers": 1, "dali_threads": 1})
    config.write_text(yaml.safe_dump(written))
    capfd.readouterr()

    assert cli_main(["train", "--config", str(config), "--workers", "1"]) == 0
    captured = capfd.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["checkpoint"].endswith("step_00000003")
    # the embedded Ray serves the State API that Ray Train's placement-group cleaner polls
    assert "Failed to query Ray Train Controller" not in captured.out + captured.err

    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(run / "checkpoints"), "--data", str(synthetic_root),
                     "--no-report", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["step"] == 3 and results["model"]["side_x1e-2"]["mean"] > 0


def test_new_category_refuses_to_overwrite_and_bad_names(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    config.write_text("keep me")
    assert cli_main(["new-category", "--category", "x", "--shards", "s", "--out", str(config)]) == 2
    assert config.read_text() == "keep me"
    assert cli_main(["new-category", "--category", "a/b", "--shards", "s", "--out", str(tmp_path / "y.yaml")]) == 2
