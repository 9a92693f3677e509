"""Where a run's outputs live: a local (or shared-filesystem) path, or s3://bucket/prefix.

- A local path: used as it is. The trainer's checkpoint directory is then one directory every rank
  writes into, so on a multi-node cluster it must be a shared filesystem mount.
- s3://: S3 is the run's storage and no filesystem is shared. Each node trains into its own local
  staging directory, <UNSUP3D_STAGING_DIR (default /tmp/unsup3d-staging)>/<hash of out_dir>/node-<Ray node
  id>, a cache of S3:
  - before training, the lowest rank of each node downloads S3's latest checkpoint (every rank's files)
    and config.yaml/metrics.jsonl/learning_curve.png into it (anything else cached there is dropped);
    then all ranks wait;
  - at every checkpoint (trainer/loop/checkpoint.py: one leader finishes each directory), each node's leader
    uploads the files of its step directory (its ranks' DeepSpeed files, state.pt, rank 0's model.pt;
    they merge under one prefix because ranks write different names), all ranks wait, then rank 0
    alone uploads config.yaml/metrics.jsonl/learning_curve.png (the last when validation drew it),
    writes S3's `latest` and prunes. So S3's `latest` only ever names a checkpoint whose every rank's
    files are uploaded; a run killed at any moment resumes from the last one published. Uploads are
    synchronous (checkpoints are infrequent) and retried on transient errors; one that still fails
    fails the worker, and Ray Train restarts the run from S3.
  - S3 keeps the newest train.keep_checkpoints checkpoints up to `latest`; step folders after `latest`
    are leftovers of a save killed mid-upload and are deleted.
  - A rollback after non-finite steps reads the local copy, which on several nodes holds only this
    node's ranks' DeepSpeed files: the workers refuse it (file check against state.pt) and fail, and
    Ray Train's restart (--max-failures) resumes from S3's latest, the checkpoint the rollback wanted.
  Endpoint and credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL for S3-compatible
  servers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    return url.startswith("s3://")


def ray_storage_path(out_dir: str) -> str | None:
    """Ray Train's own run state (no model checkpoints: ours live in out_dir) goes beside the outputs
    for local paths; for s3:// outputs Ray's default (~/ray_results) is kept."""
    if is_remote(out_dir):
        return os.environ.get("UNSUP3D_RAY_STORAGE")
    return str(Path(out_dir) / "ray")


def staging_dir_for(out_dir: str, node_id: str) -> Path:
    """One directory per run and node: two nodes never share one, even with a shared staging base."""
    base = Path(os.environ.get("UNSUP3D_STAGING_DIR", "/tmp/unsup3d-staging"))
    return base / hashlib.sha256(out_dir.encode()).hexdigest()[:16] / f"node-{node_id}"


