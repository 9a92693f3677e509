"""Rendering the synthetic faces: the head model posed and painted (skin, hair, eyes, lips), rasterised
in the model's camera, supersampled and pooled, with ground-truth depth in the input view and the
canonical (frontal) depth. The people come from face_sampling.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.face_sampling import FaceConfig, model_light_and_view
from trainer.data.head_model import HeadModel
from trainer.data.synface import FAR_DEPTH, NEAR_DEPTH
from trainer.render import geometry
from trainer.render.rasterizer import rasterize_depth
from trainer.render.renderer import supersampled_intrinsics

# Foreground depth is kept a hair nearer than 1.1 so that it never encodes as the background byte 0.
_FAR_FOREGROUND = FAR_DEPTH - 1.01 * (FAR_DEPTH - NEAR_DEPTH) / 255
_BACKGROUND_DEPTH = FAR_DEPTH + 0.1


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
