// Training on the GPU: the backward of the vision path and the prompt learner, and the pixel losses (the CUDA side
// of kernels/ops.h's "training" section; the CPU reference is kernels/cpu/conv.c, vision.c and loss.c).
//
// UNVERIFIED ON GPU: written and compiled on a machine without a GPU. tests/test_ops_cuda.c compares every op here
// with the CPU op on random inputs; run it (ctest -L gpu) before trusting these kernels.
//
// All math is fp32 whatever the storage dtype (the pixel losses' sums are double); one rounding at each store.
// Nothing here uses atomics: every result is a fixed-order sum, so repeated runs give the same bits.
//  - conv2d backward: our own tiled implicit GEMMs (no cuDNN backward yet), 64 x 64 tiles, K slices of 16, 4 x 4
//    outputs per thread, as the forward's implicit kernel in conv.cu:
//      dx[ci, (b,iy,ix)] = sum_(co,ki,kj) w[co,ci,ki,kj] dout[b,co,iy+pad-ki,ix+pad-kj]           (overwritten)
//      dw[co, (ci,ki,kj)] += sum_(b,oy,ox) dout[b,co,oy,ox] x[b,ci,oy+ki-pad,ox+kj-pad]
//    dw's reduction (B*Ho*Wo pixels, 100k for the first layer) is split over blockIdx.z when the output has few
//    tiles; the splits' f32 partials go to e->workspace and one pass adds them to dw in split order.
//    dbias: one block per channel, a fixed-order block sum.
//  - maxpool backward: one thread per input element, recomputing its window's argmax as the CPU does.
//  - bilinear backward (and the fused upsample + softmax backward): a gather, one thread per source pixel summing
//    the output pixels that read it (the forward's index arithmetic decides which), in row-major order.
#include "kernels/cuda/common.cuh"

#include <stdlib.h>

static const int kThreads = 256;

namespace {
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;
}

// ---------------------------------------------------------------------------------------------------------
// A tiled GEMM over index functors: out(m, n) = sum_kk op.a(m, kk) * op.b(kk, n) over kk in this block's slice
// [blockIdx.z * k_split, ...) of [0, K), handed to op.store(m, n, value, split).

