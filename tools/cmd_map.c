// agpt map: anomaly maps and image scores for images, zero-shot (a class name) or few-shot (normal references).
// For each image it writes <out>/<name>.heatmap.png (the map over the image the model saw), <out>/<name>.map.
// safetensors (the raw [S,S] float32 map) and prints one JSON line; a failed image prints a JSON line with
// "error" and the others go on. Exit status 0 only if every image was processed. With --ask the whole AnomalyGPT is
// loaded and each line also has the model's "answer" to that question about the image (one turn, no history);
// the map is then the one the answer was made from (the class the question names, or the few-shot map).
#include <cjson/cJSON.h>
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/anomalygpt.h"
#include "model/vision_model.h"
#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/heatmap.h"
#include "tools/inspect_io.h"

#define MAX_LIST 64

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt map --model M.safetensors [--reference normal.png ...] [--class NAME] -o OUT_DIR IMAGE...\n"
            "  --model F        the model file (vision encoder, decoder; text encoder or cached class features)\n"
            "  --weights F      a file of weights layered over the model (e.g. a trained decoder); repeatable\n"
            "  --reference F    a normal image of the product: few-shot map instead of the zero-shot one; repeatable\n"
            "  --class NAME     the product name for the zero-shot map (default 'object'; 1 to 100 bytes of UTF-8)\n"
            "  --clip-vocab F   CLIP's bpe_simple_vocab_16e6.txt.gz, to compute a class name the model file does\n"
            "                   not cache (needs the text encoder in the file)\n"
            "  --squash         resize to 224x224 ignoring the aspect ratio (the web demo's path) instead of\n"
            "                   shorter side + center crop (the reference's inference path)\n"
            "  --fuse-text-map  with references: the mean of the few-shot and zero-shot maps (off: the reference)\n"
            "  --rotate-references  also use each reference turned 90/180/270 degrees (off: the reference)\n"
            "  --reference-shifts N  also use each reference moved down and right by every multiple of patch/N\n"
            "                   pixels below a patch: N x N views (1..14; 1, the reference: none), for parts that\n"
            "                   are not placed to the pixel (7: every 2 pixels, as the default model is used)\n"
            "  --device cpu|cuda, --dtype f32|f16|bf16 (cuda: the compute dtype, default f16 as the reference; cpu:\n"
            "                   bf16/f16 keep the weight matrices in it, half the memory; default f32), --threads N\n"
            "  -o, --out DIR    where heatmaps and raw maps go (created if missing; checked for writing first)\n"
            "  --ask \"TEXT\"     also answer this question about each image (loads the LLM); the\n"
            "                   zero-shot map then uses the class the question names, as the reference does\n"
            "  --tokenizer F    LLaMA's SentencePiece tokenizer.model (with --ask; default: the one in the model file)\n"
            "  --greedy | --temperature T --top-p P --top-k K --seed S   decoding for --ask (default: sampling with\n"
            "                   1.0, 0.01, 50, seed 42 per image, as the web demo; T 1e-4..1e4, P (0, 1], K >= 0 with 0\n"
            "                   no top-k, S any uint64); --max-new N (1..1024, 512), --context N (64..32768, 2048)\n");
}

static bool int_value(const char *opt, const char *v, long long lo, long long hi, int *out) {
    long long x;
    if (cli_parse_int("map", opt, v, lo, hi, &x)) return false;
    *out = (int)x;
    return true;
}

int cmd_map(int argc, char **argv) {
    const char *model = NULL, *class_name = "object", *out_dir = NULL, *clip_vocab = NULL;
    const char *overlays[MAX_LIST], *refs[MAX_LIST], *inputs[MAX_LIST];
    int n_overlays = 0, n_refs = 0, n_inputs = 0, threads = 0, squash = 0, fuse = 0, rotate = 0, shifts = 1;
    const char *ask = NULL, *sp_model = NULL;
    int max_new = 512, context = 2048;
    SamplerConfig scfg = sampler_default_config();
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    DType dt = DT_F16;  // the reference runs the whole model in fp16 (model.half()); bf16 keeps 3 fewer mantissa bits
    for (int i = 1; i < argc; i++) {
        int shared = cli_engine_option(argc, argv, &i, "map", &dev, &dt, &threads);
        if (!shared) shared = cli_sampling_option(argc, argv, &i, "map", &scfg);
        if (shared < 0) return 2;
        if (shared) continue;
        const char *a = argv[i], *v;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, "map"))) return 2; } while (0)
