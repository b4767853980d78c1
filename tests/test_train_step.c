// One training step of AnomalyGPT (model/anomalygpt_train.h) against tests/data/train_step.safetensors, which
// tests/reference/make_train_step_goldens.py makes with PyTorch (the official training forward re-expressed:
// text maps, focal + Dice per layer, the few-shot branch, the PromptLearner, HF LLaMA with PEFT LoRA,
// cross-entropy) on the small model tests/make_test_model.c assembles: every loss, and the gradient of every
// trainable tensor (decoder, prompt learner, llama_proj, LoRA), for an anomaly item (the zero-shot text map
// feeding the prompt learner), the same with a reference (the few-shot map feeding it) and an instruction-style
// sample (no mask). The golden is computed in float64; each gradient may be off by 1e-5 (rel L2) or by 4 x its f32 noise,
// whichever is larger (the golden records the noise: see make_train_step_goldens.py). Then: gradients
// accumulate over steps, bad batches are refused. Last, 20 updates of train/trainer.h's loop (AdamW, clipping,
// WarmupDecayLR) on the zero-shot batch give PyTorch's losses to 1e-4.
//
//   test_train_step DATA_DIR MODEL_FILE TOKENIZER
// Exit: 0 all passed, 1 a check failed, 77 (skipped) when the golden, the model or the tokenizer is absent.
#define _DEFAULT_SOURCE  // mkdtemp
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/anomalygpt_train.h"
#include "train/trainer.h"
#include "test.h"
#include "test_util.h"

#define TOL 1e-5

static SafeTensors *golden;

static double golden_scalar(const char *name) {
    int64_t n = 0;
    float *v = test_golden_f32(golden, name, &n);
    double x = v && n == 1 ? v[0] : NAN;
    free(v);
    return x;
}

static void check_loss(const char *what, double got, double want) {
    double err = fabs(got - want) / fmax(fabs(want), 1e-6);
    CHECK(isfinite(got) && (err <= TOL || fabs(got - want) <= 1e-7), "%s: %.9g vs PyTorch %.9g (rel %.2e)", what,
          got, want, err);
}

// Every trained tensor's gradient against the golden's "<case>.grad.<name>", times factor.
static void check_grads(AnomalyTrainModel *m, const char *case_name, double factor) {
    AnomalyTrainTensor t[128];
    int n = anomaly_train_tensors(m, t, 128);
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < n && i < 128; i++) {
        char key[512], what[600];
        snprintf(key, sizeof key, "%s.grad.%.127s", case_name, t[i].name);
        snprintf(what, sizeof what, "%s: d %.127s", case_name, t[i].name);
        int64_t count = 0;
        float *want = test_golden_f32(golden, key, &count);
        if (!want) continue;
        float *got = test_to_host_f32(t[i].grad);
        CHECK(count == tensor_numel(t[i].grad), "%s: %lld elements vs golden %lld", what,
              (long long)tensor_numel(t[i].grad), (long long)count);
        if (count == tensor_numel(t[i].grad)) {
            for (int64_t k = 0; k < count; k++) want[k] = (float)(want[k] * factor);
            // Gradients whose golden is (near) zero, such as the decoder's when only the prompt learner's
            // input is the few-shot map and no mask exists, are measured at the scale of 1e-6.
            double err = rel_l2_floor(got, want, count, 1e-6);
            // The allowance: 1e-5, or 4 x this tensor's f32 noise as the golden records it (the larger of
            // PyTorch's own float32 error and the float64 gradient's change under a 1e-6 jitter of the 16 x 16
            // score grids), for ill-conditioned gradients: the few-shot case's first conv weight (noise 9e-5;
            // measured here 8.5e-5 with the prompt learner's input map within 3.5e-7 of float64).
            snprintf(key, sizeof key, "%s.f32err.%.127s", case_name, t[i].name);
            double noise = golden_scalar(key), tol = fmax(TOL, 4 * (isfinite(noise) ? noise : 0));
            if (err / tol > worst) worst = err / tol, worst_name = t[i].name;
            CHECK(err <= tol, "%s: rel L2 %.3e (allowed %.1e; PyTorch f32 %.1e)", what, err, tol, noise);
        }
        free(want), free(got);
    }
    printf("  %s: %d gradients against float64 PyTorch, worst at %.2f of its allowance (%s)\n", case_name, n, worst,
           worst_name);
}

