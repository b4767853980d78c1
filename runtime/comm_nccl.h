// NCCL inside runtime/comm.c (internal): the communicator for device buffers, and host buffers staged through a
// device buffer when NCCL is the only backend (agpt train --gpus N, no MPI). Built with AGPT_WITH_NCCL.
#pragma once
#include <stddef.h>

#include "runtime/comm.h"

typedef enum NcclKind { NCCL_KIND_F32, NCCL_KIND_F64, NCCL_KIND_I32, NCCL_KIND_BYTE } NcclKind;
typedef enum NcclOp { NCCL_OP_SUM, NCCL_OP_MIN } NcclOp;

// Selects GPU `gpu`, makes the collectives' stream and joins the NCCL communicator of `size` ranks named by id
// (NCCL's unique id, 128 bytes).
Status nccl_join(Comm *c, int gpu, const void *id);
// A fresh unique id (128 bytes) for rank 0 to hand to the others.
Status nccl_new_id(void *id);
void nccl_leave(Comm *c);

// In place on device buffers: bufs[i] [n[i]] f32, summed over the ranks, as one NCCL group. Waits for the
// device's work before and for the collectives after.
Status nccl_allreduce_device_f32(const Comm *c, float *const *bufs, const size_t *n, int k);

// Host buffers through a device staging buffer.
Status nccl_allreduce_host(const Comm *c, void *x, size_t count, NcclKind kind, NcclOp op);
Status nccl_broadcast_host(const Comm *c, void *buf, size_t bytes, int root);
Status nccl_reduce_scatter_host_f64(const Comm *c, const double *x, double *part, size_t chunk);  // part may be x
Status nccl_allgather_host_f32(const Comm *c, const float *part, float *all, size_t chunk);  // all NULL: not copied out
