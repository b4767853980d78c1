#include "model/vision_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "model/model_file.h"
#include "runtime/log.h"
#include "runtime/memory.h"

Status vision_model_open(VisionModel *m, Engine *e, const char *path, const char *const *overlays, int n_overlays,
                         DType dtype, int max_batch) {
    memset(m, 0, sizeof *m);
    m->engine = e;
    m->max_batch = max_batch > 0 ? max_batch : 1;
    m->mode = PREPROCESS_SHORTER_SIDE_CROP;
    AGPT_CHECK_ARG(n_overlays >= 0 && n_overlays < WEIGHT_MAX_FILES, "at most %d layered files", WEIGHT_MAX_FILES - 1);
    Status s = AGPT_OK;
    // Overlays first: the store searches files in order, so their tensors win.
    for (int i = 0; i < n_overlays && s == AGPT_OK; i++) s = st_open(overlays[i], &m->files[m->n_files++]);
    if (s == AGPT_OK) s = st_open(path, &m->files[m->n_files++]);
    if (s != AGPT_OK) {
        m->n_files--;  // the failed slot holds NULL
        vision_model_close(m);
        return s;
    }
    for (int i = 0; i < m->n_files && s == AGPT_OK; i++)
        s = model_file_check_version(m->files[i], i < n_overlays ? overlays[i] : path);
    if (s != AGPT_OK) {
        vision_model_close(m);
        return s;
    }
    weights_init(&m->weights, e, dtype, m->files[0], n_overlays ? overlays[0] : path);
    m->weights.file_name = path;  // messages about the model as a whole name the model file
    for (int i = 1; i < m->n_files && s == AGPT_OK; i++)
        s = weights_add_file(&m->weights, m->files[i], i < n_overlays ? overlays[i] : path);
    // On the CPU a bf16/f16 dtype keeps the encoders' block matrices in it (f32 arithmetic): half the memory, and
    // with the CPU's bf16 GEMM switched on, about twice the speed.
    if (s == AGPT_OK && e->device == DEV_CPU && (dtype == DT_BF16 || dtype == DT_F16))
        s = weights_set_matrix_dtype(&m->weights, dtype);
    if (s == AGPT_OK) s = vision_load(&m->vision, &m->weights);
    if (s == AGPT_OK) s = decoder_load(&m->decoder, &m->weights);
    if (s == AGPT_OK && m->decoder.in_dim != m->vision.block.dim)
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: the decoder takes width %d but the vision encoder is %d wide", path,
                      m->decoder.in_dim, m->vision.block.dim);
    // The text encoder is optional (a model file may carry cached class features instead), but one that is
    // there must load: a broken or half-loaded one is an error, not a silent fallback.
    if (s == AGPT_OK && weights_has(&m->weights, "modality_preprocessors.text.token_embedding.weight")) {
        s = text_load(&m->text, &m->weights);
        m->has_text = s == AGPT_OK;
    } else if (s == AGPT_OK) {
        LOG_D("no text encoder in %s: only cached class features are usable", path);
    }
    if (s != AGPT_OK) {
        vision_model_close(m);
        return s;
    }
    // One arena for everything a batch needs: inputs, outputs, and the larger of the encoders' temporaries.
    const VisionEncoder *v = &m->vision;
    int B = m->max_batch, S = v->image, T = v->tokens, C = v->block.dim;
    size_t f = sizeof(float), io = (size_t)B * 3 * S * S * f + (size_t)B * v->embed * f +
                                   (size_t)VISION_TAPS * B * T * C * f + 16 * AGPT_ALIGN;
    size_t temps = vision_arena_bytes(v, B);
    if (m->has_text) {
        size_t tb = text_arena_bytes(&m->text, PROMPT_SENTENCES) + (size_t)PROMPT_SENTENCES * m->text.embed * f +
                    (size_t)2 * m->text.embed * f + 4 * AGPT_ALIGN;  // the sentence embeddings and the [2,E] result
        if (tb > temps) temps = tb;
    }
    size_t maps = anomaly_map_arena_bytes(&m->decoder, T, S, 0) + (size_t)2 * B * S * S * f;  // map + fused map
    if (maps > temps) temps = maps;
    DType dt = m->weights.dtype;
    s = arena_init(&m->arena, e->device, io + temps + 8 * AGPT_ALIGN);
    if (s == AGPT_OK) s = arena_tensor(&m->arena, dt, 4, (int64_t[]){B, 3, S, S}, &m->images);
    if (s == AGPT_OK) s = arena_tensor(&m->arena, dt, 2, (int64_t[]){B, v->embed}, &m->embedding);
    for (int i = 0; i < VISION_TAPS && s == AGPT_OK; i++)
        s = arena_tensor(&m->arena, dt, 3, (int64_t[]){B, T, C}, &m->taps[i]);
    if (s != AGPT_OK) {
        vision_model_close(m);
        return s;
    }
    LOG_I("model %s: vision %d blocks x %d wide, %s text encoder, %.1f MB of weights on %s (%s)", path,
          v->layers, C, m->has_text ? "with" : "no", (double)m->weights.bytes / 1e6, device_name(e->device),
          dtype_name(dt));
    return AGPT_OK;
}

