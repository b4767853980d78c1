#include "train/synth.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/metrics.h"
#include "train/seamless_clone.h"

// ---- the per-class table (mvtec.py, visa.py) ---------------------------------------------------------------

typedef struct ClassRow {
    const char *name;
    double w1lo, w1hi, w2lo, w2hi, k, x0;
    double bg_brightness, bg_threshold;  // < 0: no background skip
    int texture;                         // resize_bounds (0.5, 2) instead of (0.7, 1.3)
    const char *description;
} ClassRow;

#define NO_BG -1, -1
#define TAIL "without any damage, flaw, defect, scratch, hole or broken part."
static const ClassRow class_table[] = {
    {"bottle", 0.03, 0.4, 0.03, 0.4, 1.0 / 12, 24, 200, 60, 0,
     "This is a photo of a bottle for anomaly detection, which should be round, " TAIL},
    {"cable", 0.05, 0.4, 0.05, 0.4, 1.0 / 12, 24, NO_BG, 0,
     "This is a photo of three cables for anomaly detection, they are green, blue and grey, which cannot be missed "
     "or swapped and should be " TAIL},
    {"capsule", 0.03, 0.15, 0.03, 0.4, 1.0 / 2, 4, 200, 60, 0,
     "This is a photo of a capsule for anomaly detection, which should be black and orange, with print '500', " TAIL},
    {"carpet", 0.03, 0.4, 0.03, 0.4, 1.0 / 3, 7, NO_BG, 1,
     "This is a photo of carpet for anomaly detection, which should be " TAIL},
    {"grid", 0.03, 0.4, 0.03, 0.4, 1.0 / 3, 7, NO_BG, 1,
     "This is a photo of grid for anomaly detection, which should be " TAIL},
    {"hazelnut", 0.03, 0.35, 0.03, 0.35, 1.0 / 12, 24, 20, 20, 0,
     "This is a photo of a hazelnut for anomaly detection, which should be " TAIL},
    {"leather", 0.03, 0.4, 0.03, 0.4, 1.0 / 3, 7, NO_BG, 1,
     "This is a photo of leather for anomaly detection, which should be brown and " TAIL},
    {"metal_nut", 0.03, 0.4, 0.03, 0.4, 1.0 / 3, 7, 20, 20, 0,
     "This is a photo of a metal nut for anomaly detection, which should be without any damage, flaw, defect, "
     "scratch, hole or broken part, and shouldn't be fliped."},
    {"pill", 0.03, 0.2, 0.03, 0.4, 1.0 / 3, 7, 20, 20, 0,
     "This is a photo of a pill for anomaly detection, which should be white, with print 'FF' and red patterns, " TAIL},
    {"screw", 0.03, 0.12, 0.03, 0.12, 1, 3, 200, 60, 0,
     "This is a photo of a screw for anomaly detection, which tail should be sharp, and " TAIL},
    {"tile", 0.03, 0.4, 0.03, 0.4, 1.0 / 3, 7, NO_BG, 1,
     "This is a photo of tile for anomaly detection, which should be " TAIL},
    {"toothbrush", 0.03, 0.4, 0.03, 0.2, 1.0 / 6, 15, 20, 20, 0,
     "This is a photo of a toothbrush for anomaly detection, which should be " TAIL},
    {"transistor", 0.03, 0.4, 0.03, 0.4, 1.0 / 6, 15, NO_BG, 0,
     "This is a photo of a transistor for anomaly detection, which should be " TAIL},
    {"wood", 0.03, 0.4, 0.03, 0.4, 1.0 / 6, 15, NO_BG, 1,
     "This is a photo of wood for anomaly detection, which should be brown with patterns, " TAIL},
    {"zipper", 0.03, 0.4, 0.03, 0.2, 1.0 / 6, 15, 200, 60, 0,
     "This is a photo of a zipper for anomaly detection, which should be " TAIL},
    // VisA: one setting for every class (visa.py), resize_bounds (0.5, 2) for all.
#define VISA(name, text) {name, 0.03, 0.4, 0.03, 0.4, 1.0 / 12, 24, NO_BG, 1, text}
    VISA("candle", "This is a photo of 4 candles for anomaly detection, every candle should be round, " TAIL),
    VISA("capsules", "This is a photo of many small capsules for anomaly detection, every capsule is green, should be "
                     TAIL),
    VISA("cashew", "This is a photo of a cashew for anomaly detection, which should be " TAIL),
    VISA("chewinggum", "This is a photo of a chewinggom for anomaly detection, which should be white, " TAIL),
    VISA("fryum", "This is a photo of a fryum for anomaly detection on green background, which should be " TAIL),
    VISA("macaroni1", "This is a photo of 4 macaronis for anomaly detection, which should be " TAIL),
    VISA("macaroni2", "This is a photo of 4 macaronis for anomaly detection, which should be " TAIL),
    VISA("pcb1", "This is a photo of pcb for anomaly detection, which should be " TAIL),
    VISA("pcb2", "This is a photo of pcb for anomaly detection, which should be " TAIL),
    VISA("pcb3", "This is a photo of pcb for anomaly detection, which should be " TAIL),
    VISA("pcb4", "This is a photo of pcb for anomaly detection, which should be " TAIL),
    VISA("pipe_fryum", "This is a photo of a pipe fryum for anomaly detection, which should be " TAIL),
#undef VISA
};

