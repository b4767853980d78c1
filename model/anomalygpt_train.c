#include "model/anomalygpt_train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/conversation.h"
#include "model/llama.h"
#include "model/model_file.h"
#include "runtime/log.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
static const char *const LORA_PROJ_NAMES[LLAMA_LORA_PROJ] = {"q_proj", "k_proj", "v_proj", "o_proj"};

// ---- open / close ---------------------------------------------------------------------------------------

static Status load_tokenizer(AnomalyTrainModel *m, const char *model, const char *tokenizer_path) {
    if (tokenizer_path) return sp_load_file(tokenizer_path, &m->tokenizer);
    const void *bytes;
    size_t n;
    AGPT_TRY(model_file_blob(&m->vision.weights, MODEL_TENSOR_SP_TOKENIZER, &bytes, &n));
    if (!bytes)
        return AGPT_FAIL(AGPT_ERR_ARG, "%s embeds no LLaMA tokenizer: pass --tokenizer tokenizer.model", model);
    return sp_load_memory(bytes, n, &m->tokenizer);
}

// Gradient tensors shaped as their parameters, carved from one zeroed f32 arena.
static Status alloc_grads(AnomalyTrainModel *m) {
    Tensor *params[2 * VISION_TAPS + 2 * PROMPT_CONVS + 3], *grads[2 * VISION_TAPS + 2 * PROMPT_CONVS + 3];
    int n = 0;
    for (int i = 0; i < VISION_TAPS; i++) {
        params[n] = &m->vision.decoder.fc_w[i], grads[n++] = &m->d_fc_w[i];
        params[n] = &m->vision.decoder.fc_b[i], grads[n++] = &m->d_fc_b[i];
    }
    for (int i = 0; i < PROMPT_CONVS; i++) {
        params[n] = &m->prompts.conv_w[i], grads[n++] = &m->d_conv_w[i];
        params[n] = &m->prompts.conv_b[i], grads[n++] = &m->d_conv_b[i];
    }
    params[n] = &m->prompts.base_prompts, grads[n++] = &m->d_base_prompts;
    if (m->opt.train_proj) {
        params[n] = &m->proj.w, grads[n++] = &m->d_proj_w;
        params[n] = &m->proj.b, grads[n++] = &m->d_proj_b;
    }
    size_t bytes = 0;
    for (int i = 0; i < n; i++) bytes += (size_t)tensor_numel(params[i]) * sizeof(float) + AGPT_ALIGN;
    AGPT_TRY(arena_init(&m->grad_arena, m->engine->device, bytes));
    for (int i = 0; i < n; i++) {
        AGPT_CHECK_ARG(params[i]->dtype == DT_F32, "training needs f32 weights (the store holds %s)",
                       dtype_name(params[i]->dtype));
        AGPT_TRY(arena_tensor(&m->grad_arena, DT_F32, params[i]->ndim, params[i]->shape, grads[i]));
    }
    return anomaly_train_zero_grad(m);
}

// train_vision: zeroed f32 gradients for every block tensor of the encoder, shaped as their parameters.
static Status alloc_vision_grads(AnomalyTrainModel *m) {
    const VisionEncoder *v = &m->vision.vision;
    m->d_vision = calloc((size_t)v->layers, sizeof *m->d_vision);
    if (!m->d_vision) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d blocks' gradients", v->layers);
    size_t bytes = 0;
    for (int l = 0; l < v->layers; l++)
        for (int i = 0; i < VIT_BLOCK_TENSORS; i++) {
            const Tensor *p = vit_block_tensor(&v->blocks[l], i, NULL);
            AGPT_CHECK_ARG(p->dtype == DT_F32, "training the ViT needs f32 weights (the store holds %s)",
                           dtype_name(p->dtype));
            bytes += (size_t)tensor_numel(p) * sizeof(float) + AGPT_ALIGN;
        }
    AGPT_TRY(arena_init(&m->vision_grad_arena, m->engine->device, bytes));
    for (int l = 0; l < v->layers; l++)
        for (int i = 0; i < VIT_BLOCK_TENSORS; i++) {
            const Tensor *p = vit_block_tensor(&v->blocks[l], i, NULL);
            AGPT_TRY(arena_tensor(&m->vision_grad_arena, DT_F32, p->ndim, p->shape,
                                  vit_block_tensor(&m->d_vision[l], i, NULL)));
        }
    return AGPT_OK;
}

static Status tokenize_piece(const SpTokenizer *t, const char *text, int32_t *ids, int cap, int *n) {
    Status s = sp_encode(t, text, ids, cap, n);
    return s == AGPT_OK ? s : agpt_add_context(s, "tokenising '%s'", text);
}

