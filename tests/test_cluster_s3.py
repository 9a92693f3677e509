"""train.out_dir on S3 (moto's server on 127.0.0.1): checkpoints are uploaded while training, and a
relaunched job on a fresh staging directory (another machine) resumes from S3's latest checkpoint; on
two Ray nodes, whose staging directories are not shared, S3 gathers every rank's files."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: local nodes on 127.0.0.1 only
pytest.importorskip("ray")
pytest.importorskip("s3fs")
sys.path.insert(0, str(Path(__file__).resolve().parent / "data_pipeline"))

from cluster.cli import main as cli_main  # noqa: E402
from cluster.job_config import load_job_config  # noqa: E402
from cluster.ray_train import Resources, run_training  # noqa: E402
from cluster_helpers import moto_s3, start_local_cluster, tiny_config  # noqa: E402


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as server:
        yield server


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


@pytest.fixture
def two_nodes_on_s3(s3, tmp_path, monkeypatch):
    """A two-node local Ray cluster whose workers see the S3 server and a staging base in tmp_path
    (the raylets, and so the workers, inherit the environment of this process when they start)."""
    import ray

    monkeypatch.setenv("UNSUP3D_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("UNSUP3D_RAY_STORAGE", str(tmp_path / "ray"))  # Ray Train's run state (driver side)
    cluster = start_local_cluster(nodes=2, cpus_per_node=1)
    try:
        ray.init(address=cluster.address)
        yield tmp_path / "staging"
    finally:
        ray.shutdown()
        cluster.shutdown()


def node_dirs(staging: Path) -> dict[int, Path]:
    """rank -> the staging directory (<base>/<run>/node-<id>) its worker file is in."""
    return {json.loads(f.read_text())["rank"]: f.parent.parent for f in staging.glob("*/node-*/workers/rank_*.json")}


def test_two_nodes_without_a_shared_filesystem_gather_every_rank_on_s3_and_resume_from_it(
        two_nodes_on_s3, synthetic_root, tmp_path):
    from data_pipeline.storage import open_storage
    from trainer.loop.checkpoint_load import read_state, verify_ds_files

    url = "s3://unsup3d-runs/two-nodes"
    storage = open_storage(url)
    storage.ensure_bucket()
    # ZeRO 1: each rank writes its own optimizer partition, and DeepSpeed reads both on load.
    path = tiny_config(tmp_path / "run.yaml", synthetic_root, url, max_steps=2, checkpoint_every=1,
                       engine={"zero_stage": 1})
    resources = Resources(workers=2, cpus_per_worker=1, max_failures=0)
    run_training(load_job_config(path), resources, run_name="two-nodes")

    dirs = node_dirs(two_nodes_on_s3)
    assert sorted(dirs) == [0, 1] and dirs[0] != dirs[1], "each node stages into its own directory"
    rank_files = {r: f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    local_1 = dirs[1] / "checkpoints" / "step_00000002"
    assert (local_1 / rank_files[1]).is_file() and not (local_1 / rank_files[0]).exists(), "not a shared directory"

    assert storage.read_bytes("checkpoints/latest").decode() == "step_00000002"
    fetched = tmp_path / "fetched"
    storage.fs.get(f"{storage.prefix}/checkpoints/step_00000002", str(fetched), recursive=True)
    state = read_state(fetched)
    assert set(rank_files.values()) <= set(state["ds_files"]), "state.pt records both ranks' DeepSpeed files"
    verify_ds_files(fetched, state)  # every recorded file is on S3, with the recorded SHA-256
    assert (fetched / "model.pt").is_file()

    for directory in dirs.values():  # relaunch on machines with nothing local: everything comes from S3
        shutil.rmtree(directory)
    config = load_job_config(path)
    config.train.max_steps = 4
    run_training(config, resources, run_name="two-nodes")

    assert storage.read_bytes("checkpoints/latest").decode() == "step_00000004"
    steps = [json.loads(line)["step"] for line in storage.read_bytes("metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4], "the relaunch resumed at step 2 instead of starting over"
    storage.fs.invalidate_cache()
    kept = sorted(p.rsplit("/", 1)[-1] for p in storage.fs.ls(f"{storage.prefix}/checkpoints", detail=False))
    assert kept == ["latest", "step_00000003", "step_00000004"], "S3 keeps train.keep_checkpoints checkpoints"
    dirs = node_dirs(two_nodes_on_s3)
    workers = {r: json.loads((d / "workers" / f"rank_{r}.json").read_text()) for r, d in dirs.items()}
    assert workers[0]["finished_step"] == workers[1]["finished_step"] == 4
    assert workers[0]["param_sha256"] == workers[1]["param_sha256"]
