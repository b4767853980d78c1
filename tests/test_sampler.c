// model/sampler.c against HF transformers' logits warpers (tests/data/sampler.safetensors, from
// tests/reference/make_sampler_goldens.py): the filtered distribution for the reference's settings and others;
// then the draws: seeded and reproducible, never outside the kept tokens, with the kept tokens' frequencies.
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/sampler.h"
#include "runtime/safetensors.h"
#include "test.h"

// op_sample on the CPU engine against the sampler: for each row, draws with the sampler's seed, the same
// 53-bit uniforms handed to op_sample, the same token every time.
static void check_op_sample(Engine *cpu, const SamplerConfig *cfg, const float *lg, int rows, int V, int draws) {
    Sampler s;
    CHECK_OK(sampler_init(&s, cfg, V));
    Rng ur;
    rng_seed(&ur, cfg->seed);
    int diff = 0, errors = 0;
    for (int r = 0; r < rows; r++) {
        Tensor row = tensor_1d((void *)(lg + (size_t)r * V), DT_F32, DEV_CPU, V);
        for (int d = 0; d < draws; d++) {
            int32_t want = -1, got = -2;
            errors += sampler_next(&s, lg + (size_t)r * V, &want) != AGPT_OK;
            double u = cfg->greedy ? 0.5 : (double)(rng_u64(&ur) >> 11) * (1.0 / 9007199254740992.0);
            errors += op_sample(cpu, &got, &row, cfg->temperature, cfg->top_k, cfg->top_p, u, cfg->greedy) != AGPT_OK;
            diff += got != want;
        }
    }
    CHECK(errors == 0 && diff == 0, "op_sample (CPU) %s T %.1f top-k %d top-p %.2f: %d of %d tokens differ from "
          "the sampler's, %d errors", cfg->greedy ? "greedy" : "sampled", (double)cfg->temperature, cfg->top_k,
          (double)cfg->top_p, diff, rows * draws, errors);
    sampler_free(&s);
}

