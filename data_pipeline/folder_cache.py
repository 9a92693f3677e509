"""A local folder of images, prepared once into shards in a cache and reused while the folder is unchanged.

This is how a run that trains from `data.root` reaches the same streaming loader (stream.py, loader.py) as a
cluster run that trains from `unsup3d prepare`d shards: one data path, whatever the source.

    entry = prepared_folder(FolderCacheConfig(root="data/faces", split="train", image_size=64))
    loader = TrainLoader(LoaderConfig(shards=entry.path, batch_size=32, image_size=64))

What is read: `<root>/<split>/image/<name>_image.png` with `<split>/depth/<name>_depth.png` (the synface
layout, with depth) when `<root>/<split>/image` is a folder; otherwise plain images (any format `prepare`
reads), those under `<root>/<split>` when that folder exists, else those under `<root>`. Plain images are
centre-cropped to their largest square, as `unsup3d prepare --source folder` does.

Where: `<root>/.unsup3d-shards/<split>-<fingerprint>/` (hidden, so no reader of the folder sees it), or, when
`<root>` is not writable, `$UNSUP3D_SHARD_CACHE` (default `~/.cache/unsup3d/shards`) `/<hash of root's
absolute path>/<split>-<fingerprint>/`. Setting `UNSUP3D_SHARD_CACHE` puts every cache there.

Fingerprint: sha256 over this cache's format version, the prepare settings (source, image size, limits,
samples per shard) and the path, size and modification time of every file the source reads. An entry is
reused when its manifest parses, records the same fingerprint and every shard is on disk at its recorded
size (the loader checks each shard's sha256 as it reads it). Otherwise it is built: `prepare` writes into a
temporary folder beside the entry, which is then renamed into place in one step, so a reader never sees half
an entry and two runs preparing at once both end up with one complete copy (the first rename wins, the
other run drops its own). Entries of the same split with another fingerprint are then removed, and the log
says what changed (files added, removed, modified).

Files `prepare` cannot use are skipped, logged with their names and counted (the manifest's prepare_skipped);
their names are kept in the entry (skipped.json) and logged again whenever the entry is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from data_pipeline.config import PrepareConfig
from data_pipeline.shards import MANIFEST_NAME, Manifest
from data_pipeline.sources import DEFAULT_MAX_PIXELS, image_files

log = logging.getLogger(__name__)

CACHE_FOLDER = ".unsup3d-shards"
CACHE_ENV = "UNSUP3D_SHARD_CACHE"
CACHE_VERSION = 1  # part of the fingerprint: a change in how entries are made invalidates old ones
FILES_NAME = "files.json"
SKIPPED_NAME = "skipped.json"
TARGET_SHARDS = 8
_STALE_TEMP_S = 24 * 3600  # temporary folders of prepares killed midway are removed after a day


@dataclass
class FolderCacheConfig:
    """Which folder to prepare, and how (the fingerprint covers every field)."""

    root: str
    """The data folder (data.root)."""
    split: str = "train"
    """The split: <root>/<split>/image for the synface layout, <root>/<split> (if present) for plain images."""
    image_size: int = 64
    """Stored side length: images are resized to the training size once, here, not at every epoch."""
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels (read from the header, before decoding) are skipped: too_large."""
    min_image_size: int | None = None
    """Images whose crop is smaller are skipped (too_small) rather than upscaled; None: half of image_size."""
    samples_per_shard: int | None = None
    """Samples per shard; None: at most 256, and fewer for small folders, so that they still make about
    TARGET_SHARDS shards (a rank without a shard would get no data; shards are the unit ranks share)."""


@dataclass
class FolderShards:
    """A ready cache entry."""

    path: str
    """The shard folder (holds manifest.json): LoaderConfig.shards."""
    manifest: Manifest
    reused: bool
    """True when an existing entry was used, False when it was (re)built now."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Source files prepare left out: name -> "reason: detail"."""


@dataclass
class _Source:
    kind: str  # "synface" or "folder"
    input: Path
    files: dict[str, list[int]]  # path relative to root -> [size, mtime_ns]
    images: int  # how many of them are images (the samples, unless some are skipped)


def _stat_files(root: Path, paths: list[Path]) -> dict[str, list[int]]:
    files = {}
    for path in paths:
        info = path.stat()
        files[str(path.relative_to(root))] = [info.st_size, info.st_mtime_ns]
    return files


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _find_source(config: FolderCacheConfig) -> _Source:
    root = Path(config.root)
    split_dir = root / config.split
    if (split_dir / "image").is_dir():
        paths = _visible_files(split_dir / "image") + _visible_files(split_dir / "depth")
        return _Source("synface", root, _stat_files(root, paths), len(_visible_files(split_dir / "image")))
    folder = split_dir if split_dir.is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (data.root)")
    paths = image_files(folder)
    if not paths:
        raise FileNotFoundError(f"{root}: neither {config.split}/image/*_image.png (the synface layout) nor images "
                                f"under {folder} (data.root, data.split)")
    return _Source("folder", folder, _stat_files(root, paths), len(paths))


def holds_training_images(root: str | Path, split: str) -> bool:
    """Whether prepared_folder would find something to read in `root` (without reading it)."""
    from data_pipeline.sources import IMAGE_SUFFIXES

    root = Path(root)
    if (root / split / "image").is_dir():
        return True
    folder = root / split if (root / split).is_dir() else root
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES and not any(
        part.startswith(".") for part in p.relative_to(folder).parts) for p in folder.rglob("*"))


