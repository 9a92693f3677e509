"""CPU training speed of several variants, measured side by side (issue 14).

    python benchmarks/bench_speed.py --recipe default --widths 16 --batch 32 --threads 1 \\
        --baseline bba37c2 --variant now: --variant bf16:engine.precision=bf16 \\
        --variant bf16-compiled:engine.precision=bf16,engine.compile=true --rounds 12

Each variant is a worker process (its own DeepSpeed state, compile cache and thread setting) that
builds the trainer's engine for the recipe (benchmarks/profile_step.py's recipes and widths) and
runs the trainer's step (profile_step.Step) on the same random batches from the same seed. The
driver lets the workers take turns, one step each, for --rounds rounds in a shuffled order per
round, so that load from other processes on a shared machine falls on every variant alike; the
figures are medians over the rounds, and each variant's ratio is its median speed over the first
variant's. --baseline COMMIT adds a first variant "baseline" that runs the trainer code of that git
commit (git archive into a temporary directory), i.e. before the changes under test.

Reported per variant: images/s by the wall clock and images per CPU-second of the worker (on a
loaded machine the wall clock also counts time spent waiting for a core; with 1 thread the CPU time
is the step's own work, so that ratio is the steadier one), ratios, warm-up time (the first --warmup steps, which include any
compile), and the loss after warm-up and rounds (all variants see the same batches, so a variant
that changes the numerics shows it here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, {key: YAML value})."""
    import yaml

    name, _, spec = text.partition(":")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def worker(args) -> None:
    """Build the step for one variant, then answer 'step' with one timed step until 'quit'."""
    tree = Path(args.tree)
    sys.path.insert(0, str(tree))
    sys.path.insert(1, str(ROOT / "benchmarks"))
    import torch

    torch.set_num_threads(args.threads)
    import trainer  # noqa: F401  from `tree`: profile_step's own sys.path entry then no longer matters

    import profile_step  # noqa: E402 (this tree's benchmark helpers)

    assert Path(trainer.__file__).resolve().is_relative_to(tree.resolve()), trainer.__file__

    profile_step.ROOT = tree  # the variant's own configs
    overrides = json.loads(args.overrides)
    config = profile_step.recipe_config(args.recipe, args.widths, args.batch, overrides)
    step = profile_step.Step(config)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step.run()
    warmup = time.perf_counter() - start
    print(json.dumps({"ready": True, "warmup_s": warmup, "threads": torch.get_num_threads(),
                      "batch": config.data.batch_size}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start, cpu = time.perf_counter(), time.process_time()
        loss = step.run()
        print(json.dumps({"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "loss": loss}),
              flush=True)
    step.close()


def baseline_tree(commit: str, where: Path) -> Path:
    """The repository at `commit`, unpacked into `where` (for the baseline variant)."""
    where.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def start_worker(name: str, tree: Path, overrides: dict, args) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--tree", str(tree), "--overrides", json.dumps(overrides),
           "--recipe", args.recipe, "--widths", str(args.widths), "--batch", str(args.batch),
           "--threads", str(args.threads), "--warmup", str(args.warmup)]
    # Passive OpenMP waits, as `unsup3d train` sets them (cluster/cli.py): spinning threads make a
    # multi-thread step on a busy machine many times slower.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(tree)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=str(tree))


def read_json(proc: subprocess.Popen, name: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"variant {name}: worker exited (rc {proc.poll()})")
        if line.startswith("{"):
            return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--widths", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--baseline", metavar="COMMIT", help="add a first variant running this commit's code")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    variants = [parse_variant(v) for v in args.variant]
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        trees = {name: ROOT for name, _ in variants}
        if args.baseline:
            variants.insert(0, ("baseline", {}))
            trees["baseline"] = baseline_tree(args.baseline, Path(tmp) / "baseline")
        load_before = os.getloadavg()[0]
        # Started one after another, each ready before the next: warm-up (compile) times stay comparable.
        procs, info = {}, {}
        for name, overrides in variants:
            procs[name] = start_worker(name, trees[name], overrides, args)
            info[name] = read_json(procs[name], name)
        times = {name: [] for name, _ in variants}
        cpu_times = {name: [] for name, _ in variants}
        losses = {}
        order = [name for name, _ in variants]
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                procs[name].stdin.write("step\n")
                procs[name].stdin.flush()
                result = read_json(procs[name], name)
                times[name].append(result["s"])
                cpu_times[name].append(result["cpu_s"])
                losses[name] = result["loss"]
        for proc in procs.values():
            proc.stdin.write("quit\n")
            proc.stdin.close()
            proc.wait(timeout=120)
    first = variants[0][0]
    # Speed is images per second: a variant may change the batch size (data.batch_size=...).
    speed = {name: info[name]["batch"] / statistics.median(times[name]) for name, _ in variants}
    # Images per CPU-second of the worker: on a loaded machine the wall clock also counts the time a
    # worker waits for a core; its CPU time does not (with 1 thread, CPU time is the step's own work).
    cpu_speed = {name: info[name]["batch"] / statistics.median(cpu_times[name]) for name, _ in variants}
    base, cpu_base = speed[first], cpu_speed[first]
    now = datetime.now(timezone.utc)
    print(f"{args.recipe}, widths {args.widths}, batch {args.batch}, {args.threads} thread(s), 64 px; "
          f"{args.rounds} interleaved rounds; {now:%Y-%m-%d %H:%M} UTC; load average {load_before:.1f} at the start"
          + (f"; baseline = commit {args.baseline}" if args.baseline else ""))
    print()
    print(f"| variant | settings | img/s (wall) | vs {first} | img per CPU-s | vs {first} | step ms (median) | "
          "warm-up s | loss after |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, overrides in variants:
        median = statistics.median(times[name])
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "-"
        rows.append({"variant": name, "overrides": overrides, "images_per_s": speed[name],
                     "ratio": speed[name] / base, "images_per_cpu_s": cpu_speed[name],
                     "cpu_ratio": cpu_speed[name] / cpu_base, "step_s": median, "warmup_s": info[name]["warmup_s"],
                     "loss": losses[name], "times": times[name], "cpu_times": cpu_times[name]})
        print(f"| {name} | {settings} | {speed[name]:.1f} | {speed[name] / base:.2f}x | {cpu_speed[name]:.1f} | "
              f"{cpu_speed[name] / cpu_base:.2f}x | {1e3 * median:.0f} | "
              f"{info[name]['warmup_s']:.0f} | {losses[name]:.5f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "date": now.isoformat(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