template <typename Op>
__global__ void __launch_bounds__(256) tile_gemm_kernel(Op op, int64_t M, int64_t N, int64_t K, int64_t k_split) {
    __shared__ float As[kTileK][kTileM + 4];
    __shared__ float Bs[kTileK][kTileN + 4];
    const int64_t m0 = (int64_t)blockIdx.y * kTileM, n0 = (int64_t)blockIdx.x * kTileN;
    const int64_t kbeg = (int64_t)blockIdx.z * k_split, kend = kbeg + k_split < K ? kbeg + k_split : K;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int64_t k0 = kbeg; k0 < kend; k0 += kTileK) {
        for (int idx = tid; idx < kTileM * kTileK; idx += kThreads) {
            const int m = idx / kTileK, kk = idx % kTileK;
            const int64_t gm = m0 + m, gk = k0 + kk;
            As[kk][m] = (gm < M && gk < kend) ? op.a(gm, gk) : 0.0f;
        }
        for (int idx = tid; idx < kTileK * kTileN; idx += kThreads) {
            const int kk = idx / kTileN, n = idx % kTileN;
            const int64_t gk = k0 + kk, gn = n0 + n;
            Bs[kk][n] = (gk < kend && gn < N) ? op.b(gk, gn) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; kk++) {
            float a[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int64_t gm = m0 + ty + 16 * i;
        if (gm >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t gn = n0 + tx + 16 * j;
            if (gn < N) op.store(gm, gn, acc[i][j], (int)blockIdx.z);
        }
    }
}

// dx: M = Cin, N = B*H*W input pixels, K = Cout*k*k taps.
template <typename T> struct ConvDxOp {
    T *dx;
    const T *dout, *w;
    int64_t Cin, H, W, Cout, k, pad, Ho, Wo;
    __device__ float a(int64_t ci, int64_t t) const {
        const int64_t kk2 = k * k, co = t / kk2, r = t % kk2;
        return to_f32(w[(co * Cin + ci) * kk2 + r]);
    }
    __device__ float b(int64_t t, int64_t n) const {
        const int64_t kk2 = k * k, co = t / kk2, r = t % kk2, ki = r / k, kj = r % k;
        const int64_t HW = H * W, bb = n / HW, p = n % HW, iy = p / W, ix = p % W;
        const int64_t oy = iy + pad - ki, ox = ix + pad - kj;
        if (oy < 0 || oy >= Ho || ox < 0 || ox >= Wo) return 0.0f;
        return to_f32(dout[((bb * Cout + co) * Ho + oy) * Wo + ox]);
    }
    __device__ void store(int64_t ci, int64_t n, float v, int) const {
        const int64_t HW = H * W, bb = n / HW, p = n % HW;
        dx[(bb * Cin + ci) * HW + p] = from_f32<T>(v);
    }
};

// dw: M = Cout, N = Cin*k*k taps, K = B*Ho*Wo output pixels. partial != NULL: this split's f32 partial sums
// [splits, Cout, Cin*k*k]; else dw += the sum directly.
template <typename T> struct ConvDwOp {
    T *dw;
    float *partial;
    const T *dout, *x;
    int64_t Cin, H, W, Cout, k, pad, Ho, Wo;
    __device__ float a(int64_t co, int64_t p) const {
        const int64_t HoWo = Ho * Wo, bb = p / HoWo, q = p % HoWo;
        return to_f32(dout[(bb * Cout + co) * HoWo + q]);
    }
    __device__ float b(int64_t p, int64_t t) const {
        const int64_t kk2 = k * k, ci = t / kk2, r = t % kk2, ki = r / k, kj = r % k;
        const int64_t HoWo = Ho * Wo, bb = p / HoWo, q = p % HoWo, oy = q / Wo, ox = q % Wo;
        const int64_t iy = oy + ki - pad, ix = ox + kj - pad;
        if (iy < 0 || iy >= H || ix < 0 || ix >= W) return 0.0f;
        return to_f32(x[((bb * Cin + ci) * H + iy) * W + ix]);
    }
    __device__ void store(int64_t co, int64_t t, float v, int split) const {
        const int64_t K = Cin * k * k;
        if (partial)
            partial[((int64_t)split * Cout + co) * K + t] = v;
        else
            dw[co * K + t] = from_f32<T>(to_f32(dw[co * K + t]) + v);
    }
};

template <typename T> __global__ void add_partials_kernel(T *dw, const float *partial, int64_t n, int splits) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int z = 0; z < splits; z++) s += partial[(int64_t)z * n + i];
        dw[i] = from_f32<T>(to_f32(dw[i]) + s);
    }
}

// dbias[co] += sum over b and pixels of dout[b, co]: one block per channel.
template <typename T> __global__ void conv_bias_grad_kernel(T *dbias, const T *dout, int64_t B, int64_t Cout,
                                                            int64_t HoWo) {
    __shared__ float scratch[32];
    const int64_t co = blockIdx.x;
    float s = 0.0f;
    for (int64_t b = 0; b < B; b++) {
        const T *d = dout + (b * Cout + co) * HoWo;
        for (int64_t i = threadIdx.x; i < HoWo; i += blockDim.x) s += to_f32(d[i]);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) dbias[co] = from_f32<T>(to_f32(dbias[co]) + s);
}

