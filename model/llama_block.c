#include "model/llama_block.h"

#include <math.h>

#include "kernels/ops.h"

static size_t aligned_bytes(int64_t numel, DType dt) {
    size_t bytes = (size_t)numel * dtype_size(dt);
    return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN;
}

// A [B,T,n] view of a tensor laid out as [B,T,...] (e.g. q [B,T,H,D] seen as [B,T,C]).
static Tensor btc(const Tensor *t, int B, int T, int64_t n) { return tensor_3d(t->data, t->dtype, t->device, B, T, n); }

Status llama_block_config_check(const LlamaBlockConfig *c) {
    AGPT_CHECK_ARG(c->dim > 0 && c->heads > 0 && c->hidden > 0, "llama block: dim %d, heads %d, hidden %d must all "
                   "be positive", c->dim, c->heads, c->hidden);
    AGPT_CHECK_ARG(c->dim % c->heads == 0 && (c->dim / c->heads) % 2 == 0, "llama block: dim %d over %d heads "
                   "must give an even head dim (RoPE rotates pairs)", c->dim, c->heads);
    AGPT_CHECK_ARG(c->eps > 0 && c->rope_base > 0, "llama block: eps %g and rope_base %g must be > 0",
                   (double)c->eps, (double)c->rope_base);
    return AGPT_OK;
}

size_t llama_block_activation_bytes(const LlamaBlockConfig *c, int B, int T) {
    int64_t rows = (int64_t)B * T, C = c->dim, I = c->hidden;
    size_t n = 0;
    n += aligned_bytes(rows * C, DT_F32);      // n1
    n += aligned_bytes(rows, DT_F32);          // n1_rstd
    n += 4 * aligned_bytes(rows * C, DT_F32);  // q, k, v, att
    n += 2 * aligned_bytes(rows * C, DT_F32);  // h, n2
    n += aligned_bytes(rows, DT_F32);          // n2_rstd
    n += 3 * aligned_bytes(rows * I, DT_F32);  // gate, up, swiglu
    n += aligned_bytes(rows * C, DT_F32);      // out
    return n;
}

size_t llama_block_scratch_bytes(const LlamaBlockConfig *c, int B, int T) {
    int64_t rows = (int64_t)B * T, C = c->dim, I = c->hidden;
    return 8 * aligned_bytes(rows * C, DT_F32)     // d_n, d_h, d_att, d_q, d_k, d_v, d_qk_pre, d_tmp
           + 3 * aligned_bytes(rows * I, DT_F32);  // d_swiglu, d_gate, d_up
}

Status llama_block_acts_carve(const LlamaBlockConfig *c, int B, int T, DType dt, Arena *arena, LlamaBlockActs *a) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_CHECK_ARG(B > 0 && T > 0, "llama block: batch %d and tokens %d must be positive", B, T);
    AGPT_CHECK_ARG(dtype_is_float(dt), "llama block: activations must be f32, f16 or bf16 (got %s)", dtype_name(dt));
    const int64_t C = c->dim, H = c->heads, D = C / H, I = c->hidden, rows = (int64_t)B * T;
    size_t before = arena->used;
    a->B = B;
    a->T = T;
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->n1));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, (int64_t[]){rows}, &a->n1_rstd));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->q));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->k));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->v));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->att));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->h));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->n2));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, (int64_t[]){rows}, &a->n2_rstd));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, I}, &a->gate));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, I}, &a->up));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, I}, &a->swiglu));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->out));
    // The size function and this list must agree, or a model's arena would be sized wrong.
    if (arena->used - before > llama_block_activation_bytes(c, B, T))
        return AGPT_FAIL(AGPT_ERR_ARG, "llama block: carved %zu activation bytes but llama_block_activation_bytes "
                         "says %zu (a bug: keep the two in step)", arena->used - before,
                         llama_block_activation_bytes(c, B, T));
    return AGPT_OK;
}

