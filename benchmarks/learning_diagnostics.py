"""Why does (or doesn't) a run learn shape? Two diagnostics on the synthetic generator, whose truth is known.

Not a test. Both compare what the model infers with the generator's own parameters.

ablate: train the reduced-width model (widths 16, batch 32, no perceptual net, no confidence maps,
  plain L1) on a pool of freshly generated objects, with the parts NOT named in --learn replaced
  by the truth (depth, albedo, light, view). Every 50 steps it prints the photometric loss, the
  correlation of the canonical depth with the true canonical depth on object pixels (1 = the
  right shape up to scale and offset), and the mean absolute error of each light and view output
  (raw units; for a uniform guess of the data's ranges: light x, y 0.53 at max_light_xy 0.8, yaw
  0.25, pitch 0.13). Which part cannot be learned while the others are given tells where a full
  run is stuck.

    .venv/bin/python benchmarks/learning_diagnostics.py ablate --learn depth,light --steps 300

probe: for a checkpoint and a folder written by `unsup3d generate` (seed 0), the correlation of the
  light and view nets' outputs with the truth over the first 64 test images, the canonical depth's
  correlation with the true canonical depth, the relief (nearest to farthest object pixel) of
  both, and the per-image variation correlation (each map minus the mean map, against the same for
  the truth: whether the depth net reads each object's shape or draws one template for all).

    .venv/bin/python benchmarks/learning_diagnostics.py probe --checkpoint runs/x/checkpoints/step_00001000 \\
        --data data/synthetic-black

bounds: SIDE and MAD (exact) on the test split of such a folder for canonical depths and views built
  from the truth (true shape in a frontal view, the convex prior in the true view, ...): what the
  metrics reward, independent of any training.

    .venv/bin/python benchmarks/learning_diagnostics.py bounds --data data/synthetic-black

scan: the photometric loss of 64 generated objects with everything set to the truth except one view
  angle, offset by -30..30 degrees: the shape of the loss the view net descends (a narrow or
  bumpy basin would make the pose hard to learn by gradient; a wide V-shaped one does not).

    .venv/bin/python benchmarks/learning_diagnostics.py scan
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.model.config import LossConfig, ModelConfig
from trainer.results.evaluate import load_model
from trainer.model.unsup3d import Unsup3D, Unsup3DLoss
from trainer.data.synface import SynfaceFolder
from trainer.data.synthetic_params import SyntheticConfig, dataset_params, sample_params
from trainer.data.synthetic_render import canonical_fields, render_objects

PARTS = ("depth", "albedo", "light", "view")
LIGHT_NAMES = ("k_ambient", "k_diffuse", "x", "y")
VIEW_NAMES = ("pitch", "yaw", "roll", "tx", "ty", "tz")


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def shape_agreement(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """Mean per-image correlation on object pixels, and the mean relief of both."""
    corr, relief_pred, relief_true = [], [], []
    for k in range(pred.shape[0]):
        p, t = pred[k][mask[k]], true[k][mask[k]]
        corr.append(correlation(p, t))
        relief_pred.append((p.max() - p.min()).item())
        relief_true.append((t.max() - t.min()).item())
    n = len(corr)
    return sum(corr) / n, sum(relief_pred) / n, sum(relief_true) / n


def variation_agreement(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-image correlation, on object pixels, of each depth map's departure from the batch's
    mean map: 0 for a net that draws one template for every image (however face-like), 1 for one
    that reads each object's own shape from its image."""
    pred = pred - pred.mean((1, 2), keepdim=True)
    true = true - true.mean((1, 2), keepdim=True)
    pred, true = pred - pred.mean(0), true - true.mean(0)
    corr = [correlation(pred[k][mask[k]], true[k][mask[k]]) for k in range(pred.shape[0])]
    return sum(c if c == c else 0.0 for c in corr) / len(corr)  # a constant map gives NaN: count it 0


def give_truth(model: Unsup3D, parts: set[str]) -> dict[str, torch.Tensor]:
    """Make the named parts of `model` return what the caller puts into the returned dict (under the
    same names) instead of a net's output: the truth, in the raw parameterisation the nets produce."""
    given: dict[str, torch.Tensor] = {}
    if "depth" in parts:
        model.canonical_depth = lambda raw: given["depth"] + 0 * raw
    if "albedo" in parts:
        model.albedo_net.forward = lambda x: given["albedo"]
    if "light" in parts:
        model.light_net.forward = lambda x: given["light"]
    if "view" in parts:
        model.view_net.forward = lambda x: given["view"]
    return given


