#include "model/weights.h"

#include <stdarg.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/memory.h"

void weights_init(WeightStore *w, Engine *e, DType dtype, const SafeTensors *file, const char *file_name) {
    memset(w, 0, sizeof *w);
    w->engine = e;
    w->dtype = e->device == DEV_CPU ? DT_F32 : dtype;  // the CPU backend computes in f32 whatever is asked
    w->matrix_dtype = w->dtype;
    w->file_name = file_name ? file_name : "model";
    w->files[0] = file;
    w->file_names[0] = w->file_name;
    w->n_files = file ? 1 : 0;  // no file: a store for generated weights (weights_upload only)
}

Status weights_add_file(WeightStore *w, const SafeTensors *file, const char *file_name) {
    if (w->n_files == WEIGHT_MAX_FILES)
        return AGPT_FAIL(AGPT_ERR_ARG, "at most %d weight files can be layered", WEIGHT_MAX_FILES);
    w->files[w->n_files] = file;
    w->file_names[w->n_files++] = file_name ? file_name : "weights";
    return AGPT_OK;
}

// The file holding `name` (the first in search order) and the tensor's index there; -1 when none has it.
static int find(const WeightStore *w, const char *name, int *index) {
    for (int f = 0; f < w->n_files; f++) {
        int i = st_find(w->files[f], name);
        if (i >= 0) {
            *index = i;
            return f;
        }
    }
    return -1;
}

const char *weights_meta(const WeightStore *w, const char *key) {
    for (int f = 0; f < w->n_files; f++) {
        const char *v = st_metadata(w->files[f], key);
        if (v) return v;
    }
    return NULL;
}

void weights_free(WeightStore *w) {
    for (int i = 0; i < w->n_allocations; i++) {
        if (w->engine->device == DEV_CUDA) mem_device_free(w->allocations[i]);
        else mem_host_free(w->allocations[i]);
    }
    free(w->allocations);
    memset(w, 0, sizeof *w);
}

static Status track(WeightStore *w, void *p) {
    if (w->n_allocations == w->cap_allocations) {
        int cap = w->cap_allocations ? 2 * w->cap_allocations : 64;
        void **grown = realloc(w->allocations, (size_t)cap * sizeof *grown);
        if (!grown) return AGPT_FAIL(AGPT_ERR_OOM, "no memory to track %d weight tensors", cap);
        w->allocations = grown;
        w->cap_allocations = cap;
    }
    w->allocations[w->n_allocations++] = p;
    return AGPT_OK;
}

// A device tensor of dtype dt (the store's, or its matrix dtype), filled from host data of dtype src_dt
// (converted on the host).
static Status upload_converted(WeightStore *w, DType dt, const void *src, DType src_dt, int ndim,
                               const int64_t *shape, Tensor *out) {
    Tensor t = tensor_make(NULL, dt, w->engine->device, ndim, shape);
    size_t n = (size_t)tensor_numel(&t), bytes = tensor_nbytes(&t);
    void *staging = NULL;
    AGPT_TRY(mem_host_alloc(bytes, &staging));
    if (convert_host(staging, dt, src, src_dt, n) != 0) {
        mem_host_free(staging);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "cannot convert %s weights to %s", dtype_name(src_dt), dtype_name(dt));
    }
    if (w->engine->device == DEV_CPU) {
        t.data = staging;
    } else {
        Status s = mem_device_alloc(bytes, &t.data);
        if (s == AGPT_OK) {
            Tensor host = t;
            host.data = staging;
            host.device = DEV_CPU;
            s = tensor_copy(&t, &host);
            if (s != AGPT_OK) mem_device_free(t.data);
        }
        mem_host_free(staging);
        if (s != AGPT_OK) return s;
    }
    Status s = track(w, t.data);
    if (s != AGPT_OK) {
        if (w->engine->device == DEV_CUDA) mem_device_free(t.data);
        else mem_host_free(t.data);
        return s;
    }
    w->bytes += bytes;
    *out = t;
    return AGPT_OK;
}

static Status load_as(WeightStore *w, DType dt, const char *name, int ndim, const int64_t *shape, Tensor *out) {
    Tensor file_t;
    int index, f = find(w, name, &index);
    if (f < 0) {
        char files[512];
        int n = 0;
        files[0] = 0;
        for (int i = 0; i < w->n_files && n < (int)sizeof files; i++)
            n += snprintf(files + n, sizeof files - (size_t)n, "%s%s", i ? ", " : "", w->file_names[i]);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "tensor '%s' is in none of: %s; is this a model file of the right kind?",
                         name, files);
    }
    const char *file_name = w->file_names[f];
    AGPT_TRY(st_get(w->files[f], name, &file_t));
    char d[96];
    bool ok = file_t.ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = shape[i] < 0 || shape[i] == file_t.shape[i];
    if (!ok) {
        char want[96];
        int n = snprintf(want, sizeof want, "[");
        for (int i = 0; i < ndim && n < (int)sizeof want; i++)
            n += snprintf(want + n, sizeof want - (size_t)n, shape[i] < 0 ? "%s*" : "%s%lld", i ? "," : "",
                          (long long)shape[i]);
        if (n < (int)sizeof want) snprintf(want + n, sizeof want - (size_t)n, "]");
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' is %s, expected %s", file_name, name,
                         tensor_describe(&file_t, d, sizeof d), want);
    }
    if (!dtype_is_float(file_t.dtype))
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' is %s; weights must be f32, f16 or bf16", file_name,
                         name, tensor_describe(&file_t, d, sizeof d));
    // A file from elsewhere may place a tensor at an offset unaligned for its type: read it through an
    // aligned copy then, since the conversion loads whole elements.
    const void *src = file_t.data;
    void *aligned = NULL;
    if ((uintptr_t)src % dtype_size(file_t.dtype) != 0) {
        AGPT_TRY(mem_host_alloc(tensor_nbytes(&file_t), &aligned));
        memcpy(aligned, src, tensor_nbytes(&file_t));
        src = aligned;
    }
    Status s = upload_converted(w, dt, src, file_t.dtype, file_t.ndim, file_t.shape, out);
    mem_host_free(aligned);
    if (s != AGPT_OK) return agpt_add_context(s, "%s: loading '%s'", file_name, name);
    return AGPT_OK;
}

