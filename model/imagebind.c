#include "model/imagebind.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "runtime/log.h"
#include "runtime/memory.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

// Number of blocks under a trunk prefix: the first index without an attention weight.
static int count_blocks(const WeightStore *w, const char *trunk) {
    int n = 0;
    char name[256];
    for (;; n++) {
        snprintf(name, sizeof name, "%s.blocks.%d.attn.in_proj_weight", trunk, n);
        if (!weights_has(w, name)) return n;
    }
}

static Status load_blocks(WeightStore *w, const char *trunk, int layers, int C, int mlp, VitBlockWeights **out) {
    VitBlockWeights *b = calloc((size_t)layers, sizeof *b);
    if (!b) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d block records", layers);
    for (int i = 0; i < layers; i++) {
        char p[200];
        snprintf(p, sizeof p, "%s.blocks.%d", trunk, i);
        Status s = AGPT_OK;
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b[i].norm_1_w, "%s.norm_1.weight", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b[i].norm_1_b, "%s.norm_1.bias", p);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(3 * C, C), &b[i].in_proj_w, "%s.attn.in_proj_weight", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(3 * C), &b[i].in_proj_b, "%s.attn.in_proj_bias", p);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, C), &b[i].out_proj_w, "%s.attn.out_proj.weight", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b[i].out_proj_b, "%s.attn.out_proj.bias", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b[i].norm_2_w, "%s.norm_2.weight", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b[i].norm_2_b, "%s.norm_2.bias", p);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(mlp, C), &b[i].fc1_w, "%s.mlp.fc1.weight", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(mlp), &b[i].fc1_b, "%s.mlp.fc1.bias", p);
        if (!s) s = weights_loadf_matrix(w, 2, SHAPE(C, mlp), &b[i].fc2_w, "%s.mlp.fc2.weight", p);
        if (!s) s = weights_loadf(w, 1, SHAPE(C), &b[i].fc2_b, "%s.mlp.fc2.bias", p);
        if (s) {
            free(b);
            return s;
        }
    }
    *out = b;
    return AGPT_OK;
}

// "7,15,23,31" -> taps; each must be a block index, strictly increasing.
static Status parse_taps(const WeightStore *w, int layers, int taps[VISION_TAPS]) {
    const char *v = weights_meta(w, "vision.taps");
    if (!v) {  // the reference's evenly spaced pattern: after blocks n/4-1, n/2-1, 3n/4-1, n-1
        for (int i = 0; i < VISION_TAPS; i++) taps[i] = layers * (i + 1) / VISION_TAPS - 1;
        return AGPT_OK;
    }
    const char *p = v;
    for (int i = 0; i < VISION_TAPS; i++) {
        char *end = NULL;
        long x = strtol(p, &end, 10);
        if (end == p || x < 0 || x >= layers || (i > 0 && x <= taps[i - 1]) ||
            (i < VISION_TAPS - 1 ? *end != ',' : *end != 0))
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata vision.taps = '%s': want %d increasing block indices "
                             "below %d, comma-separated", w->file_name, v, VISION_TAPS, layers);
        taps[i] = (int)x;
        p = end + 1;
    }
    return AGPT_OK;
}

