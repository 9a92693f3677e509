"""The single-process training loop: build, resume, step, log, checkpoint.

Side concerns stay small and separate (checkpoint.py, folder_data.py); later the same loop runs
inside DeepSpeed and Ray workers. Resuming is automatic: if out_dir/checkpoints holds a checkpoint
the run continues from it, including the data position and every RNG.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from trainer.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from trainer.config import RunConfig, dump_config, model_config_hash
from trainer.folder_data import FolderBatches
from trainer.model import Unsup3D, Unsup3DLoss
from trainer.perceptual import build_perceptual_net

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a step can touch, as tensors and plain numbers (checkpoints hold no pickled objects)."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(model: Unsup3D, config: RunConfig) -> torch.optim.Optimizer:
    opt = config.optimizer
    return torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)


def prepare_data(config: RunConfig) -> None:
    """Generate the synthetic set into data.root when asked to and it is not there yet."""
    root = Path(config.data.root)
    gen = config.data.generate_if_missing
    if gen is None or (root / config.data.split).is_dir():
        return
    from trainer.synthetic import main_generate

    log.info("generating synthetic data into %s", root)
    main_generate(str(root), config.model.image_size, gen.num_train, gen.num_val, gen.num_test, gen.seed)


@dataclass
class TrainResult:
    steps: int
    last_losses: dict
    checkpoint: str | None
    images_per_second: float


class BatchSource(Protocol):
    """What the loop needs of its data: endless batches dict(image [B,3,H,W] in [-1,1], ...), the
    epoch of the next batch, the epoch length, and a resumable position."""

    epoch: int
    batches_per_epoch: int

    def __next__(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def train(config: RunConfig, data: BatchSource | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`, on `data` or else on the folder data.root."""
    out_dir = Path(config.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(config))
    device = resolve_device(config.train.device)
    seed_everything(config.train.seed)

    model = Unsup3D(config.model).to(device)
    perceptual = build_perceptual_net(config.perceptual) if config.loss.lam_perc > 0 else None
    if perceptual is not None:
        perceptual = perceptual.to(device)
    criterion = Unsup3DLoss(config.loss, perceptual, config.model)
    optimizer = build_optimizer(model, config)
    if data is None:
        prepare_data(config)
        data = FolderBatches(
            config.data.root,
            config.data.split,
            config.model.image_size,
            config.data.batch_size,
            config.train.seed,
            config.data.hflip_probability,
            device,
        )
    checkpoints = CheckpointManager(out_dir / "checkpoints", keep=config.train.keep_checkpoints)
    total_steps = config.train.max_steps or config.train.epochs * data.batches_per_epoch
    arch_hash = model_config_hash(config.model)

    step = 0
    latest = checkpoints.latest()
    if latest is not None:
        state = load_checkpoint(latest, map_location=device)
        if state["model_config_hash"] != arch_hash:
            raise CheckpointError(
                f"{latest} was made with another model config (hash {state['model_config_hash']}, this run {arch_hash}); "
                f"use another train.out_dir or restore the model section"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        data.load_state_dict(state["data"])
        load_rng_state(state["rng"])
        step = int(state["step"])
        log.info("resumed from %s at step %d", latest, step)

    def save() -> Path:
        return checkpoints.save(
            step,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "data": data.state_dict(),
                "rng": rng_state(),
                "model_config_hash": arch_hash,
                "config_yaml": dump_config(config),
            },
        )

    autocast_dtype = AUTOCAST_DTYPES.get(config.train.autocast_dtype)
    metrics_file = open(out_dir / "metrics.jsonl", "a")
    model.train()
    losses: dict = {}
    window_start, window_images = time.perf_counter(), 0
    images_per_second = 0.0
    saved: Path | None = latest
    try:
        while step < total_steps:
            batch = next(data)
            image = batch["image"]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                decomposition = model.decompose(image)
            terms = criterion(image, decomposition, epoch=data.epoch)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            step += 1
            window_images += image.shape[0]
            if step % config.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                images_per_second = window_images / elapsed
                losses = {k: float(v.detach()) for k, v in terms.items()}
                record = {"step": step, "epoch": data.epoch, "images_per_second": images_per_second, **losses}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                log.info(
                    "step %d/%d epoch %d loss %.4f (%s) %.1f img/s",
                    step, total_steps, data.epoch, losses["total"],
                    " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total"), images_per_second,
                )
                window_start, window_images = time.perf_counter(), 0
            if step % config.train.checkpoint_every == 0 and step < total_steps:
                saved = save()
        if saved is None or int(saved.name[5:13]) != step:
            saved = save()
    finally:
        metrics_file.close()
    log.info("finished at step %d; checkpoint %s", step, saved)
    return TrainResult(step, losses, str(saved) if saved else None, images_per_second)