Status weights_load(WeightStore *w, const char *name, int ndim, const int64_t *shape, Tensor *out) {
    return load_as(w, w->dtype, name, ndim, shape, out);
}

Status weights_loadf(WeightStore *w, int ndim, const int64_t *shape, Tensor *out, const char *fmt, ...) {
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return weights_load(w, name, ndim, shape, out);
}

Status weights_set_matrix_dtype(WeightStore *w, DType dt) {
    if (w->engine->device != DEV_CPU) return AGPT_OK;  // CUDA keeps every weight in the compute dtype
    AGPT_CHECK_ARG(dt == DT_F32 || dt == DT_BF16 || dt == DT_F16, "weights: CPU weight matrices can be f32, bf16 "
                   "or f16, not %s", dtype_name(dt));
    w->matrix_dtype = dt;
    return AGPT_OK;
}

Status weights_load_matrix(WeightStore *w, const char *name, int ndim, const int64_t *shape, Tensor *out) {
    return load_as(w, w->matrix_dtype, name, ndim, shape, out);
}

Status weights_loadf_matrix(WeightStore *w, int ndim, const int64_t *shape, Tensor *out, const char *fmt, ...) {
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return weights_load_matrix(w, name, ndim, shape, out);
}

Status weights_upload_matrix(WeightStore *w, const float *host, int ndim, const int64_t *shape, Tensor *out) {
    return upload_converted(w, w->matrix_dtype, host, DT_F32, ndim, shape, out);
}

bool weights_has(const WeightStore *w, const char *name) {
    int index;
    return find(w, name, &index) >= 0;
}

int64_t weights_dim(const WeightStore *w, const char *name, int dim) {
    int i, f = find(w, name, &i);
    StInfo info;
    if (f < 0 || st_info(w->files[f], i, &info) != AGPT_OK || dim < 0 || dim >= info.ndim) return -1;
    return info.shape[dim];
}

Status weights_read_f32(const WeightStore *w, const char *name, float **data, int *ndim, int64_t shape[8]) {
    *data = NULL;
    int i, f = find(w, name, &i);
    if (f < 0) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' is missing", w->file_name, name);
    StInfo info;
    AGPT_TRY(st_info(w->files[f], i, &info));
    int src_dt = strcmp(info.dtype, "F32") == 0 ? DT_F32 : strcmp(info.dtype, "F16") == 0 ? DT_F16
               : strcmp(info.dtype, "BF16") == 0 ? DT_BF16 : -1;
    if (src_dt < 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' has dtype %s; expected F32, F16 or BF16", w->file_name,
                         name, info.dtype);
    size_t n = 1;
    for (int d = 0; d < info.ndim; d++) n *= (size_t)info.shape[d];
    float *buf = NULL;
    AGPT_TRY(mem_host_alloc(n * sizeof(float), (void **)&buf));
    // The file's bytes may be unaligned for their type; convert through an aligned copy.
    void *aligned = NULL;
    Status s = mem_host_alloc(info.nbytes, &aligned);
    if (s != AGPT_OK) {
        mem_host_free(buf);
        return s;
    }
    memcpy(aligned, info.data, info.nbytes);
    convert_host(buf, DT_F32, aligned, (DType)src_dt, n);
    mem_host_free(aligned);
    *ndim = info.ndim;
    for (int d = 0; d < info.ndim && d < 8; d++) shape[d] = info.shape[d];
    *data = buf;
    return AGPT_OK;
}

Status weights_upload(WeightStore *w, const float *host, int ndim, const int64_t *shape, Tensor *out) {
    return upload_converted(w, w->dtype, host, DT_F32, ndim, shape, out);
}

Status weights_meta_int(const WeightStore *w, const char *key, int fallback, int *out) {
    const char *v = weights_meta(w, key);
    if (!v) {
        *out = fallback;
        return AGPT_OK;
    }
    char *end = NULL;
    long x = strtol(v, &end, 10);
    if (end == v || *end != 0 || x < 0 || x > 1 << 30)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata '%s' = '%s' is not a non-negative integer", w->file_name, key, v);
    *out = (int)x;
    return AGPT_OK;
}

Status weights_meta_float(const WeightStore *w, const char *key, float fallback, float *out) {
    const char *v = weights_meta(w, key);
    if (!v) {
        *out = fallback;
        return AGPT_OK;
    }
    char *end = NULL;
    double x = strtod(v, &end);
    if (end == v || *end != 0 || !isfinite(x) || x <= 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata '%s' = '%s' is not a positive number", w->file_name, key, v);
    *out = (float)x;
    return AGPT_OK;
}
