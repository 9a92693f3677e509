"""What `prepare` can read: a folder of images, CelebA with its bounding boxes, synface-layout folders.

Each source yields `SourceSample`s (a decoded image, optional depth, the crop box to apply, metadata) or
`SourceProblem`s (a file it could not use, with the reason), in a deterministic (sorted) order.
Cropping, resizing and encoding are prepare.py's job.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
CELEBA_SPLITS = {"train": "0", "val": "1", "test": "2"}

# Centre-crop presets (SPEC 5): the reference centre-crops cats and synface to 170 px before resizing.
PRESETS: dict[str, dict] = {
    "cats": {"crop": 170},
    "synface": {"crop": 170},
    "celeba": {"image_size": 128},
}


@dataclass
class SourceSample:
    key: str
    """Sample key: letters, digits, '_' and '-' only (made unique by prepare)."""
    image: Image.Image
    """Decoded source image, any mode (converted to 8-bit RGB by prepare)."""
    name: str
    """Source file, relative to the input folder (for logs and metadata)."""
    box: tuple[int, int, int, int] | None = None
    """Crop box (left, top, right, bottom) in source pixels, may extend outside (replicate padding)."""
    depth: Image.Image | None = None
    """Ground-truth depth image (channel 0 used), same size as image."""
    raw: bytes | None = None
    """The source file's bytes (lets prepare detect 16-bit PNGs)."""
    depth_raw: bytes | None = None
    """The depth file's bytes."""
    meta: dict = field(default_factory=dict)


@dataclass
class SourceProblem:
    name: str
    reason: str
    detail: str


def sanitize_key(text: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", text).strip("_") or "sample"
    return key[:80]


DEFAULT_MAX_PIXELS = 4096 * 4096


class TooLarge(ValueError):
    """An image whose header announces more pixels than allowed; it is never decoded."""


def _open_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, bytes]:
    """Read and decode an image, after checking the size in its header (a 445 kB PNG can announce
    12000 x 12000 pixels, 1.7 GB decoded). The file itself is not read beyond what an uncompressed
    image at the limit would take."""
    import io

    size = path.stat().st_size
    if size > max(64 << 20, 4 * max_pixels):
        raise TooLarge(f"{size} bytes on disk, more than an uncompressed image of {max_pixels} pixels")
    raw = path.read_bytes()
    try:
        with warnings.catch_warnings():  # our own check below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as error:
        raise TooLarge(str(error)) from error
    width, height = image.size
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} is {width * height} pixels, more than {max_pixels} (max_image_pixels)")
    image.load()
    return image, raw


def _problem(name: str, error: Exception) -> SourceProblem:
    if isinstance(error, TooLarge):
        return SourceProblem(name, "too_large", str(error))
    text = str(error).lower()
    reason = "truncated_image" if "truncated" in text else "unreadable_image"
    return SourceProblem(name, reason, f"{type(error).__name__}: {error}")


def image_files(root: Path) -> list[Path]:
    """Image files under root (recursive), sorted, hidden files excluded."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)


def folder_source(root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[SourceSample | SourceProblem]:
    """Every image under `root` (a new category: no labels, no boxes)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    for path in image_files(root):
        name = str(path.relative_to(root))
        try:
            image, raw = _open_image(path, max_pixels)
        except Exception as error:  # noqa: BLE001 - an unreadable file is reported, not fatal
            yield _problem(name, error)
            continue
        yield SourceSample(sanitize_key(str(Path(name).with_suffix(""))), image, name, raw=raw)


