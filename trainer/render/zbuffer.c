/* The rasteriser's z-buffer (rasterizer.py, steps 2 to 4) as one C loop, for float32 on CPU.
 *
 * Same result as the PyTorch fast path, bit for bit: the same coverage rule and the same float32
 * operations in the same order (compiled with -ffp-contract=off, so that no multiply-add is fused),
 * and the same int64 key per (face, pixel) candidate: the depth's float32 bits in the high 32 bits,
 * the batch face index in the low 32; the smallest key wins. A triangle whose bounding box (widened
 * by BOX_MARGIN) holds at most BOX_MAX_AREA pixel centres visits all of them; a larger one visits,
 * row by row, the span between its edges' crossings of that row widened by SPAN_MARGIN (long thin
 * triangles would otherwise pay for their whole box). Both are supersets of the pixels the edge test
 * accepts, and a pixel the edge test rejects changes nothing, so the winners are the PyTorch path's.
 *
 * screen: [3, batch * verts_per_image] float32, rows x, y, 1/z (rasterizer._screen_vertices; a
 *         vertex that cannot be drawn has 1/z = 0).
 * faces:  [faces_per_image, 3] int64 vertex indices into one image's vertices.
 * face_index (out): [batch, height, width] int64, the winning face per pixel or -1.
 * keys: scratch of batch * height * width int64 values.
 * Returns 0, or -1 when a face refers to a vertex outside 0 .. verts_per_image - 1.
 */
#include <stdint.h>
#include <math.h> /* INFINITY only: no libm call */
#include <string.h>

#define BOX_MARGIN 0.01f
/* pixel_candidates.BOX_MAX_AREA: larger boxes are walked by scanline spans. */
#define BOX_MAX_AREA 8
/* Half a pixel: far more than the float rounding of a span's ends (about a hundredth of a pixel even
 * for vertices 10^5 pixels off screen), so that no pixel the edge test accepts falls outside its span.
 * The PyTorch path's spans use 1e-3 (pixel_candidates.ENUMERATION_MARGIN): these contain them. */
#define SPAN_MARGIN 0.5f
#define FACE_BITS 32

/* Plain comparisons rather than fminf/fmaxf/floorf/ceilf, which without -ffast-math are library
 * calls: the box only needs to contain the triangle's pixels, NaN never reaches it (screen
 * vertices are finite), and the clamped values are small. */
static inline float min2(float a, float b) { return a < b ? a : b; }
static inline float max2(float a, float b) { return a > b ? a : b; }
static inline float clampf(float v, float lo, float hi) { return min2(max2(v, lo), hi); }
/* floor and ceil of v in [-1, 2^24]: the conversion truncates towards zero. */
static inline int64_t floor_small(float v) {
    const int64_t t = (int64_t)v;
    return t - ((float)t > v);
}
static inline int64_t ceil_small(float v) {
    const int64_t t = (int64_t)v;
    return t + ((float)t < v);
}

/* The x-interval [*left, *right] where the triangle meets row y, from the edges whose y-range reaches
 * the row within SPAN_MARGIN; the parameter along each edge is clamped to [0, 1], so a horizontal edge
 * or a row just beyond an edge's ends gives that edge's end points (pixel_candidates._row_spans). */
static inline void row_span(float y, const float *x, const float *yv, float *left, float *right) {
    float lo = INFINITY, hi = -INFINITY;
    for (int e = 0; e < 3; e++) {
        const float xa = x[e], ya = yv[e], xb = x[(e + 1) % 3], yb = yv[(e + 1) % 3];
        if (!(min2(ya, yb) - SPAN_MARGIN <= y && y <= max2(ya, yb) + SPAN_MARGIN)) continue;
        const float dy = yb - ya;
        const float t = dy == 0 ? 0.0f : clampf((y - ya) / dy, 0.0f, 1.0f);
        const float xr = xa + t * (xb - xa);
        lo = min2(lo, xr);
        hi = max2(hi, xr);
    }
    *left = lo;
    *right = hi;
}

