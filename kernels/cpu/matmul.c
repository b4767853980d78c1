// CPU GEMM through OpenBLAS. Row-major, f32 with f32 accumulation (what sgemm does). Plus the one mixed case,
// cpu_matmul_lowp: a weight operand b stored in bf16 or f16 (half the bytes a decode step reads) with f32
// activations and output, accumulated in f32.
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"
#include "runtime/dtype.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

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

// ---------------------------------------------------------------------------------------------------------
// A bf16 or f16 weight operand. Two ways, by the number of rows M of the activations:
// - M <= LOWP_GEMV_MAX_M with b stored [N,K] (a linear layer's weight): a GEMV-like kernel that reads each
//   weight once, widens it to f32 in registers and multiplies it with all M activation rows. Decode is bound
//   by reading the weights, and this reads 2 bytes per weight instead of sgemv's 4. OpenMP splits the output
//   rows; the AVX-512 kernel is chosen at run time (the build targets plain x86-64), else portable C.
// - otherwise: blocks of b are widened into an f32 buffer of about LOWP_BLOCK_ELEMS elements and multiplied by
//   sgemm (or sgemv for M = 1) block by block, so no f32 copy of the whole weight ever exists.
// AGPT_CPU_PORTABLE=1 in the environment forces the portable C kernels (the tests use it to check them too).

enum { LOWP_GEMV_MAX_M = 4, LOWP_GEMV_ROWS = 8, LOWP_CHUNK = 256, LOWP_BLOCK_ELEMS = 1 << 20 };

static bool use_avx512(void) {
#if HAVE_X86
    static int supported = -1;
    if (supported < 0)
        supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl");
    const char *portable = getenv("AGPT_CPU_PORTABLE");
    return supported && !(portable && portable[0] == '1');
#else
    return false;
#endif
}


// ---- portable C ------------------------------------------------------------------------------------------

static void widen_portable(float *dst, const uint16_t *src, int64_t n, bool bf16) {
    if (bf16) {
        for (int64_t i = 0; i < n; i++) {  // a shift: vectorised by the compiler
            uint32_t u = (uint32_t)src[i] << 16;
            memcpy(dst + i, &u, sizeof u);
        }
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
    }
}

// c[m, n] for rows n in [n0, n1): the dot of weight row n with activation row m, in LOWP_CHUNK pieces.
static void gemv_portable(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K, int64_t n0,
                          int64_t n1, float alpha, float beta, bool bf16) {
    float w[LOWP_CHUNK];
    for (int64_t n = n0; n < n1; n++) {
        // 16 partial sums per activation row: independent lanes the compiler can vectorise (a single float sum
        // is one serial chain, since it may not reorder it)
        float part[LOWP_GEMV_MAX_M][16] = {{0}};
        for (int64_t k0 = 0; k0 < K; k0 += LOWP_CHUNK) {
            int64_t len = K - k0 < LOWP_CHUNK ? K - k0 : LOWP_CHUNK;
            widen_portable(w, b + n * K + k0, len, bf16);
            for (int64_t m = 0; m < M; m++) {
                const float *am = a + m * K + k0;
                int64_t k = 0;
                for (; k + 16 <= len; k += 16)
                    for (int j = 0; j < 16; j++) part[m][j] += w[k + j] * am[k + j];
                for (; k < len; k++) part[m][k % 16] += w[k] * am[k];
            }
        }
        for (int64_t m = 0; m < M; m++) {
            float s = 0, *cm = c + m * N + n;
            for (int j = 0; j < 16; j++) s += part[m][j];
            *cm = beta == 0.0f ? alpha * s : alpha * s + beta * *cm;
        }
    }
}

// ---- AVX-512 ---------------------------------------------------------------------------------------------
#if HAVE_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
#define AVX512_INLINE AVX512 __attribute__((always_inline)) static inline

// 16 weights (or the first `n` < 16 of them, the rest zero) widened to f32.
AVX512_INLINE __m512 widen16(const uint16_t *p, bool bf16) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
AVX512_INLINE __m512 widen16_tail(const uint16_t *p, __mmask16 mask, bool bf16) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

AVX512 static void widen_avx512(float *dst, const uint16_t *src, int64_t n, bool bf16) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, widen16(src + i, bf16));
    if (i < n) {
        __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, mask, widen16_tail(src + i, mask, bf16));
    }
}

