// Timers: a monotonic host clock, and CUDA events for device work (stream order, not host order).
#pragma once
#include "runtime/status.h"

double timer_now_s(void);  // seconds on a monotonic clock

// Device timer over a CUDA stream (NULL = default stream). Without CUDA, create fails with UNSUPPORTED.
typedef struct DeviceTimer {
    void *start_event;
    void *stop_event;
    void *stream;
} DeviceTimer;

Status device_timer_create(DeviceTimer *t, void *stream);
void device_timer_start(DeviceTimer *t);
void device_timer_stop(DeviceTimer *t);
Status device_timer_elapsed_s(DeviceTimer *t, double *seconds);  // waits for the stop event
void device_timer_destroy(DeviceTimer *t);
