// The fused ops on the CPU (kernels/ops.h): op_add_layernorm and op_add_rmsnorm must equal the unfused
// sequence op_add then op_layernorm / op_rmsnorm bit for bit (sum, out, mean, rstd), in place too (sum aliasing
// a or b, as the blocks use them), and a double-precision loop within 1e-5. Outputs start as NaN so an element
// the op forgets to write fails. op_upsample_softmax2_axpy must equal op_upsample_bilinear, op_softmax2_class1
// and op_axpy bit for bit, and a double loop within 1e-5. Plus the argument checks.
#include <string.h>

#include "kernels/ops.h"
#include "runtime/rng.h"
#include "test.h"
#define TEST_NAME_WIDTH 52
#include "test_util.h"

static Rng rng;
static Engine eng;

static bool same_bits(const float *x, const float *y, int64_t n) { return memcmp(x, y, (size_t)n * sizeof(float)) == 0; }

// Double loops: s = a + b as float (the stored residual), then the norm of s in double.
static void ref_add_norm(double *out, double *mean, double *rstd, float *sum, const float *a, const float *b,
                         const float *w, const float *bias, int64_t rows, int64_t C, double eps, bool rms) {
    for (int64_t i = 0; i < rows * C; i++) sum[i] = a[i] + b[i];
    for (int64_t r = 0; r < rows; r++) {
        const float *s = sum + r * C;
        double mu = 0, var = 0;
        if (!rms) {
            for (int64_t i = 0; i < C; i++) mu += s[i];
            mu /= (double)C;
        }
        for (int64_t i = 0; i < C; i++) var += (s[i] - mu) * (s[i] - mu);
        double rs = 1.0 / sqrt(var / (double)C + eps);
        for (int64_t i = 0; i < C; i++) out[r * C + i] = (s[i] - mu) * rs * w[i] + (rms ? 0.0 : bias[i]);
        mean[r] = mu;
        rstd[r] = rs;
    }
}