Status synth_params_for_class(const char *class_name, SynthParams *out, int *known) {
    AGPT_CHECK_ARG(class_name && *class_name && out, "synth_params_for_class: empty class name");
    AGPT_CHECK_ARG(strlen(class_name) < 200, "synth_params_for_class: class name longer than 200 bytes");
    const ClassRow *row = NULL;
    for (size_t i = 0; i < sizeof class_table / sizeof class_table[0]; i++)
        if (strcmp(class_table[i].name, class_name) == 0) row = &class_table[i];
    // A custom class: the VisA setting, which assumes nothing about the background.
    ClassRow custom = {class_name, 0.03, 0.4, 0.03, 0.4, 1.0 / 12, 24, NO_BG, 1, NULL};
    if (known) *known = row != NULL;
    if (!row) row = &custom;
    memset(out, 0, sizeof *out);
    out->width_lo[0] = row->w1lo, out->width_hi[0] = row->w1hi;
    out->width_lo[1] = row->w2lo, out->width_hi[1] = row->w2hi;
    out->logistic_k = row->k, out->logistic_x0 = row->x0;
    out->skip_background = row->bg_brightness >= 0;
    out->bg_brightness = row->bg_brightness, out->bg_threshold = row->bg_threshold;
    out->resize_lo = row->texture ? 0.5 : 0.7, out->resize_hi = row->texture ? 2.0 : 1.3;
    out->num_patches = 2;
    out->min_object_pct = 0, out->min_overlap_pct = 0.25;
    out->gamma_shape = 2, out->gamma_scale = 0.05, out->gamma_offset = 0.03;
    if (row->description)
        snprintf(out->description, sizeof out->description, "%s", row->description);
    else
        snprintf(out->description, sizeof out->description,
                 "This is a photo of %s for anomaly detection, which should be " TAIL, class_name);
    return AGPT_OK;
}
#undef NO_BG
#undef TAIL

Status synth_params_validate(const SynthParams *p) {
    for (int d = 0; d < 2; d++)
        AGPT_CHECK_ARG(p->width_lo[d] > 0 && p->width_lo[d] <= p->width_hi[d] && p->width_hi[d] <= 0.5,
                       "synth params: width_bounds_pct[%d] = (%g, %g) must satisfy 0 < lo <= hi <= 0.5", d,
                       p->width_lo[d], p->width_hi[d]);
    AGPT_CHECK_ARG(isfinite(p->logistic_k) && isfinite(p->logistic_x0) && p->logistic_k > 0,
                   "synth params: intensity_logistic_params (%g, %g) need k > 0", p->logistic_k, p->logistic_x0);
    AGPT_CHECK_ARG(p->resize_lo > 0 && p->resize_lo <= p->resize_hi && p->resize_hi <= 10,
                   "synth params: resize_bounds (%g, %g) must satisfy 0 < lo <= hi <= 10", p->resize_lo, p->resize_hi);
    AGPT_CHECK_ARG(p->num_patches >= 1 && p->num_patches <= SYNTH_MAX_PATCHES,
                   "synth params: num_patches %d must be 1 or 2 (the answer templates know one or two regions)",
                   p->num_patches);
    AGPT_CHECK_ARG(p->min_object_pct >= 0 && p->min_object_pct < 1 && p->min_overlap_pct >= 0 &&
                       p->min_overlap_pct < 1,
                   "synth params: min_object_pct %g and min_overlap_pct %g must be in [0, 1)", p->min_object_pct,
                   p->min_overlap_pct);
    AGPT_CHECK_ARG(p->gamma_shape > 0 && p->gamma_scale > 0 && p->gamma_offset >= 0 && p->gamma_offset < 1,
                   "synth params: gamma_params (%g, %g, %g) need shape > 0, scale > 0, 0 <= offset < 1",
                   p->gamma_shape, p->gamma_scale, p->gamma_offset);
    AGPT_CHECK_ARG(!p->skip_background || (isfinite(p->bg_brightness) && p->bg_threshold >= 0),
                   "synth params: skip_background (%g, %g) needs a threshold >= 0", p->bg_brightness,
                   p->bg_threshold);
    AGPT_CHECK_ARG(memchr(p->description, 0, sizeof p->description) && p->description[0],
                   "synth params: empty description");
    return AGPT_OK;
}

// Reads a JSON array of n finite numbers into v.
static Status json_numbers(const cJSON *a, const char *key, int n, double *v) {
    AGPT_CHECK_ARG(cJSON_IsArray(a) && cJSON_GetArraySize(a) == n, "synth params: \"%s\" must be an array of %d numbers",
                   key, n);
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(a, i);
        AGPT_CHECK_ARG(cJSON_IsNumber(e) && isfinite(e->valuedouble), "synth params: \"%s\"[%d] is not a number", key,
                       i);
        v[i] = e->valuedouble;
    }
    return AGPT_OK;
}

