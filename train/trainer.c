#include "train/trainer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "runtime/comm.h"
#include "runtime/memory.h"
#include "runtime/timer.h"
#include "train/run_state.h"

TrainerConfig trainer_default_config(void) {
    return (TrainerConfig){.accum = 8, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.001f,
                           .grad_clip = 1.0f};
}

// Where each parameter sits in one flat index space over all of them (the order of the list): the gradient sums
// and, under ZeRO-1, the shards are ranges of it.
typedef struct Layout {
    int64_t *offset;  // [n] first flat index of parameter i
    int64_t total;    // elements of every parameter
    int64_t chunk;    // ceil(total / ranks): one rank's shard (the flat buffers are padded to ranks * chunk)
    int64_t lo, hi;   // this rank's shard [lo, hi) (hi - lo < chunk for the last ranks; may be empty)
} Layout;

static Status layout_init(Layout *L, const TrainParam *p, int n, const Comm *comm) {
    if (!(L->offset = malloc((size_t)n * sizeof *L->offset))) return AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory");
    L->total = 0;
    for (int i = 0; i < n; i++) L->offset[i] = L->total, L->total += tensor_numel(&p[i].param);
    L->chunk = (L->total + comm->size - 1) / comm->size;
    L->lo = (int64_t)comm->rank * L->chunk;
    L->hi = L->lo + L->chunk < L->total ? L->lo + L->chunk : L->total;
    if (L->lo > L->hi) L->lo = L->hi;
    return AGPT_OK;
}

// The part of parameter i inside this rank's shard, as element range [*a, *b) of the tensor (empty: *a == *b).
static void shard_range(const Layout *L, const TrainParam *p, int i, int64_t *a, int64_t *b) {
    int64_t first = L->offset[i], last = first + tensor_numel(&p[i].param);
    int64_t lo = L->lo > first ? L->lo : first, hi = L->hi < last ? L->hi : last;
    *a = lo - first, *b = hi > lo ? hi - first : lo - first;
}

// Elements [a, b) of an f32 tensor as a 1-D tensor.
static Tensor span(const Tensor *t, int64_t a, int64_t b) {
    return tensor_1d((float *)t->data + a, DT_F32, t->device, b - a);
}

// AdamW's moments: flat f32 [len], len = every element (plain) or this rank's shard (ZeRO-1).
typedef struct Moments {
    float *m, *v;
    int64_t len;
    RunParam *rp;  // [n] name, master (= the param), m, v: what a checkpoint holds (full tensors)
} Moments;

static void moments_free(Moments *mo) {
    mem_host_free(mo->m), mem_host_free(mo->v);
    free(mo->rp);
}

static Status flat_alloc(float **x, int64_t len) {
    AGPT_TRY(mem_host_alloc((size_t)(len > 0 ? len : 1) * sizeof(float), (void **)x));
    memset(*x, 0, (size_t)(len > 0 ? len : 1) * sizeof(float));
    return AGPT_OK;
}

// Points the checkpoint's views of m and v at full flat buffers [total].
static void moments_view(Moments *mo, const Layout *L, const TrainParam *p, int n, float *m_all, float *v_all) {
    for (int i = 0; i < n; i++) {
        Tensor m = p[i].param, v = p[i].param;
        m.data = m_all + L->offset[i], v.data = v_all + L->offset[i];
        mo->rp[i] = (RunParam){.name = p[i].name, .master = p[i].param, .m = m, .v = v};
    }
}

static Status moments_alloc(Moments *mo, const Layout *L, const TrainParam *p, int n, bool zero) {
    mo->len = zero ? L->chunk : L->total;
    if (!(mo->rp = calloc((size_t)n, sizeof *mo->rp)))
        return AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory for %d parameters", n);
    AGPT_TRY(flat_alloc(&mo->m, mo->len));
    AGPT_TRY(flat_alloc(&mo->v, mo->len));
    if (!zero) moments_view(mo, L, p, n, mo->m, mo->v);
    return AGPT_OK;
}

// Under ZeRO-1 a checkpoint needs every rank's moments: they are gathered into full buffers on rank 0 for the save
// (a resume reads full ones on every rank, for the moment of the load, and keeps this rank's shard), so the state
// file is the same in both modes.
typedef struct FullMoments {
    float *m, *v;  // [ranks * chunk]
} FullMoments;

