#include "model/anomaly_map.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "runtime/memory.h"
#include "runtime/rng.h"

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

Status decoder_load(PatchDecoder *d, WeightStore *w) {
    memset(d, 0, sizeof *d);
    d->out_dim = (int)weights_dim(w, "image_decoder.fc.0.weight", 0);
    d->in_dim = (int)weights_dim(w, "image_decoder.fc.0.weight", 1);
    if (d->out_dim < 1 || d->in_dim < 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no patch decoder (image_decoder.fc.0.weight missing)", w->file_name);
    for (int i = 0; i < VISION_TAPS; i++) {
        AGPT_TRY(weights_loadf(w, 2, SHAPE(d->out_dim, d->in_dim), &d->fc_w[i], "image_decoder.fc.%d.weight", i));
        AGPT_TRY(weights_loadf(w, 1, SHAPE(d->out_dim), &d->fc_b[i], "image_decoder.fc.%d.bias", i));
    }
    return AGPT_OK;
}

static const char *normal_states[] = {"%s", "flawless %s", "perfect %s", "unblemished %s", "%s without flaw",
                                      "%s without defect", "%s without damage"};
static const char *abnormal_states[] = {"damaged %s", "broken %s", "%s with flaw", "%s with defect",
                                        "%s with damage"};
static const char *templates[] = {"a photo of a %s.", "a photo of the %s."};

int prompt_sentences(const char *class_name, char sentences[][256], int cap) {
    char name[128], state[200];
    snprintf(name, sizeof name, "%s", class_name);
    for (char *c = name; *c; c++)
        if (*c == '_') *c = ' ';
    int n = 0;
    for (int group = 0; group < 2; group++) {
        const char **states = group == 0 ? normal_states : abnormal_states;
        int count = group == 0 ? 7 : 5;
        for (int s = 0; s < count; s++)
            for (int t = 0; t < 2 && n < cap; t++) {
                snprintf(state, sizeof state, states[s], name);
                snprintf(sentences[n++], 256, templates[t], state);
            }
    }
    return n;
}

Status prompt_ensemble(Engine *e, const Tensor *text_emb, Tensor *out) {
    char d[96];
    AGPT_CHECK_ARG(text_emb->ndim == 2 && text_emb->shape[0] == PROMPT_SENTENCES,
                   "prompt_ensemble: text_emb %s, expected [%d,E]", tensor_describe(text_emb, d, sizeof d),
                   PROMPT_SENTENCES);
    int64_t E = text_emb->shape[1];
    AGPT_CHECK_ARG(out->ndim == 2 && out->shape[0] == 2 && out->shape[1] == E, "prompt_ensemble: out %s, expected "
                   "[2,%lld]", tensor_describe(out, d, sizeof d), (long long)E);
    AGPT_TRY(tensor_zero(out));
    for (int cls = 0; cls < 2; cls++) {
        int first = cls == 0 ? 0 : PROMPT_NORMAL, count = cls == 0 ? PROMPT_NORMAL : PROMPT_SENTENCES - PROMPT_NORMAL;
        Tensor mean = tensor_rows_view(out, cls, 1);
        for (int i = 0; i < count; i++) {
            Tensor row = tensor_rows_view(text_emb, first + i, 1);
            AGPT_TRY(op_axpy(e, &mean, &row, 1.0f / (float)count));
        }
    }
    return op_l2_normalize(e, out, out, 0.0f);  // the reference divides by the norm, no eps
}

static size_t padded(size_t bytes) { return (bytes + AGPT_ALIGN - 1) / AGPT_ALIGN * AGPT_ALIGN; }

size_t anomaly_map_arena_bytes(const PatchDecoder *d, int tokens, int image, int refs) {
    size_t N = (size_t)tokens - 1, f = sizeof(float), S2 = (size_t)image * image;
    (void)refs;
    return padded(N * d->out_dim * f) + padded(N * d->in_dim * f) + padded(2 * N * f) + padded(2 * S2 * f) +
           padded(S2 * f) + padded(N * f) * 2 + 8 * AGPT_ALIGN;
}

// All four taps alike ([B,T,C], one dtype, on the engine's device), and the output map of that dtype there too:
// the maps are built from views of these buffers, which the ops cannot check for themselves.
static Status check_inputs(const Engine *e, const Tensor taps[VISION_TAPS], const Tensor *map, const char *op) {
    char a[96], b[96];
    for (int i = 0; i < VISION_TAPS; i++) {
        AGPT_CHECK_ARG(taps[i].device == e->device && tensor_same_shape(&taps[i], &taps[0]) &&
                           taps[i].dtype == taps[0].dtype,
                       "%s: tap %d is %s, tap 0 is %s; all must match, on %s", op, i,
                       tensor_describe(&taps[i], a, sizeof a), tensor_describe(&taps[0], b, sizeof b),
                       device_name(e->device));
    }
    AGPT_CHECK_ARG(map->device == e->device && map->dtype == taps[0].dtype && map->ndim == 3 &&
                       map->shape[0] == taps[0].shape[0] && map->shape[1] == map->shape[2],
                   "%s: map %s, expected %s[%lld,S,S] on %s", op, tensor_describe(map, a, sizeof a),
                   dtype_name(taps[0].dtype), (long long)taps[0].shape[0], device_name(e->device));
    return AGPT_OK;
}

// The side of the square patch grid of N patches.
static int grid_side(int64_t N) {
    int g = 1;
    while ((int64_t)(g + 1) * (g + 1) <= N) g++;
    return g;
}

Status anomaly_map_text(Engine *e, const PatchDecoder *d, Arena *arena, const Tensor taps[VISION_TAPS],
                        const Tensor *text_features, Tensor *map) {
    char a[96], b[96];
    const Tensor *t0 = &taps[0];
    AGPT_CHECK_ARG(t0->ndim == 3 && t0->shape[2] == d->in_dim, "anomaly_map_text: tap %s, expected [B,T,%d]",
                   tensor_describe(t0, a, sizeof a), d->in_dim);
    AGPT_TRY(check_inputs(e, taps, map, "anomaly_map_text"));
    int B = (int)t0->shape[0], T = (int)t0->shape[1], N = T - 1, g = grid_side(N), E = d->out_dim;
    AGPT_CHECK_ARG(g * g == N, "anomaly_map_text: %d patches do not form a square grid", N);
    AGPT_CHECK_ARG(text_features->dtype == t0->dtype && text_features->device == e->device,
                   "anomaly_map_text: text features %s must be %s on %s like the taps",
                   tensor_describe(text_features, a, sizeof a), dtype_name(t0->dtype), device_name(e->device));
    bool per_image = text_features->ndim == 3;
    AGPT_CHECK_ARG((text_features->ndim == 2 && text_features->shape[0] == 2 && text_features->shape[1] == E) ||
                       (per_image && text_features->shape[0] == B && text_features->shape[1] == 2 &&
                        text_features->shape[2] == E),
                   "anomaly_map_text: text features %s, expected [2,%d] or [%d,2,%d]",
                   tensor_describe(text_features, a, sizeof a), E, B, E);
    AGPT_CHECK_ARG(map->ndim == 3 && map->shape[0] == B && map->shape[1] == map->shape[2],
                   "anomaly_map_text: map %s, expected [%d,S,S]", tensor_describe(map, b, sizeof b), B);
    int S = (int)map->shape[1];
    DType dt = t0->dtype;
    size_t mark = arena_mark(arena);
    Status s;
#define TRY_OR_RESET(expr) do { if ((s = (expr)) != AGPT_OK) { arena_reset_to(arena, mark); return s; } } while (0)
    Tensor proj, logits;
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(N, E), &proj));
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(2, N), &logits));
    TRY_OR_RESET(tensor_zero(map));
    for (int img = 0; img < B; img++) {
        Tensor tf = per_image ? tensor_rows_view(text_features, (int64_t)img * 2, 2)
                              : tensor_2d(text_features->data, dt, e->device, 2, E);
        Tensor out = tensor_3d(tensor_rows_view(map, (int64_t)img * S, S).data, dt, e->device, 1, S, S);  // image img
        for (int i = 0; i < VISION_TAPS; i++) {
            Tensor patches = tensor_rows_view(&taps[i], (int64_t)img * T + 1, N);  // CLS dropped
            TRY_OR_RESET(op_linear(e, &proj, &patches, &d->fc_w[i], &d->fc_b[i]));
            TRY_OR_RESET(op_l2_normalize(e, &proj, &proj, 0.0f));  // P / ||P||, no eps, as the reference
            // S^T [2,N] = 100 * t [2,E] @ P^T: already the [2,g,g] layout the upsampling wants.
            TRY_OR_RESET(op_matmul(e, &logits, &tf, &proj, NULL, false, true, 100.0f, 0.0f));
            Tensor grid = tensor_4d(logits.data, dt, e->device, 1, 2, g, g);
            // map += softmax(upsample(S))[class 1] / 4: the layer mean, one pass over the pixels.
            TRY_OR_RESET(op_upsample_softmax2_axpy(e, &out, &grid, 1.0f / VISION_TAPS));
        }
    }
    arena_reset_to(arena, mark);
    return AGPT_OK;
}

