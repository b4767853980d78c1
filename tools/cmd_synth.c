// agpt synth: writes the synthetic anomalies and conversations the trainer would see, so a user can look at them.
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/preprocess.h"
#include "model/sp_tokenizer.h"
#include "runtime/image.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"
#include "train/conversation_train.h"
#include "train/synth.h"

#define SIDE 224  // the training resolution: Resize((224, 224)) bicubic (reference 6.3)

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt synth --class NAME [--params FILE.json] [--seed S] --count N --out DIR\n"
            "                  [--tokenizer tokenizer.model] IMAGES...\n"
            "\n"
            "Makes N synthetic anomalies as AnomalyGPT's training does (NSA patch_ex with Poisson blending, the\n"
            "class's parameters of the reference, anomalygpt-reference.md 6.4), each from one image of IMAGES\n"
            "(sample i uses image i mod count) and a source image drawn from the others. Per sample, in DIR:\n"
            "  synth_NNNNN.png        the 224x224 training image with the anomaly blended in\n"
            "  synth_NNNNN_mask.png   the training target gt = label > 0.3 (white = anomalous)\n"
            "  synth_NNNNN_label.png  the logistic-intensity label, 0..1 as 0..255\n"
            "  synth_NNNNN.json       boxes, centres, position words and both conversations of the pair (the\n"
            "                         normal image's and the anomaly's); with --tokenizer also the token ids and\n"
            "                         loss targets (-100 = no loss) of the anomaly conversation\n"
            "and one JSON line per sample on stdout. A sample depends only on (seed, index).\n"
            "\n"
            "  --class NAME     an MVTec-AD or VisA class (bottle, ..., pcb1, ...) or any name: unknown names get\n"
            "                   the VisA setting and a generic description\n"
            "  --params FILE    JSON overriding the class's values: width_bounds_pct, intensity_logistic_params,\n"
            "                   skip_background, resize_bounds, num_patches, min_object_pct, min_overlap_pct,\n"
            "                   gamma_params, description, cutpaste (true: patch_ex's CutPaste boxes\n"
            "                   instead of the reference's setting; README.md), and blend (\"poisson\", the\n"
            "                   reference's, or \"paste\": the patch copied as it is)\n"
            "  --seed S         default 42; --count N in [1, 1000000]\n");
}

// Loads path and resizes it as training does: [SIDE][SIDE][3].
static Status load_training_image(const char *path, uint8_t *out) {
    Image img = {0};
    Status s = image_load(path, &img);
    if (s == AGPT_OK) s = preprocess_image_u8(&img, PREPROCESS_SQUASH, SIDE, RESIZE_PILLOW_10, out);
    image_free(&img);
    return s;
}

static cJSON *conversation_json(const char *question, const char *answer) {
    cJSON *a = cJSON_CreateArray(), *h = cJSON_CreateObject(), *g = cJSON_CreateObject();
    cJSON_AddStringToObject(h, "from", "human");
    cJSON_AddStringToObject(h, "value", question);
    cJSON_AddStringToObject(g, "from", "gpt");
    cJSON_AddStringToObject(g, "value", answer);
    cJSON_AddItemToArray(a, h);
    cJSON_AddItemToArray(a, g);
    return a;
}

static Status write_text(const char *path, const char *text) {
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "cannot write '%s'", tmp);
    size_t n = strlen(text);
    int ok = fwrite(text, 1, n, f) == n && fputc('\n', f) != EOF;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return AGPT_FAIL(AGPT_ERR_IO, "cannot write '%s' (disk full?)", path);
    }
    return AGPT_OK;
}

