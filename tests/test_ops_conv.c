// The prompt learner's ops of kernels/ops.h on the CPU backend: op_conv2d, op_relu and op_maxpool2x2, each against
// a naive double-precision loop (poisoned outputs, so an element an op forgets fails) at the prompt learner's real
// layer shapes (reference section 4) for batch 1 and 2, at odd sizes, with and without bias, and their argument
// checks.
#include <string.h>

#include "kernels/ops.h"
#include "runtime/rng.h"
#include "test.h"
#define TEST_NAME_WIDTH 72
#include "test_util.h"

static Rng rng;
static Engine eng;

// ---- conv2d ------------------------------------------------------------------------------------------------

static void ref_conv2d(double *out, const float *x, const float *w, const float *bias, int64_t B, int64_t Cin,
                       int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t p) {
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t co = 0; co < Cout; co++)
            for (int64_t oy = 0; oy < Ho; oy++)
                for (int64_t ox = 0; ox < Wo; ox++) {
                    double s = bias ? bias[co] : 0.0;
                    for (int64_t ci = 0; ci < Cin; ci++)
                        for (int64_t i = 0; i < k; i++) {
                            const int64_t iy = oy + i - p;
                            if (iy < 0 || iy >= H) continue;
                            for (int64_t j = 0; j < k; j++) {
                                const int64_t ix = ox + j - p;
                                if (ix < 0 || ix >= W) continue;
                                s += (double)x[((b * Cin + ci) * H + iy) * W + ix] *
                                     w[((co * Cin + ci) * k + i) * k + j];
                            }
                        }
                    out[((b * Cout + co) * Ho + oy) * Wo + ox] = s;
                }
}

static void test_conv2d(int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int p, bool bias) {
    char name[160];
    snprintf(name, sizeof name, "conv2d x [%lld,%lld,%lld,%lld] w [%lld,%lld,%lld,%lld] pad %d%s", (long long)B,
             (long long)Cin, (long long)H, (long long)W, (long long)Cout, (long long)Cin, (long long)k, (long long)k,
             p, bias ? " bias" : "");
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    const int64_t nx = B * Cin * H * W, nw = Cout * Cin * k * k, no = B * Cout * Ho * Wo;
    // Inputs like the prompt learner's: maps in [0, 2], weights at PyTorch's default init scale 1/sqrt(fan_in).
    float *x = malloc((size_t)nx * sizeof(float));
    rng_fill_uniform(&rng, x, (size_t)nx, 0.0f, 2.0f);
    float *w = test_randn(&rng, nw, 1.0f / sqrtf((float)(Cin * k * k))),
          *b = bias ? test_randn(&rng, Cout, 0.5f) : NULL;
    float *out = test_poisoned(no);
    double *ref = malloc((size_t)no * sizeof(double));
    ref_conv2d(ref, x, w, b, B, Cin, H, W, Cout, k, p);
    Tensor tx = cpu_f32_4d(x, B, Cin, H, W), tw = cpu_f32_4d(w, Cout, Cin, k, k), tb = cpu_f32_1d(b, Cout),
           to = cpu_f32_4d(out, B, Cout, Ho, Wo);
    CHECK_OK(op_conv2d(&eng, &to, &tx, &tw, bias ? &tb : NULL, p));
    CHECK_CLOSE_D(name, out, ref, no, 1e-5);  // DESIGN.md's per-op fp32 tolerance; measured <= 4e-7
    free(x), free(w), free(b), free(out), free(ref);
}

// ---- relu, maxpool -----------------------------------------------------------------------------------------

static void test_relu(int64_t n, bool in_place) {
    char name[96];
    snprintf(name, sizeof name, "relu n=%lld%s", (long long)n, in_place ? " in place" : "");
    float *x = test_randn(&rng, n, 1.0f), *out = in_place ? x : test_poisoned(n);
    x[0] = NAN;  // torch.relu keeps NaN
    if (n > 2) x[2] = -0.0f;
    double *ref = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) ref[i] = x[i] > 0 ? x[i] : 0.0;
    Tensor tx = cpu_f32_1d(x, n), to = cpu_f32_1d(out, n);
    CHECK_OK(op_relu(&eng, &to, &tx));
    CHECK(isnan(out[0]), "%s: NaN did not stay NaN", name);
    out[0] = 0.0f, ref[0] = 0.0;
    CHECK_CLOSE_D(name, out, ref, n, 0.0);  // exact
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad += out[i] < 0.0f;
    CHECK(bad == 0, "%s: %d negative outputs", name, bad);
    if (!in_place) free(out);
    free(x), free(ref);
}

