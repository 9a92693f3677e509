"""How fast one worker's training step could get: the whole step against its nets alone and its glue alone (issue 14).

    python benchmarks/bench_step_parts.py --recipe default --widths 16 --batch 16 --rounds 20
    python benchmarks/bench_step_parts.py --recipe default --widths 16 --batch 16 --rounds 20 --processes 2

One process, one thread, CPU time per step (time.process_time, so waiting for a core does not count),
the three parts run in a shuffled order every round on the same images:
- step: the trainer's whole step (profile_step.Step: engine forward of the five nets, renderer,
  losses, engine backward and Adam step, the non-finite check);
- nets: the five nets' forward and backward exactly as decompose calls them (the view and light
  nets on the images and their mirror images when loss.lam_pose_flip is set), under the engine's
  autocast, with a loss that touches every output and nothing else;
- glue: decompose and the losses with the five nets replaced by fixed outputs (leaf tensors of the
  nets' output shapes): depth mapping, blur, normals, shading, rasteriser, warp, masks, losses,
  forward and backward.

The nets alone bound any layout of these nets: W single-thread workers can at best do
W * batch / nets images per second, with the renderer, the losses, the optimizer, the data and the
coordination between workers all free. The report prints that bound for 2 workers. --processes 2
runs two copies at once, one per core, as the two workers of `--workers auto` do: each core's work
then takes longer than alone (shared cache, memory and clock), and that is the bound that holds for
a two-worker run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.bench_train import cpu_name  # noqa: E402
from benchmarks.profile_step import RECIPES, Step, recipe_config  # noqa: E402
from trainer.model.unsup3d import Unsup3DLoss  # noqa: E402

NETS = ("depth_net", "albedo_net", "confidence_net", "light_net", "view_net")


class FixedOutput(nn.Module):
    """Stands in for a net: returns fresh float32 leaves of a recorded output, so the glue's backward stops there."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, _image):
        if isinstance(self.output, tuple):
            return tuple(t.detach().float().requires_grad_() for t in self.output)
        return self.output.detach().float().requires_grad_()


def net_inputs(model, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each net's input as decompose builds it."""
    pose_input = torch.cat([image, image.flip(-1)]) if model.mirrored_pose else image
    return {name: pose_input if name in ("light_net", "view_net") else image for name in NETS}


def make_parts(step: Step, autocast):
    """(whole step, nets alone, glue alone) as callables on the step's first batch."""
    model = step.engine.module
    image = step.batches[0]
    nets = {name: getattr(model, name) for name in NETS if getattr(model, name) is not None}
    inputs = net_inputs(model, image)

    def nets_alone():
        with autocast():
            outputs = [nets[name](inputs[name]) for name in nets]
        flat = [t for out in outputs for t in (out if isinstance(out, tuple) else (out,))]
        sum(t.float().mean() for t in flat).backward()
        model.zero_grad(set_to_none=True)

    # The glue runs on a copy of the model whose nets return the real nets' outputs for this batch.
    glue_model = copy.deepcopy(model)
    with torch.no_grad(), autocast():
        for name, net in nets.items():
            setattr(glue_model, name, FixedOutput(net(inputs[name])))
    criterion = Unsup3DLoss(step.config.loss, None, step.config.model)

    def glue_alone():
        terms = criterion(image, glue_model.decompose(image))
        terms["total"].backward()

    return {"step": step.run, "nets": nets_alone, "glue": glue_alone}


def measure(args) -> dict:
    """CPU seconds per step of each part, every round, in this process (one thread)."""
    import yaml

    torch.set_num_threads(1)
    extra = {kv.split("=", 1)[0]: yaml.safe_load(kv.split("=", 1)[1]) for kv in args.set}
    step = Step(recipe_config(args.recipe, args.widths, args.batch, extra))
    if step.config.loss.lam_perc > 0:
        raise SystemExit("bench_step_parts: the glue part has no perceptual net; use a recipe without it")
    from trainer.loop.engine import resolve_engine_config

    precision = resolve_engine_config(step.config, torch.device("cpu")).precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    parts = make_parts(step, lambda: torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None))
    for _ in range(args.warmup):
        for run in parts.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.rounds):
        order = list(parts)
        random.shuffle(order)
        for name in order:
            start = time.process_time()
            parts[name]()
            times[name].append(time.process_time() - start)
    step.close()
    return {"precision": precision, "times": times}


def run_copies(args) -> list[dict]:
    """measure() in --processes copies of this script at once (each its own process and core)."""
    command = [sys.executable, __file__, "--child", "--recipe", args.recipe, "--widths", str(args.widths),
               "--batch", str(args.batch), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    if args.set:
        command += ["--set", *args.set]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
    results = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"bench_step_parts: a copy exited with {child.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="default", choices=list(RECIPES))
    parser.add_argument("--widths", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="one worker's batch (the default's 32 over 2 workers: 16)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1,
                        help="run this many copies at once, as the workers of a run share the machine (1: in this process)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return
    results = [measure(args)] if args.processes == 1 else run_copies(args)

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; recipe {args.recipe}, widths {args.widths}, "
          f"batch {args.batch}, 1 thread, nets in {results[0]['precision']}, {args.rounds} rounds, "
          f"{args.processes} process(es) at once\n")
    print("| process | part | CPU ms per step (median) | min | max | img per CPU-s |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for index, result in enumerate(results):
        for name, values in result["times"].items():
            medians.setdefault(name, []).append(statistics.median(values))
            print(f"| {index} | {name} | {1e3 * medians[name][-1]:.1f} | {1e3 * min(values):.1f} | "
                  f"{1e3 * max(values):.1f} | {args.batch / medians[name][-1]:.1f} |")
    nets, whole = (statistics.mean(medians[name]) for name in ("nets", "step"))
    workers = max(2, args.processes)
    print(f"\nnets / step: {nets / whole:.2f}. Bound for {workers} single-thread workers at these per-process "
          f"speeds: {workers * args.batch / nets:.1f} img/s if everything but the nets (renderer, losses, "
          f"optimizer, data, the workers' coordination) took no time; {workers * args.batch / whole:.1f} img/s "
          f"with today's whole step and no coordination cost.")


if __name__ == "__main__":
    main()
