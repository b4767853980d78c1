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
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < nwarps ? sm[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
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