Status anomaly_train_open(AnomalyTrainModel *m, Engine *e, const char *model, const char *const *overlays,
                          int n_overlays, const char *tokenizer_path, const AnomalyTrainOptions *opt) {
    memset(m, 0, sizeof *m);
    AGPT_CHECK_ARG(opt->max_batch >= 1 && opt->max_batch <= 64, "anomaly_train_open: max_batch %d not in [1, 64]",
                   opt->max_batch);
    m->engine = e;
    m->opt = *opt;
    // The encoder sees the batch, or a reference's four rotations.
    int vision_batch = opt->max_batch > 4 ? opt->max_batch : 4;
    AGPT_TRY(vision_model_open(&m->vision, e, model, overlays, n_overlays, DT_F32, vision_batch));
    WeightStore *w = &m->vision.weights;
    Status s = llama_lora_train_load(&m->llm, w);
    if (s == AGPT_OK) s = prompt_learner_load(&m->prompts, w);
    if (s == AGPT_OK) s = llama_proj_load(&m->proj, w);
    if (s == AGPT_OK && (m->prompts.dim != m->llm.block.dim || m->proj.out_dim != m->llm.block.dim ||
                         m->proj.in_dim != m->vision.vision.embed))
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the parts do not fit: LLM width %d, prompt learner %d, llama_proj "
                      "%d->%d, vision embedding %d", model, m->llm.block.dim, m->prompts.dim, m->proj.in_dim,
                      m->proj.out_dim, m->vision.vision.embed);
    if (s == AGPT_OK && m->vision.vision.image != 224)
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the prompt learner needs 224 x 224 maps, the encoder makes %d", model,
                      m->vision.vision.image);
    if (s == AGPT_OK) s = load_tokenizer(m, model, tokenizer_path);
    if (s == AGPT_OK) s = tokenize_piece(m->tokenizer, CONV_PROMPT_START, m->head_ids, 8, &m->n_head);
    if (s == AGPT_OK) s = tokenize_piece(m->tokenizer, CONV_IMAGE_END, m->tail_ids, 8, &m->n_tail);
    if (s == AGPT_OK && 2 + m->n_head + m->n_tail + PROMPT_TOKENS != TRAIN_PREFIX_TOKENS)
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "the tokenizer splits the image markers into %d + %d tokens, not 6 + 4 (is "
                      "it LLaMA's?)", m->n_head, m->n_tail);
    if (s == AGPT_OK && opt->train_vision) s = alloc_vision_grads(m);
    if (s == AGPT_OK) s = alloc_grads(m);  // zeroes every gradient, the ViT's too
    if (s == AGPT_OK && opt->train_head) s = llama_lora_train_enable_head(&m->llm, e);
    if (s != AGPT_OK) {
        anomaly_train_close(m);
        return s;
    }
    return AGPT_OK;
}

void anomaly_train_close(AnomalyTrainModel *m) {
    for (int k = 0; k < 2; k++) {
        if (m->have_llm_state[k]) llama_train_state_free(&m->llm_state[k]);
        if (m->have_vision_acts[k]) vision_train_acts_free(&m->vision_acts[k]);
    }
    for (int i = 0; i < m->n_ref_cache; i++) fewshot_refs_free(&m->ref_cache[i].refs);
    free(m->ref_cache);
    free(m->d_vision);
    arena_free(&m->vision_grad_arena);
    arena_free(&m->step_arena);
    arena_free(&m->grad_arena);
    llama_lora_train_free(&m->llm);
    sp_free(m->tokenizer);
    vision_model_close(&m->vision);  // frees the store and with it every weight
    memset(m, 0, sizeof *m);
}

Status anomaly_train_zero_grad(AnomalyTrainModel *m) {
    for (int i = 0; i < VISION_TAPS; i++) {
        AGPT_TRY(tensor_zero(&m->d_fc_w[i]));
        AGPT_TRY(tensor_zero(&m->d_fc_b[i]));
    }
    for (int i = 0; i < PROMPT_CONVS; i++) {
        AGPT_TRY(tensor_zero(&m->d_conv_w[i]));
        AGPT_TRY(tensor_zero(&m->d_conv_b[i]));
    }
    AGPT_TRY(tensor_zero(&m->d_base_prompts));
    if (m->opt.train_proj) {
        AGPT_TRY(tensor_zero(&m->d_proj_w));
        AGPT_TRY(tensor_zero(&m->d_proj_b));
    }
    for (int l = 0; m->d_vision && l < m->vision.vision.layers; l++)
        for (int i = 0; i < VIT_BLOCK_TENSORS; i++) AGPT_TRY(tensor_zero(vit_block_tensor(&m->d_vision[l], i, NULL)));
    return llama_lora_train_zero_grad(&m->llm);
}

int anomaly_train_tensors(AnomalyTrainModel *m, AnomalyTrainTensor *out, int cap) {
    int n = 0;
#define ADD(p, g, ...)                                                            \
    do {                                                                          \
        if (n < cap) {                                                            \
            snprintf(out[n].name, sizeof out[n].name, __VA_ARGS__);               \
            out[n].param = (p), out[n].grad = (g);                                \
        }                                                                         \
        n++;                                                                      \
    } while (0)
    for (int i = 0; i < VISION_TAPS; i++) {
        ADD(&m->vision.decoder.fc_w[i], &m->d_fc_w[i], "image_decoder.fc.%d.weight", i);
        ADD(&m->vision.decoder.fc_b[i], &m->d_fc_b[i], "image_decoder.fc.%d.bias", i);
    }
    for (int i = 0; i < PROMPT_CONVS; i++) {
        ADD(&m->prompts.conv_w[i], &m->d_conv_w[i], "prompt_learner.meta_net.%d.weight", 3 * i);
        ADD(&m->prompts.conv_b[i], &m->d_conv_b[i], "prompt_learner.meta_net.%d.bias", 3 * i);
    }
    ADD(&m->prompts.base_prompts, &m->d_base_prompts, "prompt_learner.base_prompts");
    if (m->opt.train_proj) {
        ADD(&m->proj.w, &m->d_proj_w, "llama_proj.weight");
        ADD(&m->proj.b, &m->d_proj_b, "llama_proj.bias");
    }
    if (m->opt.train_head) {
        ADD(&m->llm.lm_head, &m->llm.d_lm_head, "lm_head.weight");
        ADD(&m->llm.norm, &m->llm.d_norm, "model.norm.weight");
    }
    if (m->opt.train_lora) {
        int form = llama_lora_form(&m->vision.weights);
        char name[128];
        for (int l = 0; l < m->llm.layers; l++)
            for (int p = 0; p < LLAMA_LORA_PROJ; p++) {
                llama_lora_name(name, sizeof name, form, l, LORA_PROJ_NAMES[p], "A");
                ADD(&m->llm.lora[l].a[p], &m->llm.grad[l].a[p], "%s", name);
                llama_lora_name(name, sizeof name, form, l, LORA_PROJ_NAMES[p], "B");
                ADD(&m->llm.lora[l].b[p], &m->llm.grad[l].b[p], "%s", name);
            }
    }
    if (m->opt.train_vision)
        for (int l = 0; l < m->vision.vision.layers; l++)
            for (int i = 0; i < VIT_BLOCK_TENSORS; i++) {
                const char *suffix;
                Tensor *p = vit_block_tensor(&m->vision.vision.blocks[l], i, &suffix);
                ADD(p, vit_block_tensor(&m->d_vision[l], i, NULL), "modality_trunks.vision.blocks.%d.%s", l, suffix);
            }
#undef ADD
    return n;
}