Status vision_load(VisionEncoder *v, WeightStore *w) {
    memset(v, 0, sizeof *v);
    const char *stem = "modality_preprocessors.vision.rgbt_stem.proj.1.weight";
    float *conv = NULL;
    int nd = 0;
    int64_t cs[8];
    AGPT_TRY(weights_read_f32(w, stem, &conv, &nd, cs));
    // [C, 3, 2, p, p]: two frames of the same image, so the Conv3d is a 2-D conv with the frames' sum.
    if (nd != 5 || cs[1] != 3 || cs[2] != 2 || cs[3] != cs[4]) {
        mem_host_free(conv);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: %s should be [C,3,2,p,p] (ImageBind's Conv3d)", w->file_name, stem);
    }
    int C = (int)cs[0], p = (int)cs[3];
    float *folded = NULL;
    Status s = mem_host_alloc((size_t)C * 3 * p * p * sizeof(float), (void **)&folded);
    if (s) {
        mem_host_free(conv);
        return s;
    }
    for (int o = 0; o < C; o++)
        for (int c = 0; c < 3; c++)
            for (int ij = 0; ij < p * p; ij++) {
                const float *src = conv + (((size_t)o * 3 + c) * 2) * p * p + ij;
                folded[((size_t)o * 3 + c) * p * p + ij] = src[0] + src[(size_t)p * p];
            }
    mem_host_free(conv);
    s = weights_upload(w, folded, 2, SHAPE(C, 3 * p * p), &v->patch_w);
    mem_host_free(folded);
    AGPT_TRY(s);

    int64_t T = weights_dim(w, "modality_preprocessors.vision.pos_embedding_helper.pos_embed", 1);
    int grid = (int)lround(sqrt((double)(T - 1)));
    if (T < 2 || (int64_t)grid * grid + 1 != T)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the vision pos_embed has %lld tokens, not a square grid plus CLS",
                         w->file_name, (long long)T);
    v->patch = p, v->grid = grid, v->image = grid * p, v->tokens = (int)T;
    v->layers = count_blocks(w, "modality_trunks.vision");
    if (v->layers < 1) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no vision blocks", w->file_name);
    int mlp = (int)weights_dim(w, "modality_trunks.vision.blocks.0.mlp.fc1.weight", 0);
    int heads;
    AGPT_TRY(weights_meta_int(w, "vision.heads", 16, &heads));
    v->block = (VitBlockConfig){.dim = C, .heads = heads, .mlp_hidden = mlp, .eps = 1e-6f, .causal = false};
    AGPT_TRY(vit_block_config_check(&v->block));
    AGPT_TRY(parse_taps(w, v->layers, v->taps));
    v->embed = (int)weights_dim(w, "modality_heads.vision.2.weight", 0);

    AGPT_TRY(weights_load(w, "modality_preprocessors.vision.cls_token", 3, SHAPE(1, 1, C), &v->cls));
    AGPT_TRY(weights_load(w, "modality_preprocessors.vision.pos_embedding_helper.pos_embed", 3, SHAPE(1, T, C),
                          &v->pos));
    AGPT_TRY(weights_load(w, "modality_trunks.vision.pre_transformer_layer.0.weight", 1, SHAPE(C), &v->pre_ln_w));
    AGPT_TRY(weights_load(w, "modality_trunks.vision.pre_transformer_layer.0.bias", 1, SHAPE(C), &v->pre_ln_b));
    AGPT_TRY(load_blocks(w, "modality_trunks.vision", v->layers, C, mlp, &v->blocks));
    AGPT_TRY(weights_load(w, "modality_heads.vision.0.weight", 1, SHAPE(C), &v->head_ln_w));
    AGPT_TRY(weights_load(w, "modality_heads.vision.0.bias", 1, SHAPE(C), &v->head_ln_b));
    AGPT_TRY(weights_load(w, "modality_heads.vision.2.weight", 2, SHAPE(-1, C), &v->head_proj));
    LOG_D("vision: width %d, %d heads, %d blocks, MLP %d, %dx%d patches of %d, embed %d, taps %d %d %d %d", C,
          heads, v->layers, mlp, grid, grid, p, v->embed, v->taps[0], v->taps[1], v->taps[2], v->taps[3]);
    return AGPT_OK;
}

void vision_free(VisionEncoder *v) {
    free(v->blocks);
    memset(v, 0, sizeof *v);
}

