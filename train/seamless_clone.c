#include "train/seamless_clone.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- Poisson blend ---------------------------------------------------------------------------------------

// DST-I matrix of order n: S[k][j] = sin(pi (k+1)(j+1) / (n+1)); S * S = (n+1)/2 * I.
static double *dst_matrix(int n) {
    double *s = malloc((size_t)n * n * sizeof(double));
    if (!s) return NULL;
    for (int k = 0; k < n; k++)
        for (int j = 0; j < n; j++) s[(size_t)k * n + j] = sin(M_PI * (double)(k + 1) * (j + 1) / (n + 1));
    return s;
}

// out [n][m] = A [n][n] * X [n][m] * B [m][m], through tmp [n][m].
static void sandwich(const double *a, const double *x, const double *b, int n, int m, double *tmp, double *out) {
    memset(tmp, 0, (size_t)n * m * sizeof(double));
    for (int i = 0; i < n; i++)
        for (int k = 0; k < n; k++) {
            double aik = a[(size_t)i * n + k];
            const double *xr = x + (size_t)k * m;
            double *tr = tmp + (size_t)i * m;
            for (int j = 0; j < m; j++) tr[j] += aik * xr[j];
        }
    memset(out, 0, (size_t)n * m * sizeof(double));
    for (int i = 0; i < n; i++)
        for (int k = 0; k < m; k++) {
            double tik = tmp[(size_t)i * m + k];
            const double *br = b + (size_t)k * m;
            double *orow = out + (size_t)i * m;
            for (int j = 0; j < m; j++) orow[j] += tik * br[j];
        }
}

