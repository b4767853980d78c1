#include "runtime/memory.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef AGPT_WITH_CUDA
#include <cuda_runtime.h>
#endif

static double gib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

Status mem_host_alloc(size_t bytes, void **out) {
    *out = NULL;
    if (bytes > SIZE_MAX - AGPT_ALIGN)  // a negative size cast to size_t, most likely: rounding would wrap to 0
        return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory: asked for %zu bytes, more than any machine has", bytes);
    size_t rounded = (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN;
    if (rounded == 0) rounded = AGPT_ALIGN;
    void *p = aligned_alloc(AGPT_ALIGN, rounded);
    if (!p)
        return AGPT_FAIL(AGPT_ERR_OOM,
                         "out of host memory: asked for %zu bytes (%.2f GiB); try a smaller batch, fewer "
                         "threads' worth of images at once, or a machine with more RAM", bytes, gib(bytes));
    *out = p;
    return AGPT_OK;
}

void mem_host_free(void *p) { free(p); }

int cuda_compiled(void) {
#ifdef AGPT_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

int cuda_device_count(void) {
#ifdef AGPT_WITH_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
        return 0;
    }
    return n;
#else
    return 0;
#endif
}

Status cuda_device_info(int index, char *name, int name_size, size_t *total_bytes) {
    if (name_size > 0) name[0] = 0;
    *total_bytes = 0;
#ifdef AGPT_WITH_CUDA
    struct cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, index);
    if (e != cudaSuccess)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaGetDeviceProperties(%d): %s", index, cudaGetErrorString(e));
    strncpy(name, prop.name, (size_t)name_size - 1);
    name[name_size - 1] = 0;
    *total_bytes = prop.totalGlobalMem;
    return AGPT_OK;
#else
    (void)index;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "this agpt was built without CUDA");
#endif
}

Status cuda_synchronize(void) {
#ifdef AGPT_WITH_CUDA
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) return AGPT_FAIL(AGPT_ERR_DEVICE, "CUDA error: %s", cudaGetErrorString(e));
#endif
    return AGPT_OK;
}

Status mem_pinned_alloc(size_t bytes, void **out) {
#ifdef AGPT_WITH_CUDA
    if (cuda_device_count() > 0) {
        cudaError_t e = cudaMallocHost(out, bytes ? bytes : 1);
        if (e != cudaSuccess) {
            *out = NULL;
            return AGPT_FAIL(AGPT_ERR_OOM, "cudaMallocHost of %zu bytes (%.2f GiB) failed: %s; pinned memory is "
                             "limited by the OS, try a smaller batch", bytes, gib(bytes), cudaGetErrorString(e));
        }
        return AGPT_OK;
    }
#endif
    return mem_host_alloc(bytes, out);
}

void mem_pinned_free(void *p) {
    if (!p) return;
#ifdef AGPT_WITH_CUDA
    if (cuda_device_count() > 0) { cudaFreeHost(p); return; }
#endif
    free(p);
}

Status mem_device_alloc(size_t bytes, void **out) {
    *out = NULL;
#ifdef AGPT_WITH_CUDA
    cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        *out = NULL;
        return AGPT_FAIL(AGPT_ERR_OOM, "out of GPU memory: asked for %zu bytes (%.2f GiB), %.2f of %.2f GiB free; "
                         "try a smaller batch or a shorter context (and f16/bf16 rather than f32)", bytes, gib(bytes),
                         gib(free_b), gib(total_b));
    }
    return AGPT_OK;
#else
    (void)bytes;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "device memory asked for, but this agpt was built without CUDA");
#endif
}

void mem_device_free(void *p) {
#ifdef AGPT_WITH_CUDA
    if (p) cudaFree(p);
#else
    (void)p;
#endif
}

Status tensor_copy(Tensor *dst, const Tensor *src) {
    char a[96], b[96];
    AGPT_CHECK_ARG(dst->dtype == src->dtype && tensor_numel(dst) == tensor_numel(src),
                   "copy %s -> %s: dtype and element count must match", tensor_describe(src, a, sizeof a),
                   tensor_describe(dst, b, sizeof b));
    size_t bytes = tensor_nbytes(src);
    if (dst->device == DEV_CPU && src->device == DEV_CPU) {
        memmove(dst->data, src->data, bytes);
        return AGPT_OK;
    }
#ifdef AGPT_WITH_CUDA
    enum cudaMemcpyKind kind = cudaMemcpyDefault;  // unified addressing tells the direction
    cudaError_t e = cudaMemcpy(dst->data, src->data, bytes, kind);
    if (e != cudaSuccess)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaMemcpy of %zu bytes %s -> %s: %s", bytes,
                         device_name(src->device), device_name(dst->device), cudaGetErrorString(e));
    return AGPT_OK;
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "copy to or from a CUDA tensor in a build without CUDA");
#endif
}

Status tensor_zero(Tensor *t) {
    size_t bytes = tensor_nbytes(t);
    if (t->device == DEV_CPU) {
        memset(t->data, 0, bytes);
        return AGPT_OK;
    }
#ifdef AGPT_WITH_CUDA
    cudaError_t e = cudaMemset(t->data, 0, bytes);
    if (e != cudaSuccess) return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaMemset of %zu bytes: %s", bytes, cudaGetErrorString(e));
    return AGPT_OK;
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "zeroing a CUDA tensor in a build without CUDA");
#endif
}

Status arena_init(Arena *a, Device device, size_t capacity) {
    memset(a, 0, sizeof *a);
    a->device = device;
    a->capacity = capacity;
    void *p = NULL;
    Status s = device == DEV_CUDA ? mem_device_alloc(capacity, &p) : mem_host_alloc(capacity, &p);
    if (s != AGPT_OK) return agpt_add_context(s, "activation arena on %s", device_name(device));
    a->base = p;
    return AGPT_OK;
}

void arena_free(Arena *a) {
    if (a->device == DEV_CUDA) mem_device_free(a->base);
    else mem_host_free(a->base);
    memset(a, 0, sizeof *a);
}

Status arena_tensor(Arena *a, DType dt, int ndim, const int64_t *shape, Tensor *out) {
    Tensor t = tensor_make(NULL, dt, a->device, ndim, shape);
    for (int i = 0; i < ndim; i++)
        AGPT_CHECK_ARG(shape[i] >= 0, "arena_tensor: negative dimension %lld", (long long)shape[i]);
    size_t nbytes = tensor_nbytes(&t);
    size_t bytes = nbytes > a->capacity ? nbytes : (nbytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN;
    if (bytes > a->capacity - a->used)
        return AGPT_FAIL(AGPT_ERR_OOM, "activation arena full: %zu bytes used of %zu, %zu more asked for; the "
                         "arena is sized from the config and batch, so this is a sizing bug or a larger batch "
                         "than planned", a->used, a->capacity, bytes);
    t.data = a->base + a->used;
    a->used += bytes;
    if (a->used > a->peak) a->peak = a->used;
    *out = t;
    return AGPT_OK;
}

size_t arena_mark(const Arena *a) { return a->used; }
void arena_reset_to(Arena *a, size_t mark) { a->used = mark < a->used ? mark : a->used; }
