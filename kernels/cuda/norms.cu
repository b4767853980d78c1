// LayerNorm and RMSNorm, forward and backward.
//
// Forward and the dx half of backward: one block per row. The row is read from global memory once per pass
// (two or three passes; a row of 11008 bf16 is 22 KB and stays in L1/L2 between passes), so any width works
// with no shared array sized by C. Statistics are fp32 block reductions (warp shuffles, then one value per
// warp through shared memory).
//
// The dw/db half of backward is a column reduction: a block owns 32 adjacent columns and its 16 warps walk
// the rows, each warp reading 32 consecutive elements of a row (coalesced). Each column is summed by one
// block in a fixed order and added once to dw/db: deterministic, no atomics, exact for any storage type.
// It runs before the dx kernel so that dx may even alias dout.
//
// Backward formulas, with xhat = (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm) and g = dout * w:
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += sum dout * xhat,  db += sum dout
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat)),            dw += sum dout * xhat
#include "kernels/cuda/common.cuh"

#define COL_W 32  // columns per block in the column reductions: one warp's width
#define COL_R 16  // warps per block in the column reductions, each taking every 16th row

// ---------------------------------------------------------------------------------------------------------
// LayerNorm forward

template <typename T, int V>
__global__ void layernorm_kernel(T *out, float *mean, float *rstd, const T *x, const T *w, const T *b, int64_t C,
                                 float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * C;
    T *outr = out + row * C;
    const int64_t step = (int64_t)blockDim.x * V;

    float s = 0.0f;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) s += v[j];
    }
    const float mu = block_sum(s, scratch) / (float)C;

    // Two-pass variance (sum of squared deviations), as the CPU reference: no cancellation for rows with
    // a large mean.
    float ss = 0.0f;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) ss += (v[j] - mu) * (v[j] - mu);
    }
    const float rs = 1.0f / sqrtf(block_sum(ss, scratch) / (float)C + eps);

    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V], wv[V], bv[V];
        load_vec<T, V>(xr + i, v);
        load_vec<T, V>(w + i, wv);
        load_vec<T, V>(b + i, bv);
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = (v[j] - mu) * rs * wv[j] + bv[j];
        store_vec<T, V>(outr + i, v);
    }
    if (threadIdx.x == 0) {
        if (mean) mean[row] = mu;
        if (rstd) rstd[row] = rs;
    }
}

template <typename T>
static Status launch_layernorm(cudaStream_t s, void *out, float *mean, float *rstd, const void *x, const void *w,
                               const void *b, int64_t rows, int64_t C, float eps) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {out, x, w, b})) {
        layernorm_kernel<T, V><<<(unsigned)rows, row_threads(C / V), 0, s>>>(
            (T *)out, mean, rstd, (const T *)x, (const T *)w, (const T *)b, C, eps);
    } else {
        layernorm_kernel<T, 1><<<(unsigned)rows, row_threads(C), 0, s>>>(
            (T *)out, mean, rstd, (const T *)x, (const T *)w, (const T *)b, C, eps);
    }
    CUDA_LAUNCH_CHECK("layernorm_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_layernorm(Engine *e, DType dt, void *out, float *mean, float *rstd, const void *x,
                                 const void *w, const void *b, int64_t rows, int64_t C, float eps) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_layernorm, engine_stream(e), out, mean, rstd, x, w, b, rows, C, eps);
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm backward

// dx for one row per block. rms = true makes it the RMSNorm formula (no mean, no mean(g) term).
template <typename T, int V, bool RMS>
__global__ void norm_backward_dx_kernel(T *dx, const T *dout, const T *x, const T *w, const float *mean,
                                        const float *rstd, int64_t C) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * C, *gr = dout + row * C;
    T *dxr = dx + row * C;
    const float mu = RMS ? 0.0f : mean[row], rs = rstd[row];
    const int64_t step = (int64_t)blockDim.x * V;

    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float xv[V], gv[V], wv[V];
        load_vec<T, V>(xr + i, xv);
        load_vec<T, V>(gr + i, gv);
        load_vec<T, V>(w + i, wv);
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float g = gv[j] * wv[j];
            sum_g += g;
            sum_gx += g * (xv[j] - mu) * rs;
        }
    }
    const float mean_g = RMS ? 0.0f : block_sum(sum_g, scratch) / (float)C;
    const float mean_gx = block_sum(sum_gx, scratch) / (float)C;

    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float xv[V], gv[V], wv[V];
        load_vec<T, V>(xr + i, xv);
        load_vec<T, V>(gr + i, gv);
        load_vec<T, V>(w + i, wv);
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float xhat = (xv[j] - mu) * rs;
            xv[j] = rs * (gv[j] * wv[j] - mean_g - xhat * mean_gx);
        }
        store_vec<T, V>(dxr + i, xv);
    }
}

