// op_cross_entropy on the CPU engine: the summed loss and d logits against a naive double-precision loop (random
// logits with large magnitudes and row offsets of +-1e4, ignored rows, V = 1, 7, 32001, R = 1 and 13), into
// NaN-poisoned outputs (ignored rows must come out exactly 0), in place over the logits, loss only and gradient
// only, another ignore index and grad_scale, central finite differences of the op's own loss, and bad inputs.
#include <string.h>

#include "kernels/ops.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "test.h"
#define TEST_NAME_WIDTH 52
#include "test_util.h"

static Rng rng;
static Engine eng;

// The reference: per counted row, log-sum-exp in double with the maximum subtracted; dref = gs (softmax - onehot),
// 0 on ignored rows. Returns the summed loss.
static double ref_ce(double *dref, const float *x, const int32_t *y, int64_t R, int64_t V, int32_t ignore,
                     double gs) {
    double total = 0;
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * V;
        double *d = dref + r * V;
        if (y[r] == ignore) {
            for (int64_t i = 0; i < V; i++) d[i] = 0;
            continue;
        }
        double mx = xr[0];
        for (int64_t i = 1; i < V; i++) mx = xr[i] > mx ? xr[i] : mx;
        double sum = 0;
        for (int64_t i = 0; i < V; i++) sum += exp((double)xr[i] - mx);
        double lse = mx + log(sum);
        total += lse - xr[y[r]];
        for (int64_t i = 0; i < V; i++) d[i] = gs * (exp((double)xr[i] - lse) - (i == y[r] ? 1.0 : 0.0));
    }
    return total;
}

static void check_loss(const char *name, double got, double want, double tol) {
    double err = fabs(got - want) / fmax(fabs(want), 1e-300);
    if (want == 0) err = fabs(got);
    printf("  %-52s loss %.12g vs %.12g rel %.3g (tol %.0e)\n", name, got, want, err, tol);
    CHECK(isfinite(got) && err <= tol, "%s: loss %.17g, expected %.17g (rel %.3g > %.0e)", name, got, want, err, tol);
}

// Logits [R,V]: 30 * normal plus a per-row offset of 0, +1e4 or -1e4 (the log-sum-exp must subtract the max);
// targets random, every third row (from row 2) ignored when R > 1.
static void test_case(int64_t R, int64_t V, bool with_ignored) {
    char name[128];
    snprintf(name, sizeof name, "cross_entropy R%lld V%lld%s", (long long)R, (long long)V,
             with_ignored ? " ignored rows" : "");
    const int64_t n = R * V;
    float *x = test_randn(&rng, n, 30.0f);
    for (int64_t r = 0; r < R; r++) {
        float off = (r % 3 == 1) ? 1e4f : (r % 3 == 2) ? -1e4f : 0.0f;
        for (int64_t i = 0; i < V; i++) x[r * V + i] += off;
    }
    int32_t *y = malloc((size_t)R * sizeof(int32_t));
    int counted = 0;
    for (int64_t r = 0; r < R; r++) {
        y[r] = (int32_t)(rng_uniform(&rng) * (float)V) % (int32_t)V;
        if (with_ignored && (R == 1 || r % 3 == 2)) y[r] = -100;
        if (y[r] != -100) counted++;
    }
    // One target on the row's maximum (loss near 0, gradient p - 1 near 0 there).
    if (R > 3 && y[3] != -100) {
        int64_t am = 0;
        for (int64_t i = 1; i < V; i++) am = x[3 * V + i] > x[3 * V + am] ? i : am;
        y[3] = (int32_t)am;
    }
    const float gs = counted ? 1.0f / (float)counted : 0.0f;
    double *dref = malloc((size_t)n * sizeof(double));
    const double want = ref_ce(dref, x, y, R, V, -100, gs);
    float *d = test_poisoned(n);
    Tensor tx = cpu_f32_2d(x, R, V), td = cpu_f32_2d(d, R, V), ty = tensor_1d(y, DT_I32, DEV_CPU, R);
    double got = NAN;
    CHECK_OK(op_cross_entropy(&eng, &got, &td, &tx, &ty, -100, gs));
    check_loss(name, got, want, 1e-12);
    char sub[160];
    snprintf(sub, sizeof sub, "%s dlogits", name);
    CHECK_CLOSE_D(sub, d, dref, n, 1e-6);
    // Ignored rows exactly zero (the buffer was NaN).
    bool zeros = true;
    for (int64_t r = 0; r < R; r++)
        if (y[r] == -100)
            for (int64_t i = 0; i < V; i++) zeros &= d[r * V + i] == 0.0f;
    CHECK(zeros, "%s: ignored rows are not exactly 0", name);

    // Loss only, gradient only: the same numbers.
    double got2 = NAN;
    CHECK_OK(op_cross_entropy(&eng, &got2, NULL, &tx, &ty, -100, gs));
    CHECK(got2 == got, "%s: loss without dlogits %.17g differs from %.17g", name, got2, got);
    float *d2 = test_poisoned(n);
    Tensor td2 = cpu_f32_2d(d2, R, V);
    CHECK_OK(op_cross_entropy(&eng, NULL, &td2, &tx, &ty, -100, gs));
    CHECK(memcmp(d2, d, (size_t)n * sizeof(float)) == 0, "%s: dlogits without the loss differ", name);
    // In place: dlogits = logits gives the same loss and gradient bit for bit.
    memcpy(d2, x, (size_t)n * sizeof(float));
    double got3 = NAN;
    CHECK_OK(op_cross_entropy(&eng, &got3, &td2, &td2, &ty, -100, gs));
    CHECK(got3 == got && memcmp(d2, d, (size_t)n * sizeof(float)) == 0, "%s: in place differs (loss %.17g vs %.17g)",
          name, got3, got);
    free(x), free(y), free(dref), free(d), free(d2);
}

