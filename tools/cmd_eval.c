// agpt eval: the official test protocol (anomalygpt-reference.md 7; code/test_mvtec.py, test_visa.py) over
// MVTec-AD, VisA or a plain folder: for each class its test images with their masks, the k normal references
// the official scripts pick (k and round), the official test prompt, greedy answers; then per class and their
// mean: accuracy (the reference's 'Yes'/'No' substring rule), image AUROC (the map's maximum as the score), pixel
// AUROC, AUPRO to FPR 0.3, image and pixel F1-max and average precision, and the verdicts' precision, recall and
// confusion counts. --maps-only skips the LLM (map metrics only, fast). Several k and rounds in one call are
// reported each, and as mean and std.
//
// Options are parsed here; the datasets are train/dataset.c's, the metrics train/metrics.c's (pixel metrics on
// a fine histogram, in bounded memory: see there and README.md), the model the one agpt detect loads.
#define _DEFAULT_SOURCE  // strdup, mkdir
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/anomalygpt.h"
#include "model/conversation.h"
#include "model/vision_model.h"
#include "runtime/image.h"
#include "runtime/log.h"
#include "runtime/memory.h"
#include "runtime/safetensors.h"
#include "runtime/text.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"
#include "train/dataset.h"
#include "train/metrics.h"
#include "train/synth.h"

#define MAX_OVERLAYS 7
#define MAX_RUNS 16
#define MAX_CLASSES 64
#define MAX_BATCH 64
#define PIXEL_BINS (1 << 20)

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt eval --model M [--weights F ...] --data DIR --format mvtec|visa --out DIR [options]\n"
            "       agpt eval --model M --format folder --normal DIR [--abnormal DIR --masks DIR] --class NAME --out DIR\n"
            "  --classes a,b     the classes to evaluate (default: every class in the tree)\n"
            "  --k-shot K[,K..]  normal references per class, 0 (zero-shot text map) or 1..4 (default 1, as the\n"
            "                    official scripts); several values: one run each\n"
            "  --round R[,R..]   which references (default: MVTec 3, VisA 14, folder 0, as the official scripts);\n"
            "                    also --rounds. Runs are every k with every round, reported each and as mean and std\n"
            "  --maps-only       no language model: map metrics only (no accuracy, precision, recall)\n"
            "  --rotate-references, --reference-shifts N   more views of each reference, as agpt map (off: the\n"
            "                    reference's protocol)\n"
            "  --batch N         images at a time, 1..%d (default 1)\n"
            "  --max-new N       answer tokens at most, 1..1024 (default 128; the accuracy reads 'Yes'/'No')\n"
            "  --tokenizer F, --clip-vocab F   override the tokenizers embedded in the model file\n"
            "  --device cpu|cuda, --dtype f32|f16|bf16, --threads N   as agpt detect\n"
            "Writes to --out: report.md, report.json (every run; with several, the mean and std), and per run\n"
            "k<K>_round<R>/{report.md, report.json, images.jsonl, plots/<class>_{image_roc,pixel_roc,pro}.png}.\n"
            "The summary goes to stdout, progress (images/s) to stderr. Broken trees (missing masks, unreadable\n"
            "images, empty classes) are counted and named in one message; those images are left out as said there.\n"
            "Exit status: 0 done, 1 the model or data could not be used, 2 usage.\n",
            MAX_BATCH);
}

// ---- results ----------------------------------------------------------------------------------------------

enum { M_ACC, M_IAUROC, M_PAUROC, M_AUPRO, M_IF1, M_PF1, M_IAP, M_PAP, M_PREC, M_REC, N_METRICS };
static const char *const METRIC_TITLE[N_METRICS] = {"Accuracy", "I-AUROC", "P-AUROC", "AUPRO", "I-F1max",
                                                    "P-F1max",  "I-AP",    "P-AP",    "Precision", "Recall"};
static const char *const METRIC_KEY[N_METRICS] = {"accuracy", "image_auroc", "pixel_auroc", "aupro",
                                                  "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap",
                                                  "verdict_precision", "verdict_recall"};
static const bool METRIC_LLM[N_METRICS] = {true, false, false, false, false, false, false, false, true, true};

// One row of a table: a class, or the mean over the classes.
typedef struct Row {
    char name[128];
    double v[N_METRICS];     // fractions in [0, 1]; NaN where undefined (one label only, no masks, no LLM)
    int images, anomalous, pixel_images;
    int64_t tp, fp, tn, fn;
    double auroc_bound;      // the pixel AUROC's histogram error bound
} Row;

typedef struct RunResult {
    int k, round;
    Row rows[MAX_CLASSES];
    int n;
    Row mean;
    double seconds;
} RunResult;

static void row_mean(const Row *rows, int n, Row *m) {
    memset(m, 0, sizeof *m);
    snprintf(m->name, sizeof m->name, "mean");
    for (int j = 0; j < N_METRICS; j++) {
        double sum = 0;
        int cnt = 0;
        for (int c = 0; c < n; c++)
            if (!isnan(rows[c].v[j])) sum += rows[c].v[j], cnt++;
        m->v[j] = cnt ? sum / cnt : NAN;  // the reference averages per-class values
    }
    for (int c = 0; c < n; c++) {
        m->images += rows[c].images, m->anomalous += rows[c].anomalous, m->pixel_images += rows[c].pixel_images;
        m->tp += rows[c].tp, m->fp += rows[c].fp, m->tn += rows[c].tn, m->fn += rows[c].fn;
        if (rows[c].auroc_bound > m->auroc_bound) m->auroc_bound = rows[c].auroc_bound;
    }
}

