// The training backward ops of kernels/ops.h on the CPU backend (the vision path, the prompt learner and the pixel
// losses): each against a naive double-precision loop (poisoned outputs, so an element an op forgets fails; the
// accumulated gradients start from random values), against central finite differences of the forward op at small
// sizes, at odd sizes and the prompt learner's real shapes, the same bits for 1 and 3 threads, NaN propagation,
// argument checks, and against torch autograd (tests/data/train_ops.safetensors, made by
// tests/reference/make_train_op_goldens.py). Prints the CPU time of op_conv2d_backward at the two largest layers.
#include <string.h>

#include "kernels/ops.h"
#include "runtime/rng.h"
#include "runtime/threads.h"
#include "runtime/timer.h"
#include "test.h"
#define TEST_NAME_WIDTH 72
#include "test_util.h"

static Rng rng;
static Engine eng;

// rel L2 of a few analytic gradient entries against their finite differences (both double).
static void check_fd(const char *name, const double *got, const double *fd, int n, double tol) {
    float *g = malloc((size_t)n * sizeof(float));
    for (int i = 0; i < n; i++) g[i] = (float)got[i];
    CHECK_CLOSE_D(name, g, fd, n, tol);
    free(g);
}

static float *copy_of(const float *x, int64_t n) {
    float *y = malloc((size_t)(n ? n : 1) * sizeof(float));
    memcpy(y, x, (size_t)n * sizeof(float));
    return y;
}

static double dot_fd(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

// ---- conv2d ------------------------------------------------------------------------------------------------

static void ref_conv2d_backward(double *dx, double *dw, double *db, const float *dout, const float *x,
                                const float *w, int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k,
                                int64_t p) {
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    memset(dx, 0, (size_t)(B * Cin * H * W) * sizeof(double));
    memset(dw, 0, (size_t)(Cout * Cin * k * k) * sizeof(double));
    memset(db, 0, (size_t)Cout * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t co = 0; co < Cout; co++)
            for (int64_t oy = 0; oy < Ho; oy++)
                for (int64_t ox = 0; ox < Wo; ox++) {
                    const double g = dout[((b * Cout + co) * Ho + oy) * Wo + ox];
                    db[co] += g;
                    for (int64_t ci = 0; ci < Cin; ci++)
                        for (int64_t i = 0; i < k; i++) {
                            const int64_t iy = oy + i - p;
                            if (iy < 0 || iy >= H) continue;
                            for (int64_t j = 0; j < k; j++) {
                                const int64_t ix = ox + j - p;
                                if (ix < 0 || ix >= W) continue;
                                const int64_t xi = ((b * Cin + ci) * H + iy) * W + ix, wi = ((co * Cin + ci) * k + i) * k + j;
                                dx[xi] += g * w[wi];
                                dw[wi] += g * x[xi];
                            }
                        }
                }
}

// L = <dout, conv2d(x, w, b)> in double from the f32 forward op.
static double conv_objective(const float *x, const float *w, const float *b, const float *dout, int64_t B,
                             int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int p) {
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1, no = B * Cout * Ho * Wo;
    float *y = test_poisoned(no);
    Tensor tx = cpu_f32_4d((float *)x, B, Cin, H, W), tw = cpu_f32_4d((float *)w, Cout, Cin, k, k),
           tb = cpu_f32_1d((float *)b, Cout), ty = cpu_f32_4d(y, B, Cout, Ho, Wo);
    CHECK_OK(op_conv2d(&eng, &ty, &tx, &tw, &tb, p));
    double L = dot_fd(y, dout, no);
    free(y);
    return L;
}

static void test_conv2d_backward(int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int p,
                                 bool fd) {
    char name[200], what[240];
    snprintf(name, sizeof name, "conv2d_backward x [%lld,%lld,%lld,%lld] w [%lld,%lld,%lld,%lld] pad %d",
             (long long)B, (long long)Cin, (long long)H, (long long)W, (long long)Cout, (long long)Cin, (long long)k,
             (long long)k, p);
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    const int64_t nx = B * Cin * H * W, nw = Cout * Cin * k * k, no = B * Cout * Ho * Wo;
    float *x = malloc((size_t)nx * sizeof(float));
    rng_fill_uniform(&rng, x, (size_t)nx, 0.0f, 2.0f);  // maps in [0, 2] as the prompt learner sees
    float *w = test_randn(&rng, nw, 1.0f / sqrtf((float)(Cin * k * k))), *b = test_randn(&rng, Cout, 0.5f);
    float *dout = test_randn(&rng, no, 1.0f);
    float *dx = test_poisoned(nx), *dw0 = test_randn(&rng, nw, 0.1f), *db0 = test_randn(&rng, Cout, 0.1f);
    float *dw = copy_of(dw0, nw), *db = copy_of(db0, Cout);
    double *rdx = malloc((size_t)nx * sizeof(double)), *rdw = malloc((size_t)nw * sizeof(double)),
           *rdb = malloc((size_t)Cout * sizeof(double));
    ref_conv2d_backward(rdx, rdw, rdb, dout, x, w, B, Cin, H, W, Cout, k, p);
    Tensor tx = cpu_f32_4d(x, B, Cin, H, W), tw = cpu_f32_4d(w, Cout, Cin, k, k), tdo = cpu_f32_4d(dout, B, Cout, Ho, Wo);
    Tensor tdx = cpu_f32_4d(dx, B, Cin, H, W), tdw = cpu_f32_4d(dw, Cout, Cin, k, k), tdb = cpu_f32_1d(db, Cout);
    CHECK_OK(op_conv2d_backward(&eng, &tdx, &tdw, &tdb, &tdo, &tx, &tw, p));
    double *rdw_acc = malloc((size_t)nw * sizeof(double)), *rdb_acc = malloc((size_t)Cout * sizeof(double));
    for (int64_t i = 0; i < nw; i++) rdw_acc[i] = rdw[i] + dw0[i];
    for (int64_t i = 0; i < Cout; i++) rdb_acc[i] = rdb[i] + db0[i];
    // DESIGN.md's per-op fp32 tolerance (measured <= ~5e-7)
    snprintf(what, sizeof what, "%s dx", name);
    CHECK_CLOSE_D(what, dx, rdx, nx, 1e-5);
    snprintf(what, sizeof what, "%s dw (+= onto random)", name);
    CHECK_CLOSE_D(what, dw, rdw_acc, nw, 1e-5);
    snprintf(what, sizeof what, "%s db (+= onto random)", name);
    CHECK_CLOSE_D(what, db, rdb_acc, Cout, 1e-5);

    // Each gradient alone (NULL for the others) gives the same numbers.
    float *dx2 = test_poisoned(nx), *dw2 = calloc((size_t)nw, sizeof(float)), *db2 = calloc((size_t)Cout, sizeof(float));
    Tensor tdx2 = cpu_f32_4d(dx2, B, Cin, H, W), tdw2 = cpu_f32_4d(dw2, Cout, Cin, k, k), tdb2 = cpu_f32_1d(db2, Cout);
    CHECK_OK(op_conv2d_backward(&eng, &tdx2, NULL, NULL, &tdo, &tx, &tw, p));
    CHECK_OK(op_conv2d_backward(&eng, NULL, &tdw2, NULL, &tdo, &tx, &tw, p));
    CHECK_OK(op_conv2d_backward(&eng, NULL, NULL, &tdb2, &tdo, &tx, &tw, p));
    CHECK(memcmp(dx2, dx, (size_t)nx * sizeof(float)) == 0, "%s: dx alone differs from dx with dw and db", name);
    snprintf(what, sizeof what, "%s dw alone (from 0)", name);
    CHECK_CLOSE_D(what, dw2, rdw, nw, 1e-5);
    snprintf(what, sizeof what, "%s db alone (from 0)", name);
    CHECK_CLOSE_D(what, db2, rdb, Cout, 1e-5);

    if (fd) {  // central differences of <dout, conv2d(x, w, b)>: linear in each operand, so h can be large
        enum { S = 12 };
        double got[3 * S], num[3 * S];
        const float h = 1e-2f;
        for (int s = 0; s < 3 * S; s++) {
            float *arr = s < S ? x : s < 2 * S ? w : b;
            const int64_t n = s < S ? nx : s < 2 * S ? nw : Cout;
            const int64_t i = (int64_t)(rng_u64(&rng) % (uint64_t)n);
            const float keep = arr[i];
            arr[i] = keep + h;
            const double lp = conv_objective(x, w, b, dout, B, Cin, H, W, Cout, k, p);
            arr[i] = keep - h;
            const double lm = conv_objective(x, w, b, dout, B, Cin, H, W, Cout, k, p);
            arr[i] = keep;
            num[s] = (lp - lm) / (2.0 * h);
            got[s] = s < S ? dx[i] : s < 2 * S ? dw2[i] : db2[i];
        }
        snprintf(what, sizeof what, "%s finite differences (dx, dw, db)", name);
        check_fd(what, got, num, 3 * S, 1e-3);
    }
    free(x), free(w), free(b), free(dout), free(dx), free(dw0), free(db0), free(dw), free(db), free(rdx), free(rdw),
        free(rdb), free(rdw_acc), free(rdb_acc), free(dx2), free(dw2), free(db2);
}

// op_conv2d_backward's CPU time (all three gradients) at a prompt learner shape, best of `reps`.
static void time_conv2d_backward(int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int p,
                                 int reps) {
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    const int64_t nx = B * Cin * H * W, nw = Cout * Cin * k * k, no = B * Cout * Ho * Wo;
    float *x = test_randn(&rng, nx, 1.0f), *w = test_randn(&rng, nw, 0.01f), *dout = test_randn(&rng, no, 1.0f);
    float *dx = malloc((size_t)nx * sizeof(float)), *dw = calloc((size_t)nw, sizeof(float)),
          *db = calloc((size_t)Cout, sizeof(float));
    Tensor tx = cpu_f32_4d(x, B, Cin, H, W), tw = cpu_f32_4d(w, Cout, Cin, k, k), tdo = cpu_f32_4d(dout, B, Cout, Ho, Wo);
    Tensor tdx = cpu_f32_4d(dx, B, Cin, H, W), tdw = cpu_f32_4d(dw, Cout, Cin, k, k), tdb = cpu_f32_1d(db, Cout);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = timer_now_s();
        CHECK_OK(op_conv2d_backward(&eng, &tdx, &tdw, &tdb, &tdo, &tx, &tw, p));
        double t = timer_now_s() - t0;
        if (t < best) best = t;
    }
    const double gflop = 2.0 * 2.0 * (double)(B * Ho * Wo) * (double)(Cin * k * k) * (double)Cout * 1e-9;
    printf("  TIME conv2d_backward x [%lld,%lld,%lld,%lld] w [%lld,%lld,%lld,%lld] pad %d: %.3f s (%.1f GFLOP/s, "
           "%d threads)\n", (long long)B, (long long)Cin, (long long)H, (long long)W, (long long)Cout, (long long)Cin,
           (long long)k, (long long)k, p, best, gflop / best, threads_get());
    free(x), free(w), free(dout), free(dx), free(dw), free(db);
}