// Another ignore index (a class in range: rows targeting it are skipped), grad_scale 0.5, a 3-D logits tensor.
static void test_ignore_index(void) {
    const int64_t B = 2, T = 5, V = 7, R = B * T;
    float *x = test_randn(&rng, R * V, 3.0f), *d = test_poisoned(R * V);
    int32_t y[10] = {0, 3, 6, 3, 1, 2, 3, 5, 4, 3};
    double *dref = malloc((size_t)(R * V) * sizeof(double));
    const double want = ref_ce(dref, x, y, R, V, 3, 0.5);
    Tensor tx = cpu_f32_3d(x, B, T, V), td = cpu_f32_3d(d, B, T, V), ty = tensor_2d(y, DT_I32, DEV_CPU, B, T);
    double got = NAN;
    CHECK_OK(op_cross_entropy(&eng, &got, &td, &tx, &ty, 3, 0.5f));
    check_loss("cross_entropy [2,5,7] ignore_index 3, scale 0.5", got, want, 1e-12);
    CHECK_CLOSE_D("cross_entropy [2,5,7] ignore_index 3 dlogits", d, dref, R * V, 1e-6);
    free(x), free(d), free(dref);
}

// Central differences of the op's own summed loss (double) in every logit of a small case, against its dlogits
// with grad_scale 1. The perturbed logits are f32, so the step is the one actually taken.
static void test_finite_differences(void) {
    const int64_t R = 3, V = 5, n = R * V;
    float *x = test_randn(&rng, n, 2.0f), *d = test_poisoned(n);
    int32_t y[3] = {4, -100, 1};
    Tensor tx = cpu_f32_2d(x, R, V), td = cpu_f32_2d(d, R, V), ty = tensor_1d(y, DT_I32, DEV_CPU, R);
    CHECK_OK(op_cross_entropy(&eng, NULL, &td, &tx, &ty, -100, 1.0f));
    double *fd = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        const float keep = x[i];
        const float xp = keep + 1e-3f, xm = keep - 1e-3f;
        double lp = 0, lm = 0;
        x[i] = xp;
        CHECK_OK(op_cross_entropy(&eng, &lp, NULL, &tx, &ty, -100, 1.0f));
        x[i] = xm;
        CHECK_OK(op_cross_entropy(&eng, &lm, NULL, &tx, &ty, -100, 1.0f));
        x[i] = keep;
        fd[i] = (lp - lm) / ((double)xp - (double)xm);
    }
    CHECK_CLOSE_D("cross_entropy R3 V5 dlogits vs central differences", d, fd, n, 1e-5);
    free(x), free(d), free(fd);
}

static void test_bad_inputs(void) {
    float x[12] = {0}, d[12], big[24];
    int32_t y[3] = {0, 1, 2};
    Tensor tx = cpu_f32_2d(x, 3, 4), td = cpu_f32_2d(d, 3, 4), ty = tensor_1d(y, DT_I32, DEV_CPU, 3);
    double l;
    y[1] = 4;  // outside [0,V)
    CHECK_ERR(op_cross_entropy(&eng, &l, &td, &tx, &ty, -100, 1.0f));
    y[1] = -5;  // negative, not the ignore index
    CHECK_ERR(op_cross_entropy(&eng, &l, &td, &tx, &ty, -100, 1.0f));
    y[1] = 1;
    Tensor ty2 = tensor_1d(y, DT_I32, DEV_CPU, 2);  // one target short
    CHECK_ERR(op_cross_entropy(&eng, &l, &td, &tx, &ty2, -100, 1.0f));
    Tensor tyf = tensor_1d(y, DT_F32, DEV_CPU, 3);  // not i32
    CHECK_ERR(op_cross_entropy(&eng, &l, &td, &tx, &tyf, -100, 1.0f));
    CHECK_ERR(op_cross_entropy(&eng, &l, &td, &tx, NULL, -100, 1.0f));
    Tensor tdw = cpu_f32_2d(d, 4, 3);  // dlogits of another shape
    CHECK_ERR(op_cross_entropy(&eng, &l, &tdw, &tx, &ty, -100, 1.0f));
    Tensor tb = cpu_f32_2d(big, 3, 4), tb1 = cpu_f32_2d(big + 1, 3, 4);  // overlapping but not the same
    CHECK_ERR(op_cross_entropy(&eng, &l, &tb1, &tb, &ty, -100, 1.0f));
    CHECK_ERR(op_cross_entropy(&eng, &l, &td, &tx, &ty, -100, INFINITY));
    CHECK_OK(op_cross_entropy(&eng, &l, &td, &tx, &ty, -100, 1.0f));
    check_loss("uniform logits: 3 ln 4", l, 3 * log(4.0), 1e-15);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (engine_create(&eng, DEV_CPU, 0, 0, 1234) != AGPT_OK) {
        printf("FAIL engine_create: %s\n", agpt_last_error());
        return 1;
    }
    rng_seed(&rng, 20260611);
    static const int64_t Vs[] = {1, 7, 32001};
    for (int v = 0; v < 3; v++) {
        test_case(1, Vs[v], false);
        test_case(1, Vs[v], true);
        test_case(13, Vs[v], false);
        test_case(13, Vs[v], true);
    }
    test_ignore_index();
    test_finite_differences();
    test_bad_inputs();
    engine_destroy(&eng);
    return test_summary();
}
