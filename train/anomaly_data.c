#define _DEFAULT_SOURCE  // strdup
#include "train/anomaly_data.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <string.h>

#include "model/preprocess.h"
#include "runtime/image.h"
#include "train/metrics.h"

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
    for (int i = 0; i < d->n_normal; i++)
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
            // The reference's classes keep its values (as --help says); --params is for the user's own classes.
            if (s == AGPT_OK && params_json && !known) s = synth_params_load_json(params_json, &k->params);
            if (s == AGPT_OK) s = synth_params_validate(&k->params);
        }
        d->item_class[i] = c;
        if (s == AGPT_OK && !(d->paths[i] = strdup(sorted[i].path))) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
        d->n_items = d->n_normal = i + 1;
    }
    free(sorted);
    for (int c = 0; s == AGPT_OK && c < d->n_classes; c++) s = load_reference(d, c);
    if (s != AGPT_OK) anomaly_data_free(d);
    return s;
}

void anomaly_data_free(AnomalyData *d) {
    for (int i = 0; i < d->n_sft; i++) free(d->sft_images[i]), free(d->sft_human[i]), free(d->sft_gpt[i]);
    free(d->sft_images), free(d->sft_human), free(d->sft_gpt);
    for (int i = 0; d->paths && i < d->n_items; i++) free(d->paths[i]);
    for (int i = 0; d->masks && i < d->n_items; i++) free(d->masks[i]);
    for (int c = 0; d->classes && c < d->n_classes; c++) free(d->classes[c].reference);
    free(d->paths), free(d->item_class), free(d->classes), free(d->masks);
    memset(d, 0, sizeof *d);
}

typedef struct Defect {
    const char *path, *mask, *class_name;
} Defect;

static int cmp_defect(const void *a, const void *b) {
    return strcmp(((const Defect *)a)->path, ((const Defect *)b)->path);
}

Status anomaly_data_add_defects(AnomalyData *d, const char *const *paths, const char *const *masks,
                                const char *const *class_names, int n, DatasetFormat mask_format) {
    AGPT_CHECK_ARG(n >= 0 && d->n_items == d->n_normal, "anomaly_data_add_defects: the defects are added once");
    if (n == 0) return AGPT_OK;
    for (int i = 0; i < n; i++) {
        AGPT_CHECK_ARG(masks[i], "the defect image %s has no mask (supervised training needs one per image)", paths[i]);
        AGPT_CHECK_ARG(find_class(d, class_names[i]) >= 0, "class %s has defect images (%s) but no normal training "
                       "image: supervised training pairs each defect with a normal image of its class",
                       class_names[i], paths[i]);
    }
    int total = d->n_items + n;
    char **paths2 = realloc(d->paths, (size_t)total * sizeof *paths2);
    if (paths2) d->paths = paths2;
    int *cls2 = paths2 ? realloc(d->item_class, (size_t)total * sizeof *cls2) : NULL;
    if (cls2) d->item_class = cls2;
    char **masks2 = cls2 ? calloc((size_t)total, sizeof *masks2) : NULL;
    Defect *sorted = masks2 ? calloc((size_t)n, sizeof *sorted) : NULL;
    if (!sorted) {
        free(masks2);
        return AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d defect images", n);
    }
    d->masks = masks2;
    d->mask_format = mask_format;
    for (int i = 0; i < n; i++) sorted[i] = (Defect){paths[i], masks[i], class_names[i]};
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_defect);  // name order, as the normal images
    Status s = AGPT_OK;
    for (int i = 0; i < n && s == AGPT_OK; i++) {
        int at = d->n_items;
        d->paths[at] = strdup(sorted[i].path), d->masks[at] = strdup(sorted[i].mask);
        d->item_class[at] = find_class(d, sorted[i].class_name);
        d->n_items++;
        if (!d->paths[at] || !d->masks[at]) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    }
    free(sorted);
    return s;
}