Status text_load(TextEncoder *t, WeightStore *w) {
    memset(t, 0, sizeof *t);
    const char *emb = "modality_preprocessors.text.token_embedding.weight";
    int64_t V = weights_dim(w, emb, 0), C = weights_dim(w, emb, 1);
    int64_t ctx = weights_dim(w, "modality_preprocessors.text.pos_embed", 1);
    if (V < 1 || C < 1 || ctx < 2)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no text encoder (token_embedding or pos_embed missing)", w->file_name);
    t->vocab = (int)V, t->context = (int)ctx;
    t->layers = count_blocks(w, "modality_trunks.text");
    if (t->layers < 1) return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no text blocks", w->file_name);
    int mlp = (int)weights_dim(w, "modality_trunks.text.blocks.0.mlp.fc1.weight", 0);
    int heads;
    AGPT_TRY(weights_meta_int(w, "text.heads", 16, &heads));
    t->block = (VitBlockConfig){.dim = (int)C, .heads = heads, .mlp_hidden = mlp, .eps = 1e-6f, .causal = true};
    AGPT_TRY(vit_block_config_check(&t->block));
    t->embed = (int)weights_dim(w, "modality_heads.text.proj.1.weight", 0);

    AGPT_TRY(weights_load(w, emb, 2, SHAPE(V, C), &t->token_emb));
    AGPT_TRY(weights_load(w, "modality_preprocessors.text.pos_embed", 3, SHAPE(1, ctx, C), &t->pos));
    AGPT_TRY(load_blocks(w, "modality_trunks.text", t->layers, (int)C, mlp, &t->blocks));
    AGPT_TRY(weights_load(w, "modality_heads.text.proj.0.weight", 1, SHAPE(C), &t->head_ln_w));
    AGPT_TRY(weights_load(w, "modality_heads.text.proj.0.bias", 1, SHAPE(C), &t->head_ln_b));
    AGPT_TRY(weights_load(w, "modality_heads.text.proj.1.weight", 2, SHAPE(-1, C), &t->proj));
    float *scale = NULL;
    int nd;
    int64_t shape[8];
    AGPT_TRY(weights_read_f32(w, "modality_postprocessors.text.1.log_logit_scale", &scale, &nd, shape));
    int64_t count = 1;
    for (int d = 0; d < nd; d++) count *= shape[d];
    if (count != 1) {
        mem_host_free(scale);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: log_logit_scale has %lld elements, expected a scalar", w->file_name,
                         (long long)count);
    }
    // LearnableLogitScaling: clip(exp(log_scale), max=100).
    t->logit_scale = fminf(expf(scale[0]), 100.0f);
    mem_host_free(scale);
    return AGPT_OK;
}

void text_free(TextEncoder *t) {
    free(t->blocks);
    memset(t, 0, sizeof *t);
}

// ---------------------------------------------------------------------------------------------------------

static size_t padded(size_t bytes) { return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN; }

// The trunk's own needs: two sets of block activations used in turn (block i reads block i-1's output).
static size_t trunk_bytes(const VitBlockConfig *c, int B, int T) { return 2 * vit_block_activation_bytes(c, B, T); }

// Runs `layers` blocks on x [B,T,C]; the result is in *out (a view of the last block's output inside the
// arena). Tapped block outputs are copied into taps[i] when taps is non-NULL.
static Status run_trunk(Engine *e, const VitBlockConfig *c, const VitBlockWeights *blocks, int layers, Arena *arena,
                        const Tensor *x, DType dt, const int *tap_ids, Tensor *taps, Tensor *out) {
    int B = (int)x->shape[0], T = (int)x->shape[1];
    VitBlockActs acts[2];
    AGPT_TRY(vit_block_acts_carve(c, B, T, dt, arena, &acts[0]));
    AGPT_TRY(vit_block_acts_carve(c, B, T, dt, arena, &acts[1]));
    const Tensor *in = x;
    int next_tap = 0;
    for (int i = 0; i < layers; i++) {
        VitBlockActs *a = &acts[i % 2];
        AGPT_TRY(vit_block_forward(e, c, &blocks[i], a, in));
        if (taps && next_tap < VISION_TAPS && tap_ids[next_tap] == i) AGPT_TRY(tensor_copy(&taps[next_tap++], &a->out));
        in = &a->out;
    }
    *out = *in;
    return AGPT_OK;
}

size_t vision_arena_bytes(const VisionEncoder *v, int B) {
    size_t C = (size_t)v->block.dim, T = (size_t)v->tokens, N = T - 1, pp = (size_t)3 * v->patch * v->patch;
    size_t f = sizeof(float);  // sized for f32, so it covers f16/bf16 too
    return padded(B * N * pp * f) + padded(B * N * C * f) + padded(B * T * C * f) * 2 + padded(B * C * f) * 2 +
           padded(B * f) * 2 + trunk_bytes(&v->block, B, (int)T) + 16 * AGPT_ALIGN;
}

