"""The shipped face model on real photos that ship inside installed packages (issue 12 item 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.results.evaluate import load_model
from trainer.results.sample_photos import CROPS, sample_photo
from trainer.results.shipped_model import MAX_SHIPPED_BYTES, SHIPPED_CHECKPOINT, export_weights, shipped_checkpoint

# A pose is "the same" when the photo and its mirror image give yaws within this many degrees of
# opposite (the view net's yaw spans +-60 degrees; faces are turned up to +-40).
YAW_TOLERANCE_DEGREES = 3.0
# Depths are compared on 3x3 averages around each landmark.
PATCH = 1


@pytest.fixture(scope="module")
def shipped():
    model, config, step = load_model(shipped_checkpoint(), torch.device("cpu"))
    return model, config


def _image(name: str, size: int, flip: bool = False) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(sample_photo(name, size), dtype=np.float32).copy())
    image = (a.permute(2, 0, 1) / 127.5 - 1.0)[None]
    return image.flip(-1) if flip else image


def _patch(depth: torch.Tensor, row: int, col: int) -> float:
    return float(depth[row - PATCH:row + PATCH + 1, col - PATCH:col + PATCH + 1].mean())


def test_the_shipped_file_is_small_and_weights_only():
    assert SHIPPED_CHECKPOINT.stat().st_size <= MAX_SHIPPED_BYTES
    state = torch.load(SHIPPED_CHECKPOINT, map_location="cpu", weights_only=True)
    assert set(state) >= {"step", "model", "config_yaml", "source"} and state["step"] > 0


@pytest.mark.parametrize("name", sorted(CROPS))
def test_the_nose_tip_is_nearer_than_both_cheeks_and_the_forehead(shipped, name):
    model, config = shipped
    with torch.no_grad():
        depth = model.decompose(_image(name, config.image_size)).canon_depth[0]
    s = config.image_size
    # The nose tip: the nearest point of the face's central band (canonical frame: the face is
    # frontal and centred, the nose on the middle columns).
    band = depth[s // 4: 3 * s // 4, s // 2 - 2: s // 2 + 2]
    row = int(band.min(dim=1).values.argmin()) + s // 4
    col = s // 2
    nose = _patch(depth, row, col)
    cheek_l = _patch(depth, row - s // 16, col - s // 4)
    cheek_r = _patch(depth, row - s // 16, col + s // 4)
    forehead = _patch(depth, row - (3 * s) // 8, col)
    assert nose < min(cheek_l, cheek_r, forehead), (nose, cheek_l, cheek_r, forehead)


@pytest.mark.parametrize("name", sorted(CROPS))
def test_the_mirror_image_has_the_opposite_yaw(shipped, name):
    model, config = shipped
    with torch.no_grad():
        yaw = model.decompose(_image(name, config.image_size)).view[0, 1] * config.max_rotation_degrees
        yaw_flipped = model.decompose(_image(name, config.image_size, flip=True)).view[0, 1] * config.max_rotation_degrees
    assert abs(float(yaw + yaw_flipped)) < YAW_TOLERANCE_DEGREES, (float(yaw), float(yaw_flipped))


def test_export_writes_a_weights_only_file_that_evaluate_loads(tiny_trained_run, tmp_path):
    summary = export_weights(tiny_trained_run / "checkpoints", tmp_path / "model.pt")
    assert summary["step"] == 1 and summary["bytes"] == (tmp_path / "model.pt").stat().st_size
    model, config, step = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert step == 1 and config.image_size == 64


def test_the_shipped_model_reads_the_pose_of_generated_faces(tmp_path):
    """The mirror test above would also pass for a model that always says yaw 0: this one reads the
    pose and the light of faces it has not seen (the test split's first 32 faces)."""
    from trainer.data.face_generator import generate_faces
    from trainer.data.face_sampling import FaceConfig
    from trainer.results.truth_probe import probe

    generate_faces(str(tmp_path), FaceConfig(num_train=0, num_val=0, num_test=32))
    result = probe(str(shipped_checkpoint()), str(tmp_path), "test")
    assert result["yaw"] > 0.9 and result["pitch"] > 0.7 and result["light_x"] > 0.6, result
    assert result["yaw_spread_ratio"] > 0.4, result
