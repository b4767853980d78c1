// The prompt learner's image path on the GPU: 2-D convolution (stride 1, zero padding), ReLU, 2x2 max pooling.
//
// The convolution runs through cuDNN where the build has it (DESIGN.md): NCHW tensors, fp32 compute for every
// storage dtype (f32 with FMA math only, so no TF32 and results compare tightly with the CPU; f16/bf16 may use
// tensor cores, still accumulating in fp32), one deterministic algorithm per shape chosen by cuDNN's heuristics
// (cudnnGetConvolutionForwardAlgorithm_v7) on first use and cached, the engine's workspace as scratch, and the
// bias added afterwards by our own kernel (as PyTorch does after cuDNN: two roundings in f16/bf16).
//
// The fallback, and the reference for comparisons, is our implicit GEMM: out[b, co, p] = sum_kk w[co, kk] *
// col[kk, (b, p)] + bias[co], with M = Cout, N = B*Ho*Wo output pixels, K = Cin*k*k, and the im2col column
// computed on the fly while a tile is staged in shared memory, so no column buffer is needed. A block owns a
// 64 x 64 tile of (co, pixel), walks K in slices of 16 and each of its 256 threads accumulates 4 x 4 outputs in
// fp32. Deterministic (no atomics). It runs where the build has no cuDNN, where cuDNN has no algorithm for a
// shape (NOT_SUPPORTED, cached per shape), for pointers not 16-byte aligned, and always with AGPT_CONV=implicit.
//
// AGPT_CONV (read once): unset or "auto" = cuDNN with those fallbacks; "cudnn" = cuDNN only, where an
// unsupported shape is an error instead of a fallback and each shape's algorithm is logged at info level;
// "implicit" = our kernel only.
#include "kernels/cuda/common.cuh"

#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <vector>

#ifdef AGPT_WITH_CUDNN
#include <cudnn.h>
#endif

extern "C" {
#include "runtime/log.h"
}

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

static Status implicit_conv2d(Engine *e, DType dt, void *out, const void *x, const void *w, const void *bias,
                              int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad) {
    const int64_t N = B * (H + 2 * pad - k + 1) * (W + 2 * pad - k + 1);
    AGPT_CHECK_ARG((N + kTileN - 1) / kTileN <= INT32_MAX && (Cout + kTileM - 1) / kTileM <= 65535,
                   "cuda_conv2d: %lld output pixels x %lld channels exceed the launch grid", (long long)N,
                   (long long)Cout);
    return DISPATCH_FLOAT(dt, launch_conv2d, engine_stream(e), out, x, w, bias, B, Cin, H, W, Cout, k, pad);
}

// ---------------------------------------------------------------------------------------------------------
// Which path: AGPT_CONV, read once.

namespace {
enum ConvMode { CONV_AUTO, CONV_CUDNN, CONV_IMPLICIT, CONV_BAD };
struct ConvSetting {
    ConvMode mode;
    const char *raw;
};
}  // namespace

static ConvSetting conv_setting() {
    static const ConvSetting s = [] {
        const char *v = getenv("AGPT_CONV");
        ConvMode m = CONV_BAD;
        if (!v || !*v || !strcmp(v, "auto")) m = CONV_AUTO;
        else if (!strcmp(v, "cudnn")) m = CONV_CUDNN;
        else if (!strcmp(v, "implicit")) m = CONV_IMPLICIT;
        return ConvSetting{m, v ? v : ""};
    }();
    return s;
}

// ---------------------------------------------------------------------------------------------------------
// The cuDNN path.

#ifdef AGPT_WITH_CUDNN
// kernels/cuda/engine_cuda.cu: the engine's cuDNN handle, bound to its stream, made on first use.
Status engine_cuda_cudnn(Engine *e, cudnnHandle_t *out);

// NOT_SUPPORTED statuses that mean "not this shape, dtype or layout": the caller may fall back to our kernel.
// The rest of the category (a sub-library missing, a driver or runtime too old) is a broken install: an error.
static bool cudnn_shape_unsupported(cudnnStatus_t s) {
    if (CUDNN_STATUS_CATEGORY(s) != CUDNN_STATUS_NOT_SUPPORTED) return false;
    return s != CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER &&
           s != CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART &&
           s != CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING &&
           s != CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE;
}

