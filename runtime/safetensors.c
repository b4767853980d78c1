// safetensors reader and writer. The header is untrusted input: every number, string and range is checked
// before anything points into the data, and a bad file yields a message that names the file, the tensor
// and what is wrong, never a crash.
#define _POSIX_C_SOURCE 200809L  // open flags, fsync, strdup under -std=c11

#include "runtime/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/mapped_file.h"
#include "runtime/text.h"

// ---------------------------------------------------------------------------------------------------------
// The dtypes of the format. Sizes are in bits because F4 and F6 pack several elements per byte; knowing
// every size lets us validate tensors we cannot use, so a file is either wholly sound or refused.

typedef struct DtypeSpec {
    const char *name;
    int bits;
    int agpt;  // DType, or -1 when agpt has no such type
} DtypeSpec;

static const DtypeSpec dtype_specs[] = {
    {"F32", 32, DT_F32},    {"F16", 16, DT_F16},     {"BF16", 16, DT_BF16},   {"I32", 32, DT_I32},
    {"U8", 8, DT_U8},       {"F64", 64, -1},         {"I64", 64, -1},         {"U64", 64, -1},
    {"U32", 32, -1},        {"I16", 16, -1},         {"U16", 16, -1},         {"I8", 8, -1},
    {"BOOL", 8, -1},        {"F8_E5M2", 8, -1},      {"F8_E4M3", 8, -1},      {"F8_E8M0", 8, -1},
    {"C64", 64, -1},        {"F6_E2M3", 6, -1},      {"F6_E3M2", 6, -1},      {"F4", 4, -1},
};

static const DtypeSpec *dtype_spec_by_name(const char *name) {
    for (size_t i = 0; i < sizeof dtype_specs / sizeof dtype_specs[0]; i++)
        if (strcmp(dtype_specs[i].name, name) == 0) return &dtype_specs[i];
    return NULL;
}

static const char *file_dtype_name(DType dt) {
    for (size_t i = 0; i < sizeof dtype_specs / sizeof dtype_specs[0]; i++)
        if (dtype_specs[i].agpt == (int)dt) return dtype_specs[i].name;
    return NULL;
}

// ---------------------------------------------------------------------------------------------------------
// The opened file.

typedef struct StTensor {
    char *name;
    char *dtype_name;           // as written in the file
    int dtype;                  // DType, or -1 when agpt has no such type
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t begin, end;        // bytes, relative to the data section; checked to lie inside it
} StTensor;

struct SafeTensors {
    char *path;                 // for messages: the file path, or "<memory>"
    const uint8_t *base;        // the whole file (map.data) or the caller's buffer
    size_t size;
    MappedFile map;             // unmapped on close; empty for st_open_memory
    const uint8_t *data;        // the data section: base + 8 + header length
    size_t data_size;
    StTensor *tensors;          // [n] in header order
    int n;
    int *by_name;               // [n] tensor indices sorted by name, for binary search
    char **meta_keys;           // [n_meta] in header order
    char **meta_values;         // [n_meta]
    int n_meta;
    int *meta_by_key;           // [n_meta] metadata indices sorted by key
};

// ---------------------------------------------------------------------------------------------------------
// Message helpers. Names come from untrusted files: shown() (runtime/text.h) cuts long ones and hides
// control bytes, so a message stays one readable line however hostile the file.

static const char *format_shape(int ndim, const int64_t *shape, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
    return buf;
}

static const char *json_kind(const cJSON *v) {
    if (cJSON_IsNumber(v)) return "number";
    if (cJSON_IsString(v)) return "string";
    if (cJSON_IsArray(v)) return "array";
    if (cJSON_IsObject(v)) return "object";
    if (cJSON_IsBool(v)) return "boolean";
    if (cJSON_IsNull(v)) return "null";
    return "value";
}

// JSON numbers arrive as doubles, which hold integers exactly only below 2^53; a size or offset that is
// not exact is as wrong as a negative one.
static bool json_to_u64(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    if (!(d >= 0.0) || d >= 9007199254740992.0 || d != floor(d)) return false;
    *out = (uint64_t)d;
    return true;
}

// Returns the offset of the first byte that is not valid UTF-8 (overlong forms, surrogates and values past
// U+10FFFF included), or of a raw control byte other than tab/CR/LF when !allow_control; n when clean.
// The format requires UTF-8, and JSON forbids raw control bytes, which cJSON would otherwise skip silently.
static Status oom(const char *path, const char *what) {
    return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory while reading %s", path, what);
}

