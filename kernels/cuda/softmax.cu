// Row softmax of scale * x over the last dimension, and its backward. One block per row, rows of any width
// read from global memory per pass (no shared array sized by C).
//
// Forward keeps, per thread, a running (max, sum of exp(v - max)) pair over its elements (the online
// softmax), merges the pairs across the block, then writes exp(v - max) / sum: two reads of the row instead
// of three. The maximum is of scale * x, not scale * max(x), so a negative scale is right too. Elements equal
// to -inf (masks) contribute nothing and never produce inf - inf; a fully masked row comes out as zeros.
//
// Every pass reads a row completely before the final pass writes it (the reductions sit between them), and
// each element is written by the thread that read it, so out may alias x and dx may alias dout.
#include <stdlib.h>

#include "kernels/cuda/common.cuh"

// Merges the running pair (m, s) with (m2, s2). A -inf max means "nothing seen yet": its sum is 0, and it
// must not enter expf, where -inf - -inf would make a NaN.
__device__ __forceinline__ void online_merge(float &m, float &s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;  // both empty
    const float a = m == -INFINITY ? 0.0f : s * expf(m - mn);
    const float b = m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mn);
    m = mn;
    s = a + b;
}

// The (max, sum) pairs of a warp's 32 lanes merged; every lane ends with the warp's pair.
__device__ __forceinline__ void warp_online_merge(float &m, float &s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
}

// Adds one value to the running pair: one expf per element.
__device__ __forceinline__ void online_add(float &m, float &s, float v) {
    if (v == -INFINITY) return;  // a masked element: exp(-inf) = 0
    if (v > m) {
        s = s * expf(m - v) + 1.0f;  // m = -inf (nothing yet) gives s = 0 * 0 + 1
        m = v;
    } else {
        s += expf(v - m);  // also the NaN path: a NaN input makes the row NaN, as it should
    }
}

template <typename T, int V>
__global__ void softmax_kernel(T *out, const T *x, int64_t C, float scale) {
    __shared__ float sm[32], ss[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * C;
    T *outr = out + row * C;
    const int64_t step = (int64_t)blockDim.x * V;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

    float m = -INFINITY, s = 0.0f;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) online_add(m, s, scale * v[j]);
    }
    // Warp, then block, merge; every thread ends with the row's (max, sum).
    warp_online_merge(m, s);
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < nwarps ? sm[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.0f;
    warp_online_merge(m, s);
    // A row that is all -inf (fully masked) gives zeros rather than NaN, as the CPU reference does.
    const bool empty = m == -INFINITY;
    const float inv = empty ? 0.0f : 1.0f / s;

    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = empty ? 0.0f : expf(scale * v[j] - m) * inv;
        store_vec<T, V>(outr + i, v);
    }
}

template <typename T>
static Status launch_softmax(cudaStream_t s, void *out, const void *x, int64_t rows, int64_t C, float scale) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {out, x})) {
        softmax_kernel<T, V><<<(unsigned)rows, row_threads(C / V), 0, s>>>((T *)out, (const T *)x, C, scale);
    } else {
        softmax_kernel<T, 1><<<(unsigned)rows, row_threads(C), 0, s>>>((T *)out, (const T *)x, C, scale);
    }
    CUDA_LAUNCH_CHECK("softmax_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_softmax(Engine *e, DType dt, void *out, const void *x, int64_t rows, int64_t C,
                               float scale) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_softmax, engine_stream(e), out, x, rows, C, scale);
}

// dx = scale * y * (dout - sum(dout * y)).
template <typename T, int V>
__global__ void softmax_backward_kernel(T *dx, const T *dout, const T *y, int64_t C, float scale) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *gr = dout + row * C, *yr = y + row * C;
    T *dxr = dx + row * C;
    const int64_t step = (int64_t)blockDim.x * V;

    float dot = 0.0f;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float g[V], yv[V];
        load_vec<T, V>(gr + i, g);
        load_vec<T, V>(yr + i, yv);
#pragma unroll
        for (int j = 0; j < V; j++) dot += g[j] * yv[j];
    }
    dot = block_sum(dot, scratch);

    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float g[V], yv[V];
        load_vec<T, V>(gr + i, g);
        load_vec<T, V>(yr + i, yv);