// ---- the step ------------------------------------------------------------------------------------------

// What the forward keeps for the backward, carved from one arena per step.
typedef struct StepActs {
    int B, S, N, g, E, T;             // batch, map side, patches, grid side, decoder width, sequence length
    Tensor taps[VISION_TAPS];         // [B,N+1,C] copies of the encoder's taps
    Tensor embedding;                 // [B,E']  the vision embedding (llama_proj's input)
    Tensor proj[VISION_TAPS];         // [B*N,E]  fc_i of the patches (before the normalisation)
    Tensor unit[VISION_TAPS];         // [B*N,E]  normalised
    Tensor logits[VISION_TAPS];       // [B,2,g,g]
    Tensor p1[VISION_TAPS];           // [B,S,S]  the abnormal probability per layer
    Tensor map;                       // [B,1,S,S]  the text map (mean of p1)
    Tensor fewshot;                   // [B,1,S,S]  1 - sim (examples with a reference)
    Tensor gt;                        // [B,S,S]
    Tensor conv_in[PROMPT_CONVS];     // the prompt learner: each conv's input [B,C_{i-1},h,w]
    Tensor conv_out[PROMPT_CONVS];    // each conv's output (after the ReLU, which the backward masks with)
    Tensor prompts;                   // [B,18,D]
    Tensor image_token;               // [B,D]
    Tensor embeds;                    // [B,T,D]
    Tensor d_taps[VISION_TAPS];       // [B,N+1,C]  train_vision: gradients at the taps (CLS rows 0)
    Tensor d_embedding;               // [B,E']     train_vision: at the vision embedding
} StepActs;

static int64_t conv_side(const PromptLearner *p, int i, int64_t h) { return h + 2 * p->padding[i] - p->kernel[i] + 1; }

// Arena bytes of a step's activations and backward temporaries for B conversations of T tokens.
static size_t step_bytes(const AnomalyTrainModel *m, int B, int T) {
    const VisionEncoder *v = &m->vision.vision;
    const int64_t S = v->image, N = (int64_t)(S / v->patch) * (S / v->patch), C = v->block.dim;
    const int64_t E = m->vision.decoder.out_dim, D = m->prompts.dim;
    size_t f = sizeof(float), a = AGPT_ALIGN, total = 0;
#define ADD(elems) (total += (size_t)(elems) * f + a)
    for (int i = 0; i < VISION_TAPS; i++) {
        ADD(B * (N + 1) * C);
        ADD(B * N * E), ADD(B * N * E), ADD(B * 2 * N), ADD(B * S * S);
    }
    ADD(B * v->embed), ADD(B * S * S), ADD(B * S * S), ADD(B * S * S);
    int64_t h = S, widest = B * S * S;
    int64_t cin = m->prompts.in_channels;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        ADD(B * cin * h * h);
        int64_t ho = conv_side(&m->prompts, i, h);
        ADD(B * m->prompts.channels[i] * ho * ho);
        if (B * m->prompts.channels[i] * ho * ho > widest) widest = B * m->prompts.channels[i] * ho * ho;
        cin = m->prompts.channels[i];
        h = ho / 2;
    }
    ADD(B * PROMPT_TOKENS * D), ADD(B * D), ADD((int64_t)B * T * D);
    // Backward temporaries: two ping-pong conv gradients, the map gradients, the decoder's per-image gradients.
    ADD(widest), ADD(widest), ADD(B * S * S), ADD(B * S * S), ADD(B * 2 * N), ADD(N * E), ADD(N * E), ADD(D * 9);
    ADD(B * D);
    if (m->opt.train_vision) {
        for (int i = 0; i < VISION_TAPS; i++) ADD(B * (N + 1) * C);
        ADD(B * v->embed);
        total += vision_train_scratch_bytes(v, B);
    }
#undef ADD
    return total + anomaly_map_arena_bytes(&m->vision.decoder, (int)N + 1, (int)S, 4) + 16 * a;
}

// Host [3,S,S] f32 into image b of a device [n,3,S,S] tensor.
static Status upload_image(const Tensor *batch, int b, const float *host, int S) {
    const int64_t plane = 3 * (int64_t)S * S;
    Tensor dst = tensor_2d((char *)batch->data + (size_t)b * plane * sizeof(float), DT_F32, batch->device, 1, plane);
    Tensor src = tensor_2d((void *)host, DT_F32, DEV_CPU, 1, plane);
    return tensor_copy(&dst, &src);
}

// (The training's kornia rotation of a square image by 90-degree steps is preprocess_rotate_chw up to float
// error; the few-shot map takes a max over all four turns, so the direction does not matter.)