// One sample: synthesis, the three PNGs, the JSON file and the stdout line.
static Status make_sample(char **images, int n_images, const SynthParams *p, const char *class_name, uint64_t seed,
                          long long index, const char *out_dir, const SpTokenizer *tok, uint8_t *dest, uint8_t *src,
                          SynthSample *s, uint8_t *gray) {
    Rng rng;
    SynthDraws draws;
    synth_draws_for_sample(seed, (uint64_t)index, &rng, &draws);
    int di = (int)(index % n_images), si = di;
    if (n_images > 1) {  // the reference pastes from the image visited before: any other image
        si = (int)(rng_u64(&rng) % (uint64_t)(n_images - 1));
        if (si >= di) si++;
    }
    AGPT_TRY(load_training_image(images[di], dest));
    AGPT_TRY(load_training_image(images[si], src));
    AGPT_TRY(synth_patch_ex(dest, src, p, &draws, s));

    char base[4096], path[4200];
    snprintf(base, sizeof base, "%s/synth_%05lld", out_dir, index);
    snprintf(path, sizeof path, "%s.png", base);
    AGPT_TRY(image_save_png(path, SIDE, SIDE, 3, s->image));
    long gt = 0;
    for (int i = 0; i < SIDE * SIDE; i++) {
        int g = s->label[i] > SYNTH_GT_THRESHOLD;
        gray[i] = g ? 255 : 0, gt += g;
    }
    snprintf(path, sizeof path, "%s_mask.png", base);
    AGPT_TRY(image_save_png(path, SIDE, SIDE, 1, gray));
    for (int i = 0; i < SIDE * SIDE; i++) gray[i] = (uint8_t)(s->label[i] * 255.0f + 0.5f);
    snprintf(path, sizeof path, "%s_label.png", base);
    AGPT_TRY(image_save_png(path, SIDE, SIDE, 1, gray));

    char question[SYNTH_DESCRIPTION_MAX + 64], answer[256], normal[256];
    AGPT_TRY(train_question_text(p->description, question, sizeof question));
    AGPT_TRY(train_answer_text(s->n_patches, (const double(*)[2])s->center, SIDE, answer, sizeof answer));
    AGPT_TRY(train_answer_text(0, NULL, SIDE, normal, sizeof normal));

    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "index", (double)index);
    cJSON_AddNumberToObject(o, "seed", (double)seed);
    cJSON_AddStringToObject(o, "class", class_name);
    cJSON_AddStringToObject(o, "image", images[di]);
    cJSON_AddStringToObject(o, "source", images[si]);
    cJSON *patches = cJSON_AddArrayToObject(o, "patches");
    for (int k = 0; k < s->n_patches; k++) {
        cJSON *q = cJSON_CreateObject();
        int box[4] = {s->box[k][0], s->box[k][1], s->box[k][2], s->box[k][3]};
        double c[2] = {s->center[k][0], s->center[k][1]};
        cJSON_AddItemToObject(q, "box_rows_cols", cJSON_CreateIntArray(box, 4));
        cJSON_AddItemToObject(q, "union_center_row_col", cJSON_CreateDoubleArray(c, 2));
        cJSON_AddStringToObject(q, "position", train_position_word(c[0], c[1], SIDE));
        cJSON_AddItemToArray(patches, q);
    }
    cJSON_AddNumberToObject(o, "gt_pixels", (double)gt);
    cJSON_AddItemToObject(o, "conversation", conversation_json(question, answer));
    cJSON_AddItemToObject(o, "normal_conversation", conversation_json(question, normal));
    Status st = AGPT_OK;
    if (tok) {
        TrainTokens t;
        st = train_tokenize(tok, question, answer, TRAIN_MAX_TGT_LEN, &t);
        if (st == AGPT_OK) {
            cJSON_AddItemToObject(o, "input_ids", cJSON_CreateIntArray(t.ids, t.n));
            cJSON_AddItemToObject(o, "targets", cJSON_CreateIntArray(t.targets, t.n));
            train_tokens_free(&t);
        }
    }
    char *text = st == AGPT_OK ? cJSON_Print(o) : NULL;
    if (st == AGPT_OK && !text) st = AGPT_FAIL(AGPT_ERR_OOM, "no memory for the JSON of sample %lld", index);
    snprintf(path, sizeof path, "%s.json", base);
    if (st == AGPT_OK) st = write_text(path, text);
    free(text);
    if (st != AGPT_OK) {
        cJSON_Delete(o);
        return st;
    }
    // The stdout line: the summary without the long texts.
    cJSON_DeleteItemFromObject(o, "normal_conversation");
    cJSON_DeleteItemFromObject(o, "input_ids");
    cJSON_DeleteItemFromObject(o, "targets");
    cJSON_DeleteItemFromObject(o, "conversation");
    cJSON_AddStringToObject(o, "answer", answer);
    cJSON_AddStringToObject(o, "file", path);
    return print_json_line(o);
}

