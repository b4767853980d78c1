// Elementwise ops: add, scale, GELU, SwiGLU (and their backwards), casts, AdamW, sum of squares.
//
// All are memory-bound, so the one thing that matters is moving bytes well: grid-stride loops over 16-byte
// vectors (4 f32 or 8 f16/bf16 per access) when every pointer is 16-byte aligned, element by element
// otherwise (a view into the middle of a tensor may not be). Math is fp32; stores round to nearest even.
// Each element is read and written by the same thread, so an output may alias an input.
#include <math.h>

#include "kernels/cuda/common.cuh"

static const int kThreads = 256;

// ---------------------------------------------------------------------------------------------------------
// Generic maps: out = op(a) and out = op(a, b). Vector part first, then the < V leftover elements.

template <typename T, int V, typename Op>
__global__ void map1_kernel(T *out, const T *a, int64_t n, Op op) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
        float x[V];
        load_vec<T, V>(a + i * V, x);
#pragma unroll
        for (int j = 0; j < V; j++) x[j] = op(x[j]);
        store_vec<T, V>(out + i * V, x);
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) out[i] = from_f32<T>(op(to_f32(a[i])));
}

template <typename T, int V, typename Op>
__global__ void map2_kernel(T *out, const T *a, const T *b, int64_t n, Op op) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
        float x[V], y[V];
        load_vec<T, V>(a + i * V, x);
        load_vec<T, V>(b + i * V, y);
#pragma unroll
        for (int j = 0; j < V; j++) x[j] = op(x[j], y[j]);
        store_vec<T, V>(out + i * V, x);
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) out[i] = from_f32<T>(op(to_f32(a[i]), to_f32(b[i])));
}

template <typename T, typename Op>
static Status launch_map1(cudaStream_t s, void *out, const void *a, int64_t n, Op op, const char *name) {
    constexpr int V = vec16<T>();
    if (aligned16(out) && aligned16(a)) {
        map1_kernel<T, V, Op><<<grid_for(n / V + 1, kThreads), kThreads, 0, s>>>((T *)out, (const T *)a, n, op);
    } else {
        map1_kernel<T, 1, Op><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)out, (const T *)a, n, op);
    }
    CUDA_LAUNCH_CHECK(name);
    return AGPT_OK;
}

template <typename T, typename Op>
static Status launch_map2(cudaStream_t s, void *out, const void *a, const void *b, int64_t n, Op op,
                          const char *name) {
    constexpr int V = vec16<T>();
    if (aligned16(out) && aligned16(a) && aligned16(b)) {
        map2_kernel<T, V, Op><<<grid_for(n / V + 1, kThreads), kThreads, 0, s>>>((T *)out, (const T *)a,
                                                                                  (const T *)b, n, op);
    } else {
        map2_kernel<T, 1, Op><<<grid_for(n, kThreads), kThreads, 0, s>>>((T *)out, (const T *)a, (const T *)b, n,
                                                                          op);
    }
    CUDA_LAUNCH_CHECK(name);
    return AGPT_OK;
}

#define CHECK_N(n)                                                                                         \
    AGPT_CHECK_ARG((n) >= 0, "%s: negative element count %lld", __func__, (long long)(n))

// ---------------------------------------------------------------------------------------------------------
// The element functions.

