// CPU GEMM through OpenBLAS. Row-major, f32 with f32 accumulation (what sgemm does). Plus the one mixed case,
// cpu_matmul_lowp: a weight operand b stored in bf16 or f16 (half the bytes a decode step reads) with f32
// activations and output, accumulated in f32; and, opt-in, a bf16 x bf16 GEMM for bf16 weights that rounds the
// activations to bf16 (avx512_bf16 dot products, as PyTorch's bf16 matmul).
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/isa.h"
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
//   rows; the AVX-512 or AVX2 kernel is chosen at run time (the build targets plain x86-64), else portable C.
// - otherwise: blocks of b are widened into an f32 buffer of about LOWP_BLOCK_ELEMS elements and multiplied by
//   sgemm (or sgemv for M = 1) block by block, so no f32 copy of the whole weight ever exists.
// The SIMD level is kernels/cpu/isa.h's: AVX-512, AVX2 (+FMA, F16C) or portable C; AGPT_CPU_ISA caps it.

enum { LOWP_GEMV_MAX_M = 4, LOWP_GEMV_ROWS = 8, LOWP_CHUNK = 256, LOWP_BLOCK_ELEMS = 1 << 20 };

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

// ---- AVX2 + FMA + F16C -----------------------------------------------------------------------------------
// The same kernels with 8 lanes, for the x86 machines without AVX-512 (AMD Zen 2/3, most cloud machines). AVX2
// has no masked 16-bit loads: tails go through a zero-padded copy of the last few weights.
#if HAVE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE AVX2 __attribute__((always_inline)) static inline

// 8 weights widened to f32.
AVX2_INLINE __m256 widen8(const uint16_t *p, bool bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}
// The first n < 8 weights at p, the rest zero.
AVX2_INLINE __m256 widen8_tail(const uint16_t *p, int n, bool bf16) {
    uint16_t pad[8] = {0};
    memcpy(pad, p, (size_t)n * sizeof *p);
    return widen8(pad, bf16);
}
AVX2_INLINE __m256 load8_tail(const float *p, int n) {
    float pad[8] = {0};
    memcpy(pad, p, (size_t)n * sizeof *p);
    return _mm256_loadu_ps(pad);
}
AVX2_INLINE float reduce8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static void widen_avx2(float *dst, const uint16_t *src, int64_t n, bool bf16) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8(src + i, bf16));
    if (i < n) {
        float pad[8];
        _mm256_storeu_ps(pad, widen8_tail(src + i, (int)(n - i), bf16));
        memcpy(dst + i, pad, (size_t)(n - i) * sizeof *dst);
    }
}

// RR weight rows times MM activation rows, as gemv_tile: RR x MM <= 8 accumulators of 8 lanes leave registers
// (16 ymm in all) for the activations and the widened weights.
AVX2_INLINE void gemv_tile8(float *c, const float *a, const uint16_t *b, const int MM, const int RR, int64_t N,
                            int64_t K, int64_t n, float alpha, float beta, bool bf16) {
    __m256 acc[LOWP_GEMV_ROWS][LOWP_GEMV_MAX_M];
    for (int r = 0; r < RR; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm256_setzero_ps();
    const uint16_t *brow = b + n * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 av[LOWP_GEMV_MAX_M];
        for (int m = 0; m < MM; m++) av[m] = _mm256_loadu_ps(a + m * K + k);
        for (int r = 0; r < RR; r++) {
            __m256 w = widen8(brow + r * K + k, bf16);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm256_fmadd_ps(w, av[m], acc[r][m]);
        }
    }
    if (k < K) {
        const int tail = (int)(K - k);
        __m256 av[LOWP_GEMV_MAX_M];
        for (int m = 0; m < MM; m++) av[m] = load8_tail(a + m * K + k, tail);
        for (int r = 0; r < RR; r++) {
            __m256 w = widen8_tail(brow + r * K + k, tail, bf16);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm256_fmadd_ps(w, av[m], acc[r][m]);
        }
    }
    for (int r = 0; r < RR; r++)
        for (int m = 0; m < MM; m++) {
            float s = reduce8(acc[r][m]), *cm = c + m * N + n + r;
            *cm = beta == 0.0f ? alpha * s : alpha * s + beta * *cm;
        }
}

AVX2_INLINE void gemv8_rows_m(float *c, const float *a, const uint16_t *b, const int MM, int64_t N, int64_t K,
                              int64_t n0, int64_t n1, float alpha, float beta, bool bf16) {
    const int RR = MM == 1 ? 8 : MM == 2 ? 4 : 2;
    int64_t n = n0;
    for (; n + RR <= n1; n += RR) gemv_tile8(c, a, b, MM, RR, N, K, n, alpha, beta, bf16);
    for (; n < n1; n++) gemv_tile8(c, a, b, MM, 1, N, K, n, alpha, beta, bf16);
}

