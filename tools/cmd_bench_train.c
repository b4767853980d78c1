// agpt bench train: the training step (model/anomalygpt_train.h, forward + backward of one anomaly item: the
// normal image and its synthetic anomaly, two conversations) on a model file, in micro-steps/s and images/s,
// after one warm-up. The inputs are fixed: a textured noise image, a rectangle as the anomaly mask, the bottle
// question with the normal and a "Yes" answer. bench/peers/torch_train_step.py times the same step in PyTorch
// (the official training forward re-expressed, as tests/reference/make_train_step_goldens.py) on the same model;
// bench/compare.py pairs the --json files.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/anomalygpt_train.h"
#include "runtime/rng.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "train/conversation_train.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt bench train --model M [--tokenizer F] [--iters N] [--threads N] [--fewshot] [--lora]\n"
            "                        [--json FILE]\n"
            "  Micro-steps/s of the training step (both images of an anomaly item, forward and backward) on the\n"
            "  model file, f32 on the CPU or on CUDA (--device cuda; the optimizer is not in it). --fewshot: the prompt learner sees the few-shot map (4 more images through\n"
            "  the encoder); --lora: also the LoRA gradients. --iters: timed steps after one warm-up (5).\n");
}

int cmd_bench_train(int argc, char **argv) {
    const char *cmd = "bench train", *model = NULL, *tokenizer = NULL, *json = NULL;
    long long iters = 5;
    int threads = 0;
    bool fewshot = false, lora = false;
    Device dev = DEV_CPU;
    DType dt = DT_F32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        int r = cli_engine_option(argc, argv, &i, cmd, &dev, &dt, &threads);
        if (r < 0) return 2;
        if (r > 0) continue;
        if (!strcmp(a, "--model") || !strcmp(a, "--tokenizer") || !strcmp(a, "--json") || !strcmp(a, "--iters")) {
            if (!(v = cli_value(argc, argv, &i, cmd))) return 2;
            if (!strcmp(a, "--model")) model = v;
            else if (!strcmp(a, "--tokenizer")) tokenizer = v;
            else if (!strcmp(a, "--json")) json = v;
            else if (cli_parse_int(cmd, a, v, 1, 100000, &iters)) return 2;
        } else if (!strcmp(a, "--fewshot")) fewshot = true;
        else if (!strcmp(a, "--lora")) lora = true;
        else {
            fprintf(stderr, "agpt bench train: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!model) {
        usage(stderr);
        return 2;
    }
    if (dt != DT_F32) {
        fprintf(stderr, "agpt bench train: the training step runs in f32 for now (--device cpu or cuda)\n");
        return 2;
    }
    Engine eng;
    Status s = engine_create(&eng, dev, 0, threads, 7);
    if (s) return cli_report(cmd, s);
    AnomalyTrainModel m;
    AnomalyTrainOptions opt = {.max_batch = 2, .train_lora = lora};
    if ((s = anomaly_train_open(&m, &eng, model, NULL, 0, tokenizer, &opt))) {
        engine_destroy(&eng);
        return cli_report(cmd, s);
    }
    const int S = m.vision.vision.image;
    const size_t plane = (size_t)3 * S * S;
    float *img = malloc(plane * sizeof(float) * 2), *mask = calloc((size_t)S * S * 2, sizeof(float));
    Rng rng;
    rng_seed(&rng, 11);
    if (img && mask) {
        rng_fill_normal(&rng, img, plane, 0.0f, 1.0f);
        memcpy(img + plane, img, plane * sizeof(float));
        for (int y = S / 8; y < S / 4; y++)
            for (int x = S / 3; x < S / 2; x++) {
                mask[(size_t)S * S + (size_t)y * S + x] = 1;
                for (int c = 0; c < 3; c++) img[plane + (size_t)c * S * S + (size_t)y * S + x] -= 2.0f;
            }
    } else {
        s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    }
    char question[512];
    TrainTokens tok[2] = {0};
    const double center[1][2] = {{S * 3 / 16.0, S * 5 / 12.0}};
    char answer[256];
    if (s == AGPT_OK) s = train_question_text("This is a photo of a bottle for anomaly detection, which should be "
                                              "round, without any damage, flaw, defect, scratch, hole or broken part.",
                                              question, sizeof question);
    if (s == AGPT_OK) s = train_tokenize(m.tokenizer, question, TRAIN_ANSWER_NORMAL, TRAIN_MAX_TGT_LEN, &tok[0]);
    if (s == AGPT_OK) s = train_answer_text(1, center, S, answer, sizeof answer);
    if (s == AGPT_OK) s = train_tokenize(m.tokenizer, question, answer, TRAIN_MAX_TGT_LEN, &tok[1]);
    AnomalyTrainExample ex[2];
    for (int b = 0; b < 2; b++)
        ex[b] = (AnomalyTrainExample){.image = img ? img + b * plane : NULL, .mask = mask ? mask + (size_t)b * S * S : NULL,
                                      .class_name = "bottle", .reference = fewshot ? img : NULL, .ids = tok[b].ids,
                                      .targets = tok[b].targets, .n_tokens = tok[b].n};
    AnomalyTrainLosses l;
    double per = 0;
    if (s == AGPT_OK) s = anomaly_train_step(&m, ex, 2, &l);  // warm-up
    if (s == AGPT_OK) s = engine_synchronize(&eng);
    if (s == AGPT_OK) {
        double t0 = timer_now_s();
        for (long long i = 0; i < iters && s == AGPT_OK; i++) s = anomaly_train_step(&m, ex, 2, &l);
        if (s == AGPT_OK) s = engine_synchronize(&eng);  // the GPU's queue drained before the clock stops
        per = (timer_now_s() - t0) / (double)iters;
    }
    if (s == AGPT_OK) {
        printf("agpt bench train: %s, %s, %d threads: %.1f ms per micro-step (2 images, %d + %d tokens), %.2f micro-steps/s, "
               "%.2f images/s%s%s\n", model, dev == DEV_CUDA ? "cuda" : "cpu", eng.num_threads, per * 1e3, tok[0].n + TRAIN_PREFIX_TOKENS,
               tok[1].n + TRAIN_PREFIX_TOKENS, 1.0 / per, 2.0 / per, fewshot ? ", few-shot" : "", lora ? ", LoRA" : "");
        if (json) {
            FILE *f = fopen(json, "w");
            if (!f) s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", json);
            else {
                fprintf(f, "{\"impl\": \"agpt\", \"bench\": \"train_step\", \"model\": \"%s\", \"device\": \"%s\", "
                        "\"threads\": %d, \"fewshot\": %s, \"lora\": %s, \"ms_per_step\": %.3f, \"images_per_s\": %.4f}\n",
                        model, dev == DEV_CUDA ? "cuda" : "cpu", eng.num_threads, fewshot ? "true" : "false", lora ? "true" : "false", per * 1e3, 2.0 / per);
                fclose(f);
            }
        }
    }
    train_tokens_free(&tok[0]);
    train_tokens_free(&tok[1]);
    free(img), free(mask);
    anomaly_train_close(&m);
    engine_destroy(&eng);
    return s == AGPT_OK ? 0 : cli_report(cmd, s);
}
