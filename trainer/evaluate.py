"""`unsup3d evaluate`: SIDE and MAD (SPEC 6) of a checkpoint on a synface-layout folder, next to two
baselines computed in the same run on the same images and masks: a constant depth map, and the
pixelwise average ground-truth depth of the training split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.config import ModelConfig
from trainer.config_loading import from_dict
from trainer.metrics import evaluation_mask, mad_error, side_error, summarize
from trainer.model import Unsup3D
from trainer.render.geometry import intrinsics
from trainer.synface import SynfaceFolder

log = logging.getLogger(__name__)

REFERENCE_EPS = 1e-7


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[Unsup3D, ModelConfig, int]:
    """Rebuild the model a checkpoint was trained with, from the config stored inside it."""
    state = load_checkpoint(checkpoint, map_location=device)
    for key in ("config_yaml", "model"):
        if key not in state:
            raise CheckpointError(f"{checkpoint} has no '{key}' entry: not a checkpoint written by unsup3d train")
    # Only the model section matters here; the rest may hold sections of other packages.
    model_config = from_dict(ModelConfig, yaml.safe_load(state["config_yaml"]).get("model"), "model")
    model = Unsup3D(model_config).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, model_config, int(state.get("step", 0))


def average_training_depth(data_dir: Path, image_size: int, on_error: str) -> torch.Tensor | None:
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        return None
    folder = SynfaceFolder(str(data_dir), "train", image_size=image_size, on_error=on_error)
    total, count = torch.zeros(image_size, image_size), 0
    for batch in folder.batches(256):
        total += batch["depth"].sum(0)
        count += batch["depth"].shape[0]
    return total / count if count else None


def _metric_block(side: list[torch.Tensor], mad_ref: list[torch.Tensor], mad_exact: list[torch.Tensor]) -> dict:
    side_all = torch.cat(side) * 100  # reported x1e-2
    return {
        "side_x1e-2": summarize(side_all),
        "mad_deg_reference": summarize(torch.cat(mad_ref)),
        "mad_deg_exact": summarize(torch.cat(mad_exact)),
    }


@torch.no_grad()
def evaluate(checkpoint: str, data: str, split: str = "test", batch_size: int = 64, device: str = "auto",
             on_error: str = "skip") -> dict:
    """Evaluate; returns a JSON-ready dict. on_error='skip' skips and counts unreadable pairs, 'raise' stops."""
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model, model_config, step = load_model(checkpoint, torch_device)
    size = model_config.image_size
    data_dir = Path(data)
    folder = SynfaceFolder(str(data_dir), split, image_size=size, on_error=on_error)
    if len(folder) == 0:
        raise ValueError(f"{data_dir / split} holds no image/depth pairs")
    K = intrinsics(size, dtype=torch.float64)
    average_depth = average_training_depth(data_dir, size, on_error)

    names = ("model", "constant_depth", "average_train_depth")
    side = {n: [] for n in names}
    mad_ref = {n: [] for n in names}
    mad_exact = {n: [] for n in names}
    count = 0
    for batch in folder.batches(batch_size):
        image = batch["image"].to(torch_device)
        gt = batch["depth"].to(torch_device).double()
        out = model.decompose(image)
        b = image.shape[0]
        pred = out.view_depth[:b].double()
        predictions = {"model": (pred, model.renderer.recon_mask(out.view_depth[:b]))}
        full = torch.ones_like(gt)
        predictions["constant_depth"] = (torch.ones_like(gt), full)
        if average_depth is not None:
            predictions["average_train_depth"] = (average_depth.to(gt).expand_as(gt), full)
        for name, (depth, recon_mask) in predictions.items():
            mask = evaluation_mask(recon_mask, gt)
            side[name].append(side_error(depth, gt, mask).cpu())
            mad_ref[name].append(mad_error(depth, gt, mask, K.to(gt), eps=REFERENCE_EPS).cpu())
            mad_exact[name].append(mad_error(depth, gt, mask, K.to(gt), eps=None).cpu())
        count += b

    results = {
        "checkpoint": str(checkpoint),
        "step": step,
        "data": str(data_dir),
        "split": split,
        "images": count,
        "skipped": dict(folder.skipped),
        "notes": {
            "side_x1e-2": "scale-invariant depth error x 1e-2, per image then mean and std over images",
            "mad_deg_reference": "mean angle deviation of normals normalised as n/(|n|+1e-7) like the reference (the paper's numbers)",
            "mad_deg_exact": "the same with exactly normalised normals",
        },
    }
    for name in names:
        if side[name]:
            results[name] = _metric_block(side[name], mad_ref[name], mad_exact[name])
    if average_depth is None:
        results["average_train_depth"] = f"not computed: {data_dir / 'train'} does not exist"
    return results
