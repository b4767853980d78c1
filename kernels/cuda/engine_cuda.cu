// The CUDA side of the engine: the device, one non-blocking stream that every op of this engine runs on,
// the cuBLASLt handle and its workspace, and (built with cuDNN) a cuDNN handle made on first use. kernels/engine.c
// calls these after checking the GPU index.
#include "kernels/cuda/common.cuh"

#ifdef AGPT_WITH_CUDNN
#include <cudnn.h>

#include <mutex>
#include <vector>

// Each engine's cuDNN handle, bound to the engine's stream. Made on the first convolution, not in
// engine_cuda_create: cudnnCreate loads cuDNN's sub-libraries (hundreds of MB), which only the prompt learner
// needs. Engine (kernels/engine.h) has no slot for it yet, so the handles live here, keyed by the engine's
// stream (unique per live engine); engine_cuda_destroy releases its engine's handle.
namespace {
struct CudnnSlot {
    void *stream;
    cudnnHandle_t handle;
};
std::mutex g_cudnn_mu;
std::vector<CudnnSlot> g_cudnn;
}  // namespace

// Declared in kernels/cuda/conv.cu, its only user.
Status engine_cuda_cudnn(Engine *e, cudnnHandle_t *out) {
    *out = NULL;
    std::lock_guard<std::mutex> lock(g_cudnn_mu);
    for (const CudnnSlot &s : g_cudnn)
        if (s.stream == e->stream) {
            *out = s.handle;
            return AGPT_OK;
        }
    const size_t have = cudnnGetVersion();
    if (have / 10000 != CUDNN_MAJOR)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "the cuDNN library loaded is version %zu, but agpt was built against cuDNN "
                         "%d.%d.%d: put the matching libcudnn.so.%d first on the library path", have, CUDNN_MAJOR,
                         CUDNN_MINOR, CUDNN_PATCHLEVEL, CUDNN_MAJOR);
    int prev = -1;
    CUDA_TRY(cudaGetDevice(&prev));
    CUDA_TRY(cudaSetDevice(e->gpu_index));  // cudnnCreate binds the handle to the current device
    cudnnHandle_t h = NULL;
    cudnnStatus_t st = cudnnCreate(&h);
    if (st == CUDNN_STATUS_SUCCESS) {
        st = cudnnSetStream(h, (cudaStream_t)e->stream);
        if (st != CUDNN_STATUS_SUCCESS) cudnnDestroy(h);
    }
    cudaSetDevice(prev);
    if (st != CUDNN_STATUS_SUCCESS) {
        char detail[512] = "";
        cudnnGetLastErrorString(detail, sizeof detail);
        return AGPT_FAIL(AGPT_ERR_DEVICE, "creating the cuDNN handle on GPU %d failed: %s (%d)%s%s; cuDNN %zu "
                         "(for CUDA runtime %zu): are its sub-libraries (libcudnn_cnn.so.%d, "
                         "libcudnn_engines_*.so.%d) installed next to libcudnn.so.%d, and does the driver support "
                         "that CUDA?", e->gpu_index, cudnnGetErrorString(st), (int)st, detail[0] ? ": " : "",
                         detail, have, cudnnGetCudartVersion(), CUDNN_MAJOR, CUDNN_MAJOR, CUDNN_MAJOR);
    }
    g_cudnn.push_back(CudnnSlot{e->stream, h});
    *out = h;
    return AGPT_OK;
}

static void engine_cuda_cudnn_release(Engine *e) {
    std::lock_guard<std::mutex> lock(g_cudnn_mu);
    for (size_t i = 0; i < g_cudnn.size(); i++)
        if (g_cudnn[i].stream == e->stream) {
            cudnnDestroy(g_cudnn[i].handle);
            g_cudnn.erase(g_cudnn.begin() + (long)i);
            return;
        }
}
#endif

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
#ifdef AGPT_WITH_CUDNN
    if (e->stream) engine_cuda_cudnn_release(e);
#endif
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

