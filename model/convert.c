#define _DEFAULT_SOURCE  // strdup
#include "model/convert.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "model/clip_tokenizer.h"
#include "model/imagebind.h"
#include "model/model_file.h"
#include "model/sp_tokenizer.h"
#include "model/vision_model.h"
#include "runtime/checkpoint.h"
#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/st_stream.h"
#include "runtime/text.h"
#include "runtime/timer.h"

enum { SRC_IMAGEBIND, SRC_VICUNA, SRC_PANDAGPT, SRC_ANOMALYGPT, SRC_COUNT };
static const char *const source_flag[SRC_COUNT] = {"--imagebind", "--vicuna", "--pandagpt", "--anomalygpt"};

// One tensor of the output: where its bytes come from and what it becomes.
typedef struct PlanItem {
    char *name;
    int source, tensor;          // a checkpoint tensor (source >= 0), or:
    const void *blob;            // file bytes (U8), or
    const char *class_name;      // text features computed after the weights are written
    DType dtype;
    int ndim;
    int64_t shape[CKPT_MAX_DIMS];
} PlanItem;

typedef struct Plan {
    PlanItem *items;
    int n, cap;
} Plan;

static bool starts_with(const char *s, const char *prefix) { return strncmp(s, prefix, strlen(prefix)) == 0; }
static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

// Which input tensors each source contributes (anomalygpt-reference.md 8).
static bool keep_imagebind(const char *name) {
    static const char *const prefixes[] = {"modality_preprocessors.vision.", "modality_trunks.vision.",
                                           "modality_heads.vision.",         "modality_postprocessors.vision.",
                                           "modality_preprocessors.text.",   "modality_trunks.text.",
                                           "modality_heads.text.",           "modality_postprocessors.text."};
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++)
        if (starts_with(name, prefixes[i])) return true;
    return false;
}
static bool keep_lora_or_proj(const char *name) {
    return starts_with(name, "llama_proj.") || strstr(name, ".lora_A.") || strstr(name, ".lora_B.");
}
static bool keep_source(int source, const char *name) {
    switch (source) {
    case SRC_IMAGEBIND: return keep_imagebind(name);
    case SRC_VICUNA:
        return (starts_with(name, "model.") || starts_with(name, "lm_head.")) && !ends_with(name, "rotary_emb.inv_freq");
    case SRC_PANDAGPT: return keep_lora_or_proj(name);
    default: return starts_with(name, "image_decoder.") || starts_with(name, "prompt_learner.") || keep_lora_or_proj(name);
    }
}

// The key that says a file is what its flag claims, and what to say when it is missing.
static const char *const source_key[SRC_COUNT] = {
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight", "model.embed_tokens.weight", "llama_proj.weight",
    "prompt_learner.base_prompts"};
static const char *const source_what[SRC_COUNT] = {"an ImageBind checkpoint (imagebind_huge.pth)",
                                                   "a Vicuna / LLaMA HF directory",
                                                   "a PandaGPT delta (pandagpt_7b pytorch_model.pt)",
                                                   "an AnomalyGPT checkpoint (train_*/pytorch_model.pt)"};

static Status plan_add(Plan *p, const PlanItem *item) {
    for (int i = 0; i < p->n; i++)
        if (strcmp(p->items[i].name, item->name) == 0) {  // a later file wins, as the reference's load order
            LOG_D("convert: '%s' from %s replaces the earlier one", item->name,
                  item->source >= 0 ? source_flag[item->source] : "(generated)");
            free(p->items[i].name);
            p->items[i] = *item;
            p->items[i].name = strdup(item->name);
            return p->items[i].name ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
        }
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 256;
        PlanItem *items = realloc(p->items, (size_t)cap * sizeof *items);
        if (!items) return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
        p->items = items, p->cap = cap;
    }
    p->items[p->n] = *item;
    p->items[p->n].name = strdup(item->name);
    if (!p->items[p->n].name) return AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
    p->n++;
    return AGPT_OK;
}

