#include "runtime/timer.h"

#include <string.h>
#include <time.h>

#ifdef AGPT_WITH_CUDA
#include <cuda_runtime.h>
#endif

double timer_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

Status device_timer_create(DeviceTimer *t, void *stream) {
    memset(t, 0, sizeof *t);
    t->stream = stream;
#ifdef AGPT_WITH_CUDA
    cudaEvent_t a, b;
    if (cudaEventCreate(&a) != cudaSuccess) return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaEventCreate failed");
    if (cudaEventCreate(&b) != cudaSuccess) {
        cudaEventDestroy(a);
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaEventCreate failed");
    }
    t->start_event = a;
    t->stop_event = b;
    return AGPT_OK;
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "device timer in a build without CUDA");
#endif
}

void device_timer_start(DeviceTimer *t) {
#ifdef AGPT_WITH_CUDA
    cudaEventRecord((cudaEvent_t)t->start_event, (cudaStream_t)t->stream);
#else
    (void)t;
#endif
}

void device_timer_stop(DeviceTimer *t) {
#ifdef AGPT_WITH_CUDA
    cudaEventRecord((cudaEvent_t)t->stop_event, (cudaStream_t)t->stream);
#else
    (void)t;
#endif
}

Status device_timer_elapsed_s(DeviceTimer *t, double *seconds) {
    *seconds = 0;
#ifdef AGPT_WITH_CUDA
    if (cudaEventSynchronize((cudaEvent_t)t->stop_event) != cudaSuccess)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaEventSynchronize failed: %s", cudaGetErrorString(cudaGetLastError()));
    float ms = 0;
    cudaEventElapsedTime(&ms, (cudaEvent_t)t->start_event, (cudaEvent_t)t->stop_event);
    *seconds = 1e-3 * ms;
    return AGPT_OK;
#else
    (void)t;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "device timer in a build without CUDA");
#endif
}

void device_timer_destroy(DeviceTimer *t) {
#ifdef AGPT_WITH_CUDA
    if (t->start_event) cudaEventDestroy((cudaEvent_t)t->start_event);
    if (t->stop_event) cudaEventDestroy((cudaEvent_t)t->stop_event);
#endif
    memset(t, 0, sizeof *t);
}