typedef struct Inputs {
    float *normal, *anomalous, *reference, *mask, *zero_mask;
} Inputs;

// The case's conversations: ids and targets [B,T'] (right-padded by the golden), as examples.
static int case_examples(const char *name, const Inputs *in, AnomalyTrainExample *ex, int32_t **ids_out,
                         int32_t **tg_out) {
    char key[128];
    int64_t n_ids = 0, n_tg = 0;
    snprintf(key, sizeof key, "%s.ids", name);
    int32_t *ids = golden_i32(golden, key, &n_ids);
    snprintf(key, sizeof key, "%s.targets", name);
    int32_t *tg = golden_i32(golden, key, &n_tg);
    int id = st_find(golden, key);
    StInfo info;
    if (!ids || !tg || id < 0 || st_info(golden, id, &info) != AGPT_OK) return 0;
    int B = (int)info.shape[0], T = (int)info.shape[1];
    bool sft = !strcmp(name, "sft");
    for (int b = 0; b < B; b++) {
        // The golden pads with id 2 and -100: the examples give their own length (the step pads again).
        int len = T;
        while (len > 0 && ids[(size_t)b * T + len - 1] == TRAIN_PAD_ID && tg[(size_t)b * T + len - 1] == -100) len--;
        ex[b] = (AnomalyTrainExample){
            .image = sft || b == 1 ? in->anomalous : in->normal,
            .mask = sft ? NULL : b == 1 ? in->mask : in->zero_mask,
            .class_name = sft ? "object" : "bottle",
            .reference = !strcmp(name, "fewshot") ? in->reference : NULL,
            .ids = ids + (size_t)b * T,
            .targets = tg + (size_t)b * T,
            .n_tokens = len,
        };
    }
    *ids_out = ids, *tg_out = tg;
    return B;
}

static void run_case(AnomalyTrainModel *m, const char *name, const Inputs *in) {
    AnomalyTrainExample ex[2];
    int32_t *ids = NULL, *tg = NULL;
    int B = case_examples(name, in, ex, &ids, &tg);
    CHECK(B >= 1, "%s: no conversations in the golden", name);
    if (B < 1) return;
    CHECK_OK(anomaly_train_zero_grad(m));
    AnomalyTrainLosses L;
    CHECK_OK(anomaly_train_step(m, ex, B, &L));
    char key[128], what[128];
    const char *parts[3] = {"ce", "focal", "dice"};
    double got[3] = {L.ce, L.focal, L.dice};
    for (int k = 0; k < 3; k++) {
        snprintf(key, sizeof key, "%s.loss.%s", name, parts[k]);
        snprintf(what, sizeof what, "%s: %s", name, parts[k]);
        check_loss(what, got[k], golden_scalar(key));
    }
    printf("  %s: ce %.6f focal %.6f dice %.6f over %d answer tokens\n", name, L.ce, L.focal, L.dice, L.targets);
    check_grads(m, name, 1.0);
    if (!strcmp(name, "zeroshot")) {
        // Gradients accumulate: a second step on the same batch doubles them.
        CHECK_OK(anomaly_train_step(m, ex, B, &L));
        check_grads(m, "zeroshot", 2.0);
        // Refused batches: mixed masks, too many examples, a token outside the vocabulary.
        AnomalyTrainExample bad[2] = {ex[0], ex[1]};
        bad[1].mask = NULL;
        CHECK_ERR(anomaly_train_step(m, bad, 2, &L));
        CHECK_ERR(anomaly_train_step(m, ex, 3, &L));
        int32_t wrong[4] = {1, 2, 40000, 3}, tw[4] = {-100, -100, -100, 5};
        bad[1] = ex[1];
        bad[1].ids = wrong, bad[1].targets = tw, bad[1].n_tokens = 4;
        CHECK_ERR(anomaly_train_step(m, bad, 2, &L));
    }
    free(ids), free(tg);
}

// ---- 20 updates of the whole loop on the zero-shot batch, against PyTorch's losses -------------------------

typedef struct LoopCtx {
    AnomalyTrainModel *m;
    AnomalyTrainExample ex[2];
    int B;
} LoopCtx;

static Status loop_sample(void *ctx, int64_t index, Rng *rng, void *out) {
    (void)ctx, (void)rng;
    *(int64_t *)out = index;
    return AGPT_OK;
}