Status seamless_clone(const uint8_t *src, int sh, int sw, const uint8_t *dst, int dh, int dw, const uint8_t *mask,
                      int cx, int cy, uint8_t *out) {
    AGPT_CHECK_ARG(src && dst && mask && out && sh > 0 && sw > 0 && dh > 0 && dw > 0,
                   "seamless_clone: empty image or NULL buffer (src %dx%d, dst %dx%d)", sw, sh, dw, dh);
    if (out != dst) memcpy(out, dst, (size_t)dh * dw * 3);
    // 1. Bounding box of the mask without its outer ring.
    int y0 = INT_MAX, y1 = -1, x0 = INT_MAX, x1 = -1;
    for (int y = 1; y < sh - 1; y++)
        for (int x = 1; x < sw - 1; x++)
            if (mask[(size_t)y * sw + x]) {
                if (y < y0) y0 = y;
                if (y > y1) y1 = y;
                if (x < x0) x0 = x;
                if (x > x1) x1 = x;
            }
    if (y1 < 0) return AGPT_OK;
    const int H = y1 - y0 + 1, W = x1 - x0 + 1;
    const int dy0 = cy - H / 2, dx0 = cx - W / 2;
    AGPT_CHECK_ARG(dy0 >= 0 && dx0 >= 0 && dy0 + H <= dh && dx0 + W <= dw,
                   "seamless_clone: the %dx%d region centred at (%d, %d) leaves the %dx%d destination", W, H, cx, cy,
                   dw, dh);
    if (H < 3 || W < 3) {
        // No interior: OpenCV copies the ring back unchanged.
        return AGPT_OK;
    }
    const int n = H - 2, m = W - 2;  // interior rows and columns
    size_t hw = (size_t)H * W, nm = (size_t)n * m;
    double *sn = dst_matrix(n), *sm = dst_matrix(m);
    double *gx = malloc(hw * sizeof(double)), *gy = malloc(hw * sizeof(double));
    double *rhs = malloc(nm * sizeof(double)), *tmp = malloc(nm * sizeof(double)), *spec = malloc(nm * sizeof(double));
    uint8_t *eroded = malloc(hw);
    if (!sn || !sm || !gx || !gy || !rhs || !tmp || !spec || !eroded) {
        free(sn), free(sm), free(gx), free(gy), free(rhs), free(tmp), free(spec), free(eroded);
        return AGPT_FAIL(AGPT_ERR_OOM, "seamless_clone: no memory for a %dx%d region", W, H);
    }
    // 2. Erosion by a 7x7 square; window pixels outside the mask image do not count.
    for (int i = 0; i < H; i++)
        for (int j = 0; j < W; j++) {
            uint8_t v = 1;
            for (int a = -3; a <= 3 && v; a++)
                for (int b = -3; b <= 3 && v; b++) {
                    int y = y0 + i + a, x = x0 + j + b;
                    if (y < 0 || y >= sh || x < 0 || x >= sw) continue;
                    // the ring was zeroed in step 1, and the bounding box holds all other nonzero pixels
                    int inside = y >= 1 && y < sh - 1 && x >= 1 && x < sw - 1;
                    if (!inside || !mask[(size_t)y * sw + x]) v = 0;
                }
            eroded[(size_t)i * W + j] = v;
        }
    // Eigenvalues of the 5-point Laplacian in the DST basis.
    double *lam_x = malloc((size_t)m * sizeof(double)), *lam_y = malloc((size_t)n * sizeof(double));
    if (!lam_x || !lam_y) {
        free(sn), free(sm), free(gx), free(gy), free(rhs), free(tmp), free(spec), free(eroded), free(lam_x),
            free(lam_y);
        return AGPT_FAIL(AGPT_ERR_OOM, "seamless_clone: no memory");
    }
    for (int l = 0; l < m; l++) lam_x[l] = 2.0 * cos(M_PI * (l + 1) / (double)(m + 1));
    for (int k = 0; k < n; k++) lam_y[k] = 2.0 * cos(M_PI * (k + 1) / (double)(n + 1));
    const double scale = 2.0 / (n + 1) * 2.0 / (m + 1);

    for (int c = 0; c < 3; c++) {
// The destination region and the masked source region, as doubles.
#define D(i, j) ((double)dst[((size_t)(dy0 + (i)) * dw + dx0 + (j)) * 3 + c])
#define S(i, j) (mask[(size_t)(y0 + (i)) * sw + x0 + (j)] ? (double)src[((size_t)(y0 + (i)) * sw + x0 + (j)) * 3 + c] : 0.0)
        // 3. Guidance field; only gx at columns 0..W-2 and gy at rows 0..H-2 reach the interior's divergence.
        for (int i = 0; i < H; i++)
            for (int j = 0; j < W; j++) {
                double w = eroded[(size_t)i * W + j];
                double dgx = j + 1 < W ? D(i, j + 1) - D(i, j) : 0, sgx = j + 1 < W ? S(i, j + 1) - S(i, j) : 0;
                double dgy = i + 1 < H ? D(i + 1, j) - D(i, j) : 0, sgy = i + 1 < H ? S(i + 1, j) - S(i, j) : 0;
                gx[(size_t)i * W + j] = w * sgx + (1 - w) * dgx;
                gy[(size_t)i * W + j] = w * sgy + (1 - w) * dgy;
            }
        // 4. Right-hand side: div G minus the known ring neighbours.
        for (int i = 1; i <= n; i++)
            for (int j = 1; j <= m; j++) {
                double b = gx[(size_t)i * W + j] - gx[(size_t)i * W + j - 1] + gy[(size_t)i * W + j] -
                           gy[(size_t)(i - 1) * W + j];
                if (i == 1) b -= D(0, j);
                if (i == n) b -= D(H - 1, j);
                if (j == 1) b -= D(i, 0);
                if (j == m) b -= D(i, W - 1);
                rhs[(size_t)(i - 1) * m + (j - 1)] = b;
            }
        sandwich(sn, rhs, sm, n, m, tmp, spec);
        for (int k = 0; k < n; k++)
            for (int l = 0; l < m; l++) spec[(size_t)k * m + l] /= lam_x[l] + lam_y[k] - 4.0;
        sandwich(sn, spec, sm, n, m, tmp, rhs);
        // 5. Truncate into the output's interior; the ring keeps dst.
        for (int i = 1; i <= n; i++)
            for (int j = 1; j <= m; j++) {
                // Truncation is discontinuous at integers, where the exact solution often lies (wherever the
                // eroded mask is empty it is dst itself): 1e-7 absorbs our double rounding there. OpenCV's
                // float32 noise sends some of those values to dst - 1 instead; that we do not imitate.
                double u = rhs[(size_t)(i - 1) * m + (j - 1)] * scale + 1e-7;
                uint8_t v = u < 0 ? 0 : u > 255 ? 255 : (uint8_t)u;
                out[((size_t)(dy0 + i) * dw + dx0 + j) * 3 + c] = v;
            }
#undef D
#undef S
    }
    free(sn), free(sm), free(gx), free(gy), free(rhs), free(tmp), free(spec), free(eroded), free(lam_x), free(lam_y);
    return AGPT_OK;
}