// alias: 0 sum is its own buffer, 1 sum = a, 2 sum = b.
static void test_case(bool rms, int64_t rows, int64_t C, int alias) {
    char name[128];
    const char *what = rms ? "add_rmsnorm" : "add_layernorm";
    const char *al = alias == 0 ? "" : alias == 1 ? " sum=a" : " sum=b";
    const int64_t n = rows * C;
    const float eps = rms ? 1e-6f : 1e-5f;
    float *a = test_randn(&rng, n, 1.0f), *b = test_randn(&rng, n, 0.5f);
    for (int64_t i = 0; i < n; i++) a[i] += 3.0f;  // a large mean: the LayerNorm variance must not cancel
    float *w = test_randn(&rng, C, 0.2f), *bias = test_randn(&rng, C, 0.1f);
    for (int64_t i = 0; i < C; i++) w[i] += 1.0f;

    // Unfused: op_add into its own buffer, then the norm.
    float *u_sum = test_poisoned(n), *u_out = test_poisoned(n), *u_mean = test_poisoned(rows),
          *u_rstd = test_poisoned(rows);
    Tensor ta = cpu_f32_2d(a, rows, C), tb = cpu_f32_2d(b, rows, C), tw = cpu_f32_1d(w, C), tbias = cpu_f32_1d(bias, C);
    Tensor tus = cpu_f32_2d(u_sum, rows, C), tuo = cpu_f32_2d(u_out, rows, C);
    Tensor tum = cpu_f32_1d(u_mean, rows), tur = cpu_f32_1d(u_rstd, rows);
    CHECK_OK(op_add(&eng, &tus, &ta, &tb));
    if (rms) CHECK_OK(op_rmsnorm(&eng, &tuo, &tur, &tus, &tw, eps));
    else CHECK_OK(op_layernorm(&eng, &tuo, &tum, &tur, &tus, &tw, &tbias, eps));

    // Fused, on copies of a and b so the aliasing cases may overwrite them.
    float *fa = malloc((size_t)n * sizeof(float)), *fb = malloc((size_t)n * sizeof(float));
    memcpy(fa, a, (size_t)n * sizeof(float));
    memcpy(fb, b, (size_t)n * sizeof(float));
    float *own_sum = test_poisoned(n), *f_out = test_poisoned(n), *f_mean = test_poisoned(rows),
          *f_rstd = test_poisoned(rows);
    float *f_sum = alias == 1 ? fa : alias == 2 ? fb : own_sum;
    Tensor tfa = cpu_f32_2d(fa, rows, C), tfb = cpu_f32_2d(fb, rows, C);
    Tensor tfs = cpu_f32_2d(f_sum, rows, C), tfo = cpu_f32_2d(f_out, rows, C);
    Tensor tfm = cpu_f32_1d(f_mean, rows), tfr = cpu_f32_1d(f_rstd, rows);
    if (rms) CHECK_OK(op_add_rmsnorm(&eng, &tfs, &tfo, &tfr, &tfa, &tfb, &tw, eps));
    else CHECK_OK(op_add_layernorm(&eng, &tfs, &tfo, &tfm, &tfr, &tfa, &tfb, &tw, &tbias, eps));

    snprintf(name, sizeof name, "%s %lldx%lld%s", what, (long long)rows, (long long)C, al);
    CHECK(same_bits(f_sum, u_sum, n), "%s: sum differs from op_add", name);
    CHECK(same_bits(f_out, u_out, n), "%s: out differs from the unfused norm", name);
    CHECK(same_bits(f_rstd, u_rstd, rows), "%s: rstd differs from the unfused norm", name);
    if (!rms) CHECK(same_bits(f_mean, u_mean, rows), "%s: mean differs from the unfused norm", name);
    if (same_bits(f_sum, u_sum, n) && same_bits(f_out, u_out, n) && same_bits(f_rstd, u_rstd, rows))
        printf("  %-*s bit-identical to op_add + op_%s\n", TEST_NAME_WIDTH, name, rms ? "rmsnorm" : "layernorm");

    double *r_out = malloc((size_t)n * sizeof(double)), *r_mean = malloc((size_t)rows * sizeof(double)),
           *r_rstd = malloc((size_t)rows * sizeof(double));
    float *r_sum = malloc((size_t)n * sizeof(float));
    ref_add_norm(r_out, r_mean, r_rstd, r_sum, a, b, w, bias, rows, C, eps, rms);
    char nm[160];
    snprintf(nm, sizeof nm, "%s out vs double", name);
    CHECK_CLOSE_D(nm, f_out, r_out, n, 1e-5);
    snprintf(nm, sizeof nm, "%s rstd vs double", name);
    CHECK_CLOSE_D(nm, f_rstd, r_rstd, rows, 1e-5);
    if (!rms) {
        snprintf(nm, sizeof nm, "%s mean vs double", name);
        CHECK_CLOSE_D(nm, f_mean, r_mean, rows, 1e-5);
    }
    CHECK(same_bits(f_sum, r_sum, n), "%s: sum is not the float a + b", name);

    // Statistics are optional.
    float *o2 = test_poisoned(n), *s2 = test_poisoned(n);
    Tensor to2 = cpu_f32_2d(o2, rows, C), ts2 = cpu_f32_2d(s2, rows, C);
    if (rms) CHECK_OK(op_add_rmsnorm(&eng, &ts2, &to2, NULL, &ta, &tb, &tw, eps));
    else CHECK_OK(op_add_layernorm(&eng, &ts2, &to2, NULL, NULL, &ta, &tb, &tw, &tbias, eps));
    CHECK(same_bits(o2, u_out, n) && same_bits(s2, u_sum, n), "%s: without statistics the result changed", name);

    free(a), free(b), free(w), free(bias), free(u_sum), free(u_out), free(u_mean), free(u_rstd), free(fa), free(fb);
    free(own_sum), free(f_out), free(f_mean), free(f_rstd), free(r_out), free(r_mean), free(r_rstd), free(r_sum);
    free(o2), free(s2);
}

// ---- upsample + two-class softmax + accumulate ------------------------------------------------------------

