// The vision path against PyTorch (tests/data/imagebind/, made by tests/reference/make_imagebind_goldens.py):
// a small ImageBind-structured model with the official key names, head dim 80 and the real 224-pixel input.
// Checks the embedding, the four taps, text encoder outputs, the prompt ensemble, the zero-shot map and
// scores for three class names, and the few-shot map against two references; on the CPU, and on CUDA (f32 and
// bf16) when a GPU exists.
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/ops.h"
#include "model/anomaly_map.h"
#include "model/preprocess.h"
#include "model/vision_model.h"
#include "runtime/image.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "test.h"
#include "test_util.h"

static char dir[1024];
static SafeTensors *golden;
static SafeTensors *overlay;

// The golden file stores the text token table sparsely; write the full [V,C] table (zeros elsewhere) to a
// temporary file that the WeightStore layers over the golden one.
static Status write_token_table(const char *path) {
    Tensor rows, values;
    AGPT_TRY(st_get(golden, "text.token_rows", &rows));
    AGPT_TRY(st_get(golden, "text.token_values", &values));
    int64_t V = 49408, C = values.shape[1];
    uint16_t *table = calloc((size_t)(V * C), sizeof(uint16_t));
    if (!table) return AGPT_FAIL(AGPT_ERR_OOM, "token table");
    for (int64_t r = 0; r < rows.shape[0]; r++) {
        int32_t id;
        memcpy(&id, (const char *)rows.data + r * 4, 4);
        memcpy(table + (size_t)id * C, (const char *)values.data + r * C * 2, (size_t)C * 2);
    }
    StEntry e = {"modality_preprocessors.text.token_embedding.weight", tensor_2d(table, DT_BF16, DEV_CPU, V, C)};
    Status s = st_write(path, &e, 1, NULL, 0);
    free(table);
    return s;
}

static Status load_image_tensor(Engine *e, const char *name, DType dt, float *staging, Tensor *dst_row) {
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    Image img;
    AGPT_TRY(image_load(path, &img));
    Status s = preprocess_image(&img, PREPROCESS_SHORTER_SIDE_CROP, 224, staging);
    image_free(&img);
    AGPT_TRY(s);
    Tensor host = tensor_1d(staging, DT_F32, DEV_CPU, 3 * 224 * 224);
    if (dt == DT_F32 && e->device == DEV_CPU) return tensor_copy(dst_row, &host);
    uint16_t *half = malloc((size_t)3 * 224 * 224 * 2);
    convert_host(dt == DT_F32 ? (void *)staging : (void *)half, dt, staging, DT_F32, 3 * 224 * 224);
    Tensor h2 = tensor_1d(dt == DT_F32 ? (void *)staging : (void *)half, dt, DEV_CPU, 3 * 224 * 224);
    s = tensor_copy(dst_row, &h2);
    free(half);
    return s;
}

