"""One run per out_dir: a lock file taken before anything is written there.

Two runs on one out_dir (the same command typed twice, a fleet member started by hand while the fleet
runs it) would append to the same metrics.jsonl, save into the same temporary checkpoint folder and
overwrite each other's checkpoints. The first run to start holds `<out_dir>/.run.lock`; any other is
refused at once with a message naming the holder's host, pid, start time and command.

How: an exclusive, non-blocking flock(2) on the file, held for the life of the run, plus the holder's
host/pid/start/command written into it. The kernel drops a flock when its process dies, however it
dies (SIGKILL, OOM), so a lock is never left held by a dead process; the file's content then tells
the next run whose lock it was, and the takeover is logged. A lock file naming another host whose
flock is free is refused all the same (on some network filesystems flock does not reach across
hosts, so a free flock proves nothing about a process elsewhere): the message says to delete the
file once that run is known to be gone.

Which process holds it: the process that owns the run. `unsup3d train --no-ray` (and every rank-0
under torchrun or the DeepSpeed launcher): the trainer itself. Under Ray, the driver (`unsup3d train`,
a fleet) holds it for the whole run, restarts included; its workers are told not to take it again.
For an s3:// out_dir the driver holds a lease object in the bucket instead (cluster/lease.py: drivers
on any machine, expiry and heartbeat), and this lock on its local staging folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"


class RunLockedError(RuntimeError):
    """Another run holds the out_dir; the message names it (host, pid, start, command) and the lock file."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = " ".join(str(holder.get("command", "?")).split())
    if len(command) > 120:
        command = command[:117] + "..."
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when} ({command})"


class RunLock:
    """`with RunLock(out_dir):` holds the out_dir for this process; acquire() raises RunLockedError."""

    def __init__(self, directory: str | Path, purpose: str = "train"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file can be unlinked by its releasing holder between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = self._read(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(self._held_message(holder)) from None
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            try:
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RunLockedError(f"{self.directory}: could not take the lock {self.path} (it keeps being replaced)")

    def _take(self, fd: int) -> None:
        previous = self._read(fd)
        if previous:
            host = socket.gethostname()
            if previous.get("host") != host:
                raise RunLockedError(
                    f"{self.directory} is locked by a run on another host: {describe_holder(previous)}; if that run is "
                    f"gone, delete {self.path}")
            pid = previous.get("pid")
            state = "is gone" if not isinstance(pid, int) or not pid_alive(pid) else "no longer holds it"
            log.warning("taking over the stale lock %s of %s: that process %s", self.path, describe_holder(previous), state)
        entry = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "purpose": self.purpose,
                 "command": " ".join(sys.argv)}
        data = (json.dumps(entry) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            holder = json.loads(raw.decode()) if raw.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "command": "unreadable lock file"}
        return holder if isinstance(holder, dict) else {}

    def _held_message(self, holder: dict) -> str:
        pid = holder.get("pid")
        note = ""
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
            note = " (that pid has exited, but a process it started still holds the lock)"
        return (f"{self.directory} is in use by another run: {describe_holder(holder)}{note}; wait for it, stop it, or use "
                f"another train.out_dir (lock file {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)  # while still holding the flock: nobody can take this inode meanwhile
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "describe_holder", "pid_alive"]
