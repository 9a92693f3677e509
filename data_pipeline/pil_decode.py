"""Decoding with PIL where DALI is not installed: the same batches as dali_decode.py, on the CPU.

DALI is an optional extra (`unsup3d[data]`, a 200 MB wheel) that some machines cannot install (the lent
GPU machine, DEPENDENCIES). There the loader decodes with this class instead and says so once in the log;
everything else (streaming, validation, skips, flips, positions) is the same code. The ops follow
DaliDecoder's pipeline:
  image:  decode RGB -> resize shorter side to S (antialiased bilinear) -> centre crop S x S, mirror, to
          [-1, 1], CHW
  depth:  uint8 channel 0 -> the same resize, crop and mirror -> d = 1.1 - 0.2 * byte / 255 (SPEC 6)
Images already S x S (the local shard cache stores them at the training size) skip the resize, and then
equal DALI's output exactly.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading

import numpy as np
import torch
from PIL import Image

from data_pipeline.dali_decode import DecodeFailure

log = logging.getLogger(__name__)
_announced = threading.Event()


def dali_available() -> bool:
    """Whether nvidia.dali can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # the nvidia namespace package itself is missing
        return False


def announce_pil_fallback() -> None:
    """Log, once per process, that batches are decoded with PIL."""
    if not _announced.is_set():
        _announced.set()
        log.info("DALI is not installed (pip install 'unsup3d[data]'): decoding images with PIL on the CPU")


def _resize_crop(array: np.ndarray, size: int, resample) -> np.ndarray:
    """Shorter side to `size`, then the centre size x size (array HxW or HxWxC, uint8)."""
    height, width = array.shape[:2]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = Image.fromarray(array)
        array = np.asarray(image.resize((new_w, new_h), resample, reducing_gap=None))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        array = array[top:top + size, left:left + size]
    return array


class PilDecoder:
    """DaliDecoder's interface: decode(images, flips, depths) -> ({"image", "depth"}, failures)."""

    decoder_device = "cpu"

    def __init__(self, image_size: int, max_batch_size: int, with_depth: bool, device: torch.device | str = "cpu",
                 raw: bool = False):
        """`raw`: as DaliDecoder's (uint8 [B,S,S,3] images and [B,S,S] depth bytes, unflipped, on the CPU)."""
        self.raw = raw
        if raw:
            device = "cpu"
        self.image_size = image_size
        self.max_batch_size = max_batch_size
        self.with_depth = with_depth
        self.device = torch.device(device)
        self.rebuilds = 0  # DaliDecoder's counter; nothing here needs rebuilding

    def _image(self, data: bytes, flip: bool) -> np.ndarray:
        array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        array = _resize_crop(array, self.image_size, Image.BILINEAR)
        return array[:, ::-1] if flip and not self.raw else array

    def _depth(self, depth: np.ndarray, flip: bool) -> np.ndarray:
        array = _resize_crop(np.ascontiguousarray(depth[:, :, 0]), self.image_size, Image.BILINEAR)
        return array[:, ::-1] if flip and not self.raw else array

    def decode(self, images: list[bytes], flips: list[bool], depths: list[np.ndarray] | None = None
               ) -> tuple[dict[str, torch.Tensor], list[DecodeFailure]]:
        """Decode one batch. Returns the tensors (rows of failed samples left out) and the failures."""
        if not images:
            raise ValueError("empty batch")
        if len(images) > self.max_batch_size:
            raise ValueError(f"batch of {len(images)} exceeds max_batch_size {self.max_batch_size}")
        rgb, depth, failures = [], [], []
        for i, data in enumerate(images):
            try:
                rgb.append(self._image(data, flips[i]))
                if self.with_depth:
                    depth.append(self._depth(depths[i], flips[i]))
            except Exception as error:  # noqa: BLE001 - one bad image costs one sample, as with DALI
                if len(rgb) > len(depth) and self.with_depth:
                    rgb.pop()
                failures.append(DecodeFailure(i, f"PIL: {type(error).__name__}: {error}"))
        if not rgb:
            return {}, failures
        if self.raw:
            result = {"image": torch.from_numpy(np.stack(rgb))}
            if self.with_depth:
                result["depth"] = torch.from_numpy(np.stack(depth))
            return result, failures
        image = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        result = {"image": image.contiguous()}
        if self.with_depth:
            result["depth"] = 1.1 - torch.from_numpy(np.stack(depth)).float() * (0.2 / 255.0)
        if self.device.type != "cpu":
            result = {k: v.to(self.device, non_blocking=True) for k, v in result.items()}
        return result, failures

    def close(self) -> None:
        pass