Status fewshot_refs_build(Engine *e, const Tensor ref_taps[VISION_TAPS], FewShotRefs *out) {
    memset(out, 0, sizeof *out);
    char a[96];
    const Tensor *t0 = &ref_taps[0];
    AGPT_CHECK_ARG(t0->ndim == 3 && t0->shape[0] >= 1, "fewshot_refs_build: reference taps %s, expected [k,T,C]",
                   tensor_describe(t0, a, sizeof a));
    for (int i = 1; i < VISION_TAPS; i++)
        AGPT_CHECK_ARG(tensor_same_shape(&ref_taps[i], t0) && ref_taps[i].dtype == t0->dtype &&
                           ref_taps[i].device == e->device, "fewshot_refs_build: reference tap %d differs from tap 0", i);
    int k = (int)t0->shape[0], T = (int)t0->shape[1], C = (int)t0->shape[2], N = T - 1;
    out->k = k;
    out->capacity_rows = (int64_t)k * N;
    for (int i = 0; i < VISION_TAPS; i++) {
        Tensor *p = &out->patches[i];
        *p = tensor_2d(NULL, t0->dtype, e->device, (int64_t)k * N, C);
        Status s = e->device == DEV_CUDA ? mem_device_alloc(tensor_nbytes(p), &p->data)
                                         : mem_host_alloc(tensor_nbytes(p), &p->data);
        for (int r = 0; s == AGPT_OK && r < k; r++) {
            Tensor dst = tensor_rows_view(p, (int64_t)r * N, N);
            Tensor src = tensor_rows_view(&ref_taps[i], (int64_t)r * T + 1, N);
            s = tensor_copy(&dst, &src);
        }
        if (s == AGPT_OK) s = op_l2_normalize(e, p, p, 1e-8f);
        if (s != AGPT_OK) {
            fewshot_refs_free(out);
            return s;
        }
    }
    return AGPT_OK;
}

