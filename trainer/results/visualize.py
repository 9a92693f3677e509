"""Pictures of what the model infers: maps as images, relighting, novel views, labelled grids.

Two layers:
- tensor code that renders with the model's own renderer (relight, render_canonical_view,
  shape_image), batched and on the model's device;
- conversion of single maps to PIL images (image_to_pil, depth_to_pil, ...) and labelled grids
  (grid), which run on the CPU.

save_validation_grid is the training-loop hook: a fixed set of images decomposed and drawn as one
PNG (one row per image), with the model's train/eval mode left as it was.

Conventions (SPEC 3): images in [-1, 1]; depth near = bright; normals drawn as (n + 1) / 2 with the
renderer's convention (a camera-facing surface has n = (0, 0, 1), drawn light blue); confidence
drawn as 1 / sigma scaled by its maximum (bright = confident). Background of rendered views is
BACKGROUND (white).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from trainer.render import geometry

BACKGROUND = 1.0  # white, in the [-1, 1] image range
CAPTION_HEIGHT = 16
# Light for drawing the bare shape: mostly from the viewer, a little from the top left, in the
# renderer's convention (n . l > 0 is lit; see light_direction_from).
SHAPE_AMBIENT, SHAPE_DIFFUSE = 0.3, 0.7


# --------------------------------------------------------------------------------------------
# Tensor side: decomposing and rendering


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the nets' weights live and in which dtype (bf16 under some DeepSpeed configs)."""
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def decompose(model, images: torch.Tensor):
    """model.decompose in eval mode and without gradients; images [B, 3, H, W] in [-1, 1], any device.

    The model's train/eval mode is restored afterwards, so this is safe to call from a training loop.
    """
    device, dtype = model_device_dtype(model)
    was_training = model.training
    model.eval()
    try:
        return model.decompose(images.to(device=device, dtype=dtype))
    finally:
        model.train(was_training)


@dataclass
class Lighting:
    """Light of SPEC 2 decoded from the light net's raw output [B, 4]."""

    k_ambient: torch.Tensor  # [B]
    k_diffuse: torch.Tensor  # [B]
    direction: torch.Tensor  # [B, 3], unit

    @classmethod
    def from_raw(cls, light: torch.Tensor) -> Lighting:
        # The same mapping as Unsup3D.decompose: map [-1, 1] to [0, 1]; l = normalize([x2, x3, 1]).
        k_ambient = (1 + light[:, 0]) / 2
        k_diffuse = (1 + light[:, 1]) / 2
        return cls(k_ambient, k_diffuse, light_direction_from(light[:, 2], light[:, 3]))


def light_direction_from(x: torch.Tensor | float, y: torch.Tensor | float) -> torch.Tensor:
    """normalize([x, y, 1]) [B, 3] (or [3] for scalars), the light net's parameterisation."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    direction = torch.stack(torch.broadcast_tensors(x, y.to(x), torch.ones_like(x)), dim=-1)
    return direction / direction.norm(dim=-1, keepdim=True)


def yaw_rotation(yaw_degrees: float, batch: int, device=None) -> torch.Tensor:
    """R [B, 3, 3] of a rotation by yaw_degrees about the vertical (camera y) axis."""
    angles = torch.tensor([[0.0, math.radians(yaw_degrees), 0.0]], device=device).expand(batch, 3)
    return geometry.euler_to_rotation(angles)


def composite(image: torch.Tensor, mask: torch.Tensor, background: float = BACKGROUND) -> torch.Tensor:
    """image [B, C, H, W] where mask [B, H, W] or [B, 1, H, W] is 1, background elsewhere."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    return image * mask + background * (1 - mask)