static void cell(char *buf, size_t cap, double v) {
    if (isnan(v)) snprintf(buf, cap, "-");
    else snprintf(buf, cap, "%.1f", 100 * v);
}

// The paper's shape: rows classes, columns metrics (x100), a mean row. std (may be NULL): "mean ± std".
static void table_md(FILE *f, const Row *rows, int n, const Row *mean, const Row *std, bool llm) {
    fprintf(f, "| Class |");
    for (int j = 0; j < N_METRICS; j++)
        if (llm || !METRIC_LLM[j]) fprintf(f, " %s |", METRIC_TITLE[j]);
    fprintf(f, "%s Images |\n|---|", llm ? " TP/FP/TN/FN |" : "");
    for (int j = 0; j < N_METRICS; j++)
        if (llm || !METRIC_LLM[j]) fprintf(f, "---:|");
    fprintf(f, "%s---:|\n", llm ? "---:|" : "");
    for (int r = 0; r <= n; r++) {
        const Row *x = r < n ? &rows[r] : mean;
        const Row *sd = std ? &std[r] : NULL;  // std[n] is the mean row's
        fprintf(f, "| %s%s%s |", r == n ? "**" : "", x->name, r == n ? "**" : "");
        for (int j = 0; j < N_METRICS; j++) {
            if (!llm && METRIC_LLM[j]) continue;
            char a[32], b[32];
            cell(a, sizeof a, x->v[j]);
            if (sd && !isnan(x->v[j])) {
                cell(b, sizeof b, sd->v[j]);
                fprintf(f, " %s ± %s |", a, b);
            } else {
                fprintf(f, " %s |", a);
            }
        }
        if (llm && std) fprintf(f, " - |");  // counts differ per run: see each run's table
        else if (llm) fprintf(f, " %lld/%lld/%lld/%lld |", (long long)x->tp, (long long)x->fp, (long long)x->tn, (long long)x->fn);
        fprintf(f, " %d (%d anomalous) |\n", x->images, x->anomalous);
    }
}

static void add_number(cJSON *o, const char *key, double v) {
    if (isnan(v)) cJSON_AddNullToObject(o, key);
    else cJSON_AddNumberToObject(o, key, v);
}

static cJSON *row_json(const Row *x, bool llm) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "class", x->name);
    for (int j = 0; j < N_METRICS; j++)
        if (llm || !METRIC_LLM[j]) add_number(o, METRIC_KEY[j], x->v[j]);
    cJSON_AddNumberToObject(o, "images", x->images);
    cJSON_AddNumberToObject(o, "anomalous", x->anomalous);
    cJSON_AddNumberToObject(o, "pixel_images", x->pixel_images);
    if (llm) {
        cJSON_AddNumberToObject(o, "tp", (double)x->tp), cJSON_AddNumberToObject(o, "fp", (double)x->fp);
        cJSON_AddNumberToObject(o, "tn", (double)x->tn), cJSON_AddNumberToObject(o, "fn", (double)x->fn);
    }
    add_number(o, "pixel_auroc_error_bound", x->auroc_bound);
    return o;
}

static Status write_json_file(const char *path, cJSON *obj) {
    char *text = cJSON_Print(obj);
    FILE *f = text ? fopen(path, "w") : NULL;
    bool ok = f && fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0) ok = false;
    free(text);
    return ok ? AGPT_OK : AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
}

// ---- plots ------------------------------------------------------------------------------------------------

#define PLOT 320
#define MARGIN 30

static void plot_pixel(uint8_t *px, int x, int y, const uint8_t rgb[3]) {
    if (x < 0 || y < 0 || x >= PLOT || y >= PLOT) return;
    memcpy(px + 3 * ((size_t)y * PLOT + x), rgb, 3);
}

static void plot_line(uint8_t *px, double x0, double y0, double x1, double y1, const uint8_t rgb[3], int thick) {
    int steps = (int)(fmax(fabs(x1 - x0), fabs(y1 - y0))) + 1;
    for (int i = 0; i <= steps; i++) {
        double t = (double)i / steps;
        int x = (int)lround(x0 + t * (x1 - x0)), y = (int)lround(y0 + t * (y1 - y0));
        for (int dy = 0; dy < thick; dy++)
            for (int dx = 0; dx < thick; dx++) plot_pixel(px, x + dx, y + dy, rgb);
    }
}

