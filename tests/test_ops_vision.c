// The vision-path ops of kernels/ops.h on the CPU backend: each against a naive double-precision loop at the
// model's sizes (poisoned outputs, so an element an op forgets fails), their argument checks, and a golden
// made by PyTorch (tests/data/vision_ops.safetensors from tests/reference/make_vision_op_goldens.py) for the
// bilinear resize (align_corners=True), the two-class softmax and the max cosine similarity.
#include <string.h>

#include "kernels/ops.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "test.h"
#define TEST_NAME_WIDTH 60
#include "test_util.h"

static Rng rng;
static Engine eng;

// ---- helpers ---------------------------------------------------------------------------------------------

static double *dvec(int64_t n) { return malloc((size_t)n * sizeof(double)); }

// ---- l2_normalize ----------------------------------------------------------------------------------------

// zero_row: row 1 is all zeros (with eps > 0 it must come out as zeros, not NaN).
static void test_l2_normalize(int64_t rows, int64_t C, float eps, bool zero_row, bool in_place) {
    char name[128];
    snprintf(name, sizeof name, "l2_normalize [%lld,%lld] eps %g%s%s", (long long)rows, (long long)C, (double)eps,
             zero_row ? " zero row" : "", in_place ? " in place" : "");
    const int64_t n = rows * C;
    float *x = test_randn(&rng, n, 3.0f);
    if (zero_row) memset(x + C, 0, (size_t)C * sizeof(float));
    double *ref = dvec(n);
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0;
        for (int64_t i = 0; i < C; i++) ss += (double)x[r * C + i] * x[r * C + i];
        double d = fmax(sqrt(ss), eps);
        for (int64_t i = 0; i < C; i++) ref[r * C + i] = x[r * C + i] / d;
    }
    float *out = in_place ? x : test_poisoned(n);
    Tensor tx = cpu_f32_2d(x, rows, C), to = cpu_f32_2d(out, rows, C);
    CHECK_OK(op_l2_normalize(&eng, &to, &tx, eps));
    CHECK_CLOSE_D(name, out, ref, n, 1e-6);
    if (zero_row) {
        int bad = 0;
        for (int64_t i = 0; i < C; i++) bad += out[C + i] != 0.0f;
        CHECK(bad == 0, "%s: %d elements of the zero row are not 0", name, bad);
    }
    if (!in_place) free(out);
    free(x), free(ref);
}

// eps = 0 is plain division, as the reference's x / x.norm(): a zero row becomes NaN there too.
static void test_l2_normalize_eps0_zero_row(void) {
    float x[8] = {1, 2, 3, 4, 0, 0, 0, 0}, out[8];
    Tensor tx = cpu_f32_2d(x, 2, 4), to = cpu_f32_2d(out, 2, 4);
    CHECK_OK(op_l2_normalize(&eng, &to, &tx, 0.0f));
    CHECK(isnan(out[4]) && isnan(out[7]) && fabsf(out[3] - 4.0f / sqrtf(30.0f)) < 1e-7f,
          "l2_normalize eps 0: zero row should be NaN (plain division), got %g", (double)out[4]);
}

// ---- bilinear resize --------------------------------------------------------------------------------------

// align_corners=True: output pixel y samples source row y * (h-1)/(H-1). The source coordinate is rounded
// to float as PyTorch computes it (float scale, then float product: the op's spec, and at 224 -> 16 it moves
// lambda by ~1e-5), everything after that is double.
static double src_coord(int64_t i, int64_t in, int64_t out) {
    if (out <= 1) return 0;
    volatile float scale = (float)(in - 1) / (float)(out - 1);
    volatile float src = scale * (float)i;
    return src;
}

