#include "model/llama_lora_train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/llama.h"
#include "runtime/log.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

static size_t padded(size_t bytes) { return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN; }


// ---------------------------------------------------------------------------------------------------------
// Loading

static const char *const PROJ[LLAMA_LORA_PROJ] = {"q_proj", "k_proj", "v_proj", "o_proj"};

static Status load_base(LlamaLoraTrain *m, WeightStore *w) {
    const char *emb = "model.embed_tokens.weight";
    int layers, vocab;
    AGPT_TRY(llama_config_read(w, &m->block, &layers, &vocab));
    int64_t V = vocab, C = m->block.dim, I = m->block.hidden;
    m->layers = layers;
    m->vocab = vocab;
    m->layer = calloc((size_t)layers, sizeof *m->layer);
    m->lora = calloc((size_t)layers, sizeof *m->lora);
    m->grad = calloc((size_t)layers, sizeof *m->grad);
    if (!m->layer || !m->lora || !m->grad) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d layer records", layers);
    AGPT_TRY(weights_load(w, emb, 2, SHAPE(V, C), &m->embed));
    for (int l = 0; l < layers; l++) {
        LlamaBlockWeights *b = &m->layer[l];
        const char *p = "model.layers";
        AGPT_TRY(weights_loadf(w, 1, SHAPE(C), &b->input_norm, "%s.%d.input_layernorm.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(C, C), &b->wq, "%s.%d.self_attn.q_proj.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(C, C), &b->wk, "%s.%d.self_attn.k_proj.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(C, C), &b->wv, "%s.%d.self_attn.v_proj.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(C, C), &b->wo, "%s.%d.self_attn.o_proj.weight", p, l));
        AGPT_TRY(weights_loadf(w, 1, SHAPE(C), &b->post_norm, "%s.%d.post_attention_layernorm.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(I, C), &b->w_gate, "%s.%d.mlp.gate_proj.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(I, C), &b->w_up, "%s.%d.mlp.up_proj.weight", p, l));
        AGPT_TRY(weights_loadf(w, 2, SHAPE(C, I), &b->w_down, "%s.%d.mlp.down_proj.weight", p, l));
    }
    AGPT_TRY(weights_load(w, "model.norm.weight", 1, SHAPE(C), &m->norm));
    return weights_load(w, "lm_head.weight", 2, SHAPE(V, C), &m->lm_head);
}

static Status load_lora(LlamaLoraTrain *m, WeightStore *w) {
    int form = llama_lora_form(w);  // the key forms model/llama.c merges from
    char na[256], nb[256];
    if (form < 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no LoRA factors (e.g. '%s'); training keeps LoRA apart and needs "
                         "them for every layer's q, k, v, o", w->file_name, "base_model.model.model.layers.0."
                         "self_attn.q_proj.lora_A.weight");
    llama_lora_name(na, sizeof na, form, 0, "q_proj", "A");
    const int64_t C = m->block.dim, r = weights_dim(w, na, 0);
    if (r < 1 || r > C) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: LoRA '%s' has rank %lld, expected 1..%lld",
                                         w->file_name, na, (long long)r, (long long)C);
    m->rank = (int)r;
    AGPT_TRY(weights_meta_float(w, "lora.alpha", (float)r, &m->alpha));
    m->scaling = m->alpha / (float)r;
    for (int l = 0; l < m->layers; l++)
        for (int p = 0; p < LLAMA_LORA_PROJ; p++) {
            llama_lora_name(na, sizeof na, form, l, PROJ[p], "A");
            llama_lora_name(nb, sizeof nb, form, l, PROJ[p], "B");
            Status s = weights_load(w, na, 2, SHAPE(r, C), &m->lora[l].a[p]);
            if (s == AGPT_OK) s = weights_load(w, nb, 2, SHAPE(C, r), &m->lora[l].b[p]);
            if (s != AGPT_OK)
                return agpt_add_context(s, "%s: LoRA of rank %lld for layer 0's q_proj was found, so every layer's "
                                        "q, k, v, o needs A [%lld,%lld] and B [%lld,%lld]", w->file_name,
                                        (long long)r, (long long)r, (long long)C, (long long)C, (long long)r);
        }
    return AGPT_OK;
}

