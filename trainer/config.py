"""The run configuration: one YAML file per run (per category), one typed section per component.

The dataclass defaults are the reference recipe (SPEC sections 2, 4, 5) for 64 px faces.
`configs/default.yaml` overrides them into the small CPU run that trains end to end on a laptop.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config_loading import (ConfigError, check_choice, check_float, check_int, check_name, load_yaml_config,
                                    require, to_dict)
from trainer.model.perceptual import PerceptualConfig
from trainer.render.renderer import PIXEL_CENTRES


IMAGE_SIZES = (64, 128, 256, 512, 1024)
"""What the nets support: a power of two >= 64 (one extra stride-2 stage per doubling); 1024 bounds memory."""
MAX_WIDTH = 4096
"""Upper bound of every net width and bottleneck: far above any recipe, far below an accidental 1e9."""


def _check_group_norm_width(section, name: str) -> None:
    """EncDec widths go through GroupNorm(width // 4 groups) at width, 2x, 4x and 8x: a multiple of 4 divides."""
    value = getattr(section, name)
    require(isinstance(value, int) and not isinstance(value, bool) and 4 <= value <= MAX_WIDTH // 8
            and value % 4 == 0, name, value, f"must be a positive multiple of 4 up to {MAX_WIDTH // 8} "
            "(the nets' GroupNorm uses width/4 groups; the widest layer is 8 x this)")


@dataclass
class ModelConfig:
    """Network widths, image size and the ranges that map net outputs to depth, light and view."""

    image_size: int = 64
    """Input and output resolution in pixels; a power of two >= 64."""
    depth_nf: int = 64
    """Base width of the depth EncDec."""
    depth_zdim: int = 256
    """Bottleneck width of the depth EncDec."""
    albedo_nf: int = 64
    """Base width of the albedo EncDec."""
    albedo_zdim: int = 256
    """Bottleneck width of the albedo EncDec."""
    light_nf: int = 32
    """Base width of the light encoder."""
    view_nf: int = 32
    """Base width of the view encoder."""
    conf_nf: int = 64
    """Base width of the confidence net."""
    conf_zdim: int = 128
    """Bottleneck width of the confidence net."""
    use_confidence: bool = True
    """Predict sigma maps; False trains with plain L1 and MSE (the synthetic cars recipe)."""
    min_depth: float = 0.9
    """Nearest canonical depth."""
    max_depth: float = 1.1
    """Farthest canonical depth."""
    border_depth: float | None = None
    """Depth written into the 2 leftmost and rightmost columns; None means 0.7*max + 0.3*min."""
    max_rotation_degrees: float = 60.0
    """View rotation for a view-net output of +-1, about each camera axis."""
    xy_translation: float = 0.1
    """View translation in x and y for a view-net output of +-1."""
    z_translation: float = 0.0
    """View translation in z for an output of +-1 (0 for faces and cars, 0.1 for cats)."""
    supersample: int = 1
    """Render depth at this multiple of the resolution and average-pool (the reference used 2)."""
    pixel_centre: str = "integer"
    """Where the depth rasteriser samples each pixel: "integer" at the pixel's integer coordinates,
    as back-projection, normals and warp do (consistent; the default); "reference" half a pixel
    further right and down (sub-pixels at +1/4 and +3/4 with supersample 2), as the reference's
    rasteriser did, which puts its rendered depth half a pixel off its warp (SPEC 3.4). Only the
    rasteriser's samples move (RendererConfig.pixel_centre)."""
    shading_normal_eps: float | None = None
    """None normalises the canonical normals used for shading exactly; 1e-7 is the reference's
    n / (|n| + 1e-7) (SPEC 3.6), which at 64 px shortens them by about 0.3% (|n| is about 3e-5) and
    so dims the diffuse term by as much. The normals of the metrics have their own setting."""
    depth_init_scale: float = 1.0
    """Multiplies the initial weights of the depth net's last conv. 1 is PyTorch's default init,
    whose depth maps start with per-pixel roughness of about 0.02 (a tenth of the depth range) that
    a long run slowly smooths out; a small value starts from a nearly flat depth map, which short
    CPU runs need."""
    view_init_scale: float = 1.0
    """Multiplies the initial weights of the view net's last conv (its six outputs). 1 is PyTorch's
    default init. 0 starts every pose at exactly zero and lets an output move only where the
    photometric gradient pushes it: with random output weights, the features the view net learns
    for what is easy (roll, image-plane translation) leak into yaw and pitch, whose gradient is
    weak while the learned relief is still shallow, and those spurious rotations then stay (seen as
    predicted pitch following the true roll; BENCHMARKS.md, issue 2 item 9)."""
    depth_blur: float = 0.0
    """Standard deviation in pixels of a fixed Gaussian blur of the depth net's raw output (before
    the prior, mean and tanh); 0 is off, the reference. Not learned. Why: with confidence maps the
    photometric gradients grow as 1/sigma, and a small depth net then paints shading detail into a
    checkerboard of its transposed convolutions (or, under a strong smoothness term, into stripes)
    that the smoothness term alone does not remove (BENCHMARKS.md, issue 12 study)."""
    depth_prior: float = 0.0
    """Amplitude of a fixed convex bump added to the depth net's raw output (before tanh): the
    paraboloid -a * max(0, 1 - (x/0.75)^2 - (y/0.9)^2) over the frame in [-1, 1]^2, nearer in the
    centre (0.5 is about 0.05 in depth). 0 is the reference. Not learned and not stored in
    checkpoints (it follows from the config). Why: shading alone cannot tell a convex surface lit
    from one side from a concave one lit from the other, and a flat start sits exactly between them
    with no gradient for the light direction; the reference breaks the tie over tens of thousands
    of iterations, a small convex bias breaks it at once (see BENCHMARKS.md, issue 2 item 9)."""

    def __post_init__(self):
        require(self.image_size in IMAGE_SIZES, "image_size", self.image_size,
                f"must be one of {', '.join(map(str, IMAGE_SIZES))} (a power of two >= 64: what the nets support)")
        for name in ("depth_nf", "albedo_nf", "conf_nf"):
            _check_group_norm_width(self, name)
        for name in ("depth_zdim", "albedo_zdim", "conf_zdim"):
            check_int(self, name, 1, MAX_WIDTH)
        for name in ("light_nf", "view_nf"):
            check_int(self, name, 1, MAX_WIDTH // 8)
        check_float(self, "min_depth", 0.0, strict_minimum=True)
        check_float(self, "max_depth", 0.0, strict_minimum=True)
        require(self.min_depth < self.max_depth, "min_depth", self.min_depth,
                f"must be below max_depth ({self.max_depth:g})")
        check_float(self, "border_depth", 0.0, strict_minimum=True, optional=True)
        check_float(self, "max_rotation_degrees", 0.0, 180.0)
        for name in ("xy_translation", "z_translation", "depth_init_scale", "view_init_scale"):
            check_float(self, name, 0.0)
        check_choice(self, "supersample", (1, 2))
        check_float(self, "depth_prior", 0.0)
        check_float(self, "depth_blur", 0.0, 8.0)
        check_choice(self, "pixel_centre", PIXEL_CENTRES)
        check_float(self, "shading_normal_eps", 0.0, strict_minimum=True, optional=True)

    @property
    def resolved_border_depth(self) -> float:
        if self.border_depth is not None:
            return self.border_depth
        return 0.7 * self.max_depth + 0.3 * self.min_depth


@dataclass
class LossConfig:
    """Weights of the loss terms (SPEC 4)."""

    lam_flip: float = 0.5
    """Weight of the flipped branch's photometric and perceptual losses."""
    lam_perc: float = 1.0
    """Weight of the perceptual loss (0 disables the perceptual net's use)."""
    lam_smooth: float = 0.0
    """Weight of the depth smoothness term (0.1 for synthetic cars and higher resolutions)."""
    lam_flip_warmup: float | None = None
    """lam_flip used during the first lam_flip_warmup_epochs epochs (cats: 1.0 for 10 epochs)."""
    lam_flip_warmup_epochs: int = 0
    """Number of epochs lam_flip_warmup applies to."""
    lam_pose_flip: float = 0.0
    """Weight of the mirrored-pose term (not in the reference; 0 is off): the view and light nets also
    see each image mirrored, and their outputs must be the mirror of the original's (yaw, roll, x
    translation and light x change sign, the rest stays). It keeps the view net from explaining every
    image with one large pose, which short runs on faces with backgrounds otherwise do."""

    def __post_init__(self):
        for name in ("lam_flip", "lam_perc", "lam_smooth", "lam_pose_flip"):
            check_float(self, name, 0.0)
        check_float(self, "lam_flip_warmup", 0.0, optional=True)
        check_int(self, "lam_flip_warmup_epochs", 0)

    def lam_flip_at(self, epoch: int) -> float:
        if self.lam_flip_warmup is not None and epoch < self.lam_flip_warmup_epochs:
            return self.lam_flip_warmup
        return self.lam_flip


@dataclass
class OptimizerConfig:
    """Adam on every net (SPEC 5)."""

    lr: float = 1e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = 5e-4
    """L2 weight decay (torch Adam's, as the reference)."""

    def __post_init__(self):
        check_float(self, "lr", 0.0, strict_minimum=True)
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

    def __post_init__(self):
        check_name(self, "root")
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
    """'fp32', 'bf16' or 'fp16' (fp16 only on GPU). The renderer and losses always run in float32."""
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
    rounding; whether it is faster depends on the CPU and the widths (BENCHMARKS.md, issue 14)."""
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
        check_choice(self, "precision", ("fp32", "bf16", "fp16"))
        check_choice(self, "mixed_precision", ("autocast", "deepspeed"))
        check_choice(self, "zero_stage", (0, 1, 2))
        check_choice(self, "optimizer", ("torch", "deepspeed"))
        check_int(self, "gradient_accumulation_steps", 1)
        check_float(self, "gradient_clipping", 0.0)
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
    """In local mode (a world of one), show step, images/s, loss and time left on stderr."""
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


# Model fields added after checkpoints were already being written, with the value that reproduces
# the behaviour from before they existed. model_config_hash leaves a field out while it has that
# value, so a checkpoint saved before the field existed keeps its hash and still resumes; any other
# value changes the function the nets are trained through, and so the hash. Add new fields here.
HASH_NEUTRAL_MODEL_FIELDS = {
    "pixel_centre": "integer",
    "shading_normal_eps": None,
    "depth_blur": 0.0,
}


def model_config_hash(config: ModelConfig) -> str:
    """Identifies the model (architecture and rendering) a checkpoint was made with.

    Every field counts, except the HASH_NEUTRAL_MODEL_FIELDS at their neutral value.
    """
    fields = to_dict(config)
    for name, neutral in HASH_NEUTRAL_MODEL_FIELDS.items():
        if name in fields and fields[name] == neutral:
            del fields[name]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "LossConfig",
    "ModelConfig",
    "MonitoringConfig",
    "OptimizerConfig",
    "RunConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "dump_config",
    "load_run_config",
    "model_config_hash",
]
