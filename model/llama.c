#include "model/llama.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "runtime/log.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

static size_t padded(size_t bytes) { return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN; }


// ---------------------------------------------------------------------------------------------------------
// Loading and the LoRA merge

static const char *const LORA_FORMS[] = {
    "base_model.model.model.layers.%d.self_attn.%s.lora_%s.weight",
    "base_model.model.model.layers.%d.self_attn.%s.lora_%s.default.weight",
    "llama_model.base_model.model.model.layers.%d.self_attn.%s.lora_%s.default.weight",
    "model.layers.%d.self_attn.%s.lora_%s.weight",
};
#define N_LORA_FORMS (int)(sizeof LORA_FORMS / sizeof LORA_FORMS[0])

void llama_lora_name(char *buf, size_t size, int form, int layer, const char *proj, const char *ab) {
    snprintf(buf, size, LORA_FORMS[form], layer, proj, ab);
}

int llama_lora_form(const WeightStore *w) {
    char name[256];
    for (int f = 0; f < N_LORA_FORMS; f++) {
        llama_lora_name(name, sizeof name, f, 0, "q_proj", "A");
        if (weights_has(w, name)) return f;
    }
    return -1;
}

// Host f32 [rows, cols] in the store's dtype, uploaded into an arena tensor on the engine's device.
static Status upload_to_arena(Engine *e, Arena *arena, DType dt, const float *host, int64_t rows, int64_t cols,
                              void *staging, Tensor *out) {
    AGPT_TRY(arena_tensor(arena, dt, 2, SHAPE(rows, cols), out));
    size_t n = (size_t)(rows * cols);
    if (convert_host(staging, dt, host, DT_F32, n) != 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "cannot convert LoRA factors to %s", dtype_name(dt));
    Tensor h = tensor_2d(staging, dt, DEV_CPU, rows, cols);
    return engine_copy(e, out, &h);
}

// W += (alpha / r) * B @ A for one projection, computed on the device by op_matmul (fp32 accumulation).
static Status merge_one(Engine *e, WeightStore *w, int form, int layer, const char *proj, Tensor *W, float alpha,
                        Arena *arena, void *staging, int *rank) {
    char na[256], nb[256];
    llama_lora_name(na, sizeof na, form, layer, proj, "A");
    llama_lora_name(nb, sizeof nb, form, layer, proj, "B");
    float *A = NULL, *B = NULL;
    int nda = 0, ndb = 0;
    int64_t sa[8], sb[8];
    Status s = weights_read_f32(w, na, &A, &nda, sa);
    if (s == AGPT_OK) s = weights_read_f32(w, nb, &B, &ndb, sb);
    if (s != AGPT_OK) {
        mem_host_free(A);
        return agpt_add_context(s, "%s: LoRA factors for layer 0 were found, so every q/k/v/o needs them",
                                w->file_name);
    }
    int64_t out_dim = W->shape[0], in_dim = W->shape[1];
    if (nda != 2 || ndb != 2 || sa[1] != in_dim || sb[0] != out_dim || sb[1] != sa[0] || sa[0] < 1 ||
        sa[0] > in_dim) {
        mem_host_free(A), mem_host_free(B);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: LoRA '%s' [%lld,%lld] and '%s' [%lld,%lld] do not fit a [%lld,%lld] "
                         "weight: want A [r,%lld] and B [%lld,r]", w->file_name, na, (long long)sa[0],
                         (long long)(nda > 1 ? sa[1] : 0), nb, (long long)sb[0], (long long)(ndb > 1 ? sb[1] : 0),
                         (long long)out_dim, (long long)in_dim, (long long)in_dim, (long long)out_dim);
    }
    int r = (int)sa[0];
    if (*rank == 0) *rank = r;
    if (r != *rank) {
        mem_host_free(A), mem_host_free(B);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: LoRA '%s' has rank %d but layer 0's q_proj has rank %d (one alpha/r "
                         "scaling for all is assumed)", w->file_name, na, r, *rank);
    }
    size_t mark = arena_mark(arena);
    Tensor ta, tb;
    s = upload_to_arena(e, arena, w->dtype, A, r, in_dim, staging, &ta);
    if (s == AGPT_OK) s = upload_to_arena(e, arena, w->dtype, B, out_dim, r, staging, &tb);
    mem_host_free(A), mem_host_free(B);
    // A bf16/f16 matrix on the CPU (weights_set_matrix_dtype): merged in an f32 copy, then rounded once.
    Tensor Wf = *W;
    size_t n = (size_t)(out_dim * in_dim);
    if (s == AGPT_OK && W->dtype != w->dtype) {
        Wf.dtype = w->dtype, Wf.data = NULL;
        s = mem_host_alloc(n * dtype_size(w->dtype), &Wf.data);
        if (s == AGPT_OK) convert_host(Wf.data, Wf.dtype, W->data, W->dtype, n);
    }
    if (s == AGPT_OK) s = op_matmul(e, &Wf, &tb, &ta, NULL, false, false, alpha / (float)r, 1.0f);
    if (s == AGPT_OK) s = engine_synchronize(e);  // before the arena's next upload overwrites A and B
    if (Wf.data != W->data) {
        if (s == AGPT_OK) convert_host(W->data, W->dtype, Wf.data, Wf.dtype, n);
        mem_host_free(Wf.data);
    }
    arena_reset_to(arena, mark);
    return s;
}

