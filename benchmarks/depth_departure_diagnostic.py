"""What a checkpoint's per-image depth departures are made of, against the face generator's truth
(issue 12's learning study; trainer/results/truth_probe.py says what a departure is).

    python benchmarks/depth_departure_diagnostic.py runs/NAME/checkpoints/step_N data/faces

Prints, over the split's common face region: the spread of the predicted and true departures and of
the mean maps' relief; the per-pixel correlation across images; the principal components of both
and how the first ones relate (to each other and to the head's silhouette area); how well a linear
map from the 10 leading predicted components predicts the true departures on held-out images; and
the shares of each side's departures that a shifted mean map (canonical-frame misplacement) and a
planar tilt (pose) explain.
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
from trainer.results.evaluate import load_model  # noqa: E402
from trainer.results.truth_probe import COMMON_REGION_SHARE, _departures, _erode, pearson  # noqa: E402


def canonical_depths(checkpoint: str, data: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) canonical depth maps [N, H, W] of the split's images that have truth."""
    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    model.eval()
    truth = read_truth(data, split)
    index = {str(n): i for i, n in enumerate(truth["names"])}
    rows, depths = [], []
    with torch.no_grad():
        for batch in SynfaceFolder(data, split, image_size=config.image_size, on_error="raise").batches(64):
            keep = [i for i, name in enumerate(batch["name"]) if name in index]
            out = model.decompose(batch["image"][keep])
            rows += [index[batch["name"][i]] for i in keep]
            depths.append(out.canon_depth[:len(keep)].numpy())
    return np.concatenate(depths), truth["canonical_depth"][rows].astype(np.float32)


def explained_share(departures: np.ndarray, basis: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of the departures' variance a per-image combination of basis [P, K] explains; the residual."""
    basis = basis - basis.mean(0)
    coef = np.linalg.lstsq(basis, departures.T, rcond=None)[0]
    residual = departures.T - basis @ coef
    return 1 - residual.var() / departures.T.var(), residual.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    pred, true = canonical_depths(args.checkpoint, args.data, args.split)
    region = _erode((true < FAR_DEPTH).mean(0) >= COMMON_REGION_SHARE, 1)
    p, t = _departures(pred, true, region)
    print(f"{len(p)} images, {region.sum()} region pixels")
    print(f"departure std: predicted {p.std():.5f}, true {t.std():.5f}")
    print(f"mean map relief std: predicted {pred[:, region].mean(0).std():.5f}, true {true[:, region].mean(0).std():.5f}")
    per_pixel = [pearson(p[:, j], t[:, j]) for j in range(p.shape[1])]
    print(f"per-pixel correlation across images: mean {np.mean(per_pixel):.3f}")
    up, sp, _ = np.linalg.svd(p, full_matrices=False)
    ut, st, _ = np.linalg.svd(t, full_matrices=False)
    print("variance share of the first 5 components: predicted", np.round(sp[:5] ** 2 / (sp ** 2).sum(), 3),
          "true", np.round(st[:5] ** 2 / (st ** 2).sum(), 3))
    area = (true < FAR_DEPTH).reshape(len(true), -1).mean(1)
    print(f"true PC0 vs silhouette area r {pearson(ut[:, 0], area):.3f}; predicted PC0 vs area r "
          f"{pearson(up[:, 0], area):.3f}; predicted PC0, PC1, PC2 vs true PC0 r "
          + ", ".join(f"{pearson(up[:, k], ut[:, 0]):.3f}" for k in range(3)))
    half = len(p) // 2
    readout = np.linalg.lstsq(up[:half, :10], t[:half], rcond=None)[0]
    held_out = up[half:, :10] @ readout
    print("linear readout of the true departures from 10 predicted components, held-out per-image r "
          f"{np.mean([pearson(held_out[i], t[half + i]) for i in range(len(p) - half)]):.3f}")
    size = pred.shape[1]
    rows, cols = np.mgrid[0:size, 0:size]
    tilts = np.stack([cols[region], rows[region]], 1).astype(np.float64)
    for name, departures, maps in (("predicted", p, pred), ("true", t, true)):
        gy, gx = np.gradient(maps.mean(0))
        shift, _ = explained_share(departures, np.stack([gx[region], gy[region]], 1))
        tilt, _ = explained_share(departures, tilts)
        print(f"{name}: share of departure variance from a shifted mean map {shift:.3f}, from a planar tilt {tilt:.3f}")


if __name__ == "__main__":
    main()