def render_canonical_view(renderer, canon_depth, canon_maps, canon_normal, R, t,
                          background: float = BACKGROUND) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical maps [B, C, H, W] seen from the view (R, t): (image [B, C, H, W], visible [B, H, W]).

    The canonical depth is rasterised in the new view and the maps are inverse-warped through it
    (SPEC 3.4, 3.5). Pixels that no triangle covers, and pixels where the surface seen faces away
    from the camera (the rasteriser draws both windings, so a yawed depth map shows its back where
    it folds), are background.
    """
    view_depth = renderer.render_depth(canon_depth, R, t)
    image = renderer.warp_canonical(canon_maps, view_depth, R, t)
    covered = renderer.recon_mask(view_depth)
    # canonical-frame normal at the surface point each pixel sees, rotated into the view
    normal = renderer.warp_canonical(canon_normal.permute(0, 3, 1, 2), view_depth, R, t)
    normal = torch.einsum("bij,bjhw->bihw", R.to(normal), normal)
    K = geometry.intrinsics(canon_depth.shape[-1], dtype=view_depth.dtype, device=view_depth.device)
    rays = geometry.depth_to_points(view_depth, K).permute(0, 3, 1, 2)
    # The renderer's normals point away from the camera on a camera-facing surface (n = (0,0,1)).
    facing = ((normal * rays).sum(1) > 0).to(covered)
    visible = covered * facing
    return composite(image, visible, background), visible


def relight(model, out, directions: torch.Tensor, background: float = BACKGROUND) -> torch.Tensor:
    """The input views re-rendered under other lights: [L, B, 3, H, W] for directions [L, 3].

    Albedo, normals, ambient and diffuse strength and view are the model's; only the direction
    changes. Rendered in the input view through the model's own rendered depth.
    """
    b = out.light.shape[0]
    light = Lighting.from_raw(out.light)
    R, t = model.view_transform(out.view)
    view_depth = out.view_depth[:b]
    mask = model.renderer.recon_mask(view_depth)
    images = []
    for direction in directions.to(out.light):
        canon, _ = model.renderer.shade(out.canon_albedo[:b], out.canon_normal[:b], light.k_ambient,
                                         light.k_diffuse, direction.expand(b, 3))
        images.append(composite(model.renderer.warp_canonical(canon, view_depth, R, t), mask, background))
    return torch.stack(images)


def reconstruction(model, out, flipped: bool = False, background: float = BACKGROUND) -> torch.Tensor:
    """The input-view rendering of one branch [B, 3, H, W], masked by that branch's own coverage."""
    b = out.light.shape[0]
    part = slice(b, 2 * b) if flipped else slice(0, b)
    R, t = model.view_transform(out.view)
    view_depth = out.view_depth[part]
    image = model.renderer.warp_canonical(out.canon_image[part], view_depth, R, t)
    return composite(image, model.renderer.recon_mask(view_depth), background)


def novel_views(model, out, yaws_degrees: Sequence[float], background: float = BACKGROUND) -> torch.Tensor:
    """The canonical shaded image seen from a yaw sweep: [Y, B, 3, H, W] (original branch)."""
    b = out.light.shape[0]
    depth, normal = out.canon_depth[:b], out.canon_normal[:b]
    t = torch.zeros(b, 3, device=depth.device)
    views = []
    for yaw in yaws_degrees:
        R = yaw_rotation(yaw, b, depth.device)
        image, _ = render_canonical_view(model.renderer, depth, out.canon_image[:b], normal, R, t, background)
        views.append(image)
    return torch.stack(views)


def shape_views(model, out, yaws_degrees: Sequence[float], background: float = BACKGROUND) -> torch.Tensor:
    """The bare shape (white, lit from the viewer) seen from a yaw sweep: [Y, B, 3, H, W].

    The light is fixed relative to the camera, so the shading moves over the surface as it turns:
    in the canonical frame it is the viewer's light rotated by R^T.
    """
    b = out.light.shape[0]
    depth, normal = out.canon_depth[:b], out.canon_normal[:b]
    white = torch.ones(b, 3, *depth.shape[-2:], device=depth.device)
    viewer_light = light_direction_from(0.3, 0.3).to(depth.device)
    k_a = torch.full((b,), SHAPE_AMBIENT, device=depth.device)
    k_d = torch.full((b,), SHAPE_DIFFUSE, device=depth.device)
    t = torch.zeros(b, 3, device=depth.device)
    views = []
    for yaw in yaws_degrees:
        R = yaw_rotation(yaw, b, depth.device)
        light = (R.transpose(1, 2) @ viewer_light).contiguous()
        shaded, _ = model.renderer.shade(white, normal, k_a, k_d, light)
        image, _ = render_canonical_view(model.renderer, depth, shaded, normal, R, t, background)
        views.append(image)
    return torch.stack(views)


