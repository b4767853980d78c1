// Elementwise and row ops: add, scale, exact GELU, SwiGLU, row softmax, and their backward passes.
#include <math.h>

#include "kernels/cpu/cpu_ops.h"

#define PAR_IF(n) if ((n) > 16384)

void cpu_add(float *out, const float *a, const float *b, int64_t n) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void cpu_scale(float *x, int64_t n, float s) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

double cpu_sum_squares(const float *x, int64_t n) {
    double s = 0;
#pragma omp parallel for reduction(+ : s) PAR_IF(n)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

// PyTorch's exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
void cpu_gelu(float *out, const float *x, int64_t n) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) out[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)M_SQRT1_2));
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x).
void cpu_gelu_backward(float *dx, const float *dout, const float *x, int64_t n) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) {
        float cdf = 0.5f * (1.0f + erff(x[i] * (float)M_SQRT1_2));
        float pdf = inv_sqrt_2pi * expf(-0.5f * x[i] * x[i]);
        dx[i] = dout[i] * (cdf + x[i] * pdf);
    }
}

void cpu_swiglu(float *out, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                         int64_t n) {
#pragma omp parallel for PAR_IF(n)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i], s = 1.0f / (1.0f + expf(-g));
        dup[i] = dout[i] * g * s;
        dgate[i] = dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
    }
}

void cpu_softmax(float *out, const float *x, int64_t rows, int64_t C, float scale) {
#pragma omp parallel for PAR_IF(rows * C)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C;
        float *o = out + r * C;
        float mx = -INFINITY;
        for (int64_t i = 0; i < C; i++) mx = fmaxf(mx, scale * xr[i]);
        // A row that is all -inf (fully masked) gives zeros rather than NaN.
        if (mx == -INFINITY) {
            for (int64_t i = 0; i < C; i++) o[i] = 0.0f;
            continue;
        }
        double sum = 0;
        for (int64_t i = 0; i < C; i++) {
            o[i] = expf(scale * xr[i] - mx);
            sum += o[i];
        }
        float inv = (float)(1.0 / sum);
        for (int64_t i = 0; i < C; i++) o[i] *= inv;
    }
}

void cpu_softmax_backward(float *dx, const float *dout, const float *y, int64_t rows, int64_t C, float scale) {
#pragma omp parallel for PAR_IF(rows * C)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = dout + r * C, *yr = y + r * C;
        double dot = 0;
        for (int64_t i = 0; i < C; i++) dot += (double)g[i] * yr[i];
        float *d = dx + r * C;
        for (int64_t i = 0; i < C; i++) d[i] = scale * yr[i] * (g[i] - (float)dot);
    }
}
