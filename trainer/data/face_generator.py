"""Realistic synthetic faces in the synface layout, rendered from MakeHuman's CC0 head model.

Each image is one person (identity sliders, ethnicity/gender/age macros, asymmetric targets), with an
expression (mostly symmetric, some not), skin-tone albedo with lips, brows, eyes and teeth, hair or
none, a pose (yaw, pitch, roll about the point the model rotates about), a Lambertian light inside
the model's light model, and a varied background. Images use the model's camera (fov 10 degrees,
pixel centres at integer coordinates); the ground-truth depth is rendered in the input view at the
pixel centres, as the synface reader and evaluate expect.

Beside the synface files, each split gets `truth.npz` with what the model is meant to recover: the
view and light in the model's own parameterisation (raw net outputs in [-1, 1], SPEC 2), the pose in
degrees, and the canonical (frontal) depth of each face, so diagnostics can correlate predictions
with the truth (see trainer/results/truth_probe.py).

Deterministic in the seed: image i of a split comes from its own random stream, whatever the batch
size or the number of images asked for.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.head_model import ETHNICITIES, HeadModel, load_head_model
from trainer.render import geometry
from trainer.render.rasterizer import rasterize_depth
from trainer.render.renderer import supersampled_intrinsics
from trainer.data.synface import FAR_DEPTH, NEAR_DEPTH, write_sample
from trainer.data.synthetic import SPLITS

TRUTH_FILE = "truth.npz"
# Foreground depth is kept a hair nearer than 1.1 so that it never encodes as the background byte 0.
_FAR_FOREGROUND = FAR_DEPTH - 1.01 * (FAR_DEPTH - NEAR_DEPTH) / 255
_BACKGROUND_DEPTH = FAR_DEPTH + 0.1

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


# ---------------------------------------------------------------------------------------------
# Geometry and paint


def _vertex_normals(v: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [B, N, 3] of triangles tri in vertices v [B, N, 3]."""
    a, b, c = v[:, tri[:, 0]], v[:, tri[:, 1]], v[:, tri[:, 2]]
    fn = torch.cross(b - a, c - a, dim=-1)
    n = torch.zeros_like(v)
    for k in range(3):
        n.index_add_(1, tri[:, k], fn)
    return F.normalize(n, dim=-1, eps=1e-12)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def _hair_mask(model: HeadModel, neutral: torch.Tensor, p: list[dict]) -> torch.Tensor:
    """[B, N] weight of hair on the scalp: above a hairline that is high on the forehead and drops
    behind the temples to the nape; none on the face, eyes or mouth."""
    height = torch.from_numpy(model.regions["scalp_height"])
    z = neutral[:, 2]
    # The hairline's height above the eyes: the person's forehead line at the front (z > 1.0),
    # dropping to 0.15 above the eyes at the temples (z ~ 0.5) and to the nape at the back.
    front = torch.tensor([q["hairline"] for q in p], dtype=torch.float32)[:, None]
    along = ((1.05 - z) / 0.75).clamp(0, 1)[None]
    line = front * (1 - along) + (-0.2 - 1.2 * ((0.3 - z) / 0.6).clamp(0, 1))[None] * along
    hair = _smoothstep((height[None] - line) / 0.25)
    r = model.regions
    not_face = 1 - torch.from_numpy(r["sclera"] + r["teeth"] + r["tongue"] + r["lips"]).clamp(0, 1)
    has = torch.tensor([q["has_hair"] for q in p], dtype=torch.float32)[:, None]
    return hair * not_face[None] * has


def _albedo(model: HeadModel, neutral: torch.Tensor, p: list[dict], hair: torch.Tensor) -> torch.Tensor:
    """Per-vertex albedo [B, N, 3] in [0, 1]."""
    r = {k: torch.from_numpy(v)[None, :, None] for k, v in model.regions.items()}
    col = lambda key: torch.tensor(np.stack([q[key] for q in p]), dtype=torch.float32)[:, None, :]  # noqa: E731
    # Low-frequency skin variation: a few random waves over the head, +-6%.
    waves = torch.tensor(np.stack([q["skin_noise"] for q in p]), dtype=torch.float32)  # [B, 6, 4]
    phase = neutral @ waves[:, :, :3].transpose(1, 2) * 1.5 + waves[:, None, :, 3]  # [B, N, 6]
    skin = col("skin") * (1 + 0.025 * torch.sin(phase).sum(-1, keepdim=True))
    # Cheeks and nose a little redder, as blood flow makes them.
    redder = torch.tensor([1.06, 0.97, 0.97])
    cheeks = r["face"] * torch.exp(-((neutral[None, :, 1:2] - 6.95) ** 2) / 0.08)
    a = skin * (1 + (redder - 1) * cheeks)
    a = a + (col("lips") - a) * r["lips"]
    a = a + (col("brows") - a) * r["brows"] * 0.9
    a = a + (col("hair") - a) * hair[..., None]
    a = a + (torch.tensor([0.85, 0.83, 0.78]) - a) * r["sclera"]
    a = a + (col("iris") - a) * r["iris"]
    a = a + (torch.tensor([0.03, 0.03, 0.03]) - a) * r["pupil"]
    a = a + (torch.tensor([0.80, 0.78, 0.70]) - a) * r["teeth"]
    a = a + (torch.tensor([0.55, 0.25, 0.25]) - a) * r["tongue"]
    return a.clamp(0, 1)