static Status merge_lora(Llama *m, WeightStore *w) {
    m->lora_rank = 0;
    int form = llama_lora_form(w);
    char name[256];
    if (form < 0) return AGPT_OK;  // no LoRA: the base weights as they are
    llama_lora_name(name, sizeof name, form, 0, "q_proj", "A");
    int r0 = (int)weights_dim(w, name, 0);
    if (r0 < 1) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: LoRA '%s' has no rank", w->file_name, name);
    float alpha = 0;
    AGPT_TRY(weights_meta_float(w, "lora.alpha", (float)r0, &alpha));
    Engine *e = w->engine;
    int64_t C = m->block.dim;
    size_t elems = (size_t)r0 * (size_t)C;  // every projection is [C,C]; a larger rank is refused in merge_one
    Arena arena = {0};
    void *staging = NULL;
    Status s = arena_init(&arena, e->device, 2 * padded(elems * sizeof(float)) + 4 * AGPT_ALIGN);
    if (s == AGPT_OK) s = mem_host_alloc(elems * sizeof(float), &staging);
    static const char *const PROJ[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    int rank = r0;
    for (int l = 0; s == AGPT_OK && l < m->layers; l++) {
        Tensor *W[4] = {&m->layer[l].wq, &m->layer[l].wk, &m->layer[l].wv, &m->layer[l].wo};
        for (int p = 0; s == AGPT_OK && p < 4; p++)
            s = merge_one(e, w, form, l, PROJ[p], W[p], alpha, &arena, staging, &rank);
    }
    mem_host_free(staging);
    arena_free(&arena);
    AGPT_TRY(s);
    m->lora_rank = rank;
    m->lora_alpha = alpha;
    LOG_D("llama: merged LoRA rank %d, alpha %g (scaling %g) into q,k,v,o of %d layers", rank, (double)alpha,
          (double)(alpha / rank), m->layers);
    return AGPT_OK;
}

Status llama_config_read(const WeightStore *w, LlamaBlockConfig *block, int *layers, int *vocab) {
    const char *emb = "model.embed_tokens.weight";
    int64_t V = weights_dim(w, emb, 0), C = weights_dim(w, emb, 1);
    int64_t I = weights_dim(w, "model.layers.0.mlp.gate_proj.weight", 0);
    if (V < 1 || C < 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor '%s' is missing; is this a LLaMA model file (HF names)?",
                         w->file_name, emb);
    if (V > INT_MAX / 2 || C > 1 << 20 || I > 1 << 22)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: LLaMA sizes %lld x %lld (MLP %lld) are beyond what agpt handles",
                         w->file_name, (long long)V, (long long)C, (long long)I);
    if (I < 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: tensor 'model.layers.0.mlp.gate_proj.weight' is missing; no LLaMA "
                         "layers in this file", w->file_name);
    int n = 0;
    for (char name[128];; n++) {
        snprintf(name, sizeof name, "model.layers.%d.self_attn.q_proj.weight", n);
        if (!weights_has(w, name)) break;
    }
    int heads;
    float eps = 0, base = 0;
    AGPT_TRY(weights_meta_int(w, "llama.heads", 32, &heads));
    AGPT_TRY(weights_meta_float(w, "llama.rms_eps", 1e-6f, &eps));
    AGPT_TRY(weights_meta_float(w, "llama.rope_base", 10000.0f, &base));
    *block = (LlamaBlockConfig){.dim = (int)C, .heads = heads, .hidden = (int)I, .eps = eps, .rope_base = base};
    Status s = llama_block_config_check(block);
    if (s != AGPT_OK) return agpt_add_context(s, "%s: LLaMA config from the shapes and metadata llama.heads",
                                              w->file_name);
    if (n < 1) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no LLaMA layers (model.layers.0...)", w->file_name);
    *layers = n;
    *vocab = (int)V;
    return AGPT_OK;
}

Status llama_load(Llama *m, WeightStore *w) {
    memset(m, 0, sizeof *m);
    int layers, vocab;
    AGPT_TRY(llama_config_read(w, &m->block, &layers, &vocab));
    const char *emb = "model.embed_tokens.weight";
    int64_t V = vocab, C = m->block.dim, I = m->block.hidden;
    Status s;
    m->layers = layers;
    m->vocab = vocab;
    m->layer = calloc((size_t)layers, sizeof *m->layer);
    if (!m->layer) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d layer records", layers);

    s = weights_load(w, emb, 2, SHAPE(V, C), &m->embed);
    for (int l = 0; s == AGPT_OK && l < layers; l++) {
        LlamaBlockWeights *b = &m->layer[l];
        const char *p = "model.layers";
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b->input_norm, "%s.%d.input_layernorm.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, C), &b->wq, "%s.%d.self_attn.q_proj.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, C), &b->wk, "%s.%d.self_attn.k_proj.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, C), &b->wv, "%s.%d.self_attn.v_proj.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, C), &b->wo, "%s.%d.self_attn.o_proj.weight", p, l);
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b->post_norm, "%s.%d.post_attention_layernorm.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(I, C), &b->w_gate, "%s.%d.mlp.gate_proj.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(I, C), &b->w_up, "%s.%d.mlp.up_proj.weight", p, l);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, I), &b->w_down, "%s.%d.mlp.down_proj.weight", p, l);
    }
    if (s == AGPT_OK) s = weights_load(w, "model.norm.weight", 1, SHAPE(C), &m->norm);
    if (s == AGPT_OK) s = weights_load_matrix(w, "lm_head.weight", 2, SHAPE(V, C), &m->lm_head);
    if (s == AGPT_OK) s = merge_lora(m, w);
    if (s != AGPT_OK) {
        llama_free(m);
        return s;
    }
    LOG_D("llama: dim %d, %d heads, %d layers, MLP %d, vocab %d, LoRA rank %d", m->block.dim, m->block.heads, layers,
          m->block.hidden, m->vocab, m->lora_rank);
    return AGPT_OK;
}

