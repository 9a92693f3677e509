"""Atomic, self-describing checkpoints of a DeepSpeed run: keep the last N, a `latest` pointer, safe loading.

Layout of `<out_dir>/checkpoints`:

    latest                  text: the name of the newest complete checkpoint ("step_00000500")
    step_00000500/
        ds/                 DeepSpeed's save_checkpoint (tag "ds"): module, optimizer, ZeRO partitions
        state.pt            client state: step, epoch, each rank's data position and RNG states,
                            model config hash, resolved config YAML, SHA-256 of every file under ds/
        model.pt            the nets' float32 weights (master weights under bf16/fp16), for evaluation
    .tmp_step_00000500/     a checkpoint being written; renamed to step_00000500 when complete

Atomicity: every rank writes into the .tmp directory; rank 0 then writes model.pt and builds state.pt,
and the directory's leader (below; rank 0 when all ranks share it) writes state.pt, fsyncs, renames the
directory into place, and replaces `latest` by rename. A run killed at any moment leaves either the
previous complete checkpoint or the new one, never a half-written one under a real name.

Ranks need not share the checkpoint directory (node-local staging of an s3:// out_dir, cluster/storage.py).
On the first save each rank drops a marker `.rank_R` into a folder fresh for that call; the lowest rank
that sees a directory's markers is its leader and finishes the checkpoint there (state.pt, rename,
`latest`, pruning). state.pt (built by rank 0, with the hashes of every directory's DeepSpeed files) is
written into every directory: every rank reads it on resume and rollback. DeepSpeed reads every rank's
files on load, so a directory holding only its own ranks' files cannot be loaded: the caller's
`after_save` hook (a SaveHook) gathers them elsewhere, e.g. on S3, and brings them back before a resume.
With one shared directory rank 0 is the only leader and the files are what they always were.

Reading checkpoints back (safely, without unpickling code) is trainer/loop/checkpoint_load.py.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from trainer.loop.safe_files import fsync_dir, fsync_file, is_disk_full, one_line, sha256, write_atomically

if TYPE_CHECKING:
    from trainer.loop.engine import Engine

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
LEGACY_PATTERN = re.compile(r"^step_(\d+)\.pt$")
DS_TAG = "ds"
STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
FORMAT_VERSION = 2
# Fault injection for tests: SIGKILL every rank in the middle of saving this step (after DeepSpeed
# wrote its files, before the checkpoint is complete).
KILL_IN_SAVE_ENV = "UNSUP3D_FAULT_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be saved for lack of space; the previous one is intact."""



def _ds_file_hashes(directory: Path) -> dict[str, str]:
    ds = directory / DS_TAG
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(ds.rglob("*")) if p.is_file()}


class SaveHook(Protocol):
    """What CheckpointManager.save tells its caller (e.g. cluster/storage.py's S3 mirror)."""

    def directory_saved(self, step_dir: Path) -> None:
        """On the leader of each checkpoint directory, once `step_dir` is complete there."""

    def checkpoint_saved(self, step_dir: Path) -> None:
        """On rank 0, once directory_saved returned in every directory."""


def directory_leader(directory: Path, rank: int) -> int:
    """Collective: the lowest rank that sees the same `directory` as this one (each rank drops a marker
    file into a folder named by a token fresh for this call, so markers of killed runs never count)."""
    from trainer.loop.process_group import barrier, broadcast_object

    marks = Path(directory) / f".ranks_{broadcast_object(secrets.token_hex(8) if rank == 0 else None)}"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f".rank_{rank}").touch()
    barrier()
    leader = min(int(p.name[len(".rank_"):]) for p in marks.iterdir())
    barrier()  # every rank has listed the markers before the leader removes them
    if rank == leader:
        shutil.rmtree(marks, ignore_errors=True)
    return leader