template <typename T>
static Status launch_conv2d_backward(Engine *e, void *dx, void *dw, void *dbias, const void *dout, const void *x,
                                     const void *w, int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout,
                                     int64_t k, int64_t pad) {
    cudaStream_t s = engine_stream(e);
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1, K = Cin * k * k, P = B * Ho * Wo;
    if (dx) {
        const int64_t N = B * H * W;
        AGPT_CHECK_ARG((N + kTileN - 1) / kTileN <= INT32_MAX && (Cin + kTileM - 1) / kTileM <= 65535,
                       "cuda_conv2d_backward: %lld input pixels x %lld channels exceed the launch grid", (long long)N,
                       (long long)Cin);
        ConvDxOp<T> op{(T *)dx, (const T *)dout, (const T *)w, Cin, H, W, Cout, k, pad, Ho, Wo};
        const dim3 grid((unsigned)((N + kTileN - 1) / kTileN), (unsigned)((Cin + kTileM - 1) / kTileM), 1);
        tile_gemm_kernel<ConvDxOp<T>><<<grid, kThreads, 0, s>>>(op, Cin, N, Cout * k * k, Cout * k * k);
        CUDA_LAUNCH_CHECK("tile_gemm_kernel<ConvDxOp>");
    }
    if (dw) {
        AGPT_CHECK_ARG((K + kTileN - 1) / kTileN <= INT32_MAX && (Cout + kTileM - 1) / kTileM <= 65535,
                       "cuda_conv2d_backward: %lld taps x %lld channels exceed the launch grid", (long long)K,
                       (long long)Cout);
        const int64_t tiles = ((K + kTileN - 1) / kTileN) * ((Cout + kTileM - 1) / kTileM);
        // Split the pixel reduction until there are ~1024 blocks, each with >= 1024 pixels, while the partials fit.
        int64_t splits = 1;
        while (tiles * splits * 2 <= 1024 && P / (splits * 2) >= 1024 && splits * 2 <= 65535 &&
               (size_t)(splits * 2 * Cout * K) * sizeof(float) <= e->workspace_bytes)
            splits *= 2;
        int64_t k_split = (P + splits - 1) / splits;
        k_split = (k_split + kTileK - 1) / kTileK * kTileK;
        splits = (P + k_split - 1) / k_split;
        float *partial = splits > 1 ? (float *)e->workspace : NULL;
        ConvDwOp<T> op{(T *)dw, partial, (const T *)dout, (const T *)x, Cin, H, W, Cout, k, pad, Ho, Wo};
        const dim3 grid((unsigned)((K + kTileN - 1) / kTileN), (unsigned)((Cout + kTileM - 1) / kTileM),
                        (unsigned)splits);
        tile_gemm_kernel<ConvDwOp<T>><<<grid, kThreads, 0, s>>>(op, Cout, K, P, k_split);
        CUDA_LAUNCH_CHECK("tile_gemm_kernel<ConvDwOp>");
        if (partial) {
            add_partials_kernel<T><<<grid_for(Cout * K, kThreads), kThreads, 0, s>>>((T *)dw, partial, Cout * K,
                                                                                    (int)splits);
            CUDA_LAUNCH_CHECK("add_partials_kernel");
        }
    }
    if (dbias) {
        AGPT_CHECK_ARG(Cout <= INT32_MAX, "cuda_conv2d_backward: %lld channels", (long long)Cout);
        conv_bias_grad_kernel<T><<<(unsigned)Cout, kThreads, 0, s>>>((T *)dbias, (const T *)dout, B, Cout, Ho * Wo);
        CUDA_LAUNCH_CHECK("conv_bias_grad_kernel");
    }
    return AGPT_OK;
}

extern "C" Status cuda_conv2d_backward(Engine *e, DType dt, void *dx, void *dw, void *dbias, const void *dout,
                                       const void *x, const void *w, int64_t B, int64_t Cin, int64_t H, int64_t W,
                                       int64_t Cout, int64_t k, int64_t pad) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && Cin > 0 && Cout >= 0 && k > 0 && pad >= 0 && H + 2 * pad - k + 1 > 0 &&
                       W + 2 * pad - k + 1 > 0,
                   "%s: bad shape", __func__);
    if (B == 0 || Cout == 0) {
        if (dx) CUDA_TRY(cudaMemsetAsync(dx, 0, (size_t)(B * Cin * H * W) * dtype_size(dt), engine_stream(e)));
        return AGPT_OK;
    }
    return DISPATCH_FLOAT(dt, launch_conv2d_backward, e, dx, dw, dbias, dout, x, w, B, Cin, H, W, Cout, k, pad);
}

// ---------------------------------------------------------------------------------------------------------
// ReLU and 2x2 max pooling backward.

template <typename T> __global__ void relu_backward_kernel(T *dx, const T *dout, const T *y, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(dout[i]);  // read before the write: dx may alias dout
        dx[i] = from_f32<T>(to_f32(y[i]) <= 0.0f ? 0.0f : g);  // a NaN y passes, as threshold_backward
    }
}

template <typename T> static Status launch_relu_backward(cudaStream_t s, void *dx, const void *dout, const void *y,
                                                         int64_t n) {
    relu_backward_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)dx, (const T *)dout, (const T *)y, n);
    CUDA_LAUNCH_CHECK("relu_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_relu_backward(Engine *e, DType dt, void *dx, const void *dout, const void *y, int64_t n) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(n >= 0, "%s: bad element count %lld", __func__, (long long)n);
    if (n == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_relu_backward, engine_stream(e), dx, dout, y, n);
}

