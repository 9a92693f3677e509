"""Atomic, self-describing checkpoints: keep the last N, a `latest` pointer, safe loading.

A checkpoint is one file `step_<N>.pt` written as `<name>.tmp` and renamed into place, so a run
killed mid-save never leaves a half-written file under a real name; `latest` is replaced the same
way after the file is complete. Files are read with torch.load(weights_only=True): tensors and
plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Saves and finds checkpoints in one directory."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _atomic_write_bytes(self.directory / "latest", path.name.encode())
        self._prune()
        return path

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if pointer.is_file():
            candidate = self.directory / pointer.read_text().strip()
            if candidate.is_file():
                return candidate
            log.warning("%s points at missing %s; using the newest checkpoint file instead", pointer, candidate.name)
        found = self.checkpoints()
        return found[-1] if found else None

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        path = latest
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
