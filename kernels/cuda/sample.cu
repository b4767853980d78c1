// Next-token sampling on the GPU, the semantics of kernels/cpu/sample.c (model/sampler.c): temperature, top-k
// keeping ties with the k-th largest score, top-p over the ascending order keeping the largest, then the inverse
// CDF at the caller's uniform. Simple and exact rather than fast: one block of 1024 threads does everything,
//   1. NaN check (an error naming the first NaN) and, for greedy, the first maximum;
//   2. scores = logits / temperature, and a bitonic sort of (score, id) pairs ascending in e->workspace, padded
//      to a power of two with (-inf, negative id) pairs that sort first;
//   3. top-k: scores below the k-th largest become -inf;
//   4. top-p: softmax, an inclusive prefix sum in double over the ascending order, the cut at 1 - top_p;
//   5. softmax of what is left, a prefix sum over ids, and the first id whose cumulative mass exceeds uniform.
// The arithmetic follows the host's: float scores and maxima, exponentials rounded from double (so they match
// glibc's correctly rounded expf), sums in double. Only the summation order differs (a tree instead of a left
// to right loop), which can move a token only when the uniform or the top-p cut sits within ~1e-16 of a
// boundary. The token comes back to the host, so the call synchronises the engine's stream.
#include <limits.h>

#include "kernels/cuda/common.cuh"

static const int kThreads = 1024;  // a multiple of 32; every helper below assumes full warps

// The same reduction result in every thread; the order of combination is fixed, so the result is too.
template <typename V, typename Op> __device__ V sample_block_reduce(V v, Op op) {
    __shared__ V buf[32];
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();  // an earlier call's readers are done with buf
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    v = buf[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) v = op(v, buf[w]);
    return v;
}

struct MaxF { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct SumD { __device__ double operator()(double a, double b) const { return a + b; } };
struct MinI { __device__ int operator()(int a, int b) const { return a < b ? a : b; } };
struct MaxI { __device__ int operator()(int a, int b) const { return a > b ? a : b; } };

// In-place inclusive prefix sum of a[0, n). Element i must have been written by thread i % blockDim.x (or
// before a barrier).
__device__ void sample_block_scan(double *a, int n) {
    __shared__ double warp_total[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    double carry = 0.0;
    __syncthreads();
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        double v = i < n ? a[i] : 0.0;
        for (int o = 1; o < 32; o <<= 1) {
            double t = __shfl_up_sync(0xffffffffu, v, o);
            if (lane >= o) v += t;
        }
        __syncthreads();  // the previous chunk's readers are done with warp_total
        if (lane == 31) warp_total[w] = v;
        __syncthreads();
        double off = carry, total = carry;
        for (int k = 0; k < nw; k++) {
            if (k < w) off += warp_total[k];
            total += warp_total[k];
        }
        if (i < n) a[i] = off + v;
        carry = total;
    }
    __syncthreads();
}

// out[i] = exp(x[i] - max) / sum, 0 where x is -inf (the host's softmax over the kept tokens).
__device__ void sample_softmax(const float *x, float *out, int n) {
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = sample_block_reduce(mx, MaxF());
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = x[i] == -INFINITY ? 0.0f : (float)exp((double)(x[i] - mx));
        out[i] = v;
        sum += (double)v;
    }
    sum = sample_block_reduce(sum, SumD());
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = (float)((double)out[i] / sum);
    __syncthreads();
}

