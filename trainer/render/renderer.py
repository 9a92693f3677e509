"""The differentiable renderer of SPEC section 3: canonical depth, albedo and light to the input view.

Pure tensor code with no learnable state. Every computation runs in float32 (float64 inputs stay
float64, for gradcheck), also when the caller is inside torch.autocast: depth differences between
neighbouring pixels are about 1e-3 of the depth, and 1/z interpolation and back-projection need
more than bf16's 8 bits of mantissa.

Pipeline (SPEC 3): canonical depth -> 3D points (one vertex per pixel) -> grid mesh -> view
transform -> rasterised depth in the input view (render_depth); normals and Lambertian shading in
the canonical frame (normals, shade); the canonical image is brought into the input view by an
inverse warp through the rendered depth (warp_canonical); recon_mask marks the covered pixels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.render import geometry
from trainer.render.rasterizer import ZBUFFERS, grid_faces, rasterize_depth_planes


PIXEL_CENTRES = ("integer", "reference")
# The reference rasteriser's pixel centres sit at +0.5 in its own (rasterised) image's pixel units.
REFERENCE_PIXEL_OFFSET = 0.5


@dataclass
class RendererConfig:
    """Settings of the renderer (SPEC 3)."""

    image_size: int = 64
    """Height and width of every map the renderer takes and returns (the camera K depends on it)."""
    min_depth: float = 0.9
    """Nearest canonical depth the depth net can produce."""
    max_depth: float = 1.1
    """Farthest canonical depth; rendered depth is clamped to [min - m, max + m], m = (max - min) / 2."""
    supersample: int = 1
    """1 = off; 2 = the reference's anti-aliasing: rasterise at 2x resolution, average-pool 2x2."""
    pixel_centre: str = "integer"
    """Where the rasteriser samples output pixel (row r, col c), in the frame of the renderer's
    camera K. "integer": at (c, r), the convention of back-projection, normals and warp (SPEC 3), so
    rendered depth and warp line up; sub-pixels at +-1/4 when supersample is 2. "reference": at
    (c + 0.5, r + 0.5), sub-pixels at +1/4 and +3/4, as the reference's rasteriser did (SPEC 3.4),
    while back-projection, normals and warp keep integer coordinates: rendered depth is then half a
    pixel off from the warp, exactly as in the reference. Only the rasteriser's samples move."""
    zbuffer: str = "auto"
    """The rasteriser's z-buffer (rasterize_depth): "auto" (the compiled C loop on CPU where a C
    compiler is available, else PyTorch), "torch" or "native". Same result every way, bit for bit."""

    def __post_init__(self):
        if self.image_size < 2:
            raise ValueError(f"renderer image_size must be at least 2, got {self.image_size}")
        if not self.min_depth < self.max_depth:
            raise ValueError(f"renderer needs min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.supersample < 1:
            raise ValueError(f"renderer supersample must be >= 1, got {self.supersample}")
        if self.zbuffer not in ZBUFFERS:
            raise ValueError(f"renderer zbuffer must be one of {', '.join(ZBUFFERS)}, got {self.zbuffer!r}")
        if self.pixel_centre not in PIXEL_CENTRES:
            raise ValueError(f"renderer pixel_centre must be one of {', '.join(PIXEL_CENTRES)}, got {self.pixel_centre!r}")

    @property
    def depth_margin(self) -> float:
        """m = (max - min) / 2, the margin allowed outside the depth range."""
        return (self.max_depth - self.min_depth) / 2

    @property
    def far_depth(self) -> float:
        """max + m: the clamped depth of background pixels; recon_mask is depth < far_depth."""
        return self.max_depth + self.depth_margin

    @property
    def near_depth(self) -> float:
        """min - m: the lower clamp of rendered depth."""
        return self.min_depth - self.depth_margin


def supersampled_intrinsics(K: torch.Tensor, factor: int, pixel_centre: str = "integer") -> torch.Tensor:
    """Camera matrix of an image `factor` times larger whose factor x factor blocks pool onto K's pixels.

    "integer" (SPEC 3): sub-pixel j of the large image, sampled at its integer centre, sits at
    u = (j - (factor - 1) / 2) / factor in the small one, so pooling sub-pixels factor*i ..
    factor*i + factor-1 gives a sample centred on pixel i exactly: f' = factor f,
    c' = factor c + (factor - 1) / 2. (geometry.intrinsics(2W) would instead give
    f' = (2W-1)/2 / tan(5 deg), a field of view that does not pool back onto the W-pixel image: up
    to a quarter pixel off at the borders.)

    "reference": the reference's camera, its 1x projection scaled by factor (f' = factor f,
    c' = factor c), to be rasterised with pixel centres at +0.5 (rasterize_depth's pixel_offset
    REFERENCE_PIXEL_OFFSET, see rasterizer_camera): sub-pixel j is sampled at (j + 0.5) / factor in
    the small image, so pixel i's block covers i + 0.5 / factor .. i + 1 - 0.5 / factor and pools
    to a sample centred on i + 0.5 (i + 1/4 and i + 3/4 at factor 2), the reference's convention.
    For factor 1 this is K itself.
    """
    if pixel_centre not in PIXEL_CENTRES:
        raise ValueError(f"pixel_centre must be one of {', '.join(PIXEL_CENTRES)}, got {pixel_centre!r}")
    scaled = K.clone()
    scaled[:2, :] *= factor
    if pixel_centre == "integer":
        scaled[:2, 2] += (factor - 1) / 2
    return scaled


def rasterizer_camera(K: torch.Tensor, factor: int, pixel_centre: str = "integer") -> tuple[torch.Tensor, float]:
    """(camera, pixel_offset) to rasterise K's image at `factor` times its resolution (RendererConfig.pixel_centre)."""
    offset = REFERENCE_PIXEL_OFFSET if pixel_centre == "reference" else 0.0
    return supersampled_intrinsics(K, factor, pixel_centre), offset


class Renderer:
    """Depth rendering, inverse warping, normals, shading and masks of SPEC 3 (no learnable state).

    camera: the 3x3 K of the image_size-pixel image; by default SPEC 3's geometry.intrinsics. A
    caller that renders at a multiple of a smaller camera's resolution and pools by itself passes
    supersampled_intrinsics(K_small, factor) here (with supersample=1). cfg.pixel_centre applies to
    the pixels of this camera (a "reference" half pixel of the large image, not of the small one).
    """

    def __init__(self, cfg: RendererConfig, *, camera: torch.Tensor | None = None):
        self.cfg = cfg
        # float64 master copies: _K for back-projection, warping and normals, _K_render for
        # rasterising (the supersampled camera). _camera hands out per-device, per-dtype copies.
        K = geometry.intrinsics(cfg.image_size, dtype=torch.float64) if camera is None else camera
        self._K = K.detach().to(torch.float64).clone()
        self._K_render, self._pixel_offset = rasterizer_camera(self._K, cfg.supersample, cfg.pixel_centre)
        self._camera_copies: dict[tuple, torch.Tensor] = {}
        self._faces: dict[torch.device, torch.Tensor] = {}

    # -- public API ---------------------------------------------------------------------------

    def render_depth(self, canon_depth: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Depth [B, H, W] seen in the input view of the canonical depth [B, H, W] moved by (R, t).

        R [B, 3, 3], t [B, 3] as in SPEC 3.3. The mesh is the canonical grid mesh (one vertex per
        pixel); the result is clamped to [min - m, max + m], so background pixels read max + m.
        With supersample s the same mesh is rasterised into an s-times larger image and each s x s
        block is averaged before the clamp: a pixel with any background sub-pixel (depth +inf)
        therefore reads max + m and leaves the mask, as in the reference (whose background was
        its renderer's far plane, far beyond max + m).
        """
        self._check_maps(canon_depth, "canon_depth")
        with _float_compute(canon_depth, R, t) as cast:
            depth, R, t = cast(canon_depth), cast(R), cast(t)
            b, h, w = depth.shape
            s = self.cfg.supersample
            points = geometry.depth_to_point_planes(depth, self._camera("image", depth))
            points = [p.reshape(b, h * w) for p in geometry.transform_point_planes(points, R, t)]
            # The mesh stays the 1x mesh even when supersampling: the reference rendered the same
            # vertices into a larger image; it did not upsample the depth map.
            faces = self._grid_faces(depth.device)
            rendered, _ = rasterize_depth_planes(
                points, faces, self._camera("render", depth), h * s, w * s, pixel_offset=self._pixel_offset,
                zbuffer=self.cfg.zbuffer,
            )
            if s > 1:
                rendered = F.avg_pool2d(rendered.unsqueeze(1), s).squeeze(1)
            return rendered.clamp(self.cfg.near_depth, self.cfg.far_depth)

    def warp_canonical(
        self, canon_image: torch.Tensor, view_depth: torch.Tensor, R: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The canonical image [B, C, H, W] as seen in the input view, by inverse warping (SPEC 3.5).

        Each input-view pixel is back-projected with view_depth [B, H, W], moved to the canonical
        frame by the inverse view transform, projected with K and sampled bilinearly
        (align_corners=True, which the normalisation u / (W-1) * 2 - 1 assumes). Points that land
        outside the canonical image read zeros (grid_sample's default padding, as the reference);
        they are background and masked out by the losses.
        """
        self._check_maps(view_depth, "view_depth")
        if canon_image.dim() != 4 or canon_image.shape[-2:] != view_depth.shape[-2:]:
            raise ValueError(f"canon_image must be [B, C, H, W] matching view_depth, got {tuple(canon_image.shape)}")
        with _float_compute(canon_image, view_depth, R, t) as cast:
            image, depth, R, t = cast(canon_image), cast(view_depth), cast(R), cast(t)
            b, h, w = depth.shape
            K = self._camera("image", depth)
            points = geometry.inverse_transform_point_planes(geometry.depth_to_point_planes(depth, K), R, t)
            u, v = geometry.project_planes(points, K)  # [B, H, W] each
            grid = torch.stack([u / (w - 1), v / (h - 1)], dim=-1) * 2 - 1
            return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def recon_mask(self, view_depth: torch.Tensor) -> torch.Tensor:
        """[B, H, W] 1.0 where a triangle covers the pixel (depth < max + m), else 0.0 (SPEC 3.8)."""
        dtype = view_depth.dtype if view_depth.dtype == torch.float64 else torch.float32
        # Compare in the depth's own dtype: the clamp put background exactly at far_depth rounded
        # to that dtype, and Python's scalar is rounded the same way here.
        return (view_depth < self.cfg.far_depth).to(dtype)

    def normals(self, canon_depth: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """Unit normals [B, H, W, 3] of a depth map (SPEC 3.6); eps=1e-7 is the reference's n/(|n|+eps)."""
        self._check_maps(canon_depth, "canon_depth")
        with _float_compute(canon_depth) as cast:
            depth = cast(canon_depth)
            return geometry.depth_to_normals(depth, self._camera("image", depth), eps=eps)

    def shade(
        self,
        albedo: torch.Tensor,
        normals: torch.Tensor,
        k_ambient: torch.Tensor,
        k_diffuse: torch.Tensor,
        light_dir: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lambertian shading in the canonical frame (SPEC 3.7).

        albedo [B, 3, H, W] in [-1, 1], normals [B, H, W, 3], k_ambient [B], k_diffuse [B],
        light_dir [B, 3] (unit). Returns (image [B, 3, H, W] = ((a + 1) / 2 * S) * 2 - 1,
        shading S [B, 1, H, W] = k_a + k_d max(0, <n, l>)).
        """
        with _float_compute(albedo, normals, k_ambient, k_diffuse, light_dir) as cast:
            albedo, normals = cast(albedo), cast(normals)
            k_a, k_d, light = cast(k_ambient), cast(k_diffuse), cast(light_dir)
            cos = (normals * light[:, None, None, :]).sum(-1).clamp_min(0)  # [B, H, W]
            shading = k_a.view(-1, 1, 1, 1) + k_d.view(-1, 1, 1, 1) * cos.unsqueeze(1)
            image = ((albedo + 1) / 2 * shading) * 2 - 1
            return image, shading

    # -- helpers ------------------------------------------------------------------------------

    def _camera(self, which: str, like: torch.Tensor) -> torch.Tensor:
        """K of the image ("image") or of the rasterised image ("render"), on like's device and dtype."""
        master = self._K if which == "image" else self._K_render
        key = (which, like.device, like.dtype)
        if key not in self._camera_copies:
            self._camera_copies[key] = master.to(device=like.device, dtype=like.dtype)
        return self._camera_copies[key]

    def _grid_faces(self, device: torch.device) -> torch.Tensor:
        """The 1x grid mesh's faces on this device, built once."""
        if device not in self._faces:
            self._faces[device] = grid_faces(self.cfg.image_size, self.cfg.image_size, device=device)
        return self._faces[device]

    def _check_maps(self, depth: torch.Tensor, name: str) -> None:
        size = self.cfg.image_size
        if depth.dim() != 3 or tuple(depth.shape[1:]) != (size, size):
            raise ValueError(
                f"{name} must be [B, {size}, {size}] (renderer image_size {size}), got {tuple(depth.shape)}"
            )


@contextlib.contextmanager
def _float_compute(*reference: torch.Tensor):
    """Autocast off, and a cast to float64 if any reference tensor is float64, else float32."""
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in reference) else torch.float32
    device = reference[0].device

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    with torch.autocast(device_type=device.type, enabled=False):
        yield cast
