#include "model/vit_block.h"

#include <math.h>

#include "kernels/ops.h"

// Activations take the dtype the caller asks for (the weights' dtype: f32 on the CPU, f16/bf16 on the GPU);
// LayerNorm statistics stay f32.
static size_t aligned_bytes(int64_t numel, DType dt) {
    size_t bytes = (size_t)numel * dtype_size(dt);
    return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN;
}

// A [B,T,n] view of a tensor laid out as [B,T,...] (e.g. q [B,T,H,D] seen as [B,T,C]).
static Tensor btc(const Tensor *t, int B, int T, int64_t n) { return tensor_3d(t->data, t->dtype, t->device, B, T, n); }

// Row block i (of 3) of the packed in_proj: the q, k or v part. Rows of a row-major matrix, and elements of
// a vector, are contiguous, so these are plain views and q, k, v each come out contiguous [B,T,H,D].
static Tensor in_proj_w_part(const Tensor *w, int i, int C) { return tensor_rows_view(w, (int64_t)i * C, C); }
static Tensor in_proj_b_part(const Tensor *b, int i, int C) {
    Tensor as_rows = tensor_2d(b->data, b->dtype, b->device, 3, C);
    Tensor row = tensor_rows_view(&as_rows, i, 1);
    return tensor_1d(row.data, b->dtype, b->device, C);
}

Status vit_block_config_check(const VitBlockConfig *c) {
    AGPT_CHECK_ARG(c->dim > 0 && c->heads > 0 && c->mlp_hidden > 0, "vit block: dim %d, heads %d, mlp_hidden %d "
                   "must all be positive", c->dim, c->heads, c->mlp_hidden);
    AGPT_CHECK_ARG(c->dim % c->heads == 0, "vit block: dim %d is not divisible by heads %d", c->dim, c->heads);
    AGPT_CHECK_ARG(c->eps > 0, "vit block: LayerNorm eps must be > 0 (got %g)", (double)c->eps);
    return AGPT_OK;
}

size_t vit_block_activation_bytes(const VitBlockConfig *c, int B, int T) {
    int64_t rows = (int64_t)B * T, C = c->dim, F = c->mlp_hidden;
    // Sized for f32, the widest activation dtype, so the same number also fits f16/bf16 runs.
    size_t n = 0;
    n += aligned_bytes(rows * C, DT_F32);       // ln1
    n += 2 * aligned_bytes(rows, DT_F32);       // ln1_mean, ln1_rstd
    n += 4 * aligned_bytes(rows * C, DT_F32);   // q, k, v, att
    n += 2 * aligned_bytes(rows * C, DT_F32);   // res1, ln2
    n += 2 * aligned_bytes(rows, DT_F32);       // ln2_mean, ln2_rstd
    n += 2 * aligned_bytes(rows * F, DT_F32);   // fc1, gelu
    n += aligned_bytes(rows * C, DT_F32);       // out
    return n;
}

size_t vit_block_scratch_bytes(const VitBlockConfig *c, int B, int T) {
    int64_t rows = (int64_t)B * T, C = c->dim, F = c->mlp_hidden;
    return 7 * aligned_bytes(rows * C, DT_F32)    // d_ln, d_res1, d_att, d_q, d_k, d_v, d_tmp
           + 2 * aligned_bytes(rows * F, DT_F32);  // d_gelu, d_fc1
}

Status vit_block_acts_carve(const VitBlockConfig *c, int B, int T, DType dt, Arena *arena, VitBlockActs *a) {
    AGPT_TRY(vit_block_config_check(c));
    AGPT_CHECK_ARG(B > 0 && T > 0, "vit block: batch %d and tokens %d must be positive", B, T);
    const int64_t C = c->dim, H = c->heads, D = C / H, F = c->mlp_hidden, rows = (int64_t)B * T;
    AGPT_CHECK_ARG(dtype_is_float(dt), "vit block: activations must be f32, f16 or bf16 (got %s)", dtype_name(dt));
    size_t before = arena->used;
    a->B = B;
    a->T = T;
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->ln1));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, (int64_t[]){rows}, &a->ln1_mean));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, (int64_t[]){rows}, &a->ln1_rstd));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->q));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->k));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->v));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &a->att));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->res1));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->ln2));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, (int64_t[]){rows}, &a->ln2_mean));
    AGPT_TRY(arena_tensor(arena, DT_F32, 1, (int64_t[]){rows}, &a->ln2_rstd));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, F}, &a->fc1));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, F}, &a->gelu));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &a->out));
    // The size function and this list must agree, or a trunk's arena would be sized wrong.
    if (arena->used - before > vit_block_activation_bytes(c, B, T))
        return AGPT_FAIL(AGPT_ERR_ARG, "vit block: carved %zu activation bytes but vit_block_activation_bytes says "
                         "%zu (a bug: keep the two in step)", arena->used - before,
                         vit_block_activation_bytes(c, B, T));
    return AGPT_OK;
}

