"""Streaming shards for one rank: shard assignment, per-epoch shuffles, reader workers, positions.

Order, for epoch e (the same on every rank, from the seed alone):
  1. all shards are permuted with rng(seed, e)                       -> order
  2. rank r of world size N takes order[r::N]                        -> this rank's shards, cursor 0, 1, ...
  3. reader worker w of n fetches and checks cursors w, w+n, w+2n, ...  (threads; fetching is I/O)
  4. the samples of shard s are permuted with rng(seed, e, s); the stream yields shard after shard in
     cursor order, so what the trainer sees does not depend on n or on thread timing.
A position is (epoch, cursor, offset): offset counts the items of the cursor's shard already consumed
(delivered or skipped) in that shard's permuted order. Resuming re-reads the shard and drops `offset`
items, so a resumed run sees exactly what an uninterrupted one would have.

Every shard ends with a ShardEnd item carrying the samples the manifest promised but the tar did not
hold (missing shard, truncated or corrupt tar ...), by reason; it sits after the shard's last sample so a
resume inside the shard counts them once.

Shards are read whole (one GET) and parsed from memory with webdataset's tar iterators.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import tarfile
import threading
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipeline.config import LoaderConfig
from data_pipeline.shards import Manifest, ShardInfo
from data_pipeline.storage import RetryStats, Storage, with_retries
from data_pipeline import validate as V

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a rank's stream stands: next item is item `offset` of shard `cursor` of `epoch`."""

    epoch: int = 0
    cursor: int = 0
    offset: int = 0


def epoch_shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """All shard indices in epoch `epoch`'s order (identical on every rank)."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 1]).permutation(num_shards).tolist()


def rank_shards(num_shards: int, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int) -> list[int]:
    """Shard indices of one rank for one epoch: every shard goes to exactly one rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return epoch_shard_order(num_shards, epoch, seed, shuffle)[rank::world_size]


def worker_cursors(num_cursors: int, worker: int, num_workers: int, start: int = 0) -> list[int]:
    """Cursors (positions in the rank's shard list) that reader worker `worker` fetches, from `start` on."""
    first = start + ((worker - start) % num_workers)
    return list(range(first, num_cursors, num_workers))


def sample_permutation(count: int, seed: int, epoch: int, shard_index: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(count))
    return np.random.default_rng([seed, epoch, 2, shard_index]).permutation(count).tolist()


# Items of a rank's stream --------------------------------------------------------------------------


@dataclass
class Delivered:
    sample: V.ValidSample
    shard: str
    cursor: int
    offset_after: int


@dataclass
class Skipped:
    reason: str
    key: str
    shard: str
    detail: str
    cursor: int
    offset_after: int


@dataclass
class ShardEnd:
    """The end of one shard: samples lost at shard level (by reason) and shard-level events."""

    shard: str
    cursor: int
    expected: int
    """The manifest's sample count for this shard."""
    lost: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    """Damage seen, by reason (also when nothing was lost, e.g. a truncated tar fully salvaged)."""
    detail: str = ""
    """What was wrong and which keys were lost (from the shard's index file)."""


# Checking and parsing one shard --------------------------------------------------------------------


@dataclass
class TarScan:
    """Result of walking a tar's header chain (catches what tarfile's stream reader passes over silently)."""

    status: str
    """clean, empty, truncated or corrupt."""
    members: int
    end: int
    detail: str = ""


def scan_tar(data: bytes) -> TarScan:
    """Walk the 512-byte header chain: is it complete, and where does it break?

    webdataset (through tarfile's stream mode) stops without an error at a corrupt header (DEPENDENCIES);
    this walk tells that apart from a clean end.
    """
    size, offset, members = len(data), 0, 0
    if size == 0:
        return TarScan("empty", 0, 0, "0 bytes")
    while True:
        if offset + 512 > size:
            return TarScan("truncated", members, offset, f"archive ends at byte {size} inside a header "
                                                         "or before the end-of-archive marker")
        block = data[offset:offset + 512]
        if block.count(0) == 512:
            rest = data[offset:]
            if rest.count(0) != len(rest):
                return TarScan("corrupt", members, offset, f"data after the end-of-archive marker at byte {offset}")
            return TarScan("clean" if members else "empty", members, offset)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            return TarScan("corrupt", members, offset, f"bad header at byte {offset}: {error}")
        if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            members += 1
        offset += 512 + (info.size + 511) // 512 * 512
        if offset > size:
            return TarScan("truncated", members, offset, f"member {info.name!r} runs past the end at byte {size}")