#pragma unroll
        for (int j = 0; j < V; j++) g[j] = scale * yv[j] * (g[j] - dot);
        store_vec<T, V>(dxr + i, g);
    }
}

template <typename T>
static Status launch_softmax_backward(cudaStream_t s, void *dx, const void *dout, const void *y, int64_t rows,
                                      int64_t C, float scale) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {dx, dout, y})) {
        softmax_backward_kernel<T, V><<<(unsigned)rows, row_threads(C / V), 0, s>>>((T *)dx, (const T *)dout,
                                                                                    (const T *)y, C, scale);
    } else {
        softmax_backward_kernel<T, 1><<<(unsigned)rows, row_threads(C), 0, s>>>((T *)dx, (const T *)dout,
                                                                                (const T *)y, C, scale);
    }
    CUDA_LAUNCH_CHECK("softmax_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_softmax_backward(Engine *e, DType dt, void *dx, const void *dout, const void *y,
                                        int64_t rows, int64_t C, float scale) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_softmax_backward, engine_stream(e), dx, dout, y, rows, C, scale);
}

// ---------------------------------------------------------------------------------------------------------
// Fused cross-entropy: per row, loss = logsumexp(x) - x[target] and dx = grad_scale * (softmax(x) - onehot).
//
// One block per row. Pass 1 is the online (max, sum) pass above, over the row in global memory; pass 2 reads the
// row again (from L2 for a 32001-wide f32 row: 128 KiB) and writes the gradient. The target logit is read by
// thread 0 before the block merge, and every element is written by the thread that read it after that merge, so
// dlogits may alias logits. A NaN or +inf logit makes the whole row NaN, as the CPU's double loop does (the
// online merge alone could drop a NaN seen by a thread with nothing else). Ignored rows write zeros and loss 0.

template <typename T, int V>
__global__ void cross_entropy_kernel(T *dlogits, float *row_loss, const T *logits, const int32_t *targets,
                                     int64_t C, int32_t ignore_index, float grad_scale) {
    __shared__ float sm[32], ss[32];
    const int64_t row = blockIdx.x;
    const int32_t t = targets[row];
    const T *xr = logits + row * C;
    T *dr = dlogits ? dlogits + row * C : nullptr;
    const int64_t step = (int64_t)blockDim.x * V;
    if (t == ignore_index) {  // the whole block takes this branch
        if (dr) {
            float z[V];
#pragma unroll
            for (int j = 0; j < V; j++) z[j] = 0.0f;
            for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) store_vec<T, V>(dr + i, z);
        }
        if (row_loss && threadIdx.x == 0) row_loss[row] = 0.0f;
        return;
    }
    const float xt = threadIdx.x == 0 ? to_f32(xr[t]) : 0.0f;  // before any write of the row

    float m = -INFINITY, s = 0.0f;
    int bad = 0;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) {
            bad |= !(v[j] < INFINITY);  // NaN or +inf
            online_add(m, s, v[j]);
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    warp_online_merge(m, s);
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    bad = __syncthreads_or(bad);  // also the barrier after the shared writes
    m = lane < nwarps ? sm[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.0f;
    warp_online_merge(m, s);
    if (bad) m = NAN;  // every output of the row becomes NaN
    // m is a logit, s >= 1 (the maximum contributes exp(0)); an all -inf row gives NaN through -inf - -inf.
    if (row_loss && threadIdx.x == 0) row_loss[row] = (m - xt) + logf(s);
    if (!dr) return;
    const float inv = 1.0f / s;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) {
            float p = expf(v[j] - m) * inv;
            if (i + j == t) p -= 1.0f;
            v[j] = grad_scale * p;
        }
        store_vec<T, V>(dr + i, v);
    }
}

