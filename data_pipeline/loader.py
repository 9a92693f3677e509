"""The training loader: this rank's stream -> batches -> DALI -> tensors on the device, with its position.

    loader = TrainLoader(LoaderConfig(shards="s3://bucket/faces/train", batch_size=64, image_size=64),
                         rank=rank, world_size=world_size, device=device)
    loader.load_state_dict(checkpoint["data"])          # optional: resume
    while loader.epoch < epochs:
        for batch in loader:                            # the rest of the current epoch
            batch["image"]  # float32 [B,3,S,S] in [-1,1] on device
            batch["depth"]  # float32 [B,S,S] depth units (only when the shards carry depth)
            batch["key"]    # list[str]
        # loader.epoch has moved on; loader.last_epoch_report holds the epoch's accounting
    checkpoint["data"] = loader.state_dict()

Threads: reader workers (stream.py) fetch and validate shards; one producer thread assembles batches and
runs DALI (or PIL where DALI is not installed: pil_decode.py), `prefetch_batches` ahead; the trainer's thread only takes finished batches. The position and the
epoch's counters advance when the trainer takes a batch, so state_dict() describes exactly what the
trainer has seen, never what is merely prefetched.

At the end of each epoch, delivered + skipped is checked against the manifest's count for this rank's
shards; a difference is logged as a loud warning and kept in `last_epoch_report`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

from data_pipeline import validate as V
from data_pipeline.config import LoaderConfig
from data_pipeline.dali_decode import DaliDecoder, resolve_decode_device
from data_pipeline.pil_decode import PilDecoder, announce_pil_fallback, dali_available
from data_pipeline.shards import load_manifest
from data_pipeline.storage import RetryStats, open_storage
from data_pipeline.stream import Delivered, Position, RankStream, ShardEnd, Skipped

log = logging.getLogger(__name__)
STATE_VERSION = 1


def flip_decision(seed: int, epoch: int, key: str, probability: float) -> bool:
    """Whether sample `key` is mirrored in `epoch`: a hash, so resumes and world sizes do not change it."""
    if probability <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < probability


@dataclass
class _SkipNote:
    reason: str
    count: int
    shard: str
    key: str
    detail: str


@dataclass
class _Deltas:
    """What one record adds to the epoch's accounting (applied when the trainer takes the record)."""

    skips: list[_SkipNote] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)
    shard_events: list[tuple[str, str]] = field(default_factory=list)

    def convert(self, reasons: list[str]) -> None:
        for reason in reasons:
            self.converted[reason] = self.converted.get(reason, 0) + 1


@dataclass
class _Record:
    kind: str  # "batch", "epoch_end" or "error"
    deltas: _Deltas = field(default_factory=_Deltas)
    batch: dict | None = None
    position: Position | None = None
    error: BaseException | None = None