// ---------------------------------------------------------------------------------------------------------
// Sorting helpers: names and ranges are checked by sorting, so a header with a million entries costs
// n log n, not n^2.

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const StTensor *const *)a)->name, (*(const StTensor *const *)b)->name);
}

static int cmp_tensor_range(const void *a, const void *b) {
    const StTensor *x = *(const StTensor *const *)a, *y = *(const StTensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int cmp_string_slot(const void *a, const void *b) {
    return strcmp(**(char **const *)a, **(char **const *)b);
}

// ---------------------------------------------------------------------------------------------------------
// Reading

static Status parse_metadata(SafeTensors *st, const cJSON *meta) {
    if (!cJSON_IsObject(meta))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: \"__metadata__\" is a JSON %s, but the format requires an "
                         "object of string values; the file is corrupt", st->path, json_kind(meta));
    int count = 0;
    for (const cJSON *c = meta->child; c; c = c->next) count++;
    st->meta_keys = calloc((size_t)count + 1, sizeof *st->meta_keys);
    st->meta_values = calloc((size_t)count + 1, sizeof *st->meta_values);
    st->meta_by_key = calloc((size_t)count + 1, sizeof *st->meta_by_key);
    if (!st->meta_keys || !st->meta_values || !st->meta_by_key) return oom(st->path, "the metadata");

    char nb[SHOWN_MAX];
    for (const cJSON *c = meta->child; c; c = c->next) {
        if (!c->string)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: a \"__metadata__\" entry has no key", st->path);
        if (!cJSON_IsString(c))
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata '%s' is a JSON %s, but \"__metadata__\" may hold "
                             "only strings; the file is corrupt", st->path, shown(c->string, nb), json_kind(c));
        int i = st->n_meta;
        st->meta_keys[i] = strdup(c->string);
        st->meta_values[i] = strdup(c->valuestring);
        if (!st->meta_keys[i] || !st->meta_values[i]) {
            free(st->meta_keys[i]), free(st->meta_values[i]);
            st->meta_keys[i] = st->meta_values[i] = NULL;
            return oom(st->path, "the metadata");
        }
        st->n_meta++;
    }

    // Sort pointers to the key slots; the slot address gives back the index.
    char ***slots = malloc(((size_t)count + 1) * sizeof *slots);
    if (!slots) return oom(st->path, "the metadata");
    for (int i = 0; i < count; i++) slots[i] = &st->meta_keys[i];
    qsort(slots, (size_t)count, sizeof *slots, cmp_string_slot);
    for (int i = 0; i < count; i++) {
        if (i > 0 && strcmp(*slots[i], *slots[i - 1]) == 0) {
            Status s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata key '%s' appears twice in \"__metadata__\"; "
                                 "the file is corrupt", st->path, shown(*slots[i], nb));
            free(slots);
            return s;
        }
        st->meta_by_key[i] = (int)(slots[i] - st->meta_keys);
    }
    free(slots);
    return AGPT_OK;
}

