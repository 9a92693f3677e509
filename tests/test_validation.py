"""Validation during training (train.eval_every) and `unsup3d evaluate --all-checkpoints`: the records,
the baselines computed once, the learning-curve PNG, the Prometheus gauges, agreement with evaluate,
and exact resume left untouched."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from cluster.cli import main as cli_main
from test_train import read_metrics, small_config
from trainer.loop.checkpoint_load import load_checkpoint, read_state
from trainer.config import ConfigError, load_run_config
from trainer.results.learning_curve import Curve, curve_from_records, plot_learning_curve
from cluster.data_source import batch_source, train
from trainer.loop.train import Trainer

METHODS = ("model", "constant_depth", "average_train_depth")


def fast_config(root, out_dir, **train):
    """small_config without the perceptual net (the validation path does not need it; 3x faster)."""
    config = small_config(root, out_dir, **train)
    config.loss.lam_perc = 0.0
    config.perceptual.backbone = "none"
    config.monitoring.progress_bar = False
    return config


def validation_records(out_dir, kind="validation"):
    return [r for r in read_metrics(out_dir) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def validated_run(synthetic_root, tmp_path_factory):
    """5 steps validating every 2 on 6 of the 8 val images, checkpoints at 2, 4 and 5 kept; the
    Trainer's gauges read after the run."""
    out = tmp_path_factory.mktemp("validated") / "run"
    config = fast_config(synthetic_root, out, max_steps=5, eval_every=2, eval_images=6, checkpoint_every=2,
                         keep_checkpoints=3)
    trainer = Trainer(config, batch_source(config))
    try:
        trainer.run()
    finally:
        trainer.engine.engine.destroy()
    return out, trainer.monitor.metrics


def test_a_run_records_validation_points_baselines_once_a_curve_and_gauges(validated_run):
    out, metrics = validated_run
    points = validation_records(out)
    # the untrained model at step 0, every eval_every steps, and the last step
    assert [p["step"] for p in points] == [0, 2, 4, 5]
    baselines = validation_records(out, "validation_baselines")
    assert len(baselines) == 1 and baselines[0]["step"] == 0 and baselines[0]["split"] == "val"
    assert baselines[0]["images"] == 6 and baselines[0]["available"] == 8
    for record in points:
        assert record["split"] == "val" and record["images"] == 6 and record["set"] == baselines[0]["set"]
        for metric in ("side_x1e-2", "mad_deg_reference", "mad_deg_exact"):
            assert record["model"][metric]["n"] == 6 and record["model"][metric]["mean"] > 0
    for method in ("constant_depth", "average_train_depth"):
        block = baselines[0][method]
        # the reference's normalisation shortens normals: a few degrees more than exact
        assert block["mad_deg_reference"]["mean"] > block["mad_deg_exact"]["mean"]
    # the training records are unchanged: every one still has its loss
    assert all("total" in r for r in read_metrics(out) if "kind" not in r)

    picture = Image.open(out / "learning_curve.png")
    assert picture.format == "PNG" and picture.size[0] > 600

    last = points[-1]["model"]
    assert metrics.value("validation_side", method="model") == pytest.approx(last["side_x1e-2"]["mean"])
    assert metrics.value("validation_mad_degrees", method="model", normals="exact") == pytest.approx(
        last["mad_deg_exact"]["mean"])
    assert metrics.value("validation_mad_degrees", method="model", normals="reference") == pytest.approx(
        last["mad_deg_reference"]["mean"])
    assert metrics.value("validation_side", method="average_train_depth") == pytest.approx(
        baselines[0]["average_train_depth"]["side_x1e-2"]["mean"])
    assert metrics.value("validation_mad_degrees", method="constant_depth", normals="exact") == pytest.approx(
        baselines[0]["constant_depth"]["mad_deg_exact"]["mean"])
    assert metrics.value("validation_step") == 5 and metrics.value("validation_images") == 6


def test_evaluate_all_checkpoints_scores_each_kept_checkpoint_like_validation(validated_run, synthetic_root, tmp_path,
                                                                              capsys):
    out, _ = validated_run
    curve, output = tmp_path / "curve.png", tmp_path / "all.json"
    assert cli_main(["evaluate", "--checkpoint", str(out / "checkpoints"), "--data", str(synthetic_root),
                     "--split", "val", "--images", "6", "--all-checkpoints", "--curve", str(curve),
                     "--output", str(output)]) == 0
    capsys.readouterr()
    results = json.loads(output.read_text())
    assert [p["step"] for p in results["points"]] == [2, 4, 5]  # one point per kept checkpoint
    assert json.loads(curve.with_suffix(".json").read_text())["points"] == results["points"]
    assert Image.open(curve).format == "PNG"
    # float32 weights, the same images and metric code: the numbers the training loop recorded
    recorded = {r["step"]: r["model"] for r in validation_records(out)}
    for point in results["points"]:
        for metric in ("side_x1e-2", "mad_deg_reference", "mad_deg_exact"):
            assert point[metric] == pytest.approx(recorded[point["step"]][metric]["mean"], rel=1e-9, abs=1e-9)
    baselines = validation_records(out, "validation_baselines")[0]
    for method in ("constant_depth", "average_train_depth"):
        assert results["baselines"][method]["side_x1e-2"] == pytest.approx(baselines[method]["side_x1e-2"]["mean"])
    # --curve is only for a folder of checkpoints
    assert cli_main(["evaluate", "--checkpoint", str(out / "checkpoints"), "--data", str(synthetic_root),
                     "--curve", str(curve)]) == 2
    assert "--all-checkpoints" in capsys.readouterr().err