void llama_free(Llama *m) {
    free(m->layer);
    memset(m, 0, sizeof *m);
}

// ---------------------------------------------------------------------------------------------------------
// The KV cache

size_t kv_cache_bytes(const Llama *m, int max_batch, int max_seq) {
    size_t rows = (size_t)max_batch * (size_t)max_seq, C = (size_t)m->block.dim, I = (size_t)m->block.hidden;
    size_t f = sizeof(float);  // sized for f32, so f16/bf16 fit too
    return 2 * (size_t)m->layers * padded(rows * C * f)  // k, v
           + 5 * padded(rows * C * f)                     // x, n, q, att, tmp
           + 3 * padded(rows * I * f)                     // gate, up, act
           + padded((size_t)max_batch * C * f)            // last
           + padded(rows * sizeof(int32_t))               // positions
           + padded(3 * (size_t)max_batch * sizeof(int32_t))  // step: tokens, positions, lengths
           + padded((size_t)max_batch * (size_t)m->vocab * f);  // logits
}

void kv_cache_drop_graphs(KvCache *c) {
    if (c->graphs)
        for (int b = 0; b < c->max_batch; b++) engine_graph_destroy(&c->graphs[b]);
    c->graph_exec = NULL;
    c->graph_key[0] = c->graph_key[1] = c->graph_key[2] = NULL;
}

void kv_cache_free(KvCache *c) {
    kv_cache_drop_graphs(c);
    free(c->graphs);
    mem_host_free(c->host_step);
    arena_free(&c->arena);
    free(c->k);
    free(c->v);
    free(c->seq_pos);
    mem_host_free(c->host_positions);
    mem_host_free(c->host_logits);
    mem_host_free(c->host_raw);
    memset(c, 0, sizeof *c);
}

Status kv_cache_create(KvCache *c, Engine *e, const Llama *m, int max_batch, int max_seq) {
    memset(c, 0, sizeof *c);
    AGPT_CHECK_ARG(max_batch >= 1 && max_seq >= 1, "kv_cache_create: max_batch %d and max_seq %d must be >= 1",
                   max_batch, max_seq);
    c->max_batch = max_batch, c->max_seq = max_seq;
    c->dtype = m->embed.dtype;
    int64_t rows = (int64_t)max_batch * max_seq, C = m->block.dim, I = m->block.hidden, V = m->vocab;
    DType dt = c->dtype;
    Status s = arena_init(&c->arena, e->device, kv_cache_bytes(m, max_batch, max_seq));
    if (s != AGPT_OK) {
        s = agpt_add_context(s, "KV cache for %d sequences of %d tokens (%d layers, dim %d)", max_batch, max_seq,
                             m->layers, m->block.dim);
        kv_cache_free(c);
        return s;
    }
    c->k = calloc((size_t)m->layers, sizeof(Tensor));
    c->v = calloc((size_t)m->layers, sizeof(Tensor));
    c->seq_pos = calloc((size_t)max_batch, sizeof(int));
    c->graphs = calloc((size_t)max_batch, sizeof(void *));
    if (!c->k || !c->v || !c->seq_pos || !c->graphs)
        s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d layer records", m->layers);
    for (int l = 0; s == AGPT_OK && l < m->layers; l++) {
        s = arena_tensor(&c->arena, dt, 2, SHAPE(rows, C), &c->k[l]);
        if (s == AGPT_OK) s = arena_tensor(&c->arena, dt, 2, SHAPE(rows, C), &c->v[l]);
    }
    Tensor *rc[5] = {&c->x, &c->n, &c->q, &c->att, &c->tmp};
    for (int i = 0; s == AGPT_OK && i < 5; i++) s = arena_tensor(&c->arena, dt, 2, SHAPE(rows, C), rc[i]);
    Tensor *ri[3] = {&c->gate, &c->up, &c->act};
    for (int i = 0; s == AGPT_OK && i < 3; i++) s = arena_tensor(&c->arena, dt, 2, SHAPE(rows, I), ri[i]);
    if (s == AGPT_OK) s = arena_tensor(&c->arena, dt, 2, SHAPE(max_batch, C), &c->last);
    if (s == AGPT_OK) s = arena_tensor(&c->arena, DT_I32, 1, SHAPE(rows), &c->positions);
    if (s == AGPT_OK) s = arena_tensor(&c->arena, DT_I32, 1, SHAPE(3 * (int64_t)max_batch), &c->step);
    if (s == AGPT_OK) s = mem_host_alloc(3 * (size_t)max_batch * sizeof(int32_t), (void **)&c->host_step);
    if (s == AGPT_OK) s = arena_tensor(&c->arena, dt, 2, SHAPE(max_batch, V), &c->logits);
    if (s == AGPT_OK) s = mem_host_alloc((size_t)rows * sizeof(int32_t), (void **)&c->host_positions);
    if (s == AGPT_OK) s = mem_host_alloc((size_t)(max_batch * V) * sizeof(float), (void **)&c->host_logits);
    if (s == AGPT_OK) s = mem_host_alloc((size_t)(max_batch * V) * dtype_size(dt), &c->host_raw);
    if (s != AGPT_OK) kv_cache_free(c);
    return s;
}

