// The prompt learner's image path on the CPU: 2-D convolution (stride 1, zero padding), ReLU, 2x2 max pooling.
//
// The convolution is im2col + one OpenBLAS SGEMM per image and chunk of output rows:
//   out_b[Cout, rows*Wo] = w[Cout, Cin*k*k] @ col[Cin*k*k, rows*Wo] + bias
// where col holds, for each output pixel, the k x k input window of every input channel (zero outside the
// image) in (ci, ki, kj) order: the order a PyTorch weight [Cout,Cin,k,k] flattens in. The column buffer is
// bounded (kConvColFloats) whatever the image size; a chunk is at least one output row.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kernels/cpu/cpu_ops.h"

#define PAR_IF(n) if ((n) > 16384)

enum { kConvColFloats = 4 << 20 };  // 16 MiB of column scratch at most (unless one output row needs more)

// col[kk, (oy - oy0) * Wo + ox] = x[ci, oy + ki - pad, ox + kj - pad], or 0 in the padding, for the nr output
// rows from oy0 of one image xb [Cin,H,W]; kk = (ci, ki, kj). One task per (kk, output row): the first layer has
// K = 9 but 224 rows.
static void im2col_rows(float *col, const float *xb, int64_t Cin, int64_t H, int64_t W, int64_t k, int64_t pad,
                        int64_t oy0, int64_t nr, int64_t Wo) {
    const int64_t K = Cin * k * k, n = nr * Wo;
#pragma omp parallel for PAR_IF(K * n)
    for (int64_t t = 0; t < K * nr; t++) {
        const int64_t kk = t / nr, r = t % nr;
        const int64_t ci = kk / (k * k), ki = (kk / k) % k, kj = kk % k;
        const int64_t iy = oy0 + r + ki - pad;
        float *cr = col + kk * n + r * Wo;
        if (iy < 0 || iy >= H) {
            memset(cr, 0, (size_t)Wo * sizeof(float));
            continue;
        }
        const float *xr = xb + (ci * H + iy) * W;
        for (int64_t ox = 0; ox < Wo; ox++) {
            const int64_t ix = ox + kj - pad;
            cr[ox] = (ix >= 0 && ix < W) ? xr[ix] : 0.0f;
        }
    }
}

Status cpu_conv2d(float *out, const float *x, const float *w, const float *bias, int64_t B, int64_t Cin, int64_t H,
                  int64_t W, int64_t Cout, int64_t k, int64_t pad) {
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1, K = Cin * k * k, N = Ho * Wo;
    if (B == 0 || Cout == 0 || N <= 0) return AGPT_OK;
    int64_t rows = kConvColFloats / (K * Wo);
    if (rows < 1) rows = 1;
    if (rows > Ho) rows = Ho;
    const size_t bytes = (size_t)(K * rows * Wo) * sizeof(float);
    float *col = malloc(bytes);
    if (!col)
        return AGPT_FAIL(AGPT_ERR_OOM, "op_conv2d: could not allocate %zu bytes of im2col scratch (%lld x %lld)",
                         bytes, (long long)K, (long long)(rows * Wo));
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * Cin * H * W;
        float *ob = out + b * Cout * N;
        for (int64_t oy0 = 0; oy0 < Ho; oy0 += rows) {
            const int64_t nr = Ho - oy0 < rows ? Ho - oy0 : rows, n = nr * Wo;
            im2col_rows(col, xb, Cin, H, W, k, pad, oy0, nr, Wo);
            float *o = ob + oy0 * Wo;  // [Cout, n] inside [Cout, N]: leading dimension N
            if (bias) {
                for (int64_t co = 0; co < Cout; co++)
                    for (int64_t j = 0; j < n; j++) o[co * N + j] = bias[co];
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)Cout, (int)n, (int)K, 1.0f, w, (int)K, col,
                        (int)n, bias ? 1.0f : 0.0f, o, (int)N);
        }
    }
    free(col);
    return AGPT_OK;
}

// PyTorch's relu keeps NaN (x < 0 is false for NaN).
void cpu_relu(float *out, const float *x, int64_t n) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) out[i] = x[i] < 0.0f ? 0.0f : x[i];
}

// max_pool2d semantics: a NaN in the window wins.
static inline float max_nan(float m, float v) { return (v > m || isnan(v)) ? v : m; }

