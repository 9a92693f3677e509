"""Ray Train on a real local two-node Ray cluster (two raylets on 127.0.0.1, owned by this module):
DeepSpeed on gloo across nodes ends with identical parameters on every rank, and a worker killed by PID
mid-training makes the run restart its workers from the latest checkpoint and finish."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: local nodes on 127.0.0.1 only
ray = pytest.importorskip("ray")

from cluster.job_config import load_job_config  # noqa: E402
from cluster.ray_train import Resources, run_training  # noqa: E402
from cluster_helpers import start_local_cluster, tiny_config  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def two_nodes():
    cluster = start_local_cluster(nodes=2, cpus_per_node=1)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def workers(out_dir: Path) -> dict[int, dict]:
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in (out_dir / "workers").glob("rank_*.json")}


def test_two_nodes_one_worker_each_end_with_identical_parameters(two_nodes, synthetic_root, tmp_path):
    out = tmp_path / "run"
    config = load_job_config(tiny_config(tmp_path / "run.yaml", synthetic_root, out, max_steps=6))
    summary = run_training(config, Resources(workers=2, cpus_per_worker=1, max_failures=0))
    assert summary["step"] == 6 and summary["checkpoint"].endswith("step_00000006")
    ranks = workers(out)
    assert sorted(ranks) == [0, 1]
    assert ranks[0]["node_id"] != ranks[1]["node_id"], "one worker per Ray node"
    assert ranks[0]["finished_step"] == ranks[1]["finished_step"] == 6
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]


def test_a_worker_killed_by_pid_restarts_from_the_latest_checkpoint(two_nodes, synthetic_root, tmp_path):
    out = tmp_path / "run"
    steps = 40
    config = load_job_config(tiny_config(tmp_path / "run.yaml", synthetic_root, out, max_steps=steps, checkpoint_every=4))
    killed: dict = {}

    def kill_rank_1_after_first_checkpoint() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            latest = out / "checkpoints" / "latest"
            try:
                ranks = workers(out) if (out / "workers").exists() else {}
                logged = out / "metrics.jsonl"
                last = json.loads(logged.read_text().splitlines()[-1]).get("step", 0) if logged.exists() else 0
            except (ValueError, IndexError, OSError):  # a file being written
                time.sleep(0.05)
                continue
            # mid-training: after the first checkpoint (step 4) and two more steps that will be redone
            if latest.exists() and 1 in ranks and last >= 6:
                killed["pid"], killed["at"] = ranks[1]["pid"], latest.read_text().strip()
                os.kill(ranks[1]["pid"], signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint)
    killer.start()
    summary = run_training(config, Resources(workers=2, cpus_per_worker=1, max_failures=2))
    killer.join()
    assert killed, "the killer never found a checkpoint and a worker"
    assert killed["at"] != f"step_{steps:08d}", "killed too late to test anything"
    assert summary["step"] == steps
    ranks = workers(out)
    assert ranks[1]["pid"] != killed["pid"], "rank 1 was restarted in a new process"
    assert ranks[0]["finished_step"] == ranks[1]["finished_step"] == steps
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "step" in json.loads(line) and "total" in json.loads(line)]
    # the restarted workers went back to a checkpoint, not to the start, and the records of the steps
    # they redid were dropped on resume: every step once
    assert logged == list(range(1, steps + 1))
