"""Sharded data for Unsup3D: `prepare` writes tar shards + DALI index files + a manifest (local or S3);
`TrainLoader` streams this rank's shards with webdataset, validates every sample, decodes and augments
with DALI (with PIL where DALI is not installed) and yields batches of tensors, with a resumable position;
`folder_cache.prepared_folder` makes and reuses the shards of a local data folder, so a run that trains
from a folder streams them like any other. No model or DeepSpeed imports here.

    from data_pipeline import LoaderConfig, TrainLoader
    loader = TrainLoader(LoaderConfig(shards="s3://bucket/faces/train"), rank=r, world_size=n, device=device)

Heavy modules (DALI, s3fs, webdataset) load on first use of the names that need them. The configs are
read from YAML by the project's one strict loader, trainer/config_loading.py (stdlib and pyyaml only).
"""

from data_pipeline.config import LoaderConfig, PrepareConfig, RetryConfig, S3Config

__all__ = ["LoaderConfig", "PrepareConfig", "RetryConfig", "S3Config",
           "TrainLoader", "prepare_dataset", "prepare_synthetic", "load_manifest", "open_storage"]


def __getattr__(name):
    if name == "TrainLoader":
        from data_pipeline.loader import TrainLoader

        return TrainLoader
    if name in ("prepare_dataset", "prepare_synthetic"):
        import data_pipeline.prepare as module

        return getattr(module, name)
    if name == "load_manifest":
        from data_pipeline.shards import load_manifest

        return load_manifest
    if name == "open_storage":
        from data_pipeline.storage import open_storage

        return open_storage
    raise AttributeError(name)