# --------------------------------------------------------------------------------------------
# Single maps to PIL images (one image, CPU)


def _to_pil(array01: torch.Tensor) -> Image.Image:
    """[H, W] or [3, H, W] in [0, 1] -> RGB PIL image."""
    a = array01.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if a.dim() == 2:
        a = a.unsqueeze(0).expand(3, -1, -1)
    return Image.fromarray(a.permute(1, 2, 0).contiguous().numpy(), "RGB")


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1]."""
    return _to_pil((image + 1) / 2)


def depth_to_pil(depth: torch.Tensor, near: float, far: float) -> Image.Image:
    """[H, W] depth, near bright and far dark, on a fixed range (comparable across images)."""
    return _to_pil((far - depth) / (far - near))


def normals_to_pil(normals: torch.Tensor) -> Image.Image:
    """[H, W, 3] unit normals as (n + 1) / 2."""
    return _to_pil((normals.permute(2, 0, 1) + 1) / 2)


def shading_to_pil(shading: torch.Tensor) -> Image.Image:
    """[1, H, W] or [H, W] shading k_a + k_d max(0, n.l), scaled by its maximum."""
    s = shading.reshape(shading.shape[-2:])
    return _to_pil(s / s.max().clamp_min(1e-6))


def confidence_to_pil(sigma: torch.Tensor) -> Image.Image:
    """[1, h, w] or [h, w] sigma as confidence 1 / sigma scaled by its maximum (bright = confident)."""
    c = 1.0 / sigma.reshape(sigma.shape[-2:]).float().clamp_min(1e-6)
    return _to_pil(c / c.max())


def error_to_pil(error: torch.Tensor, scale: float) -> Image.Image:
    """[H, W] non-negative error (NaN = not evaluated, drawn mid grey) as black -> red -> yellow."""
    e = torch.nan_to_num(error.float(), nan=-1.0)
    x = (e / scale).clamp(0, 1)
    rgb = torch.stack([(x * 2).clamp(0, 1), (x * 2 - 1).clamp(0, 1), torch.zeros_like(x)])
    rgb = torch.where(e < 0, torch.full_like(rgb, 0.5), rgb)
    return _to_pil(rgb)


# --------------------------------------------------------------------------------------------
# Grids


def font(size: int = 11) -> ImageFont.ImageFont:
    """Pillow's bundled font (no file on disk needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def resize_tile(img: Image.Image, tile: int) -> Image.Image:
    """Square tile of tile x tile pixels; nearest-neighbour, so every model pixel stays visible."""
    return img if img.size == (tile, tile) else img.resize((tile, tile), Image.NEAREST)


GAP = 2  # white pixels between neighbouring tiles, so that tiles with white backgrounds stay apart


def grid_size(columns: int, rows: int, tile: int, captions: str = "every", gap: int = GAP) -> tuple[int, int]:
    """(width, height) of grid() with this many columns and rows."""
    strip_every = CAPTION_HEIGHT if captions == "every" else 0
    header = CAPTION_HEIGHT if captions == "header" else 0
    columns = max(columns, 1)
    return columns * tile + (columns - 1) * gap, header + rows * (tile + strip_every) + max(rows - 1, 0) * gap


