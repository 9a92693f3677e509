"""Per-sample checks before anything reaches DALI, and the reasons samples are skipped or converted.

DALI stops for good on a garbage or truncated JPEG (DEPENDENCIES), so every image is opened and
decoded by PIL first (JPEGs in DCT-scaled "draft" mode, which still walks the whole entropy-coded
stream and is several times cheaper than a full decode). What DALI then receives is always an 8-bit
RGB JPEG or PNG: other modes (grayscale, CMYK, alpha, palette, 16-bit) and other formats are converted
here and re-encoded as PNG, and counted by reason. Depth maps are decoded here completely (they are
small) and handed to DALI as uint8 arrays of channel 0.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Why a sample or a whole shard did not reach the trainer. Every one is counted and logged.
SKIP_MISSING_COMPONENT = "missing_component"
SKIP_CORRUPT_IMAGE = "corrupt_image"
SKIP_TRUNCATED_IMAGE = "truncated_image"
SKIP_TOO_LARGE = "too_large"
SKIP_CORRUPT_DEPTH = "corrupt_depth"
SKIP_DEPTH_SIZE_MISMATCH = "depth_size_mismatch"
SKIP_DECODE_ERROR = "decode_error"  # DALI failed on an image PIL accepted, even after re-encoding
SKIP_MISSING_SHARD = "missing_shard"
SKIP_FETCH_FAILED = "fetch_failed"  # transient errors outlasted the retries
SKIP_EMPTY_SHARD = "empty_shard"
SKIP_TRUNCATED_TAR = "truncated_tar"
SKIP_CORRUPT_TAR = "corrupt_tar"
SKIP_CHECKSUM_MISMATCH = "checksum_mismatch"
SKIP_DROP_LAST = "drop_last"

# What was converted on the way (the sample is delivered).
CONVERT_GRAYSCALE = "grayscale"
CONVERT_CMYK = "cmyk"
CONVERT_ALPHA = "alpha"
CONVERT_PALETTE = "palette"
CONVERT_16BIT = "16bit"
CONVERT_OTHER_MODE = "other_mode"
CONVERT_FORMAT = "format"  # not JPEG/PNG (BMP, WebP, TIFF ...): re-encoded as PNG
CONVERT_WRONG_SIZE = "wrong_size"  # not the manifest's size: resized by the decode stage like any image
CONVERT_DEPTH_CHANNEL0 = "depth_channel0"  # multi-channel depth PNG: channel 0 taken
CONVERT_DEPTH_16BIT = "depth_16bit"

IMAGE_COMPONENTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
DEPTH_COMPONENT = "depth.png"
_DALI_FORMATS = ("JPEG", "PNG")


@dataclass
class ValidSample:
    """A sample that passed the checks: what the decode stage needs."""

    key: str
    image: bytes
    """An 8-bit RGB JPEG or PNG."""
    depth: np.ndarray | None = None
    """uint8 [H, W, 1], channel 0 of the depth PNG (x = byte/255)."""
    converted: list[str] = field(default_factory=list)


@dataclass
class Rejected:
    """A sample the checks refused."""

    key: str
    reason: str
    detail: str


def _is_16bit_png(data: bytes) -> bool:
    # IHDR is the first chunk: 8-byte signature, 4 length, 4 type, 4 width, 4 height, then bit depth.
    return len(data) > 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[24] == 16


def to_rgb8(image: Image.Image, is_16bit: bool = False) -> tuple[Image.Image, list[str]]:
    """An 8-bit RGB version of a decoded PIL image, and what had to change (empty list: nothing).

    Alpha is dropped (not composited): photo collections rarely use it and a background colour would be
    invented. 16-bit data keeps its 8 most significant bits (PIL's own convert would clip at 255).
    """
    reasons = [CONVERT_16BIT] if is_16bit else []
    mode = image.mode
    if mode == "RGB":
        return image, reasons
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image)
        if mode == "I" and array.max(initial=0) <= 255 and not is_16bit:
            array8 = array.clip(0, 255).astype(np.uint8)
        else:
            array8 = (array.astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        if CONVERT_16BIT not in reasons:
            reasons.append(CONVERT_16BIT)
        return Image.fromarray(array8, "L").convert("RGB"), reasons + [CONVERT_GRAYSCALE]
    if mode in ("L", "1"):
        return image.convert("RGB"), reasons + [CONVERT_GRAYSCALE]
    if mode == "LA":
        return image.convert("L").convert("RGB"), reasons + [CONVERT_GRAYSCALE, CONVERT_ALPHA]
    if mode == "RGBA" or mode == "RGBa":
        return image.convert("RGB"), reasons + [CONVERT_ALPHA]
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB"), reasons + [CONVERT_PALETTE]
    if mode == "CMYK":
        return image.convert("RGB"), reasons + [CONVERT_CMYK]
    if mode == "F":
        array = np.asarray(image)
        return Image.fromarray(array.clip(0, 255).astype(np.uint8), "L").convert("RGB"), reasons + [CONVERT_OTHER_MODE]
    return image.convert("RGB"), reasons + [CONVERT_OTHER_MODE]


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_error_reason(error: BaseException) -> str:
    text = str(error).lower()
    return SKIP_TRUNCATED_IMAGE if "truncated" in text or "premature end" in text else SKIP_CORRUPT_IMAGE


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """PIL image with its header parsed; raises ValueError('too_large') over max_pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise OverflowError(f"{width}x{height} pixels exceeds max_image_pixels={max_pixels}")
    return image


def depth_channel0(image: Image.Image, is_16bit: bool = False) -> tuple[np.ndarray, list[str]]:
    """Channel 0 of a decoded depth image as uint8 [H, W] (16-bit keeps its high byte), with conversions noted."""
    reasons = []
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        reasons.append(CONVERT_DEPTH_16BIT)
    elif image.mode == "L":
        array = np.asarray(image)
        if is_16bit:
            reasons.append(CONVERT_DEPTH_16BIT)
    else:
        if image.mode in ("P", "PA"):
            image = image.convert("RGB")
        array = np.asarray(image.getchannel(0) if len(image.getbands()) > 1 else image.convert("L"))
        reasons.append(CONVERT_DEPTH_CHANNEL0)
        if is_16bit:
            reasons.append(CONVERT_DEPTH_16BIT)
    return np.ascontiguousarray(array, dtype=np.uint8), reasons


def decode_depth(data: bytes, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    """Channel 0 of an encoded depth PNG as uint8 [H, W], with conversions noted; raises on a bad file."""
    image = open_checked(data, max_pixels)
    image.load()
    return depth_channel0(image, _is_16bit_png(data))


class SampleValidator:
    """Checks one webdataset sample dict ({"__key__", "jpg"/"png", "depth.png", ...})."""

    def __init__(self, image_ext: str | None, with_depth: bool, image_size: int | None,
                 max_pixels: int = 4096 * 4096):
        self.image_ext = image_ext
        self.with_depth = with_depth
        self.image_size = image_size
        self.max_pixels = max_pixels

    def _image_component(self, sample: dict) -> str | None:
        if self.image_ext and self.image_ext in sample:
            return self.image_ext
        return next((c for c in IMAGE_COMPONENTS if c in sample), None)

    def check(self, sample: dict) -> ValidSample | Rejected:
        key = str(sample.get("__key__", "?"))
        component = self._image_component(sample)
        if component is None:
            return Rejected(key, SKIP_MISSING_COMPONENT, f"no image component (has {sorted(k for k in sample if not k.startswith('__'))})")
        if self.with_depth and DEPTH_COMPONENT not in sample:
            return Rejected(key, SKIP_MISSING_COMPONENT, f"no {DEPTH_COMPONENT}")
        data = sample[component]
        converted: list[str] = []
        opened = False
        try:
            image = open_checked(data, self.max_pixels)
            opened = True
            image_format = image.format
            is_16bit = image_format == "PNG" and _is_16bit_png(data)
            needs_conversion = image.mode != "RGB" or is_16bit or image_format not in _DALI_FORMATS
            size = image.size  # before draft(), which shrinks it
            if image_format == "JPEG" and not needs_conversion:
                # Scaled decode: every entropy-coded block is still parsed, so damage still raises.
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
        except OverflowError as error:
            return Rejected(key, SKIP_TOO_LARGE, str(error))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            return Rejected(key, SKIP_TOO_LARGE, str(error))
        except Exception as error:  # noqa: BLE001 - any decoder failure means an unusable image
            # A header PIL cannot parse is corruption; running out of data after a good header is truncation.
            reason = _image_error_reason(error) if opened else SKIP_CORRUPT_IMAGE
            return Rejected(key, reason, f"{component}: {type(error).__name__}: {error}")
        if needs_conversion:
            rgb, converted = to_rgb8(image, is_16bit)
            if image_format not in _DALI_FORMATS:
                converted.append(CONVERT_FORMAT)
            data = encode_png(rgb)
        depth = None
        if self.with_depth:
            try:
                depth2d, depth_reasons = decode_depth(sample[DEPTH_COMPONENT], self.max_pixels)
            except Exception as error:  # noqa: BLE001
                return Rejected(key, SKIP_CORRUPT_DEPTH, f"{DEPTH_COMPONENT}: {type(error).__name__}: {error}")
            if depth2d.shape != (size[1], size[0]):
                return Rejected(key, SKIP_DEPTH_SIZE_MISMATCH,
                                f"image {size[0]}x{size[1]}, depth {depth2d.shape[1]}x{depth2d.shape[0]}")
            converted += depth_reasons
            depth = depth2d[:, :, None]
        if self.image_size is not None and size != (self.image_size, self.image_size):
            converted.append(CONVERT_WRONG_SIZE)
        return ValidSample(key=key, image=data, depth=depth, converted=converted)


@dataclass
class Counters:
    """Per-epoch accounting of one rank: what was delivered, skipped and converted, by reason."""

    delivered: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    shard_events: dict[str, int] = field(default_factory=dict)
    """Damaged or unreadable shards by reason (a shard whose samples were all salvaged counts here only)."""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def convert(self, reason: str, count: int = 1) -> None:
        self.converted[reason] = self.converted.get(reason, 0) + count

    def shard_event(self, reason: str, count: int = 1) -> None:
        self.shard_events[reason] = self.shard_events.get(reason, 0) + count

    def merge(self, other: "Counters") -> None:
        self.delivered += other.delivered
        for reason, n in other.skipped.items():
            self.skip(reason, n)
        for reason, n in other.converted.items():
            self.convert(reason, n)
        for reason, n in other.shard_events.items():
            self.shard_event(reason, n)

    def to_dict(self) -> dict:
        return {"delivered": self.delivered, "skipped": dict(self.skipped), "converted": dict(self.converted),
                "shard_events": dict(self.shard_events)}

    @staticmethod
    def from_dict(data: dict) -> "Counters":
        return Counters(int(data.get("delivered", 0)), dict(data.get("skipped", {})), dict(data.get("converted", {})),
                        dict(data.get("shard_events", {})))