AVX2_INLINE void gemv8_rows_dtype(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K,
                                  int64_t n0, int64_t n1, float alpha, float beta, bool bf16) {
    switch (M) {
    case 1: gemv8_rows_m(c, a, b, 1, N, K, n0, n1, alpha, beta, bf16); break;
    case 2: gemv8_rows_m(c, a, b, 2, N, K, n0, n1, alpha, beta, bf16); break;
    case 3: gemv8_rows_m(c, a, b, 3, N, K, n0, n1, alpha, beta, bf16); break;
    default: gemv8_rows_m(c, a, b, 4, N, K, n0, n1, alpha, beta, bf16); break;
    }
}

AVX2 static void gemv_avx2(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K,
                           int64_t n0, int64_t n1, float alpha, float beta, bool bf16) {
    if (bf16) gemv8_rows_dtype(c, a, b, M, N, K, n0, n1, alpha, beta, true);
    else gemv8_rows_dtype(c, a, b, M, N, K, n0, n1, alpha, beta, false);
}
#endif

#if HAVE_X86
// ---- bf16 x bf16 -> f32 GEMM with avx512_bf16 (opt-in) -----------------------------------------------------
// For a bf16 weight and M >= BF16_GEMM_MIN_M rows, when switched on (cpu_set_bf16_gemm, AGPT_CPU_BF16_GEMM=1):
// the activations are rounded to bf16 (nearest even, as PyTorch's bf16 matmul does) and multiplied by
// vdpbf16ps, which adds the products of 16 bf16 pairs into 16 f32 lanes (32 multiply-adds per instruction,
// twice an f32 FMA's). Goto-style blocking:
// - a is packed once per call: per tile of BG_MR rows, for each pair of k, BG_MR dwords (lo = a[m][2p], hi =
//   a[m][2p+1], as bf16), zero past M and K, so a tile's k-pair is one broadcast dword per row;
// - each thread takes panels of BG_NR = 48 weight rows (output columns) (OpenMP, dynamic in pairs of panels, so
//   a thread streams runs of the weight), and per block of BG_KC values of k packs the panel into its own buffer
//   as [k-pair][48 columns] dwords (16x16 dword transposes of the [N,K] weight): 24 KB, stays in L1;
// - the micro-kernel keeps BG_MR x 3 zmm accumulators (8 rows x 48 columns of f32) over the block; the first k
//   block writes alpha acc + beta c + bias, the later ones add alpha acc.
// Each output is summed in a fixed order by one thread: the results do not depend on the thread count.
enum { BG_MR = 8, BG_NB = 3, BG_NR = 16 * BG_NB, BG_KC = 256, BG_KCP = BG_KC / 2, BF16_GEMM_MIN_M = 16 };

#define BF16_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")))
#define BF16_INLINE BF16_TARGET __attribute__((always_inline)) static inline

// ap: for each tile of BG_MR rows, Kp = ceil(K/2) pairs x BG_MR dwords: (lo = A[m][2p], hi = A[m][2p+1]) rounded
// to bf16, zero past M and past K.
BF16_TARGET static void bg_pack_a_tile(uint32_t *ap, const float *a, int64_t M, int64_t K, bool trans_a,
                                       int64_t m0) {
    const int64_t Kp = (K + 1) / 2;
    const int rows = M - m0 < BG_MR ? (int)(M - m0) : BG_MR;
    if (trans_a) {  // a [K,M]: rare, scalar
        for (int64_t p = 0; p < Kp; p++)
            for (int r = 0; r < BG_MR; r++) {
                uint32_t lo = 0, hi = 0;
                if (r < rows) {
                    lo = (uint32_t)f32_to_bf16(a[(2 * p) * M + m0 + r]);
                    if (2 * p + 1 < K) hi = (uint32_t)f32_to_bf16(a[(2 * p + 1) * M + m0 + r]);
                }
                ap[p * BG_MR + r] = lo | hi << 16;
            }
        return;
    }
    uint32_t tmp[BG_MR][16] __attribute__((aligned(64)));
    for (int64_t p0 = 0; p0 < Kp; p0 += 16) {
        const int np = Kp - p0 < 16 ? (int)(Kp - p0) : 16;
        const int64_t k0 = 2 * p0, nk = K - k0 < 32 ? K - k0 : 32;
        const __mmask16 m_lo = nk >= 16 ? 0xffff : (__mmask16)((1u << nk) - 1);
        const __mmask16 m_hi = nk >= 32 ? 0xffff : nk <= 16 ? 0 : (__mmask16)((1u << (nk - 16)) - 1);
        for (int r = 0; r < BG_MR; r++) {
            __m512i v = _mm512_setzero_si512();
            if (r < rows) {
                const float *ar = a + (m0 + r) * K + k0;
                __m512 lo = _mm512_maskz_loadu_ps(m_lo, ar), hi = _mm512_maskz_loadu_ps(m_hi, ar + 16);
                v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            }
            _mm512_store_si512((__m512i *)tmp[r], v);
        }
        for (int q = 0; q < np; q++)
            for (int r = 0; r < BG_MR; r++) ap[(p0 + q) * BG_MR + r] = tmp[r][q];
    }
}

