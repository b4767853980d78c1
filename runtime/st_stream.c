#define _POSIX_C_SOURCE 200809L  // pwrite, fsync, ftruncate
#include "runtime/st_stream.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/text.h"

typedef struct StreamTensor {
    char *name;
    uint64_t begin, nbytes;  // relative to the data section
} StreamTensor;

struct StStream {
    char *path, *tmp;
    int fd;
    uint64_t data_start;  // file offset of the data section
    int n;
    StreamTensor *tensors;
};

static int dtype_size_by_name(const char *name) {
    static const struct { const char *name; int size; } sizes[] = {
        {"F64", 8}, {"I64", 8}, {"U64", 8}, {"F32", 4}, {"I32", 4}, {"U32", 4}, {"F16", 2}, {"BF16", 2},
        {"I16", 2}, {"U16", 2}, {"I8", 1}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (name && strcmp(name, sizes[i].name) == 0) return sizes[i].size;
    return 0;
}

static void stream_free(StStream *s) {
    if (!s) return;
    if (s->fd >= 0) close(s->fd);
    for (int i = 0; i < s->n; i++) free(s->tensors[i].name);
    free(s->tensors);
    free(s->path);
    free(s->tmp);
    free(s);
}

void st_stream_abort(StStream *s) {
    if (!s) return;
    if (s->tmp) unlink(s->tmp);
    stream_free(s);
}

// Integers printed by us: cJSON prints large doubles as "1e+15", which strict readers refuse as sizes.
static bool add_uint_array(cJSON *obj, const char *key, const uint64_t *v, int n) {
    char buf[ST_MAX_DIMS * 21 + 3];
    size_t k = 0;
    buf[k++] = '[';
    for (int i = 0; i < n; i++) k += (size_t)snprintf(buf + k, sizeof buf - k, i ? ",%llu" : "%llu",
                                                      (unsigned long long)v[i]);
    buf[k++] = ']';
    buf[k] = 0;
    return cJSON_AddRawToObject(obj, key, buf) != NULL;
}

typedef struct Slot {
    int index, elem;
} Slot;

static int cmp_slot(const void *a, const void *b) {  // largest element first, then declaration order
    const Slot *x = a, *y = b;
    if (x->elem != y->elem) return y->elem - x->elem;
    return x->index - y->index;
}

static Status pwrite_all(StStream *s, const void *buf, size_t n, uint64_t at) {
    const char *p = buf;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = pwrite(s->fd, p, chunk, (off_t)at);
        if (w < 0) {
            if (errno == EINTR) continue;
            int err = errno;
            return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s: %s%s", s->tmp, strerror(err),
                             err == ENOSPC || err == EDQUOT ? "; free some disk space and retry" : "");
        }
        p += w, n -= (size_t)w, at += (uint64_t)w;
    }
    return AGPT_OK;
}

