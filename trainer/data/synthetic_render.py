"""Rendering synthetic objects: their parameters (synthetic_params.py) become canonical depth, albedo,
mask and background fields on a pixel grid, then an image and a view depth through the project's own
renderer, supersampled and pooled. Why the shape is built as it is: trainer/data/synthetic.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.synface import FAR_DEPTH, NEAR_DEPTH
from trainer.data.synthetic_params import SyntheticConfig, sample_params
from trainer.render import geometry


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