// Fills t (whose name is set) from its header entry and checks it against the data section.
static Status parse_tensor(const SafeTensors *st, const cJSON *entry, StTensor *t) {
    char nb[SHOWN_MAX], sb[256];
    const char *name = shown(t->name, nb);
    if (!cJSON_IsObject(entry))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' is described by a JSON %s, not an object with "
                         "dtype, shape and data_offsets; the file is corrupt", st->path, name, json_kind(entry));

    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *f = entry->child; f; f = f->next) {
        const cJSON **slot = NULL;
        if (!f->string) continue;
        if (strcmp(f->string, "dtype") == 0) slot = &dtype;
        else if (strcmp(f->string, "shape") == 0) slot = &shape;
        else if (strcmp(f->string, "data_offsets") == 0) slot = &offsets;
        if (!slot) continue;  // fields a later version of the format may add are not ours to refuse
        if (*slot)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has two \"%s\" fields; the file is corrupt",
                             st->path, name, f->string);
        *slot = f;
    }
    const char *missing = !dtype ? "dtype" : !shape ? "shape" : !offsets ? "data_offsets" : NULL;
    if (missing)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has no \"%s\" field; the file is corrupt", st->path,
                         name, missing);

    // dtype. An unknown name is kept, not refused: it only makes this one tensor unusable.
    if (!cJSON_IsString(dtype))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has a dtype that is a JSON %s, not a string like "
                         "\"F32\"; the file is corrupt", st->path, name, json_kind(dtype));
    t->dtype_name = strdup(dtype->valuestring);
    if (!t->dtype_name) return oom(st->path, "the header");
    const DtypeSpec *spec = dtype_spec_by_name(t->dtype_name);
    t->dtype = spec ? spec->agpt : -1;

    // shape
    if (!cJSON_IsArray(shape))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has a shape that is a JSON %s, not an array of "
                         "sizes; the file is corrupt", st->path, name, json_kind(shape));
    t->ndim = 0;
    for (const cJSON *d = shape->child; d; d = d->next) {
        uint64_t v;
        if (t->ndim == ST_MAX_DIMS)
            return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: tensor '%s' has more than %d dims; agpt reads at most "
                             "%d (and uses at most %d)", st->path, name, ST_MAX_DIMS, ST_MAX_DIMS,
                             TENSOR_MAX_DIMS);
        if (!json_to_u64(d, &v))
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has shape entry %d that is not an integer in "
                             "0..2^53 (a negative, fractional or non-number value); the file is corrupt",
                             st->path, name, t->ndim);
        t->shape[t->ndim++] = (int64_t)v;
    }
    format_shape(t->ndim, t->shape, sb, sizeof sb);

    // data_offsets
    const cJSON *b = cJSON_IsArray(offsets) ? offsets->child : NULL;
    const cJSON *e = b ? b->next : NULL;
    if (!b || !e || e->next)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has data_offsets that are not an array of two "
                         "numbers [begin, end]; the file is corrupt", st->path, name);
    if (!json_to_u64(b, &t->begin) || !json_to_u64(e, &t->end))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has data_offsets that are not integers in 0..2^53 "
                         "(a negative, fractional or non-number value); the file is corrupt", st->path, name);
    if (t->begin > t->end)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has data_offsets [%llu,%llu] that end before they "
                         "begin; the file is corrupt", st->path, name, (unsigned long long)t->begin,
                         (unsigned long long)t->end);
    if (t->end > st->data_size)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' data_offsets [%llu,%llu] exceed the data section "
                         "(%zu bytes); the file is truncated or corrupt", st->path, name,
                         (unsigned long long)t->begin, (unsigned long long)t->end, st->data_size);

    // Element count, overflow-checked. A zero dim makes the product 0 whatever the others are.
    uint64_t numel = 1;
    bool zero = false, overflow = false;
    for (int i = 0; i < t->ndim; i++) {
        uint64_t d = (uint64_t)t->shape[i];
        if (d == 0) zero = true;
        else if (!overflow && numel > UINT64_MAX / d) overflow = true;
        else if (!overflow) numel *= d;
    }
    if (zero) numel = 0, overflow = false;
    if (overflow || (spec && numel > UINT64_MAX / (uint64_t)spec->bits))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has shape %s whose size overflows 64 bits; the file "
                         "is corrupt", st->path, name, sb);

    // Size. Without a known element size (an unknown dtype) the range is all we can check.
    if (spec) {
        uint64_t bits = numel * (uint64_t)spec->bits;
        if (bits % 8 != 0)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' of %s %s does not fill a whole number of bytes; "
                             "the file is corrupt", st->path, name, spec->name, sb);
        if (bits / 8 != t->end - t->begin)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' of %s %s needs %llu bytes, but its data_offsets "
                             "[%llu,%llu] hold %llu; the file is corrupt", st->path, name, spec->name, sb,
                             (unsigned long long)(bits / 8), (unsigned long long)t->begin,
                             (unsigned long long)t->end, (unsigned long long)(t->end - t->begin));
    }
    return AGPT_OK;
}

// Duplicate names, the name index, and overlapping ranges: properties of the whole set.
static Status check_tensor_set(SafeTensors *st) {
    char nb[SHOWN_MAX], nb2[SHOWN_MAX];
    size_t n = (size_t)st->n;
    StTensor **order = malloc((n + 1) * sizeof *order);
    st->by_name = malloc((n + 1) * sizeof *st->by_name);
    if (!order || !st->by_name) {
        free(order);
        return oom(st->path, "the header");
    }
    for (size_t i = 0; i < n; i++) order[i] = &st->tensors[i];

    qsort(order, n, sizeof *order, cmp_tensor_name);
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && strcmp(order[i]->name, order[i - 1]->name) == 0) {
            Status s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' appears twice in the header; the file is "
                                 "corrupt", st->path, shown(order[i]->name, nb));
            free(order);
            return s;
        }
        st->by_name[i] = (int)(order[i] - st->tensors);
    }

    // Empty tensors own no bytes, so they cannot overlap anything, wherever their offsets point.
    qsort(order, n, sizeof *order, cmp_tensor_range);
    const StTensor *prev = NULL;
    for (size_t i = 0; i < n; i++) {
        const StTensor *t = order[i];
        if (t->begin == t->end) continue;
        if (prev && t->begin < prev->end) {
            Status s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensors '%s' [%llu,%llu] and '%s' [%llu,%llu] overlap in "
                                 "the data section; the file is corrupt", st->path, shown(prev->name, nb),
                                 (unsigned long long)prev->begin, (unsigned long long)prev->end,
                                 shown(t->name, nb2), (unsigned long long)t->begin, (unsigned long long)t->end);
            free(order);
            return s;
        }
        prev = t;
    }
    free(order);
    return AGPT_OK;
}