#define PUSH(list, n) do { if ((n) == MAX_LIST) { fprintf(stderr, "agpt map: at most %d of %s\n", MAX_LIST, a); return 2; } (list)[(n)++] = v; } while (0)
        if (!strcmp(a, "--model")) { VALUE(); model = v; }
        else if (!strcmp(a, "--weights")) { VALUE(); PUSH(overlays, n_overlays); }
        else if (!strcmp(a, "--reference")) { VALUE(); PUSH(refs, n_refs); }
        else if (!strcmp(a, "--class")) { VALUE(); class_name = v; if (!class_name_ok("map", v)) return 2; }
        else if (!strcmp(a, "--clip-vocab")) { VALUE(); clip_vocab = v; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) { VALUE(); out_dir = v; }
        else if (!strcmp(a, "--ask")) { VALUE(); ask = v; }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); sp_model = v; }
        else if (!strcmp(a, "--max-new")) { VALUE(); if (!int_value(a, v, 1, 1024, &max_new)) return 2; }
        else if (!strcmp(a, "--context")) { VALUE(); if (!int_value(a, v, 64, 32768, &context)) return 2; }
        else if (!strcmp(a, "--squash")) squash = 1;
        else if (!strcmp(a, "--fuse-text-map")) fuse = 1;
        else if (!strcmp(a, "--rotate-references")) rotate = 1;
        else if (!strcmp(a, "--reference-shifts")) { VALUE(); if (!int_value(a, v, 1, 14, &shifts)) return 2; }
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else if (a[0] == '-') { fprintf(stderr, "agpt map: unknown option '%s'\n", a); usage(stderr); return 2; }
        else { v = a; PUSH(inputs, n_inputs); }
