#include "runtime/comm.h"

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "runtime/comm_nccl.h"
#include "runtime/timer.h"

#ifdef AGPT_WITH_MPI
#include <mpi.h>
#endif

// The number of ranks an MPI launcher announces in the environment (0 when none does).
static int launcher_size(void) {
    const char *keys[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"};  // OpenMPI's mpirun; srun --mpi=pmi2, MPICH
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        const char *v = getenv(keys[i]);
        if (v && atoi(v) > 0) return atoi(v);
    }
    return 0;
}

// The watchdog: the collective in progress (its name and start time; NULL when none) and a thread that looks at
// it twice a second. It never calls MPI (MPI is initialised for one thread): it prints and ends the process, and
// mpirun ends the rest of the job.
static struct {
    _Atomic(const char *) what;
    _Atomic double since;
    double timeout_s;
    int rank, size;
    pthread_t thread;
    bool running;
} watch;

static void *watchdog(void *unused) {
    (void)unused;
    for (;;) {
        nanosleep(&(struct timespec){.tv_nsec = 500 * 1000 * 1000}, NULL);
        const char *what = atomic_load(&watch.what);
        double waited = timer_now_s() - atomic_load(&watch.since);
        if (what && waited > watch.timeout_s) {
            fprintf(stderr, "agpt: rank %d of %d: %s has waited %.0f s for the other ranks (timeout %g s, "
                    "--comm-timeout): a rank is stuck or its node stopped answering; ending the job\n", watch.rank,
                    watch.size, what, waited, watch.timeout_s);
            fflush(stderr);
            _exit(3);
        }
    }
    return NULL;
}

// Every MPI collective goes between these two.
static inline void collective_begin(const char *what) {
    atomic_store(&watch.since, timer_now_s());
    atomic_store(&watch.what, what);
}
static inline void collective_end(void) { atomic_store(&watch.what, (const char *)NULL); }

Status comm_set_timeout(Comm *c, double seconds) {
    AGPT_CHECK_ARG(seconds >= 0, "comm: the timeout must be >= 0 seconds (0: none), not %g", seconds);
    c->timeout_s = seconds;
    if (c->backend == COMM_SINGLE) return AGPT_OK;
    watch.timeout_s = seconds > 0 ? seconds : 1e300;
    watch.rank = c->rank, watch.size = c->size;
    if (seconds > 0 && !watch.running) {
        if (pthread_create(&watch.thread, NULL, watchdog, NULL))
            return AGPT_FAIL(AGPT_ERR_OOM, "comm: cannot start the collective watchdog thread");
        pthread_detach(watch.thread);
        watch.running = true;
    }
    return AGPT_OK;
}

// agpt train --gpus N's children: rank, size, local rank and the NCCL id from the environment.
static Status init_from_launcher(Comm *c, const char *world) {
    const char *rank = getenv("AGPT_RANK"), *local = getenv("AGPT_LOCAL_RANK"), *hex = getenv("AGPT_NCCL_ID");
    c->size = atoi(world), c->rank = rank ? atoi(rank) : -1, c->local_rank = local ? atoi(local) : -1;
    AGPT_CHECK_ARG(c->size >= 1 && c->rank >= 0 && c->rank < c->size && c->local_rank >= 0 && hex &&
                       strlen(hex) == 256, "AGPT_WORLD_SIZE is set (%s) but AGPT_RANK, AGPT_LOCAL_RANK or "
                   "AGPT_NCCL_ID is missing or wrong: these are agpt train --gpus N's to set, not a user's", world);
#ifdef AGPT_WITH_NCCL
    uint8_t id[128];
    for (int i = 0; i < 128; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return AGPT_FAIL(AGPT_ERR_ARG, "AGPT_NCCL_ID is not hex");
        id[i] = (uint8_t)v;
    }
    c->backend = COMM_NCCL;
    collective_begin("ncclCommInitRank");
    Status s = nccl_join(c, c->local_rank, id);
    collective_end();
    return s;
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "started by agpt train --gpus, but this agpt was built without NCCL");
#endif
}