template <typename T>
__global__ void maxpool2x2_backward_kernel(T *dx, const T *dout, const T *x, int64_t BC, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2, n = BC * H * W;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ix = i % W, t = i / W, iy = t % H, c = t / H;
        const int64_t oy = iy / 2, ox = ix / 2;
        float g = 0.0f;
        if (oy < Ho && ox < Wo) {
            const T *r0 = x + (c * H + 2 * oy) * W + 2 * ox, *r1 = r0 + W;
            const float v[4] = {to_f32(r0[0]), to_f32(r0[1]), to_f32(r1[0]), to_f32(r1[1])};
            float m = v[0];
            int best = 0;
#pragma unroll
            for (int j = 1; j < 4; j++)
                if (v[j] > m || v[j] != v[j]) m = v[j], best = j;
            if (best == (int)((iy % 2) * 2 + ix % 2)) g = to_f32(dout[(c * Ho + oy) * Wo + ox]);
        }
        dx[i] = from_f32<T>(g);
    }
}

template <typename T> static Status launch_maxpool2x2_backward(cudaStream_t s, void *dx, const void *dout,
                                                               const void *x, int64_t BC, int64_t H, int64_t W) {
    maxpool2x2_backward_kernel<T><<<grid_for(BC * H * W, kThreads), kThreads, 0, s>>>((T *)dx, (const T *)dout,
                                                                                     (const T *)x, BC, H, W);
    CUDA_LAUNCH_CHECK("maxpool2x2_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_maxpool2x2_backward(Engine *e, DType dt, void *dx, const void *dout, const void *x, int64_t BC,
                                           int64_t H, int64_t W) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(BC >= 0 && H >= 0 && W >= 0, "%s: bad shape", __func__);
    if (BC * H * W == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_maxpool2x2_backward, engine_stream(e), dx, dout, x, BC, H, W);
}

// ---------------------------------------------------------------------------------------------------------
// L2 normalize backward: one block per row; dx = dout / d - [n >= eps] <dout, x> x / (d^2 n).

template <typename T> __global__ void l2_normalize_backward_kernel(T *dx, const T *dout, const T *x, int64_t C,
                                                                   float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * C, *gr = dout + row * C;
    T *o = dx + row * C;
    float ss = 0.0f, dot = 0.0f;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
        const float xv = to_f32(xr[i]);
        ss += xv * xv, dot += to_f32(gr[i]) * xv;
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);  // both sums synchronise after every read of dout: dx may alias it
    const float n = sqrtf(ss);
    const bool pass = !(n < eps);
    const float d = pass ? n : eps, c = pass ? dot / (d * d * n) : 0.0f;
    for (int64_t i = threadIdx.x; i < C; i += blockDim.x) o[i] = from_f32<T>(to_f32(gr[i]) / d - c * to_f32(xr[i]));
}

