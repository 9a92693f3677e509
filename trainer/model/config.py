"""What the model is: the nets' widths, the image size, the output ranges the renderer maps to, and the
loss weights; model_config_hash names the function a checkpoint's weights belong to.

These sections live next to the model (as PerceptualConfig does in perceptual.py); trainer/config.py
gathers them with the sections of the machinery into the RunConfig of one YAML file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from trainer.config_loading import check_choice, check_float, check_int, require, to_dict
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
