#include "tools/bench_limits.h"

#include <string.h>

#include "kernels/ops.h"
#include "runtime/memory.h"
#include "runtime/timer.h"

Status bench_sync(Engine *e) {
    AGPT_TRY(engine_synchronize(e));
    if (e->device != DEV_CPU) AGPT_TRY(cuda_synchronize());
    return AGPT_OK;
}

Status bench_matmul_rate(Engine *e, DType dt, int n, double *tflops) {
    Arena a;
    AGPT_TRY(arena_init(&a, e->device, (size_t)3 * n * n * dtype_size(dt) + 4 * AGPT_ALIGN));
    Tensor x, y, z;
    Status s = arena_tensor(&a, dt, 2, (int64_t[]){n, n}, &x);
    if (!s) s = arena_tensor(&a, dt, 2, (int64_t[]){n, n}, &y);
    if (!s) s = arena_tensor(&a, dt, 2, (int64_t[]){n, n}, &z);
    if (!s) s = tensor_zero(&x);
    if (!s) s = tensor_zero(&y);
    double best = 1e30;
    for (int i = 0; i < 4 && !s; i++) {
        double t0 = timer_now_s();
        s = op_matmul(e, &z, &x, &y, NULL, false, false, 1.0f, 0.0f);
        if (!s) s = engine_synchronize(e);
        double t = timer_now_s() - t0;
        if (i > 0 && t < best) best = t;  // the first run warms up
    }
    arena_free(&a);
    *tflops = 2.0 * n * n * (double)n / best / 1e12;
    return s;
}

// The copy the bandwidth is measured with: on the CPU split over the threads (a one-thread memcpy reaches only
// part of the memory bandwidth, and the ops it is a limit for run on every thread), on CUDA the runtime's copy.
static Status bandwidth_copy(Tensor *y, const Tensor *x) {
    if (x->device != DEV_CPU) return tensor_copy(y, x);
    size_t bytes = tensor_nbytes(x);
    int chunks = 64;
    #pragma omp parallel for schedule(static)
    for (int c = 0; c < chunks; c++) {
        size_t begin = bytes * (size_t)c / (size_t)chunks, end = bytes * (size_t)(c + 1) / (size_t)chunks;
        memcpy((char *)y->data + begin, (const char *)x->data + begin, end - begin);
    }
    return AGPT_OK;
}

Status bench_copy_rate(Engine *e, DType dt, int64_t n, double *gbps) {
    Arena a;
    AGPT_TRY(arena_init(&a, e->device, (size_t)2 * n * dtype_size(dt) + 4 * AGPT_ALIGN));
    Tensor x, y;
    Status s = arena_tensor(&a, dt, 1, (int64_t[]){n}, &x);
    if (!s) s = arena_tensor(&a, dt, 1, (int64_t[]){n}, &y);
    if (!s) s = tensor_zero(&x);
    if (!s) s = bench_sync(e);
    double best = 1e30;
    for (int i = 0; i < 5 && !s; i++) {
        double t0 = timer_now_s();
        s = bandwidth_copy(&y, &x);
        if (!s) s = bench_sync(e);
        double t = timer_now_s() - t0;
        if (i > 0 && t < best) best = t;
    }
    arena_free(&a);
    *gbps = 2.0 * (double)n * dtype_size(dt) / best / 1e9;
    return s;
}

// Reads x on every thread with independent accumulators (a single running sum would be bound by the add latency,
// not by memory). The result is returned so that the compiler cannot drop the reads.
static float read_all(const float *x, int64_t n) {
    float total = 0;
    #pragma omp parallel for reduction(+ : total) schedule(static)
    for (int64_t block = 0; block < n / 64; block++) {
        float acc[16] = {0};
        const float *p = x + block * 64;
        for (int i = 0; i < 64; i += 16)
            for (int j = 0; j < 16; j++) acc[j] += p[i + j];
        for (int j = 0; j < 16; j++) total += acc[j];
    }
    return total;
}

Status bench_read_rate(Engine *e, DType dt, int64_t n, double *gbps) {
    Arena a;
    AGPT_TRY(arena_init(&a, e->device, (size_t)n * dtype_size(dt) + 2 * AGPT_ALIGN));
    Tensor x;
    if (e->device == DEV_CPU) dt = DT_F32;
    Status s = arena_tensor(&a, dt, 1, (int64_t[]){n}, &x);
    if (!s) s = tensor_zero(&x);
    if (!s) s = bench_sync(e);
    double best = 1e30, sum = 0;
    for (int i = 0; i < 5 && !s; i++) {
        double t0 = timer_now_s();
        if (e->device == DEV_CPU) sum += read_all(x.data, n);
        else s = op_sum_squares(e, &sum, &x);  // returns on the host: the read has finished
        double t = timer_now_s() - t0;
        if (i > 0 && t < best) best = t;
    }
    arena_free(&a);
    *gbps = (double)n * dtype_size(dt) / best / 1e9;
    return sum == 0 ? s : AGPT_FAIL(AGPT_ERR_ARG, "bench_read_rate: the zeroed buffer summed to %g", sum);
}
