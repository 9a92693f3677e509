"""Camera, view transform and depth-map geometry of SPEC section 3, as pure tensor code.

Conventions (SPEC 3): pinhole camera with a 10 degree field of view; x right (columns), y down
(rows), z forward; pixel (u, v) = (col, row) in 0..W-1; the principal point is the image centre
(W-1)/2. A camera-facing surface has its normal close to (0, 0, 1), the same convention as the
light direction. Everything here works in float32 or float64, whatever the input dtype is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FOV_DEGREES = 10.0
# The view transform rotates about this point, the centre of the depth range (SPEC 3.3).
ROTATION_CENTRE = (0.0, 0.0, 1.0)


def intrinsics(width: int, height: int | None = None, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The 3x3 camera matrix K for an image of the given size (f = (W-1)/2 / tan(FOV/2))."""
    height = width if height is None else height
    f = (width - 1) / 2 / math.tan(math.radians(FOV_DEGREES / 2))
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=dtype, device=device)


def pixel_grid(height: int, width: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Homogeneous pixel coordinates [H, W, 3] holding (u, v, 1) = (col, row, 1)."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)


def depth_to_points(depth: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Back-project a depth map [B, H, W] to camera-frame points [B, H, W, 3]: P = d K^-1 [u, v, 1]."""
    _, h, w = depth.shape
    rays = pixel_grid(h, w, dtype=depth.dtype, device=depth.device) @ torch.linalg.inv(K.to(depth)).T
    return depth.unsqueeze(-1) * rays


def project(points: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Project camera-frame points [..., 3] to pixel coordinates [..., 2] (u, v)."""
    p = points @ K.to(points).T
    return p[..., :2] / p[..., 2:3]


def depth_to_normals(depth: torch.Tensor, K: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Unit normals [B, H, W, 3] of a depth map [B, H, W] by central differences (SPEC 3.6).

    t_u = P[i, j+1] - P[i, j-1], t_v = P[i+1, j] - P[i-1, j], n = t_u x t_v, border pixels (0, 0, 1).
    eps=None normalizes exactly. eps=1e-7 reproduces the reference's n / (|n| + eps), which at 64 px
    shortens every normal noticeably (|n| is about 3e-5): use it only to compare with the paper.
    """
    # Per coordinate plane ([B, H, W] each) rather than on [B, H, W, 3] points: the same products
    # and differences as P = d K^-1 [u, v, 1], but every op runs on contiguous planes, and no
    # torch.cross (whose CPU kernel strides over the 3-vectors) or slice assignment (whose backward
    # copies the whole map) is needed: a quarter of the renderer's time at 64 px (issue 14).
    _, h, w = depth.shape
    rays = pixel_grid(h, w, dtype=depth.dtype, device=depth.device) @ torch.linalg.inv(K.to(depth)).T
    x, y, z = (depth * rays[..., c] for c in range(3))
    xu, yu, zu = (p[:, 1:-1, 2:] - p[:, 1:-1, :-2] for p in (x, y, z))  # t_u
    xv, yv, zv = (p[:, 2:, 1:-1] - p[:, :-2, 1:-1] for p in (x, y, z))  # t_v
    n = (yu * zv - zu * yv, zu * xv - xu * zv, xu * yv - yu * xv)  # t_u x t_v
    length = torch.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    length = length.clamp_min(torch.finfo(depth.dtype).tiny) if eps is None else length + eps
    # border pixels (0, 0, 1)
    planes = [F.pad(c / length, (1, 1, 1, 1), value=border) for c, border in zip(n, (0.0, 0.0, 1.0))]
    return torch.stack(planes, dim=-1)


def euler_to_rotation(angles: torch.Tensor) -> torch.Tensor:
    """R = Rz(gamma) Ry(beta) Rx(alpha) [B, 3, 3] from angles [B, 3] = (alpha, beta, gamma) in radians."""
    a, b, g = angles.unbind(-1)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    rx = torch.stack([one, zero, zero, zero, a.cos(), -a.sin(), zero, a.sin(), a.cos()], -1).view(-1, 3, 3)
    ry = torch.stack([b.cos(), zero, b.sin(), zero, one, zero, -b.sin(), zero, b.cos()], -1).view(-1, 3, 3)
    rz = torch.stack([g.cos(), -g.sin(), zero, g.sin(), g.cos(), zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def view_to_rotation_translation(
    view: torch.Tensor, *, max_angle_degrees: float = 60.0, xy_range: float = 0.1, z_range: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the view net's output [B, 6] in [-1, 1] to (R [B, 3, 3], t [B, 3]) (SPEC 2, view x)."""
    angles = view[:, :3] * math.radians(max_angle_degrees)
    t = torch.stack([view[:, 3] * xy_range, view[:, 4] * xy_range, view[:, 5] * z_range], dim=-1)
    return euler_to_rotation(angles), t


def transform_points(points: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Canonical -> view: P' = R (P - c) + c + t, for points [B, ..., 3]."""
    c = points.new_tensor(ROTATION_CENTRE)
    shape = points.shape
    flat = points.reshape(shape[0], -1, 3)
    out = (flat - c) @ R.transpose(1, 2) + c + t[:, None, :]
    return out.reshape(shape)


def inverse_transform_points(points: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """View -> canonical: P = R^T (P' - t - c) + c, for points [B, ..., 3]."""
    c = points.new_tensor(ROTATION_CENTRE)
    shape = points.shape
    flat = points.reshape(shape[0], -1, 3)
    out = (flat - t[:, None, :] - c) @ R + c
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# The same geometry on coordinate planes: points as a tuple (x, y, z) of equally shaped tensors
# ([B, H, W] or [B, N]) rather than one [..., 3] tensor. The renderer's hot path uses these: a 3x3
# matrix product on [B*H*W, 3] rows is one of the slowest kernels on CPU (its backward too), while
# each plane here is a few contiguous elementwise passes (issue 14). Results equal the functions
# above up to float rounding (the products are summed in another order).

Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def ray_planes(height: int, width: int, K: torch.Tensor) -> Planes:
    """K^-1 (u, v, 1) as three [H, W] planes: the point at depth 1 behind each pixel."""
    u, v, one = pixel_grid(height, width, dtype=K.dtype, device=K.device).unbind(-1)
    # Entries as 0-dim tensors rather than .tolist(): no host synchronisation on a GPU.
    return tuple(row[0] * u + row[1] * v + row[2] * one for row in torch.linalg.inv(K).unbind(0))


def depth_to_point_planes(depth: torch.Tensor, K: torch.Tensor) -> Planes:
    """depth_to_points as planes: depth [B, H, W] -> (x, y, z), each [B, H, W]."""
    _, h, w = depth.shape
    return tuple(depth * ray for ray in ray_planes(h, w, K.to(depth)))


def _per_batch(matrix: torch.Tensor, like: torch.Tensor) -> list[list[torch.Tensor]]:
    """The entries of matrix [B, 3, 3] as [B, 1, ...] tensors that broadcast against like [B, ...]."""
    shape = (matrix.shape[0],) + (1,) * (like.dim() - 1)
    return [[matrix[:, i, j].reshape(shape) for j in range(3)] for i in range(3)]


def transform_point_planes(points: Planes, R: torch.Tensor, t: torch.Tensor) -> Planes:
    """transform_points as planes: P' = R (P - c) + c + t."""
    q = [p - c for p, c in zip(points, ROTATION_CENTRE)]
    r = _per_batch(R, q[0])
    shift = [t[:, i].reshape(r[0][0].shape) for i in range(3)]
    return tuple(r[i][0] * q[0] + r[i][1] * q[1] + r[i][2] * q[2] + ROTATION_CENTRE[i] + shift[i] for i in range(3))


def inverse_transform_point_planes(points: Planes, R: torch.Tensor, t: torch.Tensor) -> Planes:
    """inverse_transform_points as planes: P = R^T (P' - t - c) + c."""
    r = _per_batch(R, points[0])
    q = [p - t[:, i].reshape(r[0][0].shape) - ROTATION_CENTRE[i] for i, p in enumerate(points)]
    return tuple(r[0][i] * q[0] + r[1][i] * q[1] + r[2][i] * q[2] + ROTATION_CENTRE[i] for i in range(3))


def project_planes(points: Planes, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """project as planes: (u, v) pixel coordinates of camera-frame points (x, y, z)."""
    x, y, z = points
    p = [row[0] * x + row[1] * y + row[2] * z for row in K.to(x).unbind(0)]
    return p[0] / p[2], p[1] / p[2]