def fingerprint(config: FolderCacheConfig, source: _Source) -> str:
    """sha256 (hex, 16 digits) of everything an entry depends on (see the module docstring)."""
    settings = {"version": CACHE_VERSION, "source": source.kind, "input": str(source.input.relative_to(config.root))
                if source.input != Path(config.root) else ".", **asdict(config)}
    settings.pop("root")  # a moved folder with the same files keeps its cache
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, (size, mtime) in sorted(source.files.items()):
        digest.update(f"\n{name}\t{size}\t{mtime}".encode())
    return digest.hexdigest()[:16]


def cache_base(root: str | Path) -> Path:
    """The folder holding the cache entries of `root` (see the module docstring)."""
    root = Path(root)
    override = os.environ.get(CACHE_ENV)
    if not override:
        if os.access(root, os.W_OK):
            return root / CACHE_FOLDER
        override = str(Path.home() / ".cache" / "unsup3d" / "shards")
    return Path(override) / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _usable(entry: Path, fp: str) -> Manifest | None:
    """The entry's manifest when the entry is complete and made from the same fingerprint, else None."""
    try:
        manifest = Manifest.from_json((entry / MANIFEST_NAME).read_bytes(), str(entry / MANIFEST_NAME))
    except (OSError, ValueError):
        return None
    if manifest.dataset.source.get("fingerprint") != fp:
        return None
    for shard in manifest.shards:
        path = entry / shard.name
        if not path.is_file() or path.stat().st_size != shard.bytes or not (entry / shard.index).is_file():
            return None
    return manifest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _what_changed(old: dict, new: dict) -> str:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    modified = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    parts = []
    for label, names in (("added", added), ("removed", removed), ("modified", modified)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} {label} ({shown})")
    return "; ".join(parts) or "the prepare settings changed"


def _log_skipped(config: FolderCacheConfig, skipped: dict[str, str], entry: Path) -> None:
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for text in skipped.values():
        reason = text.split(":", 1)[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    names = sorted(skipped)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    log.warning("%s/%s: %d files skipped (%s): %s; every name and reason: %s", config.root, config.split,
                len(skipped), ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())), shown, entry / SKIPPED_NAME)


def _mtime(path: Path) -> float | None:
    """A folder's modification time, or None when another run removed it meanwhile."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _remove_other_entries(base: Path, split: str, keep: Path) -> None:
    now = time.time()
    for path in base.iterdir():
        if path == keep:
            continue
        mtime = _mtime(path)  # other runs may be removing their temporary folders right now
        stale_temp = path.name.startswith(".tmp-") and mtime is not None and now - mtime > _STALE_TEMP_S
        other_entry = path.name.startswith(f"{split}-") and len(path.name) == len(keep.name)
        if stale_temp or other_entry:
            shutil.rmtree(path, ignore_errors=True)


def prepared_folder(config: FolderCacheConfig) -> FolderShards:
    """The cache entry of `config`: reused when the folder is unchanged, else built now (see the module docstring)."""
    from data_pipeline.prepare import prepare_dataset

    source = _find_source(config)
    if config.samples_per_shard is None:
        config = replace(config, samples_per_shard=max(1, min(256, -(-source.images // TARGET_SHARDS))))
    fp = fingerprint(config, source)
    base = cache_base(config.root)
    entry = base / f"{config.split}-{fp}"
    manifest = _usable(entry, fp)
    if manifest is not None:
        skipped = _read_json(entry / SKIPPED_NAME)
        log.info("%s/%s: unchanged since its shards were prepared; streaming %d samples from %s", config.root,
                 config.split, manifest.num_samples, entry)
        _log_skipped(config, skipped, entry)
        return FolderShards(str(entry), manifest, True, skipped)

    base.mkdir(parents=True, exist_ok=True)
    previous = sorted((p for p in base.glob(f"{config.split}-*") if p != entry and _mtime(p) is not None),
                      key=lambda p: _mtime(p) or 0.0)
    if previous:
        why = f"the folder changed since its shards were prepared: {_what_changed(_read_json(previous[-1] / FILES_NAME), source.files)}"
    else:
        why = "first use of this folder"
    log.info("%s/%s: preparing %d files into shards at %s (%s)", config.root, config.split, len(source.files), entry, why)
    temp = base / f".tmp-{config.split}-{fp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    try:
        prepare = PrepareConfig(source=source.kind, input=str(source.input), output=str(temp), category=config.split,
                                split=config.split, samples_per_shard=config.samples_per_shard,
                                image_size=config.image_size, max_image_pixels=config.max_image_pixels,
                                min_image_size=config.min_image_size)
        record = {"kind": f"{source.kind} folder (local cache)", "input": str(Path(config.root).resolve()),
                  "fingerprint": fp, "files": len(source.files)}
        manifest = prepare_dataset(prepare, source_record=record,
                                   on_skip=lambda name, reason, detail: skipped.__setitem__(name, f"{reason}: {detail}"))
        (temp / FILES_NAME).write_text(json.dumps(source.files, sort_keys=True))
        (temp / SKIPPED_NAME).write_text(json.dumps(skipped, indent=1, sort_keys=True))
        if entry.exists() and _usable(entry, fp) is None:
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry (e.g. files deleted by hand)
        try:
            os.rename(temp, entry)  # atomic: the entry appears complete or not at all
        except OSError:
            if _usable(entry, fp) is None:
                raise
            log.info("%s/%s: another run prepared the same shards first; using its copy", config.root, config.split)
            shutil.rmtree(temp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _remove_other_entries(base, config.split, entry)
    manifest = _usable(entry, fp) or manifest
    log.info("%s/%s: %d samples in %d shards, prepared in %.1f s", config.root, config.split, manifest.num_samples,
             len(manifest.shards), time.perf_counter() - started)
    _log_skipped(config, skipped, entry)
    return FolderShards(str(entry), manifest, False, skipped)