// ---- OpenCV's bilinear resize of 8-bit images --------------------------------------------------------------

// Per output index: the first source index and the two 11-bit weights. OpenCV clamps the horizontal weights at
// the edges (fx = 0) but keeps the vertical ones and clamps only the row indices.
static void linear_coefs(int ssize, int dsize, int clamp_weight, int *ofs, int *w0, int *w1) {
    double scale = 1.0 / ((double)dsize / ssize);
    for (int d = 0; d < dsize; d++) {
        float f = (float)((d + 0.5) * scale - 0.5);
        int s = (int)floorf(f);
        f -= (float)s;
        if (clamp_weight && s < 0) f = 0, s = 0;
        if (clamp_weight && s >= ssize - 1) f = 0, s = ssize - 1;
        ofs[d] = s;
        w0[d] = (int)lrintf((1.0f - f) * 2048.0f);
        w1[d] = (int)lrintf(f * 2048.0f);
    }
}

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

Status resize_linear(const uint8_t *src, int sh, int sw, int cn, uint8_t *dst, int dh, int dw) {
    AGPT_CHECK_ARG(src && dst && sh > 0 && sw > 0 && dh > 0 && dw > 0 && cn >= 1 && cn <= 4,
                   "resize_linear: bad sizes %dx%dx%d -> %dx%d", sw, sh, cn, dw, dh);
    int *xo = malloc((size_t)dw * 3 * sizeof(int)), *yo = malloc((size_t)dh * 3 * sizeof(int));
    int32_t *rows = malloc((size_t)sh * dw * cn * sizeof(int32_t));
    if (!xo || !yo || !rows) {
        free(xo), free(yo), free(rows);
        return AGPT_FAIL(AGPT_ERR_OOM, "resize_linear: no memory for %dx%d", dw, dh);
    }
    linear_coefs(sw, dw, 1, xo, xo + dw, xo + 2 * dw);
    linear_coefs(sh, dh, 0, yo, yo + dh, yo + 2 * dh);
    // Horizontal pass, exact in int: S[sx] * a0 + S[sx + 1] * a1.
    for (int y = 0; y < sh; y++)
        for (int x = 0; x < dw; x++) {
            int s0 = xo[x], s1 = clampi(s0 + 1, 0, sw - 1);
            for (int c = 0; c < cn; c++)
                rows[((size_t)y * dw + x) * cn + c] = src[((size_t)y * sw + s0) * cn + c] * xo[dw + x] +
                                                      src[((size_t)y * sw + s1) * cn + c] * xo[2 * dw + x];
        }
    // Vertical pass with OpenCV's 16-bit high-multiply rounding.
    for (int y = 0; y < dh; y++) {
        const int32_t *r0 = rows + (size_t)clampi(yo[y], 0, sh - 1) * dw * cn;
        const int32_t *r1 = rows + (size_t)clampi(yo[y] + 1, 0, sh - 1) * dw * cn;
        int b0 = yo[dh + y], b1 = yo[2 * dh + y];
        for (int i = 0; i < dw * cn; i++) {
            int v = ((((r0[i] >> 4) * b0) >> 16) + (((r1[i] >> 4) * b1) >> 16) + 2) >> 2;
            dst[(size_t)y * dw * cn + i] = (uint8_t)clampi(v, 0, 255);
        }
    }
    free(xo), free(yo), free(rows);
    return AGPT_OK;
}

// ---- median of a binary image ------------------------------------------------------------------------------

Status median_binary(const uint8_t *src, int h, int w, int k, uint8_t *dst) {
    AGPT_CHECK_ARG(src && dst && h > 0 && w > 0 && k >= 1 && k % 2 == 1, "median_binary: bad size %dx%d or k %d", w,
                   h, k);
    int r = k / 2, half = k * k / 2;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            int ones = 0;
            for (int a = -r; a <= r; a++) {
                const uint8_t *row = src + (size_t)clampi(y + a, 0, h - 1) * w;
                for (int b = -r; b <= r; b++) ones += row[clampi(x + b, 0, w - 1)] != 0;
            }
            dst[(size_t)y * w + x] = ones > half;
        }
    return AGPT_OK;
}
