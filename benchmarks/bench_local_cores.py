"""How the default local run should use this machine's cores: a direct run against the embedded Ray with
one worker on every core and with one worker per core (issue 16, item 4).

Every variant is the real command (`python -m cluster.cli train`) on the same small face set, with the
default recipe (configs/default.yaml) and the same global batch; they run one after another, in
rounds, so that a change in the machine's load hits them alike. images/s is read from the run's
metrics.jsonl, leaving out the first logged window (start-up, the first batch, the FLOP count).

    python benchmarks/bench_local_cores.py --steps 24 --rounds 2

Variants:
  no-ray        --no-ray: this process, torch's default threads (every core)
  ray-1x{N}     --workers 1: the embedded default, one worker with every core (N threads)
  ray-{N}x1     --workers N --cpus-per-worker 1: one single-threaded worker per core, batch split
  ray-1x1       --workers 1 --cpus-per-worker 1: the embedded default before issue 16
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


def variants(cores: int) -> dict[str, tuple[list[str], int]]:
    """name -> (extra command-line arguments, workers)."""
    return {
        "no-ray": (["--no-ray"], 1),
        f"ray-1x{cores}": (["--workers", "1"], 1),
        f"ray-{cores}x1": (["--workers", str(cores), "--cpus-per-worker", "1"], cores),
        "ray-1x1": (["--workers", "1", "--cpus-per-worker", "1"], 1),
    }


def write_config(tmp: Path, data: Path, batch: int, steps: int, log_every: int) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["data"]["root"] = str(data)
    config["data"]["batch_size"] = batch
    config["data"]["generate_if_missing"] = None
    config["train"].update(max_steps=steps, log_every=log_every, checkpoint_every=10 * steps, eval_every=None)
    config["monitoring"] = {"count_flops": False}
    path = tmp / f"bench_{batch}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def images_per_second(out_dir: Path) -> float:
    windows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [w["images_per_second"] for w in windows if "images_per_second" in w]
    if len(rates) < 2:
        raise RuntimeError(f"{out_dir}: fewer than two logged windows")
    return sum(rates[1:]) / len(rates[1:])


def run(name: str, extra: list[str], config: Path, out_dir: Path) -> tuple[float, float]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "cluster.cli", "train", "--config", str(config), "--out-dir", str(out_dir),
               "--max-failures", "0", *extra]
    if "--no-ray" in extra:
        command.remove("--max-failures")
        command.remove("0")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return images_per_second(out_dir), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="global batch (split among the workers)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="comma-separated variant names")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    chosen = variants(cores)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = tmp / "faces"
        subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--out", str(data), "--kind", "faces",
                        "--num-train", "128", "--num-val", "8", "--num-test", "8"], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results: dict[str, list[float]] = {k: [] for k in chosen}
        for r in range(args.rounds):
            for variant, (extra, workers) in chosen.items():
                config = write_config(tmp, data, args.batch // workers, args.steps, args.log_every)
                rate, seconds = run(variant, extra, config, tmp / f"{variant}_{r}")
                results[variant].append(rate)
                print(json.dumps({"round": r, "variant": variant, "images_per_second": round(rate, 2),
                                  "wall_seconds": round(seconds, 1), "load": os.getloadavg()[0]}), flush=True)
    reference = sum(results["no-ray"]) / len(results["no-ray"]) if results.get("no-ray") else None
    for variant, rates in results.items():
        mean = sum(rates) / len(rates)
        ratio = f", {mean / reference:.2f}x no-ray" if reference else ""
        print(f"{variant}: {mean:.1f} img/s (rounds: {', '.join(f'{r:.1f}' for r in rates)}){ratio}")


if __name__ == "__main__":
    main()
