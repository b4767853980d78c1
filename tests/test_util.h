// Helpers shared by several test programs (each test is its own executable, so these are static inline):
// random and NaN-poisoned host buffers and CPU f32 tensor shorthands for the op tests, golden tensors and
// device-to-host copies for the golden tests, and whole-file reading and writing for the tokenizer tests.
// Include after test.h.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/dtype.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "runtime/tensor.h"
#include "test.h"

#ifndef AGPT_SHARED_DATA
#define AGPT_SHARED_DATA "../shared/data"
#endif
#ifndef AGPT_TEST_DATA
#define AGPT_TEST_DATA "tests/data"
#endif

// ---- host buffers and CPU tensors ------------------------------------------------------------------------

// n normal samples times scale from r (caller frees).
static inline float *test_randn(Rng *r, int64_t n, float scale) {
    float *x = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = scale * rng_normal(r);
    return x;
}

// An output buffer poisoned with NaN, so an op that forgets to write an element fails. Never NULL: an empty
// tensor still has data.
static inline float *test_poisoned(int64_t n) {
    float *x = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = NAN;
    return x;
}

// A float array widened to double (caller frees).
static inline double *test_to_double(const float *x, int64_t n) {
    double *d = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

// f32 CPU tensors over p.
static inline Tensor cpu_f32_1d(float *p, int64_t a) { return tensor_1d(p, DT_F32, DEV_CPU, a); }
static inline Tensor cpu_f32_2d(float *p, int64_t a, int64_t b) { return tensor_2d(p, DT_F32, DEV_CPU, a, b); }
static inline Tensor cpu_f32_3d(float *p, int64_t a, int64_t b, int64_t c) {
    return tensor_3d(p, DT_F32, DEV_CPU, a, b, c);
}
static inline Tensor cpu_f32_4d(float *p, int64_t a, int64_t b, int64_t c, int64_t d) {
    return tensor_4d(p, DT_F32, DEV_CPU, a, b, c, d);
}

// How wide CHECK_CLOSE_D prints the check's name; a test may define its own before including this header.
#ifndef TEST_NAME_WIDTH
#define TEST_NAME_WIDTH 44
#endif

// rel_l2_d(out, ref, n) <= tol, printing the error against the tolerance.
#define CHECK_CLOSE_D(name, out, ref, n, tol)                                                  \
    do {                                                                                       \
        const char *ccd_name_ = (name);                                                        \
        double ccd_tol_ = (tol);                                                               \
        double ccd_e_ = rel_l2_d((out), (ref), (n));                                           \
        printf("  %-*s rel_l2 %.3g (tol %.0e)\n", TEST_NAME_WIDTH, ccd_name_, ccd_e_, ccd_tol_); \
        CHECK(ccd_e_ <= ccd_tol_, "%s: rel_l2 %.3g > %.0e", ccd_name_, ccd_e_, ccd_tol_);      \
    } while (0)

// ---- golden tensors ----------------------------------------------------------------------------------------

// The tensor `name` of st as host f32 (caller frees); NULL, counted as a failure, when absent.
static inline float *test_golden_f32(SafeTensors *st, const char *name, int64_t *n) {
    Tensor t;
    if (st_get(st, name, &t) != AGPT_OK) {
        printf("FAIL missing golden %s: %s\n", name, agpt_last_error());
        test_failed++;
        return NULL;
    }
    *n = tensor_numel(&t);
    float *out = malloc((size_t)*n * sizeof(float));
    convert_host(out, DT_F32, t.data, t.dtype, (size_t)*n);
    return out;
}

// A tensor on any device in any float dtype, back to host f32 (caller frees); NaN when the copy fails.
static inline float *test_to_host_f32(const Tensor *t) {
    int64_t n = tensor_numel(t);
    float *out = malloc((size_t)n * sizeof(float));
    void *raw = malloc(tensor_nbytes(t));
    Tensor h = *t;
    h.device = DEV_CPU;
    h.data = raw;
    if (tensor_copy(&h, t) != AGPT_OK) {
        for (int64_t i = 0; i < n; i++) out[i] = NAN;
    } else {
        convert_host(out, DT_F32, raw, t->dtype, (size_t)n);
    }
    free(raw);
    return out;
}

// The tensor t (any device, any float dtype) against the golden tensor `golden_name` of st: the same element
// count and rel_l2 <= tol.
static inline void test_compare_golden(SafeTensors *st, const char *what, const Tensor *t, const char *golden_name,
                                       double tol) {
    int64_t n = 0;
    float *want = test_golden_f32(st, golden_name, &n);
    if (!want) return;
    float *got = test_to_host_f32(t);
    CHECK(tensor_numel(t) == n, "%s: %lld elements vs golden %lld", what, (long long)tensor_numel(t), (long long)n);
    if (tensor_numel(t) == n) CHECK_CLOSE(got, want, n, tol, what);
    free(want), free(got);
}

// ---- files -------------------------------------------------------------------------------------------------

// The whole file (caller frees), its length in *n; NULL when it cannot be opened.
static inline uint8_t *test_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 20, len = 0;
    uint8_t *p = malloc(cap);
    for (size_t got; p && (got = fread(p + len, 1, cap - len, f)) > 0;) {
        len += got;
        if (len == cap) {
            uint8_t *q = realloc(p, cap *= 2);
            if (!q) free(p);
            p = q;
        }
    }
    fclose(f);
    *n = len;
    return p;
}

// Writes n bytes to path; 0 on success, -1 otherwise.
static inline int test_write_file(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(p, 1, n, f) : 0;
    return (fclose(f) == 0 && w == n) ? 0 : -1;
}

// An i32 golden tensor copied out (malloc'd, caller frees), or NULL with a failed check.
static inline int32_t *golden_i32(const SafeTensors *golden, const char *name, int64_t *n) {
    Tensor t;
    if (st_get(golden, name, &t) != AGPT_OK || t.dtype != DT_I32) {
        printf("FAIL missing i32 golden %s: %s\n", name, agpt_last_error());
        test_failed++;
        return NULL;
    }
    *n = tensor_numel(&t);
    int32_t *out = malloc((size_t)*n * sizeof(int32_t));
    memcpy(out, t.data, (size_t)*n * sizeof(int32_t));
    return out;
}

// A token table the goldens store sparsely ("sparse.<name>.rows" i32 ids, "sparse.<name>.values" [n,C] f32)
// rebuilt whole: [V,C] f32, zero rows elsewhere (calloc'd, caller frees; *C its width). NULL when the parts are
// missing or an id is out of range.
static inline float *dense_table(const SafeTensors *st, const char *name, int64_t V, int64_t *C) {
    char rn[160], vn[160];
    snprintf(rn, sizeof rn, "sparse.%s.rows", name);
    snprintf(vn, sizeof vn, "sparse.%s.values", name);
    Tensor rows, values;
    if (st_get(st, rn, &rows) != AGPT_OK || st_get(st, vn, &values) != AGPT_OK || rows.dtype != DT_I32 ||
        values.dtype != DT_F32 || values.ndim != 2 || values.shape[0] != rows.shape[0])
        return NULL;
    *C = values.shape[1];
    float *table = calloc((size_t)(V * *C), sizeof(float));
    for (int64_t r = 0; table && r < rows.shape[0]; r++) {
        int32_t id;
        memcpy(&id, (const char *)rows.data + r * 4, 4);
        if (id < 0 || id >= V) {
            free(table);
            return NULL;
        }
        memcpy(table + (size_t)id * *C, (const char *)values.data + r * *C * 4, (size_t)*C * 4);
    }
    return table;
}