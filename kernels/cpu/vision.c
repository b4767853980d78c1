// The vision path on the CPU: L2 row normalisation, bilinear resize (align_corners=True), the few-shot
// max dot product, the two-class softmax of the anomaly map, axpy/affine, and image -> patch rows.
//
// The resize follows PyTorch's arithmetic step by step (float scale, float source index, floor, clamped
// lambda, width-then-height blend with fused multiply-adds), so it reproduces PyTorch's output bit for bit;
// the softmax subtracts the max as torch.softmax does and differs only by the exp implementation.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kernels/cpu/cpu_ops.h"

#define PAR_IF(n) if ((n) > 16384)

// PyTorch's clamp_min: a NaN norm stays NaN (and poisons the row) instead of being replaced by eps.
static inline float clamp_min_nan(float v, float lo) { return v < lo ? lo : v; }

void cpu_l2_normalize(float *out, const float *x, int64_t rows, int64_t C, float eps) {
#pragma omp parallel for PAR_IF(rows * C)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C;
        double ss = 0;
        for (int64_t i = 0; i < C; i++) ss += (double)xr[i] * xr[i];
        const float d = clamp_min_nan((float)sqrt(ss), eps);
        float *o = out + r * C;
        for (int64_t i = 0; i < C; i++) o[i] = xr[i] / d;  // division, as x / x.norm(): no reciprocal rounding
    }
}

// One axis of the resize: PyTorch's compute_source_index_and_lambda for align_corners=True with
// opmath_t = float. Equal sizes copy (index0 = index1 = i, lambda1 = 0), as PyTorch special-cases them.
static inline void bilinear_axis(int64_t i, int64_t in, int64_t out, float scale, int64_t *i0, int64_t *i1,
                                 float *l0, float *l1) {
    if (in == out) {
        *i0 = *i1 = i;
        *l0 = 1.0f, *l1 = 0.0f;
        return;
    }
    const float src = scale * (float)i;
    int64_t idx = (int64_t)floorf(src);
    if (idx > in - 1) idx = in - 1;
    float lam = src - (float)idx;
    lam = lam < 0.0f ? 0.0f : (lam > 1.0f ? 1.0f : lam);
    *i0 = idx;
    *i1 = idx + (idx < in - 1 ? 1 : 0);
    *l1 = lam;
    *l0 = 1.0f - lam;
}

// area_pixel_compute_scale for align_corners: (float)(in - 1) / (out - 1), 0 for a single output pixel.
static inline float bilinear_scale(int64_t in, int64_t out) {
    return out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f;
}

void cpu_upsample_bilinear(float *out, const float *x, int64_t BC, int64_t h, int64_t w, int64_t H, int64_t W) {
    const float sh = bilinear_scale(h, H), sw = bilinear_scale(w, W);
#pragma omp parallel for PAR_IF(BC * H * W)
    for (int64_t row = 0; row < BC * H; row++) {
        const int64_t c = row / H, oy = row % H;
        int64_t y0, y1;
        float hl0, hl1;
        bilinear_axis(oy, h, H, sh, &y0, &y1, &hl0, &hl1);
        const float *r0 = x + (c * h + y0) * w, *r1 = x + (c * h + y1) * w;
        float *o = out + row * W;
        for (int64_t ox = 0; ox < W; ox++) {
            int64_t x0, x1;
            float wl0, wl1;
            bilinear_axis(ox, w, W, sw, &x0, &x1, &wl0, &wl1);
            // Along the width in each source row, then the two rows by height, each a*b + c*d as one fused
            // multiply-add over a rounded product: what PyTorch's AVX2 CPU kernel and its CUDA kernel compile
            // to, so the result is theirs bit for bit (fmaf is exact in software where the CPU lacks FMA).
            const float t0 = fmaf(r0[x0], wl0, r0[x1] * wl1);
            const float t1 = fmaf(r1[x0], wl0, r1[x1] * wl1);
            o[ox] = fmaf(t0, hl0, t1 * hl1);
        }
    }
}

// torch.max semantics: a NaN anywhere wins and stays.
static inline float max_nan(float m, float v) { return (v > m || isnan(v)) ? v : m; }