void fewshot_refs_free(FewShotRefs *r) {
    for (int i = 0; i < VISION_TAPS; i++) {
        if (!r->patches[i].data) continue;
        if (r->patches[i].device == DEV_CUDA) mem_device_free(r->patches[i].data);
        else mem_host_free(r->patches[i].data);
    }
    memset(r, 0, sizeof *r);
}

Status fewshot_refs_append(Engine *e, const Tensor more_taps[VISION_TAPS], FewShotRefs *refs) {
    if (refs->k == 0) return fewshot_refs_build(e, more_taps, refs);
    FewShotRefs more;
    AGPT_TRY(fewshot_refs_build(e, more_taps, &more));
    const int64_t rows = refs->patches[0].shape[0], added = more.patches[0].shape[0], need = rows + added;
    const int added_k = more.k;
    const bool grow = need > refs->capacity_rows;
    const int64_t capacity = grow ? (need > 2 * refs->capacity_rows ? need : 2 * refs->capacity_rows) : refs->capacity_rows;
    Status s = AGPT_OK;
    for (int i = 0; i < VISION_TAPS && s == AGPT_OK; i++) {  // checked before anything changes: refs stay intact
        const Tensor *b = &more.patches[i];
        Tensor *a = &refs->patches[i];
        if (a->shape[1] != b->shape[1] || a->dtype != b->dtype)
            s = AGPT_FAIL(AGPT_ERR_ARG, "fewshot_refs_append: tap %d has %lld channels, the references %lld", i,
                          (long long)b->shape[1], (long long)a->shape[1]);
    }
    if (s != AGPT_OK) {
        fewshot_refs_free(&more);
        return s;
    }
    for (int i = 0; i < VISION_TAPS && s == AGPT_OK; i++) {
        Tensor *a = &refs->patches[i];
        if (grow) {  // a larger storage, the rows so far copied over (already normalised: as they are)
            Tensor bigger = tensor_2d(NULL, a->dtype, e->device, capacity, a->shape[1]);
            s = e->device == DEV_CUDA ? mem_device_alloc(tensor_nbytes(&bigger), &bigger.data)
                                      : mem_host_alloc(tensor_nbytes(&bigger), &bigger.data);
            if (s != AGPT_OK) break;
            Tensor head = tensor_rows_view(&bigger, 0, rows);
            s = tensor_copy(&head, a);
            if (a->device == DEV_CUDA) mem_device_free(a->data);
            else mem_host_free(a->data);
            a->data = bigger.data;
            if (s != AGPT_OK) break;
        }
        a->shape[0] = capacity;  // the whole storage, to view the new rows' place in it
        Tensor tail = tensor_rows_view(a, rows, added);
        s = tensor_copy(&tail, &more.patches[i]);
        a->shape[0] = rows;
    }
    fewshot_refs_free(&more);
    if (s != AGPT_OK) {  // the tensors may be half grown: gone, rather than half right
        fewshot_refs_free(refs);
        return s;
    }
    for (int i = 0; i < VISION_TAPS; i++) refs->patches[i].shape[0] = need;
    refs->capacity_rows = capacity;
    refs->k += added_k;
    return AGPT_OK;
}

