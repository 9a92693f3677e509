"""Reading and writing folders in the synface layout of SPEC 6 (images paired with ground-truth depth).

Layout: ``<root>/<split>/image/<name>_image.png`` paired with ``<root>/<split>/depth/<name>_depth.png``.
Other files are ignored, and so are hidden files (``.*``, e.g. macOS ``._x_image.png`` companions).

Depth encoding: x = channel 0 / 255 (a 16-bit PNG: / 65535), d = 1 + 0.1 ((1 - x) 2 - 1), so white is
0.9 (near), black 1.1 (far) and the background is exactly 0 (1.1). Depth PNGs may be single channel
('L', 'I;16') or RGB(A); images RGB, RGBA (alpha dropped), grayscale, palette or 16-bit, all read as
8-bit RGB.

Images of another size are resized to image_size x image_size (not cropped; a non-square image is
stretched): bilinear for the image, nearest for the depth, because interpolating depth would blend
the far background into the face's silhouette and invent depths nobody measured.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIX = "_image.png"
DEPTH_SUFFIX = "_depth.png"
NEAR_DEPTH, FAR_DEPTH = 0.9, 1.1

# What PIL raises for unreadable, truncated or corrupt files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


class SynfaceError(RuntimeError):
    """A synface folder or file cannot be used; the message names the path."""


class ImageSizeError(SynfaceError):
    """An image refused for its size, read from its header before decoding; `reason` is too_large or too_small."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


DEFAULT_MAX_PIXELS = 4096 * 4096
"""Images with more pixels are refused before decoding (a 12000 x 12000 PNG of 445 kB decodes to 1.7 GB)."""