// Query and reference blocks bound the scratch to kMaxDotQB x kMaxDotRB floats (8 MiB) whatever Q and R are.
enum { kMaxDotQB = 1024, kMaxDotRB = 2048 };

Status cpu_max_dot(float *out, const float *query, const float *refs, int64_t Q, int64_t R, int64_t D) {
    if (Q == 0) return AGPT_OK;
    const int64_t qb_max = Q < kMaxDotQB ? Q : kMaxDotQB, rb_max = R < kMaxDotRB ? R : kMaxDotRB;
    const size_t bytes = (size_t)(qb_max * rb_max) * sizeof(float);
    float *dots = malloc(bytes);
    if (!dots)
        return AGPT_FAIL(AGPT_ERR_OOM, "op_max_dot: could not allocate %zu bytes of scratch for %lld x %lld dot "
                         "products", bytes, (long long)qb_max, (long long)rb_max);
    for (int64_t q = 0; q < Q; q++) out[q] = -INFINITY;
    for (int64_t q0 = 0; q0 < Q; q0 += qb_max) {
        const int64_t qb = Q - q0 < qb_max ? Q - q0 : qb_max;
        for (int64_t r0 = 0; r0 < R; r0 += rb_max) {
            const int64_t rb = R - r0 < rb_max ? R - r0 : rb_max;
            // dots[qb, rb] = query[q0:q0+qb] @ refs[r0:r0+rb]^T
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)qb, (int)rb, (int)D, 1.0f, query + q0 * D,
                        (int)D, refs + r0 * D, (int)D, 0.0f, dots, (int)rb);
#pragma omp parallel for PAR_IF(qb * rb)
            for (int64_t i = 0; i < qb; i++) {
                float m = out[q0 + i];
                const float *di = dots + i * rb;
                for (int64_t j = 0; j < rb; j++) m = max_nan(m, di[j]);
                out[q0 + i] = m;
            }
        }
    }
    free(dots);
    return AGPT_OK;
}

// exp(l1 - m) / (exp(l0 - m) + exp(l1 - m)), m = max(l0, l1): what torch.softmax(dim=1) gives for class 1.
void cpu_softmax2_class1(float *out, const float *logits, int64_t B, int64_t N) {
#pragma omp parallel for PAR_IF(B * N)
    for (int64_t i = 0; i < B * N; i++) {
        const int64_t b = i / N, n = i % N;
        const float l0 = logits[(b * 2) * N + n], l1 = logits[(b * 2 + 1) * N + n];
        const float m = fmaxf(l0, l1);
        const float e0 = expf(l0 - m), e1 = expf(l1 - m);
        out[i] = e1 / (e0 + e1);
    }
}

void cpu_axpy(float *y, const float *x, int64_t n, float alpha) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

void cpu_affine(float *x, int64_t n, float a, float b) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) x[i] = a * x[i] + b;
}

void cpu_im2patches(float *out, const float *img, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p) {
    const int64_t ph = H / p, pw = W / p, cols = C * p * p;
#pragma omp parallel for PAR_IF(B * C * H * W)
    for (int64_t row = 0; row < B * ph * pw; row++) {
        const int64_t b = row / (ph * pw), py = (row / pw) % ph, px = row % pw;
        float *o = out + row * cols;
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < p; i++)
                memcpy(o + (c * p + i) * p, img + ((b * C + c) * H + py * p + i) * W + px * p,
                       (size_t)p * sizeof(float));
    }
}