def parse_samples(data: bytes, url: str) -> tuple[list[dict], list[str]]:
    """Samples of an in-memory tar, grouped by key with webdataset; errors are collected, not raised."""
    errors: list[str] = []

    def handler(error: Exception) -> bool:
        errors.append(f"{type(error).__name__}: {error}")
        return True

    def files():
        # An error escaping tarfile (e.g. at a truncation) must end the file stream cleanly, so that
        # group_by_keys still yields the sample it was assembling.
        try:
            for item in tar_file_iterator(io.BytesIO(data), handler=handler):
                item["__url__"] = url
                yield item
        except Exception as error:  # noqa: BLE001
            errors.append(f"{type(error).__name__}: {error}")

    samples: list[dict] = []
    try:
        for sample in group_by_keys(files(), handler=handler):
            samples.append(sample)
    except Exception as error:  # noqa: BLE001 - tarfile raises several types on damaged archives
        errors.append(f"{type(error).__name__}: {error}")
    return samples, errors


@dataclass
class LoadedShard:
    """A shard ready to stream: its (permuted) raw samples, validated from `start` on."""

    items: list  # ValidSample | Rejected, in permuted order; None before `start`
    end: ShardEnd


class ShardReader:
    """Fetches, checks, parses and validates shards for one rank (used from several worker threads)."""

    def __init__(self, manifest: Manifest, storage: Storage, config: LoaderConfig, validator: V.SampleValidator,
                 retry_stats: RetryStats):
        self.manifest = manifest
        self.storage = storage
        self.config = config
        self.validator = validator
        self.retry_stats = retry_stats
        # config.keep_in_memory: shard index -> (checked items in tar order, its ShardEnd), after a first read.
        self._kept: dict[int, tuple[list, ShardEnd]] = {}

    def _lost_keys(self, info: ShardInfo, present: set[str], should_stop) -> str:
        """Names of the samples the shard's index lists but the tar did not yield (best effort, for logs)."""
        try:
            text = with_retries(lambda: self.storage.read_bytes(info.index), f"read {self.storage.url_of(info.index)}",
                                replace(self.config.retry, max_attempts=min(3, self.config.retry.max_attempts)),
                                None, should_stop).decode()
            keys = [line.split()[3].split(".", 1)[0] for line in text.splitlines()[1:] if len(line.split()) >= 4]
        except InterruptedError:
            raise
        except Exception as error:  # noqa: BLE001 - the index is only used to name the keys
            return f"keys unknown (index unreadable: {type(error).__name__})"
        lost = [k for k in keys if k not in present]
        shown = ", ".join(lost[:20]) + (f" (+{len(lost) - 20} more)" if len(lost) > 20 else "")
        return f"keys: {shown}" if lost else "keys: none listed in the index"

    def _whole_shard_lost(self, info: ShardInfo, cursor: int, reason: str, detail: str, should_stop) -> LoadedShard:
        keys = self._lost_keys(info, set(), should_stop) if info.samples else ""
        log.warning("shard %s skipped whole (%d samples): %s: %s", self.storage.url_of(info.name), info.samples,
                    reason, detail)
        return LoadedShard([], ShardEnd(info.name, cursor, info.samples, lost={reason: info.samples} if info.samples else {},
                                        events={reason: 1}, detail=f"{detail}; {keys}"))

    def load(self, shard_index: int, cursor: int, epoch: int, start: int, should_stop) -> LoadedShard:
        kept = self._kept.get(shard_index)
        if kept is not None:  # the same items and damage as the first read, in this epoch's order
            checked, end = kept
            order = sample_permutation(len(checked), self.config.seed, epoch, shard_index, self.config.shuffle)
            return LoadedShard([checked[j] for j in order], replace(end, cursor=cursor, lost=dict(end.lost),
                                                                    events=dict(end.events)))
        return self._read(shard_index, cursor, epoch, 0 if self.config.keep_in_memory else start, should_stop)

    def _read(self, shard_index: int, cursor: int, epoch: int, start: int, should_stop) -> LoadedShard:
        info = self.manifest.shards[shard_index]
        url = self.storage.url_of(info.name)
        try:
            data = with_retries(lambda: self.storage.read_bytes(info.name), f"read {url}", self.config.retry,
                                self.retry_stats, should_stop)
        except InterruptedError:
            raise
        except FileNotFoundError as error:
            return self._whole_shard_lost(info, cursor, V.SKIP_MISSING_SHARD, str(error), should_stop)
        except Exception as error:  # noqa: BLE001 - transient errors that outlasted every retry
            return self._whole_shard_lost(info, cursor, V.SKIP_FETCH_FAILED, f"{type(error).__name__}: {error}",
                                          should_stop)

        scan = scan_tar(data)
        damage, detail = None, scan.detail
        if len(data) == 0:
            damage, detail = V.SKIP_EMPTY_SHARD, "0 bytes"
        elif len(data) < info.bytes or scan.status == "truncated":
            damage = V.SKIP_TRUNCATED_TAR
            detail = detail or f"{len(data)} bytes, manifest says {info.bytes}"
        elif scan.status == "corrupt":
            damage = V.SKIP_CORRUPT_TAR
        elif scan.status == "empty":
            damage = V.SKIP_EMPTY_SHARD
        elif self.config.verify_checksums and hashlib.sha256(data).hexdigest() != info.sha256:
            damage = V.SKIP_CHECKSUM_MISMATCH
            detail = "sha256 differs from the manifest's"
        # An intact tar with other bytes than the manifest's cannot tell which sample changed: skip it whole.
        if damage in (V.SKIP_CHECKSUM_MISMATCH, V.SKIP_EMPTY_SHARD) or (
                damage is not None and self.config.on_damaged_shard == "skip"):
            return self._whole_shard_lost(info, cursor, damage, detail, should_stop)

        samples, errors = parse_samples(data, url)
        if errors:
            log.warning("shard %s: tar reader reported %d problem(s), first: %s", url, len(errors), errors[0])
        end = ShardEnd(info.name, cursor, info.samples)
        if damage is not None:
            lost = max(0, info.samples - len(samples))
            end.events[damage] = 1
            if lost:
                end.lost[damage] = lost
                end.detail = f"{detail}; {self._lost_keys(info, {str(s.get('__key__')) for s in samples}, should_stop)}"
            log.warning("shard %s damaged (%s: %s): salvaged %d of %d samples", url, damage, detail, len(samples),
                        info.samples)
        order = sample_permutation(len(samples), self.config.seed, epoch, shard_index, self.config.shuffle)
        items: list = [None] * len(samples)
        for i in range(start, len(samples)):
            if should_stop():
                raise InterruptedError("stopped")
            items[i] = self.validator.check(samples[order[i]])
        if self.config.keep_in_memory:  # start is 0 then: every item is checked
            checked: list = [None] * len(samples)
            for i, j in enumerate(order):
                checked[j] = items[i]
            self._kept[shard_index] = (checked, replace(end, lost=dict(end.lost), events=dict(end.events)))
        return LoadedShard(items, end)


