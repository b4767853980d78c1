#include "runtime/tensor.h"

#include <stdio.h>

const char *device_name(Device d) { return d == DEV_CUDA ? "cuda" : "cpu"; }

Tensor tensor_make(void *data, DType dtype, Device device, int ndim, const int64_t *shape) {
    Tensor t = {.data = data, .dtype = dtype, .device = device, .ndim = ndim};
    for (int i = 0; i < TENSOR_MAX_DIMS; i++) t.shape[i] = (i < ndim) ? shape[i] : 1;
    return t;
}

Tensor tensor_1d(void *data, DType dt, Device dev, int64_t d0) {
    return tensor_make(data, dt, dev, 1, (int64_t[]){d0});
}
Tensor tensor_2d(void *data, DType dt, Device dev, int64_t d0, int64_t d1) {
    return tensor_make(data, dt, dev, 2, (int64_t[]){d0, d1});
}
Tensor tensor_3d(void *data, DType dt, Device dev, int64_t d0, int64_t d1, int64_t d2) {
    return tensor_make(data, dt, dev, 3, (int64_t[]){d0, d1, d2});
}
Tensor tensor_4d(void *data, DType dt, Device dev, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    return tensor_make(data, dt, dev, 4, (int64_t[]){d0, d1, d2, d3});
}

int64_t tensor_numel(const Tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

size_t tensor_nbytes(const Tensor *t) { return (size_t)tensor_numel(t) * dtype_size(t->dtype); }

int64_t tensor_cols(const Tensor *t) { return t->ndim > 0 ? t->shape[t->ndim - 1] : 1; }

int64_t tensor_rows(const Tensor *t) {
    int64_t cols = tensor_cols(t);
    return cols ? tensor_numel(t) / cols : 0;
}

bool tensor_same_shape(const Tensor *a, const Tensor *b) {
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

const char *tensor_describe(const Tensor *t, char *buf, int buf_size) {
    int n = snprintf(buf, (size_t)buf_size, "%s[", dtype_name(t->dtype));
    for (int i = 0; i < t->ndim && n < buf_size; i++)
        n += snprintf(buf + n, (size_t)(buf_size - n), i ? ",%lld" : "%lld", (long long)t->shape[i]);
    if (n < buf_size) snprintf(buf + n, (size_t)(buf_size - n), "]@%s", device_name(t->device));
    return buf;
}

Status tensor_reshape(const Tensor *t, int ndim, const int64_t *shape, Tensor *out) {
    AGPT_CHECK_ARG(ndim >= 1 && ndim <= TENSOR_MAX_DIMS, "reshape to %d dims (1..4 allowed)", ndim);
    Tensor r = tensor_make(t->data, t->dtype, t->device, ndim, shape);
    char a[96];
    AGPT_CHECK_ARG(tensor_numel(&r) == tensor_numel(t), "reshape of %s to %lld elements",
                   tensor_describe(t, a, sizeof a), (long long)tensor_numel(&r));
    *out = r;
    return AGPT_OK;
}

Tensor tensor_rows_view(const Tensor *t, int64_t row0, int64_t nrows) {
    int64_t cols = tensor_cols(t);
    char *base = (char *)t->data + (size_t)(row0 * cols) * dtype_size(t->dtype);
    return tensor_2d(base, t->dtype, t->device, nrows, cols);
}
