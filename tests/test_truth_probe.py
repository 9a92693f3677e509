"""The truth probe: correlations of a model's pose, light and per-image depth with the generator's truth."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.face_generator import generate_faces, read_truth
from trainer.data.face_sampling import FaceConfig
from trainer.results.truth_probe import depth_departure_correlation, pearson, probe


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    generate_faces(str(root), FaceConfig(num_train=4, num_val=0, num_test=12, batch_size=12))
    return root


def test_depth_departure_is_one_for_the_truth_and_zero_for_one_template(faces):
    truth = read_truth(str(faces), "test")
    canon = truth["canonical_depth"].astype(np.float32)
    fore = canon < 1.1
    assert depth_departure_correlation(canon, canon, fore)["depth_departure"] == pytest.approx(1.0)
    # Scale and offset per image do not matter: only each face's own shape does.
    scaled = canon * 0.5 + np.arange(len(canon))[:, None, None] * 0.01
    assert depth_departure_correlation(scaled, canon, fore)["depth_departure"] == pytest.approx(1.0)
    template = np.repeat(canon.mean(0, keepdims=True), len(canon), axis=0)
    assert depth_departure_correlation(template, canon, fore)["depth_departure"] == 0.0
    assert depth_departure_correlation(canon, canon, fore)["depth_departure_interior"] == pytest.approx(1.0)
    assert depth_departure_correlation(template, canon, fore)["depth_departure_interior"] == 0.0


def test_interior_correlation_ignores_a_model_that_only_follows_the_outline(faces):
    """Each face's own depth in the outer ring, one template inside: the interior score stays 0."""
    from trainer.results.truth_probe import INTERIOR_ERODE, _erode

    truth = read_truth(str(faces), "test")
    canon = truth["canonical_depth"].astype(np.float64)
    fore = canon < 1.1
    interior = _erode(_erode(fore.mean(0) >= 0.95, 1), INTERIOR_ERODE)
    outline_only = np.where(interior[None], canon.mean(0, keepdims=True), canon)
    scores = depth_departure_correlation(outline_only, canon, fore)
    assert scores["depth_departure"] > 0.5
    assert scores["depth_departure_interior"] == 0.0


def test_pearson_of_a_constant_is_zero():
    assert pearson(np.ones(5), np.arange(5)) == 0.0


def test_probe_and_evaluate_report_the_correlations(faces, tiny_trained_run):
    from trainer.results.evaluate import evaluate

    result = probe(str(tiny_trained_run / "checkpoints"), str(faces), "test")
    assert result["images"] == 12 and result["step"] == 1
    for key in ("yaw", "pitch", "roll", "light_x", "light_y", "depth_departure"):
        assert -1.0 <= result[key] <= 1.0, key
    scores = evaluate(str(tiny_trained_run / "checkpoints"), str(faces), split="test", device="cpu")
    assert set(scores["truth_correlation"]) >= {"yaw", "pitch", "light_x", "depth_departure"}