static void ref_upsample(double *out, const float *x, int64_t BC, int64_t h, int64_t w, int64_t H, int64_t W) {
    for (int64_t c = 0; c < BC; c++)
        for (int64_t oy = 0; oy < H; oy++)
            for (int64_t ox = 0; ox < W; ox++) {
                double sy = src_coord(oy, h, H), sx = src_coord(ox, w, W);
                int64_t y0 = (int64_t)floor(sy), x0 = (int64_t)floor(sx);
                if (y0 > h - 1) y0 = h - 1;
                if (x0 > w - 1) x0 = w - 1;
                int64_t y1 = y0 < h - 1 ? y0 + 1 : y0, x1 = x0 < w - 1 ? x0 + 1 : x0;
                double ly = sy - y0, lx = sx - x0;
                const float *img = x + c * h * w;
                double top = (1 - lx) * img[y0 * w + x0] + lx * img[y0 * w + x1];
                double bot = (1 - lx) * img[y1 * w + x0] + lx * img[y1 * w + x1];
                out[(c * H + oy) * W + ox] = (1 - ly) * top + ly * bot;
            }
}

static void test_upsample(int64_t B, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W) {
    char name[128];
    snprintf(name, sizeof name, "upsample_bilinear [%lld,%lld,%lld,%lld] -> %lldx%lld", (long long)B, (long long)C,
             (long long)h, (long long)w, (long long)H, (long long)W);
    const int64_t nin = B * C * h * w, nout = B * C * H * W;
    float *x = test_randn(&rng, nin, 5.0f), *out = test_poisoned(nout);
    double *ref = dvec(nout);
    ref_upsample(ref, x, B * C, h, w, H, W);
    Tensor tx = cpu_f32_4d(x, B, C, h, w), to = cpu_f32_4d(out, B, C, H, W);
    CHECK_OK(op_upsample_bilinear(&eng, &to, &tx));
    CHECK_CLOSE_D(name, out, ref, nout, 1e-6);
    if (h == H && w == W) {
        CHECK(memcmp(out, x, (size_t)nin * sizeof(float)) == 0, "%s: the identity resize is not a copy", name);
    }
    // align_corners: the first corner is the first pixel exactly; the last is the last pixel up to the float
    // rounding of (h-1)/(H-1) * (H-1), which PyTorch has too (or exactly, for a single output row/column).
    int bad = 0;
    for (int64_t c = 0; c < B * C; c++) {
        float last = x[c * h * w + (H > 1 ? h - 1 : 0) * w + (W > 1 ? w - 1 : 0)];
        bad += out[c * H * W] != x[c * h * w];
        bad += !(fabsf(out[c * H * W + H * W - 1] - last) <= 1e-5f * fabsf(last));
    }
    CHECK(bad == 0, "%s: %d corner pixels differ from the input's corners", name, bad);
    free(x), free(out), free(ref);
}

// ---- max dot ----------------------------------------------------------------------------------------------

// plant: references are 2x queries 0, 1, 2, so those queries' maxima sit in the very last
// (partial) block of references and dominate their rows; a backend that skips the tail fails by far.
static void test_max_dot(int64_t Q, int64_t R, int64_t D, bool plant, bool normalised) {
    char name[128];
    snprintf(name, sizeof name, "max_dot Q=%lld R=%lld D=%lld%s%s", (long long)Q, (long long)R, (long long)D,
             plant ? " planted tail" : "", normalised ? " cosine" : "");
    float *q = test_randn(&rng, Q * D, 1.0f), *r = test_randn(&rng, R * D, 1.0f), *out = test_poisoned(Q);
    if (plant)
        for (int64_t k = 0; k < 3 && k < Q && k < R; k++)
            for (int64_t i = 0; i < D; i++) r[(R - 1 - k) * D + i] = 2.0f * q[k * D + i];
    if (normalised) {
        Tensor tq = cpu_f32_2d(q, Q, D), tr = cpu_f32_2d(r, R, D);
        CHECK_OK(op_l2_normalize(&eng, &tq, &tq, 1e-8f));
        CHECK_OK(op_l2_normalize(&eng, &tr, &tr, 1e-8f));
    }
    double *ref = dvec(Q);
    for (int64_t i = 0; i < Q; i++) {
        double m = -INFINITY;
        for (int64_t j = 0; j < R; j++) {
            double s = 0;
            for (int64_t k = 0; k < D; k++) s += (double)q[i * D + k] * r[j * D + k];
            m = fmax(m, s);
        }
        ref[i] = m;
    }
    Tensor tq = cpu_f32_2d(q, Q, D), tr = cpu_f32_2d(r, R, D), to = cpu_f32_1d(out, Q);
    CHECK_OK(op_max_dot(&eng, &to, &tq, &tr));
    CHECK_CLOSE_D(name, out, ref, Q, 1e-5);
    free(q), free(r), free(out), free(ref);
}

