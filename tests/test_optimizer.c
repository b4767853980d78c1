// train/optimizer.c against torch.optim.AdamW + clip_grad_norm_ + LambdaLR (tests/data/optimizer.safetensors,
// made by tests/reference/make_optimizer_goldens.py), and the schedule's shape.
#include <stdlib.h>
#include <string.h>

#include "runtime/safetensors.h"
#include "test.h"
#include "train/optimizer.h"

static float meta_f(const SafeTensors *st, const char *key) {
    const char *v = st_metadata(st, key);
    return v ? strtof(v, NULL) : NAN;
}

static Status get_copy(const SafeTensors *st, const char *name, float *dst, int64_t n) {
    Tensor t;
    AGPT_TRY(st_get(st, name, &t));
    AGPT_CHECK_ARG(t.dtype == DT_F32 && tensor_numel(&t) == n, "%s: unexpected dtype or size", name);
    memcpy(dst, t.data, (size_t)n * sizeof(float));
    return AGPT_OK;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    char path[1024];
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    SafeTensors *st = NULL;
    if (st_open(path, &st) != AGPT_OK) {
        printf("golden missing (%s): skipped\n", agpt_last_error());
        return TEST_SKIP;
    }
    Engine eng;
    CHECK_OK(engine_create(&eng, DEV_CPU, 0, 0, 1));
    AdamWConfig cfg = adamw_default_config();
    cfg.schedule = LR_WARMUP_COSINE;  // the golden's LambdaLR
    cfg.lr = meta_f(st, "lr"), cfg.beta1 = meta_f(st, "beta1"), cfg.beta2 = meta_f(st, "beta2");
    cfg.eps = meta_f(st, "eps"), cfg.weight_decay = meta_f(st, "wd"), cfg.grad_clip = meta_f(st, "clip");
    cfg.warmup_steps = atoi(st_metadata(st, "warmup")), cfg.total_steps = atoi(st_metadata(st, "total"));
    cfg.min_lr_ratio = meta_f(st, "min_ratio");
    int steps = atoi(st_metadata(st, "steps"));

    float p0[20], p1[7], g0[20], g1[7], want0[20], want1[7];
    CHECK_OK(get_copy(st, "init.p0", p0, 20));
    CHECK_OK(get_copy(st, "init.p1", p1, 7));
    Tensor params[2] = {tensor_2d(p0, DT_F32, DEV_CPU, 4, 5), tensor_1d(p1, DT_F32, DEV_CPU, 7)};
    Tensor grads[2] = {tensor_2d(g0, DT_F32, DEV_CPU, 4, 5), tensor_1d(g1, DT_F32, DEV_CPU, 7)};
    Optimizer opt;
    CHECK_OK(optimizer_init(&opt, &eng, &cfg, 2, params, grads));
    for (int s = 0; s < steps; s++) {
        char name[64];
        snprintf(name, sizeof name, "step%d.grad.p0", s);
        CHECK_OK(get_copy(st, name, g0, 20));
        snprintf(name, sizeof name, "step%d.grad.p1", s);
        CHECK_OK(get_copy(st, name, g1, 7));
        float want_norm;
        snprintf(name, sizeof name, "step%d.grad_norm", s);
        CHECK_OK(get_copy(st, name, &want_norm, 1));
        double norm = 0;
        CHECK_OK(optimizer_step(&opt, &eng, &norm));
        CHECK(fabs(norm - want_norm) <= 1e-6 * want_norm, "step %d grad norm %g vs torch %g", s, norm,
              (double)want_norm);
        snprintf(name, sizeof name, "step%d.p0", s);
        CHECK_OK(get_copy(st, name, want0, 20));
        snprintf(name, sizeof name, "step%d.p1", s);
        CHECK_OK(get_copy(st, name, want1, 7));
        char label[64];
        snprintf(label, sizeof label, "step %d (lr %.3g) p0 vs torch AdamW", s, (double)optimizer_lr(&cfg, s + 1));
        CHECK_CLOSE(p0, want0, 20, 1e-6, label);
        snprintf(label, sizeof label, "step %d p1 vs torch AdamW", s);
        CHECK_CLOSE(p1, want1, 7, 1e-6, label);
    }
    optimizer_free(&opt);

    // The schedule: 0 -> peak over warmup, cosine down to the floor, flat after.
    CHECK(fabsf(optimizer_lr(&cfg, cfg.warmup_steps) - cfg.lr) < 1e-9f, "peak at the end of warmup");
    CHECK(fabsf(optimizer_lr(&cfg, cfg.total_steps + 5) - cfg.lr * cfg.min_lr_ratio) < 1e-9f, "floor after decay");
    // The reference's schedule (DeepSpeed WarmupDecayLR, log warmup) on MVTec's numbers: warmup 2268 of 22681.
    AdamWConfig ref = adamw_default_config();
    ref.warmup_steps = 2268, ref.total_steps = 22681;
    double lr0 = 1e-3;
    CHECK(optimizer_lr(&ref, 1) == 0.0f, "log warmup starts at 0 (ln 1)");
    CHECK(fabs(optimizer_lr(&ref, 100) - lr0 * log(100.0) / log(2268.0)) < 1e-9, "log warmup at update 100");
    CHECK(fabs(optimizer_lr(&ref, 2269) - lr0) < 1e-9, "peak right after warmup");
    CHECK(fabs(optimizer_lr(&ref, 12475) - lr0 * (22681.0 - 12474) / (22681 - 2268)) < 1e-9, "linear decay");
    CHECK(optimizer_lr(&ref, 30000) == 0.0f, "0 after total");
    // A diverged gradient is an error, not a silent NaN update.
    g0[3] = NAN;
    CHECK_OK(optimizer_init(&opt, &eng, &cfg, 2, params, grads));
    CHECK_ERR(optimizer_step(&opt, &eng, NULL));
    optimizer_free(&opt);
    CHECK_ERR(optimizer_init(&opt, &eng, &cfg, 0, params, grads));
    st_close(st);
    engine_destroy(&eng);
    return test_summary();
}