// RR weight rows n.. times MM activation rows: RR x MM accumulators of 16 lanes, kept in registers because RR
// and MM are constants where this is inlined. RR x MM <= 16 leaves registers for the activations; more rows in
// flight for small MM keep more memory streams busy.
AVX512_INLINE void gemv_tile(float *c, const float *a, const uint16_t *b, const int MM, const int RR, int64_t N,
                             int64_t K, int64_t n, float alpha, float beta, bool bf16) {
    __m512 acc[LOWP_GEMV_ROWS][LOWP_GEMV_MAX_M];
    for (int r = 0; r < RR; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_ps();
    const uint16_t *brow = b + n * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 av[LOWP_GEMV_MAX_M];
        for (int m = 0; m < MM; m++) av[m] = _mm512_loadu_ps(a + m * K + k);
        for (int r = 0; r < RR; r++) {
            __m512 w = widen16(brow + r * K + k, bf16);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm512_fmadd_ps(w, av[m], acc[r][m]);
        }
    }
    if (k < K) {
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
        __m512 av[LOWP_GEMV_MAX_M];
        for (int m = 0; m < MM; m++) av[m] = _mm512_maskz_loadu_ps(mask, a + m * K + k);
        for (int r = 0; r < RR; r++) {
            __m512 w = widen16_tail(brow + r * K + k, mask, bf16);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm512_fmadd_ps(w, av[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RR; r++)
        for (int m = 0; m < MM; m++) {
            float s = _mm512_reduce_add_ps(acc[r][m]), *cm = c + m * N + n + r;
            *cm = beta == 0.0f ? alpha * s : alpha * s + beta * *cm;
        }
}

AVX512_INLINE void gemv_rows_m(float *c, const float *a, const uint16_t *b, const int MM, int64_t N, int64_t K,
                               int64_t n0, int64_t n1, float alpha, float beta, bool bf16) {
    const int RR = MM <= 2 ? 8 : 4;
    int64_t n = n0;
    for (; n + RR <= n1; n += RR) gemv_tile(c, a, b, MM, RR, N, K, n, alpha, beta, bf16);
    for (; n < n1; n++) gemv_tile(c, a, b, MM, 1, N, K, n, alpha, beta, bf16);
}

AVX512_INLINE void gemv_rows_dtype(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K,
                                   int64_t n0, int64_t n1, float alpha, float beta, bool bf16) {
    switch (M) {
    case 1: gemv_rows_m(c, a, b, 1, N, K, n0, n1, alpha, beta, bf16); break;
    case 2: gemv_rows_m(c, a, b, 2, N, K, n0, n1, alpha, beta, bf16); break;
    case 3: gemv_rows_m(c, a, b, 3, N, K, n0, n1, alpha, beta, bf16); break;
    default: gemv_rows_m(c, a, b, 4, N, K, n0, n1, alpha, beta, bf16); break;
    }
}

AVX512 static void gemv_avx512(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K,
                               int64_t n0, int64_t n1, float alpha, float beta, bool bf16) {
    if (bf16) gemv_rows_dtype(c, a, b, M, N, K, n0, n1, alpha, beta, true);
    else gemv_rows_dtype(c, a, b, M, N, K, n0, n1, alpha, beta, false);
}
#endif

// ---- dispatch --------------------------------------------------------------------------------------------

static void widen(float *dst, const uint16_t *src, int64_t n, bool bf16, bool avx512) {
#if HAVE_X86
    if (avx512) {
        widen_avx512(dst, src, n, bf16);
        return;
    }
#endif
    (void)avx512;
    widen_portable(dst, src, n, bf16);
}

// c[M,N] = alpha a[M,K] b[N,K]^T + beta c, M <= LOWP_GEMV_MAX_M, a's rows contiguous.
static void lowp_gemv(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K, float alpha,
                      float beta, bool bf16, bool avx512) {
    // Blocks of whole tiles, so each thread streams its own run of weight rows.
    const int64_t per = LOWP_GEMV_ROWS * 8, blocks = (N + per - 1) / per;
#pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n0 = blk * per, n1 = n0 + per < N ? n0 + per : N;
#if HAVE_X86
        if (avx512) {
            gemv_avx512(c, a, b, M, N, K, n0, n1, alpha, beta, bf16);
            continue;
        }
#endif
        gemv_portable(c, a, b, M, N, K, n0, n1, alpha, beta, bf16);
    }
}

// The same product through f32 tiles of b and BLAS; any M, transposes as cpu_matmul. One parallel region: each
// thread widens its own tiles into its own `cap` floats of buf and multiplies them by a single-threaded sgemm
// (OpenBLAS's OpenMP build runs one thread inside a parallel region), so no f32 copy of the whole weight exists
// and the threads meet at one barrier per call, not two per tile. The threads own disjoint columns of c: tiles
// of nb rows of b [N,K] (trans_b), or of nb columns of b [K,N], then walked in blocks of kb rows of K.
static void lowp_blocked(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K, bool trans_a,
                         bool trans_b, float alpha, float beta, bool bf16, bool avx512, float *buf, int64_t cap) {
    const int lda = (int)(trans_a ? M : K);
    const int64_t nb = trans_b ? (cap / K < N ? cap / K : N) : (N < 256 ? N : 256);
    const int64_t kb = trans_b ? K : (cap / nb < K ? cap / nb : K), tiles = (N + nb - 1) / nb;
#pragma omp parallel
    {
#ifdef _OPENMP
        float *tb = buf + (int64_t)omp_get_thread_num() * cap;
#else
        float *tb = buf;
#endif
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * nb, nn = N - n0 < nb ? N - n0 : nb;
            if (trans_b) {  // c[:, n0:n0+nn] = alpha op(a) @ tile[nn,K]^T + beta c[:, n0:n0+nn]
                widen(tb, b + n0 * K, nn * K, bf16, avx512);
                if (M == 1)
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)nn, (int)K, alpha, tb, (int)K, a, 1, beta, c + n0, 1);
                else
                    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, CblasTrans, (int)M, (int)nn,
                                (int)K, alpha, a, lda, tb, (int)K, beta, c + n0, (int)N);
                continue;
            }
            for (int64_t k0 = 0; k0 < K; k0 += kb) {  // c[:, n0:n0+nn] += alpha op(a)[:, k0:k0+kk] @ tile[kk,nn]
                const int64_t kk = K - k0 < kb ? K - k0 : kb;
                for (int64_t r = 0; r < kk; r++) widen(tb + r * nn, b + (k0 + r) * N + n0, nn, bf16, avx512);
                const float bk = k0 == 0 ? beta : 1.0f, *ak = a + (trans_a ? k0 * M : k0);
                if (M == 1)
                    cblas_sgemv(CblasRowMajor, CblasTrans, (int)kk, (int)nn, alpha, tb, (int)nn, ak, 1, bk, c + n0, 1);
                else
                    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, CblasNoTrans, (int)M, (int)nn,
                                (int)kk, alpha, ak, lda, tb, (int)nn, bk, c + n0, (int)N);
            }
        }
    }
}

