"""Learning curves of training runs on a data set with truth (issue 12's learning study).

For every kept checkpoint of each run (and the untrained model of the run's config, as step 0):
SIDE and MAD on a split, the two baselines on the same images, and the truth probe's correlations
(trainer/results/truth_probe.py: yaw, pitch, roll, light, per-image depth departure). Results are cached
per run in <out>/<run name>.jsonl (a checkpoint already scored is not scored again), and one
figure with a panel per measure is drawn to <out>/learning_study.png.

    python benchmarks/learning_study.py --data data/faces --out study runs/faces-default runs/faces-ref

Runs may still be training: score what is there, run the command again later for the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.model.config import ModelConfig  # noqa: E402
from trainer.config_loading import from_dict  # noqa: E402
from trainer.loop.checkpoint import CheckpointError  # noqa: E402
from trainer.results.evaluate import checkpoints_in, evaluate  # noqa: E402
from trainer.model.unsup3d import Unsup3D  # noqa: E402
from trainer.loop.rng import seed_everything  # noqa: E402

PANELS = (
    ("side_x1e-2", "SIDE (x1e-2)", True),
    ("mad_deg_exact", "MAD, exact normals (deg)", True),
    ("yaw", "yaw correlation", False),
    ("pitch", "pitch correlation", False),
    ("roll", "roll correlation", False),
    ("light_x", "light x correlation", False),
    ("depth_departure", "per-image depth correlation", False),
    ("depth_departure_interior", "per-image depth, interior only", False),
)


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint the run keeps so far (none yet: [])."""
    try:
        paths = checkpoints_in(run / "checkpoints")
    except CheckpointError:
        return []
    return [(int(p.name.split("_")[1].split(".")[0]), p) for p in paths]


def untrained_checkpoint(run: Path, folder: Path) -> Path:
    """A single-file checkpoint of the run's model, freshly initialised with the run's seed."""
    text = (run / "config.yaml").read_text()
    config = yaml.safe_load(text)  # the saved config may hold other packages' sections: read two
    seed_everything(int(config.get("train", {}).get("seed", 0)))
    model = Unsup3D(from_dict(ModelConfig, config["model"], "model"))
    path = folder / f"{run.name}-step0.pt"
    torch.save({"step": 0, "model": model.state_dict(), "config_yaml": text}, path)
    return path


def score(checkpoint: Path, data: str, split: str) -> dict:
    result = evaluate(str(checkpoint), data, split=split, device="cpu", report_dir=None)
    row = {"step": result["step"]}
    for method in ("model", "constant_depth", "average_train_depth"):
        block = result[method] if method in result else result["baselines"][method]
        for metric in ("side_x1e-2", "mad_deg_reference", "mad_deg_exact"):
            row[f"{method}/{metric}"] = block[metric]["mean"]
    row.update(result["truth_correlation"])  # evaluate adds it: the split holds the generator's truth
    return row


def score_run(run: Path, data: str, split: str, out: Path) -> list[dict]:
    cache = out / f"{run.name}.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    done = {r["step"] for r in rows}
    todo = [(s, p) for s, p in checkpoints(run) if s not in done]
    if 0 not in done:
        with tempfile.TemporaryDirectory() as tmp:
            todo.insert(0, (0, untrained_checkpoint(run, Path(tmp))))
            rows += _score_all(todo[:1], data, split, cache)
        todo = todo[1:]
    rows += _score_all(todo, data, split, cache)
    return sorted(rows, key=lambda r: r["step"])


def _score_all(todo, data, split, cache) -> list[dict]:
    rows = []
    for step, path in todo:
        row = score(path, data, split)
        row["step"] = step
        rows.append(row)
        with open(cache, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (key, title, is_metric) in zip(axes.ravel(), PANELS):
        for name, rows in runs.items():
            steps = [r["step"] for r in rows]
            values = [r.get(f"model/{key}" if is_metric else key, float("nan")) for r in rows]
            ax.plot(steps, values, marker="o", markersize=3, label=name)
        if is_metric:
            first = next(iter(runs.values()))[0]
            ax.axhline(first[f"average_train_depth/{key}"], color="k", linestyle="--", label="average train depth")
            ax.axhline(first[f"constant_depth/{key}"], color="gray", linestyle=":", label="constant depth")
        else:
            ax.axhline(0.0, color="gray", linewidth=0.5)
            ax.set_ylim(-0.7, 1.0)  # a negative correlation (the hollow-face solution) must show
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (train.out_dir)")
    parser.add_argument("--data", required=True, help="synface-layout folder with <split>/truth.npz")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="folder for the per-run JSONL caches and the figure")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {Path(r).name: score_run(Path(r), args.data, args.split, out) for r in args.runs}
    plot(runs, out / "learning_study.png")
    print(f"wrote {out / 'learning_study.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
