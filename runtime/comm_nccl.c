#include "runtime/comm_nccl.h"

#ifdef AGPT_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#include <string.h>

#define NCCL_TRY(call)                                                                                              \
    do {                                                                                                            \
        ncclResult_t r_ = (call);                                                                                   \
        if (r_ != ncclSuccess) return AGPT_FAIL(AGPT_ERR_DEVICE, "%s failed: %s", #call, ncclGetErrorString(r_));  \
    } while (0)
#define CUDA_TRY(call)                                                                                              \
    do {                                                                                                            \
        cudaError_t e_ = (call);                                                                                    \
        if (e_ != cudaSuccess) return AGPT_FAIL(AGPT_ERR_DEVICE, "%s failed: %s", #call, cudaGetErrorString(e_));  \
    } while (0)

// The staging buffer of host collectives (one communicator per process), grown on demand.
static void *scratch;
static size_t scratch_bytes;

static Status staging(size_t bytes) {
    if (bytes <= scratch_bytes) return AGPT_OK;
    if (scratch) cudaFree(scratch);
    scratch = NULL, scratch_bytes = 0;
    CUDA_TRY(cudaMalloc(&scratch, bytes));
    scratch_bytes = bytes;
    return AGPT_OK;
}

static ncclDataType_t nccl_type(NcclKind k) {
    return k == NCCL_KIND_F32 ? ncclFloat32 : k == NCCL_KIND_F64 ? ncclFloat64 : k == NCCL_KIND_I32 ? ncclInt32
                                                                                                  : ncclUint8;
}
static size_t kind_bytes(NcclKind k) { return k == NCCL_KIND_F64 ? 8 : k == NCCL_KIND_BYTE ? 1 : 4; }

Status nccl_new_id(void *id) {
    ncclUniqueId u;
    NCCL_TRY(ncclGetUniqueId(&u));
    memcpy(id, &u, sizeof u);
    return AGPT_OK;
}

Status nccl_join(Comm *c, int gpu, const void *id) {
    CUDA_TRY(cudaSetDevice(gpu));
    cudaStream_t stream;
    CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    c->stream = stream;
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclComm_t comm;
    NCCL_TRY(ncclCommInitRank(&comm, c->size, u, c->rank));
    c->nccl = comm;
    return AGPT_OK;
}

void nccl_leave(Comm *c) {
    if (c->nccl) ncclCommDestroy((ncclComm_t)c->nccl);
    if (c->stream) cudaStreamDestroy((cudaStream_t)c->stream);
    if (scratch) cudaFree(scratch);
    scratch = NULL, scratch_bytes = 0;
    c->nccl = c->stream = NULL;
}

// The collectives' stream is non-blocking: the device's other work (the step on the engine's stream) is waited
// for first, and the collectives are waited for after, so callers see finished buffers either way. Host data is
// staged with copies on that same stream (a plain cudaMemcpy from pageable memory may return before its DMA lands,
// and would not be ordered with a non-blocking stream).
static Status run_synced(const Comm *c) {
    CUDA_TRY(cudaStreamSynchronize((cudaStream_t)c->stream));
    return AGPT_OK;
}

Status nccl_allreduce_device_f32(const Comm *c, float *const *bufs, const size_t *n, int k) {
    CUDA_TRY(cudaDeviceSynchronize());
    NCCL_TRY(ncclGroupStart());
    ncclResult_t first = ncclSuccess;  // the group is closed whatever happens inside it
    for (int i = 0; i < k && first == ncclSuccess; i++)
        if (n[i]) first = ncclAllReduce(bufs[i], bufs[i], n[i], ncclFloat32, ncclSum, (ncclComm_t)c->nccl,
                                        (cudaStream_t)c->stream);
    ncclResult_t end = ncclGroupEnd();
    if (first != ncclSuccess || end != ncclSuccess)
        return AGPT_FAIL(AGPT_ERR_DEVICE, "ncclAllReduce of %d buffers failed: %s", k,
                         ncclGetErrorString(first != ncclSuccess ? first : end));
    return run_synced(c);
}

Status nccl_allreduce_host(const Comm *c, void *x, size_t count, NcclKind kind, NcclOp op) {
    size_t bytes = count * kind_bytes(kind);
    AGPT_TRY(staging(bytes));
    CUDA_TRY(cudaMemcpyAsync(scratch, x, bytes, cudaMemcpyHostToDevice, (cudaStream_t)c->stream));
    NCCL_TRY(ncclAllReduce(scratch, scratch, count, nccl_type(kind), op == NCCL_OP_SUM ? ncclSum : ncclMin,
                           (ncclComm_t)c->nccl, (cudaStream_t)c->stream));
    CUDA_TRY(cudaMemcpyAsync(x, scratch, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)c->stream));
    AGPT_TRY(run_synced(c));
    return AGPT_OK;
}

Status nccl_broadcast_host(const Comm *c, void *buf, size_t bytes, int root) {
    AGPT_TRY(staging(bytes));
    CUDA_TRY(cudaMemcpyAsync(scratch, buf, bytes, cudaMemcpyHostToDevice, (cudaStream_t)c->stream));
    NCCL_TRY(ncclBroadcast(scratch, scratch, bytes, ncclUint8, root, (ncclComm_t)c->nccl, (cudaStream_t)c->stream));
    CUDA_TRY(cudaMemcpyAsync(buf, scratch, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)c->stream));
    AGPT_TRY(run_synced(c));
    return AGPT_OK;
}

