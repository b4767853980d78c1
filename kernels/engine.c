#include "kernels/engine.h"

#include <string.h>

#include "runtime/memory.h"
#include "runtime/threads.h"

Status engine_create(Engine *e, Device device, int gpu_index, int num_threads, unsigned long long seed) {
    memset(e, 0, sizeof *e);
    e->device = device;
    e->gpu_index = gpu_index;
    threads_set(num_threads);
    e->num_threads = threads_get();
    rng_seed(&e->rng, seed);
    if (device == DEV_CPU) return AGPT_OK;
#ifdef AGPT_WITH_CUDA
    int count = cuda_device_count();
    if (count == 0)
        return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no CUDA device found (driver missing or no GPU); use --device cpu");
    if (gpu_index < 0 || gpu_index >= count)
        return AGPT_FAIL(AGPT_ERR_ARG, "GPU %d asked for, but %d device(s) exist", gpu_index, count);
    return engine_cuda_create(e);
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "this agpt was built without CUDA; rebuild where nvcc exists or use "
                     "--device cpu");
#endif
}

void engine_destroy(Engine *e) {
#ifdef AGPT_WITH_CUDA
    if (e->device == DEV_CUDA) engine_cuda_destroy(e);
#endif
    memset(e, 0, sizeof *e);
}

Status engine_synchronize(Engine *e) {
#ifdef AGPT_WITH_CUDA
    if (e->device == DEV_CUDA) return engine_cuda_synchronize(e);
#endif
    (void)e;
    return AGPT_OK;
}

Status engine_copy(Engine *e, Tensor *dst, const Tensor *src) {
    if (e->device != DEV_CPU) AGPT_TRY(engine_synchronize(e));
    AGPT_TRY(tensor_copy(dst, src));
    if (e->device != DEV_CPU) AGPT_TRY(cuda_synchronize());
    return AGPT_OK;
}