static Status parse_root(SafeTensors *st, const cJSON *root) {
    if (!cJSON_IsObject(root))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the header is a JSON %s, not an object of tensors; not a "
                         "safetensors file", st->path, json_kind(root));
    int count = 0;
    for (const cJSON *c = root->child; c; c = c->next) count++;
    st->tensors = calloc((size_t)count + 1, sizeof *st->tensors);
    if (!st->tensors) return oom(st->path, "the header");

    bool seen_metadata = false;
    for (const cJSON *c = root->child; c; c = c->next) {
        if (!c->string) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: a header entry has no name", st->path);
        if (strcmp(c->string, "__metadata__") == 0) {
            if (seen_metadata)
                return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: \"__metadata__\" appears twice in the header; the file "
                                 "is corrupt", st->path);
            seen_metadata = true;
            AGPT_TRY(parse_metadata(st, c));
            continue;
        }
        StTensor *t = &st->tensors[st->n];
        t->name = strdup(c->string);
        if (!t->name) return oom(st->path, "the header");
        st->n++;  // counted now so that st_close frees what parse_tensor allocates, even on failure
        AGPT_TRY(parse_tensor(st, c, t));
    }
    if (!seen_metadata) {
        // Empty arrays keep the accessors free of NULL checks.
        st->meta_keys = calloc(1, sizeof *st->meta_keys);
        st->meta_values = calloc(1, sizeof *st->meta_values);
        st->meta_by_key = calloc(1, sizeof *st->meta_by_key);
        if (!st->meta_keys || !st->meta_values || !st->meta_by_key) return oom(st->path, "the header");
    }
    return check_tensor_set(st);
}

static Status parse_file(SafeTensors *st) {
    if (st->size < 8)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: only %zu bytes, fewer than the 8-byte header length a "
                         "safetensors file starts with; the file is truncated or not a safetensors file",
                         st->path, st->size);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | st->base[i];
    if (header_len == 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the header length is 0; not a safetensors file, or corrupt",
                         st->path);
    if (header_len > ST_MAX_HEADER_BYTES)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the header length %llu is over the %llu-byte limit; not a "
                         "safetensors file, or corrupt", st->path, (unsigned long long)header_len,
                         ST_MAX_HEADER_BYTES);
    if (header_len > st->size - 8)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the header of %llu bytes runs past the end of the file (%zu "
                         "bytes); the file is truncated", st->path, (unsigned long long)header_len, st->size);
    const uint8_t *header = st->base + 8;
    size_t hlen = (size_t)header_len;
    st->data = header + hlen;
    st->data_size = st->size - 8 - hlen;

    size_t bad = utf8_bad_at(header, hlen, false);
    if (bad < hlen)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: header byte %zu (0x%02x) is %s; the header must be UTF-8 JSON, "
                         "so the file is corrupt or not a safetensors file", st->path, bad, header[bad],
                         header[bad] < 0x20 ? "a control character" : "not valid UTF-8");

    // Parse a private NUL-terminated copy: cJSON is given the exact length, but the copy also guards against
    // any parser read one past the end, which on a mapped file could fall off the last page.
    char *text = malloc(hlen + 1);
    if (!text) return oom(st->path, "the header");
    memcpy(text, header, hlen);
    text[hlen] = 0;
    // cJSON also records the error position in a global (written by every parse, from any thread); we take
    // it from `end` instead, so a message never reports another thread's error.
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, hlen, &end, 0);
    if (!root) {
        size_t at = (end && end >= text && end <= text + hlen) ? (size_t)(end - text) : 0;
        char near[32], nb[SHOWN_MAX];
        snprintf(near, sizeof near, "%s", text + at);
        Status s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the header is not valid JSON (error near byte %zu: '%s'); "
                             "the file is corrupt or not a safetensors file", st->path, at, shown(near, nb));
        free(text);
        return s;
    }
    // Writers pad the header with spaces to align the data; anything else after the JSON is garbage.
    for (const char *p = end; p < text + hlen; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            Status s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the header has bytes after its JSON object (at byte %zu); "
                                 "the file is corrupt", st->path, (size_t)(p - text));
            cJSON_Delete(root);
            free(text);
            return s;
        }
    }
    Status s = parse_root(st, root);
    cJSON_Delete(root);
    free(text);
    return s;
}