// 16x16 transpose of dwords, in place.
BF16_INLINE void bg_transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // each 128-bit lane of r[4i+j] now holds column 4L+j of rows 4i..4i+3: two rounds of lane shuffles
    for (int i = 0; i < 4; i++) {
        t[i + 0] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i + 0] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
    }
}

// One panel of B: columns n0.. n0+BG_NR (zero past N), pairs p0..p0+kcp (zero past K) -> bp[p][BG_NR] dwords.
BF16_TARGET static void bg_pack_b(uint32_t *bp, const uint16_t *b, int64_t N, int64_t K, bool trans_b, int64_t n0,
                                  int64_t p0, int64_t kcp) {
    for (int g = 0; g < BG_NB; g++) {
        const int64_t c0 = n0 + 16 * g;
        int64_t q = 0;
        if (trans_b && c0 + 16 <= N) {  // b [N,K]: the pairs of 16 rows, transposed 16 pairs at a time
            for (; q + 16 <= kcp && 2 * (p0 + q) + 32 <= K; q += 16) {
                __m512i r[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(b + (c0 + i) * K + 2 * (p0 + q));
                bg_transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_store_si512((__m512i *)(bp + (q + i) * BG_NR + 16 * g), r[i]);
            }
        } else if (!trans_b && c0 + 16 <= N) {  // b [K,N]: rows 2p and 2p+1 interleaved
            for (; q < kcp && 2 * (p0 + q) + 1 < K; q++) {
                const uint16_t *r0 = b + 2 * (p0 + q) * N + c0;
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)r0));
                __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r0 + N)));
                _mm512_store_si512((__m512i *)(bp + q * BG_NR + 16 * g), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
        for (; q < kcp; q++)  // tails: scalar
            for (int i = 0; i < 16; i++) {
                const int64_t n = c0 + i, k = 2 * (p0 + q);
                uint32_t lo = 0, hi = 0;
                if (n < N && k < K) {
                    lo = trans_b ? b[n * K + k] : b[k * N + n];
                    if (k + 1 < K) hi = trans_b ? b[n * K + k + 1] : b[(k + 1) * N + n];
                }
                bp[q * BG_NR + 16 * g + i] = lo | hi << 16;
            }
    }
}

// c[MM rows, BG_NR cols (cols valid)] (+)= alpha ap . bp over kcp pairs; first: alpha acc + beta c + bias.
BF16_INLINE void bg_tile(float *c, int64_t ldc, const uint32_t *ap, const uint32_t *bp, int64_t kcp, const int MM,
                         int cols, bool first, float alpha, float beta, const float *bias) {
    __m512 acc[BG_MR][BG_NB];
#pragma GCC unroll 16
    for (int r = 0; r < MM; r++)
#pragma GCC unroll 4
        for (int g = 0; g < BG_NB; g++) acc[r][g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kcp; p++) {
        __m512bh bv[BG_NB];
#pragma GCC unroll 4
        for (int g = 0; g < BG_NB; g++) bv[g] = (__m512bh)_mm512_load_si512((const __m512i *)(bp + p * BG_NR + 16 * g));
#pragma GCC unroll 16
        for (int r = 0; r < MM; r++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)ap[p * BG_MR + r]);
#pragma GCC unroll 4
            for (int g = 0; g < BG_NB; g++) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], av, bv[g]);
        }
    }
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
#pragma GCC unroll 4
    for (int g = 0; g < BG_NB; g++) {
        const int left = cols - 16 * g;
        if (left <= 0) break;
        const __mmask16 mask = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        const __m512 bias_v = bias && first ? _mm512_maskz_loadu_ps(mask, bias + 16 * g) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int r = 0; r < MM; r++) {
            float *cp = c + r * ldc + 16 * g;
            __m512 v;
            if (first) {
                v = _mm512_add_ps(_mm512_mul_ps(va, acc[r][g]), bias_v);
                if (beta != 0.0f) v = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, cp), v);
            } else {
                v = _mm512_fmadd_ps(va, acc[r][g], _mm512_maskz_loadu_ps(mask, cp));
            }
            _mm512_mask_storeu_ps(cp, mask, v);
        }
    }
}

