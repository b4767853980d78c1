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
            // col[kk, (oy - oy0) * Wo + ox] = x[ci, oy + ki - pad, ox + kj - pad], or 0 in the padding
            // One task per (kk, output row): the first layer has K = 9 but 224 rows.
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
