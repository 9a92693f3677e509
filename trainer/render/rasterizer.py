"""Depth rasterisation of triangle meshes (SPEC 3.4) in plain PyTorch, CPU and CUDA alike.

The renderer draws the grid mesh of a depth map (one vertex per pixel, two triangles per pixel quad)
seen from another viewpoint. Each triangle then covers only a handful of pixels, so instead of
testing every face against every pixel (what the reference's CUDA rasteriser did, O(pixels x faces))
the fast path visits, per triangle, only the pixels near it:

1. project the vertices (pixel (u, v) has its centre at integer coordinates, cx = (W-1)/2, unless
   a pixel_offset moves every sample by that much: see rasterize_depth);
2. per triangle, the pixels it may cover (pixel_candidates.py): small bounding boxes (nearly every
   triangle of a grid mesh) whole, larger ones row by row between the triangle's edges; exact
   enumerations, no triangle is clipped away however large;
3. edge functions at each (triangle, pixel) candidate decide coverage and give the perspective-correct
   depth (1/z interpolated with screen-space barycentrics);
4. a z-buffer by scatter_reduce('amin') on one int64 key per candidate: the float32 bits of the
   depth (order-preserving for positive floats) in the high 32 bits, the face index in the low 32,
   so the nearest face wins and equal depths go to the lower face index, deterministically;
5. the winning face per pixel is evaluated once more, with autograd, so gradients reach the three
   vertices of that face through the barycentric interpolation (no silhouette gradient, as in the
   reference).

Cost grows with pixels (plus the area of the triangles), not pixels x faces. The brute-force
version below shares steps 3 to 5 bit for bit and is the reference of the tests. Steps 2 to 4 also
exist as one C loop (zbuffer.c, called by native_zbuffer.py), which gives the same
winners bit for bit and is what runs on CPU in float32 where a C compiler is available: in PyTorch
they are some 500 elementwise passes over the candidates, a seventh of a small-width training step.

Coverage rule, shared by both paths: a pixel is inside a triangle when its three edge functions
are all >= 0 with a positive sum, or all <= 0 with a negative sum (both windings: no culling).
Points on an edge count as inside (ties then go to the z-buffer). Each edge function is computed as
the cross product of (a - p) and (b - p), which is exactly antisymmetric in floating point, so two
triangles sharing an edge see exactly opposite values there and the mesh has no cracks. Zero-area
triangles (all three edge functions zero) cover nothing; nothing here divides by zero.

Background pixels have depth +inf and face index -1.

Data layout: per-vertex and per-face attributes are kept attribute-major (rows of x, y, 1/z), so
that every elementwise step runs on contiguous 1-D tensors; on CPU that is several times faster
than working on the columns of [N, 3] tensors.
"""

from __future__ import annotations

import torch

from trainer.render import native_zbuffer
from trainer.render.pixel_candidates import enumerate_candidates, max3, min3

# Faces with a vertex nearer than this (camera frame z) are not drawn. Our depth range never comes
# near it; it only keeps a bad input from dividing by zero.
NEAR = 1e-3
# On CPU the fast path works through the faces in chunks of this many, so that its intermediate
# tensors stay in cache (a 256 px batch otherwise runs at about half the speed per pixel of a 64 px
# one). On GPU all faces go at once.
FACE_CHUNK_CPU = 1 << 17
# Brute force: at most this many (face, pixel) pairs per chunk.
BRUTE_FORCE_CHUNK = 1 << 21

_BACKGROUND_KEY = torch.iinfo(torch.int64).max
_FACE_BITS = 32


def grid_faces(height: int, width: int, device=None) -> torch.Tensor:
    """Faces [2(H-1)(W-1), 3] of the grid mesh, vertex index = row * W + col (SPEC 3.2).

    Each pixel quad gives (TL, BL, TR) and (TR, BL, BR); all first triangles come before all
    second triangles (the reference's order; it matters only for the z-buffer tie-break).
    """
    index = torch.arange(height * width, device=device).view(height, width)
    tl, tr, bl, br = index[:-1, :-1], index[:-1, 1:], index[1:, :-1], index[1:, 1:]
    first = torch.stack([tl, bl, tr], dim=-1).reshape(-1, 3)
    second = torch.stack([tr, bl, br], dim=-1).reshape(-1, 3)
    return torch.cat([first, second])


