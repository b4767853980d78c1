#define _DEFAULT_SOURCE  // madvise, DT_ types
#include "runtime/checkpoint.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/dtype.h"
#include "runtime/pth.h"
#include "runtime/safetensors.h"

typedef struct CkptFile {
    char *path;
    PthFile *pth;         // one of the two
    SafeTensors *st;
} CkptFile;

typedef struct CkptEntry {
    int file, index;      // tensor `index` of files[file]
    const char *name;     // owned by the file
} CkptEntry;

struct Checkpoint {
    char *path;
    int n_files;
    CkptFile files[CKPT_MAX_FILES];
    int n;
    CkptEntry *entries;
    int *by_name;         // entry indices sorted by name
};

// ---- opening one file ---------------------------------------------------------------------------------

static Status open_file(const char *path, CkptFile *f) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return AGPT_FAIL(AGPT_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    unsigned char head[9] = {0};
    size_t got = fread(head, 1, sizeof head, fp);
    fclose(fp);
    f->path = strdup(path);
    if (!f->path) return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
    if (got >= 4 && memcmp(head, "PK\x03\x04", 4) == 0) return pth_open(path, &f->pth);
    if (got == 9 && head[8] == '{') return st_open(path, &f->st);
    const char *looks = got == 0                                    ? "an empty file"
                        : got >= 2 && head[0] == 0x80 && head[1] <= 5 ? "a bare pickle (a legacy torch.save file or "
                                                                        "a pickled object, which agpt does not read)"
                        : got >= 2 && head[0] == 0x1f && head[1] == 0x8b ? "a gzip file"
                                                                         : "neither a torch.save zip nor safetensors";
    return AGPT_FAIL(AGPT_ERR_FORMAT, "%s is %s", path, looks);
}

static void close_file(CkptFile *f) {
    pth_close(f->pth);
    st_close(f->st);
    free(f->path);
    memset(f, 0, sizeof *f);
}

static int file_tensor_count(const CkptFile *f) { return f->pth ? pth_count(f->pth) : st_count(f->st); }
static const char *file_tensor_name(const CkptFile *f, int i) { return f->pth ? pth_name(f->pth, i) : st_name(f->st, i); }

// ---- directories --------------------------------------------------------------------------------------

static bool is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static Status add_file(Checkpoint *c, const char *path) {
    for (int i = 0; i < c->n_files; i++)
        if (strcmp(c->files[i].path, path) == 0) return AGPT_OK;
    if (c->n_files == CKPT_MAX_FILES)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: more than %d shard files", c->path, CKPT_MAX_FILES);
    Status s = open_file(path, &c->files[c->n_files]);
    c->n_files++;  // counted even on failure so that ckpt_close frees what was set
    return s;
}

// The shards an index names, each opened once, in first-mention order.
static Status open_index(Checkpoint *c, const char *dir, const char *index_path) {
    FILE *fp = fopen(index_path, "rb");
    if (!fp) return AGPT_FAIL(AGPT_ERR_IO, "cannot open %s: %s", index_path, strerror(errno));
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    if (len < 0 || len > (64L << 20)) {
        fclose(fp);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: %ld bytes is not a plausible index", index_path, len);
    }
    char *text = malloc((size_t)len + 1);
    size_t got = text ? fread(text, 1, (size_t)len, fp) : 0;
    fclose(fp);
    if (!text || got != (size_t)len) {
        free(text);
        return AGPT_FAIL(AGPT_ERR_IO, "cannot read %s", index_path);
    }
    text[len] = 0;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    Status s = AGPT_OK;
    if (!cJSON_IsObject(map))
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: not JSON with a \"weight_map\" object", index_path);
    const cJSON *item, *walk = s == AGPT_OK ? map : NULL;  // the macro below needs a plain name
    char shard_path[4096];
    cJSON_ArrayForEach(item, walk) {
        const char *shard = cJSON_GetStringValue(item);
        if (!shard || !shard[0] || strchr(shard, '/') || strcmp(shard, "..") == 0 || strcmp(shard, ".") == 0) {
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' names shard '%s', which is not a file name in the "
                          "directory", index_path, item->string, shard ? shard : "(not a string)");
            break;
        }
        snprintf(shard_path, sizeof shard_path, "%s/%s", dir, shard);
        if (!is_file(shard_path)) {
            s = AGPT_FAIL(AGPT_ERR_IO, "%s names shard %s, which is missing (an interrupted download?)",
                          index_path, shard_path);
            break;
        }
        if ((s = add_file(c, shard_path))) break;
    }
    // Every tensor the index promises must be in the shard it names.
    walk = s == AGPT_OK ? map : NULL;
    cJSON_ArrayForEach(item, walk) {
        snprintf(shard_path, sizeof shard_path, "%s/%s", dir, cJSON_GetStringValue(item));
        for (int f = 0; f < c->n_files; f++) {
            if (strcmp(c->files[f].path, shard_path) != 0) continue;
            bool found = c->files[f].pth ? pth_find(c->files[f].pth, item->string) >= 0
                                         : st_find(c->files[f].st, item->string) >= 0;
            if (!found) s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s says '%s' is in %s, but it is not there", index_path,
                                      item->string, shard_path);
        }
        if (s) break;
    }
    cJSON_Delete(root);
    return s;
}

