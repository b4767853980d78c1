// LayerNorm and RMSNorm, forward and backward. Statistics in double per row for accuracy; the rows run in
// parallel. Backward formulas: with xhat = (x - mean) * rstd and g = dout * w,
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat)),  xhat = x * rstd
#include <math.h>
#include <stddef.h>

#include "kernels/cpu/cpu_ops.h"

// One row of each norm: shared by the plain ops and the add-fused ones below, so the two agree bit for bit.
static inline void layernorm_row(float *o, float *mean, float *rstd, const float *xr, const float *w,
                                 const float *b, int64_t C, float eps) {
    double sum = 0;
    for (int64_t i = 0; i < C; i++) sum += xr[i];
    double mu = sum / (double)C;
    double var = 0;
    for (int64_t i = 0; i < C; i++) var += (xr[i] - mu) * (xr[i] - mu);
    double rs = 1.0 / sqrt(var / (double)C + eps);
    for (int64_t i = 0; i < C; i++) o[i] = (float)((xr[i] - mu) * rs) * w[i] + b[i];
    if (mean) *mean = (float)mu;
    if (rstd) *rstd = (float)rs;
}

static inline void rmsnorm_row(float *o, float *rstd, const float *xr, const float *w, int64_t C, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < C; i++) ss += (double)xr[i] * xr[i];
    double rs = 1.0 / sqrt(ss / (double)C + eps);
    // HF LLaMA normalises in f32, then multiplies by the weight: (w * (x * rstd)).
    for (int64_t i = 0; i < C; i++) o[i] = w[i] * (float)(xr[i] * rs);
    if (rstd) *rstd = (float)rs;
}

void cpu_layernorm(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                   int64_t rows, int64_t C, float eps) {
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++)
        layernorm_row(out + r * C, mean ? mean + r : NULL, rstd ? rstd + r : NULL, x + r * C, w, b, C, eps);
}

// sum = a + b, then the norm of each sum row while it is still in cache: the same float additions as cpu_add and
// the same row code as cpu_layernorm / cpu_rmsnorm, so the result equals that pair exactly. sum may alias a or b
// (each element is read before it is written); out must not alias any of them.
void cpu_add_layernorm(float *sum, float *out, float *mean, float *rstd, const float *a, const float *b,
                       const float *w, const float *bias, int64_t rows, int64_t C, float eps) {
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        float *sr = sum + r * C;
        const float *ar = a + r * C, *br = b + r * C;
        for (int64_t i = 0; i < C; i++) sr[i] = ar[i] + br[i];
        layernorm_row(out + r * C, mean ? mean + r : NULL, rstd ? rstd + r : NULL, sr, w, bias, C, eps);
    }
}

void cpu_add_rmsnorm(float *sum, float *out, float *rstd, const float *a, const float *b, const float *w,
                     int64_t rows, int64_t C, float eps) {
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        float *sr = sum + r * C;
        const float *ar = a + r * C, *br = b + r * C;
        for (int64_t i = 0; i < C; i++) sr[i] = ar[i] + br[i];
        rmsnorm_row(out + r * C, rstd ? rstd + r : NULL, sr, w, C, eps);
    }
}

// Two passes, both parallel and allocation-free: rows for dx, then columns for dw and db (each column sums
// its rows in double, in row order, so the result does not depend on the thread count).
void cpu_layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                            const float *mean, const float *rstd, int64_t rows, int64_t C) {
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C, *gr = dout + r * C;
        double mu = mean[r], rs = rstd[r];
        double mean_g = 0, mean_gx = 0;
        for (int64_t i = 0; i < C; i++) {
            double g = (double)gr[i] * w[i];
            mean_g += g;
            mean_gx += g * (xr[i] - mu) * rs;
        }
        mean_g /= (double)C;
        mean_gx /= (double)C;
        float *dxr = dx + r * C;
        for (int64_t i = 0; i < C; i++) {
            double xhat = (xr[i] - mu) * rs;
            dxr[i] = (float)(rs * ((double)gr[i] * w[i] - mean_g - xhat * mean_gx));
        }
    }
#pragma omp parallel for
    for (int64_t i = 0; i < C; i++) {
        double sw = 0, sb = 0;
        for (int64_t r = 0; r < rows; r++) {
            double g = dout[r * C + i];
            sw += g * (x[r * C + i] - (double)mean[r]) * rstd[r];
            sb += g;
        }
        dw[i] += (float)sw;
        db[i] += (float)sb;
    }
}

void cpu_rmsnorm(float *out, float *rstd, const float *x, const float *w, int64_t rows, int64_t C, float eps) {
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) rmsnorm_row(out + r * C, rstd ? rstd + r : NULL, x + r * C, w, C, eps);
}

void cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                          const float *rstd, int64_t rows, int64_t C) {
#pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C, *gr = dout + r * C;
        double rs = rstd[r];
        double mean_gx = 0;
        for (int64_t i = 0; i < C; i++) mean_gx += (double)gr[i] * w[i] * xr[i] * rs;
        mean_gx /= (double)C;
        float *dxr = dx + r * C;
        for (int64_t i = 0; i < C; i++) dxr[i] = (float)(rs * ((double)gr[i] * w[i] - xr[i] * rs * mean_gx));
    }
#pragma omp parallel for
    for (int64_t i = 0; i < C; i++) {
        double sw = 0;
        for (int64_t r = 0; r < rows; r++) sw += (double)dout[r * C + i] * x[r * C + i] * rstd[r];
        dw[i] += (float)sw;
    }
}