Status nccl_reduce_scatter_host_f64(const Comm *c, const double *x, double *part, size_t chunk) {
    size_t all = chunk * (size_t)c->size * sizeof(double);
    AGPT_TRY(staging(all + chunk * sizeof(double)));
    double *in = scratch, *out = (double *)((char *)scratch + all);
    CUDA_TRY(cudaMemcpyAsync(in, x, all, cudaMemcpyHostToDevice, (cudaStream_t)c->stream));
    NCCL_TRY(ncclReduceScatter(in, out, chunk, ncclFloat64, ncclSum, (ncclComm_t)c->nccl, (cudaStream_t)c->stream));
    CUDA_TRY(cudaMemcpyAsync(part, out, chunk * sizeof(double), cudaMemcpyDeviceToHost, (cudaStream_t)c->stream));
    AGPT_TRY(run_synced(c));
    return AGPT_OK;
}

Status nccl_allgather_host_f32(const Comm *c, const float *part, float *all, size_t chunk) {
    size_t whole = chunk * (size_t)c->size * sizeof(float);
    AGPT_TRY(staging(whole + chunk * sizeof(float)));
    float *out = scratch, *in = (float *)((char *)scratch + whole);
    CUDA_TRY(cudaMemcpyAsync(in, part, chunk * sizeof(float), cudaMemcpyHostToDevice, (cudaStream_t)c->stream));
    NCCL_TRY(ncclAllGather(in, out, chunk, ncclFloat32, (ncclComm_t)c->nccl, (cudaStream_t)c->stream));
    if (all) CUDA_TRY(cudaMemcpyAsync(all, out, whole, cudaMemcpyDeviceToHost, (cudaStream_t)c->stream));
    AGPT_TRY(run_synced(c));
    return AGPT_OK;
}

#else  // without NCCL: nothing here is reachable (comm.c checks first); the stubs say so if one is.

#define NO_NCCL AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "this agpt was built without NCCL")
Status nccl_new_id(void *id) { (void)id; return NO_NCCL; }
Status nccl_join(Comm *c, int gpu, const void *id) { (void)c, (void)gpu, (void)id; return NO_NCCL; }
void nccl_leave(Comm *c) { (void)c; }
Status nccl_allreduce_device_f32(const Comm *c, float *const *bufs, const size_t *n, int k) {
    (void)c, (void)bufs, (void)n, (void)k;
    return NO_NCCL;
}
Status nccl_allreduce_host(const Comm *c, void *x, size_t count, NcclKind kind, NcclOp op) {
    (void)c, (void)x, (void)count, (void)kind, (void)op;
    return NO_NCCL;
}
Status nccl_broadcast_host(const Comm *c, void *buf, size_t bytes, int root) {
    (void)c, (void)buf, (void)bytes, (void)root;
    return NO_NCCL;
}
Status nccl_reduce_scatter_host_f64(const Comm *c, const double *x, double *part, size_t chunk) {
    (void)c, (void)x, (void)part, (void)chunk;
    return NO_NCCL;
}
Status nccl_allgather_host_f32(const Comm *c, const float *part, float *all, size_t chunk) {
    (void)c, (void)part, (void)all, (void)chunk;
    return NO_NCCL;
}
#endif
