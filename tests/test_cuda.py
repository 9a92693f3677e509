"""The CUDA path: the rasterizer on the GPU against the CPU, a bf16 DeepSpeed step, and an exact
save/resume on the GPU. Skipped where CUDA is absent.

scripts/gpu_check.sh runs this file on a GPU machine (stage "tests") and writes what each test saw
into $UNSUP3D_CHECK_RESULTS/<test>.json. Its --tiny mode runs the same tests on the CPU as a
stand-in (UNSUP3D_CUDA_TESTS_DEVICE=cpu, small sizes and widths), so that this file cannot rot
between the rare GPU runs; the CPU-vs-CPU rasterizer comparison is then trivially exact.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from test_rasterizer import random_depth, random_view, view_vertices
from test_train import small_config
from trainer.loop.checkpoint_load import load_checkpoint
from trainer.model.config import ModelConfig
from trainer.render import geometry
from trainer.render.rasterizer import grid_faces, rasterize_depth

STAND_IN = os.environ.get("UNSUP3D_CUDA_TESTS_DEVICE") == "cpu"
if STAND_IN:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda", 0)
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or UNSUP3D_CUDA_TESTS_DEVICE=cpu, the gpu_check --tiny stand-in)")


def record(name: str, data: dict) -> None:
    """What a test measured, for gpu_check's report (only when it asks for it)."""
    directory = os.environ.get("UNSUP3D_CHECK_RESULTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {"device": str(DEVICE), "stand_in": STAND_IN, **data}
        (Path(directory) / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def gpu_config(root, out_dir, **train_overrides):
    """A run on DEVICE: the full-width model of configs/synface.yaml with its perceptual net on CUDA;
    small widths and no perceptual net on the CPU stand-in (it must stay quick)."""
    config = small_config(root, out_dir, **train_overrides)
    if STAND_IN:
        config.perceptual.backbone = "none"
        config.loss.lam_perc = 0.0
    else:
        config.model = ModelConfig()
    config.train.device = DEVICE.type
    config.monitoring.enabled = False
    config.monitoring.progress_bar = False
    return config


# --- the rasterizer -------------------------------------------------------------------------

RASTER_SIZES = [16] if STAND_IN else [64, 128, 256]


@pytest.mark.parametrize("size", RASTER_SIZES)
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_rasterizer_on_cuda_gives_the_cpu_winning_faces_and_depths(size, noise):
    """Same meshes and views on both devices: the same winning face and depth at every pixel.

    Both devices run the same float32 operations; a GPU may contract a*b+c into one FMA, which can
    move an edge function that is exactly 0 on the CPU (a pixel centre on a shared edge) by one
    ulp. Such a pixel then goes to the other triangle of the edge, at the same depth. So: depths
    must agree to 1e-5 wherever both cover, a differing winner is allowed only at such a tie, and
    coverage may differ on at most 1e-4 of the pixels (silhouette pixels exactly on an edge). The
    counts are recorded; "exact" says whether the winners were identical everywhere.
    """
    generator = torch.Generator().manual_seed(7 * size + int(10 * noise))
    batch = 4
    depth = random_depth(batch, size, generator, noise)
    R, t = random_view(batch, generator, max_angle=30.0)  # typical poses; the tests of test_rasterizer go to 60
    K = geometry.intrinsics(size)
    faces = grid_faces(size, size)
    vertices = view_vertices(depth, R, t)
    weights = torch.rand(batch, size, size, generator=generator)

    def render(device):
        v = vertices.to(device).detach().requires_grad_()
        z, face = rasterize_depth(v, faces.to(device), K.to(device), size, size)
        covered = face >= 0
        (torch.where(covered, z, 0.0) * weights.to(device)).sum().backward()
        return z.detach().cpu(), face.cpu(), v.grad.cpu()

    z_cpu, face_cpu, grad_cpu = render(torch.device("cpu"))
    z_dev, face_dev, grad_dev = render(DEVICE)
    cov_cpu, cov_dev = face_cpu >= 0, face_dev >= 0
    both = cov_cpu & cov_dev
    coverage_diff = int((cov_cpu != cov_dev).sum())
    face_diff = int((face_cpu != face_dev)[both].sum())
    depth_diff = float((z_cpu - z_dev)[both].abs().max()) if both.any() else 0.0
    grad_diff = float((grad_cpu - grad_dev).abs().max())
    result = {"size": size, "noise": noise, "pixels": batch * size * size, "covered": int(cov_cpu.sum()),
              "coverage_differs": coverage_diff, "winner_differs": face_diff, "max_depth_diff": depth_diff,
              "max_grad_diff": grad_diff, "exact": coverage_diff == 0 and face_diff == 0}
    record(f"rasterizer_{size}_noise{noise}", result)
    assert cov_cpu.float().mean() > 0.25, "the test meshes should cover much of the image"
    assert coverage_diff <= 1e-4 * batch * size * size, result
    assert depth_diff <= 1e-5, result  # also at pixels whose winner differs: those are ties
    if face_diff == 0 and coverage_diff == 0:
        assert torch.allclose(grad_cpu, grad_dev, rtol=1e-4, atol=1e-6), result


# --- a bf16 DeepSpeed step ------------------------------------------------------------------


def _first_step_loss(config, image, precision, mode):
    """Build the engine with seed 0 (same initial weights every time), one step; what it did."""
    from trainer.loop.process_group import init_process_group
    from trainer.loop.engine import build_engine
    from trainer.model.unsup3d import Unsup3DLoss
    from trainer.model.perceptual import build_perceptual_net
    from trainer.loop.checkpoint import fp32_model_state
    from trainer.loop.rng import seed_everything

    config.engine.precision, config.engine.mixed_precision = precision, mode
    init_process_group(DEVICE.type)
    seed_everything(0)
    engine = build_engine(config, 1, DEVICE)
    ds = engine.engine
    try:
        perceptual = build_perceptual_net(config.perceptual)
        perceptual = perceptual.to(DEVICE) if perceptual is not None else None
        criterion = Unsup3DLoss(config.loss, perceptual, config.model)
        seen = {}
        def note_dtype(module, inputs, output):  # returns None: the output stays as it is
            seen.setdefault("depth_net_out", output.dtype)

        hook = engine.module.depth_net.register_forward_hook(note_dtype)
        def master_weights():  # what Adam updates: the fp32 copies under DeepSpeed's bf16 wrapper
            return [p.detach().clone() for g in engine.gate.optimizer.param_groups for p in g["params"]]

        before, master_before = fp32_model_state(engine), master_weights()
        decomposition = ds(image)
        terms = criterion(image, decomposition)
        hook.remove()
        engine.watch.check_loss(terms["total"])
        ds.backward(terms["total"])
        skipped = engine.watch.take()
        ds.step()
        after, master_after = fp32_model_state(engine), master_weights()
        return {
            "precision": precision, "mode": mode, "loss": float(terms["total"].detach()), "skipped": skipped,
            "param_dtype": str(next(engine.module.parameters()).dtype),
            "net_output_dtype": str(seen["depth_net_out"]), "render_dtype": str(decomposition.view_depth.dtype),
            "master_dtype": str(master_after[0].dtype), "master_tensors": len(master_after),
            "master_changed": sum(not torch.equal(a, b) for a, b in zip(master_before, master_after)),
            # fp32_model_state (what model.pt holds): under bf16 weights at ZeRO 0 DeepSpeed exposes no
            # fp32 copy per parameter, so this reads the bf16 weights (GroupNorm scales of 1 stay 1)
            "model_state_changed": sum(not torch.equal(before[k], after[k]) for k in before), "model_state_tensors": len(before),
        }
    finally:
        ds.destroy()


def test_a_bf16_deepspeed_step_on_cuda(synthetic_root, tmp_path):
    """One step in each bf16 mode (autocast: fp32 weights, nets under autocast; deepspeed: bf16 weights
    with fp32 master weights) on real data: finite, every weight moves, the nets run in bf16 and the
    renderer in fp32, and the first loss is within 3% of fp32's from the same initial weights."""
    from test_train import folder_batches

    config = gpu_config(synthetic_root, tmp_path / "run")
    batches = folder_batches(synthetic_root, 8, device=DEVICE)
    batch = next(batches)["image"]
    batches.close()
    results = [_first_step_loss(config, batch, "fp32", "autocast"),
               _first_step_loss(config, batch, "bf16", "autocast"),
               _first_step_loss(config, batch, "bf16", "deepspeed")]
    record("deepspeed_bf16_step", {"steps": results})
    reference = results[0]["loss"]
    for r in results:
        assert not r["skipped"] and torch.isfinite(torch.tensor(r["loss"])), r
        assert r["master_changed"] == r["master_tensors"] > 0, r
        assert r["render_dtype"] == "torch.float32" and r["master_dtype"] == "torch.float32", r
        assert abs(r["loss"] - reference) <= 0.03 * abs(reference), (r, reference)
    assert results[1]["net_output_dtype"] == "torch.bfloat16" and results[1]["param_dtype"] == "torch.float32"
    assert results[2]["net_output_dtype"] == "torch.bfloat16" and results[2]["param_dtype"] == "torch.bfloat16"


# --- save and resume --------------------------------------------------------------------------


def _optimizer_tensors(engine) -> dict:
    optimizer = engine.gate.optimizer  # the torch Adam under every DeepSpeed wrapper
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        for p, param in enumerate(group["params"]):
            out[f"{g}.{p}.param"] = param.detach().cpu().clone()  # the fp32 master under DeepSpeed's bf16 wrapper
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    out[f"{g}.{p}.{name}"] = value.detach().cpu().clone()
    return out


def _snapshot(trainer) -> dict:
    from trainer.loop.checkpoint import fp32_model_state
    from trainer.loop.rng import rng_state

    return {"model": fp32_model_state(trainer.engine), "optimizer": _optimizer_tensors(trainer.engine),
            "rng": rng_state(), "data": trainer.data.state_dict(), "step": trainer.step}


def _equal_tensors(a: dict, b: dict) -> list[str]:
    return [k for k in a if k not in b or not torch.equal(a[k].cpu(), b[k].cpu())] + [k for k in b if k not in a]


def _rng_mismatches(a: dict, b: dict) -> list[str]:
    """Which RNGs (torch, cuda, python, numpy) differ between two rng_state() dicts."""
    out = [] if torch.equal(a["torch"], b["torch"]) else ["torch"]
    cuda_a, cuda_b = a.get("cuda", []), b.get("cuda", [])
    if len(cuda_a) != len(cuda_b) or not all(torch.equal(x, y) for x, y in zip(cuda_a, cuda_b)):
        out.append("cuda")
    if a["python"] != b["python"]:
        out.append("python")
    na, nb = a["numpy"], b["numpy"]
    if not torch.equal(na["keys"], nb["keys"]) or any(na[k] != nb[k] for k in na if k != "keys"):
        out.append("numpy")
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@contextmanager
def _deterministic():
    """cuDNN and torch in deterministic mode (warn_only: ops with no deterministic version warn, and the
    warnings are yielded); gpu_check sets CUBLAS_WORKSPACE_CONFIG, which cuBLAS needs for it."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield seen
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


RESUME_MODES = [("fp32", "autocast")] if STAND_IN else [("fp32", "autocast"), ("bf16", "deepspeed")]


@pytest.mark.parametrize("precision,mode", RESUME_MODES)
def test_save_and_resume_on_cuda_is_bit_identical(synthetic_root, tmp_path, precision, mode):
    """3 steps, checkpoint, a new Trainer restores it: weights, Adam moments, every RNG (CUDA's too)
    and the data position are bit-identical to the saving run's. Then it trains 3 more steps, and
    its weights must equal those of a run of 6 steps that was never interrupted.

    Deterministic algorithms are switched on here (warn_only: ops that have none, such as
    grid_sample's backward on CUDA, warn and are recorded). If the two runs still differ, a third,
    uninterrupted run tells a broken resume (it equals the first) from GPU nondeterminism (it
    differs too: atomic adds in a backward); the latter is recorded and then allowed, as long as the
    restored state itself was exact.
    """
    from cluster.data_source import batch_source, train
    from trainer.loop.train import Trainer

    def config_for(name, steps):
        config = gpu_config(synthetic_root, tmp_path / name, max_steps=steps)
        config.engine.precision, config.engine.mixed_precision = precision, mode
        return config

    def finish(trainer):
        trainer.engine.engine.destroy()
        trainer.close()  # releases out_dir's run lock, so the next Trainer may resume there

    with _deterministic() as seen:
        config = config_for("resumed", 3)
        first = Trainer(config, batch_source(config))
        try:
            first.run()
            saved = _snapshot(first)
        finally:
            finish(first)
        config = config_for("resumed", 6)
        second = Trainer(config, batch_source(config))
        try:
            second.restore(second.checkpoints.latest())
            restored = _snapshot(second)
            mismatched = {
                "model": _equal_tensors(saved["model"], restored["model"]),
                "optimizer": _equal_tensors(saved["optimizer"], restored["optimizer"]),
                "rng": _rng_mismatches(saved["rng"], restored["rng"]),
            }
            data_equal = saved["data"] == restored["data"] and saved["step"] == restored["step"] == 3
            second.run()
        finally:
            finish(second)
        train(config_for("straight", 6))
        straight = load_checkpoint(tmp_path / "straight" / "checkpoints")["model"]
        resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints")["model"]
        identical = not _equal_tensors(straight, resumed)
        result = {"precision": precision, "mode": mode, "restored_state_mismatches": mismatched,
                  "data_position_equal": data_equal, "optimizer_tensors": len(saved["optimizer"]),
                  "resumed_equals_straight": identical, "max_diff_resumed_vs_straight": _max_diff(straight, resumed)}
        if not identical:
            train(config_for("straight_again", 6))
            again = load_checkpoint(tmp_path / "straight_again" / "checkpoints")["model"]
            result["straight_runs_identical"] = not _equal_tensors(straight, again)
            result["max_diff_straight_vs_straight"] = _max_diff(straight, again)
    result["nondeterministic_ops_warned"] = sorted({str(w.message)[:160] for w in seen if "deterministic" in str(w.message)})[:8]
    record(f"resume_{precision}_{mode}", result)
    assert not any(mismatched.values()), result
    assert data_equal, result
    assert saved["optimizer"], "the snapshot should hold Adam's moments"
    if not identical:
        assert not result["straight_runs_identical"], f"resume is not exact (two straight runs agree): {result}"
        # GPU nondeterminism only: the resumed run must be no further from the straight one than a
        # second straight run is (within a factor, since both are samples of the same noise).
        assert result["max_diff_resumed_vs_straight"] <= 10 * result["max_diff_straight_vs_straight"] + 1e-6, result