// The anomaly map's per-layer step in one pass (op_upsample_softmax2_axpy): for each output pixel the bilinear
// resize of both class planes, the two-class softmax and the accumulation, with exactly the float arithmetic of
// cpu_upsample_bilinear, cpu_softmax2_class1 and cpu_axpy above, so the result equals that sequence bit for bit
// (tests/test_ops_fused.c checks it).
void cpu_upsample_softmax2_axpy(float *out, const float *logits, int64_t B, int64_t h, int64_t w, int64_t H,
                                int64_t W, float alpha) {
    const float sh = bilinear_scale(h, H), sw = bilinear_scale(w, W);
#pragma omp parallel for PAR_IF(B * H * W)
    for (int64_t row = 0; row < B * H; row++) {
        const int64_t b = row / H, oy = row % H;
        int64_t y0, y1;
        float hl0, hl1;
        bilinear_axis(oy, h, H, sh, &y0, &y1, &hl0, &hl1);
        const float *c0 = logits + (b * 2) * h * w, *c1 = logits + (b * 2 + 1) * h * w;
        float *o = out + row * W;
        for (int64_t ox = 0; ox < W; ox++) {
            int64_t x0, x1;
            float wl0, wl1;
            bilinear_axis(ox, w, W, sw, &x0, &x1, &wl0, &wl1);
            float l[2];
            for (int c = 0; c < 2; c++) {
                const float *r0 = (c ? c1 : c0) + y0 * w, *r1 = (c ? c1 : c0) + y1 * w;
                const float t0 = fmaf(r0[x0], wl0, r0[x1] * wl1);
                const float t1 = fmaf(r1[x0], wl0, r1[x1] * wl1);
                l[c] = fmaf(t0, hl0, t1 * hl1);
            }
            const float m = fmaxf(l[0], l[1]);
            const float e0 = expf(l[0] - m), e1 = expf(l[1] - m);
            const float p = e1 / (e0 + e1);
            o[ox] += alpha * p;
        }
    }
}

// ---- backward ------------------------------------------------------------------------------------------------

// dx = dout / d - [n >= eps] <dout, x> x / (d^2 n), n = ||x||, d = max(n, eps): the derivative of x / d, where the
// clamped norm passes its gradient when n >= eps (PyTorch's clamp_min backward). Per row in double; dout is read
// in full before dx is written, so dx may alias dout.
void cpu_l2_normalize_backward(float *dx, const float *dout, const float *x, int64_t rows, int64_t C, float eps) {
#pragma omp parallel for PAR_IF(rows * C)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C, *gr = dout + r * C;
        double ss = 0, dot = 0;
        for (int64_t i = 0; i < C; i++) ss += (double)xr[i] * xr[i], dot += (double)gr[i] * xr[i];
        const double n = sqrt(ss);
        const bool pass = !(n < (double)eps);  // NaN passes, and poisons the row
        const double d = pass ? n : (double)eps, c = pass ? dot / (d * d * n) : 0.0;
        float *o = dx + r * C;
        for (int64_t i = 0; i < C; i++) o[i] = (float)((double)gr[i] / d - c * xr[i]);
    }
}

// The transpose of cpu_upsample_bilinear on P planes dout [P,H,W] -> dx plane p at dx + p * dx_stride ([h,w]):
// every output pixel's four weights (the forward's float lambdas) sent back to its source pixels, summed in double.
// First along the width (each output row into tmp [P,H,w], rows independent), then a gather along the height (each
// source row sums the output rows that read it, in row order), so nothing depends on the thread count.
static Status bilinear_transpose(float *dx, int64_t dx_stride, const float *dout, int64_t P, int64_t h, int64_t w,
                                 int64_t H, int64_t W, const char *op) {
    const float sh = bilinear_scale(h, H), sw = bilinear_scale(w, W);
    double *tmp = malloc((size_t)(P * H * w + 1) * sizeof(double));
    int64_t *ry = malloc((size_t)(H * 2 + 1) * sizeof(int64_t));
    double *ly = malloc((size_t)(H * 2 + 1) * sizeof(double));
    if (!tmp || !ry || !ly) {
        free(tmp), free(ry), free(ly);
        return AGPT_FAIL(AGPT_ERR_OOM, "%s: could not allocate %zu bytes of scratch", op,
                         (size_t)(P * H * w) * sizeof(double));
    }
    for (int64_t oy = 0; oy < H; oy++) {
        float l0, l1;
        bilinear_axis(oy, h, H, sh, &ry[2 * oy], &ry[2 * oy + 1], &l0, &l1);
        ly[2 * oy] = l0, ly[2 * oy + 1] = l1;
    }
#pragma omp parallel for PAR_IF(P * H * W)
    for (int64_t row = 0; row < P * H; row++) {
        const float *g = dout + row * W;
        double *t = tmp + row * w;
        for (int64_t j = 0; j < w; j++) t[j] = 0.0;
        for (int64_t ox = 0; ox < W; ox++) {
            int64_t x0, x1;
            float wl0, wl1;
            bilinear_axis(ox, w, W, sw, &x0, &x1, &wl0, &wl1);
            t[x0] += (double)g[ox] * wl0;
            t[x1] += (double)g[ox] * wl1;
        }
    }
#pragma omp parallel for PAR_IF(P * h * H * w)
    for (int64_t row = 0; row < P * h; row++) {
        const int64_t p = row / h, y = row % h;
        float *o = dx + p * dx_stride + y * w;
        for (int64_t j = 0; j < w; j++) {
            double s = 0;
            for (int64_t oy = 0; oy < H; oy++) {
                const double *t = tmp + (p * H + oy) * w;
                if (ry[2 * oy] == y) s += t[j] * ly[2 * oy];
                if (ry[2 * oy + 1] == y) s += t[j] * ly[2 * oy + 1];
            }
            o[j] = (float)s;
        }
    }
    free(tmp), free(ry), free(ly);
    return AGPT_OK;
}

