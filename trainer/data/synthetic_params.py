"""The random parameters of synthetic objects: what trainer/data/synthetic.py generates, and from which
distributions (SyntheticConfig), drawn from one generator per sample so that a data set is the same
whatever the batch size or the number of images asked for. Rendering them is synthetic_render.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.synface import FAR_DEPTH, NEAR_DEPTH

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


def dataset_params(cfg: SyntheticConfig, split: str, indices) -> dict[str, torch.Tensor]:
    """The parameters generate_synface drew for these samples of a split (for diagnostics that
    compare a model's light, view or canonical depth with the truth)."""
    return _cat_params([sample_params(1, cfg, _per_sample_generator(cfg.seed, split, i)) for i in indices])