Status comm_init(Comm *c) {
    memset(c, 0, sizeof *c);
    c->backend = COMM_SINGLE;
    c->size = 1;
    const char *world = getenv("AGPT_WORLD_SIZE");
    if (world) return init_from_launcher(c, world);
    int announced = launcher_size();
    if (announced <= 1) return AGPT_OK;
#ifdef AGPT_WITH_MPI
    int provided = 0;  // the watchdog thread never calls MPI: the main thread alone does
    int ok = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    if (ok != MPI_SUCCESS) return AGPT_FAIL(AGPT_ERR_DEVICE, "MPI_Init failed (%d)", ok);
    c->backend = COMM_MPI;
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->size);
    // The errors of a collective come back as return codes, not as an abort of the whole job.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm node;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
        MPI_Comm_rank(node, &c->local_rank);
        MPI_Comm_free(&node);
    }
    return AGPT_OK;
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "started by an MPI launcher with %d ranks, but this agpt was built "
                     "without MPI (install libopenmpi-dev and rebuild)", announced);
#endif
}

void comm_finalize(Comm *c) {
    nccl_leave(c);
#ifdef AGPT_WITH_MPI
    // MPI_Finalize synchronises the ranks like a collective: the watchdog stays armed through it.
    collective_begin("MPI_Finalize");
    if (c->backend == COMM_MPI) MPI_Finalize();
    collective_end();
#endif
    memset(c, 0, sizeof *c);
    c->size = 1;
}

const char *comm_backend_name(const Comm *c) {
    return c->backend == COMM_NCCL ? "NCCL" : c->backend == COMM_MPI ? (c->nccl ? "MPI + NCCL" : "MPI") : "single";
}

Status comm_init_device(Comm *c, int gpu, bool even_alone) {
    if (c->nccl) return AGPT_OK;
#ifdef AGPT_WITH_NCCL
    if (c->backend == COMM_SINGLE && even_alone) {
        uint8_t id[128];
        AGPT_TRY(nccl_new_id(id));
        return nccl_join(c, gpu, id);
    }
#endif
    if (c->size == 1 || c->backend != COMM_MPI) return AGPT_OK;
#if defined(AGPT_WITH_NCCL) && defined(AGPT_WITH_MPI)
    uint8_t id[128] = {0};
    Status s = c->rank == 0 ? nccl_new_id(id) : AGPT_OK;
    int failed;
    AGPT_TRY(comm_agree_status(c, s, &failed));
    AGPT_TRY(comm_broadcast(c, id, sizeof id, 0));
    collective_begin("ncclCommInitRank");
    s = nccl_join(c, gpu, id);
    collective_end();
    return comm_agree_status(c, s, &failed);
#else
    (void)gpu, (void)even_alone;
    return AGPT_OK;
#endif
}

bool comm_device_ready(const Comm *c) { return c->nccl != NULL; }

Status comm_nccl_id_hex(char hex[257]) {
    uint8_t id[128];
    AGPT_TRY(nccl_new_id(id));
    for (int i = 0; i < 128; i++) snprintf(hex + 2 * i, 3, "%02x", id[i]);
    return AGPT_OK;
}

Status comm_allreduce_sum_f32_device(const Comm *c, float *const *bufs, const size_t *n, int k) {
    AGPT_CHECK_ARG(c->nccl, "comm: no device collectives (comm_init_device, NCCL)");
    collective_begin("ncclAllReduce");
    Status s = nccl_allreduce_device_f32(c, bufs, n, k);
    collective_end();
    return s;
}

// A host collective over NCCL (the --gpus backend), under the watchdog.
#define VIA_NCCL(what, call)           \
    do {                               \
        collective_begin(what);        \
        Status s_ = (call);            \
        collective_end();              \
        return s_;                     \
    } while (0)

#ifdef AGPT_WITH_MPI
static Status mpi_error(int code, const char *what) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    return AGPT_FAIL(AGPT_ERR_DEVICE, "%s failed: %.*s", what, len, text);
}

