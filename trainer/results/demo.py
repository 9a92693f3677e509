"""`unsup3d demo`: everything a trained model infers from photos, as files people can open.

For each input image, in <out>/<name>/:
- input.png, recon.png, recon_flip.png, canonical.png (the canonical shaded image), albedo.png,
  depth.png, normals.png, shading.png, conf_photometric.png, conf_photometric_flip.png,
  conf_perceptual.png, conf_perceptual_flip.png (no conf_* for a model without confidence net),
  relight_<name>.png for each light, view_yaw<+N>.png for each yaw (view_yaw-22.5.png, view_yaw+0.png, ...): tile x tile pixels each;
- summary.png: all of them, labelled, in one picture (summary_size gives its size);
- mesh.obj + mesh.mtl + mesh_albedo.png: the canonical depth as a textured mesh (trainer.results.mesh);
- rotation.gif: the shape turning (textured | bare shape side by side), gif_frames frames.
And <out>/demo.json: what was written, per image, and the inputs that could not be read.

Inputs: a folder of images (or one image) of any size and format Pillow reads; they should be
cropped around the object already, like the training data. Each is centre-cropped to a square
(a no-op for square images) and resized to the model's resolution with a Lanczos filter.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from trainer.results import visualize as vis
from trainer.results.mesh import write_textured_mesh
from trainer.loop.device import resolve_device
from trainer.render.geometry import intrinsics
from trainer.data.synface import DEFAULT_MAX_PIXELS, ImageSizeError, default_min_size, open_image_quietly, size_problem
from trainer.results.json_text import json_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
# name, light direction (x, y) of normalize([x, y, 1]) in the light net's parameterisation: +x
# lights the image's left side, +y its top (checked in tests/test_demo.py).
LIGHTS = (("left", 1.0, 0.0), ("right", -1.0, 0.0), ("top", 0.0, 1.0), ("bottom", 0.0, -1.0), ("front", 0.0, 0.0))


@dataclass
class DemoOptions:
    tile: int = 128
    """Side of every panel PNG in pixels (model maps are upscaled, nearest neighbour)."""
    yaws: tuple[float, ...] = (-45.0, -22.5, 0.0, 22.5, 45.0)
    """Novel views: yaw angles in degrees, about the vertical axis through the object's centre."""
    gif_frames: int = 36
    """Frames of rotation.gif: one swing from the front to +gif_max_yaw, to -gif_max_yaw and back."""
    gif_max_yaw: float = 45.0
    gif_frame_ms: int = 60
    batch_size: int = 16
    lights: tuple[tuple[str, float, float], ...] = LIGHTS
    max_image_pixels: int = 4096 * 4096
    """Inputs with more pixels (read from the header, before decoding) are skipped (too_large)."""
    min_image_size: int | None = None
    """Inputs whose shorter side is below this are skipped (too_small); None: half the model's resolution."""

    def __post_init__(self):
        for name in ("tile", "gif_frames", "gif_frame_ms", "batch_size", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be at least 1, got {getattr(self, name)}")
        if not self.yaws:
            raise ValueError("demo needs at least one yaw angle")


def summary_size(options: DemoOptions, with_confidence: bool = True) -> tuple[int, int]:
    """(width, height) of summary.png: 3 rows (maps, relit, views) of tiles with caption strips."""
    columns = max(8 if with_confidence else 6, len(options.lights), len(options.yaws))
    return vis.grid_size(columns, 3, options.tile)


def gif_yaws(options: DemoOptions) -> list[float]:
    """A sine swing that loops smoothly: front, +max, front, -max (gif_frames yaws, in degrees).

    GIF writers merge a frame identical to the one before it, so no two consecutive yaws may be
    equal: they would be whenever two samples straddle a turning point symmetrically, which
    happens for n = 2 mod 4 frames; there a phase of half a frame puts the turning points on samples.
    """
    n = options.gif_frames
    phase = math.pi / n if n % 4 == 2 else 0.0
    return [options.gif_max_yaw * math.sin(2 * math.pi * i / n + phase) for i in range(n)]


def load_photo(path: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> torch.Tensor:
    """Any image file -> [3, size, size] in [-1, 1]: RGB, centre-cropped to a square, Lanczos-resized.
    Its size is read from the header first: ImageSizeError (too_large, too_small) before any decoding."""
    with open_image_quietly(path) as img:
        problem = size_problem(img.size, max_pixels, default_min_size(size) if min_size is None else min_size)
        if problem is not None:
            raise ImageSizeError(problem[0], f"{problem[0]}: {problem[1]}")
        img.seek(0)  # first frame of animations and multi-page files
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return vis.pil_to_tensor(img)


def list_inputs(input_path: Path) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise FileNotFoundError(f"demo input not found: {input_path}")
    return sorted(p for p in input_path.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _output_names(paths: list[Path]) -> list[str]:
    """Folder names from file stems; a stem that repeats (a.png, a.jpg) gets its extension appended."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}" for p in paths]


@torch.no_grad()
def render_batch(model, images: torch.Tensor, options: DemoOptions) -> dict:
    """All the tensors the panels need for a batch [B, 3, S, S]; everything moved to the CPU."""
    out = vis.decompose(model, images)
    b = images.shape[0]
    directions = torch.stack([vis.light_direction_from(x, y) for _, x, y in options.lights])
    yaws = gif_yaws(options)
    result = {
        "out": out,
        "recon": vis.reconstruction(model, out),
        "recon_flip": vis.reconstruction(model, out, flipped=True),
        "relit": vis.relight(model, out, directions),
        "views": vis.novel_views(model, out, options.yaws),
        "gif_textured": vis.novel_views(model, out, yaws),
        "gif_shape": vis.shape_views(model, out, yaws),
    }
    cpu = {k: (v.float().cpu() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}
    o = out
    cpu["maps"] = {
        "canon_depth": o.canon_depth[:b].float().cpu(),
        "canon_albedo": o.canon_albedo[:b].float().cpu(),
        "canon_normal": o.canon_normal[:b].float().cpu(),
        "canon_shading": o.canon_shading[:b].float().cpu(),
        "canon_image": o.canon_image[:b].float().cpu(),
        "sigma_photometric": None if o.sigma_photometric is None else o.sigma_photometric.float().cpu(),
        "sigma_perceptual": None if o.sigma_perceptual is None else o.sigma_perceptual.float().cpu(),
    }
    del cpu["out"]
    return cpu


def panels_for(i: int, batch: dict, images: torch.Tensor, model_config, options: DemoOptions) -> list[list[tuple[str, str, Image.Image]]]:
    """Rows of (file stem, caption, image) for image i of a rendered batch."""
    maps = batch["maps"]
    b = images.shape[0]
    cfg = model_config
    first = [
        ("input", "input", vis.image_to_pil(images[i])),
        ("recon", "reconstruction", vis.image_to_pil(batch["recon"][i])),
        ("albedo", "albedo", vis.image_to_pil(maps["canon_albedo"][i])),
        ("depth", "depth", vis.depth_to_pil(maps["canon_depth"][i], cfg.min_depth, cfg.max_depth)),
        ("normals", "normals", vis.normals_to_pil(maps["canon_normal"][i])),
        ("shading", "shading", vis.shading_to_pil(maps["canon_shading"][i])),
    ]
    if maps["sigma_photometric"] is not None:
        first += [
            ("conf_photometric", "confidence", vis.confidence_to_pil(maps["sigma_photometric"][i])),
            ("conf_perceptual", "conf. perceptual", vis.confidence_to_pil(maps["sigma_perceptual"][i])),
        ]
    relit = [(f"relight_{name}", f"light {name}", vis.image_to_pil(batch["relit"][k, i]))
             for k, (name, _, _) in enumerate(options.lights)]
    views = [(f"view_yaw{yaw:+g}", f"yaw {yaw:+.1f}", vis.image_to_pil(batch["views"][k, i]))
             for k, yaw in enumerate(options.yaws)]
    # written as files, not shown in summary.png
    extra = [
        ("recon_flip", "", vis.image_to_pil(batch["recon_flip"][i])),
        ("canonical", "", vis.image_to_pil(maps["canon_image"][i])),
    ]
    if maps["sigma_photometric"] is not None:
        extra += [
            ("conf_photometric_flip", "", vis.confidence_to_pil(maps["sigma_photometric"][b + i])),
            ("conf_perceptual_flip", "", vis.confidence_to_pil(maps["sigma_perceptual"][b + i])),
        ]
    return [first, relit, views, extra]


def write_gif(path: Path, textured: torch.Tensor, shape: torch.Tensor, options: DemoOptions) -> int:
    """Frames [N, 3, S, S] of the textured and the bare shape side by side, looping forever."""
    frames = []
    for k in range(textured.shape[0]):
        pair = Image.new("RGB", (2 * options.tile, options.tile))
        pair.paste(vis.resize_tile(vis.image_to_pil(textured[k]), options.tile), (0, 0))
        pair.paste(vis.resize_tile(vis.image_to_pil(shape[k]), options.tile), (options.tile, 0))
        # Fast octree quantisation to a 256-colour palette per frame: about 100x faster than
        # Pillow's default median cut, which would otherwise take most of the demo's time.
        frames.append(pair.quantize(method=Image.Quantize.FASTOCTREE))
    # disposal 1 and no optimisation: every frame is stored whole, so readers count all of them
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=options.gif_frame_ms, loop=0,
                   optimize=False, disposal=1)
    with Image.open(path) as written:  # what readers will see (identical neighbours would be merged)
        return written.n_frames


def write_image_outputs(folder: Path, i: int, batch: dict, images: torch.Tensor, model_config,
                        options: DemoOptions) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rows = panels_for(i, batch, images, model_config, options)
    files = []
    for row in rows:
        for stem, _, img in row:
            vis.resize_tile(img, options.tile).save(folder / f"{stem}.png")
            files.append(f"{stem}.png")
    summary = vis.grid([[(caption, img) for _, caption, img in row] for row in rows[:3]], options.tile)
    summary.save(folder / "summary.png")
    maps = batch["maps"]
    size = model_config.image_size
    mesh = write_textured_mesh(folder / "mesh.obj", maps["canon_depth"][i], maps["canon_albedo"][i],
                               intrinsics(size, dtype=torch.float64), maps["canon_normal"][i], name=folder.name)
    frames = write_gif(folder / "rotation.gif", batch["gif_textured"][:, i], batch["gif_shape"][:, i], options)
    return {
        "panels": files,
        "summary": "summary.png",
        "mesh": {"obj": mesh.obj.name, "mtl": mesh.mtl.name, "texture": mesh.texture.name,
                 "vertices": mesh.vertices, "faces": mesh.faces},
        "gif": {"file": "rotation.gif", "frames": frames},
    }


def run_demo(checkpoint: str, input_path: str, out_dir: str, device: str = "auto",
             options: DemoOptions | None = None) -> dict:
    """Write the demo outputs of every readable image under input_path; returns (and writes) demo.json."""
    from trainer.results.evaluate import load_model

    options = options or DemoOptions()
    torch_device = resolve_device(device)
    started = time.perf_counter()
    model, model_config, step = load_model(checkpoint, torch_device)
    size = model_config.image_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths = list_inputs(Path(input_path))
    names = _output_names(paths)
    loaded, skipped, skipped_by_reason = [], {}, {}
    for name, path in zip(names, paths):
        try:
            loaded.append((name, path, load_photo(path, size, options.max_image_pixels, options.min_image_size)))
        except ImageSizeError as error:
            log.warning("demo: skipping %s: %s", path, error)
            skipped[str(path)] = str(error)
            skipped_by_reason[error.reason] = skipped_by_reason.get(error.reason, 0) + 1
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            log.warning("demo: skipping unreadable image %s: %s", path, error)
            skipped[str(path)] = str(error)
            skipped_by_reason["unreadable_image"] = skipped_by_reason.get("unreadable_image", 0) + 1
    if not loaded:
        raise ValueError(f"no readable images in {input_path} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}; "
                         f"skipped: {skipped_by_reason or 'none'})")

    results = {}
    for start in range(0, len(loaded), options.batch_size):
        chunk = loaded[start:start + options.batch_size]
        images = torch.stack([t for _, _, t in chunk])
        batch = render_batch(model, images, options)
        for i, (name, path, _) in enumerate(chunk):
            entry = write_image_outputs(out / name, i, batch, images, model_config, options)
            results[name] = {"input": str(path), "folder": name, **entry}
            log.info("demo: %s -> %s", path, out / name)

    summary = {
        "checkpoint": str(checkpoint),
        "step": step,
        "device": str(torch_device),
        "image_size": size,
        "images": len(results),
        "skipped": skipped,
        "skipped_by_reason": skipped_by_reason,
        "options": asdict(options),
        "seconds": round(time.perf_counter() - started, 3),
        "outputs": results,
    }
    (out / "demo.json").write_text(json_text(summary, indent=2) + "\n")
    return summary
