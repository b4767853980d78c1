// Embedding lookup on the GPU: out[i] = table[ids[i]].
//
// The ids arrive in host memory (kernels/ops.c has checked them). They are staged in e->workspace with a
// cudaMemcpyAsync on the engine's stream, so no allocation per call; the workspace is shared with matmul and
// the other ops, but every use is ordered on the same stream, so reuse between calls is safe. More ids than fit
// the workspace go in chunks, each copy ordered after the previous chunk's gather. A pure copy of storage bits:
// exact in every dtype.
#include "kernels/cuda/common.cuh"

static const int kThreads = 256;

// One thread per V consecutive elements of an output row; V = 16 / sizeof(T) moves 16 bytes at a time when
// every row start is 16-byte aligned, V = 1 otherwise.
// rows_in_table > 0 guards the ids (device ids, which the host did not check): an id outside [0, rows_in_table)
// writes a zero row instead of reading out of bounds. 0 trusts them (host ids, already checked).
template <typename T, int V>
__global__ void embedding_kernel(T *out, const T *table, const int32_t *ids, int64_t N, int64_t C,
                                 int64_t rows_in_table) {
    const int64_t cv = C / V, n = N * cv;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / cv, col = (i % cv) * V;
        const int64_t id = ids[row];
        T *dst = out + row * C + col;
        if (rows_in_table > 0 && (id < 0 || id >= rows_in_table)) {
#pragma unroll
            for (int j = 0; j < V; j++) dst[j] = from_f32<T>(0.0f);
            continue;
        }
        const T *src = table + id * C + col;
        if constexpr (V * sizeof(T) == 16) {
            *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
        } else {
#pragma unroll
            for (int j = 0; j < V; j++) dst[j] = src[j];
        }
    }
}

template <typename T>
static Status launch_embedding(cudaStream_t s, void *out, const void *table, const int32_t *ids, int64_t N,
                               int64_t C, int64_t rows_in_table) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {out, table})) {
        embedding_kernel<T, V><<<grid_for(N * (C / V), kThreads), kThreads, 0, s>>>((T *)out, (const T *)table,
                                                                                   ids, N, C, rows_in_table);
    } else {
        embedding_kernel<T, 1><<<grid_for(N * C, kThreads), kThreads, 0, s>>>((T *)out, (const T *)table, ids, N,
                                                                             C, rows_in_table);
    }
    CUDA_LAUNCH_CHECK("embedding_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_embedding(Engine *e, DType dt, void *out, const void *table, const int32_t *ids_host,
                                 int64_t N, int64_t C) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(N >= 0 && C > 0, "%s: bad shape N=%lld C=%lld", __func__, (long long)N, (long long)C);
    if (N == 0) return AGPT_OK;
    AGPT_CHECK_ARG(ids_host != NULL, "%s: ids are missing", __func__);
    AGPT_CHECK_ARG(e->workspace != NULL && e->workspace_bytes >= sizeof(int32_t),
                   "%s: the engine has no workspace (was it created with engine_create?)", __func__);
    cudaStream_t s = engine_stream(e);
    // From pageable memory cudaMemcpyAsync returns once the ids are staged, so the caller may reuse them at
    // once. From page-locked memory the copy really is asynchronous: wait for it before returning then.
    cudaPointerAttributes attr;
    bool pinned = false;
    if (cudaPointerGetAttributes(&attr, ids_host) == cudaSuccess) pinned = attr.type == cudaMemoryTypeHost;
    else (void)cudaGetLastError();  // an unknown host pointer: pageable
    int32_t *dids = (int32_t *)e->workspace;
    const int64_t cap = (int64_t)(e->workspace_bytes / sizeof(int32_t));
    for (int64_t i0 = 0; i0 < N; i0 += cap) {
        const int64_t n = N - i0 < cap ? N - i0 : cap;
        CUDA_TRY(cudaMemcpyAsync(dids, ids_host + i0, (size_t)n * sizeof(int32_t), cudaMemcpyHostToDevice, s));
        if (pinned) CUDA_TRY(cudaStreamSynchronize(s));
        void *o = (char *)out + (size_t)(i0 * C) * dtype_size(dt);
        AGPT_TRY(DISPATCH_FLOAT(dt, launch_embedding, s, o, table, dids, n, C, (int64_t)0));
    }
    return AGPT_OK;
}

extern "C" Status cuda_embedding_dev(Engine *e, DType dt, void *out, const void *table, const int32_t *ids_dev,
                                     int64_t N, int64_t C, int64_t V) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(N >= 0 && C > 0 && V > 0, "%s: bad shape N=%lld C=%lld V=%lld", __func__, (long long)N,
                   (long long)C, (long long)V);
    if (N == 0) return AGPT_OK;
    AGPT_CHECK_ARG(ids_dev != NULL, "%s: ids are missing", __func__);
    return DISPATCH_FLOAT(dt, launch_embedding, engine_stream(e), out, table, ids_dev, N, C, V);
}

// ---------------------------------------------------------------------------------------------------------
// KV-cache append: cache[b * max_seq + pos[b]] = rows[b]. Same vectorisation as the gather, the destination row
// read from the device; a position outside [0, max_seq) skips its row (nothing is written out of bounds).

template <typename T, int V>
__global__ void kv_append_kernel(T *cache, const T *rows, const int32_t *pos, int64_t B, int64_t C,
                                 int64_t max_seq) {
    const int64_t cv = C / V, n = B * cv;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / cv, col = (i % cv) * V;
        const int64_t p = pos[b];
        if (p < 0 || p >= max_seq) continue;
        const T *src = rows + b * C + col;
        T *dst = cache + (b * max_seq + p) * C + col;
        if constexpr (V * sizeof(T) == 16) {
            *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
        } else {
#pragma unroll
            for (int j = 0; j < V; j++) dst[j] = src[j];
        }
    }
}

template <typename T>
static Status launch_kv_append(cudaStream_t s, void *cache, const void *rows, const int32_t *pos, int64_t B,
                               int64_t C, int64_t max_seq) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {cache, rows})) {
        kv_append_kernel<T, V><<<grid_for(B * (C / V), kThreads), kThreads, 0, s>>>((T *)cache, (const T *)rows, pos,
                                                                                   B, C, max_seq);
    } else {
        kv_append_kernel<T, 1><<<grid_for(B * C, kThreads), kThreads, 0, s>>>((T *)cache, (const T *)rows, pos, B, C,
                                                                             max_seq);
    }
    CUDA_LAUNCH_CHECK("kv_append_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_kv_append(Engine *e, DType dt, void *cache, const void *rows, const int32_t *pos, int64_t B,
                                 int64_t C, int64_t max_seq) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && C > 0 && max_seq > 0, "%s: bad shape B=%lld C=%lld max_seq=%lld", __func__,
                   (long long)B, (long long)C, (long long)max_seq);
    if (B == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_kv_append, engine_stream(e), cache, rows, pos, B, C, max_seq);
}
