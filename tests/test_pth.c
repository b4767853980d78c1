// Tests for runtime/pth (torch.save checkpoints): every golden file written by torch.save is read exactly
// (tests/data/pth/expected.json, from tests/reference/make_pth_goldens.py, gives every tensor's storage type,
// shape, strides, offset and values); hostile files (os.system, builtins.eval, an unknown opcode, big-endian,
// legacy format, truncated) are refused with a message; and a corrupt corpus (every truncation length, a few
// thousand random byte flips) gives an error with a message or a file whose every tensor can be read, never
// a crash. Exits 77 when the golden files are missing.
#define _POSIX_C_SOURCE 200809L

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/pth.h"
#include "tests/test.h"

static const char *data_path(const char *name) {
    static char bufs[4][512];
    static int next;
    char *buf = bufs[next++ % 4];
    snprintf(buf, sizeof bufs[0], "%s/pth/%s", AGPT_TEST_DATA, name);
    return buf;
}

static uint8_t *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(len > 0 ? (size_t)len + 1 : 1);
    *n = fread(p, 1, (size_t)len, f);
    p[*n] = 0;
    fclose(f);
    return p;
}

// Element k of a row-major copy, as a double, by torch storage type.
static double element(const char *type, const uint8_t *p, int64_t k) {
    if (strcmp(type, "FloatStorage") == 0) { float v; memcpy(&v, p + 4 * k, 4); return v; }
    if (strcmp(type, "DoubleStorage") == 0) { double v; memcpy(&v, p + 8 * k, 8); return v; }
    if (strcmp(type, "HalfStorage") == 0) { uint16_t v; memcpy(&v, p + 2 * k, 2); return f16_to_f32(v); }
    if (strcmp(type, "BFloat16Storage") == 0) { uint16_t v; memcpy(&v, p + 2 * k, 2); return bf16_to_f32(v); }
    if (strcmp(type, "LongStorage") == 0) { int64_t v; memcpy(&v, p + 8 * k, 8); return (double)v; }
    if (strcmp(type, "IntStorage") == 0) { int32_t v; memcpy(&v, p + 4 * k, 4); return v; }
    if (strcmp(type, "ShortStorage") == 0) { int16_t v; memcpy(&v, p + 2 * k, 2); return v; }
    if (strcmp(type, "CharStorage") == 0) return (int8_t)p[k];
    return p[k];  // Byte, Bool
}

