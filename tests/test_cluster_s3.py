"""train.out_dir on S3 (moto's server on 127.0.0.1): checkpoints are uploaded while training, and a
relaunched job on a fresh staging directory (another machine) resumes from S3's latest checkpoint."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: local nodes on 127.0.0.1 only
pytest.importorskip("ray")
pytest.importorskip("s3fs")
sys.path.insert(0, str(Path(__file__).resolve().parent / "data_pipeline"))

from cluster.cli import main as cli_main  # noqa: E402
from cluster_helpers import tiny_config  # noqa: E402
from dp_helpers import MotoServer  # noqa: E402


@pytest.fixture
def s3(monkeypatch):
    server = MotoServer()
    server.start()
    try:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", server.endpoint)):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        yield server
    finally:
        server.stop()


def test_s3_out_dir_uploads_checkpoints_and_a_relaunch_resumes_from_them(s3, synthetic_root, tmp_path, monkeypatch, capsys):
    from data_pipeline.storage import open_storage

    storage = open_storage("s3://unsup3d-runs/widgets")
    storage.ensure_bucket()
    config = tiny_config(tmp_path / "run.yaml", synthetic_root, "s3://unsup3d-runs/widgets", max_steps=2,
                         checkpoint_every=1)

    monkeypatch.setenv("UNSUP3D_STAGING_DIR", str(tmp_path / "machine-a"))  # inherited by the embedded Ray
    assert cli_main(["train", "--config", str(config), "--workers", "1"]) == 0
    assert storage.read_bytes("checkpoints/latest").decode() == "step_00000002"
    assert storage.exists("checkpoints/step_00000002/state.pt")
    assert storage.exists("checkpoints/step_00000002/model.pt")

    monkeypatch.setenv("UNSUP3D_STAGING_DIR", str(tmp_path / "machine-b"))  # nothing local: all from S3
    assert cli_main(["train", "--config", str(config), "--workers", "1", "--max-steps", "4"]) == 0
    assert storage.read_bytes("checkpoints/latest").decode() == "step_00000004"
    steps = [json.loads(line)["step"] for line in storage.read_bytes("metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4], "the relaunch resumed at step 2 instead of starting over"
    capsys.readouterr()
