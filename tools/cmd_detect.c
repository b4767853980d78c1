// agpt detect: the line inspection command. For every image (files, or folders walked recursively) one JSON
// line on stdout: the verdict, the image score (the map's maximum, as the reference's image AUROC uses), the
// model's answer, the class and mode of the map, output paths and timings. A failed image gets a line with
// "ok": false and its error, and the others go on. Progress and a summary (images/s) go to stderr.
//
// The verdict is the answer's: "anomalous" when it starts with "Yes", "normal" when it starts with "No" (the
// reference's accuracy counts 'Yes' / 'No' in the answer), null when it says neither ("unclear" in the summary:
// the answer is there to read). No threshold is involved. --verdict-only stops generating after a few tokens. A
// model file without the LLM gives maps and scores only.
//
// With --watch DIR the images come from a hot folder (tools/watch.h) instead, one at a time, each inspected as
// above, until SIGINT or SIGTERM.
//
// Exit status: 0 when every image was processed and every line written, 1 when some were not (an image that
// failed, stdout that could not be written, or a model that did not load), 2 for a usage error (found before
// any model loads: bad numbers, an unwritable --out, no images). --watch: 0 once stopped by a signal (failed
// images get their "ok": false line), 1 when the folder could not be watched or the log written.
#define _DEFAULT_SOURCE  // DT_DIR, strdup, strcasecmp
#include <cjson/cJSON.h>
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <strings.h>
#include <sys/stat.h>

#include "model/anomalygpt.h"
#include "model/vision_model.h"
#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "runtime/text.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"
#include "tools/watch.h"

#define MAX_REFS 64
#define MAX_OVERLAYS 7
#define MAX_BATCH 256

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt detect --model M.safetensors [options] IMAGES_OR_FOLDERS...\n"
            "  --model F        the model file (agpt convert); --weights F layers trained weights over it (repeatable)\n"
            "  --reference F    a normal image of the product: few-shot map (repeatable; the reference uses 1-4)\n"
            "  --class NAME     the product: its text features make the zero-shot map, and the question names it\n"
            "                   (1 to 100 bytes of UTF-8)\n"
            "  --prompt TEXT    the question (default: \"Is there any anomaly in the image?\", after \"This is a photo of\n"
            "                   a NAME for anomaly detection, which should be without any damage, flaw, defect, scratch,\n"
            "                   hole or broken part.\" with --class, as the reference's training prompts)\n"
            "  --out DIR        write <name>.heatmap.png and <name>.map.safetensors (raw f32 map) per image; checked\n"
            "                   for writing before the model loads; runs sharing it never mix a heatmap and a map\n"
            "  --verdict-only   stop after the verdict (a few tokens) instead of the whole answer\n"
            "  --max-new N      answer tokens at most, 1..1024 (default 512); --context N tokens, 64..32768 (2048)\n"
            "  --tokenizer F, --clip-vocab F   override the tokenizers embedded in the model file\n"
            "  --squash, --fuse-text-map, --rotate-references, --reference-shifts N   as in agpt map\n"
            "  --greedy (default) | --temperature T (1e-4..1e4) --top-p P (0..1] --top-k K (0: off) --seed S (uint64)\n"
            "  --batch N        with greedy decoding, N images at a time through every stage, 1..256 (default 1: one\n"
            "                   by one); the KV cache holds N sequences of --context tokens. Lines stay in input order;\n"
            "                   each line's ms (vision, prefill, generate) is its batch's time divided by the batch's\n"
            "                   size (decode_image and outputs are its own)\n"
            "  --device cpu|cuda, --dtype f32|f16|bf16 (cuda: the compute dtype, default f16; cpu: bf16/f16 keep the\n"
            "                   weight matrices in it, half the memory; default f32), --threads N\n"
            "  --watch DIR      a hot folder instead of IMAGES: inspect the images there, then every image written or\n"
            "                   renamed into DIR (inotify), one at a time, until SIGINT or SIGTERM (exit 0); the same\n"
            "                   JSON lines on stdout, or appended to --watch-log F; --sort moves a normal image into\n"
            "                   DIR/ok/, an anomalous one into DIR/ng/ (\"moved_to\"), and leaves the others\n"
            "Folders are walked recursively for .png, .jpg and .jpeg files, in name order (a folder holding none\n"
            "is named on stderr). Timings (ms): total = vision + prefill + generate + outputs (this image's time on\n"
            "the inspection thread); decode_image runs ahead on a decoding thread, overlapping the previous image,\n"
            "and is not part of total.\n"
            "Exit status: 0 every image processed and written, 1 some failed, stdout could not be written or the\n"
            "model did not load, 2 usage.\n");
}

// ---- the list of images -------------------------------------------------------------------------------

typedef struct ImageList {
    char **paths;
    char **names;   // output stem: the path under the folder given, '/' -> '_', extension dropped
    int n, cap;
} ImageList;