def _backgrounds(p: list[dict], size: int, kind: str) -> torch.Tensor:
    """[B, 3, S, S] background colours in [0, 1]."""
    if kind == "black":
        return torch.zeros(len(p), 3, size, size)
    out = []
    for q in p:
        g = q["background_grid"]
        grid = torch.tensor(q["background_colours"][:, :g, :g], dtype=torch.float32)[None]
        field = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True) if g > 1 else grid.expand(
            1, 3, size, size)
        noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(q["noise_seed"]))
        out.append((field + q["background_noise"] * noise).clamp(0, 1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Rendering


def _barycentrics(screen: torch.Tensor, tri: torch.Tensor, face: torch.Tensor):
    """Perspective-correct barycentric weights [B, H, W, 3] and corner ids [B, H, W, 3] at each pixel
    centre of the winning face (background pixels get face 0 and are masked by the caller)."""
    b, h, w = face.shape
    f = face.clamp_min(0)
    corners = tri[f]  # [B, H, W, 3]
    xyz = torch.gather(screen[:, None, None].expand(b, h, w, -1, -1), 3,
                       corners[..., None].expand(-1, -1, -1, -1, 3))  # [B, H, W, 3 corners, 3]
    v, u = torch.meshgrid(torch.arange(h, dtype=screen.dtype), torch.arange(w, dtype=screen.dtype), indexing="ij")
    px, py = u[None, :, :, None], v[None, :, :, None]
    x, y, iz = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    x1, x2, x3 = x.unbind(-1)
    y1, y2, y3 = y.unbind(-1)
    det = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
    det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    l1 = ((y2 - y3) * (px[..., 0] - x3) + (x3 - x2) * (py[..., 0] - y3)) / det
    l2 = ((y3 - y1) * (px[..., 0] - x3) + (x1 - x3) * (py[..., 0] - y3)) / det
    screen_w = torch.stack([l1, l2, 1 - l1 - l2], -1)
    persp = screen_w * iz
    return persp / persp.sum(-1, keepdim=True).clamp_min(1e-12), corners


def _screen(points: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    uv = geometry.project(points, K)
    return torch.cat([uv, 1 / points[..., 2:3]], -1)


def _interpolate(attr: torch.Tensor, weights: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """attr [B, N, C] at pixels: sum_k weights[..., k] attr[corners[..., k]] -> [B, H, W, C]."""
    b, h, w, _ = corners.shape
    picked = torch.gather(attr, 1, corners.reshape(b, -1, 1).expand(-1, -1, attr.shape[-1]))
    return (picked.view(b, h, w, 3, -1) * weights[..., None]).sum(3)


def render_faces(model: HeadModel, params: list[dict], cfg: FaceConfig) -> dict[str, torch.Tensor]:
    """Render people given by sample_face. Returns image [B,3,S,S] in [-1,1], depth [B,S,S] (view depth
    on the face, 1.2 elsewhere), canonical_depth [B,S,S] (frontal, same convention), the model's
    light [B,4] and view [B,6], and the Lambertian shading [B,S,S] with the face's coverage [B,S,S]
    of each pixel (for tests of the light model)."""
    size, r = cfg.image_size, cfg.render_scale
    tri = torch.from_numpy(model.triangles)
    neutral = torch.from_numpy(model.vertices)
    weights = torch.from_numpy(np.stack([q["weights"] for q in params]))
    v = neutral[None] + torch.einsum("bt,tnc->bnc", weights, torch.from_numpy(model.basis))
    hair = _hair_mask(model, neutral, params)
    normals_mh = _vertex_normals(v, tri)
    # Hair has volume: the scalp is pushed out along its normal where the hair is.
    volume = torch.tensor([q["hair_volume"] for q in params], dtype=torch.float32)[:, None, None]
    v = v + normals_mh * hair[..., None] * volume
    normals_mh = _vertex_normals(v, tri)
    albedo = _albedo(model, neutral, params, hair)

    # MakeHuman (x right of the viewer, y up, towards the viewer) -> camera (x right, y down, z forward).
    # The pivot (between the ears at eye height) lands on the model's rotation centre (0, 0, 1).
    # The macro targets change the body's height, so the pivot follows each person's own eyes.
    eyes = torch.from_numpy(model.regions["sclera"] > 0.5)
    pivot = v[:, eyes].mean(1, keepdim=True) + torch.tensor([0.0, -0.15, -0.57])
    flip = torch.tensor([1.0, -1.0, -1.0])
    scale = torch.tensor([q["scale"] for q in params], dtype=torch.float32)[:, None, None]
    canon = (v - pivot) * flip * scale + torch.tensor([0.0, 0.0, 1.0])
    # The model's normals: a camera-facing surface has n close to (0, 0, +1), i.e. minus the outward
    # normal in camera coordinates (SPEC 3.6).
    n_model = -(normals_mh * flip)

    light_np, view_np = zip(*(model_light_and_view(q) for q in params))
    light, view = torch.from_numpy(np.stack(light_np)), torch.from_numpy(np.stack(view_np))
    R, t = geometry.view_to_rotation_translation(view, max_angle_degrees=60.0, xy_range=0.1, z_range=0.0)
    posed = geometry.transform_points(canon, R, t)

    K = geometry.intrinsics(size)
    K_hr = supersampled_intrinsics(K, r) if r > 1 else K
    with torch.no_grad():
        depth, _ = rasterize_depth(posed, tri, K, size, size)
        canon_depth, _ = rasterize_depth(canon, tri, K, size, size)
        _, face = rasterize_depth(posed, tri, K_hr, size * r, size * r)
        w, corners = _barycentrics(_screen(posed, K_hr), tri, face)
        a = _interpolate(albedo, w, corners)
        n = F.normalize(_interpolate(n_model, w, corners), dim=-1, eps=1e-12)
        k_a, k_d = (light[:, 0] + 1) / 2, (light[:, 1] + 1) / 2
        direction = F.normalize(torch.cat([light[:, 2:4], torch.ones(len(params), 1)], 1), dim=1)
        shading = k_a[:, None, None] + k_d[:, None, None] * (n * direction[:, None, None]).sum(-1).clamp_min(0)
        colour = (a * shading[..., None]).clamp(0, 1).permute(0, 3, 1, 2)
        cover = (face >= 0).float()[:, None]
        background = _backgrounds(params, size * r, cfg.background)
        image = cover * colour + (1 - cover) * background
        shading = shading[:, None] * cover
        if r > 1:
            image, shading, cover = F.avg_pool2d(image, r), F.avg_pool2d(shading, r), F.avg_pool2d(cover, r)
        shading = shading / cover.clamp_min(1e-6)
    fore = torch.isfinite(depth)
    depth = torch.where(fore, depth.clamp(NEAR_DEPTH, _FAR_FOREGROUND), torch.full_like(depth, _BACKGROUND_DEPTH))
    cfore = torch.isfinite(canon_depth)
    canon_depth = torch.where(cfore, canon_depth.clamp(NEAR_DEPTH, _FAR_FOREGROUND),
                              torch.full_like(canon_depth, _BACKGROUND_DEPTH))
    return {"image": image * 2 - 1, "depth": depth, "canonical_depth": canon_depth, "light": light, "view": view,
            "shading": shading[:, 0], "coverage": cover[:, 0]}


# ---------------------------------------------------------------------------------------------
# Writing the synface layout


def generate_faces(root: str, cfg: FaceConfig, splits=SPLITS, progress=None) -> dict[str, int]:
    """Write cfg.num_<split> faces per split under root in the synface layout, plus <split>/truth.npz."""
    previous_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        model = load_head_model()
        counts = {}
        for split in splits:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            counts[split] = _generate_split(root, split, model, cfg, progress)
        return counts
    finally:
        torch.set_num_threads(previous_threads)


def _generate_split(root: str, split: str, model: HeadModel, cfg: FaceConfig, progress) -> int:
    n = cfg.count(split)
    names, views, lights, poses, canon = [], [], [], [], []
    start_time = time.monotonic()
    for start in range(0, n, cfg.batch_size):
        idx = range(start, min(n, start + cfg.batch_size))
        params = [sample_face(model, cfg, _rng(cfg.seed, split, i)) for i in idx]
        out = render_faces(model, params, cfg)
        image = ((out["image"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        depth = out["depth"].double().numpy()
        for j, i in enumerate(idx):
            name = f"{i:06d}"
            write_sample(root, split, name, image[j], depth[j])
            names.append(name)
        views.append(out["view"].numpy())
        lights.append(out["light"].numpy())
        poses.append(np.array([[q["yaw"], q["pitch"], q["roll"]] for q in params], np.float32))
        canon.append(out["canonical_depth"].numpy().astype(np.float16))
        if progress is not None:
            progress(split, min(n, start + cfg.batch_size), n, time.monotonic() - start_time)
    if n:
        path = os.path.join(root, split, TRUTH_FILE)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez_compressed(tmp, names=np.array(names), view=np.concatenate(views), light=np.concatenate(lights),
                            pose_degrees=np.concatenate(poses), canonical_depth=np.concatenate(canon),
                            image_size=np.array(cfg.image_size))
        os.replace(tmp, path)
    return n


def read_truth(root, split: str) -> dict[str, np.ndarray] | None:
    """<root>/<split>/truth.npz as a dict (names, view [N,6], light [N,4], pose_degrees [N,3] as yaw,
    pitch, roll, canonical_depth [N,S,S]), or None when the folder has none."""
    path = os.path.join(root, split, TRUTH_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}