// Double loop: bilinear (align_corners=True) of both planes, the class-1 softmax, out += alpha * p.
static double ref_bilinear(const float *plane, int64_t h, int64_t w, int64_t H, int64_t W, int64_t oy, int64_t ox) {
    double sy = H > 1 ? (double)(h - 1) / (double)(H - 1) : 0, sx = W > 1 ? (double)(w - 1) / (double)(W - 1) : 0;
    double fy = sy * oy, fx = sx * ox;
    int64_t y0 = (int64_t)floor(fy), x0 = (int64_t)floor(fx);
    if (y0 > h - 1) y0 = h - 1;
    if (x0 > w - 1) x0 = w - 1;
    int64_t y1 = y0 < h - 1 ? y0 + 1 : y0, x1 = x0 < w - 1 ? x0 + 1 : x0;
    double ly = fy - y0, lx = fx - x0;
    double t0 = plane[y0 * w + x0] * (1 - lx) + plane[y0 * w + x1] * lx;
    double t1 = plane[y1 * w + x0] * (1 - lx) + plane[y1 * w + x1] * lx;
    return t0 * (1 - ly) + t1 * ly;
}

static void test_upsample_softmax2(int64_t B, int64_t h, int64_t w, int64_t H, int64_t W, float alpha) {
    char name[128];
    snprintf(name, sizeof name, "upsample_softmax2_axpy B%lld %lldx%lld->%lldx%lld a=%g", (long long)B, (long long)h,
             (long long)w, (long long)H, (long long)W, alpha);
    const int64_t nl = B * 2 * h * w, n = B * H * W;
    float *logits = test_randn(&rng, nl, 4.0f), *out0 = test_randn(&rng, n, 0.3f);
    // Unfused: the three ops the anomaly map calls today.
    float *up = test_poisoned(B * 2 * H * W), *prob = test_poisoned(n), *u = malloc((size_t)n * sizeof(float));
    memcpy(u, out0, (size_t)n * sizeof(float));
    Tensor tl = cpu_f32_4d(logits, B, 2, h, w), tup = cpu_f32_4d(up, B, 2, H, W);
    Tensor tup3 = cpu_f32_3d(up, B, 2, H * W), tp = cpu_f32_2d(prob, B, H * W), tu = cpu_f32_2d(u, B, H * W);
    CHECK_OK(op_upsample_bilinear(&eng, &tup, &tl));
    CHECK_OK(op_softmax2_class1(&eng, &tp, &tup3));
    CHECK_OK(op_axpy(&eng, &tu, &tp, alpha));
    // Fused.
    float *f = malloc((size_t)n * sizeof(float));
    memcpy(f, out0, (size_t)n * sizeof(float));
    Tensor tf = cpu_f32_3d(f, B, H, W);
    CHECK_OK(op_upsample_softmax2_axpy(&eng, &tf, &tl, alpha));
    CHECK(same_bits(f, u, n), "%s: differs from op_upsample_bilinear + op_softmax2_class1 + op_axpy", name);
    if (same_bits(f, u, n)) printf("  %-*s bit-identical to the three unfused ops\n", TEST_NAME_WIDTH, name);
    double *ref = malloc((size_t)n * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t y = 0; y < H; y++)
            for (int64_t x = 0; x < W; x++) {
                double l0 = ref_bilinear(logits + (b * 2) * h * w, h, w, H, W, y, x);
                double l1 = ref_bilinear(logits + (b * 2 + 1) * h * w, h, w, H, W, y, x);
                int64_t i = (b * H + y) * W + x;
                ref[i] = out0[i] + alpha / (1 + exp(l0 - l1));
            }
    char nm[160];
    snprintf(nm, sizeof nm, "%s vs double", name);
    CHECK_CLOSE_D(nm, f, ref, n, 1e-5);
    free(logits), free(out0), free(up), free(prob), free(u), free(f), free(ref);
}