static bool is_image_name(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot && (!strcasecmp(dot, ".png") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".jpeg"));
}

static Status list_push(ImageList *l, const char *path, const char *name) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        char **p = realloc(l->paths, (size_t)cap * sizeof *p), **q = p ? realloc(l->names, (size_t)cap * sizeof *q) : NULL;
        if (p) l->paths = p;
        if (q) l->names = q;
        if (!p || !q) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory listing images");
        l->cap = cap;
    }
    char *a = strdup(path), *b = strdup(name);
    if (!a || !b) {
        free(a), free(b);
        return AGPT_FAIL(AGPT_ERR_OOM, "out of memory listing images");
    }
    char *dot = strrchr(b, '.');
    if (dot && dot != b) *dot = 0;
    for (char *c = b; *c; c++)
        if (*c == '/') *c = '_';
    l->paths[l->n] = a, l->names[l->n] = b;
    l->n++;
    return AGPT_OK;
}

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

// Walks dir (rel: its path under the folder given) for images, in name order; symlinked folders are not followed.
static Status walk(ImageList *l, const char *dir, const char *rel, int depth) {
    if (depth > 32) return AGPT_FAIL(AGPT_ERR_ARG, "%s: folders nested more than 32 deep", dir);
    DIR *d = opendir(dir);
    if (!d) return AGPT_FAIL(AGPT_ERR_IO, "cannot read folder %s", dir);
    char **names = NULL;
    int n = 0, cap = 0;
    struct dirent *e;
    Status s = AGPT_OK;
    while ((e = readdir(d)) && s == AGPT_OK) {
        if (e->d_name[0] == '.') continue;  // ., .., hidden files
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **p = realloc(names, (size_t)cap * sizeof *p);
            if (!p) s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory listing %s", dir);
            else names = p;
        }
        if (s == AGPT_OK && !(names[n++] = strdup(e->d_name))) s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    }
    closedir(d);
    if (s == AGPT_OK && n > 1) qsort(names, (size_t)n, sizeof *names, cmp_cstr);  // names is NULL when n == 0
    for (int i = 0; i < n && s == AGPT_OK; i++) {
        if (!names[i]) continue;
        char path[4096], sub[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, names[i]) >= (int)sizeof path ||
            snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", names[i]) >= (int)sizeof sub) {
            s = AGPT_FAIL(AGPT_ERR_ARG, "path %s/%s is too long", dir, names[i]);
            break;
        }
        struct stat sb;
        if (lstat(path, &sb) != 0) continue;
        if (S_ISDIR(sb.st_mode)) s = walk(l, path, sub, depth + 1);
        else if ((S_ISREG(sb.st_mode) || S_ISLNK(sb.st_mode)) && is_image_name(names[i])) s = list_push(l, path, sub);
    }
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    return s;
}

static void list_free(ImageList *l) {
    for (int i = 0; i < l->n; i++) free(l->paths[i]), free(l->names[i]);
    free(l->paths);
    free(l->names);
}

// Two inputs with one output name (the same file name given from two folders) get their position appended.
static char **sort_names;  // qsort has no context argument
static int cmp_by_name(const void *a, const void *b) {
    return strcmp(sort_names[*(const int *)a], sort_names[*(const int *)b]);
}

// One pass: every name shared by several images gets "_<position>" appended. Returns how many were renamed.
static Status rename_duplicates(ImageList *l, int *renamed_count) {
    *renamed_count = 0;
    int *order = malloc(((size_t)l->n + 1) * sizeof *order);
    bool *dup = calloc((size_t)l->n + 1, sizeof *dup);
    Status s = AGPT_OK;
    if (!order || !dup) s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    for (int i = 0; s == AGPT_OK && i < l->n; i++) order[i] = i;
    if (s == AGPT_OK) {
        sort_names = l->names;
        qsort(order, (size_t)l->n, sizeof *order, cmp_by_name);
    }
    for (int k = 1; s == AGPT_OK && k < l->n; k++)
        if (strcmp(l->names[order[k]], l->names[order[k - 1]]) == 0) dup[order[k]] = dup[order[k - 1]] = true;
    for (int i = 0; s == AGPT_OK && i < l->n; i++) {
        if (!dup[i]) continue;
        size_t len = strlen(l->names[i]) + 16;
        char *renamed = malloc(len);
        if (!renamed) {
            s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
            break;
        }
        snprintf(renamed, len, "%s_%d", l->names[i], i);
        free(l->names[i]);
        l->names[i] = renamed;
        (*renamed_count)++;
    }
    free(order);
    free(dup);
    return s;
}