static void run(Engine *e, DType dt, double tol, const char *label) {
    printf("== %s ==\n", label);
    WeightStore ws;
    weights_init(&ws, e, dt, overlay, "token table overlay");
    CHECK_OK(weights_add_file(&ws, golden, "imagebind golden"));
    VisionEncoder v;
    TextEncoder t;
    PatchDecoder d;
    Status s = vision_load(&v, &ws);
    CHECK_OK(s);
    if (s) return;
    CHECK_OK(text_load(&t, &ws));
    CHECK_OK(decoder_load(&d, &ws));
    CHECK(v.block.dim == 160 && v.block.heads == 2 && v.layers == 4 && v.tokens == 257 && v.taps[3] == 3,
          "vision config read from the file");
    CHECK(t.block.dim == 64 && t.layers == 2 && t.vocab == 49408 && t.context == 77, "text config read from the file");

    int S = 224, T = v.tokens, C = v.block.dim;
    Arena arena;
    size_t bytes = vision_arena_bytes(&v, 3) + text_arena_bytes(&t, PROMPT_SENTENCES) +
                   anomaly_map_arena_bytes(&d, T, S, 2) + ((size_t)16 << 20);
    CHECK_OK(arena_init(&arena, e->device, bytes));
    Tensor images, emb, taps[VISION_TAPS], ref_taps[VISION_TAPS];
    CHECK_OK(arena_tensor(&arena, ws.dtype, 4, (int64_t[]){3, 3, S, S}, &images));
    CHECK_OK(arena_tensor(&arena, ws.dtype, 2, (int64_t[]){3, v.embed}, &emb));
    for (int i = 0; i < VISION_TAPS; i++) CHECK_OK(arena_tensor(&arena, ws.dtype, 3, (int64_t[]){3, T, C}, &taps[i]));
    float *staging = malloc((size_t)3 * S * S * sizeof(float));
    const char *names[3] = {"query.png", "ref0.png", "ref1.png"};
    for (int b = 0; b < 3; b++) {
        Tensor row = tensor_rows_view(&images, (int64_t)b * 3 * S, 3 * S);
        CHECK_OK(load_image_tensor(e, names[b], ws.dtype, staging, &row));
    }
    free(staging);
    CHECK_OK(vision_forward(e, &v, &arena, &images, &emb, taps));
    Tensor emb0 = tensor_rows_view(&emb, 0, 1);
    test_compare_golden(golden, "vision embedding", &emb0, "golden.embedding", tol);
    for (int i = 0; i < VISION_TAPS; i++) {
        char what[64], gname[64];
        snprintf(what, sizeof what, "tap %d (after block %d)", i, v.taps[i]);
        snprintf(gname, sizeof gname, "golden.tap.%d", i);
        Tensor q = tensor_rows_view(&taps[i], 0, T);
        test_compare_golden(golden, what, &q, gname, tol);
        // the references' taps: images 1 and 2 of the batch
        ref_taps[i] = tensor_3d((char *)taps[i].data + (size_t)T * C * dtype_size(ws.dtype), ws.dtype, e->device,
                                2, T, C);
    }
    Tensor q_taps[VISION_TAPS];
    for (int i = 0; i < VISION_TAPS; i++) q_taps[i] = tensor_3d(taps[i].data, ws.dtype, e->device, 1, T, C);

    // Text encoder, prompt ensemble, zero-shot maps for three class names.
    const char *classes[3] = {"bottle", "metal nut", "object"};
    Tensor text_emb, features, map;
    CHECK_OK(arena_tensor(&arena, ws.dtype, 2, (int64_t[]){PROMPT_SENTENCES, t.embed}, &text_emb));
    CHECK_OK(arena_tensor(&arena, ws.dtype, 2, (int64_t[]){2, t.embed}, &features));
    CHECK_OK(arena_tensor(&arena, ws.dtype, 3, (int64_t[]){1, S, S}, &map));
    for (int c = 0; c < 3; c++) {
        char gname[96], what[96];
        snprintf(gname, sizeof gname, "golden.text_ids.%s", classes[c]);
        Tensor ids;
        if (st_get(golden, gname, &ids) != AGPT_OK) {
            CHECK(0, "missing %s", gname);
            continue;
        }
        int32_t *ids_copy = malloc(tensor_nbytes(&ids));
        memcpy(ids_copy, ids.data, tensor_nbytes(&ids));
        CHECK_OK(text_forward(e, &t, &arena, ids_copy, PROMPT_SENTENCES, &text_emb));
        free(ids_copy);
        if (c == 0)
            test_compare_golden(golden, "text encoder, 24 'bottle' sentences", &text_emb, "golden.text_emb.bottle",
                                tol);
        CHECK_OK(prompt_ensemble(e, &text_emb, &features));
        snprintf(gname, sizeof gname, "golden.text_features.%s", classes[c]);
        snprintf(what, sizeof what, "text features '%s'", classes[c]);
        test_compare_golden(golden, what, &features, gname, tol);
        CHECK_OK(anomaly_map_text(e, &d, &arena, q_taps, &features, &map));
        if (c == 0) test_compare_golden(golden, "zero-shot map 'bottle'", &map, "golden.map_text.bottle", tol);
        float score = NAN;
        CHECK_OK(anomaly_map_scores(&map, &score));
        snprintf(gname, sizeof gname, "golden.score_text.%s", classes[c]);
        int64_t n;
        float *want = test_golden_f32(golden, gname, &n);
        if (want) {
            printf("  score '%s' %.6f vs %.6f\n", classes[c], (double)score, (double)want[0]);
            CHECK(fabsf(score - want[0]) <= tol * 10 * fabsf(want[0]), "score '%s' %g vs %g", classes[c],
                  (double)score, (double)want[0]);
            free(want);
        }
    }

    // Few-shot map against the two references.
    FewShotRefs refs;
    CHECK_OK(fewshot_refs_build(e, ref_taps, &refs));
    CHECK_OK(anomaly_map_fewshot(e, &refs, &arena, q_taps, &map));
    test_compare_golden(golden, "few-shot map (k=2)", &map, "golden.map_fewshot", tol);
    fewshot_refs_free(&refs);

    arena_free(&arena);
    vision_free(&v);
    text_free(&t);
    weights_free(&ws);
}