static void test_errors(void) {
    const int64_t rows = 3, C = 8;
    float *a = test_randn(&rng, rows * C, 1), *b = test_randn(&rng, rows * C, 1), *s = test_poisoned(rows * C);
    float *o = test_poisoned(rows * C), *w = test_randn(&rng, C, 1), *bias = test_randn(&rng, C, 1);
    float *st = test_poisoned(rows + 1);
    Tensor ta = cpu_f32_2d(a, rows, C), tb = cpu_f32_2d(b, rows, C), ts = cpu_f32_2d(s, rows, C);
    Tensor to = cpu_f32_2d(o, rows, C), tw = cpu_f32_1d(w, C), tbias = cpu_f32_1d(bias, C);
    Tensor tb_short = cpu_f32_2d(b, rows - 1, C), tw_long = cpu_f32_1d(w, C - 1);
    Tensor tstat = cpu_f32_1d(st, rows), tstat_bad = cpu_f32_1d(st, rows + 1);
    CHECK_ERR(op_add_rmsnorm(&eng, &ts, &ta, NULL, &ta, &tb, &tw, 1e-6f));          // out aliases a
    CHECK_ERR(op_add_rmsnorm(&eng, &ts, &ts, NULL, &ta, &tb, &tw, 1e-6f));          // out aliases sum
    CHECK_ERR(op_add_layernorm(&eng, &ts, &tb, NULL, NULL, &ta, &tb, &tw, &tbias, 1e-5f));  // out aliases b
    CHECK_ERR(op_add_rmsnorm(&eng, &ts, &to, NULL, &ta, &tb_short, &tw, 1e-6f));    // shapes differ
    CHECK_ERR(op_add_rmsnorm(&eng, &ts, &to, NULL, &ta, &tb, &tw_long, 1e-6f));     // weight width
    CHECK_ERR(op_add_rmsnorm(&eng, &ts, &to, &tstat_bad, &ta, &tb, &tw, 1e-6f));    // stats length
    CHECK_ERR(op_add_rmsnorm(&eng, &ts, &to, NULL, &ta, &tb, &tw, 0.0f));           // eps
    CHECK_ERR(op_add_layernorm(&eng, &ts, &to, &tstat, &tstat_bad, &ta, &tb, &tw, &tbias, 1e-5f));
    CHECK_ERR(op_add_layernorm(&eng, &ts, &to, NULL, NULL, &ta, &tb, &tw, NULL, 1e-5f));  // no bias
    CHECK_ERR(op_add_layernorm(&eng, &ts, &to, NULL, NULL, &ta, &tb, &tw, &tbias, -1.0f));
    Tensor grid = cpu_f32_4d(a, 1, 2, 3, 4), grid3 = cpu_f32_4d(a, 1, 3, 2, 4), map = cpu_f32_3d(o, 1, 4, 6);
    Tensor map_b2 = cpu_f32_3d(o, 2, 4, 3), map_on_grid = cpu_f32_3d(a, 1, 4, 6);
    CHECK_ERR(op_upsample_softmax2_axpy(&eng, &map, &grid3, 0.25f));       // three classes
    CHECK_ERR(op_upsample_softmax2_axpy(&eng, &map_b2, &grid, 0.25f));     // batch differs
    CHECK_ERR(op_upsample_softmax2_axpy(&eng, &map_on_grid, &grid, 0.25f));  // out aliases logits
    CHECK_ERR(op_upsample_softmax2_axpy(&eng, &ta, &grid, 0.25f));          // out not [B,H,W]
    free(a), free(b), free(s), free(o), free(w), free(bias), free(st);
}

int main(void) {
    rng_seed(&rng, 20261128);
    if (engine_create(&eng, DEV_CPU, 0, 0, 1) != AGPT_OK) {
        printf("FAIL engine_create: %s\n", agpt_last_error());
        return 1;
    }
    static const int64_t shapes[][2] = {{1, 1}, {1, 7}, {3, 37}, {5, 256}, {4, 1280}, {2, 4096}, {9, 333}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int rms = 0; rms < 2; rms++)
            for (int alias = 0; alias < 3; alias++) test_case(rms, shapes[i][0], shapes[i][1], alias);
    test_upsample_softmax2(1, 16, 16, 224, 224, 0.25f);  // ImageBind-H's 16 x 16 grid to the 224 map
    test_upsample_softmax2(2, 3, 5, 7, 4, 1.0f);
    test_upsample_softmax2(1, 4, 4, 4, 4, 0.5f);  // equal sizes: PyTorch's copy path
    test_upsample_softmax2(1, 1, 1, 3, 3, 0.25f);
    test_upsample_softmax2(1, 16, 16, 1, 1, 0.25f);
    test_errors();
    engine_destroy(&eng);
    return test_summary();
}
