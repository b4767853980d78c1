#include "model/anomalygpt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/model_file.h"
#include "runtime/log.h"
#include "runtime/rng.h"
#include "runtime/timer.h"

// The SentencePiece model: the file given, else the one embedded in the model file.
static Status load_tokenizer(AnomalyGPT *a, const char *model, const char *tokenizer_path) {
    if (tokenizer_path) return sp_load_file(tokenizer_path, &a->tokenizer);
    const void *bytes;
    size_t n;
    AGPT_TRY(model_file_blob(&a->vision.weights, MODEL_TENSOR_SP_TOKENIZER, &bytes, &n));
    if (!bytes)
        return AGPT_FAIL(AGPT_ERR_ARG, "%s embeds no LLaMA tokenizer: pass --tokenizer tokenizer.model (from the "
                         "Vicuna directory), or convert the model again with it", model);
    Status s = sp_load_memory(bytes, n, &a->tokenizer);
    return s == AGPT_OK ? s : agpt_add_context(s, "%s: the embedded tokenizer (%s)", model, MODEL_TENSOR_SP_TOKENIZER);
}

// The KV cache (max_batch sequences), the record of the rows it holds and the arena (max_batch LLM inputs plus
// one image's temporaries), once every part is loaded.
static Status open_buffers(AnomalyGPT *a, Engine *e, int max_seq, int max_batch) {
    a->max_batch = max_batch;
    AGPT_TRY(kv_cache_create(&a->cache, e, &a->llm, max_batch, max_seq));
    a->cached_rows = malloc((size_t)max_seq * a->llm.block.dim * dtype_size(a->vision.weights.dtype));
    if (!a->cached_rows) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the cache's row record");
    int S = a->vision.vision.image, C = a->llm.block.dim;
    size_t bytes = prompt_learner_arena_bytes(&a->prompts, 1, S, S) + (size_t)S * S * sizeof(float) +
                   (size_t)max_seq * C * sizeof(float) * (max_batch + 1) +
                   (size_t)(PROMPT_TOKENS + 1) * C * sizeof(float) +
                   16 * AGPT_ALIGN;
    return arena_init(&a->arena, e->device, bytes);
}

Status anomalygpt_open(AnomalyGPT *a, Engine *e, const char *model, const char *const *overlays, int n_overlays,
                       const char *tokenizer_path, DType dtype, int max_seq) {
    return anomalygpt_open_batch(a, e, model, overlays, n_overlays, tokenizer_path, dtype, max_seq, 1);
}

Status anomalygpt_open_batch(AnomalyGPT *a, Engine *e, const char *model, const char *const *overlays,
                             int n_overlays, const char *tokenizer_path, DType dtype, int max_seq, int max_batch) {
    memset(a, 0, sizeof *a);
    AGPT_CHECK_ARG(max_batch >= 1, "anomalygpt_open_batch: max_batch %d must be >= 1", max_batch);
    a->max_seq = max_seq;
    // A batch of 8 (at least) lets up to 8 normal references go through the encoder together.
    AGPT_TRY(vision_model_open(&a->vision, e, model, overlays, n_overlays, dtype, max_batch > 8 ? max_batch : 8));
    WeightStore *w = &a->vision.weights;
    // On the CPU a bf16/f16 dtype keeps the weight matrices in it (computing in f32): vision_model_open has set
    // the store's matrix dtype, so the LLM's load the same way (7B then needs 13.5 GB instead of 27).
    Status s = llama_load(&a->llm, w);
    if (s == AGPT_OK) s = prompt_learner_load(&a->prompts, w);
    if (s == AGPT_OK) s = llama_proj_load(&a->proj, w);
    if (s == AGPT_OK && (a->prompts.dim != a->llm.block.dim || a->proj.out_dim != a->llm.block.dim ||
                         a->proj.in_dim != a->vision.vision.embed))
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the parts do not fit: LLM width %d, prompt learner %d, llama_proj "
                      "%d->%d, vision embedding %d", model, a->llm.block.dim, a->prompts.dim, a->proj.in_dim,
                      a->proj.out_dim, a->vision.vision.embed);
    if (s == AGPT_OK) s = load_tokenizer(a, model, tokenizer_path);
    if (s == AGPT_OK) s = open_buffers(a, e, max_seq, max_batch);
    if (s != AGPT_OK) {
        anomalygpt_close(a);
        return s;
    }
    return AGPT_OK;
}