// ---- relu, maxpool -----------------------------------------------------------------------------------------

static void test_relu_backward(int64_t n, bool alias) {
    char name[96];
    snprintf(name, sizeof name, "relu_backward n=%lld%s", (long long)n, alias ? " (dx = dout)" : "");
    float *y = test_randn(&rng, n, 1.0f), *dout = test_randn(&rng, n, 1.0f);
    for (int64_t i = 0; i < n; i += 7) y[i] = i % 2 ? 0.0f : -0.0f;  // exact zeros get no gradient
    y[n - 1] = NAN;                                                  // PyTorch's threshold_backward passes it
    double *ref = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) ref[i] = (y[i] > 0 || isnan(y[i])) ? dout[i] : 0.0;
    float *dx = alias ? dout : test_poisoned(n);
    Tensor ty = cpu_f32_1d(y, n), tdo = cpu_f32_1d(dout, n), tdx = cpu_f32_1d(dx, n);
    CHECK_OK(op_relu_backward(&eng, &tdx, &tdo, &ty));
    CHECK_CLOSE_D(name, dx, ref, n, 0.0);  // a selection: exact
    if (!alias) free(dx);
    free(y), free(dout), free(ref);
}

static void ref_maxpool_backward(double *dx, const float *dout, const float *x, int64_t BC, int64_t H, int64_t W) {
    const int64_t Ho = H / 2, Wo = W / 2;
    memset(dx, 0, (size_t)(BC * H * W) * sizeof(double));
    for (int64_t c = 0; c < BC; c++)
        for (int64_t oy = 0; oy < Ho; oy++)
            for (int64_t ox = 0; ox < Wo; ox++) {
                // PyTorch's CPU loop: start at -inf with the first index, take a strictly larger value or a NaN
                double m = -INFINITY;
                int64_t arg = (c * H + 2 * oy) * W + 2 * ox;
                for (int i = 0; i < 2; i++)
                    for (int j = 0; j < 2; j++) {
                        const int64_t xi = (c * H + 2 * oy + i) * W + 2 * ox + j;
                        if (x[xi] > m || isnan(x[xi])) m = x[xi], arg = xi;
                    }
                dx[arg] = dout[(c * Ho + oy) * Wo + ox];
            }
}

