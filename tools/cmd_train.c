// agpt train: the reference's training of the decoder and the prompt learner (and, as options, llama_proj and the
// LoRA factors) on normal images with synthetic anomalies (anomalygpt-reference.md 6). This file only parses
// options and prints; the work is train/anomaly_data (samples), model/anomalygpt_train (the step),
// train/trainer (the update loop, checkpoints, resume) and train/loader (threads).
//
// Exit status: 0 trained (or stopped by Ctrl-C with a checkpoint saved), 1 an error, 2 a usage error (found before
// the model loads).
#define _DEFAULT_SOURCE  // strtok
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/anomalygpt_train.h"
#include "runtime/comm.h"
#include "runtime/memory.h"
#include "runtime/timer.h"
#include "tools/cli.h"
#include "tools/inspect_io.h"
#include "tools/launch.h"
#include "train/anomaly_data.h"
#include "train/dataset.h"
#include "train/metrics.h"
#include "train/memory_plan.h"
#include "train/run_state.h"
#include "train/trainer.h"

#define MAX_OVERLAYS 4
#define MAX_CLASSES 64

static void usage(FILE *f) {
    fprintf(f,
            "usage: agpt train --model BASE.safetensors --out RUNDIR (--data DIR [--format mvtec|visa] [--classes a,b]\n"
            "                  | --normal DIR --class NAME) [--sft FILE.json --sft-images DIR] [options]\n"
            "Trains the patch decoder and the prompt learner as the reference does (anomalygpt-reference.md 6):\n"
            "every normal training image gives one micro-step of two conversations, the image with the answer \"No,\n"
            "there is no anomaly\" and the image with NSA synthetic anomalies (agpt synth shows them) with the answer\n"
            "naming where they are; loss = LLM cross-entropy + focal + Dice of the four layers' maps. RUNDIR gets\n"
            "delta.safetensors (layer it with agpt detect --weights RUNDIR/delta.safetensors), state.safetensors\n"
            "(--resume) and log.jsonl (one line per update).\n"
            "  --data DIR       MVTec-AD layout: DIR/<class>/train/good/*.png (--format mvtec, the default), or VisA:\n"
            "                   DIR/split_csv/1cls.csv rows with split 'train' (--format visa); --classes a,b keeps those\n"
            "  --normal DIR --class NAME   a plain folder of normal images of one product (.png/.jpg/.jpeg in it)\n"
            "  --supervised     also train on real defects with their masks (the reference's train_supervised): MVTec\n"
            "                   <class>/test/<defect>/*.png with ground_truth masks, VisA's anomaly rows with masks, or\n"
            "                   --abnormal DIR --masks DIR beside --normal. Each defect is paired with a normal image of\n"
            "                   its class; the answer names its mask regions' positions. Defects without a mask are\n"
            "                   left out (counted). Do not evaluate on the defects you trained on\n"
            "  --sft F.json --sft-images DIR   also the PandaGPT instruction stream (its first two turns): every\n"
            "                   image's micro-step is followed by one instruction micro-step, as the reference's loop\n"
            "  --params F.json  synthesis parameters and the class description for classes the reference does not know\n"
            "                   (agpt synth --help lists the keys)\n"
            "  --steps N        optimizer updates (default: --epochs 50 as the reference, N = epochs * images / accum)\n"
            "  --epochs E       passes over the images instead of --steps\n"
            "  --accum K        images per update, 1..1024 (8: the reference's 8 micro-steps per GPU; with --sft an image\n"
            "                   brings its instruction micro-step, so --accum 4 is the reference's update)\n"
            "  --lr X           peak learning rate (1e-3); WarmupDecayLR: log warmup over --warmup updates (default\n"
            "                   max(10, N/10), as the reference) then linear decay to 0 at N\n"
            "  --train PARTS    comma list of decoder, prompt_learner, llama_proj, lora (default decoder,prompt_learner);\n"
            "                   lm_head also trains lm_head and model.norm (not in the reference: for a model trained\n"
            "                   from scratch, whose random LLaMA LoRA alone cannot adapt; f32 models only); vision\n"
            "                   the ViT's blocks (not in the reference, whose encoder is frozen; stem and head stay)\n"
            "  --vision-lr-scale F  the ViT blocks' learning rate as a fraction of the schedule's, 0 < F <= 10 (1):\n"
            "                   the few-shot map compares their features, so they may need to move slower\n"
            "  --fewshot-p P    chance a micro-step feeds the prompt learner the few-shot map (0.5, as the reference)\n"
            "  --reference-shifts N   the few-shot map's reference also in the N x N shifted views of agpt detect's\n"
            "                   option (1..14; 1, the reference: none); with the ViT frozen, each class's views are\n"
            "                   encoded once and kept (up to 2 GiB)\n"
            "  --no-reference-rotations   the reference's views not also turned 90/180/270 degrees (the reference's\n"
            "                   training turns them; inference does not)\n"
            "  --seed S         sample order and every random draw (42)\n"
            "  --ckpt-every N   save every N updates (default: only at the end; Ctrl-C saves and exits)\n"
            "  --resume RUNDIR  continue a run bit for bit (same options; RUNDIR is its --out)\n"
            "  --weights F      layer trained weights over the base before training (repeatable)\n"
            "  --tokenizer F    override the LLaMA tokenizer embedded in the model file\n"
            "  --loader-threads N   sample builders (decode, resize, synthesis, tokens), 1..64 (2); results do not\n"
            "                   depend on it\n"
            "  --val-images K   validation: K training images with held-out synthetic anomalies (other draws than\n"
            "                   training's) and the images themselves; their zero-shot maps' pixel and image AUROC go to\n"
            "                   RUNDIR/val.jsonl before training, every --val-every N updates and at the end (8; 0: off);\n"
            "                   the images are training images: agpt eval on a test split measures generalisation\n"
            "  --memory-budget-gb G refuse to start when the planned peak is larger\n"
            "  --zero 0|1       under mpirun or --gpus: 1 shards AdamW's moments over the ranks (ZeRO-1: each rank keeps and\n"
            "                   steps 1/N of them; the same result as 0, the default, within 1e-6)\n"
            "  --gpus N         N processes on this node, one per GPU (implies --device cuda), gradients summed by\n"
            "                   NCCL: N times the batch of one process; no MPI needed (unverified on a GPU)\n"
            "  --comm-timeout S under mpirun or --gpus: a collective that waits S seconds for the other ranks ends the job with\n"
            "                   a message naming it (600; 0: wait forever)\n"
            "  --device cpu|cuda, --threads N   cuda: the step on the GPU (under mpirun, GPU = the rank's place on its\n"
            "                   node), AdamW on the host as the reference's optimizer offload; f32 only. Unverified on\n"
            "                   a GPU: no GPU has run it yet\n");
}