Status synth_params_from_json(const char *json_text, SynthParams *params) {
    AGPT_CHECK_ARG(json_text && params, "synth_params_from_json: NULL argument");
    cJSON *root = cJSON_Parse(json_text);
    if (!root) return AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: not valid JSON (near '%.20s')", cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() : "");
    SynthParams p = *params;
    Status s = AGPT_OK;
    if (!cJSON_IsObject(root)) s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: the file must hold one JSON object");
    for (const cJSON *it = cJSON_IsObject(root) ? root->child : NULL; it && s == AGPT_OK; it = it->next) {
        const char *k = it->string;
        double v[4];
        if (!strcmp(k, "width_bounds_pct")) {
            if (!(cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2)) {
                s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: \"width_bounds_pct\" must be [[lo1, hi1], [lo2, hi2]]");
                break;
            }
            for (int d = 0; d < 2 && s == AGPT_OK; d++)
                if ((s = json_numbers(cJSON_GetArrayItem(it, d), k, 2, v)) == AGPT_OK)
                    p.width_lo[d] = v[0], p.width_hi[d] = v[1];
        } else if (!strcmp(k, "intensity_logistic_params")) {
            if ((s = json_numbers(it, k, 2, v)) == AGPT_OK) p.logistic_k = v[0], p.logistic_x0 = v[1];
        } else if (!strcmp(k, "skip_background")) {
            if (cJSON_IsNull(it)) p.skip_background = 0;
            else if ((s = json_numbers(it, k, 2, v)) == AGPT_OK)
                p.skip_background = 1, p.bg_brightness = v[0], p.bg_threshold = v[1];
        } else if (!strcmp(k, "resize_bounds")) {
            if ((s = json_numbers(it, k, 2, v)) == AGPT_OK) p.resize_lo = v[0], p.resize_hi = v[1];
        } else if (!strcmp(k, "gamma_params")) {
            if ((s = json_numbers(it, k, 3, v)) == AGPT_OK) p.gamma_shape = v[0], p.gamma_scale = v[1], p.gamma_offset = v[2];
        } else if (!strcmp(k, "num_patches") || !strcmp(k, "min_object_pct") || !strcmp(k, "min_overlap_pct")) {
            if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble)) {
                s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: \"%s\" must be a number", k);
            } else if (!strcmp(k, "num_patches")) {
                if (it->valuedouble != 1 && it->valuedouble != 2)
                    s = AGPT_FAIL(AGPT_ERR_ARG, "synth params: \"num_patches\" must be 1 or 2, not %g", it->valuedouble);
                else
                    p.num_patches = (int)it->valuedouble;
            } else if (!strcmp(k, "min_object_pct")) {
                p.min_object_pct = it->valuedouble;
            } else {
                p.min_overlap_pct = it->valuedouble;
            }
        } else if (!strcmp(k, "cutpaste")) {
            if (!cJSON_IsBool(it)) s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: \"cutpaste\" must be true or false");
            else p.cutpaste = cJSON_IsTrue(it);
        } else if (!strcmp(k, "perlin")) {
            if (!cJSON_IsBool(it)) s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: \"perlin\" must be true or false");
            else p.perlin = cJSON_IsTrue(it);
        } else if (!strcmp(k, "blend")) {
            if (!cJSON_IsString(it) || (strcmp(it->valuestring, "poisson") && strcmp(it->valuestring, "paste")))
                s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: \"blend\" must be \"poisson\" or \"paste\"");
            else
                p.paste = !strcmp(it->valuestring, "paste");
        } else if (!strcmp(k, "description")) {
            if (!cJSON_IsString(it) || !it->valuestring[0] || strlen(it->valuestring) >= SYNTH_DESCRIPTION_MAX)
                s = AGPT_FAIL(AGPT_ERR_FORMAT, "synth params: \"description\" must be a non-empty string under %d bytes",
                              SYNTH_DESCRIPTION_MAX);
            else
                snprintf(p.description, sizeof p.description, "%s", it->valuestring);
        } else {
            s = AGPT_FAIL(AGPT_ERR_FORMAT,
                          "synth params: unknown key \"%s\" (known: width_bounds_pct, intensity_logistic_params, "
                          "skip_background, resize_bounds, num_patches, min_object_pct, min_overlap_pct, gamma_params, "
                          "description, cutpaste, blend, perlin)",
                          k);
        }
    }
    cJSON_Delete(root);
    if (s == AGPT_OK) s = synth_params_validate(&p);
    if (s == AGPT_OK) *params = p;
    return s;
}