Status st_open_memory(const void *buf, size_t len, SafeTensors **out) {
    AGPT_CHECK_ARG(out != NULL, "st_open_memory: out is NULL");
    *out = NULL;
    AGPT_CHECK_ARG(buf != NULL || len == 0, "st_open_memory: buffer is NULL but length is %zu", len);
    SafeTensors *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup("<memory>"))) {
        free(st);
        return oom("<memory>", "a safetensors buffer");
    }
    st->base = buf;
    st->size = len;
    Status s = parse_file(st);
    if (s != AGPT_OK) {
        st_close(st);
        return s;
    }
    *out = st;
    return AGPT_OK;
}

Status st_open(const char *path, SafeTensors **out) {
    AGPT_CHECK_ARG(out != NULL, "st_open: out is NULL");
    *out = NULL;
    AGPT_CHECK_ARG(path != NULL, "st_open: path is NULL");
    MappedFile map;
    AGPT_TRY(mapped_file_open(path, "a .safetensors file", &map));
    SafeTensors *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup(path))) {
        free(st);
        mapped_file_close(&map);
        return oom(path, "the file");
    }
    st->map = map;
    st->base = map.data;
    st->size = map.size;
    Status s = parse_file(st);
    if (s != AGPT_OK) {
        st_close(st);
        return s;
    }
    *out = st;
    return AGPT_OK;
}

void st_close(SafeTensors *st) {
    if (!st) return;
    for (int i = 0; i < st->n; i++) {
        free(st->tensors[i].name);
        free(st->tensors[i].dtype_name);
    }
    for (int i = 0; i < st->n_meta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_values[i]);
    }
    free(st->tensors);
    free(st->by_name);
    free(st->meta_keys);
    free(st->meta_values);
    free(st->meta_by_key);
    mapped_file_close(&st->map);
    free(st->path);
    free(st);
}

int st_count(const SafeTensors *st) { return st ? st->n : 0; }

const char *st_name(const SafeTensors *st, int i) {
    return (st && i >= 0 && i < st->n) ? st->tensors[i].name : NULL;
}

// Binary search in the sorted name index; returns the position where name is or would be.
static int name_position(const SafeTensors *st, const char *name, bool *found) {
    int lo = 0, hi = st->n;
    *found = false;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(st->tensors[st->by_name[mid]].name, name);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

int st_find(const SafeTensors *st, const char *name) {
    if (!st || !name) return -1;
    bool found;
    int pos = name_position(st, name, &found);
    return found ? st->by_name[pos] : -1;
}

Status st_get(const SafeTensors *st, const char *name, Tensor *out) {
    AGPT_CHECK_ARG(st && name && out, "st_get: NULL argument");
    *out = (Tensor){0};
    char nb[SHOWN_MAX], db[SHOWN_MAX], sb[256];
    bool found;
    int pos = name_position(st, name, &found);
    if (!found) {
        // The names sorted next to the missing one are the likely typos or renamed neighbours; listing
        // the whole file would bury the message under thousands of names.
        char near[2 * SHOWN_MAX + 32] = "";
        char n1[SHOWN_MAX], n2[SHOWN_MAX];
        if (pos > 0 && pos < st->n)
            snprintf(near, sizeof near, "; nearest names: '%s', '%s'",
                     shown(st->tensors[st->by_name[pos - 1]].name, n1),
                     shown(st->tensors[st->by_name[pos]].name, n2));
        else if (st->n > 0)
            snprintf(near, sizeof near, "; nearest name: '%s'",
                     shown(st->tensors[st->by_name[pos > 0 ? pos - 1 : 0]].name, n1));
        return AGPT_FAIL(AGPT_ERR_ARG, "tensor '%s' not found in %s (it has %d tensors%s); is this the right "
                         "model file?", shown(name, nb), st->path, st->n, near);
    }
    const StTensor *t = &st->tensors[st->by_name[pos]];
    format_shape(t->ndim, t->shape, sb, sizeof sb);
    if (t->dtype < 0)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: tensor '%s' %s has dtype %s, which agpt cannot use (it reads "
                         "F32, F16, BF16, I32 and U8); convert the file, e.g. to F32 or BF16", st->path,
                         shown(name, nb), sb, shown(t->dtype_name, db));
    if (t->ndim > TENSOR_MAX_DIMS)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: tensor '%s' has %d dims %s, but agpt tensors have at most %d; "
                         "reshape it when converting the file", st->path, shown(name, nb), t->ndim, sb,
                         TENSOR_MAX_DIMS);
    // The mapping is read-only; the cast only satisfies Tensor's non-const pointer (see the header).
    *out = tensor_make((void *)(st->data + t->begin), (DType)t->dtype, DEV_CPU, t->ndim, t->shape);
    return AGPT_OK;
}