// cuDNN failures as a Status: AGPT_ERR_UNSUPPORTED for the fallback-worthy NOT_SUPPORTED codes, else
// AGPT_ERR_DEVICE; the message carries the call, cuDNN's name for the status, its number and cuDNN's own
// explanation of the last error.
static Status cudnn_fail(cudnnStatus_t s, const char *call, const char *file, int line) {
    char detail[768] = "";
    cudnnGetLastErrorString(detail, sizeof detail);
    const bool unsupported = cudnn_shape_unsupported(s);
    return agpt_fail_at(unsupported ? AGPT_ERR_UNSUPPORTED : AGPT_ERR_DEVICE, file, line, "%s failed: %s (%d)%s%s%s",
                        call, cudnnGetErrorString(s), (int)s, detail[0] ? ": " : "", detail,
                        unsupported ? "" : "; is cuDNN installed whole and built for this CUDA and GPU?");
}

#define CUDNN_TRY(call)                                                                                    \
    do {                                                                                                   \
        cudnnStatus_t cudnn_try_s_ = (call);                                                               \
        if (cudnn_try_s_ != CUDNN_STATUS_SUCCESS) return cudnn_fail(cudnn_try_s_, #call, __FILE__, __LINE__); \
    } while (0)

namespace {
// The four descriptors of one convolution, destroyed with the struct. Host-side objects, cheap to make per call.
struct ConvDescs {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnFilterDescriptor_t w = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    ConvDescs() = default;
    ConvDescs(const ConvDescs &) = delete;
    ConvDescs &operator=(const ConvDescs &) = delete;
    ~ConvDescs() {
        if (x) cudnnDestroyTensorDescriptor(x);
        if (y) cudnnDestroyTensorDescriptor(y);
        if (w) cudnnDestroyFilterDescriptor(w);
        if (conv) cudnnDestroyConvolutionDescriptor(conv);
    }
};

struct ConvShape {
    int device;
    DType dt;
    int64_t B, Cin, H, W, Cout, k, pad;
    size_t ws_cap;
    bool operator==(const ConvShape &o) const {
        return device == o.device && dt == o.dt && B == o.B && Cin == o.Cin && H == o.H && W == o.W &&
               Cout == o.Cout && k == o.k && pad == o.pad && ws_cap == o.ws_cap;
    }
};

// What cuDNN said for one shape: an algorithm, its math type and workspace; or that it has none (the
// fallback, remembered so the query is not repeated).
struct ConvPlan {
    ConvShape shape;
    bool usable;
    cudnnConvolutionFwdAlgo_t algo;
    cudnnMathType_t math;
    size_t ws;
};

std::mutex g_plan_mu;
std::vector<ConvPlan> g_plans;
}  // namespace

static const char *algo_name(cudnnConvolutionFwdAlgo_t a) {
    switch (a) {
    case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM: return "IMPLICIT_GEMM";
    case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM: return "IMPLICIT_PRECOMP_GEMM";
    case CUDNN_CONVOLUTION_FWD_ALGO_GEMM: return "GEMM";
    case CUDNN_CONVOLUTION_FWD_ALGO_DIRECT: return "DIRECT";
    case CUDNN_CONVOLUTION_FWD_ALGO_FFT: return "FFT";
    case CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING: return "FFT_TILING";
    case CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD: return "WINOGRAD";
    case CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED: return "WINOGRAD_NONFUSED";
    default: return "?";
    }
}

static const char *math_name(cudnnMathType_t m) {
    switch (m) {
    case CUDNN_DEFAULT_MATH: return "default";
    case CUDNN_TENSOR_OP_MATH: return "tensor-op";
    case CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION: return "tensor-op-allow-conversion";
    case CUDNN_FMA_MATH: return "fma";
    default: return "?";
    }
}

static Status make_descs(ConvDescs &d, const ConvShape &s) {
    const cudnnDataType_t t = s.dt == DT_F32   ? CUDNN_DATA_FLOAT
                              : s.dt == DT_F16 ? CUDNN_DATA_HALF
                                               : CUDNN_DATA_BFLOAT16;
    const int Ho = (int)(s.H + 2 * s.pad - s.k + 1), Wo = (int)(s.W + 2 * s.pad - s.k + 1);
    CUDNN_TRY(cudnnCreateTensorDescriptor(&d.x));
    CUDNN_TRY(cudnnSetTensor4dDescriptor(d.x, CUDNN_TENSOR_NCHW, t, (int)s.B, (int)s.Cin, (int)s.H, (int)s.W));
    CUDNN_TRY(cudnnCreateFilterDescriptor(&d.w));
    CUDNN_TRY(cudnnSetFilter4dDescriptor(d.w, t, CUDNN_TENSOR_NCHW, (int)s.Cout, (int)s.Cin, (int)s.k, (int)s.k));
    CUDNN_TRY(cudnnCreateConvolutionDescriptor(&d.conv));
    // PyTorch's Conv2d is a cross-correlation. Compute type float: FLOAT_CONFIG for f32, PSEUDO_HALF_CONFIG for
    // f16, PSEUDO_BFLOAT16_CONFIG for bf16 (the legacy API's supported configurations).
    CUDNN_TRY(cudnnSetConvolution2dDescriptor(d.conv, (int)s.pad, (int)s.pad, 1, 1, 1, 1, CUDNN_CROSS_CORRELATION,
                                              CUDNN_DATA_FLOAT));
    // f32: FMA kernels only (CUDNN_DEFAULT_MATH would allow TF32 on Ampere and later). f16/bf16: tensor cores.
    CUDNN_TRY(cudnnSetConvolutionMathType(d.conv, s.dt == DT_F32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH));
    int on = 0, oc = 0, oh = 0, ow = 0;
    CUDNN_TRY(cudnnGetConvolution2dForwardOutputDim(d.conv, d.x, d.w, &on, &oc, &oh, &ow));
    if (on != s.B || oc != s.Cout || oh != Ho || ow != Wo)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cuDNN computes output [%d,%d,%d,%d], expected [%lld,%lld,%d,%d]", on, oc,
                         oh, ow, (long long)s.B, (long long)s.Cout, Ho, Wo);
    CUDNN_TRY(cudnnCreateTensorDescriptor(&d.y));
    CUDNN_TRY(cudnnSetTensor4dDescriptor(d.y, CUDNN_TENSOR_NCHW, t, (int)s.B, (int)s.Cout, Ho, Wo));
    return AGPT_OK;
}

