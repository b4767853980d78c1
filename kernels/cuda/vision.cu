// The vision path on the GPU: L2 row normalisation, bilinear resize (align_corners=True), the few-shot max
// dot product, the two-class softmax of the anomaly map, axpy/affine, and image -> patch rows.
//
// Storage f32/f16/bf16, math fp32. The resize computes its indices and weights exactly as the CPU backend
// (and PyTorch) do and blends with explicit fused multiply-adds in the same places, so in f32 it agrees with
// the CPU, and with PyTorch's CUDA kernel, bit for bit.
//
// max_dot is a small SGEMM with the max fused in: a block takes a tile of 64 queries and walks tiles of 64
// references, staging 16-wide slices of both in shared memory; each of its 256 threads owns 4 x 4 dot
// products and folds them into a running max per query. When several blocks share a query tile (to fill the
// GPU when there are few queries), each writes its partial maxima to e->workspace and a second kernel takes
// the max of those: deterministic, no atomics, and the dots never round to the storage type.
#include "kernels/cuda/common.cuh"

static const int kThreads = 256;

// torch.max semantics: a NaN anywhere wins and stays (fmaxf would drop it).
__device__ __forceinline__ float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

// ---------------------------------------------------------------------------------------------------------
// L2 normalize: one block per row; a sum-of-squares pass, then the division pass.

template <typename T, int V>
__global__ void l2_normalize_kernel(T *out, const T *x, int64_t C, float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * C;
    T *outr = out + row * C;
    const int64_t step = (int64_t)blockDim.x * V;
    const float ss = thread_sum_squares<T, V>(xr, C);
    // block_sum synchronises after every thread's reads: the writes below may overwrite x (out aliasing x).
    const float norm = sqrtf(block_sum(ss, scratch));
    const float d = norm < eps ? eps : norm;  // clamp_min: a NaN norm stays NaN
    for (int64_t i = (int64_t)threadIdx.x * V; i < C; i += step) {
        float v[V];
        load_vec<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = v[j] / d;
        store_vec<T, V>(outr + i, v);
    }
}

template <typename T>
static Status launch_l2_normalize(cudaStream_t s, void *out, const void *x, int64_t rows, int64_t C, float eps) {
    constexpr int V = vec16<T>();
    if (rows_vectorisable<T>(C, {out, x})) {
        l2_normalize_kernel<T, V><<<(unsigned)rows, row_threads(C / V), 0, s>>>((T *)out, (const T *)x, C, eps);
    } else {
        l2_normalize_kernel<T, 1><<<(unsigned)rows, row_threads(C), 0, s>>>((T *)out, (const T *)x, C, eps);
    }
    CUDA_LAUNCH_CHECK("l2_normalize_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_l2_normalize(Engine *e, DType dt, void *out, const void *x, int64_t rows, int64_t C,
                                    float eps) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_l2_normalize, engine_stream(e), out, x, rows, C, eps);
}

// ---------------------------------------------------------------------------------------------------------
// Bilinear resize, align_corners=True: one thread per output pixel.

// PyTorch's compute_source_index_and_lambda (align_corners, opmath float), as kernels/cpu/vision.c.
__device__ __forceinline__ void bilinear_axis(int64_t i, int64_t in, int64_t out, float scale, int64_t &i0,
                                              int64_t &i1, float &l0, float &l1) {
    if (in == out) {
        i0 = i1 = i;
        l0 = 1.0f, l1 = 0.0f;
        return;
    }
    const float src = scale * (float)i;
    int64_t idx = (int64_t)floorf(src);
    if (idx > in - 1) idx = in - 1;
    float lam = src - (float)idx;
    lam = fminf(fmaxf(lam, 0.0f), 1.0f);
    i0 = idx;
    i1 = idx + (idx < in - 1 ? 1 : 0);
    l1 = lam;
    l0 = 1.0f - lam;
}

