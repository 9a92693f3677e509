"""Benchmark of batch inference: images per second through Unsup3D.decompose, and through the demo.

Not a test. Measures, for the full-width model of SPEC 2 (37.1M parameters; random weights unless
--checkpoint is given: the cost does not depend on what the weights learned, except that the
rasteriser does a little more work on a folded depth map):

- decompose: the five nets, both branches rendered (what evaluation runs), no gradients, eval mode,
  at several batch sizes; fp32, plus bf16 autocast on the nets where the device supports it;
- demo render: decompose plus everything `unsup3d demo` renders per image (2 reconstructions,
  5 relit images, 5 novel views, 36 GIF frames of the textured and of the bare shape);
- demo end to end: the same plus writing every file (20 PNG panels, summary.png, the textured
  mesh, the GIF) for each image.

Each case runs warm-up batches first, then --repeats timed batches; it reports the median and best
images/s and the process CPU time per image. On CUDA the clock is read after
torch.cuda.synchronize(). Prints a markdown table; with --output also writes it with the command,
the machine and the date (--append adds a section).

    .venv/bin/python benchmarks/bench_inference.py --threads 1 --output benchmarks/inference_results.md
    python benchmarks/bench_inference.py --device cuda --append --output benchmarks/inference_results.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.model.config import ModelConfig  # noqa: E402
from trainer.results.demo import DemoOptions, render_batch, write_image_outputs  # noqa: E402
from trainer.model.unsup3d import Unsup3D  # noqa: E402
from trainer.results.visualize import decompose  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(fn, device: torch.device, *, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of fn(), one entry per repeat after the warm-up calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def build_model(checkpoint: str | None, device: torch.device) -> Unsup3D:
    if checkpoint:
        from trainer.results.evaluate import load_model

        return load_model(checkpoint, device)[0]
    torch.manual_seed(0)
    return Unsup3D(ModelConfig()).to(device).eval()


def machine_lines(device: torch.device, threads: int) -> list[str]:
    cpu_name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [f"- CPU: {cpu_name}, nproc {os.cpu_count()}, torch threads {threads}"]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    try:
        lines.append("- load average at start (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    except OSError:
        pass
    lines.append(f"- Python {platform.python_version()}, torch {torch.__version__}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--checkpoint", help="time this checkpoint's model instead of a random full-width one")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated; default 1,16,64 on CPU, 1,64,256 on CUDA")
    parser.add_argument("--demo-batch", type=int, default=None, help="batch of the demo cases (default 8 CPU, 64 CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast cases")
    parser.add_argument("--output", help="also write the results to this markdown file")
    parser.add_argument("--append", action="store_true", help="append a section to --output instead of replacing it")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = device.type == "cuda"
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,64,256" if cuda else "1,16,64")).split(",")]
    demo_batch = args.demo_batch or (64 if cuda else 8)
    model = build_model(args.checkpoint, device)
    size = model.config.image_size
    parameters = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)

    def images(batch: int) -> torch.Tensor:
        return (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(device)

    rows = []

    def record(case: str, precision: str, batch: int, wall: list[float], cpu: list[float]) -> None:
        per_second = [batch / w for w in wall]
        row = (case, precision, batch, statistics.median(per_second), max(per_second),
               statistics.median(cpu) / batch * 1000)
        rows.append(row)
        print(f"{case:22s} {precision:5s} batch {batch:4d}: {row[3]:9.1f} img/s (best {row[4]:.1f}), "
              f"{row[5]:.1f} ms CPU/img", flush=True)

    bf16 = not args.no_bf16 and (not cuda or torch.cuda.is_bf16_supported())
    for batch in batch_sizes:
        x = images(batch)
        wall, cpu = time_case(lambda: decompose(model, x), device, warmup=args.warmup, repeats=args.repeats)
        record("decompose", "fp32", batch, wall, cpu)
        if bf16:
            def run_bf16():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    decompose(model, x)
            wall, cpu = time_case(run_bf16, device, warmup=args.warmup, repeats=args.repeats)
            record("decompose", "bf16", batch, wall, cpu)

    options = DemoOptions()
    x = images(demo_batch)
    wall, cpu = time_case(lambda: render_batch(model, x, options), device, warmup=args.warmup, repeats=args.repeats)
    record("demo render", "fp32", demo_batch, wall, cpu)
    with tempfile.TemporaryDirectory() as tmp:
        def end_to_end():
            batch = render_batch(model, x, options)
            cpu_images = x.float().cpu()
            for i in range(demo_batch):
                write_image_outputs(Path(tmp) / f"img{i}", i, batch, cpu_images, model.config, options)
        wall, cpu = time_case(end_to_end, device, warmup=args.warmup, repeats=args.repeats)
        record("demo end to end", "fp32", demo_batch, wall, cpu)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"## `{command}`",
        "",
        f"Date: {date}",
        "",
        "Machine:",
        *machine_lines(device, threads),
        "",
        f"Model: {'checkpoint ' + args.checkpoint if args.checkpoint else 'full width, random weights'}, "
        f"{parameters / 1e6:.2f}M parameters, {size} px; {args.warmup} warm-up and {args.repeats} timed batches per case.",
        "",
        "| device | case | precision | batch | median img/s | best img/s | median CPU ms/img |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, precision, batch, median, best, cpu_ms in rows:
        lines.append(f"| {device.type} | {case} | {precision} | {batch} | {median:.1f} | {best:.1f} | {cpu_ms:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        path = Path(args.output)
        if args.append and path.exists():
            path.write_text(path.read_text().rstrip("\n") + "\n\n" + text)
        else:
            path.write_text("# Inference benchmark: decompose and demo throughput\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
