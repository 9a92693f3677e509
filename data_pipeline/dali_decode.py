"""Decoding and augmentation with DALI: encoded images (+ depth) in, batch tensors on the device out.

One pipeline definition serves both machines: decoders.image runs on "mixed" (nvJPEG on the GPU) when
training on a CUDA device and on "cpu" otherwise; every later op follows the image's device.
  image:  decode RGB -> resize shorter side to S (antialiased) -> centre crop S x S, mirror, to [-1, 1], CHW
  depth:  uint8 channel 0 -> the same resize, crop and mirror -> d = 1.1 - 0.2 * byte / 255 (SPEC 6)
  raw (TrainLoader.keep_in_memory): decode -> resize -> crop only, on the CPU, uint8 HWC out; the loader
          keeps these bytes and flips and scales each batch itself.
The flip of each sample is decided by the caller (from seed, epoch and key) and fed in, so a resumed
run flips exactly as the uninterrupted one, whatever the world size.

Inputs come through fn.external_source with cycle="raise" (without it every epoch after the first
yields nothing, DEPENDENCIES). `decode` pushes exactly one batch per pipeline run (prefetch depth 1),
so a DALI failure is tied to its batch: the pipeline is rebuilt (DALI does not recover), the batch is
re-encoded through PIL and decoded again, and only images that still fail are dropped and reported.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def resolve_decode_device(decode_device: str, device: torch.device) -> str:
    """'mixed' or 'cpu' for decoders.image: mixed only when training on CUDA and DALI can use the GPU."""
    if decode_device == "cpu":
        return "cpu"
    if decode_device == "mixed":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"decode_device=mixed needs a CUDA training device, got {device}")
        return "mixed"
    return "mixed" if device.type == "cuda" and torch.cuda.is_available() else "cpu"


class _OneBatch:
    """The external source: hands DALI the batch `decode` just set, exactly once per run."""

    def __init__(self) -> None:
        self.pending = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.pending is None:
            raise StopIteration
        batch, self.pending = self.pending, None
        return batch


@dataclass
class DecodeFailure:
    index: int
    detail: str


class DaliDecoder:
    """Decodes batches of validated samples into {"image": [B,3,S,S], "depth": [B,S,S]} on `device`."""

    def __init__(self, image_size: int, max_batch_size: int, with_depth: bool, device: torch.device | str = "cpu",
                 decode_device: str = "auto", num_threads: int = 2, seed: int = 0, raw: bool = False):
        """`raw`: decode, resize and crop only, on the CPU: uint8 images [B,S,S,3] and depth bytes [B,S,S],
        unflipped (`decode`'s flips are ignored); the caller flips and scales (TrainLoader.keep_in_memory)."""
        self.raw = raw
        if raw:
            decode_device, device = "cpu", "cpu"
        self.image_size = image_size
        self.max_batch_size = max_batch_size
        self.with_depth = with_depth
        self.device = torch.device(device)
        self.requested_device = decode_device
        self.decoder_device = resolve_decode_device(decode_device, self.device)
        self.num_threads = num_threads
        self.seed = seed
        self.rebuilds = 0
        self._pipe = None
        self._feeder = _OneBatch()
        try:
            self._build()
        except Exception as error:  # noqa: BLE001 - e.g. a driver too old for DALI's CUDA build
            if self.decoder_device != "mixed" or self.requested_device != "auto":
                raise
            log.warning("DALI cannot decode on the GPU here (%s: %s); decoding on the CPU and copying batches to %s",
                        type(error).__name__, str(error).splitlines()[0][:300], self.device)
            self.decoder_device = "cpu"
            self._build()

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        mixed = self.decoder_device == "mixed"
        size = self.image_size
        feeder = self._feeder = _OneBatch()
        with_depth = self.with_depth
        raw = self.raw
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if mixed else None

        @pipeline_def(batch_size=self.max_batch_size, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=1, seed=self.seed)
        def pipeline():
            if raw:  # no mirror input: flips are the caller's
                outputs = fn.external_source(source=feeder, num_outputs=2 if with_depth else 1, cycle="raise",
                                             batch=True, layout=[None, "HWC"] if with_depth else [None])
                encoded, depth = (outputs[0], outputs[1]) if with_depth else (outputs[0], None)
            elif with_depth:
                encoded, mirror, depth = fn.external_source(source=feeder, num_outputs=3, cycle="raise", batch=True,
                                                            layout=[None, None, "HWC"])
            else:
                encoded, mirror = fn.external_source(source=feeder, num_outputs=2, cycle="raise", batch=True)
            images = fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB)
            images = fn.resize(images, resize_shorter=size, antialias=True, interp_type=types.INTERP_LINEAR)
            if raw:
                images = fn.crop(images, crop=(size, size))
                if not with_depth:
                    return images
                depth = fn.resize(depth, resize_shorter=size, antialias=True, interp_type=types.INTERP_LINEAR)
                return images, fn.crop(depth, crop=(size, size))
            images = fn.crop_mirror_normalize(images, crop=(size, size), mirror=mirror, mean=[127.5] * 3,
                                              std=[127.5] * 3, dtype=types.FLOAT, output_layout="CHW")
            if not with_depth:
                return images
            if mixed:
                depth = depth.gpu()
            depth = fn.resize(depth, resize_shorter=size, antialias=True, interp_type=types.INTERP_LINEAR)
            depth = fn.crop_mirror_normalize(depth, crop=(size, size), mirror=mirror, dtype=types.FLOAT,
                                             output_layout="CHW")
            return images, 1.1 - depth * (0.2 / 255.0)

        self._pipe = pipeline()
        self._pipe.build()

    def _to_torch(self, output) -> torch.Tensor:
        tensor = output.as_tensor()
        if self.decoder_device == "cpu":
            # Copy out: DALI reuses its buffers on the next run.
            result = torch.from_numpy(np.array(tensor))
            return result.to(self.device, non_blocking=True) if self.device.type != "cpu" else result
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        feed_ndarray(tensor, result, cuda_stream=stream)
        stream.synchronize()  # the batch crosses to the trainer's thread
        return result

    def _run(self, images: list[bytes], flips: list[bool], depths: list[np.ndarray] | None) -> dict[str, torch.Tensor]:
        batch = [[np.frombuffer(b, dtype=np.uint8) for b in images]]
        if not self.raw:
            batch.append([np.array(1 if f else 0, dtype=np.int32) for f in flips])
        if self.with_depth:
            batch.append(list(depths))
        self._feeder.pending = tuple(batch)
        outputs = self._pipe.run()
        result = {"image": self._to_torch(outputs[0])}
        if self.with_depth:
            depth = self._to_torch(outputs[1])
            result["depth"] = depth[..., 0] if self.raw else depth[:, 0]  # HWC bytes or CHW floats
        return result

    def _rebuild(self, error: BaseException) -> None:
        self.rebuilds += 1
        log.warning("DALI pipeline failed (%s: %s); rebuilding it", type(error).__name__, str(error).splitlines()[0][:300])
        self._pipe = None
        self._build()

    def decode(self, images: list[bytes], flips: list[bool], depths: list[np.ndarray] | None = None
               ) -> tuple[dict[str, torch.Tensor], list[DecodeFailure]]:
        """Decode one batch. Returns the tensors (rows of failed samples left out) and the failures."""
        if not images:
            raise ValueError("empty batch")
        if len(images) > self.max_batch_size:
            raise ValueError(f"batch of {len(images)} exceeds max_batch_size {self.max_batch_size}")
        try:
            return self._run(images, flips, depths), []
        except Exception as error:  # noqa: BLE001 - DALI raises RuntimeError; the pipeline is dead either way
            self._rebuild(error)
        # Second chance: images PIL accepted, re-encoded by PIL as plain RGB PNGs.
        reencoded, failures = [], []
        for i, data in enumerate(images):
            try:
                buffer = io.BytesIO()
                Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="PNG", compress_level=1)
                reencoded.append(buffer.getvalue())
            except Exception as error:  # noqa: BLE001
                reencoded.append(None)
                failures.append(DecodeFailure(i, f"PIL re-encode: {type(error).__name__}: {error}"))
        good = [i for i, data in enumerate(reencoded) if data is not None]
        if good:
            try:
                return self._subset(good, reencoded, flips, depths), failures
            except Exception as error:  # noqa: BLE001
                self._rebuild(error)
        # Last resort: one image at a time, to drop only the ones DALI cannot take.
        parts, kept = [], []
        for i in good:
            try:
                parts.append(self._run([reencoded[i]], [flips[i]], [depths[i]] if depths is not None else None))
                kept.append(i)
            except Exception as error:  # noqa: BLE001
                self._rebuild(error)
                failures.append(DecodeFailure(i, f"DALI: {str(error).splitlines()[0][:300]}"))
        failures.sort(key=lambda f: f.index)
        if not parts:
            return {}, failures
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}, failures

    def _subset(self, indices, images, flips, depths):
        return self._run([images[i] for i in indices], [flips[i] for i in indices],
                         [depths[i] for i in indices] if depths is not None else None)

    def close(self) -> None:
        self._pipe = None