Status vision_stem(Engine *e, const VisionEncoder *v, Arena *arena, const Tensor *images, Tensor *x0) {
    int C = v->block.dim, T = v->tokens, N = T - 1, pp = 3 * v->patch * v->patch;
    int B = (int)images->shape[0];
    DType dt = images->dtype;
    size_t mark = arena_mark(arena);
    Status s;
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(arena, mark); return s; } } while (0)
    // Patch embedding as one GEMM: [B*N, 3pp] @ [C, 3pp]^T.
    Tensor patches, patch_emb, tokens;
    TRY_OR_RESET(arena_tensor(arena, dt, 3, SHAPE(B, N, pp), &patches));
    TRY_OR_RESET(arena_tensor(arena, dt, 3, SHAPE(B, N, C), &patch_emb));
    TRY_OR_RESET(arena_tensor(arena, dt, 3, SHAPE(B, T, C), &tokens));
    TRY_OR_RESET(op_im2patches(e, &patches, images, v->patch));
    TRY_OR_RESET(op_linear(e, &patch_emb, &patches, &v->patch_w, NULL));
    // tokens[b] = [CLS; patches] + pos
    Tensor pos = tensor_2d(v->pos.data, dt, e->device, T, C);
    for (int b = 0; b < B; b++) {
        Tensor row0 = tensor_rows_view(&tokens, (int64_t)b * T, 1);
        Tensor rest = tensor_rows_view(&tokens, (int64_t)b * T + 1, N);
        Tensor src = tensor_rows_view(&patch_emb, (int64_t)b * N, N);
        Tensor cls = tensor_2d(v->cls.data, dt, e->device, 1, C);
        TRY_OR_RESET(tensor_copy(&row0, &cls));
        TRY_OR_RESET(tensor_copy(&rest, &src));
        Tensor tb = tensor_rows_view(&tokens, (int64_t)b * T, T);
        TRY_OR_RESET(op_add(e, &tb, &tb, &pos));
    }
    TRY_OR_RESET(op_layernorm(e, x0, NULL, NULL, &tokens, &v->pre_ln_w, &v->pre_ln_b, v->block.eps));
#undef TRY_OR_RESET
    arena_reset_to(arena, mark);
    return AGPT_OK;
}

Status vision_forward(Engine *e, const VisionEncoder *v, Arena *arena, const Tensor *images, Tensor *embedding,
                      Tensor taps[VISION_TAPS]) {
    char d[96];
    int S = v->image, C = v->block.dim, T = v->tokens;
    AGPT_CHECK_ARG(images->ndim == 4 && images->shape[1] == 3 && images->shape[2] == S && images->shape[3] == S,
                   "vision_forward: images %s, expected [B,3,%d,%d]", tensor_describe(images, d, sizeof d), S, S);
    int B = (int)images->shape[0];
    DType dt = images->dtype;
    AGPT_CHECK_ARG(embedding->ndim == 2 && embedding->shape[0] == B && embedding->shape[1] == v->embed,
                   "vision_forward: embedding %s, expected [%d,%d]", tensor_describe(embedding, d, sizeof d), B,
                   v->embed);
    for (int i = 0; i < VISION_TAPS; i++)
        AGPT_CHECK_ARG(taps[i].ndim == 3 && taps[i].shape[0] == B && taps[i].shape[1] == T && taps[i].shape[2] == C,
                       "vision_forward: tap %d is %s, expected [%d,%d,%d]", i, tensor_describe(&taps[i], d, sizeof d),
                       B, T, C);
    size_t mark = arena_mark(arena);
    Status s;
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(arena, mark); return s; } } while (0)
    Tensor x0;
    TRY_OR_RESET(arena_tensor(arena, dt, 3, SHAPE(B, T, C), &x0));
    TRY_OR_RESET(vision_stem(e, v, arena, images, &x0));
    Tensor last;
    TRY_OR_RESET(run_trunk(e, &v->block, v->blocks, v->layers, arena, &x0, dt, v->taps, taps, &last));
    // Head: LayerNorm of the CLS rows, projection, L2 normalise (F.normalize: eps 1e-12).
    Tensor cls_rows, cls_ln;
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(B, C), &cls_rows));
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(B, C), &cls_ln));
    for (int b = 0; b < B; b++) {
        Tensor dst = tensor_rows_view(&cls_rows, b, 1), src = tensor_rows_view(&last, (int64_t)b * T, 1);
        TRY_OR_RESET(tensor_copy(&dst, &src));
    }
    TRY_OR_RESET(op_layernorm(e, &cls_ln, NULL, NULL, &cls_rows, &v->head_ln_w, &v->head_ln_b, v->block.eps));
    TRY_OR_RESET(op_linear(e, embedding, &cls_ln, &v->head_proj, NULL));
    TRY_OR_RESET(op_l2_normalize(e, embedding, embedding, 1e-12f));
    arena_reset_to(arena, mark);
    return AGPT_OK;
}

size_t text_arena_bytes(const TextEncoder *t, int N) {
    size_t C = (size_t)t->block.dim, T = (size_t)t->context, f = sizeof(float);
    return padded(N * T * C * f) + padded(N * C * f) * 2 + trunk_bytes(&t->block, N, (int)T) + 8 * AGPT_ALIGN;
}

