// Next-token sampling on the host (HF generate's logits warpers, anomalygpt-reference.md 5.6): temperature,
// top-k keeping ties with the k-th largest score, top-p over the ascending order keeping at least one token,
// then an inverse-CDF draw with a caller-supplied uniform. The one implementation: model/sampler.c and the
// CPU backend of op_sample both call these; kernels/cuda/sample.cu mirrors the arithmetic.
#define _GNU_SOURCE  // qsort_r: the comparison reads the scores without a global, so samplers run in parallel
#include <math.h>
#include <stdlib.h>

#include "kernels/cpu/cpu_ops.h"

// Sort by (value ascending, id ascending): the order HF's ascending torch.sort gives when no two logits tie.
static int ascending(const void *a, const void *b, void *keys) {
    const float *k = keys;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (k[i] != k[j]) return k[i] < k[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

// softmax over the finite entries of x into out (removed tokens are -inf and get 0).
static void softmax(const float *x, float *out, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = fmaxf(mx, x[i]);
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (out[i] = x[i] == -INFINITY ? 0.0f : expf(x[i] - mx));
    for (int64_t i = 0; i < n; i++) out[i] = (float)(out[i] / sum);
}

Status cpu_sample_distribution(float *probs, int32_t *order, float *scratch, const float *logits, int64_t V,
                               float temperature, int top_k, float top_p) {
    for (int64_t i = 0; i < V; i++)
        if (isnan(logits[i]))
            return AGPT_FAIL(AGPT_ERR_ARG, "sampler: logit %lld is NaN; the model's output is broken", (long long)i);
    // Scores after temperature (HF skips the division at exactly 1.0), kept in probs as scratch.
    float *scores = probs;
    for (int64_t i = 0; i < V; i++) scores[i] = temperature == 1.0f ? logits[i] : logits[i] / temperature;
    for (int64_t i = 0; i < V; i++) order[i] = (int32_t)i;
    qsort_r(order, (size_t)V, sizeof *order, ascending, scores);
    // top-k: remove every score below the k-th largest (ties with it stay, as HF's `scores < kth` does).
    if (top_k > 0 && top_k < V) {
        float kth = scores[order[V - top_k]];
        for (int64_t i = 0; i < V; i++)
            if (scores[i] < kth) scores[i] = -INFINITY;
    }
    // top-p over the ascending order: remove while the cumulative probability is <= 1 - p; never the largest.
    if (top_p < 1.0f) {
        float *p = scratch;
        softmax(scores, p, V);
        double cum = 0;
        for (int64_t r = 0; r < V - 1; r++) {
            int32_t id = order[r];
            cum += p[id];
            if ((float)cum <= 1.0f - top_p) scores[id] = -INFINITY;
        }
    }
    softmax(scores, probs, V);
    return AGPT_OK;
}

int32_t cpu_sample_draw(const float *probs, int64_t V, double uniform) {
    // Inverse CDF; the last token with mass takes any rounding remainder.
    double cum = 0;
    int64_t last = 0;
    for (int64_t i = 0; i < V; i++) {
        if (probs[i] <= 0) continue;
        last = i;
        cum += probs[i];
        if (uniform < cum) return (int32_t)i;
    }
    return (int32_t)last;
}

Status cpu_sample_greedy(int32_t *token, const float *logits, int64_t V) {
    int64_t best = 0;
    for (int64_t i = 0; i < V; i++) {
        if (isnan(logits[i])) return AGPT_FAIL(AGPT_ERR_ARG, "sampler: logit %lld is NaN", (long long)i);
        if (logits[i] > logits[best]) best = i;
    }
    *token = (int32_t)best;
    return AGPT_OK;
}

Status cpu_sample(int32_t *token, const float *logits, int64_t V, float temperature, int top_k, float top_p,
                  double uniform, bool greedy) {
    if (greedy) return cpu_sample_greedy(token, logits, V);
    float *probs = malloc((size_t)V * sizeof *probs), *scratch = malloc((size_t)V * sizeof *scratch);
    int32_t *order = malloc((size_t)V * sizeof *order);
    Status s = AGPT_OK;
    if (!probs || !scratch || !order)
        s = AGPT_FAIL(AGPT_ERR_OOM, "cpu_sample: no memory for a vocabulary of %lld", (long long)V);
    if (s == AGPT_OK) s = cpu_sample_distribution(probs, order, scratch, logits, V, temperature, top_k, top_p);
    if (s == AGPT_OK) *token = cpu_sample_draw(probs, V, uniform);
    free(probs), free(scratch), free(order);
    return s;
}
