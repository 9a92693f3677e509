"""Exact resume of a 2-process DeepSpeed run on CPU (gloo): SIGKILL at a random step, and SIGKILL in the
middle of a checkpoint save, then resume; the final weights are bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer.loop.checkpoint import KILL_IN_SAVE_ENV
from trainer.loop.checkpoint_load import load_checkpoint
from trainer.loop.process_group import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 12  # 96 images / (8 x 2 ranks) = 6 steps per epoch: the runs cross an epoch boundary
CHECKPOINT_EVERY = 3


def write_config(tmp_path: Path, root: Path, name: str, eval_every: int = 0) -> Path:
    config = {
        "model": {"depth_nf": 8, "depth_zdim": 16, "albedo_nf": 8, "albedo_zdim": 16, "light_nf": 8, "view_nf": 8,
                  "conf_nf": 8, "conf_zdim": 16},
        "perceptual": {"backbone": "none"},
        "loss": {"lam_perc": 0.0},
        "optimizer": {"lr": 1e-3},
        "data": {"root": str(root), "batch_size": 8},
        "train": {"out_dir": str(tmp_path / name), "max_steps": STEPS, "log_every": 1,
                  "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 2, "device": "cpu",
                  "eval_every": eval_every, "eval_images": 4},
        "engine": {"zero_stage": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, log_dir: Path, extra_env: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), **(extra_env or {})}
        out = open(log_dir / f"rank{rank}.{time.time_ns()}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", "--config", str(config)],
                                      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        out.close()
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        kill_all(procs)


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def logs(log_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(log_dir.glob("*.log")))


def last_logged_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def final_weights(out_dir: Path) -> dict:
    state = load_checkpoint(out_dir / "checkpoints")
    assert state["step"] == STEPS
    return state


def assert_identical(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["data_ranks"] == b["data_ranks"]


@pytest.fixture(scope="module")
def straight(synthetic_root, tmp_path_factory):
    """The uninterrupted 2-process run every interrupted one must reproduce."""
    tmp = tmp_path_factory.mktemp("straight")
    procs = launch(write_config(tmp, synthetic_root, "run"), tmp / "logs")
    assert wait_all(procs) == [0, 0], logs(tmp / "logs")
    state = final_weights(tmp / "run")
    assert set(state["data_ranks"]) == {0, 1} and state["data_ranks"][0]["epoch"] == 1
    return state


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(straight, synthetic_root, tmp_path):
    """This run also validates every 2 steps (rank 0 only), the straight one does not: validation
    leaves the weights and data positions of every rank alone, across a kill and a resume too."""
    kill_at = random.Random().randint(CHECKPOINT_EVERY + 1, STEPS - 2)
    config = write_config(tmp_path, synthetic_root, "run", eval_every=2)
    procs = launch(config, tmp_path / "logs")
    try:
        deadline = time.monotonic() + 240
        while last_logged_step(tmp_path / "run") < kill_at:
            assert all(p.poll() is None for p in procs), f"a rank exited early\n{logs(tmp_path / 'logs')}"
            assert time.monotonic() < deadline, logs(tmp_path / "logs")
            time.sleep(0.01)
        assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
    finally:
        kill_all(procs)
    killed_at = last_logged_step(tmp_path / "run")
    assert killed_at < STEPS, f"killed at step {killed_at}, nothing left to resume"

    procs = launch(config, tmp_path / "logs")
    assert wait_all(procs) == [0, 0], logs(tmp_path / "logs")
    assert "resumed from" in logs(tmp_path / "logs"), f"kill_at {kill_at}"
    assert_identical(straight, final_weights(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if r.get("kind") == "validation"} == {0, *range(2, STEPS + 1, 2)}
    by_rank = {rank: "\n".join(p.read_text() for p in (tmp_path / "logs").glob(f"rank{rank}.*.log"))
               for rank in range(WORLD)}
    assert "validation step" in by_rank[0] and "trainer.loop.validation" not in by_rank[1]
    assert (tmp_path / "run" / "learning_curve.png").is_file()


def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_one(straight, synthetic_root, tmp_path):
    config = write_config(tmp_path, synthetic_root, "run")
    save_step = 2 * CHECKPOINT_EVERY
    procs = launch(config, tmp_path / "logs", {KILL_IN_SAVE_ENV: str(save_step)})
    codes = wait_all(procs)
    assert codes == [-signal.SIGKILL] * WORLD, logs(tmp_path / "logs")
    checkpoints = tmp_path / "run" / "checkpoints"
    # the interrupted save left only its temporary directory; `latest` still names the previous checkpoint
    assert (checkpoints / f".tmp_step_{save_step:08d}").is_dir()
    assert not (checkpoints / f"step_{save_step:08d}").exists()
    assert (checkpoints / "latest").read_text() == f"step_{CHECKPOINT_EVERY:08d}"

    procs = launch(config, tmp_path / "logs")
    assert wait_all(procs) == [0, 0], logs(tmp_path / "logs")
    assert f"resumed from {checkpoints / f'step_{CHECKPOINT_EVERY:08d}'}" in logs(tmp_path / "logs")
    assert not list(checkpoints.glob(".tmp_*"))
    assert_identical(straight, final_weights(tmp_path / "run"))