// Checks one opened file against its expectations: the same names, and each tensor exactly.
static void check_file(const char *label, const PthFile *f, const cJSON *want) {
    CHECK(pth_count(f) == cJSON_GetArraySize(want), "%s: %d tensors, expected %d", label, pth_count(f),
          cJSON_GetArraySize(want));
    for (const cJSON *w = want->child; w; w = w->next) {
        int i = pth_find(f, w->string);
        CHECK(i >= 0, "%s: tensor '%s' missing", label, w->string);
        if (i < 0) continue;
        CHECK(strcmp(pth_name(f, i), w->string) == 0, "%s: pth_name(%d) = %s", label, i, pth_name(f, i));
        PthTensorInfo info;
        CHECK_OK(pth_info(f, i, &info));
        const char *type = cJSON_GetObjectItem(w, "storage")->valuestring;
        CHECK(strcmp(info.storage_type, type) == 0, "%s/%s: storage %s, expected %s", label, w->string,
              info.storage_type, type);
        const cJSON *shape = cJSON_GetObjectItem(w, "shape"), *stride = cJSON_GetObjectItem(w, "stride");
        bool geometry = info.ndim == cJSON_GetArraySize(shape);
        for (int d = 0; geometry && d < info.ndim; d++)
            geometry = info.shape[d] == (int64_t)cJSON_GetArrayItem(shape, d)->valuedouble &&
                       info.stride[d] == (int64_t)cJSON_GetArrayItem(stride, d)->valuedouble;
        CHECK(geometry, "%s/%s: shape or strides differ from torch's", label, w->string);
        CHECK(info.storage_offset == (int64_t)cJSON_GetObjectItem(w, "offset")->valuedouble,
              "%s/%s: storage offset %lld", label, w->string, (long long)info.storage_offset);
        CHECK(info.contiguous == cJSON_IsTrue(cJSON_GetObjectItem(w, "contiguous")), "%s/%s: contiguous %d",
              label, w->string, info.contiguous);
        CHECK(info.parameter == cJSON_IsTrue(cJSON_GetObjectItem(w, "parameter")), "%s/%s: parameter %d", label,
              w->string, info.parameter);

        const cJSON *values = cJSON_GetObjectItem(w, "values");
        CHECK(info.numel == cJSON_GetArraySize(values), "%s/%s: numel %lld", label, w->string,
              (long long)info.numel);
        uint8_t *buf = malloc(info.nbytes + 1);
        CHECK_OK(pth_copy_contiguous(f, i, buf, info.nbytes));
        int64_t bad = -1, k = 0;
        for (const cJSON *v = values->child; v && k < info.numel; v = v->next, k++)
            if (element(type, buf, k) != v->valuedouble && bad < 0) bad = k;
        CHECK(bad < 0, "%s/%s: element %lld is %.9g, torch has %.9g", label, w->string, (long long)bad,
              bad >= 0 ? element(type, buf, bad) : 0.0, bad >= 0 ? cJSON_GetArrayItem(values, (int)bad)->valuedouble : 0.0);
        if (info.contiguous && info.nbytes)
            CHECK(memcmp(buf, info.data, info.nbytes) == 0, "%s/%s: the view and the copy differ", label, w->string);
        free(buf);

        // pth_get: a view exactly when supported; a message naming the tensor otherwise.
        Tensor t;
        bool want_supported = info.dtype >= 0 && info.contiguous && info.ndim <= TENSOR_MAX_DIMS;
        CHECK(info.supported == want_supported, "%s/%s: supported %d", label, w->string, info.supported);
        if (info.supported) {
            CHECK_OK(pth_get(f, w->string, &t));
            CHECK(t.data == info.data && (int)t.dtype == info.dtype && t.ndim == info.ndim &&
                      tensor_nbytes(&t) == info.nbytes,
                  "%s/%s: pth_get disagrees with pth_info", label, w->string);
        } else {
            agpt_clear_error();
            Status s = pth_get(f, w->string, &t);
            CHECK(s == AGPT_ERR_UNSUPPORTED && strstr(agpt_last_error(), w->string),
                  "%s/%s: pth_get of an unsupported tensor gives %s: %s", label, w->string, agpt_status_name(s),
                  agpt_last_error());
        }
    }
}

// Opens path, fails expecting a message containing `needle`.
static void check_refused(const char *name, const char *needle) {
    PthFile *f = (PthFile *)1;
    agpt_clear_error();
    Status s = pth_open(data_path(name), &f);
    CHECK(s != AGPT_OK && f == NULL && strstr(agpt_last_error(), needle),
          "%s should be refused with a message containing '%s'; got %s: %s", name, needle, agpt_status_name(s),
          agpt_last_error());
    printf("  %-22s -> %s\n", name, agpt_last_error());
}

static volatile uint8_t sink;

// A file that opened must be wholly readable: touch every tensor's bytes and copy the small ones.
static void touch_all(const PthFile *f) {
    for (int i = 0; i < pth_count(f); i++) {
        PthTensorInfo info;
        if (pth_info(f, i, &info) != AGPT_OK || pth_find(f, info.name) < 0) {
            test_failed++;
            printf("FAIL: tensor %d of an opened file cannot be described\n", i);
            continue;
        }
        const uint8_t *p = info.data;
        if (info.span_nbytes) sink = p[0], sink = p[info.span_nbytes - 1];
        if (info.nbytes <= (1 << 20)) {
            uint8_t *buf = malloc(info.nbytes + 1);
            if (pth_copy_contiguous(f, i, buf, info.nbytes) != AGPT_OK) {
                test_failed++;
                printf("FAIL: tensor %d of an opened file cannot be copied: %s\n", i, agpt_last_error());
            }
            free(buf);
        }
        Tensor t;
        if (pth_get(f, info.name, &t) == AGPT_OK && pth_find(f, info.name) == i && t.data != info.data) {
            test_failed++;
            printf("FAIL: pth_get and pth_info disagree on tensor %d\n", i);
        }
    }
}