// ---------------------------------------------------------------------------------------------------------
// Random weights at any size (benchmarks): the same structures as anomalygpt_open makes, without a file.

void anomaly_random_config_full(AnomalyRandomConfig *c) {
    *c = (AnomalyRandomConfig){.vision_width = 1280, .vision_heads = 16, .vision_layers = 32, .vision_mlp = 5120,
                               .patch = 14, .image = 224, .embed = 1024, .llm_width = 4096, .llm_heads = 32,
                               .llm_hidden = 11008, .llm_layers = 32, .vocab = 32001,
                               .prompt_channels = {4, 16, 64, 256, 1024}, .seed = 7};
}

// Random [2,E] features, rows L2-normalised as the prompt ensemble's, owned by the class entry (freed by
// vision_model_close).
static Status random_class_features(VisionModel *m, const char *name, Rng *rng) {
    Engine *e = m->engine;
    int E = m->decoder.out_dim;
    DType dt = m->weights.dtype;
    ClassFeatures *cf = &m->classes[m->n_classes];
    snprintf(cf->name, sizeof cf->name, "%s", name);
    float *host = malloc((size_t)2 * E * sizeof(float));
    uint16_t *half = malloc((size_t)2 * E * 2);
    Status s = host && half ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "no memory for class features");
    if (s == AGPT_OK) {
        rng_fill_normal(rng, host, (size_t)2 * E, 0.0f, 1.0f);
        for (int r = 0; r < 2; r++) {
            double ss = 0;
            for (int j = 0; j < E; j++) ss += (double)host[r * E + j] * host[r * E + j];
            for (int j = 0; j < E; j++) host[r * E + j] /= (float)sqrt(ss);
        }
        cf->features = tensor_2d(NULL, dt, e->device, 2, E);
        size_t bytes = tensor_nbytes(&cf->features);
        s = e->device == DEV_CUDA ? mem_device_alloc(bytes, &cf->features.data)
                                  : mem_host_alloc(bytes, &cf->features.data);
    }
    if (s == AGPT_OK) {
        void *staged = host;
        if (dt != DT_F32) {
            convert_host(half, dt, host, DT_F32, (size_t)2 * E);
            staged = half;
        }
        Tensor src = tensor_2d(staged, dt, DEV_CPU, 2, E);
        m->n_classes++;  // owned from here on, so that vision_model_close frees it
        s = tensor_copy(&cf->features, &src);
    }
    free(host);
    free(half);
    return s;
}