static void free_device(Engine *e, void *p) {
    if (e->device == DEV_CUDA) mem_device_free(p);
    else mem_host_free(p);
}

void vision_model_close(VisionModel *m) {
    for (int i = 0; i < m->n_classes; i++) free_device(m->engine, m->classes[i].features.data);
    fewshot_refs_free(&m->refs);
    clip_tokenizer_free(m->own_tokenizer);
    if (m->arena.base) arena_free(&m->arena);
    vision_free(&m->vision);
    text_free(&m->text);
    if (m->weights.engine) weights_free(&m->weights);
    for (int i = 0; i < m->n_files; i++) st_close(m->files[i]);
    memset(m, 0, sizeof *m);
}

// A new device tensor holding a copy of src (any device).
static Status clone_to_device(Engine *e, const Tensor *src, DType dt, Tensor *out) {
    *out = tensor_make(NULL, dt, e->device, src->ndim, src->shape);
    size_t bytes = tensor_nbytes(out);
    AGPT_TRY(e->device == DEV_CUDA ? mem_device_alloc(bytes, &out->data) : mem_host_alloc(bytes, &out->data));
    Status s;
    if (src->dtype == dt) {
        s = tensor_copy(out, src);
    } else {  // host data of another float dtype: convert on the host first
        void *tmp = NULL;
        s = mem_host_alloc(bytes, &tmp);
        if (s == AGPT_OK && convert_host(tmp, dt, src->data, src->dtype, (size_t)tensor_numel(src)) != 0)
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "cannot convert %s features", dtype_name(src->dtype));
        if (s == AGPT_OK) {
            Tensor h = *out;
            h.device = DEV_CPU;
            h.data = tmp;
            s = tensor_copy(out, &h);
        }
        mem_host_free(tmp);
    }
    if (s != AGPT_OK) free_device(e, out->data);
    return s;
}

void vision_model_set_tokenizer(VisionModel *m, const ClipTokenizer *tokenizer) { m->tokenizer = tokenizer; }

size_t class_features_arena_bytes(const TextEncoder *t) {
    return text_arena_bytes(t, PROMPT_SENTENCES) + (size_t)PROMPT_SENTENCES * t->embed * sizeof(float) +
           2 * AGPT_ALIGN;
}

