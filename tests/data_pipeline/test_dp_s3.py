"""S3 for real: moto's standalone server on 127.0.0.1, prepare writing to it, training reads from it,
and a server restart in the middle of an epoch."""

from __future__ import annotations

import threading
import time

import torch

from dp_helpers import Forwarder, MotoServer, make_synface
from data_pipeline.config import LoaderConfig, PrepareConfig, RetryConfig, S3Config
from data_pipeline.loader import TrainLoader
from data_pipeline.prepare import prepare_dataset
from data_pipeline.shards import Manifest
from data_pipeline.storage import open_storage, register_webdataset_s3


def synface_source(tmp_path, count=32, size=16):
    make_synface(tmp_path / "src", count, size)
    return tmp_path / "src"


def prepare_to(source, output, s3=None, per_shard=4):
    return prepare_dataset(PrepareConfig(source="synface", input=str(source), output=output, category="faces",
                                         samples_per_shard=per_shard, s3=s3 or S3Config()))


def epoch_batches(shards, **overrides):
    options = dict(shards=shards, batch_size=4, image_size=16, seed=1, num_workers=1, prefetch_shards=1)
    options.update(overrides)
    with TrainLoader(LoaderConfig(**options)) as loader:
        batches = list(loader)
        return batches, loader.last_epoch_report, loader.retry_stats.retries


def assert_same(batches, reference):
    assert [b["key"] for b in batches] == [b["key"] for b in reference]
    for batch, ref in zip(batches, reference):
        assert torch.equal(batch["image"], ref["image"]) and torch.equal(batch["depth"], ref["depth"])


def test_prepare_to_s3_and_train_stream_from_it(tmp_path, s3_env):
    source = synface_source(tmp_path, count=10)
    local = prepare_to(source, str(tmp_path / "local"))
    remote = prepare_to(source, "s3://unsup3d-test/faces/train")  # endpoint and keys from the AWS_* variables
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards]
    storage = open_storage("s3://unsup3d-test/faces/train")
    listed = sorted(p.rsplit("/", 1)[1] for p in storage.fs.ls("unsup3d-test/faces/train"))
    assert listed == sorted(["manifest.json"] + [s.name for s in local.shards] + [s.index for s in local.shards])
    assert Manifest.from_json(storage.read_bytes("manifest.json")).shards == remote.shards
    from_s3, report, _ = epoch_batches("s3://unsup3d-test/faces/train")
    from_disk, _, _ = epoch_batches(str(tmp_path / "local"))
    assert_same(from_s3, from_disk)
    assert report["delivered"] == 10 and report["difference"] == 0


def test_credentials_and_endpoint_from_the_config(tmp_path, moto_server, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    s3 = S3Config(endpoint_url=moto_server.endpoint, access_key_id="k", secret_access_key="s", region="eu-west-1")
    prepare_to(synface_source(tmp_path, count=5), "s3://cfg-bucket/d", s3=s3)
    batches, report, _ = epoch_batches("s3://cfg-bucket/d", s3=s3)
    assert sum(len(b["key"]) for b in batches) == 5 and report["difference"] == 0


def test_missing_shard_on_s3_is_counted_not_retried(tmp_path, s3_env):
    manifest = prepare_to(synface_source(tmp_path, count=8), "s3://unsup3d-test/m")
    storage = open_storage("s3://unsup3d-test/m")
    storage.remove(manifest.shards[1].name)
    started = time.monotonic()
    batches, report, retries = epoch_batches("s3://unsup3d-test/m")
    assert report["skipped"] == {"missing_shard": 4} and report["delivered"] == 4 and retries == 0
    assert time.monotonic() - started < 20


def test_server_gone_for_good_ends_the_epoch_with_fetch_failed(tmp_path, s3_env):
    prepare_to(synface_source(tmp_path, count=8), "s3://unsup3d-test/gone")
    retry = RetryConfig(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
    with TrainLoader(LoaderConfig(shards="s3://unsup3d-test/gone", batch_size=4, image_size=16, retry=retry,
                                  s3=S3Config(connect_timeout_s=1, read_timeout_s=2))) as loader:
        s3_env.stop()  # the test stops the server it started; the fixture then has nothing left to stop
        assert list(loader) == []
        report = loader.last_epoch_report
    assert report["skipped"] == {"fetch_failed": 8} and report["difference"] == 0
    assert loader.retry_stats.retries == 2 * 2 and loader.retry_stats.gave_up == 2


def test_webdataset_reads_s3_urls_through_s3fs(tmp_path, s3_env):
    import webdataset as wds

    manifest = prepare_to(synface_source(tmp_path, count=6), "s3://unsup3d-test/wds", per_shard=3)
    register_webdataset_s3()
    urls = [f"s3://unsup3d-test/wds/{s.name}" for s in manifest.shards]
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(keys) == [f"obj{i:04d}" for i in range(6)]


def test_server_restart_mid_epoch(tmp_path, monkeypatch):
    """Stop the S3 server in the middle of an epoch, restart it; the epoch continues at the right sample."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    source = synface_source(tmp_path, count=32)
    first, second = MotoServer(), None
    address = Forwarder()
    first.start()
    try:
        address.up(first.port)
        s3 = S3Config(endpoint_url=address.endpoint, connect_timeout_s=1, read_timeout_s=5)
        prepare_to(source, "s3://restart/faces", s3=s3)
        retry = RetryConfig(max_attempts=40, initial_backoff_s=0.05, max_backoff_s=0.5)
        reference, _, _ = epoch_batches("s3://restart/faces", s3=s3, retry=retry)
        assert len(reference) == 8

        batches, restarted = [], threading.Event()

        def restart():
            nonlocal second
            time.sleep(0.5)
            second = MotoServer()
            second.start()
            prepare_to(source, "s3://restart/faces", s3=S3Config(endpoint_url=second.endpoint))  # same bytes
            address.up(second.port)
            restarted.set()

        with TrainLoader(LoaderConfig(shards="s3://restart/faces", batch_size=4, image_size=16, seed=1, num_workers=1,
                                      prefetch_shards=1, prefetch_batches=1, retry=retry, s3=s3)) as loader:
            thread = None
            for batch in loader:
                batches.append(batch)
                if len(batches) == 3:
                    # Prefetch is bounded (1 batch, 1 shard), so at most shards 0-6 of 8 are fetched by now:
                    # the rest must come while the server is down or just restarted.
                    address.down()  # in-flight and new connections fail from here on
                    first.stop()
                    thread = threading.Thread(target=restart)
                    thread.start()
            thread.join()
            report = loader.last_epoch_report
            retries = loader.retry_stats.retries
        assert restarted.is_set()
        assert retries > 0  # it really did retry
        assert_same(batches, reference)
        assert report["delivered"] == 32 and report["skipped"] == {} and report["difference"] == 0
    finally:
        address.down()
        first.stop()
        if second is not None:
            second.stop()