static Status alloc_grads(LlamaLoraTrain *m, Engine *e) {
    const int64_t C = m->block.dim, r = m->rank;
    DType dt = m->embed.dtype;
    size_t bytes = (size_t)m->layers * LLAMA_LORA_PROJ * 2 * padded((size_t)(r * C) * sizeof(float));
    AGPT_TRY(arena_init(&m->grad_arena, e->device, bytes));
    for (int l = 0; l < m->layers; l++)
        for (int p = 0; p < LLAMA_LORA_PROJ; p++) {
            AGPT_TRY(arena_tensor(&m->grad_arena, dt, 2, SHAPE(r, C), &m->grad[l].a[p]));
            AGPT_TRY(arena_tensor(&m->grad_arena, dt, 2, SHAPE(C, r), &m->grad[l].b[p]));
        }
    return llama_lora_train_zero_grad(m);
}

Status llama_lora_train_load(LlamaLoraTrain *m, WeightStore *w) {
    memset(m, 0, sizeof *m);
    Status s = load_base(m, w);
    if (s == AGPT_OK) s = load_lora(m, w);
    if (s == AGPT_OK) s = alloc_grads(m, w->engine);
    if (s != AGPT_OK) {
        llama_lora_train_free(m);
        return s;
    }
    LOG_D("llama train: dim %d, %d heads, %d layers, MLP %d, vocab %d, LoRA rank %d alpha %g (scaling %g)",
          m->block.dim, m->block.heads, m->layers, m->block.hidden, m->vocab, m->rank, (double)m->alpha,
          (double)m->scaling);
    return AGPT_OK;
}

void llama_lora_train_free(LlamaLoraTrain *m) {
    free(m->layer);
    free(m->lora);
    free(m->grad);
    arena_free(&m->grad_arena);
    arena_free(&m->head_arena);
    memset(m, 0, sizeof *m);
}

Status llama_lora_train_zero_grad(LlamaLoraTrain *m) {
    for (int l = 0; l < m->layers; l++)
        for (int p = 0; p < LLAMA_LORA_PROJ; p++) {
            AGPT_TRY(tensor_zero(&m->grad[l].a[p]));
            AGPT_TRY(tensor_zero(&m->grad[l].b[p]));
        }
    if (m->train_head) {
        AGPT_TRY(tensor_zero(&m->d_lm_head));
        AGPT_TRY(tensor_zero(&m->d_norm));
    }
    return AGPT_OK;
}

Status llama_lora_train_enable_head(LlamaLoraTrain *m, Engine *e) {
    if (m->train_head) return AGPT_OK;
    AGPT_CHECK_ARG(m->lm_head.dtype == DT_F32 && m->norm.dtype == DT_F32,
                   "training lm_head needs f32 weights (the store holds %s)", dtype_name(m->lm_head.dtype));
    const int64_t V = m->vocab, C = m->block.dim;
    AGPT_TRY(arena_init(&m->head_arena, e->device, padded((size_t)(V * C) * sizeof(float)) +
                                                       padded((size_t)C * sizeof(float))));
    AGPT_TRY(arena_tensor(&m->head_arena, DT_F32, 2, SHAPE(V, C), &m->d_lm_head));
    AGPT_TRY(arena_tensor(&m->head_arena, DT_F32, 1, SHAPE(C), &m->d_norm));
    m->train_head = true;
    AGPT_TRY(tensor_zero(&m->d_lm_head));
    return tensor_zero(&m->d_norm);
}

// ---------------------------------------------------------------------------------------------------------
// Training state

size_t llama_train_state_bytes(const LlamaLoraTrain *m, int B, int T) {
    size_t rows = (size_t)B * (size_t)T, C = (size_t)m->block.dim, V = (size_t)m->vocab, f = sizeof(float);
    return (size_t)m->layers * (llama_block_activation_bytes(&m->block, B, T) +
                                llama_block_lora_bytes(&m->block, m->rank, B, T))
           + llama_block_scratch_bytes(&m->block, B, T) + llama_block_lora_bytes(&m->block, m->rank, B, T)
           + 4 * padded(rows * C * f)                  // x0, final_n, d_n, d_x
           + 2 * padded(rows * f)                      // positions, final_rstd
           + 2 * padded(rows * V * f);                 // logits, d_logits
}