template <typename T>
static Status launch_cross_entropy(cudaStream_t s, void *dlogits, float *row_loss, const void *logits,
                                   const int32_t *targets, int64_t rows, int64_t C, int32_t ignore_index,
                                   float grad_scale) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {dlogits, logits})) {
        cross_entropy_kernel<T, V><<<(unsigned)rows, row_threads(C / V), 0, s>>>(
            (T *)dlogits, row_loss, (const T *)logits, targets, C, ignore_index, grad_scale);
    } else {
        cross_entropy_kernel<T, 1><<<(unsigned)rows, row_threads(C), 0, s>>>(
            (T *)dlogits, row_loss, (const T *)logits, targets, C, ignore_index, grad_scale);
    }
    CUDA_LAUNCH_CHECK("cross_entropy_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_cross_entropy(Engine *e, DType dt, double *loss_sum, void *dlogits, const void *logits,
                                     const int32_t *targets_host, int64_t rows, int64_t V, int32_t ignore_index,
                                     float grad_scale) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, V);
    if (loss_sum) *loss_sum = 0.0;
    if (rows == 0 || (!loss_sum && !dlogits)) return AGPT_OK;
    AGPT_CHECK_ARG(targets_host != NULL, "%s: targets are missing", __func__);
    AGPT_CHECK_ARG(e->workspace != NULL && e->workspace_bytes >= 512,
                   "%s: the engine has no workspace (was it created with engine_create?)", __func__);
    cudaStream_t s = engine_stream(e);
    // Workspace: targets (i32) of a chunk of rows, then (256-byte aligned) their losses (f32).
    const int64_t cap = (int64_t)((e->workspace_bytes - 256) / 8);
    const int64_t chunk = rows < cap ? rows : cap;
    int32_t *dtargets = (int32_t *)e->workspace;
    float *dloss = (float *)((char *)e->workspace + ((size_t)cap * sizeof(int32_t) + 255) / 256 * 256);
    float *hloss = NULL;
    if (loss_sum) {
        hloss = (float *)malloc((size_t)chunk * sizeof(float));
        if (!hloss) return AGPT_FAIL(AGPT_ERR_OOM, "%s: no host memory for %lld row losses", __func__, (long long)chunk);
    }
    // As cuda_embedding: from pageable memory the copy has staged the targets when it returns; from page-locked
    // memory wait for it, so the caller may reuse the targets once this returns.
    cudaPointerAttributes attr;
    bool pinned = false;
    if (cudaPointerGetAttributes(&attr, targets_host) == cudaSuccess) pinned = attr.type == cudaMemoryTypeHost;
    else (void)cudaGetLastError();
    const size_t es = dtype_size(dt);
    double sum = 0.0;
    Status st = AGPT_OK;
    for (int64_t r0 = 0; r0 < rows && st == AGPT_OK; r0 += chunk) {
        const int64_t n = rows - r0 < chunk ? rows - r0 : chunk;
        cudaError_t ce = cudaMemcpyAsync(dtargets, targets_host + r0, (size_t)n * sizeof(int32_t),
                                         cudaMemcpyHostToDevice, s);
        if (ce == cudaSuccess && pinned) ce = cudaStreamSynchronize(s);
        if (ce != cudaSuccess) {
            st = AGPT_FAIL(AGPT_ERR_DEVICE, "%s: copying %lld targets failed: %s", __func__, (long long)n,
                           cudaGetErrorString(ce));
            break;
        }
        void *d = dlogits ? (char *)dlogits + (size_t)(r0 * V) * es : NULL;
        const void *x = (const char *)logits + (size_t)(r0 * V) * es;
        st = DISPATCH_FLOAT(dt, launch_cross_entropy, s, d, loss_sum ? dloss : nullptr, x, dtargets, n, V,
                            ignore_index, grad_scale);
        if (st != AGPT_OK || !loss_sum) continue;
        ce = cudaMemcpyAsync(hloss, dloss, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost, s);
        if (ce == cudaSuccess) ce = cudaStreamSynchronize(s);
        if (ce != cudaSuccess) {
            st = AGPT_FAIL(AGPT_ERR_DEVICE, "%s: reading %lld row losses failed: %s", __func__, (long long)n,
                           cudaGetErrorString(ce));
            break;
        }
        for (int64_t i = 0; i < n; i++) sum += (double)hloss[i];  // row order: deterministic
    }
    free(hloss);
    if (st == AGPT_OK && loss_sum) *loss_sum = sum;
    return st;
}