// ---- two-class softmax ------------------------------------------------------------------------------------

static void test_softmax2(int64_t B, int64_t N, float scale) {
    char name[128];
    snprintf(name, sizeof name, "softmax2_class1 [%lld,2,%lld] logits x%g", (long long)B, (long long)N,
             (double)scale);
    float *l = malloc((size_t)(B * 2 * N) * sizeof(float)), *out = test_poisoned(B * N);
    rng_fill_uniform(&rng, l, (size_t)(B * 2 * N), -scale, scale);
    double *ref = dvec(B * N);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++) {
            double l0 = l[(b * 2) * N + i], l1 = l[(b * 2 + 1) * N + i];
            ref[b * N + i] = 1.0 / (1.0 + exp(l0 - l1));
        }
    Tensor tl = cpu_f32_3d(l, B, 2, N), to = cpu_f32_2d(out, B, N);
    CHECK_OK(op_softmax2_class1(&eng, &to, &tl));
    CHECK_CLOSE_D(name, out, ref, B * N, 1e-6);
    // Saturated pixels: exactly 0 or 1 at +-100 (no inf/inf), and never outside [0, 1].
    int bad = 0;
    for (int64_t i = 0; i < B * N; i++) bad += !(out[i] >= 0.0f && out[i] <= 1.0f);
    CHECK(bad == 0, "%s: %d probabilities outside [0, 1] or NaN", name, bad);
    free(l), free(out), free(ref);
}

// ---- axpy, affine -----------------------------------------------------------------------------------------

static void test_axpy_affine(void) {
    const int64_t n = 4 * 224 * 224 + 3;
    float *x = test_randn(&rng, n, 1.0f), *y = test_randn(&rng, n, 1.0f);
    double *ref = dvec(n);
    for (int64_t i = 0; i < n; i++) ref[i] = y[i] + 0.25 * x[i];
    Tensor tx = cpu_f32_1d(x, n), ty = cpu_f32_1d(y, n);
    CHECK_OK(op_axpy(&eng, &ty, &tx, 0.25f));
    CHECK_CLOSE_D("axpy y += 0.25 x", y, ref, n, 1e-7);
    for (int64_t i = 0; i < n; i++) ref[i] = 1.0 - (double)y[i];
    CHECK_OK(op_affine(&eng, &ty, -1.0f, 1.0f));
    CHECK_CLOSE_D("affine y = 1 - y", y, ref, n, 1e-7);
    for (int64_t i = 0; i < n; i++) ref[i] = 0.25 * (double)y[i] - 3.0;
    CHECK_OK(op_affine(&eng, &ty, 0.25f, -3.0f));
    CHECK_CLOSE_D("affine y = 0.25 y - 3", y, ref, n, 1e-7);
    free(x), free(y), free(ref);
}

// ---- im2patches -------------------------------------------------------------------------------------------