// The vision half of anomalygpt_open from random weights: the encoder, the decoder, the arena for one image
// (as vision_model_open sizes it, without a text encoder) and random features for 'object'.
static Status vision_model_init_random(VisionModel *m, Engine *e, const AnomalyRandomConfig *c, DType dtype) {
    memset(m, 0, sizeof *m);
    m->engine = e;
    m->max_batch = 1;
    m->mode = PREPROCESS_SHORTER_SIDE_CROP;
    weights_init(&m->weights, e, dtype, NULL, "random AnomalyGPT");
    AGPT_TRY(vision_init_random(&m->vision, &m->weights, c->vision_width, c->vision_heads, c->vision_layers,
                                c->vision_mlp, c->patch, c->image, c->embed, c->seed));
    AGPT_TRY(decoder_init_random(&m->decoder, &m->weights, c->vision_width, c->embed, c->seed + 1));
    const VisionEncoder *v = &m->vision;
    int B = m->max_batch, S = v->image, T = v->tokens, C = v->block.dim;
    size_t f = sizeof(float), io = (size_t)B * 3 * S * S * f + (size_t)B * v->embed * f +
                                   (size_t)VISION_TAPS * B * T * C * f + 16 * AGPT_ALIGN;
    size_t temps = vision_arena_bytes(v, B);
    size_t maps = anomaly_map_arena_bytes(&m->decoder, T, S, 0) + (size_t)2 * B * S * S * f;
    if (maps > temps) temps = maps;
    DType dt = m->weights.dtype;
    AGPT_TRY(arena_init(&m->arena, e->device, io + temps + 8 * AGPT_ALIGN));
    AGPT_TRY(arena_tensor(&m->arena, dt, 4, (int64_t[]){B, 3, S, S}, &m->images));
    AGPT_TRY(arena_tensor(&m->arena, dt, 2, (int64_t[]){B, v->embed}, &m->embedding));
    for (int i = 0; i < VISION_TAPS; i++) AGPT_TRY(arena_tensor(&m->arena, dt, 3, (int64_t[]){B, T, C}, &m->taps[i]));
    Rng rng;
    rng_seed(&rng, c->seed + 2);
    return random_class_features(m, "object", &rng);
}

Status anomalygpt_init_random(AnomalyGPT *a, Engine *e, const AnomalyRandomConfig *cfg, const char *tokenizer_path,
                              DType dtype, int max_seq) {
    memset(a, 0, sizeof *a);
    a->max_seq = max_seq;
    AGPT_CHECK_ARG(tokenizer_path, "anomalygpt_init_random: a LLaMA tokenizer.model is needed for the prompt");
    Status s = vision_model_init_random(&a->vision, e, cfg, dtype);
    WeightStore *w = &a->vision.weights;
    if (s == AGPT_OK) s = llama_init_random(&a->llm, w, cfg->llm_width, cfg->llm_heads, cfg->llm_hidden,
                                            cfg->llm_layers, cfg->vocab, cfg->seed + 3);
    if (s == AGPT_OK) s = prompt_learner_init_random(&a->prompts, w, cfg->llm_width, cfg->prompt_channels, cfg->seed + 4);
    if (s == AGPT_OK) s = llama_proj_init_random(&a->proj, w, cfg->embed, cfg->llm_width, cfg->seed + 5);
    if (s == AGPT_OK) s = sp_load_file(tokenizer_path, &a->tokenizer);
    if (s == AGPT_OK) s = open_buffers(a, e, max_seq, 1);
    if (s != AGPT_OK) anomalygpt_close(a);
    return s;
}

void anomalygpt_close(AnomalyGPT *a) {
    free(a->cached_rows);
    if (a->arena.base) arena_free(&a->arena);
    if (a->cache.arena.base) kv_cache_free(&a->cache);
    sp_free(a->tokenizer);
    llama_free(&a->llm);
    vision_model_close(&a->vision);
    memset(a, 0, sizeof *a);
}

// Appends the embeddings of `text`'s tokens (or of one id when text is NULL) at row *row of embeds.
static Status append_text(AnomalyGPT *a, const char *text, int32_t single_id, Tensor *embeds, int *row) {
    Engine *e = a->vision.engine;
    int cap = a->max_seq, n = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d token ids", cap);
    Status s = AGPT_OK;
    if (text) {
        s = sp_encode(a->tokenizer, text, ids, cap, &n);
        if (s == AGPT_ERR_ARG && n > cap)
            s = AGPT_FAIL(AGPT_ERR_ARG, "the prompt needs %d tokens but the model was opened for a context of %d: "
                          "shorten the conversation (or reset it) or open the model with a longer context", n, cap);
    } else {
        ids[0] = single_id;
        n = 1;
    }
    if (s == AGPT_OK && *row + n > embeds->shape[1])
        s = AGPT_FAIL(AGPT_ERR_ARG, "the prompt needs more than %lld tokens; the model was opened for %d: shorten "
                      "the conversation or open it with a longer context", (long long)embeds->shape[1], a->max_seq);
    if (s == AGPT_OK && n > 0) {
        Tensor dst = tensor_rows_view(embeds, *row, n);
        s = llama_embed_tokens(e, &a->llm, ids, n, &dst);
        *row += n;
    }
    free(ids);
    return s;
}