class CheckpointManager:
    """Saves and finds checkpoint directories in one folder."""

    def __init__(self, directory: str | Path, keep: int = 2, after_save: SaveHook | None = None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.after_save = after_save
        self._leader: int | None = None  # found on the first save: which ranks share a folder does not change

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
        return [p for _, p in sorted(found)]

    def legacy_checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := LEGACY_PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if pointer.is_file():
            candidate = self.directory / pointer.read_text().strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
            log.warning("%s points at %s, which is not a complete checkpoint; using the newest complete one",
                        pointer, candidate.name)
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, ds_engine, shared: dict[str, Any], per_rank: list[dict], model_state: dict | None,
             rank: int) -> Path:
        """Collective: every rank calls it. `shared` and `per_rank` (every rank's entry, the same list on
        all ranks) must hold only tensors, numbers, strings, lists and dicts; `model_state` is rank 0's."""
        from trainer.loop.process_group import all_gather_object, barrier, broadcast_object

        if self._leader is None:
            self._leader = directory_leader(self.directory, rank)
            if rank == self._leader and rank != 0:
                log.info("rank %d finishes the checkpoints in %s (not shared with rank 0)", rank, self.directory)
        leader = rank == self._leader
        final = self.path_for(step)
        tmp = self.directory / f".tmp_{final.name}"

        def agree(error: BaseException | None) -> None:
            """Every rank learns whether any rank failed the phase just done, and all raise together
            (instead of the others waiting in the next collective for a rank that is gone)."""
            failures = [f for f in all_gather_object(None if error is None else self._save_error(error, final))
                        if f is not None]
            if failures:
                if leader:
                    self._remove_partial(tmp, final)
                if error is not None:
                    raise failures[0] from error
                raise failures[0]

        error = None
        try:
            if leader:
                self.directory.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
                tmp.mkdir()
        except (OSError, RuntimeError) as caught:
            error = caught
        agree(error)
        try:
            ds_engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
        except (OSError, RuntimeError) as caught:  # disk full: torch's writer raises RuntimeError ("unexpected pos")
            error = caught
        agree(error)
        if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
            log.warning("fault injection: killing rank %d in the middle of saving step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        # Each directory's leader hashes the DeepSpeed files written there; state.pt records all of them.
        ds_files: dict[str, str] = {}
        for part in all_gather_object(_ds_file_hashes(tmp) if leader else {}):
            ds_files.update(part)
        state_bytes = None
        try:
            if rank == 0:
                state = {**shared, "format_version": FORMAT_VERSION, "step": step,
                         "ranks": {str(r): s for r, s in enumerate(per_rank)}, "world_size": len(per_rank),
                         "ds_files": ds_files}
                torch.save({"model": model_state, "step": step, "config_yaml": shared.get("config_yaml")},
                           tmp / MODEL_FILE)
                buffer = io.BytesIO()
                torch.save(state, buffer)
                state_bytes = buffer.getvalue()
        except (OSError, RuntimeError) as caught:
            error = caught
        agree(error)
        state_bytes = broadcast_object(state_bytes)  # the same state.pt in every directory
        try:
            if leader:
                (tmp / STATE_FILE).write_bytes(state_bytes)
                for path in tmp.rglob("*"):
                    if path.is_file():
                        fsync_file(path)
                fsync_dir(tmp)
                if final.exists():  # the same step saved again after a rollback
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.directory)
                write_atomically(self.directory / "latest", final.name.encode())
        except (OSError, RuntimeError) as caught:
            error = caught
        agree(error)
        if leader:
            self._prune()
            if self.after_save is not None:
                self.after_save.directory_saved(final)
        barrier()
        if rank == 0 and self.after_save is not None:
            self.after_save.checkpoint_saved(final)
        return final

    def _remove_partial(self, tmp: Path, final: Path) -> None:
        """After a failed save: no temporary files, and no step folder that `latest` does not name."""
        shutil.rmtree(tmp, ignore_errors=True)
        (self.directory / "latest.tmp").unlink(missing_ok=True)
        pointer = self.directory / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else None
        if final.exists() and named != final.name:
            shutil.rmtree(final, ignore_errors=True)

    def _save_error(self, error: BaseException, final: Path) -> CheckpointError:
        """One line a user can act on: 'no space left on <path>' when the disk is full, else what failed."""
        if is_disk_full(error, self.directory):
            previous = self.latest()
            kept = f"; the previous checkpoint {previous.name} is intact" if previous is not None else ""
            return DiskFullError(f"no space left on {self.directory}: checkpoint {final.name} was not saved{kept} "
                                 "(free space, or use a train.out_dir with room, and run the same command again)")
        return CheckpointError(f"cannot write checkpoint {final}: {one_line(error)}")

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*self.directory.glob(".tmp_step_*"), *self.directory.glob(".ranks_*")]:
            shutil.rmtree(stale, ignore_errors=True)


def fp32_model_state(engine: Engine) -> dict:
    """The nets' float32 weights: the optimizer's master copy under bf16/fp16 (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = engine.module.state_dict()
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (param.detach() if full is None else full).float().cpu().clone()
    return {k: v.float().cpu().clone() if v.is_floating_point() else v.cpu().clone() for k, v in state.items()}
