"""The training loop: build, resume, step, log, checkpoint, on a DeepSpeed engine.

Side concerns live in their own modules of trainer/loop: the process group (process_group.py), the
engine and its precision (engine.py), checkpoints (checkpoint.py, read back by checkpoint_load.py),
RNG state (rng.py), the device (device.py), metrics.jsonl on resume (metrics_log.py); data comes from
any BatchSource, or a DataFactory that builds one once the process group exists (cluster/data_source.py
streams data.root's cached shards or a stream: section's through data_pipeline).
Resuming is automatic: if out_dir/checkpoints holds a checkpoint the run continues from it,
including every rank's data position and every RNG, so the result is bit-identical to a run that
was never interrupted. A step whose loss or gradients are not finite is skipped (all ranks agree);
after engine.max_nonfinite_steps in a row the run rolls back to the last checkpoint.

The loop runs on whatever process group it finds (torchrun, the DeepSpeed launcher, Ray Train) or a
local world of one; metrics and logs come from rank 0, and so does validation (SIDE and MAD on a
fixed subset of a split with depth every train.eval_every steps, trainer/loop/validation.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Union

import torch

from trainer.loop.checkpoint import CheckpointError, CheckpointManager, SaveHook, fp32_model_state
from trainer.loop.checkpoint_load import read_state, verify_ds_files
from trainer.loop.safe_files import write_atomically
from trainer.config import RunConfig, dump_config
from trainer.model.config import model_config_hash
from trainer.loop.process_group import ProcessGroup, all_gather_object, any_rank, init_process_group
from trainer.loop.engine import build_engine
from trainer.model.unsup3d import Unsup3DLoss
from trainer.loop.monitor import TrainMonitor
from trainer.model.perceptual import build_perceptual_net
from trainer.loop.validation import Validator
from trainer.loop.run_lock import RunLock, RunLockedError
from trainer.loop.device import resolve_device
from trainer.loop.metrics_log import drop_records_after
from trainer.loop.rng import load_rng_state, rng_state, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    last_losses: dict
    checkpoint: str | None
    images_per_second: float


class BatchSource(Protocol):
    """What the loop needs of its data: endless batches dict(image [B,3,H,W] in [-1,1], ...), the
    epoch of the next batch, the epoch length, and a resumable position."""

    epoch: int
    batches_per_epoch: int

    def __next__(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


DataFactory = Callable[[ProcessGroup, torch.device], BatchSource]
"""Builds the batch source once the trainer has its process group and device; the trainer then owns it
(closes it, if it has close(), when the run ends). A source may say `reads_data_root = True`: its
batches come from data.root, so validation may read data.root's val split."""
DataArg = Union[BatchSource, DataFactory]


class NonFiniteTraining(RuntimeError):
    """Training keeps producing non-finite losses or gradients and rollbacks did not help."""