// A renamed "a_1" may meet an input that was called "a_1" already: rename until every name is unique.
static Status make_names_unique(ImageList *l) {
    for (int pass = 0; pass < 8; pass++) {
        int renamed;
        AGPT_TRY(rename_duplicates(l, &renamed));
        if (renamed == 0) return AGPT_OK;
    }
    return AGPT_FAIL(AGPT_ERR_ARG, "cannot give the %d images distinct output names", l->n);
}

// ---- images decoded ahead -----------------------------------------------------------------------------

// A group of consecutive images of the list, decoded. While the model works on one group, a thread decodes the
// next, so that PNG/JPEG decoding (milliseconds an image) overlaps the inspection instead of adding to it.
typedef struct ImageGroup {
    int first, n;
    Image img[MAX_BATCH];
    Status st[MAX_BATCH];
    char *err[MAX_BATCH];     // the decoder's message for a failed image (errors are per thread: copied here)
    double ms[MAX_BATCH];     // decode time of each image
} ImageGroup;

typedef struct GroupJob {
    ImageGroup *group;
    const ImageList *list;
} GroupJob;

static void *decode_group(void *arg) {
    GroupJob *job = arg;
    ImageGroup *g = job->group;
    for (int j = 0; j < g->n; j++) {
        double t0 = timer_now_s();
        g->st[j] = image_load(job->list->paths[g->first + j], &g->img[j]);
        g->ms[j] = 1e3 * (timer_now_s() - t0);
        g->err[j] = g->st[j] == AGPT_OK ? NULL : strdup(agpt_last_error());
    }
    return NULL;
}

static void group_release(ImageGroup *g) {
    for (int j = 0; j < g->n; j++) {
        if (g->st[j] == AGPT_OK) image_free(&g->img[j]);
        free(g->err[j]);
        g->err[j] = NULL;
        g->st[j] = AGPT_ERR_ARG;
    }
    g->n = 0;
}

typedef struct Prefetcher {
    ImageGroup groups[2];
    GroupJob job;
    pthread_t thread;
    bool running;
} Prefetcher;

// Starts decoding images [first, first + n) into the group not in use; without a thread, decodes them now.
static void prefetch_start(Prefetcher *p, const ImageList *list, int slot, int first, int n) {
    ImageGroup *g = &p->groups[slot];
    g->first = first, g->n = n;
    p->job = (GroupJob){g, list};
    p->running = pthread_create(&p->thread, NULL, decode_group, &p->job) == 0;
    if (!p->running) decode_group(&p->job);
}

static ImageGroup *prefetch_wait(Prefetcher *p, int slot) {
    if (p->running) pthread_join(p->thread, NULL);
    p->running = false;
    return &p->groups[slot];
}

// Whether the model file (or a layered file) holds the language model.
static bool has_llm(const char *model, const char *const *overlays, int n_overlays) {
    bool found = false;
    for (int i = -1; i < n_overlays && !found; i++) {
        SafeTensors *st = NULL;
        if (st_open(i < 0 ? model : overlays[i], &st) != AGPT_OK) continue;  // the real open reports errors
        found = st_find(st, "model.embed_tokens.weight") >= 0;
        st_close(st);
    }
    agpt_clear_error();
    return found;
}

// What every JSON line needs besides the image's own results.
typedef struct LineOptions {
    bool llm, verdict_only, fuse;
    int n_refs;
    const char *map_class, *out_dir;
    const AnomalyGPT *agpt;
} LineOptions;

// JSON readers refuse strings that are not UTF-8: paths, names and texts go in with bad bytes as '?'.
static void add_text(cJSON *obj, const char *key, const char *text) {
    char *clean = utf8_lossy(text ? text : "");
    cJSON_AddStringToObject(obj, key, clean ? clean : "");
    free(clean);
}

// What became of one image, for the summary line.
typedef enum Outcome { OUT_FAILED, OUT_ANOMALOUS, OUT_NORMAL, OUT_UNCLEAR, OUT_MAP_ONLY, OUT_KINDS } Outcome;

