// Shared pieces of the CUDA backend: error checks that turn CUDA and cuBLAS failures into a Status with
// file:line and the failing call, storage <-> fp32 conversion, warp and block reductions, dtype dispatch.
// Included only by kernels/cuda/*.cu.
#pragma once

// The C system headers first, so that their include guards are set before the project headers are pulled
// in under extern "C" below.
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <initializer_list>

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The runtime and engine headers are plain C without extern "C" guards: include them with C linkage here,
// before cuda_ops.h includes engine.h again (a no-op then, thanks to #pragma once), so that agpt_fail_at
// and engine_cuda_create link against their C definitions.
extern "C" {
#include "kernels/engine.h"
#include "runtime/dtype.h"
#include "runtime/status.h"
}
#include "kernels/cuda/cuda_ops.h"

// ---------------------------------------------------------------------------------------------------------
// Error checks. Each returns from the enclosing function (which must return Status) with AGPT_ERR_DEVICE.

#define CUDA_TRY(call)                                                                                     \
    do {                                                                                                   \
        cudaError_t cuda_try_e_ = (call);                                                                  \
        if (cuda_try_e_ != cudaSuccess)                                                                    \
            return AGPT_FAIL(AGPT_ERR_DEVICE, "%s failed: %s (%s)", #call, cudaGetErrorString(cuda_try_e_), \
                             cudaGetErrorName(cuda_try_e_));                                               \
    } while (0)

#define CUBLAS_TRY(call)                                                                                   \
    do {                                                                                                   \
        cublasStatus_t cublas_try_s_ = (call);                                                             \
        if (cublas_try_s_ != CUBLAS_STATUS_SUCCESS)                                                        \
            return AGPT_FAIL(AGPT_ERR_DEVICE, "%s failed: %s (%s)", #call,                                 \
                             cublasLtGetStatusString(cublas_try_s_), cublasLtGetStatusName(cublas_try_s_)); \
    } while (0)

// After a kernel launch: launch errors (bad configuration, no kernel image for this GPU) show up only here.
// `what` names the kernel in the message.
#define CUDA_LAUNCH_CHECK(what)                                                                            \
    do {                                                                                                   \
        cudaError_t cuda_launch_e_ = cudaGetLastError();                                                   \
        if (cuda_launch_e_ != cudaSuccess)                                                                 \
            return AGPT_FAIL(AGPT_ERR_DEVICE, "launch of %s failed: %s (%s); is this build compiled for "  \
                             "this GPU's architecture?", (what), cudaGetErrorString(cuda_launch_e_),       \
                             cudaGetErrorName(cuda_launch_e_));                                            \
    } while (0)

static inline cudaStream_t engine_stream(const Engine *e) { return (cudaStream_t)e->stream; }

// Every float storage dtype is one of these three; anything else reaching a kernel is a caller bug.
#define CHECK_FLOAT_DT(dt)                                                                                 \
    do {                                                                                                   \
        if ((dt) != DT_F32 && (dt) != DT_F16 && (dt) != DT_BF16)                                           \
            return AGPT_FAIL(AGPT_ERR_ARG, "%s: dtype %s is not a float storage type (f32, f16, bf16)",   \
                             __func__, dtype_name(dt));                                                    \
    } while (0)

// Calls LAUNCHER<T>(args...) with T the storage type of dt. LAUNCHER is a function template returning Status.
#define DISPATCH_FLOAT(dt, LAUNCHER, ...)                                                                  \
    ((dt) == DT_F32   ? LAUNCHER<float>(__VA_ARGS__)                                                       \
     : (dt) == DT_F16 ? LAUNCHER<__half>(__VA_ARGS__)                                                      \
                      : LAUNCHER<__nv_bfloat16>(__VA_ARGS__))

// ---------------------------------------------------------------------------------------------------------
// Storage <-> fp32. All math is fp32; stores round to nearest even.

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> __device__ __forceinline__ float load_f32(const T *p) { return to_f32(*p); }
template <typename T> __device__ __forceinline__ void store_f32(T *p, float x) { *p = from_f32<T>(x); }

// V consecutive elements through one 16-byte access when V * sizeof(T) == 16 (the caller guarantees the
// alignment), else element by element. V = 1 is the unaligned fallback.
template <typename T, int V> __device__ __forceinline__ void load_vec(const T *p, float (&out)[V]) {
    if constexpr (V * sizeof(T) == 16) {
        union { uint4 u; T t[V]; } pack;
        pack.u = *reinterpret_cast<const uint4 *>(p);
#pragma unroll
        for (int j = 0; j < V; j++) out[j] = to_f32(pack.t[j]);
    } else {
#pragma unroll
        for (int j = 0; j < V; j++) out[j] = to_f32(p[j]);
    }
}
template <typename T, int V> __device__ __forceinline__ void store_vec(T *p, const float (&in)[V]) {
    if constexpr (V * sizeof(T) == 16) {
        union { uint4 u; T t[V]; } pack;
#pragma unroll
        for (int j = 0; j < V; j++) pack.t[j] = from_f32<T>(in[j]);
        *reinterpret_cast<uint4 *>(p) = pack.u;
    } else {
#pragma unroll
        for (int j = 0; j < V; j++) p[j] = from_f32<T>(in[j]);
    }
}

// Elements per 16-byte vector for storage type T.
template <typename T> constexpr int vec16() { return (int)(16 / sizeof(T)); }

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// ---------------------------------------------------------------------------------------------------------
// Reductions. Butterfly (xor) shuffles leave the result in every lane, which the callers rely on.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// This thread's share of the sum of squares of a row of C elements, read V at a time with a block-strided loop
// (the row-norm kernels' first pass; block_sum finishes it).
template <typename T, int V>
__device__ __forceinline__ float thread_sum_squares(const T *row, int64_t C) {
    float ss = 0.0f;
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += (int64_t)blockDim.x * V) {
        float v[V];
        load_vec<T, V>(row + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) ss += v[j] * v[j];
    }
    return ss;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32 (at most 1024).
// `scratch` is 32 floats of shared memory; the leading __syncthreads makes back-to-back calls with the
// same scratch safe.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// Grid size for a grid-stride loop over `work` items: enough blocks to fill the GPU several times over,
// never more than needed, never zero.
static inline unsigned grid_for(int64_t work, int threads) {
    int64_t blocks = (work + threads - 1) / threads;
    if (blocks > 65536) blocks = 65536;
    if (blocks < 1) blocks = 1;
    return (unsigned)blocks;
}

// ---------------------------------------------------------------------------------------------------------
// One-block-per-row kernels (norms, softmax).

// Threads for a one-block-per-row kernel over C/V vectors: enough to cover short rows in one go without
// idle warps, 256 for long rows (several vectors per thread keeps loads in flight).
static inline int row_threads(int64_t vecs) {
    if (vecs >= 256) return 256;
    int t = (int)((vecs + 31) / 32 * 32);
    return t < 32 ? 32 : t;
}

// Rows can use 16-byte vectors when every row start is 16-byte aligned: aligned bases and C a multiple of
// the vector width.
template <typename T> static inline bool rows_vectorisable(int64_t C, std::initializer_list<const void *> ptrs) {
    if (C % vec16<T>() != 0) return false;
    for (const void *p : ptrs)
        if (p && !aligned16(p)) return false;
    return true;
}

#define CHECK_ROWS(rows, C)                                                                                \
    AGPT_CHECK_ARG((rows) >= 0 && (C) > 0 && (rows) <= INT32_MAX, "%s: bad shape rows=%lld C=%lld",       \
                   __func__, (long long)(rows), (long long)(C))