static Status loop_step(void *ctx, const void *sample, TrainLosses *out) {
    (void)sample;
    LoopCtx *c = ctx;
    AnomalyTrainLosses l;
    AGPT_TRY(anomaly_train_step(c->m, c->ex, c->B, &l));
    out->ce = l.ce, out->focal = l.focal, out->dice = l.dice;
    return AGPT_OK;
}

static void run_loop(AnomalyTrainModel *m, const Inputs *in) {
    LoopCtx c = {.m = m};
    int32_t *ids = NULL, *tg = NULL;
    c.B = case_examples("zeroshot", in, c.ex, &ids, &tg);
    if (c.B < 1) return;
    AnomalyTrainTensor t[128];
    TrainParam params[128];
    int n = anomaly_train_tensors(m, t, 128), np = 0;
    for (int i = 0; i < n && i < 128; i++)  // the reference's trained parts
        if (!strncmp(t[i].name, "image_decoder.", 14) || !strncmp(t[i].name, "prompt_learner.", 15))
            params[np++] = (TrainParam){.name = t[i].name, .param = *t[i].param, .grad = *t[i].grad};
    char dir[] = "/tmp/agpt-train-loop-XXXXXX";
    CHECK(mkdtemp(dir) != NULL, "mkdtemp");
    TrainerConfig tc = trainer_default_config();
    tc.accum = 1;
    tc.total_updates = 20;
    tc.schedule = (WarmupDecayConfig){.warmup_min_lr = 0, .warmup_max_lr = 1e-3, .warmup_num_steps = 5,
                                      .total_num_steps = 20, .warmup_type = WARMUP_LOG, .optimizer_lr = 1e-3};
    tc.dir = dir;
    tc.config_text = "test_train_step loop\n";
    tc.loader = (LoaderConfig){.n_items = 1, .sample_bytes = sizeof(int64_t), .threads = 1, .seed = 1, .world = 1,
                               .make_sample = loop_sample};
    TrainerResult res;
    CHECK_OK(trainer_run(m->engine, &tc, params, np, loop_step, &c, &res));
    // The losses before every update, from log.jsonl, against PyTorch's (float64) to 1e-4.
    char path[256];
    snprintf(path, sizeof path, "%s/log.jsonl", dir);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "%s", path);
    int64_t k = 0;
    float *want[3] = {test_golden_f32(golden, "loop.ce", &k), test_golden_f32(golden, "loop.focal", &k),
                      test_golden_f32(golden, "loop.dice", &k)};
    char line[1024];
    int u = 0;
    double worst = 0;
    while (f && want[0] && want[1] && want[2] && fgets(line, sizeof line, f) && u < k) {
        double got[3];
        CHECK(sscanf(line, "{\"step\":%*d,\"ce\":%lf,\"focal\":%lf,\"dice\":%lf", &got[0], &got[1], &got[2]) == 3,
              "log line %d: %s", u + 1, line);
        for (int j = 0; j < 3; j++) {
            double err = fabs(got[j] - want[j][u]) / fmax(fabs(want[j][u]), 1e-3);
            if (err > worst) worst = err;
            CHECK(err <= 1e-4, "loop update %d part %d: %.9g vs PyTorch %.9g (rel %.2e)", u + 1, j, got[j],
                  (double)want[j][u], err);
        }
        u++;
    }
    CHECK(u == 20 && k == 20, "loop: %d log lines, %lld golden updates", u, (long long)k);
    if (want[0] && u == 20)
        printf("  loop: 20 updates, loss %.4f -> %.4f, worst rel difference to PyTorch %.2e\n",
               want[0][0] + want[1][0] + want[2][0], want[0][19] + want[1][19] + want[2][19], worst);
    if (f) fclose(f);
    for (int j = 0; j < 3; j++) free(want[j]);
    const char *files[3] = {"log.jsonl", "delta.safetensors", "state.safetensors"};
    for (int j = 0; j < 3; j++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[j]);
        unlink(path);
    }
    rmdir(dir);
    free(ids), free(tg);
}

