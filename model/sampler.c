#define _GNU_SOURCE  // qsort_r: the comparison reads the scores without a global, so samplers run in parallel
#include "model/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

SamplerConfig sampler_default_config(void) {
    return (SamplerConfig){.greedy = false, .temperature = 1.0f, .top_k = 50, .top_p = 0.01f, .seed = 42};
}

Status sampler_init(Sampler *s, const SamplerConfig *cfg, int vocab) {
    memset(s, 0, sizeof *s);
    AGPT_CHECK_ARG(vocab >= 1, "sampler: vocabulary of %d tokens", vocab);
    AGPT_CHECK_ARG(cfg->greedy || (cfg->temperature > 0 && cfg->top_p > 0 && cfg->top_p <= 1),
                   "sampler: temperature must be > 0 and top-p in (0, 1] (got %g, %g)", (double)cfg->temperature,
                   (double)cfg->top_p);
    s->cfg = *cfg;
    s->vocab = vocab;
    rng_seed(&s->rng, cfg->seed);
    s->probs = malloc((size_t)vocab * sizeof *s->probs);
    s->order = malloc((size_t)vocab * sizeof *s->order);
    s->scratch = malloc((size_t)vocab * sizeof *s->scratch);
    if (!s->probs || !s->order || !s->scratch) {
        sampler_free(s);
        return AGPT_FAIL(AGPT_ERR_OOM, "sampler: no memory for a vocabulary of %d", vocab);
    }
    return AGPT_OK;
}

void sampler_free(Sampler *s) {
    free(s->probs);
    free(s->order);
    free(s->scratch);
    memset(s, 0, sizeof *s);
}

// Sort by (value ascending, id ascending): the order HF's ascending torch.sort gives when no two logits tie.
static int ascending(const void *a, const void *b, void *keys) {
    const float *k = keys;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (k[i] != k[j]) return k[i] < k[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

// softmax over the finite entries of x, in place on out (removed tokens are -inf and get 0).
static void softmax(const float *x, float *out, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, x[i]);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += (out[i] = x[i] == -INFINITY ? 0.0f : expf(x[i] - mx));
    for (int i = 0; i < n; i++) out[i] = (float)(out[i] / sum);
}

Status sampler_distribution(Sampler *s, const float *logits, float *probs) {
    int V = s->vocab;
    for (int i = 0; i < V; i++)
        if (isnan(logits[i])) return AGPT_FAIL(AGPT_ERR_ARG, "sampler: logit %d is NaN; the model's output is broken", i);
    // Scores after temperature (HF skips the division at exactly 1.0), kept in probs as scratch.
    float *scores = probs;
    for (int i = 0; i < V; i++) scores[i] = s->cfg.temperature == 1.0f ? logits[i] : logits[i] / s->cfg.temperature;
    for (int i = 0; i < V; i++) s->order[i] = i;
    qsort_r(s->order, (size_t)V, sizeof *s->order, ascending, scores);
    // top-k: remove every score below the k-th largest (ties with it stay, as HF's `scores < kth` does).
    if (s->cfg.top_k > 0 && s->cfg.top_k < V) {
        float kth = scores[s->order[V - s->cfg.top_k]];
        for (int i = 0; i < V; i++)
            if (scores[i] < kth) scores[i] = -INFINITY;
    }
    // top-p over the ascending order: remove while the cumulative probability is <= 1 - p; never the largest.
    if (s->cfg.top_p < 1.0f) {
        float *p = s->scratch;
        softmax(scores, p, V);
        double cum = 0;
        for (int r = 0; r < V - 1; r++) {
            int32_t id = s->order[r];
            cum += p[id];
            if ((float)cum <= 1.0f - s->cfg.top_p) scores[id] = -INFINITY;
        }
    }
    softmax(scores, probs, V);
    return AGPT_OK;
}

Status sampler_next(Sampler *s, const float *logits, int32_t *token) {
    if (s->cfg.greedy) {
        int best = 0;
        for (int i = 0; i < s->vocab; i++) {
            if (isnan(logits[i])) return AGPT_FAIL(AGPT_ERR_ARG, "sampler: logit %d is NaN", i);
            if (logits[i] > logits[best]) best = i;
        }
        *token = best;
        return AGPT_OK;
    }
    AGPT_TRY(sampler_distribution(s, logits, s->probs));
    // Inverse CDF with a 53-bit uniform; the last token with mass takes any rounding remainder.
    double u = (double)(rng_u64(&s->rng) >> 11) * (1.0 / 9007199254740992.0), cum = 0;
    int last = 0;
    for (int i = 0; i < s->vocab; i++) {
        if (s->probs[i] <= 0) continue;
        last = i;
        cum += s->probs[i];
        if (u < cum) {
            *token = i;
            return AGPT_OK;
        }
    }
    *token = last;
    return AGPT_OK;
}