Status st_info(const SafeTensors *st, int i, StInfo *out) {
    AGPT_CHECK_ARG(st && out, "st_info: NULL argument");
    AGPT_CHECK_ARG(i >= 0 && i < st->n, "st_info: index %d out of range (%s has %d tensors)", i,
                   st->path, st->n);
    const StTensor *t = &st->tensors[i];
    *out = (StInfo){
        .name = t->name,
        .dtype = t->dtype_name,
        .supported = t->dtype >= 0 && t->ndim <= TENSOR_MAX_DIMS,
        .ndim = t->ndim,
        .data = st->data + t->begin,
        .nbytes = (size_t)(t->end - t->begin),
        .offset = t->begin,
    };
    memcpy(out->shape, t->shape, sizeof out->shape);
    return AGPT_OK;
}

int st_metadata_count(const SafeTensors *st) { return st ? st->n_meta : 0; }

const char *st_metadata_key(const SafeTensors *st, int i) {
    return (st && i >= 0 && i < st->n_meta) ? st->meta_keys[i] : NULL;
}

const char *st_metadata(const SafeTensors *st, const char *key) {
    if (!st || !key) return NULL;
    int lo = 0, hi = st->n_meta;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int k = st->meta_by_key[mid];
        int c = strcmp(st->meta_keys[k], key);
        if (c == 0) return st->meta_values[k];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

// ---------------------------------------------------------------------------------------------------------
// Writing

// write(2) may write less than asked (signals, pipes, files over 2 GB per call); loop until done.
static Status write_all(int fd, const void *buf, size_t n, const char *tmp_path) {
    const char *p = buf;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            int err = errno;
            return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s: %s%s", tmp_path, strerror(err),
                             err == ENOSPC || err == EDQUOT ? "; free some disk space and retry" : "");
        }
        p += w;
        n -= (size_t)w;
    }
    return AGPT_OK;
}

// JSON arrays of integers, printed by us rather than by cJSON, which prints large doubles in exponent form
// ("1e+15") that strict readers such as the official one refuse as sizes.
static char *json_uint_array(const uint64_t *v, int n) {
    char *s = malloc((size_t)n * 21 + 3);
    if (!s) return NULL;
    size_t k = 0;
    s[k++] = '[';
    for (int i = 0; i < n; i++) k += (size_t)sprintf(s + k, i ? ",%llu" : "%llu", (unsigned long long)v[i]);
    s[k++] = ']';
    s[k] = 0;
    return s;
}

// Order in the data section: largest element size first, then given order. Every tensor's byte length is a
// multiple of its element size, so each one starts aligned to its element size, with no gaps between
// tensors (the official reader refuses gaps, so padding them is not an option).
typedef struct WriteSlot {
    int index;
    size_t elem;
} WriteSlot;

