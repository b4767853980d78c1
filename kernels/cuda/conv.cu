// The prompt learner's image path on the GPU: 2-D convolution (stride 1, zero padding), ReLU, 2x2 max pooling.
//
// The convolution is an implicit GEMM: out[b, co, p] = sum_kk w[co, kk] * col[kk, (b, p)] + bias[co], with
// M = Cout, N = B*Ho*Wo output pixels, K = Cin*k*k, and the im2col column computed on the fly while a tile is
// staged in shared memory, so no column buffer is needed. A block owns a 64 x 64 tile of (co, pixel), walks K in
// slices of 16 and each of its 256 threads accumulates 4 x 4 outputs in fp32. Deterministic (no atomics).
// This is the plain correct version; cuDNN (DESIGN.md) or a split-K variant for the last conv (M = 4096,
// N = 9 per image, K = 25600: only 64 blocks) are the next steps if it shows in the profile.
#include "kernels/cuda/common.cuh"

static const int kThreads = 256;

namespace {
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;
}

template <typename T>
__global__ void __launch_bounds__(256) conv2d_kernel(T *out, const T *x, const T *w, const T *bias, int64_t Cin,
                                                     int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad,
                                                     int64_t Ho, int64_t Wo, int64_t N) {
    __shared__ float As[kTileK][kTileM + 4];  // As[kk][m] = w[m0 + m, k0 + kk]
    __shared__ float Bs[kTileK][kTileN + 4];  // Bs[kk][n] = col[k0 + kk, n0 + n]
    const int64_t K = Cin * k * k, kk2 = k * k, HoWo = Ho * Wo;
    const int64_t m0 = (int64_t)blockIdx.y * kTileM, n0 = (int64_t)blockIdx.x * kTileN;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
        // A: 64 x 16 weights, consecutive threads along K (contiguous in w).
        for (int idx = tid; idx < kTileM * kTileK; idx += kThreads) {
            const int m = idx / kTileK, kk = idx % kTileK;
            const int64_t gm = m0 + m, gk = k0 + kk;
            As[kk][m] = (gm < Cout && gk < K) ? to_f32(w[gm * K + gk]) : 0.0f;
        }
        // B: 16 x 64 column entries, consecutive threads along pixels (mostly contiguous in x).
        for (int idx = tid; idx < kTileK * kTileN; idx += kThreads) {
            const int kk = idx / kTileN, n = idx % kTileN;
            const int64_t gk = k0 + kk, gn = n0 + n;
            float v = 0.0f;
            if (gk < K && gn < N) {
                const int64_t ci = gk / kk2, r = gk % kk2, ki = r / k, kj = r % k;
                const int64_t b = gn / HoWo, p = gn % HoWo, oy = p / Wo, ox = p % Wo;
                const int64_t iy = oy + ki - pad, ix = ox + kj - pad;
                if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = to_f32(x[((b * Cin + ci) * H + iy) * W + ix]);
            }
            Bs[kk][n] = v;
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
        if (gm >= Cout) continue;
        const float bb = bias ? to_f32(bias[gm]) : 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t gn = n0 + tx + 16 * j;
            if (gn >= N) continue;
            const int64_t b = gn / HoWo, p = gn % HoWo;
            out[(b * Cout + gm) * HoWo + p] = from_f32<T>(acc[i][j] + bb);
        }
    }
}

template <typename T>
static Status launch_conv2d(cudaStream_t s, void *out, const void *x, const void *w, const void *bias, int64_t B,
                            int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad) {
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1, N = B * Ho * Wo;
    const dim3 grid((unsigned)((N + kTileN - 1) / kTileN), (unsigned)((Cout + kTileM - 1) / kTileM));
    conv2d_kernel<T><<<grid, kThreads, 0, s>>>((T *)out, (const T *)x, (const T *)w, (const T *)bias, Cin, H, W,
                                               Cout, k, pad, Ho, Wo, N);
    CUDA_LAUNCH_CHECK("conv2d_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_conv2d(Engine *e, DType dt, void *out, const void *x, const void *w, const void *bias,
                              int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && Cin >= 1 && H >= 0 && W >= 0 && Cout >= 0 && k >= 1 && pad >= 0 &&
                       H + 2 * pad - k + 1 >= 1 && W + 2 * pad - k + 1 >= 1,
                   "%s: bad shape x [%lld,%lld,%lld,%lld], w [%lld,%lld,%lld,%lld], padding %lld", __func__,
                   (long long)B, (long long)Cin, (long long)H, (long long)W, (long long)Cout, (long long)Cin,
                   (long long)k, (long long)k, (long long)pad);
    const int64_t N = B * (H + 2 * pad - k + 1) * (W + 2 * pad - k + 1);
    AGPT_CHECK_ARG((N + kTileN - 1) / kTileN <= INT32_MAX && (Cout + kTileM - 1) / kTileM <= 65535,
                   "%s: %lld output pixels x %lld channels exceed the launch grid", __func__, (long long)N,
                   (long long)Cout);
    if (N == 0 || Cout == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_conv2d, engine_stream(e), out, x, w, bias, B, Cin, H, W, Cout, k, pad);
}

// ---------------------------------------------------------------------------------------------------------
// ReLU and 2x2 max pooling: one thread per output element, grid-stride.

template <typename T> __global__ void relu_kernel(T *out, const T *x, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        out[i] = from_f32<T>(v < 0.0f ? 0.0f : v);  // NaN stays NaN
    }
}

template <typename T> static Status launch_relu(cudaStream_t s, void *out, const void *x, int64_t n) {
    relu_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)out, (const T *)x, n);
    CUDA_LAUNCH_CHECK("relu_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_relu(Engine *e, DType dt, void *out, const void *x, int64_t n) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(n >= 0, "%s: bad element count %lld", __func__, (long long)n);
    if (n == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_relu, engine_stream(e), out, x, n);
}

// max_pool2d semantics: a NaN in the window wins.
__device__ __forceinline__ float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

template <typename T> __global__ void maxpool2x2_kernel(T *out, const T *x, int64_t BC, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2, n = BC * Ho * Wo;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ox = i % Wo, t = i / Wo, oy = t % Ho, c = t / Ho;
        const T *r0 = x + (c * H + 2 * oy) * W + 2 * ox, *r1 = r0 + W;
        float m = to_f32(r0[0]);
        m = max_nan(m, to_f32(r0[1]));
        m = max_nan(m, to_f32(r1[0]));
        m = max_nan(m, to_f32(r1[1]));
        out[i] = from_f32<T>(m);
    }
}

template <typename T>
static Status launch_maxpool2x2(cudaStream_t s, void *out, const void *x, int64_t BC, int64_t H, int64_t W) {
    maxpool2x2_kernel<T><<<grid_for(BC * (H / 2) * (W / 2), kThreads), kThreads, 0, s>>>((T *)out, (const T *)x, BC,
                                                                                        H, W);
    CUDA_LAUNCH_CHECK("maxpool2x2_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_maxpool2x2(Engine *e, DType dt, void *out, const void *x, int64_t BC, int64_t H, int64_t W) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(BC >= 0 && H >= 0 && W >= 0, "%s: bad shape [%lld,%lld,%lld]", __func__, (long long)BC,
                   (long long)H, (long long)W);
    if (BC * (H / 2) * (W / 2) == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_maxpool2x2, engine_stream(e), out, x, BC, H, W);
}
