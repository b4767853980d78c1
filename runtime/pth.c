// torch.save checkpoint reader: the file (runtime/mapped_file.c), the zip container (runtime/zip.c), the
// archive's layout, and the accessors. The pickle inside is read by runtime/pickle.c, which executes nothing.
// Everything in the file is untrusted, and a bad file yields a message naming the file and what is wrong,
// never a crash.
#define _POSIX_C_SOURCE 200809L  // strdup under -std=c11

#include "runtime/pth.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/mapped_file.h"
#include "runtime/pickle.h"
#include "runtime/text.h"
#include "runtime/zip.h"

// ---------------------------------------------------------------------------------------------------------
// The opened file.

struct PthFile {
    char *path;                      // for messages: the file path, or "<memory>"
    const uint8_t *base;             // the whole file (map.data) or the caller's buffer
    size_t size;
    MappedFile map;                  // unmapped on close; empty for pth_open_memory
    Zip *zip;
    char *prefix;                    // the archive's top folder, e.g. "archive"
    PthTensor *tensors;              // [n] in pickle order
    int n;
    int *by_name;                    // [n] indices sorted by (name, index)
};

static Status oom(const PthFile *f, const char *what) {
    return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory while reading %s", f->path, what);
}

// A merge sort of tensor indices by (name, index): qsort has no context argument in C11, and ties must keep
// pickle order so that pth_find returns the first of two tensors with one name.
static int cmp_names(const PthFile *f, int x, int y) {
    int c = strcmp(f->tensors[x].name, f->tensors[y].name);
    return c ? c : (x > y) - (x < y);
}

static void sort_names(const PthFile *f, int *v, int *tmp, int n) {
    if (n < 2) return;
    int h = n / 2, i = 0, j = h, k = 0;
    sort_names(f, v, tmp, h);
    sort_names(f, v + h, tmp, n - h);
    while (i < h && j < n) tmp[k++] = cmp_names(f, v[i], v[j]) < 0 ? v[i++] : v[j++];
    while (i < h) tmp[k++] = v[i++];
    while (j < n) tmp[k++] = v[j++];
    memcpy(v, tmp, (size_t)n * sizeof *v);
}

// ---------------------------------------------------------------------------------------------------------
// The archive.

static const uint8_t legacy_magic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

static Status read_small_entry(PthFile *f, const char *leaf, char *buf, size_t cap, bool *found) {
    size_t len = strlen(f->prefix) + strlen(leaf) + 2;
    char *name = malloc(len);
    if (!name) return oom(f, "the archive");
    snprintf(name, len, "%s/%s", f->prefix, leaf);
    int e = zip_find(f->zip, name);
    free(name);
    *found = e >= 0;
    buf[0] = 0;
    if (e < 0) return AGPT_OK;
    const uint8_t *data;
    size_t size;
    AGPT_TRY(zip_data(f->zip, e, &data, &size));
    if (size >= cap) size = cap - 1;
    memcpy(buf, data, size);
    buf[size] = 0;
    return AGPT_OK;
}

// Storage `key` is zip entry <prefix>/data/<key>.
static Status load_storage(void *ctx, const char *key, const uint8_t **data, size_t *size) {
    PthFile *f = ctx;
    char kb[SHOWN_MAX];
    size_t len = strlen(f->prefix) + strlen(key) + 8;
    char *name = malloc(len);
    if (!name) return oom(f, "the archive");
    snprintf(name, len, "%s/data/%s", f->prefix, key);
    int e = zip_find(f->zip, name);
    free(name);
    if (e < 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the pickle uses storage '%s', but the archive has no entry "
                         "%s/data/%s; the file is incomplete or corrupt", f->path, shown(key, kb), f->prefix,
                         kb);
    return zip_data(f->zip, e, data, size);
}