// The patch features of a reference's views: each of its N x N shifts (opt.reference_shifts N; as
// VisionModel's views: down by v / N, right by v % N steps of P / N), turned 0/90/180/270 degrees unless
// opt.no_reference_rotations. They go through the encoder four at a time.
static Status encode_reference_views(AnomalyTrainModel *m, int S, int T, const float *reference, FewShotRefs *refs) {
    Engine *e = m->engine;
    VisionModel *vm = &m->vision;
    const int C = vm->vision.block.dim, P = vm->vision.patch;
    const int shifts = m->opt.reference_shifts > 1 ? m->opt.reference_shifts : 1;
    const int turns = m->opt.no_reference_rotations ? 1 : 4, views = shifts * shifts * turns;
    AGPT_CHECK_ARG(shifts <= P, "%d reference shifts per axis: at most the patch side, %d", shifts, P);
    size_t plane = (size_t)3 * S * S;
    float *batch = malloc(plane * 5 * sizeof(float)), *moved = batch + 4 * plane;
    if (!batch) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the reference's views");
    *refs = (FewShotRefs){0};
    Status s = AGPT_OK;
    for (int first = 0; first < views && s == AGPT_OK; first += 4) {  // the encoder's batch holds 4 (or more)
        int count = views - first < 4 ? views - first : 4;
        for (int j = 0; j < count; j++) {
            int v = (first + j) / turns, k = (first + j) % turns;
            const float *view = reference;
            if (v) {
                preprocess_reference_view(reference, S, P, shifts, v, moved);
                view = moved;
            }
            preprocess_rotate_chw(view, S, k, batch + j * plane);
        }
        Tensor images = tensor_4d(vm->images.data, DT_F32, e->device, count, 3, S, S);
        Tensor src = tensor_4d(batch, DT_F32, DEV_CPU, count, 3, S, S);
        s = tensor_copy(&images, &src);
        Tensor emb = tensor_2d(vm->embedding.data, DT_F32, e->device, count, vm->vision.embed), taps[VISION_TAPS];
        for (int i = 0; i < VISION_TAPS; i++) taps[i] = tensor_3d(vm->taps[i].data, DT_F32, e->device, count, T, C);
        if (s == AGPT_OK) s = vision_forward(e, &vm->vision, &vm->arena, &images, &emb, taps);
        if (s == AGPT_OK) s = fewshot_refs_append(e, taps, refs);
    }
    free(batch);
    if (s != AGPT_OK) fewshot_refs_free(refs);
    return s;
}

// FNV-1a (64-bit) over the 32-bit words of the reference's pixels: a class's reference gives the same key every time.
static uint64_t reference_key(const float *reference, size_t floats) {
    uint64_t h = 1469598103934665603ull;
    const uint32_t *w = (const uint32_t *)reference;
    for (size_t i = 0; i < floats; i++) h = (h ^ w[i]) * 1099511628211ull;
    return h;
}

// The few-shot maps of examples b0..b1-1, which share one reference, against its views (encode_reference_views):
// acts->fewshot[b] = 1 - sim. With the ViT frozen, the views' features are cached per reference (m->ref_cache).
static Status fewshot_maps(AnomalyTrainModel *m, StepActs *t, int b0, int b1, const float *reference, Arena *arena) {
    Engine *e = m->engine;
    VisionModel *vm = &m->vision;
    const int S = t->S, T = t->N + 1, C = vm->vision.block.dim;
    const bool cacheable = !m->opt.train_vision;
    const uint64_t key = cacheable ? reference_key(reference, (size_t)3 * S * S) : 0;
    const FewShotRefs *refs = NULL;
    for (int i = 0; cacheable && i < m->n_ref_cache && !refs; i++)
        if (m->ref_cache[i].key == key) refs = &m->ref_cache[i].refs;
    FewShotRefs own = {0};
    Status s = AGPT_OK;
    if (!refs) {
        AGPT_TRY(encode_reference_views(m, S, T, reference, &own));
        size_t bytes = 0;
        for (int i = 0; i < VISION_TAPS; i++)  // the storage, which may hold more rows than are used
            bytes += (size_t)own.capacity_rows * own.patches[i].shape[1] * dtype_size(own.patches[i].dtype);
        RefViewsCacheEntry *grown = NULL;
        if (cacheable && m->ref_cache_bytes + bytes <= TRAIN_REF_CACHE_BYTES &&
            (grown = realloc(m->ref_cache, (size_t)(m->n_ref_cache + 1) * sizeof *grown))) {
            m->ref_cache = grown;
            m->ref_cache[m->n_ref_cache] = (RefViewsCacheEntry){key, own};
            refs = &m->ref_cache[m->n_ref_cache++].refs;
            m->ref_cache_bytes += bytes;
            own = (FewShotRefs){0};
        } else {
            refs = &own;
        }
    }
    const int n = b1 - b0;
    Tensor query[VISION_TAPS];  // images b0..b1-1 of the kept taps
    for (int i = 0; i < VISION_TAPS; i++)
        query[i] = tensor_3d((char *)t->taps[i].data + (size_t)b0 * T * C * sizeof(float), DT_F32, e->device, n, T, C);
    Tensor out = tensor_3d((char *)t->fewshot.data + (size_t)b0 * S * S * sizeof(float), DT_F32, e->device, n, S, S);
    s = anomaly_map_fewshot(e, refs, arena, query, &out);
    fewshot_refs_free(&own);
    return s;
}

