"""Where a run's batches come from: always the data pipeline's shard stream (WebDataset, then DALI or PIL).

- A `stream:` section: its shards (a local folder or s3://), each rank streaming its own part.
- Otherwise `data.root`: generated first when data.generate_if_missing asks for it and it is missing
  (trainer.data.generate.generate_if_missing), prepared once into shards in a local cache
  (data_pipeline/folder_cache.py: reused while the folder is unchanged) and streamed exactly like a
  cluster run's shards, with the same counted skips and the same exact resume.

The source is handed to the trainer as a factory, called once the trainer has its process group: rank 0
generates and prepares first and the other ranks wait, then find (or, on a node that does not share the
folder, build) the same cache entry. Composed here because only cluster may know both the trainer's config
and data_pipeline (DESIGN).
"""

from __future__ import annotations

import logging

import torch

from cluster.streaming import StreamingBatches
from data_pipeline.config import LoaderConfig

log = logging.getLogger(__name__)


KEEP_IN_MEMORY_BYTES = 2 << 30
"""A folder whose decoded images (uint8, 3 bytes a pixel, plus depth) fit in this is kept in memory."""


def folder_loader_config(config, entry) -> LoaderConfig:
    """The loader settings of a run that trains from data.root, its folder prepared into `entry` (FolderShards)."""
    size = config.model.image_size
    return LoaderConfig(
        shards=entry.path, batch_size=config.data.batch_size, image_size=size,
        seed=config.train.seed, hflip_probability=config.data.hflip_probability,
        max_image_pixels=config.data.max_image_pixels,
        # Local files of a few MB: one reader thread keeps up, and DALI's CPU pool of one thread decodes a
        # batch of small images in milliseconds; more threads only compete with training for the cores.
        num_workers=1, dali_threads=1, prefetch_batches=4,
        # Reading, checking and decoding every image every epoch cost about 1 ms an image on one core here,
        # a few per cent of a 2-core machine's training time (BENCHMARKS.md, "One data path"); a folder that
        # fits in memory is read and decoded once, as the in-memory folder loader this path replaced did.
        keep_in_memory=entry.manifest.num_samples * size * size * 4 <= KEEP_IN_MEMORY_BYTES)


def prepare_folder(config):
    """data.root's cache entry (data_pipeline.folder_cache.FolderShards), generating data.root first if asked."""
    from data_pipeline.folder_cache import FolderCacheConfig, prepared_folder
    from trainer.data.generate import generate_if_missing

    generate_if_missing(config)
    return prepared_folder(FolderCacheConfig(root=config.data.root, split=config.data.split,
                                             image_size=config.model.image_size,
                                             max_image_pixels=config.data.max_image_pixels,
                                             min_image_size=config.data.min_image_size))


def batch_source(config):
    """A factory (group, device) -> the run's batch source, for trainer.loop.train.Trainer / train()."""

    def build(group, device: torch.device) -> StreamingBatches:
        if getattr(config, "stream", None) is not None:
            return StreamingBatches(config.stream, rank=group.rank, world_size=group.world_size, device=device)
        from trainer.loop.process_group import broadcast_object

        entry, failure = None, None
        if group.is_main:
            try:
                entry = prepare_folder(config)
            except Exception as error:  # told to the other ranks, which would otherwise wait here forever
                failure = f"{type(error).__name__}: {error}"
                broadcast_object(failure)
                raise
        failure = broadcast_object(failure)  # the other ranks wait for rank 0's entry here
        if failure is not None:
            raise RuntimeError(f"rank 0 could not prepare data.root: {failure}")
        if entry is None:  # rank 0's entry, or this node's own where data.root is not a shared folder
            entry = prepare_folder(config)
        return StreamingBatches(folder_loader_config(config, entry), rank=group.rank,
                                world_size=group.world_size, device=device, reads_data_root=True,
                                prepare_skipped=entry.skipped)

    return build


def train(config, after_save=None):
    """trainer.loop.train.train on the run's batch source (see the module docstring)."""
    from trainer.loop.train import train as train_on

    return train_on(config, batch_source(config), after_save)
