"""Typed configs of the data pipeline: storage, retries, `prepare` and the training loader.

Each dataclass is one section of a run's YAML file, read by the project's one strict loader
(trainer/config_loading.py: `from_dict`, `load_yaml_config`): an unknown key, a wrong type or a value
out of range is a ConfigError that names the key path and the file, raised before any work starts
(DESIGN: configuration). That module imports only the standard library and pyyaml, so using it here
brings nothing of the model, DeepSpeed or Ray into this package (tests/test_config_boundaries.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainer.config_loading import ConfigValueError, check_float

DAMAGED_SHARD_POLICIES = ("salvage", "skip")
DECODE_DEVICES = ("auto", "cpu", "mixed")
WORLD_SIZE_CHANGE_POLICIES = ("error", "restart_epoch")


@dataclass
class S3Config:
    """How to reach an S3-compatible store. Unset fields fall back to the standard AWS variables."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. http://127.0.0.1:9000; default $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, then AWS."""
    access_key_id: str | None = None
    """Access key; default $AWS_ACCESS_KEY_ID (or botocore's other credential sources)."""
    secret_access_key: str | None = None
    """Secret key; default $AWS_SECRET_ACCESS_KEY."""
    session_token: str | None = None
    """Session token for temporary credentials; default $AWS_SESSION_TOKEN."""
    region: str | None = None
    """Region name; default $AWS_REGION, then $AWS_DEFAULT_REGION, then us-east-1."""
    anonymous: bool = False
    """Unsigned requests (public buckets)."""
    connect_timeout_s: float = 5.0
    """Seconds to wait for a TCP connection before the attempt counts as failed."""
    read_timeout_s: float = 60.0
    """Seconds to wait for data on an open connection before the attempt counts as failed."""

    def resolved_endpoint(self) -> str | None:
        """The endpoint to use: this config's, else the standard AWS environment variables."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def resolved_region(self) -> str:
        """The region to sign requests for."""
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@dataclass
class RetryConfig:
    """Retry with exponential backoff for reads and writes that fail for transient reasons (network, 5xx)."""

    max_attempts: int = 10
    """Attempts per object before giving up (the shard is then skipped and counted as fetch_failed)."""
    initial_backoff_s: float = 0.2
    """Wait after the first failure; doubles after each further failure."""
    max_backoff_s: float = 10.0
    """Upper bound of one wait."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigValueError("max_attempts", self.max_attempts, "must be at least 1")
        check_float(self, "initial_backoff_s", 0.0)
        check_float(self, "max_backoff_s", 0.0)


