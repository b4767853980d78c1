// anomalygpt_ask_batch against anomalygpt_ask on the small golden model (tests/data/anomalygpt over the
// imagebind test model, as test_anomalygpt): a batch of images with prompts of different lengths gives, per
// image, the same greedy tokens, text, class, prefix length, score and map as asking one image at a time,
// including sequences that stop while others go on; n = 1; batches larger than the model's batch (slices);
// few-shot maps; bad arguments. Uses the real LLaMA tokenizer from ../shared/data (skipped without it).
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/anomalygpt.h"
#include "runtime/memory.h"
#include "test.h"
#include "test_util.h"

#define MAX_NEW 24

static SafeTensors *parts;

// The golden stores embed_tokens and lm_head sparsely; write them whole (zeros elsewhere) to a layered file.
// The golden model never generates "##" (2277) in 24 tokens; so that some answers stop early, lm_head's row
// 2277 becomes 1.001 x the row of stop_like, the 5th token of the golden answer: wherever that token would win
// (its logit is positive there), "##" wins instead.
static Status write_tables(const char *path, int32_t stop_like) {
    const char *names[2] = {"model.embed_tokens.weight", "lm_head.weight"};
    float *tables[2] = {NULL, NULL};
    StEntry entries[2];
    Status s = AGPT_OK;
    for (int i = 0; i < 2 && s == AGPT_OK; i++) {
        int64_t V = 32001, C = 0;
        tables[i] = dense_table(parts, names[i], V, &C);
        if (!tables[i]) {
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "golden: no usable sparse %s", names[i]);
            break;
        }
        if (i == 1)
            for (int64_t j = 0; j < C; j++) tables[i][2277 * C + j] = 1.001f * tables[i][(size_t)stop_like * C + j];
        entries[i] = (StEntry){names[i], tensor_2d(tables[i], DT_F32, DEV_CPU, V, C)};
    }
    if (s == AGPT_OK) s = st_write(path, entries, 2, NULL, 0);
    free(tables[0]), free(tables[1]);
    return s;
}

// A reference that is none of the queries: `src` mirrored left to right and darkened, so that every query's
// few-shot map has structure (a query compared with itself gives a map of rounding noise around zero).
static Status mirrored_reference(const Image *src, Image *out) {
    *out = (Image){src->width, src->height, NULL};
    Status s = mem_host_alloc((size_t)src->width * src->height * 3, (void **)&out->rgb);
    if (s != AGPT_OK) return s;
    for (int y = 0; y < src->height; y++)
        for (int x = 0; x < src->width; x++)
            for (int c = 0; c < 3; c++)
                out->rgb[((size_t)y * src->width + x) * 3 + c] =
                    (uint8_t)(src->rgb[((size_t)y * src->width + (src->width - 1 - x)) * 3 + c] * 3 / 4);
    return AGPT_OK;
}