int anomaly_mask_regions(const uint8_t *mask, int side, double (*centers)[2], int cap) {
    int *labels = malloc((size_t)side * side * sizeof *labels);
    if (!labels) return -1;
    int n = metrics_label_components(mask, side, side, labels);
    int kept = n < cap ? n : cap;
    double sum_r[TRAIN_MAX_REGIONS] = {0}, sum_c[TRAIN_MAX_REGIONS] = {0}, count[TRAIN_MAX_REGIONS] = {0};
    for (int r = 0; r < side; r++)
        for (int c = 0; c < side; c++) {
            int l = labels[r * side + c];
            if (l >= 1 && l <= kept && l <= TRAIN_MAX_REGIONS) sum_r[l - 1] += r, sum_c[l - 1] += c, count[l - 1]++;
        }
    for (int i = 0; i < kept && i < TRAIN_MAX_REGIONS; i++)
        centers[i][0] = sum_r[i] / count[i], centers[i][1] = sum_c[i] / count[i];
    free(labels);
    return n;
}

static char *read_text_file(const char *path, Status *s) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        *s = AGPT_FAIL(AGPT_ERR_IO, "cannot read the instruction data %s", path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (!text || fread(text, 1, (size_t)n, f) != (size_t)n) {
        free(text);
        fclose(f);
        *s = AGPT_FAIL(AGPT_ERR_IO, "cannot read the instruction data %s", path);
        return NULL;
    }
    text[n] = 0;
    fclose(f);
    return text;
}

// The value of turn `k` if it is from `who`, else NULL.
static const char *turn_value(const cJSON *conv, int k, const char *who) {
    const cJSON *t = cJSON_GetArrayItem(conv, k);
    const cJSON *from = cJSON_GetObjectItemCaseSensitive(t, "from");
    const cJSON *value = cJSON_GetObjectItemCaseSensitive(t, "value");
    if (!cJSON_IsString(from) || strcmp(from->valuestring, who) || !cJSON_IsString(value)) return NULL;
    return value->valuestring;
}

Status anomaly_data_load_sft(AnomalyData *d, const char *json_path, const char *image_dir) {
    Status s = AGPT_OK;
    char *text = read_text_file(json_path, &s);
    if (!text) return s;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsArray(root)) {
        cJSON_Delete(root);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: expected a JSON array of {\"image_name\", \"conversation\"} items",
                         json_path);
    }
    int n = cJSON_GetArraySize(root), bad = 0, missing = 0;
    char bad_names[3][64] = {{0}}, missing_names[3][512] = {{0}};
    d->sft_images = calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
    d->sft_human = calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
    d->sft_gpt = calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
    if (!d->sft_images || !d->sft_human || !d->sft_gpt) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d items", n);
    for (int i = 0; s == AGPT_OK && i < n; i++) {
        const cJSON *it = cJSON_GetArrayItem(root, i);
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(it, "image_name");
        const cJSON *conv = cJSON_GetObjectItemCaseSensitive(it, "conversation");
        const char *human = cJSON_IsArray(conv) ? turn_value(conv, 0, "human") : NULL;
        const char *gpt = cJSON_IsArray(conv) ? turn_value(conv, 1, "gpt") : NULL;
        if (!cJSON_IsString(name) || !name->valuestring[0] || !human || !gpt) {
            if (bad < 3) snprintf(bad_names[bad], sizeof bad_names[bad], "item %d", i);
            bad++;
            continue;
        }
        const char *nm = name->valuestring;
        size_t len = strlen(nm);
        bool has_jpg = len >= 4 && !strcmp(nm + len - 4, ".jpg");
        size_t cap = strlen(image_dir) + len + 8;
        char *path = malloc(cap);
        if (!path) {
            s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
            break;
        }
        snprintf(path, cap, "%s/%s%s", image_dir, nm, has_jpg ? "" : ".jpg");
        struct stat sb;
        if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) {
            if (missing < 3) snprintf(missing_names[missing], sizeof missing_names[missing], "%s", path);
            missing++;
            free(path);
            continue;
        }
        int k = d->n_sft;
        d->sft_images[k] = path;
        d->sft_human[k] = strdup(human);
        d->sft_gpt[k] = strdup(gpt);
        d->n_sft = k + 1;
        if (!d->sft_human[k] || !d->sft_gpt[k]) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    }
    cJSON_Delete(root);
    if (s == AGPT_OK && bad)
        s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: %d of %d items lack an image_name or a human then a gpt turn (%s%s%s%s%s)",
                      json_path, bad, n, bad_names[0], bad > 1 ? ", " : "", bad_names[1], bad > 2 ? ", " : "",
                      bad_names[2]);
    if (s == AGPT_OK && missing)
        s = AGPT_FAIL(AGPT_ERR_IO, "%s: %d of %d images are missing in %s (%s%s%s%s%s)", json_path, missing, n,
                      image_dir, missing_names[0], missing > 1 ? ", " : "", missing_names[1], missing > 2 ? ", " : "",
                      missing_names[2]);
    if (s == AGPT_OK && d->n_sft == 0) s = AGPT_FAIL(AGPT_ERR_ARG, "%s holds no conversations", json_path);
    return s;
}