// The JSON line of one image: its results when s is AGPT_OK, else "ok": false and error (the library's last
// message when error is NULL); *outcome says which. NULL when out of memory.
static cJSON *result_line(const LineOptions *o, const char *path, Status s, const char *error,
                          const AnomalyAnswer *ans, float score, const char *used_class, const char *heat,
                          const char *raw, double load_ms, double outputs_ms, double total_ms, Outcome *outcome) {
    *outcome = OUT_FAILED;
    cJSON *line = cJSON_CreateObject();
    if (!line) return NULL;
    add_text(line, "image", path);
    *outcome = OUT_FAILED;
    if (s == AGPT_OK) {
        cJSON_AddTrueToObject(line, "ok");
        const char *verdict = NULL;
        if (o->llm) {
            char *text = o->verdict_only ? answer_raw_text(o->agpt, ans) : NULL;
            verdict = answer_verdict(o->verdict_only ? text : ans->text);
            free(text);
        }
        *outcome = !o->llm ? OUT_MAP_ONLY : !verdict ? OUT_UNCLEAR : verdict[0] == 'a' ? OUT_ANOMALOUS : OUT_NORMAL;
        if (verdict) cJSON_AddStringToObject(line, "verdict", verdict);
        else cJSON_AddNullToObject(line, "verdict");  // no LLM, or an answer starting with neither Yes nor No
        cJSON_AddNumberToObject(line, "score", score);
        cJSON_AddStringToObject(line, "mode", !o->n_refs ? "zero-shot" : o->fuse ? "few-shot+zero-shot" : "few-shot");
        if (!o->n_refs || o->fuse)
            add_text(line, "class", used_class && used_class[0] ? used_class : o->map_class);
        if (o->llm && !o->verdict_only) add_text(line, "answer", ans->text);
        if (o->out_dir) {
            add_text(line, "heatmap", heat);
            add_text(line, "map", raw);
        }
        cJSON *t = cJSON_AddObjectToObject(line, "ms");
        cJSON_AddNumberToObject(t, "decode_image", load_ms);
        cJSON_AddNumberToObject(t, "vision", ans->vision_ms);
        if (o->llm) {
            cJSON_AddNumberToObject(t, "prefill", ans->prefill_ms);
            cJSON_AddNumberToObject(t, "generate", ans->decode_ms);
            cJSON_AddNumberToObject(t, "tokens", ans->n_tokens);
        }
        if (o->out_dir) cJSON_AddNumberToObject(t, "outputs", outputs_ms);
        cJSON_AddNumberToObject(t, "total", total_ms);
    } else {
        cJSON_AddFalseToObject(line, "ok");
        add_text(line, "error", error ? error : agpt_last_error());
    }
    return line;
}

// result_line printed on stdout. Returns an error when the line could not be written.
static Status print_result(const LineOptions *o, const char *path, Status s, const char *error,
                           const AnomalyAnswer *ans, float score, const char *used_class, const char *heat,
                           const char *raw, double load_ms, double outputs_ms, double total_ms, Outcome *outcome) {
    cJSON *line = result_line(o, path, s, error, ans, score, used_class, heat, raw, load_ms, outputs_ms, total_ms,
                              outcome);
    return line ? print_json_line(line) : AGPT_FAIL(AGPT_ERR_OOM, "out of memory printing a result");
}

// What inspecting one image needs: the model, the question and how to answer it, where the map goes.
typedef struct Inspector {
    LineOptions lo;
    AnomalyGPT *agpt;
    VisionModel *vm;
    Sampler *sampler;         // NULL: greedy
    uint64_t seed;
    const char *question;
    int max_new;
    float *map;               // [S,S]
} Inspector;

// One image, decoded already (load_status: how its decoding went, load_error its message), inspected alone:
// sampling allowed, a model without the LLM too. Returns its JSON line (NULL when out of memory).
static cJSON *inspect_one(const Inspector *in, const char *path, const char *stem, const Image *img,
                          Status load_status, const char *load_error, double load_ms, Outcome *outcome) {
    const LineOptions *o = &in->lo;
    double t1 = timer_now_s(), outputs_ms = 0;
    float score = 0;
    AnomalyAnswer ans = {.map = in->map};
    const char *used_class = o->map_class;
    char heat[4096] = "", raw[4096] = "";
    Status s = load_status;
    if (s == AGPT_OK) {
        if (o->llm) {
            if (in->sampler) rng_seed(&in->sampler->rng, in->seed);  // each answer independent of order
            s = anomalygpt_ask(in->agpt, img, NULL, 0, in->question, in->sampler,
                               o->verdict_only ? VERDICT_TOKENS : in->max_new, &ans);
            score = ans.score;
            used_class = ans.class_name;
        } else {
            double tv = timer_now_s();
            s = vision_model_map(in->vm, img, 1, o->map_class, in->map, &score);
            ans.vision_ms = 1e3 * (timer_now_s() - tv);
        }
        if (s == AGPT_OK && o->out_dir) {
            double tw = timer_now_s();
            s = write_map_outputs(in->vm, img, in->map, o->out_dir, stem, heat, raw, sizeof heat);
            outputs_ms = 1e3 * (timer_now_s() - tw);
        }
    }
    cJSON *line = result_line(o, path, s, load_status != AGPT_OK ? load_error : NULL, &ans, score, used_class, heat,
                              raw, load_ms, outputs_ms, 1e3 * (timer_now_s() - t1), outcome);
    free(ans.text);
    return line;
}

// ---- the hot folder (--watch): tools/watch.c calls back for every complete image -------------------------

typedef struct DetectWatch {
    const Inspector *in;
    int counts[OUT_KINDS];
} DetectWatch;

static atomic_bool watch_stop;
static void on_stop_signal(int sig) {
    (void)sig;
    atomic_store(&watch_stop, true);
}

