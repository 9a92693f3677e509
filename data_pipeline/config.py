"""Typed configs of the data pipeline: storage, retries, `prepare` and the training loader.

Each dataclass is one section of a run's YAML file. `from_dict` builds one strictly: an unknown key or
a wrong type is a `DataConfigError` that names the key path and the file, raised before any work starts
(DESIGN: configuration). The trainer's own loader (trainer/config_loading.py) accepts these classes too:
they use only str/int/float/bool, optionals and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

DAMAGED_SHARD_POLICIES = ("salvage", "skip")
DECODE_DEVICES = ("auto", "cpu", "mixed")
WORLD_SIZE_CHANGE_POLICIES = ("error", "restart_epoch")


class DataConfigError(ValueError):
    """A data config value is wrong; the message names the key (and the file when known).

    Raised for one value (`invalid`), it carries key, value and allowed, so that a loader that knows
    the section path and the file (trainer/config_loading.py, for a run's `stream:` section) can say
    stream.batch_size instead of batch_size."""

    def __init__(self, message: str, key: str | None = None, value: Any = None, allowed: str | None = None):
        super().__init__(message)
        if key is not None:
            self.key, self.value, self.allowed = key, value, allowed


def _short(value: Any, limit: int = 60) -> str:
    import reprlib

    text = " ".join(reprlib.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(key: str, value: Any, allowed: str) -> DataConfigError:
    """The error for one value outside what its key allows (one line: key, shortened value, what is allowed)."""
    return DataConfigError(f"{key} = {_short(value)}: {allowed}", key, value, allowed)


def _check_finite(obj: Any, name: str, minimum: float, maximum: float | None = None) -> None:
    import math

    value = getattr(obj, name)
    if not (math.isfinite(value) and value >= minimum and (maximum is None or value <= maximum)):
        bounds = f"in [{minimum:g}, {maximum:g}]" if maximum is not None else f">= {minimum:g}"
        raise invalid(name, value, f"must be a finite number {bounds}")


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
            raise invalid("max_attempts", self.max_attempts, "must be at least 1")
        _check_finite(self, "initial_backoff_s", 0.0)
        _check_finite(self, "max_backoff_s", 0.0)


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
            raise invalid("source", self.source, "must be folder, celeba or synface")
        if self.samples_per_shard < 1:
            raise invalid("samples_per_shard", self.samples_per_shard, "must be positive")
        if self.image_format not in ("auto", "jpg", "png"):
            raise invalid("image_format", self.image_format, "must be auto, jpg or png")
        if self.max_image_pixels < 1:
            raise invalid("max_image_pixels", self.max_image_pixels, "must be a positive integer")
        for name in ("image_size", "crop", "max_samples", "min_image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise invalid(name, value, "must be positive (or null)")
        if not 1 <= self.jpeg_quality <= 100:
            raise invalid("jpeg_quality", self.jpeg_quality, "must be 1..100")
        if not self.category or any(c in self.category for c in "/\\"):
            raise invalid("category", self.category, "must be a non-empty name without slashes")


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
            raise invalid("shards", self.shards, "must be a folder or s3://bucket/prefix holding manifest.json")
        for name in ("batch_size", "image_size", "num_workers", "prefetch_shards", "prefetch_batches",
                     "dali_threads", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise invalid(name, getattr(self, name), "must be a positive integer")
        if self.seed < 0:
            raise invalid("seed", self.seed, "must be an integer >= 0")
        _check_finite(self, "hflip_probability", 0.0, 1.0)
        if self.decode_device not in DECODE_DEVICES:
            raise invalid("decode_device", self.decode_device, f"must be one of {', '.join(DECODE_DEVICES)}")
        if self.on_damaged_shard not in DAMAGED_SHARD_POLICIES:
            raise invalid("on_damaged_shard", self.on_damaged_shard,
                          f"must be one of {', '.join(DAMAGED_SHARD_POLICIES)}")
        if self.on_world_size_change not in WORLD_SIZE_CHANGE_POLICIES:
            raise invalid("on_world_size_change", self.on_world_size_change,
                          f"must be one of {', '.join(WORLD_SIZE_CHANGE_POLICIES)}")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except DataConfigError:
                pass
        raise DataConfigError(f"{where}: expected {tp}, got {_short(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise DataConfigError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataConfigError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataConfigError(f"{where}: expected a number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DataConfigError(f"{where}: expected a string, got {_short(value)}")
        return value
    raise DataConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type[T], data: Any, where: str = "<config>") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise, naming `where.key`.

    `where` is the file name (and key path) used in messages, e.g. "configs/celeba.yaml:data".
    """
    if not isinstance(data, dict):
        raise DataConfigError(f"{where}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DataConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(names))})")
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except DataConfigError as error:
        if hasattr(error, "key"):
            raise DataConfigError(f"{where}.{error}", f"{where}.{error.key}", error.value, error.allowed) from None
        raise DataConfigError(f"{where}: {error}") from None
    except TypeError as error:  # a required field is missing
        raise DataConfigError(f"{where}: {error}") from None


def load_yaml_section(cls: type[T], path: str, section: str | None = None) -> T:
    """Read `cls` from a YAML file (optionally from one top-level section of it).

    For data_pipeline used on its own. Run configs are read by trainer/config_loading.py, whose
    StrictLoader also refuses alias bombs and duplicate keys; this package does not import the trainer,
    so this reader keeps yaml.safe_load (a known duplication: files here come from the operator)."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    where = path
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise DataConfigError(f"{path}: no section {section!r}")
        data = data[section]
        where = f"{path}:{section}"
    return from_dict(cls, data, where)