static void test_maxpool_backward(int64_t B, int64_t C, int64_t H, int64_t W, bool ties, bool fd) {
    char name[120];
    snprintf(name, sizeof name, "maxpool2x2_backward [%lld,%lld,%lld,%lld]%s", (long long)B, (long long)C,
             (long long)H, (long long)W, ties ? " ties" : "");
    const int64_t nx = B * C * H * W, no = B * C * (H / 2) * (W / 2);
    float *x = test_randn(&rng, nx, 1.0f), *dout = test_randn(&rng, no, 1.0f), *dx = test_poisoned(nx);
    if (ties)
        for (int64_t i = 0; i < nx; i++) x[i] = roundf(x[i]);  // integers: most windows hold equal values
    if (fd)
        for (int64_t i = 0; i < nx; i++) x[i] = 0.1f * (float)((i * 7919) % nx);  // distinct, 0.1 apart
    double *ref = malloc((size_t)nx * sizeof(double));
    ref_maxpool_backward(ref, dout, x, B * C, H, W);
    Tensor tx = cpu_f32_4d(x, B, C, H, W), tdo = cpu_f32_4d(dout, B, C, H / 2, W / 2), tdx = cpu_f32_4d(dx, B, C, H, W);
    CHECK_OK(op_maxpool2x2_backward(&eng, &tdx, &tdo, &tx));
    CHECK_CLOSE_D(name, dx, ref, nx, 0.0);  // a selection: exact
    if (fd) {
        enum { S = 16 };
        double got[S], num[S];
        const float h = 1e-2f;
        float *y = malloc((size_t)(no ? no : 1) * sizeof(float));
        Tensor ty = cpu_f32_4d(y, B, C, H / 2, W / 2);
        for (int s = 0; s < S; s++) {
            const int64_t i = (int64_t)(rng_u64(&rng) % (uint64_t)nx);
            const float keep = x[i];
            x[i] = keep + h;
            CHECK_OK(op_maxpool2x2(&eng, &ty, &tx));
            const double lp = dot_fd(y, dout, no);
            x[i] = keep - h;
            CHECK_OK(op_maxpool2x2(&eng, &ty, &tx));
            const double lm = dot_fd(y, dout, no);
            x[i] = keep;
            num[s] = (lp - lm) / ((double)(keep + h) - (double)(keep - h));
            got[s] = dx[i];
        }
        char what[160];
        snprintf(what, sizeof what, "%s finite differences", name);
        check_fd(what, got, num, S, 1e-4);
        free(y);
    }
    // A NaN wins its window (window 0 here) and takes the gradient.
    if (H >= 2 && W >= 2) {
        x[W] = NAN;
        CHECK_OK(op_maxpool2x2_backward(&eng, &tdx, &tdo, &tx));
        CHECK(dx[W] == dout[0] && dx[0] == 0.0f && dx[1] == 0.0f && dx[W + 1] == 0.0f,
              "%s: the NaN of window 0 should take its gradient", name);
    }
    free(x), free(dout), free(dx), free(ref);
}

// ---- upsample ----------------------------------------------------------------------------------------------

// The interpolation weights in double: output pixel y reads source row floor(y (h-1)/(H-1)) and the next one.
static void ref_bilinear_axis(int64_t i, int64_t in, int64_t out, int64_t *i0, int64_t *i1, double *l1) {
    const double src = out > 1 ? (double)i * (double)(in - 1) / (double)(out - 1) : 0.0;
    int64_t idx = (int64_t)floor(src);
    if (idx > in - 1) idx = in - 1;
    *i0 = idx;
    *i1 = idx < in - 1 ? idx + 1 : idx;
    *l1 = src - (double)idx;
}

// dx[p] += the transpose of the resize applied to plane g [H,W] (dx [h,w] in double, zeroed by the caller).
static void ref_upsample_transpose(double *dx, const double *g, int64_t h, int64_t w, int64_t H, int64_t W) {
    for (int64_t oy = 0; oy < H; oy++) {
        int64_t y0, y1;
        double ly;
        ref_bilinear_axis(oy, h, H, &y0, &y1, &ly);
        for (int64_t ox = 0; ox < W; ox++) {
            int64_t x0, x1;
            double lx;
            ref_bilinear_axis(ox, w, W, &x0, &x1, &lx);
            const double v = g[oy * W + ox];
            dx[y0 * w + x0] += v * (1 - ly) * (1 - lx);
            dx[y0 * w + x1] += v * (1 - ly) * lx;
            dx[y1 * w + x0] += v * ly * (1 - lx);
            dx[y1 * w + x1] += v * ly * lx;
        }
    }
}

static void test_upsample_backward(int64_t BC, int64_t h, int64_t w, int64_t H, int64_t W, bool fd) {
    char name[120], what[200];
    snprintf(name, sizeof name, "upsample_bilinear_backward [%lld,%lld,%lld] -> [%lld,%lld]", (long long)BC,
             (long long)H, (long long)W, (long long)h, (long long)w);
    const int64_t nx = BC * h * w, no = BC * H * W;
    float *dout = test_randn(&rng, no, 1.0f), *dx = test_poisoned(nx), *x = test_randn(&rng, nx, 1.0f);
    double *ref = calloc((size_t)nx, sizeof(double)), *g = test_to_double(dout, no);
    for (int64_t p = 0; p < BC; p++) ref_upsample_transpose(ref + p * h * w, g + p * H * W, h, w, H, W);
    Tensor tdo = cpu_f32_4d(dout, 1, BC, H, W), tdx = cpu_f32_4d(dx, 1, BC, h, w), tx = cpu_f32_4d(x, 1, BC, h, w);
    CHECK_OK(op_upsample_bilinear_backward(&eng, &tdx, &tdo));
    CHECK_CLOSE_D(name, dx, ref, nx, 1e-5);  // float lambdas vs double ones: ~1e-7
    // The adjoint identity <upsample(x), dout> = <x, upsample_backward(dout)> with the f32 forward op.
    float *y = test_poisoned(no);
    Tensor ty = cpu_f32_4d(y, 1, BC, H, W);
    CHECK_OK(op_upsample_bilinear(&eng, &ty, &tx));
    const double lhs = dot_fd(y, dout, no), rhs = dot_fd(x, dx, nx);
    snprintf(what, sizeof what, "%s adjoint <Ax,g> = <x,A'g>", name);
    CHECK(fabs(lhs - rhs) <= 1e-5 * (fabs(lhs) + sqrt((double)no)), "%s: %.9g vs %.9g", what, lhs, rhs);
    printf("  %-72s |diff| %.3g (of %.3g)\n", what, fabs(lhs - rhs), fabs(lhs));
    if (fd) {
        enum { S = 12 };
        double got[S], num[S];
        const float hh = 1e-2f;
        for (int s = 0; s < S; s++) {
            const int64_t i = (int64_t)(rng_u64(&rng) % (uint64_t)nx);
            const float keep = x[i];
            x[i] = keep + hh;
            CHECK_OK(op_upsample_bilinear(&eng, &ty, &tx));
            const double lp = dot_fd(y, dout, no);
            x[i] = keep - hh;
            CHECK_OK(op_upsample_bilinear(&eng, &ty, &tx));
            const double lm = dot_fd(y, dout, no);
            x[i] = keep;
            num[s] = (lp - lm) / (2.0 * hh);
            got[s] = dx[i];
        }
        snprintf(what, sizeof what, "%s finite differences", name);
        check_fd(what, got, num, S, 1e-3);
    }
    free(dout), free(dx), free(x), free(ref), free(g), free(y);
}

// ---- l2 normalize ------------------------------------------------------------------------------------------