def read_celeba_boxes(bbox_file: Path, partition_file: Path | None) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """(file name, split code, (x, y, w, h)) rows from either bounding-box layout.

    - the reference's celeba_crop_bbox.txt: `name split x y w h` per line (split 0 train, 1 val, 2 test);
    - CelebA's list_bbox_celeba.txt: a count line, a header line, then `name x y w h`, with the split taken
      from list_eval_partition.txt (`name split`).
    """
    rows = []
    partitions: dict[str, str] = {}
    lines = bbox_file.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or (number <= 2 and not parts[-1].lstrip("-").isdigit()) or (number == 1 and len(parts) == 1):
            continue  # blank, count or header line
        if len(parts) == 6:
            name, split, numbers = parts[0], parts[1], parts[2:]
        elif len(parts) == 5:
            if partition_file is None:
                raise ValueError(f"{bbox_file}: rows without a split need a partition file (list_eval_partition.txt)")
            if not partitions:
                for pline in partition_file.read_text().splitlines():
                    pparts = pline.split()
                    if len(pparts) == 2:
                        partitions[pparts[0]] = pparts[1]
            name, numbers = parts[0], parts[1:]
            split = partitions.get(name, "?")
        else:
            raise ValueError(f"{bbox_file}:{number}: expected 'name [split] x y w h', got {line!r}")
        try:
            x, y, w, h = (int(float(v)) for v in numbers)
        except ValueError:
            raise ValueError(f"{bbox_file}:{number}: bad numbers in {line!r}") from None
        rows.append((name, split, (x, y, w, h)))
    return rows


def celeba_source(root: str | Path, split: str, bbox_file: str | None = None, partition_file: str | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[SourceSample | SourceProblem]:
    """CelebA in-the-wild images cropped to their bounding boxes (SPEC 5; split train/val/test or all)."""
    root = Path(root)
    image_dir = root / "img_celeba" if (root / "img_celeba").is_dir() else root
    if bbox_file is None:
        for candidate in ("celeba_crop_bbox.txt", "list_bbox_celeba.txt"):
            if (root / candidate).is_file():
                bbox_file = str(root / candidate)
                break
        else:
            raise FileNotFoundError(f"{root}: no celeba_crop_bbox.txt or list_bbox_celeba.txt (give bbox_file)")
    partition = Path(partition_file) if partition_file else root / "list_eval_partition.txt"
    rows = read_celeba_boxes(Path(bbox_file), partition if partition.is_file() else None)
    if split != "all" and split not in CELEBA_SPLITS:
        raise ValueError(f"celeba split must be train, val, test or all, got {split!r}")
    for name, code, (x, y, w, h) in rows:
        if split != "all" and code != CELEBA_SPLITS[split]:
            continue
        if w <= 0 or h <= 0:
            yield SourceProblem(name, "bad_bbox", f"box {x},{y},{w},{h}")
            continue
        try:
            image, raw = _open_image(image_dir / name, max_pixels)
        except FileNotFoundError as error:
            yield SourceProblem(name, "missing_file", str(error))
            continue
        except Exception as error:  # noqa: BLE001
            yield _problem(name, error)
            continue
        yield SourceSample(sanitize_key(Path(name).stem), image, name, box=(x, y, x + w, y + h), raw=raw,
                           meta={"bbox": [x, y, w, h]})


def synface_source(root: str | Path, split: str,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[SourceSample | SourceProblem]:
    """Pairs <root>/<split>/image/<name>_image.png + <root>/<split>/depth/<name>_depth.png (SPEC 6)."""
    split_dir = Path(root) / split
    image_dir, depth_dir = split_dir / "image", split_dir / "depth"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: no such folder (synface layout: <root>/<split>/image/<name>_image.png)")
    for path in sorted(image_dir.glob("*_image.*")):
        name = path.name[: path.name.rindex("_image.")]
        rel = f"{split}/image/{path.name}"
        depth_path = next(iter(sorted(depth_dir.glob(f"{glob_escape(name)}_depth.*"))), None) if depth_dir.is_dir() else None
        if depth_path is None:
            yield SourceProblem(rel, "missing_depth", f"no {split}/depth/{name}_depth.png")
            continue
        try:
            image, raw = _open_image(path, max_pixels)
        except Exception as error:  # noqa: BLE001
            yield _problem(rel, error)
            continue
        try:
            depth, depth_raw = _open_image(depth_path, max_pixels)
        except Exception as error:  # noqa: BLE001
            problem = _problem(f"{split}/depth/{depth_path.name}", error)
            problem.reason = "unreadable_depth"
            yield problem
            continue
        if depth.size != image.size:
            yield SourceProblem(rel, "depth_size_mismatch", f"image {image.size}, depth {depth.size}")
            continue
        yield SourceSample(sanitize_key(name), image, rel, depth=depth, raw=raw, depth_raw=depth_raw)


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)