template <typename T>
__global__ void upsample_bilinear_kernel(T *out, const T *x, int64_t BC, int64_t h, int64_t w, int64_t H, int64_t W,
                                         float sh, float sw) {
    const int64_t n = BC * H * W;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ox = i % W, t = i / W, oy = t % H, c = t / H;
        int64_t y0, y1, x0, x1;
        float hl0, hl1, wl0, wl1;
        bilinear_axis(oy, h, H, sh, y0, y1, hl0, hl1);
        bilinear_axis(ox, w, W, sw, x0, x1, wl0, wl1);
        const T *r0 = x + (c * h + y0) * w, *r1 = x + (c * h + y1) * w;
        // Width then height, each a*b + c*d as fma(a, b, round(c*d)): the CPU backend's (and PyTorch's)
        // arithmetic, spelled out so that the compiler's own contraction choices cannot change it.
        const float t0 = __fmaf_rn(to_f32(r0[x0]), wl0, __fmul_rn(to_f32(r0[x1]), wl1));
        const float t1 = __fmaf_rn(to_f32(r1[x0]), wl0, __fmul_rn(to_f32(r1[x1]), wl1));
        out[i] = from_f32<T>(__fmaf_rn(t0, hl0, __fmul_rn(t1, hl1)));
    }
}

template <typename T>
static Status launch_upsample_bilinear(cudaStream_t s, void *out, const void *x, int64_t BC, int64_t h, int64_t w,
                                       int64_t H, int64_t W) {
    // area_pixel_compute_scale for align_corners, in float as PyTorch: (in - 1) / (out - 1), 0 for out = 1.
    const float sh = H > 1 ? (float)(h - 1) / (float)(H - 1) : 0.0f;
    const float sw = W > 1 ? (float)(w - 1) / (float)(W - 1) : 0.0f;
    upsample_bilinear_kernel<T><<<grid_for(BC * H * W, kThreads), kThreads, 0, s>>>((T *)out, (const T *)x, BC, h,
                                                                                   w, H, W, sh, sw);
    CUDA_LAUNCH_CHECK("upsample_bilinear_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_upsample_bilinear(Engine *e, DType dt, void *out, const void *x, int64_t BC, int64_t h,
                                         int64_t w, int64_t H, int64_t W) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(BC >= 0 && h > 0 && w > 0 && H >= 0 && W >= 0, "%s: bad shape BC=%lld %lldx%lld -> %lldx%lld",
                   __func__, (long long)BC, (long long)h, (long long)w, (long long)H, (long long)W);
    if (BC == 0 || H == 0 || W == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_upsample_bilinear, engine_stream(e), out, x, BC, h, w, H, W);
}

// ---------------------------------------------------------------------------------------------------------
// Max dot product: out[q] = max_r <query[q], refs[r]>.

#define MD_TILE 64  // queries and references per tile
#define MD_TK 16    // slice of D staged in shared memory per step
#define MD_PAD 4    // keeps the transposed stores from all hitting one bank

// Thread (tx, ty) of the 16 x 16 block owns queries ty + 16 i and references tx + 16 j, i, j < 4. partial is
// [gridDim.y, Q] when gridDim.y > 1 (one row of maxima per reference stripe); otherwise NULL and the block
// writes out directly.
template <typename T>
__global__ void __launch_bounds__(256)
    max_dot_kernel(float *partial, T *out, const T *query, const T *refs, int64_t Q, int64_t R, int64_t D,
                   int64_t r_tiles) {
    __shared__ float qs[MD_TK][MD_TILE + MD_PAD];  // qs[k][query in tile]
    __shared__ float rs[MD_TK][MD_TILE + MD_PAD];  // rs[k][reference in tile]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int64_t q0 = (int64_t)blockIdx.x * MD_TILE;
    float best[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};

    for (int64_t tile = blockIdx.y; tile < r_tiles; tile += gridDim.y) {
        const int64_t r0 = tile * MD_TILE;
        float acc[4][4] = {};
        for (int64_t k0 = 0; k0 < D; k0 += MD_TK) {
            // 64 rows x 16 columns of each operand: 1024 elements, 4 per thread; zeros outside the matrices.
#pragma unroll
            for (int l = 0; l < 4; l++) {
                const int idx = threadIdx.x + l * 256, row = idx >> 4, k = idx & 15;
                const int64_t gk = k0 + k, gq = q0 + row, gr = r0 + row;
                qs[k][row] = (gq < Q && gk < D) ? to_f32(query[gq * D + gk]) : 0.0f;
                rs[k][row] = (gr < R && gk < D) ? to_f32(refs[gr * D + gk]) : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < MD_TK; k++) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; i++) a[i] = qs[k][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; j++) b[j] = rs[k][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (r0 + tx + 16 * j < R)
#pragma unroll
                for (int i = 0; i < 4; i++) best[i] = max_nan(best[i], acc[i][j]);
    }

    // The 16 threads of one ty sit in one half-warp (lane = 16 (ty & 1) + tx): xor offsets below 16 stay in it.
    // Lane tx = 0 always saw a valid reference (every stripe starts inside R), so the result is finite.
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) best[i] = max_nan(best[i], __shfl_xor_sync(0xffffffffu, best[i], o));
    if (tx == 0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int64_t q = q0 + ty + 16 * i;
            if (q >= Q) continue;
            if (partial) partial[(int64_t)blockIdx.y * Q + q] = best[i];
            else out[q] = from_f32<T>(best[i]);
        }
    }
}