// The `picks` largest entries of one gradient against central differences (h = 1e-2) of the step's loss: the
// cross-entropy alone, or with the pixel losses (CE + focal + Dice). g is a copy taken before any difference
// step (every step adds its gradients again); checked entries are zeroed in it. Returns the worst relative error.
static double check_largest_by_differences(AnomalyTrainModel *m, const AnomalyTrainExample *ex, int B, float *w,
                                           float *g, int64_t n, int picks, bool with_pixel_loss, double bound,
                                           const char *name) {
    double worst = 0;
    for (int pick = 0; pick < picks && !test_failed; pick++) {
        int64_t best = 0;  // the largest |g| not yet checked
        for (int64_t j = 1; j < n; j++)
            if (fabsf(g[j]) > fabsf(g[best])) best = j;
        double want = g[best], h = 1e-2, loss[2];
        float keep = w[best];
        for (int side = 0; side < 2; side++) {
            AnomalyTrainLosses L;
            w[best] = keep + (float)(side ? -h : h);
            CHECK_OK(anomaly_train_step(m, ex, B, &L));
            loss[side] = L.ce + (with_pixel_loss ? L.focal + L.dice : 0);
        }
        w[best] = keep;
        double fd = (loss[0] - loss[1]) / (2 * h), rel = fabs(fd - want) / fabs(want);
        CHECK(isfinite(fd) && want != 0 && rel < bound, "%s[%lld]: gradient %.6g, central difference %.6g (rel %.2g)",
              name, (long long)best, want, fd, rel);
        if (rel > worst) worst = rel;
        g[best] = 0;
    }
    return worst;
}

// lm_head and model.norm trained (--train lm_head, not in the reference, so no PyTorch golden): their gradients
// against central differences of the cross-entropy, at the entries with the largest gradients (measured 1.5e-4
// in f32; a wrong or missing gradient is off by far more).
static void check_head_by_differences(Engine *e, const char *model, const char *tokenizer, const Inputs *in) {
    AnomalyTrainModel m;
    AnomalyTrainOptions opt = {.max_batch = 2, .train_head = true};
    CHECK_OK(anomaly_train_open(&m, e, model, NULL, 0, tokenizer, &opt));
    if (test_failed) return;
    AnomalyTrainExample ex[2];
    int32_t *ids = NULL, *tg = NULL;
    int B = case_examples("zeroshot", in, ex, &ids, &tg);
    AnomalyTrainLosses L;
    CHECK_OK(anomaly_train_zero_grad(&m));
    CHECK_OK(anomaly_train_step(&m, ex, B, &L));
    Tensor *params[2] = {&m.llm.lm_head, &m.llm.norm}, *grads[2] = {&m.llm.d_lm_head, &m.llm.d_norm};
    const char *names[2] = {"lm_head.weight", "model.norm.weight"};
    // Copies of both gradients before any difference step (every step adds its gradients again).
    float *copies[2];
    for (int k = 0; k < 2; k++) {
        copies[k] = malloc((size_t)tensor_numel(grads[k]) * sizeof(float));
        memcpy(copies[k], grads[k]->data, (size_t)tensor_numel(grads[k]) * sizeof(float));
    }
    double worst = 0;
    for (int k = 0; k < 2 && !test_failed; k++) {
        double rel = check_largest_by_differences(&m, ex, B, params[k]->data, copies[k], tensor_numel(grads[k]), 4,
                                                  false, 3e-3, names[k]);
        if (rel > worst) worst = rel;
    }
    free(copies[0]), free(copies[1]);
    printf("  lm_head, model.norm: 8 largest gradients against central differences, worst rel %.2g\n", worst);
    free(ids), free(tg);
    anomaly_train_close(&m);
}