// The CLIP tokenizer gives the golden ids (open_clip's) for every class's 24 sentences, and VisionModel computes
// the features of a class the file does not cache ('metal nut') through tokenizer + text encoder + ensemble.
// A 224 x 224 image moved down and right by d pixels, the border filled with the edge pixel (as the shifted
// references are made, after a preprocessing that is the identity at 224 x 224).
static Image shifted_image(const Image *src, int d) {
    Image out = {src->width, src->height, NULL};
    if (mem_host_alloc((size_t)src->width * src->height * 3, (void **)&out.rgb) != AGPT_OK) abort();
    for (int y = 0; y < src->height; y++)
        for (int x = 0; x < src->width; x++)
            memcpy(out.rgb + ((size_t)y * src->width + x) * 3,
                   src->rgb + ((size_t)(y < d ? 0 : y - d) * src->width + (x < d ? 0 : x - d)) * 3, 3);
    return out;
}

// --reference-shifts 2: a query that is the reference moved by half a patch finds every patch among the
// reference's views (map ~0), which it does not without them; the views' encoder batches do not change it.
static void check_shifted_references(Engine *cpu, const char *model, const char *const *overlays) {
    VisionModel vm, small;
    if (vision_model_open(&vm, cpu, model, overlays, 1, DT_F32, 8) != AGPT_OK ||
        vision_model_open(&small, cpu, model, overlays, 1, DT_F32, 1) != AGPT_OK) {
        CHECK(0, "vision_model_open: %s", agpt_last_error());
        return;
    }
    char p[1300];
    snprintf(p, sizeof p, "%s/ref0.png", dir);
    Image ref;
    CHECK_OK(image_load(p, &ref));
    CHECK(ref.width == 224 && ref.height == 224, "ref0.png is %dx%d, the test needs 224x224", ref.width, ref.height);
    Image moved = shifted_image(&ref, vm.vision.patch / 2);
    float *map = malloc(2 * 224 * 224 * sizeof(float)), plain = 0, with = 0, self = 0, chunked = 0;
    CHECK_OK(vision_model_set_references(&vm, &ref, 1));
    CHECK_OK(vision_model_map(&vm, &moved, 1, "object", map, &plain));
    vm.reference_shifts = small.reference_shifts = 2;
    CHECK_OK(vision_model_set_references(&vm, &ref, 1));
    CHECK(vm.refs.k == 4, "1 reference with shifts: %d views, expected 4", vm.refs.k);
    CHECK_OK(vision_model_map(&vm, &moved, 1, "object", map, &with));
    CHECK_OK(vision_model_map(&vm, &ref, 1, "object", map, &self));
    CHECK_OK(vision_model_set_references(&small, &ref, 1));  // four encoder batches of one view
    CHECK_OK(vision_model_map(&small, &ref, 1, "object", map + 224 * 224, &chunked));
    double worst = 0;
    for (int i = 0; i < 224 * 224; i++) {
        double d = fabs((double)map[i] - map[224 * 224 + i]);
        worst = d > worst || d != d ? d : worst;
    }
    printf("  shifted query: max %.6f without --reference-shifts, %.2e with; the reference itself %.2e; "
           "batches of 1 differ by %.2e\n", (double)plain, (double)with, (double)self, worst);
    CHECK(plain > 0.01f, "the moved query matches the unshifted reference (max %g): the test cannot tell", plain);
    CHECK(with >= 0 && with < 1e-5f && self >= 0 && self < 1e-5f, "with shifts the moved query's map max is %g, the "
          "reference's %g: expected ~0", with, self);
    CHECK(worst <= 1e-5, "the map changes by %g when the views are encoded one at a time", worst);
    // 7 x 7 views: every 2 pixels (patch 14), so a query moved by 4 pixels is among them, and not among 2 x 2.
    Image moved4 = shifted_image(&ref, 2 * vm.vision.patch / 7);
    float two = 0, seven = 0;
    CHECK_OK(vision_model_map(&vm, &moved4, 1, "object", map, &two));
    vm.reference_shifts = 7;
    CHECK_OK(vision_model_set_references(&vm, &ref, 1));
    CHECK(vm.refs.k == 49, "1 reference with 7 x 7 shifts: %d views, expected 49", vm.refs.k);
    CHECK_OK(vision_model_map(&vm, &moved4, 1, "object", map, &seven));
    printf("  query moved by 4 pixels: max %.6f with 2 x 2 views, %.2e with 7 x 7\n", (double)two, (double)seven);
    CHECK(two > 0.01f && seven >= 0 && seven < 1e-5f, "moved by 4 pixels: max %g (2 x 2 views), %g (7 x 7)", two, seven);
    image_free(&moved4);
    free(map);
    image_free(&moved);
    image_free(&ref);
    vision_model_close(&small);
    vision_model_close(&vm);
}

