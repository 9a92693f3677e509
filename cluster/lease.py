"""One run per s3:// out_dir: a lease object, the lock of object storage (issue 15, item 1).

A local out_dir is locked with flock (trainer/loop/run_lock.py). An s3:// out_dir has no filesystem to
lock and its drivers may sit on different machines, so the driver (cluster/ray_train.py) holds
`<out_dir>/.run.lease`, a small JSON object naming the holder's host, pid, start time and command:

- Taken before anything is written under the prefix, with a conditional create (`If-None-Match: *`):
  of two drivers racing for a free prefix exactly one gets it; the other is refused with a message
  naming the holder.
- Kept alive by a heartbeat thread that rewrites the object every ttl/3 seconds, conditionally on the
  ETag it last wrote (`If-Match`), so a renewal never overwrites somebody else's lease.
- Expires: a lease not renewed for its ttl_s seconds belongs to a dead (or cut-off) run and is taken
  over, conditionally on the ETag that was judged stale, and the takeover is logged naming the old
  holder. Its age is the S3 server's clock on both ends (the object's Last-Modified and the Date of the
  response that read it), so clock skew between hosts does not matter. A lease of a process on this
  host that no longer exists is taken over at once, without waiting for it to expire.
- Lost: when a renewal finds the lease replaced, or cannot renew it before it expires, this run no
  longer owns the prefix. The heartbeat logs it and interrupts the driver's main thread (SIGINT: Ray
  Train's fit() handles it by aborting the run); the driver reports the loss in one line
  (RunLockedError).
- Released (deleted) when the run ends, if it is still ours.

The ttl is UNSUP3D_LEASE_TTL_S (default 60 s): a killed driver's prefix is free again after at most
that long. Conditional writes need an S3 that has them (AWS S3 since 2024, MinIO, moto); a server that
ignores If-None-Match would let two racing drivers both believe they won.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import sys
import threading
import time
from email.utils import parsedate_to_datetime

from trainer.loop.run_lock import RunLockedError, describe_holder, pid_alive

log = logging.getLogger(__name__)

LEASE_NAME = ".run.lease"
DEFAULT_TTL_S = 60.0


def lease_ttl_s() -> float:
    raw = os.environ.get("UNSUP3D_LEASE_TTL_S", "")
    if not raw:
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl >= 1.0:  # also refuses nan
        raise ValueError(f"UNSUP3D_LEASE_TTL_S={raw[:40]!r}: must be a number of seconds, at least 1")
    return ttl


def _precondition_failed(error: BaseException) -> bool:
    """s3fs turns S3's 412 into FileExistsError (If-None-Match) or OSError(EINVAL) (If-Match); the boto
    error it came from says which."""
    seen = 0
    while error is not None and seen < 4:
        response = getattr(error, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        error = error.__cause__
        seen += 1
    return False


class _Conflict(Exception):
    """A conditional write lost: somebody else wrote (or removed) the lease first. Not retried."""


class S3Lease:
    """`with S3Lease("s3://bucket/run"):` holds the prefix for this process; acquire() raises RunLockedError."""

    def __init__(self, url: str, ttl_s: float | None = None, purpose: str = "train"):
        from data_pipeline.config import RetryConfig
        from data_pipeline.storage import open_storage

        self.url = url.rstrip("/")
        storage = open_storage(self.url)
        self.fs = storage.fs
        self.bucket, _, prefix = storage.prefix.partition("/")
        self.key = f"{prefix}/{LEASE_NAME}" if prefix else LEASE_NAME
        self.where = f"s3://{self.bucket}/{self.key}"
        self.ttl_s = ttl_s if ttl_s is not None else lease_ttl_s()
        self.purpose = purpose
        self.retry = RetryConfig(max_attempts=4, initial_backoff_s=0.2, max_backoff_s=2.0)
        self.etag: str | None = None
        self.lost: str | None = None  # why the lease was lost while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    # --- S3 calls ------------------------------------------------------------------------------
    def _call(self, what: str, method: str, **kwargs) -> dict:
        """One S3 call on the lease object, transient failures retried; a lost condition raises _Conflict
        at once. get_object's body comes back read, as bytes."""
        from data_pipeline.storage import with_retries
        from fsspec.asyn import sync

        async def call():
            try:
                response = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
            except Exception as error:  # noqa: BLE001 - only the precondition is ours to interpret
                if _precondition_failed(error):
                    return None
                raise
            if "Body" in response and hasattr(response["Body"], "read"):
                async with response["Body"] as body:
                    response["Body"] = await body.read()
            return response

        response = with_retries(lambda: sync(self.fs.loop, call), f"{what} {self.where}", self.retry)
        if response is None:
            raise _Conflict(what)
        return response

    def _read(self) -> tuple[dict, str, float] | None:
        """(holder, etag, age in seconds by the server's clock), or None without a lease."""
        try:
            response = self._call("read", "get_object")
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(response["Body"][:4096].decode())
        except (UnicodeDecodeError, ValueError):
            holder = None
        if not isinstance(holder, dict):
            holder = {"pid": "?", "host": "?", "command": "unreadable lease object"}
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        now = parsedate_to_datetime(headers["date"]) if "date" in headers else None
        modified = response.get("LastModified")
        age = (now - modified).total_seconds() if now is not None and modified is not None else 0.0
        return holder, response["ETag"], age

    def _entry(self, renewed: int) -> bytes:
        entry = {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started, "purpose": self.purpose,
                 "command": " ".join(sys.argv), "ttl_s": self.ttl_s, "renewals": renewed}
        return (json.dumps(entry) + "\n").encode()

    # --- taking and keeping -------------------------------------------------------------------
    def acquire(self) -> "S3Lease":
        try:
            return self._acquire()
        except (RunLockedError, FileNotFoundError):
            raise
        except Exception as error:  # noqa: BLE001 - S3 unreachable or refusing: one line, the run does not start
            raise RunLockedError(f"{self.url}: cannot take the run's lease {self.where}: {type(error).__name__}: "
                                 f"{' '.join(str(error).split())[:300]}") from error

    def _acquire(self) -> "S3Lease":
        for _ in range(5):  # a lease released or taken over between our read and our write: look again
            found = self._read()
            try:
                if found is None:
                    try:
                        response = self._call("create", "put_object", Body=self._entry(0), IfNoneMatch="*")
                    except FileNotFoundError:  # S3's text names no bucket
                        raise FileNotFoundError(f"{self.url}: bucket {self.bucket} does not exist (create it, or "
                                                "check train.out_dir and AWS_ENDPOINT_URL)") from None
                else:
                    holder, etag, age = found
                    self._check_stale(holder, age)
                    response = self._call("take over", "put_object", Body=self._entry(0), IfMatch=etag)
                    log.warning("took over the lease %s of %s: %s", self.where, describe_holder(holder),
                                self._stale_reason(holder, age))
            except _Conflict:
                continue
            self.etag = response["ETag"]
            self._thread = threading.Thread(target=self._heartbeat, name="s3-lease-heartbeat", daemon=True)
            self._thread.start()
            log.info("holding the lease %s (renewed every %.0fs, expires %.0fs after the last renewal)",
                     self.where, self.ttl_s / 3, self.ttl_s)
            return self
        raise RunLockedError(f"{self.url}: could not take the lease {self.where} (it keeps changing hands)")

    def _stale_reason(self, holder: dict, age: float) -> str:
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            return "that process is gone"
        return f"not renewed for {age:.0f}s (it expires after {self._holder_ttl(holder):.0f}s)"

    def _holder_ttl(self, holder: dict) -> float:
        ttl = holder.get("ttl_s")
        return float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else self.ttl_s

    def _check_stale(self, holder: dict, age: float) -> None:
        """Raise RunLockedError unless the lease `holder` wrote `age` seconds ago may be taken over."""
        pid = holder.get("pid")
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(pid, int) and not pid_alive(pid):
            return
        ttl = self._holder_ttl(holder)
        if age > ttl:
            return
        raise RunLockedError(
            f"{self.url} is in use by another run: {describe_holder(holder)}; its lease {self.where} was renewed "
            f"{age:.0f}s ago and expires {ttl:.0f}s after its last renewal; wait for it, stop it, or use another "
            "train.out_dir")

    def _heartbeat(self) -> None:
        renewals, last_ok = 0, time.monotonic()
        while not self._stop.wait(self.ttl_s / 3):
            renewals += 1
            try:
                response = self._call("renew", "put_object", Body=self._entry(renewals), IfMatch=self.etag)
            except _Conflict:
                found = self._read_quietly()
                self._lose(f"the lease {self.where} was taken over by "
                           f"{describe_holder(found[0]) if found else 'another run (since released)'}")
                return
            except Exception as error:  # noqa: BLE001 - S3 unreachable: keep trying until the lease would expire
                if time.monotonic() - last_ok > self.ttl_s:
                    self._lose(f"the lease {self.where} could not be renewed for {self.ttl_s:.0f}s "
                               f"({type(error).__name__}: {' '.join(str(error).split())[:200]})")
                    return
                log.warning("renewing the lease %s failed (will retry): %s", self.where, error)
                continue
            self.etag, last_ok = response["ETag"], time.monotonic()

    def _read_quietly(self):
        try:
            return self._read()
        except Exception:  # noqa: BLE001 - only to name the new holder in a message
            return None

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error("%s: this run no longer owns %s and stops", reason, self.url)
        _thread.interrupt_main()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.etag is None or self.lost is not None:
            return
        etag, self.etag = self.etag, None
        try:
            found = self._read()
            if found is not None and found[1] == etag:  # still ours: nobody took it over meanwhile
                self._call("release", "delete_object")
        except Exception as error:  # noqa: BLE001 - the lease expires by itself; say so and go on
            log.warning("could not release the lease %s (it expires after %.0fs): %s", self.where, self.ttl_s, error)

    def __enter__(self) -> "S3Lease":
        return self.acquire()

    def __exit__(self, kind, error, traceback) -> None:
        self.release()
        # However the interrupt ended the run (KeyboardInterrupt; under Ray Train, whose fit() installs its
        # own SIGINT handler, a graceful abort or the error it raises), the lost lease is the reason to report.
        if self.lost is not None and (kind is None or not issubclass(kind, RunLockedError)):
            raise RunLockedError(f"{self.url}: {self.lost}; this run stopped") from error


__all__ = ["LEASE_NAME", "S3Lease", "lease_ttl_s"]
