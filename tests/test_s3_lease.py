"""One run per s3:// out_dir (issue 15, item 1): the lease object of cluster/lease.py against moto's
server on 127.0.0.1. A live lease is refused naming its host and pid; a lease that is not renewed
expires and is taken over (and the takeover says so); the heartbeat keeps a lease alive past its ttl;
a run whose lease is taken from it stops; `unsup3d train` on a leased prefix writes nothing there."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
sys.path.insert(0, str(Path(__file__).resolve().parent / "data_pipeline"))

from cluster.lease import LEASE_NAME, S3Lease  # noqa: E402
from dp_helpers import MotoServer  # noqa: E402
from trainer.loop.run_lock import RunLockedError  # noqa: E402

URL = "s3://unsup3d-leases/run"


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
        from data_pipeline.storage import open_storage

        storage = open_storage(URL)
        storage.ensure_bucket()
        yield storage
    finally:
        server.stop()


def write_lease(storage, host: str, pid: int, ttl_s: float) -> None:
    """A lease as another driver would have left it (written now, by the server's clock)."""
    storage.write_bytes(LEASE_NAME, json.dumps({"host": host, "pid": pid, "started": time.time(), "ttl_s": ttl_s,
                                                "command": "unsup3d train --config other.yaml"}).encode())


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_held_lease_refuses_a_second_run_naming_it_and_is_gone_once_released(s3):
    with S3Lease(URL, ttl_s=30) as held:
        holder = json.loads(s3.read_bytes(LEASE_NAME))
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunLockedError) as refused:
            S3Lease(URL, ttl_s=30).acquire()
        message = str(refused.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and f"{URL}/{LEASE_NAME}" in message
        assert held.lost is None
    assert not s3.exists(LEASE_NAME)
    with S3Lease(URL, ttl_s=30):  # free again
        pass


def test_the_heartbeat_keeps_a_lease_past_its_ttl_and_an_abandoned_one_expires_and_is_taken_over(s3, caplog):
    first = S3Lease(URL, ttl_s=4).acquire()  # renewed every 1.3 s; S3's clock counts whole seconds
    try:
        time.sleep(6)  # longer than the ttl: only the renewals keep it
        with pytest.raises(RunLockedError, match="renewed [0-3]s ago"):
            S3Lease(URL, ttl_s=4).acquire()
        assert json.loads(s3.read_bytes(LEASE_NAME))["renewals"] >= 2
    finally:
        first.release()

    write_lease(s3, "elsewhere.example", 4242, ttl_s=60)  # a driver on another machine
    with pytest.raises(RunLockedError, match="pid 4242 on host elsewhere.example"):
        S3Lease(URL, ttl_s=2).acquire()  # its ttl, not ours, counts; another host's pid cannot be checked
    write_lease(s3, "elsewhere.example", 4242, ttl_s=1)  # its last renewal before it died
    time.sleep(2.5)
    caplog.set_level(logging.WARNING, logger="cluster.lease")
    with S3Lease(URL, ttl_s=30):
        assert json.loads(s3.read_bytes(LEASE_NAME))["pid"] == os.getpid()
    assert "took over the lease" in caplog.text and "pid 4242 on host elsewhere.example" in caplog.text
    assert "not renewed for" in caplog.text


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(s3, caplog):
    pid = dead_pid()
    write_lease(s3, socket.gethostname(), pid, ttl_s=600)
    caplog.set_level(logging.WARNING, logger="cluster.lease")
    with S3Lease(URL, ttl_s=30):
        pass
    assert f"took over the lease {URL}/{LEASE_NAME} of pid {pid}" in caplog.text
    assert "that process is gone" in caplog.text


def test_a_run_whose_lease_is_taken_from_it_stops_with_one_line(s3):
    import signal

    # Python's own SIGINT handler: an earlier in-process Ray Train fit() leaves its handler (which aborts
    # that run's long-gone controller) installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_loss(s3)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_loss(s3):
    with pytest.raises(RunLockedError) as stopped:
        with S3Lease(URL, ttl_s=3):
            write_lease(s3, "elsewhere.example", 99, ttl_s=600)  # an operator's (or a split brain's) takeover
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the heartbeat interrupts this loop
                time.sleep(0.05)
    message = str(stopped.value)
    assert "\n" not in message and "taken over by pid 99 on host elsewhere.example" in message, message
    assert json.loads(s3.read_bytes(LEASE_NAME))["pid"] == 99, "the new holder's lease is left alone"


def test_unsup3d_train_on_a_leased_prefix_is_refused_before_writing_and_takes_it_over_once_expired(
        s3, synthetic_root, tmp_path, monkeypatch, capsys, caplog):
    pytest.importorskip("ray")
    from cluster.cli import main as cli_main
    from cluster_helpers import forget_launch_variables, tiny_config

    forget_launch_variables(monkeypatch)
    monkeypatch.setenv("UNSUP3D_STAGING_DIR", str(tmp_path / "staging"))
    config = tiny_config(tmp_path / "run.yaml", synthetic_root, URL, max_steps=1, checkpoint_every=1)
    write_lease(s3, "elsewhere.example", 4242, ttl_s=600)  # a live driver on another machine
    assert cli_main(["train", "--config", str(config), "--workers", "1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("unsup3d train: error:") and "pid 4242 on host elsewhere.example" in line, line
    s3.fs.invalidate_cache()
    assert s3.fs.find(s3.prefix) == [f"{s3.prefix}/{LEASE_NAME}"], "the refused run wrote under the prefix"

    write_lease(s3, "elsewhere.example", 4242, ttl_s=1)  # that driver's last renewal, before it died
    time.sleep(2)
    caplog.set_level(logging.WARNING, logger="cluster.lease")
    assert cli_main(["train", "--config", str(config), "--workers", "1"]) == 0
    assert "took over the lease" in caplog.text and "pid 4242 on host elsewhere.example" in caplog.text
    assert s3.read_bytes("checkpoints/latest").decode() == "step_00000001"
    assert not s3.exists(LEASE_NAME), "released at the end of the run"
    capsys.readouterr()