// cuDNN's heuristic ranking, best first: the first deterministic algorithm whose workspace fits the engine's
// (and, for f32, that runs on FMA units). AGPT_ERR_UNSUPPORTED when there is none.
static Status choose_algo(cudnnHandle_t h, const ConvDescs &d, const ConvShape &s, ConvPlan *plan) {
    int max_algos = 0;
    CUDNN_TRY(cudnnGetConvolutionForwardAlgorithmMaxCount(h, &max_algos));
    if (max_algos < 1) max_algos = CUDNN_CONVOLUTION_FWD_ALGO_COUNT;
    std::vector<cudnnConvolutionFwdAlgoPerf_t> perf((size_t)max_algos);
    int got = 0;
    CUDNN_TRY(cudnnGetConvolutionForwardAlgorithm_v7(h, d.x, d.w, d.conv, d.y, max_algos, &got, perf.data()));
    int candidates = 0;
    for (int i = 0; i < got; i++) {
        const cudnnConvolutionFwdAlgoPerf_t &p = perf[(size_t)i];
        if (p.status != CUDNN_STATUS_SUCCESS) continue;
        candidates++;
        if (p.determinism != CUDNN_DETERMINISTIC) continue;
        if (p.mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) continue;
        if (s.dt == DT_F32 && p.mathType != CUDNN_FMA_MATH && p.mathType != CUDNN_DEFAULT_MATH) continue;
        // f32 keeps FMA math on the descriptor whatever the ranking says; f16/bf16 take the ranked math type.
        const cudnnMathType_t math = s.dt == DT_F32 ? CUDNN_FMA_MATH : p.mathType;
        CUDNN_TRY(cudnnSetConvolutionMathType(d.conv, math));
        size_t ws = 0;
        cudnnStatus_t st = cudnnGetConvolutionForwardWorkspaceSize(h, d.x, d.w, d.conv, d.y, p.algo, &ws);
        if (cudnn_shape_unsupported(st)) continue;
        if (st != CUDNN_STATUS_SUCCESS)
            return cudnn_fail(st, "cudnnGetConvolutionForwardWorkspaceSize", __FILE__, __LINE__);
        if (ws > s.ws_cap) continue;
        plan->usable = true;
        plan->algo = p.algo;
        plan->math = math;
        plan->ws = ws;
        return AGPT_OK;
    }
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "cuDNN ranks %d algorithms (%d usable), none deterministic%s within the "
                     "engine's %zu-byte workspace", got, candidates, s.dt == DT_F32 ? ", fp32-FMA" : "", s.ws_cap);
}

