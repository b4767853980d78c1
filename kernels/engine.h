// One engine context per device: which backend runs the ops, and the backend's handles.
// model/ code holds an Engine and calls kernels/ops.h; it never sees CUDA types.
#pragma once
#include <stddef.h>
#include <string.h>

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
// tensor_copy ordered with the engine's work: the engine's stream finishes before the copy and the copy before
// the next op, so neither side reads half-written data (host <-> device copies of inputs, positions, logits).
Status engine_copy(Engine *e, Tensor *dst, const Tensor *src);

#ifdef AGPT_WITH_CUDA
// Implemented in kernels/cuda/engine_cuda.cu.
Status engine_cuda_create(Engine *e);
void engine_cuda_destroy(Engine *e);
Status engine_cuda_synchronize(Engine *e);
#endif

// CUDA graphs of the engine's stream, so that model/ can record a sequence of ops once and launch it as one unit
// without seeing CUDA types. `exec` is an instantiated graph (cudaGraphExec_t) held as an opaque pointer, NULL
// until the first engine_graph_end.
//   engine_graph_begin: from here the ops issued on this engine (this thread only: capture mode thread-local) are
//     recorded, not run. Between begin and end nothing may synchronise, allocate device memory or copy through
//     the legacy stream (tensor_copy, cudaMemcpy): such a call fails and invalidates the capture.
//   engine_graph_end: ends the recording and makes *exec run it: the first time it instantiates the graph; later
//     it updates *exec in place (cudaGraphExecUpdate: same topology, new kernel arguments, cheap) and
//     re-instantiates only when the topology changed. Nothing has run yet.
//   engine_graph_launch: runs *exec on the engine's stream, asynchronously like any op.
//   engine_graph_abort: ends a recording that failed halfway and drops it (a no-op when none is open), so the
//     stream is usable again. Call it when any op between begin and end fails.
//   engine_graph_destroy: frees *exec (NULL is fine) and sets it to NULL.
// The CPU engine has no graphs: begin, end and launch fail with AGPT_ERR_UNSUPPORTED (callers check the device
// first); abort and destroy do nothing.
#ifdef AGPT_WITH_CUDA
Status engine_graph_begin(Engine *e);
Status engine_graph_end(Engine *e, void **exec);
Status engine_graph_launch(Engine *e, void *exec);
void engine_graph_abort(Engine *e);
void engine_graph_destroy(void **exec);
#else
static inline Status engine_graph_begin(Engine *e) {
    (void)e;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "CUDA graphs need the CUDA backend; this build has none");
}
static inline Status engine_graph_end(Engine *e, void **exec) {
    (void)e, (void)exec;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "CUDA graphs need the CUDA backend; this build has none");
}
static inline Status engine_graph_launch(Engine *e, void *exec) {
    (void)e, (void)exec;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "CUDA graphs need the CUDA backend; this build has none");
}
static inline void engine_graph_abort(Engine *e) { (void)e; }
static inline void engine_graph_destroy(void **exec) {
    if (exec) *exec = NULL;
}
#endif

// A copy in the engine's stream order, for the small per-step uploads of a decode step (token ids, positions,
// lengths) that must stay outside a CUDA graph: on CUDA cudaMemcpyAsync on the engine's stream (any direction:
// dst and src may each be host or device memory); on the CPU engine a memcpy. src may be reused as soon as the
// call returns: pass pageable host memory (mem_host_alloc, malloc), which the runtime stages before returning,
// so the call does not wait for the stream; from page-locked memory the call waits for the copy to finish.
// Not while the engine's stream is being captured (engine_graph_begin .. end).
#ifdef AGPT_WITH_CUDA
Status engine_memcpy_async(Engine *e, void *dst, const void *src, size_t bytes);
#else
static inline Status engine_memcpy_async(Engine *e, void *dst, const void *src, size_t bytes) {
    (void)e;
    if (bytes) memmove(dst, src, bytes);
    return AGPT_OK;
}
#endif