Status synth_params_load_json(const char *path, SynthParams *params) {
    FILE *f = fopen(path, "rb");
    if (!f) return AGPT_FAIL(AGPT_ERR_IO, "cannot open synth params file '%s'", path);
    char *buf = malloc(1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    int too_big = buf && n == (1 << 20) - 1 && fgetc(f) != EOF;
    fclose(f);
    if (!buf) return AGPT_FAIL(AGPT_ERR_OOM, "no memory to read '%s'", path);
    if (too_big) {
        free(buf);
        return AGPT_FAIL(AGPT_ERR_FORMAT, "synth params file '%s' is over 1 MB", path);
    }
    buf[n] = 0;
    Status s = synth_params_from_json(buf, params);
    free(buf);
    return s == AGPT_OK ? s : agpt_add_context(s, "while reading '%s'", path);
}

// ---- draws ---------------------------------------------------------------------------------------------------

void synth_draws_for_sample(uint64_t seed, uint64_t index, Rng *r, SynthDraws *d) {
    // Two splitmix rounds (inside rng_seed) over a mix of both numbers: nearby (seed, index) pairs give
    // unrelated streams.
    rng_seed(r, seed ^ (0xD1B54A32D192ED03ull * (index + 1)));
    rng_u64(r);
    memset(d, 0, sizeof *d);
    d->rng = r;
}

static double uniform_open0(Rng *r) { return ((double)(rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0); }

// The next recorded value of the given kind, or an error naming the mismatch.
static Status tape_next(SynthDraws *d, int kind, double *v) {
    if (d->pos >= d->tape_len)
        return AGPT_FAIL(AGPT_ERR_ARG, "synth draws: the tape ran out after %d draws", d->tape_len);
    if (d->tape_kind[d->pos] != kind)
        return AGPT_FAIL(AGPT_ERR_ARG, "synth draws: draw %d is of kind %d on the tape, the algorithm asks kind %d",
                         d->pos, d->tape_kind[d->pos], kind);
    *v = d->tape_value[d->pos++];
    return AGPT_OK;
}

// np.random.randint(lo, hi): uniform integer in [lo, hi).
static Status draw_randint(SynthDraws *d, int lo, int hi, int *out) {
    AGPT_CHECK_ARG(hi > lo, "synth draws: empty range [%d, %d)", lo, hi);
    if (d->rng) {
        *out = lo + (int)(rng_u64(d->rng) % (uint64_t)(hi - lo));
        return AGPT_OK;
    }
    double v = 0;
    AGPT_TRY(tape_next(d, SYNTH_DRAW_RANDINT, &v));
    AGPT_CHECK_ARG(v == floor(v) && v >= lo && v < hi, "synth draws: draw %d = %g is outside [%d, %d)", d->pos - 1, v,
                   lo, hi);
    *out = (int)v;
    return AGPT_OK;
}

// np.random.gamma(shape, scale). Live draws use Marsaglia-Tsang (exact for shape >= 1; boosted below 1).
static Status draw_gamma(SynthDraws *d, double shape, double scale, double *out) {
    if (!d->rng) return tape_next(d, SYNTH_DRAW_GAMMA, out);
    double a = shape < 1 ? shape + 1 : shape, dd = a - 1.0 / 3, c = 1 / sqrt(9 * dd), x, v;
    for (;;) {
        do {
            x = rng_normal(d->rng);
            v = 1 + c * x;
        } while (v <= 0);
        v = v * v * v;
        double u = uniform_open0(d->rng);
        if (log(u) < 0.5 * x * x + dd - dd * v + dd * log(v)) break;
    }
    double g = dd * v;
    if (shape < 1) g *= pow(uniform_open0(d->rng), 1 / shape);
    *out = g * scale;
    return AGPT_OK;
}

// np.random.uniform(lo, hi).
static Status draw_uniform(SynthDraws *d, double lo, double hi, double *out) {
    if (!d->rng) return tape_next(d, SYNTH_DRAW_UNIFORM, out);
    *out = lo + (hi - lo) * ((double)(rng_u64(d->rng) >> 11) * (1.0 / 9007199254740992.0));
    return AGPT_OK;
}

// np.random.normal(mean, std).
static Status draw_normal(SynthDraws *d, double mean, double std, double *out) {
    if (!d->rng) return tape_next(d, SYNTH_DRAW_NORMAL, out);
    *out = mean + std * rng_normal(d->rng);
    return AGPT_OK;
}

// ---- samples ---------------------------------------------------------------------------------------------

Status synth_sample_alloc(int height, int width, SynthSample *s) {
    memset(s, 0, sizeof *s);
    AGPT_CHECK_ARG(height >= 8 && width >= 8 && height <= 8192 && width <= 8192,
                   "synth_sample_alloc: size %dx%d outside [8, 8192]", width, height);
    size_t hw = (size_t)height * width;
    s->height = height, s->width = width;
    s->image = malloc(hw * 3), s->mask = malloc(hw), s->label = malloc(hw * sizeof(float));
    if (!s->image || !s->mask || !s->label) {
        synth_sample_free(s);
        return AGPT_FAIL(AGPT_ERR_OOM, "synth_sample_alloc: no memory for %dx%d", width, height);
    }
    return AGPT_OK;
}

void synth_sample_free(SynthSample *s) {
    free(s->image), free(s->mask), free(s->label);
    memset(s, 0, sizeof *s);
}

Status synth_object_mask(const uint8_t *rgb, int h, int w, double brightness, double threshold, uint8_t *dst) {
    size_t hw = (size_t)h * w;
    uint8_t *raw = malloc(hw);
    if (!raw) return AGPT_FAIL(AGPT_ERR_OOM, "synth_object_mask: no memory");
    for (size_t i = 0; i < hw; i++) {
        double mean = ((double)rgb[3 * i] + rgb[3 * i + 1] + rgb[3 * i + 2]) / 3.0;
        raw[i] = fabs(mean - brightness) > threshold;
    }
    Status s = median_binary(raw, h, w, 7, dst);  // "remove grain from threshold choice"
    free(raw);
    return s;
}

// |a - b| summed over the three channels of pixel i.
static int absdiff3(const uint8_t *a, const uint8_t *b, size_t i) {
    return abs(a[3 * i] - b[3 * i]) + abs(a[3 * i + 1] - b[3 * i + 1]) + abs(a[3 * i + 2] - b[3 * i + 2]);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

Status synth_label(const uint8_t *dest, const uint8_t *out, const uint8_t *mask, int h, int w, double k, double x0,
                   float *label) {
    AGPT_CHECK_ARG(dest && out && mask && label && h > 0 && w > 0, "synth_label: bad arguments");
    size_t hw = (size_t)h * w;
    uint8_t *raw = malloc(hw), *lm = malloc(hw);
    double *inten = malloc(hw * sizeof(double));
    if (!raw || !lm || !inten) {
        free(raw), free(lm), free(inten);
        return AGPT_FAIL(AGPT_ERR_OOM, "synth_label: no memory");
    }
    // mean_c > tol = 1  <=>  the channel sum > 3 (integers)
    for (size_t i = 0; i < hw; i++) raw[i] = mask[i] && absdiff3(dest, out, i) > 3;
    Status s = median_binary(raw, h, w, 5, lm);
    for (size_t i = 0; i < hw && s == AGPT_OK; i++) inten[i] = lm[i] ? absdiff3(dest, out, i) / 3.0 : 0.0;
    // The disk(5) footprint: 81 offsets with dy^2 + dx^2 <= 25.
    int off[81][2], n_off = 0;
    for (int dy = -5; dy <= 5; dy++)
        for (int dx = -5; dx <= 5; dx++)
            if (dy * dy + dx * dx <= 25) off[n_off][0] = dy, off[n_off][1] = dx, n_off++;
    double window[81];
    for (int y = 0; y < h && s == AGPT_OK; y++)
        for (int x = 0; x < w; x++) {
            size_t i = (size_t)y * w + x;
            if (!lm[i]) {  // label_mask multiplies the logistic: 0 wherever it is 0
                label[i] = 0;
                continue;
            }
            for (int t = 0; t < n_off; t++) {
                int yy = y + off[t][0], xx = x + off[t][1];
                yy = yy < 0 ? 0 : yy >= h ? h - 1 : yy;
                xx = xx < 0 ? 0 : xx >= w ? w - 1 : xx;
                window[t] = inten[(size_t)yy * w + xx];
            }
            qsort(window, (size_t)n_off, sizeof(double), cmp_double);
            double med = window[n_off / 2];
            label[i] = (float)(1.0 / (1.0 + exp(-k * (med - x0))));
        }
    free(raw), free(lm), free(inten);
    return s;
}

// ---- patch_ex --------------------------------------------------------------------------------------------

static double clipd(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; }
static int clipi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

// The working state of one patch_ex call.
typedef struct PatchCtx {
    int H, W;
    const uint8_t *src;           // [H][W][3]
    const uint8_t *src_obj;       // [H][W] 0/1, or NULL without background skip
    const uint8_t *dest_obj;      // [H][W] 0/1, or NULL
    const SynthParams *p;
    SynthDraws *draws;
} PatchCtx;

// The source box of a patch (half-widths pw1, pw2): a uniform centre; with a background, the box must hold
// enough object. *y1 = -1 when 200 tries found none.
static Status find_source_box(const PatchCtx *c, int minw1, int minw2, int pw1, int pw2, int *y0, int *y1, int *x0,
                              int *x1) {
    const int H = c->H, W = c->W;
    for (int attempts = 0;;) {
        int cy, cx;
        AGPT_TRY(draw_randint(c->draws, minw1, H - minw1, &cy));
        AGPT_TRY(draw_randint(c->draws, minw2, W - minw2, &cx));
        *y0 = clipi(cy - pw1, 0, H), *y1 = clipi(cy + pw1, 0, H);
        *x0 = clipi(cx - pw2, 0, W), *x1 = clipi(cx + pw2, 0, W);
        int found = 1;
        if (c->src_obj) {
            long obj = 0, area = (long)(*y1 - *y0) * (*x1 - *x0);
            for (int y = *y0; y < *y1; y++)
                for (int x = *x0; x < *x1; x++) obj += c->src_obj[(size_t)y * W + x];
            found = area > 0 && (double)obj / (double)area > c->p->min_object_pct;
        }
        // The reference counts the attempt before looking at the result: the 200th try fails even when it fits.
        if (++attempts == 200) {
            *y1 = -1;
            return AGPT_OK;
        }
        if (found) return AGPT_OK;
    }
}

// CutPaste's box (patch_ex's cutpaste_patch_generation): area ratio in (0.02, 0.15) (quartered: half-widths),
// aspect ratio either side of 1, inside the image; both sides measured on dims[0], as patch_ex does.
static Status cutpaste_box(const PatchCtx *c, int *y0, int *y1, int *x0, int *x1) {
    const int H = c->H, W = c->W;
    double area = 0, aspect = 1;
    int coin = 0, cy = 0, cx = 0;
    AGPT_TRY(draw_uniform(c->draws, 0.02, 0.15, &area));
    area /= 4.0;
    AGPT_TRY(draw_randint(c->draws, 0, 2, &coin));
    AGPT_TRY(draw_uniform(c->draws, coin > 0 ? 0.3 : 1.0, coin > 0 ? 1.0 : 3.3, &aspect));
    int pw1 = (int)nearbyint(clipd(sqrt(area * aspect * H * H), 0, H));
    AGPT_CHECK_ARG(pw1 > 0 && 2 * pw1 < H, "synth: cutpaste half-height %d does not fit %d rows", pw1, H);
    int pw2 = (int)nearbyint(clipd(area * H * H / pw1, 0, W));
    AGPT_CHECK_ARG(2 * pw2 < W, "synth: cutpaste half-width %d does not fit %d columns", pw2, W);
    AGPT_TRY(draw_randint(c->draws, pw1, H - pw1, &cy));
    AGPT_TRY(draw_randint(c->draws, pw2, W - pw2, &cx));
    *y0 = clipi(cy - pw1, 0, H), *y1 = clipi(cy + pw1, 0, H);
    *x0 = clipi(cx - pw2, 0, W), *x1 = clipi(cx + pw2, 0, W);
    return AGPT_OK;
}

// One _patch_ex: blends a patch into img (in place) and writes its box and patch mask [box h][box w] (malloc'd
// into *pmask). *pasted = 0 when no place was found or the mask is too small (img unchanged).
static Status patch_one(const PatchCtx *c, uint8_t *img, int box[4], uint8_t **pmask, int *pasted) {
    const int H = c->H, W = c->W;
    const SynthParams *p = c->p;
    const int skip_bg = c->src_obj != NULL;
    *pasted = 0, *pmask = NULL;
    // numpy's round is half to even, as nearbyint in the default rounding mode.
    int minw1 = (int)nearbyint(p->width_lo[0] * H), maxw1 = (int)nearbyint(p->width_hi[0] * H);
    int minw2 = (int)nearbyint(p->width_lo[1] * W), maxw2 = (int)nearbyint(p->width_hi[1] * W);
    int sy0 = 0, sy1 = 0, sx0 = 0, sx1 = 0;
    if (p->cutpaste) {
        AGPT_TRY(cutpaste_box(c, &sy0, &sy1, &sx0, &sx1));
    } else {
        double g1 = 0, g2 = 0;
        AGPT_TRY(draw_gamma(c->draws, p->gamma_shape, p->gamma_scale, &g1));
        AGPT_TRY(draw_gamma(c->draws, p->gamma_shape, p->gamma_scale, &g2));
        int pw1 = (int)clipd((p->gamma_offset + g1) * H, minw1, maxw1);
        int pw2 = (int)clipd((p->gamma_offset + g2) * W, minw2, maxw2);
        AGPT_TRY(find_source_box(c, minw1, minw2, pw1, pw2, &sy0, &sy1, &sx0, &sx1));
        if (sy1 < 0) return AGPT_OK;
    }
    int height = sy1 - sy0, width = sx1 - sx0;
    if (height <= 0 || width <= 0) return AGPT_OK;  // only on tiny images, where the reference raises

    // Rescale, keeping the aspect ratio inside the width bounds (numpy's float clip, then int truncations);
    // CutPaste keeps the size.
    int new_h = height, new_w = width;
    if (!p->cutpaste) {
        double scale = 1;
        AGPT_TRY(draw_normal(c->draws, 1.0, 0.5, &scale));
        scale = clipd(scale, p->resize_lo, p->resize_hi);
        double nh = clipd(scale * height, minw1, maxw1);
        new_w = clipi((int)(nh / height * width), minw2, maxw2);
        new_h = clipi((int)((double)new_w / width * height), minw1, maxw1);
    }
    size_t n_old = (size_t)height * width, n_new = (size_t)new_h * new_w;
    uint8_t *patch = malloc(n_old * 3), *rpatch = malloc(n_new * 3), *pm = malloc(n_new), *clone_mask = malloc(n_new);
    uint8_t *sobj = skip_bg ? malloc(n_old) : NULL, *robj = skip_bg ? malloc(n_new) : NULL;
    Status s = AGPT_OK;
    if (!patch || !rpatch || !pm || !clone_mask || (skip_bg && (!sobj || !robj)))
        s = AGPT_FAIL(AGPT_ERR_OOM, "synth: no memory for a %dx%d patch", new_w, new_h);
    if (s == AGPT_OK) {
        for (int y = 0; y < height; y++)
            memcpy(patch + (size_t)y * width * 3, c->src + ((size_t)(sy0 + y) * W + sx0) * 3, (size_t)width * 3);
        s = resize_linear(patch, height, width, 3, rpatch, new_h, new_w);  // the same bytes when the size stays
    }
    if (s == AGPT_OK && skip_bg) {
        for (int y = 0; y < height; y++) memcpy(sobj + (size_t)y * width, c->src_obj + (size_t)(sy0 + y) * W + sx0, width);
        s = resize_linear(sobj, height, width, 1, robj, new_h, new_w);
    }
    height = new_h, width = new_w;
    if (pm) memset(pm, 1, n_new);  // the patch mask is all ones (a resize of ones stays ones)

    // Destination centre; with a background, the object must overlap the destination's object.
    int dy0 = 0, dy1 = 0, dx0 = 0, dx1 = 0, ok = 0;
    // A patch that cannot be placed at all (np.random.randint raises there) is a patch not pasted.
    int placeable = H - height / 2 - 1 > height / 2 + 1 && W - width / 2 - 1 > width / 2 + 1;
    for (int attempts = 0; s == AGPT_OK && placeable;) {
        int cy, cx;
        if ((s = draw_randint(c->draws, height / 2 + 1, H - height / 2 - 1, &cy)) != AGPT_OK) break;
        if ((s = draw_randint(c->draws, width / 2 + 1, W - width / 2 - 1, &cx)) != AGPT_OK) break;
        dy0 = cy - height / 2, dy1 = cy + (height + 1) / 2;
        dx0 = cx - width / 2, dx1 = cx + (width + 1) / 2;
        int found = 1;
        if (skip_bg) {
            long src_obj = 0, both = 0;
            for (int y = 0; y < height; y++)
                for (int x = 0; x < width; x++) {
                    int so = robj[(size_t)y * width + x];
                    src_obj += so;
                    both += so && c->dest_obj[(size_t)(dy0 + y) * W + dx0 + x];
                }
            found = (double)src_obj / ((double)height * width) > p->min_object_pct &&
                    (double)both / (double)src_obj > p->min_overlap_pct;
        }
        if (++attempts == 200) break;
        if (found) {
            ok = 1;
            break;
        }
    }
    if (s == AGPT_OK && ok) {
        // The label's patch mask keeps object pixels; the clone mask adds background over background so the
        // blend has no hole there ("add background to patchmask to avoid artefacts").
        int area = 0;
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++) {
                size_t i = (size_t)y * width + x;
                int v = 1;
                if (skip_bg) {
                    int so = robj[i], dob = c->dest_obj[(size_t)(dy0 + y) * W + dx0 + x];
                    pm[i] = so || dob;
                    v = pm[i] || (!so && !dob);
                }
                int border = y == 0 || x == 0 || y == height - 1 || x == width - 1;
                clone_mask[i] = v && !border ? 255 : 0;
                area += clone_mask[i] > 0;
            }
        if (area >= 50) {  // cv2 seamlessClone fails on tiny masks
            int cx = dx1 - (dx1 - dx0) / 2, cy = dy0 + (dy1 - dy0) / 2;
            Status cs = AGPT_OK;
            if (p->paste) {  // the clone mask's pixels of the patch, copied into the destination box
                for (int y = 0; y < height; y++)
                    for (int x = 0; x < width; x++)
                        if (clone_mask[(size_t)y * width + x])
                            memcpy(img + ((size_t)(dy0 + y) * W + dx0 + x) * 3, rpatch + ((size_t)y * width + x) * 3, 3);
            } else {
                cs = seamless_clone(rpatch, height, width, img, H, W, clone_mask, cx, cy, img);
            }
            if (cs == AGPT_OK) {
                *pasted = 1;
                box[0] = dy0, box[1] = dy1, box[2] = dx0, box[3] = dx1;
            } else if (cs != AGPT_ERR_ARG) {
                s = cs;  // out of memory is an error; a bad region is the reference's "bad interpolation mask"
            }
        }
    }
    free(patch), free(rpatch), free(sobj), free(robj), free(clone_mask);
    if (*pasted) *pmask = pm;
    else free(pm);
    return s;
}

Status synth_patch_ex(const uint8_t *dest, const uint8_t *src, const SynthParams *p, SynthDraws *draws,
                      SynthSample *out) {
    AGPT_CHECK_ARG(dest && src && p && draws && out && out->image, "synth_patch_ex: NULL argument");
    AGPT_TRY(synth_params_validate(p));
    if (p->perlin) return synth_perlin(dest, src, draws, out);
    const int H = out->height, W = out->width;
    size_t hw = (size_t)H * W;
    memcpy(out->image, dest, hw * 3);
    memset(out->mask, 0, hw);
    out->n_patches = 0;
    uint8_t *src_obj = NULL, *dest_obj = NULL;
    Status s = AGPT_OK;
    if (p->skip_background && !p->cutpaste) {
        src_obj = malloc(hw), dest_obj = malloc(hw);
        if (!src_obj || !dest_obj) s = AGPT_FAIL(AGPT_ERR_OOM, "synth: no memory for object masks");
        if (s == AGPT_OK) s = synth_object_mask(src, H, W, p->bg_brightness, p->bg_threshold, src_obj);
        if (s == AGPT_OK) s = synth_object_mask(dest, H, W, p->bg_brightness, p->bg_threshold, dest_obj);
    }
    PatchCtx ctx = {H, W, src, src_obj, dest_obj, p, draws};
    // The union bounding box starts empty: (H - 1, 0, W - 1, 0) as in the reference.
    int u0 = H - 1, u1 = 0, v0 = W - 1, v1 = 0;
    const int num_patches = p->cutpaste ? 1 : p->num_patches;
    for (int i = 0; i < num_patches && s == AGPT_OK; i++) {
        if (i > 0) {
            int coin;
            if ((s = draw_randint(draws, 0, 2, &coin)) != AGPT_OK || coin == 0) continue;
        }
        int box[4], pasted;
        uint8_t *pm;
        if ((s = patch_one(&ctx, out->image, box, &pm, &pasted)) != AGPT_OK || !pasted) continue;
        int bw = box[3] - box[2];
        for (int y = box[0]; y < box[1]; y++) memcpy(out->mask + (size_t)y * W + box[2], pm + (size_t)(y - box[0]) * bw, bw);
        free(pm);
        u0 = box[0] < u0 ? box[0] : u0, u1 = box[1] > u1 ? box[1] : u1;
        v0 = box[2] < v0 ? box[2] : v0, v1 = box[3] > v1 ? box[3] : v1;
        int k = out->n_patches++;
        memcpy(out->box[k], box, sizeof box);
        out->center[k][0] = (u0 + u1) / 2.0, out->center[k][1] = (v0 + v1) / 2.0;
    }
    free(src_obj), free(dest_obj);
    if (s == AGPT_OK) s = synth_label(dest, out->image, out->mask, H, W, p->logistic_k, p->logistic_x0, out->label);
    return s;
}

// ---- DRAEM's Perlin-noise anomalies ------------------------------------------------------------------------

#define SYNTH_PI 3.14159265358979323846

static double fade(double t) { return ((6 * t - 15) * t + 10) * t * t * t; }
static double lerp(double a, double b, double w) { return (b - a) * w + a; }

Status synth_perlin_noise(int h, int w, int res_y, int res_x, const double *angles, double *out) {
    AGPT_CHECK_ARG(h > 0 && w > 0 && res_y > 0 && res_x > 0 && h % res_y == 0 && w % res_x == 0 && angles && out,
                   "synth_perlin_noise: %d x %d pixels in %d x %d cells (the sides must divide)", h, w, res_y, res_x);
    const int dy = h / res_y, dx = w / res_x;
    const double step_y = (double)res_y / h, step_x = (double)res_x / w;  // np.mgrid's steps
    for (int i = 0; i < h; i++) {
        int ci = i / dy;
        double u = fmod(i * step_y, 1.0), fu = fade(u);
        for (int j = 0; j < w; j++) {
            int cj = j / dx;
            double v = fmod(j * step_x, 1.0), fv = fade(v);
            const double *a = angles + (size_t)ci * (res_x + 1) + cj;  // corners (ci, cj), (ci+1, cj), ...
            double n00 = cos(a[0]) * u + sin(a[0]) * v;
            double n10 = cos(a[res_x + 1]) * (u - 1) + sin(a[res_x + 1]) * v;
            double n01 = cos(a[1]) * u + sin(a[1]) * (v - 1);
            double n11 = cos(a[res_x + 2]) * (u - 1) + sin(a[res_x + 2]) * (v - 1);
            out[(size_t)i * w + j] = sqrt(2.0) * lerp(lerp(n00, n10, fu), lerp(n01, n11, fu), fv);
        }
    }
    return AGPT_OK;
}

// The largest exponent e <= 5 with side % 2^e == 0 (DRAEM draws 0..5 on 256; 224 allows all of them too).
static int max_scale_exponent(int side) {
    int e = 0;
    while (e < 5 && side % (1 << (e + 1)) == 0) e++;
    return e;
}

// src [h][w] turned by deg degrees about the centre into dst, bilinear, 0 outside (imgaug's Affine(rotate)).
static void rotate_bilinear(const double *src, int h, int w, double deg, double *dst) {
    const double th = deg * SYNTH_PI / 180, c = cos(th), s = sin(th), cy = (h - 1) / 2.0, cx = (w - 1) / 2.0;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            double sy = c * (y - cy) - s * (x - cx) + cy, sx = s * (y - cy) + c * (x - cx) + cx;  // inverse map
            int y0 = (int)floor(sy), x0 = (int)floor(sx);
            double fy = sy - y0, fx = sx - x0, acc = 0;
            for (int k = 0; k < 4; k++) {
                int yy = y0 + (k >> 1), xx = x0 + (k & 1);
                double wgt = ((k >> 1) ? fy : 1 - fy) * ((k & 1) ? fx : 1 - fx);
                if (yy >= 0 && yy < h && xx >= 0 && xx < w) acc += wgt * src[(size_t)yy * w + xx];
            }
            dst[(size_t)y * w + x] = acc;
        }
}

Status synth_perlin(const uint8_t *dest, const uint8_t *src, SynthDraws *d, SynthSample *out) {
    AGPT_CHECK_ARG(dest && src && d && out && out->image, "synth_perlin: NULL argument");
    const int H = out->height, W = out->width;
    const size_t hw = (size_t)H * W;
    memcpy(out->image, dest, hw * 3);
    memset(out->mask, 0, hw);
    for (size_t i = 0; i < hw; i++) out->label[i] = 0;
    out->n_patches = 0;
    double *noise = malloc(hw * sizeof *noise), *turned = malloc(hw * sizeof *turned);
    double *angles = malloc((size_t)33 * 33 * sizeof *angles);
    int *labels = malloc(hw * sizeof *labels);
    Status s = noise && turned && angles && labels ? AGPT_OK : AGPT_FAIL(AGPT_ERR_OOM, "synth: no memory for the noise");
    size_t on = 0;
    for (int attempt = 0; s == AGPT_OK && attempt < 10 && on == 0; attempt++) {
        int ey, ex;
        if ((s = draw_randint(d, 0, max_scale_exponent(H) + 1, &ey)) != AGPT_OK) break;
        if ((s = draw_randint(d, 0, max_scale_exponent(W) + 1, &ex)) != AGPT_OK) break;
        const int ry = 1 << ey, rx = 1 << ex;
        for (int k = 0; k < (ry + 1) * (rx + 1) && s == AGPT_OK; k++) {  // 2 pi np.random.rand
            double u = 0;
            s = draw_uniform(d, 0, 1, &u);
            angles[k] = 2 * SYNTH_PI * u;
        }
        double deg = 0;
        if (s == AGPT_OK) s = draw_uniform(d, -90, 90, &deg);
        if (s == AGPT_OK) s = synth_perlin_noise(H, W, ry, rx, angles, noise);
        if (s != AGPT_OK) break;
        rotate_bilinear(noise, H, W, deg, turned);
        on = 0;
        for (size_t i = 0; i < hw; i++) on += (out->mask[i] = turned[i] > 0.5);
    }
    double beta = 0;
    if (s == AGPT_OK && on > 0) s = draw_uniform(d, 0, 0.8, &beta);
    if (s == AGPT_OK && on > 0) {
        for (size_t i = 0; i < hw; i++) {
            if (!out->mask[i]) continue;
            out->label[i] = 1;
            for (int c = 0; c < 3; c++) {
                double v = (1 - beta) * src[i * 3 + c] + beta * dest[i * 3 + c];
                out->image[i * 3 + c] = (uint8_t)lrint(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
        // The regions: 8-connected components, their boxes and centroids (the answer names their positions).
        int n = metrics_label_components(out->mask, H, W, labels);
        int kept = n < SYNTH_MAX_REGIONS ? n : SYNTH_MAX_REGIONS;
        double sum[SYNTH_MAX_REGIONS][3] = {{0}};
        for (int k = 0; k < kept; k++) out->box[k][0] = H, out->box[k][1] = 0, out->box[k][2] = W, out->box[k][3] = 0;
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int l = labels[(size_t)y * W + x] - 1;
                if (l < 0 || l >= kept) continue;
                sum[l][0] += y, sum[l][1] += x, sum[l][2] += 1;
                int *b = out->box[l];
                if (y < b[0]) b[0] = y;
                if (y + 1 > b[1]) b[1] = y + 1;
                if (x < b[2]) b[2] = x;
                if (x + 1 > b[3]) b[3] = x + 1;
            }
        for (int k = 0; k < kept; k++) out->center[k][0] = sum[k][0] / sum[k][2], out->center[k][1] = sum[k][1] / sum[k][2];
        out->n_patches = kept;
    } else if (s == AGPT_OK) {
        memset(out->mask, 0, hw);  // no region in 10 draws: no anomaly
    }
    free(noise), free(turned), free(angles), free(labels);
    return s;
}
