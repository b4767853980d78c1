#include "train/optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/memory.h"

AdamWConfig adamw_default_config(void) {
    return (AdamWConfig){.schedule = LR_WARMUP_LOG_LINEAR_DECAY, .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.001f,
                         .warmup_steps = 0, .total_steps = 0, .min_lr_ratio = 0.0f, .grad_clip = 1.0f};
}

float optimizer_lr(const AdamWConfig *cfg, int step) {
    if (cfg->schedule == LR_WARMUP_LOG_LINEAR_DECAY) {
        // DeepSpeed's WarmupDecayLR counts updates from 0 (inferred: the scheduler steps after each update).
        double i = step - 1, W = cfg->warmup_steps, T = cfg->total_steps;
        if (W > 1 && i < W) return (float)(cfg->lr * log(i + 1) / log(W));
        if (T <= W) return cfg->lr;
        double frac = (T - i) / (T - W);
        return (float)(cfg->lr * (frac > 0 ? frac : 0));
    }
    if (cfg->warmup_steps > 0 && step <= cfg->warmup_steps) return cfg->lr * (float)step / (float)cfg->warmup_steps;
    if (cfg->total_steps <= cfg->warmup_steps) return cfg->lr;  // no decay configured
    double progress = (double)(step - cfg->warmup_steps) / (double)(cfg->total_steps - cfg->warmup_steps);
    if (progress > 1) progress = 1;
    double floor_lr = (double)cfg->lr * cfg->min_lr_ratio;
    return (float)(floor_lr + ((double)cfg->lr - floor_lr) * 0.5 * (1.0 + cos(M_PI * progress)));
}

static Status alloc_like(Engine *e, const Tensor *like, Tensor *out) {
    *out = *like;
    out->device = e->device;
    out->dtype = DT_F32;
    size_t bytes = tensor_nbytes(out);
    AGPT_TRY(e->device == DEV_CUDA ? mem_device_alloc(bytes, &out->data) : mem_host_alloc(bytes, &out->data));
    return tensor_zero(out);
}

Status optimizer_init(Optimizer *opt, Engine *e, const AdamWConfig *cfg, int n_params, const Tensor *params,
                      const Tensor *grads) {
    memset(opt, 0, sizeof *opt);
    AGPT_CHECK_ARG(n_params > 0, "optimizer_init: nothing to train (0 parameters)");
    AGPT_CHECK_ARG(cfg->lr > 0 && cfg->beta1 >= 0 && cfg->beta1 < 1 && cfg->beta2 >= 0 && cfg->beta2 < 1 &&
                       cfg->eps > 0, "optimizer_init: lr must be > 0, betas in [0,1), eps > 0");
    opt->cfg = *cfg;
    opt->n_params = n_params;
    opt->params = calloc((size_t)n_params, sizeof(Tensor));
    opt->grads = calloc((size_t)n_params, sizeof(Tensor));
    opt->m = calloc((size_t)n_params, sizeof(Tensor));
    opt->v = calloc((size_t)n_params, sizeof(Tensor));
    if (!opt->params || !opt->grads || !opt->m || !opt->v) {
        optimizer_free(opt);
        return AGPT_FAIL(AGPT_ERR_OOM, "optimizer_init: no memory for %d parameter records", n_params);
    }
    for (int i = 0; i < n_params; i++) {
        opt->params[i] = params[i];
        opt->grads[i] = grads[i];
        Status s = alloc_like(e, &params[i], &opt->m[i]);
        if (s == AGPT_OK) s = alloc_like(e, &params[i], &opt->v[i]);
        if (s != AGPT_OK) {
            optimizer_free(opt);
            return agpt_add_context(s, "optimizer state for parameter %d", i);
        }
    }
    return AGPT_OK;
}

void optimizer_free(Optimizer *opt) {
    for (int i = 0; opt->m && i < opt->n_params; i++) {
        Tensor *state[2] = {&opt->m[i], &opt->v[i]};
        for (int j = 0; j < 2; j++) {
            if (!state[j]->data) continue;
            if (state[j]->device == DEV_CUDA) mem_device_free(state[j]->data);
            else mem_host_free(state[j]->data);
        }
    }
    free(opt->params), free(opt->grads), free(opt->m), free(opt->v);
    memset(opt, 0, sizeof *opt);
}

Status optimizer_step(Optimizer *opt, Engine *e, double *grad_norm) {
    double total = 0;
    for (int i = 0; i < opt->n_params; i++) {
        double ss = 0;
        AGPT_TRY(op_sum_squares(e, &ss, &opt->grads[i]));
        total += ss;
    }
    double norm = sqrt(total);
    if (grad_norm) *grad_norm = norm;
    if (!isfinite(norm))
        return AGPT_FAIL(AGPT_ERR_ARG, "gradient norm is %g at step %d: the loss diverged; lower the learning rate "
                         "or check the data", norm, opt->step + 1);
    // torch.nn.utils.clip_grad_norm_: scale by clip / (norm + 1e-6) only when that is below 1.
    if (opt->cfg.grad_clip > 0) {
        double coef = opt->cfg.grad_clip / (norm + 1e-6);
        if (coef < 1)
            for (int i = 0; i < opt->n_params; i++) AGPT_TRY(op_scale(e, &opt->grads[i], (float)coef));
    }
    opt->step++;
    float lr = optimizer_lr(&opt->cfg, opt->step);
    for (int i = 0; i < opt->n_params; i++)
        AGPT_TRY(op_adamw(e, &opt->params[i], &opt->grads[i], &opt->m[i], &opt->v[i], lr, opt->cfg.beta1,
                          opt->cfg.beta2, opt->cfg.eps, opt->cfg.weight_decay, opt->step));
    return AGPT_OK;
}
