#include "model/prompt_learner.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kernels/ops.h"
#include "runtime/memory.h"
#include "runtime/rng.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

// meta_net indices of the convolutions: Conv, ReLU, MaxPool repeated, so every third module.
static int conv_index(int i) { return 3 * i; }

Status prompt_learner_load(PromptLearner *p, WeightStore *w) {
    memset(p, 0, sizeof *p);
    const char *file = w->file_name ? w->file_name : "weights";
    p->dim = (int)weights_dim(w, "prompt_learner.base_prompts", 1);
    p->in_channels = (int)weights_dim(w, "prompt_learner.meta_net.0.weight", 1);
    if (p->dim < 1 || p->in_channels < 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no prompt learner (prompt_learner.base_prompts or "
                         "prompt_learner.meta_net.0.weight missing); is this an AnomalyGPT checkpoint?", file);
    int cin = p->in_channels;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        char name[96];
        snprintf(name, sizeof name, "prompt_learner.meta_net.%d.weight", conv_index(i));
        const int64_t cout = weights_dim(w, name, 0), k = weights_dim(w, name, 2);
        const int want_k = i == PROMPT_CONVS - 1 ? 5 : 3;
        if (cout >= 0 && k != want_k)  // (a missing tensor is reported by weights_load below)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: %s has kernel size %lld; the PromptLearner's conv %d is %dx%d",
                             file, name, (long long)k, i, want_k, want_k);
        p->channels[i] = (int)cout;
        p->kernel[i] = (int)k;
        p->padding[i] = i == PROMPT_CONVS - 1 ? 0 : 1;
        AGPT_TRY(weights_load(w, name, 4, SHAPE(cout, cin, k, k), &p->conv_w[i]));
        AGPT_TRY(weights_loadf(w, 1, SHAPE(cout), &p->conv_b[i], "prompt_learner.meta_net.%d.bias", conv_index(i)));
        cin = (int)cout;
    }
    if (p->channels[PROMPT_CONVS - 1] != p->dim)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the last prompt conv has %d channels but the base prompts are %d wide",
                         file, p->channels[PROMPT_CONVS - 1], p->dim);
    AGPT_TRY(weights_load(w, "prompt_learner.base_prompts", 2, SHAPE(PROMPT_BASE, p->dim), &p->base_prompts));
    float eye[PROMPT_BASE * PROMPT_BASE] = {0};
    for (int i = 0; i < PROMPT_BASE; i++) eye[i * PROMPT_BASE + i] = 1.0f;
    return weights_upload(w, eye, 2, SHAPE(PROMPT_BASE, PROMPT_BASE), &p->eye);
}

static size_t padded(size_t bytes) { return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN; }

// Spatial sizes through the stack: conv i keeps (or for the last shrinks) the size, the pool halves it (floor).
static void conv_out_size(const PromptLearner *p, int i, int64_t h, int64_t *out) {
    *out = h + 2 * p->padding[i] - p->kernel[i] + 1;
}

size_t prompt_learner_arena_bytes(const PromptLearner *p, int batch, int H, int W) {
    // Two ping-pong buffers: conv outputs (then ReLU in place) and pool outputs. The widest of each, in f32
    // (the largest storage dtype).
    size_t conv_max = 0, pool_max = 0;
    int64_t h = H, w = W;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        int64_t ho, wo;
        conv_out_size(p, i, h, &ho);
        conv_out_size(p, i, w, &wo);
        if (ho < 1 || wo < 1) break;
        size_t c = (size_t)batch * p->channels[i] * ho * wo * sizeof(float);
        conv_max = c > conv_max ? c : conv_max;
        if (i == PROMPT_CONVS - 1) break;
        h = ho / 2, w = wo / 2;
        size_t q = (size_t)batch * p->channels[i] * h * w * sizeof(float);
        pool_max = q > pool_max ? q : pool_max;
    }
    return padded(conv_max) + padded(pool_max) + 2 * AGPT_ALIGN;
}