template <typename T>
__global__ void add_bias_kernel(T *out, const T *bias, int64_t Cout, int64_t HoWo, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(to_f32(out[i]) + to_f32(bias[(i / HoWo) % Cout]));
}

template <typename T>
static Status launch_add_bias(cudaStream_t s, void *out, const void *bias, int64_t Cout, int64_t HoWo, int64_t n) {
    add_bias_kernel<T><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)out, (const T *)bias, Cout, HoWo, n);
    CUDA_LAUNCH_CHECK("add_bias_kernel");
    return AGPT_OK;
}

#define SHAPE_FMT "conv2d %s x [%lld,%lld,%lld,%lld] w [%lld,%lld,%lld,%lld] pad %lld"
#define SHAPE_ARGS(s)                                                                                      \
    dtype_name((s).dt), (long long)(s).B, (long long)(s).Cin, (long long)(s).H, (long long)(s).W,          \
        (long long)(s).Cout, (long long)(s).Cin, (long long)(s).k, (long long)(s).k, (long long)(s).pad

// Records that cuDNN does not cover shape s (later calls go straight to the fallback) and, in auto mode, says
// so once; returns AGPT_ERR_UNSUPPORTED with the message already recorded.
static Status remember_unsupported(const ConvShape &s, bool strict) {
    bool first = true;
    {
        std::lock_guard<std::mutex> lock(g_plan_mu);
        for (ConvPlan &p : g_plans)
            if (p.shape == s) {
                p.usable = false;
                first = false;
            }
        if (first) {
            ConvPlan p{};
            p.shape = s;
            p.usable = false;
            g_plans.push_back(p);
        }
    }
    if (!strict)
        log_msg(LOG_WARN, SHAPE_FMT ": %s; using the implicit-GEMM kernel for this shape", SHAPE_ARGS(s),
                agpt_last_error());
    return AGPT_ERR_UNSUPPORTED;
}

// AGPT_ERR_UNSUPPORTED (nothing launched) when cuDNN has no algorithm for this shape: the caller falls back.
// strict (AGPT_CONV=cudnn): the caller turns that into an error, and the chosen algorithm is logged at info.
static Status cudnn_conv2d(Engine *e, void *out, const void *x, const void *w, const void *bias, const ConvShape &s,
                           bool strict) {
    ConvPlan plan{};
    bool known = false;
    {
        std::lock_guard<std::mutex> lock(g_plan_mu);
        for (const ConvPlan &p : g_plans)
            if (p.shape == s) {
                plan = p;
                known = true;
                break;
            }
    }
    if (known && !plan.usable)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "an earlier call found that cuDNN does not cover this shape");

    cudnnHandle_t h = NULL;
    AGPT_TRY(engine_cuda_cudnn(e, &h));
    ConvDescs d;
    Status st = make_descs(d, s);
    if (st == AGPT_ERR_UNSUPPORTED) return remember_unsupported(s, strict);
    AGPT_TRY(st);
    if (!known) {
        plan.shape = s;
        st = choose_algo(h, d, s, &plan);
        if (st == AGPT_ERR_UNSUPPORTED) return remember_unsupported(s, strict);
        AGPT_TRY(st);
        log_msg(strict ? LOG_INFO : LOG_DEBUG, SHAPE_FMT ": cuDNN %s, %s math, %zu-byte workspace", SHAPE_ARGS(s),
                algo_name(plan.algo), math_name(plan.math), plan.ws);
        std::lock_guard<std::mutex> lock(g_plan_mu);
        bool raced = false;  // another thread may have planned the same shape meanwhile: keep one entry
        for (const ConvPlan &p : g_plans) raced = raced || p.shape == s;
        if (!raced) g_plans.push_back(plan);
    }

    CUDNN_TRY(cudnnSetConvolutionMathType(d.conv, plan.math));
    const float one = 1.0f, zero = 0.0f;  // float scaling factors: every config here has compute type float
    const cudnnStatus_t cs = cudnnConvolutionForward(h, &one, d.x, x, d.w, w, d.conv, plan.algo,
                                                     plan.ws ? e->workspace : NULL, plan.ws, &zero, d.y, out);
    if (cs != CUDNN_STATUS_SUCCESS) {
        const Status fail = cudnn_fail(cs, "cudnnConvolutionForward", __FILE__, __LINE__);
        if (fail == AGPT_ERR_UNSUPPORTED) {
            agpt_add_context(fail, "cuDNN algorithm %s", algo_name(plan.algo));
            return remember_unsupported(s, strict);
        }
        return fail;
    }
    if (bias) {
        const int64_t HoWo = (s.H + 2 * s.pad - s.k + 1) * (s.W + 2 * s.pad - s.k + 1);
        AGPT_TRY(DISPATCH_FLOAT(s.dt, launch_add_bias, engine_stream(e), out, bias, s.Cout, HoWo, s.B * s.Cout * HoWo));
    }
    return AGPT_OK;
}
#endif  // AGPT_WITH_CUDNN