typedef struct TrainOptions {
    const char *model, *out, *data, *format, *classes, *normal, *class_name, *params, *tokenizer, *train;
    const char *sft, *sft_images, *abnormal, *masks;
    const char *overlays[MAX_OVERLAYS];
    int n_overlays;
    long long steps, epochs, accum, warmup, seed, ckpt_every, loader_threads, val_every, val_images;
    double lr, vision_lr_scale, fewshot_p, budget_gb;
    bool resume, no_reference_rotations, supervised;
    long long reference_shifts, zero, gpus;
    double comm_timeout;
    Device device;
    DType dtype;
    int threads;
} TrainOptions;

// ---- the image list --------------------------------------------------------------------------------------

// The training images and their classes, from the dataset readers (train/dataset.h) eval uses too.
typedef struct ImageSet {
    char **paths, **classes;  // [n] the normal training images: views into the dataset
    int n;
    // --supervised: the real defects with their masks (views into the dataset)
    char **defects, **defect_masks, **defect_classes;  // [n_defects]
    int n_defects, no_mask;   // no_mask: defects left out for want of a mask
    Dataset ds;
} ImageSet;

static void set_free(ImageSet *s) {
    free(s->paths), free(s->classes);
    free(s->defects), free(s->defect_masks), free(s->defect_classes);
    dataset_free(&s->ds);
    memset(s, 0, sizeof *s);
}

// Splits "a,b" into at most MAX_CLASSES names (pointers into buf).
static int split_classes(const char *list, char *buf, size_t cap, const char **names) {
    if (!list) return 0;
    snprintf(buf, cap, "%s", list);
    int n = 0;
    for (char *p = strtok(buf, ","); p && n < MAX_CLASSES; p = strtok(NULL, ",")) names[n++] = p;
    return n;
}