// The class whose text features make the map for a prompt text ("" for the few-shot map).
static const char *map_class_of(const AnomalyGPT *a, const char *prompt_text) {
    return a->vision.refs.k > 0 ? "" : a->map_class ? a->map_class : conversation_class_name(prompt_text);
}

// One image's LLM input once its map is made: the prompt learner over host_map [S,S] (f32), the image token of
// cls [1,E] (its vision embedding) and the pieces of the prompt, written to rows [cap,C] on the device from row
// 0; *T gets the number of rows. Temporaries come from the arena above its current mark and are released.
static Status assemble_input(AnomalyGPT *a, const float *host_map, const Tensor *cls, const char *prompt_text,
                             Tensor *rows, int *T) {
    Engine *e = a->vision.engine;
    int S = a->vision.vision.image, C = a->llm.block.dim, cap = (int)rows->shape[0];
    DType dt = a->vision.weights.dtype;
    size_t start = arena_mark(&a->arena);
    Tensor dev_map, prompts, image_token;
    Status s = arena_tensor(&a->arena, dt, 4, (int64_t[]){1, 1, S, S}, &dev_map);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, dt, 3, (int64_t[]){1, PROMPT_TOKENS, C}, &prompts);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, dt, 3, (int64_t[]){1, 1, C}, &image_token);
    if (s == AGPT_OK) {  // the map back onto the device, in the compute dtype, for the prompt learner
        const void *staged = host_map;
        uint16_t *half = NULL;
        if (dt != DT_F32) {
            half = malloc((size_t)S * S * 2);
            if (!half) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for the map");
            else convert_host(half, dt, host_map, DT_F32, (size_t)S * S);
            staged = half;
        }
        Tensor src = tensor_4d((void *)staged, dt, DEV_CPU, 1, 1, S, S);
        if (s == AGPT_OK) s = tensor_copy(&dev_map, &src);
        free(half);
    }
    size_t mark = arena_mark(&a->arena);
    if (s == AGPT_OK) s = prompt_learner_forward(e, &a->prompts, &a->arena, &dev_map, &prompts);
    if (s == AGPT_OK) s = image_token_forward(e, &a->proj, cls, &image_token);
    arena_reset_to(&a->arena, mark);

    // [<s>] "### Human: <Img>" [image] "</Img> " [18 prompts] prompt_text + "\n### Assistant:"
    int row = 0;
    char *tail = s == AGPT_OK ? malloc(strlen(prompt_text) + sizeof CONV_ASSISTANT) : NULL;
    if (s == AGPT_OK && !tail) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for the prompt");
    if (tail) {
        strcpy(tail, prompt_text);
        strcat(tail, CONV_ASSISTANT);
    }
    Tensor rows3 = tensor_3d(rows->data, dt, e->device, 1, cap, C);
    if (s == AGPT_OK) s = append_text(a, NULL, sp_bos_id(a->tokenizer), &rows3, &row);
    if (s == AGPT_OK) s = append_text(a, CONV_PROMPT_START, 0, &rows3, &row);
    if (s == AGPT_OK && row + 1 + PROMPT_TOKENS > cap) s = AGPT_FAIL(AGPT_ERR_ARG, "context too short");
    if (s == AGPT_OK) {
        Tensor dst = tensor_rows_view(rows, row, 1), src = tensor_2d(image_token.data, dt, e->device, 1, C);
        s = op_copy(e, &dst, &src);
        row += 1;
    }
    if (s == AGPT_OK) s = append_text(a, CONV_IMAGE_END, 0, &rows3, &row);
    if (s == AGPT_OK) {
        Tensor dst = tensor_rows_view(rows, row, PROMPT_TOKENS);
        Tensor src = tensor_2d(prompts.data, dt, e->device, PROMPT_TOKENS, C);
        s = op_copy(e, &dst, &src);
        row += PROMPT_TOKENS;
    }
    if (s == AGPT_OK) s = append_text(a, tail, 0, &rows3, &row);
    free(tail);
    arena_reset_to(&a->arena, start);  // later device work is ordered after these copies
    *T = row;
    return s;
}

