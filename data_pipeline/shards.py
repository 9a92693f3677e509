"""Shard files: writing tars (with DALI index files) and the manifest that describes a dataset.

A shard is a plain POSIX (ustar) tar of samples, each sample's members adjacent and named
`<key>.<component>` (keys hold no dots), e.g. `000123.jpg`, `000123.depth.png`, `000123.json`. The
bytes are deterministic (mtime 0, uid 0, sorted components), so re-running prepare gives identical
shards and checksums. Next to `shard-000007.tar` lies `shard-000007.idx`, the index DALI's
readers.webdataset needs (format v1.2 of DALI's wds2idx: per sample `ext offset size name` per component).

manifest.json, written last (a destination without one is an unfinished prepare):
  {"format": "unsup3d-shards", "version": 1,
   "dataset": {"category", "split", "source", "image_size", "image_ext", "components", "has_depth",
               "num_samples", "samples_per_shard", "prepare_skipped", "prepare_converted", "created"},
   "shards": [{"name", "index", "samples", "bytes", "sha256"}, ...]}
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline.config import RetryConfig
from data_pipeline.storage import Storage, with_retries

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "unsup3d-shards"
MANIFEST_VERSION = 1
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
_COMPONENT_OK = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")


@dataclass
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    """Tar file name relative to the dataset folder."""
    index: str
    """DALI index file name relative to the dataset folder."""
    samples: int
    """Samples written into it."""
    bytes: int
    """Size of the tar in bytes."""
    sha256: str
    """Hex sha256 of the tar."""


@dataclass
class DatasetInfo:
    """What a prepared dataset holds."""

    category: str
    split: str
    source: dict
    """Source kind and parameters, e.g. {"kind": "celeba", "input": ..., "bbox_file": ...}."""
    image_size: int
    """Side length of the stored (square) images."""
    image_ext: str
    """Component holding the image: jpg or png."""
    components: list
    """Components every sample has, e.g. ["jpg", "json"] or ["depth.png", "json", "png"]."""
    has_depth: bool
    """Samples carry ground-truth depth as "depth.png" (8-bit, x = byte/255, SPEC 6 convention)."""
    num_samples: int = 0
    samples_per_shard: int = 0
    prepare_skipped: dict = field(default_factory=dict)
    """Source images prepare could not use, by reason (each also logged with its file name)."""
    prepare_converted: dict = field(default_factory=dict)
    """Source images prepare converted (grayscale, CMYK, alpha, 16-bit ...), by reason."""
    created: str = ""


@dataclass
class Manifest:
    dataset: DatasetInfo
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                           "dataset": asdict(self.dataset), "shards": [asdict(s) for s in self.shards]},
                          indent=1, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str | bytes, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
            return Manifest(DatasetInfo(**data["dataset"]), [ShardInfo(**s) for s in data["shards"]])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: unreadable manifest: {error}") from None


def load_manifest(storage: Storage, retry: RetryConfig | None = None) -> Manifest:
    """Read and parse the dataset's manifest.json (retrying transient failures)."""
    data = with_retries(lambda: storage.read_bytes(MANIFEST_NAME), f"read {storage.url_of(MANIFEST_NAME)}",
                        retry or RetryConfig())
    return Manifest.from_json(data, storage.url_of(MANIFEST_NAME))


def check_key(key: str) -> str:
    if not _KEY_OK.match(key):
        raise ValueError(f"sample key {key!r}: use only letters, digits, '_' and '-' (no dots)")
    return key


def encode_tar(samples: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, str]:
    """A deterministic ustar tar of `samples` [(key, {component: bytes})] and its DALI index text."""
    buffer = io.BytesIO()
    index_lines = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, components in samples:
            check_key(key)
            entries = []
            for component in sorted(components):
                if not _COMPONENT_OK.match(component):
                    raise ValueError(f"{key}: bad component name {component!r}")
                data = components[component]
                info = tarfile.TarInfo(f"{key}.{component}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                header_offset = buffer.tell()
                tar.addfile(info, io.BytesIO(data))
                # ustar names under 100 bytes take exactly one 512-byte header block.
                entries.append(f"{component} {header_offset + 512} {len(data)} {info.name}")
            index_lines.append(" ".join(entries))
    index = f"v1.2 {len(samples)}\n" + "".join(line + "\n" for line in index_lines)
    return buffer.getvalue(), index


class ShardWriter:
    """Accumulates samples and writes a tar + .idx each `samples_per_shard`, recording ShardInfo."""

    def __init__(self, storage: Storage, samples_per_shard: int, retry: RetryConfig | None = None,
                 prefix: str = "shard"):
        self.storage = storage
        self.samples_per_shard = samples_per_shard
        self.retry = retry or RetryConfig()
        self.prefix = prefix
        self.pending: list[tuple[str, dict[str, bytes]]] = []
        self.shards: list[ShardInfo] = []
        self.keys: set[str] = set()

    def add(self, key: str, components: dict[str, bytes]) -> None:
        check_key(key)
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self.keys.add(key)
        self.pending.append((key, components))
        if len(self.pending) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        number = len(self.shards)
        name, index_name = f"{self.prefix}-{number:06d}.tar", f"{self.prefix}-{number:06d}.idx"
        data, index = encode_tar(self.pending)
        with_retries(lambda: self.storage.write_bytes(name, data), f"write {self.storage.url_of(name)}", self.retry)
        with_retries(lambda: self.storage.write_bytes(index_name, index.encode()),
                     f"write {self.storage.url_of(index_name)}", self.retry)
        self.shards.append(ShardInfo(name=name, index=index_name, samples=len(self.pending), bytes=len(data),
                                     sha256=hashlib.sha256(data).hexdigest()))
        self.pending = []

    def finish(self, dataset: DatasetInfo) -> Manifest:
        """Write the remainder and then manifest.json; returns the manifest."""
        self.flush()
        dataset.num_samples = sum(s.samples for s in self.shards)
        dataset.samples_per_shard = self.samples_per_shard
        dataset.created = dataset.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = Manifest(dataset, list(self.shards))
        text = manifest.to_json().encode()
        with_retries(lambda: self.storage.write_bytes(MANIFEST_NAME, text),
                     f"write {self.storage.url_of(MANIFEST_NAME)}", self.retry)
        return manifest


def write_manifest(storage: Storage, manifest: Manifest, retry: RetryConfig | None = None) -> None:
    """(Re)write a manifest, e.g. after repairing shards by hand."""
    text = manifest.to_json().encode()
    with_retries(lambda: storage.write_bytes(MANIFEST_NAME, text), f"write {storage.url_of(MANIFEST_NAME)}",
                 retry or RetryConfig())


def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    return json.loads(manifest.to_json())
