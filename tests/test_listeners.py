"""What listens (issue 15, item 6). With --no-ray, nothing but the metrics endpoint the config asks for: a
world of one opens no process-group port (gloo would open one per group, DeepSpeed adds groups). Under
an embedded Ray with one worker, the worker opens nothing on a non-loopback address (Ray Train's
rendezvous TCPStore, which torch binds to every interface, is not created for a world of one)."""

from __future__ import annotations

import os
import re
import ipaddress
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_resume_config import fast_config
from trainer.config import dump_config

REPO = Path(__file__).resolve().parents[1]


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on (IPv4 and IPv6), from /proc."""
    sockets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # state LISTEN
                address, port = fields[1].rsplit(":", 1)
                # /proc prints each 32-bit word of the address in host (little-endian) byte order
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                found.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def listening_ports(pid: int) -> set[int]:
    return {port for _, port in listening_sockets(pid)}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_a_no_ray_run_listens_only_on_its_metrics_port(synthetic_root, tmp_path):
    config = fast_config(synthetic_root, tmp_path / "run", max_steps=100_000, log_every=1)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        run = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", "--no-ray", "--config", str(path)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training, DeepSpeed built
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        port = int(re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", log.read_text()).group(1))
        assert listening_ports(run.pid) == {port}
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_under_embedded_ray_listen_on_loopback_only(workers, synthetic_root, tmp_path, capsys,
                                                            monkeypatch):
    """One worker: no rendezvous at all. Two: the store, gloo's sockets and everything else on 127.0.0.1."""
    pytest.importorskip("ray")
    from cluster.cli import main as cli_main
    from cluster_helpers import forget_launch_variables, tiny_config

    forget_launch_variables(monkeypatch)

    out_dir = tmp_path / "run"
    path = tiny_config(tmp_path / "run.yaml", synthetic_root, out_dir, max_steps=40)
    seen: dict = {}

    def watch() -> None:  # every worker's sockets once they train (DeepSpeed and the metrics endpoint up)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen:
            try:
                ranks = [json.loads((out_dir / "workers" / f"rank_{r}.json").read_text()) for r in range(workers)]
                if (out_dir / "metrics.jsonl").read_text().count("\n") >= 2:
                    seen["sockets"] = {r["pid"]: listening_sockets(r["pid"]) for r in ranks}
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert cli_main(["train", "--config", str(path), "--workers", str(workers)]) == 0
    finally:
        seen.setdefault("done", True)
        watcher.join()
    capsys.readouterr()
    assert "sockets" in seen, "the run ended before its workers could be looked at"
    for pid, sockets in seen["sockets"].items():
        exposed = {(address, port) for address, port in sockets if not is_loopback(address)}
        assert not exposed, f"worker pid {pid} listens beyond loopback: {sorted(exposed)}"
        assert sockets, "each worker's metrics endpoint (and Ray's own) should be there: nothing was measured"