template <typename T>
__global__ void max_dot_reduce_kernel(T *out, const float *partial, int64_t Q, int stripes) {
    for (int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; q < Q; q += (int64_t)gridDim.x * blockDim.x) {
        float m = partial[q];
        for (int g = 1; g < stripes; g++) m = max_nan(m, partial[(int64_t)g * Q + q]);
        out[q] = from_f32<T>(m);
    }
}

template <typename T>
static Status launch_max_dot(Engine *e, void *out, const void *query, const void *refs, int64_t Q, int64_t R,
                             int64_t D) {
    cudaStream_t s = engine_stream(e);
    const int64_t q_tiles = (Q + MD_TILE - 1) / MD_TILE, r_tiles = (R + MD_TILE - 1) / MD_TILE;
    AGPT_CHECK_ARG(q_tiles <= INT32_MAX, "cuda_max_dot: %lld queries are too many for one launch", (long long)Q);
    // Split the references into stripes only as far as needed to give every SM a few blocks, and only as far
    // as the partial maxima fit in the workspace.
    int sms = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, e->gpu_index));
    const int64_t want_blocks = 4 * (int64_t)(sms > 0 ? sms : 1);
    int64_t stripes = (want_blocks + q_tiles - 1) / q_tiles;
    if (stripes > r_tiles) stripes = r_tiles;
    if (stripes > 65535) stripes = 65535;
    const int64_t fit = e->workspace ? (int64_t)(e->workspace_bytes / ((size_t)Q * sizeof(float))) : 0;
    if (stripes > fit) stripes = fit;
    if (stripes < 2) stripes = 1;

    float *partial = stripes > 1 ? (float *)e->workspace : NULL;
    dim3 grid((unsigned)q_tiles, (unsigned)stripes);
    max_dot_kernel<T><<<grid, 256, 0, s>>>(partial, (T *)out, (const T *)query, (const T *)refs, Q, R, D, r_tiles);
    CUDA_LAUNCH_CHECK("max_dot_kernel");
    if (partial) {
        max_dot_reduce_kernel<T><<<grid_for(Q, kThreads), kThreads, 0, s>>>((T *)out, partial, Q, (int)stripes);
        CUDA_LAUNCH_CHECK("max_dot_reduce_kernel");
    }
    return AGPT_OK;
}

extern "C" Status cuda_max_dot(Engine *e, DType dt, void *out, const void *query, const void *refs, int64_t Q,
                               int64_t R, int64_t D) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(Q >= 0 && R > 0 && D > 0, "%s: bad shape Q=%lld R=%lld D=%lld (R and D must be >= 1)", __func__,
                   (long long)Q, (long long)R, (long long)D);
    if (Q == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_max_dot, e, out, query, refs, Q, R, D);
}

// ---------------------------------------------------------------------------------------------------------
// Two-class softmax, class 1: one thread per pixel.

template <typename T>
__global__ void softmax2_class1_kernel(T *out, const T *logits, int64_t B, int64_t N) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < B * N; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / N, n = i % N;
        const float l0 = to_f32(logits[(b * 2) * N + n]), l1 = to_f32(logits[(b * 2 + 1) * N + n]);
        const float m = fmaxf(l0, l1);
        const float e0 = expf(l0 - m), e1 = expf(l1 - m);
        out[i] = from_f32<T>(e1 / (e0 + e1));
    }
}