extern "C" Status cuda_conv2d(Engine *e, DType dt, void *out, const void *x, const void *w, const void *bias,
                              int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && Cin >= 1 && H >= 0 && W >= 0 && Cout >= 0 && k >= 1 && pad >= 0 &&
                       H + 2 * pad - k + 1 >= 1 && W + 2 * pad - k + 1 >= 1,
                   "%s: bad shape x [%lld,%lld,%lld,%lld], w [%lld,%lld,%lld,%lld], padding %lld", __func__,
                   (long long)B, (long long)Cin, (long long)H, (long long)W, (long long)Cout, (long long)Cin,
                   (long long)k, (long long)k, (long long)pad);
    const ConvSetting set = conv_setting();
    AGPT_CHECK_ARG(set.mode != CONV_BAD, "AGPT_CONV=%s: expected auto, cudnn or implicit", set.raw);
    const int64_t Ho = H + 2 * pad - k + 1, Wo = W + 2 * pad - k + 1;
    if (B * Ho * Wo == 0 || Cout == 0) return AGPT_OK;
    if (set.mode == CONV_IMPLICIT) return implicit_conv2d(e, dt, out, x, w, bias, B, Cin, H, W, Cout, k, pad);
#ifdef AGPT_WITH_CUDNN
    // cuDNN's 4-D descriptors take int dimensions and at most 2^31 elements per tensor; its fast kernels want
    // 16-byte aligned data. Anything else takes our kernel (in every mode: these are our preconditions).
    const bool fits = B * Cin * H * W <= INT32_MAX && B * Cout * Ho * Wo <= INT32_MAX &&
                      Cout * Cin * k * k <= INT32_MAX && pad <= INT32_MAX;
    const bool aligned = aligned16(out) && aligned16(x) && aligned16(w) && (!bias || aligned16(bias));
    if (fits && aligned) {
        const ConvShape s{e->gpu_index, dt, B, Cin, H, W, Cout, k, pad, e->workspace_bytes};
        Status st = cudnn_conv2d(e, out, x, w, bias, s, set.mode == CONV_CUDNN);
        if (st == AGPT_OK) return AGPT_OK;
        if (st != AGPT_ERR_UNSUPPORTED || set.mode == CONV_CUDNN)
            return agpt_add_context(st, "cuda_conv2d %s x [%lld,%lld,%lld,%lld] w [%lld,%lld,%lld,%lld] pad %lld "
                                    "through cuDNN (AGPT_CONV=implicit uses our kernel instead)", dtype_name(dt),
                                    (long long)B, (long long)Cin, (long long)H, (long long)W, (long long)Cout,
                                    (long long)Cin, (long long)k, (long long)k, (long long)pad);
        agpt_clear_error();  // cuDNN does not cover this shape: our kernel does
    }
#else
    AGPT_CHECK_ARG(set.mode != CONV_CUDNN, "AGPT_CONV=cudnn, but this build has no cuDNN (see the CMake NOTICE)");
#endif
    return implicit_conv2d(e, dt, out, x, w, bias, B, Cin, H, W, Cout, k, pad);
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
