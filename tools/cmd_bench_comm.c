// agpt bench comm: the all-reduce the data-parallel trainer runs (runtime/comm.h), timed per message size, under
// mpirun: `mpirun -np N agpt bench comm`. Prints, per size, the time and the bus bandwidth (the NCCL-tests
// convention: bytes x 2 (N - 1) / N / time, what each rank's link carries in a ring all-reduce), so runs with
// different N compare. One process: the single backend (no-op), reported as such. --device cuda: the f32 NCCL
// all-reduce of device buffers the trainer runs on GPUs (one process: a one-rank NCCL communicator, which still
// moves the data through NCCL's kernels).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/comm.h"
#include "runtime/memory.h"
#include "runtime/timer.h"
#include "tools/cli.h"

// The GPU's all-reduce: f32 device buffers through NCCL, checked (every element = 1 + 2 + ... + size) and timed.
static int bench_device(Comm *c, size_t max_bytes, long long iters) {
    const char *cmd = "bench comm";
    Status s = cuda_compiled() && cuda_device_count() > 0
                   ? comm_init_device(c, c->local_rank, true)
                   : AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "--device cuda needs a GPU and a CUDA build");
    if (s == AGPT_OK && !comm_device_ready(c))
        s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "no device collectives: this agpt was built without NCCL");
    float *dev = NULL, *host = malloc(max_bytes);
    if (s == AGPT_OK) s = host ? mem_device_alloc(max_bytes, (void **)&dev) : AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    int failed_rank;
    s = comm_agree_status(c, s, &failed_rank);
    if (s == AGPT_OK && c->rank == 0)
        printf("agpt bench comm: NCCL on the GPUs, %d rank%s; f32 all-reduce (sum) of device buffers\n%12s %12s %12s\n",
               c->size, c->size > 1 ? "s" : "", "bytes", "ms", "busbw GB/s");
    for (size_t bytes = 4096; s == AGPT_OK && bytes <= max_bytes; bytes *= 4) {
        size_t n = bytes / sizeof(float);
        for (size_t i = 0; i < n; i++) host[i] = (float)(c->rank + 1);
        Tensor d = tensor_1d(dev, DT_F32, DEV_CUDA, (int64_t)n), h = tensor_1d(host, DT_F32, DEV_CPU, (int64_t)n);
        s = tensor_copy(&d, &h);
        if (s == AGPT_OK) s = comm_allreduce_sum_f32_device(c, &dev, &n, 1);  // warm-up, and a check
        if (s == AGPT_OK) s = tensor_copy(&h, &d);
        float want = (float)(c->size * (c->size + 1) / 2.0);
        if (s == AGPT_OK && (host[0] != want || host[n - 1] != want))
            s = AGPT_FAIL(AGPT_ERR_DEVICE, "NCCL all-reduce of %zu bytes gave %g, expected %g", bytes, host[0], want);
        if (s == AGPT_OK) s = comm_barrier(c);
        double t0 = timer_now_s();
        for (long long k = 0; k < iters && s == AGPT_OK; k++) s = comm_allreduce_sum_f32_device(c, &dev, &n, 1);
        double per = (timer_now_s() - t0) / (double)iters;
        double bus = c->size > 1 ? (double)bytes * 2 * (c->size - 1) / c->size / per / 1e9 : (double)bytes / per / 1e9;
        if (s == AGPT_OK && c->rank == 0) printf("%12zu %12.3f %12.2f%s\n", bytes, per * 1e3, bus, c->size > 1 ? "" : " (bytes/s: one rank)");
    }
    mem_device_free(dev);
    free(host);
    return s == AGPT_OK ? 0 : cli_report(cmd, s);
}

int cmd_bench_comm(int argc, char **argv) {
    const char *cmd = "bench comm";
    long long max_mb = 256, iters = 5;
    bool cuda = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: mpirun -np N agpt bench comm [--max-mb M (256)] [--iters N (5)] [--device cpu|cuda]\n"
                   "  f64 all-reduce of host buffers (the trainer's gradient sums on the CPU), or with --device cuda\n"
                   "  f32 NCCL all-reduce of device buffers (its GPU gradients), from 4 KB to M MB: time and bus\n"
                   "  bandwidth.\n");
            return 0;
        }
        if (!strcmp(a, "--max-mb") || !strcmp(a, "--iters")) {
            if (!(v = cli_value(argc, argv, &i, cmd))) return 2;
            if (cli_parse_int(cmd, a, v, 1, 1 << 16, !strcmp(a, "--iters") ? &iters : &max_mb)) return 2;
        } else if (!strcmp(a, "--device")) {
            if (!(v = cli_value(argc, argv, &i, cmd))) return 2;
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
                fprintf(stderr, "agpt bench comm: --device is cpu or cuda\n");
                return 2;
            }
            cuda = !strcmp(v, "cuda");
        } else {
            fprintf(stderr, "agpt bench comm: unknown option '%s'\n", a);
            return 2;
        }
    }
    Comm c;
    Status s = comm_init(&c);
    if (s) return cli_report(cmd, s);
    if (cuda) {
        int rc = bench_device(&c, (size_t)max_mb << 20, iters);
        comm_finalize(&c);
        return rc;
    }
    size_t max_bytes = (size_t)max_mb << 20;
    double *buf = malloc(max_bytes);
    if (!buf) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for %lld MB", max_mb);
    int failed_rank;  // every rank learns of one rank's failed malloc, instead of waiting for it in the all-reduce
    s = comm_agree_status(&c, s, &failed_rank);
    if (s == AGPT_OK && c.rank == 0)
        printf("agpt bench comm: %s backend, %d rank%s; f64 all-reduce (sum)\n%12s %12s %12s\n", comm_backend_name(&c),
               c.size, c.size > 1 ? "s" : "", "bytes", "ms", "busbw GB/s");
    for (size_t bytes = 4096; s == AGPT_OK && bytes <= max_bytes; bytes *= 4) {
        size_t n = bytes / sizeof(double);
        for (size_t i = 0; i < n; i++) buf[i] = c.rank + 1;
        s = comm_allreduce_sum_f64(&c, buf, n);  // warm-up, and a check of the sum
        double want = c.size * (c.size + 1) / 2.0;
        if (s == AGPT_OK && (buf[0] != want || buf[n - 1] != want))
            s = AGPT_FAIL(AGPT_ERR_DEVICE, "all-reduce of %zu bytes gave %g, expected %g", bytes, buf[0], want);
        if (s == AGPT_OK) s = comm_barrier(&c);
        double t0 = timer_now_s();
        for (long long k = 0; k < iters && s == AGPT_OK; k++) s = comm_allreduce_sum_f64(&c, buf, n);
        double per = (timer_now_s() - t0) / (double)iters;
        double bus = c.size > 1 ? (double)bytes * 2 * (c.size - 1) / c.size / per / 1e9 : 0;
        if (s == AGPT_OK && c.rank == 0) printf("%12zu %12.3f %12.2f\n", bytes, per * 1e3, bus);
    }
    free(buf);
    int rc = s == AGPT_OK ? 0 : cli_report(cmd, s);  // before MPI_Finalize, as agpt train does
    comm_finalize(&c);
    return rc;
}
