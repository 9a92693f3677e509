"""The config of a job run by `unsup3d train`: the trainer's RunConfig plus the sections that belong
to other packages (here: the sharded data stream). Composed here because only cluster may know both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import LoaderConfig
from trainer.config import RunConfig
from trainer.config_loading import load_yaml_config, require


@dataclass
class JobConfig(RunConfig):
    """A run config with an optional streaming data source."""

    stream: LoaderConfig | None = None
    """Train from WebDataset shards (local or s3://) through the DALI pipeline instead of data.root.
    Its batch_size and image_size must agree with data.batch_size and model.image_size."""

    def __post_init__(self):
        super().__post_init__()
        if self.stream is None:
            return
        for name, mine, owner, theirs in (("batch_size", self.stream.batch_size, "data.batch_size", self.data.batch_size),
                                          ("image_size", self.stream.image_size, "model.image_size",
                                           self.model.image_size)):
            require(mine == theirs, f"stream.{name}", mine, f"must equal {owner} ({theirs})")


def load_job_config(path: str | Path, overrides: dict | None = None) -> JobConfig:
    """The job config in `path`, with command-line `overrides` ({"train.max_steps": 5}) checked like the file."""
    return load_yaml_config(JobConfig, path, overrides)


def check_sources(config: JobConfig, path: str | Path) -> None:
    """The inputs the run reads exist here, before anything is built: the training data (data.root/<split>
    unless it is generated, or a local stream.shards folder with its manifest) and a vgg16_file backbone.
    Only meaningful where the run's paths mean what they mean here (in this process or an embedded Ray)."""
    data = config.data
    if config.stream is not None:
        shards = config.stream.shards
        if "://" not in shards:
            require((Path(shards) / "manifest.json").is_file(), f"{path}: stream.shards", shards,
                    "must be a folder written by `unsup3d prepare` (holding manifest.json), or s3://bucket/prefix")
    elif data.generate_if_missing is None:
        from data_pipeline.folder_cache import holds_training_images

        require(holds_training_images(data.root, data.split), f"{path}: data.root", data.root,
                f"must be a folder holding {data.split}/image/*_image.png (the synface layout; data.split is "
                f"{data.split!r}) or plain images, or set data.generate_if_missing or a stream: section")
    out_dir = config.train.out_dir
    if "://" not in out_dir:  # a folder, or a path whose first existing parent is a folder we may write in
        existing = Path(out_dir).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        require(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), f"{path}: train.out_dir", out_dir,
                "must be a folder, or a path that can be created" + ("" if existing.is_dir() else
                                                                       f" ({existing} is a file)"))
    if config.train.eval_data:  # the validation set (trainer/loop/validation.py picks val, else test)
        splits = [config.train.eval_split] if config.train.eval_split else ["val", "test"]
        require(any((Path(config.train.eval_data) / split / "image").is_dir() for split in splits),
                f"{path}: train.eval_data", config.train.eval_data,
                f"must be a folder holding {' or '.join(s + '/image' for s in splits)} with depth beside it "
                "(the synface layout; train.eval_split)")
    device = config.train.device
    if device.startswith("cuda"):  # here, where the run trains (torch's own error is a traceback)
        import torch

        index = int(device.partition(":")[2] or 0)
        require(index < torch.cuda.device_count(), f"{path}: train.device", device,
                f"needs CUDA device {index}, and this machine has {torch.cuda.device_count() or 'none'}"
                + ("" if torch.version.cuda else " (this torch build has no CUDA)") + "; use auto or cpu")
    monitoring = config.monitoring
    if monitoring.enabled:  # an address this machine cannot bind fails late, after the engine is built
        import socket

        try:
            socket.getaddrinfo(monitoring.bind_address, None)
        except OSError as error:
            require(False, f"{path}: monitoring.bind_address", monitoring.bind_address,
                    f"must be an address or host name of this machine ({error.strerror or error})")
    perceptual = config.perceptual
    if perceptual.backbone == "vgg16_file":
        require(Path(perceptual.vgg16_path).is_file(), f"{path}: perceptual.vgg16_path", perceptual.vgg16_path,
                "must be an existing file of torchvision-layout VGG16 weights")