template <typename T>
static Status launch_softmax2_class1(cudaStream_t s, void *out, const void *logits, int64_t B, int64_t N) {
    softmax2_class1_kernel<T><<<grid_for(B * N, kThreads), kThreads, 0, s>>>((T *)out, (const T *)logits, B, N);
    CUDA_LAUNCH_CHECK("softmax2_class1_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_softmax2_class1(Engine *e, DType dt, void *out, const void *logits, int64_t B, int64_t N) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && N >= 0, "%s: bad shape B=%lld N=%lld", __func__, (long long)B, (long long)N);
    if (B * N == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_softmax2_class1, engine_stream(e), out, logits, B, N);
}

// ---------------------------------------------------------------------------------------------------------
// axpy and affine: in-place maps over 16-byte vectors when aligned, element by element otherwise.

template <typename T, int V>
__global__ void axpy_kernel(T *y, const T *x, int64_t n, float alpha) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
        float a[V], b[V];
        load_vec<T, V>(y + i * V, a);
        load_vec<T, V>(x + i * V, b);
#pragma unroll
        for (int j = 0; j < V; j++) a[j] += alpha * b[j];
        store_vec<T, V>(y + i * V, a);
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) y[i] = from_f32<T>(to_f32(y[i]) + alpha * to_f32(x[i]));
}

template <typename T, int V>
__global__ void affine_kernel(T *x, int64_t n, float a, float b) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
        float v[V];
        load_vec<T, V>(x + i * V, v);
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = a * v[j] + b;
        store_vec<T, V>(x + i * V, v);
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) x[i] = from_f32<T>(a * to_f32(x[i]) + b);
}

template <typename T>
static Status launch_axpy(cudaStream_t s, void *y, const void *x, int64_t n, float alpha) {
    constexpr int V = vec16<T>();
    if (aligned16(y) && aligned16(x))
        axpy_kernel<T, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, s>>>((T *)y, (const T *)x, n, alpha);
    else
        axpy_kernel<T, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)y, (const T *)x, n, alpha);
    CUDA_LAUNCH_CHECK("axpy_kernel");
    return AGPT_OK;
}

template <typename T>
static Status launch_affine(cudaStream_t s, void *x, int64_t n, float a, float b) {
    constexpr int V = vec16<T>();
    if (aligned16(x))
        affine_kernel<T, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, s>>>((T *)x, n, a, b);
    else
        affine_kernel<T, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)x, n, a, b);
    CUDA_LAUNCH_CHECK("affine_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_axpy(Engine *e, DType dt, void *y, const void *x, int64_t n, float alpha) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(n >= 0, "%s: negative element count %lld", __func__, (long long)n);
    if (n == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_axpy, engine_stream(e), y, x, n, alpha);
}

extern "C" Status cuda_affine(Engine *e, DType dt, void *x, int64_t n, float a, float b) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(n >= 0, "%s: negative element count %lld", __func__, (long long)n);
    if (n == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_affine, engine_stream(e), x, n, a, b);
}

// ---------------------------------------------------------------------------------------------------------
// Image -> patch rows: one thread per output element (writes coalesced; reads in runs of p).

template <typename T>
__global__ void im2patches_kernel(T *out, const T *img, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p) {
    const int64_t pw = W / p, np = (H / p) * pw, pp = p * p, cols = C * pp, n = B * np * cols;
    for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < n; o += (int64_t)gridDim.x * blockDim.x) {
        const int64_t col = o % cols, row = o / cols;
        const int64_t b = row / np, patch = row % np, py = patch / pw, px = patch % pw;
        const int64_t c = col / pp, ij = col % pp, i = ij / p, j = ij % p;
        out[o] = img[((b * C + c) * H + py * p + i) * W + px * p + j];
    }
}

template <typename T>
static Status launch_im2patches(cudaStream_t s, void *out, const void *img, int64_t B, int64_t C, int64_t H,
                                int64_t W, int64_t p) {
    im2patches_kernel<T><<<grid_for(B * C * H * W, kThreads), kThreads, 0, s>>>((T *)out, (const T *)img, B, C, H, W,
                                                                               p);
    CUDA_LAUNCH_CHECK("im2patches_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_im2patches(Engine *e, DType dt, void *out, const void *img, int64_t B, int64_t C, int64_t H,
                                  int64_t W, int64_t p) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && C >= 0 && H >= 0 && W >= 0 && p >= 1 && H % p == 0 && W % p == 0,
                   "%s: bad shape [%lld,%lld,%lld,%lld] for patch %lld (H and W must be multiples of it)", __func__,
                   (long long)B, (long long)C, (long long)H, (long long)W, (long long)p);
    if (B * C * H * W == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_im2patches, engine_stream(e), out, img, B, C, H, W, p);
}