Status prompt_learner_forward(Engine *e, const PromptLearner *p, Arena *arena, const Tensor *map, Tensor *out) {
    char a[96], b[96];
    AGPT_CHECK_ARG((map->ndim == 4 && map->shape[1] == p->in_channels) || (map->ndim == 3 && p->in_channels == 1),
                   "prompt_learner_forward: map %s, expected [B,%d,H,W]", tensor_describe(map, a, sizeof a),
                   p->in_channels);
    const int64_t B = map->shape[0], H = map->shape[map->ndim - 2], W = map->shape[map->ndim - 1], D = p->dim;
    AGPT_CHECK_ARG(out->ndim == 3 && out->shape[0] == B && out->shape[1] == PROMPT_TOKENS && out->shape[2] == D,
                   "prompt_learner_forward: out %s, expected [%lld,%d,%lld]", tensor_describe(out, b, sizeof b),
                   (long long)B, PROMPT_TOKENS, (long long)D);
    // The stack must end at 3 x 3 (224 -> ... -> 7 -> 3), or there would not be 9 prompts.
    int64_t h = H, w = W;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        conv_out_size(p, i, h, &h);
        conv_out_size(p, i, w, &w);
        AGPT_CHECK_ARG(h >= 1 && w >= 1, "prompt_learner_forward: map %s is too small for the conv stack",
                       tensor_describe(map, a, sizeof a));
        if (i < PROMPT_CONVS - 1) h /= 2, w /= 2;
    }
    AGPT_CHECK_ARG(h == PROMPT_GRID && w == PROMPT_GRID,
                   "prompt_learner_forward: map %s gives a %lldx%lld grid, not 3x3 (the prompt learner expects "
                   "224 x 224 maps)", tensor_describe(map, a, sizeof a), (long long)h, (long long)w);
    const DType dt = map->dtype;
    const size_t mark = arena_mark(arena);
    Status s;
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(arena, mark); return s; } } while (0)
    // Two ping-pong regions carved once; each layer views them with its own shape.
    size_t conv_elems = 0, pool_elems = 0;
    h = H, w = W;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        conv_out_size(p, i, h, &h);
        conv_out_size(p, i, w, &w);
        size_t c = (size_t)(B * p->channels[i] * h * w);
        conv_elems = c > conv_elems ? c : conv_elems;
        if (i == PROMPT_CONVS - 1) break;
        h /= 2, w /= 2;
        size_t q = (size_t)(B * p->channels[i] * h * w);
        pool_elems = q > pool_elems ? q : pool_elems;
    }
    Tensor conv_buf, pool_buf;
    TRY_OR_RESET(arena_tensor(arena, dt, 1, SHAPE((int64_t)conv_elems), &conv_buf));
    TRY_OR_RESET(arena_tensor(arena, dt, 1, SHAPE((int64_t)pool_elems), &pool_buf));

    Tensor x = tensor_4d(map->data, dt, e->device, B, p->in_channels, H, W);  // [B,Cin,H,W]
    h = H, w = W;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        int64_t ho, wo;
        conv_out_size(p, i, h, &ho);
        conv_out_size(p, i, w, &wo);
        Tensor y = tensor_4d(conv_buf.data, dt, e->device, B, p->channels[i], ho, wo);  // [B,C_i,ho,wo]
        TRY_OR_RESET(op_conv2d(e, &y, &x, &p->conv_w[i], &p->conv_b[i], p->padding[i]));
        if (i == PROMPT_CONVS - 1) {
            x = y;  // [B,D,3,3]: no ReLU after the last conv
            break;
        }
        TRY_OR_RESET(op_relu(e, &y, &y));
        h = ho / 2, w = wo / 2;
        x = tensor_4d(pool_buf.data, dt, e->device, B, p->channels[i], h, w);  // [B,C_i,h,w]
        TRY_OR_RESET(op_maxpool2x2(e, &x, &y));
    }
    // out[b, 0:9] = base_prompts; out[b, 9:18] = x[b]^T, x[b] viewed [D,9]. The transpose is a GEMM with the
    // 9 x 9 identity (out = I @ x[b]^T): every product is x * 1 or x * 0 and every sum adds exact zeros, so it
    // moves the values without rounding in any dtype, through ops.h alone.
    const size_t es = dtype_size(dt);
    for (int64_t bi = 0; bi < B; bi++) {
        Tensor base = tensor_rows_view(out, bi * PROMPT_TOKENS, PROMPT_BASE);                // [9,D]
        Tensor mapped = tensor_rows_view(out, bi * PROMPT_TOKENS + PROMPT_BASE, PROMPT_BASE); // [9,D]
        Tensor xb = tensor_2d((char *)x.data + (size_t)(bi * D * PROMPT_BASE) * es, dt, e->device, D,
                              PROMPT_BASE);                                                   // [D,9]
        TRY_OR_RESET(tensor_copy(&base, &p->base_prompts));
        TRY_OR_RESET(op_matmul(e, &mapped, &p->eye, &xb, NULL, false, true, 1.0f, 0.0f));
    }
    arena_reset_to(arena, mark);
    return AGPT_OK;
#undef TRY_OR_RESET
}