BF16_TARGET static void bg_tiles(float *c, int64_t ldc, const uint32_t *ap, const uint32_t *bp, int64_t kcp,
                                 int rows, int cols, bool first, float alpha, float beta, const float *bias) {
    switch (rows) {
#define BG_CASE(R) case R: bg_tile(c, ldc, ap, bp, kcp, R < BG_MR ? R : BG_MR, cols, first, alpha, beta, bias); break;
        BG_CASE(1) BG_CASE(2) BG_CASE(3) BG_CASE(4) BG_CASE(5) BG_CASE(6) BG_CASE(7)
        default: bg_tile(c, ldc, ap, bp, kcp, BG_MR, cols, first, alpha, beta, bias); break;
#undef BG_CASE
    }
}

// c[M,N] = alpha op(a)[M,K] op(b)[K,N] + beta c + bias, with a rounded to bf16; one item of the batch.
// ap: scratch for ceil(M/BG_MR) * BG_MR * ceil(K/2) dwords; bpbuf: per thread BG_NR * BG_KCP dwords.
static void bg_gemm(float *c, const float *a, const uint16_t *b, const float *bias, int64_t M, int64_t N, int64_t K,
                    bool trans_a, bool trans_b, float alpha, float beta, uint32_t *ap, uint32_t *bpbuf) {
    const int64_t Kp = (K + 1) / 2, mtiles = (M + BG_MR - 1) / BG_MR, panels = (N + BG_NR - 1) / BG_NR;
#pragma omp parallel
    {
#ifdef _OPENMP
        uint32_t *bp = bpbuf + (int64_t)omp_get_thread_num() * BG_NR * BG_KCP;
#else
        uint32_t *bp = bpbuf;
#endif
#pragma omp for schedule(static)
        for (int64_t t = 0; t < mtiles; t++) bg_pack_a_tile(ap + t * BG_MR * Kp, a, M, K, trans_a, t * BG_MR);
#pragma omp for schedule(dynamic, 2)
        for (int64_t j = 0; j < panels; j++) {
            const int64_t n0 = j * BG_NR;
            const int cols = N - n0 < BG_NR ? (int)(N - n0) : BG_NR;
            for (int64_t p0 = 0; p0 < Kp; p0 += BG_KCP) {
                const int64_t kcp = Kp - p0 < BG_KCP ? Kp - p0 : BG_KCP;
                bg_pack_b(bp, b, N, K, trans_b, n0, p0, kcp);
                for (int64_t t = 0; t < mtiles; t++) {
                    const int rows = M - t * BG_MR < BG_MR ? (int)(M - t * BG_MR) : BG_MR;
                    bg_tiles(c + t * BG_MR * N + n0, N, ap + (t * Kp + p0) * BG_MR, bp, kcp, rows, cols, p0 == 0,
                             alpha, beta, bias ? bias + n0 : NULL);
                }
            }
        }
    }
}

// cpu_matmul_lowp for a bf16 b with the bf16 GEMM: the scratch for packed a and the threads' panels, then each
// item of the batch.
static Status lowp_bf16_gemm(float *c, const float *a, const uint16_t *b, const float *bias, int64_t batch,
                             int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_a,
                             int64_t stride_b, int64_t stride_c, float alpha, float beta) {
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    const size_t a_bytes = (size_t)((M + BG_MR - 1) / BG_MR * BG_MR) * (size_t)((K + 1) / 2) * 4;
    const size_t b_bytes = (size_t)threads * BG_NR * BG_KCP * 4;
    uint32_t *ap = aligned_alloc(64, (a_bytes + 63) / 64 * 64), *bp = aligned_alloc(64, b_bytes);
    if (!ap || !bp) {
        free(ap), free(bp);
        return AGPT_FAIL(AGPT_ERR_OOM, "op_matmul: no memory for the bf16 GEMM's packed operands (%.1f MB)",
                         (double)(a_bytes + b_bytes) / 1e6);
    }
    for (int64_t i = 0; i < batch; i++)
        bg_gemm(c + i * stride_c, a + i * stride_a, b + i * stride_b, bias, M, N, K, trans_a, trans_b, alpha, beta,
                ap, bp);
    free(ap), free(bp);
    return AGPT_OK;
}
#endif