static cJSON *watch_inspect(void *arg, const char *path) {
    DetectWatch *w = arg;
    double t0 = timer_now_s();
    Image img;
    Status st = image_load(path, &img);
    double load_ms = 1e3 * (timer_now_s() - t0);
    char *err = st != AGPT_OK ? strdup(agpt_last_error()) : NULL;
    char stem[256];
    stem_of(path, stem, sizeof stem);
    Outcome outcome;
    cJSON *line = inspect_one(w->in, path, stem, st == AGPT_OK ? &img : NULL, st, err ? err : "out of memory",
                              load_ms, &outcome);
    if (st == AGPT_OK) image_free(&img);
    free(err);
    w->counts[outcome]++;
    if (line) cJSON_DeleteItemFromObjectCaseSensitive(line, "image");  // the watcher puts "image" first itself
    return line;
}

// "This is a photo of a NAME ..." as a malloc'd string (NULL when out of memory).
static char *class_question(const char *class_name) {
    static const char *fmt = "This is a photo of a %s for anomaly detection, which should be without any damage, "
                             "flaw, defect, scratch, hole or broken part. Is there any anomaly in the image?";
    size_t n = strlen(fmt) + strlen(class_name) + 1;
    char *q = malloc(n);
    if (q) snprintf(q, n, fmt, class_name);
    return q;
}

// An integer option's value into *out (an int), strictly: a usage error otherwise.
static bool int_value(const char *opt, const char *v, long long lo, long long hi, int *out) {
    long long x;
    if (cli_parse_int("detect", opt, v, lo, hi, &x)) return false;
    *out = (int)x;
    return true;
}

int cmd_detect(int argc, char **argv) {
    const char *model = NULL, *class_name = NULL, *prompt = NULL, *out_dir = NULL, *sp_model = NULL, *clip_vocab = NULL;
    const char *overlays[MAX_OVERLAYS], *refs[MAX_REFS], *empty_folder = NULL;
    const char *watch_dir = NULL, *watch_log = NULL;
    int n_overlays = 0, n_refs = 0, threads = 0, max_new = 512, context = 2048, batch_n = 1;
    bool verdict_only = false, squash = false, fuse = false, rotate = false, watch_sort = false, batch_given = false;
    int shifts = 1;  // --reference-shifts
    SamplerConfig scfg = sampler_default_config();
    scfg.greedy = true;  // a line wants the same verdict for the same image
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    DType dt = DT_F16;
    ImageList images = {0};
    Status s = AGPT_OK;
    for (int i = 1; i < argc; i++) {
        int shared = cli_engine_option(argc, argv, &i, "detect", &dev, &dt, &threads);
        if (!shared) {
            bool sampling = strcmp(argv[i], "--greedy") != 0;
            shared = cli_sampling_option(argc, argv, &i, "detect", &scfg);
            if (shared > 0 && sampling) scfg.greedy = false;
        }
        if (shared < 0) goto usage_error;
        if (shared) continue;
        const char *a = argv[i], *v;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, "detect"))) goto usage_error; } while (0)
        if (!strcmp(a, "--model")) { VALUE(); model = v; }
        else if (!strcmp(a, "--weights")) {
            VALUE();
            if (n_overlays == MAX_OVERLAYS) { fprintf(stderr, "agpt detect: at most %d --weights\n", MAX_OVERLAYS); goto usage_error; }
            overlays[n_overlays++] = v;
        } else if (!strcmp(a, "--reference")) {
            VALUE();
            if (n_refs == MAX_REFS) { fprintf(stderr, "agpt detect: at most %d --reference\n", MAX_REFS); goto usage_error; }
            refs[n_refs++] = v;
        }
        else if (!strcmp(a, "--class")) { VALUE(); class_name = v; if (!class_name_ok("detect", v)) goto usage_error; }
        else if (!strcmp(a, "--prompt")) { VALUE(); prompt = v; }
        else if (!strcmp(a, "--out") || !strcmp(a, "-o")) { VALUE(); out_dir = v; }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); sp_model = v; }
        else if (!strcmp(a, "--clip-vocab")) { VALUE(); clip_vocab = v; }
        else if (!strcmp(a, "--max-new")) { VALUE(); if (!int_value(a, v, 1, 1024, &max_new)) goto usage_error; }
        else if (!strcmp(a, "--context")) { VALUE(); if (!int_value(a, v, 64, 32768, &context)) goto usage_error; }
        else if (!strcmp(a, "--batch")) {
            VALUE();
            if (!int_value(a, v, 1, MAX_BATCH, &batch_n)) goto usage_error;
            batch_given = true;
        }
        else if (!strcmp(a, "--watch")) { VALUE(); watch_dir = v; }
        else if (!strcmp(a, "--watch-log")) { VALUE(); watch_log = v; }
        else if (!strcmp(a, "--sort")) watch_sort = true;
        else if (!strcmp(a, "--verdict-only")) verdict_only = true;
        else if (!strcmp(a, "--squash")) squash = true;
        else if (!strcmp(a, "--fuse-text-map")) fuse = true;
        else if (!strcmp(a, "--rotate-references")) rotate = true;
        else if (!strcmp(a, "--reference-shifts")) { VALUE(); if (!int_value(a, v, 1, 14, &shifts)) goto usage_error; }
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); list_free(&images); return 0; }
        else if (a[0] == '-' && a[1]) { fprintf(stderr, "agpt detect: unknown option '%s'\n", a); goto usage_error; }
        else {
            struct stat sb;
            if (stat(a, &sb) != 0) { fprintf(stderr, "agpt detect: no such file or folder: %s\n", a); goto usage_error; }
            int before = images.n;
            if (S_ISDIR(sb.st_mode)) s = walk(&images, a, "", 0);
            else {
                char stem[256];
                stem_of(a, stem, sizeof stem);
                s = list_push(&images, a, stem);
            }
            if (s) { cli_report("detect", s); list_free(&images); return 1; }
            if (images.n == before) {  // an empty hot folder is worth a word even when others hold images
                fprintf(stderr, "agpt detect: folder %s holds no .png, .jpg or .jpeg images\n", a);
                empty_folder = a;
            }
        }
