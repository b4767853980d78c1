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

typedef struct Moments {
    RunParam *rp;   // [n] name, master (= the param), m, v
    float **bufs;   // [2n] the m and v storage
} Moments;

static void moments_free(Moments *mo, int n) {
    for (int i = 0; mo->bufs && i < 2 * n; i++) mem_host_free(mo->bufs[i]);
    free(mo->bufs), free(mo->rp);
}

static Status moments_alloc(Moments *mo, const TrainParam *p, int n) {
    mo->rp = calloc((size_t)n, sizeof *mo->rp);
    mo->bufs = calloc((size_t)2 * n, sizeof *mo->bufs);
    if (!mo->rp || !mo->bufs) return AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory for %d parameters", n);
    for (int i = 0; i < n; i++) {
        size_t bytes = tensor_nbytes(&p[i].param);
        for (int j = 0; j < 2; j++) {
            AGPT_TRY(mem_host_alloc(bytes, (void **)&mo->bufs[2 * i + j]));
            memset(mo->bufs[2 * i + j], 0, bytes);
        }
        Tensor m = p[i].param, v = p[i].param;
        m.data = mo->bufs[2 * i], v.data = mo->bufs[2 * i + 1];
        mo->rp[i] = (RunParam){.name = p[i].name, .master = p[i].param, .m = m, .v = v};
    }
    return AGPT_OK;
}

static Status save(const TrainerConfig *c, const Moments *mo, int n, int64_t updates, int64_t epoch, int64_t pos) {
    RunProgress pr = {.step = updates, .epoch = epoch, .position = pos};
    return run_state_save(c->dir, &pr, c->config_text, mo->rp, n);
}

static Status check_config(const TrainerConfig *c, const TrainParam *p, int n) {
    AGPT_CHECK_ARG(c->accum >= 1 && c->total_updates >= 1 && c->ckpt_every >= 0 && c->dir && c->config_text && n >= 1,
                   "trainer: need accum >= 1, total updates >= 1, a run folder, the options text and parameters");
    AGPT_CHECK_ARG(c->beta1 >= 0 && c->beta1 < 1 && c->beta2 >= 0 && c->beta2 < 1 && c->eps > 0,
                   "trainer: AdamW betas must be in [0,1) and eps > 0");
    AGPT_TRY(schedule_check(&c->schedule));
    for (int i = 0; i < n; i++)
        AGPT_CHECK_ARG(p[i].param.dtype == DT_F32 && p[i].param.device == DEV_CPU && p[i].grad.dtype == DT_F32 &&
                           p[i].grad.device == DEV_CPU && tensor_same_shape(&p[i].param, &p[i].grad),
                       "trainer: parameter %s: param and grad must be f32 CPU tensors of one shape", p[i].name);
    return AGPT_OK;
}

// Rank 0 saves; every rank learns whether that worked before going on.
static Status save_all(const TrainerConfig *c, const Comm *comm, const Moments *mo, int n, int64_t updates,
                       int64_t epoch, int64_t pos) {
    Status s = comm->rank == 0 ? save(c, mo, n, updates, epoch, pos) : AGPT_OK;
    int failed;
    return comm_agree_status(comm, s, &failed);
}