static Status open_dir(Checkpoint *c, const char *dir) {
    char path[4096];
    static const char *const indexes[] = {"model.safetensors.index.json", "pytorch_model.bin.index.json"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, indexes[i]);
        if (is_file(path)) return open_index(c, dir, path);
    }
    static const char *const singles[] = {"model.safetensors", "pytorch_model.bin"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, singles[i]);
        if (is_file(path)) return add_file(c, path);
    }
    // No index: every safetensors file, else every pytorch_model*.bin, in name order.
    DIR *d = opendir(dir);
    if (!d) return AGPT_FAIL(AGPT_ERR_IO, "cannot read directory %s: %s", dir, strerror(errno));
    char *names[CKPT_MAX_FILES];
    int n_st = 0, n_bin = 0;
    char *bins[CKPT_MAX_FILES];
    struct dirent *e;
    Status s = AGPT_OK;
    while ((e = readdir(d)) && s == AGPT_OK) {
        bool st = ends_with(e->d_name, ".safetensors");
        bool bin = !st && strncmp(e->d_name, "pytorch_model", 13) == 0 && ends_with(e->d_name, ".bin");
        if (!st && !bin) continue;
        if ((st ? n_st : n_bin) == CKPT_MAX_FILES) {
            s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: more than %d shard files", dir, CKPT_MAX_FILES);
            break;
        }
        char *copy = strdup(e->d_name);
        if (!copy) s = AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
        else if (st) names[n_st++] = copy;
        else bins[n_bin++] = copy;
    }
    closedir(d);
    char **use = n_st ? names : bins;
    int n = n_st ? n_st : n_bin;
    if (s == AGPT_OK && n == 0)
        s = AGPT_FAIL(AGPT_ERR_IO, "%s has no checkpoint: no *.safetensors, pytorch_model*.bin or index file", dir);
    qsort(use, (size_t)n, sizeof *use, cmp_str);
    for (int i = 0; i < n && s == AGPT_OK; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, use[i]);
        s = add_file(c, path);
    }
    for (int i = 0; i < n_st; i++) free(names[i]);
    for (int i = 0; i < n_bin; i++) free(bins[i]);
    return s;
}

// ---- the combined list --------------------------------------------------------------------------------

static const Checkpoint *sort_ctx;
static int cmp_entry_name(const void *a, const void *b) {
    return strcmp(sort_ctx->entries[*(const int *)a].name, sort_ctx->entries[*(const int *)b].name);
}

static Status build_list(Checkpoint *c) {
    int total = 0;
    for (int f = 0; f < c->n_files; f++) total += file_tensor_count(&c->files[f]);
    c->entries = malloc(((size_t)total + 1) * sizeof *c->entries);
    c->by_name = malloc(((size_t)total + 1) * sizeof *c->by_name);
    if (!c->entries || !c->by_name) return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory listing %s", c->path);
    for (int f = 0; f < c->n_files; f++)
        for (int i = 0; i < file_tensor_count(&c->files[f]); i++) {
            c->entries[c->n] = (CkptEntry){f, i, file_tensor_name(&c->files[f], i)};
            c->by_name[c->n] = c->n;
            c->n++;
        }
    sort_ctx = c;  // qsort has no context argument; opening is not done from several threads at once
    qsort(c->by_name, (size_t)c->n, sizeof *c->by_name, cmp_entry_name);
    for (int k = 1; k < c->n; k++) {
        const CkptEntry *a = &c->entries[c->by_name[k - 1]], *b = &c->entries[c->by_name[k]];
        if (strcmp(a->name, b->name) == 0)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "tensor '%s' is in both %s and %s; which one is meant?", a->name,
                             c->files[a->file].path, c->files[b->file].path);
    }
    return AGPT_OK;
}