struct AddOp {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct ScaleOp {
    float s;
    __device__ float operator()(float x) const { return x * s; }
};
// Exact GELU, x * Phi(x), with erff as PyTorch's default (not the tanh approximation).
struct GeluOp {
    __device__ float operator()(float x) const { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
};
// d/dx [x Phi(x)] = Phi(x) + x phi(x), phi the standard normal density.
struct GeluBackwardOp {
    __device__ float operator()(float dout, float x) const {
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
        const float pdf = 0.39894228040143267794f * expf(-0.5f * x * x);
        return dout * (cdf + x * pdf);
    }
};
// silu(g) * u. expf(-g) overflows to inf for g < -88, giving g / inf = -0: the right limit.
struct SwigluOp {
    __device__ float operator()(float g, float u) const { return g / (1.0f + expf(-g)) * u; }
};

extern "C" Status cuda_add(Engine *e, DType dt, void *out, const void *a, const void *b, int64_t n) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    switch (dt) {
    case DT_F32: return launch_map2<float>(s, out, a, b, n, AddOp{}, "add_kernel");
    case DT_F16: return launch_map2<__half>(s, out, a, b, n, AddOp{}, "add_kernel");
    default: return launch_map2<__nv_bfloat16>(s, out, a, b, n, AddOp{}, "add_kernel");
    }
}

extern "C" Status cuda_scale(Engine *e, DType dt, void *x, int64_t n, float s) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    cudaStream_t st = engine_stream(e);
    switch (dt) {
    case DT_F32: return launch_map1<float>(st, x, x, n, ScaleOp{s}, "scale_kernel");
    case DT_F16: return launch_map1<__half>(st, x, x, n, ScaleOp{s}, "scale_kernel");
    default: return launch_map1<__nv_bfloat16>(st, x, x, n, ScaleOp{s}, "scale_kernel");
    }
}

extern "C" Status cuda_gelu(Engine *e, DType dt, void *out, const void *x, int64_t n) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    switch (dt) {
    case DT_F32: return launch_map1<float>(s, out, x, n, GeluOp{}, "gelu_kernel");
    case DT_F16: return launch_map1<__half>(s, out, x, n, GeluOp{}, "gelu_kernel");
    default: return launch_map1<__nv_bfloat16>(s, out, x, n, GeluOp{}, "gelu_kernel");
    }
}

extern "C" Status cuda_gelu_backward(Engine *e, DType dt, void *dx, const void *dout, const void *x, int64_t n) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    switch (dt) {
    case DT_F32: return launch_map2<float>(s, dx, dout, x, n, GeluBackwardOp{}, "gelu_backward_kernel");
    case DT_F16: return launch_map2<__half>(s, dx, dout, x, n, GeluBackwardOp{}, "gelu_backward_kernel");
    default: return launch_map2<__nv_bfloat16>(s, dx, dout, x, n, GeluBackwardOp{}, "gelu_backward_kernel");
    }
}

extern "C" Status cuda_swiglu(Engine *e, DType dt, void *out, const void *gate, const void *up, int64_t n) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    switch (dt) {
    case DT_F32: return launch_map2<float>(s, out, gate, up, n, SwigluOp{}, "swiglu_kernel");
    case DT_F16: return launch_map2<__half>(s, out, gate, up, n, SwigluOp{}, "swiglu_kernel");
    default: return launch_map2<__nv_bfloat16>(s, out, gate, up, n, SwigluOp{}, "swiglu_kernel");
    }
}

// With s = sigmoid(g): d silu/dg = s (1 + g (1 - s)), so
//   dgate = dout * u * s * (1 + g (1 - s)),   dup = dout * g * s.
// Two outputs, so not a generic map; still vectorised the same way.
template <typename T, int V>
__global__ void swiglu_backward_kernel(T *dgate, T *dup, const T *dout, const T *gate, const T *up, int64_t n) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
        float d[V], g[V], u[V], dg[V], du[V];
        load_vec<T, V>(dout + i * V, d);
        load_vec<T, V>(gate + i * V, g);
        load_vec<T, V>(up + i * V, u);
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float sg = 1.0f / (1.0f + expf(-g[j]));
            dg[j] = d[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
            du[j] = d[j] * g[j] * sg;
        }
        store_vec<T, V>(dgate + i * V, dg);
        store_vec<T, V>(dup + i * V, du);
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) {
        const float d = to_f32(dout[i]), g = to_f32(gate[i]), u = to_f32(up[i]);
        const float sg = 1.0f / (1.0f + expf(-g));
        dgate[i] = from_f32<T>(d * u * sg * (1.0f + g * (1.0f - sg)));
        dup[i] = from_f32<T>(d * g * sg);
    }
}