// MVTec-AD: <root>/<class>/train/good/*.png; VisA: 1cls.csv rows with split 'train' and label normal; a plain
// folder: its normal images.
static Status list_training_images(const TrainOptions *o, ImageSet *set) {
    memset(set, 0, sizeof *set);
    char buf[4096];
    const char *names[MAX_CLASSES];
    int n_names = split_classes(o->classes, buf, sizeof buf, names);
    Status s = o->normal ? dataset_read_folder(o->normal, o->abnormal, o->masks, o->class_name, &set->ds)
             : !strcmp(o->format, "visa") ? dataset_read_visa(o->data, names, n_names, &set->ds)
                                          : dataset_read_mvtec(o->data, names, n_names, &set->ds);
    if (s != AGPT_OK) return s;
    size_t cap = (size_t)set->ds.n + 1;
    set->paths = calloc(cap, sizeof *set->paths), set->classes = calloc(cap, sizeof *set->classes);
    set->defects = calloc(cap, sizeof *set->defects), set->defect_masks = calloc(cap, sizeof *set->defect_masks);
    set->defect_classes = calloc(cap, sizeof *set->defect_classes);
    if (!set->paths || !set->classes || !set->defects || !set->defect_masks || !set->defect_classes)
        return AGPT_FAIL(AGPT_ERR_OOM, "no memory for the image list");
    for (int i = 0; i < set->ds.n; i++) {
        const DatasetItem *it = &set->ds.items[i];
        if (o->supervised && it->anomalous) {  // every split's defects: the reference trains on test anomalies
            if (!it->mask) {
                set->no_mask++;
                continue;
            }
            set->defects[set->n_defects] = it->image, set->defect_masks[set->n_defects] = it->mask;
            set->defect_classes[set->n_defects++] = it->class_name;
            continue;
        }
        bool training = o->normal ? !it->anomalous : it->split == DATASET_TRAIN && !it->anomalous;
        if (!training) continue;
        set->paths[set->n] = it->image;
        set->classes[set->n++] = it->class_name;
    }
    if (set->n == 0)
        return AGPT_FAIL(AGPT_ERR_ARG, "no training images found in %s (%s)", o->normal ? o->normal : o->data,
                         o->normal ? "a folder of .png/.jpg images" : !strcmp(o->format, "visa")
                             ? "split_csv/1cls.csv rows with split 'train' and label normal"
                             : "<class>/train/good/*.png");
    if (o->supervised && set->n_defects == 0)
        return AGPT_FAIL(AGPT_ERR_ARG, "--supervised: no defect images with masks found in %s (%s)",
                         o->normal ? (o->abnormal ? o->abnormal : "(no --abnormal)") : o->data,
                         o->normal ? "--abnormal DIR with --masks DIR" : !strcmp(o->format, "visa")
                             ? "1cls.csv rows with label anomaly and a mask"
                             : "<class>/test/<defect>/*.png with ground_truth/<defect>/*_mask.png");
    if (set->no_mask)
        fprintf(stderr, "agpt train: note: %d defect image%s without a mask left out of supervised training\n",
                set->no_mask, set->no_mask > 1 ? "s" : "");
    // Only problems that matter for training are worth a word (a class without test images does not).
    int bad = set->ds.problems[DATASET_BAD_ROW] + set->ds.problems[DATASET_UNREADABLE];
    if (bad) {
        char text[1024];
        dataset_problems_text(&set->ds, text, sizeof text);
        fprintf(stderr, "agpt train: note: %s\n", text);
    }
    return AGPT_OK;
}

// ---- validation -------------------------------------------------------------------------------------------

typedef struct Validation {
    int n;                      // pairs
    uint8_t *normal, *anomalous, *mask;  // [n][S][S][3], [n][S][S][3], [n][S][S]
    const char **class_name;    // [n]
    AnomalyTrainModel *model;
    FILE *log;                  // RUNDIR/val.jsonl
} Validation;

static void validation_free(Validation *v) {
    free(v->normal), free(v->anomalous), free(v->mask), free(v->class_name);
    if (v->log) fclose(v->log);
    memset(v, 0, sizeof *v);
}

// Pairs from the training images with their own draws (the seed's validation stream, apart from the samples').
static Status validation_init(Validation *v, const AnomalyData *d, int n, uint64_t seed, const char *dir,
                              bool resume) {
    memset(v, 0, sizeof *v);
    if (n == 0) return AGPT_OK;
    const size_t S = ANOMALY_SIDE, px = S * S;
    v->normal = malloc((size_t)n * px * 3), v->anomalous = malloc((size_t)n * px * 3), v->mask = malloc((size_t)n * px);
    v->class_name = calloc((size_t)n, sizeof *v->class_name);
    if (!v->normal || !v->anomalous || !v->mask || !v->class_name) return AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    for (int k = 0; k < n; k++) {
        int64_t index = (int64_t)(((uint64_t)k * 2654435761u) % (uint64_t)d->n_normal);  // normal images only
        Rng rng;
        rng_seed(&rng, seed ^ 0x76616c6964617465ull ^ ((uint64_t)k << 20));  // "validate"
        int patches;
        double centers[TRAIN_MAX_REGIONS][2];
        AGPT_TRY(anomaly_make_pair(d, index, &rng, v->normal + k * px * 3, v->anomalous + k * px * 3, v->mask + k * px,
                                   &patches, centers));
        v->class_name[k] = d->classes[d->item_class[index]].name;
    }
    v->n = n;
    char path[4096];
    snprintf(path, sizeof path, "%s/val.jsonl", dir);
    if (!(v->log = fopen(path, resume ? "a" : "w"))) return AGPT_FAIL(AGPT_ERR_IO, "cannot write %s", path);
    return AGPT_OK;
}