static void test_l2_backward(int64_t rows, int64_t C, float eps, bool alias, bool fd) {
    char name[120], what[200];
    snprintf(name, sizeof name, "l2_normalize_backward [%lld,%lld] eps %g%s", (long long)rows, (long long)C,
             (double)eps, alias ? " (dx = dout)" : "");
    const int64_t n = rows * C;
    float *x = test_randn(&rng, n, 1.0f), *dout = test_randn(&rng, n, 1.0f);
    if (rows > 1)
        for (int64_t i = 0; i < C; i++) x[C + i] *= 1e-4f;  // row 1: a norm below eps = 1e-2 (clamped)
    double *ref = malloc((size_t)n * sizeof(double));
    for (int64_t r = 0; r < rows; r++) {  // the Jacobian of x / max(||x||, eps), entry by entry
        const float *xr = x + r * C, *gr = dout + r * C;
        double ss = 0;
        for (int64_t i = 0; i < C; i++) ss += (double)xr[i] * xr[i];
        const double nn = sqrt(ss);
        const bool clamped = nn < eps;
        for (int64_t i = 0; i < C; i++) {
            double s = 0;
            for (int64_t j = 0; j < C; j++) {
                const double J = clamped ? (i == j ? 1.0 / eps : 0.0)
                                         : (i == j ? 1.0 / nn : 0.0) - (double)xr[i] * xr[j] / (nn * nn * nn);
                s += gr[j] * J;
            }
            ref[r * C + i] = s;
        }
    }
    float *keep_dout = copy_of(dout, n);
    float *dx = alias ? dout : test_poisoned(n);
    Tensor tx = cpu_f32_2d(x, rows, C), tdo = cpu_f32_2d(dout, rows, C), tdx = cpu_f32_2d(dx, rows, C);
    CHECK_OK(op_l2_normalize_backward(&eng, &tdx, &tdo, &tx, eps));
    CHECK_CLOSE_D(name, dx, ref, n, 1e-5);
    if (fd) {
        enum { S = 16 };
        double got[S] = {0}, num[S] = {0};  // samples in the clamped row stay 0 on both sides
        const float h = 3e-3f;
        float *y = test_poisoned(n);
        Tensor ty = cpu_f32_2d(y, rows, C);
        for (int s = 0; s < S; s++) {
            const int64_t i = (int64_t)(rng_u64(&rng) % (uint64_t)n);
            if (rows > 1 && i / C == 1) continue;  // the clamped row: its derivative is plain, skip the tiny steps
            const float keep = x[i];
            x[i] = keep + h;
            CHECK_OK(op_l2_normalize(&eng, &ty, &tx, eps));
            const double lp = dot_fd(y, keep_dout, n);
            x[i] = keep - h;
            CHECK_OK(op_l2_normalize(&eng, &ty, &tx, eps));
            const double lm = dot_fd(y, keep_dout, n);
            x[i] = keep;
            num[s] = (lp - lm) / ((double)(keep + h) - (double)(keep - h));
            got[s] = dx[i];
        }
        snprintf(what, sizeof what, "%s finite differences", name);
        check_fd(what, got, num, S, 2e-3);
        free(y);
    }
    if (!alias) free(dx);
    free(x), free(dout), free(keep_dout), free(ref);
}

// ---- pixel losses ------------------------------------------------------------------------------------------

// The reference's two-channel form, directly: one-hot clamped to [1e-5, 1 - 1e-5], pt = sum + 1e-5.
static void ref_pixel_loss(double *focal, double *dice, double *grad, const float *p1, const float *gt, int64_t B,
                           int64_t H, int64_t W) {
    const int64_t M = B * H * W, N = H * W;
    const double s = 1e-5;
    double f = 0, dsum = 0;
    for (int64_t i = 0; i < M; i++) {
        const double q = p1[i], p[2] = {1.0 - q, q};
        const int g = gt[i] > 0.5;
        const double oh[2] = {g == 0 ? 1 - s : s, g == 1 ? 1 - s : s};
        const double pt = oh[0] * p[0] + oh[1] * p[1] + s;
        f += -(1 - pt) * (1 - pt) * log(pt);
        // d/dq through both channels: dpt/dq = oh[1] - oh[0]
        const double dfdpt = 2 * (1 - pt) * log(pt) - (1 - pt) * (1 - pt) / pt;
        grad[i] = dfdpt * (oh[1] - oh[0]) / (double)M;
    }
    for (int64_t b = 0; b < B; b++) {
        double I = 0, S = 0;
        for (int64_t i = b * N; i < (b + 1) * N; i++) I += (double)p1[i] * gt[i], S += (double)p1[i] + gt[i];
        dsum += (2 * I + 1) / (S + 1);
        for (int64_t i = b * N; i < (b + 1) * N; i++)
            grad[i] += -(2.0 * gt[i] * (S + 1) - (2 * I + 1)) / ((S + 1) * (S + 1)) / (double)B;
    }
    *focal = f / (double)M;
    *dice = 1 - dsum / (double)B;
}

static float *make_gt(int64_t B, int64_t H, int64_t W) {
    float *gt = calloc((size_t)(B * H * W), sizeof(float));
    for (int64_t b = 0; b + 1 < B || (B == 1 && b == 0); b++)  // the last sample stays normal (B > 1)
        for (int64_t y = H / 4; y < H / 2 + 1; y++)
            for (int64_t x = W / 3; x < W - 1; x++) gt[(b * H + y) * W + x] = 1.0f;
    return gt;
}

static void test_pixel_loss(int64_t B, int64_t H, int64_t W, float scale, bool fd) {
    char name[120], what[200];
    snprintf(name, sizeof name, "pixel_loss [%lld,%lld,%lld] scale %g", (long long)B, (long long)H, (long long)W,
             (double)scale);
    const int64_t M = B * H * W;
    float *p1 = malloc((size_t)M * sizeof(float));
    rng_fill_uniform(&rng, p1, (size_t)M, 0.02f, 0.98f);
    p1[0] = 1e-7f, p1[M - 1] = 1.0f - 1e-7f;  // near the ends: pt near 1e-5 for one class
    float *gt = make_gt(B, H, W);
    double rf, rd, *rg = malloc((size_t)M * sizeof(double));
    ref_pixel_loss(&rf, &rd, rg, p1, gt, B, H, W);
    float *d0 = test_randn(&rng, M, 1e-3f), *dp1 = copy_of(d0, M);
    for (int64_t i = 0; i < M; i++) rg[i] = d0[i] + (double)scale * rg[i];
    double focal = NAN, dice = NAN;
    Tensor tp = cpu_f32_3d(p1, B, H, W), tg = cpu_f32_3d(gt, B, H, W), td = cpu_f32_3d(dp1, B, H, W);
    CHECK_OK(op_pixel_loss(&eng, &focal, &dice, &td, &tp, &tg, scale));
    const double ef = fabs(focal - rf) / fabs(rf), ed = fabs(dice - rd) / fabs(rd);
    printf("  %-72s focal %.6f rel %.3g, dice %.6f rel %.3g (tol 1e-12)\n", name, focal, ef, dice, ed);
    CHECK(ef <= 1e-12 && ed <= 1e-12, "%s: focal %.17g vs %.17g, dice %.17g vs %.17g", name, focal, rf, dice, rd);
    snprintf(what, sizeof what, "%s dp1 (+= onto random)", name);
    CHECK_CLOSE_D(what, dp1, rg, M, 1e-5);
    // Losses alone, no gradient.
    double f2 = NAN;
    CHECK_OK(op_pixel_loss(&eng, &f2, NULL, NULL, &tp, &tg, scale));
    CHECK(f2 == focal, "%s: focal without the gradient differs", name);
    if (fd) {  // d(focal + dice)/dp1 by central differences of the op's own double losses
        enum { S = 16 };
        double got[S], num[S];
        float *g1 = calloc((size_t)M, sizeof(float));
        Tensor tg1 = cpu_f32_3d(g1, B, H, W);
        CHECK_OK(op_pixel_loss(&eng, NULL, NULL, &tg1, &tp, &tg, 1.0f));
        const float h = 1e-4f;  // the focal term curves sharply at small p: keep the O(h^2) error well below 1e-4
        for (int s = 0; s < S; s++) {
            const int64_t i = 1 + (int64_t)(rng_u64(&rng) % (uint64_t)(M - 2));
            const float keep = p1[i];
            double fp, dp, fm, dm;
            p1[i] = keep + h;
            CHECK_OK(op_pixel_loss(&eng, &fp, &dp, NULL, &tp, &tg, 1.0f));
            p1[i] = keep - h;
            CHECK_OK(op_pixel_loss(&eng, &fm, &dm, NULL, &tp, &tg, 1.0f));
            p1[i] = keep;
            num[s] = ((fp + dp) - (fm + dm)) / ((double)(keep + h) - (double)(keep - h));
            got[s] = g1[i];
        }
        snprintf(what, sizeof what, "%s finite differences", name);
        check_fd(what, got, num, S, 1e-4);
        free(g1);
    }
    // NaN never passes: a NaN probability makes both losses NaN.
    p1[1] = NAN;
    CHECK_OK(op_pixel_loss(&eng, &focal, &dice, NULL, &tp, &tg, scale));
    CHECK(isnan(focal) && isnan(dice), "%s: a NaN probability should make the losses NaN", name);
    free(p1), free(gt), free(rg), free(d0), free(dp1);
}