// --reference-shifts 2 (not in the reference, so no PyTorch golden): the few-shot case with the reference's
// half-patch shifts too. Its map feeds only the prompt learner, so the cross-entropy moves and the pixel losses
// (on the decoder's text maps) stay bit for bit.
static void check_shifted_references(Engine *e, const char *model, const char *tokenizer, const Inputs *in) {
    AnomalyTrainLosses L[2];
    for (int shifted = 0; shifted < 2; shifted++) {
        AnomalyTrainModel m;
        AnomalyTrainOptions opt = {.max_batch = 2, .reference_shifts = shifted ? 2 : 1};
        CHECK_OK(anomaly_train_open(&m, e, model, NULL, 0, tokenizer, &opt));
        if (test_failed) return;
        AnomalyTrainExample ex[2];
        int32_t *ids = NULL, *tg = NULL;
        int B = case_examples("fewshot", in, ex, &ids, &tg);
        CHECK_OK(anomaly_train_zero_grad(&m));
        CHECK_OK(anomaly_train_step(&m, ex, B, &L[shifted]));
        free(ids), free(tg);
        anomaly_train_close(&m);
    }
    printf("  few-shot with shifted references: ce %.6f (without %.6f), focal %.6f dice %.6f\n", L[1].ce, L[0].ce,
           L[1].focal, L[1].dice);
    // The reference's views are cached (the ViT is frozen): a second step on the same batch hits the cache and
    // gives the first step's losses bit for bit (no update between them).
    AnomalyTrainModel m;
    AnomalyTrainOptions opt = {.max_batch = 2, .reference_shifts = 2, .no_reference_rotations = true};
    CHECK_OK(anomaly_train_open(&m, e, model, NULL, 0, tokenizer, &opt));
    if (test_failed) return;
    AnomalyTrainExample ex[2];
    int32_t *ids = NULL, *tg = NULL;
    int B = case_examples("fewshot", in, ex, &ids, &tg);
    AnomalyTrainLosses first, again;
    CHECK_OK(anomaly_train_zero_grad(&m));
    CHECK_OK(anomaly_train_step(&m, ex, B, &first));
    int cached = m.n_ref_cache, views = cached ? m.ref_cache[0].refs.k : 0;
    CHECK_OK(anomaly_train_zero_grad(&m));
    CHECK_OK(anomaly_train_step(&m, ex, B, &again));
    printf("  cached reference views: %d entry of %d views; ce %.9f then %.9f; without rotations ce %.6f\n", cached,
           views, first.ce, again.ce, first.ce);
    CHECK(cached == 1 && m.n_ref_cache == 1 && views == 4, "the cache holds %d entries (%d views) after one "
          "reference, %d after its second use: expected 1 of 4 views", cached, views, m.n_ref_cache);
    CHECK(first.ce == again.ce && first.focal == again.focal && first.dice == again.dice,
          "the cached views give other losses: ce %.9g vs %.9g", again.ce, first.ce);
    CHECK(fabs(first.ce - L[1].ce) > 1e-7 * fabs(L[1].ce), "without rotations the cross-entropy is that of 16 "
          "views (%.9g): the option is not used", first.ce);
    free(ids), free(tg);
    anomaly_train_close(&m);
    CHECK(isfinite(L[1].ce) && fabs(L[1].ce - L[0].ce) > 1e-6 * fabs(L[0].ce),
          "the cross-entropy does not see the shifted views (%.9g vs %.9g)", L[1].ce, L[0].ce);
    CHECK(L[1].focal == L[0].focal && L[1].dice == L[0].dice, "the pixel losses moved: focal %.9g vs %.9g, dice "
          "%.9g vs %.9g", L[1].focal, L[0].focal, L[1].dice, L[0].dice);
}