Status ckpt_open(const char *path, Checkpoint **out) {
    *out = NULL;
    AGPT_CHECK_ARG(path && path[0], "ckpt_open: empty path");
    struct stat sb;
    if (stat(path, &sb) != 0) return AGPT_FAIL(AGPT_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    Checkpoint *c = calloc(1, sizeof *c);
    if (!c || !(c->path = strdup(path))) {
        free(c);
        return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
    }
    Status s = S_ISDIR(sb.st_mode) ? open_dir(c, path) : add_file(c, path);
    if (s == AGPT_OK) s = build_list(c);
    if (s != AGPT_OK) {
        ckpt_close(c);
        return s;
    }
    *out = c;
    return AGPT_OK;
}

void ckpt_close(Checkpoint *c) {
    if (!c) return;
    for (int f = 0; f < c->n_files; f++) close_file(&c->files[f]);
    free(c->entries);
    free(c->by_name);
    free(c->path);
    free(c);
}

int ckpt_count(const Checkpoint *c) { return c ? c->n : 0; }
const char *ckpt_path(const Checkpoint *c) { return c ? c->path : NULL; }
int ckpt_file_count(const Checkpoint *c) { return c ? c->n_files : 0; }
const char *ckpt_file_path(const Checkpoint *c, int file) {
    return c && file >= 0 && file < c->n_files ? c->files[file].path : NULL;
}

int ckpt_find(const Checkpoint *c, const char *name) {
    if (!c || !name) return -1;
    int lo = 0, hi = c->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, cmp = strcmp(c->entries[c->by_name[mid]].name, name);
        if (cmp == 0) return c->by_name[mid];
        if (cmp < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

// ---- tensors ------------------------------------------------------------------------------------------

static const char *pth_dtype_name(const char *storage_type) {
    static const char *const map[][2] = {
        {"FloatStorage", "F32"}, {"HalfStorage", "F16"}, {"BFloat16Storage", "BF16"}, {"DoubleStorage", "F64"},
        {"LongStorage", "I64"},  {"IntStorage", "I32"},  {"ShortStorage", "I16"},     {"CharStorage", "I8"},
        {"ByteStorage", "U8"},   {"BoolStorage", "BOOL"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcmp(storage_type, map[i][0]) == 0) return map[i][1];
    return "?";
}

static bool float_name(const char *dt) {
    return !strcmp(dt, "F32") || !strcmp(dt, "F16") || !strcmp(dt, "BF16") || !strcmp(dt, "F64");
}

Status ckpt_tensor(const Checkpoint *c, int i, CkptTensor *out) {
    AGPT_CHECK_ARG(c && i >= 0 && i < c->n, "ckpt_tensor: no tensor %d", i);
    const CkptEntry *e = &c->entries[i];
    const CkptFile *f = &c->files[e->file];
    memset(out, 0, sizeof *out);
    out->name = e->name;
    out->file = e->file;
    if (f->pth) {
        PthTensorInfo info;
        AGPT_TRY(pth_info(f->pth, e->index, &info));
        out->dtype = pth_dtype_name(info.storage_type);
        out->ndim = info.ndim;
        memcpy(out->shape, info.shape, sizeof out->shape);
        out->numel = info.numel;
    } else {
        StInfo info;
        AGPT_TRY(st_info(f->st, e->index, &info));
        out->dtype = info.dtype;
        out->ndim = info.ndim;
        out->numel = 1;
        for (int d = 0; d < info.ndim; d++) {
            out->shape[d] = info.shape[d];
            out->numel *= info.shape[d];
        }
    }
    out->is_float = float_name(out->dtype);
    return AGPT_OK;
}

uint64_t ckpt_total_bytes(const Checkpoint *c) {
    uint64_t total = 0;
    for (int i = 0; c && i < c->n; i++) {
        const CkptFile *f = &c->files[c->entries[i].file];
        if (f->pth) {
            PthTensorInfo info;
            if (pth_info(f->pth, c->entries[i].index, &info) == AGPT_OK) total += info.nbytes;
        } else {
            StInfo info;
            if (st_info(f->st, c->entries[i].index, &info) == AGPT_OK) total += info.nbytes;
        }
    }
    return total;
}

// Where tensor i's bytes are in the mapping, contiguous or not (for the raw read and the release).
static Status locate(const Checkpoint *c, int i, const void **data, size_t *nbytes, size_t *span, bool *contiguous,
                     int *elem) {
    const CkptEntry *e = &c->entries[i];
    const CkptFile *f = &c->files[e->file];
    if (f->pth) {
        PthTensorInfo info;
        AGPT_TRY(pth_info(f->pth, e->index, &info));
        *data = info.data, *nbytes = info.nbytes, *span = info.span_nbytes, *contiguous = info.contiguous;
        *elem = info.elem_size;
    } else {
        StInfo info;
        AGPT_TRY(st_info(f->st, e->index, &info));
        *data = info.data, *nbytes = *span = info.nbytes, *contiguous = true;
        CkptTensor t;
        AGPT_TRY(ckpt_tensor(c, i, &t));
        *elem = t.numel ? (int)(info.nbytes / (size_t)t.numel) : 1;
    }
    return AGPT_OK;
}

Status ckpt_read_raw(const Checkpoint *c, int i, void *dst, size_t dst_nbytes) {
    AGPT_CHECK_ARG(c && i >= 0 && i < c->n, "ckpt_read_raw: no tensor %d", i);
    const void *data;
    size_t nbytes, span;
    bool contiguous;
    int elem;
    AGPT_TRY(locate(c, i, &data, &nbytes, &span, &contiguous, &elem));
    AGPT_CHECK_ARG(dst_nbytes >= nbytes, "ckpt_read_raw: '%s' needs %zu bytes, the buffer has %zu",
                   c->entries[i].name, nbytes, dst_nbytes);
    const CkptFile *f = &c->files[c->entries[i].file];
    if (!contiguous) return pth_copy_contiguous(f->pth, c->entries[i].index, dst, dst_nbytes);
    memcpy(dst, data, nbytes);
    return AGPT_OK;
}

// Mapped zip entries need not be aligned to their element size (a file re-zipped by Python's zipfile is not);
// such a source is copied to an aligned temporary before typed reads. Returns the pointer to read from.
static const void *aligned_source(const void *p, size_t bytes, int elem, void **tmp) {
    *tmp = NULL;
    if (elem <= 1 || (uintptr_t)p % (uintptr_t)elem == 0) return p;
    *tmp = malloc(bytes ? bytes : 1);
    if (*tmp) memcpy(*tmp, p, bytes);
    return *tmp;
}

static void f64_to(void *dst, DType dt, const double *src, size_t n) {
    for (size_t k = 0; k < n; k++) {
        float v = (float)src[k];
        if (dt == DT_F32) ((float *)dst)[k] = v;
        else if (dt == DT_F16) ((uint16_t *)dst)[k] = f32_to_f16(v);
        else ((uint16_t *)dst)[k] = f32_to_bf16(v);
    }
}

Status ckpt_read(const Checkpoint *c, int i, DType dtype, void *dst, size_t dst_nbytes) {
    CkptTensor t;
    AGPT_TRY(ckpt_tensor(c, i, &t));
    size_t n = (size_t)t.numel;
    int src_dt = !strcmp(t.dtype, "F32") ? DT_F32 : !strcmp(t.dtype, "F16") ? DT_F16
               : !strcmp(t.dtype, "BF16") ? DT_BF16 : !strcmp(t.dtype, "I32") ? DT_I32
               : !strcmp(t.dtype, "U8") ? DT_U8 : -1;
    bool f64 = !strcmp(t.dtype, "F64");
    bool float_out = dtype == DT_F32 || dtype == DT_F16 || dtype == DT_BF16;
    if (!(t.is_float && float_out) && src_dt != (int)dtype)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: tensor '%s' is %s, which cannot be read as %s",
                         c->files[t.file].path, t.name, t.dtype, dtype_name(dtype));
    AGPT_CHECK_ARG(dst_nbytes >= n * dtype_size(dtype), "ckpt_read: '%s' needs %zu bytes, the buffer has %zu",
                   t.name, n * dtype_size(dtype), dst_nbytes);
    const void *data;
    size_t nbytes, span;
    bool contiguous;
    int elem;
    AGPT_TRY(locate(c, i, &data, &nbytes, &span, &contiguous, &elem));
    void *tmp = NULL;
    if (!contiguous) {  // gathered first; rare in state dicts (a transposed view saved as it was)
        tmp = malloc(nbytes ? nbytes : 1);
        if (!tmp) return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory gathering '%s' (%zu bytes)", t.name, nbytes);
        Status s = ckpt_read_raw(c, i, tmp, nbytes);
        if (s) {
            free(tmp);
            return s;
        }
        data = tmp;
    }
    void *bounce = NULL;
    if (!(src_dt == (int)dtype && !f64) && !(data = aligned_source(data, nbytes, elem, &bounce))) {
        free(tmp);
        return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory aligning '%s'", t.name);
    }
    Status s = AGPT_OK;
    if (f64) f64_to(dst, dtype, data, n);
    else if (src_dt == (int)dtype) memcpy(dst, data, nbytes);
    else if (convert_host(dst, dtype, data, (DType)src_dt, n) != 0)
        s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "'%s': no conversion from %s to %s", t.name, t.dtype, dtype_name(dtype));
    free(bounce);
    free(tmp);
    return s;
}

// Whole pages inside [data, data + n): a page shared with a neighbour is left for the neighbour.
// MADV_PAGEOUT reclaims clean file pages and keeps the contents of anything else (an inflated DEFLATE
// entry lives in heap memory, where MADV_DONTNEED would zero it); it is advice, so errors are ignored.
static void release_bytes(const void *data, size_t n) {
#ifdef MADV_PAGEOUT
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t begin = ((uintptr_t)data + page - 1) / page * page, end = ((uintptr_t)data + n) / page * page;
    if (end > begin) (void)madvise((void *)begin, end - begin, MADV_PAGEOUT);
#else
    (void)data, (void)n;
#endif
}

Status ckpt_read_part(const Checkpoint *c, int i, DType dtype, int64_t first, int64_t count, void *dst) {
    CkptTensor t;
    AGPT_TRY(ckpt_tensor(c, i, &t));
    AGPT_CHECK_ARG(first >= 0 && count >= 0 && first + count <= t.numel, "ckpt_read_part: elements [%lld, +%lld) of "
                   "'%s' (%lld)", (long long)first, (long long)count, t.name, (long long)t.numel);
    bool float_out = dtype == DT_F32 || dtype == DT_F16 || dtype == DT_BF16;
    int src_dt = !strcmp(t.dtype, "F32") ? DT_F32 : !strcmp(t.dtype, "F16") ? DT_F16 : !strcmp(t.dtype, "BF16") ? DT_BF16 : -1;
    const void *data;
    size_t nbytes, span;
    bool contiguous;
    int elem;
    AGPT_TRY(locate(c, i, &data, &nbytes, &span, &contiguous, &elem));
    if (!contiguous || src_dt < 0 || !float_out)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "'%s' (%s%s) cannot be read in parts", t.name, t.dtype,
                         contiguous ? "" : ", not contiguous");
    const char *from = (const char *)data + (size_t)first * (size_t)elem;
    size_t bytes = (size_t)count * (size_t)elem;
    Status s = AGPT_OK;
    if (src_dt == (int)dtype) {
        memcpy(dst, from, bytes);
    } else {
        void *bounce;
        const void *src = aligned_source(from, bytes, elem, &bounce);
        if (!src) return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory aligning '%s'", t.name);
        if (convert_host(dst, dtype, src, (DType)src_dt, (size_t)count) != 0)
            s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "'%s': no conversion from %s to %s", t.name, t.dtype, dtype_name(dtype));
        free(bounce);
    }
    release_bytes(from, bytes);
    return s;
}

void ckpt_release(const Checkpoint *c, int i) {
    if (!c || i < 0 || i >= c->n) return;
    const void *data;
    size_t nbytes, span;
    bool contiguous;
    int elem;
    if (locate(c, i, &data, &nbytes, &span, &contiguous, &elem) != AGPT_OK || span == 0) return;
    release_bytes(data, span);
}