int main(int argc, char **argv) {
    char path[1024];
    snprintf(path, sizeof path, "%s/sampler.safetensors", argc > 1 ? argv[1] : AGPT_TEST_DATA);
    SafeTensors *st = NULL;
    if (st_open(path, &st) != AGPT_OK) {
        printf("golden missing (%s): skipped\n", agpt_last_error());
        return TEST_SKIP;
    }
    Tensor logits;
    CHECK_OK(st_get(st, "logits", &logits));
    int rows = (int)logits.shape[0], V = (int)logits.shape[1];
    float *lg = malloc((size_t)rows * V * sizeof(float)), *probs = malloc((size_t)V * sizeof(float));
    memcpy(lg, logits.data, (size_t)rows * V * sizeof(float));
    const char *cfgs = st_metadata(st, "configs");
    Engine cpu;
    CHECK_OK(engine_create(&cpu, DEV_CPU, 0, 1, 1));
    for (int c = 0; cfgs && *cfgs; c++) {
        SamplerConfig cfg = sampler_default_config();
        cfg.temperature = strtof(cfgs, (char **)&cfgs), cfgs++;
        cfg.top_k = (int)strtol(cfgs, (char **)&cfgs, 10), cfgs++;
        cfg.top_p = strtof(cfgs, (char **)&cfgs);
        if (*cfgs == ';') cfgs++;
        char name[32];
        snprintf(name, sizeof name, "probs.%d", c);
        Tensor want;
        CHECK_OK(st_get(st, name, &want));
        Sampler s;
        CHECK_OK(sampler_init(&s, &cfg, V));
        for (int r = 0; r < rows; r++) {
            CHECK_OK(sampler_distribution(&s, lg + (size_t)r * V, probs));
            const float *w = (const float *)want.data + (size_t)r * V;
            int support_diff = 0;
            for (int i = 0; i < V; i++) support_diff += (probs[i] > 0) != (w[i] > 0);
            char label[96];
            snprintf(label, sizeof label, "T %.1f top-k %d top-p %.2f row %d vs HF warpers", (double)cfg.temperature,
                     cfg.top_k, (double)cfg.top_p, r);
            CHECK(support_diff == 0, "%s: %d tokens kept or removed differently", label, support_diff);
            CHECK_CLOSE(probs, w, V, 1e-5, label);
        }
        sampler_free(&s);
        check_op_sample(&cpu, &cfg, lg, rows, V, 100);
    }

    // Draws: reproducible for a seed, only from kept tokens, with about the right frequencies.
    SamplerConfig cfg = sampler_default_config();
    cfg.top_p = 0.9f, cfg.top_k = 0;
    Sampler a, b;
    CHECK_OK(sampler_init(&a, &cfg, V));
    CHECK_OK(sampler_init(&b, &cfg, V));
    CHECK_OK(sampler_distribution(&a, lg, probs));
    int *counts = calloc((size_t)V, sizeof(int)), same = 1, outside = 0, n = 20000, errors = 0;
    for (int i = 0; i < n; i++) {
        int32_t ta = 0, tb = 0;
        errors += sampler_next(&a, lg, &ta) != AGPT_OK;
        errors += sampler_next(&b, lg, &tb) != AGPT_OK;
        same &= ta == tb;
        outside += probs[ta] <= 0;
        counts[ta]++;
    }
    double worst = 0;
    for (int i = 0; i < V; i++) {
        double sd = sqrt(n * probs[i] * (1 - probs[i])) + 1;
        double z = fabs(counts[i] - n * (double)probs[i]) / sd;
        worst = z > worst ? z : worst;
    }
    CHECK(errors == 0, "%d draws failed", errors);
    CHECK(same, "the same seed gives the same tokens");
    CHECK(outside == 0, "%d draws outside the kept tokens", outside);
    CHECK(worst < 5, "draw frequencies off by %.1f standard deviations", worst);
    sampler_free(&a);
    sampler_free(&b);
    // Greedy is the first maximum; NaN is an error; bad settings are refused.
    cfg.greedy = true;
    CHECK_OK(sampler_init(&a, &cfg, 4));
    float tie[4] = {1, 3, 3, 2};
    int32_t t = -1;
    CHECK_OK(sampler_next(&a, tie, &t));
    CHECK(t == 1, "greedy picks the first maximum (got %d)", t);
    tie[2] = NAN;
    CHECK_ERR(sampler_next(&a, tie, &t));
    sampler_free(&a);
    cfg.greedy = false, cfg.top_p = 0;
    CHECK_ERR(sampler_init(&a, &cfg, 4));

    // op_sample on the CPU engine: more settings (greedy, top-k only, top-p only, T != 1, nothing filtered),
    // the same token as the sampler; then ties, NaN and refused arguments.
    const SamplerConfig more[] = {{.greedy = true},
                                  {.temperature = 1.0f, .top_k = 50, .top_p = 1.0f, .seed = 7},
                                  {.temperature = 0.7f, .top_k = 0, .top_p = 0.9f, .seed = 8},
                                  {.temperature = 1.3f, .top_k = 5, .top_p = 0.5f, .seed = 9},
                                  {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 10},
                                  {.temperature = 2.0f, .top_k = 1, .top_p = 0.01f, .seed = 11}};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) check_op_sample(&cpu, &more[i], lg, rows, V, 100);
    float tie4[4] = {1, 3, 3, 2};
    Tensor t4 = tensor_1d(tie4, DT_F32, DEV_CPU, 4);
    CHECK_OK(op_sample(&cpu, &t, &t4, 1.0f, 0, 1.0f, 0.0, true));
    CHECK(t == 1, "op_sample greedy picks the first maximum (got %d)", t);
    CHECK_OK(op_sample(&cpu, &t, &t4, 1.0f, 1, 1.0f, 0.75, false));  // top-k 1 keeps both 3s
    CHECK(t == 2, "op_sample top-k 1 keeps the tie with the k-th value (got %d, want 2)", t);
    CHECK_ERR(op_sample(&cpu, &t, &t4, 1.0f, 0, 0.0f, 0.5, false));   // top-p 0
    CHECK_ERR(op_sample(&cpu, &t, &t4, 0.0f, 0, 1.0f, 0.5, false));   // temperature 0
    CHECK_ERR(op_sample(&cpu, &t, &t4, 1.0f, 0, 1.0f, 1.0, false));   // uniform outside [0, 1)
    CHECK_ERR(op_sample(&cpu, NULL, &t4, 1.0f, 0, 1.0f, 0.5, false));
    tie4[2] = NAN;
    CHECK_ERR(op_sample(&cpu, &t, &t4, 1.0f, 0, 1.0f, 0.5, false));
    CHECK_ERR(op_sample(&cpu, &t, &t4, 1.0f, 0, 1.0f, 0.5, true));
    engine_destroy(&cpu);
    free(lg), free(probs), free(counts);
    st_close(st);
    return test_summary();
}
