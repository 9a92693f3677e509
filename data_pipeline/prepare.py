"""`prepare`: read a source, crop/convert/resize each image, write shards, index files and the manifest.

Per image: convert to 8-bit RGB (grayscale, CMYK, alpha, palette, 16-bit are converted and counted),
crop (CelebA: its bounding box with replicate padding; presets: a centre crop; folders: the largest
centre square), resize to image_size with PIL's antialiased bilinear filter, encode (JPEG q95 4:4:4
or PNG). Depth (synface) gets the same crop and resize and is stored as an 8-bit PNG of channel 0.
Files that cannot be used are skipped, logged with their name, and counted in the manifest.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from data_pipeline import validate as V
from data_pipeline.config import PrepareConfig
from data_pipeline.shards import MANIFEST_NAME, DatasetInfo, Manifest, ShardWriter
from data_pipeline.sources import SourceProblem, SourceSample, celeba_source, folder_source, synface_source
from data_pipeline.storage import S3Storage, Storage, open_storage

log = logging.getLogger(__name__)

GenerateFn = Callable[[Path], None]
"""Writes a synface-layout tree (<root>/<split>/image/*_image.png, <root>/<split>/depth/*_depth.png) under root."""


class _TooSmall(ValueError):
    """A crop below min_image_size: skipped, never upscaled from a few pixels."""


def crop_with_replicate(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """array[top:bottom, left:right], where parts outside the image repeat its border pixels."""
    left, top, right, bottom = box
    height, width = array.shape[:2]
    pad_top, pad_left = max(0, -top), max(0, -left)
    pad_bottom, pad_right = max(0, bottom - height), max(0, right - width)
    if pad_top or pad_left or pad_bottom or pad_right:
        pads = [(pad_top, pad_bottom), (pad_left, pad_right)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pads, mode="edge")
    return array[top + pad_top:bottom + pad_top, left + pad_left:right + pad_left]


def centre_box(width: int, height: int, crop: int | None) -> tuple[int, int, int, int]:
    """The centre square of side `crop` (default: the largest that fits), placed as torchvision's CenterCrop."""
    side = crop if crop is not None else min(width, height)
    if side > width or side > height:
        raise ValueError(f"image {width}x{height} is smaller than the {side} px crop")
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def _crop_resize(image: Image.Image, box, size: int | None) -> Image.Image:
    mode = image.mode
    cropped = Image.fromarray(crop_with_replicate(np.asarray(image), box), mode)
    if size is not None and cropped.size != (size, size):
        cropped = cropped.resize((size, size), Image.BILINEAR)
    return cropped


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _depth_channel0(depth: Image.Image, raw: bytes | None) -> Image.Image:
    array, _ = V.depth_channel0(depth, raw is not None and V._is_16bit_png(raw))
    return Image.fromarray(array, "L")


def _source_items(config: PrepareConfig) -> Iterator[SourceSample | SourceProblem]:
    limit = config.max_image_pixels
    if config.source == "folder":
        return folder_source(config.input, limit)
    if config.source == "celeba":
        return celeba_source(config.input, config.split, config.bbox_file, config.partition_file, limit)
    return synface_source(config.input, config.split, limit)


def resolved_min_size(config: PrepareConfig) -> int:
    """The smallest crop side kept: min_image_size, else half the stored size (no minimum when the crop's own
    size is kept: nothing is upscaled here then)."""
    if config.min_image_size is not None:
        return config.min_image_size
    size = resolved_image_size(config)
    return max(1, size // 2) if size is not None else 1


def resolved_image_size(config: PrepareConfig) -> int | None:
    """celeba: 128 (SPEC 5); folders without a crop: 128 (photos can be huge); otherwise keep the crop's size."""
    if config.image_size is not None:
        return config.image_size
    if config.source == "celeba" or (config.source == "folder" and config.crop is None):
        return 128
    return None


def prepare_dataset(config: PrepareConfig, source_record: dict | None = None,
                    progress: Callable[[int], None] | None = None,
                    on_skip: Callable[[str, str, str], None] | None = None) -> Manifest:
    """Shard `config.input` into `config.output`; returns the manifest written there.

    Every source file left out is logged with its name and counted in the manifest; `on_skip(name, reason,
    detail)` also hears of each one (the local shard cache keeps the names, to repeat them on reuse)."""
    storage: Storage = open_storage(config.output, config.s3)
    if isinstance(storage, S3Storage):
        storage.ensure_bucket()
    if storage.exists(MANIFEST_NAME):
        log.warning("%s already holds a dataset: replacing it", config.output)
        storage.remove(MANIFEST_NAME)  # an interrupted prepare then leaves no stale manifest behind
    size = resolved_image_size(config)
    min_side = resolved_min_size(config)
    fmt = config.image_format if config.image_format != "auto" else ("png" if config.source == "synface" else "jpg")
    has_depth = config.source == "synface"
    writer = ShardWriter(storage, config.samples_per_shard, config.retry)
    skipped: dict[str, int] = {}
    converted: dict[str, int] = {}
    stored_size: int | None = None
    count = 0
    used_keys: set[str] = set()

    def skip(name: str, reason: str, detail: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        log.warning("prepare: skipped %s: %s: %s", name, reason, detail)
        if on_skip is not None:
            on_skip(name, reason, detail)

    for item in _source_items(config):
        if config.max_samples is not None and count >= config.max_samples:
            break
        if isinstance(item, SourceProblem):
            skip(item.name, item.reason, item.detail)
            continue
        try:
            is_16bit = item.raw is not None and V._is_16bit_png(item.raw)
            rgb, reasons = V.to_rgb8(item.image, is_16bit)
            box = item.box
            if box is None:
                if config.source == "folder" or config.crop is not None:
                    box = centre_box(rgb.width, rgb.height, config.crop)
                else:
                    box = (0, 0, rgb.width, rgb.height)
            side = min(box[2] - box[0], box[3] - box[1])
            if side < min_side:
                raise _TooSmall(f"crop of {box[2] - box[0]}x{box[3] - box[1]} px is smaller than {min_side} px "
                                "(min_image_size): not upscaled")
            image = _crop_resize(rgb, box, size)
            if image.width != image.height:
                raise ValueError(f"crop is {image.width}x{image.height}, not square: give crop or image_size")
            components = {fmt: _encode(image, fmt, config.jpeg_quality)}
            if has_depth:
                depth = _crop_resize(_depth_channel0(item.depth, item.depth_raw), box, size)
                components["depth.png"] = _encode(depth, "png", 0)
        except _TooSmall as error:
            skip(item.name, "too_small", str(error))
            continue
        except ValueError as error:
            reason = "smaller_than_crop" if "smaller than" in str(error) else "bad_geometry"
            skip(item.name, reason, str(error))
            continue
        except Exception as error:  # noqa: BLE001 - e.g. a decoder error surfacing on conversion
            skip(item.name, "unreadable_image", f"{type(error).__name__}: {error}")
            continue
        if stored_size is None:
            stored_size = image.width
        elif image.width != stored_size:
            skip(item.name, "size_differs", f"its crop is {image.width} px, the dataset's {stored_size} (set image_size)")
            continue
        for reason in reasons:
            converted[reason] = converted.get(reason, 0) + 1
        key = item.key
        suffix = 1
        while key in used_keys:
            key = f"{item.key}-{suffix}"
            suffix += 1
        used_keys.add(key)
        meta = {"source": item.name, "original_size": list(item.image.size), "crop_box": list(box), **item.meta}
        components["json"] = json.dumps(meta, sort_keys=True).encode()
        writer.add(key, components)
        count += 1
        if progress is not None:
            progress(count)
    if count == 0:
        raise ValueError(f"{config.input}: no usable {config.source} images for split {config.split!r} "
                         f"(skipped: {skipped or 'none found'})")
    record = source_record or {"kind": config.source, "input": config.input}
    record = {**record, "crop": config.crop, "resize": size}
    if config.source == "celeba":
        record["bbox_file"] = config.bbox_file
    dataset = DatasetInfo(category=config.category, split=config.split, source=record, image_size=stored_size,
                          image_ext=fmt, components=sorted([fmt, "json"] + (["depth.png"] if has_depth else [])),
                          has_depth=has_depth,
                          prepare_skipped=skipped, prepare_converted=converted)
    manifest = writer.finish(dataset)
    log.info("prepare: %d samples in %d shards at %s (skipped %s, converted %s)", manifest.num_samples,
             len(manifest.shards), config.output, skipped, converted)
    return manifest


def prepare_synthetic(generate: GenerateFn, config: PrepareConfig, description: str = "synthetic") -> Manifest:
    """Generate a synface-layout tree into a temporary folder with `generate`, then shard it (with depth).

    `generate(root)` is supplied by the caller (the unsup3d CLI passes the trainer's generator), so this
    package never imports the trainer. `config.input` is ignored; `config.split` picks the split to shard.
    """
    with tempfile.TemporaryDirectory(prefix="unsup3d-synthetic-") as tmp:
        generate(Path(tmp))
        return prepare_dataset(replace(config, source="synface", input=tmp), source_record={"kind": "synthetic",
                                                                                    "generator": description})
