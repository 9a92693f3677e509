"""Which pixels each triangle may cover: the candidate (triangle, pixel) pairs of the rasteriser's
fast path (rasterizer.py, step 2).

Per triangle, its bounding box in pixel centres. Small boxes (nearly every triangle of a grid mesh)
are enumerated whole; larger ones row by row, only between the triangle's left and right edges on
each row, so a long thin triangle costs its rows plus its area, not its box. Both are exact
enumerations (repeat_interleave over counts): no triangle is clipped away however large. A
candidate is only a pixel near the triangle; the rasteriser's edge test decides coverage.

`table` is [9, B*F]: the rows x0, y0, 1/z0, x1, ... of every batch face (rasterizer.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

# Candidate enumeration is widened by this many pixels on every side, so that rounding in the
# bounding box or span arithmetic never loses a pixel the edge test would accept. Extra candidates
# are harmless: the edge test rejects them.
ENUMERATION_MARGIN = 1e-3
# Triangles whose bounding box holds at most this many pixel centres are enumerated by box (cheap
# per candidate); larger ones by scanline spans (more work per row, but long thin triangles do not
# pay for their whole box).
BOX_MAX_AREA = 8
# At most this many (triangle, pixel) candidates are held in memory at once (roughly 200 bytes each
# at the peak); more are processed in chunks. Folded, noisy meshes seen from steep angles can have
# many times more candidates than pixels.
CANDIDATE_CHUNK = 1 << 20


def enumerate_candidates(table, start: int, count: int, height: int, width: int,
                         draw: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
    """Call draw(batch_face, row, col) on the candidate pixels of faces start .. start + count - 1."""
    box = _pixel_boxes(table[:, start : start + count], height, width)
    area = box.rows * box.cols
    small = area <= BOX_MAX_AREA
    _enumerate_boxes(box, area * small, start, draw)
    _enumerate_scanlines(table, box, box.rows * ~small, start, draw)


def min3(a, b, c):
    return torch.minimum(torch.minimum(a, b), c)


def max3(a, b, c):
    return torch.maximum(torch.maximum(a, b), c)


class _PixelBoxes(NamedTuple):
    """Per triangle, the pixel rows and columns its screen bounding box holds (clipped to the image)."""

    row_lo: torch.Tensor
    col_lo: torch.Tensor
    col_hi: torch.Tensor
    rows: torch.Tensor  # 0 for triangles that draw nothing
    cols: torch.Tensor


def _pixel_boxes(table, height, width):
    """Bounding boxes in pixel-centre units, widened by the margin, of every triangle [B*F]."""
    x0, y0, iz0, x1, y1, iz1, x2, y2, iz2 = table
    m = ENUMERATION_MARGIN
    # Clamp in floating point first: vertices far off screen must not overflow the integer cast.
    row_lo = torch.ceil(min3(y0, y1, y2) - m).clamp(0, height).long()
    row_hi = torch.floor(max3(y0, y1, y2) + m).clamp(-1, height - 1).long()
    col_lo = torch.ceil(min3(x0, x1, x2) - m).clamp(0, width).long()
    col_hi = torch.floor(max3(x0, x1, x2) + m).clamp(-1, width - 1).long()
    cols = (col_hi - col_lo + 1).clamp_min(0)
    # A vertex with 1/z = 0 could not be projected (_screen_vertices): its faces draw nothing.
    drawable = (min3(iz0, iz1, iz2) > 0) & (cols > 0)
    rows = (row_hi - row_lo + 1).clamp_min(0) * drawable
    return _PixelBoxes(row_lo, col_lo, col_hi, rows, cols)


def _enumerate_boxes(box, counts, first_face, draw):
    """Draw every pixel of the boxes with counts > 0 (counts = box area); box i is face first_face + i."""
    for start, end in _chunks(counts, CANDIDATE_CHUNK):
        run = torch.repeat_interleave(counts[start:end])
        tri = run + start
        k = _position_in_run(counts[start:end], run)
        cols = box.cols.index_select(0, tri)
        # k // cols in floating point (int64 division is slow on CPU): both are small integers, so
        # a quotient that is not an integer is never rounded onto one.
        row_in_box = torch.floor(k.to(torch.float32) / cols.to(torch.float32)).long()
        row = box.row_lo.index_select(0, tri) + row_in_box
        col = box.col_lo.index_select(0, tri) + (k - row_in_box * cols)
        draw(tri + first_face, row, col)


def _enumerate_scanlines(table, box, row_counts, first_face, draw):
    """Draw, for the boxes with row_counts > 0, only the pixels between the triangle's edges on each row.

    Box i is face first_face + i. A long thin triangle then costs its rows plus its area, not the
    area of its bounding box.
    """
    for start, end in _chunks(row_counts, CANDIDATE_CHUNK):
        counts = row_counts[start:end]
        run = torch.repeat_interleave(counts)
        local = run + start
        tri = local + first_face
        row = box.row_lo.index_select(0, local) + _position_in_run(counts, run)
        xs = torch.stack([table[a].index_select(0, tri) for a in (0, 3, 6)])
        ys = torch.stack([table[a].index_select(0, tri) for a in (1, 4, 7)])
        col_lo, col_hi = box.col_lo.index_select(0, local), box.col_hi.index_select(0, local)
        span_first, span_counts = _row_spans(xs, ys, row, col_lo, col_hi)
        for seg_start, seg_end in _chunks(span_counts, CANDIDATE_CHUNK):
            seg_counts = span_counts[seg_start:seg_end]
            seg_run = torch.repeat_interleave(seg_counts)
            seg = seg_run + seg_start
            col = span_first.index_select(0, seg) + _position_in_run(seg_counts, seg_run)
            draw(tri.index_select(0, seg), row.index_select(0, seg), col)


def _row_spans(xa, ya, row, col_lo, col_hi):
    """First column and number of columns of each (triangle, row) span, clipped to the box.

    xa, ya [3, R] are the triangle's vertices for each (triangle, row). On row y the triangle
    covers the x-interval between its edges' intersections with that row. Only edges whose y-range
    reaches the row (with the margin) take part; t is clamped to [0, 1], so a horizontal edge or a
    row just outside the y-range gives the edge's end points.
    """
    # Edges (0, 1), (1, 2), (2, 0): from (xa, ya) to (xb, yb).
    xb, yb = xa.roll(-1, dims=0), ya.roll(-1, dims=0)
    y = row.to(xa.dtype)
    m = ENUMERATION_MARGIN
    reaches = (torch.minimum(ya, yb) - m <= y) & (y <= torch.maximum(ya, yb) + m)
    dy = yb - ya
    flat = dy == 0
    t = torch.where(flat, 0.0, ((y - ya) / torch.where(flat, 1.0, dy)).clamp(0, 1))
    x_at_row = xa + t * (xb - xa)
    left = torch.where(reaches, x_at_row, float("inf")).amin(0)
    right = torch.where(reaches, x_at_row, float("-inf")).amax(0)
    # Every visited row is reached by at least one edge, so left/right are finite; clamp anyway.
    first = torch.maximum(torch.ceil(left - m).clamp(-1, 1 << 30).long(), col_lo)
    last = torch.minimum(torch.floor(right + m).clamp(-1, 1 << 30).long(), col_hi)
    return first, (last - first + 1).clamp_min(0)


def _position_in_run(counts, run):
    """For run = repeat_interleave(counts) (the run of each element): the position within its run."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(run.numel(), device=run.device) - starts.index_select(0, run)


def _chunks(counts, budget):
    """Consecutive index ranges [start, end) over counts whose sums stay within budget.

    A single entry larger than the budget gets a range of its own. One range in the usual case,
    at the cost of one host synchronisation for the total.
    """
    n = counts.numel()
    total = int(counts.sum())
    if total <= budget:
        return [(0, n)] if total > 0 else []
    ends = torch.cumsum(counts, 0)
    ranges, start = [], 0
    while start < n:
        already = int(ends[start - 1]) if start > 0 else 0
        end = int(torch.searchsorted(ends, torch.tensor(already + budget, device=ends.device), right=True))
        end = max(end, start + 1)
        ranges.append((start, end))
        start = end
    return ranges