Status llama_proj_load(LlamaProj *l, WeightStore *w) {
    memset(l, 0, sizeof *l);
    l->out_dim = (int)weights_dim(w, "llama_proj.weight", 0);
    l->in_dim = (int)weights_dim(w, "llama_proj.weight", 1);
    if (l->out_dim < 1 || l->in_dim < 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no llama_proj.weight (it comes with the PandaGPT delta)",
                         w->file_name ? w->file_name : "weights");
    AGPT_TRY(weights_load(w, "llama_proj.weight", 2, SHAPE(l->out_dim, l->in_dim), &l->w));
    return weights_load(w, "llama_proj.bias", 1, SHAPE(l->out_dim), &l->b);
}

Status image_token_forward(Engine *e, const LlamaProj *l, const Tensor *cls_emb, Tensor *out) {
    char a[96], b[96];
    AGPT_CHECK_ARG(cls_emb->ndim == 2 && cls_emb->shape[1] == l->in_dim,
                   "image_token_forward: cls_emb %s, expected [B,%d]", tensor_describe(cls_emb, a, sizeof a),
                   l->in_dim);
    const int64_t B = cls_emb->shape[0];
    AGPT_CHECK_ARG(out->ndim == 3 && out->shape[0] == B && out->shape[1] == 1 && out->shape[2] == l->out_dim,
                   "image_token_forward: out %s, expected [%lld,1,%d]", tensor_describe(out, b, sizeof b),
                   (long long)B, l->out_dim);
    Tensor o = tensor_2d(out->data, out->dtype, out->device, B, l->out_dim);  // [B,D]
    return op_linear(e, &o, cls_emb, &l->w, &l->b);
}

// ---------------------------------------------------------------------------------------------------------
// Random weights at any size, for benchmarks: the same structures as the loads make, without a file.


static Status random_upload(WeightStore *w, Rng *rng, float std, float mean, int ndim, const int64_t *shape,
                            Tensor *out) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    float *host = NULL;
    AGPT_TRY(mem_host_alloc(n * sizeof(float), (void **)&host));
    rng_fill_normal(rng, host, n, mean, std);
    Status s = weights_upload(w, host, ndim, shape, out);
    mem_host_free(host);
    return s;
}

Status prompt_learner_init_random(PromptLearner *p, WeightStore *w, int dim, const int *channels, uint64_t seed) {
    static const int reference[PROMPT_CONVS - 1] = {4, 16, 64, 256, 1024};
    memset(p, 0, sizeof *p);
    AGPT_CHECK_ARG(dim >= 1, "prompt_learner_init_random: dim %d", dim);
    Rng rng;
    rng_seed(&rng, seed);
    p->dim = dim;
    p->in_channels = 1;
    int cin = 1;
    for (int i = 0; i < PROMPT_CONVS; i++) {
        int cout = i == PROMPT_CONVS - 1 ? dim : (channels ? channels[i] : reference[i]), k = i == PROMPT_CONVS - 1 ? 5 : 3;
        AGPT_CHECK_ARG(cout >= 1, "prompt_learner_init_random: conv %d has %d channels", i, cout);
        p->channels[i] = cout, p->kernel[i] = k, p->padding[i] = i == PROMPT_CONVS - 1 ? 0 : 1;
        float he = sqrtf(2.0f / (float)(cin * k * k));  // He init keeps the activations' scale through the ReLUs
        AGPT_TRY(random_upload(w, &rng, he, 0.0f, 4, SHAPE(cout, cin, k, k), &p->conv_w[i]));
        AGPT_TRY(random_upload(w, &rng, 0.01f, 0.0f, 1, SHAPE(cout), &p->conv_b[i]));
        cin = cout;
    }
    AGPT_TRY(random_upload(w, &rng, 1.0f, 0.0f, 2, SHAPE(PROMPT_BASE, dim), &p->base_prompts));  // randn, as the reference
    float eye[PROMPT_BASE * PROMPT_BASE] = {0};
    for (int i = 0; i < PROMPT_BASE; i++) eye[i * PROMPT_BASE + i] = 1.0f;
    return weights_upload(w, eye, 2, SHAPE(PROMPT_BASE, PROMPT_BASE), &p->eye);
}

Status llama_proj_init_random(LlamaProj *l, WeightStore *w, int in_dim, int out_dim, uint64_t seed) {
    memset(l, 0, sizeof *l);
    AGPT_CHECK_ARG(in_dim >= 1 && out_dim >= 1, "llama_proj_init_random: %d -> %d", in_dim, out_dim);
    Rng rng;
    rng_seed(&rng, seed);
    l->in_dim = in_dim, l->out_dim = out_dim;
    AGPT_TRY(random_upload(w, &rng, 1.0f / sqrtf((float)in_dim), 0.0f, 2, SHAPE(out_dim, in_dim), &l->w));
    return random_upload(w, &rng, 0.02f, 0.0f, 1, SHAPE(out_dim), &l->b);
}