// The frozen encoder over the batch, then per layer the decoder's text map (3.2), kept for the backward.
static Status forward_maps(AnomalyTrainModel *m, StepActs *t, const AnomalyTrainExample *ex) {
    Engine *e = m->engine;
    VisionModel *vm = &m->vision;
    const int B = t->B, S = t->S, N = t->N, C = vm->vision.block.dim;
    Tensor images = tensor_4d(vm->images.data, DT_F32, e->device, B, 3, S, S);
    for (int b = 0; b < B; b++) AGPT_TRY(upload_image(&images, b, ex[b].image, S));
    Tensor emb = tensor_2d(vm->embedding.data, DT_F32, e->device, B, vm->vision.embed), taps[VISION_TAPS];
    for (int i = 0; i < VISION_TAPS; i++) taps[i] = tensor_3d(vm->taps[i].data, DT_F32, e->device, B, N + 1, C);
    if (m->opt.train_vision) {
        const int slot = B > 1;
        if (m->have_vision_acts[slot] && m->vision_acts[slot].B != B) {
            vision_train_acts_free(&m->vision_acts[slot]);
            m->have_vision_acts[slot] = false;
        }
        if (!m->have_vision_acts[slot]) {
            AGPT_TRY(vision_train_acts_create(&m->vision_acts[slot], e, &vm->vision, B));
            m->have_vision_acts[slot] = true;
        }
        AGPT_TRY(vision_train_forward(e, &vm->vision, &vm->arena, &m->vision_acts[slot], &images, &emb, taps));
    } else {
        AGPT_TRY(vision_forward(e, &vm->vision, &vm->arena, &images, &emb, taps));
    }
    // The encoder's buffers are reused by the references' pass: keep copies.
    for (int i = 0; i < VISION_TAPS; i++) AGPT_TRY(tensor_copy(&t->taps[i], &taps[i]));
    AGPT_TRY(tensor_copy(&t->embedding, &emb));

    AGPT_TRY(tensor_zero(&t->map));
    Tensor map3 = tensor_3d(t->map.data, DT_F32, e->device, B, S, S);
    for (int i = 0; i < VISION_TAPS; i++) {
        Tensor patches_all = tensor_2d(t->taps[i].data, DT_F32, e->device, (int64_t)B * (N + 1), C);
        for (int b = 0; b < B; b++) {
            const Tensor *tf;
            const char *used;
            AGPT_TRY(vision_model_class_features(vm, ex[b].class_name, &tf, &used));
            Tensor patches = tensor_rows_view(&patches_all, (int64_t)b * (N + 1) + 1, N);  // CLS dropped
            Tensor proj = tensor_rows_view(&t->proj[i], (int64_t)b * N, N);
            Tensor unit = tensor_rows_view(&t->unit[i], (int64_t)b * N, N);
            Tensor logits = tensor_2d((char *)t->logits[i].data + (size_t)b * 2 * N * sizeof(float), DT_F32,
                                      e->device, 2, N);
            AGPT_TRY(op_linear(e, &proj, &patches, &vm->decoder.fc_w[i], &vm->decoder.fc_b[i]));
            AGPT_TRY(op_l2_normalize(e, &unit, &proj, 0.0f));  // no eps, as the reference's x / x.norm()
            // S^T [2,N] = 100 t [2,E] @ unit^T: the [2,g,g] layout the upsampling wants.
            AGPT_TRY(op_matmul(e, &logits, tf, &unit, NULL, false, true, 100.0f, 0.0f));
        }
        // p1_i = softmax(upsample(S_i))[class 1]; the map is their mean.
        AGPT_TRY(tensor_zero(&t->p1[i]));
        AGPT_TRY(op_upsample_softmax2_axpy(e, &t->p1[i], &t->logits[i], 1.0f));
        AGPT_TRY(op_axpy(e, &map3, &t->p1[i], 1.0f / VISION_TAPS));
    }
    return AGPT_OK;
}

// The prompt learner's forward with every conv's input and output kept: source [B,1,S,S] -> t->prompts.
static Status forward_prompts(AnomalyTrainModel *m, StepActs *t, const Tensor *source) {
    Engine *e = m->engine;
    const PromptLearner *p = &m->prompts;
    const int B = t->B, D = p->dim;
    AGPT_TRY(tensor_copy(&t->conv_in[0], source));
    for (int i = 0; i < PROMPT_CONVS; i++) {
        AGPT_TRY(op_conv2d(e, &t->conv_out[i], &t->conv_in[i], &p->conv_w[i], &p->conv_b[i], p->padding[i]));
        if (i == PROMPT_CONVS - 1) break;  // no ReLU after the last conv
        AGPT_TRY(op_relu(e, &t->conv_out[i], &t->conv_out[i]));
        AGPT_TRY(op_maxpool2x2(e, &t->conv_in[i + 1], &t->conv_out[i]));
    }
    // prompts[b] = [base_prompts; last[b]^T], last[b] viewed [D,9] (the transpose as a GEMM with I, exact).
    const Tensor *last = &t->conv_out[PROMPT_CONVS - 1];
    Tensor rows = tensor_2d(t->prompts.data, DT_F32, e->device, (int64_t)B * PROMPT_TOKENS, D);
    for (int b = 0; b < B; b++) {
        Tensor base = tensor_rows_view(&rows, (int64_t)b * PROMPT_TOKENS, PROMPT_BASE);
        Tensor mapped = tensor_rows_view(&rows, (int64_t)b * PROMPT_TOKENS + PROMPT_BASE, PROMPT_BASE);
        Tensor xb = tensor_2d((char *)last->data + (size_t)b * D * PROMPT_BASE * sizeof(float), DT_F32, e->device,
                              D, PROMPT_BASE);
        AGPT_TRY(tensor_copy(&base, &p->base_prompts));
        AGPT_TRY(op_matmul(e, &mapped, &p->eye, &xb, NULL, false, true, 1.0f, 0.0f));
    }
    return AGPT_OK;
}

// The LLM input [B,T,D]: [<s>] head [image token] tail [18 prompts] ids (padded with TRAIN_PAD_ID), and the
// labels: -100 on the prefix and the padding, the targets on the text.
static Status assemble(AnomalyTrainModel *m, StepActs *t, const AnomalyTrainExample *ex, int32_t *labels) {
    Engine *e = m->engine;
    const int B = t->B, T = t->T, D = m->prompts.dim;
    int32_t *ids = malloc((size_t)T * sizeof *ids);
    if (!ids) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for token ids");
    Status s = AGPT_OK;
    Tensor rows = tensor_2d(t->embeds.data, DT_F32, e->device, (int64_t)B * T, D);
    for (int b = 0; b < B && s == AGPT_OK; b++) {
        int r = 0;
        ids[r++] = sp_bos_id(m->tokenizer);
        for (int k = 0; k < m->n_head; k++) ids[r++] = m->head_ids[k];
        int image_row = r++;
        for (int k = 0; k < m->n_tail; k++) ids[r++] = m->tail_ids[k];
        int prompt_row = r;
        r += PROMPT_TOKENS;
        for (int k = 0; k < ex[b].n_tokens; k++) ids[r++] = ex[b].ids[k];
        while (r < T) ids[r++] = TRAIN_PAD_ID;
        for (int k = 0; k < T; k++) {
            int text = k - TRAIN_PREFIX_TOKENS;
            labels[(size_t)b * T + k] = text >= 0 && text < ex[b].n_tokens ? ex[b].targets[text] : -100;
        }
        // Token rows first (the image and prompt rows get a placeholder id, overwritten below).
        ids[image_row] = TRAIN_PAD_ID;
        for (int k = 0; k < PROMPT_TOKENS; k++) ids[prompt_row + k] = TRAIN_PAD_ID;
        Tensor seq = tensor_rows_view(&rows, (int64_t)b * T, T);
        Tensor tid = tensor_1d(ids, DT_I32, DEV_CPU, T);
        s = op_embedding(e, &seq, &m->llm.embed, &tid);
        if (s == AGPT_OK) {
            Tensor dst = tensor_rows_view(&seq, image_row, 1);
            Tensor src = tensor_rows_view(&t->image_token, b, 1);
            s = op_copy(e, &dst, &src);
        }
        if (s == AGPT_OK) {
            Tensor dst = tensor_rows_view(&seq, prompt_row, PROMPT_TOKENS);
            Tensor src = tensor_2d((char *)t->prompts.data + (size_t)b * PROMPT_TOKENS * D * sizeof(float), DT_F32,
                                   e->device, PROMPT_TOKENS, D);
            s = op_copy(e, &dst, &src);
        }
    }
    free(ids);
    return s;
}