// A curve in the unit square: axes with ticks every 0.1, the chance diagonal (ROC) or the FPR 0.3 limit (PRO).
static Status plot_curve(const char *path, const Curve *c, bool pro) {
    uint8_t *px = malloc((size_t)PLOT * PLOT * 3);
    if (!px) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory for a plot");
    memset(px, 255, (size_t)PLOT * PLOT * 3);
    const uint8_t black[3] = {0, 0, 0}, grey[3] = {190, 190, 190}, blue[3] = {30, 80, 200}, red[3] = {210, 40, 40};
    const double span = PLOT - 2 * MARGIN;
#define PX(u) (MARGIN + (u) * span)
#define PY(v) (PLOT - MARGIN - (v) * span)
    for (int t = 1; t <= 10; t++) {  // light grid
        plot_line(px, PX(t / 10.0), PY(0), PX(t / 10.0), PY(1), grey, 1);
        plot_line(px, PX(0), PY(t / 10.0), PX(1), PY(t / 10.0), grey, 1);
    }
    if (pro) plot_line(px, PX(0.3), PY(0), PX(0.3), PY(1), red, 1);
    else plot_line(px, PX(0), PY(0), PX(1), PY(1), grey, 1);
    plot_line(px, PX(0), PY(0), PX(1), PY(0), black, 2);
    plot_line(px, PX(0), PY(0), PX(0), PY(1), black, 2);
    for (int t = 0; t <= 10; t++) {
        plot_line(px, PX(t / 10.0), PY(0), PX(t / 10.0), PY(0) + 5, black, 1);
        plot_line(px, PX(0) - 5, PY(t / 10.0), PX(0), PY(t / 10.0), black, 1);
    }
    for (int i = 1; c && i < c->n; i++)
        plot_line(px, PX(c->x[i - 1]), PY(c->y[i - 1]), PX(c->x[i]), PY(c->y[i]), blue, 2);
#undef PX
#undef PY
    Status s = image_save_png(path, PLOT, PLOT, 3, px);
    free(px);
    return s;
}

// ---- the run ----------------------------------------------------------------------------------------------

typedef struct Eval {
    Dataset data;
    const char *out_dir;
    bool llm;
    int batch, max_new, S;
    AnomalyGPT *agpt;
    VisionModel *vm;
    float *maps;        // [batch][S][S]
    uint8_t *mask;      // [S][S]
    Progress bar;
    double first_load;
} Eval;

// The official test prompt: describles[class] + ' ' + "Is there any anomaly in the image?". The sentences are
// the training ones (train/synth.c), except cable's, which the test scripts word differently.
static char *test_question(const char *cls) {
    static SynthParams p;
    const char *sentence = p.description;
    if (!strcmp(cls, "cable"))
        sentence = "This is a photo of three cables for anomaly detection, cables cannot be missed or swapped, which "
                   "should be without any damage, flaw, defect, scratch, hole or broken part.";
    else if (synth_params_for_class(cls, &p, NULL) != AGPT_OK)
        return NULL;
    const char *q = "Is there any anomaly in the image?";
    size_t n = strlen(sentence) + strlen(q) + 2;
    char *text = malloc(n);
    if (text) snprintf(text, n, "%s %s", sentence, q);
    return text;
}

static bool is_reference(const char *path, const char *const *refs, int k) {
    for (int j = 0; j < k; j++)
        if (!strcmp(path, refs[j])) return true;
    return false;
}

static Status set_references(Eval *e, const char *cls, int k, int round, const char **refs) {
    if (k == 0) return vision_model_set_references(e->vm, NULL, 0);
    AGPT_TRY(dataset_references(&e->data, cls, k, round, refs));
    Image img[8];
    int loaded = 0;
    Status s = AGPT_OK;
    for (; loaded < k && s == AGPT_OK; loaded++)
        if ((s = image_load(refs[loaded], &img[loaded]))) break;
    if (s == AGPT_OK) s = vision_model_set_references(e->vm, img, k);
    for (int j = 0; j < loaded; j++) image_free(&img[j]);
    return s;
}

