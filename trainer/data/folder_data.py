"""In-process batches from a synface-layout folder: the single-process data path of `unsup3d train`.

The sharded WebDataset/DALI pipeline (data_pipeline) serves multi-process runs; this small loader
keeps the trainer usable on a laptop with no other package. It holds the split in memory as uint8,
shuffles with a seeded permutation per epoch and flips horizontally at random, and its position
(epoch, cursor) is in state_dict so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from trainer.data.synface import DEFAULT_MAX_PIXELS, SynfaceFolder

logger = logging.getLogger(__name__)


class FolderBatches:
    """Endless iterator of training batches dict(image [B,3,H,W] in [-1,1], depth [B,H,W], key list)."""

    def __init__(
        self,
        root: str,
        split: str,
        image_size: int,
        batch_size: int,
        seed: int,
        hflip_probability: float = 0.5,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int | None = None,
    ):
        # Unreadable files, images outside the size limits and depth maps of another size are skipped,
        # each logged with its path, and counted here (the streaming loader skips damaged input too).
        folder = SynfaceFolder(root, split, image_size=image_size, on_error="skip", max_pixels=max_pixels,
                               min_size=min_size)
        self.skipped = dict(folder.skipped)
        if self.skipped:
            logger.warning("%s/%s: %d files skipped (%s); training on the other %d", root, split,
                           sum(self.skipped.values()), ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())),
                           len(folder))
        if len(folder) < batch_size * world_size:
            raise ValueError(
                f"{root}/{split} holds {len(folder)} usable images, fewer than one batch of {batch_size} (data.batch_size)"
                + (f"; skipped {', '.join(f'{k} {v}' for k, v in sorted(self.skipped.items()))} (too_small: shorter "
                   "than data.min_image_size, default half of model.image_size; too_large: data.max_image_pixels)"
                   if self.skipped else "")
                + (f" for each of {world_size} processes" if world_size > 1 else "")
            )
        samples = [folder[i] for i in range(len(folder))]
        self.keys = [s["name"] for s in samples]
        # uint8 halves memory four times over float32 and is exact for 8-bit sources.
        self.images = torch.stack([((s["image"] + 1) * 127.5).round().to(torch.uint8) for s in samples])
        self.depths = torch.stack([s["depth"] for s in samples])
        self.batch_size = batch_size
        self.seed = seed
        self.hflip_probability = hflip_probability
        self.device = torch.device(device)
        # Data parallel: every rank follows the same seeded order and takes its own slice of each
        # global batch of batch_size * world_size, so the ranks never see the same image in an epoch.
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.keys) // (self.batch_size * self.world_size)

    def _epoch_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def _order_and_flips(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = self._epoch_generator()
        order = torch.randperm(len(self.keys), generator=generator)
        flips = torch.rand(len(self.keys), generator=generator) < self.hflip_probability
        return order, flips

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        step = self.batch_size * self.world_size
        if self.cursor + step > len(self.keys):  # drop the incomplete last batch
            self.epoch += 1
            self.cursor = 0
        order, flips = self._order_and_flips()
        start = self.cursor + self.rank * self.batch_size
        index = order[start : start + self.batch_size]
        flip = flips[start : start + self.batch_size]
        self.cursor += step
        images = self.images[index].float() / 127.5 - 1
        depths = self.depths[index]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        depths = torch.where(flip[:, None, None], depths.flip(-1), depths)
        return {
            "image": images.to(self.device, non_blocking=True),
            "depth": depths.to(self.device, non_blocking=True),
            "key": [self.keys[i] for i in index.tolist()],
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_samples": len(self.keys)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.keys) or state["seed"] != self.seed:
            raise ValueError(
                f"data position was saved for {state['num_samples']} samples and seed {state['seed']}, "
                f"this run has {len(self.keys)} samples and seed {self.seed}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