// ---- upsample + two-class softmax backward -----------------------------------------------------------------

// tol: 1e-5 (DESIGN.md's per-op tolerance) for moderate logits. Saturated ones (|u1 - u0| up to ~100, as the map's
// 100 * cos scores give) lose |u1 - u0| * 2^-24 relative in p (1 - p) = exp(-|u1 - u0|) (approximately) because the
// upsampled logits are rounded to f32, as in PyTorch's forward, while the reference here is all double.
static void test_upsample_softmax2_backward(int64_t B, int64_t h, int64_t w, int64_t H, int64_t W, float lscale,
                                            bool fd, double tol) {
    char name[140], what[220];
    snprintf(name, sizeof name, "upsample_softmax2_backward [%lld,2,%lld,%lld] <- [%lld,%lld,%lld] logits *%g",
             (long long)B, (long long)h, (long long)w, (long long)B, (long long)H, (long long)W, (double)lscale);
    const int64_t nl = B * 2 * h * w, no = B * H * W;
    float *logits = test_randn(&rng, nl, lscale), *dp1 = test_randn(&rng, no, 1.0f), *dl = test_poisoned(nl);
    double *ref = calloc((size_t)nl, sizeof(double)), *du = malloc((size_t)(H * W) * sizeof(double));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t oy = 0; oy < H; oy++) {  // the forward in double, then dp1 p (1 - p)
            int64_t y0, y1;
            double ly;
            ref_bilinear_axis(oy, h, H, &y0, &y1, &ly);
            for (int64_t ox = 0; ox < W; ox++) {
                int64_t x0, x1;
                double lx;
                ref_bilinear_axis(ox, w, W, &x0, &x1, &lx);
                double u[2];
                for (int c = 0; c < 2; c++) {
                    const float *l = logits + (b * 2 + c) * h * w;
                    u[c] = (1 - ly) * ((1 - lx) * l[y0 * w + x0] + lx * l[y0 * w + x1]) +
                           ly * ((1 - lx) * l[y1 * w + x0] + lx * l[y1 * w + x1]);
                }
                const double p = 1.0 / (1.0 + exp(u[0] - u[1]));
                du[oy * W + ox] = dp1[(b * H + oy) * W + ox] * p * (1 - p);
            }
        }
        ref_upsample_transpose(ref + (b * 2 + 1) * h * w, du, h, w, H, W);
        for (int64_t i = 0; i < h * w; i++) ref[(b * 2) * h * w + i] = -ref[(b * 2 + 1) * h * w + i];
    }
    Tensor tl = cpu_f32_4d(logits, B, 2, h, w), tdp = cpu_f32_3d(dp1, B, H, W), tdl = cpu_f32_4d(dl, B, 2, h, w);
    CHECK_OK(op_upsample_softmax2_backward(&eng, &tdl, &tdp, &tl));
    CHECK_CLOSE_D(name, dl, ref, nl, tol);
    if (fd) {  // L = <dp1, softmax2_class1(upsample(logits))> with the fused forward op
        enum { S = 16 };
        double got[S], num[S];
        float *p = malloc((size_t)no * sizeof(float));
        Tensor tp = cpu_f32_3d(p, B, H, W);
        const float hh = 1e-2f;
        for (int s = 0; s < S; s++) {
            const int64_t i = (int64_t)(rng_u64(&rng) % (uint64_t)nl);
            const float keep = logits[i];
            double L[2];
            for (int side = 0; side < 2; side++) {
                logits[i] = side ? keep - hh : keep + hh;
                memset(p, 0, (size_t)no * sizeof(float));
                CHECK_OK(op_upsample_softmax2_axpy(&eng, &tp, &tl, 1.0f));
                L[side] = dot_fd(p, dp1, no);
            }
            logits[i] = keep;
            num[s] = (L[0] - L[1]) / ((double)(keep + hh) - (double)(keep - hh));
            got[s] = dl[i];
        }
        snprintf(what, sizeof what, "%s finite differences", name);
        check_fd(what, got, num, S, 2e-3);
        free(p);
    }
    free(logits), free(dp1), free(dl), free(ref), free(du);
}

// ---- the same bits whatever the thread count ---------------------------------------------------------------

static void test_thread_determinism(void) {
    const int64_t B = 2, Cin = 4, H = 112, W = 112, Cout = 16, k = 3, M = 2 * 224 * 224;
    const int64_t nx = B * Cin * H * W, nw = Cout * Cin * k * k, no = B * Cout * H * W;
    float *x = test_randn(&rng, nx, 1.0f), *w = test_randn(&rng, nw, 0.2f), *dout = test_randn(&rng, no, 1.0f);
    float *p1 = malloc((size_t)M * sizeof(float)), *gt = make_gt(2, 224, 224);
    rng_fill_uniform(&rng, p1, (size_t)M, 0.0f, 1.0f);
    float *dx[2], *dw[2], *db[2], *dp[2], *up[2];
    double f[2], d[2];
    float *g = test_randn(&rng, 2 * 2 * 224 * 224, 1.0f);
    for (int t = 0; t < 2; t++) {
        threads_set(t ? 3 : 1);
        dx[t] = test_poisoned(nx), dw[t] = calloc((size_t)nw, 4), db[t] = calloc((size_t)Cout, 4);
        dp[t] = calloc((size_t)M, 4), up[t] = test_poisoned(2 * 2 * 16 * 16);
        Tensor tx = cpu_f32_4d(x, B, Cin, H, W), tw = cpu_f32_4d(w, Cout, Cin, k, k),
               tdo = cpu_f32_4d(dout, B, Cout, H, W), tdx = cpu_f32_4d(dx[t], B, Cin, H, W),
               tdw = cpu_f32_4d(dw[t], Cout, Cin, k, k), tdb = cpu_f32_1d(db[t], Cout);
        CHECK_OK(op_conv2d_backward(&eng, &tdx, &tdw, &tdb, &tdo, &tx, &tw, 1));
        Tensor tp = cpu_f32_3d(p1, 2, 224, 224), tg = cpu_f32_3d(gt, 2, 224, 224), tdp = cpu_f32_3d(dp[t], 2, 224, 224);
        CHECK_OK(op_pixel_loss(&eng, &f[t], &d[t], &tdp, &tp, &tg, 1.0f));
        Tensor tgo = cpu_f32_4d(g, 2, 2, 224, 224), tup = cpu_f32_4d(up[t], 2, 2, 16, 16);
        CHECK_OK(op_upsample_bilinear_backward(&eng, &tup, &tgo));
    }
    threads_set(0);
    // conv2d_backward's own chunks do not depend on the thread count, but its GEMMs are OpenBLAS's, which split
    // the work by thread count and round differently on some kernels (OPENBLAS_CORETYPE=Haswell does; SkylakeX
    // gives the same bits): the same values to 1e-6 then, and db (summed here in double) bit for bit.
    CHECK(rel_l2_floor(dx[1], dx[0], nx, 0) <= 1e-6 && rel_l2_floor(dw[1], dw[0], nw, 0) <= 1e-6 &&
              memcmp(db[0], db[1], (size_t)Cout * 4) == 0,
          "conv2d_backward differs between 1 and 3 threads (dx %.2e, dw %.2e rel L2)", rel_l2_floor(dx[1], dx[0], nx, 0),
          rel_l2_floor(dw[1], dw[0], nw, 0));
    CHECK(f[0] == f[1] && d[0] == d[1] && memcmp(dp[0], dp[1], (size_t)M * 4) == 0,
          "pixel_loss differs between 1 and 3 threads");
    CHECK(memcmp(up[0], up[1], 2 * 2 * 16 * 16 * 4) == 0, "upsample_bilinear_backward differs between 1 and 3 threads");
    printf("  pixel_loss, upsample_bilinear_backward: the same bits with 1 and 3 threads; conv2d_backward within %.1e\n",
           fmax(rel_l2_floor(dx[1], dx[0], nx, 0), rel_l2_floor(dw[1], dw[0], nw, 0)));
    for (int t = 0; t < 2; t++) free(dx[t]), free(dw[t]), free(db[t]), free(dp[t]), free(up[t]);
    free(x), free(w), free(dout), free(p1), free(gt), free(g);
}

