"""A canonical depth map as a textured mesh: Wavefront .obj + .mtl + the albedo as a PNG texture.

One vertex per depth pixel, back-projected with the camera K (SPEC 3.1); the grid faces of the
renderer (two triangles per pixel quad, SPEC 3.2); one UV per vertex at its pixel's centre in the
texture, (u, v) = ((col + 0.5) / W, 1 - (row + 0.5) / H) (OBJ's v runs upwards), all in [0, 1];
per-vertex normals from the depth map. The texture is the canonical albedo, pixel for pixel, so
texel centres land exactly on the vertices.

Coordinates are turned from the camera frame (x right, y down, z forward, object near z = 1) into
the y-up, camera-looks-down-minus-z frame that viewers assume, and centred on the rotation centre
(0, 0, 1): (x, y, z) -> (x, -y, 1 - z), a proper rotation (no mirroring). The faces are then wound
counter-clockwise seen from the front (+z), so viewers that cull back faces show the object.
Units: the depth range is about 0.9 to 1.1, the object about 0.17 wide at 64 px (10 degree FOV).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.render import geometry
from trainer.render.rasterizer import grid_faces


@dataclass
class MeshFiles:
    obj: Path
    mtl: Path
    texture: Path
    vertices: int
    faces: int


def mesh_arrays(depth: torch.Tensor, K: torch.Tensor, normals: torch.Tensor | None = None):
    """(vertices [H*W, 3], uvs [H*W, 2], normals [H*W, 3] or None, faces [F, 3] 0-based) in the viewer frame.

    depth [H, W]; normals [H, W, 3] in the renderer's convention (a camera-facing surface has
    n = (0, 0, 1), i.e. n points into the object), turned into outward viewer-frame normals.
    """
    depth = depth.detach().to(torch.float64).cpu()
    h, w = depth.shape
    points = geometry.depth_to_points(depth.unsqueeze(0), K.detach().to(torch.float64).cpu())[0].reshape(-1, 3)
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    vertices = points * flip + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    uvs = torch.stack([(cols + 0.5) / w, 1 - (rows + 0.5) / h], dim=-1).reshape(-1, 2)
    vertex_normals = None
    if normals is not None:
        # outward = -n in the camera frame, then the same rotation as the points
        vertex_normals = (-normals.detach().to(torch.float64).cpu().reshape(-1, 3)) * flip
    faces = grid_faces(h, w)
    return vertices.numpy(), uvs.numpy(), None if vertex_normals is None else vertex_normals.numpy(), faces.numpy()


def _rows(prefix: str, values: np.ndarray, fmt: str) -> str:
    line = prefix + " " + " ".join([fmt] * values.shape[1]) + "\n"
    return "".join(line % tuple(row) for row in values.tolist())


def write_textured_mesh(obj_path: str | Path, depth: torch.Tensor, albedo: torch.Tensor, K: torch.Tensor,
                        normals: torch.Tensor | None = None, name: str = "unsup3d") -> MeshFiles:
    """Write obj_path, the .mtl beside it and <stem>_albedo.png; returns their paths and the counts.

    depth [H, W] canonical depth; albedo [3, H, W] in [-1, 1] (the texture); K the 3x3 camera of
    the H x W image; normals [H, W, 3] optional (renderer convention, see mesh_arrays).
    """
    obj_path = Path(obj_path)
    obj_path.parent.mkdir(parents=True, exist_ok=True)
    mtl_path = obj_path.with_suffix(".mtl")
    texture_path = obj_path.with_name(obj_path.stem + "_albedo.png")

    from PIL import Image

    texture = ((albedo.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(texture.permute(1, 2, 0).contiguous().numpy(), "RGB").save(texture_path)

    material = "albedo"
    mtl_path.write_text(
        f"# {name}: canonical albedo of an Unsup3D reconstruction\n"
        f"newmtl {material}\n"
        "Ka 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\nd 1.0\nillum 1\n"
        f"map_Kd {texture_path.name}\n"
    )

    vertices, uvs, vertex_normals, faces = mesh_arrays(depth, K, normals)
    f = faces + 1  # OBJ indices are 1-based; vertex, UV and normal share the index
    if vertex_normals is not None:
        face_lines = "".join(f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}\n" for a, b, c in f.tolist())
    else:
        face_lines = "".join(f"f {a}/{a} {b}/{b} {c}/{c}\n" for a, b, c in f.tolist())
    h, w = depth.shape
    parts = [
        f"# {name}: Unsup3D canonical depth as a {w}x{h} grid mesh, {len(vertices)} vertices, {len(faces)} faces\n",
        "# frame: x right, y up, z towards the viewer; centred on the view rotation centre\n",
        f"mtllib {mtl_path.name}\n",
        f"o {name}\n",
        _rows("v", vertices, "%.6f"),
        _rows("vt", uvs, "%.6f"),
        _rows("vn", vertex_normals, "%.5f") if vertex_normals is not None else "",
        f"usemtl {material}\n",
        "s 1\n",
        face_lines,
    ]
    obj_path.write_text("".join(parts))
    return MeshFiles(obj_path, mtl_path, texture_path, len(vertices), len(faces))
