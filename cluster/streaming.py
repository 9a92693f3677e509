"""Adapts the data pipeline's per-epoch TrainLoader to the trainer's endless batch source.

The trainer wants `next(source)` forever, `source.epoch`, `source.batches_per_epoch` and
state_dict/load_state_dict; the TrainLoader is iterated once per epoch and owns the position.
Where the shards come from (a `stream:` section, or data.root's local cache): cluster/data_source.py.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from data_pipeline import LoaderConfig, TrainLoader

log = logging.getLogger(__name__)


class StreamingBatches:
    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 reads_data_root: bool = False, prepare_skipped: dict[str, str] | None = None):
        """`reads_data_root`: the shards are data.root's local cache (then validation may read data.root's
        val split); `prepare_skipped`: the source files left out when they were prepared (name -> reason)."""
        self.loader = TrainLoader(config, rank=rank, world_size=world_size, device=device)
        self.reads_data_root = reads_data_root
        self.prepare_skipped = dict(prepare_skipped or {})
        self._epoch_batches: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def batches_per_epoch(self) -> int:
        # From the whole dataset, so that every rank gets the same number (the trainer derives its step
        # count from it, and ranks that disagree on it would wait for each other forever).
        size = self.loader.config.batch_size * self.loader.world_size
        expected = self.loader.manifest.num_samples
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
        if "version" not in state and {"epoch", "cursor", "num_samples"} <= set(state):
            # A checkpoint of the in-memory folder loader this stream replaced: its position (a cursor into
            # a permutation of the folder) has no counterpart in shards, so the epoch restarts.
            log.warning("the checkpoint's data position is from the former in-memory folder loader: resuming at "
                        "the start of its epoch %d", int(state["epoch"]))
            self.loader.set_epoch(int(state["epoch"]))
            return
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
