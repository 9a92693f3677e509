"""The config of a job run by `unsup3d train`: the trainer's RunConfig plus the sections that belong
to other packages (here: the sharded data stream). Composed here because only cluster may know both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import LoaderConfig
from trainer.config import RunConfig
from trainer.config_loading import load_yaml_config


@dataclass
class JobConfig(RunConfig):
    """A run config with an optional streaming data source."""

    stream: LoaderConfig | None = None
    """Train from WebDataset shards (local or s3://) through the DALI pipeline instead of data.root.
    Its batch_size and image_size must agree with data.batch_size and model.image_size."""

    def __post_init__(self):
        if self.stream is None:
            return
        for name, mine, theirs in (("batch_size", self.stream.batch_size, self.data.batch_size),
                                   ("image_size", self.stream.image_size, self.model.image_size)):
            if mine != theirs:
                owner = "data.batch_size" if name == "batch_size" else "model.image_size"
                raise ValueError(f"stream.{name} ({mine}) differs from {owner} ({theirs})")


def load_job_config(path: str | Path) -> JobConfig:
    return load_yaml_config(JobConfig, path)