template <typename T>
static Status launch_swiglu_backward(cudaStream_t s, void *dgate, void *dup, const void *dout, const void *gate,
                                     const void *up, int64_t n) {
    constexpr int V = vec16<T>();
    if (aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) && aligned16(up)) {
        swiglu_backward_kernel<T, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, s>>>(
            (T *)dgate, (T *)dup, (const T *)dout, (const T *)gate, (const T *)up, n);
    } else {
        swiglu_backward_kernel<T, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>(
            (T *)dgate, (T *)dup, (const T *)dout, (const T *)gate, (const T *)up, n);
    }
    CUDA_LAUNCH_CHECK("swiglu_backward_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_swiglu_backward(Engine *e, DType dt, void *dgate, void *dup, const void *dout,
                                       const void *gate, const void *up, int64_t n) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    return DISPATCH_FLOAT(dt, launch_swiglu_backward, engine_stream(e), dgate, dup, dout, gate, up, n);
}

// ---------------------------------------------------------------------------------------------------------
// Casts: through fp32, which holds every f16 and bf16 value exactly, then one round-to-nearest-even store,
// so f16 <-> bf16 is rounded once, like the host's convert_host.

template <typename TO, typename TI, int V>
__global__ void cast_kernel(TO *out, const TI *x, int64_t n) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
        float v[V];
        load_vec<TI, V>(x + i * V, v);
        store_vec<TO, V>(out + i * V, v);
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) out[i] = from_f32<TO>(to_f32(x[i]));
}

template <typename TO, typename TI>
static Status launch_cast(cudaStream_t s, void *out, const void *x, int64_t n) {
    // V elements make 16 bytes of the wider type; the narrower side then moves 8 bytes, element-wise.
    constexpr int V = (int)(16 / (sizeof(TO) > sizeof(TI) ? sizeof(TO) : sizeof(TI)));
    if (aligned16(out) && aligned16(x)) {
        cast_kernel<TO, TI, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, s>>>((TO *)out, (const TI *)x, n);
    } else {
        cast_kernel<TO, TI, 1><<<grid_for(n, kThreads), kThreads, 0, s>>>((TO *)out, (const TI *)x, n);
    }
    CUDA_LAUNCH_CHECK("cast_kernel");
    return AGPT_OK;
}

template <typename TO>
static Status launch_cast_from(cudaStream_t s, void *out, const void *x, DType x_dt, int64_t n) {
    switch (x_dt) {
    case DT_F32: return launch_cast<TO, float>(s, out, x, n);
    case DT_F16: return launch_cast<TO, __half>(s, out, x, n);
    default: return launch_cast<TO, __nv_bfloat16>(s, out, x, n);
    }
}

extern "C" Status cuda_cast(Engine *e, void *out, DType out_dt, const void *x, DType x_dt, int64_t n) {
    CHECK_FLOAT_DT(out_dt);
    CHECK_FLOAT_DT(x_dt);
    CHECK_N(n);
    if (n == 0) return AGPT_OK;
    cudaStream_t s = engine_stream(e);
    if (out_dt == x_dt) {
        if (out != x)
            CUDA_TRY(cudaMemcpyAsync(out, x, (size_t)n * dtype_size(x_dt), cudaMemcpyDeviceToDevice, s));
        return AGPT_OK;
    }
    switch (out_dt) {
    case DT_F32: return launch_cast_from<float>(s, out, x, x_dt, n);
    case DT_F16: return launch_cast_from<__half>(s, out, x, x_dt, n);
    default: return launch_cast_from<__nv_bfloat16>(s, out, x, x_dt, n);
    }
}