int anomaly_micro_per_sample(const AnomalyData *d) { return d->n_sft > 0 ? 2 : 1; }

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

// A defect item: a normal image of its class (drawn from rng), the defect, its mask and regions.
static Status make_defect_pair(const AnomalyData *d, int64_t index, Rng *rng, uint8_t *normal, uint8_t *anomalous,
                               uint8_t *mask, int *n_regions, double centers[TRAIN_MAX_REGIONS][2]) {
    int c = d->item_class[index], n_class = 0;
    for (int i = 0; i < d->n_normal; i++) n_class += d->item_class[i] == c;
    int64_t pick = (int64_t)(rng_u64(rng) % (uint64_t)n_class), partner = -1;
    for (int i = 0; i < d->n_normal && partner < 0; i++)
        if (d->item_class[i] == c && pick-- == 0) partner = i;
    Status s = load_resized(d->paths[partner], normal);
    if (s == AGPT_OK) s = load_resized(d->paths[index], anomalous);
    // Squashed as the image is, with the layout's threshold rule.
    if (s == AGPT_OK) s = dataset_load_mask_squashed(d->masks[index], d->mask_format, S, mask);
    if (s != AGPT_OK) return agpt_add_context(s, "defect %s", d->paths[index]);
    *n_regions = anomaly_mask_regions(mask, S, centers, TRAIN_MAX_REGIONS);
    if (*n_regions < 0) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the regions of %s", d->masks[index]);
    if (*n_regions == 0)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "defect %s: its mask %s has no anomalous pixel at %d x %d (the defect would "
                         "be trained as normal); fix the mask or leave the image out", d->paths[index],
                         d->masks[index], S, S);
    return AGPT_OK;
}

Status anomaly_make_pair(const AnomalyData *d, int64_t index, Rng *rng, uint8_t *normal, uint8_t *anomalous,
                         uint8_t *mask, int *n_patches, double centers[TRAIN_MAX_REGIONS][2]) {
    if (index >= d->n_normal) return make_defect_pair(d, index, rng, normal, anomalous, mask, n_patches, centers);
    const AnomalyClass *k = &d->classes[d->item_class[index]];
    uint8_t *src = malloc((size_t)S * S * 3);
    SynthSample syn = {0};
    Status st = src ? synth_sample_alloc(S, S, &syn) : AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    int64_t j = index;  // the blend's source: another normal image
    if (st == AGPT_OK && d->n_normal > 1) {
        j = (int64_t)(rng_u64(rng) % (uint64_t)(d->n_normal - 1));
        if (j >= index) j++;
    }
    if (st == AGPT_OK) st = load_resized(d->paths[index], normal);
    if (st == AGPT_OK) st = load_resized(d->paths[j], src);
    SynthDraws draws = {.rng = rng};
    if (st == AGPT_OK) st = synth_patch_ex(normal, src, &k->params, &draws, &syn);
    if (st == AGPT_OK) {
        memcpy(anomalous, syn.image, (size_t)S * S * 3);
        for (int p = 0; p < S * S; p++) mask[p] = syn.n_patches > 0 && syn.label[p] > SYNTH_GT_THRESHOLD;
        *n_patches = syn.n_patches;
        _Static_assert(SYNTH_MAX_REGIONS == TRAIN_MAX_REGIONS, "a sample's regions are the answer's");
        memcpy(centers, syn.center, sizeof syn.center);
    }
    synth_sample_free(&syn);
    free(src);
    return st;
}

