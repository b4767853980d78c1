#include "model/vision_train.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

static size_t padded(size_t bytes) { return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN; }

Tensor *vit_block_tensor(VitBlockWeights *w, int i, const char **suffix) {
    static const char *const names[VIT_BLOCK_TENSORS] = {
        "norm_1.weight", "norm_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "norm_2.weight", "norm_2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias"};
    Tensor *t[VIT_BLOCK_TENSORS] = {&w->norm_1_w, &w->norm_1_b, &w->in_proj_w,  &w->in_proj_b,
                                    &w->out_proj_w, &w->out_proj_b, &w->norm_2_w, &w->norm_2_b,
                                    &w->fc1_w,    &w->fc1_b,    &w->fc2_w,      &w->fc2_b};
    if (i < 0 || i >= VIT_BLOCK_TENSORS) return NULL;
    if (suffix) *suffix = names[i];
    return t[i];
}

Status vision_train_acts_create(VisionTrainActs *a, Engine *e, const VisionEncoder *v, int B) {
    memset(a, 0, sizeof *a);
    const size_t C = (size_t)v->block.dim, T = (size_t)v->tokens, E = (size_t)v->embed, f = sizeof(float);
    size_t bytes = (size_t)v->layers * vit_block_activation_bytes(&v->block, B, (int)T) + padded(B * T * C * f) +
                   padded(B * C * f) + 2 * padded(B * f) + padded(B * E * f) + 8 * AGPT_ALIGN;
    a->B = B, a->layers = v->layers;
    a->blocks = calloc((size_t)v->layers, sizeof *a->blocks);
    if (!a->blocks) return AGPT_FAIL(AGPT_ERR_OOM, "vision training: no memory for %d blocks' activations", v->layers);
    Status s = arena_init(&a->arena, e->device, bytes);
    for (int l = 0; s == AGPT_OK && l < v->layers; l++)
        s = vit_block_acts_carve(&v->block, B, (int)T, DT_F32, &a->arena, &a->blocks[l]);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, DT_F32, 3, SHAPE(B, (int64_t)T, (int64_t)C), &a->x0);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, DT_F32, 2, SHAPE(B, (int64_t)C), &a->cls_rows);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, DT_F32, 1, SHAPE(B), &a->cls_mean);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, DT_F32, 1, SHAPE(B), &a->cls_rstd);
    if (s == AGPT_OK) s = arena_tensor(&a->arena, DT_F32, 2, SHAPE(B, (int64_t)E), &a->head);
    if (s != AGPT_OK) vision_train_acts_free(a);
    return s;
}

void vision_train_acts_free(VisionTrainActs *a) {
    free(a->blocks);
    arena_free(&a->arena);
    memset(a, 0, sizeof *a);
}

size_t vision_train_scratch_bytes(const VisionEncoder *v, int B) {
    const size_t C = (size_t)v->block.dim, T = (size_t)v->tokens, E = (size_t)v->embed, f = sizeof(float);
    size_t forward = vision_arena_bytes(v, B) + padded(B * C * f);
    size_t backward = vit_block_scratch_bytes(&v->block, B, (int)T) + padded(B * T * C * f) + padded(B * E * f) +
                      2 * padded(B * C * f) + 2 * padded(C * f) + 8 * AGPT_ALIGN;
    return forward > backward ? forward : backward;
}

Status vision_train_forward(Engine *e, const VisionEncoder *v, Arena *scratch, VisionTrainActs *a,
                            const Tensor *images, Tensor *embedding, Tensor taps[VISION_TAPS]) {
    const int B = a->B, T = v->tokens, C = v->block.dim;
    AGPT_CHECK_ARG(images->ndim == 4 && images->shape[0] == B && images->dtype == DT_F32,
                   "vision_train_forward: %lld f32 images for activations sized for %d",
                   (long long)images->shape[0], B);
    size_t mark = arena_mark(scratch);
    Status s;
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(scratch, mark); return s; } } while (0)
    TRY_OR_RESET(vision_stem(e, v, scratch, images, &a->x0));
    const Tensor *in = &a->x0;
    for (int l = 0, next_tap = 0; l < v->layers; l++) {
        TRY_OR_RESET(vit_block_forward(e, &v->block, &v->blocks[l], &a->blocks[l], in));
        if (next_tap < VISION_TAPS && v->taps[next_tap] == l) TRY_OR_RESET(tensor_copy(&taps[next_tap++], &a->blocks[l].out));
        in = &a->blocks[l].out;
    }
    // Head: LayerNorm of the CLS rows, projection, L2 normalisation (as vision_forward).
    for (int b = 0; b < B; b++) {
        Tensor dst = tensor_rows_view(&a->cls_rows, b, 1), src = tensor_rows_view(in, (int64_t)b * T, 1);
        TRY_OR_RESET(tensor_copy(&dst, &src));
    }
    Tensor cls_ln;
    TRY_OR_RESET(arena_tensor(scratch, DT_F32, 2, SHAPE(B, C), &cls_ln));
    TRY_OR_RESET(op_layernorm(e, &cls_ln, &a->cls_mean, &a->cls_rstd, &a->cls_rows, &v->head_ln_w, &v->head_ln_b,
                              v->block.eps));
    TRY_OR_RESET(op_linear(e, &a->head, &cls_ln, &v->head_proj, NULL));
    TRY_OR_RESET(op_l2_normalize(e, embedding, &a->head, 1e-12f));
