"""How the default local run should use this machine's cores: a direct run against the embedded Ray with
one worker on every core and with one worker per core (issue 16, item 4).

Every variant is the real command (`python -m cluster.cli train`) on the same small face set, with the
default recipe (configs/default.yaml) and the same global batch; they run one after another, in
rounds, so that a change in the machine's load hits them alike. images/s is read from the run's
metrics.jsonl, leaving out the first logged window (start-up, the first batch, the FLOP count).

    python benchmarks/bench_local_cores.py --steps 24 --rounds 2
    python benchmarks/bench_local_cores.py --set model.depth_nf=16 --set model.depth_zdim=64 \
        --also-with engine.precision=bf16        # every variant also with that override, suffix "+bf16"
    python benchmarks/bench_local_cores.py --baseline bba37c2 --only baseline,ray-2x1
        # adds "baseline": that commit's code and its own configs/default.yaml, run --no-ray

Variants:
  no-ray        --no-ray: this process, torch's default threads (every core)
  ray-1x{N}     --workers 1: the embedded default, one worker with every core (N threads)
  ray-{N}x1     --workers N --cpus-per-worker 1: one single-threaded worker per core, batch split
  ray-1x1       --workers 1 --cpus-per-worker 1: the embedded default before issue 16
  torchrun-{N}x1  the direct run of the ray-{N}x1 layout: torchrun starts N single-threaded processes
                (OMP_NUM_THREADS=1, gloo on 127.0.0.1), batch split; no Ray (issue 14: the embedded
                default must train as fast as a direct run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.loop.process_group import free_port  # noqa: E402


def variants(cores: int) -> dict[str, tuple[list[str], int]]:
    """name -> (extra command-line arguments, workers)."""
    return {
        "no-ray": (["--no-ray"], 1),
        f"ray-1x{cores}": (["--workers", "1"], 1),
        f"ray-{cores}x1": (["--workers", str(cores), "--cpus-per-worker", "1"], cores),
        "ray-1x1": (["--workers", "1", "--cpus-per-worker", "1"], 1),
        f"torchrun-{cores}x1": ([TORCHRUN], cores),
    }


# A marker in a variant's arguments: start the command with torchrun instead of as one process.
TORCHRUN = "--torchrun"


def write_config(tmp: Path, data: Path, batch: int, steps: int, log_every: int, tree: Path = ROOT) -> Path:
    """tree's configs/default.yaml on data, at this per-worker batch, without evaluation or checkpoints in the window."""
    config = yaml.safe_load((tree / "configs" / "default.yaml").read_text())
    config["data"]["root"] = str(data)
    config["data"]["batch_size"] = batch
    config["data"]["generate_if_missing"] = None
    config["train"].update(max_steps=steps, log_every=log_every, checkpoint_every=10 * steps, eval_every=None)
    config["monitoring"] = {"count_flops": False}
    path = tmp / f"bench_{batch}_{'here' if tree == ROOT else tree.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def images_per_second(out_dir: Path) -> float:
    windows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [w["images_per_second"] for w in windows if "images_per_second" in w]
    if len(rates) < 2:
        raise RuntimeError(f"{out_dir}: fewer than two logged windows")
    return sum(rates[1:]) / len(rates[1:])


def run(name: str, extra: list[str], config: Path, out_dir: Path, tree: Path = ROOT,
        workers: int = 1) -> tuple[float, float]:
    """The command from tree's code; returns (images/s, wall seconds)."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    launcher = [sys.executable]
    torchrun = TORCHRUN in extra
    if torchrun:
        extra = [a for a in extra if a != TORCHRUN]
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(workers),
                     "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        env["OMP_NUM_THREADS"] = "1"
    command = [*launcher, "-m", "cluster.cli", "train", "--config", str(config), "--out-dir", str(out_dir), *extra]
    if not torchrun and "--no-ray" not in extra:  # Ray's retries: a failure should end the benchmark
        command += ["--max-failures", "0"]
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return images_per_second(out_dir), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="global batch (split among the workers)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--faces", type=int, default=128,
                        help="training faces generated for the runs (an epoch is faces / batch steps)")
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant (unsup3d train --set; repeatable)")
    parser.add_argument("--also-with", action="append", default=[], metavar="KEY=VALUE",
                        help="add a copy of every variant with this override too (named VARIANT+VALUE)")
    parser.add_argument("--baseline", metavar="COMMIT",
                        help="add a variant 'baseline': this commit's code and default config, --no-ray (no --set)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    chosen = variants(cores)
    if args.baseline:
        chosen = {"baseline": (["--no-ray"], 1), **chosen}
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    common = [a for kv in args.set for a in ("--set", kv)]
    chosen = {k: (extra if k == "baseline" else common + extra, workers) for k, (extra, workers) in chosen.items()}
    for kv in args.also_with:
        value = kv.split("=", 1)[-1]
        chosen.update({f"{k}+{value}": (extra + ["--set", kv], workers) for k, (extra, workers) in list(chosen.items())
                       if "+" not in k and k != "baseline"})
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        trees = {k: ROOT for k in chosen}
        if args.baseline:
            trees["baseline"] = tmp / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(trees["baseline"]), args.baseline], cwd=ROOT,
                           check=True, capture_output=True)
        data = tmp / "faces"
        subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--out", str(data), "--kind", "faces",
                        "--num-train", str(args.faces), "--num-val", "8", "--num-test", "8"], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results: dict[str, list[float]] = {k: [] for k in chosen}
        try:
            for r in range(args.rounds):
                for variant, (extra, workers) in chosen.items():
                    tree = trees[variant]
                    config = write_config(tmp, data, args.batch // workers, args.steps, args.log_every, tree)
                    rate, seconds = run(variant, extra, config, tmp / f"{variant}_{r}", tree, workers)
                    results[variant].append(rate)
                    print(json.dumps({"round": r, "variant": variant, "images_per_second": round(rate, 2),
                                      "wall_seconds": round(seconds, 1), "load": os.getloadavg()[0]}), flush=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT,
                               capture_output=True)
    first = "baseline" if args.baseline else "no-ray"
    reference = sum(results[first]) / len(results[first]) if results.get(first) else None
    for variant, rates in results.items():
        mean = sum(rates) / len(rates)
        ratio = f", {mean / reference:.2f}x {first}" if reference else ""
        print(f"{variant}: {mean:.1f} img/s (rounds: {', '.join(f'{r:.1f}' for r in rates)}){ratio}")


if __name__ == "__main__":
    main()