// ---------------------------------------------------------------------------------------------------------
// The forward pass over the cache

static Tensor rows_of(const Tensor *t, int64_t row0, int64_t n) { return tensor_rows_view(t, row0, n); }
static Tensor as4(const Tensor *t, int64_t B, int64_t T, int H, int D) {
    return tensor_4d(t->data, t->dtype, t->device, B, T, H, D);
}

static Status forward_ops(Engine *e, const Llama *m, KvCache *c, const int *lens, int Tn, int64_t rows,
                          const Tensor *positions_all, Tensor *logits);

// Runs the tokens already in c->x through every layer: lens[b] tokens of sequence b (Tn each when lens is NULL)
// at rows off_b.. (off_b the sum of the lengths before it, packed; equal lengths give rows b*Tn + t), at
// positions c->seq_pos[b].., appending their keys and values to the cache, and writes the logits of each
// sequence's last token to logits [batch, V]. (Decode steps with KvCache.use_graph take decode_device_state.)
// The rest of layer l once the attention output is in att: o_proj, x += it with the post-attention RMSNorm in
// one pass, the SwiGLU MLP, and x += its output fused with the next layer's input RMSNorm into n (the last layer
// only adds). Exactly op_add then op_rmsnorm in each fused step. tmp, gate, up, act are scratch.
static Status layer_tail(Engine *e, const Llama *m, int l, Tensor *x, Tensor *n, const Tensor *att, Tensor *tmp,
                         Tensor *gate, Tensor *up, Tensor *act) {
    const LlamaBlockWeights *w = &m->layer[l];
    AGPT_TRY(op_linear(e, tmp, att, &w->wo, NULL));
    AGPT_TRY(op_add_rmsnorm(e, x, n, NULL, x, tmp, &w->post_norm, m->block.eps));
    AGPT_TRY(op_linear(e, gate, n, &w->w_gate, NULL));
    AGPT_TRY(op_linear(e, up, n, &w->w_up, NULL));
    AGPT_TRY(op_swiglu(e, act, gate, up));
    AGPT_TRY(op_linear(e, tmp, act, &w->w_down, NULL));
    if (l + 1 < m->layers) return op_add_rmsnorm(e, x, n, NULL, x, tmp, &m->layer[l + 1].input_norm, m->block.eps);
    return op_add(e, x, x, tmp);
}

static Status forward_tokens(Engine *e, const Llama *m, KvCache *c, const int *lens, int Tn, Tensor *logits) {
    int64_t rows = 0;
    for (int b = 0; b < c->batch; b++)
        for (int t = 0; t < (lens ? lens[b] : Tn); t++) c->host_positions[rows++] = c->seq_pos[b] + t;
    Tensor hp = tensor_1d(c->host_positions, DT_I32, DEV_CPU, rows);
    Tensor positions = tensor_1d(c->positions.data, DT_I32, e->device, rows);
    AGPT_TRY(engine_copy(e, &positions, &hp));
    return forward_ops(e, m, c, lens, Tn, rows, &positions, logits);
}

// forward_tokens' ops, from the positions on the device; nothing here synchronises or copies from the host.
static Status forward_ops(Engine *e, const Llama *m, KvCache *c, const int *lens, int Tn, int64_t rows,
                          const Tensor *positions_all, Tensor *logits) {
#define LEN(b) (lens ? lens[b] : Tn)
    const int B = c->batch, C = m->block.dim, H = m->block.heads, D = C / H;
    const int64_t maxT = c->max_seq;
    const float scale = 1.0f / sqrtf((float)D);
    const Tensor positions = *positions_all;

    Tensor x = rows_of(&c->x, 0, rows), n = rows_of(&c->n, 0, rows), q = rows_of(&c->q, 0, rows);
    Tensor att = rows_of(&c->att, 0, rows), tmp = rows_of(&c->tmp, 0, rows);
    Tensor gate = rows_of(&c->gate, 0, rows), up = rows_of(&c->up, 0, rows), act = rows_of(&c->act, 0, rows);
    Tensor q4 = as4(&q, 1, rows, H, D);  // RoPE is per token: one row of `rows` tokens, each at its position
    for (int l = 0; l < m->layers; l++) {
        const LlamaBlockWeights *w = &m->layer[l];
        // attention: q for all sequences at once; k, v straight into each sequence's cache rows. Layers after
        // the first got n = RMSNorm(x) from the previous layer's fused closing add.
        if (l == 0) AGPT_TRY(op_rmsnorm(e, &n, NULL, &x, &w->input_norm, m->block.eps));
        AGPT_TRY(op_linear(e, &q, &n, &w->wq, NULL));
        AGPT_TRY(op_rope(e, &q4, &q4, &positions, m->block.rope_base));
        for (int b = 0, off = 0; b < B; off += LEN(b), b++) {
            const int Tb = LEN(b), pos = c->seq_pos[b];
            Tensor nb = rows_of(&n, off, Tb);
            Tensor kb = rows_of(&c->k[l], b * maxT + pos, Tb), vb = rows_of(&c->v[l], b * maxT + pos, Tb);
            Tensor kb4 = as4(&kb, 1, Tb, H, D);
            Tensor pb = tensor_2d((int32_t *)c->positions.data + off, DT_I32, e->device, 1, Tb);
            AGPT_TRY(op_linear(e, &kb, &nb, &w->wk, NULL));
            AGPT_TRY(op_linear(e, &vb, &nb, &w->wv, NULL));
            AGPT_TRY(op_rope(e, &kb4, &kb4, &pb, m->block.rope_base));
        }
        for (int b = 0, off = 0; b < B; off += LEN(b), b++) {
            // causal with the offset Tk - Tq = pos: query t sees the sequence's keys 0..pos+t
            const int Tb = LEN(b), pos = c->seq_pos[b];
            Tensor qb = rows_of(&q, off, Tb), ab = rows_of(&att, off, Tb);
            Tensor kall = rows_of(&c->k[l], b * maxT, pos + Tb), vall = rows_of(&c->v[l], b * maxT, pos + Tb);
            Tensor qb4 = as4(&qb, 1, Tb, H, D), ab4 = as4(&ab, 1, Tb, H, D);
            Tensor k4 = as4(&kall, 1, pos + Tb, H, D), v4 = as4(&vall, 1, pos + Tb, H, D);
            AGPT_TRY(op_attention(e, &ab4, &qb4, &k4, &v4, true, scale));
        }
        AGPT_TRY(layer_tail(e, m, l, &x, &n, &att, &tmp, &gate, &up, &act));
    }
    c->pos = 0;
    for (int b = 0; b < B; b++) {
        c->seq_pos[b] += LEN(b);
        if (c->seq_pos[b] > c->pos) c->pos = c->seq_pos[b];
    }
    // Final norm and lm_head on each sequence's last token only.
    Tensor last = rows_of(&c->last, 0, B);
    for (int b = 0, off = 0; b < B; off += LEN(b), b++) {
        Tensor xb = rows_of(&x, off + LEN(b) - 1, 1), lb = rows_of(&last, b, 1);
        AGPT_TRY(op_rmsnorm(e, &lb, NULL, &xb, &m->norm, m->block.eps));
    }
    return op_linear(e, logits, &last, &m->lm_head, NULL);
#undef LEN
}

