"""Adapts the data pipeline's per-epoch TrainLoader to the trainer's endless batch source.

The trainer wants `next(source)` forever, `source.epoch`, `source.batches_per_epoch` and
state_dict/load_state_dict; the TrainLoader is iterated once per epoch and owns the position.
"""

from __future__ import annotations

from typing import Iterator

import torch

from data_pipeline import LoaderConfig, TrainLoader


class StreamingBatches:
    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.loader = TrainLoader(config, rank=rank, world_size=world_size, device=device)
        self._epoch_batches: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def batches_per_epoch(self) -> int:
        expected = self.loader.expected_samples(0)
        size = self.loader.config.batch_size
        return max(1, expected // size if self.loader.config.drop_last else -(-expected // size))

    def __iter__(self) -> "StreamingBatches":
        return self

    def __next__(self) -> dict:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._epoch_batches is None:
                self._epoch_batches = iter(self.loader)
            try:
                return next(self._epoch_batches)
            except StopIteration:
                self._epoch_batches = None
        raise RuntimeError(f"{self.loader.config.shards}: an epoch delivered no batch for rank {self.loader.rank}")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._epoch_batches = None
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