void cpu_maxpool2x2(float *out, const float *x, int64_t BC, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for PAR_IF(BC * Ho * Wo * 4)
    for (int64_t row = 0; row < BC * Ho; row++) {
        const int64_t c = row / Ho, oy = row % Ho;
        const float *r0 = x + (c * H + 2 * oy) * W, *r1 = r0 + W;
        float *o = out + row * Wo;
        for (int64_t ox = 0; ox < Wo; ox++) {
            float m = r0[2 * ox];
            m = max_nan(m, r0[2 * ox + 1]);
            m = max_nan(m, r1[2 * ox]);
            m = max_nan(m, r1[2 * ox + 1]);
            o[ox] = m;
        }
    }
}

// ---- backward -----------------------------------------------------------------------------------------------
// Per image and chunk of output rows (n = nr * Wo pixels), with col the chunk's im2col of x as in the forward:
//   dw[Cout, K]   += dout_chunk[Cout, n] @ col[K, n]^T
//   dcol[K, n]     = w[Cout, K]^T @ dout_chunk[Cout, n], then col2im: dx[ci, iy, ix] += every dcol entry that
//                    read x[ci, iy, ix] in the forward, gathered per input row (no scatter races, fixed order)
//   dbias[co]     += sum of dout[., co, ., .] in double
// dw's sum runs over B * Ho * Wo pixels. Where the f32 [Cout, K] partials of a chunk fit in kConvDwDouble floats
// (every layer but the last, whose sum is only B * 9 pixels), the chunks are at most kConvDwPixels pixels and their
// partials are summed in double, rounded once into dw; otherwise the GEMMs accumulate into dw directly.
// OpenBLAS splits a GEMM over its M and N dimensions, never over the reduction, so the result does not depend on
// the thread count.
enum { kConvDwDouble = 8 << 20, kConvDwPixels = 4096 };

// dx rows [iy_lo, iy_hi] of every input channel += the col2im of dcol [K, nr*Wo] (output rows oy0 .. oy0+nr-1).
static void col2im_rows_add(float *dxb, const float *dcol, int64_t Cin, int64_t H, int64_t W, int64_t k,
                            int64_t pad, int64_t oy0, int64_t nr, int64_t Wo) {
    const int64_t n = nr * Wo;
    int64_t iy_lo = oy0 - pad, iy_hi = oy0 + nr - 1 + k - 1 - pad;
    if (iy_lo < 0) iy_lo = 0;
    if (iy_hi > H - 1) iy_hi = H - 1;
    if (iy_hi < iy_lo) return;
    const int64_t ny = iy_hi - iy_lo + 1;
#pragma omp parallel for PAR_IF(Cin * ny * W * k * k)
    for (int64_t t = 0; t < Cin * ny; t++) {
        const int64_t ci = t / ny, iy = iy_lo + t % ny;
        float *dr = dxb + (ci * H + iy) * W;
        for (int64_t ix = 0; ix < W; ix++) {
            float s = 0.0f;
            for (int64_t ki = 0; ki < k; ki++) {
                const int64_t r = iy - ki + pad - oy0;  // the chunk's output row that read row iy with tap ki
                if (r < 0 || r >= nr) continue;
                const float *dc = dcol + ((ci * k + ki) * k) * n + r * Wo;
                for (int64_t kj = 0; kj < k; kj++) {
                    const int64_t ox = ix - kj + pad;
                    if (ox >= 0 && ox < Wo) s += dc[kj * n + ox];
                }
            }
            dr[ix] += s;
        }
    }
}