// Every pixel must land at (patch (y/p)*(W/p) + x/p, column c p^2 + (y%p) p + x%p), bit for bit; the map is a
// bijection, so with a poisoned output this also shows every output element is written.
static void test_im2patches(int64_t B, int64_t C, int64_t H, int64_t W, int p) {
    char name[128];
    snprintf(name, sizeof name, "im2patches [%lld,%lld,%lld,%lld] p=%d", (long long)B, (long long)C, (long long)H,
             (long long)W, p);
    const int64_t n = B * C * H * W, np = (H / p) * (W / p), cols = C * p * p;
    float *img = test_randn(&rng, n, 1.0f), *out = test_poisoned(n);
    Tensor ti = cpu_f32_4d(img, B, C, H, W), to = cpu_f32_3d(out, B, np, cols);
    CHECK_OK(op_im2patches(&eng, &to, &ti, p));
    int64_t bad = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t y = 0; y < H; y++)
                for (int64_t x = 0; x < W; x++) {
                    int64_t patch = (y / p) * (W / p) + x / p, col = c * p * p + (y % p) * p + x % p;
                    bad += memcmp(&out[(b * np + patch) * cols + col], &img[((b * C + c) * H + y) * W + x], 4) != 0;
                }
    printf("  %-60s %lld of %lld elements misplaced\n", name, (long long)bad, (long long)n);
    CHECK(bad == 0, "%s: %lld elements misplaced", name, (long long)bad);
    free(img), free(out);
}

// ---- argument checks --------------------------------------------------------------------------------------

static void test_errors(void) {
    float *a = test_randn(&rng, 4096, 1.0f), *b = test_poisoned(4096);
    // l2_normalize: shape mismatch, negative or NaN eps
    Tensor x = cpu_f32_2d(a, 4, 8), o = cpu_f32_2d(b, 4, 8), o_bad = cpu_f32_2d(b, 8, 4);
    CHECK_ERR(op_l2_normalize(&eng, &o_bad, &x, 1e-8f));
    CHECK_ERR(op_l2_normalize(&eng, &o, &x, -1.0f));
    CHECK_ERR(op_l2_normalize(&eng, &o, &x, NAN));
    // upsample: not 4-D, batch/channels differ, empty source to a non-empty output, aliasing
    Tensor u_in = cpu_f32_4d(a, 1, 2, 4, 4), u3 = cpu_f32_3d(b, 2, 8, 8), u_c = cpu_f32_4d(b, 1, 3, 8, 8),
           u_empty = cpu_f32_4d(a, 1, 2, 0, 4);
    Tensor u_ok = cpu_f32_4d(b, 1, 2, 8, 8), u_alias = cpu_f32_4d(a, 1, 2, 8, 8);
    CHECK_ERR(op_upsample_bilinear(&eng, &u3, &u_in));
    CHECK_ERR(op_upsample_bilinear(&eng, &u_c, &u_in));
    CHECK_ERR(op_upsample_bilinear(&eng, &u_ok, &u_empty));
    CHECK_ERR(op_upsample_bilinear(&eng, &u_alias, &u_in));
    // max_dot: widths differ, out not [Q], no references, 3-D query
    Tensor q = cpu_f32_2d(a, 4, 8), r = cpu_f32_2d(a + 32, 5, 8), r_w = cpu_f32_2d(a + 32, 4, 10),
           out_q = cpu_f32_1d(b, 4), out_bad = cpu_f32_1d(b, 5);
    Tensor r_none = cpu_f32_2d(a + 32, 0, 8), q3 = cpu_f32_3d(a, 1, 4, 8), out_2d = cpu_f32_2d(b, 4, 1);
    CHECK_ERR(op_max_dot(&eng, &out_q, &q, &r_w));
    CHECK_ERR(op_max_dot(&eng, &out_bad, &q, &r));
    CHECK_ERR(op_max_dot(&eng, &out_2d, &q, &r));
    CHECK_ERR(op_max_dot(&eng, &out_q, &q, &r_none));
    CHECK_ERR(op_max_dot(&eng, &out_q, &q3, &r));
    CHECK_OK(op_max_dot(&eng, &out_q, &q, &r));
    // softmax2: 3 classes, out of the wrong shape
    Tensor l3 = cpu_f32_3d(a, 2, 3, 16), l2 = cpu_f32_3d(a, 2, 2, 16), s_ok = cpu_f32_2d(b, 2, 16),
           s_bad = cpu_f32_2d(b, 2, 32);
    CHECK_ERR(op_softmax2_class1(&eng, &s_ok, &l3));
    CHECK_ERR(op_softmax2_class1(&eng, &s_bad, &l2));
    // axpy: shapes differ
    Tensor y1 = cpu_f32_1d(b, 16), x1 = cpu_f32_1d(a, 17);
    CHECK_ERR(op_axpy(&eng, &y1, &x1, 1.0f));
    // im2patches: H not a multiple of p, out of the wrong shape, p < 1, not 4-D
    Tensor img = cpu_f32_4d(a, 1, 3, 28, 42), img_h = cpu_f32_4d(a, 1, 3, 30, 28), img3 = cpu_f32_3d(a, 3, 28, 42);
    Tensor pout = cpu_f32_3d(b, 1, 6, 588), pout_bad = cpu_f32_3d(b, 1, 6, 587), pout_h = cpu_f32_3d(b, 1, 4, 588);
    CHECK_ERR(op_im2patches(&eng, &pout_h, &img_h, 14));
    CHECK_ERR(op_im2patches(&eng, &pout_bad, &img, 14));
    CHECK_ERR(op_im2patches(&eng, &pout, &img, 0));
    CHECK_ERR(op_im2patches(&eng, &pout, &img3, 14));
    CHECK_OK(op_im2patches(&eng, &pout, &img, 14));
    // wrong device and wrong dtype reach no backend
    Tensor on_gpu = x;
    on_gpu.device = DEV_CUDA;
    CHECK_ERR(op_l2_normalize(&eng, &o, &on_gpu, 0.0f));
    Tensor as_bf16 = tensor_2d(a, DT_BF16, DEV_CPU, 4, 8);
    CHECK_ERR(op_affine(&eng, &as_bf16, 1.0f, 0.0f));
    free(a), free(b);
}