// Backward of the prompt learner from d prompts [B,18,D] (rows of the LLM input's gradient): parameter
// gradients accumulated; *d_source [B,1,S,S] (when not NULL) gets the gradient at its input map.
static Status backward_prompts(AnomalyTrainModel *m, StepActs *t, const Tensor *d_embeds, Arena *arena,
                               Tensor *d_source) {
    Engine *e = m->engine;
    const PromptLearner *p = &m->prompts;
    const int B = t->B, T = t->T, D = p->dim, prompt_row = TRAIN_PREFIX_TOKENS - PROMPT_TOKENS;
    Tensor rows = tensor_2d(d_embeds->data, DT_F32, e->device, (int64_t)B * T, D);
    const Tensor *last = &t->conv_out[PROMPT_CONVS - 1];
    // Two buffers as wide as the widest activation: buf[0] holds the gradient at a conv's output, buf[1] the one
    // at its input. Going down a layer, conv i's input gradient (buf[1]) becomes conv i-1's output gradient
    // (buf[0]) through the pool and the ReLU, and conv i's output gradient in buf[0] is used up by then.
    size_t widest = 0;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        size_t n = (size_t)tensor_numel(&t->conv_out[i]);
        if (n > widest) widest = n;
        n = (size_t)tensor_numel(&t->conv_in[i]);
        if (n > widest) widest = n;
    }
    Tensor buf[2];
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, SHAPE((int64_t)widest), &buf[0]));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, SHAPE((int64_t)widest), &buf[1]));
    Tensor d_out = tensor_make(buf[0].data, DT_F32, e->device, last->ndim, last->shape);  // [B,D,3,3]
    for (int b = 0; b < B; b++) {
        Tensor d_base = tensor_rows_view(&rows, (int64_t)b * T + prompt_row, PROMPT_BASE);               // [9,D]
        Tensor d_mapped = tensor_rows_view(&rows, (int64_t)b * T + prompt_row + PROMPT_BASE, PROMPT_BASE); // [9,D]
        AGPT_TRY(op_axpy(e, &m->d_base_prompts, &d_base, 1.0f));
        // d last[b] [D,9] = d_mapped^T, again through I.
        Tensor dx = tensor_2d((char *)d_out.data + (size_t)b * D * PROMPT_BASE * sizeof(float), DT_F32, e->device,
                              D, PROMPT_BASE);
        AGPT_TRY(op_matmul(e, &dx, &d_mapped, &p->eye, NULL, true, false, 1.0f, 0.0f));
    }
    for (int i = PROMPT_CONVS - 1; i >= 0; i--) {
        // d_out: gradient at conv i's output (after its ReLU for i < last, already masked below).
        Tensor *x = &t->conv_in[i];
        bool need_dx = i > 0 || d_source;
        Tensor d_in = i > 0 ? tensor_make(buf[1].data, DT_F32, e->device, x->ndim, x->shape)
                            : (d_source ? *d_source : (Tensor){0});
        AGPT_TRY(op_conv2d_backward(e, need_dx ? &d_in : NULL, &m->d_conv_w[i], &m->d_conv_b[i], &d_out, x,
                                    &p->conv_w[i], p->padding[i]));
        if (i == 0) break;
        // d_in is the gradient at the pool output of layer i-1: through the pool and the ReLU.
        const Tensor *y = &t->conv_out[i - 1];
        Tensor d_y = tensor_make(buf[0].data, DT_F32, e->device, y->ndim, y->shape);
        AGPT_TRY(op_maxpool2x2_backward(e, &d_y, &d_in, y));
        AGPT_TRY(op_relu_backward(e, &d_y, &d_y, y));
        d_out = d_y;
    }
    return AGPT_OK;
}

