"""A first local run is quiet (issue 16, item 4): the default command, for a few steps, prints only the
project's own lines; Ray's and DeepSpeed's go to <out_dir>/logs/. Run as a user runs it: the real
command in a fresh process, through the embedded Ray (its own local instance, torn down at exit), and
once more with --no-ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.console import PROJECT_LINE

ROOT = Path(__file__).resolve().parents[1]


def tiny_default_run(synthetic_root: Path, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`unsup3d train --config configs/default.yaml`, made tiny with --set: a few steps on the session's
    small synthetic set (no generation), validation on 8 images, a log line every step."""
    settings = {"data.root": str(synthetic_root), "data.generate_if_missing": "null", "data.batch_size": "8",
                "train.max_steps": "3", "train.log_every": "1", "train.eval_every": "2", "train.eval_images": "8",
                "train.checkpoint_every": "2"}
    command = [sys.executable, "-m", "cluster.cli", "train", "--config", "configs/default.yaml",
               "--out-dir", str(out_dir), *(f"--set={k}={v}" for k, v in settings.items()), *extra]
    # a fresh user's environment: no Ray address, and no launcher variables (an in-process test may have
    # left WORLD_SIZE behind, which would make the command train in-process as a torchrun rank)
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OMP_")) and k not in launcher}
    env.update(PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def assert_quiet(done: subprocess.CompletedProcess, out_dir: Path, workers: int = 1) -> list[str]:
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)  # stdout holds the summary and nothing else
    assert summary.get("step", 3) == 3
    lines = done.stderr.splitlines()
    foreign = [line for line in lines if not PROJECT_LINE.match(line)]
    assert foreign == [], foreign[:10]
    assert sum("metrics: http://127.0.0.1:" in line for line in lines) == workers, lines  # one endpoint per rank
    progress = [line for line in lines if "monitoring.progress:" in line]
    assert len(progress) == 3 and "3/3 steps" in progress[-1]
    assert re.search(r"eta \d\d:\d\d", progress[1]), progress  # an estimate from the second step on
    assert (out_dir / "checkpoints" / "step_00000003").is_dir()
    return lines


def test_the_default_command_through_the_embedded_ray_prints_only_the_projects_lines(synthetic_root, tmp_path):
    pytest.importorskip("ray")
    out_dir = tmp_path / "run"
    lines = assert_quiet(tiny_default_run(synthetic_root, out_dir), out_dir)
    ray_log = (out_dir / "logs" / "ray.log").read_text()
    # what used to fill the console is in the file: Ray's start, Ray Train's controller, DeepSpeed
    assert "Started a local Ray instance" in ray_log and "TrainController" in ray_log
    assert "built successfully" in ray_log or "Setting accelerator" in ray_log
    # the embedded Ray gives training every core
    threads = [line for line in lines if "torch thread(s)" in line]
    assert len(threads) == 1 and f"trains with {os.cpu_count()} torch thread(s)" in threads[0], threads


def test_the_scripts_auto_workers_are_as_quiet(synthetic_root, tmp_path):
    """scripts/train.sh's `--workers auto`: on 2 or more cores, several workers of one global batch of
    16, each with its share of the cores; still only the project's lines, and rank 0's progress bar."""
    pytest.importorskip("ray")
    from cluster.ray_train import auto_worker_count

    out_dir = tmp_path / "run"
    workers = auto_worker_count(16)
    lines = assert_quiet(tiny_default_run(synthetic_root, out_dir, "--workers", "auto", "--set=data.batch_size=16"),
                         out_dir, workers)
    assert any(f"--workers auto: {workers} worker(s) of {16 // workers} image(s) each" in line for line in lines)
    threads = [line for line in lines if "torch thread(s)" in line]
    assert len(threads) == workers, threads  # each rank says its own
    assert all(f"trains with {os.cpu_count() // workers} torch thread(s)" in line for line in threads), threads


def test_a_direct_run_is_as_quiet(synthetic_root, tmp_path):
    out_dir = tmp_path / "run"
    assert_quiet(tiny_default_run(synthetic_root, out_dir, "--no-ray"), out_dir)
    deepspeed_log = (out_dir / "logs" / "deepspeed.log").read_text()
    assert "built successfully" in deepspeed_log or "Setting accelerator" in deepspeed_log


def test_quiet_libraries_moves_only_the_handlers_that_write_to_stdout(tmp_path):
    """pytest (and others) attach handlers to non-propagating loggers such as DeepSpeed's: while training,
    those keep their own streams; only DeepSpeed's stdout handler goes to deepspeed.log."""
    import io
    import logging

    from cluster.console import quiet_libraries

    logger = logging.getLogger("DeepSpeed")
    ours = logging.StreamHandler(io.StringIO())
    on_stdout = logging.StreamHandler(sys.stdout)
    logger.addHandler(ours)
    logger.addHandler(on_stdout)
    try:
        with quiet_libraries(str(tmp_path)) as path:
            assert on_stdout.stream is not sys.__stdout__ and on_stdout.stream.name == str(path)
            logger.warning("a line for the file")
        assert "a line for the file" in ours.stream.getvalue()
        assert "a line for the file" in Path(path).read_text()
    finally:
        logger.removeHandler(ours)
        logger.removeHandler(on_stdout)