// The cls embedding of image j of the vision model's last batch: [1,E].
static Tensor vision_embedding_row(const VisionModel *v, int j) {
    int E = v->vision.embed;
    return tensor_2d((char *)v->embedding.data + (size_t)j * E * dtype_size(v->embedding.dtype),
                     v->embedding.dtype, v->engine->device, 1, E);
}

Status anomalygpt_input(AnomalyGPT *a, const Image *image, const char *prompt_text, Tensor *embeds, float *map,
                        float *score, const char **class_name) {
    Engine *e = a->vision.engine;
    VisionModel *v = &a->vision;
    int S = v->vision.image, C = a->llm.block.dim;
    DType dt = v->weights.dtype;
    *class_name = map_class_of(a, prompt_text);
    float *host_map = map ? map : malloc((size_t)S * S * sizeof(float));
    if (!host_map) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the map");
    Status s = vision_model_map(v, image, 1, *class_name, host_map, score);
    arena_reset_to(&a->arena, 0);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, dt, 3, (int64_t[]){1, a->max_seq, C}, embeds);
    int T = 0;
    if (s == AGPT_OK) {
        Tensor rows = tensor_2d(embeds->data, dt, e->device, a->max_seq, C);
        Tensor cls = vision_embedding_row(v, 0);  // the query's embedding
        s = assemble_input(a, host_map, &cls, prompt_text, &rows, &T);
    }
    if (!map) free(host_map);
    if (s == AGPT_OK) *embeds = tensor_3d(embeds->data, dt, e->device, 1, T, C);
    return s;
}

// Host f32 logits of the one sequence after a prefill or decode step.
static Status read_logits(AnomalyGPT *a, const Tensor *logits, float *host) {
    Tensor raw = *logits;
    raw.device = DEV_CPU;
    raw.data = logits->dtype == DT_F32 ? (void *)host : a->cache.host_raw;
    AGPT_TRY(tensor_copy(&raw, logits));
    if (logits->dtype != DT_F32) convert_host(host, DT_F32, raw.data, logits->dtype, (size_t)tensor_numel(logits));
    return AGPT_OK;
}

// decode(outputs[:-2], skip_special_tokens=True): drop the last two tokens, skip control ids and rows the
// tokenizer does not have (Vicuna v0's 32001st row).
static Status answer_text(AnomalyGPT *a, AnomalyAnswer *out) {
    int eos = sp_eos_id(a->tokenizer);
    int answer_len = out->n_tokens >= 2 ? out->n_tokens - 2 : 0, n = 0;
    int32_t *ids = malloc((size_t)(answer_len > 0 ? answer_len : 1) * sizeof *ids);
    if (!ids) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the answer");
    int bos = sp_bos_id(a->tokenizer), unk = sp_unk_id(a->tokenizer);
    for (int i = 0; i < answer_len; i++) {
        int32_t t = out->tokens[i];
        if (t == bos || t == eos || t == unk || t < 0 || t >= sp_vocab_size(a->tokenizer)) continue;
        ids[n++] = t;
    }
    Status s = sp_decode(a->tokenizer, ids, n, &out->text);
    free(ids);
    return s;
}

// The first index of the largest value, as torch.argmax (greedy).
static int32_t argmax_first(const float *x, int n) {
    int32_t best = 0;
    for (int j = 1; j < n; j++)
        if (x[j] > x[best]) best = j;
    return best;
}