int cmd_synth(int argc, char **argv) {
    const char *cmd = "synth", *class_name = NULL, *params_path = NULL, *out_dir = NULL, *tok_path = NULL;
    long long seed = 42, count = -1;
    char **images = malloc((size_t)argc * sizeof(char *));
    int n_images = 0;
    if (!images) return cli_report(cmd, AGPT_FAIL(AGPT_ERR_OOM, "no memory"));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            free(images);
            return 0;
        }
        int takes_value = !strcmp(a, "--class") || !strcmp(a, "--params") || !strcmp(a, "--seed") ||
                          !strcmp(a, "--count") || !strcmp(a, "--out") || !strcmp(a, "--tokenizer");
        if (takes_value) {
            if (!(v = cli_value(argc, argv, &i, cmd))) goto usage_error;
            if (!strcmp(a, "--class")) class_name = v;
            else if (!strcmp(a, "--params")) params_path = v;
            else if (!strcmp(a, "--out")) out_dir = v;
            else if (!strcmp(a, "--tokenizer")) tok_path = v;
            else if (!strcmp(a, "--seed")) {
                if (cli_parse_int(cmd, a, v, 0, (long long)1 << 62, &seed) != 0) goto usage_error;
            } else if (cli_parse_int(cmd, a, v, 1, 1000000, &count) != 0) {
                goto usage_error;
            }
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "agpt synth: unknown option '%s' (agpt synth --help)\n", a);
            goto usage_error;
        } else {
            images[n_images++] = argv[i];
        }
    }
    if (!class_name || !*class_name || !out_dir || count < 0 || n_images == 0) {
        fprintf(stderr, "agpt synth: needs --class, --count, --out and at least one image (agpt synth --help)\n");
        goto usage_error;
    }
    if (!class_name_ok(cmd, class_name)) goto usage_error;

    SynthParams params;
    int known = 0;
    Status s = synth_params_for_class(class_name, &params, &known);
    if (s == AGPT_OK && params_path) s = synth_params_load_json(params_path, &params);
    if (s == AGPT_OK) s = ensure_dir(out_dir);
    SpTokenizer *tok = NULL;
    if (s == AGPT_OK && tok_path) s = sp_load_file(tok_path, &tok);
    if (s != AGPT_OK) {
        free(images);
        return cli_report(cmd, s);
    }
    if (!known && !params_path)
        fprintf(stderr, "agpt synth: '%s' is not a reference class: the VisA setting and a generic description "
                        "(--params FILE.json to set them)\n", class_name);
    uint8_t *dest = malloc(SIDE * SIDE * 3), *src = malloc(SIDE * SIDE * 3), *gray = malloc(SIDE * SIDE);
    SynthSample sample = {0};
    if (!dest || !src || !gray) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    if (s == AGPT_OK) s = synth_sample_alloc(SIDE, SIDE, &sample);
    for (long long i = 0; i < count && s == AGPT_OK; i++)
        s = make_sample(images, n_images, &params, class_name, (uint64_t)seed, i, out_dir, tok, dest, src, &sample,
                        gray);
    synth_sample_free(&sample);
    free(dest), free(src), free(gray), free(images);
    sp_free(tok);
    int rc = s == AGPT_OK ? 0 : cli_report(cmd, s);
    return finish_stdout(cmd, rc);

usage_error:
    free(images);
    return 2;
}
