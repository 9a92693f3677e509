"""The DeepSpeed engine over the five nets: its config dict, its construction, and a step that can
be skipped when the loss or a gradient is not finite.

One engine holds the five nets (Unsup3D; the renderer has no parameters). The frozen perceptual
backbone stays outside it and outside the optimizer. Precision:
- 'fp32': plain float32.
- 'autocast' (DeepSpeed's torch_autocast section): float32 weights, the nets' forward under
  torch.autocast; Unsup3D.decompose and the losses switch autocast off for the renderer and losses.
- 'deepspeed' (DeepSpeed's bf16/fp16 section): the engine casts the nets to bf16/fp16 and keeps
  float32 master weights in its optimizer; the input is cast to the nets' dtype here and their
  outputs back to float32 in Unsup3D.decompose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from trainer.config import EngineConfig, RunConfig
from trainer.loop.device import native_bf16
from trainer.loop.timing import NO_TIMER, SectionTimer
from trainer.model.unsup3d import Decomposition, Unsup3D

log = logging.getLogger(__name__)

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_engine_config(config: RunConfig, device: torch.device | None = None) -> EngineConfig:
    """engine section with the older train.autocast_dtype folded in (it means precision under autocast)
    and precision 'auto' resolved for `device` (fp32 when no device is given)."""
    engine = config.engine
    if engine.precision == "auto":
        chosen = "bf16" if device is not None and native_bf16(device) else "fp32"
        engine = EngineConfig(**{**engine.__dict__, "precision": chosen})
    legacy = config.train.autocast_dtype
    if legacy == "none":
        return engine
    if engine.precision not in ("fp32", legacy):
        raise ValueError(f"train.autocast_dtype ({legacy}) contradicts engine.precision ({engine.precision}); "
                         "set only engine.precision")
    return EngineConfig(**{**engine.__dict__, "precision": legacy, "mixed_precision": "autocast"})


def deepspeed_config(engine: EngineConfig, config: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for this run (built here, never written by hand)."""
    micro = config.data.batch_size
    low = engine.precision != "fp32"
    ds: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": engine.gradient_accumulation_steps,
        "train_batch_size": micro * engine.gradient_accumulation_steps * world_size,
        "gradient_clipping": engine.gradient_clipping,
        "zero_optimization": {"stage": engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": low and engine.mixed_precision == "deepspeed" and engine.precision == "bf16"},
        "fp16": {"enabled": low and engine.mixed_precision == "deepspeed" and engine.precision == "fp16",
                 "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if low and engine.mixed_precision == "autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": DTYPE_NAMES[engine.precision]}
    if engine.optimizer == "deepspeed":
        opt = config.optimizer
        # adam_w_mode False: L2 weight decay like torch.optim.Adam and the reference (SPEC 5).
        ds["optimizer"] = {"type": "Adam", "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8,
                                                      "weight_decay": opt.weight_decay, "adam_w_mode": False}}
    return ds


class TrainModule(Unsup3D):
    """Unsup3D with forward = decompose, so the engine can call it (same state_dict keys). The step timer
    comes in as an argument (the engine passes keyword arguments through to forward)."""

    channels_last = False  # set by build_engine (EngineConfig.channels_last)

    def forward(self, image: torch.Tensor, timer: SectionTimer = NO_TIMER) -> Decomposition:
        first = next(self.parameters())
        if first.dtype != image.dtype:
            image = image.to(first.dtype)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.decompose(image, timer)


def speed_up(module: Unsup3D, engine: EngineConfig) -> None:
    """Apply EngineConfig's layout and compile settings to the five nets, in place."""
    nets = [module.depth_net, module.albedo_net, module.light_net, module.view_net, module.confidence_net]
    for net in filter(None, nets):
        if engine.channels_last:
            # After deepspeed.initialize (which views every parameter as bytes, so needs the default
            # layout); .to() swaps each parameter's data in place, so the optimizer keeps its parameters.
            net.to(memory_format=torch.channels_last)
        if engine.compile:
            # nn.Module.compile, not torch.compile(net): the module stays itself, so its state_dict
            # keys carry no "_orig_mod." and checkpoints are those of an eager run.
            net.compile()
    if isinstance(module, TrainModule):
        module.channels_last = engine.channels_last


def adam_flags(engine: EngineConfig) -> dict:
    """torch.optim.Adam's keywords for EngineConfig.adam."""
    return {"fused": {"fused": True, "foreach": None}, "foreach": {"fused": None, "foreach": True},
            "for-loop": {"fused": None, "foreach": False}}[engine.adam]


def apply_adam_flags(engine: Engine) -> None:
    """Set EngineConfig.adam on the torch Adam's param groups again: loading an optimizer state brings
    back the implementation of the run that saved it (a checkpoint of an older version: for-loop)."""
    if engine.config.optimizer != "torch":
        return
    for group in engine.gate.optimizer.param_groups:
        if "fused" in group:
            group.update(adam_flags(engine.config))


def _zero_missing_gradients(module: torch.nn.Module):
    """DeepSpeed's gradient all-reduce for a world of one process without ZeRO.

    Averaging over one process changes nothing, yet DeepSpeed flattens every gradient into one buffer
    and copies it back: about 3% of a small-width CPU step (issue 14). What its all-reduce does that
    matters is kept: a trainable parameter without a gradient (the perceptual sigma head when
    lam_perc is 0) gets a zero one, so that Adam's weight decay moves it as in a run of several
    workers, and results stay those of the full all-reduce, bit for bit. (ZeRO 1/2 and DeepSpeed's
    bf16/fp16 optimizer move gradients in that call: they keep it.)
    """

    def allreduce_gradients(*args, **kwargs) -> None:
        for param in module.parameters():
            if param.requires_grad and param.numel() and param.grad is None:
                param.grad = torch.zeros_like(param)

    return allreduce_gradients


class SkippableStep:
    """Wraps an optimizer's step so that one step can be dropped.

    Every DeepSpeed wrapper (ZeRO 1/2, the bf16 optimizer, plain ZeRO 0) ends in the wrapped torch
    optimizer's step(); dropping that call leaves weights and Adam moments untouched while DeepSpeed
    clears the gradients as usual. That makes a skipped step exact for every ZeRO stage and precision.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.skip = False
        self._step = optimizer.step
        optimizer.step = self._maybe_step  # instance attribute: found before the class's step

    def _maybe_step(self, *args, **kwargs):
        if self.skip:
            return None
        return self._step(*args, **kwargs)


class NonFiniteWatch:
    """Flags a non-finite loss or gradient during the micro-batches of one step (no host sync).

    Gradients are checked either as they arrive (a hook per parameter: works for every ZeRO stage and
    precision, where DeepSpeed may move gradients out of param.grad) or, with `gradients_in_params`,
    once per step in take() on the accumulated param.grad by one multi-tensor norm: the same verdict
    (a non-finite value stays non-finite when accumulated) for a fraction of the cost of 3 ops per
    parameter and micro-batch (issue 14). A finite gradient whose norm overflows float32 also counts
    as non-finite there; such a step would be useless anyway.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, watch_gradients: bool,
                 gradients_in_params: bool = False):
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.handles = []
        self.params = []
        if watch_gradients and gradients_in_params:
            self.params = [p for p in module.parameters() if p.requires_grad]
        elif watch_gradients:
            for param in module.parameters():
                if param.requires_grad:
                    self.handles.append(param.register_hook(self._check))

    def _check(self, grad: torch.Tensor) -> None:
        self.flag.logical_or_(~torch.isfinite(grad).all())

    def check_loss(self, loss: torch.Tensor) -> None:
        self.flag.logical_or_(~torch.isfinite(loss.detach()).all())

    def take(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            self.flag.logical_or_(~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        bad = bool(self.flag.item())
        self.flag.zero_()
        return bad


@dataclass
class Engine:
    engine: object  # deepspeed.DeepSpeedEngine
    module: TrainModule
    gate: SkippableStep
    watch: NonFiniteWatch
    config: EngineConfig
    ds_config: dict


def build_engine(config: RunConfig, world_size: int, device: torch.device) -> Engine:
    """deepspeed.initialize over the five nets; the process group must exist already."""
    import deepspeed

    from trainer.loop.checkpoint_load import install_safe_deepspeed_loader

    engine_config = resolve_engine_config(config, device)
    if config.engine.precision == "auto":
        log.info("engine.precision auto: %s on %s", engine_config.precision, device)
    if engine_config.precision == "fp16" and device.type != "cuda":
        log.warning("fp16 on CPU works only where the CPU supports it (AVX512-FP16); bf16 is the CPU mixed precision")
    if engine_config.cpu_threads is not None and device.type == "cpu":
        torch.set_num_threads(engine_config.cpu_threads)
    module = TrainModule(config.model).to(device)
    module.mirrored_pose = config.loss.lam_pose_flip > 0
    ds_config = deepspeed_config(engine_config, config, world_size)
    optimizer = None
    if engine_config.optimizer == "torch":
        opt = config.optimizer
        optimizer = torch.optim.Adam(module.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                     **adam_flags(engine_config))
    ds_engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, model_parameters=module.parameters() if optimizer is None else None,
        config=ds_config, dist_init_required=False,
    )
    install_safe_deepspeed_loader(ds_engine)
    # Without ZeRO and without DeepSpeed's bf16/fp16 optimizer, the gradients stay in param.grad
    # until the step.
    in_params = engine_config.zero_stage == 0 and (engine_config.precision == "fp32"
                                                   or engine_config.mixed_precision == "autocast")
    if world_size == 1 and in_params:
        ds_engine.allreduce_gradients = _zero_missing_gradients(ds_engine.module)
    speed_up(ds_engine.module, engine_config)
    basic = ds_engine.basic_optimizer if optimizer is None else optimizer
    gate = SkippableStep(basic)
    # fp16 overflows of the loss scaler are DeepSpeed's business (it skips and rescales); watch the loss only.
    # With the gradients in param.grad, check them there, once per step.
    watch = NonFiniteWatch(ds_engine.module, device, watch_gradients=engine_config.precision != "fp16",
                           gradients_in_params=in_params)
    return Engine(ds_engine, ds_engine.module, gate, watch, engine_config, ds_config)