// One class of one run: every test image through the model, then the metrics and plots.
static Status eval_class(Eval *e, RunResult *run, const char *cls, FILE *jsonl, const char *run_dir, Row *row) {
    memset(row, 0, sizeof *row);
    snprintf(row->name, sizeof row->name, "%s", cls);
    for (int j = 0; j < N_METRICS; j++) row->v[j] = NAN;
    const char *refs[8] = {0};
    // MVTec's reference paths live in a static buffer: copied, since masks and images are loaded meanwhile
    char ref_copy[8][4096];
    AGPT_TRY(set_references(e, cls, run->k, run->round, refs));
    for (int j = 0; j < run->k; j++) snprintf(ref_copy[j], sizeof ref_copy[j], "%s", refs[j]), refs[j] = ref_copy[j];
    char *question = test_question(cls);
    if (!question) return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the question");
    const char *map_class = conversation_class_name(question);  // the class whose text map the reference uses
    int *index = malloc((size_t)e->data.n * sizeof *index);
    float *scores = malloc((size_t)e->data.n * sizeof *scores);
    uint8_t *labels = malloc((size_t)e->data.n);
    PixelMetrics pm = {0};
    VerdictCounts verdicts = {0};
    Status s = index && scores && labels ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    if (s == AGPT_OK) s = pixel_metrics_init(&pm, 0, run->k > 0 ? 2 : 1, PIXEL_BINS);  // 1 - cos in [0, 2]
    int n = 0, n_scored = 0;
    for (int i = 0; s == AGPT_OK && i < e->data.n; i++) {
        const DatasetItem *it = &e->data.items[i];
        if (it->split == DATASET_TEST && !strcmp(it->class_name, cls) && !is_reference(it->image, refs, run->k))
            index[n++] = i;
    }
    AnomalyAnswer answers[MAX_BATCH];
    Image img[MAX_BATCH];
    int item_of[MAX_BATCH];
    for (int i0 = 0; s == AGPT_OK && i0 < n; i0 += e->batch) {
        int m = n - i0 < e->batch ? n - i0 : e->batch, ok = 0;
        for (int j = 0; j < m; j++) {
            const DatasetItem *it = &e->data.items[index[i0 + j]];
            if (image_load(it->image, &img[ok]) != AGPT_OK) {
                dataset_note(&e->data, DATASET_UNREADABLE, it->image);
                LOG_W("%s", agpt_last_error());
                continue;
            }
            item_of[ok++] = index[i0 + j];
        }
        const char *inputs[MAX_BATCH];
        float batch_scores[MAX_BATCH];
        for (int j = 0; j < ok; j++) {
            inputs[j] = question;
            answers[j] = (AnomalyAnswer){.map = e->maps + (size_t)j * e->S * e->S};
        }
        if (ok > 0) {
            if (!e->llm) s = vision_model_map(e->vm, img, ok, map_class, e->maps, batch_scores);
            else if (ok == 1) s = anomalygpt_ask(e->agpt, &img[0], NULL, 0, question, NULL, e->max_new, &answers[0]);
            else s = anomalygpt_ask_batch(e->agpt, img, ok, inputs, e->max_new, answers);
        }
        for (int j = 0; j < ok; j++) image_free(&img[j]);
        for (int j = 0; s == AGPT_OK && j < ok; j++) {
            const DatasetItem *it = &e->data.items[item_of[j]];
            const float *map = e->maps + (size_t)j * e->S * e->S;
            float score = e->llm ? answers[j].score : batch_scores[j];
            const char *answer = e->llm ? answers[j].text : NULL;
            scores[n_scored] = score, labels[n_scored] = it->anomalous;
            n_scored++;
            row->images++, row->anomalous += it->anomalous;
            bool pixel = true;
            if (it->anomalous && !it->mask) pixel = false;  // counted by the reader: image metrics only
            else if (it->mask && dataset_load_mask(it->mask, e->data.format, e->S, e->mask) != AGPT_OK) {
                dataset_note(&e->data, DATASET_UNREADABLE, it->mask);
                LOG_W("%s", agpt_last_error());
                pixel = false;
            }
            if (pixel) {
                s = pixel_metrics_add(&pm, map, it->mask ? e->mask : NULL, e->S, e->S);
                row->pixel_images++;
            }
            cJSON *line = cJSON_CreateObject();
            cJSON_AddNumberToObject(line, "k", run->k);
            cJSON_AddNumberToObject(line, "round", run->round);
            cJSON_AddStringToObject(line, "class", cls);
            cJSON_AddStringToObject(line, "image", it->image);
            if (it->mask) cJSON_AddStringToObject(line, "mask", it->mask);
            else cJSON_AddNullToObject(line, "mask");
            cJSON_AddStringToObject(line, "label", it->anomalous ? "anomalous" : "normal");
            cJSON_AddStringToObject(line, "defect", it->defect);
            cJSON_AddNumberToObject(line, "score", score);
            cJSON *r = cJSON_AddArrayToObject(line, "references");
            for (int q = 0; q < run->k; q++) cJSON_AddItemToArray(r, cJSON_CreateString(refs[q]));
            if (e->llm) {
                bool yes = answer && strstr(answer, "Yes");
                cJSON_AddStringToObject(line, "verdict", yes ? "anomalous" : "normal");
                char *clean = utf8_lossy(answer ? answer : "");  // JSON readers refuse bytes that are not UTF-8
                cJSON_AddStringToObject(line, "answer", clean ? clean : "");
                free(clean);
                cJSON_AddBoolToObject(line, "correct", metrics_answer_correct(answer, it->anomalous));
                verdict_add(&verdicts, answer, it->anomalous);
            } else {
                cJSON_AddNullToObject(line, "verdict");
            }
            char *text = cJSON_PrintUnformatted(line);
            if (!text || fprintf(jsonl, "%s\n", text) < 0) s = AGPT_FAIL(AGPT_ERR_IO, "cannot write images.jsonl");
            free(text);
            cJSON_Delete(line);
        }
        for (int j = 0; j < ok; j++) free(answers[j].text), answers[j].text = NULL;
        progress_step(&e->bar, m);
    }
    free(question);
    if (s == AGPT_OK && row->images > 0) {
        if (e->llm) {
            const VerdictCounts *v = &verdicts;
            row->tp = v->tp, row->fp = v->fp, row->tn = v->tn, row->fn = v->fn;
            row->v[M_ACC] = verdict_accuracy(v), row->v[M_PREC] = verdict_precision(v), row->v[M_REC] = verdict_recall(v);
        }
        BinaryMetrics im;
        PixelResult pr;
        Curve roc = {0}, proc = {0}, iroc = {0};
        s = metrics_binary(scores, labels, n_scored, &im, &iroc);
        if (s == AGPT_OK) s = pixel_metrics_result(&pm, &pr, &roc, &proc);
        if (s == AGPT_OK) {
            row->v[M_IAUROC] = im.auroc, row->v[M_IF1] = im.f1_max, row->v[M_IAP] = im.ap;
            row->v[M_PAUROC] = pr.pixel.auroc, row->v[M_PF1] = pr.pixel.f1_max, row->v[M_PAP] = pr.pixel.ap;
            row->v[M_AUPRO] = pr.aupro, row->auroc_bound = pr.auroc_error_bound;
            if (pm.n_clamped)
                LOG_W("%s: %lld map values outside [%g, %g] counted at the ends", cls, (long long)pm.n_clamped, pm.lo, pm.hi);
            char path[4096];
            const char *names[3] = {"image_roc", "pixel_roc", "pro"};
            const Curve *curves[3] = {&iroc, &roc, &proc};
            for (int q = 0; q < 3 && s == AGPT_OK; q++) {
                snprintf(path, sizeof path, "%s/plots/%s_%s.png", run_dir, cls, names[q]);
                s = plot_curve(path, curves[q], q == 2);
            }
        }
        curve_free(&roc), curve_free(&proc), curve_free(&iroc);
    }
    pixel_metrics_free(&pm);
    free(index), free(scores), free(labels);
    return s;
}