def small_model_config(**overrides) -> ModelConfig:
    return ModelConfig(depth_nf=16, depth_zdim=64, albedo_nf=16, albedo_zdim=64, light_nf=16, view_nf=16,
                       conf_nf=16, conf_zdim=32, use_confidence=False, **overrides)


def ablate(args: argparse.Namespace) -> None:
    learn = set(args.learn.split(","))
    unknown = learn - set(PARTS)
    if unknown:
        raise SystemExit(f"--learn: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    torch.manual_seed(args.seed)
    data_cfg = SyntheticConfig(background=args.background, max_light_xy=args.max_light_xy)
    params = sample_params(args.pool, data_cfg, torch.Generator().manual_seed(args.seed + 1))
    images = render_objects(params, data_cfg)["image"].float()
    truth = canonical_fields(params, data_cfg)
    model = Unsup3D(small_model_config(depth_init_scale=args.depth_init_scale, depth_prior=args.depth_prior))
    loss_fn = Unsup3DLoss(LossConfig(lam_perc=0.0, lam_flip=args.lam_flip, lam_smooth=args.lam_smooth), None, model.config)
    given = give_truth(model, set(PARTS) - learn)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.time()
    print(f"learn {sorted(learn)}, the rest given; {args.pool} objects, background {args.background}, "
          f"max_light_xy {args.max_light_xy}, depth_prior {args.depth_prior}, lam_flip {args.lam_flip}, "
          f"lam_smooth {args.lam_smooth}, lr {args.lr}")
    for step in range(1, args.steps + 1):
        index = torch.randint(0, args.pool, (32,))
        given.update(depth=truth["canon_depth"][index], albedo=truth["canon_albedo"][index],
                     light=truth["light"][index], view=truth["view"][index])
        image = images[index]
        out = model.decompose(image)
        terms = loss_fn(image, out)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        if step % 50 == 0:
            with torch.no_grad():
                corr, relief, relief_true = shape_agreement(out.canon_depth[:32], truth["canon_depth"][index],
                                                            truth["canon_mask"][index] > 0.5)
                light_err = (out.light - truth["light"][index]).abs().mean(0).tolist()
                view_err = (out.view - truth["view"][index]).abs().mean(0).tolist()
            print(f"step {step:4d} photometric {terms['photometric'].item():.4f} depth corr {corr:.3f} "
                  f"relief {relief:.3f}/{relief_true:.3f} light err "
                  + " ".join(f"{n} {e:.2f}" for n, e in zip(LIGHT_NAMES, light_err))
                  + " | view err " + " ".join(f"{n} {e:.2f}" for n, e in zip(VIEW_NAMES[:3], view_err))
                  + f" | {time.time() - start:.0f} s", flush=True)


def test_split_with_truth(data: str, seed: int, image_size: int, count: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The first `count` test images of a folder written by `unsup3d generate --seed seed`, and the
    generator's truth for them (shape, light and view do not depend on background or hues)."""
    batch = next(SynfaceFolder(data, "test", image_size).batches(count))
    data_cfg = SyntheticConfig(seed=seed)
    indices = [int(name.split("_")[0]) for name in batch["name"]]
    return batch, canonical_fields(dataset_params(data_cfg, "test", indices), data_cfg)


def probe(args: argparse.Namespace) -> None:
    model, _, step = load_model(args.checkpoint, torch.device("cpu"))
    batch, truth = test_split_with_truth(args.data, args.seed, model.config.image_size, 64)
    with torch.no_grad():
        out = model.decompose(batch["image"])
    on_object = truth["canon_mask"] > 0.5
    corr, relief, relief_true = shape_agreement(out.canon_depth_raw, truth["canon_depth"], on_object)
    print(f"{args.checkpoint} (step {step}), {len(batch['name'])} test images of {args.data}")
    print("light corr " + " ".join(f"{n} {correlation(out.light[:, k], truth['light'][:, k]):.2f}"
                                   for k, n in enumerate(LIGHT_NAMES)))
    print("view corr " + " ".join(f"{n} {correlation(out.view[:, k], truth['view'][:, k]):.2f}"
                                  for k, n in enumerate(VIEW_NAMES[:5]))
          + f" (yaw std {out.view[:, 1].std():.3f} vs true {truth['view'][:, 1].std():.3f})")
    variation = variation_agreement(out.canon_depth_raw.double(), truth["canon_depth"].double(), on_object)
    print(f"canonical depth corr {corr:.3f}, relief {relief:.4f} (true {relief_true:.4f}), "
          f"per-image variation corr {variation:.3f}")


def bounds(args: argparse.Namespace) -> None:
    from trainer.results.metrics import evaluation_mask, mad_error, side_error
    from trainer.render.geometry import intrinsics

    model = Unsup3D(small_model_config(depth_prior=args.depth_prior))
    batch, truth = test_split_with_truth(args.data, args.seed, model.config.image_size, 100_000)
    gt = batch["depth"].double()
    K = intrinsics(model.config.image_size, dtype=torch.float64)
    shape, view = truth["canon_depth"], truth["view"]
    frontal, no_yaw = torch.zeros_like(view), view.clone()
    no_yaw[:, 1] = 0
    prior = model.canonical_depth(torch.zeros_like(shape))
    cases = [("true", "true", shape, view), ("true", "true, yaw set to 0", shape, no_yaw),
             ("true", "frontal (all zero)", shape, frontal),
             ("mean of the true shapes", "true", shape.mean(0, keepdim=True).expand_as(shape), view),
             (f"convex prior ({args.depth_prior})", "true", prior, view),
             (f"convex prior ({args.depth_prior})", "frontal", prior, frontal)]
    print(f"{len(batch['name'])} test images of {args.data}")
    print("| canonical depth | view | SIDE x1e-2 | MAD deg |\n|---|---|---|---|")
    with torch.no_grad():
        for shape_name, view_name, canon, v in cases:
            rotation, translation = model.view_transform(v.float())
            view_depth = model.renderer.render_depth(model.with_border(canon.float()), rotation, translation)
            mask = evaluation_mask(model.renderer.recon_mask(view_depth), gt)
            side = side_error(view_depth.double(), gt, mask).mean().item() * 100
            mad = mad_error(view_depth.double(), gt, mask, K, eps=None).mean().item()
            print(f"| {shape_name} | {view_name} | {side:.3f} | {mad:.2f} |")


def scan(args: argparse.Namespace) -> None:
    data_cfg = SyntheticConfig(background=args.background)
    params = sample_params(64, data_cfg, torch.Generator().manual_seed(args.seed + 5))
    images = render_objects(params, data_cfg)["image"].float()
    truth = canonical_fields(params, data_cfg)
    model = Unsup3D(small_model_config())
    given = give_truth(model, set(PARTS))
    given.update(depth=truth["canon_depth"], albedo=truth["canon_albedo"], light=truth["light"])
    loss_fn = Unsup3DLoss(LossConfig(lam_perc=0.0, lam_flip=0.0), None, model.config)
    offsets = (-30, -20, -10, -5, -2, 0, 2, 5, 10, 20, 30)
    print("| angle | " + " | ".join(f"{o:+d} deg" for o in offsets) + " |\n|---|" + "---|" * len(offsets))
    for index, name in enumerate(VIEW_NAMES[:3]):
        losses = []
        for offset in offsets:
            view = truth["view"].clone()
            view[:, index] += offset / model.config.max_rotation_degrees
            given["view"] = view
            with torch.no_grad():
                losses.append(loss_fn(images, model.decompose(images))["photometric"].item())
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in losses) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ablate", help="learn some parts with the truth given for the others")
    a.add_argument("--learn", required=True, help=f"comma-separated subset of {','.join(PARTS)}")
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--pool", type=int, default=512, help="generated objects to draw batches from")
    a.add_argument("--background", choices=("black", "plain", "noise"), default="black")
    a.add_argument("--max-light-xy", type=float, default=0.8)
    a.add_argument("--depth-init-scale", type=float, default=0.01)
    a.add_argument("--depth-prior", type=float, default=0.0)
    a.add_argument("--lam-flip", type=float, default=0.0)
    a.add_argument("--lam-smooth", type=float, default=0.0)
    a.add_argument("--lr", type=float, default=5e-4)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=ablate)
    p = sub.add_parser("probe", help="compare a checkpoint's light, view and canonical depth with the truth")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a folder written by unsup3d generate")
    p.add_argument("--seed", type=int, default=0, help="the seed the folder was generated with")
    p.set_defaults(func=probe)
    b = sub.add_parser("bounds", help="SIDE and MAD of true or prior shapes in true or frontal views")
    b.add_argument("--data", required=True, help="a folder written by unsup3d generate")
    b.add_argument("--depth-prior", type=float, default=0.5)
    b.add_argument("--seed", type=int, default=0, help="the seed the folder was generated with")
    b.set_defaults(func=bounds)
    c = sub.add_parser("scan", help="photometric loss against one view angle's offset from the truth")
    c.add_argument("--background", choices=("black", "plain", "noise"), default="black")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=scan)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