// ---------------------------------------------------------------------------------------------------------
// CUDA graphs of the engine's stream (kernels/engine.h says how model/ uses them).
//
// Capture is thread-local: another thread's engine (the server runs several) may keep calling the runtime while
// this one records. The engine's stream is a blocking stream, which stream capture accepts; what it refuses is
// work that would join the legacy stream (tensor_copy's cudaMemcpy), which is why callers do their uploads
// before engine_graph_begin.

extern "C" Status engine_graph_begin(Engine *e) {
    CUDA_TRY(cudaStreamBeginCapture(engine_stream(e), cudaStreamCaptureModeThreadLocal));
    return AGPT_OK;
}

extern "C" void engine_graph_abort(Engine *e) {
    if (!e->stream) return;
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(engine_stream(e), &st) == cudaSuccess && st != cudaStreamCaptureStatusNone) {
        cudaGraph_t g = NULL;
        cudaStreamEndCapture(engine_stream(e), &g);  // ends an invalidated capture too (it then returns an error)
        if (g) cudaGraphDestroy(g);
    }
    cudaGetLastError();  // the capture's failure is reported by whoever caused it; leave no sticky error behind
}

extern "C" Status engine_graph_end(Engine *e, void **exec) {
    cudaGraph_t g = NULL;
    cudaError_t ce = cudaStreamEndCapture(engine_stream(e), &g);
    if (ce != cudaSuccess || g == NULL) {
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        return AGPT_FAIL(AGPT_ERR_DEVICE, "ending the CUDA graph capture on GPU %d failed: %s (%s); an op between "
                         "engine_graph_begin and engine_graph_end synchronised, allocated or copied through the "
                         "legacy stream", e->gpu_index, cudaGetErrorString(ce), cudaGetErrorName(ce));
    }
    if (*exec) {
        // Same topology (the usual case: the same ops with new pointers and sizes): patch the kernel arguments.
        cudaGraphExecUpdateResultInfo info;
        if (cudaGraphExecUpdate((cudaGraphExec_t)*exec, g, &info) == cudaSuccess) {
            cudaGraphDestroy(g);
            return AGPT_OK;
        }
        cudaGetLastError();  // an update refused (e.g. another kernel count) is not an error: instantiate anew
        cudaGraphExecDestroy((cudaGraphExec_t)*exec);
        *exec = NULL;
    }
    cudaGraphExec_t ge = NULL;
    ce = cudaGraphInstantiate(&ge, g, 0);
    cudaGraphDestroy(g);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        return AGPT_FAIL(AGPT_ERR_DEVICE, "cudaGraphInstantiate on GPU %d failed: %s (%s)", e->gpu_index,
                         cudaGetErrorString(ce), cudaGetErrorName(ce));
    }
    *exec = ge;
    return AGPT_OK;
}

extern "C" Status engine_graph_launch(Engine *e, void *exec) {
    AGPT_CHECK_ARG(exec != NULL, "engine_graph_launch: no graph (engine_graph_end makes one)");
    CUDA_TRY(cudaGraphLaunch((cudaGraphExec_t)exec, engine_stream(e)));
    return AGPT_OK;
}

extern "C" void engine_graph_destroy(void **exec) {
    if (!exec || !*exec) return;
    cudaGraphExecDestroy((cudaGraphExec_t)*exec);
    *exec = NULL;
}

// kernels/engine.h: a stream-ordered copy, or a memmove on the CPU engine. From page-locked host memory the copy
// is truly asynchronous, so wait for it: the caller may reuse src at once (pageable src is staged by the runtime).
extern "C" Status engine_memcpy_async(Engine *e, void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return AGPT_OK;
    if (e->device != DEV_CUDA) {
        memmove(dst, src, bytes);
        return AGPT_OK;
    }
    cudaStream_t s = engine_stream(e);
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
    cudaPointerAttributes attr;
    bool pinned = false;
    if (cudaPointerGetAttributes(&attr, src) == cudaSuccess) pinned = attr.type == cudaMemoryTypeHost;
    else (void)cudaGetLastError();  // an unknown host pointer: pageable
    if (pinned) CUDA_TRY(cudaStreamSynchronize(s));
    return AGPT_OK;
}