// dw[c] += sum_r dout[r,c] * xhat[r,c];  db[c] += sum_r dout[r,c] (db may be NULL; so may dw).
template <typename T, bool RMS>
__global__ void __launch_bounds__(COL_W *COL_R)
    norm_backward_dwdb_kernel(T *dw, T *db, const T *dout, const T *x, const float *mean, const float *rstd,
                              int64_t rows, int64_t C) {
    __shared__ float part_w[COL_R][COL_W + 1];
    __shared__ float part_b[COL_R][COL_W + 1];
    const int64_t col = (int64_t)blockIdx.x * COL_W + threadIdx.x;
    float acc_w = 0.0f, acc_b = 0.0f;
    if (col < C) {
        for (int64_t r = threadIdx.y; r < rows; r += COL_R) {
            const float g = to_f32(dout[r * C + col]);
            const float mu = RMS ? 0.0f : mean[r];
            acc_w += g * (to_f32(x[r * C + col]) - mu) * rstd[r];
            acc_b += g;
        }
    }
    part_w[threadIdx.y][threadIdx.x] = acc_w;
    part_b[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        float sw = 0.0f, sb = 0.0f;
#pragma unroll
        for (int i = 0; i < COL_R; i++) {
            sw += part_w[i][threadIdx.x];
            sb += part_b[i][threadIdx.x];
        }
        if (dw) dw[col] = from_f32<T>(to_f32(dw[col]) + sw);
        if (db) db[col] = from_f32<T>(to_f32(db[col]) + sb);
    }
}

template <typename T, bool RMS>
static Status launch_norm_backward(cudaStream_t s, void *dx, void *dw, void *db, const void *dout, const void *x,
                                   const void *w, const float *mean, const float *rstd, int64_t rows, int64_t C) {
    if (dw || db) {
        dim3 block(COL_W, COL_R), grid((unsigned)((C + COL_W - 1) / COL_W));
        norm_backward_dwdb_kernel<T, RMS><<<grid, block, 0, s>>>((T *)dw, (T *)db, (const T *)dout, (const T *)x,
                                                                 mean, rstd, rows, C);
        CUDA_LAUNCH_CHECK("norm_backward_dwdb_kernel");
    }
    if (dx) {
        constexpr int V = vec16<T>();
        if (rows_vectorisable<T>(C, {dx, dout, x, w})) {
            norm_backward_dx_kernel<T, V, RMS><<<(unsigned)rows, row_threads(C / V), 0, s>>>(
                (T *)dx, (const T *)dout, (const T *)x, (const T *)w, mean, rstd, C);
        } else {
            norm_backward_dx_kernel<T, 1, RMS><<<(unsigned)rows, row_threads(C), 0, s>>>(
                (T *)dx, (const T *)dout, (const T *)x, (const T *)w, mean, rstd, C);
        }
        CUDA_LAUNCH_CHECK("norm_backward_dx_kernel");
    }
    return AGPT_OK;
}

template <typename T>
static Status launch_layernorm_backward(cudaStream_t s, void *dx, void *dw, void *db, const void *dout,
                                        const void *x, const void *w, const float *mean, const float *rstd,
                                        int64_t rows, int64_t C) {
    return launch_norm_backward<T, false>(s, dx, dw, db, dout, x, w, mean, rstd, rows, C);
}

extern "C" Status cuda_layernorm_backward(Engine *e, DType dt, void *dx, void *dw, void *db, const void *dout,
                                          const void *x, const void *w, const float *mean, const float *rstd,
                                          int64_t rows, int64_t C) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    AGPT_CHECK_ARG(mean != NULL && rstd != NULL, "cuda_layernorm_backward: mean and rstd from the forward are "
                   "required");
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_layernorm_backward, engine_stream(e), dx, dw, db, dout, x, w, mean, rstd, rows,
                          C);
}

// ---------------------------------------------------------------------------------------------------------
// RMSNorm

template <typename T, int V>
__global__ void rmsnorm_kernel(T *out, float *rstd, const T *x, const T *w, int64_t C, float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * C;
    T *outr = out + row * C;
    const int64_t step = (int64_t)blockDim.x * V;

    const float ss = thread_sum_squares<T, V>(xr, C);
    const float rs = 1.0f / sqrtf(block_sum(ss, scratch) / (float)C + eps);

    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V], wv[V];
        load_vec<T, V>(xr + i, v);
        load_vec<T, V>(w + i, wv);
        // HF LLaMA order: normalise in fp32, then multiply by the weight.
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = wv[j] * (v[j] * rs);
        store_vec<T, V>(outr + i, v);
    }
    if (threadIdx.x == 0 && rstd) rstd[row] = rs;
}