// Every image of a batch against its own anomalygpt_ask; returns the token counts in counts (may be NULL).
static void compare_batch(AnomalyGPT *a, const Image *images, int n, const char *const *inputs, int max_new,
                          const char *what, int *counts) {
    int SS = a->vision.vision.image * a->vision.vision.image;
    AnomalyAnswer *batch = calloc((size_t)n, sizeof *batch), *single = calloc((size_t)n, sizeof *single);
    for (int i = 0; i < n; i++) {
        batch[i].map = malloc((size_t)SS * sizeof(float));
        single[i].map = malloc((size_t)SS * sizeof(float));
        CHECK_OK(anomalygpt_ask(a, &images[i], NULL, 0, inputs[i], NULL, max_new, &single[i]));
    }
    CHECK_OK(anomalygpt_ask_batch(a, images, n, inputs, max_new, batch));
    for (int i = 0; i < n; i++) {
        AnomalyAnswer *b = &batch[i], *o = &single[i];
        bool same = b->n_tokens == o->n_tokens;
        for (int t = 0; same && t < b->n_tokens; t++) same = b->tokens[t] == o->tokens[t];
        CHECK(same, "%s, image %d: greedy tokens differ (%d in the batch, %d alone)", what, i, b->n_tokens,
              o->n_tokens);
        CHECK(b->text && o->text && strcmp(b->text, o->text) == 0, "%s, image %d: answer '%s' vs '%s'", what, i,
              b->text ? b->text : "(null)", o->text ? o->text : "(null)");
        CHECK(b->class_name && o->class_name && strcmp(b->class_name, o->class_name) == 0,
              "%s, image %d: class '%s' vs '%s'", what, i, b->class_name ? b->class_name : "(null)",
              o->class_name ? o->class_name : "(null)");
        CHECK(b->prefix_tokens == o->prefix_tokens && b->reused_tokens == 0, "%s, image %d: prefix %d vs %d",
              what, i, b->prefix_tokens, o->prefix_tokens);
        double ds = fabs((double)b->score - o->score);
        // scores and maps are probabilities: their scale is 1 even where a value is close to zero
        CHECK(ds <= 1e-6 * fmax(fabs((double)o->score), 1.0) && isfinite(b->score),
              "%s, image %d: score %.9g vs %.9g", what, i, b->score, o->score);
        char name[96];
        snprintf(name, sizeof name, "%s, image %d: map", what, i);
        CHECK_CLOSE_SCALED(b->map, o->map, SS, 1e-6, 1.0, name);
        CHECK(b->vision_ms >= 0 && b->prefill_ms >= 0 && b->decode_ms >= 0, "%s, image %d: timings", what, i);
        printf("  %s, image %d: %d prefix tokens, %d generated, class '%s', score %.5f: %s\n", what, i,
               b->prefix_tokens, b->n_tokens, b->class_name, b->score, b->text ? b->text : "(null)");
        if (counts) counts[i] = b->n_tokens;
    }
    for (int i = 0; i < n; i++) {
        free(batch[i].text), free(single[i].text);
        free(batch[i].map), free(single[i].map);
    }
    free(batch), free(single);
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : AGPT_TEST_DATA;
    char path[1200], model[1200], tokenizer[1200], image_path[3][1200];
    snprintf(path, sizeof path, "%s/anomalygpt/parts.safetensors", data);
    snprintf(model, sizeof model, "%s/imagebind/model.safetensors", data);
    snprintf(image_path[0], sizeof image_path[0], "%s/imagebind/query.png", data);
    snprintf(image_path[1], sizeof image_path[1], "%s/imagebind/ref0.png", data);
    snprintf(image_path[2], sizeof image_path[2], "%s/imagebind/ref1.png", data);
    snprintf(tokenizer, sizeof tokenizer, "%s/llama-tokenizer.model", AGPT_SHARED_DATA);
    if (access(tokenizer, R_OK) != 0) {
        printf("no %s: skipped\n", tokenizer);
        return TEST_SKIP;
    }
    if (st_open(path, &parts) != AGPT_OK) {
        printf("golden missing (%s): skipped\n", agpt_last_error());
        return TEST_SKIP;
    }
    char tmp[] = "/tmp/agpt-batch-XXXXXX", tables[1300];
    if (!mkdtemp(tmp)) return 1;
    snprintf(tables, sizeof tables, "%s/tables.safetensors", tmp);
    Tensor golden_tokens;
    int32_t stop_like = 0;
    if (st_get(parts, "golden.tokens", &golden_tokens) == AGPT_OK && golden_tokens.shape[0] > 4)
        memcpy(&stop_like, (const char *)golden_tokens.data + 4 * 4, 4);
    CHECK(stop_like > 0, "the golden answer's 5th token");
    CHECK_OK(write_tables(tables, stop_like));

    Engine e;
    CHECK_OK(engine_create(&e, DEV_CPU, 0, 0, 1));
    AnomalyGPT a;
    const char *overlays[2] = {tables, path};
    Status s = anomalygpt_open_batch(&a, &e, model, overlays, 2, tokenizer, DT_F32, 128, 3);
    CHECK_OK(s);
    if (s == AGPT_OK) {
        CHECK(a.max_batch == 3 && a.cache.max_batch == 3, "opened for batches of 3 (model %d, cache %d)",
              a.max_batch, a.cache.max_batch);
        Image img[3];
        for (int i = 0; i < 3; i++) CHECK_OK(image_load(image_path[i], &img[i]));
        const char *golden_prompt = st_metadata(parts, "prompt");
        // Prompts of different lengths; the first two name the bottle (one map batch), the third names nothing
        // (the class 'object': its own map call).
        const char *prompts[3] = {golden_prompt, "Is there any anomaly in this bottle?",
                                  "Please look at the whole image carefully. Describe what you see, and say "
                                  "whether there is any anomaly in it."};
        int counts[3] = {0};
        compare_batch(&a, img, 3, prompts, MAX_NEW, "batch of 3", counts);
        int lo = 0, hi = 0;
        for (int i = 1; i < 3; i++) {
            if (counts[i] < counts[lo]) lo = i;
            if (counts[i] > counts[hi]) hi = i;
        }
        CHECK(counts[lo] < MAX_NEW && counts[lo] < counts[hi], "one sequence stops early while another goes on "
              "(tokens generated: %d %d %d)", counts[0], counts[1], counts[2]);
        // The same class for all three: one vision batch.
        const char *bottles[3] = {prompts[1], golden_prompt, "Is this bottle damaged?"};
        compare_batch(&a, img, 3, bottles, MAX_NEW, "one class", NULL);
        // n = 1 is the plain call.
        compare_batch(&a, img, 1, prompts, MAX_NEW, "n = 1", NULL);
        // Larger than the model's batch: slices of 3 and 2.
        Image five[5] = {img[0], img[1], img[2], img[0], img[1]};
        const char *five_prompts[5] = {prompts[0], prompts[1], prompts[2], prompts[1], prompts[0]};
        compare_batch(&a, five, 5, five_prompts, 12, "batch of 5 in slices", NULL);
        // Few-shot maps (references set): the class is "" for every image. The references are none of the
        // queries, so each map has structure to compare.
        Image refs[2];
        CHECK_OK(mirrored_reference(&img[1], &refs[0]));
        CHECK_OK(mirrored_reference(&img[2], &refs[1]));
        CHECK_OK(vision_model_set_references(&a.vision, refs, 2));
        compare_batch(&a, img, 3, prompts, MAX_NEW, "few-shot", NULL);
        CHECK_OK(vision_model_set_references(&a.vision, NULL, 0));
        image_free(&refs[0]), image_free(&refs[1]);
        // The ask after a batch is unaffected (the batch leaves nothing to reuse).
        a.reuse_cache = true;
        compare_batch(&a, img, 2, prompts, 8, "with reuse_cache", NULL);
        a.reuse_cache = false;

        // Bad arguments: errors with a message, no text left to free.
        AnomalyAnswer out[3];
        memset(out, 0, sizeof out);
        const char *with_null[3] = {prompts[0], NULL, prompts[2]};
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 0, prompts, MAX_NEW, out));
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, with_null, MAX_NEW, out));
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, prompts, 0, out));
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, prompts, 1025, out));
        CHECK_ERR(anomalygpt_ask_batch(&a, NULL, 3, prompts, MAX_NEW, out));
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, NULL, MAX_NEW, out));
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, prompts, MAX_NEW, NULL));
        // A prompt that, with the tokens asked for, does not fit the context of 128.
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, prompts, 100, out));
        for (int i = 0; i < 3; i++) CHECK(out[i].text == NULL, "no text after a failed batch (image %d)", i);
        char *long_prompt = malloc(20001);
        memset(long_prompt, 'a', 20000);
        long_prompt[20000] = 0;
        for (int i = 1; i < 20000; i += 2) long_prompt[i] = ' ';
        const char *with_long[3] = {prompts[0], long_prompt, prompts[2]};
        CHECK_ERR(anomalygpt_ask_batch(&a, img, 3, with_long, 8, out));
        free(long_prompt);
        for (int i = 0; i < 3; i++) CHECK(out[i].text == NULL, "no text after a failed batch (image %d)", i);
        // After the errors, a batch still works.
        compare_batch(&a, img, 2, prompts, 8, "after errors", NULL);
        for (int i = 0; i < 3; i++) image_free(&img[i]);
        anomalygpt_close(&a);
    }
    // The old open is a batch of 1: a batch of 2 runs in slices.
    s = anomalygpt_open(&a, &e, model, overlays, 2, tokenizer, DT_F32, 128);
    CHECK_OK(s);
    if (s == AGPT_OK) {
        CHECK(a.max_batch == 1 && a.cache.max_batch == 1, "anomalygpt_open: batch 1");
        Image img[2];
        CHECK_OK(image_load(image_path[0], &img[0]));
        CHECK_OK(image_load(image_path[1], &img[1]));
        const char *prompts[2] = {st_metadata(parts, "prompt"), "Is there any anomaly in this bottle?"};
        compare_batch(&a, img, 2, prompts, 8, "batch 1 model", NULL);
        image_free(&img[0]), image_free(&img[1]);
        anomalygpt_close(&a);
    }
    CHECK_ERR(anomalygpt_open_batch(&a, &e, model, overlays, 2, tokenizer, DT_F32, 128, 0));
    engine_destroy(&e);
    st_close(parts);
    unlink(tables);
    rmdir(tmp);
    return test_summary();
}
