"""Where a run's outputs live: a local (or shared-filesystem) path, or s3://bucket/prefix.

The trainer writes checkpoints into one directory that every rank sees (each rank writes its part,
rank 0 renames the finished directory into place). So:
- a local path: used as it is. On a multi-node cluster it must be a shared filesystem mount.
- s3://: the workers train into a local staging directory; before training the latest checkpoint
  (and config/metrics) is downloaded from S3, and while training a thread on rank 0 uploads every new
  complete checkpoint, then the `latest` pointer (so S3's `latest` always names a complete upload),
  and a last sync runs at the end. The staging directory must be seen by every rank, so an s3://
  out_dir needs all workers of the run on one node (or UNSUP3D_STAGING_DIR on a shared filesystem).
  Endpoint and credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL for S3-compatible
  servers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SYNC_EVERY_S = 5.0


def is_remote(url: str) -> bool:
    return url.startswith("s3://")


def ray_storage_path(out_dir: str) -> str | None:
    """Ray Train's own run state (no model checkpoints: ours live in out_dir) goes beside the outputs
    for local paths; for s3:// outputs Ray's default (~/ray_results) is kept."""
    if is_remote(out_dir):
        return os.environ.get("UNSUP3D_RAY_STORAGE")
    return str(Path(out_dir) / "ray")


def staging_dir_for(out_dir: str) -> Path:
    base = Path(os.environ.get("UNSUP3D_STAGING_DIR", "/tmp/unsup3d-staging"))
    return base / hashlib.sha256(out_dir.encode()).hexdigest()[:16]


class S3Mirror:
    """Download the latest checkpoint of an s3:// out_dir, and upload new ones as they appear."""

    TOP_FILES = ("config.yaml", "metrics.jsonl")

    def __init__(self, url: str, local: Path):
        from data_pipeline.storage import open_storage

        self.url = url.rstrip("/")
        self.storage = open_storage(self.url)
        self.fs = self.storage.fs
        self.prefix = self.storage.prefix
        self.local = local
        self.uploaded: set[str] = set()

    def download_latest(self) -> str | None:
        self.local.mkdir(parents=True, exist_ok=True)
        for name in self.TOP_FILES:
            if self.fs.exists(f"{self.prefix}/{name}"):
                self.fs.get_file(f"{self.prefix}/{name}", str(self.local / name))
        pointer = f"{self.prefix}/checkpoints/latest"
        if not self.fs.exists(pointer):
            return None
        name = self.fs.cat_file(pointer).decode().strip()
        target = self.local / "checkpoints" / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{self.prefix}/checkpoints/{name}/", str(target) + "/", recursive=True)
        (self.local / "checkpoints" / "latest").write_text(name)
        self.uploaded.add(name)
        log.info("restored %s from %s", name, self.url)
        return name

    def upload_new(self) -> None:
        pointer = self.local / "checkpoints" / "latest"
        for name in self.TOP_FILES:
            if (self.local / name).exists():
                self.fs.put_file(str(self.local / name), f"{self.prefix}/{name}")
        if not pointer.exists():
            return
        name = pointer.read_text().strip()
        if name in self.uploaded or not (self.local / "checkpoints" / name).is_dir():
            return
        self.fs.put(str(self.local / "checkpoints" / name) + "/", f"{self.prefix}/checkpoints/{name}/", recursive=True)
        self.fs.pipe_file(f"{self.prefix}/checkpoints/latest", name.encode())  # only after the files
        self.uploaded.add(name)
        log.info("uploaded %s to %s", name, self.url)


@contextlib.contextmanager
def staged_out_dir(config, rank: int, world_size: int):
    """Yield the local directory the trainer should write into for `config.train.out_dir`."""
    out_dir = config.train.out_dir
    if not is_remote(out_dir):
        yield out_dir
        return
    from trainer.distributed import barrier

    local = staging_dir_for(out_dir)
    mirror = S3Mirror(out_dir, local)
    if rank == 0:
        mirror.download_latest()
    barrier()
    stop = threading.Event()
    thread = None
    if rank == 0:
        def loop() -> None:
            while not stop.wait(SYNC_EVERY_S):
                try:
                    mirror.upload_new()
                except Exception as error:  # noqa: BLE001 - keep training; the next round retries
                    log.warning("upload to %s failed: %s", out_dir, error)

        thread = threading.Thread(target=loop, name="s3-mirror", daemon=True)
        thread.start()
    try:
        yield str(local)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
            mirror.upload_new()
