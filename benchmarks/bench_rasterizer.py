"""Benchmark of the renderer's depth rasterisation (SPEC 3.4): render_depth forward + backward.

Not a test. Times Renderer.render_depth plus a backward pass at 64, 128 and 256 px on CPU (and on
CUDA when available, synchronising around each measurement), reports milliseconds per image and the
256/64 cost ratio (16x the pixels; the grid-mesh rasteriser should stay near 16x, while the
reference's brute force grows with pixels x faces, i.e. 256x), and the brute-force rasteriser at
64 px for comparison. Prints a markdown table; with --output also writes it, with the command, the
machine and the date, to a markdown file (--append adds a section instead of replacing it).

    .venv/bin/python benchmarks/bench_rasterizer.py --threads 1 --output benchmarks/rasterizer_results.md
    .venv/bin/python benchmarks/bench_rasterizer.py --append --output benchmarks/rasterizer_results.md

On a machine shared with other jobs, --threads 1 gives steadier figures: with several intra-op
threads, one descheduled thread stalls the others.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.render import geometry, rasterizer  # noqa: E402
from trainer.render.renderer import Renderer, RendererConfig  # noqa: E402


def scene(batch: int, size: int, device: torch.device, *, hard: bool, seed: int = 0):
    """Canonical depth and view. Typical: smooth relief, angles up to 30 deg, shifts up to 0.05.
    Hard: per-pixel noise over the full depth range and angles up to 60 deg (many long triangles)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 6, 6, generator=generator) * 2 - 1
    relief = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    if hard:
        relief = relief + (torch.rand(batch, size, size, generator=generator) * 2 - 1)
    depth = 1 + 0.1 * relief.clamp(-1, 1)
    max_angle, max_shift = (60.0, 0.1) if hard else (30.0, 0.05)
    angles = (torch.rand(batch, 3, generator=generator) * 2 - 1) * math.radians(max_angle)
    t = (torch.rand(batch, 3, generator=generator) * 2 - 1) * max_shift
    t[:, 2] = 0
    return depth.to(device), geometry.euler_to_rotation(angles).to(device), t.to(device)


def time_render(renderer, depth, R, t, *, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds per forward + backward of render_depth, one entry per repeat.

    CPU time (all threads of this process) is less disturbed than wall-clock time when other jobs
    share the machine.
    """
    device = depth.device
    wall, cpu = [], []
    for i in range(warmup + repeats):
        d = depth.clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        renderer.render_depth(d, R, t).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return wall, cpu


class BruteForceRenderer(Renderer):
    """The renderer with the brute-force rasteriser swapped in (same pipeline otherwise)."""

    def render_depth(self, canon_depth, R, t):
        table = rasterizer._ZBUFFER_FUNCTIONS
        original = table[self.cfg.zbuffer]
        table[self.cfg.zbuffer] = rasterizer._table_zbuffer(rasterizer._brute_force_zbuffer)
        try:
            return super().render_depth(canon_depth, R, t)
        finally:
            table[self.cfg.zbuffer] = original


# method name -> RendererConfig.zbuffer ("fast" is the renderer's default: the C z-buffer where it builds)
ZBUFFER_OF_METHOD = {"fast": "auto", "fast, PyTorch z-buffer": "torch", "brute force": "auto"}


def run(device: torch.device, args) -> list[dict]:
    rows = []
    cases = []
    for method in ("fast", "fast, PyTorch z-buffer"):
        cases += [(size, 1, False, method, args.batch) for size in (64, 128, 256)]
        cases += [(64, 2, False, method, args.batch), (256, 2, False, method, args.batch)]
        cases += [(64, 1, True, method, args.hard_batch), (256, 1, True, method, args.hard_batch)]
    cases += [(64, 1, False, "brute force", args.brute_batch)]
    for size, supersample, hard, method, batch in cases:
        cfg = RendererConfig(image_size=size, supersample=supersample, zbuffer=ZBUFFER_OF_METHOD[method])
        renderer = (BruteForceRenderer if method == "brute force" else Renderer)(cfg)
        depth, R, t = scene(batch, size, device, hard=hard)
        slow = method == "brute force" or hard
        repeats = args.slow_repeats if slow else args.repeats
        wall, cpu = time_render(renderer, depth, R, t, warmup=1 if slow else args.warmup, repeats=repeats)
        with torch.no_grad():
            covered = renderer.recon_mask(renderer.render_depth(depth, R, t)).mean().item()
        rows.append(
            dict(
                device=device.type, size=size, supersample=supersample, scene="hard" if hard else "typical",
                method=method, batch=batch, repeats=repeats, covered=covered,
                median_ms=1000 * statistics.median(wall) / batch, min_ms=1000 * min(wall) / batch,
                cpu_ms=1000 * statistics.median(cpu) / batch,
            )
        )
        print(f"  {device.type} {method} {size}px x{supersample} {rows[-1]['scene']}: "
              f"{rows[-1]['median_ms']:.2f} ms/image", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| device | rasteriser | size | supersample | scene | batch | covered "
        "| median ms/image | min ms/image | median CPU ms/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['method']} | {r['size']} | {r['supersample']} | {r['scene']} | {r['batch']} "
            f"| {r['covered']:.0%} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['cpu_ms']:.2f} |"
        )
    summary = []
    for device in sorted({r["device"] for r in rows}):

        def pick(size, method="fast", key="median_ms"):
            wanted = (device, size, method, 1, "typical")
            fields = ("device", "size", "method", "supersample", "scene")
            return next(r[key] for r in rows if tuple(r[f] for f in fields) == wanted)

        ratios = ", ".join(f"{pick(256, key=k) / pick(64, key=k):.1f}x ({label})" for k, label in
                           (("median_ms", "median wall"), ("min_ms", "min wall"), ("cpu_ms", "median CPU")))
        summary.append(
            f"- {device}: 256/64 cost ratio per image, typical scene: {ratios}, for 16x the pixels "
            f"(target <= 20x); 128/64 = {pick(128) / pick(64):.1f}x (median wall). "
            f"Brute force at 64 px: {pick(64, 'brute force') / pick(64):.0f}x the fast path's time per image."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    parts = [
        f"CPU: {cpu}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}",
        f"load average at start (1, 5, 15 min): {load}",
        f"Python {platform.python_version()}, torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    return "\n".join(f"- {p}" for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--brute-batch", type=int, default=2)
    parser.add_argument("--hard-batch", type=int, default=2)
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats of the brute force and hard scenes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="write the results to this markdown file")
    parser.add_argument("--append", action="store_true", help="append a section to --output instead of replacing it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    header = machine()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    rows = [row for device in devices for row in run(device, args)]
    table = markdown(rows)
    print(table)
    if args.output:
        command = " ".join([".venv/bin/python", *sys.argv])
        when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        intro = (
            "# Rasteriser benchmark: render_depth forward + backward\n\n"
            "Typical scene: smooth random relief, angles up to 30 deg, shifts up to 0.05. Hard scene: "
            "per-pixel noise over the whole depth range, angles up to 60 deg, shifts up to 0.1 (many long "
            "and folded triangles). Times are per image: wall-clock median and minimum over the repeats "
            "after warm-up, and the median CPU time of the process (all threads). The brute force "
            "(every face against every pixel, in PyTorch) and the hard scene run a smaller batch and "
            "fewer repeats.\n"
        )
        section = f"\n## `{command}`\n\nDate: {when}\n\nMachine:\n{header}\n\n{table}"
        if args.append and args.output.exists():
            args.output.write_text(args.output.read_text() + section)
        else:
            args.output.write_text(intro + section)


if __name__ == "__main__":
    main()