// The zero-shot maps of the pairs with the weights as they are now: pixel AUROC over every pixel (the normal
// images all normal), image AUROC of the maps' maxima.
static Status validate(Validation *v, int64_t update) {
    const int S = ANOMALY_SIDE;
    float *map = malloc(sizeof(float) * S * S), *scores = malloc(sizeof(float) * 2 * v->n);
    uint8_t *labels = malloc((size_t)2 * v->n);
    PixelMetrics pm;
    Status s = map && scores && labels ? pixel_metrics_init(&pm, 0.0, 1.0, 1 << 16) : AGPT_FAIL(AGPT_ERR_OOM, "no memory");
    bool have_pm = s == AGPT_OK;
    for (int k = 0; s == AGPT_OK && k < v->n; k++)
        for (int which = 0; s == AGPT_OK && which < 2; which++) {
            Image img = {.width = S, .height = S,
                         .rgb = (which ? v->anomalous : v->normal) + (size_t)k * S * S * 3};
            s = vision_model_map(&v->model->vision, &img, 1, v->class_name[k], map, &scores[2 * k + which]);
            labels[2 * k + which] = (uint8_t)which;
            if (s == AGPT_OK) s = pixel_metrics_add(&pm, map, which ? v->mask + (size_t)k * S * S : NULL, S, S);
        }
    PixelResult pr;
    BinaryMetrics im;
    if (s == AGPT_OK) s = pixel_metrics_result(&pm, &pr, NULL, NULL);
    if (s == AGPT_OK) s = metrics_binary(scores, labels, 2 * v->n, &im, NULL);
    if (s == AGPT_OK) {
        fprintf(v->log, "{\"step\":%lld,\"pixel_auroc\":%.6f,\"image_auroc\":%.6f,\"pairs\":%d}\n",
                (long long)update, pr.pixel.auroc, im.auroc, v->n);
        fflush(v->log);
        fprintf(stderr, "  validation at update %lld: pixel AUROC %.4f, image AUROC %.4f (%d held-out synthetic "
                "anomalies)\n", (long long)update, pr.pixel.auroc, im.auroc, v->n);
    }
    if (have_pm) pixel_metrics_free(&pm);
    free(map), free(scores), free(labels);
    return s;
}

// ---- progress ----------------------------------------------------------------------------------------------

typedef struct Progress {
    double t0;
    int64_t first;  // the first update of this process (a resume starts later)
    bool tty;
    Validation *val;
    int64_t val_every;
} Progress;

static void on_update(void *ctx, const TrainerUpdate *u) {
    Progress *p = ctx;
    if (p->first < 0) p->first = u->update - 1;
    double elapsed = timer_now_s() - p->t0, per = elapsed / (double)(u->update - p->first);
    double eta = per * (double)(u->total_updates - u->update);
    fprintf(stderr, "%supdate %lld/%lld  ce %.4f focal %.4f dice %.4f  |g| %.3g  lr %.3g  %.2f s/update  ETA %.0f s%s",
            p->tty ? "\r" : "", (long long)u->update, (long long)u->total_updates, u->mean.ce, u->mean.focal,
            u->mean.dice, u->grad_norm, u->lr, per, eta, p->tty ? "   " : "\n");
    if (p->tty && u->update == u->total_updates) fputc('\n', stderr);
    bool due = p->val->n > 0 && (u->update == u->total_updates || (p->val_every > 0 && u->update % p->val_every == 0));
    if (due) {
        if (p->tty) fputc('\n', stderr);
        if (validate(p->val, u->update) != AGPT_OK)  // a report, not a reason to lose the run
            fprintf(stderr, "agpt train: validation failed: %s\n", agpt_last_error());
    }
}

static volatile sig_atomic_t stop_requested = 0;
static void on_sigint(int sig) {
    (void)sig;
    stop_requested = 1;
}

// ---- options -----------------------------------------------------------------------------------------------


static bool parts_ok(const char *list, bool *decoder, bool *prompt, bool *proj, bool *lora, bool *head,
                     bool *vision) {
    *decoder = *prompt = *proj = *lora = *head = *vision = false;
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == 7 && !strncmp(p, "decoder", 7)) *decoder = true;
        else if (len == 14 && !strncmp(p, "prompt_learner", 14)) *prompt = true;
        else if (len == 10 && !strncmp(p, "llama_proj", 10)) *proj = true;
        else if (len == 4 && !strncmp(p, "lora", 4)) *lora = true;
        else if (len == 7 && !strncmp(p, "lm_head", 7)) *head = true;
        else if (len == 6 && !strncmp(p, "vision", 6)) *vision = true;
        else {
            fprintf(stderr, "agpt train: --train takes decoder, prompt_learner, llama_proj, lora, lm_head, vision, "
                    "not '%.*s'\n", (int)len, p);
            return false;
        }
        p += len + (end ? 1 : 0);
    }
    if (!*decoder && !*prompt && !*proj && !*lora && !*head && !*vision) {
        fprintf(stderr, "agpt train: --train names no part\n");
        return false;
    }
    return true;
}

