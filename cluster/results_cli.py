"""`unsup3d evaluate`, `demo` and `export`: the commands that read a trained model (a run's checkpoint or
the shipped one) and write what people look at. Registered by cluster/cli.py like the fleet and
new-category commands; heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def add_results_subcommands(sub) -> None:
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