def rasterize_depth(
    vertices: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, height: int, width: int,
    *, pixel_offset: float = 0.0, zbuffer: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of the nearest triangle at every pixel, visiting only pixels near each triangle.

    vertices [B, N, 3] in the camera frame of the target view, faces [F, 3] (long), K [3, 3].
    Returns depth [B, H, W] (z of the nearest covering triangle, perspective-correct, +inf on the
    background) and face_index [B, H, W] (long, -1 on the background). The depth is differentiable
    with respect to the vertices of the winning triangles. Computes in float64 for float64
    vertices, else in float32 (autocast is switched off inside).

    pixel_offset: output pixel (row r, col c) samples the point (c + offset, r + offset) of K's
    image plane. 0 (the default) is SPEC 3's integer pixel centres; 0.5 is the reference
    rasteriser's convention (SPEC 3.4). It is applied once, to the projected vertices (x - offset,
    y - offset), so the fast path, the brute force and the differentiable winner evaluation still
    share every later operation and agree bit for bit.

    zbuffer: which implementation of steps 2 to 4 runs (all give the same face_index, bit for bit):
    "torch" is the PyTorch fast path; "native" the C loop of zbuffer.c (float32 on CPU only, needs
    a C compiler: native_zbuffer.py); "auto" the C loop where it applies and is available, else
    the PyTorch path.
    """
    return rasterize_depth_planes(vertices.unbind(-1), faces, K, height, width, pixel_offset=pixel_offset,
                                  zbuffer=zbuffer)


def rasterize_depth_planes(
    points: tuple[torch.Tensor, torch.Tensor, torch.Tensor], faces: torch.Tensor, K: torch.Tensor,
    height: int, width: int, *, pixel_offset: float = 0.0, zbuffer: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """rasterize_depth of vertices given as coordinate planes (x, y, z), each [B, N] (geometry.py's planes)."""
    if zbuffer not in ZBUFFERS:
        raise ValueError(f"rasterize_depth: zbuffer must be one of {', '.join(ZBUFFERS)}, got {zbuffer!r}")
    return _rasterize(points, faces, K, height, width, _ZBUFFER_FUNCTIONS[zbuffer], pixel_offset)


def rasterize_depth_brute_force(
    vertices: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, height: int, width: int,
    *, pixel_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rasterize_depth by testing every face against every pixel: slow, obviously complete; for tests."""
    return _rasterize(vertices.unbind(-1), faces, K, height, width, _table_zbuffer(_brute_force_zbuffer),
                      pixel_offset)


def _rasterize(points, faces, K, height, width, zbuffer, pixel_offset=0.0):
    """Shared driver: z-buffer without autograd, then the winners' depth with autograd."""
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in points) else torch.float32
    with torch.autocast(device_type=points[0].device.type, enabled=False):
        points = [p.to(dtype) for p in points]
        faces = faces.to(device=points[0].device, dtype=torch.long)
        batch = points[0].shape[0]
        if batch * faces.shape[0] >= 1 << _FACE_BITS:
            raise ValueError("rasterize_depth: batch x faces must stay below 2**32 (z-buffer key layout)")
        screen = _screen_vertices(points, K.to(dtype), float(pixel_offset))
        with torch.no_grad():
            face_index = zbuffer(screen.detach(), faces, batch, height, width)
        depth = _winner_depth(screen, faces, face_index)
    return depth, face_index


def _table_zbuffer(table_zbuffer):
    """A z-buffer on (screen [3, B*N], faces, batch, height, width) from one on the face table [9, B*F]."""

    def zbuffer(screen, faces, batch, height, width):
        corner_ids = [_batch_ids(faces[:, k], batch, screen.shape[1] // batch) for k in range(3)]
        table = torch.stack(_corner_attributes(screen, corner_ids))
        return table_zbuffer(table, faces.shape[0], height, width)

    return zbuffer


def _auto_zbuffer(screen, faces, batch, height, width):
    if native_zbuffer.supports(screen) and native_zbuffer.available():
        return native_zbuffer.zbuffer(screen, faces, batch, height, width)
    return _torch_zbuffer(screen, faces, batch, height, width)


# ---------------------------------------------------------------------------------------------
# Shared per-(face, pixel) arithmetic. Fast path, brute force and the differentiable winner
# evaluation all use exactly these operations, so they agree bit for bit.


def _screen_vertices(points, K, pixel_offset=0.0):
    """Per vertex x, y (pixel coordinates) and 1/z, as the rows of a [3, B*N] tensor, from planes [B, N].

    x and y are in the frame whose integer points are the samples: the projection minus
    pixel_offset (rasterize_depth). Vertices that cannot be drawn (z <= NEAR, or not finite) get
    x = y = 0 and 1/z = 0: finite values for the forward and backward passes, and 1/z = 0 marks
    their faces as not drawable.
    """
    px, py, pz = (p.reshape(-1) for p in points)
    inv_z = 1.0 / torch.where(pz > NEAR, pz, 1.0)
    # K (p_x, p_y, p_z) per plane: a [B*N, 3] x [3, 3] matmul is one of the slowest CPU kernels.
    # K's entries as 0-dim tensors, not K.tolist(): no host synchronisation on a GPU.
    k = K.unbind(0)
    x = (k[0][0] * px + k[0][1] * py + k[0][2] * pz) * inv_z
    y = (k[1][0] * px + k[1][1] * py + k[1][2] * pz) * inv_z
    if pixel_offset != 0.0:  # (x - 0 would be exact too; this only saves the work)
        x, y = x - pixel_offset, y - pixel_offset
    screen = torch.stack([x, y, inv_z])
    valid = (pz > NEAR) & torch.isfinite(screen[:2]).all(0)
    return torch.where(valid, screen, 0.0)


def _batch_ids(ids, batch, per_image):
    """Flat indices [B * K] into B stacked images of per_image rows, from per-image ids [K] or [B, K]."""
    per_image_ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    offsets = per_image * torch.arange(batch, device=ids.device)
    return (per_image_ids + offsets[:, None]).reshape(-1)


def _corner_attributes(screen, corner_ids):
    """[x0, y0, 1/z0, x1, y1, 1/z1, x2, y2, 1/z2] (each [M]) of triangles with corner ids (3 x [M])."""
    return [screen[a].index_select(0, ids) for ids in corner_ids for a in range(3)]


def _edge_functions(x0, y0, x1, y1, x2, y2, px, py):
    """Edge functions (twice the signed sub-triangle areas) of pixel (px, py) in a triangle.

    w_i = cross(v_j - p, v_k - p) for (i, j, k) cyclic: w_i is proportional to the barycentric
    weight of vertex i. cross(a, b) = a_x b_y - a_y b_x is exactly antisymmetric in floating point.
    """
    ax, ay = x0 - px, y0 - py
    bx, by = x1 - px, y1 - py
    cx, cy = x2 - px, y2 - py
    return bx * cy - by * cx, cx * ay - cy * ax, ax * by - ay * bx


def _covers(w0, w1, w2):
    """Coverage rule (module docstring): same-signed edge functions with a non-zero sum."""
    s = w0 + w1 + w2
    return ((min3(w0, w1, w2) >= 0) & (s > 0)) | ((max3(w0, w1, w2) <= 0) & (s < 0))


def _candidate_depth(w0, w1, w2, iz0, iz1, iz2):
    """Perspective-correct depth z = 1 / sum(b_i / z_i), b_i = w_i / sum(w), valid where covered.

    Elsewhere it may be anything, inf and NaN included: callers mask it with the coverage.
    """
    return (w0 + w1 + w2) / (w0 * iz0 + w1 * iz1 + w2 * iz2)


def _interpolated_depth(w0, w1, w2, iz0, iz1, iz2, covered):
    """_candidate_depth, +inf where not covered, and safe for autograd.

    Uncovered entries divide 1 by 1 instead of a possibly zero denominator, so that no inf or NaN
    reaches the backward pass through torch.where. Covered entries compute exactly the same
    operations as _candidate_depth, so the two agree bit for bit.
    """
    numerator = torch.where(covered, w0 + w1 + w2, 1.0)
    denominator = torch.where(covered, w0 * iz0 + w1 * iz1 + w2 * iz2, 1.0)
    return torch.where(covered, numerator / denominator, float("inf"))


def _zbuffer_key(z, batch_face, covered):
    """int64 key, smaller wins: float32 depth bits (high 32) then batch face index (low 32).

    Positive float32 numbers order like their bit patterns read as integers, so comparing keys
    compares depths first (at float32 resolution, for float64 input too) and face indices second.
    Uncovered candidates get the background key by torch.maximum, branch-free: torch.where on a
    mask this irregular is several times slower on CPU, and this runs on every candidate. (An
    uncovered z may be negative or NaN, so its key may be negative: the maximum handles that too.)
    """
    bits = z.to(torch.float32).view(torch.int32).to(torch.int64)
    key = (bits << _FACE_BITS) | batch_face
    return torch.maximum(key, (~covered).to(torch.int64) * _BACKGROUND_KEY)


def _face_from_key(keys, faces_per_image):
    """Winning face index [B, H*W] from the z-buffer keys [B, H*W], -1 where nothing was drawn."""
    batch_face = keys & ((1 << _FACE_BITS) - 1)
    image = torch.arange(keys.shape[0], device=keys.device)[:, None]
    return torch.where(keys == _BACKGROUND_KEY, -1, batch_face - image * faces_per_image)


def _winner_depth(screen, faces, face_index):
    """Depth [B, H, W] of each pixel's winning face, differentiable wrt that face's vertices."""
    b, h, w = face_index.shape
    n = screen.shape[1] // b
    covered = face_index >= 0
    winner = face_index.clamp_min(0).reshape(-1)
    corner_ids = torch.cat([_batch_ids(faces[:, k].index_select(0, winner).view(b, -1), b, n) for k in range(3)])
    # One gather of all three corners' x, y, 1/z (one index_add in the backward pass, where nine
    # separate gathers cost nine full-size scatters).
    (x0, x1, x2), (y0, y1, y2), (iz0, iz1, iz2) = screen.index_select(1, corner_ids).view(3, 3, b, h, w)
    py, px = _pixel_centres(h, w, screen)
    w0, w1, w2 = _edge_functions(x0, y0, x1, y1, x2, y2, px, py)
    return _interpolated_depth(w0, w1, w2, iz0, iz1, iz2, covered)


def _pixel_centres(height, width, like):
    """Row and column coordinates [H, W] of the pixel centres (integers, SPEC 3 camera)."""
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    return rows[:, None].expand(height, width), cols[None, :].expand(height, width)


# ---------------------------------------------------------------------------------------------
# Fast path. `table` is [9, B*F]: the rows x0, y0, 1/z0, x1, ... of every batch face, whose
# column (batch face index) is image * F + face.


def _fast_zbuffer(table, faces_per_image, height, width):
    """face_index [B, H, W], visiting only the pixels near each triangle (module docstring)."""
    batch = table.shape[1] // faces_per_image
    keys = torch.full((batch * height * width,), _BACKGROUND_KEY, dtype=torch.int64, device=table.device)
    # Offset of each batch face's image in the flat z-buffer.
    pixel_base = torch.arange(batch, device=table.device).repeat_interleave(faces_per_image) * (height * width)

    def draw(tri, row, col):
        _draw_candidates(keys, table, tri, pixel_base.index_select(0, tri) + row * width + col, row, col)

    step = FACE_CHUNK_CPU if table.device.type == "cpu" else table.shape[1]
    for start in range(0, table.shape[1], step):
        enumerate_candidates(table, start, step, height, width, draw)
    return _face_from_key(keys.view(batch, -1), faces_per_image).view(batch, height, width)


def _draw_candidates(keys, table, tri, pixel, row, col):
    """Edge-test (batch face, pixel) candidates and fold them into the flat z-buffer keys."""
    x0, y0, iz0, x1, y1, iz1, x2, y2, iz2 = (attribute.index_select(0, tri) for attribute in table)
    w0, w1, w2 = _edge_functions(x0, y0, x1, y1, x2, y2, col.to(x0.dtype), row.to(x0.dtype))
    z = _candidate_depth(w0, w1, w2, iz0, iz1, iz2)
    keys.scatter_reduce_(0, pixel, _zbuffer_key(z, tri, _covers(w0, w1, w2)), reduce="amin")


# ---------------------------------------------------------------------------------------------
# Brute force: every face against every pixel.


def _brute_force_zbuffer(table, faces_per_image, height, width):
    """face_index [B, H, W] testing all faces at all pixels, in chunks of faces to bound memory."""
    f = faces_per_image
    batch = table.shape[1] // f
    table = table.view(9, batch, f)
    py, px = (c.reshape(1, 1, -1) for c in _pixel_centres(height, width, table))
    keys = torch.full((batch, height * width), _BACKGROUND_KEY, dtype=torch.int64, device=table.device)
    image_base = f * torch.arange(batch, device=table.device)[:, None, None]
    step = max(1, BRUTE_FORCE_CHUNK // (batch * height * width))
    for start in range(0, f, step):
        chunk = table[:, :, start : start + step, None]  # [9, B, Fc, 1] against pixels [1, 1, P]
        x0, y0, iz0, x1, y1, iz1, x2, y2, iz2 = chunk
        w0, w1, w2 = _edge_functions(x0, y0, x1, y1, x2, y2, px, py)
        covered = _covers(w0, w1, w2) & (min3(iz0, iz1, iz2) > 0)
        z = _candidate_depth(w0, w1, w2, iz0, iz1, iz2)
        batch_face = image_base + torch.arange(start, start + chunk.shape[2], device=table.device)[None, :, None]
        keys = torch.minimum(keys, _zbuffer_key(z, batch_face, covered).amin(1))
    return _face_from_key(keys, f).view(batch, height, width)


_torch_zbuffer = _table_zbuffer(_fast_zbuffer)
ZBUFFERS = ("auto", "torch", "native")
_ZBUFFER_FUNCTIONS = {"auto": _auto_zbuffer, "torch": _torch_zbuffer, "native": native_zbuffer.zbuffer}
