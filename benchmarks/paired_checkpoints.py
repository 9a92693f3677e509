"""Two checkpoints on the same test faces, image by image (issue 12's learning study).

A difference between two runs' mean MAD or per-image depth departure r is only worth reporting if
it is larger than what the choice of test images alone would make of it. For each image this takes
checkpoint B's value minus A's (MAD with exact normals; the departure r of truth_probe), and prints
the mean difference with a 95% bootstrap interval over images and the share of images where B is
better. The interval covers image sampling only, not training noise (another seed could differ more).

    python benchmarks/paired_checkpoints.py runs/A/checkpoints/step_N runs/B/checkpoints/step_N data/faces
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.face_generator import read_truth  # noqa: E402
from trainer.data.synface import FAR_DEPTH, SynfaceFolder  # noqa: E402
from trainer.results.evaluate import evaluate_detailed, load_model  # noqa: E402
from trainer.results.truth_probe import COMMON_REGION_SHARE, _departures, _erode, pearson  # noqa: E402


def per_image(checkpoint: str, data: str, split: str) -> tuple[dict, dict]:
    """({image name: MAD exact}, {image name: depth departure r}) of one checkpoint."""
    _, values, _ = evaluate_detailed(checkpoint, data, split, 64, "cpu", "raise", worst=0)
    mad = dict(zip(values.names, values.values["model"]["mad_deg_exact"]))
    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    model.eval()
    truth = read_truth(data, split)
    index = {str(n): i for i, n in enumerate(truth["names"])}
    names, depths = [], []
    with torch.no_grad():
        for batch in SynfaceFolder(data, split, image_size=config.image_size, on_error="raise").batches(64):
            names += batch["name"]
            depths.append(model.decompose(batch["image"]).canon_depth[:len(batch["name"])].numpy())
    pred = np.concatenate(depths)
    true = truth["canonical_depth"][[index[n] for n in names]].astype(np.float32)
    region = _erode((true < FAR_DEPTH).mean(0) >= COMMON_REGION_SHARE, 1)
    p, t = _departures(pred, true, region)
    return mad, {n: pearson(p[i], t[i]) for i, n in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="checkpoint A (e.g. the control)")
    parser.add_argument("b", help="checkpoint B")
    parser.add_argument("data", help="faces folder whose split has truth.npz")
    parser.add_argument("--split", default="test")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    a, b = per_image(args.a, args.data, args.split), per_image(args.b, args.data, args.split)
    rng = np.random.default_rng(0)
    for k, (name, lower_is_better) in enumerate((("MAD exact", True), ("depth departure r", False))):
        keys = sorted(set(a[k]) & set(b[k]))
        diff = np.array([b[k][n] - a[k][n] for n in keys])
        boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(args.resamples)]
        better = np.mean(diff < 0) if lower_is_better else np.mean(diff > 0)
        print(f"{name}: A {np.mean([a[k][n] for n in keys]):.3f}  B {np.mean([b[k][n] for n in keys]):.3f}  "
              f"B-A {diff.mean():+.3f} [{np.percentile(boots, 2.5):+.3f}, {np.percentile(boots, 97.5):+.3f}]  "
              f"B better on {better:.0%} of {len(keys)} images")


if __name__ == "__main__":
    main()