static Status make_dir(const char *path) {
    if (mkdir(path, 0777) != 0 && errno != EEXIST) return AGPT_FAIL(AGPT_ERR_IO, "cannot create folder %s", path);
    return AGPT_OK;
}

static Status eval_run(Eval *e, const char *const *classes, int n_classes, RunResult *run) {
    char run_dir[4096], path[4200];
    snprintf(run_dir, sizeof run_dir, "%s/k%d_round%d", e->out_dir, run->k, run->round);
    AGPT_TRY(make_dir(run_dir));
    snprintf(path, sizeof path, "%s/plots", run_dir);
    AGPT_TRY(make_dir(path));
    snprintf(path, sizeof path, "%s/images.jsonl", run_dir);
    FILE *jsonl = fopen(path, "w");
    if (!jsonl) return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
    double t0 = timer_now_s();
    Status s = AGPT_OK;
    run->n = 0;
    for (int c = 0; c < n_classes && s == AGPT_OK; c++) {
        bool any = false;
        for (int i = 0; i < e->data.n && !any; i++)
            any = e->data.items[i].split == DATASET_TEST && !strcmp(e->data.items[i].class_name, classes[c]);
        if (!any) continue;  // named by the reader
        s = eval_class(e, run, classes[c], jsonl, run_dir, &run->rows[run->n]);
        if (s != AGPT_OK) s = agpt_add_context(s, "class %s (k %d, round %d)", classes[c], run->k, run->round);
        else run->n++;
    }
    if (fclose(jsonl) != 0 && s == AGPT_OK) s = AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
    run->seconds = timer_now_s() - t0;
    row_mean(run->rows, run->n, &run->mean);
    if (s != AGPT_OK) return s;
    snprintf(path, sizeof path, "%s/report.md", run_dir);
    FILE *md = fopen(path, "w");
    if (!md) return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
    fprintf(md, "## k = %d, round %d\n\n", run->k, run->round);
    table_md(md, run->rows, run->n, &run->mean, NULL, e->llm);
    if (fclose(md) != 0) return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
    return AGPT_OK;
}

static cJSON *run_json(const RunResult *r, bool llm) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "k", r->k);
    cJSON_AddNumberToObject(o, "round", r->round);
    cJSON_AddNumberToObject(o, "seconds", r->seconds);
    cJSON *cls = cJSON_AddArrayToObject(o, "classes");
    for (int c = 0; c < r->n; c++) cJSON_AddItemToArray(cls, row_json(&r->rows[c], llm));
    cJSON_AddItemToObject(o, "mean", row_json(&r->mean, llm));
    return o;
}

// ---- options ----------------------------------------------------------------------------------------------

// "1,2,4" -> values (each in [lo, hi]); a usage error otherwise.
static int parse_list(const char *opt, const char *text, int lo, int hi, int *vals, int max) {
    int n = 0;
    char buf[256];
    if (snprintf(buf, sizeof buf, "%s", text) >= (int)sizeof buf) {
        fprintf(stderr, "agpt eval: %s: list too long\n", opt);
        return -1;
    }
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        long long v;
        if (n == max) {
            fprintf(stderr, "agpt eval: %s: at most %d values\n", opt, max);
            return -1;
        }
        if (cli_parse_int("eval", opt, tok, lo, hi, &v)) return -1;
        vals[n++] = (int)v;
    }
    if (n == 0) fprintf(stderr, "agpt eval: %s needs at least one value\n", opt);
    return n ? n : -1;
}

static bool model_has_llm(const char *model, const char *const *overlays, int n_overlays) {
    bool found = false;
    for (int i = -1; i < n_overlays && !found; i++) {
        SafeTensors *st = NULL;
        if (st_open(i < 0 ? model : overlays[i], &st) != AGPT_OK) continue;
        found = st_find(st, "model.embed_tokens.weight") >= 0;
        st_close(st);
    }
    agpt_clear_error();
    return found;
}

