"""Training through Ray Train: one TorchTrainer per run, DeepSpeed inside every worker (via trainer.loop.train).

Who does what:
- Ray Train starts the workers, sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and creates the
  torch process group (gloo on CPU, NCCL on GPU); trainer.loop.process_group.init_process_group reuses it.
- Each worker builds its own data source (its part of the shard stream: data.root's local cache of
  shards or a stream: section's, cluster/data_source.py) and calls
  trainer.loop.train.train, which resumes by itself from <train.out_dir>/checkpoints/latest.
- Fault tolerance: FailureConfig(max_failures) makes Ray Train tear the whole worker group down when a
  worker dies and start a new one; the new workers resume from our own latest checkpoint. Our
  checkpoint directory is the single source of truth (Ray Train's own checkpoints are not used), so
  train.out_dir must be storage that every worker sees: a local path on one machine, a shared
  filesystem (NFS, EFS, FSx, GCS/S3 mounts) on a multi-node cluster, or s3://, which needs no shared
  filesystem (each node stages its files locally and S3 holds the checkpoints; see storage.py).

Only this package imports Ray; the trainer runs unchanged under torchrun, the DeepSpeed launcher or here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORKERS_DIR = "workers"  # <out_dir>/workers/rank_<r>.json: pid, node, attempt of the live workers


def loopback_only() -> None:
    """Make Ray nodes started by this process bind to 127.0.0.1 instead of the machine's external address.
    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import, into ray_constants.ENABLE_RAY_CLUSTER and
    then uses 127.0.0.1 as the node address; when Ray is already imported the constant is set too.
    Only for local Ray (a laptop, tests): a driver joining a real cluster must keep its real address."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def connect(address: str | None = None, num_cpus: int | None = None, console=None) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start an embedded local Ray on 127.0.0.1.
    Returns how it connected ("existing", "cluster" or "local"). `console`: for an embedded Ray, a
    cluster.console.EmbeddedRayConsole that keeps Ray's and DeepSpeed's own lines off the console."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    # A laptop or a test: Ray listens on loopback only, and so does the rendezvous of several workers
    # (cluster/ray_process_group.py). The dashboard (on 127.0.0.1) serves the
    # State API, which Ray Train's placement-group cleaner polls every few seconds: without it every
    # poll logs "Failed to query Ray Train Controller actor state" to the console. (With two embedded
    # Rays on one machine the cleaner cannot tell which to ask and its thread exits with one
    # traceback; training is unaffected.)
    loopback_only()
    if console is not None:
        console.before_init()
    # address="local": a new instance of our own. Without an address ray.init joins the latest cluster
    # anyone started on this machine (/tmp/ray/ray_current_cluster): another user's, or a test's.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             num_cpus=num_cpus, log_to_driver=True)
    if console is not None:
        console.after_init()
    return "local"


@dataclass
class Resources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    """Ray CPUs per worker; the worker trains with this many torch threads (at least one)."""
    gpus_per_worker: float = 0.0
    max_failures: int = 3


