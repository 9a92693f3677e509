"""Serves one worker's registry on /metrics and announces it to Prometheus through a file_sd file.

Each worker binds its own HTTP server to port 0 by default: the OS picks a free port, so any number
of workers on one node never clash and no port plan is needed. Prometheus learns the ports from a
file_sd directory: every worker writes one JSON file there ([{"targets": ["host:port"], "labels":
{...}}]), written atomically, and removes it when it stops. Point Prometheus' file_sd_configs at
that directory (monitoring/prometheus.yml); on a cluster use a directory on a shared filesystem, or
one per node read by that node's Prometheus (or agent).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def _advertised_host(bind_address: str) -> str:
    """The address Prometheus should scrape: the bind address, or this host's name for a wildcard bind."""
    if bind_address in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return bind_address


class MetricsExporter:
    """start() serves `registry`; close() stops serving and removes the file_sd entry."""

    def __init__(self, registry: CollectorRegistry, bind_address: str = "127.0.0.1", port: int = 0,
                 sd_dir: str | os.PathLike | None = None, labels: dict | None = None, job: str = "unsup3d",
                 advertise_address: str | None = None):
        self.registry = registry
        self.bind_address = bind_address
        self.port = port
        self.sd_dir = Path(sd_dir) if sd_dir else None
        self.labels = {k: str(v) for k, v in (labels or {}).items()}
        self.job = job
        self.advertise_address = advertise_address
        self.sd_file: Path | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """host:port that Prometheus scrapes."""
        host = self.advertise_address or _advertised_host(self.bind_address)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def start(self) -> "MetricsExporter":
        self._server, self._thread = start_http_server(self.port, addr=self.bind_address, registry=self.registry)
        self.port = self._server.server_port
        if self.sd_dir is not None:
            name = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", v) for v in self.labels.values()) or self.job
            sd_file = self.sd_dir / f"{name}_{socket.gethostname()}_{os.getpid()}_{self.port}.json"
            entry = [{"targets": [self.address], "labels": {"job": self.job, **self.labels}}]
            temporary = sd_file.with_suffix(".tmp")  # Prometheus reads *.json only: rename is atomic
            try:
                self.sd_dir.mkdir(parents=True, exist_ok=True)
                temporary.write_text(json.dumps(entry, indent=1) + "\n")
                os.replace(temporary, sd_file)
                self.sd_file = sd_file
            except OSError as error:
                # A full disk (or a read-only sd_dir) must not stop training: serve the metrics without
                # the announcement, say so once, and leave no partial file for Prometheus to trip on.
                temporary.unlink(missing_ok=True)
                reason = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
                log.warning("cannot write the Prometheus file_sd entry %s (%s): metrics are still served at %s, but "
                            "Prometheus will not discover them", sd_file, reason, self.url)
        return self

    def close(self) -> None:
        if self.sd_file is not None:
            self.sd_file.unlink(missing_ok=True)
            self.sd_file = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "MetricsExporter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
