"""The `unsup3d` command: train here; the other subcommands register from their own modules (fleet_cli,
new_category, results_cli: evaluate/demo/export, generate_cli, data_pipeline.cli: prepare).

This module composes the packages (DESIGN: cluster is the only composer). Heavy imports happen inside
the subcommands so that `unsup3d --help` is instant and a bad config fails before any model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# Named, not __name__: under `python -m cluster.cli` that is "__main__", which the console does not
# count as the project's own (cluster.console.PROJECT_LINE).
log = logging.getLogger("cluster.cli")


def _launched_by_torch_launcher() -> bool:
    """torchrun / the DeepSpeed launcher already started one process per rank: train in this one."""
    return "WORLD_SIZE" in os.environ and "RAY_JOB_ID" not in os.environ and "RAY_ADDRESS" not in os.environ


def _trains_in_process(args: argparse.Namespace) -> bool:
    """--no-ray, --workers 0, or a process a torch launcher started."""
    return args.no_ray or args.workers == 0 or _launched_by_torch_launcher()


def _use_ray(args: argparse.Namespace) -> bool:
    if _trains_in_process(args):
        return False
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: see cluster.ray_train.loopback_only
        if args.address or args.workers > 1:
            raise ValueError("Ray is not installed (pip install 'unsup3d[cluster]'); it is needed for "
                             "--address and --workers > 1") from None
        log.warning("Ray is not installed: training in this process")
        return False
    return True


# What a launcher (torchrun, the deepspeed launcher) tells a process about its group; a world of one
# trained in this process sets them itself.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _train_in_process(config) -> dict:
    """Train here; the launch variables the process group set for itself are taken back afterwards,
    so that a later command in the same process (tests, notebooks) is not taken for a torchrun rank."""
    saved = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    try:
        return _train_here(config)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _train_here(config) -> dict:
    from cluster.data_source import train

    # Under torchrun / the deepspeed launcher every rank streams its own part of the shards.
    result = train(config)
    return {"steps": result.steps, "checkpoint": result.checkpoint, "losses": result.last_losses}


def parse_settings(settings: list[str]) -> dict:
    """--set KEY=VALUE (repeatable): any key of the run config, the value read as YAML (`--set
    data.batch_size=8`, `--set train.eval_every=null`); checked like the file's own keys."""
    import yaml

    parsed = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {setting!r}: expected KEY=VALUE, e.g. --set data.batch_size=8")
        parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return parsed