// The options that change a run's numbers, one per line: a resume with other values is refused.
static char *config_text(const TrainOptions *o, const ImageSet *set, int world) {
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < set->n; i++) {
        for (const char *c = set->paths[i]; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
        for (const char *c = set->classes[i]; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    }
    char *text = malloc(8192);
    if (!text) return NULL;
    int n = snprintf(text, 8192, "model=%s\nimages=%d\nimages_hash=%016llx\nsteps=%lld\naccum=%lld\nlr=%.9g\n"
                     "warmup=%lld\ntrain=%s\nvision_lr_scale=%.9g\nfewshot_p=%.9g\nseed=%lld\nparams=%s\nworld=%d\nsft=%s\n",
                     o->model, set->n, (unsigned long long)h, o->steps, o->accum, o->lr, o->warmup, o->train,
                     o->vision_lr_scale, o->fewshot_p, o->seed,
                     o->params ? o->params : "", world, o->sft ? o->sft : "");
    if (o->reference_shifts > 1)  // absent when 1: runs from before the option resume
        n += snprintf(text + n, 8192 - n, "reference_shifts=%lld\n", o->reference_shifts);
    if (o->no_reference_rotations) n += snprintf(text + n, 8192 - n, "no_reference_rotations=1\n");
    if (o->supervised) {
        uint64_t hd = 1469598103934665603ull;
        for (int i = 0; i < set->n_defects; i++)
            for (const char *c = set->defects[i]; *c; c++) hd = (hd ^ (uint8_t)*c) * 1099511628211ull;
        n += snprintf(text + n, 8192 - n, "defects=%d\ndefects_hash=%016llx\n", set->n_defects, (unsigned long long)hd);
    }
    if (o->zero) n += snprintf(text + n, 8192 - n, "zero=%lld\n", o->zero);
    for (int k = 0; k < o->n_overlays && n < 8000; k++) n += snprintf(text + n, 8192 - n, "weights=%s\n", o->overlays[k]);
    return text;
}

static int parse(int argc, char **argv, TrainOptions *o) {
    const char *cmd = "train";
    *o = (TrainOptions){.format = "mvtec", .train = "decoder,prompt_learner", .steps = -1, .epochs = -1,
                        .accum = 8, .warmup = -1, .seed = 42, .ckpt_every = 0, .loader_threads = 2, .val_every = 0, .val_images = 8, .lr = 1e-3, .vision_lr_scale = 1,
                        .fewshot_p = 0.5, .reference_shifts = 1, .comm_timeout = 600, .budget_gb = 0, .device = DEV_CPU, .dtype = DT_F32};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        int engine = cli_engine_option(argc, argv, &i, cmd, &o->device, &o->dtype, &o->threads);
        if (engine < 0) return 2;
        if (engine > 0) continue;
#define VALUE() do { if (!(v = cli_value(argc, argv, &i, cmd))) return 2; } while (0)
#define INT(lo, hi, dst) do { VALUE(); if (cli_parse_int(cmd, a, v, lo, hi, dst)) return 2; } while (0)
#define DBL(lo, hi, dst) do { VALUE(); if (cli_parse_double(cmd, a, v, lo, hi, dst)) return 2; } while (0)
        if (!strcmp(a, "--model")) { VALUE(); o->model = v; }
        else if (!strcmp(a, "--out") || !strcmp(a, "-o")) { VALUE(); o->out = v; }
        else if (!strcmp(a, "--resume")) { VALUE(); o->out = v, o->resume = true; }
        else if (!strcmp(a, "--data")) { VALUE(); o->data = v; }
        else if (!strcmp(a, "--format")) { VALUE(); o->format = v; }
        else if (!strcmp(a, "--classes")) { VALUE(); o->classes = v; }
        else if (!strcmp(a, "--normal")) { VALUE(); o->normal = v; }
        else if (!strcmp(a, "--abnormal")) { VALUE(); o->abnormal = v; }
        else if (!strcmp(a, "--masks")) { VALUE(); o->masks = v; }
        else if (!strcmp(a, "--supervised")) o->supervised = true;
        else if (!strcmp(a, "--class")) { VALUE(); o->class_name = v; if (!class_name_ok(cmd, v)) return 2; }
        else if (!strcmp(a, "--params")) { VALUE(); o->params = v; }
        else if (!strcmp(a, "--sft")) { VALUE(); o->sft = v; }
        else if (!strcmp(a, "--sft-images")) { VALUE(); o->sft_images = v; }
        else if (!strcmp(a, "--tokenizer")) { VALUE(); o->tokenizer = v; }
        else if (!strcmp(a, "--train")) { VALUE(); o->train = v; }
        else if (!strcmp(a, "--weights")) {
            VALUE();
            if (o->n_overlays == MAX_OVERLAYS) { fprintf(stderr, "agpt train: at most %d --weights\n", MAX_OVERLAYS); return 2; }
            o->overlays[o->n_overlays++] = v;
        }
        else if (!strcmp(a, "--steps")) INT(1, 100000000, &o->steps);
        else if (!strcmp(a, "--epochs")) INT(1, 100000, &o->epochs);
        else if (!strcmp(a, "--accum")) INT(1, 1024, &o->accum);
        else if (!strcmp(a, "--warmup")) INT(1, 100000000, &o->warmup);
        else if (!strcmp(a, "--seed")) INT(0, (long long)1 << 62, &o->seed);
        else if (!strcmp(a, "--ckpt-every")) INT(0, 100000000, &o->ckpt_every);
        else if (!strcmp(a, "--loader-threads")) INT(1, 64, &o->loader_threads);
        else if (!strcmp(a, "--val-every")) INT(0, 100000000, &o->val_every);
        else if (!strcmp(a, "--val-images")) INT(0, 4096, &o->val_images);
        else if (!strcmp(a, "--lr")) DBL(1e-12, 10, &o->lr);
        else if (!strcmp(a, "--vision-lr-scale")) DBL(1e-6, 10, &o->vision_lr_scale);
        else if (!strcmp(a, "--fewshot-p")) DBL(0, 1, &o->fewshot_p);
        else if (!strcmp(a, "--reference-shifts")) INT(1, 14, &o->reference_shifts);
        else if (!strcmp(a, "--no-reference-rotations")) o->no_reference_rotations = true;
        else if (!strcmp(a, "--memory-budget-gb")) DBL(0.001, 1e6, &o->budget_gb);
        else if (!strcmp(a, "--zero")) INT(0, 1, &o->zero);
        else if (!strcmp(a, "--gpus")) INT(1, 256, &o->gpus);
        else if (!strcmp(a, "--comm-timeout")) DBL(0, 1e7, &o->comm_timeout);
        else {
            fprintf(stderr, "agpt train: unknown option '%s' (agpt train --help)\n", a);
            return 2;
        }
#undef VALUE
#undef INT
#undef DBL
    }
    if (!o->model || !o->out) {
        fprintf(stderr, "agpt train: --model and --out (or --resume RUNDIR) are required (agpt train --help)\n");
        return 2;
    }
    if (!o->data == !o->normal) {
        fprintf(stderr, "agpt train: give either --data DIR or --normal DIR --class NAME\n");
        return 2;
    }
    if ((o->abnormal || o->masks) && !(o->normal && o->supervised && o->abnormal && o->masks)) {
        fprintf(stderr, "agpt train: --abnormal DIR and --masks DIR go together, with --normal and --supervised\n");
        return 2;
    }
    if (o->normal && !o->class_name) {
        fprintf(stderr, "agpt train: --normal needs --class NAME (the product's name)\n");
        return 2;
    }
    if (strcmp(o->format, "mvtec") && strcmp(o->format, "visa")) {
        fprintf(stderr, "agpt train: --format is mvtec or visa, not '%s' (a plain folder: --normal DIR)\n", o->format);
        return 2;
    }
    if (!o->sft != !o->sft_images) {
        fprintf(stderr, "agpt train: --sft FILE.json and --sft-images DIR go together\n");
        return 2;
    }
    if (o->steps > 0 && o->epochs > 0) {
        fprintf(stderr, "agpt train: give --steps or --epochs, not both\n");
        return 2;
    }
    bool d, p, j, l, h, v;
    if (!parts_ok(o->train, &d, &p, &j, &l, &h, &v)) return 2;
    return -1;  // go on
}

