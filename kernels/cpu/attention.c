// Reference multi-head attention and RoPE on the [B,T,H,D] layout.
// Attention is the plain two-pass form: scores, softmax, weighted sum, with the two products through BLAS.
// It is the CPU backend and the reference the fused CUDA kernels are checked against.
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"

// Row r of a [B,T,H,D] tensor for batch b, position t, head h.
#define AT(p, b, t, h, T, H, D) ((p) + ((((b) * (T) + (t)) * (H) + (h)) * (D)))

// Number of keys query i may see: all of them, or up to i + (Tk - Tq) when causal.
static inline int64_t visible_keys(int64_t i, int64_t Tq, int64_t Tk, bool causal) {
    return causal ? i + (Tk - Tq) + 1 : Tk;
}

// Per (batch, head), blocks of up to 256 queries: S = scale * Q K^T and O = P V through BLAS (the heads are
// strided views, lda = H*D), the mask and the softmax in between. Each thread owns one score block.
#define ATTN_QBLOCK 256

void cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t B, int64_t Tq, int64_t Tk,
                   int64_t H, int64_t D, bool causal, float scale) {
    int64_t ld = H * D, qblock = Tq < ATTN_QBLOCK ? Tq : ATTN_QBLOCK, nblocks = (Tq + qblock - 1) / qblock;
#pragma omp parallel
    {
        float *s = malloc((size_t)(qblock > 0 ? qblock : 1) * (size_t)(Tk > 0 ? Tk : 1) * sizeof(float));
#pragma omp for collapse(3) schedule(dynamic)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t blk = 0; blk < nblocks; blk++) {
                    int64_t i0 = blk * qblock, n = Tq - i0 < qblock ? Tq - i0 : qblock;
                    float *o = AT(out, b, i0, h, Tq, H, D);
                    if (!s) {  // no memory for a score block: poison rather than crash or lie
                        for (int64_t i = 0; i < n; i++)
                            for (int64_t d = 0; d < D; d++) o[i * ld + d] = NAN;
                        continue;
                    }
                    // Keys past the last visible one for this block are never needed.
                    int64_t kmax = causal ? visible_keys(i0 + n - 1, Tq, Tk, true) : Tk;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)kmax, (int)D, scale,
                                AT(q, b, i0, h, Tq, H, D), (int)ld, AT(k, b, 0, h, Tk, H, D), (int)ld, 0.0f, s,
                                (int)kmax);
                    for (int64_t i = 0; i < n; i++) {
                        float *row = s + i * kmax;
                        int64_t vis = visible_keys(i0 + i, Tq, Tk, causal);
                        float mx = -INFINITY;
                        for (int64_t j = 0; j < vis; j++) mx = fmaxf(mx, row[j]);
                        double sum = 0;
                        for (int64_t j = 0; j < vis; j++) {
                            row[j] = expf(row[j] - mx);
                            sum += row[j];
                        }
                        float inv = (float)(1.0 / sum);
                        for (int64_t j = 0; j < vis; j++) row[j] *= inv;
                        for (int64_t j = vis; j < kmax; j++) row[j] = 0.0f;
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)D, (int)kmax, 1.0f, s,
                                (int)kmax, AT(v, b, 0, h, Tk, H, D), (int)ld, 0.0f, o, (int)ld);
                }
        free(s);
    }
}

