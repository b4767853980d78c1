// A small test harness: checks that count, relative L2 error, and the closing "N passed, M failed" line that
// ctest's log and CI read. Tests exit 0 when all passed, 1 when any failed, 77 when skipped.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "runtime/status.h"

static int test_passed = 0, test_failed = 0;

#define TEST_SKIP 77

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (cond) {                                             \
            test_passed++;                                      \
        } else {                                                \
            test_failed++;                                      \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
        }                                                       \
    } while (0)

// A call that must succeed: on failure prints the library's message and counts a failure.
#define CHECK_OK(expr)                                                                         \
    do {                                                                                       \
        Status check_ok_s_ = (expr);                                                           \
        CHECK(check_ok_s_ == AGPT_OK, "%s -> %s: %s", #expr, agpt_status_name(check_ok_s_),   \
              agpt_last_error());                                                              \
    } while (0)

// A call that must fail with a message.
#define CHECK_ERR(expr)                                                                        \
    do {                                                                                       \
        agpt_clear_error();                                                                    \
        Status check_err_s_ = (expr);                                                          \
        CHECK(check_err_s_ != AGPT_OK && agpt_last_error()[0] != 0,                            \
              "%s should fail with a message (status %s)", #expr, agpt_status_name(check_err_s_)); \
    } while (0)

// The error measure of every close check: ||out - ref|| / max(||ref||, floor * sqrt(n)) in double; NaN or inf
// anywhere gives +inf so it can never pass. floor = 0 is the plain relative L2 error. A reference that is nearly
// zero everywhere (a map of an image against itself, the gradient of a flat loss) makes the plain measure
// ill-conditioned: rounding noise over a tiny norm. The floor is the magnitude the values have by construction
// (1 for probabilities and maps): below it, the error counts relative to that scale (tests/README.md).
// AGPT_TEST_AUDIT=1 prints the RMS and the largest magnitude of every reference, to find such checks.
static inline double rel_l2_floor(const float *out, const float *ref, int64_t n, double floor) {
    double num = 0, den = 0, peak = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(out[i]) || !isfinite(ref[i])) return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
        if (fabs((double)ref[i]) > peak) peak = fabs((double)ref[i]);
    }
    if (getenv("AGPT_TEST_AUDIT")) printf("  AUDIT ref rms %.3g max %.3g n %lld\n", n ? sqrt(den / n) : 0.0, peak, (long long)n);
    double scale = floor * floor * (double)n;
    if (den < scale) den = scale;
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}

static inline double rel_l2_d_floor(const float *out, const double *ref, int64_t n, double floor) {
    double num = 0, den = 0, peak = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(out[i]) || !isfinite(ref[i])) return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
        if (fabs(ref[i]) > peak) peak = fabs(ref[i]);
    }
    if (getenv("AGPT_TEST_AUDIT")) printf("  AUDIT ref rms %.3g max %.3g n %lld\n", n ? sqrt(den / n) : 0.0, peak, (long long)n);
    double scale = floor * floor * (double)n;
    if (den < scale) den = scale;
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}

// ||out - ref|| / ||ref||: for references whose own norm is their scale (random inputs, never near zero).
static inline double rel_l2(const float *out, const float *ref, int64_t n) { return rel_l2_floor(out, ref, n, 0); }
static inline double rel_l2_d(const float *out, const double *ref, int64_t n) { return rel_l2_d_floor(out, ref, n, 0); }

#define CHECK_CLOSE(out, ref, n, tol, name) CHECK_CLOSE_SCALED(out, ref, n, tol, 0.0, name)

// As CHECK_CLOSE, with the error relative to max(||ref||, scale * sqrt(n)): for values whose magnitude is known
// (scale 1 for maps and probabilities) and whose reference may be close to zero.
#define CHECK_CLOSE_SCALED(out, ref, n, tol, scale, name)                                      \
    do {                                                                                       \
        double e_ = rel_l2_floor((out), (ref), (n), (scale));                                  \
        printf("  %-44s rel_l2 %.3g (tol %.0e)\n", (name), e_, (double)(tol));                 \
        CHECK(e_ <= (tol), "%s: rel_l2 %.3g > %.0e", (name), e_, (double)(tol));               \
    } while (0)

static inline int test_summary(void) {
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}
