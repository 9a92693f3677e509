"""Does any of the three fidelity options (issue 12 item 6) change what a short CPU run learns?

Not a test. Trains configs/default.yaml (widths 16, batch 32, --seed, default 0) for --steps steps once per
variant, one run after another (each in its own process, torch threads 1), evaluates each final
checkpoint on the test split with `unsup3d evaluate`, and prints a markdown table: SIDE, MAD (the
reference's normalisation and the exact one), the training step time against the baseline, and the
final training loss.

Variants: baseline (our defaults), pixel_centre reference, shading_normal_eps 1e-7, supersample 2,
and all three (configs/synface.yaml's model options).

    unsup3d generate --out data/synthetic-black --background black
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fidelity.py --steps 300

Step time, three ways: the median wall time per step over the metrics.jsonl windows (log_every
steps each) after the first one (start-up and the one-off FLOP count); the training process's whole
CPU time (start-up included); and, because wall times on a shared machine follow its load, a
separate in-process measurement of CPU time per training step (forward, backward, Adam; one fixed
batch; the variants interleaved, --timing-rounds rounds of --timing-steps steps each).

Cross-evaluation: pixel_centre moves the rendered depth, so the metric itself depends on it (the
generator's true depth uses integer centres). Each trained checkpoint is also evaluated with the
other pixel_centre, to separate what training learned from where the evaluation samples.

--reuse skips the training of variants whose runs are already in --out (reads their results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "baseline": {},
    "pixel_centre reference": {"pixel_centre": "reference"},
    "shading_normal_eps 1e-7": {"shading_normal_eps": 1e-7},
    "supersample 2": {"supersample": 2},
    "all three (synface.yaml)": {"supersample": 2, "pixel_centre": "reference", "shading_normal_eps": 1e-7},
}


def slug(name: str) -> str:
    return name.split(" (")[0].replace(" ", "-")


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], log: Path) -> None:
    """One process at a time, torch on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--data", default="data/synthetic-black")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/fidelity")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every run")
    parser.add_argument("--only", nargs="*", help="variant slugs to run (default: all)")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of training again")
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--timing-rounds", type=int, default=3)
    args = parser.parse_args()
    rows = train_and_evaluate(args)
    cross = cross_evaluate(args, rows)
    cpu_step = step_cpu_times(args) if args.timing_steps > 0 else {}
    report(rows, cross, cpu_step)
    return 0


