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

Status llama_block_forward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockActs *a,
                           const Tensor *x, const Tensor *positions) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_TRY(check_btc(c, a, x, "x"));
    const int B = a->B, T = a->T, C = c->dim;
    const float scale = 1.0f / sqrtf((float)(C / c->heads));

    // attention branch
    AGPT_TRY(op_rmsnorm(e, &a->n1, &a->n1_rstd, x, &w->input_norm, c->eps));
    Tensor q = btc(&a->q, B, T, C), k = btc(&a->k, B, T, C), v = btc(&a->v, B, T, C);
    AGPT_TRY(op_linear(e, &q, &a->n1, &w->wq, NULL));
    AGPT_TRY(op_linear(e, &k, &a->n1, &w->wk, NULL));
    AGPT_TRY(op_linear(e, &v, &a->n1, &w->wv, NULL));
    AGPT_TRY(op_rope(e, &a->q, &a->q, positions, c->rope_base));  // in place: only the rotated q, k are kept
    AGPT_TRY(op_rope(e, &a->k, &a->k, positions, c->rope_base));
    AGPT_TRY(op_attention(e, &a->att, &a->q, &a->k, &a->v, true, scale));
    Tensor att = btc(&a->att, B, T, C);
    AGPT_TRY(op_linear(e, &a->h, &att, &w->wo, NULL));
    AGPT_TRY(op_add(e, &a->h, &a->h, x));

    // MLP branch
    AGPT_TRY(op_rmsnorm(e, &a->n2, &a->n2_rstd, &a->h, &w->post_norm, c->eps));
    AGPT_TRY(op_linear(e, &a->gate, &a->n2, &w->w_gate, NULL));
    AGPT_TRY(op_linear(e, &a->up, &a->n2, &w->w_up, NULL));
    AGPT_TRY(op_swiglu(e, &a->swiglu, &a->gate, &a->up));
    AGPT_TRY(op_linear(e, &a->out, &a->swiglu, &w->w_down, NULL));
    AGPT_TRY(op_add(e, &a->out, &a->out, &a->h));
    return AGPT_OK;
}

Status llama_block_backward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockWeights *g,
                            const LlamaBlockActs *a, LlamaBlockScratch *s, const Tensor *x,
                            const Tensor *positions, const Tensor *dout, Tensor *dx) {
    AGPT_TRY(llama_block_config_check(c));
    AGPT_TRY(check_btc(c, a, x, "x"));
    AGPT_TRY(check_btc(c, a, dout, "dout"));
    AGPT_TRY(check_btc(c, a, dx, "dx"));
    const int B = a->B, T = a->T, C = c->dim;
    const float scale = 1.0f / sqrtf((float)(C / c->heads));

    // MLP branch: out = h + down(silu(gate(n2)) * up(n2)), n2 = RMSNorm(h)
    AGPT_TRY(op_linear_backward(e, &s->d_swiglu, &g->w_down, NULL, dout, &a->swiglu, &w->w_down));
    AGPT_TRY(op_swiglu_backward(e, &s->d_gate, &s->d_up, &s->d_swiglu, &a->gate, &a->up));
    AGPT_TRY(op_linear_backward(e, &s->d_n, &g->w_gate, NULL, &s->d_gate, &a->n2, &w->w_gate));
    AGPT_TRY(op_linear_backward(e, &s->d_tmp, &g->w_up, NULL, &s->d_up, &a->n2, &w->w_up));
    AGPT_TRY(op_add(e, &s->d_n, &s->d_n, &s->d_tmp));
    AGPT_TRY(op_rmsnorm_backward(e, &s->d_h, &g->post_norm, &s->d_n, &a->h, &w->post_norm, &a->n2_rstd));
    AGPT_TRY(op_add(e, &s->d_h, &s->d_h, dout));  // plus the residual path

    // attention branch: h = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1))), n1 = RMSNorm(x)
    Tensor att = btc(&a->att, B, T, C), d_att = btc(&s->d_att, B, T, C);
    AGPT_TRY(op_linear_backward(e, &d_att, &g->wo, NULL, &s->d_h, &att, &w->wo));
    AGPT_TRY(op_attention_backward(e, &s->d_q, &s->d_k, &s->d_v, &s->d_att, &a->q, &a->k, &a->v, true, scale));
    // d n1 = dq_pre Wq + dk_pre Wk + dv Wv, where RoPE's backward rotates dq, dk back by -angle.
    Tensor d_pre = btc(&s->d_qk_pre, B, T, C);
    AGPT_TRY(op_rope_backward(e, &s->d_qk_pre, &s->d_q, positions, c->rope_base));
    AGPT_TRY(op_linear_backward(e, &s->d_n, &g->wq, NULL, &d_pre, &a->n1, &w->wq));
    AGPT_TRY(op_rope_backward(e, &s->d_qk_pre, &s->d_k, positions, c->rope_base));
    AGPT_TRY(op_linear_backward(e, &s->d_tmp, &g->wk, NULL, &d_pre, &a->n1, &w->wk));
    AGPT_TRY(op_add(e, &s->d_n, &s->d_n, &s->d_tmp));
    Tensor d_v = btc(&s->d_v, B, T, C);
    AGPT_TRY(op_linear_backward(e, &s->d_tmp, &g->wv, NULL, &d_v, &a->n1, &w->wv));
    AGPT_TRY(op_add(e, &s->d_n, &s->d_n, &s->d_tmp));
    AGPT_TRY(op_rmsnorm_backward(e, &s->d_tmp, &g->input_norm, &s->d_n, x, &w->input_norm, &a->n1_rstd));
    // dout is not read after this point, so dx may alias it.
    AGPT_TRY(op_add(e, dx, &s->d_tmp, &s->d_h));
    return AGPT_OK;
}