template <typename T> static Status launch_l2_normalize_backward(cudaStream_t s, void *dx, const void *dout,
                                                                 const void *x, int64_t rows, int64_t C, float eps) {
    l2_normalize_backward_kernel<T><<<(unsigned)rows, row_threads(C), 0, s>>>((T *)dx, (const T *)dout,
                                                                              (const T *)x, C, eps);
    CUDA_LAUNCH_CHECK("l2_normalize_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_l2_normalize_backward(Engine *e, DType dt, void *dx, const void *dout, const void *x,
                                             int64_t rows, int64_t C, float eps) {
    CHECK_FLOAT_DT(dt);
    CHECK_ROWS(rows, C);
    if (rows == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_l2_normalize_backward, engine_stream(e), dx, dout, x, rows, C, eps);
}

// ---------------------------------------------------------------------------------------------------------
// Bilinear backward by gathering: source pixel (y, x) sums the output pixels whose forward read it.

// The forward's index arithmetic (kernels/cuda/vision.cu's bilinear_axis).
__device__ __forceinline__ void bw_bilinear_axis(int64_t i, int64_t in, int64_t out, float scale, int64_t &i0,
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

// The output positions whose source index is within one of y: a superset of those that read y (checked exactly
// with bw_bilinear_axis by the caller), with a margin of 2 for the float rounding of the scale.
__device__ __forceinline__ void bw_output_range(int64_t y, int64_t in, int64_t out, int64_t &lo, int64_t &hi) {
    if (in == out) {
        lo = hi = y;
        return;
    }
    if (in <= 1 || out <= 1) {
        lo = 0, hi = out - 1;
        return;
    }
    const double r = (double)(out - 1) / (double)(in - 1);
    lo = (int64_t)floor((double)(y - 1) * r) - 2;
    hi = (int64_t)ceil((double)(y + 1) * r) + 2;
    if (lo < 0) lo = 0;
    if (hi > out - 1) hi = out - 1;
}

// The weight output position o gives source position y (0 when it does not read it).
__device__ __forceinline__ float bw_weight(int64_t o, int64_t y, int64_t in, int64_t out, float scale) {
    int64_t i0, i1;
    float l0, l1;
    bw_bilinear_axis(o, in, out, scale, i0, i1, l0, l1);
    return (i0 == y ? l0 : 0.0f) + (i1 == y ? l1 : 0.0f);
}

template <typename T>
__global__ void upsample_bilinear_backward_kernel(T *dx, const T *dout, int64_t BC, int64_t h, int64_t w, int64_t H,
                                                  int64_t W, float sh, float sw) {
    const int64_t n = BC * h * w;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t x = i % w, t = i / w, y = t % h, c = t / h;
        int64_t oy0, oy1, ox0, ox1;
        bw_output_range(y, h, H, oy0, oy1);
        bw_output_range(x, w, W, ox0, ox1);
        float s = 0.0f;
        for (int64_t oy = oy0; oy <= oy1; oy++) {
            const float wy = bw_weight(oy, y, h, H, sh);
            if (wy == 0.0f) continue;
            const T *g = dout + (c * H + oy) * W;
            float r = 0.0f;
            for (int64_t ox = ox0; ox <= ox1; ox++) {
                const float wx = bw_weight(ox, x, w, W, sw);
                if (wx != 0.0f) r = fmaf(to_f32(g[ox]), wx, r);
            }
            s = fmaf(r, wy, s);
        }
        dx[i] = from_f32<T>(s);
    }
}

static inline float bw_scale(int64_t in, int64_t out) {
    return out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f;
}

template <typename T> static Status launch_upsample_bilinear_backward(cudaStream_t s, void *dx, const void *dout,
                                                                      int64_t BC, int64_t h, int64_t w, int64_t H,
                                                                      int64_t W) {
    upsample_bilinear_backward_kernel<T><<<grid_for(BC * h * w, kThreads), kThreads, 0, s>>>(
        (T *)dx, (const T *)dout, BC, h, w, H, W, bw_scale(h, H), bw_scale(w, W));
    CUDA_LAUNCH_CHECK("upsample_bilinear_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_upsample_bilinear_backward(Engine *e, DType dt, void *dx, const void *dout, int64_t BC,
                                                  int64_t h, int64_t w, int64_t H, int64_t W) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(BC >= 0 && h > 0 && w > 0 && H >= 0 && W >= 0, "%s: bad shape", __func__);
    if (BC == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_upsample_bilinear_backward, engine_stream(e), dx, dout, BC, h, w, H, W);
}

// The fused map step's backward: per logits pixel (b, y, x) of class 1, the gather above over du1 = dp1 p1 (1 - p1)
// recomputed at each output pixel from the forward's arithmetic (vision.cu's upsample_softmax2_axpy_kernel);
// class 0 gets the negation. dp1 is f32.
template <typename T>
__device__ __forceinline__ float bw_upsampled(const T *plane, int64_t oy, int64_t ox, int64_t h, int64_t w,
                                              int64_t H, int64_t W, float sh, float sw) {
    int64_t y0, y1, x0, x1;
    float hl0, hl1, wl0, wl1;
    bw_bilinear_axis(oy, h, H, sh, y0, y1, hl0, hl1);
    bw_bilinear_axis(ox, w, W, sw, x0, x1, wl0, wl1);
    const T *r0 = plane + y0 * w, *r1 = plane + y1 * w;
    const float t0 = __fmaf_rn(to_f32(r0[x0]), wl0, __fmul_rn(to_f32(r0[x1]), wl1));
    const float t1 = __fmaf_rn(to_f32(r1[x0]), wl0, __fmul_rn(to_f32(r1[x1]), wl1));
    return __fmaf_rn(t0, hl0, __fmul_rn(t1, hl1));
}

template <typename T>
__global__ void upsample_softmax2_backward_kernel(T *dlogits, const float *dp1, const T *logits, int64_t B, int64_t h,
                                                  int64_t w, int64_t H, int64_t W, float sh, float sw) {
    const int64_t n = B * h * w;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t x = i % w, t = i / w, y = t % h, b = t / h;
        const T *c0 = logits + (b * 2) * h * w, *c1 = c0 + h * w;
        int64_t oy0, oy1, ox0, ox1;
        bw_output_range(y, h, H, oy0, oy1);
        bw_output_range(x, w, W, ox0, ox1);
        float s = 0.0f;
        for (int64_t oy = oy0; oy <= oy1; oy++) {
            const float wy = bw_weight(oy, y, h, H, sh);
            if (wy == 0.0f) continue;
            float r = 0.0f;
            for (int64_t ox = ox0; ox <= ox1; ox++) {
                const float wx = bw_weight(ox, x, w, W, sw);
                if (wx == 0.0f) continue;
                const float l0 = bw_upsampled(c0, oy, ox, h, w, H, W, sh, sw);
                const float l1 = bw_upsampled(c1, oy, ox, h, w, H, W, sh, sw);
                const float m = fmaxf(l0, l1), e0 = expf(l0 - m), e1 = expf(l1 - m), se = e0 + e1;
                const float du = dp1[(b * H + oy) * W + ox] * (e0 * e1 / (se * se));
                r = fmaf(du, wx, r);
            }
            s = fmaf(r, wy, s);
        }
        dlogits[(b * 2 + 1) * h * w + y * w + x] = from_f32<T>(s);
        dlogits[(b * 2) * h * w + y * w + x] = from_f32<T>(-s);
    }
}