def test_validation_leaves_training_bit_identical_across_a_resume(synthetic_root, tmp_path):
    plain = fast_config(synthetic_root, tmp_path / "plain", max_steps=6)
    train(plain)
    validated = fast_config(synthetic_root, tmp_path / "validated", max_steps=3, eval_every=2, eval_images=4)
    train(validated)
    validated.train.max_steps = 6
    assert train(validated).steps == 6  # resumed at step 3
    a = load_checkpoint(tmp_path / "plain" / "checkpoints")
    b = load_checkpoint(tmp_path / "validated" / "checkpoints")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["data"] == b["data"]
    # no random number drawn either (the folder data has its own generator, so check the global ones)
    rng_a, rng_b = (read_state(run / "checkpoints" / "step_00000006")["ranks"]["0"]["rng"]
                    for run in (tmp_path / "plain", tmp_path / "validated"))
    assert torch.equal(rng_a["torch"], rng_b["torch"]) and torch.equal(rng_a["numpy"]["keys"], rng_b["numpy"]["keys"])
    assert rng_a["python"] == rng_b["python"] and rng_a["numpy"]["position"] == rng_b["numpy"]["position"]
    # the first invocation ended at step 3; the resumed one has no untrained point and reuses the baselines
    assert [r["step"] for r in validation_records(tmp_path / "validated")] == [0, 2, 3, 4, 6]
    assert len(validation_records(tmp_path / "validated", "validation_baselines")) == 1
    losses = {r["step"]: r["total"] for r in read_metrics(tmp_path / "validated") if "total" in r}
    assert {r["step"]: r["total"] for r in read_metrics(tmp_path / "plain")} == {5: losses[5], 6: losses[6]}


def test_validation_is_off_without_a_split_with_depth_and_says_why_once(synthetic_root, tmp_path, caplog):
    root = tmp_path / "no_depth"
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(synthetic_root / "train")
    (root / "val" / "image").symlink_to(synthetic_root / "val" / "image")  # photos without depth
    config = fast_config(root, tmp_path / "run", max_steps=2, eval_every=1)
    with caplog.at_level(logging.WARNING, logger="trainer.loop.validation"):
        train(config)
    off = [r.getMessage() for r in caplog.records if "validation is off" in r.getMessage()]
    assert len(off) == 1 and "'val' or 'test'" in off[0], off
    assert not [r for r in read_metrics(tmp_path / "run") if "kind" in r]
    assert not (tmp_path / "run" / "learning_curve.png").exists()


def test_the_split_falls_back_to_test_and_can_be_chosen(synthetic_root, tmp_path):
    from trainer.loop.validation import load_validation_set

    root = tmp_path / "no_val"
    root.mkdir()
    (root / "test").symlink_to(synthetic_root / "test")
    found = load_validation_set(root, None, 5, 64)
    assert found.split == "test" and len(found) == 5 and found.available == 24
    # evenly spaced by name, the same choice every time (and the one `evaluate --images 5` makes)
    assert found.names == [f"{i:06d}" for i in (0, 4, 9, 14, 19)]
    assert load_validation_set(root, None, 5, 64).digest == found.digest
    assert found.images.shape == (5, 3, 64, 64) and found.depth.shape == (5, 64, 64)
    assert "'val'" in load_validation_set(root, "val", 5, 64)  # chosen and absent: a reason, no fallback


def test_a_streaming_run_validates_only_with_eval_data(synthetic_root, tmp_path, caplog):
    from trainer.loop.validation import Validator

    config = fast_config(synthetic_root, tmp_path / "run", eval_every=5)
    records = []
    with caplog.at_level(logging.WARNING, logger="trainer.loop.validation"):
        Validator(config, tmp_path / "run", True, False, records.append, None).start(None, 0)
    assert "train.eval_data" in caplog.text and not records


@pytest.mark.parametrize("key, value", [("eval_every", -1), ("eval_images", 0), ("eval_every", True)])
def test_eval_settings_are_checked(tmp_path, key, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  {key}: {json.dumps(value)}\n")
    with pytest.raises(ConfigError, match=f"{key}") as error:
        load_run_config(path)
    assert str(path) in str(error.value)
    path.write_text("train:\n  eval_every: null\n")
    assert load_run_config(path).train.eval_every is None


def test_curve_keeps_the_last_point_of_each_step_of_the_current_set(tmp_path):
    block = lambda v: {m: {"mean": v, "std": 0.0, "n": 3} for m in ("side_x1e-2", "mad_deg_reference", "mad_deg_exact")}
    records = [
        {"step": 1, "total": 0.5},
        {"kind": "validation_baselines", "step": 0, "set": "old", "constant_depth": block(9.0)},
        {"kind": "validation", "step": 0, "set": "old", "model": block(7.0)},
        {"kind": "validation_baselines", "step": 0, "set": "new", "split": "val", "images": 3,
         "constant_depth": block(2.0), "average_train_depth": "not computed: no train split"},
        {"kind": "validation", "step": 0, "set": "new", "model": block(3.0)},
        {"kind": "validation", "step": 4, "set": "new", "model": block(2.5)},
        {"kind": "validation", "step": 4, "set": "new", "model": block(1.5)},  # redone after a resume
    ]
    curve = curve_from_records(records)
    assert [(p["step"], p["side_x1e-2"]) for p in curve.points] == [(0, 3.0), (4, 1.5)]
    assert curve.baselines == {"constant_depth": {m: 2.0 for m in ("side_x1e-2", "mad_deg_reference", "mad_deg_exact")}}
    assert Image.open(plot_learning_curve(curve, tmp_path / "c.png")).format == "PNG"
    assert Image.open(plot_learning_curve(Curve(), tmp_path / "empty.png")).format == "PNG"