// --train vision (not in the reference, so no PyTorch golden). (1) The training forward of the encoder is
// vision_forward's: the same taps and embedding, bit for bit. (2) The blocks' gradients against central
// differences of the whole step loss (CE + focal + Dice, so the taps' gradients from the text maps and the
// embedding's from the LLM both count), at the largest entries of the lowest and the highest block's tensors;
// measured error 2.4e-4, and 1.2e-2 with the embedding's gradient left out, so the bound is 3e-3.
static void check_vision_by_differences(Engine *e, const char *model, const char *tokenizer, const Inputs *in) {
    AnomalyTrainModel m;
    AnomalyTrainOptions opt = {.max_batch = 2, .train_vision = true};
    CHECK_OK(anomaly_train_open(&m, e, model, NULL, 0, tokenizer, &opt));
    if (test_failed) return;
    const VisionEncoder *v = &m.vision.vision;
    const int S = v->image, T = v->tokens, C = v->block.dim, B2 = 2;

    // (1) the same features as inference
    Tensor images, emb[2], taps[2][VISION_TAPS];
    Arena arena;
    VisionTrainActs acts;
    CHECK_OK(arena_init(&arena, e->device, vision_arena_bytes(v, B2) + (size_t)(B2 * (VISION_TAPS * T * C + v->embed) * 2 +
                                                                          B2 * 3 * S * S) * sizeof(float) + 64 * 1024));
    CHECK_OK(vision_train_acts_create(&acts, e, v, B2));
    if (test_failed) return;
    CHECK_OK(arena_tensor(&arena, DT_F32, 4, (const int64_t[]){B2, 3, S, S}, &images));
    memcpy(images.data, in->normal, (size_t)3 * S * S * sizeof(float));
    memcpy((float *)images.data + (size_t)3 * S * S, in->anomalous, (size_t)3 * S * S * sizeof(float));
    for (int k = 0; k < 2; k++) {
        CHECK_OK(arena_tensor(&arena, DT_F32, 2, (const int64_t[]){B2, v->embed}, &emb[k]));
        for (int i = 0; i < VISION_TAPS; i++)
            CHECK_OK(arena_tensor(&arena, DT_F32, 3, (const int64_t[]){B2, T, C}, &taps[k][i]));
    }
    Arena scratch;
    CHECK_OK(arena_init(&scratch, e->device, vision_train_scratch_bytes(v, B2) + vision_arena_bytes(v, B2)));
    CHECK_OK(vision_forward(e, v, &scratch, &images, &emb[0], taps[0]));
    CHECK_OK(vision_train_forward(e, v, &scratch, &acts, &images, &emb[1], taps[1]));
    int differ = memcmp(emb[0].data, emb[1].data, (size_t)B2 * v->embed * sizeof(float)) != 0;
    for (int i = 0; i < VISION_TAPS; i++)
        differ += memcmp(taps[0][i].data, taps[1][i].data, (size_t)B2 * T * C * sizeof(float)) != 0;
    CHECK(differ == 0, "vision_train_forward: %d of %d outputs differ from vision_forward's", differ, VISION_TAPS + 1);
    // The head path alone: loss = <r, embedding> for a fixed r, no tap gradients; the last block's largest
    // in_proj gradients against central differences (the embedding depends on its CLS row only through the head).
    {
        Tensor r;
        CHECK_OK(arena_tensor(&arena, DT_F32, 2, (const int64_t[]){B2, v->embed}, &r));
        for (int j = 0; j < B2 * v->embed; j++) ((float *)r.data)[j] = (float)sin(0.7 * j + 0.3);
        VitBlockWeights *g = calloc((size_t)v->layers, sizeof *g);
        Arena garena;
        size_t gbytes = 0;
        for (int i = 0; i < VIT_BLOCK_TENSORS; i++)
            gbytes += (size_t)tensor_numel(vit_block_tensor(&v->blocks[0], i, NULL)) * sizeof(float) + 64;
        CHECK_OK(arena_init(&garena, e->device, gbytes * (size_t)v->layers));
        for (int l = 0; l < v->layers; l++)
            for (int i = 0; i < VIT_BLOCK_TENSORS; i++) {
                const Tensor *p = vit_block_tensor(&v->blocks[l], i, NULL);
                Tensor *gt = vit_block_tensor(&g[l], i, NULL);
                CHECK_OK(arena_tensor(&garena, DT_F32, p->ndim, p->shape, gt));
                CHECK_OK(tensor_zero(gt));
            }
        CHECK_OK(vision_train_backward(e, v, g, &acts, &scratch, NULL, &r));
        const int last = v->layers - 1;
        float *gw = g[last].in_proj_w.data, *wd = v->blocks[last].in_proj_w.data;
        int64_t n = tensor_numel(&g[last].in_proj_w);
        double worst = 0;
        for (int pick = 0; pick < 3 && !test_failed; pick++) {
            int64_t best = 0;
            for (int64_t j = 1; j < n; j++)
                if (fabsf(gw[j]) > fabsf(gw[best])) best = j;
            double want = gw[best], h = 1e-2, loss[2];
            float keep = wd[best];
            for (int side = 0; side < 2; side++) {
                wd[best] = keep + (float)(side ? -h : h);
                CHECK_OK(vision_forward(e, v, &scratch, &images, &emb[0], taps[0]));
                loss[side] = 0;
                for (int j = 0; j < B2 * v->embed; j++) loss[side] += (double)((float *)r.data)[j] * ((float *)emb[0].data)[j];
            }
            wd[best] = keep;
            double fd = (loss[0] - loss[1]) / (2 * h), rel = fabs(fd - want) / fabs(want);
            CHECK(isfinite(fd) && want != 0 && rel < 3e-3, "head path: blocks.%d.attn.in_proj_weight[%lld]: gradient "
                  "%.6g, central difference %.6g (rel %.2g)", last, (long long)best, want, fd, rel);
            if (rel > worst) worst = rel;
            gw[best] = 0;
        }
        printf("  vision head path: 3 largest gradients of <r, embedding> against central differences, worst rel "
               "%.2g\n", worst);
        arena_free(&garena);
        free(g);
    }
    vision_train_acts_free(&acts);
    arena_free(&scratch);
    arena_free(&arena);

    // (2) gradients against differences
    AnomalyTrainExample ex[2];
    int32_t *ids = NULL, *tg = NULL;
    int B = case_examples("zeroshot", in, ex, &ids, &tg);
    AnomalyTrainLosses L;
    CHECK_OK(anomaly_train_zero_grad(&m));
    CHECK_OK(anomaly_train_step(&m, ex, B, &L));
    const int last = v->layers - 1;
    struct { int block, tensor; } picks[4] = {{0, 8}, {0, 2}, {last, 2}, {last, 6}};  // fc1.weight, in_proj, norm_2.weight
    // Copies of the four gradients before any difference step (every step adds its gradients again).
    float *copies[4];
    for (int k = 0; k < 4; k++) {
        Tensor *g = vit_block_tensor(&m.d_vision[picks[k].block], picks[k].tensor, NULL);
        copies[k] = malloc((size_t)tensor_numel(g) * sizeof(float));
        memcpy(copies[k], g->data, (size_t)tensor_numel(g) * sizeof(float));
    }
    double worst = 0;
    int checked = 0;
    for (int k = 0; k < 4 && !test_failed; k++) {
        const char *suffix;
        Tensor *w = vit_block_tensor(&m.vision.vision.blocks[picks[k].block], picks[k].tensor, &suffix);
        char name[96];
        snprintf(name, sizeof name, "blocks.%d.%s", picks[k].block, suffix);
        double rel = check_largest_by_differences(&m, ex, B, w->data, copies[k], tensor_numel(w), 3, true, 3e-3, name);
        if (rel > worst) worst = rel;
        checked += 3;
    }
    for (int k = 0; k < 4; k++) free(copies[k]);
    printf("  vision blocks: training forward = inference forward; %d largest gradients against central differences, "
           "worst rel %.2g\n", checked, worst);
    free(ids), free(tg);
    anomaly_train_close(&m);
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    const char *model = argc > 2 ? argv[2] : "";
    const char *tokenizer = argc > 3 ? argv[3] : "";
    char path[2048];
    snprintf(path, sizeof path, "%s/train_step.safetensors", data);
    const char *need[3] = {path, model, tokenizer};
    for (int i = 0; i < 3; i++)
        if (access(need[i], R_OK) != 0) {
            printf("skipped: %s is missing (the golden: bash tests/reference/make_goldens.sh; the model: "
                   "make_test_model; the tokenizer: ../shared/data)\n", need[i]);
            return TEST_SKIP;
        }
    CHECK_OK(st_open(path, &golden));
    Engine e;
    CHECK_OK(engine_create(&e, DEV_CPU, 0, 2, 1234));
    if (test_failed) return test_summary();
    AnomalyTrainModel m;
    AnomalyTrainOptions opt = {.max_batch = 2, .train_proj = true, .train_lora = true};
    CHECK_OK(anomaly_train_open(&m, &e, model, NULL, 0, tokenizer, &opt));
    if (test_failed) return test_summary();

    Inputs in = {0};
    int64_t n = 0;
    in.normal = test_golden_f32(golden, "input.normal", &n);
    in.anomalous = test_golden_f32(golden, "input.anomalous", &n);
    in.reference = test_golden_f32(golden, "input.reference", &n);
    in.mask = test_golden_f32(golden, "mask.anomalous", &n);
    in.zero_mask = calloc((size_t)n, sizeof(float));
    if (!in.normal || !in.anomalous || !in.reference || !in.mask || !in.zero_mask) return test_summary();

    printf("golden: one training step, 3 cases\n");
    run_case(&m, "zeroshot", &in);
    run_case(&m, "fewshot", &in);
    run_case(&m, "sft", &in);
    check_head_by_differences(&e, model, tokenizer, &in);
    check_vision_by_differences(&e, model, tokenizer, &in);
    check_shifted_references(&e, model, tokenizer, &in);
    printf("golden: 20 updates of the loop\n");
    run_loop(&m, &in);  // last: it changes the weights

    free(in.normal), free(in.anomalous), free(in.reference), free(in.mask), free(in.zero_mask);
    anomaly_train_close(&m);
    engine_destroy(&e);
    st_close(golden);
    return test_summary();
}
