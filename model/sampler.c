#include "model/sampler.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"

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

Status sampler_distribution(Sampler *s, const float *logits, float *probs) {
    return cpu_sample_distribution(probs, s->order, s->scratch, logits, s->vocab, s->cfg.temperature,
                                   s->cfg.top_k, s->cfg.top_p);
}

Status sampler_next(Sampler *s, const float *logits, int32_t *token) {
    if (s->cfg.greedy) return cpu_sample_greedy(token, logits, s->vocab);
    AGPT_TRY(sampler_distribution(s, logits, s->probs));
    // A 53-bit uniform, drawn only once the distribution stands (a NaN error leaves the RNG where it was).
    double u = (double)(rng_u64(&s->rng) >> 11) * (1.0 / 9007199254740992.0);
    *token = cpu_sample_draw(s->probs, s->vocab, u);
    return AGPT_OK;
}