Status cpu_matmul_lowp(float *c, const float *a, const void *b, DType b_dtype, const float *bias, int64_t batch,
                       int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_a,
                       int64_t stride_b, int64_t stride_c, float alpha, float beta) {
    const bool bf16 = b_dtype == DT_BF16, avx512 = use_avx512();
    // With one row, a is K contiguous floats whether or not it is transposed.
    const bool gemv = trans_b && M <= LOWP_GEMV_MAX_M && (M == 1 || !trans_a) && K > 0;
    float *buf = NULL;
    int64_t cap = 0;
    if (!gemv && K > 0) {  // per thread: LOWP_BLOCK_ELEMS floats, at least one row of b [N,K] or 256 columns
        cap = trans_b ? (K > LOWP_BLOCK_ELEMS ? K : LOWP_BLOCK_ELEMS) : (LOWP_BLOCK_ELEMS > 256 ? LOWP_BLOCK_ELEMS : 256);
        cap = (cap + 15) / 16 * 16;  // each thread's part starts on a 64-byte line
#ifdef _OPENMP
        int threads = omp_get_max_threads();
#else
        int threads = 1;
#endif
        size_t bytes = (size_t)threads * (size_t)cap * sizeof(float);
        buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!buf)
            return AGPT_FAIL(AGPT_ERR_OOM, "op_matmul: no memory for %d f32 tiles of the %s weight (%.1f MB)",
                             threads, dtype_name(b_dtype), (double)bytes / 1e6);
    }
    for (int64_t i = 0; i < batch; i++) {
        float *ci = c + i * stride_c;
        const float *ai = a + i * stride_a;
        const uint16_t *bi = (const uint16_t *)b + i * stride_b;
        if (K == 0) {
            for (int64_t j = 0; j < M * N; j++) ci[j] = beta == 0.0f ? 0.0f : beta * ci[j];
        } else if (gemv) {
            lowp_gemv(ci, ai, bi, M, N, K, alpha, beta, bf16, avx512);
        } else {
            lowp_blocked(ci, ai, bi, M, N, K, trans_a, trans_b, alpha, beta, bf16, avx512, buf, cap);
        }
        if (bias) {
#pragma omp parallel for if (M * N > 65536)
            for (int64_t r = 0; r < M; r++)
                for (int64_t j = 0; j < N; j++) ci[r * N + j] += bias[j];
        }
    }
    free(buf);
    return AGPT_OK;
}

void cpu_bias_grad(float *dbias, const float *dout, int64_t rows, int64_t N) {
#pragma omp parallel for if (rows * N > 65536)
    for (int64_t j = 0; j < N; j++) {
        double s = 0;
        for (int64_t r = 0; r < rows; r++) s += dout[r * N + j];
        dbias[j] += (float)s;
    }
}