// Empties the cache (a failed pass leaves it half-written: it must not be extended).
static void cache_reset(KvCache *c) {
    c->batch = 0, c->pos = 0;
    for (int b = 0; b < c->max_batch; b++) c->seq_pos[b] = 0;
}

// forward_tokens with Tn tokens for each of the cache's sequences.
static Status forward_equal(Engine *e, const Llama *m, KvCache *c, int Tn, Tensor *logits) {
    Status s = forward_tokens(e, m, c, NULL, Tn, logits);
    if (s != AGPT_OK) cache_reset(c);
    return s;
}

static Status check_logits(const Llama *m, const KvCache *c, const Tensor *logits, int B, const char *fn) {
    char d[96];
    AGPT_CHECK_ARG(logits->ndim == 2 && logits->shape[0] == B && logits->shape[1] == m->vocab &&
                   logits->dtype == c->dtype, "%s: logits %s, expected %s[%d,%d]", fn,
                   tensor_describe(logits, d, sizeof d), dtype_name(c->dtype), B, m->vocab);
    return AGPT_OK;
}

Status llama_prefill(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, Tensor *logits_last) {
    char d[96];
    AGPT_CHECK_ARG(embeds->ndim == 3 && embeds->shape[2] == m->block.dim && embeds->dtype == c->dtype &&
                   embeds->device == e->device, "llama_prefill: embeds %s, expected %s[B,T,%d] on %s",
                   tensor_describe(embeds, d, sizeof d), dtype_name(c->dtype), m->block.dim, device_name(e->device));
    int B = (int)embeds->shape[0], T = (int)embeds->shape[1];
    AGPT_CHECK_ARG(B >= 1 && B <= c->max_batch && T >= 1 && T <= c->max_seq, "llama_prefill: %d sequences of %d "
                   "tokens, but the cache holds up to %d of up to %d", B, T, c->max_batch, c->max_seq);
    AGPT_TRY(check_logits(m, c, logits_last, B, "llama_prefill"));
    cache_reset(c);
    c->batch = B;
    Tensor x = rows_of(&c->x, 0, (int64_t)B * T);
    Status s = engine_copy(e, &x, embeds);
    if (s != AGPT_OK) {
        cache_reset(c);
        return s;
    }
    return forward_equal(e, m, c, T, logits_last);
}

Status llama_prefill_varlen(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, const int *lengths, int B,
                            Tensor *logits_last) {
    char d[96];
    AGPT_CHECK_ARG(lengths && B >= 1 && B <= c->max_batch, "llama_prefill_varlen: %d sequences, but the cache holds "
                   "up to %d", B, c->max_batch);
    int64_t total = 0;
    for (int b = 0; b < B; b++) {
        AGPT_CHECK_ARG(lengths[b] >= 1 && lengths[b] <= c->max_seq, "llama_prefill_varlen: sequence %d has %d "
                       "tokens; each needs 1 to %d (the cache's max_seq)", b, lengths[b], c->max_seq);
        total += lengths[b];
    }
    AGPT_CHECK_ARG(embeds->ndim == 2 && embeds->shape[0] == total && embeds->shape[1] == m->block.dim &&
                   embeds->dtype == c->dtype && embeds->device == e->device,
                   "llama_prefill_varlen: embeds %s, expected %s[%lld,%d] (the lengths' sum, packed) on %s",
                   tensor_describe(embeds, d, sizeof d), dtype_name(c->dtype), (long long)total, m->block.dim,
                   device_name(e->device));
    AGPT_TRY(check_logits(m, c, logits_last, B, "llama_prefill_varlen"));
    cache_reset(c);
    c->batch = B;
    Tensor x = rows_of(&c->x, 0, total);
    Status s = engine_copy(e, &x, embeds);
    if (s == AGPT_OK) s = forward_tokens(e, m, c, lengths, 0, logits_last);
    if (s != AGPT_OK) cache_reset(c);
    return s;
}