def grid(rows: Sequence[Sequence[tuple[str, Image.Image] | None]], tile: int, captions: str = "every",
         gap: int = GAP) -> Image.Image:
    """Labelled tiles in rows on white: each cell is (label, image) or None (left blank).

    captions="every": a caption strip (CAPTION_HEIGHT) above every row; "header": one strip above the
    first row with the first row's labels (all rows share the columns); "none": no strips. Tiles
    are tile x tile pixels, gap pixels apart; grid_size gives the picture's size.
    """
    ncols = max((len(r) for r in rows), default=0)
    strip_every = CAPTION_HEIGHT if captions == "every" else 0
    header = CAPTION_HEIGHT if captions == "header" else 0
    canvas = Image.new("RGB", grid_size(ncols, len(rows), tile, captions, gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    text_font = font()
    y = header
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            label, img = cell
            x = c * (tile + gap)
            if captions == "every":
                draw.text((x + 2, y + 2), label, fill=(0, 0, 0), font=text_font)
            elif captions == "header" and r == 0:
                draw.text((x + 2, 2), label, fill=(0, 0, 0), font=text_font)
            canvas.paste(resize_tile(img, tile), (x, y + strip_every))
        y += tile + strip_every + gap
    return canvas


# --------------------------------------------------------------------------------------------
# The training-loop hook

VALIDATION_COLUMNS = ("input", "recon", "recon flip", "albedo", "depth", "normals", "shading",
                      "confidence", "yaw -30", "yaw +30")


@torch.no_grad()
def validation_rows(model, images: torch.Tensor) -> list[list[tuple[str, Image.Image]]]:
    """One row of VALIDATION_COLUMNS tiles (model resolution) per image [B, 3, H, W] in [-1, 1]."""
    out = decompose(model, images)
    cfg = model.config
    b = images.shape[0]
    recon = reconstruction(model, out)
    recon_flip = reconstruction(model, out, flipped=True)
    views = novel_views(model, out, (-30.0, 30.0))
    rows = []
    for i in range(b):
        row = [
            ("input", image_to_pil(images[i].float())),
            ("recon", image_to_pil(recon[i])),
            ("recon flip", image_to_pil(recon_flip[i])),
            ("albedo", image_to_pil(out.canon_albedo[i])),
            ("depth", depth_to_pil(out.canon_depth[i], cfg.min_depth, cfg.max_depth)),
            ("normals", normals_to_pil(out.canon_normal[i])),
            ("shading", shading_to_pil(out.canon_shading[i])),
        ]
        if out.sigma_photometric is not None:
            row.append(("confidence", confidence_to_pil(out.sigma_photometric[i])))
        else:
            row.append(("confidence", Image.new("RGB", images.shape[-2:][::-1], (128, 128, 128))))
        row += [("yaw -30", image_to_pil(views[0, i])), ("yaw +30", image_to_pil(views[1, i]))]
        rows.append(row)
    return rows


def save_validation_grid(model, images: torch.Tensor, path: str | Path, scale: int = 2) -> Path:
    """Decompose a fixed batch of validation images and save one PNG grid, one row per image.

    images [B, 3, H, W] in [-1, 1] (any device; moved to the model's). Columns: VALIDATION_COLUMNS,
    each H*scale pixels square, GAP pixels apart, under a one-line header: the PNG's size is
    grid_size(len(VALIDATION_COLUMNS), B, H * scale, "header").
    The model is used in eval mode without gradients and left in the mode it was in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tile = images.shape[-1] * scale
    picture = grid(validation_rows(model, images), tile, captions="header")
    tmp = path.with_name(path.name + ".tmp")
    picture.save(tmp, format="PNG")
    tmp.replace(path)  # never a half-written PNG under the real name
    return path


def validation_images(root: str | Path, splits: str | Sequence[str] = ("val", "train"), count: int = 8,
                      image_size: int = 64) -> torch.Tensor:
    """A fixed validation set: the first `count` images (by name) of the first of `splits` that exists
    in the synface-layout folder root, [N, 3, S, S] in [-1, 1]. The same images every call."""
    from trainer.data.synface import SynfaceFolder

    splits = [splits] if isinstance(splits, str) else list(splits)
    for split in splits:
        if (Path(root) / split / "image").is_dir():
            folder = SynfaceFolder(str(root), split, image_size=image_size, load_depth=False)
            if len(folder):
                return torch.stack([folder[i]["image"] for i in range(min(count, len(folder)))])
    raise ValueError(f"no images for a validation grid in {root} (looked in splits {', '.join(splits)})")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy())
    return a.permute(2, 0, 1) / 127.5 - 1.0