Status llama_block_scratch_carve(const LlamaBlockConfig *c, int B, int T, DType dt, Arena *arena,
                                 LlamaBlockScratch *s) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_CHECK_ARG(B > 0 && T > 0, "llama block: batch %d and tokens %d must be positive", B, T);
    AGPT_CHECK_ARG(dtype_is_float(dt), "llama block: activations must be f32, f16 or bf16 (got %s)", dtype_name(dt));
    const int64_t C = c->dim, H = c->heads, D = C / H, I = c->hidden;
    size_t before = arena->used;
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_n));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_h));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_att));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_q));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_k));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_v));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_qk_pre));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_tmp));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, I}, &s->d_swiglu));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, I}, &s->d_gate));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, I}, &s->d_up));
    if (arena->used - before > llama_block_scratch_bytes(c, B, T))
        return AGPT_FAIL(AGPT_ERR_ARG, "llama block: carved %zu scratch bytes but llama_block_scratch_bytes says %zu",
                         arena->used - before, llama_block_scratch_bytes(c, B, T));
    return AGPT_OK;
}

static Status check_btc(const LlamaBlockConfig *c, const LlamaBlockActs *a, const Tensor *x, const char *what) {
    char d[96];
    AGPT_CHECK_ARG(x->ndim == 3 && x->shape[0] == a->B && x->shape[1] == a->T && x->shape[2] == c->dim,
                   "llama block: %s is %s, expected [%d,%d,%d] (the activations were carved for that)", what,
                   tensor_describe(x, d, sizeof d), a->B, a->T, c->dim);
    return AGPT_OK;
}

// ---- LoRA kept apart ------------------------------------------------------------------------------------

size_t llama_block_lora_bytes(const LlamaBlockConfig *c, int rank, int B, int T) {
    int64_t rows = (int64_t)B * T;
    return (LLAMA_LORA_PROJ + 1) * aligned_bytes(rows * rank, DT_F32)  // u[4], d_u
           + aligned_bytes(c->dim, DT_F32);                           // d_norm
}

static Status lora_dims_check(const LlamaBlockConfig *c, int rank, int B, int T, DType dt) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_CHECK_ARG(B > 0 && T > 0, "llama block: batch %d and tokens %d must be positive", B, T);
    AGPT_CHECK_ARG(rank > 0 && rank <= c->dim, "llama block: LoRA rank %d must be in 1..%d", rank, c->dim);
    AGPT_CHECK_ARG(dtype_is_float(dt), "llama block: activations must be f32, f16 or bf16 (got %s)", dtype_name(dt));
    return AGPT_OK;
}

Status llama_block_lora_acts_carve(const LlamaBlockConfig *c, int rank, int B, int T, DType dt, Arena *arena,
                                   LlamaLoraActs *la) {
    AGPT_TRY(lora_dims_check(c, rank, B, T, dt));
    for (int p = 0; p < LLAMA_LORA_PROJ; p++)
        AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, rank}, &la->u[p]));
    return AGPT_OK;
}

Status llama_block_lora_scratch_carve(const LlamaBlockConfig *c, int rank, int B, int T, DType dt, Arena *arena,
                                      LlamaLoraScratch *ls) {
    AGPT_TRY(lora_dims_check(c, rank, B, T, dt));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, rank}, &ls->d_u));
    AGPT_TRY(arena_tensor(arena, dt, 1, (int64_t[]){c->dim}, &ls->d_norm));
    return AGPT_OK;
}

static Status lora_check(const LlamaBlockConfig *c, const LlamaBlockActs *a, const LlamaLoraWeights *lora,
                         const LlamaLoraActs *la, const char *what) {
    char d[96], d2[96];
    const Tensor *u = &la->u[0];
    AGPT_CHECK_ARG(u->ndim == 3 && u->shape[0] == a->B && u->shape[1] == a->T, "llama block: LoRA activations %s "
                   "for a [%d,%d] batch", tensor_describe(u, d, sizeof d), a->B, a->T);
    int64_t r = u->shape[2];
    for (int p = 0; p < LLAMA_LORA_PROJ; p++) {
        const Tensor *A = &lora->a[p], *B = &lora->b[p];
        AGPT_CHECK_ARG(A->ndim == 2 && A->shape[0] == r && A->shape[1] == c->dim && B->ndim == 2 &&
                       B->shape[0] == c->dim && B->shape[1] == r, "llama block: LoRA %s of projection %d: A %s, "
                       "B %s, expected [%lld,%d] and [%d,%lld]", what, p, tensor_describe(A, d, sizeof d),
                       tensor_describe(B, d2, sizeof d2), (long long)r, c->dim, c->dim, (long long)r);
    }
    return AGPT_OK;
}

