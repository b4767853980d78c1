#define _DEFAULT_SOURCE  // strdup
#include "train/anomaly_data.h"

#include <stdlib.h>
#include <string.h>

#include "model/preprocess.h"
#include "runtime/image.h"

#define S ANOMALY_SIDE

// The training image as the dataset reads it: Resize((224,224)) bicubic, as 8-bit RGB [S][S][3].
static Status load_resized(const char *path, uint8_t *out) {
    Image img = {0};
    Status s = image_load(path, &img);
    if (s == AGPT_OK) s = preprocess_image_u8(&img, PREPROCESS_SQUASH, S, RESIZE_PILLOW_10, out);
    image_free(&img);
    return s == AGPT_OK ? s : agpt_add_context(s, "training image %s", path);
}

static int find_class(const AnomalyData *d, const char *name) {
    for (int c = 0; c < d->n_classes; c++)
        if (!strcmp(d->classes[c].name, name)) return c;
    return -1;
}

typedef struct NamedPath {
    const char *path, *class_name;
} NamedPath;

static int cmp_path(const void *a, const void *b) {
    return strcmp(((const NamedPath *)a)->path, ((const NamedPath *)b)->path);
}

// The class's reference: its first normal image in name order, preprocessed as the few-shot branch reads a
// path (load_and_transform_vision_data: shorter side to 224, centre crop, normalise).
static Status load_reference(AnomalyData *d, int c) {
    const char *first = NULL;
    for (int i = 0; i < d->n_items; i++)
        if (d->item_class[i] == c && (!first || strcmp(d->paths[i], first) < 0)) first = d->paths[i];
    AnomalyClass *k = &d->classes[c];
    k->reference = malloc(sizeof(float) * 3 * S * S);
    if (!k->reference) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for a reference image");
    Image img = {0};
    Status s = image_load(first, &img);
    if (s == AGPT_OK) s = preprocess_image(&img, PREPROCESS_SHORTER_SIDE_CROP, S, k->reference);
    image_free(&img);
    return s == AGPT_OK ? s : agpt_add_context(s, "the reference image of class %s (%s)", k->name, first);
}

Status anomaly_data_init(AnomalyData *d, const char *const *paths, const char *const *class_names, int n,
                         const char *params_json, const SpTokenizer *tokenizer) {
    memset(d, 0, sizeof *d);
    AGPT_CHECK_ARG(n >= 1, "no training images");
    d->tokenizer = tokenizer;
    d->fewshot_p = 0.5;
    d->paths = calloc((size_t)n, sizeof *d->paths);
    d->item_class = calloc((size_t)n, sizeof *d->item_class);
    d->classes = calloc((size_t)n, sizeof *d->classes);
    if (!d->paths || !d->item_class || !d->classes) {
        anomaly_data_free(d);
        return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d training images", n);
    }
    // Name order, so the data (and with it every sample) does not depend on the order the files were listed in.
    NamedPath *sorted = calloc((size_t)n, sizeof *sorted);
    Status s = sorted ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    for (int i = 0; s == AGPT_OK && i < n; i++) sorted[i] = (NamedPath){paths[i], class_names[i]};
    if (s == AGPT_OK) qsort(sorted, (size_t)n, sizeof *sorted, cmp_path);
    for (int i = 0; s == AGPT_OK && i < n; i++) {
        const char *cls = sorted[i].class_name;
        int c = find_class(d, cls);
        if (c < 0) {
            c = d->n_classes++;
            AnomalyClass *k = &d->classes[c];
            if (strlen(cls) >= sizeof k->name) {
                s = AGPT_FAIL(AGPT_ERR_ARG, "class name '%s' is too long", cls);
                break;
            }
            strcpy(k->name, cls);
            int known;
            s = synth_params_for_class(cls, &k->params, &known);
            if (s == AGPT_OK && params_json) s = synth_params_load_json(params_json, &k->params);
            if (s == AGPT_OK) s = synth_params_validate(&k->params);
        }
        d->item_class[i] = c;
        if (s == AGPT_OK && !(d->paths[i] = strdup(sorted[i].path))) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
        d->n_items = i + 1;
    }
    free(sorted);
    for (int c = 0; s == AGPT_OK && c < d->n_classes; c++) s = load_reference(d, c);
    if (s != AGPT_OK) anomaly_data_free(d);
    return s;
}

