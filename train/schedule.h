// The learning-rate schedule of the reference: DeepSpeed 0.9.2's WarmupDecayLR (deepspeed/runtime/lr_schedules.py)
// and the way DeepSpeed's engine steps it (anomalygpt-reference.md 6.2).
//
// DeepSpeed's formula, for the scheduler's counter i = last_batch_iteration (>= 0):
//   W = max(2, warmup_num_steps)                                  (WarmupLR clamps W: ln(W) must not be 0)
//   gamma(i) = ln(i + 1) / ln(W)                 while i < W, log warmup (the default)
//            = i / W                             while i < W, linear warmup
//            = max(0, (total - i) / max(1, total - W))   after the warmup: linear decay to 0 at i = total
//   lr(i) = warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma(i)
// (the decay uses the clamped W too; total < W only draws a warning there and decays from W on).
//
// How the engine uses it (engine.py::_take_model_step): the scheduler is built with i = -1 and is NOT stepped
// before the first update, so update 1 runs with the optimizer's own configured lr (1e-3 in the reference's
// "Adam" block, not lr(0) = 0); after every applied update the engine calls scheduler.step(), so update k >= 2
// runs with lr(k - 2). An fp16 overflow skips both the update and the scheduler step; agpt has no loss-scale
// overflows, so it never skips. schedule_lr_at_update gives exactly that sequence.
#pragma once
#include <stdint.h>

#include "runtime/status.h"

typedef enum WarmupType {
    WARMUP_LOG = 0,     // DeepSpeed's default ("log")
    WARMUP_LINEAR = 1,  // "linear"
} WarmupType;

typedef struct WarmupDecayConfig {
    double warmup_min_lr;     // 0 in the reference
    double warmup_max_lr;     // 1e-3
    int64_t warmup_num_steps; // max(10, int(total * 0.1))
    int64_t total_num_steps;  // 2 * epochs * len(train_data) // 16
    WarmupType warmup_type;   // log
    double optimizer_lr;      // the optimizer's configured lr, used by update 1 (1e-3 in the reference)
} WarmupDecayConfig;

// The reference's values (code/dsconfig/openllama_peft_stage_1.json overwritten by train_*.py): for `n_items`
// training items and `epochs` epochs, total = 2 * epochs * n_items / 16 (integer division), warmup =
// max(10, (int)(total * warmup_rate)) with warmup_rate 0.1, lr from 0 up to 1e-3, log warmup. MVTec (3629
// images, 50 epochs): total 22681, warmup 2268.
Status schedule_reference_config(int64_t n_items, int epochs, WarmupDecayConfig *out);
// Refuses nonsense (negative lr, no steps) with a message.
Status schedule_check(const WarmupDecayConfig *cfg);

// DeepSpeed's get_lr() for scheduler counter i >= 0 (i < 0: 0, as DeepSpeed returns before it has started).
double schedule_lr(const WarmupDecayConfig *cfg, int64_t i);
// The lr that optimizer update `update` (1-based) runs with under DeepSpeed's engine: optimizer_lr for the
// first, schedule_lr(update - 2) after.
double schedule_lr_at_update(const WarmupDecayConfig *cfg, int64_t update);
