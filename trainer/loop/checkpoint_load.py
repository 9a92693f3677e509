"""Reading checkpoints without running code: state.pt and model.pt with torch.load(weights_only=True),
DeepSpeed's own files through an allow-list, and every DeepSpeed file checked against its SHA-256.

Loading never unpickles arbitrary objects. state.pt and model.pt are read with
torch.load(weights_only=True). DeepSpeed 0.19.8 reads its own files with
torch.load(weights_only=False) (runtime/checkpoint_engine/torch_checkpoint_engine.py);
install_safe_deepspeed_loader replaces that with weights_only=True plus an allow-list of the few
DeepSpeed classes its files hold, and the files are checked against the SHA-256 in state.pt first.

`load_checkpoint` also reads the single-file `step_N.pt` checkpoints of earlier versions (for evaluation).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.loop.checkpoint import DS_TAG, FORMAT_VERSION, MODEL_FILE, STATE_FILE, CheckpointError, CheckpointManager
from trainer.loop.safe_files import one_line, sha256


def describe_load_error(path, error: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line. A file holding pickled objects
    other than tensors and plain data holds code: it is refused, and nothing suggests a way around."""
    if isinstance(error, pickle.UnpicklingError):
        return (f"{path} holds pickled Python objects other than tensors and plain data, i.e. code, and will not be "
                "loaded (only files written by unsup3d and torch.save of tensors are read)")
    return f"cannot read {path}: {one_line(error)}"


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
        if sha256(checkpoint_dir / name) != digest:
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