#undef VALUE
    }
    if (watch_dir) {
        struct stat sb;
        const char *problem = images.n > 0 || empty_folder ? "takes no images besides the folder"
                              : batch_given ? "inspects one image at a time: no --batch"
                              : stat(watch_dir, &sb) != 0 || !S_ISDIR(sb.st_mode) ? "needs an existing folder"
                                                                                   : NULL;
        if (problem) { fprintf(stderr, "agpt detect: --watch %s %s\n", watch_dir, problem); goto usage_error; }
        if (!model) { fprintf(stderr, "agpt detect: --model is required\n"); goto usage_error; }
    } else if (watch_sort || watch_log) {
        fprintf(stderr, "agpt detect: --sort and --watch-log go with --watch\n");
        goto usage_error;
    } else if (!model || images.n == 0) {
        if (model && empty_folder)
            fprintf(stderr, "agpt detect: no images to inspect (%s holds none)\n", empty_folder);
        else
            fprintf(stderr, "agpt detect: --model and at least one image (or a folder holding images) are required\n");
        goto usage_error;
    }
    // Everything that can be refused is refused before the model loads (seconds to minutes of a user's time).
    if ((s = make_names_unique(&images)) || (s = check_model_path(model, "--model"))) {
        list_free(&images);
        return cli_report("detect", s);
    }
    for (int k = 0; k < n_overlays; k++)
        if ((s = check_model_path(overlays[k], "--weights"))) {
            list_free(&images);
            return cli_report("detect", s);
        }
    if (out_dir && (s = ensure_dir(out_dir))) {
        cli_report("detect", s);
        list_free(&images);
        return 2;
    }

    // The question, whole: the reference's training prompt shape when the product is named.
    char *question = prompt ? strdup(prompt) : class_name ? class_question(class_name)
                                                          : strdup("Is there any anomaly in the image?");
    if (!question) {
        list_free(&images);
        return cli_report("detect", AGPT_FAIL(AGPT_ERR_OOM, "no memory for the question"));
    }

    Engine eng;
    dt = cli_model_dtype(argc, argv, dev, dt);
    if ((s = engine_create(&eng, dev, 0, threads, 1))) {
        free(question);
        list_free(&images);
        return cli_report("detect", s);
    }
    static AnomalyGPT agpt;
    static VisionModel vision;
    bool llm = has_llm(model, overlays, n_overlays);
    VisionModel *vm = llm ? &agpt.vision : &vision;
    Sampler sampler = {0};
    ClipTokenizer *clip = NULL;
    int rc = 0, done = 0, failed = 0, counts[OUT_KINDS] = {0};
    float *map = NULL;
    double t0 = timer_now_s();
    int batch = n_refs * (rotate ? 4 : 1) * shifts * shifts;  // encoder images for the references
    if (batch > 16) batch = 16;  // more go through in several batches
    if (batch_n > 1 && (!llm || !scfg.greedy)) {
        LOG_W("--batch applies to greedy answers%s: images go one by one", llm ? "; sampling is on" : " (no language model)");
        batch_n = 1;
    }
    if (batch_n > images.n && images.n > 0) batch_n = images.n;  // --watch: none listed
    s = llm ? anomalygpt_open_batch(&agpt, &eng, model, overlays, n_overlays, sp_model, dt, context, batch_n)
            : vision_model_open(vm, &eng, model, overlays, n_overlays, dt, batch > 1 ? batch : 1);
    bool opened = s == AGPT_OK;
    if (!llm && opened) LOG_W("%s has no language model: maps and scores only, no verdicts", model);
    if (s == AGPT_OK && llm && !scfg.greedy) s = sampler_init(&sampler, &scfg, agpt.llm.vocab);
    if (s == AGPT_OK && clip_vocab && (s = clip_tokenizer_load_file(clip_vocab, &clip)) == AGPT_OK)
        vision_model_set_tokenizer(vm, clip);
    if (s == AGPT_OK) {
        if (squash) vm->mode = PREPROCESS_SQUASH;
        vm->fuse_text_map = fuse;
        vm->augment_rotations = rotate;
        vm->reference_shifts = shifts;
        s = mem_host_alloc((size_t)batch_n * vm->vision.image * vm->vision.image * sizeof(float), (void **)&map);
    }
    if (s == AGPT_OK && n_refs > 0) {
        Image ref_images[MAX_REFS];
        int loaded = 0;
        for (; loaded < n_refs; loaded++)
            if ((s = image_load(refs[loaded], &ref_images[loaded]))) break;
        if (s == AGPT_OK) s = vision_model_set_references(vm, ref_images, n_refs);
        for (int i = 0; i < loaded; i++) image_free(&ref_images[i]);
        if (s) s = agpt_add_context(s, "reference images");
    }
    const char *map_class = class_name ? class_name : "object";
    // The zero-shot map's class, resolved once (cached, computed, or 'object' when it cannot be had), so that the
    // JSON names the class that really made the map. With the LLM and no --class, the reference's rule picks the
    // class from the question per image instead.
    if (s == AGPT_OK && (!llm || class_name) && (n_refs == 0 || fuse)) {
        const Tensor *features;
        s = vision_model_class_features(vm, map_class, &features, &map_class);
        if (s == AGPT_OK && llm) agpt.map_class = map_class;
    }
    if (s != AGPT_OK) {
        rc = cli_report("detect", s);
        goto finish;
    }
    double t_load = timer_now_s() - t0;
    LOG_I("detect: %d image(s), model loaded in %.2f s, %s map, %s", images.n, t_load,
          n_refs ? "few-shot" : "zero-shot", llm ? (verdict_only ? "verdicts" : "verdicts and answers") : "maps only");

    Progress bar;
    progress_begin(&bar, "detect", images.n);
    double t_images = timer_now_s();
    LineOptions lo = {.llm = llm, .verdict_only = verdict_only, .fuse = fuse, .n_refs = n_refs,
                      .map_class = map_class, .out_dir = out_dir, .agpt = &agpt};
    Inspector in = {.lo = lo, .agpt = &agpt, .vm = vm, .sampler = llm && !scfg.greedy ? &sampler : NULL,
                    .seed = scfg.seed, .question = question, .max_new = max_new, .map = map};
    if (watch_dir) {  // until SIGINT or SIGTERM: the inspection under way finishes, then the watch ends
        DetectWatch w = {.in = &in};
        WatchConfig wc = {watch_dir, watch_log ? watch_log : "-", watch_sort};
        struct sigaction sa = {.sa_handler = on_stop_signal, .sa_flags = SA_RESTART};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        fprintf(stderr, "agpt detect: watching %s%s (SIGINT or SIGTERM stops)\n", watch_dir,
                watch_sort ? ", sorting into ok/ and ng/" : "");
        s = watch_folder(&wc, watch_inspect, &w, &watch_stop);
        int n = 0;
        for (int k = 0; k < OUT_KINDS; k++) n += w.counts[k];
        if (s != AGPT_OK) rc = cli_report("detect", agpt_add_context(s, "watching %s after %d image(s)", watch_dir, n));
        else
            fprintf(stderr, "agpt detect: stopped watching %s: %d image(s) (%d anomalous, %d normal, %d unclear, %d "
                    "maps only), %d failed\n", watch_dir, n, w.counts[OUT_ANOMALOUS], w.counts[OUT_NORMAL],
                    w.counts[OUT_UNCLEAR], w.counts[OUT_MAP_ONLY], w.counts[OUT_FAILED]);
        goto finish;
    }
    // Groups of batch_n images (1: one at a time); a thread decodes the next group while this one is inspected.
    AnomalyAnswer *answers = calloc((size_t)batch_n, sizeof *answers);
    Prefetcher *ahead = calloc(1, sizeof *ahead);
    if (!answers || !ahead) {
        free(answers), free(ahead);
        rc = cli_report("detect", AGPT_FAIL(AGPT_ERR_OOM, "no memory for a batch of %d images", batch_n));
        goto finish;
    }
    int slot = 0, S = vm->vision.image;
    Status written = AGPT_OK;  // the first line that could not be written stops the run: its results are lost
    prefetch_start(ahead, &images, slot, 0, images.n < batch_n ? images.n : batch_n);
    for (int i0 = 0; i0 < images.n && written == AGPT_OK; i0 += batch_n) {
        ImageGroup *g = prefetch_wait(ahead, slot);
        if (i0 + batch_n < images.n) {
            int rest = images.n - (i0 + batch_n);
            prefetch_start(ahead, &images, 1 - slot, i0 + batch_n, rest < batch_n ? rest : batch_n);
        }
        char heat[4096], raw[4096];
        Outcome outcome;
        if (batch_n == 1) {  // one image: sampling allowed, a model without the LLM too
            cJSON *line = inspect_one(&in, images.paths[i0], images.names[i0], &g->img[0], g->st[0], g->err[0],
                                      g->ms[0], &outcome);
            written = line ? print_json_line(line) : AGPT_FAIL(AGPT_ERR_OOM, "out of memory printing a result");
            counts[outcome]++;
        } else {  // greedy with the LLM: the readable images through anomalygpt_ask_batch, the others reported
            int m = g->n, k = 0;
            Image ok_img[MAX_BATCH];
            const char *inputs[MAX_BATCH];
            double t1 = timer_now_s();
            for (int j = 0; j < m; j++) {
                if (g->st[j] != AGPT_OK) continue;
                ok_img[k] = g->img[j], inputs[k] = question;
                answers[k] = (AnomalyAnswer){.map = map + (size_t)k * S * S};
                k++;
            }
            Status bs = k > 0 ? anomalygpt_ask_batch(&agpt, ok_img, k, inputs,
                                                     verdict_only ? VERDICT_TOKENS : max_new, answers)
                              : AGPT_OK;
            char *batch_err = bs != AGPT_OK ? strdup(agpt_last_error()) : NULL;
            double batch_ms = 1e3 * (timer_now_s() - t1) / m;
            for (int j = 0, b = 0; j < m; j++) {
                bool loaded = g->st[j] == AGPT_OK;
                AnomalyAnswer *aj = &answers[loaded ? b : 0];
                double tw = timer_now_s(), outputs_ms = 0;
                Status sj = g->st[j];
                char *err = NULL;
                if (loaded) {
                    sj = bs;
                    if (sj == AGPT_OK && out_dir) {
                        sj = write_map_outputs(vm, &g->img[j], aj->map, out_dir, images.names[i0 + j], heat, raw,
                                               sizeof heat);
                        outputs_ms = 1e3 * (timer_now_s() - tw);
                    }
                    if (sj != AGPT_OK) err = strdup(bs != AGPT_OK && batch_err ? batch_err : agpt_last_error());
                }
                const char *why = loaded ? (err ? err : "out of memory") : g->err[j];
                if (written == AGPT_OK) {
                    written = print_result(&lo, images.paths[i0 + j], sj, why, aj, aj->score, aj->class_name, heat,
                                           raw, g->ms[j], outputs_ms, batch_ms + 1e3 * (timer_now_s() - tw), &outcome);
                    counts[outcome]++;
                }
                free(err);
                if (loaded) {
                    free(aj->text);
                    aj->text = NULL;
                    b++;
                }
            }
            free(batch_err);
        }
        progress_step(&bar, g->n);
        group_release(g);
        slot = 1 - slot;
    }
    group_release(prefetch_wait(ahead, slot));  // stopped early: the next group, decoded meanwhile (else empty)
    free(ahead);
    free(answers);
    progress_end(&bar);
    done = images.n - counts[OUT_FAILED];
    failed = counts[OUT_FAILED];
    if (failed) rc = 1;
    double seconds = timer_now_s() - t_images;
    if (written != AGPT_OK) {
        // The results of the images before were written; this one's and the rest are not: say how far it got.
        int lines = 0;
        for (int k = 0; k < OUT_KINDS; k++) lines += counts[k];
        rc = cli_report("detect", agpt_add_context(written, "stopped after %d of %d image(s)", lines - 1, images.n));
    } else {
        char verdicts[160] = "";
        if (llm)
            snprintf(verdicts, sizeof verdicts, " (verdicts: %d anomalous, %d normal, %d unclear)",
                     counts[OUT_ANOMALOUS], counts[OUT_NORMAL], counts[OUT_UNCLEAR]);
        fprintf(stderr, "agpt detect: %d of %d image(s) processed%s, %d failed, in %.2f s: %.2f images/s (model "
                "load %.2f s)\n", done, images.n, verdicts, failed, seconds, seconds > 0 ? done / seconds : 0.0, t_load);
    }

finish:
    mem_host_free(map);
    sampler_free(&sampler);
    if (opened) {
        if (llm) anomalygpt_close(&agpt);
        else vision_model_close(vm);
    }
    clip_tokenizer_free(clip);
    engine_destroy(&eng);
    list_free(&images);
    free(question);
    return finish_stdout("detect", rc);

usage_error:
    usage(stderr);
    list_free(&images);
    return 2;
}