template <typename T> static Status launch_upsample_softmax2_backward(cudaStream_t s, void *dlogits, const float *dp1,
                                                                      const void *logits, int64_t B, int64_t h,
                                                                      int64_t w, int64_t H, int64_t W) {
    upsample_softmax2_backward_kernel<T><<<grid_for(B * h * w, kThreads), kThreads, 0, s>>>(
        (T *)dlogits, dp1, (const T *)logits, B, h, w, H, W, bw_scale(h, H), bw_scale(w, W));
    CUDA_LAUNCH_CHECK("upsample_softmax2_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_upsample_softmax2_backward(Engine *e, DType dt, void *dlogits, const float *dp1,
                                                  const void *logits, int64_t B, int64_t h, int64_t w, int64_t H,
                                                  int64_t W) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && h > 0 && w > 0 && H >= 0 && W >= 0, "%s: bad shape", __func__);
    if (B == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_upsample_softmax2_backward, engine_stream(e), dlogits, dp1, logits, B, h, w, H,
                          W);
}

// ---------------------------------------------------------------------------------------------------------
// Pixel losses (f32 maps): per image row the four double sums (focal, sum p g, sum p, sum g) -> e->workspace, then
// one thread per sample sums its rows in order (I, S, focal_b), then the gradient; the host reads the per-sample
// triples back (only when a loss value is asked for) and sums them in order. Deterministic.

__device__ __forceinline__ double bw_focal_pt(double q, float g) {
    const double s = 1e-5;
    return g > 0.5f ? (1.0 - 2.0 * s) * q + 2.0 * s : 1.0 - (1.0 - 2.0 * s) * q;
}

