// The anomaly map's fused per-layer step on the GPU (op_upsample_softmax2_axpy): out [B,H,W] += alpha *
// class-1 softmax of logits [B,2,h,w] resized bilinearly with align_corners=True.
//
// Unfused, each decoder layer writes two upsampled planes (2 x H x W), reads them back for the softmax, writes the
// probabilities, and reads them and the map again for the axpy: about 7 H x W passes. Here one thread per output
// pixel reads its 2 x 4 grid values (a 2 x 16 x 16 grid sits in L1/L2 for the whole image) and reads and writes
// out once. The arithmetic is kernels/cuda/vision.cu's: PyTorch's source index and lambda in float, the
// width-then-height blend as fma(a, b, round(c * d)) written with explicit __fmaf_rn/__fmul_rn so that contraction
// cannot change it, the max-subtracted softmax with expf; everything stays fp32 and is rounded once at the store.
#include "kernels/cuda/common.cuh"

static const int kFusedMapThreads = 256;

// PyTorch's compute_source_index_and_lambda (align_corners, opmath float), as kernels/cuda/vision.cu.
__device__ __forceinline__ void fm_bilinear_axis(int64_t i, int64_t in, int64_t out, float scale, int64_t &i0,
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
__global__ void upsample_softmax2_axpy_kernel(T *out, const T *logits, int64_t B, int64_t h, int64_t w, int64_t H,
                                              int64_t W, float sh, float sw, float alpha) {
    const int64_t n = B * H * W;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ox = i % W, t = i / W, oy = t % H, b = t / H;
        int64_t y0, y1, x0, x1;
        float hl0, hl1, wl0, wl1;
        fm_bilinear_axis(oy, h, H, sh, y0, y1, hl0, hl1);
        fm_bilinear_axis(ox, w, W, sw, x0, x1, wl0, wl1);
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
