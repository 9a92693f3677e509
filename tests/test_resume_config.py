"""A resumed run does what its config says (issue 15, item 5): changed optimizer hyperparameters are
applied to the restored optimizer and logged; metrics.jsonl holds every step once after a resume."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from test_train import read_metrics, small_config


def fast_config(root, out_dir, **train_overrides):
    """test_train's small config without the perceptual net (a third of the step time)."""
    config = small_config(root, out_dir, **train_overrides)
    config.perceptual.backbone, config.loss.lam_perc = "none", 0.0
    return config
from cluster.data_source import batch_source, train
from trainer.loop.train import Trainer


def test_changed_optimizer_hyperparameters_are_applied_on_resume_and_logged(synthetic_root, tmp_path, caplog):
    config = fast_config(synthetic_root, tmp_path / "run", max_steps=2)
    train(config)
    config.train.max_steps = 3
    config.optimizer.lr = 2e-3  # was 1e-3
    config.optimizer.betas = (0.5, 0.9)
    config.optimizer.weight_decay = 0.0
    caplog.set_level(logging.WARNING, logger="trainer.loop.train")
    trainer = Trainer(config, batch_source(config))
    try:
        assert trainer.run().steps == 3
        groups = trainer.engine.gate.optimizer.param_groups
    finally:
        trainer.close()
        trainer.engine.engine.destroy()
    assert all(g["lr"] == 2e-3 and tuple(g["betas"]) == (0.5, 0.9) and g["weight_decay"] == 0.0 for g in groups)
    assert "optimizer.lr changed from 0.001 (in step_00000002) to 0.002" in caplog.text
    changes = {r["key"]: r for r in read_metrics(tmp_path / "run") if r.get("event") == "config_change"}
    assert set(changes) == {"optimizer.lr", "optimizer.betas", "optimizer.weight_decay"}
    assert changes["optimizer.lr"]["checkpoint"] == pytest.approx(1e-3) and changes["optimizer.lr"]["step"] == 2


def test_a_resume_drops_the_records_of_the_steps_it_redoes(synthetic_root, tmp_path):
    config = fast_config(synthetic_root, tmp_path / "run", max_steps=5, checkpoint_every=3, log_every=1)
    train(config)
    first = read_metrics(tmp_path / "run")
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    # As if killed after logging step 5 (and half of a line) but before its checkpoint was complete.
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000005")
    (checkpoints / "latest").write_text("step_00000003")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tot')
    train(config)  # resumes at step 3 and redoes 4 and 5
    again = read_metrics(tmp_path / "run")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5], "each step once"
    for a, b in zip(first, again):  # an exact resume logs the same values for the redone steps
        assert a["total"] == b["total"], (a, b)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