def train_and_evaluate(args) -> list[dict]:
    """Train and evaluate each variant (or read its earlier results with --reuse)."""
    base = yaml.safe_load((ROOT / args.config).read_text())
    out_root = ROOT / args.out
    rows = []
    previous = {r["variant"]: r for r in json.loads((out_root / "results.json").read_text())} \
        if args.reuse and (out_root / "results.json").exists() else {}
    for name, options in VARIANTS.items():
        if args.only and slug(name) not in args.only:
            continue
        out_dir = out_root / slug(name)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(base))
        config["model"].update(options)
        config["data"]["root"] = args.data
        config["train"].update(out_dir=str(out_dir), max_steps=args.steps, checkpoint_every=args.steps, seed=args.seed)
        config.setdefault("monitoring", {})["progress_bar"] = False
        config_path = out_dir / "config.yaml"
        if name in previous:
            rows.append({**previous[name], "out_dir": str(out_dir)})
            continue
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        if (out_dir / "metrics.jsonl").exists():
            raise SystemExit(f"{name}: {out_dir} has a run already; remove it to train again, or --reuse")

        cpu_before, started = child_cpu_seconds(), time.perf_counter()
        run([sys.executable, "-m", "cluster.cli", "train", "--no-ray", "--config", str(config_path)], out_dir / "train.log")
        wall, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu_before
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        batch = config["data"]["batch_size"]
        step_times = [batch / r["images_per_second"] for r in records[1:] if r.get("images_per_second")]
        evaluation = out_dir / "evaluation.json"
        run([sys.executable, "-m", "cluster.cli", "evaluate", "--checkpoint", str(out_dir / "checkpoints"),
             "--data", args.data, "--split", "test", "--no-report", "--output", str(evaluation)], out_dir / "evaluate.log")
        metrics = json.loads(evaluation.read_text())["model"]
        rows.append({
            "variant": name,
            "out_dir": str(out_dir),
            "side": metrics["side_x1e-2"]["mean"],
            "mad_ref": metrics["mad_deg_reference"]["mean"],
            "mad_exact": metrics["mad_deg_exact"]["mean"],
            "step_s": statistics.median(step_times) if step_times else float("nan"),
            "loss": records[-1]["total"],
            "train_wall_s": wall,
            "train_cpu_s": cpu,
        })
        print(json.dumps(rows[-1]), flush=True)

    (out_root / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def cross_evaluate(args, rows: list[dict]) -> dict[str, dict]:
    """Each run's checkpoint evaluated with the other pixel_centre: {variant: model metrics}."""
    import torch

    from trainer.results import evaluate as evaluation
    from trainer.render.renderer import Renderer, RendererConfig

    torch.set_num_threads(1)
    original = evaluation.load_model
    results = {}
    for row in rows:
        def load_swapped(checkpoint, device):
            model, config, step = original(checkpoint, device)
            other = "integer" if config.pixel_centre == "reference" else "reference"
            model.renderer = Renderer(RendererConfig(image_size=config.image_size, min_depth=config.min_depth,
                                                     max_depth=config.max_depth, supersample=config.supersample,
                                                     pixel_centre=other))
            return model, config, step

        evaluation.load_model = load_swapped
        try:
            summary, _, _ = evaluation.evaluate_detailed(str(Path(row["out_dir"]) / "checkpoints"), args.data,
                                                         "test", device="cpu", worst=0)
        finally:
            evaluation.load_model = original
        results[row["variant"]] = summary["model"]
        print(f"cross-evaluated {row['variant']}", flush=True)
    return results


def step_cpu_times(args) -> dict[str, float]:
    """Median CPU seconds per training step (forward, backward, Adam) of each variant, interleaved."""
    import torch

    from trainer.config import load_run_config
    from trainer.model.unsup3d import Unsup3D, Unsup3DLoss
    from trainer.data.synface import SynfaceFolder

    torch.set_num_threads(1)
    config = load_run_config(ROOT / args.config)
    image = next(iter(SynfaceFolder(args.data, "train", image_size=64).batches(config.data.batch_size)))["image"]
    setups = {}
    for name, options in VARIANTS.items():
        torch.manual_seed(0)
        model_config = dataclasses.replace(config.model, **options)
        model = Unsup3D(model_config)
        setups[name] = (model, Unsup3DLoss(config.loss, None, model_config),
                        torch.optim.Adam(model.parameters(), lr=config.optimizer.lr))
    times = {name: [] for name in VARIANTS}

    def step(model, criterion, optimizer):
        optimizer.zero_grad()
        criterion(image, model.decompose(image))["total"].backward()
        optimizer.step()

    for name in VARIANTS:  # warm-up
        step(*setups[name])
    for _ in range(args.timing_rounds):
        for name in VARIANTS:
            for _ in range(args.timing_steps):
                started = time.process_time()
                step(*setups[name])
                times[name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def report(rows: list[dict], cross: dict[str, dict], cpu_step: dict[str, float]) -> None:
    print("\n| variant | SIDE x1e-2 | MAD ref | MAD exact | final loss | other pixel_centre at evaluation: SIDE / MAD exact "
          "| wall s/step | CPU s/train | CPU s/step (in-process) | CPU step / baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        other = cross.get(r["variant"])
        other_text = f"{other['side_x1e-2']['mean']:.3f} / {other['mad_deg_exact']['mean']:.2f}" if other else "-"
        cpu = cpu_step.get(r["variant"])
        cpu_text = f"{cpu:.3f}" if cpu else "-"
        ratio = f"{cpu / cpu_step['baseline']:.2f}" if cpu and cpu_step.get("baseline") else "-"
        print(f"| {r['variant']} | {r['side']:.3f} | {r['mad_ref']:.2f} | {r['mad_exact']:.2f} | {r['loss']:.4f} "
              f"| {other_text} | {r['step_s']:.3f} | {r['train_cpu_s']:.0f} | {cpu_text} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
