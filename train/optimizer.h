// The optimizer of `agpt train`: AdamW over a list of f32 parameters, global gradient-norm clipping, and the
// learning-rate schedule (linear warmup, then cosine decay to a floor), as the reference trains with
// DeepSpeed's AdamW and WarmupDecayLR-style schedule. Works on either backend through kernels/ops.h.
#pragma once
#include "kernels/ops.h"

typedef enum LrSchedule {
    // The reference's (DeepSpeed WarmupDecayLR with its default log warmup): for the 0-based update index i,
    // lr * ln(i + 1) / ln(warmup) while i < warmup, then lr * max(0, (total - i) / (total - warmup)).
    LR_WARMUP_LOG_LINEAR_DECAY = 0,
    // Linear warmup from 0, then cosine decay to lr * min_lr_ratio at total_steps.
    LR_WARMUP_COSINE = 1,
} LrSchedule;

typedef struct AdamWConfig {
    LrSchedule schedule;
    float lr;              // peak learning rate
    float beta1, beta2;
    float eps;
    float weight_decay;
    int warmup_steps;      // ramp from 0 to lr over these steps
    int total_steps;       // the decay reaches its end at this step (0: no decay)
    float min_lr_ratio;    // cosine schedule only: the floor
    float grad_clip;       // clip the global L2 norm of all gradients to this; <= 0 disables
} AdamWConfig;

// The reference's recipe: lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.001, clip 1.0, log warmup then
// linear decay (set warmup_steps and total_steps from the data: the reference uses warmup = 10% of total).
AdamWConfig adamw_default_config(void);

typedef struct Optimizer {
    AdamWConfig cfg;
    int n_params;
    Tensor *params;  // [n_params] views of the trainable f32 weights
    Tensor *grads;   // [n_params] their gradients, same shapes
    Tensor *m, *v;   // [n_params] first and second moments, owned by the optimizer
    int step;        // steps taken so far
} Optimizer;

// Allocates zeroed moments on the engine's device; params and grads are borrowed views.
Status optimizer_init(Optimizer *opt, Engine *e, const AdamWConfig *cfg, int n_params, const Tensor *params,
                      const Tensor *grads);
void optimizer_free(Optimizer *opt);

// Learning rate at a 1-based step.
float optimizer_lr(const AdamWConfig *cfg, int step);

// One step: global grad norm (returned in *grad_norm before clipping), clip, AdamW on every parameter.
Status optimizer_step(Optimizer *opt, Engine *e, double *grad_norm);