static Status parse_file(PthFile *f) {
    if (f->size >= sizeof legacy_magic && memcmp(f->base, legacy_magic, sizeof legacy_magic) == 0)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: legacy torch format (torch < 1.6, or "
                         "_use_new_zipfile_serialization=False) not supported yet; re-save it with torch >= 1.6 "
                         "(torch.save(torch.load(p), p)) or convert it to safetensors", f->path);
    if (f->size >= 262 && memcmp(f->base + 257, "ustar", 5) == 0)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: the tar checkpoint format of torch < 0.4 is not supported; "
                         "re-save it with torch >= 1.6 or convert it to safetensors", f->path);
    if (f->size < 4 || memcmp(f->base, "PK\x03\x04", 4) != 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: not a zip archive, so not a torch.save checkpoint (a safetensors "
                         "or GGUF file, or corrupt?)", f->path);
    AGPT_TRY(zip_open(f->base, f->size, f->path, &f->zip));

    // The pickle: the first "<prefix>/data.pkl" whose prefix is one folder.
    int pkl = -1;
    for (int i = 0; i < zip_count(f->zip) && pkl < 0; i++) {
        const char *name = zip_entry(f->zip, i)->name, *slash = strchr(name, '/');
        if (slash && slash != name && strcmp(slash, "/data.pkl") == 0) pkl = i;
    }
    if (pkl < 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: a zip archive without <folder>/data.pkl; not a torch.save "
                         "checkpoint", f->path);
    const char *pkl_name = zip_entry(f->zip, pkl)->name;
    size_t plen = (size_t)(strchr(pkl_name, '/') - pkl_name);
    if (!(f->prefix = malloc(plen + 1))) return oom(f, "the archive");
    memcpy(f->prefix, pkl_name, plen);
    f->prefix[plen] = 0;

    char text[32];
    bool found = false;
    AGPT_TRY(read_small_entry(f, "byteorder", text, sizeof text, &found));
    if (found && strcmp(text, "little") != 0) {
        char tb[SHOWN_MAX];
        return AGPT_FAIL(strcmp(text, "big") == 0 ? AGPT_ERR_UNSUPPORTED : AGPT_ERR_FORMAT,
                         "%s: byteorder is '%s'; only little-endian checkpoints are read (re-save it on a "
                         "little-endian machine)", f->path, shown(text, tb));
    }

    const uint8_t *pickle;
    size_t pickle_len;
    AGPT_TRY(zip_data(f->zip, pkl, &pickle, &pickle_len));
    if (pickle_len > PTH_MAX_PICKLE_BYTES)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: %s is %zu bytes, over the %llu-byte limit (a state dict of "
                         "10,000 tensors takes about 2 MB); not a state dict, or corrupt", f->path, pkl_name,
                         pickle_len, (unsigned long long)PTH_MAX_PICKLE_BYTES);
    size_t what_len = strlen(f->path) + strlen(pkl_name) + 3;
    char *what = malloc(what_len);
    if (!what) return oom(f, "the archive");
    snprintf(what, what_len, "%s: %s", f->path, pkl_name);
    Status s = pth_pickle_load(pickle, pickle_len, what, load_storage, f, &f->tensors, &f->n);
    free(what);
    AGPT_TRY(s);

    f->by_name = malloc(((size_t)f->n + 1) * sizeof *f->by_name);
    int *tmp = malloc(((size_t)f->n + 1) * sizeof *tmp);
    if (!f->by_name || !tmp) {
        free(tmp);
        return oom(f, "the tensor list");
    }
    for (int i = 0; i < f->n; i++) f->by_name[i] = i;
    sort_names(f, f->by_name, tmp, f->n);
    free(tmp);
    return AGPT_OK;
}

Status pth_open_memory(const void *buf, size_t len, PthFile **out) {
    AGPT_CHECK_ARG(out != NULL, "pth_open_memory: out is NULL");
    *out = NULL;
    AGPT_CHECK_ARG(buf != NULL || len == 0, "pth_open_memory: buffer is NULL but length is %zu", len);
    PthFile *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup("<memory>"))) {
        free(f);
        return AGPT_FAIL(AGPT_ERR_OOM, "<memory>: out of host memory");
    }
    f->base = buf;
    f->size = len;
    Status s = parse_file(f);
    if (s != AGPT_OK) {
        pth_close(f);
        return s;
    }
    *out = f;
    return AGPT_OK;
}

Status pth_open(const char *path, PthFile **out) {
    AGPT_CHECK_ARG(out != NULL, "pth_open: out is NULL");
    *out = NULL;
    AGPT_CHECK_ARG(path != NULL, "pth_open: path is NULL");
    MappedFile map;
    AGPT_TRY(mapped_file_open(path, "a .pt/.pth/.bin checkpoint", &map));
    PthFile *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        mapped_file_close(&map);
        return AGPT_FAIL(AGPT_ERR_OOM, "%s: out of host memory", path);
    }
    f->map = map;
    f->base = map.data;
    f->size = map.size;
    Status s = parse_file(f);
    if (s != AGPT_OK) {
        pth_close(f);
        return s;
    }
    *out = f;
    return AGPT_OK;
}

void pth_close(PthFile *f) {
    if (!f) return;
    pth_tensors_free(f->tensors, f->n);
    free(f->by_name);
    free(f->prefix);
    zip_close(f->zip);  // after the tensors: inflated storages belong to the zip
    mapped_file_close(&f->map);
    free(f->path);
    free(f);
}

int pth_count(const PthFile *f) { return f ? f->n : 0; }

const char *pth_name(const PthFile *f, int i) { return (f && i >= 0 && i < f->n) ? f->tensors[i].name : NULL; }