// ---- golden: PyTorch ---------------------------------------------------------------------------------------

static const float *golden(const SafeTensors *st, const char *name, int64_t numel) {
    Tensor t;
    if (st_get(st, name, &t) != AGPT_OK) {
        CHECK(0, "golden %s: %s", name, agpt_last_error());
        return NULL;
    }
    CHECK(t.dtype == DT_F32 && tensor_numel(&t) == numel, "golden %s: expected f32 with %lld elements", name,
          (long long)numel);
    return t.dtype == DT_F32 && tensor_numel(&t) == numel ? t.data : NULL;
}

// Returns how many elements are bit-identical.
static int64_t check_close(const char *name, const float *out, const float *ref, int64_t n, double tol) {
    double e = rel_l2(out, ref, n);
    int64_t exact = 0;
    for (int64_t i = 0; i < n; i++) exact += memcmp(&out[i], &ref[i], 4) == 0;
    printf("  %-60s rel_l2 %.3g (tol %.0e), %lld of %lld bit-identical\n", name, e, tol, (long long)exact,
           (long long)n);
    CHECK(e <= tol, "%s: rel_l2 %.3g > %.0e", name, e, tol);
    return exact;
}

static void test_golden(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/vision_ops.safetensors", AGPT_TEST_DATA);
    SafeTensors *st = NULL;
    if (st_open(path, &st) != AGPT_OK) {
        printf("  golden missing (%s): PyTorch comparison skipped; make it with "
               "tests/reference/make_vision_op_goldens.py\n", agpt_last_error());
        agpt_clear_error();
        return;
    }
    printf("golden %s (torch %s)\n", path, st_metadata(st, "torch") ? st_metadata(st, "torch") : "?");

    // The text-map path: logits on the 16x16 grid -> 224x224 -> softmax over the two classes, class 1.
    Tensor rows_t;
    const float *x = golden(st, "map.x", 2 * 16 * 16);
    CHECK_OK(st_get(st, "map.rows", &rows_t));
    const int64_t nr = tensor_numel(&rows_t);
    const float *up_want = golden(st, "map.up", 2 * nr * 224), *p_want = golden(st, "map.p", nr * 224);
    if (x && up_want && p_want && rows_t.dtype == DT_I32) {
        const int32_t *rows = rows_t.data;
        float *xin = malloc(2 * 16 * 16 * sizeof(float)), *up = test_poisoned(2 * 224 * 224),
              *p = test_poisoned(224 * 224);
        memcpy(xin, x, 2 * 16 * 16 * sizeof(float));
        Tensor tx = cpu_f32_4d(xin, 1, 2, 16, 16), tup = cpu_f32_4d(up, 1, 2, 224, 224);
        Tensor tl = cpu_f32_3d(up, 1, 2, 224 * 224), tp = cpu_f32_2d(p, 1, 224 * 224);
        CHECK_OK(op_upsample_bilinear(&eng, &tup, &tx));
        CHECK_OK(op_softmax2_class1(&eng, &tp, &tl));
        float *up_sel = malloc((size_t)(2 * nr * 224) * sizeof(float)), *p_sel = malloc((size_t)(nr * 224) * 4);
        for (int64_t c = 0; c < 2; c++)
            for (int64_t i = 0; i < nr; i++) {
                memcpy(up_sel + (c * nr + i) * 224, up + (c * 224 + rows[i]) * 224, 224 * sizeof(float));
                if (c == 0) memcpy(p_sel + i * 224, p + rows[i] * 224, 224 * sizeof(float));
            }
        // Same indices, weights and fused multiply-adds as PyTorch's kernels (its AVX2 CPU kernel and its CUDA
        // kernel agree): every bit must match. A golden regenerated by a PyTorch without FMA kernels would
        // differ in the last bit of about a third of the pixels.
        int64_t exact = check_close("torch: interpolate 16->224 align_corners=True", up_sel, up_want,
                                    2 * nr * 224, 1e-7);
        CHECK(exact == 2 * nr * 224, "interpolate 16->224: %lld of %lld pixels differ from PyTorch in bits",
              (long long)(2 * nr * 224 - exact), (long long)(2 * nr * 224));
        check_close("torch: softmax(dim=1)[:,1] of the upsampled logits", p_sel, p_want, nr * 224, 1e-6);
        free(xin), free(up), free(p), free(up_sel), free(p_sel);
    }

    // A small odd resize (PyTorch takes its channels-last vectorised kernel here: rounding may differ).
    const float *xs = golden(st, "small.x", 2 * 3 * 5 * 7), *small_want = golden(st, "small.out", 2 * 3 * 9 * 11);
    if (xs && small_want) {
        float *xin = malloc(2 * 3 * 5 * 7 * sizeof(float)), *out = test_poisoned(2 * 3 * 9 * 11);
        memcpy(xin, xs, 2 * 3 * 5 * 7 * sizeof(float));
        Tensor tx = cpu_f32_4d(xin, 2, 3, 5, 7), to = cpu_f32_4d(out, 2, 3, 9, 11);
        CHECK_OK(op_upsample_bilinear(&eng, &to, &tx));
        check_close("torch: interpolate [2,3,5,7] -> 9x11", out, small_want, 2 * 3 * 9 * 11, 1e-6);
        free(xin), free(out);
    }

    // The few-shot map: max over references of F.cosine_similarity = normalise (eps 1e-8), then max dot.
    const float *q = golden(st, "cos.query", 48 * 64), *r = golden(st, "cos.refs", 80 * 64);
    const float *cos_want = golden(st, "cos.max", 48);
    if (q && r && cos_want) {
        float *qn = test_poisoned(48 * 64), *rn = test_poisoned(80 * 64), *out = test_poisoned(48);
        Tensor tq = cpu_f32_2d((float *)q, 48, 64), tr = cpu_f32_2d((float *)r, 80, 64);
        Tensor tqn = cpu_f32_2d(qn, 48, 64), trn = cpu_f32_2d(rn, 80, 64), to = cpu_f32_1d(out, 48);
        CHECK_OK(op_l2_normalize(&eng, &tqn, &tq, 1e-8f));
        CHECK_OK(op_l2_normalize(&eng, &trn, &tr, 1e-8f));
        CHECK_OK(op_max_dot(&eng, &to, &tqn, &trn));
        check_close("torch: cosine_similarity(q, refs).amax(1)", out, cos_want, 48, 1e-6);
        free(qn), free(rn), free(out);
    }
    st_close(st);
}