// The error goes out before MPI_Finalize: once a rank has finalized and exited non-zero, mpirun may kill the
// others before they print, and the message naming the broken file would be lost.
static int report_and_finalize(Comm *comm, Status s) {
    int rc = s == AGPT_OK ? 0 : cli_report("train", s);
    comm_finalize(comm);
    return rc;
}

// agpt train --gpus N: this process starts the N ranks (the same command line; they see AGPT_WORLD_SIZE) and
// waits for them.
static int launch_gpus(const TrainOptions *o, int argc, char **argv) {
    int visible = cuda_device_count();
    if (!cuda_compiled() || visible < o->gpus) {
        if (!cuda_compiled()) fprintf(stderr, "agpt train: --gpus %lld: this agpt was built without CUDA\n", o->gpus);
        else fprintf(stderr, "agpt train: --gpus %lld: %d GPU%s visible\n", o->gpus, visible, visible == 1 ? " is" : "s are");
        return 2;
    }
    char id[257];
    Status s = comm_nccl_id_hex(id);
    if (s != AGPT_OK) {
        cli_report("train", s);
        return 2;
    }
    // The ranks run "agpt train" with this command's options (agpt's own options before "train" are not passed).
    char **child = calloc((size_t)argc + 2, sizeof *child);
    if (!child) return cli_report("train", AGPT_FAIL(AGPT_ERR_OOM, "no memory"));
    child[0] = "agpt";
    for (int i = 0; i < argc; i++) child[i + 1] = argv[i];
    int rc = launch_local("/proc/self/exe", child, (int)o->gpus, id, 10.0);
    free(child);
    return rc;
}