def local_cpus_per_worker(workers: int) -> float:
    """The embedded Ray's share of this machine per worker: every core, split evenly. One worker with
    every core against one worker per core: BENCHMARKS.md, "Embedded Ray uses every core"."""
    return float(max(1, (os.cpu_count() or 1) // max(1, workers)))


# A worker's share of the global batch under `--workers auto` stays at least this many images. A floor,
# not a measured optimum: with fewer images a step's fixed costs (Python, the optimizer, the
# all-reduce) weigh more per image.
AUTO_MIN_WORKER_BATCH = 8


def auto_worker_count(global_batch: int, cores: int | None = None) -> int:
    """`--workers auto` on an embedded Ray: the most workers, at most one per core, that split the
    global batch evenly with at least AUTO_MIN_WORKER_BATCH images each (1 if none does); the cores
    are then shared among them (local_cpus_per_worker).

    Several single-threaded workers beat one worker with every thread on an idle machine: two
    1-thread workers did 1.26x one 2-thread worker on 2 cores, 1.28x with bf16 nets (BENCHMARKS.md,
    "The default in about 15 minutes"); under load the order reversed (BENCHMARKS.md, "Embedded Ray
    uses every core"). More than 2 cores: not measured."""
    cores = cores or os.cpu_count() or 1
    fitting = [w for w in range(1, cores + 1)
               if global_batch % w == 0 and global_batch // w >= AUTO_MIN_WORKER_BATCH]
    return max(fitting, default=1)


def _uses_working_dir() -> bool:
    """True inside `ray job submit --working-dir ...`: every node has its own copy of the working dir and
    relative paths mean the same thing on every worker."""
    import ray

    try:
        return bool(ray.get_runtime_context().runtime_env.get("working_dir"))
    except Exception:  # noqa: BLE001 - older/newer runtime context shapes: assume no working dir
        return False


def resolve_paths(config) -> None:
    """Make relative local paths absolute against this (the driver's) directory, unless a job working dir
    makes them meaningful on every worker as they are."""
    if _uses_working_dir():
        return
    if "://" not in config.train.out_dir:
        config.train.out_dir = str(Path(config.train.out_dir).resolve())
    if config.data.root and "://" not in config.data.root:
        config.data.root = str(Path(config.data.root).resolve())
    if config.train.eval_data:
        config.train.eval_data = str(Path(config.train.eval_data).resolve())
    stream = getattr(config, "stream", None)
    if stream is not None and "://" not in stream.shards:
        stream.shards = str(Path(stream.shards).resolve())


def parameter_digest(module) -> str:
    """SHA-256 over every parameter's bytes, in name order: equal on every rank of a correct data-parallel run."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _train_and_digest(config, data, after_save=None):
    """trainer.loop.train.train, keeping the module long enough to fingerprint this rank's final weights.
    Ray Train owns the process group, so (as in train()) only the engine is torn down here."""
    from trainer.loop.train import Trainer

    trainer = Trainer(config, data, after_save, lock_out_dir=False)  # the driver holds out_dir's lock
    try:
        result = trainer.run()
        return result, parameter_digest(trainer.engine.module)
    finally:
        trainer.close()  # closes the batch source it built
        trainer.engine.engine.destroy()


def _write_worker_file(out_dir: str, rank: int, run: str, extra: dict | None = None) -> None:
    """Where each worker is (pid, node): lets an operator or a test kill one, and `fleet status` show them."""
    if "://" in out_dir:
        return
    directory = Path(out_dir) / WORKERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank, "run": run, "started": time.time(),
             **(extra or {})}
    try:
        import ray

        entry["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        pass
    tmp = directory / f".rank_{rank}.json.{os.getpid()}"
    tmp.write_text(json.dumps(entry))
    tmp.replace(directory / f"rank_{rank}.json")


def train_worker(payload: dict) -> None:
    """The function every Ray Train worker runs."""
    import ray
    import ray.train

    from cluster.storage import staged_out_dir

    config = copy.deepcopy(payload["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Labels for metrics and logs (read by monitoring through the environment; the trainer knows no Ray).
    os.environ["UNSUP3D_RUN"] = payload["run"]
    os.environ["UNSUP3D_CATEGORY"] = config.category
    from cluster.console import configure_worker_logging

    configure_worker_logging(payload["run"], rank)
    # Ray gives a worker as many threads as its CPUs only sometimes (OMP_NUM_THREADS is 1 for fractional
    # or unset CPUs): set them from what the worker asked for.
    threads = max(1, int(payload.get("threads", 1)))
    import torch

    torch.set_num_threads(threads)
    logging.getLogger(__name__).info("rank %d trains with %d torch thread(s)", rank, threads)
    node_id = ray.get_runtime_context().get_node_id()  # s3:// outputs are staged per node: no shared filesystem
    with staged_out_dir(config, rank, node_id) as (out_dir, after_save):
        config.train.out_dir = out_dir
        _write_worker_file(out_dir, rank, payload["run"])
        from cluster.data_source import batch_source

        result, digest = _train_and_digest(config, batch_source(config), after_save)
        _write_worker_file(out_dir, rank, payload["run"], {"finished_step": result.steps, "param_sha256": digest})
    metrics = {"step": result.steps, "checkpoint": result.checkpoint or "",
               "images_per_second": result.images_per_second}
    metrics.update({f"loss_{k}": v for k, v in result.last_losses.items()})
    ray.train.report(metrics)


def run_training(config, resources: Resources, run_name: str | None = None, address: str | None = None,
                 locked: bool = False) -> dict:
    """Train `config` (a JobConfig) on a Ray cluster with `resources`; blocks until it ends. Returns the
    run name and its out_dir's step, last loss and latest checkpoint. Raises ray.train.TrainingFailedError once max_failures restarts are used up."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.ray_process_group import torch_config

    connect(address)
    config = copy.deepcopy(config)
    resolve_paths(config)
    run = run_name or f"{config.category}-{Path(config.train.out_dir.rstrip('/')).name}"
    monitoring = getattr(config, "monitoring", None)
    if run_name and monitoring is not None and monitoring.run_name is None:
        monitoring.run_name = run_name  # the metrics' `run` label (category is config.category)
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    from cluster.storage import ray_storage_path

    log.info("run %s: %d worker(s), %s per worker, out_dir %s, up to %d restarts", run, resources.workers,
             per_worker, config.train.out_dir, resources.max_failures)
    # One run per out_dir, taken before anything (Ray's run state included) is written there and held
    # for the whole run and its restarts; the workers do not take it again.
    # locked: the caller (the CLI, before it opens <out_dir>/logs) already holds it.
    with contextlib.nullcontext() if locked else run_lock(config.train.out_dir):
        preflight(config, resources.workers)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": config, "run": run, "threads": resources.cpus_per_worker},
            torch_config=torch_config(use_gpu),  # one worker: no rendezvous port (ray_process_group.py)
            scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=run, storage_path=ray_storage_path(config.train.out_dir),
                                 failure_config=FailureConfig(max_failures=resources.max_failures)),
        )
        trainer.fit()
    return {"run": run, **summarize_run(config.train.out_dir)}


def run_lock(out_dir: str):
    """The driver's hold on out_dir: the lock file of trainer/loop/run_lock.py for a local path; for s3://
    the lease object of cluster/lease.py (drivers on any machine), then this machine's staging folder's lock."""
    from cluster.storage import is_remote, staging_dir_for
    from trainer.loop.run_lock import RunLock

    if not is_remote(out_dir):
        return RunLock(out_dir)
    return _leased(out_dir, RunLock(staging_dir_for(out_dir, "driver").parent))


@contextlib.contextmanager
def _leased(out_dir: str, local_lock):
    from cluster.lease import S3Lease

    with S3Lease(out_dir), local_lock:
        yield


def preflight(config, workers: int) -> None:
    """Refuse, before any worker starts, a local checkpoint the workers would refuse (and be restarted
    max_failures times for): another model config, or another number of ranks."""
    if "://" in config.train.out_dir:
        return
    from trainer.loop.checkpoint import CheckpointError, CheckpointManager
    from trainer.loop.checkpoint_load import read_state
    from trainer.model.config import model_config_hash

    latest = CheckpointManager(Path(config.train.out_dir) / "checkpoints").latest()
    if latest is None:
        return
    state = read_state(latest)
    if state["model_config_hash"] != model_config_hash(config.model) and not config.train.allow_other_model_config:
        raise CheckpointError(f"{latest} was made with another model config; use another train.out_dir, restore the "
                              "model section, or set train.allow_other_model_config: true")
    if state["world_size"] != workers:
        raise CheckpointError(f"{latest} was saved by {state['world_size']} workers; resume it with "
                              f"--workers {state['world_size']}")


def summarize_run(out_dir: str) -> dict:
    """Step, last logged losses and latest checkpoint of a run, from its out_dir (local paths only)."""
    if "://" in out_dir:
        return {"out_dir": out_dir}
    root = Path(out_dir)
    summary: dict = {"out_dir": out_dir, "step": None, "loss": None, "checkpoint": None}
    pointer = root / "checkpoints" / "latest"
    if pointer.exists():
        summary["checkpoint"] = str(root / "checkpoints" / pointer.read_text().strip())
    metrics = root / "metrics.jsonl"
    if metrics.exists():
        for line in reversed(metrics.read_text().splitlines()):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "total" in entry:
                summary["step"], summary["loss"] = entry.get("step"), entry["total"]
                break
    return summary
