"""Synthetic, probably-symmetric objects with ground-truth depth, written in the synface layout.

The project's stand-in for the BFM "synface" set (SPEC 6), which cannot be downloaded here. Each
object is a face-like relief: a superellipse "mask" cut out of a dome that rises from a plane, with
a nose ridge, eye sockets, a brow, cheeks, a mouth and a chin, all mirror-symmetric about the
vertical centre line, plus a little asymmetric detail (random bumps and dents in depth, blemishes in
albedo). Albedo, light and view are sampled inside the model's own parameterisation (SPEC 2) and
the object is rendered with the project's renderer (SPEC 3), so the ground-truth depth is the depth
the model itself would render in the input view.

Why the shape is built this way:
- The model represents a canonical depth map over the whole frame. The object is therefore a
  height field over a plane; the surface continues past the object's mask boundary (into the dome
  and then the plane), so rotating the mesh makes no "walls" at the silhouette. Only the pixels
  whose canonical source lies inside the mask are object pixels; all other pixels get the
  background colour in the image and byte 0 in the depth PNG, like a face mesh rendered alone.
- The relief's nearest point is near min_depth (0.9) and its rim about 0.05 to 0.15 behind it: a
  face filling much of a 10-degree field of view is about 0.12 wide at depth 1, so that relief is
  roughly head-like in proportion (nose tip to the side of the face).
- Object points stay within about 0.1 of the rotation centre (0, 0, 1) at the default sizes, so
  rotated depths stay inside [0.9, 1.1]; the little that falls outside (a few pixels in a
  thousand images) is clamped so that object pixels always encode to bytes 1..255 and the
  background is exactly 0.

Everything is rendered at `render_scale` times the output size and average-pooled (anti-aliasing).
Randomness comes from one torch.Generator per sample, seeded from (seed, split, index), so a data
set is deterministic for a seed and the first k samples of a split do not depend on how many are
written; the batch size does not change the bytes written either (a test checks it on this CPU
build; other BLAS builds or devices may differ in the last bit, hence rarely by one byte).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.render import geometry
from trainer.data.synface import FAR_DEPTH, NEAR_DEPTH, write_sample

SPLITS = ("train", "val", "test")
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
# Per-image seed = seed * _SEED_STRIDE + split stream * _SPLIT_STRIDE + index (no collisions for
# fewer than a billion images per split).
_SPLIT_STRIDE = 1_000_000_007
_SEED_STRIDE = 3 * _SPLIT_STRIDE


@dataclass
class SyntheticConfig:
    """What to generate and from which distributions (angles in degrees, depths in model units)."""

    image_size: int = 64
    """Output resolution in pixels (square images)."""
    num_train: int = 2000
    """Images in the train split."""
    num_val: int = 200
    """Images in the val split."""
    num_test: int = 200
    """Images in the test split."""
    seed: int = 0
    """Seed of the whole data set; every image has its own generator derived from it."""
    max_yaw_degrees: float = 30.0
    """Rotation about the camera y axis is uniform in +-this (the model's range is +-60)."""
    max_pitch_degrees: float = 15.0
    """Rotation about the camera x axis is uniform in +-this."""
    max_roll_degrees: float = 10.0
    """Rotation about the camera z axis is uniform in +-this."""
    max_translation: float = 0.01
    """x and y translation is uniform in +-this, in scene units (the model's range is +-0.1;
    0.01 is about 4 px at 64 px, which keeps the object inside the frame)."""
    asymmetry: float = 0.1
    """Strength of the asymmetric depth detail: |d - flip(d)| <= asymmetry * (max_depth - min_depth)
    everywhere in the canonical depth, i.e. 0.02 at the default (the visible relief is 0.05 to 0.15
    deep); the largest |asymmetric detail| is asymmetry * 0.1 times a random factor in [0.5, 1]."""
    albedo_asymmetry: float = 0.3
    """Largest per-channel albedo change (in [0, 1] colour units) of an asymmetric blemish."""
    nearest_depth_range: tuple[float, float] = (0.9, 0.925)
    """Canonical depth of the object's nearest point (the nose tip), uniform in this range."""
    base_depth_range: tuple[float, float] = (1.0, 1.06)
    """Canonical depth of the plane the relief rises from, uniform in this range."""
    ambient_range: tuple[float, float] = (0.2, 0.5)
    """Ambient light k_a, uniform in this range (the model's range is [0, 1])."""
    diffuse_range: tuple[float, float] = (0.5, 0.85)
    """Diffuse light k_d, uniform in this range (the model's range is [0, 1])."""
    max_light_xy: float = 0.8
    """Light direction normalize([x, y, 1]) with x, y uniform in +-this (the model's are in +-1)."""
    background: str = "black"
    """Image colour where the object is not: "black" (as the reference synface images), "plain" (a
    random dark colour per image) or "noise" (smooth random blotches of mostly grey, a stand-in for
    photographs behind a rendered face; makes the task harder)."""
    albedo_hues: str = "any"
    """Base albedo hue: "any" (the whole hue circle) or "skin" (reds to oranges, hue 0 to 0.1, as the
    BFM faces of the reference's synface set). Arbitrary hues are much harder for the albedo net: a
    short run learns their shading and silhouette long before their colour (BENCHMARKS.md)."""
    render_scale: int = 2
    """Render at this multiple of image_size and average-pool (anti-aliasing); 1 turns it off."""
    batch_size: int = 64
    """Images rendered together (speed and memory only; the output does not depend on it)."""
    num_threads: int | None = 1
    """torch intra-op threads while generating (restored afterwards); None keeps the caller's.
    1 is the default because on small shared machines a 2-thread torch slowed to a crawl when
    other processes competed for the cores (6 vs 66-107 images/s measured at load 7 on 2 cores)."""

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.render_scale < 1:
            raise ValueError(f"render_scale must be >= 1, got {self.render_scale}")
        if self.albedo_hues not in ("any", "skin"):
            raise ValueError(f"albedo_hues must be any or skin, got {self.albedo_hues!r}")
        if self.background not in ("black", "plain", "noise"):
            raise ValueError(f"background must be black, plain or noise, got {self.background!r}")
        if not NEAR_DEPTH <= self.nearest_depth_range[0] <= self.nearest_depth_range[1] < self.base_depth_range[0]:
            raise ValueError("need 0.9 <= nearest_depth_range < base_depth_range")
        if self.base_depth_range[1] > FAR_DEPTH:
            raise ValueError("base_depth_range must end at or before 1.1")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.asymmetry < 0 or self.albedo_asymmetry < 0:
            raise ValueError("asymmetry and albedo_asymmetry must be >= 0")

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


# ----------------------------------------------------------------------------------------------
# Random parameters of an object (resolution-free: fields are evaluated on any pixel grid later)
# ----------------------------------------------------------------------------------------------

_NUM_EXTRA_PAIRS = 2  # random symmetric bump pairs beyond the face features, for variety
_NUM_ASYM_BUMPS = 4  # asymmetric depth bumps/dents
_NUM_ALBEDO_PAIRS = 3  # mirrored low-frequency albedo blobs
_NUM_BLEMISHES = 3  # asymmetric albedo blemishes
_NOISE_GRID = 5  # control points per side of the "noise" background


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen, dtype=torch.float64)