static Status full_moments_open(FullMoments *f, Moments *mo, const Layout *L, const TrainParam *p, int n,
                                const Comm *comm) {
    *f = (FullMoments){0};
    AGPT_TRY(flat_alloc(&f->m, L->chunk * comm->size));
    AGPT_TRY(flat_alloc(&f->v, L->chunk * comm->size));
    moments_view(mo, L, p, n, f->m, f->v);
    return AGPT_OK;
}

static void full_moments_close(FullMoments *f) { mem_host_free(f->m), mem_host_free(f->v); }

static Status save(const TrainerConfig *c, const Moments *mo, int n, int64_t updates, int64_t epoch, int64_t pos) {
    RunProgress pr = {.step = updates, .epoch = epoch, .position = pos};
    return run_state_save(c->dir, &pr, c->config_text, mo->rp, n);
}

// Parameters on a device: the loop works on host copies, the f32 masters and their gradients, and the optimizer
// runs on the CPU, as the reference's DeepSpeed run offloads its optimizer to the CPU. The step's gradients
// accumulate on the device over an update's micro-steps and come to the host once per update; the updated
// masters go back to the device after it (and after a resume).
typedef struct HostMirror {
    TrainParam *host;  // [n] master + gradient on the host, same names and lr scales as the caller's list
    float *buf;        // [2 * total] their storage
    Engine cpu;        // the optimizer's engine
    bool has_cpu;
} HostMirror;

static Status mirror_open(HostMirror *h, const Engine *e, const TrainParam *p, int n, const Layout *L) {
    memset(h, 0, sizeof *h);
    if (!(h->host = calloc((size_t)n, sizeof *h->host))) return AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory");
    AGPT_TRY(flat_alloc(&h->buf, 2 * L->total));
    for (int i = 0; i < n; i++) {
        h->host[i] = p[i];
        h->host[i].param = tensor_make(h->buf + L->offset[i], DT_F32, DEV_CPU, p[i].param.ndim, p[i].param.shape);
        h->host[i].grad = tensor_make(h->buf + L->total + L->offset[i], DT_F32, DEV_CPU, p[i].param.ndim,
                                      p[i].param.shape);
        AGPT_TRY(tensor_copy(&h->host[i].param, &p[i].param));
    }
    AGPT_TRY(engine_create(&h->cpu, DEV_CPU, 0, e->num_threads, 0));
    h->has_cpu = true;
    return AGPT_OK;
}

static void mirror_close(HostMirror *h) {
    if (h->has_cpu) engine_destroy(&h->cpu);
    free(h->host), mem_host_free(h->buf);
}

// The masters to the device's parameters.
static Status mirror_push(const HostMirror *h, TrainParam *p, int n) {
    for (int i = 0; i < n; i++) AGPT_TRY(tensor_copy(&p[i].param, &h->host[i].param));
    return AGPT_OK;
}

static Status check_config(const TrainerConfig *c, const TrainParam *p, int n) {
    AGPT_CHECK_ARG(c->accum >= 1 && c->total_updates >= 1 && c->ckpt_every >= 0 && c->dir && c->config_text && n >= 1,
                   "trainer: need accum >= 1, total updates >= 1, a run folder, the options text and parameters");
    AGPT_CHECK_ARG(c->beta1 >= 0 && c->beta1 < 1 && c->beta2 >= 0 && c->beta2 < 1 && c->eps > 0,
                   "trainer: AdamW betas must be in [0,1) and eps > 0");
    AGPT_CHECK_ARG(c->zero == 0 || c->zero == 1, "trainer: ZeRO stage %d: only 0 (off) and 1 exist", c->zero);
    AGPT_TRY(schedule_check(&c->schedule));
    for (int i = 0; i < n; i++)
        AGPT_CHECK_ARG(p[i].param.dtype == DT_F32 && p[i].param.device == p[0].param.device &&
                           p[i].grad.dtype == DT_F32 && p[i].grad.device == p[0].param.device &&
                           tensor_same_shape(&p[i].param, &p[i].grad),
                       "trainer: parameter %s: param and grad must be f32 tensors of one shape, all on one device",
                       p[i].name);
    return AGPT_OK;
}

