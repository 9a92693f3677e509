"""One run per out_dir (issue 15, item 1): a second run is refused at once, naming the first; a stale
lock of a dead process on this host is taken over and logged; config.yaml is written only once the
checkpoint the run resumes from has been accepted."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.cli import main as cli_main
from test_resume_config import fast_config
from trainer.config import dump_config
from trainer.loop.run_lock import LOCK_NAME, RunLock, RunLockedError
from cluster.data_source import train

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_on_the_same_out_dir_fails_fast_naming_the_first(synthetic_root, tmp_path, capsys):
    config = fast_config(synthetic_root, tmp_path / "run", max_steps=100_000)
    config.train.log_every = 1000
    first_file = tmp_path / "first.yaml"
    first_file.write_text(dump_config(config))
    first = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", "--no-ray", "--config", str(first_file)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lock = tmp_path / "run" / LOCK_NAME
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()) or not (tmp_path / "run" / "config.yaml").exists():
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid

        config.optimizer.lr = 0.5  # the same out_dir with another lr: refused before anything is written
        second_file = tmp_path / "second.yaml"
        second_file.write_text(dump_config(config))
        capsys.readouterr()
        started = time.perf_counter()
        assert cli_main(["train", "--no-ray", "--config", str(second_file)]) == 2
        assert time.perf_counter() - started < 10
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and "in use by another run" in line, line
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and str(lock) in line, line
        assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optimizer"]["lr"] == 1e-3
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_logged(synthetic_root, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": time.time() - 60,
                                             "command": "unsup3d train --config killed.yaml"}))
    caplog.set_level(logging.WARNING, logger="trainer.loop.run_lock")
    assert train(fast_config(synthetic_root, run, max_steps=1)).steps == 1
    assert f"taking over the stale lock {run / LOCK_NAME} of pid {pid}" in caplog.text and "is gone" in caplog.text
    assert not (run / LOCK_NAME).exists()  # released at the end of the run


def test_a_lock_held_by_a_live_process_is_refused_and_released_locks_are_reusable(tmp_path):
    with RunLock(tmp_path) as held:
        assert held.held
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again, and no stale-lock warning (the file was removed)
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_file_of_another_host_is_not_taken_over(tmp_path):
    """flock may not reach across hosts on a network filesystem: a free flock proves nothing there."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere.example", "pid": 4242, "started": 0,
                                                  "command": "unsup3d train"}))
    with pytest.raises(RunLockedError, match=r"another host: pid 4242 on host elsewhere.example.*delete"):
        RunLock(tmp_path).acquire()


def test_the_default_ray_mode_refuses_a_second_run_before_its_workers_start(synthetic_root, tmp_path, capsys,
                                                                             monkeypatch):
    """`unsup3d train` without --no-ray (an embedded Ray) is the command people type twice."""
    pytest.importorskip("ray")
    from cluster_helpers import forget_launch_variables, tiny_config

    forget_launch_variables(monkeypatch)

    out_dir = tmp_path / "run"
    path = tiny_config(tmp_path / "run.yaml", synthetic_root, out_dir, max_steps=1)
    with RunLock(out_dir):  # the first run, as its driver holds it
        assert cli_main(["train", "--config", str(path), "--workers", "1"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("unsup3d train: error:") and "in use by another run" in line, line
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in line, line
        # logs/: the console's library log (cluster/console.py), opened before the driver takes the lock:
        # still to be moved after it (see /work/notes/harden-note.md); nothing else may be written.
        assert sorted(p.name for p in out_dir.iterdir() if p.name != "logs") == [LOCK_NAME], \
            "the refused run wrote into out_dir"
