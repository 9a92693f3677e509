"""The metrics API, the exporter (ephemeral ports, file_sd entries), the progress line, the config."""

from __future__ import annotations

import io
import json
import logging
import queue
import time
import urllib.request

import pytest

from monitoring.exporter import MetricsExporter
from monitoring.metrics import TrainingMetrics
from monitoring.mfu import peak_flops
from monitoring.progress import ProgressBar


def test_metrics_carry_run_category_rank_and_accumulate():
    m = TrainingMetrics("r1", "faces", 3)
    m.record_step(5, images=8, seconds=0.5, losses={"total": 1.5, "photometric": 0.2},
                  sections={"data_wait": 0.1, "forward": 0.2}, grad_norm=2.0, learning_rate=1e-3, epoch=1)
    m.record_step(6, images=8, seconds=0.5, losses={"total": 1.0}, nonfinite=True, grad_norm=99.0)
    m.record_skipped("corrupt", 2)
    m.record_skipped("too_small", 0)
    m.record_queue(3, 4)
    m.record_checkpoint(1.25, 1000)
    m.record_restart()
    assert m.value("train_step") == 6
    assert m.value("train_images") == 16
    assert m.value("train_step_seconds") == 1.0
    assert m.value("train_section_seconds", section="data_wait") == pytest.approx(0.1)
    assert m.value("train_loss", term="total") == 1.0
    assert m.value("train_grad_norm") == 2.0  # a skipped step's norm is not recorded
    assert m.value("train_nonfinite_steps") == 1
    assert m.value("data_skipped_samples", reason="corrupt") == 2
    assert m.value("data_skipped_samples", reason="too_small") is None
    assert m.value("data_queue_depth") == 3
    assert m.value("checkpoint_size_bytes") == 1000
    assert m.value("worker_restarts", reason="resumed_from_checkpoint") == 1
    assert m.labels == {"run": "r1", "category": "faces", "rank": "3"}


def test_gpu_and_mfu_series_are_absent_until_recorded():
    m = TrainingMetrics("r", "c", 0)
    m.record_throughput(100.0)
    assert m.value("gpu_utilization_ratio") is None and m.value("train_mfu_ratio") is None
    m.flops_per_image.set(1e9)
    m.record_throughput(100.0, peak_flops=1e12)
    assert m.value("train_mfu_ratio") == pytest.approx(0.1)
    m.record_gpu(0.5, 10.0, 100.0)
    assert m.value("gpu_utilization_ratio") == 0.5 and m.value("gpu_memory_total_bytes") == 100.0


def test_validation_series_appear_once_recorded_with_method_and_normals():
    m = TrainingMetrics("r", "c", 0)
    assert m.value("validation_side", method="model") is None and m.value("validation_step") is None
    m.record_validation("constant_depth", 1.7, 44.8, 44.3)
    m.record_validation("model", 1.2, 28.0, 25.0, step=100, seconds=2.5)
    assert m.value("validation_side", method="model") == 1.2
    assert m.value("validation_mad_degrees", method="model", normals="reference") == 28.0
    assert m.value("validation_mad_degrees", method="constant_depth", normals="exact") == 44.3
    assert m.value("validation_step") == 100 and m.value("validation_seconds") == 2.5


def test_peak_flops_table_and_override():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops(None) is None and peak_flops("Some CPU") is None
    assert peak_flops(None, override_tflops=2.0) == 2e12


def test_workers_on_one_node_get_their_own_ports_and_sd_entries(tmp_path):
    sd = tmp_path / "sd"
    workers = [TrainingMetrics("run", "cat", rank) for rank in range(3)]
    exporters = [MetricsExporter(w.registry, "127.0.0.1", 0, sd, labels=w.labels).start() for w in workers]
    try:
        assert len({e.port for e in exporters}) == 3
        files = sorted(sd.glob("*.json"))
        assert len(files) == 3
        entries = [json.loads(f.read_text())[0] for f in files]
        assert sorted(e["targets"][0] for e in entries) == sorted(e.address for e in exporters)
        assert {e["labels"]["rank"] for e in entries} == {"0", "1", "2"}
        for rank, exporter in enumerate(exporters):
            body = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
            assert f'unsup3d_train_step{{category="cat",rank="{rank}",run="run"}}' in body
    finally:
        for e in exporters:
            e.close()
    assert not list(sd.iterdir())


def test_progress_bar_logs_tqdm_lines_when_not_a_terminal(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="monitoring.progress"):
        bar = ProgressBar(total=10, every=5, stream=out)
        for step in range(1, 11):
            bar.update(step, 12.5, 0.25)
        bar.close()
    assert out.getvalue() == ""  # no carriage-return drawing in a file: the lines go through logging
    lines = [r.getMessage() for r in caplog.records if r.name == "monitoring.progress"]
    assert len(lines) == 2
    assert "5/10 steps" in lines[0] and "12.5 img/s" in lines[0] and "loss 0.2500" in lines[0] and "eta" in lines[0]
    assert lines[1].startswith("100%|") and "10/10 steps" in lines[1]


def test_progress_eta_leaves_out_the_first_step_and_pauses():
    """The first step carries one-off costs and validation is not training: neither may stretch the ETA
    (counted from the start, this run's estimate after 5 steps would be about 65 s)."""
    bar = ProgressBar(total=100, every=1000, stream=io.StringIO())
    time.sleep(2.0)  # the first step: warm-up
    bar.update(1, None, None)
    for step in range(2, 6):
        time.sleep(0.1)
        bar.update(step, 10.0, 0.5)
        if step == 3:
            time.sleep(1.0)  # validation
            bar.pause(1.0)
    info = bar.bar.format_dict
    rate = (info["n"] - info["initial"]) / (info["elapsed"])
    eta = (info["total"] - info["n"]) / rate
    assert 5.0 < eta < 25.0, eta  # 95 steps at about 0.1 s
    bar.close()


def test_data_stats_reads_a_loader_without_importing_it():
    from trainer.loop.monitor import data_stats

    class FakeLoader:
        epoch_reports = [{"skipped": {"corrupt": 2}}]
        _queue = queue.Queue(maxsize=4)

        def state_dict(self):
            return {"counters": {"skipped": {"corrupt": 1, "too_small": 3}}}

    class Source:
        loader = FakeLoader()

    Source.loader._queue.put(1)
    assert data_stats(Source()) == {"skipped": {"corrupt": 3, "too_small": 3}, "queue_depth": 1, "queue_capacity": 4}
    assert data_stats(object()) == {}


def test_monitoring_config_section(tmp_path):
    from trainer.config import ConfigError, load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("monitoring:\n  bind_address: 0.0.0.0\n  sd_dir: /tmp/sd\n  peak_tflops: 2.5\n")
    config = load_run_config(path)
    assert config.monitoring.bind_address == "0.0.0.0" and config.monitoring.port == 0
    assert config.monitoring.peak_tflops == 2.5 and config.monitoring.enabled
    path.write_text("monitoring:\n  prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_run_config(path)