// Backward of the text maps: d p1_i = d_map / 4 (when d_map is not NULL) + d (focal_i + dice_i) / d p1_i, then
// through the softmax, the upsampling, the scaled dot, the normalisation and fc_i.
static Status backward_maps(AnomalyTrainModel *m, StepActs *t, const AnomalyTrainExample *ex, const Tensor *d_map,
                            bool pixel_loss, Arena *arena, double *focal, double *dice) {
    Engine *e = m->engine;
    VisionModel *vm = &m->vision;
    const int B = t->B, S = t->S, N = t->N, g = t->g, E = t->E, C = vm->vision.block.dim;
    Tensor dp1, dlogits, d_unit, d_proj;
    AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, S, S), &dp1));
    AGPT_TRY(arena_tensor(arena, DT_F32, 4, SHAPE(B, 2, g, g), &dlogits));
    AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE(N, E), &d_unit));
    AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE(N, E), &d_proj));
    *focal = *dice = 0;
    for (int i = 0; i < VISION_TAPS; i++) {
        AGPT_TRY(tensor_zero(&dp1));
        if (d_map) {
            Tensor dm = tensor_3d(d_map->data, DT_F32, e->device, B, S, S);
            AGPT_TRY(op_axpy(e, &dp1, &dm, 1.0f / VISION_TAPS));
        }
        if (pixel_loss) {
            double f, d;
            AGPT_TRY(op_pixel_loss(e, &f, &d, &dp1, &t->p1[i], &t->gt, 1.0f));
            *focal += f, *dice += d;
        }
        if (!d_map && !pixel_loss) continue;  // nothing reaches this layer
        AGPT_TRY(op_upsample_softmax2_backward(e, &dlogits, &dp1, &t->logits[i]));
        Tensor patches_all = tensor_2d(t->taps[i].data, DT_F32, e->device, (int64_t)B * (N + 1), C);
        for (int b = 0; b < B; b++) {
            const Tensor *tf;
            const char *used;
            AGPT_TRY(vision_model_class_features(vm, ex[b].class_name, &tf, &used));
            Tensor dl = tensor_2d((char *)dlogits.data + (size_t)b * 2 * N * sizeof(float), DT_F32, e->device, 2, N);
            // logits = 100 t unit^T  =>  d unit [N,E] = 100 dl^T [N,2] @ t [2,E].
            AGPT_TRY(op_matmul(e, &d_unit, &dl, tf, NULL, true, false, 100.0f, 0.0f));
            Tensor proj = tensor_rows_view(&t->proj[i], (int64_t)b * N, N);
            AGPT_TRY(op_l2_normalize_backward(e, &d_proj, &d_unit, &proj, 0.0f));
            Tensor patches = tensor_rows_view(&patches_all, (int64_t)b * (N + 1) + 1, N);
            Tensor d_patches = {0};  // train_vision: this image's patch rows of the tap's gradient
            if (m->opt.train_vision) {
                Tensor d_all = tensor_2d(t->d_taps[i].data, DT_F32, e->device, (int64_t)B * (N + 1), C);
                d_patches = tensor_rows_view(&d_all, (int64_t)b * (N + 1) + 1, N);
            }
            AGPT_TRY(op_linear_backward(e, m->opt.train_vision ? &d_patches : NULL, &m->d_fc_w[i], &m->d_fc_b[i],
                                        &d_proj, &patches, &vm->decoder.fc_w[i]));
        }
    }
    return AGPT_OK;
}

static Status carve_acts(AnomalyTrainModel *m, StepActs *t, Arena *arena) {
    const VisionEncoder *v = &m->vision.vision;
    const int B = t->B, S = t->S, N = t->N, g = t->g, E = t->E, C = v->block.dim, D = m->prompts.dim;
    for (int i = 0; i < VISION_TAPS; i++) {
        AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, N + 1, C), &t->taps[i]));
        AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE((int64_t)B * N, E), &t->proj[i]));
        AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE((int64_t)B * N, E), &t->unit[i]));
        AGPT_TRY(arena_tensor(arena, DT_F32, 4, SHAPE(B, 2, g, g), &t->logits[i]));
        AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, S, S), &t->p1[i]));
    }
    AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE(B, v->embed), &t->embedding));
    AGPT_TRY(arena_tensor(arena, DT_F32, 4, SHAPE(B, 1, S, S), &t->map));
    AGPT_TRY(arena_tensor(arena, DT_F32, 4, SHAPE(B, 1, S, S), &t->fewshot));
    AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, S, S), &t->gt));
    int64_t h = S, cin = m->prompts.in_channels;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        AGPT_TRY(arena_tensor(arena, DT_F32, 4, SHAPE(B, cin, h, h), &t->conv_in[i]));
        int64_t ho = conv_side(&m->prompts, i, h);
        AGPT_TRY(arena_tensor(arena, DT_F32, 4, SHAPE(B, m->prompts.channels[i], ho, ho), &t->conv_out[i]));
        cin = m->prompts.channels[i];
        h = ho / 2;
    }
    AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, PROMPT_TOKENS, D), &t->prompts));
    AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE(B, D), &t->image_token));
    AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, t->T, D), &t->embeds));
    if (m->opt.train_vision) {
        for (int i = 0; i < VISION_TAPS; i++) {
            AGPT_TRY(arena_tensor(arena, DT_F32, 3, SHAPE(B, N + 1, C), &t->d_taps[i]));
            AGPT_TRY(tensor_zero(&t->d_taps[i]));  // the CLS rows and layers without a loss stay 0
        }
        AGPT_TRY(arena_tensor(arena, DT_F32, 2, SHAPE(B, v->embed), &t->d_embedding));
        AGPT_TRY(tensor_zero(&t->d_embedding));
    }
    return AGPT_OK;
}

