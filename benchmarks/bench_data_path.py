"""The default run's images/s through two source trees (e.g. before and after a data-path change), interleaved.

    python benchmarks/bench_data_path.py --tree before=/tmp/before --tree after=/tmp/after \
        --tree after-pil=/tmp/after:hide=nvidia.dali --data /tmp/faces --steps 200 --rounds 3 --threads 2

Each round runs every tree once, in order, as `unsup3d train --no-ray` on configs/default.yaml (of that tree)
with data.root, out_dir and max_steps replaced, validation off and no checkpoint before the end: a fresh
out_dir every time, so every run trains the same steps from scratch. A tree given as PATH:hide=MODULES runs
with those modules hidden (benchmarks/gpu_check_sandbox/sitecustomize.py), e.g. DALI, as on a machine
without it. Reported per run: the mean of the images/s that rank 0 logs every train.log_every steps,
leaving out the first window (start-up: the first batches, DALI's pipeline build), and the command's wall
time. Every tree sees the same data folder; a data-path cache in it is prepared before the first round,
so the rounds measure steady-state training, not preparation (whose time is printed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml


def run_once(tree: Path, hide: str, data: Path, out: Path, steps: int, threads: int, log_every: int) -> dict:
    config = yaml.safe_load((tree / "configs" / "default.yaml").read_text())
    config["data"]["root"] = str(data)
    config["train"].update({"out_dir": str(out), "max_steps": steps, "eval_every": 0, "log_every": log_every,
                            "checkpoint_every": steps})
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    python_path = [str(tree)]
    if hide:
        python_path.insert(0, str(tree / "benchmarks" / "gpu_check_sandbox"))
        env["UNSUP3D_HIDE_MODULES"] = hide
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main(sys.argv[1:]))",
                           "train", "--no-ray", "--config", str(path)], env=env, cwd=tree, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{tree} failed ({done.returncode}): {done.stderr[-2000:]}")
    rates = [json.loads(line)["images_per_second"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"images_per_second"' in line]
    return {"img_s": statistics.mean(rates[1:]), "windows": rates, "wall_s": wall}


# The batch source of `unsup3d train --no-ray` on data.root, timed on its own (no training): before this
# change the in-memory folder loader, after it the cached shards' stream (cluster/data_source.py).
_DATA_ONLY = """
import json, sys, time, torch
import yaml
from trainer.config_loading import load_yaml_config
from trainer.config import RunConfig
config = yaml.safe_load(open(sys.argv[1]))
started = time.perf_counter()
try:
    from cluster.data_source import batch_source
    from trainer.loop.process_group import ProcessGroup
    from cluster.job_config import load_job_config
    run = load_job_config(sys.argv[1])
    source = batch_source(run)(ProcessGroup(0, 1, 0, "none", False), torch.device("cpu"))
except ImportError:
    from trainer.data.folder_data import FolderBatches
    run = load_yaml_config(RunConfig, sys.argv[1])
    source = FolderBatches(run.data.root, run.data.split, run.model.image_size, run.data.batch_size, run.train.seed,
                           run.data.hflip_probability)
built = time.perf_counter() - started
epochs = []  # ms per batch of each epoch (the first decodes, later ones may come from memory)
for _ in range(int(sys.argv[2])):
    count = source.batches_per_epoch
    started = time.perf_counter()
    for _ in range(count):
        next(source)
    epochs.append(1000 * (time.perf_counter() - started) / count)
getattr(source, "close", lambda: None)()
print(json.dumps({"build_s": built, "epoch_ms": epochs}))
"""


def data_only(tree: Path, hide: str, data: Path, work: Path, batches: int) -> dict:
    config = yaml.safe_load((tree / "configs" / "default.yaml").read_text())
    config["data"]["root"] = str(data)
    config["train"]["out_dir"] = str(work / "unused")
    work.mkdir(parents=True, exist_ok=True)
    path = work / "data-only.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    if hide:
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "benchmarks" / "gpu_check_sandbox"), str(tree)])
        env["UNSUP3D_HIDE_MODULES"] = hide
    done = subprocess.run([sys.executable, "-c", _DATA_ONLY, str(path), str(batches)], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tree} data-only failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH[:hide=MODULES]")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-data-path"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data-only", type=int, default=0, metavar="EPOCHS",
                        help="first time each tree's batch source alone for this many epochs (one thread), interleaved")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the 2-step warm-up runs (when any cache in --data is ready)")
    args = parser.parse_args()
    trees = []
    for spec in args.tree:
        name, rest = spec.split("=", 1)
        path, _, hide = rest.partition(":hide=")
        trees.append((name, Path(path), hide))
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS={args.threads}, {args.steps} steps", flush=True)
    for name, tree, hide in trees if args.warmup else []:  # prepares any cache once, outside the measured rounds
        result = run_once(tree, hide, args.data, args.work / f"warmup-{name}", 2, args.threads, 1)
        print(f"warm-up {name}: 2 steps in {result['wall_s']:.1f} s", flush=True)
    if args.data_only:
        loaders: dict[str, list[dict]] = {name: [] for name, _, _ in trees}
        for round_ in range(args.rounds):
            for name, tree, hide in trees:
                result = data_only(tree, hide, args.data, args.work / f"data-{name}", args.data_only)
                loaders[name].append(result)
                print(f"data-only round {round_} {name}: built in {result['build_s']:.1f} s, ms per batch by epoch "
                      f"{[round(m, 2) for m in result['epoch_ms']]}", flush=True)
        print("\n| batch source | built in (s), mean | first epoch, ms per batch (rounds) | later epochs, ms per batch "
              "(rounds) |\n|---|---|---|---|")
        for name, _, _ in trees:
            runs = loaders[name]
            first = [r["epoch_ms"][0] for r in runs]
            later = [statistics.mean(r["epoch_ms"][1:]) for r in runs if len(r["epoch_ms"]) > 1]
            print(f"| {name} | {statistics.mean(r['build_s'] for r in runs):.1f} | "
                  f"{', '.join(f'{m:.1f}' for m in first)} | {', '.join(f'{m:.1f}' for m in later)} |", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in trees}
    for round_ in range(args.rounds if args.steps else 0):
        for name, tree, hide in trees:
            result = run_once(tree, hide, args.data, args.work / f"r{round_}-{name}", args.steps, args.threads,
                              args.log_every)
            results[name].append(result)
            print(f"round {round_} {name}: {result['img_s']:.1f} img/s (windows {[round(r, 1) for r in result['windows']]}), "
                  f"{result['wall_s']:.0f} s", flush=True)
    if not args.steps:
        return
    first = trees[0][0]
    base = statistics.mean(r["img_s"] for r in results[first])
    print(f"\n| tree | img/s per round | mean | vs {first} |\n|---|---|---|---|")
    for name, _, _ in trees:
        rates = [r["img_s"] for r in results[name]]
        mean = statistics.mean(rates)
        print(f"| {name} | {', '.join(f'{r:.1f}' for r in rates)} | {mean:.1f} | {mean / base:.3f} |")
    print(f"# ended {datetime.now(timezone.utc):%H:%M} UTC, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