// y += scaling * B (A x), saving u = A x. x, y: [B,T,C].
static Status lora_forward(Engine *e, const LlamaLoraWeights *lora, int p, float scaling, Tensor *u, Tensor *y,
                           const Tensor *x) {
    AGPT_TRY(op_linear(e, u, x, &lora->a[p], NULL));                                     // u = x A^T
    return op_matmul(e, y, u, &lora->b[p], NULL, false, true, scaling, 1.0f);            // y += s u B^T
}

// The LoRA part of one projection's backward: dx += d(A x) A, with d(A x) = scaling * dy B, and, when g is not
// NULL, dB += scaling * dy^T u and dA += d(A x)^T x. dy, x, dx: [B,T,C] (dx may not alias dy).
static Status lora_backward(Engine *e, const LlamaLoraWeights *lora, LlamaLoraWeights *g, int p, float scaling,
                            const Tensor *u, Tensor *d_u, const Tensor *dy, const Tensor *x, Tensor *dx) {
    const int64_t rows = tensor_rows(x), C = tensor_cols(x), r = u->shape[2];
    AGPT_TRY(op_matmul(e, d_u, dy, &lora->b[p], NULL, false, false, scaling, 0.0f));   // [B,T,r]
    if (g) {
        Tensor dy2 = tensor_2d(dy->data, dy->dtype, dy->device, rows, C);
        Tensor u2 = tensor_2d(u->data, u->dtype, u->device, rows, r);
        Tensor du2 = tensor_2d(d_u->data, d_u->dtype, d_u->device, rows, r);
        Tensor x2 = tensor_2d(x->data, x->dtype, x->device, rows, C);
        AGPT_TRY(op_matmul(e, &g->b[p], &dy2, &u2, NULL, true, false, scaling, 1.0f));  // [C,r]
        AGPT_TRY(op_matmul(e, &g->a[p], &du2, &x2, NULL, true, false, 1.0f, 1.0f));     // [r,C]
    }
    return op_matmul(e, dx, d_u, &lora->a[p], NULL, false, false, 1.0f, 1.0f);           // [B,T,C]
}

// The layer's forward, with LoRA when lora is not NULL. Without it this is exactly the plain layer.
static Status block_forward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w,
                            const LlamaLoraWeights *lora, float scaling, LlamaBlockActs *a, LlamaLoraActs *la,
                            const Tensor *x, const Tensor *positions) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_TRY(check_btc(c, a, x, "x"));
    if (lora) AGPT_TRY(lora_check(c, a, lora, la, "weights"));
    const int B = a->B, T = a->T, C = c->dim;
    const float scale = 1.0f / sqrtf((float)(C / c->heads));

    // attention branch
    AGPT_TRY(op_rmsnorm(e, &a->n1, &a->n1_rstd, x, &w->input_norm, c->eps));
    Tensor q = btc(&a->q, B, T, C), k = btc(&a->k, B, T, C), v = btc(&a->v, B, T, C);
    AGPT_TRY(op_linear(e, &q, &a->n1, &w->wq, NULL));
    AGPT_TRY(op_linear(e, &k, &a->n1, &w->wk, NULL));
    AGPT_TRY(op_linear(e, &v, &a->n1, &w->wv, NULL));
    if (lora) {
        AGPT_TRY(lora_forward(e, lora, LLAMA_LORA_Q, scaling, &la->u[LLAMA_LORA_Q], &q, &a->n1));
        AGPT_TRY(lora_forward(e, lora, LLAMA_LORA_K, scaling, &la->u[LLAMA_LORA_K], &k, &a->n1));
        AGPT_TRY(lora_forward(e, lora, LLAMA_LORA_V, scaling, &la->u[LLAMA_LORA_V], &v, &a->n1));
    }
    AGPT_TRY(op_rope(e, &a->q, &a->q, positions, c->rope_base));  // in place: only the rotated q, k are kept
    AGPT_TRY(op_rope(e, &a->k, &a->k, positions, c->rope_base));
    AGPT_TRY(op_attention(e, &a->att, &a->q, &a->k, &a->v, true, scale));
    Tensor att = btc(&a->att, B, T, C);
    AGPT_TRY(op_linear(e, &a->h, &att, &w->wo, NULL));
    if (lora) AGPT_TRY(lora_forward(e, lora, LLAMA_LORA_O, scaling, &la->u[LLAMA_LORA_O], &a->h, &att));
    // h += x, then the MLP branch's RMSNorm of it: one fused pass (exactly op_add then op_rmsnorm)
    AGPT_TRY(op_add_rmsnorm(e, &a->h, &a->n2, &a->n2_rstd, &a->h, x, &w->post_norm, c->eps));

    // MLP branch
    AGPT_TRY(op_linear(e, &a->gate, &a->n2, &w->w_gate, NULL));
    AGPT_TRY(op_linear(e, &a->up, &a->n2, &w->w_up, NULL));
    AGPT_TRY(op_swiglu(e, &a->swiglu, &a->gate, &a->up));
    AGPT_TRY(op_linear(e, &a->out, &a->swiglu, &w->w_down, NULL));
    AGPT_TRY(op_add(e, &a->out, &a->out, &a->h));
    return AGPT_OK;
}