def _worker_count(text: str):
    """--workers: a count, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {text!r}") from None


def _auto_workers(args: argparse.Namespace, config) -> int:
    """--workers auto: on an embedded Ray training on the CPU, the workers that split data.batch_size
    (then the global batch) evenly (cluster.ray_train.auto_worker_count); one worker where training
    runs in this process, on a GPU, or without Ray."""
    import importlib.util

    if args.address or os.environ.get("RAY_ADDRESS"):
        raise ValueError("--workers auto is for the embedded Ray of this machine; on a cluster (--address or "
                         "RAY_ADDRESS) give the number of workers")
    if _trains_in_process(args) or importlib.util.find_spec("ray") is None:
        return 1
    import torch

    if config.train.device != "cpu" and torch.cuda.is_available():  # the GPU does the work: one worker
        return 1
    from cluster.ray_train import auto_worker_count

    batch = config.data.batch_size
    workers = auto_worker_count(batch)
    log.info("--workers auto: %d worker(s) of %d image(s) each, global batch %d (data.batch_size)",
             workers, batch // workers, batch)
    return workers


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.job_config import check_sources, load_job_config

    # Command-line overrides go into the file's data, so they are checked (and named) like its keys.
    overrides = {key: value for key, value in (("train.out_dir", args.out_dir), ("train.max_steps", args.max_steps),
                                               ("category", args.category)) if value is not None}
    overrides.update(parse_settings(args.set or []))
    config = load_job_config(args.config, overrides)
    if args.workers == "auto":
        args.workers = _auto_workers(args, config)
        if args.workers > 1:
            per_worker_batch = config.data.batch_size // args.workers
            overrides["data.batch_size"] = per_worker_batch
            if config.stream is not None:
                overrides["stream.batch_size"] = per_worker_batch
            config = load_job_config(args.config, overrides)
    if not (args.address or os.environ.get("RAY_ADDRESS")):  # paths mean here what they mean to the workers
        check_sources(config, args.config)
    if not _use_ray(args):
        from cluster.console import quiet_libraries
        from trainer.config_loading import require

        # Only the Ray driver stages an s3:// out_dir (cluster/storage.py); here it would be a local folder "s3:".
        require("://" not in config.train.out_dir, f"{args.config}: train.out_dir", config.train.out_dir,
                "an s3:// out_dir is trained through Ray (drop --no-ray / --workers 0), or use a local path")
        with quiet_libraries(config.train.out_dir):  # DeepSpeed's own lines: <out_dir>/logs/deepspeed.log
            summary = _train_in_process(config)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))
        return 0

    from cluster.ray_train import Resources, connect, local_cpus_per_worker, run_training

    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    cpus = args.cpus_per_worker
    if cpus is None:  # an embedded Ray gives training the machine; a cluster worker asks for one CPU
        cpus = local_cpus_per_worker(args.workers) if embedded else 1.0
    resources = Resources(workers=args.workers, cpus_per_worker=cpus, gpus_per_worker=args.gpus_per_worker,
                          max_failures=args.max_failures)
    from cluster.console import EmbeddedRayConsole
    from cluster.ray_train import run_lock

    # One run per out_dir: the lock comes before the console's <out_dir>/logs, so a refused second run
    # writes nothing into the first one's out_dir.
    with run_lock(config.train.out_dir) if embedded else contextlib.nullcontext():
        console = EmbeddedRayConsole(config.train.out_dir) if embedded else None
        try:
            how = connect(args.address, console=console)
            try:
                final = run_training(config, resources, run_name=args.run_name, locked=embedded)
            finally:
                if how == "local":  # the embedded Ray is ours: stop it (never `ray stop`, which stops every Ray here)
                    import ray

                    ray.shutdown()
        finally:
            if console is not None:
                console.close()
    print(json.dumps(final))
    return 0


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS; neither: start a local Ray "
                   "on 127.0.0.1 for this command)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unsup3d", description="Unsup3D: 3D shape from single images, at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before our arguments; $LOCAL_RANK, which the
    # trainer reads, holds the same value.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run from a YAML config")
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--out-dir", help="override train.out_dir")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--category", help="override category (also the metrics label)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set data.batch_size=8 (repeatable; the value is YAML)")
    add_ray_arguments(p)
    p.add_argument("--workers", type=_worker_count, default=1,
                   help="Ray Train workers (one DeepSpeed rank each); 0 trains in this process without Ray; 'auto' "
                        "(embedded Ray only): as many workers as split data.batch_size evenly with at least 8 images "
                        "each, at most one per core, the cores shared among them; data.batch_size is then the "
                        "global batch")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs (and torch threads) per worker; default: an embedded Ray splits every core of this "
                        "machine among the workers, a cluster gives each worker 1")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="1 on GPU nodes (then NCCL)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="times the worker group is restarted (from the latest checkpoint) after a worker dies")
    p.add_argument("--run-name", help="Ray Train run name (default <category>-<out_dir name>)")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process (also automatic under torchrun / the deepspeed launcher)")
    p.set_defaults(func=cmd_train)

    from cluster.fleet_cli import add_fleet_subcommand

    add_fleet_subcommand(sub)
    from cluster.new_category import add_new_category_subcommand

    add_new_category_subcommand(sub)
    from cluster.results_cli import add_results_subcommands

    add_results_subcommands(sub)
    from cluster.generate_cli import add_generate_subcommand

    add_generate_subcommand(sub)

    try:
        from data_pipeline.cli import add_prepare_subcommand
    except ImportError:
        pass  # the data pipeline extra is not installed
    else:
        add_prepare_subcommand(sub, synthetic_generator=_generate_synthetic)
    return parser


def _generate_synthetic(root, args: argparse.Namespace) -> None:
    """`prepare --source synthetic`: data_pipeline knows no model code, so the generator is handed in."""
    from trainer.data.synthetic import main_generate

    main_generate(str(root), args.image_size or 64, args.num_samples, 0, 0, args.seed)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that wait by sleeping, not spinning (unless the environment says otherwise): on a
    # machine shared with other jobs, torch with 2 spinning threads on 2 busy cores trained about 10x
    # slower than with 1 thread, and with passive waiting 2 threads were the faster (BENCHMARKS.md,
    # "Embedded Ray uses every core"). Set before torch loads OpenMP; Ray's processes inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    from trainer.loop.checkpoint import CheckpointError
    from trainer.config_loading import ConfigError
    from trainer.data.head_model import HeadModelError
    from trainer.data.synface import SynfaceError
    from trainer.loop.run_lock import RunLockedError

    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - Ray wraps a worker's error; unwrap the ones that are bad input
        found = _user_error(error, (ConfigError, CheckpointError, FileNotFoundError, ValueError, RunLockedError,
                                    HeadModelError, SynfaceError, FileExistsError, NotADirectoryError,
                                    IsADirectoryError, PermissionError))
        full = _disk_full(error)
        if found is None and full is None:
            raise
        if isinstance(found, OSError) and found.filename is not None:  # a path given where it cannot be used
            found = f"{found.filename}: {found.strerror}"
        # Bad input or a full disk: a one-line message that names what was wrong, not a traceback.
        text = " ".join(str(found if found is not None else full).split())
        print(f"unsup3d {args.command}: error: {text[:2000]}", file=sys.stderr)
        return 2


def _disk_full(error: BaseException | None) -> str | None:
    """'no space left on <path>' when `error` (or what it wraps) is a full disk, else None."""
    import errno

    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on {error.filename or 'the device'}"
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _user_error(error: BaseException, kinds: tuple) -> BaseException | None:
    """`error` itself or the cause it wraps (Ray Train's TrainingFailedError) when that is bad input."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, kinds):
            return error
        failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> exception
        if failures:
            for failure in failures.values():
                found = _user_error(failure, kinds)
                if found is not None:
                    return found
        error = error.__cause__ or error.__context__
        seen += 1
    return None


if __name__ == "__main__":
    sys.exit(main())
