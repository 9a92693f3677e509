"""The training metrics of one worker, as prometheus_client metrics in the worker's own registry.

Every series carries the labels run, category and rank (and some one more: term, section, reason),
so a fleet of runs and all ranks of a run can share one Prometheus and one dashboard. Rates
(images/s, the step-time breakdown, skipped samples/s) are computed in PromQL from counters, so a
scrape missed or a worker restarted loses nothing; gauges hold the last value of things that are
not rates (loss terms, grad norm, queue depth, ...).

Metric names (prefix unsup3d_):
  train_step, train_total_steps, train_epoch           gauges: progress
  train_steps_total, train_images_total                counters: optimizer steps / images of this rank
  train_images_per_second                              gauge: the windowed rate the log line shows
  train_step_seconds_total                             counter: wall time of whole optimizer steps
  train_section_seconds_total{section}                 counter: data_wait, forward, nets_forward,
                                                       render, loss, perceptual_forward, backward,
                                                       optimizer (nets_forward and render are parts
                                                       of forward, perceptual_forward of loss)
  train_loss{term}, train_grad_norm, train_learning_rate  gauges
  train_nonfinite_steps_total, train_rollbacks_total   counters
  train_last_step_timestamp_seconds                    gauge: unix time of the last finished step
  train_flops_per_image, train_mfu_ratio               gauges (MFU only where a peak is known)
  data_skipped_samples_total{reason}                   counter
  data_queue_depth, data_queue_capacity                gauges: prefetched batches waiting
  checkpoint_save_seconds, checkpoint_size_bytes       gauges: the last save
  checkpoint_saves_total                               counter
  checkpoint_last_save_timestamp_seconds               gauge: unix time of the last save (or the
                                                       resumed checkpoint's, or the worker start)
  worker_restarts_total{reason}                        counter, see record_restart
  worker_start_timestamp_seconds                       gauge
  gpu_utilization_ratio, gpu_memory_used_bytes,
  gpu_memory_total_bytes, gpu_memory_peak_bytes        gauges, only when a GPU is present
  validation_side{method}                              gauge: SIDE x1e-2 (mean over the validation
                                                       images) of method model, constant_depth or
                                                       average_train_depth (the baselines: set once)
  validation_mad_degrees{method, normals}              gauge: MAD in degrees, normals "reference"
                                                       (n/(|n|+1e-7), the paper's) or "exact"
  validation_step, validation_seconds,
  validation_images                                    gauges: step and duration of the last
                                                       validation, images in the validation set
  (validation series exist only on a worker that validates: rank 0 with train.eval_every set)
"""

from __future__ import annotations

import time
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

LABELS = ("run", "category", "rank")
PREFIX = "unsup3d_"
SECTIONS = ("data_wait", "forward", "nets_forward", "render", "loss", "perceptual_forward", "backward", "optimizer")


class _LazyGauge:
    """A gauge of the worker's labels that appears only once set: GPU and MFU series stay absent on a
    CPU worker instead of reading 0."""

    def __init__(self, family: Gauge, labels: dict):
        self._family, self._labels, self._child = family, labels, None

    def set(self, value: float) -> None:
        if self._child is None:
            self._child = self._family.labels(**self._labels)
        self._child.set(value)

    def get(self) -> float | None:
        return None if self._child is None else self._child._value.get()