// ---- embedding lookup ------------------------------------------------------------------------------------

// op_embedding against a direct row loop, on a poisoned output; then its argument checks.
static void test_embedding(int64_t V, int64_t C, int64_t N) {
    char name[128];
    snprintf(name, sizeof name, "embedding V=%lld C=%lld N=%lld", (long long)V, (long long)C, (long long)N);
    float *table = test_randn(&rng, V * C, 1.0f), *out = test_poisoned(N * C);
    float *ref = malloc((size_t)(N * C + 1) * sizeof(float));
    int32_t *ids = malloc((size_t)(N + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < N; i++) ids[i] = (int32_t)(rng_u64(&rng) % (uint64_t)V);
    if (N > 1) ids[0] = 0, ids[N - 1] = (int32_t)(V - 1);  // both ends of the table
    for (int64_t i = 0; i < N; i++)
        for (int64_t c = 0; c < C; c++) ref[i * C + c] = table[ids[i] * C + c];
    Tensor tt = cpu_f32_2d(table, V, C), to = cpu_f32_2d(out, N, C), ti = tensor_1d(ids, DT_I32, DEV_CPU, N);
    CHECK_OK(op_embedding(&eng, &to, &tt, &ti));
    int bad = 0;
    for (int64_t i = 0; i < N * C; i++) bad += memcmp(&out[i], &ref[i], sizeof(float)) != 0;
    printf("  %-60s %d of %lld elements differ\n", name, bad, (long long)(N * C));
    CHECK(bad == 0, "%s: %d elements differ from the row loop", name, bad);
    free(table), free(out), free(ref), free(ids);
}

static void test_embedding_errors(void) {
    float table[4 * 3], out[2 * 3];
    for (int i = 0; i < 12; i++) table[i] = (float)i;
    int32_t ids[2] = {1, 3}, neg[2] = {1, -1}, big[2] = {4, 0};
    float fids[2] = {1, 3};
    Tensor tt = cpu_f32_2d(table, 4, 3), to = cpu_f32_2d(out, 2, 3);
    Tensor ti = tensor_1d(ids, DT_I32, DEV_CPU, 2), tneg = tensor_1d(neg, DT_I32, DEV_CPU, 2),
           tbig = tensor_1d(big, DT_I32, DEV_CPU, 2), tf = cpu_f32_1d(fids, 2);
    Tensor to_n = cpu_f32_2d(out, 3, 2), to_c = cpu_f32_2d(out, 1, 3), t3 = cpu_f32_3d(table, 1, 4, 3),
           ti2 = tensor_2d(ids, DT_I32, DEV_CPU, 1, 2), ti_dev = tensor_1d(ids, DT_I32, DEV_CUDA, 2);
    CHECK_OK(op_embedding(&eng, &to, &tt, &ti));
    CHECK(out[0] == 3 && out[2] == 5 && out[3] == 9 && out[5] == 11, "embedding [4,3] ids {1,3}: got %g %g %g %g",
          (double)out[0], (double)out[2], (double)out[3], (double)out[5]);
    CHECK_ERR(op_embedding(&eng, &to, &tt, &tneg));  // id -1
    CHECK(strstr(agpt_last_error(), "ids[1] = -1") != NULL, "embedding: the message should name the bad id and "
          "its position: %s", agpt_last_error());
    CHECK_ERR(op_embedding(&eng, &to, &tt, &tbig));  // id V
    CHECK(strstr(agpt_last_error(), "ids[0] = 4") != NULL, "embedding: the message should name the bad id and "
          "its position: %s", agpt_last_error());
    CHECK_ERR(op_embedding(&eng, &to, &tt, &tf));      // f32 ids
    CHECK_ERR(op_embedding(&eng, &to, &tt, &ti2));     // 2-D ids
    CHECK_ERR(op_embedding(&eng, &to, &tt, &ti_dev));  // ids on the device
    CHECK_ERR(op_embedding(&eng, &to, &tt, NULL));
    CHECK_ERR(op_embedding(&eng, &to_n, &tt, &ti));    // out [3,2]
    CHECK_ERR(op_embedding(&eng, &to_c, &tt, &ti));    // out has 1 row for 2 ids
    CHECK_ERR(op_embedding(&eng, &to, &t3, &ti));      // 3-D table
    Tensor alias = cpu_f32_2d(table, 2, 3);
    CHECK_ERR(op_embedding(&eng, &alias, &tt, &ti));   // out aliases table
    Tensor t0 = tensor_1d(ids, DT_I32, DEV_CPU, 0), o0 = cpu_f32_2d(out, 0, 3);
    CHECK_OK(op_embedding(&eng, &o0, &tt, &t0));       // no ids: nothing to do
}

int main(void) {
    rng_seed(&rng, 7);
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 7));

    printf("l2_normalize\n");
    test_l2_normalize(256, 1024, 0.0f, false, false);
    test_l2_normalize(256, 1280, 0.0f, false, false);
    test_l2_normalize(256, 1024, 1e-8f, true, false);
    test_l2_normalize(256, 1280, 1e-8f, true, true);
    test_l2_normalize(3, 5, 100.0f, false, false);  // eps larger than every norm: x / eps
    test_l2_normalize_eps0_zero_row();

    printf("upsample_bilinear\n");
    test_upsample(1, 2, 16, 16, 224, 224);
    test_upsample(2, 3, 5, 7, 9, 11);
    test_upsample(1, 2, 16, 16, 16, 16);  // identity
    test_upsample(1, 1, 224, 224, 16, 16);  // down
    test_upsample(2, 1, 1, 1, 5, 3);        // one source pixel
    test_upsample(1, 2, 7, 5, 1, 9);        // one output row: samples source row 0

    printf("max_dot\n");
    test_max_dot(256, 256 * 3, 1280, true, false);
    test_max_dot(256, 256 * 3, 1280, false, true);
    test_max_dot(64, 4099, 1280, true, false);  // two full blocks of 2048 references and a tail of 3
    test_max_dot(1100, 2100, 64, true, false);  // more queries than a block of 1024
    test_max_dot(5, 1, 3, false, false);

    printf("softmax2_class1\n");
    test_softmax2(4, 224 * 224, 100.0f);
    test_softmax2(4, 224 * 224, 5.0f);
    test_softmax2(3, 7, 30.0f);

    printf("axpy, affine\n");
    test_axpy_affine();

    printf("im2patches\n");
    test_im2patches(2, 3, 224, 224, 14);
    test_im2patches(1, 3, 28, 42, 14);
    test_im2patches(2, 2, 6, 4, 2);
    test_im2patches(1, 1, 3, 3, 1);

    printf("embedding\n");
    test_embedding(49408, 256, 77 * 2);  // ImageBind's text vocabulary, two sentences
    test_embedding(4096, 4096, 7);       // LLaMA-7B's width, a short prompt piece
    test_embedding(5, 3, 1);
    test_embedding(1, 1, 4);
    test_embedding_errors();

    printf("argument checks\n");
    test_errors();

    test_golden();

    engine_destroy(&eng);
    return test_summary();
}
