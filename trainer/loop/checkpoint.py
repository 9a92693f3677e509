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

Loading never unpickles arbitrary objects. state.pt and model.pt are read with
torch.load(weights_only=True). DeepSpeed 0.19.8 reads its own files with
torch.load(weights_only=False) (runtime/checkpoint_engine/torch_checkpoint_engine.py);
install_safe_deepspeed_loader replaces that with weights_only=True plus an allow-list of the few
DeepSpeed classes its files hold, and the files are checked against the SHA-256 in state.pt first.

`load_checkpoint` also reads the single-file `step_N.pt` checkpoints of earlier versions (for evaluation).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import re
import secrets
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

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


# What torch's zip writer raises when a write comes up short (a full disk), instead of an OSError.
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "inline_container")
# A torch write failure with less free space than this (or than the last checkpoint) is a full disk.
_LOW_SPACE_BYTES = 64 << 20


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text, shortened (torch's messages run over many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_disk_full(error: BaseException | None, directory: Path) -> bool:
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
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
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # flush/fsync name no file: say which
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


_atomic_write_bytes = write_atomically


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ds_file_hashes(directory: Path) -> dict[str, str]:
    ds = directory / DS_TAG
    return {str(p.relative_to(directory)): _sha256(p) for p in sorted(ds.rglob("*")) if p.is_file()}


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
                        _fsync_file(path)
                _fsync_dir(tmp)
                if final.exists():  # the same step saved again after a rollback
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(self.directory)
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
        if _is_disk_full(error, self.directory):
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


def describe_load_error(path, error: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line. A file holding pickled objects
    other than tensors and plain data holds code: it is refused, naming what it would import, and nothing
    suggests a way around (torch's own text advises weights_only=False). Bytes that are no pickle at all
    are called damaged."""
    if isinstance(error, pickle.UnpicklingError):
        imports = pickle_imports(path)
        if imports is None:
            return f"cannot read {path}: not a checkpoint (damaged, or not written by torch.save)"
        foreign = [name for name in imports if not name.startswith(_WEIGHTS_IMPORTS)]
        what = f" ({', '.join(foreign[:3])})" if foreign else ""
        return (f"{path} holds pickled Python objects other than tensors and plain data{what}, i.e. code, and "
                "will not be loaded (only files written by unsup3d and torch.save of tensors are read)")
    if "PytorchStreamReader" in str(error):  # torch's zip reader: its first sentence says what broke
        return f"cannot read {path}: damaged or cut short ({str(error).split('. ')[0].strip()})"
    return f"cannot read {path}: {one_line(error)}"


# What torch.save's own pickles import (tensors, storages, ordered dicts): not worth naming in a refusal.
_WEIGHTS_IMPORTS = ("torch.", "collections.OrderedDict", "builtins.set", "_codecs.encode")


def pickle_imports(path) -> list[str] | None:
    """The globals a pickle (or the data.pkl of torch's zip format) would import, read with pickletools
    without running anything; None when the file is no pickle."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
                if name is None:
                    return None
                data = archive.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        imports, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                imports.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                imports.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return imports
    except Exception:  # noqa: BLE001 - not a pickle, or cut short: damaged
        return None


def _load_weights_only(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol: the refusal below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(describe_load_error(path, error)) from error


def read_state(checkpoint_dir: Path) -> dict:
    """The client state of a checkpoint directory (weights_only)."""
    state = _load_weights_only(Path(checkpoint_dir) / STATE_FILE)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint_dir}: checkpoint format {state.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    return state


def verify_ds_files(checkpoint_dir: Path, state: dict) -> None:
    """DeepSpeed's files must be exactly the ones written with this state (no truncation, no swap)."""
    checkpoint_dir = Path(checkpoint_dir)
    expected = state["ds_files"]
    actual = {str(p.relative_to(checkpoint_dir)) for p in (checkpoint_dir / DS_TAG).rglob("*") if p.is_file()}
    if actual != set(expected):
        raise CheckpointError(f"{checkpoint_dir}: DeepSpeed files differ from the ones recorded in {STATE_FILE} "
                              f"(missing {sorted(set(expected) - actual)}, unexpected {sorted(actual - set(expected))})")
    for name, digest in expected.items():
        if _sha256(checkpoint_dir / name) != digest:
            raise CheckpointError(f"{checkpoint_dir / name} does not match the SHA-256 recorded in {STATE_FILE}")


def _deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 puts into its checkpoint files (found by saving
    fp32/bf16/fp16 checkpoints with ZeRO 0/1/2 and loading them with weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def install_safe_deepspeed_loader(ds_engine) -> None:
    """Make the engine read its checkpoint files with weights_only=True and a DeepSpeed allow-list."""
    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:
            raise CheckpointError(describe_load_error(path, error)) from error

    ds_engine.checkpoint_engine.load = load


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The model weights and client state of a checkpoint: a checkpoint directory, a run's checkpoints
    folder (its latest), or a single-file checkpoint of earlier versions. Returns a dict with step,
    model (float32 state dict), config_yaml, model_config_hash, data (rank 0's position) and
    data_ranks (every rank's)."""
    path = Path(path)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        manager = CheckpointManager(path)
        latest = manager.latest()
        if latest is None:
            legacy = manager.legacy_checkpoints()
            if not legacy:
                raise CheckpointError(f"no checkpoint found in {path}")
            return _load_weights_only(legacy[-1], map_location)
        path = latest
    if path.is_file():
        return _load_weights_only(path, map_location)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = read_state(path)
    model = _load_weights_only(path / MODEL_FILE, map_location)
    ranks = state["ranks"]
    return {**{k: v for k, v in state.items() if k != "ranks"}, "model": model["model"],
            "data": ranks["0"]["data"], "data_ranks": {int(r): s["data"] for r, s in ranks.items()}}


def load_model_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, str, int]:
    """(float32 model state dict, the run's config YAML, step) of a checkpoint, its run folder or a legacy file."""
    state = load_checkpoint(path, map_location)
    for key in ("config_yaml", "model"):
        if state.get(key) is None:
            raise CheckpointError(f"{path} has no '{key}' entry: not a checkpoint written by unsup3d train")
    return state["model"], state["config_yaml"], int(state.get("step", 0))