// One corrupt buffer: an exact-size copy (so ASan sees reads past its end) must open or fail with a message.
static int try_buffer(const uint8_t *p, size_t n) {
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, p, n);
    PthFile *f = NULL;
    agpt_clear_error();
    Status s = pth_open_memory(copy, n, &f);
    int bad = 0;
    if (s == AGPT_OK) {
        touch_all(f);
        pth_close(f);
    } else if (agpt_last_error()[0] == 0 || f != NULL) {
        bad = 1;
    }
    free(copy);
    return bad;
}

static void corrupt_corpus(const char *name, int flips, uint64_t seed) {
    size_t n;
    uint8_t *p = read_file(data_path(name), &n);
    CHECK(p != NULL, "cannot read %s", name);
    if (!p) return;
    int bad = 0, opened = 0;
    for (size_t len = 0; len < n; len++) bad += try_buffer(p, len);
    CHECK(bad == 0, "%s: %d truncations failed without a message", name, bad);
    uint8_t *q = malloc(n);
    bad = 0;
    uint64_t x = seed;
    for (int it = 0; it < flips; it++) {
        memcpy(q, p, n);
        int k = 1 + it % 4;
        for (int j = 0; j < k; j++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = (size_t)(x >> 33) % n;
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            q[at] = (it & 1) ? (uint8_t)(x >> 56) : (uint8_t)(q[at] ^ (1u << ((x >> 60) & 7)));
        }
        PthFile *f = NULL;
        if (pth_open_memory(q, n, &f) == AGPT_OK) opened++, pth_close(f);
        bad += try_buffer(q, n);
    }
    CHECK(bad == 0, "%s: %d byte-flipped files failed without a message", name, bad);
    printf("  %-22s %zu truncations, %d flipped files (%d still opened): no crash\n", name, n, flips, opened);
    free(q);
    free(p);
}


// ---------------------------------------------------------------------------------------------------------
// Hand-built pickles, wrapped in a zip with storages archive/data/0 (16 floats 0..15): the cases no torch
// writes (too many dims, overflowing geometry, cycles, deep nesting, duplicate names).

typedef struct Pkl {
    uint8_t b[8192];
    size_t n;
} Pkl;

static void emit(Pkl *p, const void *bytes, size_t n) {
    if (p->n + n <= sizeof p->b) memcpy(p->b + p->n, bytes, n);
    p->n += n;
}
static void emit_s(Pkl *p, const char *s) { emit(p, s, strlen(s)); }
static void emit_str(Pkl *p, const char *s) {  // BINUNICODE
    uint32_t n = (uint32_t)strlen(s);
    uint8_t h[5] = {'X', (uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
    emit(p, h, 5);
    emit(p, s, n);
}
static void emit_int(Pkl *p, int64_t v) {  // LONG1 of 8 bytes
    uint8_t h[10] = {0x8a, 8};
    for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)v >> (8 * i));
    emit(p, h, 10);
}
// _rebuild_tensor_v2 of storage 0 (16 floats) with the given geometry; leaves the tensor on the stack.
static void emit_tensor(Pkl *p, int64_t offset, int ndim, const int64_t *shape, const int64_t *stride) {
    emit_s(p, "ctorch._utils\n_rebuild_tensor_v2\n((");
    emit_str(p, "storage");
    emit_s(p, "ctorch\nFloatStorage\n");
    emit_str(p, "0");
    emit_str(p, "cpu");
    emit_int(p, 16);
    emit_s(p, "tQ");
    emit_int(p, offset);
    emit_s(p, "(");
    for (int d = 0; d < ndim; d++) emit_int(p, shape[d]);
    emit_s(p, "t(");
    for (int d = 0; d < ndim; d++) emit_int(p, stride[d]);
    emit_s(p, "t\x89}tR");
}

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v), put16(p + 2, v >> 16); }