static void test_maxpool(int64_t B, int64_t C, int64_t H, int64_t W) {
    char name[96];
    snprintf(name, sizeof name, "maxpool2x2 [%lld,%lld,%lld,%lld]", (long long)B, (long long)C, (long long)H,
             (long long)W);
    const int64_t Ho = H / 2, Wo = W / 2, nx = B * C * H * W, no = B * C * Ho * Wo;
    float *x = test_randn(&rng, nx, 1.0f), *out = test_poisoned(no);
    double *ref = malloc((size_t)(no ? no : 1) * sizeof(double));
    for (int64_t c = 0; c < B * C; c++)
        for (int64_t oy = 0; oy < Ho; oy++)
            for (int64_t ox = 0; ox < Wo; ox++) {
                double m = -INFINITY;
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < 2; j++) m = fmax(m, x[(c * H + 2 * oy + i) * W + 2 * ox + j]);
                ref[(c * Ho + oy) * Wo + ox] = m;
            }
    Tensor tx = cpu_f32_4d(x, B, C, H, W), to = cpu_f32_4d(out, B, C, Ho, Wo);
    CHECK_OK(op_maxpool2x2(&eng, &to, &tx));
    CHECK_CLOSE_D(name, out, ref, no, 0.0);  // a selection: exact
    // A NaN anywhere in a window wins, as in PyTorch's max_pool2d (the last element of window (0,0)).
    if (Ho > 0 && Wo > 0) {
        x[W + 1] = NAN;
        CHECK_OK(op_maxpool2x2(&eng, &to, &tx));
        CHECK(isnan(out[0]) && (no == 1 || !isnan(out[1])), "%s: a NaN in window 0 should give NaN there only",
              name);
    }
    free(x), free(out), free(ref);
}

// ---- argument checks ---------------------------------------------------------------------------------------

static void test_errors(void) {
    float *a = test_randn(&rng, 1 << 16, 1.0f), *b = test_poisoned(1 << 16);
    Tensor x = cpu_f32_4d(a, 2, 3, 8, 8), w = cpu_f32_4d(a, 4, 3, 3, 3), bias = cpu_f32_1d(a, 4),
           out = cpu_f32_4d(b, 2, 4, 8, 8);
    CHECK_OK(op_conv2d(&eng, &out, &x, &w, &bias, 1));
    Tensor w_cin = cpu_f32_4d(a, 4, 2, 3, 3), w_rect = cpu_f32_4d(a, 4, 3, 3, 5), bias_bad = cpu_f32_1d(a, 5),
           out_bad = cpu_f32_4d(b, 2, 4, 6, 6);
    Tensor x3 = tensor_3d(a, DT_F32, DEV_CPU, 3, 8, 8), w_big = cpu_f32_4d(a, 4, 3, 11, 11),
           out_1 = cpu_f32_4d(b, 2, 4, 1, 1);
    CHECK_ERR(op_conv2d(&eng, &out, &x, &w_cin, &bias, 1));     // Cin differs
    CHECK_ERR(op_conv2d(&eng, &out, &x, &w_rect, &bias, 1));    // non-square kernel
    CHECK_ERR(op_conv2d(&eng, &out, &x, &w, &bias_bad, 1));     // bias of the wrong size
    CHECK_ERR(op_conv2d(&eng, &out_bad, &x, &w, &bias, 1));     // out of the wrong size (pad 0 would fit)
    CHECK_ERR(op_conv2d(&eng, &out, &x3, &w, &bias, 1));        // 3-D x
    CHECK_ERR(op_conv2d(&eng, &out, &x, &w, &bias, -1));        // negative padding
    CHECK_ERR(op_conv2d(&eng, &out_1, &x, &w_big, &bias, 1));   // kernel larger than the padded image
    Tensor alias = cpu_f32_4d(a, 2, 4, 8, 8);
    CHECK_ERR(op_conv2d(&eng, &alias, &x, &w, &bias, 1));       // out aliasing x
    Tensor w_bf16 = tensor_4d(a, DT_BF16, DEV_CPU, 4, 3, 3, 3);
    CHECK_ERR(op_conv2d(&eng, &out, &x, &w_bf16, &bias, 1));    // dtype mismatch
    Tensor x_gpu = x;
    x_gpu.device = DEV_CUDA;
    CHECK_ERR(op_conv2d(&eng, &out, &x_gpu, &w, &bias, 1));     // wrong device
    // relu: shapes differ
    Tensor r1 = cpu_f32_1d(a, 16), r2 = cpu_f32_1d(b, 17);
    CHECK_ERR(op_relu(&eng, &r2, &r1));
    // maxpool: out not half the size (floor), 3-D input, aliasing
    Tensor px = cpu_f32_4d(a, 1, 2, 7, 9), po = cpu_f32_4d(b, 1, 2, 3, 4), po_ceil = cpu_f32_4d(b, 1, 2, 4, 5),
           po_c = cpu_f32_4d(b, 1, 3, 3, 4);
    Tensor px3 = tensor_3d(a, DT_F32, DEV_CPU, 2, 7, 9), po_alias = cpu_f32_4d(a, 1, 2, 3, 4);
    CHECK_OK(op_maxpool2x2(&eng, &po, &px));
    CHECK_ERR(op_maxpool2x2(&eng, &po_ceil, &px));
    CHECK_ERR(op_maxpool2x2(&eng, &po_c, &px));
    CHECK_ERR(op_maxpool2x2(&eng, &po, &px3));
    CHECK_ERR(op_maxpool2x2(&eng, &po_alias, &px));
    free(a), free(b);
}