class Trainer:
    """One run on one process of the group; `run()` trains to the end."""

    def __init__(self, config: RunConfig, data: DataArg, after_save: SaveHook | None = None,
                 lock_out_dir: bool = True):
        """`after_save`: told of every checkpoint saved (the cluster uploads them with it; see SaveHook).
        `lock_out_dir`: rank 0 holds out_dir's run lock (trainer/loop/run_lock.py) until close(); False where the
        caller holds it already (the Ray driver)."""
        self.config = config
        self.out_dir = Path(config.train.out_dir)
        self.group: ProcessGroup = init_process_group(resolve_device(config.train.device).type)
        self.device = resolve_device(config.train.device, self.group.local_rank)
        self.run_lock = self._lock_out_dir() if lock_out_dir else None
        self._owned_data = None  # a source built here from a DataFactory, closed by close()
        try:
            self._build(config, data, after_save)
        except BaseException:
            self.close()
            raise

    def _lock_out_dir(self) -> RunLock | None:
        """Rank 0 takes the lock before anything is written to out_dir; every rank raises if it is held."""
        from trainer.loop.process_group import broadcast_object

        lock, refused = None, None
        if self.group.is_main:
            try:
                lock = RunLock(self.out_dir).acquire()
            except RunLockedError as error:
                refused = str(error)
        refused = broadcast_object(refused)
        if refused is not None:
            raise RunLockedError(refused)
        return lock

    def close(self) -> None:
        """Stop the monitor (its metrics endpoint and file_sd entry), close a batch source built here and
        release out_dir's run lock (idempotent; also after a run that failed before its loop began)."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()
        if self._owned_data is not None and hasattr(self._owned_data, "close"):
            self._owned_data.close()
        self._owned_data = None
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _build(self, config: RunConfig, data: DataArg, after_save: SaveHook | None) -> None:
        if self.group.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config.train.seed)
        self.engine = build_engine(config, self.group.world_size, self.device)
        perceptual = build_perceptual_net(config.perceptual) if config.loss.lam_perc > 0 else None
        if perceptual is not None:
            perceptual = perceptual.to(self.device)
        self.criterion = Unsup3DLoss(config.loss, perceptual, config.model)
        if data is None:
            raise ValueError("no batch source: pass one (or a DataFactory); `unsup3d train` and "
                             "cluster.data_source.train stream data.root or the stream: section's shards")
        if callable(data) and not hasattr(data, "__next__"):  # a DataFactory
            data = self._owned_data = data(self.group, self.device)
        # Else the data comes from elsewhere (e.g. a stream: section's shards): validation needs train.eval_data.
        trains_from_root = bool(getattr(data, "reads_data_root", False))
        self.data = data
        self.accumulation = self.engine.config.gradient_accumulation_steps
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep=config.train.keep_checkpoints,
                                             after_save=after_save)
        max_steps = config.train.max_steps  # 0 is a run of no step: the initial weights saved as step 0
        self.total_steps = (max_steps if max_steps is not None
                            else max(1, config.train.epochs * data.batches_per_epoch // self.accumulation))
        self.arch_hash = model_config_hash(config.model)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.rollbacks = 0
        self.metrics_file = None
        self._pending_records: list[dict] = []  # recorded once metrics.jsonl is open
        self._validation_images: torch.Tensor | None = None
        self._first_images: torch.Tensor | None = None
        # Metrics (monitoring/), the step-time breakdown and the local progress bar: trainer/loop/monitor.py.
        self.monitor = TrainMonitor(config, self.group, self.device, self.total_steps, self.out_dir)
        self.timer = self.monitor.timer
        # SIDE and MAD on a fixed validation subset every train.eval_every steps (rank 0): trainer/loop/validation.py.
        self.validator = Validator(config, self.out_dir, self.group.is_main, trains_from_root, self.record,
                                   self.monitor)

    # --- checkpoints -------------------------------------------------------------------------
    def restore(self, path: Path) -> None:
        state = read_state(path)
        if state["model_config_hash"] != self.arch_hash and not self.config.train.allow_other_model_config:
            raise CheckpointError(
                f"{path} was made with another model config (hash {state['model_config_hash']}, this run "
                f"{self.arch_hash}); use another train.out_dir, restore the model section, or set "
                "train.allow_other_model_config: true to load it anyway")
        if state["world_size"] != self.group.world_size:
            raise CheckpointError(f"{path} was saved by {state['world_size']} processes, this run has "
                                  f"{self.group.world_size}: every rank's data position and ZeRO partition must match")
        verify_ds_files(path, state)
        try:
            loaded, _ = self.engine.engine.load_checkpoint(str(path), tag="ds", load_module_strict=True)
        except CheckpointError:
            raise
        except Exception as error:  # shape mismatches and the like, from DeepSpeed or torch
            raise CheckpointError(f"cannot load {path} into this model: {error}") from error
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path}")
        mine = state["ranks"][str(self.group.rank)]
        self.data.load_state_dict(mine["data"])
        load_rng_state(mine["rng"])
        self.step = int(state["step"])
        self._apply_optimizer_config(path)
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])

    def _apply_optimizer_config(self, path: Path) -> None:
        """The restored optimizer state brings the checkpoint's hyperparameters back; this run's config says
        what they are now. Each difference is applied to every param group and logged (and, on rank 0,
        recorded in metrics.jsonl once it is open)."""
        opt = self.config.optimizer
        wanted = {"lr": float(opt.lr), "betas": tuple(float(b) for b in opt.betas), "weight_decay": float(opt.weight_decay)}
        changes: dict = {}
        for group in self.engine.gate.optimizer.param_groups:
            for key, value in wanted.items():
                if key not in group:
                    continue
                old = tuple(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
                if old != value:
                    changes.setdefault(key, old)
                    group[key] = value
        for key, old in changes.items():
            if self.group.is_main:
                log.warning("optimizer.%s changed from %s (in %s) to %s (this run's config): applied to the restored "
                            "optimizer", key, old, path.name, wanted[key])
            entry = {"event": "config_change", "step": self.step, "key": f"optimizer.{key}",
                     "checkpoint": list(old) if isinstance(old, tuple) else old,
                     "config": list(wanted[key]) if isinstance(wanted[key], tuple) else wanted[key]}
            if self.metrics_file is not None:  # a rollback during the run
                self.record(entry)
            else:
                self._pending_records.append(entry)

    def save(self) -> Path:
        per_rank = all_gather_object({"data": self.data.state_dict(), "rng": rng_state()})
        model_state = fp32_model_state(self.engine)
        shared = {"epoch": int(self.data.epoch), "skipped_steps": self.skipped_steps,
                  "consecutive_nonfinite": self.consecutive_nonfinite, "model_config_hash": self.arch_hash,
                  "config_yaml": dump_config(self.config), "engine": json.dumps(self.engine.ds_config, sort_keys=True)}
        started = time.perf_counter()
        path = self.checkpoints.save(self.step, self.engine.engine, shared, per_rank,
                                     model_state if self.group.is_main else None, self.group.rank)
        self.monitor.saved(time.perf_counter() - started, path)
        return path

    def rollback(self) -> None:
        limit = self.engine.config.max_nonfinite_steps
        latest = self.checkpoints.latest()
        if latest is None:
            raise NonFiniteTraining(f"{limit} non-finite steps in a row at step {self.step} and no checkpoint to roll back to")
        if self.rollbacks >= self.engine.config.max_rollbacks:
            raise NonFiniteTraining(f"{limit} non-finite steps in a row at step {self.step} after "
                                    f"{self.rollbacks} rollbacks (engine.max_rollbacks); giving up")
        self.rollbacks += 1
        self.monitor.rolled_back()
        at = self.step
        self.restore(latest)
        log.warning("rolling back to %s (step %d) after %d non-finite steps in a row at step %d (rollback %d of at most %d)",
                    latest.name, self.step, limit, at, self.rollbacks, self.engine.config.max_rollbacks)
        self.record({"event": "rollback", "from_step": at, "step": self.step, "checkpoint": latest.name})

    def visualize(self) -> None:
        """The validation grid of this step, next to the checkpoints."""
        from trainer.results.visualize import save_validation_grid, validation_images

        if self._validation_images is None:
            count = self.config.train.visualize_count
            try:
                self._validation_images = validation_images(self.config.data.root, count=count,
                                                            image_size=self.config.model.image_size)
            except ValueError:  # streaming from shards: no folder to read, use the head of a batch
                self._validation_images = self._first_images[:count]
        path = self.out_dir / "visuals" / f"step_{self.step:08d}.png"
        save_validation_grid(self.engine.module, self._validation_images, path)

    def record(self, entry: dict) -> None:
        if self.metrics_file is not None:
            try:
                self.metrics_file.write(json.dumps(entry) + "\n")
                self.metrics_file.flush()
            except OSError as error:  # a full disk: name the file (a buffered write's error names none)
                raise OSError(error.errno, error.strerror, self.metrics_file.name) from error

    # --- the loop ----------------------------------------------------------------------------
    def train_step(self) -> tuple[dict, int, bool]:
        """One optimizer step over `accumulation` micro-batches; returns (loss terms, images, skipped)."""
        ds = self.engine.engine
        images = 0
        terms: dict = {}
        timer = self.timer
        for micro in range(self.accumulation):
            with timer("data_wait"):
                batch = next(self.data)
            image = batch["image"]
            if self._first_images is None:
                self._first_images = image.detach().clone()
                self.monitor.count_flops(self.engine.module, self.criterion, image, self.data.epoch)
            with timer("forward"):
                decomposition = ds(image, timer=timer)  # TrainModule.forward -> decompose(image, timer)
            with timer("loss"):
                terms = self.criterion(image, decomposition, epoch=self.data.epoch, timer=timer)
            self.engine.watch.check_loss(terms["total"])
            with timer("backward"):
                ds.backward(terms["total"])
            images += image.shape[0]
            if micro < self.accumulation - 1:
                with timer("optimizer"):
                    ds.step()  # DeepSpeed only counts the micro-step here
        bad = any_rank(self.engine.watch.take(), self.device)
        self.engine.gate.skip = bad
        try:
            with timer("optimizer"):
                ds.step()
        finally:
            self.engine.gate.skip = False
        return terms, images, bad

    def run(self) -> TrainResult:
        latest = self.checkpoints.latest()
        if latest is not None:
            self.restore(latest)
            log.info("resumed from %s at step %d", latest, self.step)
        elif self.checkpoints.legacy_checkpoints():
            raise CheckpointError(f"{self.checkpoints.directory} holds single-file checkpoints of an earlier version, "
                                  "which cannot resume a DeepSpeed run; use another train.out_dir "
                                  "(unsup3d evaluate still reads them)")
        if self.group.is_main:
            # Only now, with the checkpoint it resumes from accepted: config.yaml describes this run.
            write_atomically(self.out_dir / "config.yaml", dump_config(self.config).encode())
            metrics = self.out_dir / "metrics.jsonl"
            if latest is not None:
                dropped = drop_records_after(metrics, self.step)
                if dropped:
                    log.info("metrics.jsonl: dropped %d records logged after step %d (those steps are redone)",
                             dropped, self.step)
            self.metrics_file = open(metrics, "a")
        for entry in self._pending_records:
            self.record(entry)
        self._pending_records.clear()
        cfg = self.config.train
        self.engine.module.train()
        losses: dict = {}
        images_per_second = 0.0
        saved: Path | None = latest
        try:
            self.validator.start(self.engine.module, self.step)  # scores the untrained model at step 0
            self.monitor.start(self.step, latest, cfg.log_every)
            window_start, window_images = time.perf_counter(), 0
            while self.step < self.total_steps:
                terms, images, skipped = self.train_step()
                self.step += 1
                window_images += images * self.group.world_size
                self.monitor.step_done(self.step, images, skipped, terms, self.data.epoch, self.data, self.engine.engine)
                if skipped:
                    self.skipped_steps += 1
                    self.consecutive_nonfinite += 1
                    log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row, %d in all)",
                                self.step, self.consecutive_nonfinite, self.skipped_steps)
                    if self.consecutive_nonfinite >= self.engine.config.max_nonfinite_steps:
                        self.rollback()
                        saved = self.checkpoints.latest()
                        window_start, window_images = time.perf_counter(), 0
                        continue
                else:
                    self.consecutive_nonfinite = 0
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    images_per_second = window_images / elapsed
                    self.monitor.window(images_per_second)
                    losses = {k: float(v.detach()) for k, v in terms.items()}
                    record = {"step": self.step, "epoch": self.data.epoch, "images_per_second": images_per_second,
                              "skipped_steps": self.skipped_steps, **losses}
                    grad_norm = self.engine.engine.get_global_grad_norm()
                    if grad_norm is not None and not skipped:
                        record["grad_norm"] = float(grad_norm)
                    self.record(record)
                    if self.group.is_main:
                        log.info("step %d/%d epoch %d loss %.4f (%s) %.1f img/s", self.step, self.total_steps,
                                 self.data.epoch, losses["total"],
                                 " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total"), images_per_second)
                    window_start, window_images = time.perf_counter(), 0
                # Before the save: a run killed between the two redoes this point instead of losing it.
                if self.validator.due(self.step, self.total_steps):
                    spent = self.validator.validate(self.engine.module, self.step)
                    window_start += spent  # validation is not training time (images/s, step time)
                    self.monitor.pause(spent)
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    saved = self.save()
                if cfg.visualize_every and self.step % cfg.visualize_every == 0 and self.group.is_main:
                    self.visualize()
            if saved is None or saved.name != self.checkpoints.path_for(self.step).name:
                saved = self.save()
        finally:
            self.validator.close()
            self.monitor.close()
            if self.metrics_file is not None:
                self.metrics_file.close()
                self.metrics_file = None
        if self.group.is_main:
            log.info("finished at step %d (%d skipped); checkpoint %s", self.step, self.skipped_steps, saved)
        return TrainResult(self.step, losses, str(saved) if saved else None, images_per_second)


def train(config: RunConfig, data: DataArg, after_save: SaveHook | None = None) -> TrainResult:
    """Train (or resume) the run described by `config` on `data` (a BatchSource or a DataFactory).
    Holds out_dir's run lock meanwhile (RunLockedError if another run holds it)."""
    trainer = Trainer(config, data, after_save)
    own_group = trainer.group.created_here and trainer.group.world_size > 1
    try:
        result = trainer.run()
        if own_group:
            import torch.distributed as dist

            # Every rank done before any tears its group down: rank 0 hosts the rendezvous store, and a
            # rank still talking to it when rank 0 exits was seen to abort ("terminate called without an
            # active exception") after a finished run. Only after a normal finish: a rank that failed
            # must not wait here for ranks that will never come.
            dist.barrier()
        return result
    finally:
        trainer.close()
        trainer.engine.engine.destroy()
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
