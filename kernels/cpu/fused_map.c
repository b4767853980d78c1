// The anomaly map's fused per-layer step on the CPU (op_upsample_softmax2_axpy): for each output pixel, the
// bilinear resize of both class planes, the two-class softmax and the accumulation, with exactly the float
// arithmetic of cpu_upsample_bilinear, cpu_softmax2_class1 and cpu_axpy in kernels/cpu/vision.c, so the result
// equals that sequence bit for bit (tests/test_ops_fused.c checks it; keep the helpers below in step with
// vision.c's, which are static there).
#include <math.h>
#include <stdint.h>

#define PAR_IF(n) if ((n) > 16384)

// PyTorch's compute_source_index_and_lambda for align_corners=True with opmath_t = float, as vision.c.
static inline void bilinear_axis(int64_t i, int64_t in, int64_t out, float scale, int64_t *i0, int64_t *i1,
                                 float *l0, float *l1) {
    if (in == out) {
        *i0 = *i1 = i;
        *l0 = 1.0f, *l1 = 0.0f;
        return;
    }
    const float src = scale * (float)i;
    int64_t idx = (int64_t)floorf(src);
    if (idx > in - 1) idx = in - 1;
    float lam = src - (float)idx;
    lam = lam < 0.0f ? 0.0f : (lam > 1.0f ? 1.0f : lam);
    *i0 = idx;
    *i1 = idx + (idx < in - 1 ? 1 : 0);
    *l1 = lam;
    *l0 = 1.0f - lam;
}

static inline float bilinear_scale(int64_t in, int64_t out) {
    return out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f;
}

void cpu_upsample_softmax2_axpy(float *out, const float *logits, int64_t B, int64_t h, int64_t w, int64_t H,
                                int64_t W, float alpha) {
    const float sh = bilinear_scale(h, H), sw = bilinear_scale(w, W);
#pragma omp parallel for PAR_IF(B * H * W)
    for (int64_t row = 0; row < B * H; row++) {
        const int64_t b = row / H, oy = row % H;
        int64_t y0, y1;
        float hl0, hl1;
        bilinear_axis(oy, h, H, sh, &y0, &y1, &hl0, &hl1);
        const float *c0 = logits + (b * 2) * h * w, *c1 = logits + (b * 2 + 1) * h * w;
        float *o = out + row * W;
        for (int64_t ox = 0; ox < W; ox++) {
            int64_t x0, x1;
            float wl0, wl1;
            bilinear_axis(ox, w, W, sw, &x0, &x1, &wl0, &wl1);
            float l[2];
            for (int c = 0; c < 2; c++) {
                const float *r0 = (c ? c1 : c0) + y0 * w, *r1 = (c ? c1 : c0) + y1 * w;
                const float t0 = fmaf(r0[x0], wl0, r0[x1] * wl1);
                const float t1 = fmaf(r1[x0], wl0, r1[x1] * wl1);
                l[c] = fmaf(t0, hl0, t1 * hl1);
            }
            const float m = fmaxf(l[0], l[1]);
            const float e0 = expf(l[0] - m), e1 = expf(l[1] - m);
            const float p = e1 / (e0 + e1);
            o[ox] += alpha * p;
        }
    }
}