// A STORED zip of archive/data.pkl and archive/data/0, malloc'd at its exact size.
static uint8_t *zip_pickle(const Pkl *pkl, size_t *out_len) {
    static float storage[16];
    for (int i = 0; i < 16; i++) storage[i] = (float)i;
    const char *names[2] = {"archive/data.pkl", "archive/data/0"};
    const void *datas[2] = {pkl->b, storage};
    size_t sizes[2] = {pkl->n, sizeof storage}, offsets[2], total = 22;
    for (int i = 0; i < 2; i++) total += 30 + 46 + 2 * strlen(names[i]) + sizes[i];
    uint8_t *z = calloc(1, total), *p = z;
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(names[i]);
        offsets[i] = (size_t)(p - z);
        put32(p, 0x04034b50), put32(p + 18, (uint32_t)sizes[i]), put32(p + 22, (uint32_t)sizes[i]);
        put16(p + 26, (uint32_t)n);
        memcpy(p + 30, names[i], n);
        memcpy(p + 30 + n, datas[i], sizes[i]);
        p += 30 + n + sizes[i];
    }
    size_t cd = (size_t)(p - z);
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(names[i]);
        put32(p, 0x02014b50), put32(p + 20, (uint32_t)sizes[i]), put32(p + 24, (uint32_t)sizes[i]);
        put16(p + 28, (uint32_t)n), put32(p + 42, (uint32_t)offsets[i]);
        memcpy(p + 46, names[i], n);
        p += 46 + n;
    }
    put32(p, 0x06054b50), put16(p + 8, 2), put16(p + 10, 2);
    put32(p + 12, (uint32_t)((size_t)(p - z) - cd)), put32(p + 16, (uint32_t)cd);
    *out_len = total;
    return z;
}

// Opens a hand-built pickle: expects success (needle NULL) or a refusal whose message contains needle.
static PthFile *open_pickle(const char *label, const Pkl *pkl, const char *needle, uint8_t **keep) {
    size_t n;
    uint8_t *z = zip_pickle(pkl, &n);
    PthFile *f = NULL;
    agpt_clear_error();
    Status s = pth_open_memory(z, n, &f);
    if (needle) {
        CHECK(s != AGPT_OK && strstr(agpt_last_error(), needle), "%s: should be refused with '%s'; got %s: %s",
              label, needle, agpt_status_name(s), agpt_last_error());
        printf("  %-22s -> %s\n", label, agpt_last_error());
        free(z);
        return NULL;
    }
    CHECK(s == AGPT_OK, "%s: %s", label, agpt_last_error());
    *keep = z;
    return f;
}

