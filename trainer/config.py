"""The run configuration: one YAML file per run (per category), one typed section per component.

The model's own sections (ModelConfig, LossConfig, model_config_hash) live in trainer/model/config.py,
the perceptual net's in trainer/model/perceptual.py.

The dataclass defaults are the reference recipe (SPEC sections 2, 4, 5) for 64 px faces.
`configs/default.yaml` overrides them into the small CPU run that trains end to end on a laptop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config_loading import (ConfigError, check_choice, check_float, check_int, check_name, load_yaml_config,
                                    require, to_dict)
from trainer.model.config import LossConfig, ModelConfig
from trainer.model.perceptual import PerceptualConfig


@dataclass
class OptimizerConfig:
    """Adam on every net (SPEC 5)."""

    lr: float = 1e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = 5e-4
    """L2 weight decay (torch Adam's, as the reference)."""
    lr_decay_steps: list[int] = field(default_factory=list)
    """Step decay: after each of these steps (increasing) the learning rate is multiplied by
    lr_decay_factor. Empty (the reference): a constant learning rate."""
    lr_decay_factor: float = 0.2
    """What each step in lr_decay_steps multiplies the learning rate by."""

    def __post_init__(self):
        check_float(self, "lr", 0.0, strict_minimum=True)
        steps = self.lr_decay_steps
        require(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps)
                and list(steps) == sorted(set(steps)), "lr_decay_steps", steps,
                "must be a list of increasing step numbers >= 1")
        check_float(self, "lr_decay_factor", 0.0, 1.0, strict_minimum=True)
        for i, beta in enumerate(self.betas):
            require(isinstance(beta, (int, float)) and 0.0 <= beta < 1.0, f"betas[{i}]", beta,
                    "must be in [0, 1) (Adam's moment decay)")
        check_float(self, "weight_decay", 0.0)


@dataclass
class SyntheticDataConfig:
    """Synthetic data generated into data.root when it does not exist yet."""

    kind: str = "blobs"
    """'faces' (realistic people rendered from MakeHuman's CC0 head model: trainer/data/face_generator.py)
    or 'blobs' (probably-symmetric coloured bumps: trainer/data/synthetic.py, a fast test fixture)."""
    num_train: int = 2000
    """Training images."""
    num_val: int = 100
    """Validation images."""
    num_test: int = 200
    """Test images."""
    seed: int = 0
    """Generator seed (independent of the training seed)."""
    background: str = "noise"
    """faces: 'varied' (random colour fields, as photos have) or 'black'. blobs: 'noise' (smooth
    random colour fields), 'plain' or 'black'. A black background can be
    reconstructed exactly, which lets the confidence maps drive the photometric loss towards
    log(eps) there and the model collapse (albedo and colour lost); photos never allow that."""
    albedo_hues: str = "any"
    """blobs only. Base albedo hue: 'any' (the whole hue circle) or 'skin' (reds to oranges, like the
    BFM faces of the reference's synface set)."""

    def __post_init__(self):
        check_choice(self, "kind", ("faces", "blobs"))
        check_int(self, "num_train", 1)
        check_int(self, "num_val", 0)
        check_int(self, "num_test", 0)
        check_int(self, "seed", 0, 2**32 - 1)
        check_choice(self, "background", ("varied", "black") if self.kind == "faces" else ("noise", "plain", "black"))
        check_choice(self, "albedo_hues", ("any", "skin"))


@dataclass
class DataConfig:
    """Where training images come from and how they are batched."""

    root: str = "data/synthetic"
    """A folder in the synface layout (<root>/<split>/image/<name>_image.png, depth optional)."""
    split: str = "train"
    """Split folder to train on."""
    batch_size: int = 64
    """Images per step per process."""
    hflip_probability: float = 0.5
    """Random horizontal flip, the reference's only augmentation."""
    generate_if_missing: SyntheticDataConfig | None = None
    """When set and root does not exist, generate synthetic data there first."""
    max_image_pixels: int = 4096 * 4096
    """Images with more pixels (read from the file header, before decoding) are skipped and counted."""
    min_image_size: int | None = None
    """Images whose shorter side is below this are skipped and counted, never upscaled from a few pixels;
    None: half of model.image_size."""
    on_dataset_change: str = "error"
    """Resuming a checkpoint whose data state was saved over other images (root's split grew or was
    replaced): error, or restart_epoch to go on with the model, optimizer and step over the new images
    from the start of the saved epoch (a warning names both datasets)."""

    def __post_init__(self):
        check_name(self, "root")
        check_choice(self, "on_dataset_change", ("error", "restart_epoch"))
        check_name(self, "split")
        check_int(self, "batch_size", 1, 1 << 16)
        check_float(self, "hflip_probability", 0.0, 1.0)
        check_int(self, "max_image_pixels", 1)
        if self.min_image_size is not None:
            check_int(self, "min_image_size", 1)