int pth_find(const PthFile *f, const char *name) {
    if (!f || !name) return -1;
    int lo = 0, hi = f->n;  // the first (name, index) >= name
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (strcmp(f->tensors[f->by_name[mid]].name, name) < 0) lo = mid + 1;
        else hi = mid;
    }
    return (lo < f->n && strcmp(f->tensors[f->by_name[lo]].name, name) == 0) ? f->by_name[lo] : -1;
}

static bool is_supported(const PthTensor *t) {
    return pth_storage_types[t->type].dtype >= 0 && t->contiguous && t->ndim <= TENSOR_MAX_DIMS;
}

Status pth_info(const PthFile *f, int i, PthTensorInfo *out) {
    AGPT_CHECK_ARG(f && out, "pth_info: NULL argument");
    AGPT_CHECK_ARG(i >= 0 && i < f->n, "pth_info %s: tensor index %d out of range (0..%d)", f->path, i, f->n - 1);
    const PthTensor *t = &f->tensors[i];
    const PthStorageType *st = &pth_storage_types[t->type];
    memset(out, 0, sizeof *out);
    out->name = t->name;
    out->storage_type = st->name;
    out->dtype = st->dtype;
    out->elem_size = st->elem_size;
    out->supported = is_supported(t);
    out->contiguous = t->contiguous;
    out->parameter = t->parameter;
    out->ndim = t->ndim;
    for (int d = 0; d < t->ndim; d++) out->shape[d] = t->shape[d], out->stride[d] = t->stride[d];
    out->numel = t->numel;
    out->storage_offset = t->offset;
    out->storage = t->storage;
    out->storage_nbytes = t->storage_nbytes;
    // An empty tensor may start at the storage's end; it addresses no bytes.
    out->data = t->storage + (t->numel ? (size_t)t->offset * (size_t)st->elem_size : 0);
    out->nbytes = (size_t)t->numel * (size_t)st->elem_size;
    out->span_nbytes = t->span_nbytes;
    return AGPT_OK;
}

Status pth_get(const PthFile *f, const char *name, Tensor *out) {
    AGPT_CHECK_ARG(f && name && out, "pth_get: NULL argument");
    char nb[SHOWN_MAX];
    int i = pth_find(f, name);
    AGPT_CHECK_ARG(i >= 0, "%s has no tensor '%s'", f->path, shown(name, nb));
    PthTensorInfo info;
    AGPT_TRY(pth_info(f, i, &info));
    if (!info.supported) {
        char sb[160];
        size_t n = (size_t)snprintf(sb, sizeof sb, "[");
        for (int d = 0; d < info.ndim && n < sizeof sb; d++)
            n += (size_t)snprintf(sb + n, sizeof sb - n, d ? ",%lld" : "%lld", (long long)info.shape[d]);
        if (n < sizeof sb) snprintf(sb + n, sizeof sb - n, "]");
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: tensor '%s' (%s %s) %s; read it with pth_copy_contiguous",
                         f->path, shown(name, nb), info.storage_type, sb,
                         info.dtype < 0 ? "has no agpt dtype"
                         : !info.contiguous ? "is not contiguous"
                                            : "has more dims than a Tensor holds");
    }
    *out = tensor_make((void *)info.data, (DType)info.dtype, DEV_CPU, info.ndim, info.shape);
    return AGPT_OK;
}

Status pth_copy_contiguous(const PthFile *f, int i, void *dst, size_t dst_nbytes) {
    PthTensorInfo info;
    AGPT_TRY(pth_info(f, i, &info));
    char nb[SHOWN_MAX];
    AGPT_CHECK_ARG(dst || info.nbytes == 0, "pth_copy_contiguous: dst is NULL");
    AGPT_CHECK_ARG(dst_nbytes >= info.nbytes, "pth_copy_contiguous %s: tensor '%s' needs %zu bytes, dst holds %zu",
                   f->path, shown(info.name, nb), info.nbytes, dst_nbytes);
    if (info.numel == 0) return AGPT_OK;
    size_t es = (size_t)info.elem_size;
    if (info.contiguous) {
        memcpy(dst, info.data, info.nbytes);
        return AGPT_OK;
    }
    // Odometer over the index; every element was checked to lie inside the storage at open.
    int64_t idx[PTH_MAX_DIMS] = {0};
    const uint8_t *src = info.data;
    uint8_t *out = dst;
    for (int64_t k = 0; k < info.numel; k++) {
        int64_t off = 0;
        for (int d = 0; d < info.ndim; d++) off += idx[d] * info.stride[d];
        memcpy(out + (size_t)k * es, src + (size_t)off * es, es);
        for (int d = info.ndim - 1; d >= 0; d--) {
            if (++idx[d] < info.shape[d]) break;
            idx[d] = 0;
        }
    }
    return AGPT_OK;
}