Status llama_train_state_create(LlamaTrainState *s, Engine *e, const LlamaLoraTrain *m, int B, int T) {
    memset(s, 0, sizeof *s);
    AGPT_CHECK_ARG(B > 0 && T > 0, "llama train: batch %d and tokens %d must be positive", B, T);
    AGPT_CHECK_ARG(m->layers > 0 && m->rank > 0, "llama train: the model is not loaded");
    const int64_t C = m->block.dim, V = m->vocab, rows = (int64_t)B * T;
    DType dt = m->embed.dtype;
    s->B = B;
    s->T = T;
    Status st = arena_init(&s->arena, e->device, llama_train_state_bytes(m, B, T));
    s->acts = calloc((size_t)m->layers, sizeof *s->acts);
    s->lora_acts = calloc((size_t)m->layers, sizeof *s->lora_acts);
    s->host_targets = malloc((size_t)rows * sizeof(int32_t));
    s->host_positions = malloc((size_t)rows * sizeof(int32_t));
    if (st == AGPT_OK && (!s->acts || !s->lora_acts || !s->host_targets || !s->host_positions))
        st = AGPT_FAIL(AGPT_ERR_OOM, "llama train: no host memory for %d layers' records and %lld labels",
                       m->layers, (long long)rows);
    Arena *a = &s->arena;
    for (int l = 0; st == AGPT_OK && l < m->layers; l++) {
        st = llama_block_acts_carve(&m->block, B, T, dt, a, &s->acts[l]);
        if (st == AGPT_OK) st = llama_block_lora_acts_carve(&m->block, m->rank, B, T, dt, a, &s->lora_acts[l]);
    }
    if (st == AGPT_OK) st = llama_block_scratch_carve(&m->block, B, T, dt, a, &s->scratch);
    if (st == AGPT_OK) st = llama_block_lora_scratch_carve(&m->block, m->rank, B, T, dt, a, &s->lora_scratch);
    if (st == AGPT_OK) st = arena_tensor(a, dt, 3, SHAPE(B, T, C), &s->x0);
    if (st == AGPT_OK) st = arena_tensor(a, DT_I32, 2, SHAPE(B, T), &s->positions);
    if (st == AGPT_OK) st = arena_tensor(a, dt, 3, SHAPE(B, T, C), &s->final_n);
    if (st == AGPT_OK) st = arena_tensor(a, DT_F32, 1, SHAPE(rows), &s->final_rstd);
    if (st == AGPT_OK) st = arena_tensor(a, dt, 3, SHAPE(B, T, V), &s->logits);
    if (st == AGPT_OK) st = arena_tensor(a, dt, 3, SHAPE(B, T, V), &s->d_logits);
    if (st == AGPT_OK) st = arena_tensor(a, dt, 3, SHAPE(B, T, C), &s->d_n);
    if (st == AGPT_OK) st = arena_tensor(a, dt, 3, SHAPE(B, T, C), &s->d_x);
    if (st == AGPT_OK) st = tensor_zero(&s->lora_scratch.d_norm);  // a sink, but keep it finite
    if (st == AGPT_OK) {
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) s->host_positions[b * T + t] = t;
        Tensor hp = tensor_2d(s->host_positions, DT_I32, DEV_CPU, B, T);
        st = engine_copy(e, &s->positions, &hp);
    }
    if (st != AGPT_OK) llama_train_state_free(s);
    return st;
}

void llama_train_state_free(LlamaTrainState *s) {
    arena_free(&s->arena);
    free(s->acts);
    free(s->lora_acts);
    free(s->host_targets);
    free(s->host_positions);
    memset(s, 0, sizeof *s);
}

// ---------------------------------------------------------------------------------------------------------
// Forward, loss, backward

// x0 -> L layers -> model.norm -> lm_head.
static Status forward_from_x0(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s) {
    s->have_dlogits = false;
    const Tensor *x = &s->x0;
    for (int l = 0; l < m->layers; l++) {
        AGPT_TRY(llama_block_lora_forward(e, &m->block, &m->layer[l], &m->lora[l], m->scaling, &s->acts[l],
                                          &s->lora_acts[l], x, &s->positions));
        x = &s->acts[l].out;
    }
    AGPT_TRY(op_rmsnorm(e, &s->final_n, &s->final_rstd, x, &m->norm, m->block.eps));
    return op_linear(e, &s->logits, &s->final_n, &m->lm_head, NULL);
}

Status llama_lora_train_forward(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s, const Tensor *embeds) {
    s->have_dlogits = false;  // even when refused: the old d logits belong to another forward
    char d[96];
    AGPT_CHECK_ARG(embeds->ndim == 3 && embeds->shape[0] == s->B && embeds->shape[1] == s->T &&
                   embeds->shape[2] == m->block.dim && embeds->dtype == s->x0.dtype,
                   "llama train: embeds %s, expected %s[%d,%d,%d] (the state was made for that)",
                   tensor_describe(embeds, d, sizeof d), dtype_name(s->x0.dtype), s->B, s->T, m->block.dim);
    AGPT_TRY(op_copy(e, &s->x0, embeds));
    return forward_from_x0(e, m, s);
}