int64_t unsup3d_zbuffer_f32(const float *screen, int64_t batch, int64_t verts_per_image,
                            const int64_t *faces, int64_t faces_per_image, int64_t height,
                            int64_t width, int64_t *keys, int64_t *face_index) {
    const int64_t pixels = height * width;
    const int64_t total = batch * verts_per_image;
    const float *xs = screen, *ys = screen + total, *izs = screen + 2 * total;
    for (int64_t f = 0; f < faces_per_image; f++)
        for (int k = 0; k < 3; k++)
            if (faces[3 * f + k] < 0 || faces[3 * f + k] >= verts_per_image) return -1;
    for (int64_t i = 0; i < batch * pixels; i++) keys[i] = INT64_MAX;

    for (int64_t b = 0; b < batch; b++) {
        int64_t *image_keys = keys + b * pixels;
        const int64_t base = b * verts_per_image;
        for (int64_t f = 0; f < faces_per_image; f++) {
            const int64_t v0 = base + faces[3 * f], v1 = base + faces[3 * f + 1], v2 = base + faces[3 * f + 2];
            const float x0 = xs[v0], y0 = ys[v0], iz0 = izs[v0];
            const float x1 = xs[v1], y1 = ys[v1], iz1 = izs[v1];
            const float x2 = xs[v2], y2 = ys[v2], iz2 = izs[v2];
            if (!(iz0 > 0 && iz1 > 0 && iz2 > 0)) continue; /* not drawable */
            const float lo_y = min2(min2(y0, y1), y2) - BOX_MARGIN, hi_y = max2(max2(y0, y1), y2) + BOX_MARGIN;
            const float lo_x = min2(min2(x0, x1), x2) - BOX_MARGIN, hi_x = max2(max2(x0, x1), x2) + BOX_MARGIN;
            /* Clamp in floating point before converting: far off-screen vertices must not overflow. */
            const int64_t row_lo = ceil_small(clampf(lo_y, 0.0f, (float)height));
            const int64_t row_hi = floor_small(clampf(hi_y, -1.0f, (float)(height - 1)));
            const int64_t col_lo = ceil_small(clampf(lo_x, 0.0f, (float)width));
            const int64_t col_hi = floor_small(clampf(hi_x, -1.0f, (float)(width - 1)));
            const uint64_t batch_face = (uint64_t)(b * faces_per_image + f);
            const int by_spans = (row_hi - row_lo + 1) * (col_hi - col_lo + 1) > BOX_MAX_AREA;
            const float tx[3] = {x0, x1, x2}, ty[3] = {y0, y1, y2};
            for (int64_t row = row_lo; row <= row_hi; row++) {
                const float py = (float)row;
                int64_t first = col_lo, last = col_hi;
                if (by_spans) {
                    float left, right;
                    row_span(py, tx, ty, &left, &right);
                    if (!(left <= right)) continue;
                    /* Clamped like the box, before converting. */
                    const int64_t span_first = ceil_small(clampf(left - SPAN_MARGIN, 0.0f, (float)width));
                    const int64_t span_last = floor_small(clampf(right + SPAN_MARGIN, -1.0f, (float)(width - 1)));
                    first = span_first > col_lo ? span_first : col_lo;
                    last = span_last < col_hi ? span_last : col_hi;
                }
                for (int64_t col = first; col <= last; col++) {
                    const float px = (float)col;
                    /* rasterizer._edge_functions */
                    const float ax = x0 - px, ay = y0 - py;
                    const float bx = x1 - px, by = y1 - py;
                    const float cx = x2 - px, cy = y2 - py;
                    const float w0 = bx * cy - by * cx;
                    const float w1 = cx * ay - cy * ax;
                    const float w2 = ax * by - ay * bx;
                    /* rasterizer._covers: written with plain comparisons, which are false for NaN as
                     * the PyTorch path's min3/max3 comparisons are. */
                    const float s = w0 + w1 + w2;
                    const int covered = (w0 >= 0 && w1 >= 0 && w2 >= 0 && s > 0) ||
                                        (w0 <= 0 && w1 <= 0 && w2 <= 0 && s < 0);
                    if (!covered) continue;
                    /* rasterizer._candidate_depth and _zbuffer_key */
                    const float z = s / (w0 * iz0 + w1 * iz1 + w2 * iz2);
                    int32_t bits;
                    memcpy(&bits, &z, sizeof bits);
                    const int64_t key = (int64_t)(((uint64_t)(int64_t)bits << FACE_BITS) | batch_face);
                    int64_t *slot = image_keys + row * width + col;
                    if (key < *slot) *slot = key;
                }
            }
        }
    }
    /* rasterizer._face_from_key */
    for (int64_t b = 0; b < batch; b++)
        for (int64_t p = 0; p < pixels; p++) {
            const int64_t key = keys[b * pixels + p];
            face_index[b * pixels + p] =
                key == INT64_MAX ? -1 : (int64_t)((uint64_t)key & 0xffffffffu) - b * faces_per_image;
        }
    return 0;
}
