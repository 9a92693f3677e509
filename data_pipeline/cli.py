"""`unsup3d prepare`: the subcommand the project's CLI (cluster/cli.py) registers.

    from data_pipeline.cli import add_prepare_subcommand
    add_prepare_subcommand(subparsers, synthetic_generator=lambda root, args: main_generate(...))

`synthetic_generator(root: Path, args: argparse.Namespace)` writes a synface-layout tree under root;
only the caller knows the generator (this package never imports the trainer). Without it,
--source synthetic is refused with a message.

Examples:
    unsup3d prepare --source folder --input photos/ --output data/shards/dogs --category dogs
    unsup3d prepare --source folder --preset cats --input cats/ --output s3://bucket/cats/train --category cats
    unsup3d prepare --source celeba --input CelebA/ --split train --output data/shards/celeba/train --category faces
    unsup3d prepare --source synface --input synface/ --split test --output data/shards/synface/test --category faces
    unsup3d prepare --source synthetic --output data/shards/synthetic/train --category synthetic --num-samples 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from data_pipeline.config import PrepareConfig, RetryConfig, S3Config
from data_pipeline.sources import PRESETS

SyntheticGenerator = Callable[[Path, argparse.Namespace], None]


def add_prepare_subcommand(subparsers, synthetic_generator: SyntheticGenerator | None = None) -> argparse.ArgumentParser:
    """Register `prepare` on an argparse subparsers object; sets func=run_prepare."""
    p = subparsers.add_parser(
        "prepare", help="write tar shards + DALI index files + manifest from images (local or s3://)",
        description="Shard a dataset for the training pipeline. Destination: a local folder or s3://bucket/prefix "
                    "(endpoint and credentials from --s3-endpoint-url or the AWS_* environment variables).")
    p.add_argument("--source", required=True, choices=("folder", "celeba", "synface", "synthetic"),
                   help="folder: any images (a new category); celeba: bounding-box crop (SPEC 5); synface: "
                        "<input>/<split>/image/*_image.png with depth/*_depth.png; synthetic: generated, then as synface")
    p.add_argument("--input", help="input folder (not used by --source synthetic)")
    p.add_argument("--output", required=True, help="destination folder or s3://bucket/prefix")
    p.add_argument("--category", required=True, help="object category recorded in the manifest")
    p.add_argument("--split", default="train", help="split to shard (celeba: train/val/test/all; synface: sub-folder)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="cats/synface: centre crop 170 px; celeba: 128 px")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, help="stored side length (default: celeba 128, folder 128 without a "
                                                  "crop, else the crop's size)")
    p.add_argument("--crop", type=int, help="centre crop side in source pixels before resizing")
    p.add_argument("--format", dest="image_format", choices=("auto", "jpg", "png"), default="auto")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--bbox-file", help="celeba: celeba_crop_bbox.txt or list_bbox_celeba.txt")
    p.add_argument("--partition-file", help="celeba with list_bbox_celeba.txt: list_eval_partition.txt")
    p.add_argument("--max-samples", type=int, help="stop after this many samples")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="skip images with more pixels, read from the header before decoding (too_large)")
    p.add_argument("--min-image-size", type=int,
                   help="skip crops with a side below this, never upscaled (too_small; default half of --image-size)")
    p.add_argument("--s3-endpoint-url", help="S3 endpoint (default $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", help="S3 region (default $AWS_REGION / $AWS_DEFAULT_REGION)")
    p.add_argument("--num-samples", type=int, default=2000, help="synthetic: images to generate")
    p.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    p.set_defaults(func=run_prepare, synthetic_generator=synthetic_generator)
    return p


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    preset = PRESETS.get(args.preset or "", {})
    source = "synface" if args.source == "synthetic" else args.source
    if args.source != "synthetic" and not args.input:
        raise ValueError(f"--source {args.source} needs --input")
    return PrepareConfig(
        source=source, input=args.input or "", output=args.output, category=args.category, split=args.split,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size if args.image_size is not None else preset.get("image_size"),
        crop=args.crop if args.crop is not None else preset.get("crop"),
        image_format=args.image_format, jpeg_quality=args.jpeg_quality, bbox_file=args.bbox_file,
        partition_file=args.partition_file, max_samples=args.max_samples,
        max_image_pixels=args.max_image_pixels, min_image_size=args.min_image_size,
        s3=S3Config(endpoint_url=args.s3_endpoint_url, region=args.s3_region), retry=RetryConfig())


def run_prepare(args: argparse.Namespace) -> int:
    """Run `unsup3d prepare`; prints a JSON summary. Raises ValueError/FileNotFoundError on bad input."""
    from data_pipeline.prepare import prepare_dataset, prepare_synthetic

    config = config_from_args(args)
    if args.source == "synthetic":
        generator = getattr(args, "synthetic_generator", None)
        if generator is None:
            raise ValueError("--source synthetic needs a generator: this unsup3d build registered prepare without "
                             "one (generate a synface folder first, then use --source synface)")
        manifest = prepare_synthetic(lambda root: generator(root, args), config,
                                     description=f"seed={args.seed} num_samples={args.num_samples}")
    else:
        manifest = prepare_dataset(config)
    dataset = manifest.dataset
    print(json.dumps({"output": args.output, "samples": manifest.num_samples, "shards": len(manifest.shards),
                      "image_size": dataset.image_size, "category": dataset.category, "split": dataset.split,
                      "has_depth": dataset.has_depth, "skipped": dataset.prepare_skipped,
                      "converted": dataset.prepare_converted}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m data_pipeline.cli prepare ...), without the synthetic source."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="data_pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
