// One engine context per device: which backend runs the ops, and the backend's handles.
// model/ code holds an Engine and calls kernels/ops.h; it never sees CUDA types.
#pragma once
#include <stddef.h>

#include "runtime/rng.h"
#include "runtime/tensor.h"

typedef struct Engine {
    Device device;          // DEV_CPU or DEV_CUDA: every tensor passed to an op must live here
    int gpu_index;          // CUDA ordinal (unused on the CPU)
    int num_threads;        // CPU backend threads
    void *stream;           // cudaStream_t
    void *cublaslt;         // cublasLtHandle_t
    void *workspace;        // cuBLASLt workspace, device memory
    size_t workspace_bytes;
    Rng rng;                // for dropout, sampling, synthetic data: seeded, reproducible
} Engine;

// Creates the engine for a device. For DEV_CUDA this selects the GPU, creates a stream and the cuBLASLt
// handle and workspace; without CUDA or without a GPU it fails with a clear message.
Status engine_create(Engine *e, Device device, int gpu_index, int num_threads, unsigned long long seed);
void engine_destroy(Engine *e);
Status engine_synchronize(Engine *e);

#ifdef AGPT_WITH_CUDA
// Implemented in kernels/cuda/engine_cuda.cu.
Status engine_cuda_create(Engine *e);
void engine_cuda_destroy(Engine *e);
Status engine_cuda_synchronize(Engine *e);
#endif