Status class_features_compute(Engine *e, const TextEncoder *t, const ClipTokenizer *tokenizer, Arena *arena,
                              const char *name, Tensor *features) {
    AGPT_CHECK_ARG(t->context == CLIP_CONTEXT_LENGTH, "the text encoder's context is %d tokens, the CLIP "
                   "tokenizer writes %d", t->context, CLIP_CONTEXT_LENGTH);
    AGPT_CHECK_ARG(features->ndim == 2 && features->shape[0] == 2 && features->shape[1] == t->embed,
                   "class features: want [2,%d]", t->embed);
    char sentences[PROMPT_SENTENCES][256];
    int n = prompt_sentences(name, sentences, PROMPT_SENTENCES);
    int32_t ids[PROMPT_SENTENCES][CLIP_CONTEXT_LENGTH];
    for (int i = 0; i < n; i++) {
        ClipTokens tok;
        AGPT_TRY(clip_tokenize_ex(tokenizer, sentences[i], &tok));
        if (tok.truncated) LOG_W("class '%s': prompt '%s' is longer than %d tokens and was cut", name, sentences[i],
                                 CLIP_CONTEXT_LENGTH);
        memcpy(ids[i], tok.ids, sizeof ids[i]);
    }
    size_t mark = arena_mark(arena);
    Tensor emb;
    Status s = arena_tensor(arena, features->dtype, 2, (int64_t[]){PROMPT_SENTENCES, t->embed}, &emb);
    if (s == AGPT_OK) s = text_forward(e, t, arena, &ids[0][0], n, &emb);
    if (s == AGPT_OK) s = prompt_ensemble(e, &emb, features);
    arena_reset_to(arena, mark);
    return s;
}

// The prompt ensemble of a class name through the text encoder: 24 sentences -> [2,E] owned features.
static Status compute_class_features(VisionModel *m, const char *name, Tensor *out) {
    DType dt = m->weights.dtype;
    size_t mark = arena_mark(&m->arena);
    Tensor features;
    Status s = arena_tensor(&m->arena, dt, 2, (int64_t[]){2, m->text.embed}, &features);
    if (s == AGPT_OK) s = class_features_compute(m->engine, &m->text, m->tokenizer, &m->arena, name, &features);
    if (s == AGPT_OK) s = clone_to_device(m->engine, &features, dt, out);
    arena_reset_to(&m->arena, mark);
    return s;
}

// The CLIP vocabulary embedded in the model file, loaded the first time a class name needs it.
static Status embedded_tokenizer(VisionModel *m) {
    if (m->tokenizer) return AGPT_OK;
    const void *bytes;
    size_t n;
    AGPT_TRY(model_file_blob(&m->weights, MODEL_TENSOR_CLIP_BPE, &bytes, &n));
    if (!bytes) return AGPT_OK;
    Status s = clip_tokenizer_load_memory(bytes, n, &m->own_tokenizer);
    if (s != AGPT_OK) return agpt_add_context(s, "%s: the embedded CLIP vocabulary (%s)", m->weights.file_name,
                                              MODEL_TENSOR_CLIP_BPE);
    m->tokenizer = m->own_tokenizer;
    return AGPT_OK;
}

Status vision_model_class_features(VisionModel *m, const char *name, const Tensor **features,
                                   const char **used_name) {
    char key[192], clean[128];
    snprintf(clean, sizeof clean, "%s", name && *name ? name : "object");
    for (char *c = clean; *c; c++)
        if (*c == '_') *c = ' ';  // the reference reads class folder names with '_' as ' '
    for (int i = 0; i < m->n_classes; i++)
        if (strcmp(m->classes[i].name, clean) == 0) {
            *features = &m->classes[i].features;
            *used_name = m->classes[i].used;
            return AGPT_OK;
        }
    AGPT_CHECK_ARG(m->n_classes < VISION_MODEL_MAX_CLASSES, "more than %d class names in one session",
                   VISION_MODEL_MAX_CLASSES);
    ClassFeatures *cf = &m->classes[m->n_classes];
    snprintf(cf->name, sizeof cf->name, "%s", clean);
    snprintf(cf->used, sizeof cf->used, "%s", clean);
    snprintf(key, sizeof key, MODEL_TEXT_FEATURES_PREFIX "%s", clean);
    int E = m->decoder.out_dim;
    if (weights_has(&m->weights, key)) {
        AGPT_TRY(weights_load(&m->weights, key, 2, (int64_t[]){2, E}, &cf->features));
        // weights_load keeps it in the store; copy so that every class entry owns its tensor alike
        Tensor loaded = cf->features;
        AGPT_TRY(clone_to_device(m->engine, &loaded, loaded.dtype, &cf->features));
    } else if (m->has_text) {
        AGPT_TRY(embedded_tokenizer(m));
        if (!m->tokenizer)
            return AGPT_FAIL(AGPT_ERR_ARG, "class '%s' is not cached in the model file; computing its text features "
                             "needs the CLIP vocabulary (bpe_simple_vocab_16e6.txt.gz): pass --clip-vocab FILE, or "
                             "convert the model with --clip-vocab so that it is embedded", clean);
        AGPT_TRY(compute_class_features(m, clean, &cf->features));
    } else {
        if (strcmp(clean, "object") == 0)
            return AGPT_FAIL(AGPT_ERR_FORMAT, "the model file has neither a text encoder nor cached features for "
                             "'object'; it cannot make zero-shot maps (give --reference images instead)");
        LOG_W("class '%s' has no cached text features and the model has no text encoder: using 'object', as the "
              "reference does for class names it does not know", clean);
        // Remembered under its own name with a copy of object's features, so that it warns once, not per image.
        const Tensor *object;
        AGPT_TRY(vision_model_class_features(m, "object", &object, used_name));
        cf = &m->classes[m->n_classes];  // the call above may have added 'object' in this slot
        AGPT_CHECK_ARG(m->n_classes < VISION_MODEL_MAX_CLASSES, "more than %d class names in one session",
                       VISION_MODEL_MAX_CLASSES);
        snprintf(cf->name, sizeof cf->name, "%s", clean);
        snprintf(cf->used, sizeof cf->used, "object");
        AGPT_TRY(clone_to_device(m->engine, object, object->dtype, &cf->features));
    }
    m->n_classes++;
    *features = &cf->features;
    *used_name = cf->used;
    return AGPT_OK;
}