Status llama_lora_train_forward_tokens(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s, const int32_t *ids) {
    s->have_dlogits = false;
    AGPT_CHECK_ARG(ids, "llama train: token ids are missing");
    const int64_t rows = (int64_t)s->B * s->T;
    Tensor tid = tensor_1d((void *)ids, DT_I32, DEV_CPU, rows);
    Tensor x0 = tensor_2d(s->x0.data, s->x0.dtype, s->x0.device, rows, m->block.dim);
    AGPT_TRY(op_embedding(e, &x0, &m->embed, &tid));
    return forward_from_x0(e, m, s);
}

// op_cross_entropy on the engine's device over all B*T rows with the shifted labels as targets (-100 ignored):
// the summed loss comes back (double on the CPU, per-row f32 summed in double on CUDA) and d logits =
// (softmax - onehot) / num_items is written in the same pass, zero on rows without a target.
Status llama_lora_train_loss(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s, const int32_t *labels,
                             int num_items, float *loss) {
    s->have_dlogits = false;
    AGPT_CHECK_ARG(labels, "llama train: labels are missing");
    const int B = s->B, T = s->T, V = m->vocab;
    int targets = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int32_t y = labels[b * T + t];
            AGPT_CHECK_ARG(y == -100 || (y >= 0 && y < V), "llama train: labels[%d][%d] = %d is neither -100 nor a "
                           "token id in [0,%d)", b, t, (int)y, V);
            if (t > 0 && y != -100) targets++;  // labels[:, 0] is never a target after the shift
            if (t > 0) s->host_targets[b * T + t - 1] = y;
        }
    for (int b = 0; b < B; b++) s->host_targets[b * T + T - 1] = -100;  // the last position predicts nothing
    const double denom = num_items > 0 ? (double)num_items : (double)targets;
    // With no target every row is ignored: the loss and d logits are 0 whatever the scale.
    const float grad_scale = denom > 0 ? (float)(1.0 / denom) : 0.0f;
    Tensor tt = tensor_1d(s->host_targets, DT_I32, DEV_CPU, (int64_t)B * T);
    Tensor lg = tensor_2d(s->logits.data, s->logits.dtype, s->logits.device, (int64_t)B * T, V);
    Tensor dl = tensor_2d(s->d_logits.data, s->d_logits.dtype, s->d_logits.device, (int64_t)B * T, V);
    double total = 0;
    AGPT_TRY(op_cross_entropy(e, &total, &dl, &lg, &tt, -100, grad_scale));
    if (!isfinite(total))
        return AGPT_FAIL(AGPT_ERR_ARG, "llama train: the loss is %g: some target row's logits are not finite (the "
                         "forward diverged)", total);
    s->n_targets = targets;
    s->loss = denom > 0 ? (float)(total / denom) : 0.0f;
    if (loss) *loss = s->loss;
    s->have_dlogits = true;
    return AGPT_OK;
}

Status llama_lora_train_backward(Engine *e, LlamaLoraTrain *m, LlamaTrainState *s, bool train_lora) {
    AGPT_CHECK_ARG(s->have_dlogits, "llama train: backward without a loss of the last forward (call "
                   "llama_lora_train_loss first)");
    const int L = m->layers;
    const Tensor *x_last = &s->acts[L - 1].out;
    AGPT_TRY(op_linear_backward(e, &s->d_n, m->train_head ? &m->d_lm_head : NULL, NULL, &s->d_logits, &s->final_n,
                                &m->lm_head));
    // A frozen model.norm's weight gradient goes to the LoRA scratch's sink.
    AGPT_TRY(op_rmsnorm_backward(e, &s->d_x, m->train_head ? &m->d_norm : &s->lora_scratch.d_norm, &s->d_n, x_last,
                                 &m->norm, &s->final_rstd));
    for (int l = L - 1; l >= 0; l--) {
        const Tensor *x = l > 0 ? &s->acts[l - 1].out : &s->x0;
        AGPT_TRY(llama_block_lora_backward(e, &m->block, &m->layer[l], &m->lora[l], m->scaling,
                                           train_lora ? &m->grad[l] : NULL, &s->acts[l], &s->lora_acts[l],
                                           &s->scratch, &s->lora_scratch, x, &s->positions, &s->d_x, &s->d_x));
    }
    return AGPT_OK;
}