// ---- NaN propagation and argument checks --------------------------------------------------------------------

static void test_nan_and_errors(void) {
    float *a = test_randn(&rng, 1 << 16, 1.0f), *b = test_poisoned(1 << 16), *c = test_randn(&rng, 1 << 16, 1.0f);
    // A NaN in dout reaches dx, dw and db of the convolution.
    Tensor x = cpu_f32_4d(a, 2, 3, 8, 8), w = cpu_f32_4d(a + 2000, 4, 3, 3, 3), dout = cpu_f32_4d(c, 2, 4, 8, 8);
    float *dwb = calloc(4 * 3 * 9 + 4, 4);
    Tensor dx = cpu_f32_4d(b, 2, 3, 8, 8), dw = cpu_f32_4d(dwb, 4, 3, 3, 3), db = cpu_f32_1d(dwb + 108, 4);
    c[5] = NAN;
    CHECK_OK(op_conv2d_backward(&eng, &dx, &dw, &db, &dout, &x, &w, 1));
    int nan_dx = 0, nan_dw = 0;
    for (int i = 0; i < 2 * 3 * 64; i++) nan_dx += isnan(b[i]);
    for (int i = 0; i < 108; i++) nan_dw += isnan(dwb[i]);
    CHECK(nan_dx > 0 && nan_dw > 0 && isnan(dwb[108]), "a NaN in dout should reach dx (%d), dw (%d) and db", nan_dx,
          nan_dw);
    c[5] = 0.5f;
    // conv2d_backward: shapes, aliasing, dtype, device
    Tensor dout_bad = cpu_f32_4d(c, 2, 4, 6, 6), dx_bad = cpu_f32_4d(b, 2, 3, 8, 7), dw_bad = cpu_f32_4d(dwb, 4, 3, 5, 5),
           db_bad = cpu_f32_1d(dwb, 5), dx_alias = cpu_f32_4d(c, 2, 3, 8, 8);
    CHECK_ERR(op_conv2d_backward(&eng, &dx, &dw, &db, &dout_bad, &x, &w, 1));  // dout of the wrong size
    CHECK_ERR(op_conv2d_backward(&eng, &dx_bad, &dw, &db, &dout, &x, &w, 1));
    CHECK_ERR(op_conv2d_backward(&eng, &dx, &dw_bad, &db, &dout, &x, &w, 1));
    CHECK_ERR(op_conv2d_backward(&eng, &dx, &dw, &db_bad, &dout, &x, &w, 1));
    CHECK_ERR(op_conv2d_backward(&eng, &dx_alias, &dw, &db, &dout, &x, &w, 1));  // dx aliasing dout
    CHECK_ERR(op_conv2d_backward(&eng, &dx, &dw, &db, &dout, &x, &w, -1));
    Tensor w_bf16 = tensor_4d(a, DT_BF16, DEV_CPU, 4, 3, 3, 3), x_gpu = x;
    x_gpu.device = DEV_CUDA;
    CHECK_ERR(op_conv2d_backward(&eng, &dx, &dw, &db, &dout, &x, &w_bf16, 1));
    CHECK_ERR(op_conv2d_backward(&eng, &dx, &dw, &db, &dout, &x_gpu, &w, 1));
    // relu_backward: shapes
    Tensor r16 = cpu_f32_1d(a, 16), r17 = cpu_f32_1d(b, 17), r16b = cpu_f32_1d(b, 16);
    CHECK_ERR(op_relu_backward(&eng, &r17, &r16, &r16));
    CHECK_ERR(op_relu_backward(&eng, &r16b, &r17, &r16));
    // maxpool2x2_backward: dout not half (floor), dx not x's shape, aliasing
    Tensor px = cpu_f32_4d(a, 1, 2, 7, 9), pdo = cpu_f32_4d(c, 1, 2, 3, 4), pdo_ceil = cpu_f32_4d(c, 1, 2, 4, 5),
           pdx = cpu_f32_4d(b, 1, 2, 7, 9), pdx_bad = cpu_f32_4d(b, 1, 2, 6, 9), pdx_alias = cpu_f32_4d(a, 1, 2, 7, 9);
    CHECK_OK(op_maxpool2x2_backward(&eng, &pdx, &pdo, &px));
    CHECK_ERR(op_maxpool2x2_backward(&eng, &pdx, &pdo_ceil, &px));
    CHECK_ERR(op_maxpool2x2_backward(&eng, &pdx_bad, &pdo, &px));
    CHECK_ERR(op_maxpool2x2_backward(&eng, &pdx_alias, &pdo, &px));
    // upsample_bilinear_backward: batch/channels differ, 3-D, aliasing
    Tensor ug = cpu_f32_4d(c, 1, 2, 32, 32), udx = cpu_f32_4d(b, 1, 2, 4, 4), udx_c = cpu_f32_4d(b, 1, 3, 4, 4),
           udx3 = cpu_f32_3d(b, 2, 4, 4), udx_alias = cpu_f32_4d(c, 1, 2, 4, 4);
    CHECK_OK(op_upsample_bilinear_backward(&eng, &udx, &ug));
    CHECK_ERR(op_upsample_bilinear_backward(&eng, &udx_c, &ug));
    CHECK_ERR(op_upsample_bilinear_backward(&eng, &udx3, &ug));
    CHECK_ERR(op_upsample_bilinear_backward(&eng, &udx_alias, &ug));
    // l2_normalize_backward: shapes, negative eps, dx aliasing x
    Tensor lx = cpu_f32_2d(a, 4, 8), lg = cpu_f32_2d(c, 4, 8), ldx = cpu_f32_2d(b, 4, 8), ldx_bad = cpu_f32_2d(b, 4, 9);
    CHECK_OK(op_l2_normalize_backward(&eng, &ldx, &lg, &lx, 0.0f));
    CHECK_ERR(op_l2_normalize_backward(&eng, &ldx_bad, &lg, &lx, 0.0f));
    CHECK_ERR(op_l2_normalize_backward(&eng, &ldx, &lg, &lx, -1.0f));
    CHECK_ERR(op_l2_normalize_backward(&eng, &lx, &lg, &lx, 0.0f));
    // pixel_loss: gt shape, dp1 shape, empty, 2-D
    Tensor pp = cpu_f32_3d(a, 2, 8, 8), pg = cpu_f32_3d(c, 2, 8, 8), pd = cpu_f32_3d(b, 2, 8, 8),
           pg_bad = cpu_f32_3d(c, 2, 8, 7), pd_bad = cpu_f32_3d(b, 1, 8, 8), p_empty = cpu_f32_3d(a, 2, 0, 8),
           p2 = cpu_f32_2d(a, 2, 64);
    double f;
    CHECK_OK(op_pixel_loss(&eng, &f, NULL, &pd, &pp, &pg, 1.0f));
    CHECK_ERR(op_pixel_loss(&eng, &f, NULL, &pd, &pp, &pg_bad, 1.0f));
    CHECK_ERR(op_pixel_loss(&eng, &f, NULL, &pd_bad, &pp, &pg, 1.0f));
    CHECK_ERR(op_pixel_loss(&eng, &f, NULL, NULL, &p_empty, &p_empty, 1.0f));
    CHECK_ERR(op_pixel_loss(&eng, &f, NULL, NULL, &p2, &p2, 1.0f));
    // upsample_softmax2_backward: 3 classes, dp1 batch, dlogits shape
    Tensor sl = cpu_f32_4d(a, 2, 2, 4, 4), sdp = cpu_f32_3d(c, 2, 16, 16), sdl = cpu_f32_4d(b, 2, 2, 4, 4),
           sl3 = cpu_f32_4d(a, 2, 3, 4, 4), sdp_b = cpu_f32_3d(c, 1, 16, 16), sdl_bad = cpu_f32_4d(b, 2, 2, 4, 5);
    CHECK_OK(op_upsample_softmax2_backward(&eng, &sdl, &sdp, &sl));
    CHECK_ERR(op_upsample_softmax2_backward(&eng, &sdl, &sdp, &sl3));
    CHECK_ERR(op_upsample_softmax2_backward(&eng, &sdl, &sdp_b, &sl));
    CHECK_ERR(op_upsample_softmax2_backward(&eng, &sdl_bad, &sdp, &sl));
    free(a), free(b), free(c), free(dwb);
}