# The ordered stream ---------------------------------------------------------------------------------

_DONE = object()


class RankStream:
    """Items of one rank from a position to the end of that epoch, read ahead by worker threads."""

    def __init__(self, manifest: Manifest, storage: Storage, config: LoaderConfig, rank: int, world_size: int,
                 validator: V.SampleValidator, retry_stats: RetryStats | None = None):
        self.manifest = manifest
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.reader = ShardReader(manifest, storage, config, validator, retry_stats or RetryStats())

    def shards_for_epoch(self, epoch: int) -> list[int]:
        return rank_shards(len(self.manifest.shards), epoch, self.config.seed, self.config.shuffle, self.rank,
                           self.world_size)

    def expected_samples(self, epoch: int) -> int:
        """Samples of this rank's shards in `epoch`, per the manifest."""
        return sum(self.manifest.shards[i].samples for i in self.shards_for_epoch(epoch))

    def items(self, position: Position, stop: threading.Event) -> Iterator[Delivered | Skipped | ShardEnd]:
        """Yield the items from `position` to the end of its epoch. Setting `stop` ends the workers."""
        shard_ids = self.shards_for_epoch(position.epoch)
        workers = min(self.config.num_workers, max(1, len(shard_ids) - position.cursor))
        queues = [queue.Queue(maxsize=self.config.prefetch_shards) for _ in range(workers)]
        local_stop = threading.Event()

        def should_stop() -> bool:
            return stop.is_set() or local_stop.is_set()

        def put(q: queue.Queue, item) -> bool:
            while not should_stop():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work(w: int) -> None:
            try:
                for cursor in worker_cursors(len(shard_ids), w, workers, position.cursor):
                    start = position.offset if cursor == position.cursor else 0
                    loaded = self.reader.load(shard_ids[cursor], cursor, position.epoch, start, should_stop)
                    if not put(queues[w], loaded):
                        return
                put(queues[w], _DONE)
            except InterruptedError:
                return
            except BaseException as error:  # noqa: BLE001 - a bug: hand it to the consumer, never hang
                put(queues[w], error)

        threads = [threading.Thread(target=work, args=(w,), name=f"shard-reader-{self.rank}-{w}", daemon=True)
                   for w in range(workers)]
        for thread in threads:
            thread.start()
        # worker_cursors(w) holds exactly the cursors congruent to w, so cursor c comes from queue c % workers.
        try:
            for cursor in range(position.cursor, len(shard_ids)):
                loaded = self._get(queues[cursor % workers], threads, stop)
                if loaded is None:
                    return
                if isinstance(loaded, BaseException):
                    raise loaded
                start = position.offset if cursor == position.cursor else 0
                name = self.manifest.shards[shard_ids[cursor]].name
                for i in range(start, len(loaded.items)):
                    item = loaded.items[i]
                    if isinstance(item, V.ValidSample):
                        yield Delivered(item, name, cursor, i + 1)
                    else:
                        yield Skipped(item.reason, item.key, name, item.detail, cursor, i + 1)
                yield loaded.end
        finally:
            local_stop.set()
            for thread in threads:
                thread.join(timeout=10)

    @staticmethod
    def _get(q: queue.Queue, threads: list[threading.Thread], stop: threading.Event):
        while not stop.is_set():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and q.empty():
                    raise RuntimeError("shard reader threads ended without delivering the next shard")
                continue
            if item is _DONE:
                raise RuntimeError("a shard reader finished before the stream expected")
            return item
        return None
