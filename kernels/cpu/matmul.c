// CPU GEMM through OpenBLAS. Row-major, f32 with f32 accumulation (what sgemm does).
#include <cblas.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"

void cpu_matmul(float *c, const float *a, const float *b, const float *bias, int64_t batch, int64_t M, int64_t N,
                int64_t K, bool trans_a, bool trans_b, int64_t stride_a, int64_t stride_b, int64_t stride_c,
                float alpha, float beta) {
    int lda = (int)(trans_a ? M : K), ldb = (int)(trans_b ? K : N);
    for (int64_t i = 0; i < batch; i++) {
        float *ci = c + i * stride_c;
        if (K == 0) {  // BLAS does not scale C when K = 0 on every implementation: do it ourselves
            for (int64_t j = 0; j < M * N; j++) ci[j] = beta == 0.0f ? 0.0f : beta * ci[j];
        } else if (M == 1) {
            // One row (a decode step): OpenBLAS's sgemm reads the weights at a third of the speed its sgemv does
            // for M = 1. With one row, a is K contiguous floats whether or not it is transposed.
            if (trans_b)  // c[N] = b[N,K] @ a[K]
                cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)N, (int)K, alpha, b + i * stride_b, (int)K,
                            a + i * stride_a, 1, beta, ci, 1);
            else  // c[N] = b[K,N]^T @ a[K]
                cblas_sgemv(CblasRowMajor, CblasTrans, (int)K, (int)N, alpha, b + i * stride_b, (int)N,
                            a + i * stride_a, 1, beta, ci, 1);
        } else {
            cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                        (int)M, (int)N, (int)K, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, ci,
                        (int)N);
        }
        if (bias) {
#pragma omp parallel for if (M * N > 65536)
            for (int64_t r = 0; r < M; r++)
                for (int64_t j = 0; j < N; j++) ci[r * N + j] += bias[j];
        }
    }
}

void cpu_bias_grad(float *dbias, const float *dout, int64_t rows, int64_t N) {
#pragma omp parallel for if (rows * N > 65536)
    for (int64_t j = 0; j < N; j++) {
        double s = 0;
        for (int64_t r = 0; r < rows; r++) s += dout[r * N + j];
        dbias[j] += (float)s;
    }
}
