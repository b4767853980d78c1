// Tests for runtime/safetensors: a write/read roundtrip, a corpus of corrupt headers that must each be refused
// with a message, truncation at every length, a few thousand random byte flips, and the writer's promise that
// a failed write leaves the previous file intact. Prints "N passed, M failed"; exit status 0 only when all pass.
#define _POSIX_C_SOURCE 200809L  // mkdtemp, strdup

#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/safetensors.h"

static int passed, failed;

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (cond) {                                             \
            passed++;                                           \
        } else {                                                \
            failed++;                                           \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
        }                                                       \
    } while (0)

static char tmp_dir[64];

// A path in the temporary directory. Several may be alive at once, so the buffers rotate.
static const char *tmp_path(const char *name) {
    static char bufs[8][256];
    static int next;
    char *buf = bufs[next++ % 8];
    snprintf(buf, sizeof bufs[0], "%s/%.180s", tmp_dir, name);
    return buf;
}

static int write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(p, 1, n, f) : 0;
    return (fclose(f) == 0 && w == n) ? 0 : -1;
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(len > 0 ? (size_t)len : 1);
    *n = fread(p, 1, (size_t)len, f);
    fclose(f);
    return p;
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

// A file image: 8-byte length field, header text, then data_len bytes of a known pattern. The buffer is
// malloc'd at its exact size so the address sanitizer sees any read past the end.
typedef struct Buf {
    uint8_t *p;
    size_t n;
} Buf;

static Buf make_raw(uint64_t length_field, const char *header, size_t header_len, size_t data_len) {
    Buf b = {.n = 8 + header_len + data_len};
    b.p = malloc(b.n);
    for (int i = 0; i < 8; i++) b.p[i] = (uint8_t)(length_field >> (8 * i));
    memcpy(b.p + 8, header, header_len);
    for (size_t i = 0; i < data_len; i++) b.p[8 + header_len + i] = (uint8_t)(i * 7 + 1);
    return b;
}

static Buf make_file(const char *header, size_t data_len) {
    return make_raw(strlen(header), header, strlen(header), data_len);
}

// The header must be refused at open, with a message, without a crash.
static void expect_bad_buf(Buf b, const char *what) {
    agpt_clear_error();
    SafeTensors *st = (SafeTensors *)1;
    Status s = st_open_memory(b.p, b.n, &st);
    CHECK(s != AGPT_OK && st == NULL && agpt_last_error()[0] != 0, "%s: expected an error, got %s", what,
          agpt_status_name(s));
    if (s == AGPT_OK) st_close(st);
    free(b.p);
}

static void expect_bad(const char *header, size_t data_len, const char *what) {
    expect_bad_buf(make_file(header, data_len), what);
}

// The file must open, and the header's message, when refused, must contain `needle`.
static void expect_bad_msg(const char *header, size_t data_len, const char *needle) {
    Buf b = make_file(header, data_len);
    SafeTensors *st = NULL;
    Status s = st_open_memory(b.p, b.n, &st);
    CHECK(s != AGPT_OK && strstr(agpt_last_error(), needle), "expected an error containing \"%s\", got %s: %s",
          needle, agpt_status_name(s), agpt_last_error());
    st_close(st);
    free(b.p);
}

static SafeTensors *expect_open(Buf b, const char *what) {
    SafeTensors *st = NULL;
    Status s = st_open_memory(b.p, b.n, &st);
    CHECK(s == AGPT_OK, "%s: expected to open, got %s", what, agpt_last_error());
    return st;
}

// The file opens, but st_get on `name` must fail with `want`.
static void expect_get_fails(const char *header, size_t data_len, const char *name, Status want) {
    Buf b = make_file(header, data_len);
    SafeTensors *st = expect_open(b, header);
    if (st) {
        Tensor t;
        agpt_clear_error();
        Status s = st_get(st, name, &t);
        CHECK(s == want && agpt_last_error()[0], "st_get '%s' in %s: expected %s, got %s (%s)", name, header,
              agpt_status_name(want), agpt_status_name(s), agpt_last_error());
        st_close(st);
    }
    free(b.p);
}

// ---------------------------------------------------------------------------------------------------------