// The variants of n images: variant i is images[i % n] moved by view v = i / (n * turns), (v / N, v % N) x
// patch / N pixels down and right (N = shifts), then turned (i / n) % turns quarters; i < n * turns * N * N.
// Preprocesses variants [first, first + count) into m->images rows [0, count).
static Status upload_variants(VisionModel *m, const Image *images, int n, int turns, int shifts, int first,
                              int count) {
    int S = m->vision.image;
    size_t per = (size_t)3 * S * S;
    float *chw = NULL, *turned = NULL;
    AGPT_TRY(mem_host_alloc(per * sizeof(float), (void **)&chw));
    void *conv = NULL;
    Status s = mem_host_alloc(per * sizeof(float), &conv);
    if (s == AGPT_OK) s = mem_host_alloc(per * sizeof(float), (void **)&turned);
    DType dt = m->images.dtype;
    for (int row = 0; row < count && s == AGPT_OK; row++) {
        int i = first + row;
        s = preprocess_image(&images[i % n], m->mode, S, chw);
        if (s != AGPT_OK) {
            s = agpt_add_context(s, "image %d", i % n);
            break;
        }
        int view = i / (n * turns);
        if (view) {
            preprocess_reference_view(chw, S, m->vision.patch, shifts, view, turned);
            float *swap = chw;
            chw = turned, turned = swap;
        }
        if ((i / n) % turns) {
            preprocess_rotate_chw(chw, S, (i / n) % turns, turned);
            float *swap = chw;
            chw = turned, turned = swap;
        }
        convert_host(conv, dt, chw, DT_F32, per);
        Tensor host = tensor_1d(conv, dt, DEV_CPU, (int64_t)per);
        Tensor dst = tensor_1d((char *)m->images.data + row * per * dtype_size(dt), dt, m->engine->device,
                               (int64_t)per);
        s = tensor_copy(&dst, &host);
    }
    mem_host_free(chw);
    mem_host_free(turned);
    mem_host_free(conv);
    return s;
}

static Status upload_images(VisionModel *m, const Image *images, int n) { return upload_variants(m, images, n, 1, 1, 0, n); }