Status cpu_upsample_bilinear_backward(float *dx, const float *dout, int64_t BC, int64_t h, int64_t w, int64_t H,
                                      int64_t W) {
    return bilinear_transpose(dx, h * w, dout, BC, h, w, H, W, "op_upsample_bilinear_backward");
}

// p1 recomputed per output pixel with cpu_upsample_softmax2_axpy's arithmetic; du1 = dp1 p1 (1 - p1) (the
// derivative of the two-class softmax's class 1 in its own logit) and du0 = -du1, so the class-0 plane of dlogits
// is exactly the negated transpose of the class-1 plane.
Status cpu_upsample_softmax2_backward(float *dlogits, const float *dp1, const float *logits, int64_t B, int64_t h,
                                      int64_t w, int64_t H, int64_t W) {
    float *du1 = malloc((size_t)(B * H * W + 1) * sizeof(float));
    if (!du1)
        return AGPT_FAIL(AGPT_ERR_OOM, "op_upsample_softmax2_backward: could not allocate %zu bytes of scratch",
                         (size_t)(B * H * W) * sizeof(float));
    const float sh = bilinear_scale(h, H), sw = bilinear_scale(w, W);
#pragma omp parallel for PAR_IF(B * H * W)
    for (int64_t row = 0; row < B * H; row++) {
        const int64_t b = row / H, oy = row % H;
        int64_t y0, y1;
        float hl0, hl1;
        bilinear_axis(oy, h, H, sh, &y0, &y1, &hl0, &hl1);
        const float *c0 = logits + (b * 2) * h * w, *c1 = logits + (b * 2 + 1) * h * w;
        for (int64_t ox = 0; ox < W; ox++) {
            int64_t x0, x1;
            float wl0, wl1;
            bilinear_axis(ox, w, W, sw, &x0, &x1, &wl0, &wl1);
            float l[2];
            for (int c = 0; c < 2; c++) {
                const float *r0 = (c ? c1 : c0) + y0 * w, *r1 = (c ? c1 : c0) + y1 * w;
                const float t0 = fmaf(r0[x0], wl0, r0[x1] * wl1);
                const float t1 = fmaf(r1[x0], wl0, r1[x1] * wl1);
                l[c] = fmaf(t0, hl0, t1 * hl1);
            }
            const float m = fmaxf(l[0], l[1]);
            const float e0 = expf(l[0] - m), e1 = expf(l[1] - m);
            const double s = (double)e0 + e1;  // p (1 - p) = e0 e1 / s^2: no cancellation where p is near 1
            du1[row * W + ox] = (float)((double)dp1[row * W + ox] * ((double)e0 * e1 / (s * s)));
        }
    }
    Status s = bilinear_transpose(dlogits + h * w, 2 * h * w, du1, B, h, w, H, W, "op_upsample_softmax2_backward");
    free(du1);
    if (s != AGPT_OK) return s;
    for (int64_t b = 0; b < B; b++) {
        float *d0 = dlogits + (b * 2) * h * w;
        const float *d1 = d0 + h * w;
        for (int64_t i = 0; i < h * w; i++) d0[i] = -d1[i];
    }
    return AGPT_OK;
}