static Status step_in_arena(AnomalyTrainModel *m, StepActs *t, const AnomalyTrainExample *ex, Arena *arena,
                            int32_t *labels, AnomalyTrainLosses *out) {
    Engine *e = m->engine;
    const int B = t->B, S = t->S, D = m->prompts.dim, T = t->T;
    const bool pixel_loss = ex[0].mask != NULL, fewshot = ex[0].reference != NULL;
    AGPT_TRY(carve_acts(m, t, arena));

    // Maps, pixel targets, the few-shot maps.
    AGPT_TRY(forward_maps(m, t, ex));
    if (pixel_loss)
        for (int b = 0; b < B; b++) {
            Tensor dst = tensor_2d((char *)t->gt.data + (size_t)b * S * S * sizeof(float), DT_F32, e->device, S, S);
            Tensor src = tensor_2d((void *)ex[b].mask, DT_F32, DEV_CPU, S, S);
            AGPT_TRY(tensor_copy(&dst, &src));
        }
    for (int b0 = 0, b1; fewshot && b0 < B; b0 = b1) {  // runs of examples with the same reference
        for (b1 = b0 + 1; b1 < B && ex[b1].reference == ex[b0].reference;) b1++;
        AGPT_TRY(fewshot_maps(m, t, b0, b1, ex[b0].reference, arena));
    }

    // Prompts, the image token, the LLM input and its loss.
    AGPT_TRY(forward_prompts(m, t, fewshot ? &t->fewshot : &t->map));
    Tensor token3 = tensor_3d(t->image_token.data, DT_F32, e->device, B, 1, D);
    AGPT_TRY(image_token_forward(e, &m->proj, &t->embedding, &token3));
    AGPT_TRY(assemble(m, t, ex, labels));
    const int slot = B > 1;  // instruction steps (1 conversation) alternate with anomaly items (2)
    if (m->have_llm_state[slot] && (m->llm_state[slot].B != B || m->llm_state[slot].T != T)) {
        llama_train_state_free(&m->llm_state[slot]);
        m->have_llm_state[slot] = false;
    }
    if (!m->have_llm_state[slot]) {
        AGPT_TRY(llama_train_state_create(&m->llm_state[slot], e, &m->llm, B, T));
        m->have_llm_state[slot] = true;
    }
    LlamaTrainState *st = &m->llm_state[slot];
    float ce = 0;
    Status s = llama_lora_train_forward(e, &m->llm, st, &t->embeds);
    if (s == AGPT_OK) s = llama_lora_train_loss(e, &m->llm, st, labels, 0, &ce);
    if (s == AGPT_OK) s = llama_lora_train_backward(e, &m->llm, st, m->opt.train_lora);
    out->ce = ce;
    out->targets = st->n_targets;

    // Backward: the image token, the prompt learner, the maps.
    if (s == AGPT_OK && (m->opt.train_proj || m->opt.train_vision)) {
        Tensor rows = tensor_2d(st->d_x.data, DT_F32, e->device, (int64_t)B * T, D);
        Tensor d_token;
        s = arena_tensor(arena, DT_F32, 2, SHAPE(B, D), &d_token);
        const int image_row = 1 + m->n_head;
        for (int b = 0; s == AGPT_OK && b < B; b++) {
            Tensor dst = tensor_rows_view(&d_token, b, 1), src = tensor_rows_view(&rows, (int64_t)b * T + image_row, 1);
            s = op_copy(e, &dst, &src);
        }
        const bool pj = m->opt.train_proj, vis = m->opt.train_vision;
        if (s == AGPT_OK)
            s = op_linear_backward(e, vis ? &t->d_embedding : NULL, pj ? &m->d_proj_w : NULL, pj ? &m->d_proj_b : NULL,
                                   &d_token, &t->embedding, &m->proj.w);
    }
    Tensor d_map = {0};
    if (s == AGPT_OK && !fewshot) s = arena_tensor(arena, DT_F32, 4, SHAPE(B, 1, S, S), &d_map);
    if (s == AGPT_OK) s = backward_prompts(m, t, &st->d_x, arena, fewshot ? NULL : &d_map);
    AGPT_TRY(s);
    // The few-shot map comes from the encoder alone, without a gradient (as the reference's, whose encoder is
    // frozen): nothing flows back from the prompt learner then.
    AGPT_TRY(backward_maps(m, t, ex, fewshot ? NULL : &d_map, pixel_loss, arena, &out->focal, &out->dice));
    if (!m->opt.train_vision) return AGPT_OK;
    return vision_train_backward(e, &m->vision.vision, m->d_vision, &m->vision_acts[B > 1], arena, t->d_taps,
                                 &t->d_embedding);
}

Status anomaly_train_step(AnomalyTrainModel *m, const AnomalyTrainExample *ex, int B, AnomalyTrainLosses *out) {
    memset(out, 0, sizeof *out);
    AGPT_CHECK_ARG(B >= 1 && B <= m->opt.max_batch, "anomaly_train_step: batch %d not in [1, %d]", B,
                   m->opt.max_batch);
    int longest = 0;
    for (int b = 0; b < B; b++) {
        AGPT_CHECK_ARG(ex[b].image && ex[b].class_name && ex[b].ids && ex[b].targets && ex[b].n_tokens >= 1,
                       "anomaly_train_step: example %d lacks its image, class or tokens", b);
        AGPT_CHECK_ARG((ex[b].mask != NULL) == (ex[0].mask != NULL),
                       "anomaly_train_step: either every example has a mask or none has (example %d differs)", b);
        AGPT_CHECK_ARG((ex[b].reference != NULL) == (ex[0].reference != NULL),
                       "anomaly_train_step: either every example has a reference or none has (example %d differs)", b);
        for (int k = 0; k < ex[b].n_tokens; k++)
            AGPT_CHECK_ARG(ex[b].ids[k] >= 0 && ex[b].ids[k] < m->llm.vocab &&
                               (ex[b].targets[k] == -100 ||  // -100: no loss here (torch's ignore_index)
                                (ex[b].targets[k] >= 0 && ex[b].targets[k] < m->llm.vocab)),
                           "anomaly_train_step: example %d token %d: id %d or target %d out of range", b, k,
                           ex[b].ids[k], ex[b].targets[k]);
        if (ex[b].n_tokens > longest) longest = ex[b].n_tokens;
    }
    const VisionEncoder *v = &m->vision.vision;
    StepActs t = {.B = B, .S = v->image, .g = v->image / v->patch, .E = m->vision.decoder.out_dim,
                  .T = (TRAIN_PREFIX_TOKENS + longest + TRAIN_PAD_MULTIPLE - 1) / TRAIN_PAD_MULTIPLE *
                       TRAIN_PAD_MULTIPLE};
    t.N = t.g * t.g;
    size_t need = step_bytes(m, B, t.T);
    if (m->step_arena.capacity < need) {
        arena_free(&m->step_arena);
        AGPT_TRY(arena_init(&m->step_arena, m->engine->device, need + need / 4));  // room for longer answers
    }
    arena_reset_to(&m->step_arena, 0);
    int32_t *labels = malloc((size_t)B * t.T * sizeof *labels);
    Status s = labels ? step_in_arena(m, &t, ex, &m->step_arena, labels, out)
                      : AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d labels", B * t.T);
    free(labels);
    return s;
}
