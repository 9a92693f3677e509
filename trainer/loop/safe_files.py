"""Files that survive a crash: atomic replacement, fsync of files and folders, content hashes, and
telling a full disk from other write failures (checkpoints, metrics.jsonl and config.yaml use them)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

# What torch's zip writer raises when a write comes up short (a full disk), instead of an OSError.
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "inline_container")
# A torch write failure with less free space than this (or than the last checkpoint) is a full disk.
_LOW_SPACE_BYTES = 64 << 20


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text, shortened (torch's messages run over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_disk_full(error: BaseException | None, directory: Path) -> bool:
    """Whether `error` (or an exception it was raised from) means `directory`'s disk is full."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and any(s in str(error) for s in _TORCH_WRITE_FAILURES):
            try:
                free = shutil.disk_usage(directory).free
            except OSError:
                return False
            return free < _LOW_SPACE_BYTES
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """path holds either its old content or `data`, never a part; no temporary file is left on failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