// Rank 0 saves; every rank learns whether that worked before going on. Under ZeRO-1 the moments are gathered to
// rank 0 first (a collective: every rank takes part).
static Status save_all(const TrainerConfig *c, const Comm *comm, Moments *mo, const Layout *L, const TrainParam *p,
                       int n, int64_t updates, int64_t epoch, int64_t pos) {
    int failed;
    if (!c->zero) return comm_agree_status(comm, comm->rank == 0 ? save(c, mo, n, updates, epoch, pos) : AGPT_OK,
                                           &failed);
    FullMoments f = {0};  // on rank 0 alone
    Status s = comm->rank == 0 ? full_moments_open(&f, mo, L, p, n, comm) : AGPT_OK;
    s = comm_agree_status(comm, s, &failed);
    if (s == AGPT_OK) s = comm_gather_f32(comm, mo->m, f.m, (size_t)L->chunk, 0);
    if (s == AGPT_OK) s = comm_gather_f32(comm, mo->v, f.v, (size_t)L->chunk, 0);
    if (s == AGPT_OK && comm->rank == 0) s = save(c, mo, n, updates, epoch, pos);
    full_moments_close(&f);
    return comm_agree_status(comm, s, &failed);
}

static Status load(const TrainerConfig *c, const Comm *comm, Moments *mo, const Layout *L, const TrainParam *p,
                   int n, RunProgress *pr) {
    if (!c->zero) return run_state_load(c->dir, c->config_text, mo->rp, n, pr);
    FullMoments f;
    Status s = full_moments_open(&f, mo, L, p, n, comm);
    if (s == AGPT_OK) s = run_state_load(c->dir, c->config_text, mo->rp, n, pr);
    if (s == AGPT_OK) {
        memcpy(mo->m, f.m + L->lo, (size_t)(L->hi - L->lo) * sizeof(float));
        memcpy(mo->v, f.v + L->lo, (size_t)(L->hi - L->lo) * sizeof(float));
    }
    full_moments_close(&f);
    return s;
}

// The update's gradient is the mean over micro; it is clipped to the global norm and AdamW steps the parameters.
// Plain data parallel: every rank has every summed gradient and updates every parameter. ZeRO-1: the sums are
// reduce-scattered, each rank clips and steps its shard with its shard of the moments, and the parameters are
// all-gathered. *norm is the global gradient norm before clipping.
typedef struct UpdateBuffers {
    double *acc;   // [ranks * chunk] this rank's gradient sums (padding zero); ZeRO-1's scratch after them
} UpdateBuffers;

static Status clip_scale(const TrainerConfig *c, double norm, int64_t update, float *scale) {
    if (!isfinite(norm))
        return AGPT_FAIL(AGPT_ERR_ARG, "gradient norm is %g at update %lld: the loss diverged; lower the learning "
                         "rate or check the data", norm, (long long)update);
    *scale = c->grad_clip > 0 && c->grad_clip / (norm + 1e-6) < 1 ? (float)(c->grad_clip / (norm + 1e-6)) : 1;  // torch's clip_grad_norm_
    return AGPT_OK;
}

// reduced: u->acc already holds the sums over the ranks (the GPUs' all-reduce); else this rank's sums.
static Status update_plain(Engine *e, const TrainerConfig *c, const Comm *comm, TrainParam *p, int n, Moments *mo,
                           const Layout *L, UpdateBuffers *u, bool reduced, int micro, int64_t update, double lr,
                           double *norm) {
    if (!reduced) AGPT_TRY(comm_allreduce_sum_f64(comm, u->acc, (size_t)L->total));
    for (int i = 0; i < n; i++) {  // the mean gradient, rounded to f32 once
        float *g = p[i].grad.data;
        const double *a = u->acc + L->offset[i];
        for (int64_t j = 0, m = tensor_numel(&p[i].grad); j < m; j++) g[j] = (float)(a[j] / micro);
    }
    double total = 0, ss = 0;
    for (int i = 0; i < n; i++) {
        AGPT_TRY(op_sum_squares(e, &ss, &p[i].grad));
        total += ss;
    }
    *norm = sqrt(total);
    float scale = 1;
    AGPT_TRY(clip_scale(c, *norm, update, &scale));
    for (int i = 0; i < n && scale != 1; i++) AGPT_TRY(op_scale(e, &p[i].grad, scale));
    for (int i = 0; i < n; i++) {
        double lr_i = p[i].lr_scale > 0 ? lr * p[i].lr_scale : lr;
        AGPT_TRY(op_adamw(e, &p[i].param, &p[i].grad, &mo->rp[i].m, &mo->rp[i].v, (float)lr_i, c->beta1, c->beta2,
                          c->eps, c->weight_decay, (int)update));
    }
    return AGPT_OK;
}