Status anomaly_map_fewshot(Engine *e, const FewShotRefs *refs, Arena *arena, const Tensor taps[VISION_TAPS],
                           Tensor *map) {
    char a[96];
    const Tensor *t0 = &taps[0];
    AGPT_CHECK_ARG(refs->k >= 1, "anomaly_map_fewshot: no reference images");
    AGPT_CHECK_ARG(t0->ndim == 3 && t0->shape[2] == refs->patches[0].shape[1],
                   "anomaly_map_fewshot: query tap %s does not match the references' width %lld",
                   tensor_describe(t0, a, sizeof a), (long long)refs->patches[0].shape[1]);
    AGPT_TRY(check_inputs(e, taps, map, "anomaly_map_fewshot"));
    int B = (int)t0->shape[0], T = (int)t0->shape[1], C = (int)t0->shape[2], N = T - 1, g = grid_side(N);
    AGPT_CHECK_ARG(refs->patches[0].dtype == t0->dtype && refs->patches[0].device == e->device,
                   "anomaly_map_fewshot: references are %s on %s, the query %s on %s", dtype_name(refs->patches[0].dtype),
                   device_name(refs->patches[0].device), dtype_name(t0->dtype), device_name(e->device));
    AGPT_CHECK_ARG(g * g == N && refs->patches[0].shape[0] == (int64_t)refs->k * N,
                   "anomaly_map_fewshot: query has %d patches, references %lld", N,
                   (long long)refs->patches[0].shape[0]);
    AGPT_CHECK_ARG(map->ndim == 3 && map->shape[0] == B && map->shape[1] == map->shape[2],
                   "anomaly_map_fewshot: map %s, expected [%d,S,S]", tensor_describe(map, a, sizeof a), B);
    int S = (int)map->shape[1];
    DType dt = t0->dtype;
    size_t mark = arena_mark(arena);
    Status s;
    Tensor query, sim_layer, sim;
    TRY_OR_RESET(arena_tensor(arena, dt, 2, SHAPE(N, C), &query));
    TRY_OR_RESET(arena_tensor(arena, dt, 1, SHAPE(N), &sim_layer));
    TRY_OR_RESET(arena_tensor(arena, dt, 1, SHAPE(N), &sim));
    for (int img = 0; img < B; img++) {
        TRY_OR_RESET(tensor_zero(&sim));
        for (int i = 0; i < VISION_TAPS; i++) {
            Tensor patches = tensor_rows_view(&taps[i], (int64_t)img * T + 1, N);
            TRY_OR_RESET(op_l2_normalize(e, &query, &patches, 1e-8f));
            TRY_OR_RESET(op_max_dot(e, &sim_layer, &query, &refs->patches[i]));
            TRY_OR_RESET(op_axpy(e, &sim, &sim_layer, 1.0f / VISION_TAPS));
        }
        Tensor grid = tensor_4d(sim.data, dt, e->device, 1, 1, g, g);
        Tensor out = tensor_4d((char *)map->data + (size_t)img * S * S * dtype_size(dt), dt, e->device, 1, 1, S, S);
        TRY_OR_RESET(op_upsample_bilinear(e, &out, &grid));
        TRY_OR_RESET(op_affine(e, &out, -1.0f, 1.0f));  // 1 - sim
    }
    arena_reset_to(arena, mark);
    return AGPT_OK;
#undef TRY_OR_RESET
}