static void test_roundtrip(void) {
    float f32[6] = {1, -2, 3.5f, 1e30f, -0.0f, 7};
    uint16_t f16[5] = {0x3c00, 0xc000, 0x7c00, 0x0001, 0x8000};
    uint16_t bf16[8] = {0x3f80, 0x4000, 0x4040, 0x4080, 0xbf80, 0xc000, 0x7f80, 0xff80};
    int32_t i32[4] = {-1, 0, 2147483647, -2147483647 - 1};
    uint8_t u8[7] = {0, 1, 2, 3, 250, 255, 128};
    float one[1] = {42};
    float scalar[1] = {-3};
    const char *weird = "w\"eird \\ name\n\x01 \xc3\xa9";  // quote, backslash, newline, control byte, UTF-8
    StEntry e[] = {
        {"u8", tensor_1d(u8, DT_U8, DEV_CPU, 7)},  // odd size first: the writer must still align the rest
        {"a.f32", tensor_2d(f32, DT_F32, DEV_CPU, 2, 3)},
        {"b.f16", tensor_1d(f16, DT_F16, DEV_CPU, 5)},
        {"c.bf16", tensor_3d(bf16, DT_BF16, DEV_CPU, 2, 2, 2)},
        {"d.i32", tensor_4d(i32, DT_I32, DEV_CPU, 1, 1, 1, 4)},
        {"empty", tensor_2d(NULL, DT_F32, DEV_CPU, 0, 3)},
        {"one", tensor_1d(one, DT_F32, DEV_CPU, 1)},
        {"scalar", tensor_make(scalar, DT_F32, DEV_CPU, 0, NULL)},
        {weird, tensor_1d(one, DT_F32, DEV_CPU, 1)},
    };
    int n = (int)(sizeof e / sizeof e[0]);
    char *long_value = malloc(20001);
    for (int i = 0; i < 20000; i++) long_value[i] = "ab\"\\\n{}x"[i % 8];
    long_value[20000] = 0;
    const char *meta[] = {"format", "agpt-1", "config", "{\"dim\": 64}", "long", long_value, "empty", ""};
    const char *path = tmp_path("rt.safetensors");

    Status s = st_write(path, e, n, meta, 4);
    CHECK(s == AGPT_OK, "st_write: %s", agpt_last_error());
    CHECK(!file_exists(tmp_path("rt.safetensors.tmp")), "the .tmp file is left behind");

    SafeTensors *st = NULL;
    s = st_open(path, &st);
    CHECK(s == AGPT_OK, "st_open: %s", agpt_last_error());
    if (!st) {
        free(long_value);
        return;
    }
    CHECK(st_count(st) == n, "count %d, want %d", st_count(st), n);
    for (int i = 0; i < n; i++) {
        // Tensors are listed in the order given.
        CHECK(st_name(st, i) && strcmp(st_name(st, i), e[i].name) == 0, "name %d is %s", i, st_name(st, i));
        CHECK(st_find(st, e[i].name) == i, "st_find %s = %d", e[i].name, st_find(st, e[i].name));
        Tensor t;
        s = st_get(st, e[i].name, &t);
        CHECK(s == AGPT_OK, "st_get %s: %s", e[i].name, agpt_last_error());
        if (s != AGPT_OK) continue;
        CHECK(t.dtype == e[i].tensor.dtype && t.device == DEV_CPU && tensor_same_shape(&t, &e[i].tensor),
              "tensor %s has the wrong dtype or shape", e[i].name);
        size_t nb = tensor_nbytes(&e[i].tensor);
        CHECK(nb == 0 || memcmp(t.data, e[i].tensor.data, nb) == 0, "tensor %s data differ", e[i].name);
        CHECK((uintptr_t)t.data % dtype_size(t.dtype) == 0, "tensor %s is not aligned to its element size",
              e[i].name);
    }
    CHECK(st_name(st, n) == NULL && st_name(st, -1) == NULL, "st_name out of range is not NULL");
    CHECK(st_find(st, "nope") == -1, "st_find of an absent name");
    StInfo info;
    CHECK(st_info(st, 0, &info) == AGPT_OK && info.supported && strcmp(info.dtype, "U8") == 0 &&
              info.nbytes == 7 && info.ndim == 1 && info.shape[0] == 7,
          "st_info of u8");
    CHECK(st_info(st, n, &info) == AGPT_ERR_ARG, "st_info out of range");

    CHECK(st_metadata_count(st) == 4, "metadata count %d", st_metadata_count(st));
    for (int i = 0; i < 4; i++) {
        CHECK(st_metadata_key(st, i) && strcmp(st_metadata_key(st, i), meta[2 * i]) == 0, "metadata key %d", i);
        const char *v = st_metadata(st, meta[2 * i]);
        CHECK(v && strcmp(v, meta[2 * i + 1]) == 0, "metadata '%s' value differs", meta[2 * i]);
    }
    CHECK(st_metadata(st, "absent") == NULL && st_metadata_key(st, 4) == NULL, "absent metadata is not NULL");

    Tensor t;
    s = st_get(st, "a.f33", &t);
    const char *msg = agpt_last_error();
    CHECK(s == AGPT_ERR_ARG && strstr(msg, "'a.f33' not found") && strstr(msg, path) && strstr(msg, "'a.f32'"),
          "not-found message: %s", msg);
    st_close(st);

    // The layout the official reader demands: data starts 64-aligned, and tensors fill it without gaps.
    size_t len;
    uint8_t *bytes = read_bytes(path, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
    size_t total = 0;
    for (int i = 0; i < n; i++) total += tensor_nbytes(&e[i].tensor);
    CHECK((8 + hlen) % 64 == 0, "data section starts at %llu, not 64-aligned", (unsigned long long)(8 + hlen));
    CHECK(len == 8 + hlen + total, "file is %zu bytes, want %llu (no gaps, no trailing bytes)", len,
          (unsigned long long)(8 + hlen + total));
    free(bytes);

    // No metadata pairs: no "__metadata__" at all. Zero tensors is a valid file too.
    s = st_write(path, NULL, 0, NULL, 0);
    CHECK(s == AGPT_OK, "st_write of nothing: %s", agpt_last_error());
    s = st_open(path, &st);
    CHECK(s == AGPT_OK && st_count(st) == 0 && st_metadata_count(st) == 0, "empty file: %s", agpt_last_error());
    st_close(st);
    free(long_value);
}

static void test_writer_errors(void) {
    float x[4] = {1, 2, 3, 4};
    const char *path = tmp_path("w.safetensors");
    StEntry good = {"x", tensor_1d(x, DT_F32, DEV_CPU, 4)};
    CHECK(st_write(path, &good, 1, NULL, 0) == AGPT_OK, "st_write: %s", agpt_last_error());
    size_t old_len;
    uint8_t *old = read_bytes(path, &old_len);

    StEntry dup[2] = {good, good};
    CHECK(st_write(path, dup, 2, NULL, 0) == AGPT_ERR_ARG, "duplicate names accepted");
    StEntry cuda = {"x", tensor_1d(x, DT_F32, DEV_CUDA, 4)};
    CHECK(st_write(path, &cuda, 1, NULL, 0) == AGPT_ERR_ARG, "CUDA tensor accepted");
    StEntry reserved = {"__metadata__", good.tensor};
    CHECK(st_write(path, &reserved, 1, NULL, 0) == AGPT_ERR_ARG, "__metadata__ as a name accepted");
    StEntry noname = {"", good.tensor};
    CHECK(st_write(path, &noname, 1, NULL, 0) == AGPT_ERR_ARG, "empty name accepted");
    StEntry badutf = {"\xff", good.tensor};
    CHECK(st_write(path, &badutf, 1, NULL, 0) == AGPT_ERR_ARG, "invalid UTF-8 name accepted");
    StEntry nodata = {"x", tensor_1d(NULL, DT_F32, DEV_CPU, 4)};
    CHECK(st_write(path, &nodata, 1, NULL, 0) == AGPT_ERR_ARG, "NULL data accepted");
    StEntry neg = {"x", tensor_1d(x, DT_F32, DEV_CPU, -1)};
    CHECK(st_write(path, &neg, 1, NULL, 0) == AGPT_ERR_ARG, "negative dim accepted");
    const char *dupmeta[] = {"k", "1", "k", "2"};
    CHECK(st_write(path, &good, 1, dupmeta, 2) == AGPT_ERR_ARG, "duplicate metadata keys accepted");
    const char *nullmeta[] = {"k", NULL};
    CHECK(st_write(path, &good, 1, nullmeta, 1) == AGPT_ERR_ARG, "NULL metadata value accepted");
    CHECK(st_write(tmp_path("no/such/dir/w.safetensors"), &good, 1, NULL, 0) == AGPT_ERR_IO &&
              strstr(agpt_last_error(), "no/such/dir"),
          "missing directory: %s", agpt_last_error());

    // A write that fails midway (here: the file size limit, as a full disk would) must leave the old file.
    float *big = calloc(65536, sizeof *big);
    StEntry huge = {"big", tensor_1d(big, DT_F32, DEV_CPU, 65536)};
    struct rlimit saved, small;
    getrlimit(RLIMIT_FSIZE, &saved);
    small = saved;
    small.rlim_cur = 4096;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);  // get EFBIG from write(), not a killed process
    setrlimit(RLIMIT_FSIZE, &small);
    Status s = st_write(path, &huge, 1, NULL, 0);
    setrlimit(RLIMIT_FSIZE, &saved);
    signal(SIGXFSZ, old_handler);
    CHECK(s == AGPT_ERR_IO && agpt_last_error()[0], "a failing write returned %s", agpt_status_name(s));
    CHECK(!file_exists(tmp_path("w.safetensors.tmp")), "a failed write left its .tmp file");
    size_t now_len;
    uint8_t *now = read_bytes(path, &now_len);
    CHECK(now && now_len == old_len && memcmp(now, old, old_len) == 0, "a failed write changed the old file");
    free(now);
    free(big);

    // A stale .tmp from an earlier crash does not block the next write.
    write_bytes(tmp_path("w.safetensors.tmp"), "junk", 4);
    CHECK(st_write(path, &good, 1, NULL, 0) == AGPT_OK, "stale .tmp: %s", agpt_last_error());
    free(old);
}