Status cpu_conv2d_backward(float *dx, float *dw, float *dbias, const float *dout, const float *x, const float *w,
                           int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad) {
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1, K = Cin * k * k, N = Ho * Wo;
    if (dx) memset(dx, 0, (size_t)(B * Cin * H * W) * sizeof(float));
    if (B == 0 || Cout == 0 || N <= 0) return AGPT_OK;
    if (dbias) {
#pragma omp parallel for PAR_IF(B * Cout * N)
        for (int64_t co = 0; co < Cout; co++) {
            double s = 0;
            for (int64_t b = 0; b < B; b++) {
                const float *d = dout + (b * Cout + co) * N;
                for (int64_t j = 0; j < N; j++) s += d[j];
            }
            dbias[co] = (float)((double)dbias[co] + s);
        }
    }
    if (!dx && !dw) return AGPT_OK;
    // The chunking does not depend on which gradients are asked for, so dx has the same bits with or without dw.
    const bool small_dw = Cout * K <= kConvDwDouble, dw_double = dw && small_dw;
    int64_t rows = kConvColFloats / (K * Wo);
    if (small_dw && rows > kConvDwPixels / Wo) rows = kConvDwPixels / Wo;
    if (rows < 1) rows = 1;
    if (rows > Ho) rows = Ho;
    const size_t col_bytes = (size_t)(K * rows * Wo) * sizeof(float);
    float *col = dw ? malloc(col_bytes) : NULL, *dcol = dx ? malloc(col_bytes) : NULL;
    float *part = dw_double ? malloc((size_t)(Cout * K) * sizeof(float)) : NULL;
    double *acc = dw_double ? calloc((size_t)(Cout * K), sizeof(double)) : NULL;
    if ((dw && !col) || (dx && !dcol) || (dw_double && (!part || !acc))) {
        free(col), free(dcol), free(part), free(acc);
        return AGPT_FAIL(AGPT_ERR_OOM, "op_conv2d_backward: could not allocate the scratch (2 x %zu bytes of im2col "
                         "columns and %lld floats of weight-gradient partials)", col_bytes,
                         (long long)(dw_double ? Cout * K : 0));
    }
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * Cin * H * W, *db = dout + b * Cout * N;
        float *dxb = dx ? dx + b * Cin * H * W : NULL;
        for (int64_t oy0 = 0; oy0 < Ho; oy0 += rows) {
            const int64_t nr = Ho - oy0 < rows ? Ho - oy0 : rows, n = nr * Wo;
            const float *dchunk = db + oy0 * Wo;  // [Cout, n] inside [Cout, N]: leading dimension N
            if (dw) {
                im2col_rows(col, xb, Cin, H, W, k, pad, oy0, nr, Wo);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)Cout, (int)K, (int)n, 1.0f, dchunk, (int)N,
                            col, (int)n, dw_double ? 0.0f : 1.0f, dw_double ? part : dw, (int)K);
                if (dw_double) {
#pragma omp parallel for PAR_IF(Cout * K)
                    for (int64_t i = 0; i < Cout * K; i++) acc[i] += part[i];
                }
            }
            if (dx) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)K, (int)n, (int)Cout, 1.0f, w, (int)K, dchunk,
                            (int)N, 0.0f, dcol, (int)n);
                col2im_rows_add(dxb, dcol, Cin, H, W, k, pad, oy0, nr, Wo);
            }
        }
    }
    if (dw_double) {
#pragma omp parallel for PAR_IF(Cout * K)
        for (int64_t i = 0; i < Cout * K; i++) dw[i] = (float)((double)dw[i] + acc[i]);
    }
    free(col), free(dcol), free(part), free(acc);
    return AGPT_OK;
}

// PyTorch's threshold_backward(dout, y, 0): dout where y > 0 (a NaN y passes dout, as there), else 0.
void cpu_relu_backward(float *dx, const float *dout, const float *y, int64_t n) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) dx[i] = y[i] <= 0.0f ? 0.0f : dout[i];
}

// The forward's window order (0,0), (0,1), (1,0), (1,1) and its rule (a strictly larger value or a NaN takes
// over) pick the element that receives the window's gradient: the first maximum on ties, the last NaN.
void cpu_maxpool2x2_backward(float *dx, const float *dout, const float *x, int64_t BC, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for PAR_IF(BC * H * W)
    for (int64_t row = 0; row < BC * Ho; row++) {
        const int64_t c = row / Ho, oy = row % Ho;
        const float *r0 = x + (c * H + 2 * oy) * W, *r1 = r0 + W;
        float *d0 = dx + (c * H + 2 * oy) * W, *d1 = d0 + W;
        memset(d0, 0, (size_t)(2 * W) * sizeof(float));
        const float *g = dout + row * Wo;
        for (int64_t ox = 0; ox < Wo; ox++) {
            const float v[4] = {r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]};
            float m = v[0];
            int best = 0;
            for (int i = 1; i < 4; i++)
                if (v[i] > m || isnan(v[i])) m = v[i], best = i;
            (best < 2 ? d0 : d1)[2 * ox + (best & 1)] = g[ox];
        }
    }
    // An odd last row gets nothing (the odd last column was cleared with its row pair above).
    if (H % 2) {
#pragma omp parallel for PAR_IF(BC * W)
        for (int64_t c = 0; c < BC; c++) memset(dx + (c * H + H - 1) * W, 0, (size_t)W * sizeof(float));
    }
}