// ---------------------------------------------------------------------------------------------------------
// The anomaly map's fused per-layer step on the GPU (op_upsample_softmax2_axpy): out [B,H,W] += alpha *
// class-1 softmax of logits [B,2,h,w] resized bilinearly with align_corners=True.
//
// Unfused, each decoder layer writes two upsampled planes (2 x H x W), reads them back for the softmax, writes the
// probabilities, and reads them and the map again for the axpy: about 7 H x W passes. Here one thread per output
// pixel reads its 2 x 4 grid values (a 2 x 16 x 16 grid sits in L1/L2 for the whole image) and reads and writes
// out once. The arithmetic is the resize's and softmax's above: PyTorch's source index and lambda in float, the
// width-then-height blend as fma(a, b, round(c * d)) written with explicit __fmaf_rn/__fmul_rn so that contraction
// cannot change it, the max-subtracted softmax with expf; everything stays fp32 and is rounded once at the store.
static const int kFusedMapThreads = 256;

template <typename T>
__global__ void upsample_softmax2_axpy_kernel(T *out, const T *logits, int64_t B, int64_t h, int64_t w, int64_t H,
                                              int64_t W, float sh, float sw, float alpha) {
    const int64_t n = B * H * W;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ox = i % W, t = i / W, oy = t % H, b = t / H;
        int64_t y0, y1, x0, x1;
        float hl0, hl1, wl0, wl1;
        bilinear_axis(oy, h, H, sh, y0, y1, hl0, hl1);
        bilinear_axis(ox, w, W, sw, x0, x1, wl0, wl1);
        float l[2];
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const T *plane = logits + (b * 2 + c) * h * w;
            const T *r0 = plane + y0 * w, *r1 = plane + y1 * w;
            const float t0 = __fmaf_rn(to_f32(r0[x0]), wl0, __fmul_rn(to_f32(r0[x1]), wl1));
            const float t1 = __fmaf_rn(to_f32(r1[x0]), wl0, __fmul_rn(to_f32(r1[x1]), wl1));
            l[c] = __fmaf_rn(t0, hl0, __fmul_rn(t1, hl1));
        }
        const float m = fmaxf(l[0], l[1]);
        const float e0 = expf(l[0] - m), e1 = expf(l[1] - m);
        const float p = e1 / (e0 + e1);
        out[i] = from_f32<T>(__fadd_rn(to_f32(out[i]), __fmul_rn(alpha, p)));  // y += alpha * x, as cpu_axpy
    }
}

template <typename T>
static Status launch_upsample_softmax2_axpy(cudaStream_t s, void *out, const void *logits, int64_t B, int64_t h,
                                            int64_t w, int64_t H, int64_t W, float alpha) {
    const float sh = H > 1 ? (float)(h - 1) / (float)(H - 1) : 0.0f;
    const float sw = W > 1 ? (float)(w - 1) / (float)(W - 1) : 0.0f;
    upsample_softmax2_axpy_kernel<T><<<grid_for(B * H * W, kFusedMapThreads), kFusedMapThreads, 0, s>>>(
        (T *)out, (const T *)logits, B, h, w, H, W, sh, sw, alpha);
    CUDA_LAUNCH_CHECK("upsample_softmax2_axpy_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_upsample_softmax2_axpy(Engine *e, DType dt, void *out, const void *logits, int64_t B,
                                              int64_t h, int64_t w, int64_t H, int64_t W, float alpha) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && h > 0 && w > 0 && H >= 0 && W >= 0, "%s: bad shape B=%lld %lldx%lld -> %lldx%lld",
                   __func__, (long long)B, (long long)h, (long long)w, (long long)H, (long long)W);
    if (B * H * W == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_upsample_softmax2_axpy, engine_stream(e), out, logits, B, h, w, H, W, alpha);
}