static void test_open_errors(void) {
    SafeTensors *st = NULL;
    CHECK(st_open(tmp_path("missing.safetensors"), &st) == AGPT_ERR_IO && st == NULL &&
              strstr(agpt_last_error(), "missing.safetensors"),
          "missing file: %s", agpt_last_error());
    CHECK(st_open(tmp_dir, &st) == AGPT_ERR_IO && st == NULL, "directory: %s", agpt_last_error());
    write_bytes(tmp_path("empty.safetensors"), "", 0);
    CHECK(st_open(tmp_path("empty.safetensors"), &st) != AGPT_OK && st == NULL &&
              strstr(agpt_last_error(), "empty"),
          "empty file: %s", agpt_last_error());
    CHECK(st_open_memory(NULL, 0, &st) != AGPT_OK && st == NULL, "NULL buffer");
}

// Corrupt headers: each one must be refused at open.
static void test_corpus(void) {
    const char *V = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
    Buf base = make_file(V, 16);
    st_close(expect_open(base, "the valid base file"));
    free(base.p);

    // Header length field.
    expect_bad_buf(make_raw(0, V, strlen(V), 16), "header length 0");
    expect_bad_buf(make_raw(100000001, V, strlen(V), 16), "header length over 100 MB");
    expect_bad_buf(make_raw(UINT64_MAX, V, strlen(V), 16), "header length 2^64-1");
    expect_bad_buf(make_raw(strlen(V) + 17, V, strlen(V), 16), "header length past the end");
    expect_bad_buf(make_raw(strlen(V) - 1, V, strlen(V), 16), "header length cuts the JSON");
    expect_bad_buf(make_raw(4, "", 0, 0), "header length past an 8-byte file");

    // Not JSON, or not an object, or garbage around it.
    const char *bad_json[] = {
        "{", "}", "{\"a\":}", "[]", "\"x\"", "null", "17", "{} x", "{}}", "{\"a\" \"b\"}", "{\"a\":{\"dtype\"}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}", "{\"a\\", "{\"a\":\"\\",
        "{\"\xff\":1}", "{\"\xc0\xaf\":1}", "{\"\xed\xa0\x80\":1}", "{\"\xf4\x90\x80\x80\":1}", "{\"\xe2\x82\":1}",
        "{\x01}", "{}\x01", "{\"a\x02\":1}", "{\"\\ud800\":1}",
    };
    for (size_t i = 0; i < sizeof bad_json / sizeof bad_json[0]; i++) expect_bad(bad_json[i], 16, bad_json[i]);
    expect_bad_buf(make_raw(3, "{}\0", 3, 0), "a NUL byte after the JSON");
    expect_bad_buf(make_raw(4, "{\"\0\"", 4, 0), "a NUL byte in a string");

    // Bad entries.
    const char *bad_entries[] = {
        "{\"a\":1}",
        "{\"a\":[]}",
        "{\"a\":\"F32\"}",
        "{\"a\":{\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2]}}",
        "{\"a\":{\"dtype\":5,\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":null,\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        // shape
        "{\"a\":{\"dtype\":\"F32\",\"shape\":\"2,2\",\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,\"2\"],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2,-2],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,1.5],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4,1e300],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[9007199254740992],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[9007199254740993],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[true],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[[4]],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,4],\"data_offsets\":[0,16]}}",
        // data_offsets
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":\"0,16\"}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[16,0]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[-1,15]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0.5,16.5]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,\"16\"]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,1e20]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[4,20]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[0,20]}}",
        "{\"a\":{\"dtype\":\"F33\",\"shape\":[2,2],\"data_offsets\":[0,17]}}",
        // size mismatch
        "{\"a\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[4,16]}}",
        "{\"a\":{\"dtype\":\"I32\",\"shape\":[3],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,1]}}",
        "{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}",
        // shape products that overflow 64 bits
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"U8\",\"shape\":[4503599627370496,4503599627370496],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[65536,65536,65536,65536,65536],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F64\",\"shape\":[2147483648,2147483648],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387,4096],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F33\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,16]}}",
        // overlaps and duplicates
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
        "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[11,13]}}",
        "{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[14,16]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
        "\"c\":{\"dtype\":\"U8\",\"shape\":[12],\"data_offsets\":[3,15]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
        // metadata
        "{\"__metadata__\":{\"k\":1},\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}",
        "{\"__metadata__\":{\"k\":null}}",
        "{\"__metadata__\":{\"k\":{\"x\":\"y\"}}}",
        "{\"__metadata__\":{\"k\":[\"v\"]}}",
        "{\"__metadata__\":\"x\"}",
        "{\"__metadata__\":[]}",
        "{\"__metadata__\":{\"k\":\"v\",\"k\":\"w\"}}",
        "{\"__metadata__\":{},\"__metadata__\":{}}",
    };
    for (size_t i = 0; i < sizeof bad_entries / sizeof bad_entries[0]; i++)
        expect_bad(bad_entries[i], 16, bad_entries[i]);

    // Messages say the file, the tensor and what was wrong.
    expect_bad_msg("{\"blocks.0.w\":{\"dtype\":\"F32\",\"shape\":[25],\"data_offsets\":[0,100]}}", 96,
                   "<memory>: tensor 'blocks.0.w' data_offsets [0,100] exceed the data section (96 bytes)");
    expect_bad_msg("{\"a\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 16, "needs 8 bytes");
    expect_bad_msg("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                   "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16,
                   "'a' [0,16] and 'b' [8,16] overlap");
    expect_bad_msg("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                   "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16,
                   "'a' appears twice");
    expect_bad_msg("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,1.5],\"data_offsets\":[0,16]}}", 16, "tensor 'a' has shape");
    expect_bad_msg("{\"__metadata__\":{\"k\":1}}", 16, "metadata 'k' is a JSON number");
}

// Valid files that a strict or careless reader might refuse; and tensors that open but cannot be used.
static void test_valid_edges(void) {
    const char *good[] = {
        "{}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}      ",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}\n",
        "{\"__metadata__\":{}}",
        // gaps and trailing bytes are accepted
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
        // empty tensors own no bytes: they may sit anywhere in range, even inside another tensor
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
        "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]},"
        "\"f\":{\"dtype\":\"BF16\",\"shape\":[3,0],\"data_offsets\":[16,16]}}",
        "{\"z\":{\"dtype\":\"F32\",\"shape\":[0,9007199254740991],\"data_offsets\":[0,0]}}",
        "{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[12,16]}}",
        // integral numbers written another way, and fields we do not know
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0,2e0],\"data_offsets\":[0,1.6e1],\"extra\":[1,{}]}}",
        "{\"a\\\"b\\u00e9\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}",
        // a name that is empty is still a name
        "{\"\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}",
        "{\"a\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]}}",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        Buf b = make_file(good[i], 16);
        SafeTensors *st = expect_open(b, good[i]);
        for (int k = 0; k < st_count(st); k++) {
            StInfo info;
            CHECK(st_info(st, k, &info) == AGPT_OK, "st_info");
        }
        st_close(st);
        free(b.p);
    }
    Buf b = make_file("{\"a\\\"b\\u00e9\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}", 16);
    SafeTensors *st = expect_open(b, "escaped name");
    CHECK(st && st_find(st, "a\"b\xc3\xa9") == 0, "escaped name was not decoded");
    st_close(st);
    free(b.p);

    // Open, listed, but unusable through st_get; st_info still gives the bytes.
    expect_get_fails("{\"a\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16, "a",
                     AGPT_ERR_UNSUPPORTED);
    expect_get_fails("{\"a\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16, "a",
                     AGPT_ERR_UNSUPPORTED);
    expect_get_fails("{\"a\":{\"dtype\":\"BOOL\",\"shape\":[16],\"data_offsets\":[0,16]}}", 16, "a",
                     AGPT_ERR_UNSUPPORTED);
    expect_get_fails("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[16],\"data_offsets\":[0,16]}}", 16, "a",
                     AGPT_ERR_UNSUPPORTED);
    expect_get_fails("{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16, "a",
                     AGPT_ERR_UNSUPPORTED);
    expect_get_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,2,2,1],\"data_offsets\":[0,16]}}", 16, "a",
                     AGPT_ERR_UNSUPPORTED);
    expect_get_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "b", AGPT_ERR_ARG);
    expect_get_fails("{}", 0, "b", AGPT_ERR_ARG);

    b = make_file("{\"a\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]},"
                  "\"c\":{\"dtype\":\"F32\",\"shape\":[1,1,2,2,1],\"data_offsets\":[16,32]}}", 32);
    st = expect_open(b, "unsupported tensors");
    if (st) {
        StInfo info;
        CHECK(st_info(st, 0, &info) == AGPT_OK && !info.supported && strcmp(info.dtype, "F64") == 0 &&
                  info.nbytes == 16 && info.data == b.p + b.n - 32,
              "st_info of an F64 tensor");
        CHECK(st_info(st, 1, &info) == AGPT_OK && !info.supported && info.ndim == 5 && info.shape[3] == 2,
              "st_info of a 5-D tensor");
        Tensor t;
        CHECK(st_get(st, "c", &t) == AGPT_ERR_UNSUPPORTED && strstr(agpt_last_error(), "5 dims [1,1,2,2,1]"),
              "5-D message: %s", agpt_last_error());
        CHECK(st_get(st, "a", &t) == AGPT_ERR_UNSUPPORTED && strstr(agpt_last_error(), "dtype F64"),
              "F64 message: %s", agpt_last_error());
    }
    st_close(st);
    free(b.p);
}