static int cmp_write_slot(const void *a, const void *b) {
    const WriteSlot *x = a, *y = b;
    if (x->elem != y->elem) return x->elem > y->elem ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

static int cmp_cstr_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// Argument checks: everything that could make the output invalid is refused before a byte is written.
static Status check_write_args(const char *path, const StEntry *entries, int n, const char *const *kv,
                               int n_pairs) {
    char nb[SHOWN_MAX], db[128];
    for (int i = 0; i < n; i++) {
        const StEntry *e = &entries[i];
        const Tensor *t = &e->tensor;
        AGPT_CHECK_ARG(e->name && e->name[0], "st_write %s: tensor %d has no name", path, i);
        const char *name = shown(e->name, nb);
        AGPT_CHECK_ARG(strcmp(e->name, "__metadata__") != 0,
                       "st_write %s: \"__metadata__\" is reserved and cannot name a tensor", path);
        size_t len = strlen(e->name);
        AGPT_CHECK_ARG(utf8_bad_at((const uint8_t *)e->name, len, true) == len,
                       "st_write %s: tensor name '%s' is not valid UTF-8", path, name);
        AGPT_CHECK_ARG(t->device == DEV_CPU, "st_write %s: tensor '%s' is on %s; copy it to the CPU first",
                       path, name, device_name(t->device));
        AGPT_CHECK_ARG(t->dtype >= 0 && t->dtype < DT_COUNT, "st_write %s: tensor '%s' has an invalid dtype %d",
                       path, name, (int)t->dtype);
        AGPT_CHECK_ARG(t->ndim >= 0 && t->ndim <= TENSOR_MAX_DIMS,
                       "st_write %s: tensor '%s' has %d dims (0..%d allowed)", path, name, t->ndim,
                       TENSOR_MAX_DIMS);
        uint64_t numel = 1;
        bool overflow = false;
        for (int d = 0; d < t->ndim; d++) {
            AGPT_CHECK_ARG(t->shape[d] >= 0 && t->shape[d] < (int64_t)1 << 53,
                           "st_write %s: tensor '%s' has dim %d of size %lld (0..2^53 allowed)", path, name, d,
                           (long long)t->shape[d]);
            uint64_t s = (uint64_t)t->shape[d];
            if (s != 0 && numel > UINT64_MAX / s) overflow = true;
            else numel *= s;
        }
        overflow = overflow && numel != 0;
        AGPT_CHECK_ARG(!overflow && numel <= (SIZE_MAX >> 3) / dtype_size(t->dtype),
                       "st_write %s: tensor '%s' %s is too large", path, name, tensor_describe(t, db, sizeof db));
        AGPT_CHECK_ARG(t->data || numel == 0, "st_write %s: tensor '%s' %s has no data", path, name,
                       tensor_describe(t, db, sizeof db));
    }
    for (int i = 0; i < 2 * n_pairs; i++) {
        AGPT_CHECK_ARG(kv[i], "st_write %s: metadata %s %d is NULL", path, i % 2 ? "value" : "key", i / 2);
        size_t len = strlen(kv[i]);
        AGPT_CHECK_ARG(utf8_bad_at((const uint8_t *)kv[i], len, true) == len,
                       "st_write %s: metadata %s '%s' is not valid UTF-8", path, i % 2 ? "value" : "key",
                       shown(kv[i], nb));
    }

    // Duplicates: sort copies of the name pointers.
    int most = n > n_pairs ? n : n_pairs;
    const char **names = malloc(((size_t)most + 1) * sizeof *names);
    if (!names) return AGPT_FAIL(AGPT_ERR_OOM, "st_write %s: out of host memory", path);
    for (int i = 0; i < n; i++) names[i] = entries[i].name;
    qsort(names, (size_t)n, sizeof *names, cmp_cstr_ptr);
    for (int i = 1; i < n; i++) {
        if (strcmp(names[i], names[i - 1]) == 0) {
            Status s = AGPT_FAIL(AGPT_ERR_ARG, "st_write %s: tensor name '%s' is given twice", path,
                                 shown(names[i], nb));
            free(names);
            return s;
        }
    }
    for (int i = 0; i < n_pairs; i++) names[i] = kv[2 * i];
    qsort(names, (size_t)n_pairs, sizeof *names, cmp_cstr_ptr);
    for (int i = 1; i < n_pairs; i++) {
        if (strcmp(names[i], names[i - 1]) == 0) {
            Status s = AGPT_FAIL(AGPT_ERR_ARG, "st_write %s: metadata key '%s' is given twice", path,
                                 shown(names[i], nb));
            free(names);
            return s;
        }
    }
    free(names);
    return AGPT_OK;
}

// Builds the header JSON (tensors in given order) with each tensor's offsets from the layout.
static Status build_header(const char *path, const StEntry *entries, int n, const char *const *kv,
                           int n_pairs, const uint64_t *begin, char **out_text) {
    *out_text = NULL;
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    if (ok && n_pairs > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        ok = meta != NULL;
        for (int i = 0; ok && i < n_pairs; i++) ok = cJSON_AddStringToObject(meta, kv[2 * i], kv[2 * i + 1]);
    }
    for (int i = 0; ok && i < n; i++) {
        const Tensor *t = &entries[i].tensor;
        uint64_t shape[TENSOR_MAX_DIMS], range[2] = {begin[i], begin[i] + tensor_nbytes(t)};
        for (int d = 0; d < t->ndim; d++) shape[d] = (uint64_t)t->shape[d];
        char *shape_json = json_uint_array(shape, t->ndim);
        char *range_json = json_uint_array(range, 2);
        cJSON *entry = cJSON_AddObjectToObject(root, entries[i].name);
        ok = shape_json && range_json && entry && cJSON_AddStringToObject(entry, "dtype", file_dtype_name(t->dtype)) &&
             cJSON_AddRawToObject(entry, "shape", shape_json) &&
             cJSON_AddRawToObject(entry, "data_offsets", range_json);
        free(shape_json);
        free(range_json);
    }
    if (ok) *out_text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!*out_text) return AGPT_FAIL(AGPT_ERR_OOM, "st_write %s: out of host memory building the header", path);
    return AGPT_OK;
}

