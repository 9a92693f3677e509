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

from benchmarks.depth_departure_diagnostic import canonical_depths  # noqa: E402
from trainer.data.synface import FAR_DEPTH  # noqa: E402
from trainer.results.evaluate import evaluate_detailed  # noqa: E402
from trainer.results.truth_probe import COMMON_REGION_SHARE, _departures, _erode, pearson  # noqa: E402


def per_image(checkpoint: str, data: str, split: str) -> tuple[dict, np.ndarray]:
    """({image name: MAD exact}, every image's depth departure r in the split's name order) of one checkpoint."""
    _, values, _ = evaluate_detailed(checkpoint, data, split, 64, "cpu", "raise", worst=0)
    mad = dict(zip(values.names, values.values["model"]["mad_deg_exact"]))
    pred, true, _, _ = canonical_depths(checkpoint, data, split)
    region = _erode((true < FAR_DEPTH).mean(0) >= COMMON_REGION_SHARE, 1)
    p, t = _departures(pred, true, region)
    return mad, np.array([pearson(p[i], t[i]) for i in range(len(p))])


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
    names = sorted(set(a[0]) & set(b[0]))
    pairs = (("MAD exact", True, np.array([a[0][n] for n in names]), np.array([b[0][n] for n in names])),
             ("depth departure r", False, a[1], b[1]))  # same split, same order for both checkpoints
    for name, lower_is_better, va, vb in pairs:
        diff = vb - va
        boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(args.resamples)]
        better = np.mean(diff < 0) if lower_is_better else np.mean(diff > 0)
        print(f"{name}: A {va.mean():.3f}  B {vb.mean():.3f}  "
              f"B-A {diff.mean():+.3f} [{np.percentile(boots, 2.5):+.3f}, {np.percentile(boots, 97.5):+.3f}]  "
              f"B better on {better:.0%} of {len(diff)} images")


if __name__ == "__main__":
    main()