Status text_forward(Engine *e, const TextEncoder *t, Arena *arena, const int32_t *ids, int N, Tensor *out) {
    char d[96];
    int C = t->block.dim, ctx = t->context;
    AGPT_CHECK_ARG(N >= 1, "text_forward: no sentences");
    AGPT_CHECK_ARG(out->ndim == 2 && out->shape[0] == N && out->shape[1] == t->embed,
                   "text_forward: out %s, expected [%d,%d]", tensor_describe(out, d, sizeof d), N, t->embed);
    // The end token is the largest id (49407), found by argmax as SelectEOSAndProject does; positions after the
    // last end token never influence it under the causal mask, so run only up to there.
    int *eot = malloc((size_t)N * sizeof(int));
    if (!eot) return AGPT_FAIL(AGPT_ERR_OOM, "text_forward: no memory");
    int T = 1;
    for (int n = 0; n < N; n++) {
        const int32_t *row = ids + (size_t)n * ctx;
        eot[n] = 0;
        for (int i = 0; i < ctx; i++) {
            if (row[i] < 0 || row[i] >= t->vocab) {
                free(eot);
                return AGPT_FAIL(AGPT_ERR_ARG, "text_forward: token id %d at sentence %d position %d is outside the "
                                 "vocabulary of %d", row[i], n, i, t->vocab);
            }
            if (row[i] > row[eot[n]]) eot[n] = i;
        }
        if (eot[n] + 1 > T) T = eot[n] + 1;
    }
    DType dt = t->token_emb.dtype;
    size_t mark = arena_mark(arena);
    Status s;
#undef TRY_OR_RESET
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(arena, mark); free(eot); return s; } } while (0)
    Tensor x, rows, rows_ln;
    TRY_OR_RESET(arena_tensor(arena, dt, 3, SHAPE(N, T, C), &x));
    Tensor pos = tensor_2d(t->pos.data, dt, e->device, T, C);  // the first T positions
    {
        // The ids actually used, the first T of each sentence, gathered in one op_embedding over [N*T,C].
        int32_t *used = malloc((size_t)N * (size_t)T * sizeof(int32_t));
        if (!used) TRY_OR_RESET(AGPT_FAIL(AGPT_ERR_OOM, "text_forward: no memory for %d x %d token ids", N, T));
        for (int n = 0; n < N; n++)
            memcpy(used + (size_t)n * T, ids + (size_t)n * ctx, (size_t)T * sizeof(int32_t));
        Tensor id = tensor_1d(used, DT_I32, DEV_CPU, (int64_t)N * T);
        Tensor flat = tensor_2d(x.data, dt, x.device, (int64_t)N * T, C);
        s = op_embedding(e, &flat, &t->token_emb, &id);
        free(used);
        TRY_OR_RESET(s);
    }
    for (int n = 0; n < N; n++) {
        Tensor xn = tensor_rows_view(&x, (int64_t)n * T, T);
        TRY_OR_RESET(op_add(e, &xn, &xn, &pos));
    }
    Tensor last;
    TRY_OR_RESET(run_trunk(e, &t->block, t->blocks, t->layers, arena, &x, dt, NULL, NULL, &last));
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(N, C), &rows));
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(N, C), &rows_ln));
    for (int n = 0; n < N; n++) {
        Tensor dst = tensor_rows_view(&rows, n, 1), src = tensor_rows_view(&last, (int64_t)n * T + eot[n], 1);
        TRY_OR_RESET(tensor_copy(&dst, &src));
    }
    TRY_OR_RESET(op_layernorm(e, &rows_ln, NULL, NULL, &rows, &t->head_ln_w, &t->head_ln_b, t->block.eps));
    TRY_OR_RESET(op_linear(e, out, &rows_ln, &t->proj, NULL));
    TRY_OR_RESET(op_l2_normalize(e, out, out, 1e-12f));
    TRY_OR_RESET(op_scale(e, out, t->logit_scale));
    arena_reset_to(arena, mark);
    free(eot);
    return AGPT_OK;
#undef TRY_OR_RESET
}

// ---------------------------------------------------------------------------------------------------------
// Random weights at any size, for benchmarks: the same structures as a loaded model, without a file.