Status llama_extend(Engine *e, const Llama *m, KvCache *c, int keep, const Tensor *embeds, Tensor *logits_last) {
    char d[96];
    AGPT_CHECK_ARG(c->batch == 1 && keep >= 1 && keep <= c->pos, "llama_extend: keep %d of %d cached positions of "
                   "one sequence (the cache holds %d)", keep, c->pos, c->batch);
    AGPT_CHECK_ARG(embeds->ndim == 3 && embeds->shape[0] == 1 && embeds->shape[2] == m->block.dim &&
                   embeds->dtype == c->dtype && embeds->device == e->device,
                   "llama_extend: embeds %s, expected %s[1,T,%d] on %s", tensor_describe(embeds, d, sizeof d),
                   dtype_name(c->dtype), m->block.dim, device_name(e->device));
    int T = (int)embeds->shape[1];
    AGPT_CHECK_ARG(T >= 1 && keep + T <= c->max_seq, "llama_extend: %d cached + %d new positions exceed the cache "
                   "of %d", keep, T, c->max_seq);
    AGPT_TRY(check_logits(m, c, logits_last, 1, "llama_extend"));
    c->pos = c->seq_pos[0] = keep;  // the positions after `keep` are overwritten
    Tensor x = rows_of(&c->x, 0, T);
    AGPT_TRY(engine_copy(e, &x, embeds));
    return forward_equal(e, m, c, T, logits_last);
}

Status llama_embed_tokens(Engine *e, const Llama *m, const int32_t *ids, int n, Tensor *out) {
    char d[96];
    AGPT_CHECK_ARG(n >= 1 && tensor_numel(out) == (int64_t)n * m->block.dim && out->dtype == m->embed.dtype &&
                   out->device == e->device, "llama_embed_tokens: out %s, expected %s with %d x %d elements on %s",
                   tensor_describe(out, d, sizeof d), dtype_name(m->embed.dtype), n, m->block.dim,
                   device_name(e->device));
    for (int i = 0; i < n; i++)
        AGPT_CHECK_ARG(ids[i] >= 0 && ids[i] < m->vocab, "llama_embed_tokens: token id %d (at %d) is outside the "
                       "vocabulary of %d", ids[i], i, m->vocab);
    Tensor flat = tensor_2d(out->data, out->dtype, out->device, n, m->block.dim);
    Tensor id = tensor_1d((void *)ids, DT_I32, DEV_CPU, n);  // host ids: op_embedding stages them itself
    return op_embedding(e, &flat, &m->embed, &id);
}

// ---------------------------------------------------------------------------------------------------------
// Decode steps over device-side state (KvCache.use_graph): nothing below depends on the position on the host.

// One decode step's ops for the cache's B sequences, reading tokens, positions and lengths from c->step. The
// same ops as forward_ops with Tn = 1, except that each sequence's key and value rows are projected into
// scratch rows (att and tmp, free until the attention) and appended to the cache at the device positions, and
// the attention reads the lengths. Nothing here synchronises, allocates or copies from the host.
static Status decode_ops(Engine *e, const Llama *m, KvCache *c, Tensor *logits) {
    const int B = c->batch, C = m->block.dim, H = m->block.heads, D = C / H;
    const int64_t maxT = c->max_seq;
    const float scale = 1.0f / sqrtf((float)D);
    int32_t *st = (int32_t *)c->step.data;
    Tensor tok = tensor_1d(st, DT_I32, e->device, B), pos = tensor_1d(st + c->max_batch, DT_I32, e->device, B);
    Tensor len = tensor_1d(st + 2 * c->max_batch, DT_I32, e->device, B);

    Tensor x = rows_of(&c->x, 0, B), n = rows_of(&c->n, 0, B), q = rows_of(&c->q, 0, B);
    Tensor att = rows_of(&c->att, 0, B), tmp = rows_of(&c->tmp, 0, B);
    Tensor gate = rows_of(&c->gate, 0, B), up = rows_of(&c->up, 0, B), act = rows_of(&c->act, 0, B);
    Tensor kt = rows_of(&c->att, 0, B), vt = rows_of(&c->tmp, 0, B);  // the new keys and values
    Tensor q4 = as4(&q, 1, B, H, D), kt4 = as4(&kt, 1, B, H, D);      // RoPE per token, positions [B]
    Tensor qd = as4(&q, B, 1, H, D), ad = as4(&att, B, 1, H, D);      // attention: one query per sequence
    AGPT_TRY(op_embedding_dev(e, &x, &m->embed, &tok));
    for (int l = 0; l < m->layers; l++) {
        const LlamaBlockWeights *w = &m->layer[l];
        if (l == 0) AGPT_TRY(op_rmsnorm(e, &n, NULL, &x, &w->input_norm, m->block.eps));
        AGPT_TRY(op_linear(e, &q, &n, &w->wq, NULL));
        AGPT_TRY(op_rope(e, &q4, &q4, &pos, m->block.rope_base));
        for (int b = 0; b < B; b++) {  // one row at a time, as forward_ops does: the same GEMMs, the same bits
            Tensor nb = rows_of(&n, b, 1), kb = rows_of(&kt, b, 1), vb = rows_of(&vt, b, 1);
            AGPT_TRY(op_linear(e, &kb, &nb, &w->wk, NULL));
            AGPT_TRY(op_linear(e, &vb, &nb, &w->wv, NULL));
        }
        AGPT_TRY(op_rope(e, &kt4, &kt4, &pos, m->block.rope_base));
        AGPT_TRY(op_kv_append(e, &c->k[l], &kt, &pos, maxT));
        AGPT_TRY(op_kv_append(e, &c->v[l], &vt, &pos, maxT));
        Tensor kc = tensor_4d(c->k[l].data, c->k[l].dtype, e->device, B, maxT, H, D);
        Tensor vc = tensor_4d(c->v[l].data, c->v[l].dtype, e->device, B, maxT, H, D);
        AGPT_TRY(op_attention_decode(e, &ad, &qd, &kc, &vc, &len, scale));
        AGPT_TRY(layer_tail(e, m, l, &x, &n, &att, &tmp, &gate, &up, &act));
    }
    Tensor last = rows_of(&c->last, 0, B);
    for (int b = 0; b < B; b++) {
        Tensor xb = rows_of(&x, b, 1), lb = rows_of(&last, b, 1);
        AGPT_TRY(op_rmsnorm(e, &lb, NULL, &xb, &m->norm, m->block.eps));
    }
    return op_linear(e, logits, &last, &m->lm_head, NULL);
}

