#include "train/schedule.h"

#include <math.h>

Status schedule_reference_config(int64_t n_items, int epochs, WarmupDecayConfig *out) {
    AGPT_CHECK_ARG(n_items > 0 && epochs > 0, "schedule: %lld training items and %d epochs: both must be > 0",
                   (long long)n_items, epochs);
    int64_t total = 2 * (int64_t)epochs * n_items / 16;
    int64_t warmup = (int64_t)((double)total * 0.1);  // Python's int() truncates toward zero
    if (warmup < 10) warmup = 10;
    *out = (WarmupDecayConfig){.warmup_min_lr = 0.0, .warmup_max_lr = 1e-3, .warmup_num_steps = warmup,
                               .total_num_steps = total, .warmup_type = WARMUP_LOG, .optimizer_lr = 1e-3};
    return AGPT_OK;
}

Status schedule_check(const WarmupDecayConfig *c) {
    AGPT_CHECK_ARG(c->warmup_min_lr >= 0 && c->warmup_max_lr >= c->warmup_min_lr && c->optimizer_lr >= 0 &&
                       isfinite(c->warmup_max_lr) && isfinite(c->optimizer_lr),
                   "schedule: need 0 <= warmup_min_lr (%g) <= warmup_max_lr (%g) and optimizer lr %g >= 0",
                   c->warmup_min_lr, c->warmup_max_lr, c->optimizer_lr);
    AGPT_CHECK_ARG(c->total_num_steps >= 1 && c->warmup_num_steps >= 0,
                   "schedule: total steps %lld must be >= 1 and warmup steps %lld >= 0",
                   (long long)c->total_num_steps, (long long)c->warmup_num_steps);
    AGPT_CHECK_ARG(c->warmup_type == WARMUP_LOG || c->warmup_type == WARMUP_LINEAR, "schedule: unknown warmup type %d",
                   (int)c->warmup_type);
    return AGPT_OK;
}

double schedule_lr(const WarmupDecayConfig *c, int64_t i) {
    if (i < 0) return 0.0;
    // WarmupLR's constructor: W = max(2, warmup_num_steps), so ln(W) > 0.
    const int64_t W = c->warmup_num_steps > 2 ? c->warmup_num_steps : 2;
    double gamma;
    if (i < W) {
        // The same operations as Python: (1 / ln W) * ln(i + 1), and i / W.
        gamma = c->warmup_type == WARMUP_LINEAR ? (double)i / (double)W : (1.0 / log((double)W)) * log((double)i + 1);
    } else {
        double span = (double)(c->total_num_steps - W);
        gamma = (double)(c->total_num_steps - i) / (span > 1.0 ? span : 1.0);
        if (gamma < 0.0) gamma = 0.0;
    }
    return c->warmup_min_lr + (c->warmup_max_lr - c->warmup_min_lr) * gamma;
}

double schedule_lr_at_update(const WarmupDecayConfig *c, int64_t update) {
    if (update <= 1) return c->optimizer_lr;
    return schedule_lr(c, update - 2);
}