// ---- against torch autograd ---------------------------------------------------------------------------------

static const float *gold(const SafeTensors *st, const char *name, int64_t want) {
    Tensor t;
    if (st_get(st, name, &t) != AGPT_OK || t.dtype != DT_F32 || tensor_numel(&t) != want) {
        printf("FAIL golden %s missing or not f32[%lld]\n", name, (long long)want);
        test_failed++;
        return NULL;
    }
    return (const float *)t.data;
}

static void golden_conv(const SafeTensors *st, const char *case_name, int64_t B, int64_t Cin, int64_t H, int64_t W,
                        int64_t Cout, int64_t k, int p) {
    char n[64];
    const int64_t Ho = H + 2 * p - k + 1, Wo = W + 2 * p - k + 1;
    const int64_t nx = B * Cin * H * W, nw = Cout * Cin * k * k, no = B * Cout * Ho * Wo;
#define G(field, count) (snprintf(n, sizeof n, "%s.%s", case_name, field), gold(st, n, count))
    const float *x = G("x", nx), *w = G("w", nw), *dout = G("dout", no), *gdx = G("dx", nx), *gdw = G("dw", nw),
                *gdb = G("db", Cout);
#undef G
    if (!x || !w || !dout || !gdx || !gdw || !gdb) return;
    float *dx = test_poisoned(nx), *dw = calloc((size_t)nw, 4), *db = calloc((size_t)Cout, 4);
    Tensor tx = cpu_f32_4d((float *)x, B, Cin, H, W), tw = cpu_f32_4d((float *)w, Cout, Cin, k, k),
           tdo = cpu_f32_4d((float *)dout, B, Cout, Ho, Wo), tdx = cpu_f32_4d(dx, B, Cin, H, W),
           tdw = cpu_f32_4d(dw, Cout, Cin, k, k), tdb = cpu_f32_1d(db, Cout);
    CHECK_OK(op_conv2d_backward(&eng, &tdx, &tdw, &tdb, &tdo, &tx, &tw, p));
    char what[96];
    snprintf(what, sizeof what, "torch Conv2d backward %s dx", case_name);
    CHECK_CLOSE(dx, gdx, nx, 1e-5, what);
    snprintf(what, sizeof what, "torch Conv2d backward %s dw", case_name);
    CHECK_CLOSE(dw, gdw, nw, 1e-5, what);
    snprintf(what, sizeof what, "torch Conv2d backward %s db", case_name);
    CHECK_CLOSE(db, gdb, Cout, 1e-5, what);
    free(dx), free(dw), free(db);
}