#undef TRY_OR_RESET
    arena_reset_to(scratch, mark);
    return AGPT_OK;
}

Status vision_train_backward(Engine *e, const VisionEncoder *v, VitBlockWeights *grads, const VisionTrainActs *a,
                             Arena *scratch, const Tensor *d_taps, const Tensor *d_embedding) {
    const int B = a->B, T = v->tokens, C = v->block.dim, E = v->embed;
    size_t mark = arena_mark(scratch);
    Status s;
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(scratch, mark); return s; } } while (0)
    // d: the gradient at the current block's output, walked down the trunk (one buffer: dx may alias dout).
    Tensor d;
    VitBlockScratch bs;
    TRY_OR_RESET(arena_tensor(scratch, DT_F32, 3, SHAPE(B, T, C), &d));
    TRY_OR_RESET(vit_block_scratch_carve(&v->block, B, T, DT_F32, scratch, &bs));
    TRY_OR_RESET(tensor_zero(&d));
    if (d_embedding) {
        // embedding = normalize(LN_head(cls) P^T): back through the normalisation, the projection and the LN
        // (the frozen head's own gradients go to sinks) into the last block's CLS rows.
        Tensor d_head, d_ln, d_cls, sink_w, sink_b;
        TRY_OR_RESET(arena_tensor(scratch, DT_F32, 2, SHAPE(B, E), &d_head));
        TRY_OR_RESET(arena_tensor(scratch, DT_F32, 2, SHAPE(B, C), &d_ln));
        TRY_OR_RESET(arena_tensor(scratch, DT_F32, 2, SHAPE(B, C), &d_cls));
        TRY_OR_RESET(arena_tensor(scratch, DT_F32, 1, SHAPE(C), &sink_w));
        TRY_OR_RESET(arena_tensor(scratch, DT_F32, 1, SHAPE(C), &sink_b));
        TRY_OR_RESET(op_l2_normalize_backward(e, &d_head, d_embedding, &a->head, 1e-12f));
        // Only dx is wanted: x is passed for its shape (no weight gradient is taken).
        TRY_OR_RESET(op_linear_backward(e, &d_ln, NULL, NULL, &d_head, &a->cls_rows, &v->head_proj));
        TRY_OR_RESET(op_layernorm_backward(e, &d_cls, &sink_w, &sink_b, &d_ln, &a->cls_rows, &v->head_ln_w,
                                           &a->cls_mean, &a->cls_rstd));
        for (int b = 0; b < B; b++) {
            Tensor dst = tensor_rows_view(&d, (int64_t)b * T, 1), src = tensor_rows_view(&d_cls, b, 1);
            TRY_OR_RESET(tensor_copy(&dst, &src));
        }
    }
    for (int l = v->layers - 1, next_tap = VISION_TAPS - 1; l >= 0; l--) {
        for (; d_taps && next_tap >= 0 && v->taps[next_tap] == l; next_tap--)
            TRY_OR_RESET(op_axpy(e, &d, &d_taps[next_tap], 1.0f));
        const Tensor *x = l > 0 ? &a->blocks[l - 1].out : &a->x0;
        TRY_OR_RESET(vit_block_backward(e, &v->block, &v->blocks[l], &grads[l], &a->blocks[l], &bs, x, &d, &d));
    }
#undef TRY_OR_RESET
    arena_reset_to(scratch, mark);
    return AGPT_OK;
}