Status anomaly_make_sample(void *ctx, int64_t index, Rng *rng, void *out) {
    const AnomalyData *d = ctx;
    AnomalySample *s = out;
    const AnomalyClass *k = &d->classes[d->item_class[index]];
    s->cls = d->item_class[index];
    uint8_t *dest = malloc((size_t)S * S * 3), *anomalous = malloc((size_t)S * S * 3), *mask = malloc((size_t)S * S);
    double centers[TRAIN_MAX_REGIONS][2];
    int n_patches = 0;
    Status st = dest && anomalous && mask ? anomaly_make_pair(d, index, rng, dest, anomalous, mask, &n_patches, centers)
                                          : AGPT_FAIL(AGPT_ERR_OOM, "no memory for a sample");
    char question[SYNTH_DESCRIPTION_MAX + 64], normal[256], answer[512];
    if (st == AGPT_OK) st = train_question_text(k->params.description, question, sizeof question);
    if (st == AGPT_OK) st = train_answer_text(0, NULL, S, normal, sizeof normal);
    if (st == AGPT_OK) st = train_answer_text(n_patches, (const double(*)[2])centers, S, answer, sizeof answer);
    if (st == AGPT_OK) {
        s->n_patches = n_patches;
        preprocess_normalize(dest, S, s->image[0]);
        preprocess_normalize(anomalous, S, s->image[1]);
        for (int p = 0; p < S * S; p++) s->mask[0][p] = 0, s->mask[1][p] = mask[p];
        st = put_tokens(d, question, normal, s, 0);
    }
    if (st == AGPT_OK) st = put_tokens(d, question, n_patches > 0 ? answer : normal, s, 1);
    s->fewshot = st == AGPT_OK && rng_uniform(rng) < d->fewshot_p;
    if (st == AGPT_OK && d->n_sft > 0) {  // the instruction micro-step that follows (train_model(batch_sft))
        int64_t q = (int64_t)(rng_u64(rng) % (uint64_t)d->n_sft);
        st = load_resized(d->sft_images[q], dest);
        TrainTokens t = {0};
        if (st == AGPT_OK) st = train_tokenize(d->tokenizer, d->sft_human[q], d->sft_gpt[q], SFT_TEXT_MAX, &t);
        if (st == AGPT_OK) {
            preprocess_normalize(dest, S, s->sft_image);
            memcpy(s->sft_ids, t.ids, (size_t)t.n * sizeof(int32_t));
            memcpy(s->sft_targets, t.targets, (size_t)t.n * sizeof(int32_t));
            s->sft_tokens = t.n;
            s->has_sft = 1;
        }
        train_tokens_free(&t);
    }
    free(dest), free(anomalous), free(mask);
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
    if (s->has_sft && s->sft_tokens > 0) {  // class 'object', no mask, no few-shot: the LLM loss alone
        AnomalyTrainExample sft = {.image = s->sft_image, .class_name = "object", .ids = s->sft_ids,
                                   .targets = s->sft_targets, .n_tokens = s->sft_tokens};
        AGPT_TRY(anomaly_train_step(c->model, &sft, 1, &l));
        out->ce += l.ce;
    }
    return AGPT_OK;
}