template <typename T>
static Status launch_rmsnorm(cudaStream_t s, void *out, float *rstd, const void *x, const void *w, int64_t rows,
                             int64_t C, float eps) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {out, x, w})) {
        rmsnorm_kernel<T, V><<<(unsigned)rows, row_threads(C / V), 0, s>>>((T *)out, rstd, (const T *)x,
                                                                           (const T *)w, C, eps);
    } else {
        rmsnorm_kernel<T, 1><<<(unsigned)rows, row_threads(C), 0, s>>>((T *)out, rstd, (const T *)x, (const T *)w,
                                                                       C, eps);
    }
    CUDA_LAUNCH_CHECK("rmsnorm_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_rmsnorm(Engine *e, DType dt, void *out, float *rstd, const void *x, const void *w,
                               int64_t rows, int64_t C, float eps) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_rmsnorm, engine_stream(e), out, rstd, x, w, rows, C, eps);
}

template <typename T>
static Status launch_rmsnorm_backward(cudaStream_t s, void *dx, void *dw, const void *dout, const void *x,
                                      const void *w, const float *rstd, int64_t rows, int64_t C) {
    return launch_norm_backward<T, true>(s, dx, dw, NULL, dout, x, w, NULL, rstd, rows, C);
}

extern "C" Status cuda_rmsnorm_backward(Engine *e, DType dt, void *dx, void *dw, const void *dout, const void *x,
                                        const void *w, const float *rstd, int64_t rows, int64_t C) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    AGPT_CHECK_ARG(rstd != NULL, "cuda_rmsnorm_backward: rstd from the forward is required");
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_rmsnorm_backward, engine_stream(e), dx, dw, dout, x, w, rstd, rows, C);
}

// ---------------------------------------------------------------------------------------------------------
// Residual add fused with LayerNorm / RMSNorm: sum = a + b, out = norm(sum).
//
// Unfused, a decode step's "x = x + branch; n = norm(x)" reads x and branch, writes x, then reads x two or three
// times more (stats, then normalise) and writes n. Here one block per row reads a and b once, rounds a + b to the
// storage type (so the statistics see exactly the sum the unfused norm would read back), writes sum, and keeps
// the row in registers for the statistics and the normalised store: NI vectors of V elements per thread, with NI
// picked by the launcher so that NI * threads * V >= C (NI <= 8 covers every model width: 4096 in bf16 is 2 per
// thread, in f32 4). Wider rows (NI = 0) read their own elements of sum back instead, which is safe without a
// barrier because a thread only ever re-reads the elements it wrote itself. For the same reason sum may alias a
// or b. The block sums run in the same order as the unfused kernels', so the statistics agree with them.

// The k-th vector of this thread's part of the row: from registers when cached (NI > 0), else read back from sum.
// The register array is indexed only by unrolled constants, so it stays in registers.
template <typename T, int V, int NI, int NR>
__device__ __forceinline__ void add_norm_values(float (&v)[V], const float (&cache)[NR][V], int k, const T *sr) {
    if constexpr (NI > 0) {
#pragma unroll
        for (int r = 0; r < NR; r++)
            if (r == k)
#pragma unroll
                for (int j = 0; j < V; j++) v[j] = cache[r][j];
    } else {
        load_vec<T, V>(sr, v);
    }
}

template <typename T, int V, int NI, bool RMS>
__global__ void add_norm_kernel(T *sum, T *out, float *mean, float *rstd, const T *a, const T *b, const T *w,
                                const T *bias, int64_t C, float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *ar = a + row * C, *br = b + row * C;
    T *sr = sum + row * C, *outr = out + row * C;
    const int64_t step = (int64_t)blockDim.x * V, first = (int64_t)threadIdx.x * V;
    constexpr int NR = NI > 0 ? NI : 1;
    float cache[NR][V];  // the rounded sums, when NI > 0

    // Pass 1: sum = a + b (written once), and the first statistic.
    float s1 = 0.0f;
    int k = 0;
    for (int64_t i = first; i < C; i += step, k++) {
        float av[V], bv[V];
        load_vec<T, V>(ar + i, av);
        load_vec<T, V>(br + i, bv);
#pragma unroll
        for (int j = 0; j < V; j++) av[j] = to_f32(from_f32<T>(av[j] + bv[j]));  // exactly what sum holds
        store_vec<T, V>(sr + i, av);
#pragma unroll
        for (int j = 0; j < V; j++) s1 += RMS ? av[j] * av[j] : av[j];
        if constexpr (NI > 0) {
#pragma unroll
            for (int r = 0; r < NR; r++)
                if (r == k)
#pragma unroll
                    for (int j = 0; j < V; j++) cache[r][j] = av[j];
        }
    }

    float mu = 0.0f, rs;
    if constexpr (RMS) {
        rs = 1.0f / sqrtf(block_sum(s1, scratch) / (float)C + eps);
    } else {
        mu = block_sum(s1, scratch) / (float)C;
        float ss = 0.0f;  // two-pass variance, as layernorm_kernel
        k = 0;
        for (int64_t i = first; i < C; i += step, k++) {
            float v[V];
            add_norm_values<T, V, NI, NR>(v, cache, k, sr + i);
#pragma unroll
            for (int j = 0; j < V; j++) ss += (v[j] - mu) * (v[j] - mu);
        }
        rs = 1.0f / sqrtf(block_sum(ss, scratch) / (float)C + eps);
    }

    k = 0;
    for (int64_t i = first; i < C; i += step, k++) {
        float v[V], wv[V];
        add_norm_values<T, V, NI, NR>(v, cache, k, sr + i);
        load_vec<T, V>(w + i, wv);
        if constexpr (RMS) {
#pragma unroll
            for (int j = 0; j < V; j++) v[j] = wv[j] * (v[j] * rs);  // HF LLaMA order, as rmsnorm_kernel
        } else {
            float bv[V];
            load_vec<T, V>(bias + i, bv);
#pragma unroll
            for (int j = 0; j < V; j++) v[j] = (v[j] - mu) * rs * wv[j] + bv[j];
        }
        store_vec<T, V>(outr + i, v);
    }
    if (threadIdx.x == 0) {
        if (!RMS && mean) mean[row] = mu;
        if (rstd) rstd[row] = rs;
    }
}