def sample_params(n: int, cfg: SyntheticConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random number of n objects, drawn in a fixed order from gen (float64 tensors [n, ...]).

    Resolution-free: sample_objects evaluates them at image_size, generation at render_scale x.
    Editing entries (e.g. zeroing the view angles) and passing them to render_objects is allowed.
    """
    u = lambda lo, hi, *shape: _uniform(gen, n, lo, hi, *shape)  # noqa: E731
    p: dict[str, torch.Tensor] = {}
    # Silhouette: a superellipse centred on the vertical centre line, in normalized coordinates
    # (x, y in [-1, 1], y down).
    p["cy"] = u(-0.06, 0.08)
    p["ax"] = u(0.6, 0.78)
    p["ay"] = u(0.74, 0.88)
    p["power"] = u(2.0, 3.2)
    # The dome the mask is cut from is wider than the mask, so the rim is still above the plane.
    p["dome_scale"] = u(1.1, 1.35)
    p["dome_exp"] = u(0.5, 0.9)
    p["nearest"] = u(*cfg.nearest_depth_range)
    p["base"] = u(*cfg.base_depth_range)
    # Face features, amplitudes relative to a dome of height 1 (the sum is rescaled afterwards).
    p["nose_amp"] = u(0.1, 0.3)
    p["nose_y"] = u(0.0, 0.15)
    p["nose_sx"] = u(0.09, 0.15)
    p["nose_sy"] = u(0.16, 0.3)
    p["eye_amp"] = u(-0.2, -0.06)
    p["eye_x"] = u(0.24, 0.38)
    p["eye_y"] = u(-0.35, -0.15)
    p["eye_s"] = u(0.09, 0.15)
    p["brow_amp"] = u(0.0, 0.15)
    p["brow_dy"] = u(0.12, 0.2)
    p["brow_sx"] = u(0.3, 0.5)
    p["brow_sy"] = u(0.05, 0.09)
    p["cheek_amp"] = u(0.0, 0.15)
    p["cheek_x"] = u(0.3, 0.45)
    p["cheek_y"] = u(0.1, 0.3)
    p["cheek_s"] = u(0.15, 0.25)
    p["mouth_amp"] = u(-0.15, -0.03)
    p["mouth_y"] = u(0.38, 0.52)
    p["mouth_sx"] = u(0.15, 0.25)
    p["mouth_sy"] = u(0.04, 0.07)
    p["chin_amp"] = u(0.0, 0.15)
    p["chin_y"] = u(0.6, 0.72)
    p["chin_s"] = u(0.12, 0.2)
    p["pair_amp"] = u(-0.12, 0.12, _NUM_EXTRA_PAIRS)
    p["pair_x"] = u(0.1, 0.6, _NUM_EXTRA_PAIRS)
    p["pair_y"] = u(-0.6, 0.6, _NUM_EXTRA_PAIRS)
    p["pair_s"] = u(0.08, 0.2, _NUM_EXTRA_PAIRS)
    # Asymmetric depth detail: bumps and dents anywhere on the object, rescaled to cfg.asymmetry.
    p["asym_amp"] = u(-1.0, 1.0, _NUM_ASYM_BUMPS)
    # Off the centre line (a bump on it would be symmetric), on either side.
    p["asym_x"] = u(0.15, 0.65, _NUM_ASYM_BUMPS) * torch.where(u(0, 1, _NUM_ASYM_BUMPS) < 0.5, -1.0, 1.0)
    p["asym_y"] = u(-0.6, 0.6, _NUM_ASYM_BUMPS)
    p["asym_s"] = u(0.06, 0.16, _NUM_ASYM_BUMPS)
    p["asym_scale"] = u(0.5, 1.0)
    # Albedo, in [0, 1] colour units: a base colour (HSV), mirrored variation, dark features.
    p["hue"] = u(0.0, 1.0)
    if cfg.albedo_hues == "skin":  # the same draw, mapped: the random stream does not change
        p["hue"] = p["hue"] * 0.1
    p["sat"] = u(0.1, 0.6)
    p["val"] = u(0.5, 0.9)
    p["alb_pair_amp"] = u(-0.2, 0.2, _NUM_ALBEDO_PAIRS, 3)
    p["alb_pair_x"] = u(0.0, 0.7, _NUM_ALBEDO_PAIRS)
    p["alb_pair_y"] = u(-0.7, 0.7, _NUM_ALBEDO_PAIRS)
    p["alb_pair_s"] = u(0.1, 0.3, _NUM_ALBEDO_PAIRS)
    p["eye_dark"] = u(0.2, 0.7)
    p["brow_dark"] = u(0.0, 0.5)
    p["lip_amp"] = u(-0.25, 0.25, 3)
    p["blem_amp"] = u(-1.0, 1.0, _NUM_BLEMISHES)  # mostly lighter or darker ...
    p["blem_tint"] = u(-0.3, 0.3, _NUM_BLEMISHES, 3)  # ... with a little colour
    p["blem_x"] = u(-0.6, 0.6, _NUM_BLEMISHES)
    p["blem_y"] = u(-0.6, 0.6, _NUM_BLEMISHES)
    p["blem_s"] = u(0.03, 0.08, _NUM_BLEMISHES)
    # Light in the model's parameterisation (SPEC 2): x0, x1 -> k_a, k_d; (x2, x3) -> direction.
    p["k_ambient"] = u(*cfg.ambient_range)
    p["k_diffuse"] = u(*cfg.diffuse_range)
    p["light_xy"] = u(-cfg.max_light_xy, cfg.max_light_xy, 2)
    # View: pitch (x), yaw (y), roll (z) in degrees, translation in scene units.
    p["pitch"] = u(-cfg.max_pitch_degrees, cfg.max_pitch_degrees)
    p["yaw"] = u(-cfg.max_yaw_degrees, cfg.max_yaw_degrees)
    p["roll"] = u(-cfg.max_roll_degrees, cfg.max_roll_degrees)
    p["trans"] = u(-cfg.max_translation, cfg.max_translation, 2)
    # Background colour (plain) and a coarse colour grid (noise); drawn always, so that the
    # background choice does not change the objects.
    p["bg_color"] = u(0.0, 0.35, 3)
    p["bg_noise"] = u(0.0, 0.6, 1, _NOISE_GRID, _NOISE_GRID)  # brightness ...
    p["bg_noise_tint"] = u(-0.08, 0.08, 3, _NOISE_GRID, _NOISE_GRID)  # ... and a little colour
    return p


def _cat_params(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _per_sample_generator(seed: int, split: str, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * _SEED_STRIDE + _SPLIT_STREAMS[split] * _SPLIT_STRIDE + index) % (1 << 63))
    return g


# ----------------------------------------------------------------------------------------------
# Fields on a pixel grid
# ----------------------------------------------------------------------------------------------


def _grid(size: int, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized coordinates x (columns) [1, 1, S] and y (rows) [1, S, 1], S = size*factor, float32.

    Pixel centres of a size x size image map to [-1, 1] (u / (size-1) * 2 - 1); with factor > 1
    the grid holds the sub-pixel centres whose factor x factor blocks average onto those pixels
    (sub-pixel j sits at u = (j - (factor-1)/2) / factor). x is made exactly antisymmetric under a
    left-right flip, so |x| is exactly mirror-symmetric.
    """
    u = (torch.arange(size * factor, dtype=torch.float64) - (factor - 1) / 2) / factor
    c = u / (size - 1) * 2 - 1
    c = ((c - c.flip(0)) / 2).float()
    return c.view(1, 1, -1), c.view(1, -1, 1)


def _col(t: torch.Tensor) -> torch.Tensor:
    """Per-object scalars [n] -> [n, 1, 1] for broadcasting over a grid."""
    return t[:, None, None]


def _bell(t, c, s) -> torch.Tensor:
    return torch.exp(-0.5 * ((t - _col(c)) / _col(s)) ** 2)


def _gauss(x, y, cx, cy, sx, sy) -> torch.Tensor:
    """Axis-aligned Gaussians [n, H, W] (separable: the exponentials are taken on rows and columns)."""
    return _bell(x, cx, sx) * _bell(y, cy, sy)


def _mirrored_gauss(x, y, cx, cy, sx, sy) -> torch.Tensor:
    """A pair of Gaussians at (+-cx, cy): exactly symmetric because it depends on |x| only."""
    ax = x.abs()
    return (_bell(ax, cx, sx) + _bell(ax, -cx, sx)) * _bell(y, cy, sy)


def _superellipse_radius(x, y, p: dict[str, torch.Tensor], scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """rho with rho < 1 inside the object's superellipse (semi-axes scaled by `scale`)."""
    pw = _col(p["power"])
    sx = _col(p["ax"] * scale)
    sy = _col(p["ay"] * scale)
    return ((x.abs() / sx) ** pw + ((y - _col(p["cy"])).abs() / sy) ** pw) ** (1.0 / pw)


def _fields(p: dict[str, torch.Tensor], size: int, cfg: SyntheticConfig, factor: int = 1) -> dict[str, torch.Tensor]:
    """Canonical depth [n,H,W], albedo [n,3,H,W] in [-1,1], object mask [n,H,W] and background
    image [n,3,H,W] in [-1,1] of a size-pixel image, sampled at factor x factor sub-pixels per
    pixel (H = W = size * factor), all float32."""
    x, y = _grid(size, factor)
    p = {k: v.float() for k, v in p.items()}
    cy = p["cy"]

    # --- symmetric height h_sym >= 0 (toward the camera), max rescaled to base - nearest ---
    rho_dome = _superellipse_radius(x, y, p, p["dome_scale"])
    dome = (1 - rho_dome.clamp(max=1.0) ** 2).clamp_min(0) ** _col(p["dome_exp"])
    feat = p["nose_amp"][:, None, None] * (
        _gauss(x, y, 0 * cy, cy + p["nose_y"], p["nose_sx"], p["nose_sy"])
        + 0.4 * _gauss(x, y, 0 * cy, cy + p["nose_y"] + 0.6 * p["nose_sy"], p["nose_sx"] * 0.9, p["nose_sx"] * 0.9)
    )
    eye_y = cy + p["eye_y"]
    feat = feat + _col(p["eye_amp"]) * _mirrored_gauss(x, y, p["eye_x"], eye_y, p["eye_s"], p["eye_s"])
    feat = feat + _col(p["brow_amp"]) * _gauss(x, y, 0 * cy, eye_y - p["brow_dy"], p["brow_sx"], p["brow_sy"])
    feat = feat + _col(p["cheek_amp"]) * _mirrored_gauss(
        x, y, p["cheek_x"], cy + p["cheek_y"], p["cheek_s"], p["cheek_s"]
    )
    feat = feat + _col(p["mouth_amp"]) * _gauss(x, y, 0 * cy, cy + p["mouth_y"], p["mouth_sx"], p["mouth_sy"])
    feat = feat + _col(p["chin_amp"]) * _gauss(x, y, 0 * cy, cy + p["chin_y"], p["chin_s"], p["chin_s"])
    for k in range(p["pair_amp"].shape[1]):
        feat = feat + _col(p["pair_amp"][:, k]) * _mirrored_gauss(
            x, y, p["pair_x"][:, k], cy + p["pair_y"][:, k], p["pair_s"][:, k], p["pair_s"][:, k]
        )
    # Features live on the dome and fade out towards its edge; the height never goes below the plane.
    h_sym = (dome + feat * dome.sqrt()).clamp_min(0)
    h_sym = (h_sym + h_sym.flip(-1)) / 2  # exact mirror symmetry on the discrete grid
    # Rescale the height so that the nearest point sits at `nearest`. The peak is taken on an
    # analytic quantity at this resolution, so it differs by a hair between resolutions.
    peak = h_sym.amax(dim=(1, 2)).clamp_min(1e-6)
    h_sym = h_sym * _col((p["base"] - p["nearest"]) / peak)

    # --- asymmetric detail, |a| <= asymmetry * (max_depth - min_depth) / 2 ---
    asym = torch.zeros_like(h_sym)
    for k in range(p["asym_amp"].shape[1]):
        asym = asym + _col(p["asym_amp"][:, k]) * _gauss(
            x,
            y,
            p["asym_x"][:, k] * p["ax"],
            cy + p["asym_y"][:, k] * p["ay"],
            p["asym_s"][:, k],
            p["asym_s"][:, k],
        )
    # Keep the detail on the object, then scale its largest |value| to asymmetry * half range
    # (times a random factor in [0.5, 1]).
    asym = asym * dome.sqrt()
    bound = asym.abs().amax(dim=(1, 2)).clamp_min(1e-6)
    half_range = (FAR_DEPTH - NEAR_DEPTH) / 2
    asym = asym * _col(cfg.asymmetry * half_range * p["asym_scale"] / bound)

    depth = (_col(p["base"]) - h_sym - asym).clamp(NEAR_DEPTH, FAR_DEPTH)

    # --- object mask: the superellipse, anti-aliased over one pixel ---
    rho = _superellipse_radius(x, y, p)
    pixel = 2.0 / (size - 1) / factor / p["ax"].clamp_min(1e-3)  # about one (sub-)pixel in rho units
    mask = ((1 - rho) / _col(pixel) + 0.5).clamp(0, 1)
    mask = (mask + mask.flip(-1)) / 2

    # --- albedo in [0, 1] colour units ---
    base = _hsv_to_rgb(p["hue"], p["sat"], p["val"])  # [n, 3]
    alb = base[:, :, None, None].expand(-1, -1, y.shape[1], x.shape[2]).clone()
    for k in range(p["alb_pair_amp"].shape[1]):
        blob = _mirrored_gauss(x, y, p["alb_pair_x"][:, k], cy + p["alb_pair_y"][:, k], p["alb_pair_s"][:, k], p["alb_pair_s"][:, k])
        alb = alb + p["alb_pair_amp"][:, k, :, None, None] * blob[:, None]
    eyes = _mirrored_gauss(x, y, p["eye_x"], eye_y, p["eye_s"] * 0.6, p["eye_s"] * 0.45)
    brow = _mirrored_gauss(x, y, p["eye_x"], eye_y - p["brow_dy"], p["eye_s"] * 1.2, p["brow_sy"] * 0.6)
    darken = (1 - _col(p["eye_dark"]) * eyes.clamp(max=1)) * (1 - _col(p["brow_dark"]) * brow.clamp(max=1))
    alb = alb * darken[:, None]
    lips = _gauss(x, y, 0 * cy, cy + p["mouth_y"], p["mouth_sx"] * 0.8, p["mouth_sy"] * 0.8)
    alb = alb + p["lip_amp"][:, :, None, None] * lips[:, None]
    alb = (alb + alb.flip(-1)) / 2  # the symmetric part is exactly symmetric
    for k in range(p["blem_amp"].shape[1]):
        spot = _gauss(
            x, y, p["blem_x"][:, k] * p["ax"], cy + p["blem_y"][:, k] * p["ay"], p["blem_s"][:, k], p["blem_s"][:, k]
        )
        change = p["blem_amp"][:, k, None] + p["blem_tint"][:, k]  # [n, 3]
        alb = alb + cfg.albedo_asymmetry * change[:, :, None, None] * spot[:, None]
    alb = alb.clamp(0, 1)

    # --- background image in [0, 1] ---
    n, hr = depth.shape[0], size * factor
    if cfg.background == "black":
        bg = torch.zeros(n, 3, hr, hr)
    elif cfg.background == "plain":
        bg = p["bg_color"][:, :, None, None].expand(-1, -1, hr, hr)
    else:
        coarse = p["bg_noise"] + p["bg_color"][:, :, None, None] / 3 + p["bg_noise_tint"]
        bg = F.interpolate(coarse, size=(hr, hr), mode="bicubic", align_corners=True).clamp(0, 1)
    # Outside the object the canonical albedo is the background colour (the model would have to
    # explain the background there; its shading makes no difference to the data, see _render).
    m = mask[:, None]
    alb = m * alb + (1 - m) * bg
    return {
        "canon_depth": depth.float(),
        "canon_albedo": (alb * 2 - 1).float(),
        "canon_mask": mask.float(),
        "background": (bg * 2 - 1).float(),
    }


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] -> RGB [n, 3] in [0, 1]."""
    k = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype)
    kk = (k[None] + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(kk, 4 - kk), 0, 1)


def _light_and_view(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's raw light [n, 4] and view [n, 6] in [-1, 1] (SPEC 2, max rotation 60, xy 0.1)."""
    light = torch.stack(
        [p["k_ambient"] * 2 - 1, p["k_diffuse"] * 2 - 1, p["light_xy"][:, 0], p["light_xy"][:, 1]], dim=1
    )
    view = torch.stack(
        [
            p["pitch"] / 60.0,
            p["yaw"] / 60.0,
            p["roll"] / 60.0,
            p["trans"][:, 0] / 0.1,
            p["trans"][:, 1] / 0.1,
            torch.zeros_like(p["pitch"]),
        ],
        dim=1,
    )
    return light.float(), view.float()


def sample_objects(n: int, cfg: SyntheticConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n random objects at cfg.image_size in the model's parameterisation.

    Returns canon_depth [n,H,W] in [min_depth, max_depth], canon_albedo [n,3,H,W] in [-1,1],
    light [n,4] and view [n,6] (raw net outputs in [-1,1], SPEC 2 with max rotation 60 degrees,
    xy translation 0.1 and z range 0), plus canon_mask [n,H,W] (1 on the object) and background
    [n,3,H,W] in [-1,1] (the image colour off the object).
    """
    return canonical_fields(sample_params(n, cfg, generator), cfg)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

# Object pixels encode to bytes 1..255: their depth is kept a hair nearer than max_depth.
_BYTE_MARGIN = 1.01


def _renderer(size: int, factor: int):
    """The project's renderer working on factor x factor sub-pixels of a size-pixel camera.

    Renderer(image_size=size*factor) alone would use geometry.intrinsics(size*factor), whose field
    of view does not pool back onto the size-pixel camera (a 0.8% zoom at 2x). Its camera is swapped
    for the supersampled camera of the size-pixel one (what the renderer's own supersample option
    uses for rasterising), so that the pooled images and depths are exactly those of the model's
    camera (passed with the renderer's camera argument).
    """
    from trainer.render.renderer import Renderer, RendererConfig, supersampled_intrinsics

    config = RendererConfig(image_size=size * factor, min_depth=NEAR_DEPTH, max_depth=FAR_DEPTH)
    camera = supersampled_intrinsics(geometry.intrinsics(size, dtype=torch.float64), factor) if factor > 1 else None
    renderer = Renderer(config, camera=camera)
    return renderer


def _render(p: dict[str, torch.Tensor], cfg: SyntheticConfig) -> dict[str, torch.Tensor]:
    """Render objects in their views at render_scale x and pool to image_size.

    Returns image [n,3,H,W] in [-1,1], depth [n,H,W] (view depth on the object; >= max_depth
    elsewhere, i.e. background), object [n,H,W] bool.
    """
    r = cfg.render_scale
    f = _fields(p, cfg.image_size, cfg, factor=r)
    light, view = _light_and_view(p)
    renderer = _renderer(cfg.image_size, r)
    R, t = geometry.view_to_rotation_translation(view, max_angle_degrees=60.0, xy_range=0.1, z_range=0.0)

    with torch.no_grad():
        canon_depth = f["canon_depth"]
        view_depth = renderer.render_depth(canon_depth, R, t)
        normals = renderer.normals(canon_depth)
        k_a = (light[:, 0] + 1) / 2
        k_d = (light[:, 1] + 1) / 2
        direction = torch.cat([light[:, 2:4], torch.ones_like(light[:, :1])], dim=1)
        direction = direction / direction.norm(dim=1, keepdim=True)
        canon_image, _ = renderer.shade(f["canon_albedo"], normals, k_a, k_d, direction)
        # Warp the shaded image and the object mask together (one grid_sample).
        warped = renderer.warp_canonical(torch.cat([canon_image, f["canon_mask"][:, None]], 1), view_depth, R, t)
        covered = renderer.recon_mask(view_depth)
        image_hr = warped[:, :3]
        mask_hr = (warped[:, 3] * covered).clamp(0, 1)

        bg = f["background"]
        # Anti-aliased composite: object where the warped mask says so, background elsewhere.
        image_hr = mask_hr[:, None] * image_hr + (1 - mask_hr[:, None]) * bg
        hard = (mask_hr >= 0.5).float()
        if r > 1:
            image = F.avg_pool2d(image_hr, r)
            cover = F.avg_pool2d(hard[:, None], r)[:, 0]
            depth_sum = F.avg_pool2d((view_depth * hard)[:, None], r)[:, 0]
            depth = depth_sum / cover.clamp_min(1e-6)
            obj = cover >= 0.5
        else:
            image, depth, obj = image_hr, view_depth, hard > 0
        top = FAR_DEPTH - _BYTE_MARGIN * (FAR_DEPTH - NEAR_DEPTH) / 255
        depth = torch.where(obj, depth.clamp(NEAR_DEPTH, top), torch.full_like(depth, FAR_DEPTH + 0.1))
    return {"image": image.clamp(-1, 1), "depth": depth, "object": obj}


def dataset_params(cfg: SyntheticConfig, split: str, indices) -> dict[str, torch.Tensor]:
    """The parameters generate_synface drew for these samples of a split (for diagnostics that
    compare a model's light, view or canonical depth with the truth)."""
    return _cat_params([sample_params(1, cfg, _per_sample_generator(cfg.seed, split, i)) for i in indices])


def canonical_fields(params: dict[str, torch.Tensor], cfg: SyntheticConfig) -> dict[str, torch.Tensor]:
    """Canonical depth, albedo, object mask and background of sample_params' objects at image_size,
    plus the model-parameterised light [n,4] and view [n,6] (what sample_objects returns)."""
    out = _fields(params, cfg.image_size, cfg)
    out["light"], out["view"] = _light_and_view(params)
    return out


def render_objects(params: dict[str, torch.Tensor], cfg: SyntheticConfig) -> dict[str, torch.Tensor]:
    """Render objects given by sample_params in their views, as generate_synface writes them.

    Returns image [n,3,H,W] in [-1,1], depth [n,H,W] (view depth on the object, above 1.1 on the
    background), object [n,H,W] bool, and the model-parameterised light [n,4] and view [n,6].
    """
    out = _render(params, cfg)
    out["light"], out["view"] = _light_and_view(params)
    return out


# ----------------------------------------------------------------------------------------------
# Writing the synface layout
# ----------------------------------------------------------------------------------------------


def _to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [-1,1] -> uint8 [H,W,3]."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def sample_name(index: int) -> str:
    return f"{index:06d}"


def generate_synface(root: str, cfg: SyntheticConfig, splits=SPLITS) -> dict[str, int]:
    """Write cfg.num_<split> images per split under root in the synface layout; return the counts.

    Deterministic for cfg (in particular cfg.seed): image i of a split always comes from the same
    per-image generator, whatever the batch size or the number of images asked for. Existing files
    of the same names are overwritten; other files in root are left alone.
    """
    for split in splits:
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    previous_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _generate(root, cfg, splits)
    finally:
        torch.set_num_threads(previous_threads)


def _generate(root: str, cfg: SyntheticConfig, splits) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split in splits:
        n = cfg.count(split)
        os.makedirs(os.path.join(root, split, "image"), exist_ok=True)
        os.makedirs(os.path.join(root, split, "depth"), exist_ok=True)
        for start in range(0, n, cfg.batch_size):
            idx = range(start, min(n, start + cfg.batch_size))
            p = dataset_params(cfg, split, idx)
            out = _render(p, cfg)
            depth = out["depth"].double().numpy()
            for j, i in enumerate(idx):
                write_sample(root, split, sample_name(i), _to_uint8_image(out["image"][j]), depth[j])
        counts[split] = n
    return counts


def main_generate(root: str, image_size: int, num_train: int, num_val: int, num_test: int, seed: int,
                  background: str = "noise", albedo_hues: str = "any") -> dict[str, int]:
    """CLI entry: generate a synthetic synface-layout data set under root with default distributions."""
    cfg = SyntheticConfig(image_size=image_size, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                          background=background, albedo_hues=albedo_hues)
    return generate_synface(root, cfg)