// MPI counts are ints: long buffers go in pieces.
static Status allreduce_chunks(void *x, size_t n, size_t elem, MPI_Datatype type) {
    const size_t chunk = (size_t)INT_MAX / 2;
    for (size_t off = 0; off < n; off += chunk) {
        int count = (int)(n - off < chunk ? n - off : chunk);
        collective_begin("MPI_Allreduce");
        int rc = MPI_Allreduce(MPI_IN_PLACE, (char *)x + off * elem, count, type, MPI_SUM, MPI_COMM_WORLD);
        collective_end();
        if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Allreduce");
    }
    return AGPT_OK;
}
#endif

Status comm_allreduce_sum_f32(const Comm *c, float *x, size_t n) {
    if (c->backend == COMM_SINGLE || n == 0) return AGPT_OK;
    if (c->backend == COMM_NCCL) VIA_NCCL("ncclAllReduce", nccl_allreduce_host(c, x, n, NCCL_KIND_F32, NCCL_OP_SUM));
#ifdef AGPT_WITH_MPI
    return allreduce_chunks(x, n, sizeof *x, MPI_FLOAT);
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}

Status comm_allreduce_sum_f64(const Comm *c, double *x, size_t n) {
    if (c->backend == COMM_SINGLE || n == 0) return AGPT_OK;
    if (c->backend == COMM_NCCL) VIA_NCCL("ncclAllReduce", nccl_allreduce_host(c, x, n, NCCL_KIND_F64, NCCL_OP_SUM));
#ifdef AGPT_WITH_MPI
    return allreduce_chunks(x, n, sizeof *x, MPI_DOUBLE);
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}

Status comm_agree_status(const Comm *c, Status local, int *failed_rank) {
    *failed_rank = local != AGPT_OK ? c->rank : -1;
    if (c->backend == COMM_SINGLE) return local;
    if (c->backend == COMM_NCCL) {  // the same protocol as MPI's below: MIN of the failing ranks, its code
        int32_t first = local != AGPT_OK ? c->rank : c->size;
        collective_begin("ncclAllReduce (status)");
        Status s = nccl_allreduce_host(c, &first, 1, NCCL_KIND_I32, NCCL_OP_MIN);
        int32_t code = (int32_t)local;
        if (s == AGPT_OK && first != c->size) s = nccl_broadcast_host(c, &code, sizeof code, first);
        collective_end();
        if (s != AGPT_OK) return s;
        if (first == c->size) return AGPT_OK;
        *failed_rank = first;
        if (first == c->rank) return local;
        return AGPT_FAIL((Status)code, "rank %d of %d failed (its message is above); this rank stops too", first,
                         c->size);
    }
#ifdef AGPT_WITH_MPI
    // The lowest failing rank: MIN over (rank if failed else size).
    int mine = local != AGPT_OK ? c->rank : c->size, first = c->size;
    collective_begin("MPI_Allreduce (status)");
    int rc = MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    collective_end();
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Allreduce (status)");
    if (first == c->size) return AGPT_OK;
    int code = (int)local;
    collective_begin("MPI_Bcast (status)");
    rc = MPI_Bcast(&code, 1, MPI_INT, first, MPI_COMM_WORLD);
    collective_end();
    if (rc != MPI_SUCCESS) return mpi_error(rc, "MPI_Bcast (status)");
    *failed_rank = first;
    if (first == c->rank) return local;  // its own message stays
    return AGPT_FAIL((Status)code, "rank %d of %d failed (its message is above); this rank stops too", first, c->size);
#else
    return local;
#endif
}

Status comm_broadcast(const Comm *c, void *buf, size_t bytes, int root) {
    if (c->backend == COMM_SINGLE || bytes == 0) return AGPT_OK;
    if (c->backend == COMM_NCCL) VIA_NCCL("ncclBroadcast", nccl_broadcast_host(c, buf, bytes, root));
#ifdef AGPT_WITH_MPI
    AGPT_CHECK_ARG(bytes <= (size_t)INT_MAX, "comm_broadcast: %zu bytes is too many for one MPI_Bcast", bytes);
    collective_begin("MPI_Bcast");
    int rc = MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD);
    collective_end();
    return rc == MPI_SUCCESS ? AGPT_OK : mpi_error(rc, "MPI_Bcast");
