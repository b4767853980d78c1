// A tensor is a view: data pointer, dtype, shape (up to 4 dims, row-major, contiguous), device.
// It never owns its memory; whoever allocated the data (an Arena, a mmap, a malloc) frees it.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "runtime/dtype.h"
#include "runtime/status.h"

#define TENSOR_MAX_DIMS 4

typedef enum Device { DEV_CPU = 0, DEV_CUDA = 1 } Device;

typedef struct Tensor {
    void *data;
    DType dtype;
    Device device;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
} Tensor;

const char *device_name(Device d);

// Builds a view; unused trailing dims are 1. Shape values must be >= 0.
Tensor tensor_make(void *data, DType dtype, Device device, int ndim, const int64_t *shape);
Tensor tensor_1d(void *data, DType dt, Device dev, int64_t d0);
Tensor tensor_2d(void *data, DType dt, Device dev, int64_t d0, int64_t d1);
Tensor tensor_3d(void *data, DType dt, Device dev, int64_t d0, int64_t d1, int64_t d2);
Tensor tensor_4d(void *data, DType dt, Device dev, int64_t d0, int64_t d1, int64_t d2, int64_t d3);

int64_t tensor_numel(const Tensor *t);
size_t tensor_nbytes(const Tensor *t);
// Size of the last dimension, and the product of all others ("rows").
int64_t tensor_cols(const Tensor *t);
int64_t tensor_rows(const Tensor *t);
bool tensor_same_shape(const Tensor *a, const Tensor *b);
// "f32[257,1280]@cpu" into buf; returns buf.
const char *tensor_describe(const Tensor *t, char *buf, int buf_size);
// A view of the same data with another shape of equal element count.
Status tensor_reshape(const Tensor *t, int ndim, const int64_t *shape, Tensor *out);
// Rows [row0, row0+nrows) of the tensor viewed as [rows, cols].
Tensor tensor_rows_view(const Tensor *t, int64_t row0, int64_t nrows);
