"""Random people for the synthetic faces: who (identity, ethnicity, gender, age), with which expression,
skin, hair and eyes, in which pose and light, and what colours behind them (FaceConfig says how
many and from which ranges). Each sample comes from its own random stream (seed, split, index).
Rendering them is face_render.py; writing the data set is face_generator.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.head_model import ETHNICITIES, HeadModel
from trainer.data.synthetic_params import SPLITS

# Skin tones (linear-ish RGB albedo in [0, 1]) from light to dark; a face's tone is a random point on
# this polyline, jittered.
_SKIN_TONES = np.array([[0.96, 0.80, 0.70], [0.88, 0.67, 0.55], [0.76, 0.55, 0.42],
                        [0.60, 0.42, 0.30], [0.42, 0.28, 0.20], [0.28, 0.18, 0.13]])
_HAIR_COLOURS = np.array([[0.06, 0.05, 0.05], [0.18, 0.11, 0.07], [0.35, 0.22, 0.12],
                          [0.70, 0.55, 0.32], [0.55, 0.25, 0.10], [0.62, 0.62, 0.60]])
_IRIS_COLOURS = np.array([[0.25, 0.14, 0.07], [0.40, 0.26, 0.12], [0.30, 0.45, 0.60], [0.35, 0.45, 0.28]])


@dataclass
class FaceConfig:
    """What to generate (angles in degrees; lengths in model units, where the face is about 0.14 wide)."""

    image_size: int = 64
    """Output resolution in pixels (square); 64 and 128 are the sizes the nets support best."""
    num_train: int = 2000
    """Images in the train split."""
    num_val: int = 200
    """Images in the val split."""
    num_test: int = 200
    """Images in the test split."""
    seed: int = 0
    """Seed of the whole data set; every image has its own random stream derived from it."""
    max_yaw_degrees: float = 40.0
    """Rotation about the camera's vertical axis, uniform in +-this."""
    max_pitch_degrees: float = 20.0
    """Rotation about the camera's horizontal axis, uniform in +-this."""
    max_roll_degrees: float = 10.0
    """Rotation about the optical axis, uniform in +-this."""
    max_translation: float = 0.01
    """x and y translation, uniform in +-this (0.01 is about 4 px at 64 px)."""
    scale: float = 0.08
    """Model units per decimetre of head: 0.08 frames chin to forehead, the nose tip near depth 0.92."""
    scale_jitter: float = 0.05
    """Relative size variation between people, uniform in +-this."""
    identity_strength: float = 0.7
    """Largest |value| of an identity slider (MakeHuman's sliders span [-1, 1])."""
    identity_sliders: int = 40
    """How many identity sliders are moved per person (of about 150)."""
    asymmetry_strength: float = 0.5
    """Largest weight of each asymmetric identity target (MakeHuman's asym-* set)."""
    expression_strength: float = 0.8
    """Largest weight of an expression unit."""
    max_expression_units: int = 3
    """Expression units combined per face (0 to this many; a neutral face when 0)."""
    asymmetric_expression_probability: float = 0.25
    """Probability that a left/right expression unit differs between the sides."""
    hair_probability: float = 0.8
    """Probability that a person has hair (else a bald scalp in skin tone)."""
    ambient_range: tuple[float, float] = (0.25, 0.55)
    """Ambient light k_a, uniform in this range (the model's range is [0, 1])."""
    diffuse_range: tuple[float, float] = (0.45, 0.8)
    """Diffuse light k_d, uniform in this range (the model's range is [0, 1])."""
    max_light_xy: float = 0.8
    """Light direction normalize([x, y, 1]) with x, y uniform in +-this (the model's are in +-1)."""
    background: str = "varied"
    """"varied" (smooth random colour fields: plain, gradients, blotches, with pixel noise) or "black"."""
    render_scale: int = 2
    """Render the image at this multiple of image_size and average-pool (anti-aliasing)."""
    batch_size: int = 32
    """Images rendered together (speed and memory only; the output does not depend on it)."""
    num_threads: int | None = 1
    """torch intra-op threads while generating (restored afterwards); None keeps the caller's."""

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        for name in ("num_train", "num_val", "num_test", "max_expression_units", "identity_sliders"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("hair_probability", "asymmetric_expression_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.background not in ("varied", "black"):
            raise ValueError(f"background must be varied or black, got {self.background!r}")
        if self.render_scale < 1 or self.batch_size < 1:
            raise ValueError("render_scale and batch_size must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if not 0 < self.scale <= 0.1:
            raise ValueError(f"scale must be in (0, 0.1], got {self.scale}")

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


# ---------------------------------------------------------------------------------------------
# Random people, expressions, poses and lights


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def _expression_pairs(units: dict[str, int]) -> list[tuple[int, int]]:
    """Expression units as (left row, right row) pairs; unsided units are (row, -1)."""
    pairs, seen = [], set()
    for name, row in units.items():
        if name in seen:
            continue
        for a, b in (("-left-", "-right-"), ("-left", "-right")):
            if a in name and name.replace(a, b) in units:
                other = name.replace(a, b)
                pairs.append((row, units[other]))
                seen.update((name, other))
                break
        else:
            if "-right-" not in name and not name.endswith("-right") and "-right-" not in name:
                pairs.append((row, -1))
                seen.add(name)
    return pairs


def sample_face(model: HeadModel, cfg: FaceConfig, rng: np.random.Generator) -> dict:
    """One person's parameters: morph weights [T], colours, pose, light and background."""
    weights = np.zeros(model.basis.shape[0], np.float32)
    # Identity: a random subset of the sliders; sided sliders move both sides alike, then the
    # asymmetric targets add each person's own asymmetry.
    names = sorted({s.name for s in model.identity})
    chosen = set(rng.choice(len(names), size=min(cfg.identity_sliders, len(names)), replace=False).tolist())
    values = {names[i]: rng.uniform(-1, 1) * cfg.identity_strength for i in chosen}
    for slider in model.identity:
        v = values.get(slider.name, 0.0)
        row = slider.positive if v >= 0 else slider.negative
        if row >= 0:
            weights[row] += abs(v)
    for row in model.asymmetric:
        weights[row] += rng.uniform(0, cfg.asymmetry_strength) * (rng.random() < 0.3)
    # Macro: ethnicity mix x gender x age (weights of one person sum to 1 over the combinations).
    ethnicity = rng.dirichlet(np.full(len(ETHNICITIES), 0.7))
    male = rng.uniform(0, 1)
    old = rng.uniform(0, 0.6) ** 2
    for (eth, gender, age), row in model.macro.items():
        w = ethnicity[ETHNICITIES.index(eth)] * (male if gender == "male" else 1 - male) * (old if age == "old" else 1 - old)
        weights[row] += w
    # Expression: units of the person's main ethnicity; mostly symmetric.
    units = model.expression[ETHNICITIES[int(np.argmax(ethnicity))]]
    pairs = _expression_pairs(units)
    for k in rng.choice(len(pairs), size=rng.integers(0, cfg.max_expression_units + 1), replace=False):
        left, right = pairs[k]
        w = rng.uniform(0.2, 1.0) * cfg.expression_strength
        weights[left] += w
        if right >= 0:
            weights[right] += w * rng.uniform(0, 1) if rng.random() < cfg.asymmetric_expression_probability else w
    # Colours.
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    i = min(int(t), len(_SKIN_TONES) - 2)
    skin = _SKIN_TONES[i] * (1 - (t - i)) + _SKIN_TONES[i + 1] * (t - i)
    skin = np.clip(skin * rng.uniform(0.92, 1.08) + rng.normal(0, 0.02, 3), 0.05, 1)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.2)
    has_hair = rng.random() < cfg.hair_probability
    return {
        "weights": weights,
        "scale": cfg.scale * (1 + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter)),
        "skin": skin,
        "skin_noise": rng.normal(0, 1, (6, 4)),
        "lips": np.clip(skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 0.03, 3), 0.03, 1),
        "brows": np.clip(np.minimum(hair, skin * 0.5) * rng.uniform(0.7, 1.0), 0.02, 1),
        "hair": np.clip(hair, 0, 1),
        "has_hair": float(has_hair),
        "hairline": rng.uniform(0.75, 1.0),
        "hair_volume": rng.uniform(0.02, 0.1) * has_hair,
        "iris": _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))],
        "pitch": rng.uniform(-1, 1) * cfg.max_pitch_degrees,
        "yaw": rng.uniform(-1, 1) * cfg.max_yaw_degrees,
        "roll": rng.uniform(-1, 1) * cfg.max_roll_degrees,
        "trans": rng.uniform(-1, 1, 2) * cfg.max_translation,
        "k_ambient": rng.uniform(*cfg.ambient_range),
        "k_diffuse": rng.uniform(*cfg.diffuse_range),
        "light_xy": rng.uniform(-1, 1, 2) * cfg.max_light_xy,
        "background_grid": int(rng.integers(1, 7)),
        "background_colours": _background_colours(rng),
        "background_noise": rng.uniform(0, 0.04),
        "noise_seed": int(rng.integers(1 << 31)),
    }


def _background_colours(rng: np.random.Generator) -> np.ndarray:
    """[3, 6, 6] control colours of a background: a random grey level per control point, tinted by one
    or two muted hues (rooms, walls, foliage and sky rather than a rainbow)."""
    level = rng.uniform(0.1, 0.9) + rng.normal(0, 0.15, (1, 6, 6))
    tint = rng.uniform(-0.25, 0.25, (3, 1, 1)) + rng.normal(0, 0.06, (3, 6, 6))
    return np.clip(level * (1 + tint), 0, 1)


def model_light_and_view(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """The model's raw light [4] and view [6] in [-1, 1] (SPEC 2: rotations / 60, xy / 0.1, z 0)."""
    light = np.array([p["k_ambient"] * 2 - 1, p["k_diffuse"] * 2 - 1, *p["light_xy"]], np.float32)
    view = np.array([p["pitch"] / 60, p["yaw"] / 60, p["roll"] / 60, p["trans"][0] / 0.1, p["trans"][1] / 0.1, 0.0],
                    np.float32)
    return light, view