// result[0] = token, result[1] = index of the first NaN logit or -1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T *logits, int V, int N2, float temperature, int top_k, float top_p, double uniform,
                  bool greedy, float *key, int32_t *idx, float *scores, float *p, double *cum, int32_t *result) {
    const int tid = threadIdx.x, nt = blockDim.x, pad = N2 - V;
    // 1. NaN check; greedy is the first maximum.
    int nan_at = INT_MAX, best = INT_MAX;
    float best_v = -INFINITY;
    for (int i = tid; i < V; i += nt) {
        float x = to_f32(logits[i]);
        if (isnan(x)) nan_at = min(nan_at, i);
        if (x > best_v || (x == best_v && i < best)) best_v = x, best = i;
    }
    nan_at = sample_block_reduce(nan_at, MinI());
    if (nan_at != INT_MAX) {
        if (tid == 0) result[0] = -1, result[1] = nan_at;
        return;
    }
    if (greedy) {
        const float mv = sample_block_reduce(best_v, MaxF());
        int first = best_v == mv ? best : INT_MAX;
        first = sample_block_reduce(first, MinI());
        if (tid == 0) result[0] = first, result[1] = -1;
        return;
    }
    // 2. Scores, then the ascending sort of (score, id); ids are unique, so the order is total.
    for (int i = tid; i < V; i += nt) {
        float x = to_f32(logits[i]);
        scores[i] = temperature == 1.0f ? x : x / temperature;
    }
    __syncthreads();
    for (int j = tid; j < N2; j += nt) {
        key[j] = j < pad ? -INFINITY : scores[j - pad];
        idx[j] = j - pad;  // negative for the padding
    }
    for (int k = 2; k <= N2; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            __syncthreads();
            for (int i = tid; i < N2; i += nt) {
                const int l = i ^ j;
                if (l <= i) continue;
                const float ki = key[i], kl = key[l];
                const int32_t ii = idx[i], il = idx[l];
                const bool greater = ki > kl || (ki == kl && ii > il);
                if (greater == ((i & k) == 0)) key[i] = kl, key[l] = ki, idx[i] = il, idx[l] = ii;
            }
        }
    __syncthreads();
    // 3. top-k: remove every score below the k-th largest; ties with it stay.
    if (top_k > 0 && top_k < V) {
        const float kth = key[N2 - top_k];
        for (int i = tid; i < V; i += nt)
            if (scores[i] < kth) scores[i] = -INFINITY;
        __syncthreads();
    }
    // 4. top-p over the ascending order: remove while the cumulative probability is <= 1 - p; never the largest.
    if (top_p < 1.0f) {
        sample_softmax(scores, p, V);
        for (int r = tid; r < V; r += nt) cum[r] = (double)p[idx[pad + r]];
        sample_block_scan(cum, V);
        const float keep_above = 1.0f - top_p;
        for (int r = tid; r < V - 1; r += nt)
            if ((float)cum[r] <= keep_above) scores[idx[pad + r]] = -INFINITY;
        __syncthreads();
    }
    // 5. The renormalised distribution and the inverse CDF in id order; the last token with mass takes any
    // rounding remainder (the host skips tokens with p <= 0, which adds nothing to the sum either).
    sample_softmax(scores, p, V);
    for (int i = tid; i < V; i += nt) cum[i] = p[i] <= 0.0f ? 0.0 : (double)p[i];
    sample_block_scan(cum, V);
    int first = INT_MAX, last = -1;
    for (int i = tid; i < V; i += nt) {
        if (p[i] <= 0.0f) continue;
        last = i;
        if (uniform < cum[i] && i < first) first = i;
    }
    first = sample_block_reduce(first, MinI());
    last = sample_block_reduce(last, MaxI());
    if (tid == 0) result[0] = first != INT_MAX ? first : (last >= 0 ? last : 0), result[1] = -1;
}

template <typename T>
static Status launch_sample(cudaStream_t s, const void *logits, int V, int N2, float temperature, int top_k,
                            float top_p, double uniform, bool greedy, float *key, int32_t *idx, float *scores,
                            float *p, double *cum, int32_t *result) {
    sample_kernel<T><<<1, kThreads, 0, s>>>((const T *)logits, V, N2, temperature, top_k, top_p, uniform, greedy,
                                            key, idx, scores, p, cum, result);
    CUDA_LAUNCH_CHECK("sample_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_sample(Engine *e, DType dt, int32_t *token, const void *logits, int64_t V, float temperature,
                              int top_k, float top_p, double uniform, bool greedy) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(token != NULL && logits != NULL, "%s: token or logits missing", __func__);
    AGPT_CHECK_ARG(V >= 1 && V <= (1LL << 30), "%s: vocabulary of %lld tokens (1 .. 2^30)", __func__, (long long)V);
    int64_t N2 = 1;
    while (N2 < V) N2 <<= 1;
    // Workspace: key f32[N2], idx i32[N2], scores f32[V], p f32[V], cum f64[V], result i32[2].
    const size_t o_idx = (size_t)N2 * 4, o_scores = o_idx + (size_t)N2 * 4, o_p = o_scores + (size_t)V * 4;
    const size_t o_cum = (o_p + (size_t)V * 4 + 7) & ~(size_t)7, o_res = o_cum + (size_t)V * 8, need = o_res + 8;
    AGPT_CHECK_ARG(e->workspace != NULL, "%s: the engine has no workspace (was it created with engine_create?)",
                   __func__);
    if (need > e->workspace_bytes)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: a vocabulary of %lld needs %zu bytes of scratch, the workspace "
                         "has %zu", __func__, (long long)V, need, e->workspace_bytes);
    char *ws = (char *)e->workspace;
    int32_t *result = (int32_t *)(ws + o_res);
    cudaStream_t s = engine_stream(e);
    AGPT_TRY(DISPATCH_FLOAT(dt, launch_sample, s, logits, (int)V, (int)N2, temperature, top_k, top_p, uniform,
                            greedy, (float *)ws, (int32_t *)(ws + o_idx), (float *)(ws + o_scores),
                            (float *)(ws + o_p), (double *)(ws + o_cum), result));
    int32_t host[2] = {-1, -1};
    CUDA_TRY(cudaMemcpyAsync(host, result, sizeof host, cudaMemcpyDeviceToHost, s));
    CUDA_TRY(cudaStreamSynchronize(s));
    if (host[1] >= 0)
        return AGPT_FAIL(AGPT_ERR_ARG, "sampler: logit %d is NaN; the model's output is broken", host[1]);
    *token = host[0];
    return AGPT_OK;
}