int cmd_eval(int argc, char **argv) {
    const char *model = NULL, *data_dir = NULL, *format = NULL, *out_dir = NULL, *classes_text = NULL;
    const char *normal = NULL, *abnormal = NULL, *masks = NULL, *class_name = NULL, *sp_model = NULL, *clip_vocab = NULL;
    const char *overlays[MAX_OVERLAYS];
    int n_overlays = 0, threads = 0, ks[MAX_RUNS] = {1}, n_k = 1, rounds[MAX_RUNS], n_rounds = 0;
    int batch = 1, max_new = 128;
    bool maps_only = false, rotate = false;
    int shifts = 1;
    Device dev = cuda_device_count() > 0 ? DEV_CUDA : DEV_CPU;
    DType dt = DT_F16;
    for (int i = 1; i < argc; i++) {
        int shared = cli_engine_option(argc, argv, &i, "eval", &dev, &dt, &threads);
        if (shared < 0) goto usage_error;
        if (shared) continue;
        const char *a = argv[i], *v;
        long long x;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, "eval"))) goto usage_error; } while (0)
        if (!strcmp(a, "--model")) { VALUE(); model = v; }
        else if (!strcmp(a, "--weights")) {
            VALUE();
            if (n_overlays == MAX_OVERLAYS) { fprintf(stderr, "agpt eval: at most %d --weights\n", MAX_OVERLAYS); goto usage_error; }
            overlays[n_overlays++] = v;
        }
        else if (!strcmp(a, "--data")) { VALUE(); data_dir = v; }
        else if (!strcmp(a, "--format")) { VALUE(); format = v; }
        else if (!strcmp(a, "--classes")) { VALUE(); classes_text = v; }
        else if (!strcmp(a, "--class")) { VALUE(); class_name = v; if (!class_name_ok("eval", v)) goto usage_error; }
        else if (!strcmp(a, "--normal")) { VALUE(); normal = v; }
        else if (!strcmp(a, "--abnormal")) { VALUE(); abnormal = v; }
        else if (!strcmp(a, "--masks")) { VALUE(); masks = v; }
        else if (!strcmp(a, "--out") || !strcmp(a, "-o")) { VALUE(); out_dir = v; }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); sp_model = v; }
        else if (!strcmp(a, "--clip-vocab")) { VALUE(); clip_vocab = v; }
        else if (!strcmp(a, "--k-shot")) { VALUE(); if ((n_k = parse_list(a, v, 0, 4, ks, MAX_RUNS)) < 0) goto usage_error; }
        else if (!strcmp(a, "--round") || !strcmp(a, "--rounds")) {
            VALUE();
            if ((n_rounds = parse_list(a, v, 0, 10000, rounds, MAX_RUNS)) < 0) goto usage_error;
        }
        else if (!strcmp(a, "--batch")) { VALUE(); if (cli_parse_int("eval", a, v, 1, MAX_BATCH, &x)) goto usage_error; batch = (int)x; }
        else if (!strcmp(a, "--max-new")) { VALUE(); if (cli_parse_int("eval", a, v, 1, 1024, &x)) goto usage_error; max_new = (int)x; }
        else if (!strcmp(a, "--maps-only")) maps_only = true;
        else if (!strcmp(a, "--rotate-references")) rotate = true;
        else if (!strcmp(a, "--reference-shifts")) { VALUE(); if (cli_parse_int("eval", a, v, 1, 14, &x)) goto usage_error; shifts = (int)x; }
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else { fprintf(stderr, "agpt eval: unknown option or argument '%s'\n", a); goto usage_error; }
#undef VALUE
    }
    DatasetFormat fmt;
    if (!format) { fprintf(stderr, "agpt eval: --format mvtec|visa|folder is required\n"); goto usage_error; }
    if (!strcmp(format, "mvtec")) fmt = DATASET_MVTEC;
    else if (!strcmp(format, "visa")) fmt = DATASET_VISA;
    else if (!strcmp(format, "folder")) fmt = DATASET_FOLDER;
    else { fprintf(stderr, "agpt eval: --format mvtec|visa|folder, not '%s'\n", format); goto usage_error; }
    if (!model || !out_dir) { fprintf(stderr, "agpt eval: --model and --out are required\n"); goto usage_error; }
    if (fmt == DATASET_FOLDER ? (!normal || !class_name || data_dir) : (!data_dir || normal || abnormal || masks)) {
        fprintf(stderr, "agpt eval: %s\n", fmt == DATASET_FOLDER
                    ? "--format folder takes --normal DIR [--abnormal DIR --masks DIR] --class NAME (no --data)"
                    : "--format mvtec|visa takes --data DIR (--normal, --abnormal, --masks are the folder layout's)");
        goto usage_error;
    }
    if (n_rounds == 0) rounds[n_rounds++] = fmt == DATASET_MVTEC ? 3 : fmt == DATASET_VISA ? 14 : 0;
    if (n_k * n_rounds > MAX_RUNS) { fprintf(stderr, "agpt eval: at most %d runs (k x rounds)\n", MAX_RUNS); goto usage_error; }

    // The classes asked for
    char class_buf[4096];
    const char *classes[MAX_CLASSES];
    int n_classes = 0;
    if (classes_text) {
        snprintf(class_buf, sizeof class_buf, "%s", classes_text);
        for (char *save = NULL, *t = strtok_r(class_buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            if (n_classes == MAX_CLASSES) { fprintf(stderr, "agpt eval: at most %d classes\n", MAX_CLASSES); goto usage_error; }
            if (!class_name_ok("eval", t)) goto usage_error;
            classes[n_classes++] = t;
        }
    }
    Status s = check_model_path(model, "--model");
    for (int k = 0; s == AGPT_OK && k < n_overlays; k++) s = check_model_path(overlays[k], "--weights");
    if (s) return cli_report("eval", s);
    if ((s = ensure_dir(out_dir))) {
        cli_report("eval", s);
        return 2;
    }
    // The data before the model: a broken tree is reported in seconds.
    static Eval e;
    memset(&e, 0, sizeof e);
    e.out_dir = out_dir, e.batch = batch, e.max_new = max_new;
    s = fmt == DATASET_MVTEC  ? dataset_read_mvtec(data_dir, classes, n_classes, &e.data)
        : fmt == DATASET_VISA ? dataset_read_visa(data_dir, classes, n_classes, &e.data)
                              : dataset_read_folder(normal, abnormal, masks, class_name, &e.data);
    if (s) return cli_report("eval", s);
    if (n_classes == 0)
        for (int c = 0; c < e.data.n_classes && c < MAX_CLASSES; c++) classes[n_classes++] = e.data.classes[c];
    int n_test = 0;
    for (int i = 0; i < e.data.n; i++) n_test += e.data.items[i].split == DATASET_TEST;
    if (n_test == 0) {
        char text[2048];
        dataset_problems_text(&e.data, text, sizeof text);
        fprintf(stderr, "agpt eval: no test images in %s%s%s\n", data_dir ? data_dir : normal, text[0] ? ": " : "", text);
        dataset_free(&e.data);
        return 1;
    }
    if (dataset_problem_count(&e.data)) {
        char text[2048];
        dataset_problems_text(&e.data, text, sizeof text);
        fprintf(stderr, "agpt eval: data problems: %s\n", text);
    }
    // Every run's references exist, before the model loads.
    for (int a = 0; a < n_k; a++)
        for (int b = 0; b < n_rounds; b++)
            for (int c = 0; c < n_classes; c++) {
                const char *refs[8];
                bool any = false;
                for (int i = 0; i < e.data.n && !any; i++)
                    any = e.data.items[i].split == DATASET_TEST && !strcmp(e.data.items[i].class_name, classes[c]);
                if (!any || ks[a] == 0) continue;
                if ((s = dataset_references(&e.data, classes[c], ks[a], rounds[b], refs))) {
                    dataset_free(&e.data);
                    return cli_report("eval", s);
                }
            }

    Engine eng;
    dt = cli_model_dtype(argc, argv, dev, dt);
    if ((s = engine_create(&eng, dev, 0, threads, 1))) {
        dataset_free(&e.data);
        return cli_report("eval", s);
    }
    static AnomalyGPT agpt;
    static VisionModel vision;
    e.llm = !maps_only && model_has_llm(model, overlays, n_overlays);
    if (!maps_only && !e.llm) LOG_W("%s has no language model: map metrics only", model);
    e.agpt = &agpt;
    e.vm = e.llm ? &agpt.vision : &vision;
    double t0 = timer_now_s();
    int kmax = 0;
    for (int j = 0; j < n_k; j++) kmax = ks[j] > kmax ? ks[j] : kmax;
    s = e.llm ? anomalygpt_open_batch(&agpt, &eng, model, overlays, n_overlays, sp_model, dt, 2048, batch)
              : vision_model_open(e.vm, &eng, model, overlays, n_overlays, dt, batch > kmax ? batch : kmax > 0 ? kmax : 1);
    bool opened = s == AGPT_OK;
    ClipTokenizer *clip = NULL;
    if (s == AGPT_OK && clip_vocab && (s = clip_tokenizer_load_file(clip_vocab, &clip)) == AGPT_OK)
        vision_model_set_tokenizer(e.vm, clip);
    if (s == AGPT_OK) {
        e.vm->augment_rotations = rotate;
        e.vm->reference_shifts = shifts;
        e.S = e.vm->vision.image;
        s = mem_host_alloc((size_t)batch * e.S * e.S * sizeof(float), (void **)&e.maps);
        if (s == AGPT_OK && !(e.mask = malloc((size_t)e.S * e.S))) s = AGPT_FAIL(AGPT_ERR_OOM, "out of memory");
    }
    int rc = 0;
    static RunResult runs[MAX_RUNS];
    int n_runs = 0;
    if (s == AGPT_OK) {
        LOG_I("eval: model loaded in %.2f s; %d test images, %d classes, %d run(s), %s", timer_now_s() - t0, n_test,
              n_classes, n_k * n_rounds, e.llm ? "answers and maps" : "maps only");
        progress_begin(&e.bar, "eval", (int64_t)n_test * n_k * n_rounds);
        for (int a = 0; a < n_k && s == AGPT_OK; a++)
            for (int b = 0; b < n_rounds && s == AGPT_OK; b++) {
                runs[n_runs].k = ks[a], runs[n_runs].round = rounds[b];
                s = eval_run(&e, classes, n_classes, &runs[n_runs]);
                if (s == AGPT_OK) n_runs++;
            }
        progress_end(&e.bar);
    }
    if (s != AGPT_OK) rc = cli_report("eval", s);
    if (s == AGPT_OK) {
        // Over the runs: the mean and std (population) of each class's metrics and of the mean row.
        int n_rows = runs[0].n;
        static Row mean_rows[MAX_CLASSES + 1], std_rows[MAX_CLASSES + 1];
        for (int r = 0; r <= n_rows; r++) {
            Row *m = &mean_rows[r], *sd = &std_rows[r];
            const Row *first = r < n_rows ? &runs[0].rows[r] : &runs[0].mean;
            *m = *first, *sd = *first;
            for (int j = 0; j < N_METRICS; j++) {
                double sum = 0, sq = 0;
                int cnt = 0;
                for (int q = 0; q < n_runs; q++) {
                    const Row *x = r < n_rows ? &runs[q].rows[r] : &runs[q].mean;
                    if (r < n_rows && runs[q].n != n_rows) continue;
                    if (!isnan(x->v[j])) sum += x->v[j], sq += x->v[j] * x->v[j], cnt++;
                }
                m->v[j] = cnt ? sum / cnt : NAN;
                sd->v[j] = cnt ? sqrt(fmax(0, sq / cnt - m->v[j] * m->v[j])) : NAN;
            }
        }
        double bound = 0;
        for (int q = 0; q < n_runs; q++) bound = fmax(bound, runs[q].mean.auroc_bound);
        char path[4200];
        snprintf(path, sizeof path, "%s/report.md", out_dir);
        FILE *md = fopen(path, "w");
        if (!md) rc = cli_report("eval", AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path));
        for (int pass = 0; pass < 2 && rc == 0; pass++) {
            FILE *f = pass ? stdout : md;
            fprintf(f, "# agpt eval: %s (%s), %s\n\n", data_dir ? data_dir : normal, format,
                    e.llm ? "answers and maps" : "maps only");
            for (int q = 0; q < n_runs; q++) {
                fprintf(f, "## k = %d, round %d (%.1f s)\n\n", runs[q].k, runs[q].round, runs[q].seconds);
                table_md(f, runs[q].rows, runs[q].n, &runs[q].mean, NULL, e.llm);
                fprintf(f, "\n");
            }
            if (n_runs > 1) {
                fprintf(f, "## mean ± std over %d runs\n\n", n_runs);
                table_md(f, mean_rows, n_rows, &mean_rows[n_rows], std_rows, e.llm);
                fprintf(f, "\n");
            }
            fprintf(f, "Metrics x100. Pixel metrics on a %d-bin histogram over the map range; the largest pixel AUROC "
                       "error bound of any class is %.2g.\n", PIXEL_BINS, bound);
            if (dataset_problem_count(&e.data)) {
                char text[2048];
                dataset_problems_text(&e.data, text, sizeof text);
                fprintf(f, "\nData problems: %s\n", text);
            }
        }
        if (md && fclose(md) != 0 && rc == 0) rc = cli_report("eval", AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path));
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "model", model);
        cJSON_AddStringToObject(root, "format", format);
        cJSON_AddStringToObject(root, "data", data_dir ? data_dir : normal);
        cJSON_AddBoolToObject(root, "maps_only", !e.llm);
        cJSON_AddBoolToObject(root, "rotate_references", rotate);
        cJSON_AddNumberToObject(root, "reference_shifts", shifts);
        cJSON *pm = cJSON_AddObjectToObject(root, "pixel_metrics");
        cJSON_AddStringToObject(pm, "method", "histogram");
        cJSON_AddNumberToObject(pm, "bins", PIXEL_BINS);
        cJSON *rs = cJSON_AddArrayToObject(root, "runs");
        for (int q = 0; q < n_runs; q++) {
            cJSON_AddItemToArray(rs, run_json(&runs[q], e.llm));
            char rp[4200];
            snprintf(rp, sizeof rp, "%s/k%d_round%d/report.json", out_dir, runs[q].k, runs[q].round);
            cJSON *one = run_json(&runs[q], e.llm);
            if (write_json_file(rp, one) != AGPT_OK && rc == 0) rc = cli_report("eval", AGPT_ERR_IO);
            cJSON_Delete(one);
        }
        cJSON *sum = cJSON_AddObjectToObject(root, "over_runs");
        cJSON_AddNumberToObject(sum, "runs", n_runs);
        cJSON *ms = cJSON_AddArrayToObject(sum, "mean"), *ss = cJSON_AddArrayToObject(sum, "std");
        for (int r = 0; r <= n_rows; r++) {
            cJSON_AddItemToArray(ms, row_json(&mean_rows[r], e.llm));
            cJSON_AddItemToArray(ss, row_json(&std_rows[r], e.llm));
        }
        char text[2048];
        dataset_problems_text(&e.data, text, sizeof text);
        cJSON_AddStringToObject(root, "problems", text);
        snprintf(path, sizeof path, "%s/report.json", out_dir);
        if (write_json_file(path, root) != AGPT_OK && rc == 0) rc = cli_report("eval", AGPT_ERR_IO);
        cJSON_Delete(root);
    }
    mem_host_free(e.maps);
    free(e.mask);
    if (opened) {
        if (e.llm) anomalygpt_close(&agpt);
        else vision_model_close(e.vm);
    }
    clip_tokenizer_free(clip);
    engine_destroy(&eng);
    dataset_free(&e.data);
    return finish_stdout("eval", rc);

usage_error:
    usage(stderr);
    return 2;
}