#else
    (void)buf, (void)root;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}

Status comm_barrier(const Comm *c) {
    if (c->backend == COMM_SINGLE) return AGPT_OK;
    if (c->backend == COMM_NCCL) {
        int32_t one = 1;
        VIA_NCCL("ncclAllReduce (barrier)", nccl_allreduce_host(c, &one, 1, NCCL_KIND_I32, NCCL_OP_SUM));
    }
#ifdef AGPT_WITH_MPI
    collective_begin("MPI_Barrier");
    int rc = MPI_Barrier(MPI_COMM_WORLD);
    collective_end();
    return rc == MPI_SUCCESS ? AGPT_OK : mpi_error(rc, "MPI_Barrier");
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}

Status comm_reduce_scatter_sum_f64(const Comm *c, double *x, size_t chunk) {
    if (c->backend == COMM_SINGLE || chunk == 0) return AGPT_OK;
    if (c->backend == COMM_NCCL) VIA_NCCL("ncclReduceScatter", nccl_reduce_scatter_host_f64(c, x, x, chunk));
#ifdef AGPT_WITH_MPI
    AGPT_CHECK_ARG(chunk <= (size_t)INT_MAX, "comm_reduce_scatter: %zu elements per rank is too many for MPI", chunk);
    collective_begin("MPI_Reduce_scatter_block");
    int rc = MPI_Reduce_scatter_block(MPI_IN_PLACE, x, (int)chunk, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    collective_end();
    return rc == MPI_SUCCESS ? AGPT_OK : mpi_error(rc, "MPI_Reduce_scatter_block");
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}

Status comm_allgather_f32(const Comm *c, const float *part, float *all, size_t chunk) {
    if (c->backend == COMM_SINGLE || chunk == 0) {
        if (chunk) memmove(all, part, chunk * sizeof *all);
        return AGPT_OK;
    }
    if (c->backend == COMM_NCCL) VIA_NCCL("ncclAllGather", nccl_allgather_host_f32(c, part, all, chunk));
#ifdef AGPT_WITH_MPI
    AGPT_CHECK_ARG(chunk <= (size_t)INT_MAX, "comm_allgather: %zu elements per rank is too many for MPI", chunk);
    collective_begin("MPI_Allgather");
    int rc = MPI_Allgather(part, (int)chunk, MPI_FLOAT, all, (int)chunk, MPI_FLOAT, MPI_COMM_WORLD);
    collective_end();
    return rc == MPI_SUCCESS ? AGPT_OK : mpi_error(rc, "MPI_Allgather");
#else
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}

Status comm_gather_f32(const Comm *c, const float *part, float *all, size_t chunk, int root) {
    if (c->backend == COMM_SINGLE || chunk == 0) {
        if (chunk) memmove(all, part, chunk * sizeof *all);
        return AGPT_OK;
    }
    // NCCL has no gather: an all-gather into device memory that only the root copies out.
    if (c->backend == COMM_NCCL)
        VIA_NCCL("ncclAllGather (gather)", nccl_allgather_host_f32(c, part, c->rank == root ? all : NULL, chunk));
#ifdef AGPT_WITH_MPI
    AGPT_CHECK_ARG(chunk <= (size_t)INT_MAX, "comm_gather: %zu elements per rank is too many for MPI", chunk);
    collective_begin("MPI_Gather");
    int rc = MPI_Gather(part, (int)chunk, MPI_FLOAT, all, (int)chunk, MPI_FLOAT, root, MPI_COMM_WORLD);
    collective_end();
    return rc == MPI_SUCCESS ? AGPT_OK : mpi_error(rc, "MPI_Gather");
#else
    (void)root;
    return AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no MPI in this build");
#endif
}
