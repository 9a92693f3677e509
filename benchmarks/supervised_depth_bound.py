"""How much of each face's own shape can the depth net read from a 64 px photo at all?

The learning study's per-image depth departure r (trainer/results/truth_probe.py) stays near 0.2
for the unsupervised model. This script trains the same depth net (same widths, same canonical-depth
mapping: blur, prior, mean removal, tanh) *with* the generator's true canonical depth as the target,
on the train split, and reports the same probe's depth departure r on the test split after every
epoch. It is an upper bound on what the architecture and the data allow, not a recipe: no 3D label
is ever used by the real training.

The target is each image's true canonical depth less its own mean over its face pixels, and the
prediction is compared the same way, times one learned gain (the model's depth range is its own):
the loss is the mean squared difference over the image's face pixels. Horizontal flips of image and
depth double the data, as the flip symmetry does for the real model.

    python benchmarks/supervised_depth_bound.py --data data/faces --config configs/default.yaml --epochs 30 \
        --out bound-w32.jsonl
    python benchmarks/supervised_depth_bound.py --plot bound.png bound-w16.jsonl bound-w32.jsonl \
        --mark "unsupervised, best:0.21:0.12"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cluster.cli import parse_settings
from trainer.config import RunConfig
from trainer.config_loading import load_yaml_config
from trainer.data.face_generator import read_truth
from trainer.data.synface import FAR_DEPTH, SynfaceFolder
from trainer.model.unsup3d import Unsup3D
from trainer.results.truth_probe import depth_departure_correlation


def load_split(data: str, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, S, S] and their true canonical depths [N, S, S], in truth.npz's order."""
    truth = read_truth(data, split)
    if truth is None:
        raise FileNotFoundError(f"{data}/{split}/truth.npz: no generator truth (made by unsup3d generate --kind faces)")
    index = {str(n): i for i, n in enumerate(truth["names"])}
    images, rows = [], []
    for batch in SynfaceFolder(data, split, image_size=image_size, on_error="raise").batches(256):
        keep = [i for i, name in enumerate(batch["name"]) if name in index]
        images.append(batch["image"][keep])
        rows += [index[batch["name"][i]] for i in keep]
    return torch.cat(images), torch.from_numpy(truth["canonical_depth"][np.asarray(rows)].astype(np.float32))


def centred(depth: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """Each map less its own mean over its face pixels, zero elsewhere."""
    mean = (depth * face).sum((1, 2), keepdim=True) / face.sum((1, 2), keepdim=True).clamp_min(1)
    return (depth - mean) * face


@torch.no_grad()
def score_test_split(model: Unsup3D, images: torch.Tensor, canon: torch.Tensor) -> dict:
    model.eval()
    pred = torch.cat([model.canonical_depth(model.depth_net(images[i:i + 100])[:, 0]) for i in range(0, len(images), 100)])
    model.train()
    return depth_departure_correlation(pred.numpy(), canon.numpy(), canon.numpy() < FAR_DEPTH)


def plot(png: str, results: list[str], marks: list[str] = ()) -> None:
    """Test r (whole face region and interior) against training images seen, one line per results file;
    each mark "LABEL:R:R_INTERIOR" (e.g. an unsupervised checkpoint's probe) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for path in results:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        for ax, key in zip(axes, ("depth_departure", "depth_departure_interior")):
            ax.plot([r["epoch"] * r["train_faces"] for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=Path(path).stem)
    for mark in marks:
        label, whole, interior = mark.rsplit(":", 2)
        for ax, value in zip(axes, (float(whole), float(interior))):
            ax.axhline(value, color="k", linestyle="--", linewidth=1)
            ax.annotate(label, (0, value), xytext=(2, 3), textcoords="offset points", fontsize=8)
    for ax, title in zip(axes, ("per-image depth departure r (test)", "the same, interior only")):
        ax.set_title(title)
        ax.set_xlabel("training images seen (random flips)")
        ax.set_ylim(-0.1, 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", metavar="PNG", help="draw the curves of the results files given as arguments, train nothing")
    parser.add_argument("results", nargs="*", help="with --plot: results files written by --out")
    parser.add_argument("--mark", action="append", default=[], metavar="LABEL:R:R_INTERIOR",
                        help="with --plot: a horizontal reference line in each panel (e.g. an unsupervised run's r)")
    parser.add_argument("--data", help="faces folder with train/ and test/ truth.npz")
    parser.add_argument("--train-data", help="take the train split from this faces folder instead (e.g. more faces "
                                             "from another seed); the test split stays --data's")
    parser.add_argument("--config", default="configs/default.yaml", help="config whose model section gives the depth net")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE, as unsup3d train")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training faces")
    parser.add_argument("--batch", type=int, default=32, help="faces per Adam step")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam's learning rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, order and flips")
    parser.add_argument("--out", help="write the per-epoch results here (jsonl)")
    args = parser.parse_args()
    if args.plot:
        if not args.results:
            parser.error("--plot needs the results files (written by --out) as arguments")
        plot(args.plot, args.results, args.mark)
        return
    if not args.data:
        parser.error("--data is required to train")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = load_yaml_config(RunConfig, args.config, parse_settings(args.set))
    model = Unsup3D(config.model)
    train_images, train_canon = load_split(args.train_data or args.data, "train", config.model.image_size)
    test_images, test_canon = load_split(args.data, "test", config.model.image_size)
    face = (train_canon < FAR_DEPTH).float()
    target = centred(train_canon, face)
    target = target / target[face > 0].std()
    gain = torch.nn.Parameter(torch.tensor(10.0))
    optimizer = torch.optim.Adam(list(model.depth_net.parameters()) + [gain], lr=args.lr)
    out = open(args.out, "w") if args.out else None
    first = {"epoch": 0, "train_faces": len(train_images), **score_test_split(model, test_images, test_canon)}
    print(json.dumps(first), flush=True)
    if out:
        out.write(json.dumps(first) + "\n")
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_images), generator=generator)
        total = 0.0
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[i:i + args.batch]
            image, tgt, mask = train_images[idx], target[idx], face[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            image = torch.where(flip[:, None, None, None], image.flip(-1), image)
            tgt = torch.where(flip[:, None, None], tgt.flip(-1), tgt)
            mask = torch.where(flip[:, None, None], mask.flip(-1), mask)
            pred = centred(model.canonical_depth(model.depth_net(image)[:, 0]), mask) * gain
            loss = ((pred - tgt) ** 2 * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch, "train_faces": len(train_images), "train_loss": total / len(order),
               "seconds": round(time.time() - start, 1), **score_test_split(model, test_images, test_canon)}
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