// A small valid file written by st_write, cut at every length: in memory and as a file on disk.
static void test_truncation(void) {
    float f[3] = {1, 2, 3};
    uint16_t h[2] = {1, 2};
    uint8_t u[3] = {9, 8, 7};
    StEntry e[] = {{"f", tensor_1d(f, DT_F32, DEV_CPU, 3)},
                   {"h", tensor_1d(h, DT_F16, DEV_CPU, 2)},
                   {"u", tensor_1d(u, DT_U8, DEV_CPU, 3)}};
    const char *meta[] = {"k", "v"};
    const char *path = tmp_path("trunc.safetensors");
    CHECK(st_write(path, e, 3, meta, 1) == AGPT_OK, "st_write: %s", agpt_last_error());
    size_t len;
    uint8_t *full = read_bytes(path, &len);
    int bad_mem = 0, bad_file = 0;
    const char *cut = tmp_path("cut.safetensors");
    for (size_t n = 0; n < len; n++) {
        uint8_t *p = malloc(n ? n : 1);
        memcpy(p, full, n);
        SafeTensors *st = NULL;
        agpt_clear_error();
        if (st_open_memory(p, n, &st) == AGPT_OK || !agpt_last_error()[0]) bad_mem++;
        st_close(st);
        free(p);
        write_bytes(cut, full, n);
        agpt_clear_error();
        if (st_open(cut, &st) == AGPT_OK || !agpt_last_error()[0]) bad_file++;
        st_close(st);
    }
    CHECK(bad_mem == 0, "%d of %zu truncated buffers were accepted", bad_mem, len);
    CHECK(bad_file == 0, "%d of %zu truncated files were accepted", bad_file, len);
    SafeTensors *st = NULL;
    CHECK(st_open_memory(full, len, &st) == AGPT_OK, "the uncut file: %s", agpt_last_error());
    st_close(st);
    free(full);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(void) {  // xorshift64: fixed seed, so a failure reproduces
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

// Random byte flips over a valid file. Nothing may crash; an error must carry a message; an accepted file
// must give tensors whose bytes all lie inside the buffer (the address sanitizer checks the reads).
static void test_random_flips(void) {
    float f[6] = {1, 2, 3, 4, 5, 6};
    uint16_t h[4] = {1, 2, 3, 4};
    StEntry e[] = {{"layer.0.weight", tensor_2d(f, DT_F32, DEV_CPU, 2, 3)},
                   {"layer.0.bias", tensor_1d(h, DT_BF16, DEV_CPU, 4)}};
    const char *meta[] = {"format", "pt"};
    const char *path = tmp_path("flip.safetensors");
    CHECK(st_write(path, e, 2, meta, 1) == AGPT_OK, "st_write: %s", agpt_last_error());
    size_t len;
    uint8_t *orig = read_bytes(path, &len);
    int opened = 0, refused = 0, silent = 0;
    unsigned sum = 0;
    for (int iter = 0; iter < 4000; iter++) {
        uint8_t *p = malloc(len);
        memcpy(p, orig, len);
        int flips = 1 + (int)(rng_next() % 4);
        for (int k = 0; k < flips; k++) {
            // Mostly the header, where flips matter; sometimes the length field.
            size_t at = (rng_next() % 8 == 0) ? rng_next() % 8 : rng_next() % len;
            p[at] ^= (uint8_t)(1 + rng_next() % 255);
        }
        SafeTensors *st = NULL;
        agpt_clear_error();
        if (st_open_memory(p, len, &st) == AGPT_OK) {
            opened++;
            for (int i = 0; i < st_count(st); i++) {
                StInfo info;
                Tensor t;
                if (st_info(st, i, &info) != AGPT_OK) silent++;
                if (info.nbytes) sum += ((const uint8_t *)info.data)[0] + ((const uint8_t *)info.data)[info.nbytes - 1];
                if (st_get(st, info.name, &t) == AGPT_OK && tensor_nbytes(&t) != info.nbytes) silent++;
            }
            st_close(st);
        } else {
            refused++;
            if (!agpt_last_error()[0]) silent++;
        }
        free(p);
    }
    CHECK(silent == 0, "%d flipped files gave an error without a message or inconsistent sizes", silent);
    CHECK(refused > 0 && opened > 0, "flips: %d opened, %d refused (both should happen)", opened, refused);
    printf("random flips: %d opened, %d refused (checksum %u)\n", opened, refused, sum);
    free(orig);
}

static void remove_tmp_dir(void) {
    DIR *d = opendir(tmp_dir);
    if (!d) return;
    struct dirent *ent;
    while ((ent = readdir(d)))
        if (strcmp(ent->d_name, ".") && strcmp(ent->d_name, "..")) unlink(tmp_path(ent->d_name));
    closedir(d);
    rmdir(tmp_dir);
}

int main(void) {
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/agpt_st_XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 2;
    }
    test_roundtrip();
    test_writer_errors();
    test_open_errors();
    test_corpus();
    test_valid_edges();
    test_truncation();
    test_random_flips();
    remove_tmp_dir();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
