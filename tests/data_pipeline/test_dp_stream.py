"""Streaming: shard assignment per rank and worker, per-epoch shuffles, and exact resume at world sizes 1-3."""

from __future__ import annotations

import pytest
import torch

from dp_helpers import prepared_synface
from data_pipeline.config import LoaderConfig
from data_pipeline.loader import TrainLoader, flip_decision
from data_pipeline.stream import epoch_shard_order, rank_shards, worker_cursors

EPOCHS = 2


@pytest.mark.parametrize("num_shards", [1, 4, 7, 10])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_shard_goes_to_exactly_one_rank_and_worker(num_shards, world_size):
    for epoch in range(3):
        per_rank = [rank_shards(num_shards, epoch, 0, True, r, world_size) for r in range(world_size)]
        assert sorted(s for shards in per_rank for s in shards) == list(range(num_shards))
        sizes = [len(s) for s in per_rank]
        assert max(sizes) - min(sizes) <= 1
        assert per_rank == [rank_shards(num_shards, epoch, 0, True, r, world_size) for r in range(world_size)]
        for shards in per_rank:
            for workers in (1, 2, 3):
                for start in (0, 1):
                    owned = [worker_cursors(len(shards), w, workers, start) for w in range(workers)]
                    assert sorted(c for cs in owned for c in cs) == list(range(start, len(shards)))
                    assert all(c % workers == w for w, cs in enumerate(owned) for c in cs)
    orders = {tuple(epoch_shard_order(10, e, 0, True)) for e in range(4)}
    assert len(orders) == 4  # a new shuffle each epoch
    assert epoch_shard_order(10, 3, 0, False) == list(range(10))
    with pytest.raises(ValueError):
        rank_shards(4, 0, 0, True, 2, 2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 23 samples in shards of 4 (the last holds 3): uneven shards, and more shards than any tested world size.
    return prepared_synface(tmp_path_factory.mktemp("stream"), count=23, per_shard=4, size=16)


def loader(shards, rank, world_size, **overrides):
    options = dict(shards=str(shards), batch_size=3, image_size=16, seed=7, num_workers=2, prefetch_shards=1)
    options.update(overrides)
    return TrainLoader(LoaderConfig(**options), rank=rank, world_size=world_size)


def run_epochs(shards, rank, world_size, epochs=EPOCHS, **overrides):
    """[(epoch, keys, image, depth)] for every batch of an uninterrupted run."""
    batches = []
    with loader(shards, rank, world_size, **overrides) as it:
        while it.epoch < epochs:
            epoch = it.epoch
            for batch in it:
                batches.append((epoch, batch["key"], batch["image"], batch["depth"]))
            assert it.last_epoch_report["difference"] == 0
    return batches


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_each_epoch_and_shuffle_changes(shards, world_size):
    per_epoch = [[] for _ in range(EPOCHS)]
    for rank in range(world_size):
        for epoch, keys, image, depth in run_epochs(shards, rank, world_size):
            per_epoch[epoch] += keys
            assert image.dtype == torch.float32 and image.shape[1:] == (3, 16, 16)
            assert depth.shape == (len(keys), 16, 16)
    all_keys = sorted(f"obj{i:04d}" for i in range(23))
    for keys in per_epoch:
        assert sorted(keys) == all_keys  # each sample exactly once per epoch over all ranks
    assert per_epoch[0] != per_epoch[1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_sees_exactly_the_uninterrupted_samples(shards, world_size):
    for rank in range(world_size):
        reference = run_epochs(shards, rank, world_size)
        total = len(reference)
        # Interrupt at the start, inside the first epoch, at the epoch boundary and inside the second epoch.
        for stop_after in sorted({0, 1, total // 2, total - 1}):
            seen, state = [], None
            with loader(shards, rank, world_size) as first:
                while len(seen) < stop_after:
                    epoch = first.epoch
                    for batch in first:
                        seen.append((epoch, batch["key"], batch["image"], batch["depth"]))
                        if len(seen) == stop_after:
                            break
                state = first.state_dict()
            # The resumed run may use another number of reader workers: the order does not depend on it.
            with loader(shards, rank, world_size, num_workers=3 - rank % 2, prefetch_shards=2) as second:
                second.load_state_dict(state)
                while second.epoch < EPOCHS:
                    epoch = second.epoch
                    for batch in second:
                        seen.append((epoch, batch["key"], batch["image"], batch["depth"]))
                    # Counters survive the interruption: the epoch's accounting is complete.
                    assert second.last_epoch_report["difference"] == 0
                    assert second.last_epoch_report["delivered"] == sum(len(b[1]) for b in seen if b[0] == epoch)
            assert [(e, k) for e, k, _, _ in seen] == [(e, k) for e, k, _, _ in reference], (rank, stop_after)
            for (_, _, image, depth), (_, _, ref_image, ref_depth) in zip(seen, reference):
                assert torch.equal(image, ref_image) and torch.equal(depth, ref_depth)  # same flips too


def test_state_dict_format_and_mismatches(shards):
    with loader(shards, 1, 2) as it:
        next(iter(it))
        state = it.state_dict()
    assert set(state) == {"version", "epoch", "cursor", "offset", "rank", "world_size", "seed", "shuffle", "dataset",
                          "counters"}
    assert (state["epoch"], state["rank"], state["world_size"]) == (0, 1, 2)
    assert state["counters"]["delivered"] == 3
    with loader(shards, 1, 2) as other:
        other.load_state_dict({"ranks": {0: dict(state, rank=0), 1: state}})
        assert other.position.cursor == state["cursor"] and other.position.offset == state["offset"]
    with loader(shards, 1, 3) as other, pytest.raises(ValueError, match="rank 1 of 2"):
        other.load_state_dict(state)
    with loader(shards, 1, 3, on_world_size_change="restart_epoch") as other:
        other.load_state_dict(state)
        assert (other.epoch, other.position.cursor, other.position.offset) == (0, 0, 0)
    with loader(shards, 1, 2, seed=8) as other, pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_a_state_from_other_shards_is_refused_or_restarts_the_epoch_over_the_new_ones(shards, tmp_path):
    grown = prepared_synface(tmp_path, count=11, per_shard=4, size=16, seed=1)
    with loader(shards, 0, 1) as it:
        while it.epoch < 1:
            for _ in it:
                pass
        next(iter(it))  # into epoch 1
        state = it.state_dict()
    with loader(grown, 0, 1) as other, pytest.raises(ValueError, match="on_dataset_change: restart_epoch"):
        other.load_state_dict(state)
    with loader(grown, 0, 1, on_dataset_change="restart_epoch") as other:
        other.load_state_dict(state)
        assert (other.epoch, other.position.cursor, other.position.offset) == (1, 0, 0)
        keys = [key for batch in other for key in batch["key"]]
        assert len(keys) == len(set(keys)) == 11 and other.last_epoch_report["difference"] == 0
    with pytest.raises(ValueError, match="on_dataset_change"):
        LoaderConfig(shards=str(grown), on_dataset_change="ignore")


def test_flip_decisions_are_seeded_and_balanced():
    flips = [flip_decision(0, 0, f"k{i}", 0.5) for i in range(2000)]
    assert 900 < sum(flips) < 1100
    assert flips == [flip_decision(0, 0, f"k{i}", 0.5) for i in range(2000)]
    assert flips != [flip_decision(0, 1, f"k{i}", 0.5) for i in range(2000)]
    assert not any(flip_decision(0, 0, f"k{i}", 0.0) for i in range(100))


def test_set_epoch_and_empty_ranks(shards, tmp_path, caplog):
    with loader(shards, 0, 1) as it:
        it.set_epoch(3)
        keys = [k for batch in it for k in batch["key"]]
        assert len(keys) == 23 and it.epoch == 4 and it.last_epoch_report["epoch"] == 3
    few = prepared_synface(tmp_path, count=4, per_shard=4, name="one-shard")
    with loader(few, 1, 2) as it:  # 1 shard, 2 ranks: rank 1 has nothing and says so
        assert list(it) == [] and it.last_epoch_report["expected"] == 0
    assert "some ranks get no data" in caplog.text