// Uploads the step's tokens, positions and lengths, then runs decode_ops: directly on the CPU; on CUDA as the
// batch size's graph, captured on its first step (into c->logits, copied out when the caller's tensor differs).
static Status decode_device_state(Engine *e, const Llama *m, KvCache *c, const int32_t *tokens, Tensor *logits) {
    const int B = c->batch, MB = c->max_batch;
    for (int b = 0; b < B; b++) {
        AGPT_CHECK_ARG(tokens[b] >= 0 && tokens[b] < m->vocab, "llama_decode_step: token id %d (sequence %d) is "
                       "outside the vocabulary of %d", tokens[b], b, m->vocab);
        c->host_step[b] = tokens[b];
        c->host_step[MB + b] = c->seq_pos[b];
        c->host_step[2 * MB + b] = c->seq_pos[b] + 1;
    }
    Status s = engine_memcpy_async(e, c->step.data, c->host_step, 3 * (size_t)MB * sizeof(int32_t));
    if (s == AGPT_OK && e->device != DEV_CUDA) s = decode_ops(e, m, c, logits);
    if (s == AGPT_OK && e->device == DEV_CUDA) {
        const void *key[3] = {m, m->embed.data, e->workspace};
        if (memcmp(key, c->graph_key, sizeof key) != 0) {
            kv_cache_drop_graphs(c);
            memcpy(c->graph_key, key, sizeof key);
        }
        Tensor lg = rows_of(&c->logits, 0, B);
        void **g = &c->graphs[B - 1];
        if (!*g) {
            s = engine_graph_begin(e);
            if (s == AGPT_OK) {
                s = decode_ops(e, m, c, &lg);
                if (s != AGPT_OK) engine_graph_abort(e);
                else s = engine_graph_end(e, g);
            }
        }
        if (s == AGPT_OK) s = engine_graph_launch(e, *g);
        if (s == AGPT_OK) c->graph_exec = *g;
        if (s == AGPT_OK && logits->data != lg.data)
            s = engine_memcpy_async(e, logits->data, lg.data, (size_t)B * (size_t)m->vocab * dtype_size(c->dtype));
    }
    if (s != AGPT_OK) {
        cache_reset(c);
        return s;
    }
    c->pos = 0;
    for (int b = 0; b < B; b++) {
        c->seq_pos[b]++;
        if (c->seq_pos[b] > c->pos) c->pos = c->seq_pos[b];
    }
    return AGPT_OK;
}

Status llama_decode_step(Engine *e, const Llama *m, KvCache *c, const int32_t *tokens, Tensor *logits) {
    AGPT_CHECK_ARG(c->batch >= 1, "llama_decode_step: the cache is empty: run llama_prefill first");
    AGPT_CHECK_ARG(c->pos < c->max_seq, "llama_decode_step: the cache is full (%d positions); size it for the "
                   "prompt plus the tokens to generate", c->max_seq);
    AGPT_TRY(check_logits(m, c, logits, c->batch, "llama_decode_step"));
    if (c->use_graph) return decode_device_state(e, m, c, tokens, logits);
    Tensor x = rows_of(&c->x, 0, c->batch);
    AGPT_TRY(llama_embed_tokens(e, m, tokens, c->batch, &x));
    Status s = forward_tokens(e, m, c, NULL, 1, logits);
    if (s != AGPT_OK) cache_reset(c);
    return s;
}

// The first index of the largest value, as torch.argmax.
static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