Status anomalygpt_ask(AnomalyGPT *a, const Image *image, const ConversationTurn *history, int n_history,
                      const char *input, Sampler *sampler, int max_new, AnomalyAnswer *out) {
    Engine *e = a->vision.engine;
    float *map = out->map;
    memset(out, 0, sizeof *out);
    out->map = map;
    AGPT_CHECK_ARG(max_new >= 1 && max_new <= (int)(sizeof out->tokens / sizeof out->tokens[0]),
                   "max_new must be in [1, 1024] (got %d)", max_new);
    char *prompt_text = conversation_prompt_text(history, n_history, input);
    if (!prompt_text) return AGPT_ERR_OOM;
    Tensor embeds;
    double t0 = timer_now_s();
    Status s = anomalygpt_input(a, image, prompt_text, &embeds, out->map, &out->score, &out->class_name);
    free(prompt_text);
    AGPT_TRY(s);
    if ((s = engine_synchronize(e))) return s;
    double t1 = timer_now_s();
    out->vision_ms = 1e3 * (t1 - t0);
    int T = (int)embeds.shape[1], V = a->llm.vocab;
    out->prefix_tokens = T;
    AGPT_CHECK_ARG(T + max_new - 1 <= a->max_seq, "the prompt (%d tokens) and %d new tokens do not fit the "
                   "context of %d", T, max_new, a->max_seq);
    float *logits = malloc((size_t)V * sizeof(float));
    if (!logits) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for logits");
    Tensor dev_logits = tensor_2d(a->cache.logits.data, a->cache.logits.dtype, e->device, 1, V);
    // The input rows on the host, to find how many the cache already holds and to remember them.
    size_t row_bytes = (size_t)a->llm.block.dim * dtype_size(embeds.dtype);
    char *rows = malloc((size_t)T * row_bytes);
    if (!rows) {
        free(logits);
        return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the input rows");
    }
    Tensor host_rows = embeds;
    host_rows.device = DEV_CPU;
    host_rows.data = rows;
    s = tensor_copy(&host_rows, &embeds);
    int keep = 0;
    if (s == AGPT_OK && a->reuse_cache) {
        while (keep < a->cached_len && keep < T &&
               memcmp((char *)a->cached_rows + (size_t)keep * row_bytes, rows + (size_t)keep * row_bytes,
                      row_bytes) == 0)
            keep++;
        if (keep == T) keep = T - 1;  // at least one row runs, for the logits
    }
    if (s == AGPT_OK && keep > 0) {
        Tensor rest = tensor_3d((char *)embeds.data + (size_t)keep * row_bytes, embeds.dtype, e->device, 1, T - keep,
                                a->llm.block.dim);
        s = llama_extend(e, &a->llm, &a->cache, keep, &rest, &dev_logits);
    } else if (s == AGPT_OK) {
        s = llama_prefill(e, &a->llm, &a->cache, &embeds, &dev_logits);
    }
    out->reused_tokens = keep;
    a->cached_len = 0;
    if (s == AGPT_OK) {
        memcpy(a->cached_rows, rows, (size_t)T * row_bytes);
        a->cached_len = T;
    }
    free(rows);
    int eos = sp_eos_id(a->tokenizer);
    bool hashes = false;
    for (int i = 0; s == AGPT_OK && i < max_new; i++) {
        s = read_logits(a, &dev_logits, logits);  // waits for the device: the times below are real
        if (i == 0) out->prefill_ms = 1e3 * (timer_now_s() - t1);
        int32_t tok = 0;
        if (s == AGPT_OK) {
            if (sampler) {
                s = sampler_next(sampler, logits, &tok);
            } else {  // greedy: the first maximum, as torch.argmax
                for (int j = 1; j < V; j++)
                    if (logits[j] > logits[tok]) tok = j;
            }
        }
        if (s != AGPT_OK) break;
        out->tokens[out->n_tokens++] = tok;
        hashes |= tok == CONV_STOP_TOKEN;
        if ((!a->ignore_stop && (hashes || tok == eos)) || i + 1 == max_new) break;
        s = llama_decode_step(e, &a->llm, &a->cache, &tok, &dev_logits);
        if (s == AGPT_OK) {  // the fed token's row, for the next turn's comparison
            Tensor src = tensor_rows_view(&a->llm.embed, tok, 1);
            Tensor dst = tensor_2d((char *)a->cached_rows + (size_t)a->cached_len * row_bytes, src.dtype, DEV_CPU, 1,
                                   a->llm.block.dim);
            s = tensor_copy(&dst, &src);
            a->cached_len++;
        }
    }
    free(logits);
    if (s != AGPT_OK) {
        a->cached_len = 0;  // a failed step empties the cache: the next turn must not count on its rows
        return s;
    }
    out->decode_ms = 1e3 * (timer_now_s() - t1) - out->prefill_ms;
    return answer_text(a, out);
}