static const PlanItem *plan_find(const Plan *p, const char *name) {
    for (int i = 0; i < p->n; i++)
        if (strcmp(p->items[i].name, name) == 0) return &p->items[i];
    return NULL;
}

static void plan_free(Plan *p) {
    for (int i = 0; i < p->n; i++) free(p->items[i].name);
    free(p->items);
}

static uint64_t item_bytes(const PlanItem *it) {
    uint64_t n = 1;
    for (int d = 0; d < it->ndim; d++) n *= (uint64_t)it->shape[d];
    return n * dtype_size(it->dtype);
}

static const char *st_dtype_name(DType dt) {
    switch (dt) {
    case DT_F32: return "F32";
    case DT_F16: return "F16";
    case DT_BF16: return "BF16";
    case DT_I32: return "I32";
    default: return "U8";
    }
}

static Status read_whole_file(const char *path, uint64_t limit, void **data, size_t *n) {
    *data = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (len < 0 || (uint64_t)len > limit) {
        fclose(f);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: %ld bytes is not a plausible size for it", path, len);
    }
    *data = malloc((size_t)len + 1);
    size_t got = *data ? fread(*data, 1, (size_t)len, f) : 0;
    fclose(f);
    if (!*data || got != (size_t)len) {
        free(*data);
        *data = NULL;
        return AGPT_FAIL(AGPT_ERR_IO, "cannot read %s", path);
    }
    ((char *)*data)[len] = 0;
    *n = (size_t)len;
    return AGPT_OK;
}

// The LLaMA settings the shapes do not carry, from an HF config.json beside the shards.
typedef struct LlamaSettings {
    int heads;
    double rms_eps, rope_base;
} LlamaSettings;

static Status read_hf_config(const char *dir, LlamaSettings *out) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct stat sb;
    if (stat(path, &sb) != 0) return AGPT_OK;
    void *text;
    size_t n;
    AGPT_TRY(read_whole_file(path, 1 << 20, &text, &n));
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s is not a JSON object", path);
    }
    const cJSON *heads = cJSON_GetObjectItemCaseSensitive(root, "num_attention_heads");
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(root, "num_key_value_heads");
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(root, "rms_norm_eps");
    const cJSON *theta = cJSON_GetObjectItemCaseSensitive(root, "rope_theta");
    Status s = AGPT_OK;
    if (cJSON_IsNumber(heads)) out->heads = heads->valueint;
    if (cJSON_IsNumber(kv) && cJSON_IsNumber(heads) && kv->valueint != heads->valueint)
        s = AGPT_FAIL(AGPT_ERR_UNSUPPORTED, "%s: grouped-query attention (%d key/value heads for %d heads) is not "
                      "LLaMA-1 / Vicuna v0, which AnomalyGPT uses", path, kv->valueint, heads->valueint);
    if (cJSON_IsNumber(eps)) out->rms_eps = eps->valuedouble;
    if (cJSON_IsNumber(theta)) out->rope_base = theta->valuedouble;
    cJSON_Delete(root);
    return s;
}

static int count_blocks(const Plan *p, const char *trunk) {
    char name[256];
    int n = 0;
    for (;; n++) {
        snprintf(name, sizeof name, "modality_trunks.%s.blocks.%d.attn.in_proj_weight", trunk, n);
        if (!plan_find(p, name)) return n;
    }
}

static int64_t dim_of(const Plan *p, const char *name, int d) {
    const PlanItem *it = plan_find(p, name);
    return it && d < it->ndim ? it->shape[d] : -1;
}

static Status check_taps(const char *taps, int layers) {
    const char *q = taps;
    int prev = -1;
    for (int i = 0; i < VISION_TAPS; i++) {
        char *end;
        long x = strtol(q, &end, 10);
        if (end == q || x <= prev || x >= layers || (i < VISION_TAPS - 1 ? *end != ',' : *end != 0))
            return AGPT_FAIL(AGPT_ERR_ARG, "--layers '%s': want %d increasing block indices below %d, comma-separated",
                             taps, VISION_TAPS, layers);
        prev = (int)x;
        q = end + 1;
    }
    return AGPT_OK;
}