class S3Mirror:
    """An s3:// out_dir and one node's staging copy of it; the SaveHook of trainer/loop/checkpoint.py."""

    TOP_FILES = ("config.yaml", "metrics.jsonl", "learning_curve.png")  # each only if it exists

    def __init__(self, url: str, local: Path, keep: int):
        from data_pipeline.config import RetryConfig
        from data_pipeline.storage import open_storage

        self.url = url.rstrip("/")
        self.storage = open_storage(self.url)
        self.fs = self.storage.fs
        self.prefix = self.storage.prefix
        self.local = local
        self.keep = keep
        self.retry = RetryConfig()

    def _call(self, what: str, action):
        """`action()`, retried on transient errors (the filesystem retries nothing itself)."""
        from data_pipeline.storage import with_retries

        return with_retries(action, what, self.retry)

    def latest_name(self) -> str | None:
        pointer = f"{self.prefix}/checkpoints/latest"
        try:
            return self._call(f"read {pointer}", lambda: self.fs.cat_file(pointer)).decode().strip()
        except FileNotFoundError:
            return None

    def download_latest(self) -> str | None:
        """Make the staging directory S3's copy: top files and the latest checkpoint, nothing else."""
        self.fs.invalidate_cache()
        self.local.mkdir(parents=True, exist_ok=True)
        for name in self.TOP_FILES:
            key, path = f"{self.prefix}/{name}", self.local / name
            try:
                self._call(f"download {key}", lambda: self.fs.get_file(key, str(path)))
            except FileNotFoundError:
                path.unlink(missing_ok=True)
        checkpoints = self.local / "checkpoints"
        # A local checkpoint may hold only this node's files, or be newer than S3's latest (a save killed
        # mid-upload): the cache is dropped and S3's latest fetched whole.
        shutil.rmtree(checkpoints, ignore_errors=True)
        name = self.latest_name()
        if name is None:
            return None
        remote = f"{self.prefix}/checkpoints/{name}"
        partial = checkpoints / f".download_{name}"
        for key in self._call(f"list {remote}", lambda: self.fs.find(remote)):
            target = partial / key[len(remote) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(f"download {key}", lambda: self.fs.get_file(key, str(target)))
        os.replace(partial, checkpoints / name)
        (checkpoints / "latest").write_text(name)
        log.info("restored %s from %s into %s", name, self.url, self.local)
        return name

    def upload_top_files(self) -> None:
        for name in self.TOP_FILES:
            if (self.local / name).exists():
                self._call(f"upload {name}", lambda: self.fs.put_file(str(self.local / name), f"{self.prefix}/{name}"))

    def directory_saved(self, step_dir: Path) -> None:
        """Upload this node's files of a checkpoint (on the leader of each node's directory)."""
        for path in sorted(step_dir.rglob("*")):
            if path.is_file():
                key = f"{self.prefix}/checkpoints/{step_dir.name}/{path.relative_to(step_dir).as_posix()}"
                self._call(f"upload {key}", lambda: self.fs.put_file(str(path), key))
        log.info("uploaded this node's files of %s to %s", step_dir.name, self.url)

    def checkpoint_saved(self, step_dir: Path) -> None:
        """Publish a checkpoint (on rank 0, once every node's directory_saved returned)."""
        self.upload_top_files()
        pointer = f"{self.prefix}/checkpoints/latest"
        self._call(f"write {pointer}", lambda: self.fs.pipe_file(pointer, step_dir.name.encode()))
        log.info("%s/checkpoints/latest is now %s", self.url, step_dir.name)
        self._prune(step_dir.name)

    def _prune(self, latest: str) -> None:
        from trainer.loop.checkpoint import CHECKPOINT_PATTERN

        base = f"{self.prefix}/checkpoints"
        self.fs.invalidate_cache()  # other nodes uploaded since this process last listed
        listed = self._call(f"list {base}", lambda: self.fs.ls(base, detail=False))
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in listed]
        found = sorted((int(m.group(1)), name) for name in names if (m := CHECKPOINT_PATTERN.match(name)))
        latest_step = int(CHECKPOINT_PATTERN.match(latest).group(1))
        complete = [name for step, name in found if step <= latest_step]
        leftovers = [name for step, name in found if step > latest_step]  # uploads of a killed save
        for name in complete[: -self.keep] + leftovers:
            self._call(f"delete {base}/{name}", lambda: self.fs.rm(f"{base}/{name}", recursive=True))


@contextlib.contextmanager
def staged_out_dir(config, rank: int, node_id: str):
    """Yield (the local directory the trainer writes into for `config.train.out_dir`, the trainer's
    after_save hook or None). Collective: every rank of the run enters it."""
    out_dir = config.train.out_dir
    if not is_remote(out_dir):
        yield out_dir, None
        return
    from trainer.loop.process_group import all_gather_object, barrier

    local = staging_dir_for(out_dir, node_id)
    mirror = S3Mirror(out_dir, local, keep=config.train.keep_checkpoints)
    if all_gather_object(node_id).index(node_id) == rank:  # the lowest rank on this node fills its directory
        mirror.download_latest()
    barrier()
    yield str(local), mirror
    if rank == 0:  # the metrics logged after the last checkpoint (not after a failure: the restart redoes them)
        mirror.upload_top_files()