// One slice of anomalygpt_ask_batch: n <= a->max_batch, out[] cleared (maps kept) by the caller.
static Status ask_batch_slice(AnomalyGPT *a, const Image *images, int n, const char *const *inputs, int max_new,
                              AnomalyAnswer *out) {
    Engine *e = a->vision.engine;
    VisionModel *v = &a->vision;
    int S = v->vision.image, C = a->llm.block.dim, V = a->llm.vocab, vb = v->max_batch;
    DType dt = v->weights.dtype;
    a->cached_len = 0;  // the cache is about to hold other rows: nothing is left to reuse
    double t0 = timer_now_s();
    char **texts = calloc((size_t)n, sizeof *texts);
    const char **classes = calloc((size_t)n, sizeof *classes);
    int *lengths = calloc((size_t)n, sizeof *lengths);
    int32_t *feed = calloc((size_t)n, sizeof *feed);
    bool *running = calloc((size_t)n, sizeof *running), *hashes = calloc((size_t)n, sizeof *hashes);
    float *maps = malloc((size_t)vb * S * S * sizeof(float)), *scores = malloc((size_t)vb * sizeof(float));
    float *logits = malloc((size_t)n * V * sizeof(float));
    Status s = texts && classes && lengths && feed && running && hashes && maps && scores && logits
                   ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "no memory for a batch of %d", n);
    for (int i = 0; s == AGPT_OK && i < n; i++) {
        if (!(texts[i] = conversation_prompt_text(NULL, 0, inputs[i]))) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
        else classes[i] = map_class_of(a, texts[i]);
    }
    // The inputs, packed: sequence i's rows follow sequence i-1's (each given room for max_seq while assembled).
    arena_reset_to(&a->arena, 0);
    Tensor packed;
    if (s == AGPT_OK) s = arena_tensor(&a->arena, dt, 2, (int64_t[]){(int64_t)n * a->max_seq, C}, &packed);
    int off = 0;
    for (int i0 = 0; s == AGPT_OK && i0 < n;) {
        int m = 1;  // consecutive images of one map class, up to the vision model's batch
        while (i0 + m < n && m < vb && strcmp(classes[i0 + m], classes[i0]) == 0) m++;
        s = vision_model_map(v, images + i0, m, classes[i0], maps, scores);
        for (int j = 0; s == AGPT_OK && j < m; j++) {
            int i = i0 + j;
            const float *map = maps + (size_t)j * S * S;
            out[i].score = scores[j];
            out[i].class_name = classes[i];
            if (out[i].map) memcpy(out[i].map, map, (size_t)S * S * sizeof(float));
            Tensor cls = vision_embedding_row(v, j), rows = tensor_rows_view(&packed, off, a->max_seq);
            s = assemble_input(a, map, &cls, texts[i], &rows, &lengths[i]);
            if (s == AGPT_OK && lengths[i] + max_new - 1 > a->max_seq)
                s = AGPT_FAIL(AGPT_ERR_ARG, "a prompt of %d tokens and %d new tokens do not fit the context of %d",
                              lengths[i], max_new, a->max_seq);
            out[i].prefix_tokens = lengths[i];
            off += lengths[i];
        }
        i0 += m;
    }
    if (s == AGPT_OK) s = engine_synchronize(e);
    double t1 = timer_now_s(), prefill_ms = 0;
    Tensor dev_logits = tensor_2d(a->cache.logits.data, a->cache.logits.dtype, e->device, n, V);
    if (s == AGPT_OK) {
        Tensor in = tensor_rows_view(&packed, 0, off);
        s = llama_prefill_varlen(e, &a->llm, &a->cache, &in, lengths, n, &dev_logits);
    }
    for (int i = 0; i < n; i++) running[i] = true;
    int eos = sp_eos_id(a->tokenizer), left = n;
    for (int step = 0; s == AGPT_OK && left > 0; step++) {
        s = read_logits(a, &dev_logits, logits);  // waits for the device
        if (step == 0) prefill_ms = 1e3 * (timer_now_s() - t1);
        for (int i = 0; s == AGPT_OK && i < n; i++) {
            if (!running[i]) continue;  // stopped: keeps its last token as the dummy input
            int32_t tok = argmax_first(logits + (size_t)i * V, V);
            out[i].tokens[out[i].n_tokens++] = feed[i] = tok;
            hashes[i] |= tok == CONV_STOP_TOKEN;
            if ((!a->ignore_stop && (hashes[i] || tok == eos)) || out[i].n_tokens == max_new) {
                running[i] = false;
                left--;
            }
        }
        if (s == AGPT_OK && left > 0) s = llama_decode_step(e, &a->llm, &a->cache, feed, &dev_logits);
    }
    double t2 = timer_now_s();
    for (int i = 0; s == AGPT_OK && i < n; i++) {
        out[i].vision_ms = 1e3 * (t1 - t0) / n;
        out[i].prefill_ms = prefill_ms / n;
        out[i].decode_ms = (1e3 * (t2 - t1) - prefill_ms) / n;
        s = answer_text(a, &out[i]);
    }
    for (int i = 0; texts && i < n; i++) free(texts[i]);
    free(texts), free(classes), free(lengths), free(feed), free(running), free(hashes);
    free(maps), free(scores), free(logits);
    return s;
}

