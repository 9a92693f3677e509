"""The README's line, for real: `ray job submit --working-dir . -- unsup3d train --config ... --workers N`
against a local Ray head with its job server (dashboard) on 127.0.0.1, owned and shut down by the test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: local nodes on 127.0.0.1 only
pytest.importorskip("ray")

from cluster_helpers import tiny_config  # noqa: E402
from trainer.loop.checkpoint_load import load_checkpoint  # noqa: E402
from trainer.loop.process_group import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def head_with_job_server(monkeypatch):
    from cluster.ray_train import loopback_only
    from ray.cluster_utils import Cluster

    loopback_only()
    # the nodes (and so the job's entry point) find `unsup3d` where this interpreter's scripts are
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        "node_ip_address": "127.0.0.1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # it answers (401 when Ray token auth is on: the CLI sends the token)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        cluster.shutdown()


def test_ray_job_submit_runs_unsup3d_train_unchanged(head_with_job_server, synthetic_root, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tmp_path / "run.yaml", synthetic_root, out, max_steps=3)
    env = {**os.environ, "RAY_ADDRESS": head_with_job_server}
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--",
               "unsup3d", "train", "--config", str(config), "--workers", "2"]
    for _ in range(30):  # the job agent starts after the dashboard answers: slow on a loaded machine
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert load_checkpoint(out / "checkpoints")["step"] == 3
