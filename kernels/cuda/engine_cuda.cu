// The CUDA side of the engine: the device, one non-blocking stream that every op of this engine runs on,
// the cuBLASLt handle and its workspace. kernels/engine.c calls these after checking the GPU index.
#include "kernels/cuda/common.cuh"

// 32 MiB: what cuBLASLt asks for its split-K and stream-K algorithms on Hopper, and enough scratch for the
// other ops that borrow it (sum_squares partials, attention-backward row statistics). Those ops use it
// stream-ordered on this engine's stream only, so nothing is shared across engines or threads.
static const size_t kWorkspaceBytes = (size_t)32 << 20;

extern "C" Status engine_cuda_create(Engine *e) {
    e->stream = NULL;
    e->cublaslt = NULL;
    e->workspace = NULL;
    e->workspace_bytes = 0;

    CUDA_TRY(cudaSetDevice(e->gpu_index));

    // A blocking stream: it is ordered with the legacy default stream, where runtime/'s tensor_copy
    // (cudaMemcpy) and tensor_zero (cudaMemset) run. A non-blocking stream would let a kernel read a buffer
    // before a copy into it had landed (a pageable host-to-device cudaMemcpy returns before its DMA ends).
    // The fast path can move copies onto this stream (cudaMemcpyAsync) and then go non-blocking.
    cudaStream_t stream = NULL;
    CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamDefault));
    e->stream = stream;

    cublasLtHandle_t lt = NULL;
    cublasStatus_t ls = cublasLtCreate(&lt);
    if (ls != CUBLAS_STATUS_SUCCESS) {
        engine_cuda_destroy(e);
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cublasLtCreate failed on GPU %d: %s; is libcublasLt from the same CUDA "
                         "toolkit as the driver supports?", e->gpu_index, cublasLtGetStatusString(ls));
    }
    e->cublaslt = lt;

    void *ws = NULL;
    cudaError_t ce = cudaMalloc(&ws, kWorkspaceBytes);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        engine_cuda_destroy(e);
        return AGPT_FAIL(AGPT_ERR_OOM, "cudaMalloc of the %zu-byte cuBLASLt workspace on GPU %d failed: %s; "
                         "is another process holding the GPU's memory?", kWorkspaceBytes, e->gpu_index,
                         cudaGetErrorString(ce));
    }
    e->workspace = ws;
    e->workspace_bytes = kWorkspaceBytes;
    return AGPT_OK;
}

// Safe on a partly created engine. Work still queued on the stream finishes first, so freeing the workspace
// cannot pull memory from under a running kernel.
extern "C" void engine_cuda_destroy(Engine *e) {
    if (e->stream) cudaStreamSynchronize((cudaStream_t)e->stream);
    if (e->workspace) cudaFree(e->workspace);
    if (e->cublaslt) cublasLtDestroy((cublasLtHandle_t)e->cublaslt);
    if (e->stream) cudaStreamDestroy((cudaStream_t)e->stream);
    e->stream = NULL;
    e->cublaslt = NULL;
    e->workspace = NULL;
    e->workspace_bytes = 0;
}

// Waits for everything queued on the engine's stream; asynchronous kernel faults surface here.
extern "C" Status engine_cuda_synchronize(Engine *e) {
    cudaError_t ce = cudaStreamSynchronize((cudaStream_t)e->stream);
    if (ce != cudaSuccess)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "a kernel on GPU %d failed: %s (%s); rerun with "
                         "CUDA_LAUNCH_BLOCKING=1 to find which", e->gpu_index, cudaGetErrorString(ce),
                         cudaGetErrorName(ce));
    return AGPT_OK;
}
