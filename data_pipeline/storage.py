"""Where shards live: a local folder or an S3 prefix (through s3fs), behind one small interface.

Reads and writes are whole objects: a shard is fetched in one GET and parsed from memory, which is
both the fast path against S3 (DEPENDENCIES: one ranged GET per component was 8x slower) and what makes
a retry after a network failure simple: the whole object is fetched again.

Transient failures (connection refused, timeouts, 5xx) are retried with exponential backoff by
`with_retries`; a missing object is permanent and raised at once as FileNotFoundError.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from data_pipeline.config import RetryConfig, S3Config

log = logging.getLogger(__name__)
T = TypeVar("T")


class Storage:
    """A flat key space under a root: local folder or s3://bucket/prefix. Paths are '/'-joined names."""

    url: str

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def url_of(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a shard or half a manifest.
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class S3Storage(Storage):
    def __init__(self, url: str, config: S3Config):
        import s3fs

        self.url = url.rstrip("/")
        self.prefix = self.url[len("s3://"):]
        endpoint = config.resolved_endpoint()
        self.region = config.resolved_region()
        client_kwargs: dict = {"region_name": self.region}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        self.fs = s3fs.S3FileSystem(
            anon=config.anonymous,
            key=config.access_key_id,
            secret=config.secret_access_key,
            token=config.session_token,
            client_kwargs=client_kwargs,
            # One attempt per call inside botocore: backoff is ours (with_retries), so that its duration
            # and the attempts are configured and logged in one place.
            config_kwargs={
                "connect_timeout": config.connect_timeout_s,
                "read_timeout": config.read_timeout_s,
                "retries": {"max_attempts": 1, "mode": "standard"},
            },
            skip_instance_cache=True,
        )
        self.fs.retries = 1  # s3fs's own retry loop, likewise left to with_retries

    def _path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (test servers start empty)."""
        bucket = self.prefix.split("/", 1)[0]
        if self.fs.exists(bucket):
            return
        params: dict = {"Bucket": bucket}
        if self.region != "us-east-1":  # S3 rejects an explicit us-east-1 location constraint
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.fs.call_s3("create_bucket", **params)
        self.fs.invalidate_cache()


def open_storage(url: str, s3: S3Config | None = None) -> Storage:
    """The storage for a local path or an s3:// URL."""
    if url.startswith("s3://"):
        return S3Storage(url, s3 or S3Config())
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"{url}: only local paths and s3:// URLs are supported")
    return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)


def is_permanent(error: BaseException) -> bool:
    """Errors a retry cannot fix: the object or bucket does not exist, or access is denied."""
    return isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


@dataclass
class RetryStats:
    """Counts of retried failures, shared by the threads of one loader (read under its lock)."""

    retries: int = 0
    gave_up: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def add(self, retries: int = 0, gave_up: int = 0) -> None:
        with self.lock:
            self.retries += retries
            self.gave_up += gave_up


def with_retries(
    action: Callable[[], T],
    what: str,
    retry: RetryConfig,
    stats: RetryStats | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Run `action`, retrying transient failures with exponential backoff; permanent ones raise at once.

    Raises the last error after retry.max_attempts attempts, or InterruptedError when `should_stop`
    turns true while waiting (so a closed loader never sits in a backoff).
    """
    delay = retry.initial_backoff_s
    for attempt in range(1, retry.max_attempts + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified right below
            if is_permanent(error) or attempt == retry.max_attempts:
                if not is_permanent(error) and stats is not None:
                    stats.add(gave_up=1)
                raise
            if stats is not None:
                stats.add(retries=1)
            log.warning("%s failed (attempt %d/%d, retrying in %.2fs): %s: %s",
                        what, attempt, retry.max_attempts, delay, type(error).__name__, error)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if should_stop is not None and should_stop():
                    raise InterruptedError(f"{what}: stopped while waiting to retry") from error
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, retry.max_backoff_s)
    raise AssertionError("unreachable")


_WDS_S3_CONFIG: S3Config | None = None


def register_webdataset_s3(config: S3Config | None = None) -> None:
    """Let webdataset open s3:// URLs through s3fs (webdataset 1.0.2 has no s3 handler of its own).

    After this, `webdataset.WebDataset("s3://bucket/shard-{000000..000009}.tar")` works with the
    endpoint and credentials of `config` (or the AWS environment). The loader does not need it: it
    fetches whole shards through `Storage` with retries, then parses them with webdataset's tar iterators.
    """
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of the same name

    global _WDS_S3_CONFIG
    _WDS_S3_CONFIG = config or S3Config()

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
        if mode[0] != "r":
            raise ValueError(f"{url}: only reading is supported ({mode})")
        bucket_and_key = url[len("s3://"):]
        storage = S3Storage("s3://" + bucket_and_key.rsplit("/", 1)[0], _WDS_S3_CONFIG)
        return storage.fs.open(bucket_and_key, "rb")

    gopen.gopen_schemes["s3"] = gopen_s3