void anomaly_data_free(AnomalyData *d) {
    for (int i = 0; d->paths && i < d->n_items; i++) free(d->paths[i]);
    for (int c = 0; d->classes && c < d->n_classes; c++) free(d->classes[c].reference);
    free(d->paths), free(d->item_class), free(d->classes);
    memset(d, 0, sizeof *d);
}

// One conversation's tokens into the sample (the text is cut at ANOMALY_TEXT_MAX tokens).
static Status put_tokens(const AnomalyData *d, const char *question, const char *answer, AnomalySample *s, int b) {
    TrainTokens t = {0};
    AGPT_TRY(train_tokenize(d->tokenizer, question, answer, ANOMALY_TEXT_MAX, &t));
    memcpy(s->ids[b], t.ids, (size_t)t.n * sizeof(int32_t));
    memcpy(s->targets[b], t.targets, (size_t)t.n * sizeof(int32_t));
    s->n_tokens[b] = t.n;
    train_tokens_free(&t);
    return AGPT_OK;
}

Status anomaly_make_sample(void *ctx, int64_t index, Rng *rng, void *out) {
    const AnomalyData *d = ctx;
    AnomalySample *s = out;
    const AnomalyClass *k = &d->classes[d->item_class[index]];
    s->cls = d->item_class[index];
    uint8_t *dest = malloc((size_t)S * S * 3), *src = malloc((size_t)S * S * 3);
    SynthSample syn = {0};
    Status st = dest && src ? synth_sample_alloc(S, S, &syn) : AGPT_FAIL(AGPT_ERR_OOM, "no memory for a sample");
    // The blend's source: another training image (any class, as the reference's prev_idx).
    int64_t j = index;
    if (st == AGPT_OK && d->n_items > 1) {
        j = (int64_t)(rng_u64(rng) % (uint64_t)(d->n_items - 1));
        if (j >= index) j++;
    }
    if (st == AGPT_OK) st = load_resized(d->paths[index], dest);
    if (st == AGPT_OK) st = load_resized(d->paths[j], src);
    SynthDraws draws = {.rng = rng};
    if (st == AGPT_OK) st = synth_patch_ex(dest, src, &k->params, &draws, &syn);
    char question[SYNTH_DESCRIPTION_MAX + 64], normal[256], anomalous[256];
    if (st == AGPT_OK) st = train_question_text(k->params.description, question, sizeof question);
    if (st == AGPT_OK) st = train_answer_text(0, NULL, S, normal, sizeof normal);
    if (st == AGPT_OK)
        st = train_answer_text(syn.n_patches, (const double(*)[2])syn.center, S, anomalous, sizeof anomalous);
    if (st == AGPT_OK) {
        s->n_patches = syn.n_patches;
        preprocess_normalize(dest, S, s->image[0]);
        preprocess_normalize(syn.image, S, s->image[1]);
        memset(s->mask[0], 0, sizeof s->mask[0]);
        for (int p = 0; p < S * S; p++)  // gt = label > 0.3 (zero everywhere when no patch was pasted)
            s->mask[1][p] = syn.n_patches > 0 && syn.label[p] > SYNTH_GT_THRESHOLD ? 1.0f : 0.0f;
        st = put_tokens(d, question, normal, s, 0);
    }
    if (st == AGPT_OK) st = put_tokens(d, question, syn.n_patches > 0 ? anomalous : normal, s, 1);
    s->fewshot = st == AGPT_OK && rng_uniform(rng) < d->fewshot_p;
    synth_sample_free(&syn);
    free(dest), free(src);
    return st;
}

Status anomaly_step(void *ctx, const void *sample, TrainLosses *out) {
    const AnomalyStepContext *c = ctx;
    const AnomalySample *s = sample;
    const AnomalyClass *k = &c->data->classes[s->cls];
    AnomalyTrainExample ex[2];
    for (int b = 0; b < 2; b++)
        ex[b] = (AnomalyTrainExample){.image = s->image[b], .mask = s->mask[b], .class_name = k->name,
                                      .reference = s->fewshot ? k->reference : NULL, .ids = s->ids[b],
                                      .targets = s->targets[b], .n_tokens = s->n_tokens[b]};
    AnomalyTrainLosses l;
    AGPT_TRY(anomaly_train_step(c->model, ex, 2, &l));
    out->ce = l.ce, out->focal = l.focal, out->dice = l.dice;
    return AGPT_OK;
}