// Whether path names the same file as `input` (also through links), so that writing it would destroy an input.
static bool same_file(const char *path, const char *input) {
    struct stat a, b;
    return input && stat(path, &a) == 0 && stat(input, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// The output and its temporary must not be any input: the temporary is truncated while inputs are mapped.
static Status check_output_is_not_an_input(const char *output, Checkpoint *const src[SRC_COUNT],
                                           const char *const *blobs, int n_blobs) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", output);
    const char *targets[2] = {output, tmp};
    for (int t = 0; t < 2; t++) {
        for (int k = 0; k < SRC_COUNT; k++)
            for (int f = 0; src[k] && f < ckpt_file_count(src[k]); f++)
                if (same_file(targets[t], ckpt_file_path(src[k], f)))
                    return AGPT_FAIL(AGPT_ERR_ARG, "writing %s would overwrite the input %s; choose another -o",
                                     targets[t], ckpt_file_path(src[k], f));
        for (int b = 0; b < n_blobs; b++)
            if (same_file(targets[t], blobs[b]))
                return AGPT_FAIL(AGPT_ERR_ARG, "writing %s would overwrite the input %s; choose another -o", targets[t],
                                 blobs[b]);
    }
    return AGPT_OK;
}

static const char *first_name(const Checkpoint *c) {
    CkptTensor t;
    return ckpt_count(c) && ckpt_tensor(c, 0, &t) == AGPT_OK ? t.name : "none";
}

// Tensors stream through a buffer of this many elements (32 MB of f32), so memory does not grow with the model.
#define CONVERT_CHUNK_ELEMS ((int64_t)8 << 20)

// One input tensor to its place in the output: in pieces through `buffer` when it is contiguous, else whole
// through a temporary of its size (rare: views saved as they were, f64 tensors).
static Status stream_tensor(const Checkpoint *c, const PlanItem *it, StStream *out, int index, void *buffer,
                            uint64_t *largest_whole) {
    CkptTensor t;
    AGPT_TRY(ckpt_tensor(c, it->tensor, &t));
    size_t esz = dtype_size(it->dtype);
    Status s = AGPT_OK;
    for (int64_t first = 0; first < t.numel && s == AGPT_OK; first += CONVERT_CHUNK_ELEMS) {
        int64_t count = t.numel - first < CONVERT_CHUNK_ELEMS ? t.numel - first : CONVERT_CHUNK_ELEMS;
        s = ckpt_read_part(c, it->tensor, it->dtype, first, count, buffer);
        if (s == AGPT_ERR_UNSUPPORTED && first == 0) break;
        if (s == AGPT_OK) s = st_stream_write(out, index, (size_t)first * esz, buffer, (size_t)count * esz);
    }
    if (s != AGPT_ERR_UNSUPPORTED) return s;
    agpt_clear_error();
    size_t bytes = (size_t)t.numel * esz;
    void *whole = NULL;
    AGPT_TRY(mem_host_alloc(bytes ? bytes : 1, &whole));
    if (bytes > *largest_whole) *largest_whole = bytes;
    s = ckpt_read(c, it->tensor, it->dtype, whole, bytes);
    if (s == AGPT_OK) s = st_stream_write(out, index, 0, whole, bytes);
    ckpt_release(c, it->tensor);
    mem_host_free(whole);
    return s;
}

static uint64_t peak_rss_bytes(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? (uint64_t)ru.ru_maxrss * 1024 : 0;
}

// The text features of every planned class, computed with the text encoder read back from the new file.
static Status write_text_features(const ConvertOptions *o, const Plan *p, StStream *out, const ClipTokenizer *tok,
                                  int *written) {
    const char *tmp = st_stream_tmp_path(out);
    SafeTensors *file = NULL;
    Engine engine;
    bool have_engine = false;
    WeightStore w = {0};
    TextEncoder text = {0};
    Arena arena = {0};
    Status s = st_open(tmp, &file);
    if (s == AGPT_OK && (s = engine_create(&engine, DEV_CPU, 0, o->threads, 0)) == AGPT_OK) have_engine = true;
    if (s == AGPT_OK) {
        weights_init(&w, &engine, DT_F32, file, tmp);
        s = text_load(&text, &w);
    }
    if (s == AGPT_OK) s = arena_init(&arena, DEV_CPU, class_features_arena_bytes(&text) + 2 * (size_t)text.embed * 4 +
                                                           4 * AGPT_ALIGN);
    int n_classes = 0;
    for (int i = 0; i < p->n; i++) n_classes += p->items[i].class_name != NULL;
    Progress bar;
    if (s == AGPT_OK) progress_begin(&bar, "text features", n_classes);
    for (int i = 0; i < p->n && s == AGPT_OK; i++) {
        const PlanItem *it = &p->items[i];
        if (!it->class_name) continue;
        size_t mark = arena_mark(&arena);
        Tensor features;
        s = arena_tensor(&arena, DT_F32, 2, (int64_t[]){2, text.embed}, &features);
        if (s == AGPT_OK) s = class_features_compute(&engine, &text, tok, &arena, it->class_name, &features);
        if (s == AGPT_OK) s = st_stream_write(out, i, 0, features.data, tensor_nbytes(&features));
        arena_reset_to(&arena, mark);
        if (s == AGPT_OK) (*written)++, progress_step(&bar, 1);
    }
    if (n_classes && s == AGPT_OK) progress_end(&bar);
    if (arena.base) arena_free(&arena);
    text_free(&text);
    if (w.engine) weights_free(&w);
    if (have_engine) engine_destroy(&engine);
    st_close(file);
    return s == AGPT_OK ? s : agpt_add_context(s, "computing the class text features");
}

Status convert_run(const ConvertOptions *o, ConvertReport *report) {
    memset(report, 0, sizeof *report);
    double t0 = timer_now_s();
    const char *paths[SRC_COUNT] = {o->imagebind, o->vicuna, o->pandagpt, o->anomalygpt};
    AGPT_CHECK_ARG(o->output && o->output[0], "convert: no output file (-o)");
    AGPT_CHECK_ARG(paths[0] || paths[1] || paths[2] || paths[3],
                   "convert: nothing to convert: give --imagebind, --vicuna, --pandagpt and/or --anomalygpt");
    AGPT_CHECK_ARG(o->dtype == DT_F32 || o->dtype == DT_F16 || o->dtype == DT_BF16, "convert: --dtype must be f32, "
                   "f16 or bf16");
    Checkpoint *src[SRC_COUNT] = {NULL};
    Plan plan = {0};
    void *sp_bytes = NULL, *clip_bytes = NULL;
    size_t sp_n = 0, clip_n = 0;
    ClipTokenizer *clip = NULL;
    StStream *out = NULL;
    void *buffer = NULL;
    char *lossy_paths[SRC_COUNT] = {NULL};
    char taps[64] = "", vheads[16], theads[16], lheads[16], eps[32], base[32], alpha[32], version[16];
    LlamaSettings llama = {0, 1e-6, 10000.0};
    const char *sp_path = o->tokenizer;
    char sp_default[4096];
    Status s = AGPT_OK;

    // 1. Open every source and decide what each contributes.
    for (int k = 0; k < SRC_COUNT && s == AGPT_OK; k++) {
        if (!paths[k]) continue;
        s = ckpt_open(paths[k], &src[k]);
        if (s != AGPT_OK) {
            s = agpt_add_context(s, "%s %s", source_flag[k], paths[k]);
            break;
        }
        if (ckpt_find(src[k], source_key[k]) < 0) {
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s %s does not look like %s: it has no '%s' (its first tensor is '%s'); "
                          "is it the file of another flag?", source_flag[k], paths[k], source_what[k], source_key[k],
                          first_name(src[k]));
            break;
        }
        LOG_I("convert: %s %s: %d tensors in %d file(s), %.1f MB", source_flag[k], paths[k], ckpt_count(src[k]),
              ckpt_file_count(src[k]), (double)ckpt_total_bytes(src[k]) / 1e6);
        for (int i = 0; i < ckpt_count(src[k]) && s == AGPT_OK; i++) {
            CkptTensor t;
            s = ckpt_tensor(src[k], i, &t);
            if (s != AGPT_OK) break;
            if (!keep_source(k, t.name) || !t.is_float) {
                LOG_D("convert: skipping %s '%s' (%s)", source_flag[k], t.name, t.dtype);
                report->skipped++;
                continue;
            }
            PlanItem it = {.name = (char *)t.name, .source = k, .tensor = i, .ndim = t.ndim,
                           .dtype = t.ndim >= 2 ? o->dtype : DT_F32};
            memcpy(it.shape, t.shape, sizeof it.shape);
            uint64_t in_bytes = (uint64_t)t.numel * (strcmp(t.dtype, "F64") == 0 ? 8 : strcmp(t.dtype, "F32") == 0 ? 4 : 2);
            if (in_bytes > report->largest_input_bytes) report->largest_input_bytes = in_bytes;
            s = plan_add(&plan, &it);
        }
    }
    if (s != AGPT_OK) goto done;

    // 2. The tokenizers, checked by loading them, then embedded byte for byte.
    if (!sp_path && o->vicuna) {
        snprintf(sp_default, sizeof sp_default, "%s/tokenizer.model", o->vicuna);
        struct stat sb;
        if (stat(sp_default, &sb) == 0) sp_path = sp_default;
    }
    if (sp_path) {
        SpTokenizer *sp = NULL;
        s = read_whole_file(sp_path, 64u << 20, &sp_bytes, &sp_n);
        if (s == AGPT_OK) s = sp_load_memory(sp_bytes, sp_n, &sp);
        if (s == AGPT_OK && plan_find(&plan, "model.embed_tokens.weight") &&
            dim_of(&plan, "model.embed_tokens.weight", 0) < sp_vocab_size(sp))
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s has %d pieces but the token table has %lld rows", sp_path,
                          sp_vocab_size(sp), (long long)dim_of(&plan, "model.embed_tokens.weight", 0));
        sp_free(sp);
        if (s == AGPT_OK)
            s = plan_add(&plan, &(PlanItem){.name = MODEL_TENSOR_SP_TOKENIZER, .source = -1, .blob = sp_bytes,
                                            .dtype = DT_U8, .ndim = 1, .shape = {(int64_t)sp_n}});
    } else if (o->vicuna) {
        LOG_W("convert: no tokenizer.model in %s and no --tokenizer: the model file will need --tokenizer at run time",
              o->vicuna);
    }
    if (s == AGPT_OK && o->clip_vocab) {
        s = read_whole_file(o->clip_vocab, 64u << 20, &clip_bytes, &clip_n);
        if (s == AGPT_OK) s = clip_tokenizer_load_memory(clip_bytes, clip_n, &clip);
        if (s == AGPT_OK)
            s = plan_add(&plan, &(PlanItem){.name = MODEL_TENSOR_CLIP_BPE, .source = -1, .blob = clip_bytes,
                                            .dtype = DT_U8, .ndim = 1, .shape = {(int64_t)clip_n}});
    }
    if (s == AGPT_OK) {
        const char *blobs[2] = {sp_path, o->clip_vocab};
        s = check_output_is_not_an_input(o->output, src, blobs, 2);
    }
    if (s != AGPT_OK) goto done;

    // 3. The config the shapes do not carry.
    int n_kv = 0;
    const char *kv[32];
    snprintf(version, sizeof version, "%d", MODEL_FORMAT_VERSION);
    kv[n_kv++] = MODEL_FORMAT_KEY, kv[n_kv++] = version;
    kv[n_kv++] = "agpt.converted_by", kv[n_kv++] = "agpt convert " AGPT_VERSION;
    for (int k = 0; k < SRC_COUNT; k++)  // "imagebind" -> its path (bytes that are not UTF-8 shown as '?')
        if (paths[k] && (lossy_paths[k] = utf8_lossy(paths[k])))
            kv[n_kv++] = source_flag[k] + 2, kv[n_kv++] = lossy_paths[k];
    int vision_layers = count_blocks(&plan, "vision");
    if (vision_layers > 0) {
        int64_t C = dim_of(&plan, "modality_trunks.vision.blocks.0.norm_1.weight", 0);
        int heads = o->vision_heads ? o->vision_heads : (C > 0 && C % 80 == 0) ? (int)(C / 80) : 0;
        if (heads <= 0 || C % heads != 0) {
            s = AGPT_FAIL(AGPT_ERR_ARG, "vision width %lld: cannot infer the heads (ImageBind-H has 16 heads of 80); "
                          "give --vision-heads", (long long)C);
            goto done;
        }
        if (vision_layers < VISION_TAPS) {
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "the vision trunk has %d blocks; the decoder taps %d", vision_layers,
                          VISION_TAPS);
            goto done;
        }
        if (o->taps) {
            if ((s = check_taps(o->taps, vision_layers))) goto done;
            snprintf(taps, sizeof taps, "%s", o->taps);
        } else {
            for (int i = 0, n = 0; i < VISION_TAPS; i++)
                n += snprintf(taps + n, sizeof taps - (size_t)n, i ? ",%d" : "%d", vision_layers * (i + 1) / VISION_TAPS - 1);
        }
        snprintf(vheads, sizeof vheads, "%d", heads);
        kv[n_kv++] = "vision.taps", kv[n_kv++] = taps;
        kv[n_kv++] = "vision.heads", kv[n_kv++] = vheads;
    }
    if (count_blocks(&plan, "text") > 0) {
        int64_t C = dim_of(&plan, "modality_trunks.text.blocks.0.norm_1.weight", 0);
        int heads = o->text_heads ? o->text_heads : (C > 0 && C % 64 == 0) ? (int)(C / 64) : 0;
        if (heads <= 0 || C % heads != 0) {
            s = AGPT_FAIL(AGPT_ERR_ARG, "text width %lld: cannot infer the heads (ImageBind-H's text encoder has 16 "
                          "heads of 64); give --text-heads", (long long)C);
            goto done;
        }
        snprintf(theads, sizeof theads, "%d", heads);
        kv[n_kv++] = "text.heads", kv[n_kv++] = theads;
    }
    if (o->vicuna) {
        const char *dir = o->vicuna;
        struct stat sb;
        if (stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode) && (s = read_hf_config(dir, &llama))) goto done;
        int64_t C = dim_of(&plan, "model.embed_tokens.weight", 1);
        if (llama.heads <= 0) llama.heads = C > 0 && C % 128 == 0 ? (int)(C / 128) : 0;
        if (llama.heads <= 0 || C % llama.heads != 0) {
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: no config.json with num_attention_heads, and width %lld is not a "
                          "multiple of LLaMA's head dim 128", dir, (long long)C);
            goto done;
        }
        snprintf(lheads, sizeof lheads, "%d", llama.heads);
        snprintf(eps, sizeof eps, "%.9g", llama.rms_eps);
        snprintf(base, sizeof base, "%.9g", llama.rope_base);
        kv[n_kv++] = "llama.heads", kv[n_kv++] = lheads;
        kv[n_kv++] = "llama.rms_eps", kv[n_kv++] = eps;
        kv[n_kv++] = "llama.rope_base", kv[n_kv++] = base;
    }
    bool has_lora = false;
    for (int i = 0; i < plan.n && !has_lora; i++) has_lora = strstr(plan.items[i].name, ".lora_A.") != NULL;
    if (has_lora) {
        snprintf(alpha, sizeof alpha, "%.9g", o->lora_alpha > 0 ? o->lora_alpha : 32.0);
        kv[n_kv++] = "lora.alpha", kv[n_kv++] = alpha;
    }

    // 4. Text features of the reference's class names and the extra ones (slots filled after the weights).
    int64_t E = dim_of(&plan, "modality_heads.text.proj.1.weight", 0);
    bool text_encoder = E > 0 && plan_find(&plan, "modality_preprocessors.text.token_embedding.weight");
    bool features = !o->no_text_features && clip && text_encoder;
    if (!o->no_text_features && !features && text_encoder)
        LOG_W("convert: no --clip-vocab: class text features are not precomputed (zero-shot maps will need "
              "--clip-vocab at run time)");
    for (int i = 0; features && i < 30 + o->n_classes && s == AGPT_OK; i++) {
        const char *raw = i < 30 ? model_reference_classes[i] : o->classes[i - 30];
        char clean[128], name[192];
        snprintf(clean, sizeof clean, "%s", raw);
        for (char *c = clean; *c; c++)
            if (*c == '_') *c = ' ';  // as the reference reads class folder names
        snprintf(name, sizeof name, MODEL_TEXT_FEATURES_PREFIX "%s", clean);
        if (plan_find(&plan, name)) continue;
        char *owned = strdup(clean);  // the cleaned name is the one the loader looks up
        if (!owned) s = AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
        if (s == AGPT_OK) s = plan_add(&plan, &(PlanItem){.name = name, .source = -1, .class_name = owned,
                                                          .dtype = DT_F32, .ndim = 2, .shape = {2, E}});
        if (s != AGPT_OK) free(owned);
    }
    if (s != AGPT_OK) goto done;

    // 5. Stream the tensors.
    StStreamEntry *entries = calloc((size_t)plan.n + 1, sizeof *entries);
    if (!entries) {
        s = AGPT_FAIL(AGPT_ERR_OOM, "out of host memory");
        goto done;
    }
    uint64_t total = 0;
    for (int i = 0; i < plan.n; i++) {
        const PlanItem *it = &plan.items[i];
        entries[i] = (StStreamEntry){.name = it->name, .dtype = st_dtype_name(it->dtype), .ndim = it->ndim};
        memcpy(entries[i].shape, it->shape, sizeof entries[i].shape);
        total += item_bytes(it);
        uint64_t piece = it->source >= 0 ? item_bytes(it) : 0, cap = (uint64_t)CONVERT_CHUNK_ELEMS * dtype_size(it->dtype);
        if (piece > cap) piece = cap;
        if (piece > report->buffer_bytes) report->buffer_bytes = piece;
    }
    s = st_stream_open(o->output, entries, plan.n, kv, n_kv / 2, &out);
    free(entries);
    if (s != AGPT_OK) goto done;
    if (report->buffer_bytes && (s = mem_host_alloc(report->buffer_bytes, &buffer))) goto done;
    Progress bar;
    progress_begin(&bar, "convert", (int64_t)total);
    for (int i = 0; i < plan.n && s == AGPT_OK; i++) {
        const PlanItem *it = &plan.items[i];
        uint64_t bytes = item_bytes(it);
        if (it->source >= 0) {
            s = stream_tensor(src[it->source], it, out, i, buffer, &report->buffer_bytes);
        } else if (it->blob) {
            s = st_stream_write(out, i, 0, it->blob, bytes);
        }
        if (s == AGPT_OK) report->tensors++, progress_step(&bar, (int64_t)bytes);
    }
    if (s == AGPT_OK) progress_end(&bar);
    report->bytes = total;
    report->peak_rss_stream = peak_rss_bytes();
    mem_host_free(buffer);
    buffer = NULL;
    for (int k = 0; k < SRC_COUNT; k++) ckpt_close(src[k]), src[k] = NULL;  // unmap before the text encoder loads
    if (s == AGPT_OK && features) s = write_text_features(o, &plan, out, clip, &report->classes);
    if (s == AGPT_OK) {
        s = st_stream_finish(out);
        out = NULL;
    }

done:
    st_stream_abort(out);
    mem_host_free(buffer);
    for (int k = 0; k < SRC_COUNT; k++) ckpt_close(src[k]);
    for (int i = 0; i < plan.n; i++)
        if (plan.items[i].class_name) free((char *)plan.items[i].class_name);
    plan_free(&plan);
    clip_tokenizer_free(clip);
    free(sp_bytes);
    free(clip_bytes);
    for (int k = 0; k < SRC_COUNT; k++) free(lossy_paths[k]);
    report->peak_rss = peak_rss_bytes();
    report->seconds = timer_now_s() - t0;
    return s;
}