#undef VALUE
#undef PUSH
    }
    if (!model || !out_dir || n_inputs == 0) {
        fprintf(stderr, "agpt map: --model, -o and at least one image are required\n");
        usage(stderr);
        return 2;
    }
    Status s = check_model_path(model, "--model");
    for (int k = 0; k < n_overlays && s == AGPT_OK; k++) s = check_model_path(overlays[k], "--weights");
    if (s) return cli_report("map", s);
    if ((s = ensure_dir(out_dir))) {  // before the model loads: a usage error
        cli_report("map", s);
        return 2;
    }

    Engine eng;
    dt = cli_model_dtype(argc, argv, dev, dt);
    if ((s = engine_create(&eng, dev, 0, threads, 1))) return cli_report("map", s);
    static AnomalyGPT agpt;  // with --ask: the whole model; its .vision is the VisionModel used below
    static VisionModel vision;
    VisionModel *vm = ask ? &agpt.vision : &vision;
    Sampler sampler = {0};
    int variants = (rotate ? 4 : 1) * shifts * shifts;  // encoder images per reference
    int batch = n_refs * variants > 16 ? 16 : n_refs * variants;
    if (batch < 1) batch = 1;
    double t0 = timer_now_s();
    s = ask ? anomalygpt_open(&agpt, &eng, model, overlays, n_overlays, sp_model, dt, context)
            : vision_model_open(vm, &eng, model, overlays, n_overlays, dt, batch);
    if (s == AGPT_OK && ask && !scfg.greedy && (s = sampler_init(&sampler, &scfg, agpt.llm.vocab)))
        anomalygpt_close(&agpt);
    if (s) {
        engine_destroy(&eng);
        return cli_report("map", s);
    }
    if (squash) vm->mode = PREPROCESS_SQUASH;
    vm->fuse_text_map = fuse;
    vm->augment_rotations = rotate;
    vm->reference_shifts = shifts;
    ClipTokenizer *tokenizer = NULL;
    if (clip_vocab) {
        if ((s = clip_tokenizer_load_file(clip_vocab, &tokenizer))) {
            sampler_free(&sampler);
            if (ask) anomalygpt_close(&agpt);
            else vision_model_close(vm);
            engine_destroy(&eng);
            return cli_report("map", s);
        }
        vision_model_set_tokenizer(vm, tokenizer);
    }
    double t_load = timer_now_s() - t0;
    int rc = 0;
    if (n_refs > 0) {
        Image ref_images[MAX_LIST];
        int loaded = 0;
        for (; loaded < n_refs; loaded++)
            if ((s = image_load(refs[loaded], &ref_images[loaded]))) break;
        if (s == AGPT_OK) s = vision_model_set_references(vm, ref_images, n_refs);
        for (int i = 0; i < loaded; i++) image_free(&ref_images[i]);
        if (s) {
            rc = cli_report("map", agpt_add_context(s, "reference images"));
            goto done;
        }
    }
    int S = vm->vision.image;
    float *map = NULL;
    if ((s = mem_host_alloc((size_t)S * S * sizeof(float), (void **)&map))) {
        rc = cli_report("map", s);
        goto done;
    }
    const Tensor *features;
    const char *used_class = class_name;
    if (!ask && (n_refs == 0 || fuse) && (s = vision_model_class_features(vm, class_name, &features, &used_class))) {
        rc = cli_report("map", s);
        mem_host_free(map);
        goto done;
    }
    for (int i = 0; i < n_inputs; i++) {
        cJSON *line = cJSON_CreateObject();
        if (!line) {
            rc = cli_report("map", AGPT_FAIL(AGPT_ERR_OOM, "out of memory printing a result"));
            break;
        }
        cJSON_AddStringToObject(line, "image", inputs[i]);
        double t1 = timer_now_s();
        Image img;
        float score = 0;
        const char *img_class = used_class;
        AnomalyAnswer ans = {.map = map};
        char stem[256], heat[4096], raw[4096];
        stem_of(inputs[i], stem, sizeof stem);
        // Two inputs with one file name (MVTec's test/<defect>/000.png) must not overwrite each other's outputs:
        // then every output carries the input's position.
        for (int j = 0; j < n_inputs; j++) {
            char other[256];
            stem_of(inputs[j], other, sizeof other);
            if (j != i && strcmp(other, stem) == 0) {
                size_t len = strlen(stem);
                snprintf(stem + (len < 240 ? len : 240), sizeof stem - (len < 240 ? len : 240), "_%d", i);
                break;
            }
        }
        s = image_load(inputs[i], &img);
        if (s == AGPT_OK) {
            if (ask) {  // the answer's own map and score: the vision model runs once
                if (!scfg.greedy) rng_seed(&sampler.rng, scfg.seed);  // each image's answer independent of order
                s = anomalygpt_ask(&agpt, &img, NULL, 0, ask, scfg.greedy ? NULL : &sampler, max_new, &ans);
                score = ans.score;
                img_class = ans.class_name;
            } else {
                s = vision_model_map(vm, &img, 1, used_class, map, &score);
            }
            if (s == AGPT_OK) s = write_map_outputs(vm, &img, map, out_dir, stem, heat, raw, sizeof heat);
            image_free(&img);
        }
        if (s == AGPT_OK) {
            cJSON_AddNumberToObject(line, "score", score);
            cJSON_AddStringToObject(line, "mode", !n_refs ? "zero-shot" : fuse ? "few-shot+zero-shot" : "few-shot");
            if (n_refs) cJSON_AddNumberToObject(line, "references", n_refs * variants);
            if (!n_refs || fuse) cJSON_AddStringToObject(line, "class", img_class);
            if (ask) cJSON_AddStringToObject(line, "answer", ans.text ? ans.text : "");
            cJSON_AddStringToObject(line, "heatmap", heat);
            cJSON_AddStringToObject(line, "map", raw);
            cJSON_AddNumberToObject(line, "ms", 1e3 * (timer_now_s() - t1));
        } else {
            cJSON_AddStringToObject(line, "error", agpt_last_error());
            rc = 1;
        }
        free(ans.text);
        if ((s = print_json_line(line))) {  // the result is lost: stop rather than compute more for nobody
            rc = cli_report("map", agpt_add_context(s, "stopped after %d of %d image(s)", i, n_inputs));
            break;
        }
    }
    mem_host_free(map);
    LOG_I("%d image(s) in %.2f s after a %.2f s load", n_inputs, timer_now_s() - t0 - t_load, t_load);
done:
    sampler_free(&sampler);
    if (ask) anomalygpt_close(&agpt);
    else vision_model_close(vm);
    clip_tokenizer_free(tokenizer);
    engine_destroy(&eng);
    return finish_stdout("map", rc);
}