class TrainingMetrics:
    """All metrics of one worker (one rank of one run). Thread-safe, as prometheus_client is."""

    def __init__(self, run: str, category: str, rank: int | str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.labels = {"run": str(run), "category": str(category), "rank": str(rank)}
        self._families: dict[str, Gauge | Counter] = {}
        g, c = self._gauge, self._counter
        self.step = g("train_step", "Optimizer steps done by the run (resumed runs start at the checkpoint's step)")
        self.total_steps = g("train_total_steps", "Optimizer steps the run trains for")
        self.epoch = g("train_epoch", "Epoch of the next batch")
        self.steps = c("train_steps", "Optimizer steps done by this process")
        self.images = c("train_images", "Images trained on by this rank")
        self.images_per_second = g("train_images_per_second", "Images/s of the whole run over the last log window")
        self.step_seconds = c("train_step_seconds", "Wall time of whole optimizer steps")
        self._section = c("train_section_seconds", "Wall time of the parts of a step", ("section",))
        self._loss = g("train_loss", "Last loss terms (total and its parts)", ("term",))
        self.grad_norm = g("train_grad_norm", "Global gradient norm of the last step that was not skipped", lazy=True)
        self.learning_rate = g("train_learning_rate", "Learning rate of the last step", lazy=True)
        self.nonfinite_steps = c("train_nonfinite_steps", "Steps skipped because the loss or gradients were not finite")
        self.rollbacks = c("train_rollbacks", "Rollbacks to the last checkpoint after repeated non-finite steps")
        self.last_step_time = g("train_last_step_timestamp_seconds", "Unix time the last step finished")
        self.flops_per_image = g("train_flops_per_image", "Training FLOPs per image (forward and backward), counted once", lazy=True)
        self.mfu = g("train_mfu_ratio", "Model FLOPs utilisation: flops_per_image x images/s / peak FLOP/s", lazy=True)
        self._skipped = c("data_skipped_samples", "Samples the data pipeline skipped, by reason", ("reason",))
        self.queue_depth = g("data_queue_depth", "Prefetched batches waiting in the data pipeline's queue", lazy=True)
        self.queue_capacity = g("data_queue_capacity", "Capacity of the data pipeline's prefetch queue", lazy=True)
        self.checkpoint_seconds = g("checkpoint_save_seconds", "Duration of the last checkpoint save")
        self.checkpoint_bytes = g("checkpoint_size_bytes", "Size on disk of the last checkpoint")
        self.checkpoint_saves = c("checkpoint_saves", "Checkpoints saved by this process")
        self.checkpoint_time = g("checkpoint_last_save_timestamp_seconds",
                                 "Unix time of the last checkpoint (the resumed one's at start, else the worker start)")
        self._restarts = c("worker_restarts", "Worker restarts: resumes from a checkpoint after a failure", ("reason",))
        self.start_time = g("worker_start_timestamp_seconds", "Unix time this worker started")
        self.gpu_utilization = g("gpu_utilization_ratio", "GPU utilisation (0..1) as reported by the driver", lazy=True)
        self.gpu_memory_used = g("gpu_memory_used_bytes", "GPU memory allocated by this process", lazy=True)
        self.gpu_memory_peak = g("gpu_memory_peak_bytes", "Peak GPU memory allocated by this process", lazy=True)
        self.gpu_memory_total = g("gpu_memory_total_bytes", "GPU memory of the device", lazy=True)
        self._validation_side = g("validation_side", "Validation SIDE x1e-2 (mean over images) of the model "
                                  "and of the baselines constant_depth and average_train_depth", ("method",))
        self._validation_mad = g("validation_mad_degrees", "Validation MAD in degrees (mean over images); normals "
                                 "'reference' (n/(|n|+1e-7), the paper's) or 'exact'", ("method", "normals"))
        self.validation_step = g("validation_step", "Step of the last validation of the model", lazy=True)
        self.validation_seconds = g("validation_seconds", "Duration of the last validation of the model", lazy=True)
        self.validation_images = g("validation_images", "Images in the validation set", lazy=True)
        now = time.time()
        self.start_time.set(now)
        self.checkpoint_time.set(now)

    # --- construction ---------------------------------------------------------------------------
    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = (), lazy: bool = False):
        family = self._make(Gauge, name, doc, extra, bind=not lazy)
        return _LazyGauge(family, self.labels) if lazy else family

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()):
        return self._make(Counter, name, doc, extra)

    def _make(self, kind, name: str, doc: str, extra: tuple[str, ...], bind: bool = True):
        family = kind(PREFIX + name, doc, LABELS + extra, registry=self.registry)
        self._families[name] = family
        # Metrics with only the worker labels are bound now; the others per value of their extra label.
        return family.labels(**self.labels) if bind and not extra else family

    # --- recording ------------------------------------------------------------------------------
    def record_step(self, step: int, images: int, seconds: float, losses: Mapping[str, float] | None = None,
                    sections: Mapping[str, float] | None = None, grad_norm: float | None = None,
                    learning_rate: float | None = None, nonfinite: bool = False, epoch: int | None = None) -> None:
        """One optimizer step: `images` of this rank in `seconds` of wall time."""
        self.step.set(step)
        self.steps.inc()
        self.images.inc(images)
        self.step_seconds.inc(max(0.0, seconds))
        for name, value in (sections or {}).items():
            self.record_section(name, value)
        if losses:
            self.record_losses(losses)
        if grad_norm is not None and not nonfinite:
            self.grad_norm.set(grad_norm)
        if learning_rate is not None:
            self.learning_rate.set(learning_rate)
        if nonfinite:
            self.nonfinite_steps.inc()
        if epoch is not None:
            self.epoch.set(epoch)
        self.last_step_time.set(time.time())

    def record_section(self, section: str, seconds: float) -> None:
        self._section.labels(**self.labels, section=section).inc(max(0.0, seconds))

    def record_losses(self, losses: Mapping[str, float]) -> None:
        for term, value in losses.items():
            self._loss.labels(**self.labels, term=term).set(float(value))

    def record_throughput(self, images_per_second: float, peak_flops: float | None = None) -> None:
        """The run's images/s over a log window; with a flop count and a peak FLOP/s also the MFU."""
        self.images_per_second.set(images_per_second)
        flops = self.flops_per_image.get()
        if peak_flops and flops:
            self.mfu.set(flops * images_per_second / peak_flops)

    def record_skipped(self, reason: str, count: int = 1) -> None:
        if count > 0:
            self._skipped.labels(**self.labels, reason=reason).inc(count)

    def record_queue(self, depth: int, capacity: int | None = None) -> None:
        self.queue_depth.set(depth)
        if capacity is not None:
            self.queue_capacity.set(capacity)

    def record_checkpoint(self, seconds: float, size_bytes: int, when: float | None = None) -> None:
        self.checkpoint_seconds.set(seconds)
        self.checkpoint_bytes.set(size_bytes)
        self.checkpoint_saves.inc()
        self.checkpoint_time.set(time.time() if when is None else when)

    def record_restart(self, reason: str = "resumed_from_checkpoint") -> None:
        """A worker restart. The trainer counts one with reason "resumed_from_checkpoint" when it starts
        and finds a checkpoint to resume from (a restart after a failure, a preemption, or a run resumed
        by hand to train longer); a cluster that restarts failed workers may count its own reasons
        (e.g. "worker_failure"). Each process counts its own, so alerts look at recent starts."""
        self._restarts.labels(**self.labels, reason=reason).inc()

    def record_rollback(self) -> None:
        self.rollbacks.inc()

    def record_gpu(self, utilization: float | None, memory_used: float | None, memory_total: float | None = None,
                   memory_peak: float | None = None) -> None:
        for gauge, value in ((self.gpu_utilization, utilization), (self.gpu_memory_used, memory_used),
                             (self.gpu_memory_total, memory_total), (self.gpu_memory_peak, memory_peak)):
            if value is not None:
                gauge.set(value)

    def record_validation(self, method: str, side: float, mad_reference: float, mad_exact: float,
                          step: int | None = None, seconds: float | None = None) -> None:
        """Validation scores of `method` ("model", "constant_depth", "average_train_depth"): SIDE x1e-2
        and MAD in degrees with the reference's and exact normal normalisation; for the model also the
        step and how long the validation took."""
        self._validation_side.labels(**self.labels, method=method).set(side)
        self._validation_mad.labels(**self.labels, method=method, normals="reference").set(mad_reference)
        self._validation_mad.labels(**self.labels, method=method, normals="exact").set(mad_exact)
        if step is not None:
            self.validation_step.set(step)
        if seconds is not None:
            self.validation_seconds.set(seconds)

    def family(self, name: str):
        """The metric family by its name without prefix (e.g. "train_loss"), for labels of one's own."""
        return self._families[name]

    def value(self, name: str, **extra: str) -> float | None:
        """The current value of one series (for tests and progress displays)."""
        suffix = "_total" if isinstance(self._families[name], Counter) else ""
        return self.registry.get_sample_value(PREFIX + name + suffix, {**self.labels, **extra})