def default_min_size(image_size: int) -> int:
    """The smallest side accepted by default: half the resolution the image is resized to (at most 2x upscaling)."""
    return max(1, image_size // 2)


def size_problem(size: tuple[int, int], max_pixels: int, min_size: int) -> tuple[str, str] | None:
    """(reason, detail) when an image of `size` (width, height) is outside the limits, else None."""
    width, height = size
    if width * height > max_pixels:
        return "too_large", f"{width}x{height} is {width * height} pixels, more than {max_pixels} (max_image_pixels)"
    if min(width, height) < min_size:
        return "too_small", f"{width}x{height} is smaller than {min_size} px (min_image_size): not upscaled"
    return None


def open_image_quietly(path) -> Image.Image:
    """Image.open (header only) without PIL's decompression-bomb warning, which our own size check replaces;
    an image past PIL's hard limit (2 x MAX_IMAGE_PIXELS) is ImageSizeError too_large, like ours."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageSizeError("too_large", f"{path}: {err}") from err


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None when it cannot be read."""
    try:
        with open_image_quietly(path) as img:
            return img.size
    except ImageSizeError:
        raise
    except _DECODE_ERRORS:
        return None


# ---------------------------------------------------------------------------------------------
# Depth encoding


def encode_depth_png(depth) -> np.ndarray:
    """Depth [H, W] -> uint8 RGB [H, W, 3] (the same byte in all channels); values clamp to [0.9, 1.1]."""
    d = torch.as_tensor(depth, dtype=torch.float64).numpy()
    if d.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {d.shape}")
    # Inverse of d = 1 + 0.1 ((1 - x) 2 - 1):  x = (1 - (d - 1) / 0.1) / 2.
    x = (1.0 - (d - 1.0) / 0.1) / 2.0
    byte = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(byte[..., None], 3, axis=-1)


def decode_depth_png(array, max_value: float = 255.0) -> np.ndarray:
    """Depth [H, W] float32 from an encoded depth image [H, W] or [H, W, C] (channel 0 is used).

    max_value is the integer range of the array: 255 for 8-bit PNGs, 65535 for 16-bit ones.
    """
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"depth image must be [H, W] or [H, W, C], got shape {a.shape}")
    x = a.astype(np.float64) / max_value
    return (1.0 + 0.1 * ((1.0 - x) * 2.0 - 1.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# PNG reading


def _is_16_bit(img: Image.Image) -> bool:
    return img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _read_png(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> Image.Image:
    """Open, check the size in the header, then fully decode (so truncation shows here, not later);
    raises ImageSizeError or SynfaceError naming the file."""
    try:
        with open_image_quietly(path) as img:
            problem = size_problem(img.size, max_pixels, min_size)
            if problem is not None:
                raise ImageSizeError(problem[0], f"{path}: {problem[1]}")
            img.load()
            return img.copy()
    except ImageSizeError:
        raise
    except _DECODE_ERRORS as err:
        raise SynfaceError(f"unreadable PNG {path}: {err}") from err


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB. 16-bit grayscale is scaled (PIL's own convert would clip it at 255)."""
    if _is_16_bit(img):
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_image(path: Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> torch.Tensor:
    """An image PNG as float32 [3, S, S] in [-1, 1]; refused (ImageSizeError) above max_pixels or with a side
    below min_size (default: half of image_size)."""
    img = _to_rgb8(_read_png(path, max_pixels, default_min_size(image_size) if min_size is None else min_size))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return (a.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


def load_depth(path: Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A depth PNG as float32 [S, S]; channel 0 of 8- or 16-bit PNGs, resized nearest."""
    img = _read_png(path, max_pixels)
    if _is_16_bit(img):
        a, max_value = np.asarray(img).astype(np.float64), 65535.0
    else:
        if img.mode not in ("L", "RGB", "RGBA", "LA"):
            img = img.convert("RGB")  # palette, 1-bit, CMYK, ...: channel 0 of the RGB rendering
        a, max_value = np.asarray(img), 255.0
    if a.ndim == 3:
        a = a[..., 0]
    if a.shape != (image_size, image_size):
        # Nearest in the integer domain keeps background pixels exactly background.
        a = np.asarray(Image.fromarray(a.astype(np.float32)).resize((image_size, image_size), Image.NEAREST))
    return torch.from_numpy(decode_depth_png(a, max_value=max_value))


# ---------------------------------------------------------------------------------------------
# Writing


def write_sample(root, split: str, name: str, image_uint8, depth) -> tuple[Path, Path]:
    """Write <root>/<split>/image/<name>_image.png (RGB) and <root>/<split>/depth/<name>_depth.png.

    image_uint8 [H, W, 3] uint8; depth [H, W] (background: any value >= 1.1, stored as byte 0).
    Returns the two paths.
    """
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    split_dir = Path(root) / split
    image_path = split_dir / "image" / f"{name}{IMAGE_SUFFIX}"
    depth_path = split_dir / "depth" / f"{name}{DEPTH_SUFFIX}"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    depth_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    Image.fromarray(encode_depth_png(depth)).save(depth_path)
    return image_path, depth_path


# ---------------------------------------------------------------------------------------------
# Reading a folder


def _list_names(folder: Path, suffix: str) -> dict[str, Path]:
    """{name: path} of the visible files named <name><suffix> in folder."""
    if not folder.is_dir():
        raise SynfaceError(f"synface folder not found: {folder}")
    return {
        p.name[: -len(suffix)]: p
        for p in folder.iterdir()
        if p.name.endswith(suffix) and not p.name.startswith(".") and len(p.name) > len(suffix) and p.is_file()
    }


class SynfaceFolder:
    """The image/depth pairs of one split, sorted by name.

    on_error="raise": a missing partner is an error at construction, a corrupt PNG when it is read;
    both name the file. on_error="skip": such pairs are dropped at construction, each logged with its
    path and counted in self.skipped ({reason: count}); to find corrupt files this decodes every pair
    once, which costs about a second per 10k pairs at 64 px.
    load_depth=False reads images only (no depth folder needed; items then have no "depth").

    Sizes are read from each file's header before anything is decoded: an image of more than
    max_pixels pixels (too_large), one whose shorter side is below min_size (too_small; default half
    of image_size, so nothing is upscaled more than 2x) and a depth map whose size differs from its
    image's (depth_size_mismatch) are refused like a missing partner. `upscaled` counts the images
    accepted below image_size.
    """

    def __init__(self, root, split: str, image_size: int = 64, on_error: str = "raise", load_depth: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
        self.root, self.split = Path(root), split
        self.image_size, self.on_error, self.load_depth = int(image_size), on_error, load_depth
        self.max_pixels = int(max_pixels)
        self.min_size = default_min_size(self.image_size) if min_size is None else int(min_size)
        self.skipped: Counter = Counter()
        self.upscaled = 0
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise SynfaceError(f"synface split folder not found: {split_dir}")
        self.pairs = [pair for pair in self._pair(split_dir) if self._sizes_fit(pair)]
        if on_error == "skip":
            self.pairs = [pair for pair in self.pairs if self._readable(pair)]
        if self.upscaled:
            logger.warning("synface: %d images of %s are smaller than %d px and are upscaled", self.upscaled,
                           split_dir / "image", self.image_size)

    def _sizes_fit(self, pair) -> bool:
        """Header checks (no decoding): the limits, and a depth map of its image's size."""
        name, image_path, depth_path = pair
        try:
            size = header_size(image_path)
            depth_size = header_size(depth_path) if depth_path is not None else None
        except ImageSizeError as err:
            self._bad(err.reason, str(err))
            return False
        if size is None:
            return True  # unreadable: reported as such when it is read
        problem = size_problem(size, self.max_pixels, self.min_size)
        if problem is not None:
            self._bad(problem[0], f"{image_path}: {problem[1]}")
            return False
        if depth_path is not None:
            if depth_size is not None and depth_size != size:
                self._bad("depth_size_mismatch", f"{depth_path} is {depth_size[0]}x{depth_size[1]}, its image "
                          f"{image_path.name} {size[0]}x{size[1]}")
                return False
        if min(size) < self.image_size:
            self.upscaled += 1
        return True

    def _pair(self, split_dir: Path) -> list[tuple[str, Path, Path | None]]:
        images = _list_names(split_dir / "image", IMAGE_SUFFIX)
        if not self.load_depth:
            return [(name, images[name], None) for name in sorted(images)]
        depths = _list_names(split_dir / "depth", DEPTH_SUFFIX)
        pairs = []
        for name in sorted(images.keys() | depths.keys()):
            if name not in depths:
                self._bad("missing_depth", f"image without depth: {images[name]} (expected {split_dir / 'depth' / (name + DEPTH_SUFFIX)})")
            elif name not in images:
                self._bad("missing_image", f"depth without image: {depths[name]} (expected {split_dir / 'image' / (name + IMAGE_SUFFIX)})")
            else:
                pairs.append((name, images[name], depths[name]))
        return pairs

    def _bad(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise SynfaceError(message)
        self.skipped[reason] += 1
        logger.warning("synface: skipping %s", message)

    def _readable(self, pair) -> bool:
        name, image_path, depth_path = pair
        for reason, path, loader in (
            ("unreadable_image", image_path, self._load_image),
            ("unreadable_depth", depth_path, self._load_depth),
        ):
            if path is None:
                continue
            try:
                loader(path)
            except ImageSizeError as err:
                self._bad(err.reason, str(err))
                return False
            except SynfaceError as err:
                self._bad(reason, str(err))
                return False
        return True

    def _load_image(self, path: Path) -> torch.Tensor:
        return load_image(path, self.image_size, self.max_pixels, self.min_size)

    def _load_depth(self, path: Path) -> torch.Tensor:
        return load_depth(path, self.image_size, self.max_pixels)

    def __len__(self) -> int:
        return len(self.pairs)

    def select(self, indices) -> None:
        """Keep only the pairs at these indices, in this order (e.g. evaluate.fixed_subset)."""
        self.pairs = [self.pairs[i] for i in indices]

    def __getitem__(self, i: int) -> dict:
        name, image_path, depth_path = self.pairs[i]
        item = {"name": name, "image": self._load_image(image_path)}
        if depth_path is not None:
            item["depth"] = self._load_depth(depth_path)
        return item

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict]:
        """Batches in name order: dict(name=list, image=[B, 3, S, S], depth=[B, S, S]); the last may be short."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            items = [self[i] for i in range(start, min(start + batch_size, len(self)))]
            if drop_last and len(items) < batch_size:
                return
            batch = {"name": [it["name"] for it in items], "image": torch.stack([it["image"] for it in items])}
            if self.load_depth:
                batch["depth"] = torch.stack([it["depth"] for it in items])
            yield batch
