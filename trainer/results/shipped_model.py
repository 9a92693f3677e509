"""The model this repository ships: a small face model trained on the generated faces, used by
`unsup3d demo` and `unsup3d evaluate` when no checkpoint is given.

The file holds weights only (tensors, the run's config YAML as a string, the step and where it came
from), so it loads with torch.load(weights_only=True) like every checkpoint here. It is made from a
training run's checkpoint by `unsup3d export` (see README, "The shipped model").
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.loop.checkpoint import CheckpointError
from trainer.loop.checkpoint_load import load_model_weights

SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "pretrained" / "unsup3d-faces64.pt"
# Largest file we commit to the repository.
MAX_SHIPPED_BYTES = 25 * 1024 * 1024


def shipped_checkpoint() -> Path:
    """Path of the shipped model; a clear error when this checkout has none."""
    if not SHIPPED_CHECKPOINT.is_file():
        raise CheckpointError(f"no checkpoint given and no shipped model at {SHIPPED_CHECKPOINT}; "
                              f"pass --checkpoint (a run's checkpoints folder or a checkpoint)")
    return SHIPPED_CHECKPOINT


def export_weights(checkpoint: str | Path, out: str | Path, note: str = "") -> dict:
    """Write a checkpoint's model weights, config and step as one weights-only file; returns its summary."""
    model, config_yaml, step = load_model_weights(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"step": step, "model": {k: v.float().contiguous() for k, v in model.items()},
                "config_yaml": config_yaml, "source": f"{checkpoint} {note}".strip()}, tmp)
    size = tmp.stat().st_size
    if size > MAX_SHIPPED_BYTES and out.resolve() == SHIPPED_CHECKPOINT:
        tmp.unlink()
        raise CheckpointError(f"{checkpoint}: {size} bytes of weights, more than the {MAX_SHIPPED_BYTES} we ship")
    tmp.replace(out)
    return {"out": str(out), "step": step, "bytes": size, "tensors": len(model)}