// ZeRO-1 needs no buffer beyond u->acc: the reduce-scatter leaves this rank's sums in its first chunk doubles;
// once they are read, its storage (2 * ranks * chunk floats) holds the all-gather's result (ranks * chunk floats)
// and, after it, this rank's updated parameters (chunk floats). A local failure is agreed on before each
// collective, so that no rank waits in one for a rank that stopped.
static Status update_zero1(Engine *e, const TrainerConfig *c, const Comm *comm, TrainParam *p, int n, Moments *mo,
                           const Layout *L, UpdateBuffers *u, bool reduced, int micro, int64_t update, double lr,
                           double *norm) {
    const size_t padded = (size_t)(L->chunk * comm->size);
    double *sums = u->acc;
    float *all = (float *)u->acc, *send = (float *)u->acc + padded;
    Status s = AGPT_OK;
    int failed;
    if (reduced) memmove(sums, u->acc + L->lo, (size_t)(L->hi - L->lo) * sizeof *sums);
    else AGPT_TRY(comm_reduce_scatter_sum_f64(comm, u->acc, (size_t)L->chunk));
    double total = 0, ss = 0;
    for (int i = 0; i < n && s == AGPT_OK; i++) {  // this shard's mean gradient and its sum of squares
        int64_t a, b;
        shard_range(L, p, i, &a, &b);
        if (a == b) continue;
        float *g = p[i].grad.data;
        const double *sum = sums + (L->offset[i] + a - L->lo);
        for (int64_t j = a; j < b; j++) g[j] = (float)(sum[j - a] / micro);
        Tensor gs = span(&p[i].grad, a, b);
        s = op_sum_squares(e, &ss, &gs);
        total += ss;
    }
    AGPT_TRY(comm_agree_status(comm, s, &failed));
    AGPT_TRY(comm_allreduce_sum_f64(comm, &total, 1));
    *norm = sqrt(total);
    float scale = 1;
    AGPT_TRY(clip_scale(c, *norm, update, &scale));  // the same norm on every rank: all fail or none
    for (int i = 0; i < n && s == AGPT_OK; i++) {
        int64_t a, b;
        shard_range(L, p, i, &a, &b);
        if (a == b) continue;
        Tensor w = span(&p[i].param, a, b), g = span(&p[i].grad, a, b);
        int64_t at = L->offset[i] + a - L->lo;  // where the span's moments start in this rank's shard
        Tensor m = tensor_1d(mo->m + at, DT_F32, DEV_CPU, b - a), v = tensor_1d(mo->v + at, DT_F32, DEV_CPU, b - a);
        if (scale != 1) s = op_scale(e, &g, scale);
        double lr_i = p[i].lr_scale > 0 ? lr * p[i].lr_scale : lr;
        if (s == AGPT_OK)
            s = op_adamw(e, &w, &g, &m, &v, (float)lr_i, c->beta1, c->beta2, c->eps, c->weight_decay, (int)update);
        if (s == AGPT_OK) memcpy(send + at, w.data, (size_t)(b - a) * sizeof(float));
    }
    AGPT_TRY(comm_agree_status(comm, s, &failed));
    AGPT_TRY(comm_allgather_f32(comm, send, all, (size_t)L->chunk));
    for (int i = 0; i < n; i++)
        memcpy(p[i].param.data, all + L->offset[i], (size_t)tensor_numel(&p[i].param) * sizeof(float));
    return AGPT_OK;
}