static void run_tokenizer_and_model(const char *table_path) {
    printf("== tokenizer and VisionModel ==\n");
    char vocab[1200];
    snprintf(vocab, sizeof vocab, "%s/clip-bpe-simple-vocab-16e6.txt.gz", AGPT_SHARED_DATA);
    ClipTokenizer *tok = NULL;
    if (clip_tokenizer_load_file(vocab, &tok) != AGPT_OK) {
        printf("  no CLIP vocabulary in ../shared/data (%s): this part is skipped\n", agpt_last_error());
        return;
    }
    const char *classes[3] = {"bottle", "metal nut", "object"};
    for (int c = 0; c < 3; c++) {
        char gname[96], sentences[PROMPT_SENTENCES][256];
        snprintf(gname, sizeof gname, "golden.text_ids.%s", classes[c]);
        Tensor ids;
        if (st_get(golden, gname, &ids) != AGPT_OK) continue;
        int n = prompt_sentences(classes[c], sentences, PROMPT_SENTENCES), bad = 0;
        for (int i = 0; i < n; i++) {
            int32_t got[CLIP_CONTEXT_LENGTH], want[CLIP_CONTEXT_LENGTH];
            int count = 0;
            CHECK_OK(clip_tokenize(tok, sentences[i], got, &count));
            memcpy(want, (const char *)ids.data + (size_t)i * sizeof want, sizeof want);
            bad += memcmp(got, want, sizeof got) != 0;
        }
        CHECK(n == PROMPT_SENTENCES && bad == 0, "'%s': %d of %d sentences tokenised differently from open_clip",
              classes[c], bad, n);
    }
    Engine cpu;
    CHECK_OK(engine_create(&cpu, DEV_CPU, 0, 0, 1));
    char model[1200];
    snprintf(model, sizeof model, "%s/model.safetensors", dir);
    VisionModel vm;
    const char *overlays[1] = {table_path};
    if (vision_model_open(&vm, &cpu, model, overlays, 1, DT_F32, 1) == AGPT_OK) {
        vision_model_set_tokenizer(&vm, tok);
        const Tensor *f = NULL;
        const char *used = NULL;
        CHECK_OK(vision_model_class_features(&vm, "metal_nut", &f, &used));
        if (f) {
            CHECK(strcmp(used, "metal nut") == 0, "class name used: %s", used);
            test_compare_golden(golden, "VisionModel features 'metal nut' (tokenizer + text encoder)", f,
                                "golden.text_features.metal nut", 1e-4);
        }
        vision_model_close(&vm);
    } else {
        CHECK(0, "vision_model_open: %s", agpt_last_error());
    }
    // The options beyond the reference: rotation-augmented references, and the fused map.
    if (vision_model_open(&vm, &cpu, model, overlays, 1, DT_F32, 8) == AGPT_OK) {
        Image query, refs[2];
        char p[1300];
        snprintf(p, sizeof p, "%s/query.png", dir);
        CHECK_OK(image_load(p, &query));
        for (int i = 0; i < 2; i++) {
            snprintf(p, sizeof p, "%s/ref%d.png", dir, i);
            CHECK_OK(image_load(p, &refs[i]));
        }
        float *map = malloc(224 * 224 * sizeof(float)), score = 0;
        struct { bool rotate, fuse; const char *golden, *what; } cases[2] = {
            {true, false, "golden.stats_fewshot_rot", "few-shot, references with 4 rotations"},
            {false, true, "golden.stats_fused_bottle", "few-shot fused with zero-shot 'bottle'"}};
        for (int c = 0; c < 2; c++) {
            vm.augment_rotations = cases[c].rotate;
            vm.fuse_text_map = cases[c].fuse;
            CHECK_OK(vision_model_set_references(&vm, refs, 2));
            CHECK_OK(vision_model_map(&vm, &query, 1, "bottle", map, &score));
            double mean = 0;
            for (int i = 0; i < 224 * 224; i++) mean += map[i];
            mean /= 224 * 224;
            int64_t n;
            float *want = test_golden_f32(golden, cases[c].golden, &n);
            if (want) {
                printf("  %-44s max %.6f (torch %.6f) mean %.6f (torch %.6f)\n", cases[c].what, (double)score,
                       (double)want[0], mean, (double)want[1]);
                CHECK(fabs(score - want[0]) <= 1e-4 * fabs(want[0]) && fabs(mean - want[1]) <= 1e-4 * fabs(want[1]),
                      "%s: max/mean differ from PyTorch", cases[c].what);
                free(want);
            }
        }
        free(map);
        image_free(&query);
        image_free(&refs[0]);
        image_free(&refs[1]);
        vision_model_close(&vm);
    }
    check_shifted_references(&cpu, model, overlays);
    engine_destroy(&cpu);
    clip_tokenizer_free(tok);
}