// With P = softmax(S), S = scale q k^T, O = P v:
//   dv_j = sum_i P_ij do_i;  dP_ij = do_i . v_j;  dS_ij = P_ij (dP_ij - sum_j P_ij dP_ij)
//   dq_i = scale sum_j dS_ij k_j;  dk_j = scale sum_i dS_ij q_i
// dk and dv sum over queries, so the parallel loop runs over (batch, head): no two threads write one row.
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                            const float *v, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D, bool causal,
                            float scale) {
#pragma omp parallel
    {
        float *p = malloc((size_t)(Tk > 0 ? Tk : 1) * sizeof(float));
        float *dp = malloc((size_t)(Tk > 0 ? Tk : 1) * sizeof(float));
#pragma omp for collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t j = 0; j < Tk; j++) {
                    memset(AT(dk, b, j, h, Tk, H, D), 0, (size_t)D * sizeof(float));
                    memset(AT(dv, b, j, h, Tk, H, D), 0, (size_t)D * sizeof(float));
                }
                for (int64_t i = 0; i < Tq; i++) {
                    float *dqi = AT(dq, b, i, h, Tq, H, D);
                    if (!p || !dp) {
                        for (int64_t d = 0; d < D; d++) dqi[d] = NAN;
                        continue;
                    }
                    const float *qi = AT(q, b, i, h, Tq, H, D), *doi = AT(dout, b, i, h, Tq, H, D);
                    int64_t n = visible_keys(i, Tq, Tk, causal);
                    float mx = -INFINITY;
                    for (int64_t j = 0; j < n; j++) {
                        const float *kj = AT(k, b, j, h, Tk, H, D);
                        float s = 0;
                        for (int64_t d = 0; d < D; d++) s += qi[d] * kj[d];
                        p[j] = s * scale;
                        mx = fmaxf(mx, p[j]);
                    }
                    double sum = 0;
                    for (int64_t j = 0; j < n; j++) {
                        p[j] = expf(p[j] - mx);
                        sum += p[j];
                    }
                    double dot = 0;
                    for (int64_t j = 0; j < n; j++) {
                        p[j] = (float)(p[j] / sum);
                        const float *vj = AT(v, b, j, h, Tk, H, D);
                        float s = 0;
                        for (int64_t d = 0; d < D; d++) s += doi[d] * vj[d];
                        dp[j] = s;
                        dot += (double)p[j] * s;
                    }
                    for (int64_t d = 0; d < D; d++) dqi[d] = 0;
                    for (int64_t j = 0; j < n; j++) {
                        float ds = p[j] * (dp[j] - (float)dot) * scale;
                        const float *kj = AT(k, b, j, h, Tk, H, D);
                        float *dkj = AT(dk, b, j, h, Tk, H, D), *dvj = AT(dv, b, j, h, Tk, H, D);
                        for (int64_t d = 0; d < D; d++) {
                            dqi[d] += ds * kj[d];
                            dkj[d] += ds * qi[d];
                            dvj[d] += p[j] * doi[d];
                        }
                    }
                }
            }
        free(p);
        free(dp);
    }
}

// inv_freq_i = base^(-2i/D) computed as HF does in float: 1 / base^(2i/D).
void cpu_rope(float *out, const float *x, const int32_t *positions, int64_t B, int64_t T, int64_t H, int64_t D,
              float base, int direction) {
    int64_t half = D / 2;
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            float pos = (float)positions[b * T + t];
            for (int64_t i = 0; i < half; i++) {
                float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)D);
                float angle = pos * inv_freq;
                float c = cosf(angle), s = direction > 0 ? sinf(angle) : -sinf(angle);
                for (int64_t h = 0; h < H; h++) {
                    const float *xr = AT(x, b, t, h, T, H, D);
                    float *o = AT(out, b, t, h, T, H, D);
                    float x1 = xr[i], x2 = xr[i + half];
                    o[i] = x1 * c - x2 * s;
                    o[i + half] = x2 * c + x1 * s;
                }
            }
        }
}

// One cpu_attention call per sequence over its own prefix: the very call the plain decode step makes, so the
// results are equal bit for bit.
void cpu_attention_decode(float *out, const float *q, const float *k, const float *v, const int32_t *lengths,
                          int64_t B, int64_t S, int64_t H, int64_t D, float scale) {
    const int64_t row = H * D;
    for (int64_t b = 0; b < B; b++)
        cpu_attention(out + b * row, q + b * row, k + b * S * row, v + b * S * row, 1, 1, lengths[b], H, D, true,
                      scale);
}
