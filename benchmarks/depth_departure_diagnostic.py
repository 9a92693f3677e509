"""What a checkpoint's per-image depth departures are made of, against the face generator's truth
(issue 12's learning study; trainer/results/truth_probe.py says what a departure is).

    python benchmarks/depth_departure_diagnostic.py runs/NAME/checkpoints/step_N data/faces

Prints, over the split's common face region: the spread of the predicted and true departures and of
the mean maps' relief; the per-pixel correlation across images; the principal components of both
and how the first ones relate (to each other and to the head's silhouette area); how well a linear
map from the 10 leading predicted components predicts the true departures on held-out images; and
the shares of each side's departures that a shifted mean map (canonical-frame misplacement) and a
planar tilt (pose) explain; and how the predicted pitch and yaw errors go with that shift and tilt.

With --swap: whether the photometric loss prefers each face's true departures to the model's own.
The model's canonical depth is re-rendered with its per-image departure replaced (by none, by the
truth's at several scales, by another face's truth) while the model's own albedo, light, view and
confidence stay; printed per variant: the masked L1 of the reconstruction and the confidence-weighted
loss the run trains on (both branches), over the split's images (the mask: pixels every variant keeps).
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
from trainer.model.losses import photometric_loss  # noqa: E402
from trainer.results.evaluate import load_model  # noqa: E402
from trainer.results.truth_probe import COMMON_REGION_SHARE, _departures, _erode, pearson  # noqa: E402


def canonical_depths(checkpoint: str, data: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(predicted, true) canonical depth maps [N, H, W] of the split's images that have truth, then
    (predicted, true) raw views [N, 6]."""
    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    model.eval()
    truth = read_truth(data, split)
    index = {str(n): i for i, n in enumerate(truth["names"])}
    rows, depths, views = [], [], []
    with torch.no_grad():
        for batch in SynfaceFolder(data, split, image_size=config.image_size, on_error="raise").batches(64):
            keep = [i for i, name in enumerate(batch["name"]) if name in index]
            out = model.decompose(batch["image"][keep])
            rows += [index[batch["name"][i]] for i in keep]
            depths.append(out.canon_depth[:len(keep)].numpy())
            views.append(out.view.numpy())
    return (np.concatenate(depths), truth["canonical_depth"][rows].astype(np.float32), np.concatenate(views),
            truth["view"][rows])


def explained_share(departures: np.ndarray, basis: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of the departures' variance a per-image combination of basis [P, K] explains; the residual."""
    basis = basis - basis.mean(0)
    coef = np.linalg.lstsq(basis, departures.T, rcond=None)[0]
    residual = departures.T - basis @ coef
    return 1 - residual.var() / departures.T.var(), residual.T


def swapped_departure_losses(checkpoint: str, data: str, split: str, region: np.ndarray) -> None:
    """The photometric losses of the model's renders with each canonical depth's departure swapped (--swap);
    region: main()'s common face region."""
    model, config, _ = load_model(checkpoint, torch.device("cpu"))
    model.eval()
    truth = read_truth(data, split)
    index = {str(n): i for i, n in enumerate(truth["names"])}
    images, rows = [], []
    for batch in SynfaceFolder(data, split, image_size=config.image_size, on_error="raise").batches(64):
        keep = [i for i, name in enumerate(batch["name"]) if name in index]
        images.append(batch["image"][keep])
        rows += [index[batch["name"][i]] for i in keep]
    image = torch.cat(images)
    true = truth["canonical_depth"][rows].astype(np.float32)
    own_depth = model.canonical_depth
    with torch.no_grad():
        own = own_depth(model.depth_net(image)[:, 0].float())
    predicted, actual = (torch.from_numpy(d).float() for d in _departures(own.numpy(), true, region))
    region = torch.from_numpy(region)

    def with_departures(dep: torch.Tensor) -> torch.Tensor:
        depth = own.clone()
        depth[:, region] = own[:, region] - predicted + dep
        return depth

    another = torch.randperm(len(image), generator=torch.Generator().manual_seed(0))
    variants = {
        "own": own,
        "none (the model's template)": with_departures(torch.zeros_like(predicted)),
        "the truth's": with_departures(actual),
        "the truth's x 0.5": with_departures(0.5 * actual),
        "the truth's x 2": with_departures(2 * actual),
        "another face's truth": with_departures(actual[another]),
        "own, scaled to the truth's spread": with_departures(predicted * actual.std() / predicted.std()),
    }
    outs = {}
    try:
        with torch.no_grad():
            for name, depth in variants.items():
                model.canonical_depth = lambda raw, depth=depth: depth
                outs[name] = model.decompose(image)
    finally:
        model.canonical_depth = own_depth
    n = len(image)
    if outs["own"].sigma_photometric is None:  # no confidence maps: the run trains on the L1 itself
        for o in outs.values():
            o.sigma_photometric = None
    mask = torch.stack([o.recon_mask[:n] for o in outs.values()]).prod(0)
    print(f"departure std: predicted {predicted.std():.5f}, true {actual.std():.5f}; {n} images")
    print("departures          L1        trained loss  trained loss (flipped branch)")
    for name, o in outs.items():
        l1 = photometric_loss(o.recon_image[:n], image, None, mask).item()
        sigma = o.sigma_photometric
        nll = photometric_loss(o.recon_image[:n], image, None if sigma is None else sigma[:n], mask).item()
        nll_flip = photometric_loss(o.recon_image[n:], image, None if sigma is None else sigma[n:], mask).item()
        print(f"{name:36s} {l1:.5f}  {nll:+.5f}  {nll_flip:+.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--swap", action="store_true", help="also the swapped-departure losses (module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pred, true, view, true_view = canonical_depths(args.checkpoint, args.data, args.split)
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
    # Pose traded against the canonical frame: a pitch the view net leaves out shows in the canonical
    # depth as a vertical shift and tilt (the pivot is behind the face).
    gy, gx = np.gradient(pred.mean(0))
    frame = np.stack([gx[region], gy[region], cols[region], rows[region]], 1).astype(np.float64)
    frame -= frame.mean(0)
    coef = np.linalg.lstsq(frame, p.T, rcond=None)[0].T  # per image: shift x, shift y, tilt x, tilt y
    for k, angle in ((0, "pitch"), (1, "yaw")):
        error = view[:, k] - true_view[:, k]
        print(f"{angle}: predicted spread {view[:, k].std() / true_view[:, k].std():.2f}x the truth's, r "
              f"{pearson(view[:, k], true_view[:, k]):.3f}; its error vs the departures' shift x, shift y, tilt x, "
              "tilt y: " + ", ".join(f"{pearson(error, coef[:, j]):+.2f}" for j in range(4)))
    if args.swap:
        swapped_departure_losses(args.checkpoint, args.data, args.split, region)


if __name__ == "__main__":
    main()