int cmd_train(int argc, char **argv) {
    const char *cmd = "train";
    TrainOptions o;
    int rc = parse(argc, argv, &o);
    if (rc >= 0) return rc;
    if (o.gpus > 0) {
        o.device = DEV_CUDA;
        if (!getenv("AGPT_WORLD_SIZE")) return launch_gpus(&o, argc, argv);
    }
    bool t_decoder, t_prompt, t_proj, t_lora, t_head, t_vision;
    parts_ok(o.train, &t_decoder, &t_prompt, &t_proj, &t_lora, &t_head, &t_vision);
    Device dev = o.device;
    int threads = o.threads;
    if (o.dtype != DT_F32) {
        fprintf(stderr, "agpt train: only --dtype f32 for now, on the CPU and on CUDA (bf16 / f16 training with "
                        "loss scaling is not built yet)\n");
        return 2;
    }

    // The images, before anything loads.
    ImageSet set = {0};
    Status s = list_training_images(&o, &set);
    if (s == AGPT_OK) s = check_model_path(o.model, "--model");
    for (int k = 0; s == AGPT_OK && k < o.n_overlays; k++) s = check_model_path(o.overlays[k], "--weights");
    if (s == AGPT_OK) s = ensure_dir(o.out);
    if (s != AGPT_OK) {
        set_free(&set);
        cli_report(cmd, s);
        return 2;
    }
    Comm comm;
    if ((s = comm_init(&comm)) != AGPT_OK || (s = comm_set_timeout(&comm, o.comm_timeout)) != AGPT_OK) {
        set_free(&set);
        return report_and_finalize(&comm, s);
    }
    const bool lead = comm.rank == 0;
    if (set.n < comm.size) {
        set_free(&set);
        cli_report(cmd, AGPT_FAIL(AGPT_ERR_ARG, "%d training images cannot be shared by %d ranks", set.n, comm.size));
        comm_finalize(&comm);
        return 2;
    }
    if (o.steps < 0) {  // every rank takes floor(images / ranks) of each epoch
        long long epochs = o.epochs > 0 ? o.epochs : 50;
        o.steps = epochs * ((set.n + set.n_defects) / comm.size) / o.accum;
        if (o.steps < 1) o.steps = 1;
    }
    if (o.warmup < 0) o.warmup = o.steps / 10 > 10 ? o.steps / 10 : 10;
    if (o.warmup > o.steps) o.warmup = o.steps;

    Engine eng;
    // One GPU per rank: the rank's place on its node picks it among the visible GPUs (mpirun -np N with N GPUs per
    // node; under Slurm's --gpus-per-task 1 each rank sees one GPU, its device 0).
    int visible = dev == DEV_CUDA ? cuda_device_count() : 0;
    int gpu = visible > 0 ? comm.local_rank % visible : 0;
    if ((s = engine_create(&eng, dev, gpu, threads, (uint64_t)o.seed))) {
        set_free(&set);
        return report_and_finalize(&comm, s);
    }
    // GPUs under mpirun: their gradients summed by NCCL on the devices (where NCCL is built).
    if (dev == DEV_CUDA && (s = comm_init_device(&comm, gpu, false)) != AGPT_OK) {
        set_free(&set);
        engine_destroy(&eng);
        return report_and_finalize(&comm, s);
    }
    AnomalyTrainModel model;
    AnomalyTrainOptions mopt = {.max_batch = 2, .train_proj = t_proj, .train_lora = t_lora, .train_head = t_head,
                                .train_vision = t_vision, .reference_shifts = (int)o.reference_shifts,
                                .no_reference_rotations = o.no_reference_rotations};
    double t_open = timer_now_s();
    s = anomaly_train_open(&model, &eng, o.model, o.overlays, o.n_overlays, o.tokenizer, &mopt);
    int failed_rank;
    s = comm_agree_status(&comm, s, &failed_rank);
    if (s != AGPT_OK) {
        set_free(&set);
        engine_destroy(&eng);
        return report_and_finalize(&comm, s);
    }
    AnomalyData data;
    s = anomaly_data_init(&data, (const char *const *)set.paths, (const char *const *)set.classes, set.n, o.params,
                          model.tokenizer);
    data.fewshot_p = o.fewshot_p;
    if (s == AGPT_OK) s = anomaly_data_add_defects(&data, (const char *const *)set.defects,
                                                   (const char *const *)set.defect_masks,
                                                   (const char *const *)set.defect_classes, set.n_defects,
                                                   o.normal ? DATASET_FOLDER : !strcmp(o.format, "visa") ? DATASET_VISA
                                                                                                       : DATASET_MVTEC);
    if (s == AGPT_OK && o.sft) s = anomaly_data_load_sft(&data, o.sft, o.sft_images);
    Validation val = {0};
    if (s == AGPT_OK && lead) s = validation_init(&val, &data, (int)o.val_images, (uint64_t)o.seed, o.out, o.resume);
    val.model = &model;
    if (s == AGPT_OK && val.n > 0 && !o.resume) s = validate(&val, 0);  // the starting point
    char *cfg_text = s == AGPT_OK ? config_text(&o, &set, comm.size) : NULL;
    if (s == AGPT_OK && !cfg_text) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory");

    // The memory the step needs, from the model's sizes.
    if (s == AGPT_OK) {
        const VisionEncoder *v = &model.vision.vision;
        MemPlanConfig mc = mem_plan_reference_config();
        mc.vit_width = v->block.dim, mc.vit_layers = v->layers, mc.vit_mlp = v->block.mlp_hidden;
        mc.vit_heads = v->block.heads, mc.vit_tokens = v->tokens, mc.vit_patch = v->patch, mc.image = v->image;
        mc.embed = v->embed;
        for (int i = 0; i < PROMPT_CONVS; i++) mc.prompt_channels[i] = model.prompts.channels[i];
        mc.llm_width = model.llm.block.dim, mc.llm_layers = model.llm.layers, mc.llm_hidden = model.llm.block.hidden;
        mc.llm_heads = model.llm.block.heads, mc.vocab = model.llm.vocab, mc.lora_rank = model.llm.rank;
        mc.seq_len = TRAIN_PREFIX_TOKENS + (data.n_sft ? SFT_TEXT_MAX : ANOMALY_TEXT_MAX);
        mc.weight_dtype = DT_F32, mc.compute_dtype = DT_F32;
        mc.train_decoder = t_decoder, mc.train_prompt = t_prompt, mc.train_proj = t_proj, mc.train_lora = t_lora;
        mc.train_head = t_head, mc.train_vision = t_vision;
        // On CUDA the optimizer and its moments stay on the host (train/trainer.h).
        mc.recompute = false, mc.flash_attention = false, mc.optimizer_on_host = dev == DEV_CUDA;
        mc.optimizer_shards = o.zero ? comm.size : 1;
        MemPlan plan;
        s = mem_plan_compute(&mc, &plan);
        if (s == AGPT_OK && lead) {
            char text[4096];
            mem_plan_format(&plan, text, sizeof text);
            char defects[64] = "";
            if (set.n_defects) snprintf(defects, sizeof defects, " + %d defects with masks", set.n_defects);
            fprintf(stderr, "agpt train: %d images%s, %d classes; %lld updates of %lld images x %d rank%s (%s); memory "
                    "plan per rank (f32, %s%s):\n%s", set.n, defects, data.n_classes, o.steps, o.accum, comm.size,
                    comm.size > 1 ? "s" : "", comm_backend_name(&comm), dev == DEV_CUDA ? "CUDA, AdamW on the host" : "CPU",
                    o.zero ? ", ZeRO-1" : "", text);
        }
        if (s == AGPT_OK && o.budget_gb > 0) s = mem_plan_check(&plan, o.budget_gb * 1073741824.0);
    }
    s = comm_agree_status(&comm, s, &failed_rank);

    // The trained tensors as the trainer's parameters: the engine's weights themselves (host or GPU tensors).
    AnomalyTrainTensor *tt = NULL;
    TrainParam *params = NULL;
    int n_params = 0;
    if (s == AGPT_OK) {
        int n = anomaly_train_tensors(&model, NULL, 0);  // how many (the full model with every part: ~670)
        tt = malloc((size_t)n * sizeof *tt), params = malloc((size_t)n * sizeof *params);
        if (!tt || !params) s = AGPT_FAIL(AGPT_ERR_OOM, "no memory for %d trained tensors' names", n);
        else n = anomaly_train_tensors(&model, tt, n);
        for (int i = 0; s == AGPT_OK && i < n; i++) {
            bool dec = !strncmp(tt[i].name, "image_decoder.", 14), pl = !strncmp(tt[i].name, "prompt_learner.", 15);
            bool pj = !strncmp(tt[i].name, "llama_proj.", 11);
            bool hd = !strcmp(tt[i].name, "lm_head.weight") || !strcmp(tt[i].name, "model.norm.weight");
            bool vis = !strncmp(tt[i].name, "modality_trunks.vision.", 23);
            bool keep = dec ? t_decoder : pl ? t_prompt : pj ? t_proj : hd ? t_head : vis ? t_vision : t_lora;
            if (keep)
                params[n_params++] = (TrainParam){.name = tt[i].name, .param = *tt[i].param, .grad = *tt[i].grad,
                                                  .lr_scale = vis ? (float)o.vision_lr_scale : 1};
        }
    }
    TrainerResult res = {0};
    if (s == AGPT_OK) {
        if (lead)
            fprintf(stderr, "agpt train: model ready in %.1f s; training %d tensors\n", timer_now_s() - t_open,
                    n_params);
        AnomalyStepContext sc = {.model = &model, .data = &data};
        TrainerConfig tc = trainer_default_config();
        tc.accum = (int)o.accum;
        tc.micro_per_sample = anomaly_micro_per_sample(&data);
        tc.total_updates = o.steps;
        tc.ckpt_every = (int)o.ckpt_every;
        tc.schedule = (WarmupDecayConfig){.warmup_min_lr = 0, .warmup_max_lr = o.lr, .warmup_num_steps = o.warmup,
                                          .total_num_steps = o.steps, .warmup_type = WARMUP_LOG, .optimizer_lr = o.lr};
        tc.dir = o.out;
        tc.config_text = cfg_text;
        tc.resume = o.resume;
        tc.loader = (LoaderConfig){.n_items = data.n_items, .sample_bytes = sizeof(AnomalySample),
                                   .threads = (int)o.loader_threads, .seed = (uint64_t)o.seed, .rank = 0, .world = 1,
                                   .make_sample = anomaly_make_sample, .ctx = &data};
        tc.stop = &stop_requested;
        tc.comm = &comm;
        tc.zero = (int)o.zero;
        Progress prog = {.t0 = timer_now_s(), .first = -1, .tty = isatty(2), .val = &val, .val_every = o.val_every};
        tc.on_update = on_update;
        tc.on_update_ctx = &prog;
        struct sigaction sa = {.sa_handler = on_sigint};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        s = trainer_run(&eng, &tc, params, n_params, anomaly_step, &sc, &res);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
    }
    if (s == AGPT_OK && lead)
        fprintf(stderr, "agpt train: %s after %lld updates (last loss %.4f); %s/delta.safetensors: layer it with "
                "agpt detect --weights; --resume %s continues\n", res.stopped ? "stopped" : "done",
                (long long)res.updates, res.last_loss, o.out, o.out);
    free(tt), free(params);
    free(cfg_text);
    validation_free(&val);
    anomaly_data_free(&data);
    anomaly_train_close(&model);
    engine_destroy(&eng);
    set_free(&set);
    return report_and_finalize(&comm, s);
}