template <typename T, int V, bool RMS>
static Status launch_add_norm_v(cudaStream_t s, void *sum, void *out, float *mean, float *rstd, const void *a,
                                const void *b, const void *w, const void *bias, int64_t rows, int64_t C,
                                float eps) {
    const int64_t vecs = (C + V - 1) / V;
    const int threads = row_threads(vecs);
    const int64_t per_thread = (vecs + threads - 1) / threads;
#define ADD_NORM_LAUNCH(NI)                                                                                   \
    add_norm_kernel<T, V, NI, RMS><<<(unsigned)rows, threads, 0, s>>>((T *)sum, (T *)out, mean, rstd,         \
                                                                      (const T *)a, (const T *)b,             \
                                                                      (const T *)w, (const T *)bias, C, eps)
    if (per_thread <= 1) ADD_NORM_LAUNCH(1);
    else if (per_thread <= 2) ADD_NORM_LAUNCH(2);
    else if (per_thread <= 4) ADD_NORM_LAUNCH(4);
    else if (per_thread <= 8) ADD_NORM_LAUNCH(8);
    else ADD_NORM_LAUNCH(0);
#undef ADD_NORM_LAUNCH
    CUDA_LAUNCH_CHECK("add_norm_kernel");
    return AGPT_OK;
}

template <typename T, bool RMS>
static Status launch_add_norm(cudaStream_t s, void *sum, void *out, float *mean, float *rstd, const void *a,
                              const void *b, const void *w, const void *bias, int64_t rows, int64_t C, float eps) {
    if (rows_vectorisable<T>(C, {sum, out, a, b, w, bias}))
        return launch_add_norm_v<T, vec16<T>(), RMS>(s, sum, out, mean, rstd, a, b, w, bias, rows, C, eps);
    return launch_add_norm_v<T, 1, RMS>(s, sum, out, mean, rstd, a, b, w, bias, rows, C, eps);
}

template <typename T>
static Status launch_add_layernorm(cudaStream_t s, void *sum, void *out, float *mean, float *rstd, const void *a,
                                   const void *b, const void *w, const void *bias, int64_t rows, int64_t C,
                                   float eps) {
    return launch_add_norm<T, false>(s, sum, out, mean, rstd, a, b, w, bias, rows, C, eps);
}

template <typename T>
static Status launch_add_rmsnorm(cudaStream_t s, void *sum, void *out, float *rstd, const void *a, const void *b,
                                 const void *w, int64_t rows, int64_t C, float eps) {
    return launch_add_norm<T, true>(s, sum, out, NULL, rstd, a, b, w, NULL, rows, C, eps);
}

extern "C" Status cuda_add_layernorm(Engine *e, DType dt, void *sum, void *out, float *mean, float *rstd,
                                     const void *a, const void *b, const void *w, const void *bias, int64_t rows,
                                     int64_t C, float eps) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    AGPT_CHECK_ARG(bias != NULL, "cuda_add_layernorm: the LayerNorm bias is required");
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_add_layernorm, engine_stream(e), sum, out, mean, rstd, a, b, w, bias, rows, C,
                          eps);
}

extern "C" Status cuda_add_rmsnorm(Engine *e, DType dt, void *sum, void *out, float *rstd, const void *a,
                                   const void *b, const void *w, int64_t rows, int64_t C, float eps) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_add_rmsnorm, engine_stream(e), sum, out, rstd, a, b, w, rows, C, eps);
}