// ---------------------------------------------------------------------------------------------------------
// AdamW, f32 state, PyTorch's torch.optim.AdamW order of operations (as the CPU reference): decoupled weight
// decay on the old parameter first, then the bias-corrected step with denom = sqrt(v) / sqrt(bc2) + eps.
// The bias corrections are computed once on the host in float exactly as the CPU does.

__global__ void adamw_kernel(float *param, const float *grad, float *m, float *v, int64_t n, float beta1,
                             float beta2, float eps, float decay_factor, float step_size, float bc2_sqrt) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = grad[i];
        const float p = param[i] * decay_factor;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = p - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

extern "C" Status cuda_adamw(Engine *e, float *param, const float *grad, float *m, float *v, int64_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, int step) {
    CHECK_N(n);
    AGPT_CHECK_ARG(step >= 1, "cuda_adamw: step is %d; it counts from 1", step);
    if (n == 0) return AGPT_OK;
    const float bc1 = 1.0f - powf(beta1, (float)step);
    const float bc2 = 1.0f - powf(beta2, (float)step);
    adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, engine_stream(e)>>>(
        param, grad, m, v, n, beta1, beta2, eps, 1.0f - lr * weight_decay, lr / bc1, sqrtf(bc2));
    CUDA_LAUNCH_CHECK("adamw_kernel");
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// Sum of squares: each block reduces its grid-stride share in f32 and writes one partial into the engine's
// workspace (stream-ordered scratch, see engine_cuda.cu); the host adds the partials in double. At most
// kSumBlocks partials, so each f32 partial covers n / kSumBlocks elements.

static const int kSumBlocks = 1024;

template <typename T, int V>
__global__ void sum_squares_kernel(float *partials, const T *x, int64_t n) {
    __shared__ float scratch[32];
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t nv = n / V;
    float acc = 0.0f;
    for (int64_t i = tid; i < nv; i += stride) {
        float v[V];
        load_vec<T, V>(x + i * V, v);
#pragma unroll
        for (int j = 0; j < V; j++) acc += v[j] * v[j];
    }
    for (int64_t i = nv * V + tid; i < n; i += stride) {
        const float v = to_f32(x[i]);
        acc += v * v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename T>
static Status launch_sum_squares(cudaStream_t s, float *partials, int *nblocks, const void *x, int64_t n) {
    constexpr int V = vec16<T>();
    const bool vec = aligned16(x);
    unsigned blocks = grid_for(vec ? n / V + 1 : n, kThreads);
    if (blocks > (unsigned)kSumBlocks) blocks = kSumBlocks;
    *nblocks = (int)blocks;
    if (vec)
        sum_squares_kernel<T, V><<<blocks, kThreads, 0, s>>>(partials, (const T *)x, n);
    else
        sum_squares_kernel<T, 1><<<blocks, kThreads, 0, s>>>(partials, (const T *)x, n);
    CUDA_LAUNCH_CHECK("sum_squares_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_sum_squares(Engine *e, DType dt, double *result, const void *x, int64_t n) {
    CHECK_FLOAT_DT(dt);
    CHECK_N(n);
    *result = 0.0;
    if (n == 0) return AGPT_OK;
    AGPT_CHECK_ARG(e->workspace != NULL && e->workspace_bytes >= kSumBlocks * sizeof(float),
                   "cuda_sum_squares: the engine has no workspace (was it created with engine_create?)");
    cudaStream_t s = engine_stream(e);
    float *partials = (float *)e->workspace;
    int nblocks = 0;
    AGPT_TRY(DISPATCH_FLOAT(dt, launch_sum_squares, s, partials, &nblocks, x, n));
    float host[kSumBlocks];
    CUDA_TRY(cudaMemcpyAsync(host, partials, (size_t)nblocks * sizeof(float), cudaMemcpyDeviceToHost, s));
    CUDA_TRY(cudaStreamSynchronize(s));
    double sum = 0.0;
    for (int i = 0; i < nblocks; i++) sum += (double)host[i];
    *result = sum;
    return AGPT_OK;
}