// The switch for the bf16 GEMM: -1 until AGPT_CPU_BF16_GEMM is read (once), then 0 or 1.
static int bf16_gemm_switch = -1;

static bool bf16_gemm_supported(void) { return cpu_has_avx512_bf16() && cpu_isa() == CPU_ISA_AVX512; }

bool cpu_set_bf16_gemm(bool on) {
    __atomic_store_n(&bf16_gemm_switch, on ? 1 : 0, __ATOMIC_RELAXED);
    return on && bf16_gemm_supported();
}

#if HAVE_X86
static bool use_bf16_gemm(void) {
    int on = __atomic_load_n(&bf16_gemm_switch, __ATOMIC_RELAXED);
    if (on < 0) {
        const char *env = getenv("AGPT_CPU_BF16_GEMM");
        int expected = -1;
        __atomic_compare_exchange_n(&bf16_gemm_switch, &expected, env && env[0] == '1' ? 1 : 0, false,
                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        on = __atomic_load_n(&bf16_gemm_switch, __ATOMIC_RELAXED);
    }
    return on == 1 && bf16_gemm_supported();
}
#endif

// ---- dispatch --------------------------------------------------------------------------------------------

static void widen(float *dst, const uint16_t *src, int64_t n, bool bf16, CpuIsa isa) {
#if HAVE_X86
    if (isa == CPU_ISA_AVX512) {
        widen_avx512(dst, src, n, bf16);
        return;
    }
    if (isa == CPU_ISA_AVX2) {
        widen_avx2(dst, src, n, bf16);
        return;
    }
#endif
    (void)isa;
    widen_portable(dst, src, n, bf16);
}

// c[M,N] = alpha a[M,K] b[N,K]^T + beta c, M <= LOWP_GEMV_MAX_M, a's rows contiguous.
static void lowp_gemv(float *c, const float *a, const uint16_t *b, int64_t M, int64_t N, int64_t K, float alpha,
                      float beta, bool bf16, CpuIsa isa) {
    // Blocks of whole tiles, so each thread streams its own run of weight rows.
    const int64_t per = LOWP_GEMV_ROWS * 8, blocks = (N + per - 1) / per;
#pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t n0 = blk * per, n1 = n0 + per < N ? n0 + per : N;
#if HAVE_X86
        if (isa == CPU_ISA_AVX512) {
            gemv_avx512(c, a, b, M, N, K, n0, n1, alpha, beta, bf16);
            continue;
        }
        if (isa == CPU_ISA_AVX2) {
            gemv_avx2(c, a, b, M, N, K, n0, n1, alpha, beta, bf16);
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
                         bool trans_b, float alpha, float beta, bool bf16, CpuIsa isa, float *buf, int64_t cap) {
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
                widen(tb, b + n0 * K, nn * K, bf16, isa);
                if (M == 1)
                    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)nn, (int)K, alpha, tb, (int)K, a, 1, beta, c + n0, 1);
                else
                    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, CblasTrans, (int)M, (int)nn,
                                (int)K, alpha, a, lda, tb, (int)K, beta, c + n0, (int)N);
                continue;
            }
            for (int64_t k0 = 0; k0 < K; k0 += kb) {  // c[:, n0:n0+nn] += alpha op(a)[:, k0:k0+kk] @ tile[kk,nn]
                const int64_t kk = K - k0 < kb ? K - k0 : kb;
                for (int64_t r = 0; r < kk; r++) widen(tb + r * nn, b + (k0 + r) * N + n0, nn, bf16, isa);
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
    const bool bf16 = b_dtype == DT_BF16;
    const CpuIsa isa = cpu_isa();
    // With one row, a is K contiguous floats whether or not it is transposed.
    const bool gemv = trans_b && M <= LOWP_GEMV_MAX_M && (M == 1 || !trans_a) && K > 0;
#if HAVE_X86
    if (bf16 && isa == CPU_ISA_AVX512 && M >= BF16_GEMM_MIN_M && K > 0 && use_bf16_gemm())
        return lowp_bf16_gemm(c, a, (const uint16_t *)b, bias, batch, M, N, K, trans_a, trans_b, stride_a, stride_b,
                              stride_c, alpha, beta);
#endif
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
            lowp_gemv(ci, ai, bi, M, N, K, alpha, beta, bf16, isa);
        } else {
            lowp_blocked(ci, ai, bi, M, N, K, trans_a, trans_b, alpha, beta, bf16, isa, buf, cap);
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
