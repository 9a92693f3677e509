"""With --no-ray, nothing listens but the metrics endpoint the config asks for (issue 15, item 6): a world
of one opens no process-group port (gloo would open one per group, DeepSpeed adds groups)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_resume_config import fast_config
from trainer.config import dump_config

REPO = Path(__file__).resolve().parents[1]


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (IPv4 and IPv6), from /proc."""
    sockets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # state LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


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