Status trainer_run(Engine *e, const TrainerConfig *c, TrainParam *p, int n, TrainStepFn step, void *ctx,
                   TrainerResult *res) {
    memset(res, 0, sizeof *res);
    AGPT_TRY(check_config(c, p, n));
    const Comm single = {.backend = COMM_SINGLE, .rank = 0, .size = 1};
    const Comm *comm = c->comm ? c->comm : &single;
    const bool lead = comm->rank == 0;  // writes the log and the checkpoints
    Moments mo = {0};
    Loader *loader = NULL;
    FILE *log = NULL;
    void *sample = NULL;
    Status s = moments_alloc(&mo, p, n);
    double **acc = calloc((size_t)n, sizeof *acc);  // [n] the update's gradient sums, in double
    if (!acc) s = AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory");
    for (int i = 0; s == AGPT_OK && i < n; i++)
        if (!(acc[i] = malloc((size_t)tensor_numel(&p[i].grad) * sizeof(double))))
            s = AGPT_FAIL(AGPT_ERR_OOM, "trainer: no memory for the gradient sums of %s", p[i].name);
    LoaderConfig lc = c->loader;
    lc.rank = comm->rank, lc.world = comm->size;
    int64_t updates = 0;
    if (s == AGPT_OK && c->resume) {
        RunProgress pr = {0};
        s = run_state_load(c->dir, c->config_text, mo.rp, n, &pr);
        if (s == AGPT_OK) updates = pr.step, lc.epoch = pr.epoch, lc.position = pr.position;
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
    int failed_rank;
    s = comm_agree_status(comm, s, &failed_rank);
    // The data position after the last sample used: where a checkpoint resumes (the same on every rank).
    int64_t next_epoch = lc.epoch, next_pos = lc.position;
    const int64_t epoch_len = loader_epoch_length(&lc);
    while (s == AGPT_OK && updates < c->total_updates) {
        double t0 = timer_now_s();
        for (int i = 0; i < n; i++) memset(acc[i], 0, (size_t)tensor_numel(&p[i].grad) * sizeof(double));
        double sum[3] = {0, 0, 0};  // ce, focal, dice over this rank's micro-steps
        for (int a = 0; a < c->accum && s == AGPT_OK; a++) {
            int64_t epoch, pos;
            for (int i = 0; i < n && s == AGPT_OK; i++) s = tensor_zero(&p[i].grad);
            if (s == AGPT_OK) s = loader_next(loader, sample, &epoch, &pos, NULL);
            TrainLosses l = {0};
            if (s == AGPT_OK) s = step(ctx, sample, &l);
            if (s != AGPT_OK) break;
            // Each micro-step's gradient is summed in double, so the update does not depend on the order of the
            // micro-steps (one process of accum N*K and N ranks of accum K sum the same gradients).
            for (int i = 0; i < n; i++) {
                const float *g = p[i].grad.data;
                for (int64_t j = 0, m = tensor_numel(&p[i].grad); j < m; j++) acc[i][j] += g[j];
            }
            sum[0] += l.ce, sum[1] += l.focal, sum[2] += l.dice;
            next_epoch = pos + 1 < epoch_len ? epoch : epoch + 1;
            next_pos = pos + 1 < epoch_len ? pos + 1 : 0;
        }
        // A rank that failed stops every rank here, before they would wait for it in a collective.
        if ((s = comm_agree_status(comm, s, &failed_rank)) != AGPT_OK) break;
        // The gradients summed over the ranks' micro-steps; DeepSpeed divides the loss by the accumulation
        // steps and averages over ranks: the update sees the mean gradient of all world * accum micro-steps.
        // The stop request rides along, so that every rank stops after the same update.
        double shared[4] = {sum[0], sum[1], sum[2], c->stop && *c->stop ? 1.0 : 0.0};
        for (int i = 0; i < n && s == AGPT_OK; i++)
            s = comm_allreduce_sum_f64(comm, acc[i], (size_t)tensor_numel(&p[i].grad));
        if (s == AGPT_OK) s = comm_allreduce_sum_f64(comm, shared, 4);
        const int micro = c->accum * comm->size * (c->micro_per_sample > 1 ? c->micro_per_sample : 1);
        for (int i = 0; i < n && s == AGPT_OK; i++) {  // the mean gradient, rounded to f32 once
            float *g = p[i].grad.data;
            for (int64_t j = 0, m = tensor_numel(&p[i].grad); j < m; j++) g[j] = (float)(acc[i][j] / micro);
        }
        double total = 0, ss = 0;
        for (int i = 0; i < n && s == AGPT_OK; i++) s = op_sum_squares(e, &ss, &p[i].grad), total += ss;
        // A failure after the all-reduce is agreed on too: a rank that broke out alone would leave the others
        // waiting for it in the next update's collective.
        if ((s = comm_agree_status(comm, s, &failed_rank)) != AGPT_OK) break;
        double norm = sqrt(total);
        if (!isfinite(norm)) {
            s = AGPT_FAIL(AGPT_ERR_ARG, "gradient norm is %g at update %lld: the loss diverged; lower the learning "
                          "rate or check the data", norm, (long long)updates + 1);
            break;
        }
        if (c->grad_clip > 0 && c->grad_clip / (norm + 1e-6) < 1)  // torch's clip_grad_norm_
            for (int i = 0; i < n && s == AGPT_OK; i++)
                s = op_scale(e, &p[i].grad, (float)(c->grad_clip / (norm + 1e-6)));
        updates++;
        double lr = schedule_lr_at_update(&c->schedule, updates);
        for (int i = 0; i < n && s == AGPT_OK; i++) {
            double lr_i = p[i].lr_scale > 0 ? lr * p[i].lr_scale : lr;
            s = op_adamw(e, &p[i].param, &p[i].grad, &mo.rp[i].m, &mo.rp[i].v, (float)lr_i, c->beta1, c->beta2,
                         c->eps, c->weight_decay, (int)updates);
        }
        if ((s = comm_agree_status(comm, s, &failed_rank)) != AGPT_OK) break;
        double k = 1.0 / micro;
        res->last_loss = (shared[0] + shared[1] + shared[2]) * k;
        if (lead) {
            fprintf(log, "{\"step\":%lld,\"ce\":%.9g,\"focal\":%.9g,\"dice\":%.9g,\"grad_norm\":%.9g,\"lr\":%.9g,"
                    "\"ms\":%.3f}\n", (long long)updates, shared[0] * k, shared[1] * k, shared[2] * k, norm, lr,
                    (timer_now_s() - t0) * 1e3);
            fflush(log);
            if (c->on_update) {
                TrainerUpdate u = {.update = updates, .total_updates = c->total_updates,
                                   .mean = {shared[0] * k, shared[1] * k, shared[2] * k}, .grad_norm = norm,
                                   .lr = lr, .ms = (timer_now_s() - t0) * 1e3, .epoch = next_epoch};
                c->on_update(c->on_update_ctx, &u);
            }
        }
        bool stop = shared[3] > 0;
        if ((c->ckpt_every > 0 && updates % c->ckpt_every == 0) || updates == c->total_updates || stop)
            s = save_all(c, comm, &mo, n, updates, next_epoch, next_pos);
        if (stop) {
            res->stopped = true;
            break;
        }
    }
    res->updates = updates;
    loader_free(loader);
    free(sample);
    if (log) fclose(log);
    moments_free(&mo, n);
    for (int i = 0; acc && i < n; i++) free(acc[i]);
    free(acc);
    return s;
}