Status llama_block_forward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockActs *a,
                           const Tensor *x, const Tensor *positions) {
    return block_forward(e, c, w, NULL, 0.0f, a, NULL, x, positions);
}

Status llama_block_lora_forward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w,
                                const LlamaLoraWeights *lora, float scaling, LlamaBlockActs *a, LlamaLoraActs *la,
                                const Tensor *x, const Tensor *positions) {
    AGPT_CHECK_ARG(lora && la, "llama_block_lora_forward: LoRA weights and activations are required");
    return block_forward(e, c, w, lora, scaling, a, la, x, positions);
}

// The layer's backward. g NULL: the base and norm weights are frozen (no gradient; the norms' go to ls->d_norm).
// lora not NULL: the LoRA branch's part of dx, and dA, dB into glora unless it is NULL.
static Status block_backward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockWeights *g,
                             const LlamaLoraWeights *lora, float scaling, LlamaLoraWeights *glora,
                             const LlamaBlockActs *a, const LlamaLoraActs *la, LlamaBlockScratch *s,
                             LlamaLoraScratch *ls, const Tensor *x, const Tensor *positions, const Tensor *dout,
                             Tensor *dx) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_TRY(check_btc(c, a, x, "x"));
    AGPT_TRY(check_btc(c, a, dout, "dout"));
    AGPT_TRY(check_btc(c, a, dx, "dx"));
    if (lora) AGPT_TRY(lora_check(c, a, lora, la, "weights"));
    if (lora && glora) AGPT_TRY(lora_check(c, a, glora, la, "gradients"));
    const int B = a->B, T = a->T, C = c->dim;
    const float scale = 1.0f / sqrtf((float)(C / c->heads));
    // Frozen weights: no dW (op_linear_backward skips a NULL one); the norms' always-written dw goes to a sink.
    Tensor *g_wq = g ? &g->wq : NULL, *g_wk = g ? &g->wk : NULL, *g_wv = g ? &g->wv : NULL, *g_wo = g ? &g->wo : NULL;
    Tensor *g_gate = g ? &g->w_gate : NULL, *g_up = g ? &g->w_up : NULL, *g_down = g ? &g->w_down : NULL;
    Tensor *g_in_norm = g ? &g->input_norm : &ls->d_norm, *g_post_norm = g ? &g->post_norm : &ls->d_norm;

    // MLP branch: out = h + down(silu(gate(n2)) * up(n2)), n2 = RMSNorm(h)
    AGPT_TRY(op_linear_backward(e, &s->d_swiglu, g_down, NULL, dout, &a->swiglu, &w->w_down));
    AGPT_TRY(op_swiglu_backward(e, &s->d_gate, &s->d_up, &s->d_swiglu, &a->gate, &a->up));
    AGPT_TRY(op_linear_backward(e, &s->d_n, g_gate, NULL, &s->d_gate, &a->n2, &w->w_gate));
    AGPT_TRY(op_linear_backward(e, &s->d_tmp, g_up, NULL, &s->d_up, &a->n2, &w->w_up));
    AGPT_TRY(op_add(e, &s->d_n, &s->d_n, &s->d_tmp));
    AGPT_TRY(op_rmsnorm_backward(e, &s->d_h, g_post_norm, &s->d_n, &a->h, &w->post_norm, &a->n2_rstd));
    AGPT_TRY(op_add(e, &s->d_h, &s->d_h, dout));  // plus the residual path

    // attention branch: h = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1))), n1 = RMSNorm(x)
    Tensor att = btc(&a->att, B, T, C), d_att = btc(&s->d_att, B, T, C);
    AGPT_TRY(op_linear_backward(e, &d_att, g_wo, NULL, &s->d_h, &att, &w->wo));
    if (lora)
        AGPT_TRY(lora_backward(e, lora, glora, LLAMA_LORA_O, scaling, &la->u[LLAMA_LORA_O], &ls->d_u, &s->d_h, &att,
                               &d_att));
    AGPT_TRY(op_attention_backward(e, &s->d_q, &s->d_k, &s->d_v, &s->d_att, &a->q, &a->k, &a->v, true, scale));
    // d n1 = dq_pre Wq + dk_pre Wk + dv Wv, where RoPE's backward rotates dq, dk back by -angle.
    Tensor d_pre = btc(&s->d_qk_pre, B, T, C);
    AGPT_TRY(op_rope_backward(e, &s->d_qk_pre, &s->d_q, positions, c->rope_base));
    AGPT_TRY(op_linear_backward(e, &s->d_n, g_wq, NULL, &d_pre, &a->n1, &w->wq));
    if (lora)
        AGPT_TRY(lora_backward(e, lora, glora, LLAMA_LORA_Q, scaling, &la->u[LLAMA_LORA_Q], &ls->d_u, &d_pre, &a->n1,
                               &s->d_n));
    AGPT_TRY(op_rope_backward(e, &s->d_qk_pre, &s->d_k, positions, c->rope_base));
    AGPT_TRY(op_linear_backward(e, &s->d_tmp, g_wk, NULL, &d_pre, &a->n1, &w->wk));
    if (lora)
        AGPT_TRY(lora_backward(e, lora, glora, LLAMA_LORA_K, scaling, &la->u[LLAMA_LORA_K], &ls->d_u, &d_pre, &a->n1,
                               &s->d_tmp));
    AGPT_TRY(op_add(e, &s->d_n, &s->d_n, &s->d_tmp));
    Tensor d_v = btc(&s->d_v, B, T, C);
    AGPT_TRY(op_linear_backward(e, &s->d_tmp, g_wv, NULL, &d_v, &a->n1, &w->wv));
    if (lora)
        AGPT_TRY(lora_backward(e, lora, glora, LLAMA_LORA_V, scaling, &la->u[LLAMA_LORA_V], &ls->d_u, &d_v, &a->n1,
                               &s->d_tmp));
    AGPT_TRY(op_add(e, &s->d_n, &s->d_n, &s->d_tmp));
    AGPT_TRY(op_rmsnorm_backward(e, &s->d_tmp, g_in_norm, &s->d_n, x, &w->input_norm, &a->n1_rstd));
    // dout is not read after this point, so dx may alias it.
    AGPT_TRY(op_add(e, dx, &s->d_tmp, &s->d_h));
    return AGPT_OK;
}

Status llama_block_backward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockWeights *g,
                            const LlamaBlockActs *a, LlamaBlockScratch *s, const Tensor *x,
                            const Tensor *positions, const Tensor *dout, Tensor *dx) {
    AGPT_CHECK_ARG(g, "llama_block_backward: the gradient struct is required (llama_block_lora_backward has the "
                   "frozen-weight form)");
    return block_backward(e, c, w, g, NULL, 0.0f, NULL, a, NULL, s, NULL, x, positions, dout, dx);
}

Status llama_block_lora_backward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w,
                                 const LlamaLoraWeights *lora, float scaling, LlamaLoraWeights *glora,
                                 const LlamaBlockActs *a, const LlamaLoraActs *la, LlamaBlockScratch *s,
                                 LlamaLoraScratch *ls, const Tensor *x, const Tensor *positions, const Tensor *dout,
                                 Tensor *dx) {
    AGPT_CHECK_ARG(lora && la && ls, "llama_block_lora_backward: LoRA weights, activations and scratch are required");
    return block_backward(e, c, w, NULL, lora, scaling, glora, a, la, s, ls, x, positions, dout, dx);
}