static void test_golden(const char *dir) {
    char path[1024];
    snprintf(path, sizeof path, "%s/train_ops.safetensors", dir);
    SafeTensors *st = NULL;
    if (st_open(path, &st) != AGPT_OK) {
        printf("FAIL golden missing (%s); make it with tests/reference/make_train_op_goldens.py\n", agpt_last_error());
        test_failed++;
        return;
    }
    golden_conv(st, "conva", 2, 3, 7, 6, 4, 3, 1);
    golden_conv(st, "convb", 1, 5, 9, 9, 6, 5, 0);

    const float *px = gold(st, "pool.x", 2 * 3 * 7 * 9), *pdo = gold(st, "pool.dout", 2 * 3 * 3 * 4),
                *pdx = gold(st, "pool.dx", 2 * 3 * 7 * 9);
    if (px && pdo && pdx) {
        float *dx = test_poisoned(2 * 3 * 7 * 9);
        Tensor tx = cpu_f32_4d((float *)px, 2, 3, 7, 9), tdo = cpu_f32_4d((float *)pdo, 2, 3, 3, 4),
               tdx = cpu_f32_4d(dx, 2, 3, 7, 9);
        CHECK_OK(op_maxpool2x2_backward(&eng, &tdx, &tdo, &tx));
        CHECK_CLOSE(dx, pdx, 2 * 3 * 7 * 9, 0.0, "torch MaxPool2d(2) backward with ties (exact)");
        free(dx);
    }

    const float *udx = gold(st, "up.dx", 2 * 16 * 16);
    if (udx) {
        float *g = malloc(2 * 224 * 224 * sizeof(float)), *dx = test_poisoned(2 * 16 * 16);
        for (int c = 0; c < 2; c++)
            for (int i = 0; i < 224; i++)
                for (int j = 0; j < 224; j++)
                    g[(c * 224 + i) * 224 + j] = (float)(cos(0.05 * i + 0.3 * c) * sin(0.031 * j + 0.2));
        Tensor tg = cpu_f32_4d(g, 1, 2, 224, 224), tdx = cpu_f32_4d(dx, 1, 2, 16, 16);
        CHECK_OK(op_upsample_bilinear_backward(&eng, &tdx, &tg));
        CHECK_CLOSE(dx, udx, 2 * 16 * 16, 1e-5, "torch interpolate bilinear 16->224 backward");
        free(g), free(dx);
    }

    const float *lx = gold(st, "l2.x", 5 * 33), *ldo = gold(st, "l2.dout", 5 * 33), *ldx = gold(st, "l2.dx", 5 * 33);
    if (lx && ldo && ldx) {
        float *dx = test_poisoned(5 * 33);
        Tensor tx = cpu_f32_2d((float *)lx, 5, 33), tdo = cpu_f32_2d((float *)ldo, 5, 33), tdx = cpu_f32_2d(dx, 5, 33);
        CHECK_OK(op_l2_normalize_backward(&eng, &tdx, &tdo, &tx, 0.0f));
        CHECK_CLOSE(dx, ldx, 5 * 33, 1e-5, "torch x / x.norm() backward");
        free(dx);
    }

    const float *lg = gold(st, "loss.logits", 2 * 2 * 16 * 16), *gf = gold(st, "loss.focal", 1),
                *gd = gold(st, "loss.dice", 1), *gdl = gold(st, "loss.dlogits", 2 * 2 * 16 * 16);
    if (lg && gf && gd && gdl) {
        const int64_t M = 2 * 224 * 224;
        float *p1 = calloc((size_t)M, 4), *gt = calloc((size_t)M, 4), *dp1 = calloc((size_t)M, 4),
              *dl = test_poisoned(2 * 2 * 16 * 16);
        for (int y = 40; y < 100; y++)
            for (int x = 120; x < 200; x++) gt[y * 224 + x] = 1.0f;
        Tensor tl = cpu_f32_4d((float *)lg, 2, 2, 16, 16), tp = cpu_f32_3d(p1, 2, 224, 224),
               tg = cpu_f32_3d(gt, 2, 224, 224), tdp = cpu_f32_3d(dp1, 2, 224, 224), tdl = cpu_f32_4d(dl, 2, 2, 16, 16);
        CHECK_OK(op_upsample_softmax2_axpy(&eng, &tp, &tl, 1.0f));
        double focal = NAN, dice = NAN;
        CHECK_OK(op_pixel_loss(&eng, &focal, &dice, &tdp, &tp, &tg, 1.0f));
        CHECK_OK(op_upsample_softmax2_backward(&eng, &tdl, &tdp, &tl));
        const float ff = (float)focal, fd = (float)dice;
        CHECK_CLOSE(&ff, gf, 1, 1e-5, "torch FocalLoss on softmax(upsample(logits))");
        CHECK_CLOSE(&fd, gd, 1, 1e-5, "torch BinaryDiceLoss on softmax(upsample(logits))");
        CHECK_CLOSE(dl, gdl, 2 * 2 * 16 * 16, 1e-5, "torch d(focal + dice)/d logits");
        free(p1), free(gt), free(dp1), free(dl);
    }
    st_close(st);
}

int main(int argc, char **argv) {
    rng_seed(&rng, 1111);
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 7));

    printf("conv2d_backward: odd sizes, with finite differences\n");
    test_conv2d_backward(2, 3, 7, 5, 5, 3, 1, true);
    test_conv2d_backward(3, 2, 9, 11, 7, 5, 0, true);
    test_conv2d_backward(1, 5, 6, 4, 3, 1, 0, true);   // 1x1
    test_conv2d_backward(2, 2, 5, 5, 3, 5, 2, true);   // padding = k/2 with k = 5
    test_conv2d_backward(1, 1, 3, 3, 2, 5, 1, true);   // kernel larger than the image: mostly padding
    test_conv2d_backward(1, 3, 4, 4, 2, 3, 3, true);   // padding wider than the kernel
    test_conv2d_backward(1, 4, 300, 13, 5, 3, 1, false);  // tall and narrow: many dw chunks of <= 4096 pixels
    test_conv2d_backward(1, 300, 40, 120, 2, 3, 1, false);  // K * Wo * rows over the 16 MiB column bound
    printf("conv2d_backward: the prompt learner's layers (reference section 4)\n");
    test_conv2d_backward(2, 1, 224, 224, 4, 3, 1, false);
    test_conv2d_backward(2, 4, 112, 112, 16, 3, 1, false);
    test_conv2d_backward(1, 16, 56, 56, 64, 3, 1, false);
    test_conv2d_backward(1, 64, 28, 28, 256, 3, 1, false);
    test_conv2d_backward(1, 256, 14, 14, 1024, 3, 1, false);
    test_conv2d_backward(1, 1024, 7, 7, 4096, 5, 0, false);  // dw 105M floats: GEMMs accumulate into dw directly
    time_conv2d_backward(1, 256, 14, 14, 1024, 3, 1, 3);
    time_conv2d_backward(1, 1024, 7, 7, 4096, 5, 0, 2);
    time_conv2d_backward(2, 1024, 7, 7, 4096, 5, 0, 2);

    printf("relu_backward\n");
    test_relu_backward(4 * 224 * 224, false);
    test_relu_backward(4 * 224 * 224 + 3, true);
    test_relu_backward(1, false);

    printf("maxpool2x2_backward\n");
    test_maxpool_backward(1, 4, 224, 224, false, false);
    test_maxpool_backward(2, 16, 14, 14, true, false);
    test_maxpool_backward(2, 3, 7, 9, true, false);  // odd: last row and column get 0
    test_maxpool_backward(1, 2, 5, 7, false, true);
    test_maxpool_backward(1, 2, 1, 5, false, false);  // one row: all zero

    printf("upsample_bilinear_backward\n");
    test_upsample_backward(4, 16, 16, 224, 224, false);
    test_upsample_backward(3, 5, 7, 9, 11, true);
    test_upsample_backward(2, 4, 4, 4, 4, true);  // equal sizes: a copy
    test_upsample_backward(2, 1, 3, 6, 1, true);  // one source row, one output column
    test_upsample_backward(1, 7, 6, 3, 2, true);  // a downscale

    printf("l2_normalize_backward\n");
    test_l2_backward(256, 1024, 0.0f, false, false);  // the decoder's patch features
    test_l2_backward(6, 33, 1e-2f, false, true);      // row 1 clamped to eps
    test_l2_backward(5, 17, 0.0f, true, true);

    printf("pixel_loss\n");
    test_pixel_loss(2, 224, 224, 1.0f, false);
    test_pixel_loss(1, 9, 11, 0.25f, true);
    test_pixel_loss(3, 5, 6, 2.0f, true);

    printf("upsample_softmax2_backward\n");
    test_upsample_softmax2_backward(2, 16, 16, 224, 224, 3.0f, false, 1e-5);
    test_upsample_softmax2_backward(2, 16, 16, 224, 224, 30.0f, false, 1e-4);  // saturated: p (1 - p) tiny
    test_upsample_softmax2_backward(1, 4, 5, 9, 7, 1.0f, true, 1e-5);
    test_upsample_softmax2_backward(3, 3, 3, 3, 3, 2.0f, true, 1e-5);

    printf("threads\n");
    test_thread_determinism();

    printf("NaN and argument checks\n");
    test_nan_and_errors();

    printf("against torch autograd (train_ops.safetensors)\n");
    test_golden(argc > 1 ? argv[1] : AGPT_TEST_DATA);

    engine_destroy(&eng);
    return test_summary();
}