def check_eval_settings(eval_every: int | None, eval_images: int) -> None:
    """train.eval_every: null or >= 0 (0 and null: off); train.eval_images >= 1 (ValueError otherwise)."""
    if eval_every is not None and (isinstance(eval_every, bool) or eval_every < 0):
        raise ValueError(f"eval_every must be 0 (off), null (off) or a positive number of steps, got {eval_every!r}")
    if isinstance(eval_images, bool) or eval_images < 1:
        raise ValueError(f"eval_images must be at least 1, got {eval_images!r}")


@dataclass
class TrainConfig:
    """Length, logging and checkpointing of a run."""

    out_dir: str = "runs/default"
    """Checkpoints, the resolved config and logs go here."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""
    epochs: int = 30
    """Passes over the training split (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 20
    """Print and record metrics every this many steps."""
    visualize_every: int = 0
    """Save a grid of a fixed set of validation images, decomposed, to out_dir/visuals every this many
    steps (0: never)."""
    visualize_count: int = 8
    """Images in that grid: the first of data.root's val split (else train), or of the first batch."""
    eval_every: int | None = 0
    """Validate every this many steps, at the start of a run from step 0 (the untrained model) and at
    its end: SIDE and MAD of the model on a fixed subset of a split with ground-truth depth, beside
    the constant-depth and average-train-depth baselines (computed once), into metrics.jsonl, the
    Prometheus metrics, the log and <out_dir>/learning_curve.png (trainer/loop/validation.py). Rank 0
    only; exact resume is unaffected. 0 or null: off. Off (logged once) without such a split."""
    eval_images: int = 200
    """Images of that subset: evenly spaced over the split's pairs sorted by name, the same every time."""
    eval_split: str | None = None
    """Split to validate on (<root>/<split>/image and <split>/depth); null: 'val', else 'test'."""
    eval_data: str | None = None
    """Synface-layout folder to validate on; null: data.root when the run trains from that folder
    (a run that streams shards validates only when this is set)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda[:N]'."""
    autocast_dtype: str = "none"
    """Older spelling of engine.precision with engine.mixed_precision 'autocast': run the nets under
    torch.autocast with 'bf16' or 'fp16'; 'none' leaves engine.precision in charge."""
    allow_other_model_config: bool = False
    """Resume from a checkpoint whose model section differs from this run's (normally refused)."""

    def __post_init__(self):
        check_name(self, "out_dir")
        check_int(self, "seed", 0, 2**32 - 1)
        check_int(self, "epochs", 1)
        if self.max_steps is not None:
            check_int(self, "max_steps", 0)  # 0: no step; saves the initial weights as step 0 (an untrained baseline)
        check_int(self, "checkpoint_every", 1)
        check_int(self, "keep_checkpoints", 1)
        check_int(self, "log_every", 1)
        check_int(self, "visualize_every", 0)
        check_int(self, "visualize_count", 1, 256)
        require(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
                "device", self.device, "must be auto, cpu, cuda or cuda:N")
        check_choice(self, "autocast_dtype", ("none", "bf16", "fp16"))
        if self.eval_every is not None:
            check_int(self, "eval_every", 0)  # 0 or null: no validation
        check_int(self, "eval_images", 1)


@dataclass
class EngineConfig:
    """The DeepSpeed engine: precision, ZeRO, accumulation, clipping, optimizer, non-finite handling.

    The defaults were chosen by measurement (benchmarks/engine_results.md)."""

    precision: str = "fp32"
    """'fp32', 'bf16' or 'fp16' (fp16 only on GPU), or 'auto': bf16 where the hardware computes it
    natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16 support), else fp32 (bf16 emulated on an
    older CPU is slower than fp32). The renderer and losses always run in float32."""
    mixed_precision: str = "autocast"
    """How bf16/fp16 is applied: 'autocast' (DeepSpeed's torch_autocast section: float32 weights,
    the nets run under torch.autocast) or 'deepspeed' (DeepSpeed's bf16/fp16 section: low-precision
    weights with float32 master weights in the optimizer)."""
    zero_stage: int = 0
    """ZeRO stage 0, 1 or 2."""
    gradient_accumulation_steps: int = 1
    """Micro-batches of data.batch_size per optimizer step and process."""
    gradient_clipping: float = 0.0
    """Clip the global gradient norm to this; 0 disables clipping (the reference did not clip)."""
    optimizer: str = "torch"
    """Adam implementation: 'torch' (torch.optim.Adam handed to DeepSpeed) or 'deepspeed' (DeepSpeed's
    own Adam in L2 mode, JIT-compiled at first use)."""
    adam: str = "fused"
    """How torch.optim.Adam (optimizer 'torch') runs its step: 'fused' (one kernel over all parameters),
    'foreach' (multi-tensor ops) or 'for-loop' (one set of ops per parameter, torch's CPU default).
    Same update up to rounding; 'fused' measured fastest on CPU (BENCHMARKS.md, issue 14)."""
    channels_last: bool = False
    """Run the five nets in channels-last memory layout (weights and input). Same results up to
    rounding. On CPU their GroupNorm then runs in C (trainer/model/group_norm_nhwc.py): one worker
    alone steps 1.05 to 1.14x faster at widths 16, two workers sharing 2 cores no faster, so it is
    off by default (BENCHMARKS.md, issue 14, "The nets in channels-last, with GroupNorm in C").
    Only with zero_stage 0 and autocast (or fp32): ZeRO and DeepSpeed's bf16/fp16 optimizer keep
    the parameters in flat buffers of the default layout."""
    compile: bool = False
    """torch.compile each of the five nets (in place: state_dict keys and checkpoints unchanged).
    The first steps take longer (the compile); later ones may be faster (BENCHMARKS.md, issue 14)."""
    cpu_threads: int | None = None
    """torch intra-op threads for the step on CPU (torch.set_num_threads when the engine is built);
    None keeps torch's default (one per core, or OMP_NUM_THREADS)."""
    max_nonfinite_steps: int = 3
    """After this many non-finite steps in a row (each skipped), roll back to the last checkpoint."""
    max_rollbacks: int = 3
    """A run that needs more rollbacks than this stops with an error."""

    def __post_init__(self):
        check_choice(self, "precision", ("fp32", "bf16", "fp16", "auto"))
        check_choice(self, "mixed_precision", ("autocast", "deepspeed"))
        check_choice(self, "zero_stage", (0, 1, 2))
        check_choice(self, "optimizer", ("torch", "deepspeed"))
        check_int(self, "gradient_accumulation_steps", 1)
        check_float(self, "gradient_clipping", 0.0)
        # ZeRO 1/2 and DeepSpeed's bf16/fp16 optimizer keep the parameters as views into flat buffers;
        # a layout change after deepspeed.initialize would cut them off from the optimizer's copy.
        require(not self.channels_last or (self.zero_stage == 0 and (self.precision == "fp32"
                                                                      or self.mixed_precision == "autocast")),
                "channels_last", self.channels_last,
                "works only with zero_stage 0 and mixed_precision autocast (or precision fp32)")
        check_choice(self, "adam", ("fused", "foreach", "for-loop"))
        if self.cpu_threads is not None:
            check_int(self, "cpu_threads", 1)
        check_int(self, "max_nonfinite_steps", 1)
        check_int(self, "max_rollbacks", 0)


@dataclass
class MonitoringConfig:
    """Prometheus metrics of every worker (monitoring/) and the local progress bar."""

    enabled: bool = True
    """Serve this worker's metrics on /metrics and time the parts of each step."""
    bind_address: str = "127.0.0.1"
    """Address the metrics server binds to; 0.0.0.0 (or the node's address) on a cluster."""
    port: int = 0
    """0: a free port chosen by the OS (workers sharing a node never clash); else port + local rank."""
    advertise_address: str | None = None
    """Host Prometheus should scrape, when it differs from bind_address (None: bind_address, or the
    host name for a wildcard bind)."""
    sd_dir: str | None = None
    """Directory of Prometheus file_sd JSON files; each worker writes its target there and removes it
    at exit. None: <train.out_dir>/prometheus_sd."""
    run_name: str | None = None
    """The `run` label; None: the name of train.out_dir."""
    progress_bar: bool = True
    """On a run on one machine (a world of one, or all ranks here), rank 0 shows step, images/s, loss and time
    left on stderr."""
    count_flops: bool = True
    """Count the training FLOPs per image once (one extra forward and backward at the first step) for MFU."""
    peak_tflops: float | None = None
    """Peak TFLOP/s for MFU; None: look the GPU up in monitoring/mfu.py (no MFU on CPU unless set)."""

    def __post_init__(self):
        check_int(self, "port", 0, 65535)
        check_name(self, "bind_address")
        check_float(self, "peak_tflops", 0.0, strict_minimum=True, optional=True)


@dataclass
class RunConfig:
    """Everything one training run needs; one section per component."""

    category: str = "synthetic"
    """Object category, used in names and metric labels."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The five nets and output ranges."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    """The frozen perceptual backbone."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length and checkpoints."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed engine: precision, ZeRO, accumulation, clipping."""
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    """Prometheus metrics and the progress bar."""

    def __post_init__(self):
        check_name(self, "category")


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run config YAML; unknown keys and wrong types raise ConfigError naming key and file."""
    return load_yaml_config(RunConfig, path)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(json.loads(json.dumps(to_dict(config))), sort_keys=False)


__all__ = [
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "MonitoringConfig",
    "OptimizerConfig",
    "RunConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "dump_config",
    "load_run_config",
]