Status vit_block_scratch_carve(const VitBlockConfig *c, int B, int T, DType dt, Arena *arena,
                               VitBlockScratch *s) {
    AGPT_TRY(vit_block_config_check(c));
    AGPT_CHECK_ARG(B > 0 && T > 0, "vit block: batch %d and tokens %d must be positive", B, T);
    const int64_t C = c->dim, H = c->heads, D = C / H, F = c->mlp_hidden;
    AGPT_CHECK_ARG(dtype_is_float(dt), "vit block: activations must be f32, f16 or bf16 (got %s)", dtype_name(dt));
    size_t before = arena->used;
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_ln));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_res1));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_att));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_q));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_k));
    AGPT_TRY(arena_tensor(arena, dt, 4, (int64_t[]){B, T, H, D}, &s->d_v));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, C}, &s->d_tmp));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, F}, &s->d_gelu));
    AGPT_TRY(arena_tensor(arena, dt, 3, (int64_t[]){B, T, F}, &s->d_fc1));
    if (arena->used - before > vit_block_scratch_bytes(c, B, T))
        return AGPT_FAIL(AGPT_ERR_ARG, "vit block: carved %zu scratch bytes but vit_block_scratch_bytes says %zu",
                         arena->used - before, vit_block_scratch_bytes(c, B, T));
    return AGPT_OK;
}

static Status check_x(const VitBlockConfig *c, const VitBlockActs *a, const Tensor *x, const char *what) {
    char d[96];
    AGPT_CHECK_ARG(x->ndim == 3 && x->shape[0] == a->B && x->shape[1] == a->T && x->shape[2] == c->dim,
                   "vit block: %s is %s, expected [%d,%d,%d] (the activations were carved for that)", what,
                   tensor_describe(x, d, sizeof d), a->B, a->T, c->dim);
    return AGPT_OK;
}

Status vit_block_forward(Engine *e, const VitBlockConfig *c, const VitBlockWeights *w, VitBlockActs *a,
                         const Tensor *x) {
    AGPT_TRY(vit_block_config_check(c));
    AGPT_TRY(check_x(c, a, x, "x"));
    const int B = a->B, T = a->T, C = c->dim;
    const float scale = 1.0f / sqrtf((float)(C / c->heads));

    // attention branch: q, k, v from the three row blocks of the packed in_proj
    AGPT_TRY(op_layernorm(e, &a->ln1, &a->ln1_mean, &a->ln1_rstd, x, &w->norm_1_w, &w->norm_1_b, c->eps));
    Tensor *qkv[3] = {&a->q, &a->k, &a->v};
    for (int i = 0; i < 3; i++) {
        Tensor wi = in_proj_w_part(&w->in_proj_w, i, C), bi = in_proj_b_part(&w->in_proj_b, i, C);
        Tensor out = btc(qkv[i], B, T, C);
        AGPT_TRY(op_linear(e, &out, &a->ln1, &wi, &bi));
    }
    AGPT_TRY(op_attention(e, &a->att, &a->q, &a->k, &a->v, c->causal, scale));
    Tensor att = btc(&a->att, B, T, C);
    AGPT_TRY(op_linear(e, &a->res1, &att, &w->out_proj_w, &w->out_proj_b));
    // res1 += x, then the MLP branch's LN2 of it: one fused pass (exactly op_add then op_layernorm)
    AGPT_TRY(op_add_layernorm(e, &a->res1, &a->ln2, &a->ln2_mean, &a->ln2_rstd, &a->res1, x, &w->norm_2_w,
                              &w->norm_2_b, c->eps));

    // MLP branch
    AGPT_TRY(op_linear(e, &a->fc1, &a->ln2, &w->fc1_w, &w->fc1_b));
    AGPT_TRY(op_gelu(e, &a->gelu, &a->fc1));
    AGPT_TRY(op_linear(e, &a->out, &a->gelu, &w->fc2_w, &w->fc2_b));
    AGPT_TRY(op_add(e, &a->out, &a->out, &a->res1));
    return AGPT_OK;
}