int main(void) {
    rng_seed(&rng, 4242);
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 7));

    printf("conv2d: the prompt learner's layers (reference section 4), batch 1 and 2\n");
    for (int B = 1; B <= 2; B++) {
        test_conv2d(B, 1, 224, 224, 4, 3, 1, true);
        test_conv2d(B, 4, 112, 112, 16, 3, 1, true);
        test_conv2d(B, 16, 56, 56, 64, 3, 1, true);
        test_conv2d(B, 64, 28, 28, 256, 3, 1, true);
    }
    // The two widest layers are ~0.5 GFLOP in double each: batch 1 only.
    test_conv2d(1, 256, 14, 14, 1024, 3, 1, true);
    test_conv2d(1, 1024, 7, 7, 4096, 5, 0, true);
    printf("conv2d: odd sizes\n");
    test_conv2d(2, 3, 7, 5, 5, 3, 1, true);
    test_conv2d(3, 2, 9, 11, 7, 5, 0, false);
    test_conv2d(1, 5, 6, 4, 3, 1, 0, true);   // 1x1
    test_conv2d(2, 2, 5, 5, 3, 5, 2, false);  // padding = k/2 with k = 5
    test_conv2d(1, 1, 3, 3, 2, 5, 1, true);   // kernel larger than the image: mostly padding
    test_conv2d(1, 3, 4, 4, 2, 3, 3, true);   // padding wider than the kernel: a zero border plus bias
    test_conv2d(1, 4, 1000, 13, 5, 3, 1, true);  // tall and narrow
    test_conv2d(1, 300, 120, 120, 2, 3, 1, false);  // K * Wo * rows > the 16 MiB bound: chunks of output rows

    printf("relu\n");
    test_relu(4 * 224 * 224, false);
    test_relu(4 * 224 * 224 + 3, true);
    test_relu(1, false);

    printf("maxpool2x2\n");
    test_maxpool(1, 4, 224, 224);
    test_maxpool(2, 1024, 14, 14);
    test_maxpool(2, 3, 7, 9);  // odd: last row and column dropped
    test_maxpool(1, 2, 3, 3);
    test_maxpool(1, 1, 2, 2);
    test_maxpool(1, 2, 1, 5);  // one row: empty output

    printf("argument checks\n");
    test_errors();

    engine_destroy(&eng);
    return test_summary();
}