Status trainer_run(Engine *e, const TrainerConfig *c, TrainParam *dp, int n, TrainStepFn step, void *ctx,
                   TrainerResult *res) {
    memset(res, 0, sizeof *res);
    AGPT_TRY(check_config(c, dp, n));
    const bool on_device = dp[0].param.device != DEV_CPU || c->host_copies;
    const Comm single = {.backend = COMM_SINGLE, .rank = 0, .size = 1};
    const Comm *comm = c->comm ? c->comm : &single;
    const bool lead = comm->rank == 0;  // writes the log and the checkpoints
    Layout L = {0};
    Moments mo = {0};
    UpdateBuffers u = {0};
    Loader *loader = NULL;
    FILE *log = NULL;
    void *sample = NULL;
    HostMirror mirror = {0};
    Status s = layout_init(&L, dp, n, comm);
    if (s == AGPT_OK && on_device) s = mirror_open(&mirror, e, dp, n, &L);
    // p: the list the optimizer works on (the caller's on the CPU, the host masters for a device), on engine oe.
    TrainParam *p = on_device ? mirror.host : dp;
    Engine *oe = on_device ? &mirror.cpu : e;
    if (s == AGPT_OK) s = moments_alloc(&mo, &L, p, n, c->zero);
    // GPU gradients summed over the ranks by NCCL on the devices (else through the host's collectives).
    const bool device_reduce = on_device && dp[0].param.device == DEV_CUDA && comm_device_ready(comm);
    float **dev_grads = calloc((size_t)n, sizeof *dev_grads);
    size_t *dev_counts = calloc((size_t)n, sizeof *dev_counts);
    if (s == AGPT_OK && (!dev_grads || !dev_counts)) s = AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory");
    for (int i = 0; s == AGPT_OK && i < n; i++)
        dev_grads[i] = dp[i].grad.data, dev_counts[i] = (size_t)tensor_numel(&dp[i].grad);
    const size_t padded = (size_t)(L.chunk * comm->size);
    if (s == AGPT_OK && !(u.acc = calloc(padded ? padded : 1, sizeof *u.acc)))
        s = AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory for the gradient sums (%zu doubles)", padded);
    LoaderConfig lc = c->loader;
    lc.rank = comm->rank, lc.world = comm->size;
    int64_t updates = 0;
    int failed_rank;
    if (c->resume) {  // every rank reads the state (under ZeRO-1 each keeps its shard of the moments)
        s = comm_agree_status(comm, s, &failed_rank);
        RunProgress pr = {0};
        if (s == AGPT_OK) s = load(c, comm, &mo, &L, p, n, &pr);
        if (s == AGPT_OK) updates = pr.step, lc.epoch = pr.epoch, lc.position = pr.position;
        if (s == AGPT_OK && on_device) s = mirror_push(&mirror, dp, n);
    }
    if (s == AGPT_OK) s = loader_start(&lc, &loader);
    if (s == AGPT_OK && !(sample = malloc(lc.sample_bytes))) s = AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory");
    if (s == AGPT_OK && lead) {
        char path[4096];
        snprintf(path, sizeof path, "%s/log.jsonl", c->dir);
        // A resume appends; a new run starts the log afresh.
        if (!(log = fopen(path, c->resume ? "a" : "w")))
            s = AGPT_FAIL(AGPT_ERR_IO, "trainer: cannot write %s: %s", path, strerror(errno));
    }
    s = comm_agree_status(comm, s, &failed_rank);
    // The data position after the last sample used: where a checkpoint resumes (the same on every rank).
    int64_t next_epoch = lc.epoch, next_pos = lc.position;
    const int64_t epoch_len = loader_epoch_length(&lc);
    while (s == AGPT_OK && updates < c->total_updates) {
        double t0 = timer_now_s();
        memset(u.acc, 0, padded * sizeof *u.acc);
        double sum[3] = {0, 0, 0};  // ce, focal, dice over this rank's micro-steps
        for (int a = 0; a < c->accum && s == AGPT_OK; a++) {
            int64_t epoch, pos;
            // On the CPU each micro-step starts from zero; on a device the gradients accumulate over the update.
            for (int i = 0; i < n && s == AGPT_OK && (a == 0 || !on_device); i++) s = tensor_zero(&dp[i].grad);
            if (s == AGPT_OK) s = loader_next(loader, sample, &epoch, &pos, NULL);
            TrainLosses l = {0};
            if (s == AGPT_OK) s = step(ctx, sample, &l);
            if (s != AGPT_OK) break;
            // On the CPU each micro-step's gradient is summed in double, so the update does not depend on the
            // order of the micro-steps (one process of accum N*K and N ranks of accum K sum the same gradients).
            for (int i = 0; i < n && !on_device; i++) {
                const float *g = p[i].grad.data;
                double *acc = u.acc + L.offset[i];
                for (int64_t j = 0, m = tensor_numel(&p[i].grad); j < m; j++) acc[j] += g[j];
            }
            sum[0] += l.ce, sum[1] += l.focal, sum[2] += l.dice;
            next_epoch = pos + 1 < epoch_len ? epoch : epoch + 1;
            next_pos = pos + 1 < epoch_len ? pos + 1 : 0;
        }
        // With NCCL the GPUs sum their gradients over the ranks first (once every rank is known to be fine); then
        // the sums come to the host, once per update.
        if (device_reduce) {
            if ((s = comm_agree_status(comm, s, &failed_rank)) != AGPT_OK) break;
            s = comm_allreduce_sum_f32_device(comm, dev_grads, dev_counts, n);
        }
        for (int i = 0; i < n && s == AGPT_OK && on_device; i++) {
            s = tensor_copy(&p[i].grad, &dp[i].grad);
            const float *g = p[i].grad.data;
            double *acc = u.acc + L.offset[i];
            for (int64_t j = 0, m = tensor_numel(&p[i].grad); s == AGPT_OK && j < m; j++) acc[j] = g[j];
        }
        // A rank that failed stops every rank here, before they would wait for it in a collective.
        if ((s = comm_agree_status(comm, s, &failed_rank)) != AGPT_OK) break;
        // The losses and the stop request, summed over the ranks: every rank stops after the same update.
        double shared[4] = {sum[0], sum[1], sum[2], c->stop && *c->stop ? 1.0 : 0.0};
        s = comm_allreduce_sum_f64(comm, shared, 4);
        // The gradients summed over the ranks' micro-steps; DeepSpeed divides the loss by the accumulation
        // steps and averages over ranks: the update sees the mean gradient of all world * accum micro-steps.
        const int micro = c->accum * comm->size * (c->micro_per_sample > 1 ? c->micro_per_sample : 1);
        double lr = schedule_lr_at_update(&c->schedule, updates + 1), norm = 0;
        if (s == AGPT_OK)
            s = (c->zero ? update_zero1 : update_plain)(oe, c, comm, p, n, &mo, &L, &u, device_reduce, micro,
                                                        updates + 1, lr, &norm);
        if (s == AGPT_OK && on_device) s = mirror_push(&mirror, dp, n);
        // A failure in the update is agreed on too: a rank that broke out alone would leave the others waiting
        // for it in the next update's collective.
        if ((s = comm_agree_status(comm, s, &failed_rank)) != AGPT_OK) break;
        updates++;
        double k = 1.0 / micro;
        res->last_loss = (shared[0] + shared[1] + shared[2]) * k;
        if (lead) {
            fprintf(log, "{\"step\":%lld,\"ce\":%.9g,\"focal\":%.9g,\"dice\":%.9g,\"grad_norm\":%.9g,\"lr\":%.9g,"
                    "\"ms\":%.3f}\n", (long long)updates, shared[0] * k, shared[1] * k, shared[2] * k, norm, lr,
                    (timer_now_s() - t0) * 1e3);
            fflush(log);
            if (c->on_update) {
                TrainerUpdate up = {.update = updates, .total_updates = c->total_updates,
                                    .mean = {shared[0] * k, shared[1] * k, shared[2] * k}, .grad_norm = norm,
                                    .lr = lr, .ms = (timer_now_s() - t0) * 1e3, .epoch = next_epoch};
                c->on_update(c->on_update_ctx, &up);
            }
        }
        bool stop = shared[3] > 0;
        if ((c->ckpt_every > 0 && updates % c->ckpt_every == 0) || updates == c->total_updates || stop)
            s = save_all(c, comm, &mo, &L, p, n, updates, next_epoch, next_pos);
        if (stop) {
            res->stopped = true;
            break;
        }
    }
    res->updates = updates;
    loader_free(loader);
    free(sample);
    if (log) fclose(log);
    moments_free(&mo);
    if (on_device) mirror_close(&mirror);
    free(L.offset);
    free(u.acc);
    free(dev_grads), free(dev_counts);
    return s;
}