Status anomalygpt_ask_batch(AnomalyGPT *a, const Image *images, int n, const char *const *inputs, int max_new,
                            AnomalyAnswer *out) {
    AGPT_CHECK_ARG(a && images && inputs && out, "anomalygpt_ask_batch: NULL model, images, inputs or answers");
    AGPT_CHECK_ARG(n >= 1, "anomalygpt_ask_batch: %d images; at least 1 is needed", n);
    AGPT_CHECK_ARG(max_new >= 1 && max_new <= (int)(sizeof out->tokens / sizeof out->tokens[0]),
                   "max_new must be in [1, 1024] (got %d)", max_new);
    AGPT_CHECK_ARG(a->max_batch >= 1 && a->tokenizer, "anomalygpt_ask_batch: the model is not open");
    for (int i = 0; i < n; i++) {
        AGPT_CHECK_ARG(inputs[i], "anomalygpt_ask_batch: input %d is NULL", i);
        float *map = out[i].map;
        memset(&out[i], 0, sizeof out[i]);
        out[i].map = map;
    }
    Status s = AGPT_OK;
    for (int i0 = 0; s == AGPT_OK && i0 < n; i0 += a->max_batch) {
        int m = n - i0 < a->max_batch ? n - i0 : a->max_batch;
        s = ask_batch_slice(a, images + i0, m, inputs + i0, max_new, out + i0);
    }
    if (s != AGPT_OK)
        for (int i = 0; i < n; i++) {
            free(out[i].text);
            out[i].text = NULL;
        }
    return s;
}