int main(int argc, char **argv) {
    snprintf(dir, sizeof dir, "%s/imagebind", argc > 1 ? argv[1] : AGPT_TEST_DATA);
    char path[1200], tmp[] = "/tmp/agpt-vision-XXXXXX", table[1300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (st_open(path, &golden) != AGPT_OK) {
        printf("golden missing (%s): skipped\n", agpt_last_error());
        return TEST_SKIP;
    }
    if (!mkdtemp(tmp)) return 1;
    snprintf(table, sizeof table, "%s/token_table.safetensors", tmp);
    CHECK_OK(write_token_table(table));
    CHECK_OK(st_open(table, &overlay));
    if (!overlay) return test_summary();

    Engine cpu;
    CHECK_OK(engine_create(&cpu, DEV_CPU, 0, 0, 1));
    // A whole model is many ops: DESIGN.md's end-to-end tolerance for fp32 CPU vs PyTorch fp32 is 1e-4.
    run(&cpu, DT_F32, 1e-4, "cpu f32");
    engine_destroy(&cpu);
    run_tokenizer_and_model(table);
    if (cuda_device_count() > 0) {
        Engine gpu;
        CHECK_OK(engine_create(&gpu, DEV_CUDA, 0, 0, 1));
        run(&gpu, DT_F32, 1e-4, "cuda f32");
        run(&gpu, DT_BF16, 1e-2, "cuda bf16");
        engine_destroy(&gpu);
    } else {
        printf("no CUDA device: the cuda part is skipped\n");
    }
    st_close(overlay);
    st_close(golden);
    unlink(table);
    rmdir(tmp);
    return test_summary();
}