@dataclass
class PrepareConfig:
    """What `unsup3d prepare` reads, how it crops, and where it writes shards."""

    source: str
    """Input kind: folder (any images), celeba (bounding boxes), synface (paired image/depth layout)."""
    input: str
    """Input folder (for celeba: the folder holding img_celeba/ or the images and the bounding-box file)."""
    output: str
    """Destination folder: a local path or s3://bucket/prefix. Shards, .idx files and manifest.json go there."""
    category: str
    """Object category recorded in the manifest (faces, cats, cars, ...)."""
    split: str = "train"
    """Split to shard: for synface the sub-folder read; for celeba the partition kept; else a label."""
    samples_per_shard: int = 1000
    """Samples per tar shard (the last shard holds the remainder)."""
    image_size: int | None = None
    """Stored side length after cropping; None keeps the crop's size. celeba defaults to 128 (SPEC 5)."""
    crop: int | None = None
    """Centre crop side in source pixels before resizing (presets: cats and synface 170). None: for folder
    sources the largest centre square, for synface the whole image."""
    image_format: str = "auto"
    """Encoding of the stored image: jpg, png, or auto (png for synface, jpg otherwise)."""
    jpeg_quality: int = 95
    """JPEG quality of re-encoded images."""
    bbox_file: str | None = None
    """celeba: bounding-box file; default <input>/celeba_crop_bbox.txt, else <input>/list_bbox_celeba.txt."""
    partition_file: str | None = None
    """celeba with the official list_bbox_celeba.txt: the split file; default <input>/list_eval_partition.txt."""
    max_samples: int | None = None
    """Stop after this many samples (quick subsets); None takes all."""
    max_image_pixels: int = 4096 * 4096
    """Source images with more pixels (read from the header, before decoding) are skipped: too_large."""
    min_image_size: int | None = None
    """Crops whose side is below this are skipped (too_small), not upscaled from a few pixels; None: half
    the stored image_size (no minimum when the crop's own size is kept)."""
    s3: S3Config = field(default_factory=S3Config)
    """Credentials and endpoint when output is s3://."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries for writes."""

    def __post_init__(self) -> None:
        if self.source not in ("folder", "celeba", "synface"):
            raise ConfigValueError("source", self.source, "must be folder, celeba or synface")
        if self.samples_per_shard < 1:
            raise ConfigValueError("samples_per_shard", self.samples_per_shard, "must be positive")
        if self.image_format not in ("auto", "jpg", "png"):
            raise ConfigValueError("image_format", self.image_format, "must be auto, jpg or png")
        if self.max_image_pixels < 1:
            raise ConfigValueError("max_image_pixels", self.max_image_pixels, "must be a positive integer")
        for name in ("image_size", "crop", "max_samples", "min_image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigValueError(name, value, "must be positive (or null)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigValueError("jpeg_quality", self.jpeg_quality, "must be 1..100")
        if not self.category or any(c in self.category for c in "/\\"):
            raise ConfigValueError("category", self.category, "must be a non-empty name without slashes")


@dataclass
class LoaderConfig:
    """The training-time pipeline: which shards, how they are split, shuffled, checked, decoded and batched."""

    shards: str
    """Dataset folder written by prepare (holds manifest.json): a local path or s3://bucket/prefix."""
    batch_size: int = 64
    """Images per batch per rank."""
    image_size: int = 64
    """Training side length: images are resized (shorter side) and centre-cropped to it."""
    seed: int = 0
    """Seed of the per-epoch shard and sample shuffles and of the flips (same on every rank)."""
    shuffle: bool = True
    """Shuffle shard order and samples within each shard, differently each epoch."""
    hflip_probability: float = 0.5
    """Random horizontal flip (the reference's only augmentation); 0 disables it."""
    with_depth: bool | None = None
    """Deliver ground-truth depth; None: when the manifest says the shards carry it."""
    drop_last: bool = False
    """Drop the last partial batch of an epoch (its samples are counted as skipped: drop_last)."""
    num_workers: int = 2
    """Reader threads per rank: worker w fetches, checks and validates this rank's shards w, w+n, ..."""
    prefetch_shards: int = 2
    """Validated shards each worker may hold ahead of the consumer."""
    prefetch_batches: int = 2
    """Decoded batches held ahead of the trainer."""
    dali_threads: int = 2
    """DALI CPU threads."""
    decode_device: str = "auto"
    """DALI image decoding: mixed (GPU, nvJPEG), cpu, or auto (mixed when training on a CUDA device)."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest; an intact tar that fails it is skipped whole."""
    on_damaged_shard: str = "salvage"
    """Truncated or corrupt tar: salvage the samples before the damage, or skip the whole shard."""
    max_image_pixels: int = 4096 * 4096
    """Images with more pixels are skipped (too_large) instead of decoded."""
    on_world_size_change: str = "error"
    """A checkpoint from another world size: error, or restart_epoch (from its start, warning)."""
    keep_in_memory: bool = False
    """Keep every shard read (checked) and every sample decoded (uint8, at image_size) in memory, so that
    later epochs only shuffle, flip and convert: for datasets that fit (the local cache of a data folder
    turns it on; 2000 faces at 64 px take about 50 MB). Decoding then runs on the CPU, once per sample."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries of shard and manifest reads."""
    s3: S3Config = field(default_factory=S3Config)
    """Credentials and endpoint when shards is s3://."""

    def __post_init__(self) -> None:
        if not self.shards or "\n" in self.shards:
            raise ConfigValueError("shards", self.shards, "must be a folder or s3://bucket/prefix holding manifest.json")
        for name in ("batch_size", "image_size", "num_workers", "prefetch_shards", "prefetch_batches",
                     "dali_threads", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ConfigValueError(name, getattr(self, name), "must be a positive integer")
        if self.seed < 0:
            raise ConfigValueError("seed", self.seed, "must be an integer >= 0")
        check_float(self, "hflip_probability", 0.0, 1.0)
        if self.decode_device not in DECODE_DEVICES:
            raise ConfigValueError("decode_device", self.decode_device, f"must be one of {', '.join(DECODE_DEVICES)}")
        if self.on_damaged_shard not in DAMAGED_SHARD_POLICIES:
            raise ConfigValueError("on_damaged_shard", self.on_damaged_shard,
                          f"must be one of {', '.join(DAMAGED_SHARD_POLICIES)}")
        if self.on_world_size_change not in WORLD_SIZE_CHANGE_POLICIES:
            raise ConfigValueError("on_world_size_change", self.on_world_size_change,
                          f"must be one of {', '.join(WORLD_SIZE_CHANGE_POLICIES)}")