// Writes the whole file to an open descriptor: length, header padded to 64, tensors in layout order.
static Status write_body(int fd, const char *tmp, const char *header, const StEntry *entries,
                         const WriteSlot *order, int n) {
    size_t json_len = strlen(header);
    // Spaces after the JSON are the format's own padding: readers skip them as whitespace.
    size_t padded = (8 + json_len + 63) / 64 * 64 - 8;
    uint8_t len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    static const char spaces[64] = "                                                                ";
    AGPT_TRY(write_all(fd, len_bytes, 8, tmp));
    AGPT_TRY(write_all(fd, header, json_len, tmp));
    AGPT_TRY(write_all(fd, spaces, padded - json_len, tmp));
    for (int k = 0; k < n; k++) {
        const Tensor *t = &entries[order[k].index].tensor;
        AGPT_TRY(write_all(fd, t->data, tensor_nbytes(t), tmp));
    }
    if (fsync(fd) != 0)
        return AGPT_FAIL(AGPT_ERR_IO, "cannot flush %s to disk: %s", tmp, strerror(errno));
    return AGPT_OK;
}

// After the rename, sync the directory so the new name survives a power cut. Some filesystems refuse
// fsync on directories; the file's own data is already on disk then, so that is not an error.
static void sync_parent_dir(const char *path) {
    char *dir = strdup(path);
    if (!dir) return;
    char *slash = strrchr(dir, '/');
    const char *d = !slash ? "." : (slash == dir ? "/" : (*slash = 0, dir));
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

Status st_write(const char *path, const StEntry *entries, int n, const char *const *metadata_kv,
                int n_metadata_pairs) {
    AGPT_CHECK_ARG(path && path[0], "st_write: empty path");
    AGPT_CHECK_ARG(n >= 0 && (n == 0 || entries), "st_write %s: %d tensors but no entries", path, n);
    AGPT_CHECK_ARG(n_metadata_pairs >= 0 && (n_metadata_pairs == 0 || metadata_kv),
                   "st_write %s: %d metadata pairs but no array", path, n_metadata_pairs);
    AGPT_TRY(check_write_args(path, entries, n, metadata_kv, n_metadata_pairs));

    WriteSlot *order = malloc(((size_t)n + 1) * sizeof *order);
    uint64_t *begin = malloc(((size_t)n + 1) * sizeof *begin);
    char *tmp = malloc(strlen(path) + 5);
    char *header = NULL;
    Status s = AGPT_OK;
    if (!order || !begin || !tmp) {
        s = AGPT_FAIL(AGPT_ERR_OOM, "st_write %s: out of host memory", path);
        goto done;
    }
    for (int i = 0; i < n; i++) order[i] = (WriteSlot){i, dtype_size(entries[i].tensor.dtype)};
    qsort(order, (size_t)n, sizeof *order, cmp_write_slot);
    // Offsets stay below 2^53 so that every JSON reader, which may hold numbers as doubles, reads them exactly.
    uint64_t offset = 0;
    for (int k = 0; k < n; k++) {
        begin[order[k].index] = offset;
        offset += tensor_nbytes(&entries[order[k].index].tensor);
        if (offset >= (uint64_t)1 << 53) {
            s = AGPT_FAIL(AGPT_ERR_ARG, "st_write %s: the tensors hold more than 2^53 bytes", path);
            goto done;
        }
    }
    s = build_header(path, entries, n, metadata_kv, n_metadata_pairs, begin, &header);
    if (s != AGPT_OK) goto done;
    // Refuse what no reader (ours included) would accept back, before touching the disk.
    if (strlen(header) + 63 > ST_MAX_HEADER_BYTES) {
        s = AGPT_FAIL(AGPT_ERR_ARG, "st_write %s: the header would be %zu bytes, over the %llu-byte limit of "
                      "the format; keep large texts out of the metadata", path, strlen(header),
                      ST_MAX_HEADER_BYTES);
        goto done;
    }

    // Write beside the target and rename over it: readers of path see the old file or the new one, never
    // a half-written one, and a failure leaves the old file as it was.
    sprintf(tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        goto done;
    }
    s = write_body(fd, tmp, header, entries, order, n);
    if (close(fd) != 0 && s == AGPT_OK)  // NFS and others report write errors only at close
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    if (s == AGPT_OK && rename(tmp, path) != 0)
        s = AGPT_FAIL(AGPT_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (s != AGPT_OK) unlink(tmp);
    else sync_parent_dir(path);

done:
    free(order);
    free(begin);
    free(tmp);
    cJSON_free(header);
    return s;
}