Status vit_block_backward(Engine *e, const VitBlockConfig *c, const VitBlockWeights *w, VitBlockWeights *g,
                          const VitBlockActs *a, VitBlockScratch *s, const Tensor *x, const Tensor *dout,
                          Tensor *dx) {
    AGPT_TRY(vit_block_config_check(c));
    AGPT_TRY(check_x(c, a, x, "x"));
    AGPT_TRY(check_x(c, a, dout, "dout"));
    AGPT_TRY(check_x(c, a, dx, "dx"));
    const int B = a->B, T = a->T, C = c->dim;
    const float scale = 1.0f / sqrtf((float)(C / c->heads));

    // MLP branch: out = res1 + fc2(gelu(fc1(LN2(res1))))
    AGPT_TRY(op_linear_backward(e, &s->d_gelu, &g->fc2_w, &g->fc2_b, dout, &a->gelu, &w->fc2_w));
    AGPT_TRY(op_gelu_backward(e, &s->d_fc1, &s->d_gelu, &a->fc1));
    AGPT_TRY(op_linear_backward(e, &s->d_ln, &g->fc1_w, &g->fc1_b, &s->d_fc1, &a->ln2, &w->fc1_w));
    AGPT_TRY(op_layernorm_backward(e, &s->d_res1, &g->norm_2_w, &g->norm_2_b, &s->d_ln, &a->res1, &w->norm_2_w,
                                   &a->ln2_mean, &a->ln2_rstd));
    AGPT_TRY(op_add(e, &s->d_res1, &s->d_res1, dout));  // plus the residual path

    // attention branch: res1 = x + out_proj(attention(q, k, v)), q|k|v = LN1(x) in_proj^T + in_proj_b
    Tensor att = btc(&a->att, B, T, C);
    AGPT_TRY(op_linear_backward(e, &s->d_att, &g->out_proj_w, &g->out_proj_b, &s->d_res1, &att, &w->out_proj_w));
    Tensor d_att = tensor_4d(s->d_att.data, s->d_att.dtype, s->d_att.device, B, T, a->att.shape[2], a->att.shape[3]);
    AGPT_TRY(op_attention_backward(e, &s->d_q, &s->d_k, &s->d_v, &d_att, &a->q, &a->k, &a->v, c->causal, scale));
    // d LN1 = dq Wq + dk Wk + dv Wv; each op_linear_backward overwrites its dx, so sum the three by hand.
    Tensor *dqkv[3] = {&s->d_q, &s->d_k, &s->d_v};
    for (int i = 0; i < 3; i++) {
        Tensor wi = in_proj_w_part(&w->in_proj_w, i, C);
        Tensor gwi = in_proj_w_part(&g->in_proj_w, i, C), gbi = in_proj_b_part(&g->in_proj_b, i, C);
        Tensor d_out = btc(dqkv[i], B, T, C);
        Tensor *d_in = (i == 0) ? &s->d_ln : &s->d_tmp;
        AGPT_TRY(op_linear_backward(e, d_in, &gwi, &gbi, &d_out, &a->ln1, &wi));
        if (i > 0) AGPT_TRY(op_add(e, &s->d_ln, &s->d_ln, &s->d_tmp));
    }
    AGPT_TRY(op_layernorm_backward(e, &s->d_tmp, &g->norm_1_w, &g->norm_1_b, &s->d_ln, x, &w->norm_1_w,
                                   &a->ln1_mean, &a->ln1_rstd));
    // dout is not read after this point, so dx may alias it.
    AGPT_TRY(op_add(e, dx, &s->d_tmp, &s->d_res1));
    return AGPT_OK;
}