Status st_stream_open(const char *path, const StStreamEntry *entries, int n, const char *const *kv, int n_pairs,
                      StStream **out) {
    *out = NULL;
    AGPT_CHECK_ARG(path && path[0], "st_stream: empty path");
    AGPT_CHECK_ARG(n >= 0 && (n == 0 || entries), "st_stream %s: %d tensors but no entries", path, n);
    StStream *s = calloc(1, sizeof *s);
    Slot *order = malloc(((size_t)n + 1) * sizeof *order);
    if (s) {
        s->fd = -1;
        s->path = strdup(path);
        s->tmp = malloc(strlen(path) + 5);
        s->tensors = calloc((size_t)n + 1, sizeof *s->tensors);
    }
    if (!s || !order || !s->path || !s->tmp || !s->tensors) {
        free(order);
        stream_free(s);
        return AGPT_FAIL(AGPT_ERR_OOM, "st_stream %s: out of host memory", path);
    }
    sprintf(s->tmp, "%s.tmp", path);
    Status st = AGPT_OK;
    for (int i = 0; i < n && st == AGPT_OK; i++) {
        const StStreamEntry *e = &entries[i];
        int elem = dtype_size_by_name(e->dtype);
        char shown_name[SHOWN_MAX];
        if (!e->name || !e->name[0] || strcmp(e->name, "__metadata__") == 0)
            st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: tensor %d has an empty or reserved name", path, i);
        else if (!utf8_valid(e->name))  // readers refuse a header that is not UTF-8: refuse before writing it
            st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: tensor name '%s' is not valid UTF-8", path,
                           shown(e->name, shown_name));
        else if (elem == 0)
            st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: tensor '%s' has unknown dtype '%s'", path, e->name,
                           e->dtype ? e->dtype : "(null)");
        else if (e->ndim < 0 || e->ndim > ST_MAX_DIMS)
            st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: tensor '%s' has %d dims", path, e->name, e->ndim);
        for (int j = 0; j < i && st == AGPT_OK; j++)
            if (strcmp(s->tensors[j].name, e->name) == 0)
                st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: tensor '%s' declared twice", path, e->name);
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim && st == AGPT_OK; d++) {
            if (e->shape[d] < 0 || (e->shape[d] > 0 && numel > ((uint64_t)1 << 50) / (uint64_t)e->shape[d]))
                st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: tensor '%s' has a bad or huge shape", path, e->name);
            else numel *= (uint64_t)e->shape[d];
        }
        if (st != AGPT_OK) break;
        s->tensors[i].name = strdup(e->name);
        s->tensors[i].nbytes = numel * (uint64_t)elem;
        s->n = i + 1;
        order[i] = (Slot){i, elem};
        if (!s->tensors[i].name) st = AGPT_FAIL(AGPT_ERR_OOM, "st_stream %s: out of host memory", path);
    }
    if (st != AGPT_OK) {
        free(order);
        stream_free(s);
        return st;
    }
    for (int i = 0; i < 2 * n_pairs && st == AGPT_OK; i++)
        if (!kv[i] || !utf8_valid(kv[i]))
            st = AGPT_FAIL(AGPT_ERR_ARG, "st_stream %s: metadata %s %d is missing or not valid UTF-8", path,
                           i % 2 ? "value" : "key", i / 2);
    if (st != AGPT_OK) {
        free(order);
        stream_free(s);
        return st;
    }
    qsort(order, (size_t)n, sizeof *order, cmp_slot);
    uint64_t offset = 0;
    for (int k = 0; k < n; k++) {
        s->tensors[order[k].index].begin = offset;
        offset += s->tensors[order[k].index].nbytes;
    }
    free(order);

    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    if (ok && n_pairs > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        ok = meta != NULL;
        for (int i = 0; ok && i < n_pairs; i++) ok = kv[2 * i] && kv[2 * i + 1] &&
                                                   cJSON_AddStringToObject(meta, kv[2 * i], kv[2 * i + 1]);
    }
    for (int i = 0; ok && i < n; i++) {
        uint64_t shape[ST_MAX_DIMS], range[2] = {s->tensors[i].begin, s->tensors[i].begin + s->tensors[i].nbytes};
        for (int d = 0; d < entries[i].ndim; d++) shape[d] = (uint64_t)entries[i].shape[d];
        cJSON *t = cJSON_AddObjectToObject(root, entries[i].name);
        ok = t && cJSON_AddStringToObject(t, "dtype", entries[i].dtype) &&
             add_uint_array(t, "shape", shape, entries[i].ndim) && add_uint_array(t, "data_offsets", range, 2);
    }
    char *header = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!header) {
        stream_free(s);
        return AGPT_FAIL(AGPT_ERR_OOM, "st_stream %s: out of host memory building the header", path);
    }
    size_t json_len = strlen(header), padded = (8 + json_len + 63) / 64 * 64 - 8;
    s->data_start = 8 + padded;
    s->fd = open(s->tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (s->fd < 0) {
        st = AGPT_FAIL(AGPT_ERR_IO, "cannot create %s: %s", s->tmp, strerror(errno));
        free(header);
        stream_free(s);
        return st;
    }
    uint8_t len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    char *block = malloc(8 + padded);
    if (!block) st = AGPT_FAIL(AGPT_ERR_OOM, "st_stream %s: out of host memory", path);
    if (st == AGPT_OK) {
        memcpy(block, len_bytes, 8);
        memcpy(block + 8, header, json_len);
        memset(block + 8 + json_len, ' ', padded - json_len);  // the format's own padding: JSON whitespace
        st = pwrite_all(s, block, 8 + padded, 0);
    }
    free(block);
    free(header);
    // The full length now, so that unwritten tensors read as zeros and a reader of the tmp file sees every range.
    if (st == AGPT_OK && ftruncate(s->fd, (off_t)(s->data_start + offset)) != 0)
        st = AGPT_FAIL(AGPT_ERR_IO, "cannot size %s to %llu bytes: %s", s->tmp,
                       (unsigned long long)(s->data_start + offset), strerror(errno));
    if (st != AGPT_OK) {
        st_stream_abort(s);
        return st;
    }
    *out = s;
    return AGPT_OK;
}

size_t st_stream_nbytes(const StStream *s, int i) {
    return (s && i >= 0 && i < s->n) ? (size_t)s->tensors[i].nbytes : 0;
}

const char *st_stream_tmp_path(const StStream *s) { return s ? s->tmp : NULL; }

Status st_stream_write(StStream *s, int i, size_t offset, const void *data, size_t nbytes) {
    AGPT_CHECK_ARG(s && i >= 0 && i < s->n, "st_stream_write: no tensor %d", i);
    const StreamTensor *t = &s->tensors[i];
    AGPT_CHECK_ARG(offset <= t->nbytes && nbytes <= t->nbytes - offset,
                   "st_stream_write %s: %zu bytes at %zu run past tensor '%s' (%llu bytes)", s->path, nbytes,
                   offset, t->name, (unsigned long long)t->nbytes);
    return pwrite_all(s, data, nbytes, s->data_start + t->begin + offset);
}

Status st_stream_finish(StStream *s) {
    AGPT_CHECK_ARG(s, "st_stream_finish: NULL stream");
    Status st = AGPT_OK;
    if (fsync(s->fd) != 0) st = AGPT_FAIL(AGPT_ERR_IO, "cannot flush %s: %s", s->tmp, strerror(errno));
    if (close(s->fd) != 0 && st == AGPT_OK) st = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s: %s", s->tmp, strerror(errno));
    s->fd = -1;
    if (st == AGPT_OK && rename(s->tmp, s->path) != 0)
        st = AGPT_FAIL(AGPT_ERR_IO, "cannot rename %s to %s: %s", s->tmp, s->path, strerror(errno));
    if (st != AGPT_OK) {
        st_stream_abort(s);
        return st;
    }
    // The rename is durable only once the folder is synced.
    char *dir_copy = strdup(s->path);
    if (dir_copy) {
        int dfd = open(dirname(dir_copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            (void)fsync(dfd);
            close(dfd);
        }
        free(dir_copy);
    }
    stream_free(s);
    return AGPT_OK;
}