Status anomaly_map_scores(const Tensor *map, float *scores) {
    int B = (int)map->shape[0];
    int64_t per = tensor_numel(map) / B;
    Tensor host = tensor_make(NULL, DT_F32, DEV_CPU, map->ndim, map->shape);
    AGPT_TRY(mem_host_alloc(tensor_nbytes(&host), &host.data));
    Status s = AGPT_OK;
    if (map->dtype == DT_F32) {
        s = tensor_copy(&host, map);
    } else {  // f16/bf16 on the device: bring the raw values back, then widen
        Tensor raw = *map;
        raw.device = DEV_CPU;
        s = mem_host_alloc(tensor_nbytes(map), &raw.data);
        if (s == AGPT_OK) s = tensor_copy(&raw, map);
        if (s == AGPT_OK) convert_host(host.data, DT_F32, raw.data, map->dtype, (size_t)tensor_numel(map));
        mem_host_free(raw.data);
    }
    if (s == AGPT_OK) {
        const float *m = host.data;
        for (int b = 0; b < B; b++) {
            float mx = -FLT_MAX;
            for (int64_t i = 0; i < per; i++) mx = m[b * per + i] > mx ? m[b * per + i] : mx;
            scores[b] = mx;
        }
    }
    mem_host_free(host.data);
    return s;
}

// ---------------------------------------------------------------------------------------------------------
// Random weights at any size, for benchmarks: the same structures as decoder_load makes, without a file.


static Status decoder_random_upload(WeightStore *w, Rng *rng, float std, int ndim, const int64_t *shape,
                                    Tensor *out) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    float *host = NULL;
    AGPT_TRY(mem_host_alloc(n * sizeof(float), (void **)&host));
    rng_fill_normal(rng, host, n, 0.0f, std);
    Status s = weights_upload(w, host, ndim, shape, out);
    mem_host_free(host);
    return s;
}

Status decoder_init_random(PatchDecoder *d, WeightStore *w, int in_dim, int out_dim, uint64_t seed) {
    memset(d, 0, sizeof *d);
    AGPT_CHECK_ARG(in_dim >= 1 && out_dim >= 1, "decoder_init_random: %d -> %d", in_dim, out_dim);
    Rng rng;
    rng_seed(&rng, seed);
    d->in_dim = in_dim, d->out_dim = out_dim;
    for (int i = 0; i < VISION_TAPS; i++) {
        AGPT_TRY(decoder_random_upload(w, &rng, 1.0f / sqrtf((float)in_dim), 2, SHAPE(out_dim, in_dim), &d->fc_w[i]));
        AGPT_TRY(decoder_random_upload(w, &rng, 0.02f, 1, SHAPE(out_dim), &d->fc_b[i]));
    }
    return AGPT_OK;
}
