"""The training loop's side of monitoring: what the Trainer records into monitoring/ and when.

The Trainer holds one TrainMonitor (self.monitor) and calls it from run(), train_step(), save() and
rollback(), and its Validator (trainer/loop/validation.py) with validation scores; everything here is a
no-op when monitoring.enabled is false (the progress bar has its own switch). The step-time
breakdown uses a SectionTimer that exists only when metrics are enabled (on CUDA it synchronises at
section edges, which costs a little throughput).

Data-pipeline numbers (skipped samples by reason, prefetch queue depth) are read from the batch
source without importing data_pipeline: a source may offer monitoring_stats() -> {"skipped":
{reason: cumulative count}, "queue_depth": n, "queue_capacity": n}; otherwise a TrainLoader found at
source.loader (cluster.streaming.StreamingBatches) or the source itself is read by duck typing.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from trainer.loop.timing import NO_TIMER, SectionTimer

log = logging.getLogger(__name__)


def data_stats(source) -> dict:
    """Cumulative skipped samples by reason and the prefetch queue of a batch source (see module doc)."""
    own = getattr(source, "monitoring_stats", None)
    if callable(own):
        return own()
    loader = getattr(source, "loader", source)
    if not hasattr(loader, "epoch_reports"):  # not a data_pipeline TrainLoader: nothing to report
        return {}
    skipped: dict[str, int] = {}
    for report in loader.epoch_reports:  # finished epochs, then the current one
        for reason, count in report.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
    for reason, count in loader.state_dict().get("counters", {}).get("skipped", {}).items():
        skipped[reason] = skipped.get(reason, 0) + count
    stats: dict = {"skipped": skipped}
    prefetch = getattr(loader, "_queue", None)
    if prefetch is not None:
        stats["queue_depth"] = prefetch.qsize()
        stats["queue_capacity"] = prefetch.maxsize
    return stats


def checkpoint_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class TrainMonitor:
    def __init__(self, config, group, device: torch.device, total_steps: int, out_dir: Path):
        cfg = config.monitoring
        self.cfg = cfg
        self.group = group
        self.device = device
        self.total_steps = total_steps
        # Rank 0 of a run on this machine alone draws the progress bar; a multi-node run's logs get none.
        self.local = group.on_one_machine
        self.enabled = cfg.enabled
        if self.enabled:
            try:
                import prometheus_client  # noqa: F401  (the `monitoring` extra)
            except ImportError:
                log.warning("monitoring.enabled but prometheus-client is not installed (pip install unsup3d[monitoring]): "
                            "no metrics")
                self.enabled = False
        self.metrics = None
        self.exporter = None
        self.progress = None
        self.timer: SectionTimer = SectionTimer(enabled=True, device=device) if self.enabled else NO_TIMER
        self._skipped_seen: dict[str, int] | None = None
        self._step_started = time.perf_counter()
        self._images_per_second: float | None = None
        self._flops_counted = not (self.enabled and cfg.count_flops)
        self._peak = None
        if not self.enabled:
            return
        from monitoring.exporter import MetricsExporter
        from monitoring.metrics import TrainingMetrics
        from monitoring.mfu import peak_flops

        run = cfg.run_name or Path(out_dir).resolve().name
        self.metrics = TrainingMetrics(run, config.category, group.rank)
        self.metrics.total_steps.set(total_steps)
        port = cfg.port + group.local_rank if cfg.port else 0
        sd_dir = cfg.sd_dir if cfg.sd_dir is not None else str(Path(out_dir) / "prometheus_sd")
        try:
            self.exporter = MetricsExporter(self.metrics.registry, cfg.bind_address, port, sd_dir,
                                            labels=self.metrics.labels, advertise_address=cfg.advertise_address).start()
        except OSError as error:  # an unknown host, a port in use or below 1024: the keys to change, in one line
            raise ValueError(f"monitoring: cannot serve metrics on {cfg.bind_address!r} port {port}: "
                             f"{error.strerror or error} (monitoring.bind_address, monitoring.port; "
                             "monitoring.enabled: false turns the endpoint off)") from None
        # Once per rank, as a log line (a local run's console shows it once; a cluster's logs once per rank).
        sd = self.exporter.sd_file or "not written, see the warning above"
        log.info("metrics: %s (rank %d, Prometheus file_sd entry %s)", self.exporter.url, group.rank, sd)
        precision = config.engine.precision
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self._peak = peak_flops(name, precision, cfg.peak_tflops)

    # --- hooks called by the Trainer ----------------------------------------------------------
    def start(self, step: int, resumed_from: Path | None, log_every: int) -> None:
        if self.metrics is not None:
            self.metrics.step.set(step)
            if resumed_from is not None:
                self.metrics.record_restart("resumed_from_checkpoint")
                self.metrics.checkpoint_time.set(resumed_from.stat().st_mtime)
        if self.cfg.progress_bar and self.local and self.group.is_main:
            from monitoring.progress import ProgressBar

            self.progress = ProgressBar(self.total_steps, start_step=step, every=log_every)
        self._step_started = time.perf_counter()

    def count_flops(self, module: torch.nn.Module, criterion, image: torch.Tensor, epoch: int) -> None:
        """FLOPs per training image, once: forward and backward of a copy of the nets on the first batch
        (RNG state kept, so training is unchanged). Convolutions and matmuls only, like bench_train."""
        if self._flops_counted:
            return
        self._flops_counted = True
        from torch.utils.flop_counter import FlopCounterMode

        try:
            shadow = copy.deepcopy(module)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
                first = next(shadow.parameters())  # as TrainModule.forward, untimed
                terms = criterion(image, shadow.decompose(image.to(first.dtype)), epoch=epoch)
                terms["total"].backward()
            del shadow
            self.metrics.flops_per_image.set(counter.get_total_flops() / image.shape[0])
        except Exception as error:  # an estimate must never stop training
            log.warning("FLOP count for MFU failed: %s", error)

    def step_done(self, step: int, images: int, skipped: bool, terms: dict, epoch: int, data, ds_engine) -> None:
        now = time.perf_counter()
        seconds, self._step_started = now - self._step_started, now
        loss = None
        if self.metrics is not None or self.progress is not None:
            loss = float(terms["total"].detach()) if "total" in terms else None
        if self.metrics is not None:
            losses = {k: float(v.detach()) for k, v in terms.items()}
            grad_norm = None
            try:
                value = ds_engine.get_global_grad_norm()
                grad_norm = float(value) if value is not None else None
                learning_rate = float(ds_engine.get_lr()[0])
            except Exception:
                learning_rate = None
            self.metrics.record_step(step, images, seconds, losses, self.timer.reset(), grad_norm, learning_rate,
                                     nonfinite=skipped, epoch=epoch)
            self._record_data(data)
        if self.progress is not None:
            self.progress.update(step, self._images_per_second, loss)

    def window(self, images_per_second: float) -> None:
        """Every log_every steps: the run's images/s, MFU and the GPU."""
        self._images_per_second = images_per_second
        if self.metrics is None:
            return
        self.metrics.images_per_second.set(images_per_second)
        if self._peak:  # MFU per device: this rank's share of the run's images/s
            flops = self.metrics.flops_per_image.get()
            if flops:
                self.metrics.mfu.set(flops * images_per_second / self.group.world_size / self._peak)
        if self.device.type == "cuda":
            try:
                utilization = torch.cuda.utilization(self.device) / 100.0
            except Exception:  # needs pynvml / NVML
                utilization = None
            free, total = torch.cuda.mem_get_info(self.device)
            self.metrics.record_gpu(utilization, torch.cuda.memory_allocated(self.device), total,
                                    torch.cuda.max_memory_allocated(self.device))

    def pause(self, seconds: float) -> None:
        """Time spent between steps on something else (validation) is not part of the next step's time,
        nor of the progress bar's rate."""
        self._step_started += seconds
        if self.progress is not None:
            self.progress.pause(seconds)

    def validation_baselines(self, record: dict, images: int) -> None:
        """The baselines of validation (a "validation_baselines" record of trainer/loop/validation.py)."""
        if self.metrics is None:
            return
        self.metrics.validation_images.set(images)
        for method in ("constant_depth", "average_train_depth"):
            block = record.get(method)
            if isinstance(block, dict):
                self.metrics.record_validation(method, block["side_x1e-2"]["mean"], block["mad_deg_reference"]["mean"],
                                               block["mad_deg_exact"]["mean"])

    def validated(self, step: int, block: dict, seconds: float) -> None:
        """The model's validation scores at `step` (a metric block of trainer/results/evaluate.py)."""
        if self.metrics is None:
            return
        self.metrics.record_validation("model", block["side_x1e-2"]["mean"], block["mad_deg_reference"]["mean"],
                                       block["mad_deg_exact"]["mean"], step=step, seconds=seconds)

    def saved(self, seconds: float, path: Path) -> None:
        if self.metrics is not None and self.group.is_main:
            self.metrics.record_checkpoint(seconds, checkpoint_size(path))
        elif self.metrics is not None:
            self.metrics.checkpoint_time.set(time.time())

    def rolled_back(self) -> None:
        if self.metrics is not None:
            self.metrics.record_rollback()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    def _record_data(self, data) -> None:
        try:
            stats = data_stats(data)
        except Exception as error:
            log.debug("no data-pipeline stats: %s", error)
            return
        skipped = stats.get("skipped")
        if skipped is not None:
            if self._skipped_seen is None:  # counts from before this process (a resumed epoch) are not ours
                self._skipped_seen = dict(skipped)
            for reason, count in skipped.items():
                self.metrics.record_skipped(reason, count - self._skipped_seen.get(reason, 0))
                self._skipped_seen[reason] = max(count, self._skipped_seen.get(reason, 0))
        if "queue_depth" in stats:
            self.metrics.record_queue(stats["queue_depth"], stats.get("queue_capacity"))


__all__ = ["TrainMonitor", "data_stats"]
