// Next-token choice from logits, as HF generate does it (anomalygpt-reference.md 5.6): temperature, then
// top-k (HF's default 50: keep every token whose logit is at least the k-th largest), then top-p (drop the
// smallest-probability tokens whose cumulative probability stays within 1 - p, keeping at least one), then a
// draw from the renormalised distribution with a seeded RNG. Greedy takes the first maximum (torch.argmax).
// The reference samples with top_p 0.1 (MVTec test), 0.01 (VisA test, web demo) and temperature 1.0.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "runtime/rng.h"
#include "runtime/status.h"

typedef struct SamplerConfig {
    bool greedy;         // argmax; the other fields are ignored
    float temperature;   // > 0; 1.0 leaves the logits as they are
    int top_k;           // <= 0 disables
    float top_p;         // in (0, 1]; 1.0 disables
    uint64_t seed;
} SamplerConfig;

// The reference's settings: temperature 1.0, top-k 50, top-p 0.01 (the web demo's default), seed 42.
SamplerConfig sampler_default_config(void);

typedef struct Sampler {
    SamplerConfig cfg;
    int vocab;
    Rng rng;
    float *probs;      // [vocab] scratch: the filtered distribution
    int32_t *order;    // [vocab] scratch: token ids sorted by logit
    float *scratch;    // [vocab] scratch: probabilities for the top-p cut
} Sampler;

Status sampler_init(Sampler *s, const SamplerConfig *cfg, int vocab);
void sampler_free(Sampler *s);

// The distribution after temperature, top-k and top-p: probs[V] sums to 1, zero for removed tokens.
Status sampler_distribution(Sampler *s, const float *logits, float *probs);
// One token from logits [V] (host f32). NaN logits are an error (a broken model must not answer at random).
Status sampler_next(Sampler *s, const float *logits, int32_t *token);