// Runs the encoder on the first n rows of m->images; taps and embedding views of n images come back.
static Status encode(VisionModel *m, int n, Tensor taps[VISION_TAPS], Tensor *embedding) {
    const VisionEncoder *v = &m->vision;
    DType dt = m->images.dtype;
    Device dev = m->engine->device;
    int S = v->image, T = v->tokens, C = v->block.dim;
    Tensor images = tensor_4d(m->images.data, dt, dev, n, 3, S, S);
    *embedding = tensor_2d(m->embedding.data, dt, dev, n, v->embed);
    for (int i = 0; i < VISION_TAPS; i++) taps[i] = tensor_3d(m->taps[i].data, dt, dev, n, T, C);
    return vision_forward(m->engine, v, &m->arena, &images, embedding, taps);
}

Status vision_model_set_references(VisionModel *m, const Image *refs, int k) {
    fewshot_refs_free(&m->refs);
    if (k == 0) return AGPT_OK;
    int turns = m->augment_rotations ? 4 : 1, shifts = m->reference_shifts > 1 ? m->reference_shifts : 1;
    AGPT_CHECK_ARG(shifts <= m->vision.patch, "%d reference shifts per axis: at most the patch side, %d", shifts,
                   m->vision.patch);
    int variants = k * turns * shifts * shifts;
    Status s = AGPT_OK;
    for (int first = 0; first < variants && s == AGPT_OK; first += m->max_batch) {  // in encoder batches
        int count = variants - first < m->max_batch ? variants - first : m->max_batch;
        Tensor taps[VISION_TAPS], emb;
        s = upload_variants(m, refs, k, turns, shifts, first, count);
        if (s == AGPT_OK) s = encode(m, count, taps, &emb);
        if (s == AGPT_OK) s = fewshot_refs_append(m->engine, taps, &m->refs);
    }
    if (s != AGPT_OK) fewshot_refs_free(&m->refs);
    return s;
}

Status vision_model_map(VisionModel *m, const Image *images, int n, const char *class_name, float *maps,
                        float *scores) {
    AGPT_CHECK_ARG(n >= 1 && n <= m->max_batch, "vision_model_map: %d images for a batch of %d", n, m->max_batch);
    const Tensor *features = NULL;
    const char *used = NULL;
    bool text_map = m->refs.k == 0 || m->fuse_text_map;
    if (text_map) AGPT_TRY(vision_model_class_features(m, class_name, &features, &used));
    AGPT_TRY(upload_images(m, images, n));
    Tensor taps[VISION_TAPS], emb;
    AGPT_TRY(encode(m, n, taps, &emb));
    int S = m->vision.image;
    DType dt = m->images.dtype;
    size_t mark = arena_mark(&m->arena);
    Tensor map;
    AGPT_TRY(arena_tensor(&m->arena, dt, 3, (int64_t[]){n, S, S}, &map));
    Status s = m->refs.k > 0 ? anomaly_map_fewshot(m->engine, &m->refs, &m->arena, taps, &map)
                             : anomaly_map_text(m->engine, &m->decoder, &m->arena, taps, features, &map);
    if (s == AGPT_OK && m->refs.k > 0 && m->fuse_text_map) {  // (few-shot + zero-shot) / 2
        Tensor text;
        s = arena_tensor(&m->arena, dt, 3, (int64_t[]){n, S, S}, &text);
        if (s == AGPT_OK) s = anomaly_map_text(m->engine, &m->decoder, &m->arena, taps, features, &text);
        if (s == AGPT_OK) s = op_axpy(m->engine, &map, &text, 1.0f);
        if (s == AGPT_OK) s = op_scale(m->engine, &map, 0.5f);
    }
    if (s == AGPT_OK) s = anomaly_map_scores(&map, scores);
    if (s == AGPT_OK) {  // the maps back to the host as f32
        Tensor raw = map;
        raw.device = DEV_CPU;
        raw.data = dt == DT_F32 ? (void *)maps : NULL;
        if (dt != DT_F32) s = mem_host_alloc(tensor_nbytes(&map), &raw.data);
        if (s == AGPT_OK) s = tensor_copy(&raw, &map);
        if (s == AGPT_OK && dt != DT_F32) convert_host(maps, DT_F32, raw.data, dt, (size_t)tensor_numel(&map));
        if (dt != DT_F32) mem_host_free(raw.data);
    }
    arena_reset_to(&m->arena, mark);
    return s;
}