static Status random_values(WeightStore *w, Rng *rng, float scale, float offset, int ndim, const int64_t *shape,
                             Tensor *out, bool matrix) {
    Tensor t = tensor_make(NULL, DT_F32, DEV_CPU, ndim, shape);
    float *host = NULL;
    AGPT_TRY(mem_host_alloc(tensor_nbytes(&t), (void **)&host));
    rng_fill_normal(rng, host, (size_t)tensor_numel(&t), offset, scale);
    Status s = matrix ? weights_upload_matrix(w, host, ndim, shape, out) : weights_upload(w, host, ndim, shape, out);
    mem_host_free(host);
    return s;
}

static Status random_tensor(WeightStore *w, Rng *rng, float scale, float offset, int ndim, const int64_t *shape,
                            Tensor *out) {
    return random_values(w, rng, scale, offset, ndim, shape, out, false);
}

// A block's weight matrix: kept in the store's CPU matrix dtype (weights_set_matrix_dtype), as loaded ones are.
static Status random_matrix(WeightStore *w, Rng *rng, float scale, int64_t rows, int64_t cols, Tensor *out) {
    return random_values(w, rng, scale, 0, 2, (const int64_t[]){rows, cols}, out, true);
}

Status vision_init_random(VisionEncoder *v, WeightStore *w, int width, int heads, int layers, int mlp, int patch,
                          int image, int embed, uint64_t seed) {
    memset(v, 0, sizeof *v);
    Rng rng;
    rng_seed(&rng, seed);
    int C = width, grid = image / patch, T = grid * grid + 1;
    v->block = (VitBlockConfig){.dim = C, .heads = heads, .mlp_hidden = mlp, .eps = 1e-6f, .causal = false};
    AGPT_TRY(vit_block_config_check(&v->block));
    v->layers = layers, v->patch = patch, v->image = image, v->grid = grid, v->tokens = T, v->embed = embed;
    for (int i = 0; i < VISION_TAPS; i++) v->taps[i] = layers * (i + 1) / VISION_TAPS - 1;
    float wc = 1.0f / sqrtf((float)C), wm = 1.0f / sqrtf((float)mlp);
    AGPT_TRY(random_tensor(w, &rng, 1.0f / sqrtf(3.0f * patch * patch), 0, 2, SHAPE(C, 3 * patch * patch), &v->patch_w));
    AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 3, SHAPE(1, 1, C), &v->cls));
    AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 3, SHAPE(1, T, C), &v->pos));
    AGPT_TRY(random_tensor(w, &rng, 0.02f, 1, 1, SHAPE(C), &v->pre_ln_w));
    AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(C), &v->pre_ln_b));
    v->blocks = calloc((size_t)layers, sizeof *v->blocks);
    if (!v->blocks) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d block records", layers);
    for (int i = 0; i < layers; i++) {
        VitBlockWeights *b = &v->blocks[i];
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 1, 1, SHAPE(C), &b->norm_1_w));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(C), &b->norm_1_b));
        AGPT_TRY(random_matrix(w, &rng, wc, 3 * C, C, &b->in_proj_w));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(3 * C), &b->in_proj_b));
        AGPT_TRY(random_matrix(w, &rng, wc, C, C, &b->out_proj_w));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(C), &b->out_proj_b));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 1, 1, SHAPE(C), &b->norm_2_w));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(C), &b->norm_2_b));
        AGPT_TRY(random_matrix(w, &rng, wc, mlp, C, &b->fc1_w));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(mlp), &b->fc1_b));
        AGPT_TRY(random_matrix(w, &rng, wm, C, mlp, &b->fc2_w));
        AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(C), &b->fc2_b));
    }
    AGPT_TRY(random_tensor(w, &rng, 0.02f, 1, 1, SHAPE(C), &v->head_ln_w));
    AGPT_TRY(random_tensor(w, &rng, 0.02f, 0, 1, SHAPE(C), &v->head_ln_b));
    AGPT_TRY(random_tensor(w, &rng, wc, 0, 2, SHAPE(embed, C), &v->head_proj));
    return AGPT_OK;
}

double vision_flops_per_image(const VisionEncoder *v) {
    double C = v->block.dim, T = v->tokens, M = v->block.mlp_hidden, N = T - 1, pp = 3.0 * v->patch * v->patch;
    double per_block = 2 * T * C * 3 * C + 2 * T * C * C + 2 * 2 * T * C * M  // qkv, out, fc1 + fc2
                       + 2 * 2 * T * T * C;                                      // q k^T and p v
    return v->layers * per_block + 2 * N * pp * C + 2 * C * v->embed;
}