static void hand_built_pickles(void) {
    Pkl p;
    uint8_t *keep = NULL;
    int64_t one[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, two[1] = {2}, zero[1] = {0};

    p.n = 0;  // 9 dims: more than PTH_MAX_DIMS
    emit_s(&p, "\x80\x02}");
    emit_str(&p, "t");
    emit_tensor(&p, 0, 9, one, one);
    emit_s(&p, "s.");
    open_pickle("9 dims", &p, "9 dims", NULL);

    p.n = 0;  // sizes whose product overflows 64 bits
    int64_t big[3] = {(int64_t)1 << 40, (int64_t)1 << 40, (int64_t)1 << 40}, s1[3] = {0, 0, 0};
    emit_s(&p, "\x80\x02}");
    emit_str(&p, "t");
    emit_tensor(&p, 0, 3, big, s1);
    emit_s(&p, "s.");
    open_pickle("numel overflow", &p, "overflow", NULL);

    p.n = 0;  // two elements from offset 15 of 16: the second is outside the storage
    emit_s(&p, "\x80\x02}");
    emit_str(&p, "t");
    emit_tensor(&p, 15, 1, two, one);
    emit_s(&p, "s.");
    open_pickle("past the storage", &p, "addresses element 16", NULL);

    p.n = 0;  // stride 0 (an expanded tensor): valid, not contiguous, copied element by element
    emit_s(&p, "\x80\x02}(");
    emit_str(&p, "t");
    emit_tensor(&p, 15, 1, two, zero);
    emit_str(&p, "t");  // the same name again: pth_find returns the first
    emit_tensor(&p, 3, 1, two, one);
    emit_s(&p, "\x80\x02");  // a repeated PROTO is harmless
    emit_s(&p, "u.");
    PthFile *f = open_pickle("stride 0", &p, NULL, &keep);
    if (f) {
        PthTensorInfo info;
        float v[2] = {0, 0};
        CHECK(pth_count(f) == 2 && pth_find(f, "t") == 0, "duplicate names: pth_find should return the first");
        CHECK_OK(pth_info(f, 0, &info));
        CHECK(!info.contiguous && !info.supported && info.span_nbytes == 4 && info.nbytes == 8,
              "stride 0: contiguous %d supported %d span %zu nbytes %zu", info.contiguous, info.supported,
              info.span_nbytes, info.nbytes);
        CHECK_OK(pth_copy_contiguous(f, 0, v, sizeof v));
        CHECK(v[0] == 15 && v[1] == 15, "stride 0 copy gives %g %g", v[0], v[1]);
        Tensor t;
        CHECK(pth_get(f, "t", &t) == AGPT_ERR_UNSUPPORTED, "pth_get of a stride-0 tensor should be unsupported");
        pth_close(f);
    }
    free(keep);

    p.n = 0;  // a dict that holds itself, and a tensor: the walk visits it once
    emit_s(&p, "\x80\x02}");
    emit(&p, "q\0", 2);
    emit_str(&p, "self");
    emit(&p, "h\0s", 3);
    emit_str(&p, "t");
    emit_tensor(&p, 0, 1, two, one);
    emit_s(&p, "s.");
    keep = NULL;
    f = open_pickle("cyclic dict", &p, NULL, &keep);
    if (f) CHECK(pth_count(f) == 1 && pth_find(f, "t") == 0, "cyclic dict: %d tensors", pth_count(f));
    pth_close(f);
    free(keep);

    p.n = 0;  // dicts nested 70 deep
    emit_s(&p, "\x80\x02");
    for (int i = 0; i < 70; i++) emit_s(&p, "}"), emit_str(&p, "k");
    emit_s(&p, "}");
    for (int i = 0; i < 70; i++) emit_s(&p, "s");
    emit_s(&p, ".");
    open_pickle("nested 70 deep", &p, "nested more than", NULL);

    p.n = 0;  // protocol 4 STACK_GLOBAL of posix.system
    emit_s(&p, "\x80\x04\x8c\x05posix\x8c\x06system\x93");
    open_pickle("posix.system", &p, "'posix.system'", NULL);

    p.n = 0;  // a memo index no pickle of this size can reach
    emit_s(&p, "\x80\x02}r\xff\xff\xff\x7f.");
    open_pickle("huge memo index", &p, "memo index", NULL);

    p.n = 0;
    emit_s(&p, "\x80\x02h\x05.");
    open_pickle("unset memo entry", &p, "never stored", NULL);

    p.n = 0;
    emit_s(&p, "\x80\x02}");
    open_pickle("no STOP", &p, "without STOP", NULL);

    p.n = 0;
    emit_s(&p, "\x80\x02].");
    open_pickle("root is a list", &p, "not a dict", NULL);

    p.n = 0;  // a persistent id naming a storage the archive lacks
    emit_s(&p, "\x80\x02}");
    emit_str(&p, "t");
    emit_s(&p, "(");
    emit_str(&p, "storage");
    emit_s(&p, "ctorch\nHalfStorage\n");
    emit_str(&p, "7");
    emit_str(&p, "cpu");
    emit_s(&p, "K\x01tQs.");
    open_pickle("missing storage", &p, "no entry archive/data/7", NULL);
}

int main(void) {
    size_t json_len;
    char *json = (char *)read_file(data_path("expected.json"), &json_len);
    if (!json) {
        printf("skipped: %s missing; run tests/reference/make_pth_goldens.py\n", data_path("expected.json"));
        return TEST_SKIP;
    }
    cJSON *expected = cJSON_Parse(json);
    free(json);
    CHECK(expected != NULL, "expected.json does not parse");
    if (!expected) return test_summary();

    // Goldens written by torch.save, read from the file and from memory.
    for (const cJSON *e = expected->child; e; e = e->next) {
        if (e->string[0] == '_') continue;
        PthFile *f = NULL;
        CHECK_OK(pth_open(data_path(e->string), &f));
        if (!f) continue;
        check_file(e->string, f, e);
        printf("  %-22s %d tensors read exactly\n", e->string, pth_count(f));
        pth_close(f);
        size_t n;
        uint8_t *buf = read_file(data_path(e->string), &n);
        CHECK_OK(pth_open_memory(buf, n, &f));
        if (f) check_file(e->string, f, e), pth_close(f);
        free(buf);
    }
    // Re-packed archives of basic.pt: ZIP64 records throughout, and DEFLATEd entries.
    const cJSON *basic = cJSON_GetObjectItem(expected, "basic.pt");
    const char *repacked[] = {"zip64.pt", "deflated.pt"};
    for (int r = 0; r < 2; r++) {
        PthFile *f = NULL;
        CHECK_OK(pth_open(data_path(repacked[r]), &f));
        if (f) check_file(repacked[r], f, basic), pth_close(f);
        printf("  %-22s read as basic.pt\n", repacked[r]);
    }

    // Details the expectations do not spell out: pickle order, shared storages, nesting, names.
    PthFile *f = NULL;
    CHECK_OK(pth_open(data_path("basic.pt"), &f));
    if (f) {
        CHECK(pth_count(f) > 0 && strcmp(pth_name(f, 0), "f32") == 0, "tensors are not in pickle order");
        PthTensorInfo view, whole;
        CHECK_OK(pth_info(f, pth_find(f, "view"), &view));
        CHECK_OK(pth_info(f, pth_find(f, "whole"), &whole));
        CHECK(view.storage == whole.storage && view.data == (const uint8_t *)whole.data + 2 * 4 &&
                  view.nbytes == 12 && whole.storage_nbytes == 40,
              "view and whole should share one storage, view starting 2 floats in");
        CHECK(pth_find(f, "nope") == -1 && pth_name(f, -1) == NULL && pth_name(f, pth_count(f)) == NULL,
              "absent names and indices");
        Tensor t;
        CHECK_ERR(pth_get(f, "nope", &t));
        PthTensorInfo info;
        CHECK_ERR(pth_info(f, pth_count(f), &info));
        CHECK_OK(pth_info(f, pth_find(f, "f32"), &info));
        uint8_t small[4];
        CHECK_ERR(pth_copy_contiguous(f, pth_find(f, "f32"), small, sizeof small));
        pth_close(f);
    }
    CHECK_OK(pth_open(data_path("wrapped.pt"), &f));
    if (f) {
        CHECK(pth_count(f) == 3 && pth_find(f, "model.w") == 0 && pth_find(f, "model.tagged") == 1 &&
                  pth_find(f, "7.x") == 2,
              "wrapped.pt should give model.w, model.tagged and 7.x (an int key), in that order");
        pth_close(f);
    }

    // Refused with a message that says why.
    check_refused("hostile_os_system.pt", "os.system");
    check_refused("hostile_eval.pt", "builtins.eval");
    check_refused("hostile_opcode.pt", "opcode 0x32");
    check_refused("big_endian.pt", "byteorder is 'big'");
    check_refused("legacy.pt", "legacy torch format");
    check_refused("truncated.pt", "truncated");
    check_refused("no_such_file.pt", "check the path");
    check_refused("", "not a regular file");
    check_refused("expected.json", "not a zip archive");
    CHECK_ERR(pth_open_memory(NULL, 0, &f));
    CHECK_ERR(pth_open_memory("PK\3\4", 4, &f));
    CHECK(pth_count(NULL) == 0 && pth_find(NULL, "x") == -1, "NULL handles");
    pth_close(NULL);

    hand_built_pickles();

    // The corrupt corpus: nothing may crash, and every refusal carries a message.
    corrupt_corpus("params.pt", 3000, 1);
    corrupt_corpus("wrapped.pt", 1000, 2);
    corrupt_corpus("basic_proto4.pt", 1000, 3);
    corrupt_corpus("zip64.pt", 1000, 4);
    corrupt_corpus("deflated.pt", 1000, 5);

    cJSON_Delete(expected);
    return test_summary();
}
