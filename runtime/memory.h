// Host and device memory. Device memory is plain cudaMalloc, never managed memory.
// Every failure says how many bytes were asked for and what to try.
#pragma once
#include <stddef.h>

#include "runtime/tensor.h"

#define AGPT_ALIGN 64  // bytes: a cache line, and enough for any vector load

Status mem_host_alloc(size_t bytes, void **out);      // aligned to AGPT_ALIGN, uninitialised
void mem_host_free(void *p);
Status mem_pinned_alloc(size_t bytes, void **out);    // page-locked when CUDA exists, else aligned host
void mem_pinned_free(void *p);
Status mem_device_alloc(size_t bytes, void **out);    // cudaMalloc on the current device
void mem_device_free(void *p);

// Sets every byte of the tensor to zero, on any device.
Status tensor_zero(Tensor *t);
// Copies between any two devices; sizes must match and dtypes must be equal.
Status tensor_copy(Tensor *dst, const Tensor *src);

// Number of CUDA devices usable by this process: 0 without CUDA, without a driver or without a GPU.
int cuda_device_count(void);
// True when this library was compiled with the CUDA backend.
int cuda_compiled(void);
// Name and memory of device i ("" and 0 when none).
Status cuda_device_info(int index, char *name, int name_size, size_t *total_bytes);
Status cuda_synchronize(void);

// An arena: one allocation made up front (activations, scratch), handed out in aligned pieces.
// Nothing is allocated in hot loops: size the arena from the config and batch first.
typedef struct Arena {
    Device device;
    char *base;
    size_t capacity;  // bytes
    size_t used;      // bytes handed out so far
    size_t peak;      // the most ever used, to size the next run
} Arena;

Status arena_init(Arena *a, Device device, size_t capacity);
void arena_free(Arena *a);
// Carves a tensor of the given dtype and shape; fails with the sizes when the arena is too small.
Status arena_tensor(Arena *a, DType dt, int ndim, const int64_t *shape, Tensor *out);
// Everything handed out since the mark becomes free again.
size_t arena_mark(const Arena *a);
void arena_reset_to(Arena *a, size_t mark);