Status llama_generate_greedy(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, int max_new,
                             const int32_t *stop_ids, int n_stop, int32_t *out_ids, int *n_out) {
    static const int32_t default_stops[2] = {LLAMA_STOP_HASHES, LLAMA_EOS};
    *n_out = 0;
    char d[96];
    AGPT_CHECK_ARG(embeds->ndim == 3 && embeds->shape[0] == 1, "llama_generate_greedy: embeds %s: one sequence "
                   "[1,T,C] at a time", tensor_describe(embeds, d, sizeof d));
    AGPT_CHECK_ARG(max_new >= 1, "llama_generate_greedy: max_new %d must be >= 1", max_new);
    AGPT_CHECK_ARG(embeds->shape[1] + max_new - 1 <= c->max_seq, "llama_generate_greedy: %lld prompt positions "
                   "plus %d new tokens need a cache of %lld positions; it has %d", (long long)embeds->shape[1],
                   max_new, (long long)(embeds->shape[1] + max_new - 1), c->max_seq);
    if (!stop_ids) stop_ids = default_stops, n_stop = 2;
    Tensor logits = rows_of(&c->logits, 0, 1);
    Tensor host = tensor_2d(c->host_raw, c->dtype, DEV_CPU, 1, m->vocab);
    AGPT_TRY(llama_prefill(e, m, c, embeds, &logits));
    for (;;) {
        AGPT_TRY(engine_copy(e, &host, &logits));
        convert_host(c->host_logits, DT_F32, c->host_raw, c->dtype, (size_t)m->vocab);
        int32_t tok = argmax(c->host_logits, m->vocab);
        out_ids[(*n_out)++] = tok;
        bool stop = *n_out >= max_new;
        for (int i = 0; i < n_stop; i++) stop = stop || tok == stop_ids[i];
        if (stop) return AGPT_OK;
        AGPT_TRY(llama_decode_step(e, m, c, &tok, &logits));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Random weights at any size, for benchmarks (agpt bench llama): the same structures as a loaded model, without
// a file. One pool of standard normals, as large as the largest tensor plus a margin, is drawn once; each
// tensor is a window of it at a random offset, scaled (1/sqrt(fan_in) for the projections, 0.02 for the
// embeddings, 1 + 0.02 x for the norms). Drawing 7B normals would take longer than the benchmark itself.

Status llama_init_random(Llama *m, WeightStore *w, int hidden, int heads, int intermediate, int layers, int vocab,
                         uint64_t seed) {
    memset(m, 0, sizeof *m);
    m->block = (LlamaBlockConfig){.dim = hidden, .heads = heads, .hidden = intermediate, .eps = 1e-6f,
                                  .rope_base = 10000.0f};
    AGPT_TRY(llama_block_config_check(&m->block));
    AGPT_CHECK_ARG(layers >= 1 && vocab >= 1, "llama_init_random: %d layers and vocab %d must be >= 1", layers,
                   vocab);
    m->layers = layers, m->vocab = vocab;
    const int64_t C = hidden, I = intermediate, V = vocab;
    size_t biggest = (size_t)(V * C > I * C ? V * C : I * C), margin = 1 << 20;
    float *pool = NULL, *buf = NULL;
    Rng rng;
    rng_seed(&rng, seed);
    Status s = mem_host_alloc((biggest + margin) * sizeof(float), (void **)&pool);
    if (s == AGPT_OK) s = mem_host_alloc(biggest * sizeof(float), (void **)&buf);
    if (s == AGPT_OK) {
        rng_fill_normal(&rng, pool, biggest + margin, 0.0f, 1.0f);
        m->layer = calloc((size_t)layers, sizeof *m->layer);
        if (!m->layer) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d layer records", layers);
    }
#define RANDOM_AS(upload, scale, offset, out, ...)                                                              \
    do {                                                                                                        \
        if (s != AGPT_OK) break;                                                                                \
        const int64_t shape_[] = {__VA_ARGS__};                                                                 \
        int nd_ = (int)(sizeof shape_ / sizeof shape_[0]);                                                      \
        size_t n_ = 1;                                                                                          \
        for (int d_ = 0; d_ < nd_; d_++) n_ *= (size_t)shape_[d_];                                              \
        const float *src_ = pool + rng_u64(&rng) % (biggest + margin - n_ + 1);                                 \
        for (size_t i_ = 0; i_ < n_; i_++) buf[i_] = (offset) + (scale) * src_[i_];                             \
        s = upload(w, buf, nd_, shape_, (out));                                                                 \
    } while (0)
#define RANDOM(...) RANDOM_AS(weights_upload, __VA_ARGS__)
#define RANDOM_MATRIX(...) RANDOM_AS(weights_upload_matrix, __VA_ARGS__)  // an op_linear weight
    const float wc = 1.0f / sqrtf((float)C), wi = 1.0f / sqrtf((float)I);
    RANDOM(0.02f, 0.0f, &m->embed, V, C);
    for (int l = 0; l < layers; l++) {
        LlamaBlockWeights *b = &m->layer[l];
        RANDOM(0.02f, 1.0f, &b->input_norm, C);
        RANDOM_MATRIX(wc, 0.0f, &b->wq, C, C);
        RANDOM_MATRIX(wc, 0.0f, &b->wk, C, C);
        RANDOM_MATRIX(wc, 0.0f, &b->wv, C, C);
        RANDOM_MATRIX(wc, 0.0f, &b->wo, C, C);
        RANDOM(0.02f, 1.0f, &b->post_norm, C);
        RANDOM_MATRIX(wc, 0.0f, &b->w_gate, I, C);
        RANDOM_MATRIX(wc, 0.0f, &b->w_up, I, C);
        RANDOM_MATRIX(wi, 0.0f, &b->w_down, C, I);
    }
    RANDOM(0.02f, 1.0f, &m->norm, C);
    RANDOM_MATRIX(wc, 0.0f, &m->lm_head, V, C);
#undef RANDOM
#undef RANDOM_MATRIX
#undef RANDOM_AS
    mem_host_free(pool);
    mem_host_free(buf);
    if (s != AGPT_OK) llama_free(m);
    return s;
}
