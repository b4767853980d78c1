// The communicator of data-parallel training: which rank this process is, and the collectives the trainer needs.
//
// Backends:
//   single  one process (rank 0 of 1): every collective is a no-op (the default, and what a plain `agpt train` is)
//   MPI     processes started by mpirun / srun (OpenMPI's or any MPI's launcher): host buffers, MPI_COMM_WORLD.
//           Chosen by comm_init when the launcher's environment says there are several ranks
//           (OMPI_COMM_WORLD_SIZE from mpirun, PMI_SIZE from srun --mpi=pmi2 or MPICH), so a plain run never starts
//           MPI. Built when CMake finds MPI (AGPT_WITH_MPI).
//   NCCL    device buffers between GPUs (built when CMake finds NCCL: AGPT_WITH_NCCL). Under mpirun, comm_init_device
//           joins every rank's GPU to one NCCL communicator (rank 0 makes NCCL's unique id, MPI_Bcast carries it);
//           host collectives stay on MPI. Under `agpt train --gpus N` (tools/launch.c: N processes on this node,
//           no MPI) the launcher's environment names the rank (AGPT_RANK, AGPT_WORLD_SIZE, AGPT_LOCAL_RANK) and the
//           id (AGPT_NCCL_ID, hex); comm_init joins at once and host collectives go through a device buffer.
//
// Collectives are blocking. A rank that dies makes mpirun end the job (OpenMPI kills the others). A rank that
// hangs (stopped, a stuck device, a node that stopped answering) would leave the others waiting forever, since MPI
// has no timeouts: comm_set_timeout arms a watchdog that ends this process with a message naming the collective
// when one has waited longer than the timeout (mpirun then ends the job). A rank that fails with an error does not tell the others by itself: callers call comm_agree_status
// at every point where one rank may fail alone, before the next collective (the trainer does after the
// micro-steps, the all-reduce and the optimizer step), so that no rank waits for one that has stopped.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

typedef enum CommBackend { COMM_SINGLE = 0, COMM_MPI = 1, COMM_NCCL = 2 } CommBackend;

typedef struct Comm {
    CommBackend backend;
    int rank, size;    // this process, and how many take part
    int local_rank;    // among the processes of this node (the GPU a rank would use)
    double timeout_s;  // a collective that waits longer ends the process (0: wait forever)
    void *nccl;        // ncclComm_t for device buffers (NULL: none; device data then goes through the host)
    void *stream;      // cudaStream_t the NCCL collectives run on
} Comm;

// Single; MPI when started by an MPI launcher with more than one rank; NCCL when started by agpt's own launcher
// (an error when that is so but agpt was built without MPI, or without NCCL).
Status comm_init(Comm *c);
// Device collectives for GPU `gpu` (the engine's): under MPI with several ranks and NCCL built, joins the NCCL
// communicator; a no-op for one rank (unless even_alone: a one-rank NCCL communicator, for benchmarks and
// checks), without NCCL (device data then goes through the host), or when comm_init already joined (the NCCL
// backend). comm_device_ready tells whether device collectives exist.
Status comm_init_device(Comm *c, int gpu, bool even_alone);
bool comm_device_ready(const Comm *c);
// A new NCCL unique id as 256 hex digits (for agpt train --gpus N to hand its ranks); an error without NCCL.
Status comm_nccl_id_hex(char hex[257]);
// bufs[i] [n[i]] f32 on the device: summed over the ranks in place (one NCCL group). Needs comm_device_ready.
Status comm_allreduce_sum_f32_device(const Comm *c, float *const *bufs, const size_t *n, int k);
void comm_finalize(Comm *c);
const char *comm_backend_name(const Comm *c);

// Arms the watchdog: a collective that has not returned after `seconds` ends this process (exit status 3) with
// "rank R of N: <collective> has waited S s ...". 0 disarms it. A no-op for the single backend.
Status comm_set_timeout(Comm *c, double seconds);

// x[i] = sum over ranks of x[i], in place, on host f32 buffers. The result is the same on every rank.
Status comm_allreduce_sum_f32(const Comm *c, float *x, size_t n);
// The same for doubles (loss sums, norms).
Status comm_allreduce_sum_f64(const Comm *c, double *x, size_t n);
// ZeRO's pair. Reduce-scatter, in place: x [size * chunk] on every rank is summed over the ranks and rank r gets
// elements [r * chunk, (r + 1) * chunk) of the sum in x[0 .. chunk) (the rest of x is then scratch). All-gather:
// rank r's part [chunk] goes to all[r * chunk ...] on every rank (part and all must not overlap). With one rank
// the reduce-scatter does nothing and the all-gather copies.
Status comm_reduce_scatter_sum_f64(const Comm *c, double *x, size_t chunk);
Status comm_allgather_f32(const Comm *c, const float *part, float *all, size_t chunk);
// The same to rank root only (all may be NULL on the other ranks): a checkpoint's gathered shards.
Status comm_gather_f32(const Comm *c, const float *part, float *all, size_t chunk, int root);
// Every rank's local status in, the job's out: AGPT_OK when every rank is fine; otherwise the status of the
// lowest failing rank, with "rank R failed" as the message on the other ranks (*failed_rank = R, or -1).
Status comm_agree_status(const Comm *c, Status local, int *failed_rank);
// bytes of rank root's buffer to every rank.
Status comm_broadcast(const Comm *c, void *buf, size_t bytes, int root);
Status comm_barrier(const Comm *c);