__global__ void pixel_loss_rows_kernel(double *part, const float *p1, const float *gt, int64_t W) {
    __shared__ double sh[4][kThreads];
    const int64_t r = blockIdx.x;
    const float *q = p1 + r * W, *g = gt + r * W;
    double f = 0, qg = 0, sq = 0, sg = 0;
    for (int64_t i = threadIdx.x; i < W; i += blockDim.x) {
        const double pt = bw_focal_pt(q[i], g[i]), om = 1.0 - pt;
        f += -om * om * log(pt);
        qg += (double)q[i] * g[i], sq += q[i], sg += g[i];
    }
    sh[0][threadIdx.x] = f, sh[1][threadIdx.x] = qg, sh[2][threadIdx.x] = sq, sh[3][threadIdx.x] = sg;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {  // a fixed tree: the same order every run
        if ((int)threadIdx.x < o)
            for (int j = 0; j < 4; j++) sh[j][threadIdx.x] += sh[j][threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x < 4) part[4 * r + threadIdx.x] = sh[threadIdx.x][0];
}

__global__ void pixel_loss_samples_kernel(double *stat, const double *part, int64_t B, int64_t H) {
    const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    double f = 0, I = 0, S = 0;
    for (int64_t r = b * H; r < (b + 1) * H; r++) f += part[4 * r], I += part[4 * r + 1], S += part[4 * r + 2] + part[4 * r + 3];
    stat[3 * b] = f, stat[3 * b + 1] = I, stat[3 * b + 2] = S;
}

__global__ void pixel_loss_grad_kernel(float *dp1, const double *stat, const float *p1, const float *gt, int64_t B,
                                       int64_t HW, float scale) {
    const int64_t n = B * HW;
    const double M = (double)n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / HW;
        const double I = stat[3 * b + 1], S1 = stat[3 * b + 2] + 1.0;
        const double pt = bw_focal_pt(p1[i], gt[i]), om = 1.0 - pt;
        const double dfdpt = 2.0 * om * log(pt) - om * om / pt;
        const double dpt = gt[i] > 0.5f ? (1.0 - 2e-5) : -(1.0 - 2e-5);
        const double dd = -(2.0 * gt[i] * S1 - (2.0 * I + 1.0)) / ((double)B * S1 * S1);
        dp1[i] = (float)((double)dp1[i] + (double)scale * (dfdpt * dpt / M + dd));
    }
}

extern "C" Status cuda_pixel_loss(Engine *e, double *focal, double *dice, float *dp1, const float *p1, const float *gt,
                                  int64_t B, int64_t H, int64_t W, float scale) {
    AGPT_CHECK_ARG(B > 0 && H > 0 && W > 0 && B * H <= INT32_MAX, "%s: bad shape [%lld,%lld,%lld]", __func__,
                   (long long)B, (long long)H, (long long)W);
    const size_t need = (size_t)(4 * B * H + 3 * B) * sizeof(double);
    AGPT_CHECK_ARG(e->workspace != NULL && e->workspace_bytes >= need,
                   "cuda_pixel_loss: needs %zu bytes of engine workspace for [%lld,%lld,%lld] (has %zu)", need,
                   (long long)B, (long long)H, (long long)W, e->workspace_bytes);
    cudaStream_t s = engine_stream(e);
    double *part = (double *)e->workspace, *stat = part + 4 * B * H;
    pixel_loss_rows_kernel<<<(unsigned)(B * H), kThreads, 0, s>>>(part, p1, gt, W);
    CUDA_LAUNCH_CHECK("pixel_loss_rows_kernel");
    pixel_loss_samples_kernel<<<(unsigned)((B + 127) / 128), 128, 0, s>>>(stat, part, B, H);
    CUDA_LAUNCH_CHECK("pixel_loss_samples_kernel");
    if (dp1) {
        pixel_loss_grad_kernel<<<grid_for(B * H * W, kThreads), kThreads, 0, s>>>(dp1, stat, p1, gt, B, H * W, scale);
        CUDA_LAUNCH_CHECK("pixel_loss_grad_kernel");
    }
    if (!focal && !dice) return AGPT_OK;
    double *host = (double *)malloc((size_t)(3 * B) * sizeof(double));
    if (!host) return AGPT_FAIL(AGPT_ERR_OOM, "cuda_pixel_loss: %lld doubles of host memory", (long long)(3 * B));
    cudaError_t ce = cudaMemcpyAsync(host, stat, (size_t)(3 * B) * sizeof(double), cudaMemcpyDeviceToHost, s);
    if (ce == cudaSuccess) ce = cudaStreamSynchronize(s);
    if (ce != cudaSuccess) {
        free(host);
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cuda_pixel_loss: reading the sums back failed: %s", cudaGetErrorString(ce));
    }
    double fsum = 0, dsum = 0;
    for (int64_t b = 0; b < B; b++) fsum += host[3 * b], dsum += (2.0 * host[3 * b + 1] + 1.0) / (host[3 * b + 2] + 1.0);
    free(host);
    if (focal) *focal = fsum / (double)(B * H * W);
    if (dice) *dice = 1.0 - dsum / (double)B;
    return AGPT_OK;
}