class TrainLoader:
    """Batches for one rank; iterate it once per epoch. See the module docstring."""

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.storage = open_storage(config.shards, config.s3)
        self.manifest = load_manifest(self.storage, config.retry)
        dataset = self.manifest.dataset
        self.with_depth = dataset.has_depth if config.with_depth is None else config.with_depth
        if self.with_depth and not dataset.has_depth:
            raise ValueError(f"{config.shards}: with_depth is set but the manifest says the shards carry no depth")
        if dataset.image_size and dataset.image_size < config.image_size:
            log.warning("%s holds %d px images and training is at %d px: every image is upscaled %.1fx (prepare "
                        "them at --image-size %d, or train at a smaller model.image_size)", config.shards,
                        dataset.image_size, config.image_size, config.image_size / dataset.image_size, config.image_size)
        self.retry_stats = RetryStats()
        validator = V.SampleValidator(dataset.image_ext, self.with_depth, dataset.image_size, config.max_image_pixels)
        self.stream = RankStream(self.manifest, self.storage, config, rank, world_size, validator, self.retry_stats)
        if len(self.manifest.shards) < world_size:
            log.warning("%s has %d shards for %d ranks: some ranks get no data; prepare with fewer samples per shard",
                        config.shards, len(self.manifest.shards), world_size)
        self._dataset_id = hashlib.sha256("".join(s.sha256 for s in self.manifest.shards).encode()).hexdigest()[:16]
        self._position = Position()
        self._counters = V.Counters()
        self._decoder: DaliDecoder | PilDecoder | None = None
        # keep_in_memory: sample key -> (uint8 image [S,S,3], uint8 depth [S,S] or None), or the reason it failed.
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor | None] | str] = {}
        self._producer: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self.last_epoch_report: dict | None = None
        self.epoch_reports: list[dict] = []

    @property
    def decoder_device(self) -> str:
        """Where images are decoded: "mixed" (DALI on the GPU) or "cpu" (DALI, or PIL where DALI is missing)."""
        if self._decoder is not None:
            return self._decoder.decoder_device
        if not dali_available() or self.config.keep_in_memory:
            return "cpu"
        return resolve_decode_device(self.config.decode_device, self.device)

    # Position ------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._position.epoch

    @property
    def position(self) -> Position:
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (no-op when already in it, so a resumed position is kept)."""
        if epoch != self._position.epoch:
            self._stop_producer()
            self._position = Position(epoch, 0, 0)
            self._counters = V.Counters()

    def expected_samples(self, epoch: int | None = None) -> int:
        """The manifest's sample count of this rank's shards in `epoch` (default: the current one)."""
        return self.stream.expected_samples(self._position.epoch if epoch is None else epoch)

    def state_dict(self) -> dict:
        """This rank's position and the current epoch's counters (plain types; torch.save/json friendly).

        Ranks have different positions: save every rank's (e.g. all_gather_object) and give each rank its own,
        or the whole {"ranks": {rank: state}} mapping, to load_state_dict.
        """
        return {
            "version": STATE_VERSION,
            "epoch": self._position.epoch,
            "cursor": self._position.cursor,
            "offset": self._position.offset,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "dataset": self._dataset_id,
            "counters": self._counters.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "ranks" in state:
            ranks = {int(k): v for k, v in state["ranks"].items()}
            if self.rank not in ranks:
                raise ValueError(f"data state has no entry for rank {self.rank} (has {sorted(ranks)})")
            state = ranks[self.rank]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        for name, mine in (("seed", self.config.seed), ("shuffle", self.config.shuffle), ("dataset", self._dataset_id)):
            if state[name] != mine:
                raise ValueError(f"data state was saved with {name}={state[name]!r}, this loader has {mine!r}: "
                                 "the resumed run could not see the same samples")
        self._stop_producer()
        position = Position(int(state["epoch"]), int(state["cursor"]), int(state["offset"]))
        counters = V.Counters.from_dict(state.get("counters", {}))
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            message = (f"data state is from rank {state['rank']} of {state['world_size']}, this is rank {self.rank} "
                       f"of {self.world_size}")
            if self.config.on_world_size_change == "error":
                raise ValueError(message + " (set on_world_size_change: restart_epoch to restart the epoch)")
            log.warning("%s: restarting epoch %d from its start (on_world_size_change=restart_epoch)",
                        message, position.epoch)
            position, counters = Position(position.epoch, 0, 0), V.Counters()
        self._position, self._counters = position, counters

    # Iteration -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        if self._producer is None:
            self._start_producer()
        while True:
            record = self._take()
            self._apply(record.deltas)
            if record.kind == "error":
                self._stop_producer()
                raise RuntimeError(f"data pipeline failed: {type(record.error).__name__}: {record.error}") from record.error
            if record.kind == "epoch_end":
                self._finish_epoch()
                return
            self._position = record.position
            if record.batch is not None:
                self._counters.delivered += len(record.batch["key"])
                yield record.batch

    def _take(self) -> _Record:
        while True:
            try:
                return self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._producer is None or not self._producer.is_alive():
                    # The producer always ends with an epoch_end or error record: dying silently is a bug.
                    if self._queue.empty():
                        self._producer = None
                        raise RuntimeError("data pipeline producer ended without finishing the epoch")

    def _apply(self, deltas: _Deltas) -> None:
        for note in deltas.skips:
            self._counters.skip(note.reason, note.count)
            log.warning("skipped %d sample(s): reason=%s shard=%s key=%s %s", note.count, note.reason,
                        self.storage.url_of(note.shard) if note.shard else "-", note.key, note.detail)
        for reason, count in deltas.converted.items():
            self._counters.convert(reason, count)
        for reason, shard in deltas.shard_events:
            self._counters.shard_event(reason)

    def _finish_epoch(self) -> None:
        epoch = self._position.epoch
        expected = self.stream.expected_samples(epoch)
        counters = self._counters
        accounted = counters.delivered + counters.skipped_total
        report = {"epoch": epoch, "rank": self.rank, "world_size": self.world_size, "expected": expected,
                  "accounted": accounted, "difference": expected - accounted, **counters.to_dict(),
                  "retries": self.retry_stats.retries}
        if accounted != expected:
            log.warning("!! DATA ACCOUNTING MISMATCH epoch %d rank %d: delivered %d + skipped %d = %d, but the manifest "
                        "holds %d samples for this rank's shards (difference %+d): samples were lost or added "
                        "without a recorded reason", epoch, self.rank, counters.delivered, counters.skipped_total,
                        accounted, expected, expected - accounted)
        elif counters.skipped_total or counters.shard_events:
            log.warning("epoch %d rank %d: delivered %d, skipped %d %s, damaged shards %s, converted %s", epoch,
                        self.rank, counters.delivered, counters.skipped_total, counters.skipped,
                        counters.shard_events, counters.converted)
        else:  # a clean epoch: kept in epoch_reports; a line per epoch would crowd a local run's console
            log.debug("epoch %d rank %d: delivered %d of %d samples, converted %s", epoch, self.rank,
                      counters.delivered, expected, counters.converted)
        self.last_epoch_report = report
        self.epoch_reports.append(report)
        self._position = Position(epoch + 1, 0, 0)
        self._counters = V.Counters()
        self._producer = None  # it has ended after the epoch_end record

    # Producer ------------------------------------------------------------------------------------

    def _start_producer(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.config.prefetch_batches)
        self._producer = threading.Thread(target=self._produce, args=(self._position, self._stop, self._queue),
                                          name=f"data-producer-{self.rank}", daemon=True)
        self._producer.start()

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._stop.set()
            self._producer.join(timeout=30)
            if self._producer.is_alive():
                log.warning("data producer thread did not stop within 30 s")
        self._producer = None
        self._queue = None

    def close(self) -> None:
        """Stop the background threads and release DALI."""
        self._stop_producer()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_decoder(self) -> DaliDecoder | PilDecoder:
        """DALI where it is installed; PIL otherwise (said once in the log), or an error if the GPU was asked for."""
        raw = self.config.keep_in_memory  # then decoded once per sample, to bytes that _decode_kept keeps
        if dali_available():
            return DaliDecoder(self.config.image_size, self.config.batch_size, self.with_depth, self.device,
                               self.config.decode_device, self.config.dali_threads, self.config.seed, raw=raw)
        if self.config.decode_device == "mixed":
            raise ValueError("decode_device=mixed needs DALI, which is not installed (pip install 'unsup3d[data]')")
        announce_pil_fallback()
        return PilDecoder(self.config.image_size, self.config.batch_size, self.with_depth, self.device, raw=raw)

    def _put(self, out: queue.Queue, stop: threading.Event, record: _Record) -> bool:
        while not stop.is_set():
            try:
                out.put(record, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, position: Position, stop: threading.Event, out: queue.Queue) -> None:
        try:
            if self._decoder is None:
                self._decoder = self._make_decoder()
            epoch = position.epoch
            items = self.stream.items(position, stop)
            try:
                self._assemble(epoch, items, stop, out)
            finally:
                items.close()  # stops the reader workers now, not at garbage collection
        except BaseException as error:  # noqa: BLE001 - handed to the trainer's thread, never swallowed
            if not stop.is_set():
                log.exception("data pipeline producer failed")
                self._put(out, stop, _Record("error", error=error))

    def _assemble(self, epoch: int, items, stop: threading.Event, out: queue.Queue) -> None:
        pending: list[Delivered] = []
        deltas = _Deltas()
        for item in items:
            if isinstance(item, Delivered):
                pending.append(item)
                deltas.convert(item.sample.converted)
                if len(pending) == self.config.batch_size:
                    if not self._put(out, stop, self._decode(epoch, pending, deltas)):
                        return
                    pending, deltas = [], _Deltas()
            elif isinstance(item, Skipped):
                deltas.skips.append(_SkipNote(item.reason, 1, item.shard, item.key, item.detail))
            elif isinstance(item, ShardEnd):
                for reason, count in item.lost.items():
                    deltas.skips.append(_SkipNote(reason, count, item.shard, "*", f"{count} of the shard's "
                                                  f"{item.expected} samples: {item.detail}"))
                deltas.shard_events += [(reason, item.shard) for reason in item.events]
        if stop.is_set():
            return
        if pending and self.config.drop_last:
            deltas.skips.append(_SkipNote(V.SKIP_DROP_LAST, len(pending), pending[-1].shard, ",".join(
                p.sample.key for p in pending), "last partial batch"))
        elif pending:
            if not self._put(out, stop, self._decode(epoch, pending, deltas)):
                return
            deltas = _Deltas()
        self._put(out, stop, _Record("epoch_end", deltas))

    def _decode(self, epoch: int, pending: list[Delivered], deltas: _Deltas) -> _Record:
        if self.config.keep_in_memory:
            return self._decode_kept(epoch, pending, deltas)
        samples = [p.sample for p in pending]
        flips = [flip_decision(self.config.seed, epoch, s.key, self.config.hflip_probability) for s in samples]
        depths = [s.depth for s in samples] if self.with_depth else None
        tensors, failures = self._decoder.decode([s.image for s in samples], flips, depths)
        failed = {f.index for f in failures}
        for failure in failures:
            deltas.skips.append(_SkipNote(V.SKIP_DECODE_ERROR, 1, pending[failure.index].shard, samples[failure.index].key,
                                          failure.detail))
        keys = [s.key for i, s in enumerate(samples) if i not in failed]
        last = pending[-1]
        position = Position(epoch, last.cursor, last.offset_after)
        batch = None
        if keys:
            batch = {"image": tensors["image"], "key": keys}
            if self.with_depth:
                batch["depth"] = tensors["depth"]
        return _Record("batch", deltas, batch, position)

    def _decode_kept(self, epoch: int, pending: list[Delivered], deltas: _Deltas) -> _Record:
        """keep_in_memory: decode the samples not seen before (once, unflipped uint8), then flip and scale the
        batch from memory. Every batch is made this way, the first time too, so the values do not depend on
        what was kept already (a resumed run's batches equal the uninterrupted run's, bit for bit)."""
        samples = [p.sample for p in pending]
        new = [i for i, s in enumerate(samples) if s.key not in self._kept]
        if new:
            depths = [samples[i].depth for i in new] if self.with_depth else None
            tensors, failures = self._decoder.decode([samples[i].image for i in new], [False] * len(new), depths)
            failed = {f.index: f.detail for f in failures}
            row = 0
            for n, i in enumerate(new):
                if n in failed:
                    self._kept[samples[i].key] = failed[n]  # fails again, and is counted, every epoch
                    continue
                depth = tensors["depth"][row] if self.with_depth else None
                self._kept[samples[i].key] = (tensors["image"][row], depth)
                row += 1
        kept, keys = [], []
        for i, sample in enumerate(samples):
            entry = self._kept[sample.key]
            if isinstance(entry, str):
                deltas.skips.append(_SkipNote(V.SKIP_DECODE_ERROR, 1, pending[i].shard, sample.key, entry))
                continue
            kept.append(entry)
            keys.append(sample.key)
        last = pending[-1]
        position = Position(epoch, last.cursor, last.offset_after)
        if not keys:
            return _Record("batch", deltas, None, position)
        flips = torch.tensor([flip_decision(self.config.seed, epoch, key, self.config.hflip_probability)
                              for key in keys])
        images = torch.stack([image for image, _ in kept])  # [B, S, S, 3] uint8
        images = torch.where(flips[:, None, None, None], images.flip(2), images)
        batch = {"image": (images.permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous().to(self.device), "key": keys}
        if self.with_depth:
            depths = torch.stack([depth for _, depth in kept])  # [B, S, S] uint8, x = byte / 255
            depths = torch.where(flips[:, None, None], depths.flip(2), depths)
            batch["depth"] = (1.1 - depths.float() * (0.2 / 255.0)).to(self.device)
        return _Record("batch", deltas, batch, position)
