#include "train/metrics.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void curve_free(Curve *c) {
    free(c->x);
    free(c->y);
    memset(c, 0, sizeof *c);
}

static Status curve_push(Curve *c, double x, double y) {
    if (!c) return AGPT_OK;
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 256;
        double *nx = realloc(c->x, (size_t)cap * sizeof *nx);
        if (nx) c->x = nx;
        double *ny = nx ? realloc(c->y, (size_t)cap * sizeof *ny) : NULL;
        if (ny) c->y = ny;
        if (!nx || !ny) return AGPT_FAIL(AGPT_ERR_OOM, "out of memory for a curve of %d points", cap);
        c->cap = cap;
    }
    c->x[c->n] = x, c->y[c->n] = y;
    c->n++;
    return AGPT_OK;
}

// The threshold groups, highest threshold first: group k holds pos[i] positives and neg[i] negatives, i = k or
// (reverse) m - 1 - k; its threshold is thr[i], or lo + i * width when thr is NULL (histogram bins).
typedef struct Groups {
    const double *pos, *neg, *thr;
    double lo, width;
    int64_t m;
    bool reverse;
} Groups;

static Status binary_from_groups(const Groups *g, BinaryMetrics *out, Curve *roc) {
    double P = 0, N = 0;
    for (int64_t i = 0; i < g->m; i++) P += g->pos[i], N += g->neg[i];
    out->n_pos = (int64_t)P, out->n_neg = (int64_t)N;
    out->auroc = out->ap = out->f1_max = out->f1_threshold = NAN;
    if (roc) roc->n = 0;
    AGPT_TRY(curve_push(roc, 0, 0));
    double tp = 0, fp = 0, auc = 0, ap = 0, prev_tpr = 0, prev_fpr = 0, prev_rec = 0, best = -1, best_thr = NAN;
    for (int64_t k = 0; k < g->m; k++) {
        int64_t i = g->reverse ? g->m - 1 - k : k;
        if (g->pos[i] == 0 && g->neg[i] == 0) continue;
        tp += g->pos[i], fp += g->neg[i];
        double tpr = P > 0 ? tp / P : NAN, fpr = N > 0 ? fp / N : NAN;
        auc += (fpr - prev_fpr) * (tpr + prev_tpr) / 2;
        prev_tpr = tpr, prev_fpr = fpr;
        if (P > 0) {
            ap += (tpr - prev_rec) * (tp / (tp + fp));
            prev_rec = tpr;
            double f1 = 2 * tp / (tp + fp + P);  // 2PR / (P + R) with P = tp/(tp+fp), R = tp/P
            if (f1 > best) best = f1, best_thr = g->thr ? g->thr[i] : g->lo + (double)i * g->width;
        }
        if (P > 0 && N > 0) AGPT_TRY(curve_push(roc, fpr, tpr));
    }
    if (P > 0 && N > 0) out->auroc = auc;
    if (P > 0) out->ap = ap, out->f1_max = best, out->f1_threshold = best_thr;
    return AGPT_OK;
}

typedef struct ScoreLabel {
    float s;
    uint8_t y;
} ScoreLabel;

static int by_score_desc(const void *a, const void *b) {
    float x = ((const ScoreLabel *)a)->s, y = ((const ScoreLabel *)b)->s;
    return (x < y) - (x > y);
}

Status metrics_binary(const float *score, const uint8_t *label, int64_t n, BinaryMetrics *out, Curve *roc) {
    AGPT_CHECK_ARG(n >= 0 && out && (n == 0 || (score && label)), "metrics_binary: bad arguments");
    for (int64_t i = 0; i < n; i++)
        AGPT_CHECK_ARG(isfinite(score[i]), "metrics_binary: score %lld is %g (not finite)", (long long)i, score[i]);
    ScoreLabel *v = malloc((size_t)(n + 1) * sizeof *v);
    double *pos = malloc((size_t)(n + 1) * sizeof *pos), *neg = malloc((size_t)(n + 1) * sizeof *neg);
    double *thr = malloc((size_t)(n + 1) * sizeof *thr);
    Status s = AGPT_OK;
    if (!v || !pos || !neg || !thr) s = AGPT_FAIL(AGPT_ERR_OOM, "metrics_binary: out of memory for %lld scores", (long long)n);
    int64_t m = 0;
    if (s == AGPT_OK) {
        for (int64_t i = 0; i < n; i++) v[i] = (ScoreLabel){score[i], label[i] != 0};
        qsort(v, (size_t)n, sizeof *v, by_score_desc);
        for (int64_t i = 0; i < n; i++) {  // equal scores: one threshold, as sklearn's curves
            if (m == 0 || v[i].s != thr[m - 1]) thr[m] = v[i].s, pos[m] = neg[m] = 0, m++;
            if (v[i].y) pos[m - 1] += 1;
            else neg[m - 1] += 1;
        }
        Groups g = {pos, neg, thr, 0, 0, m, false};
        s = binary_from_groups(&g, out, roc);
    }
    free(v), free(pos), free(neg), free(thr);
    return s;
}

double curve_area_to(const Curve *c, double x_max) {
    if (!c || c->n < 2 || !(x_max > 0)) return NAN;
    double area = 0;
    for (int i = 1; i < c->n; i++) {
        double x0 = c->x[i - 1], x1 = c->x[i], y0 = c->y[i - 1], y1 = c->y[i];
        if (x0 >= x_max) break;
        if (x1 > x_max) {  // cut at x_max: y linearly interpolated on the segment
            double y = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0);
            area += (x_max - x0) * (y0 + y) / 2;
            break;
        }
        area += (x1 - x0) * (y0 + y1) / 2;
    }
    return area / x_max;
}

// ---- pixel metrics ----------------------------------------------------------------------------------------

Status pixel_metrics_init(PixelMetrics *p, double lo, double hi, int bins) {
    memset(p, 0, sizeof *p);
    AGPT_CHECK_ARG(isfinite(lo) && isfinite(hi) && hi > lo && bins >= 2 && bins <= (1 << 26),
                   "pixel metrics: range [%g, %g] with %d bins", lo, hi, bins);
    p->lo = lo, p->hi = hi, p->bins = bins;
    p->pos = calloc((size_t)bins, sizeof *p->pos);
    p->neg = calloc((size_t)bins, sizeof *p->neg);
    p->pro = calloc((size_t)bins, sizeof *p->pro);
    if (!p->pos || !p->neg || !p->pro) {
        pixel_metrics_free(p);
        return AGPT_FAIL(AGPT_ERR_OOM, "pixel metrics: out of memory for %d bins", bins);
    }
    return AGPT_OK;
}

void pixel_metrics_free(PixelMetrics *p) {
    free(p->pos), free(p->neg), free(p->pro), free(p->labels);
    memset(p, 0, sizeof *p);
}

int metrics_label_components(const uint8_t *mask, int h, int w, int *labels) {
    int64_t hw = (int64_t)h * w;
    int *stack = malloc((size_t)(hw + 1) * sizeof *stack);
    if (!stack) return -1;
    for (int64_t i = 0; i < hw; i++) labels[i] = 0;
    int n = 0;
    for (int64_t start = 0; start < hw; start++) {
        if (!mask[start] || labels[start]) continue;
        labels[start] = ++n;
        int64_t top = 0;
        stack[top++] = (int)start;
        while (top > 0) {  // flood fill over the 8 neighbours
            int q = stack[--top], y = q / w, x = q % w;
            for (int dy = -1; dy <= 1; dy++)
                for (int dx = -1; dx <= 1; dx++) {
                    int yy = y + dy, xx = x + dx;
                    if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
                    int r = yy * w + xx;
                    if (mask[r] && !labels[r]) labels[r] = n, stack[top++] = r;
                }
        }
    }
    free(stack);
    return n;
}

Status pixel_metrics_add(PixelMetrics *p, const float *map, const uint8_t *mask, int h, int w) {
    AGPT_CHECK_ARG(p && p->pos && map && h > 0 && w > 0, "pixel_metrics_add: bad arguments");
    int64_t hw = (int64_t)h * w;
    int n_regions = 0;
    double *inv_size = NULL;
    if (mask) {
        if (p->label_cap < hw) {
            int *l = realloc(p->labels, (size_t)hw * sizeof *l);
            if (!l) return AGPT_FAIL(AGPT_ERR_OOM, "pixel metrics: out of memory for a %dx%d mask", w, h);
            p->labels = l, p->label_cap = (int)hw;
        }
        n_regions = metrics_label_components(mask, h, w, p->labels);
        if (n_regions < 0) return AGPT_FAIL(AGPT_ERR_OOM, "pixel metrics: out of memory labelling a mask");
        inv_size = calloc((size_t)n_regions + 1, sizeof *inv_size);
        if (!inv_size) return AGPT_FAIL(AGPT_ERR_OOM, "pixel metrics: out of memory");
        for (int64_t i = 0; i < hw; i++) inv_size[p->labels[i]] += 1;
        for (int r = 1; r <= n_regions; r++) inv_size[r] = 1 / inv_size[r];
    }
    const double scale = p->bins / (p->hi - p->lo);
    const int last = p->bins - 1;
    int64_t clamped = 0;
    for (int64_t i = 0; i < hw; i++) {
        double t = ((double)map[i] - p->lo) * scale;
        int b;
        if (t >= 0 && t < p->bins) b = (int)t;
        else {  // out of range (or NaN): the end bins, counted
            b = t >= p->bins ? last : 0;
            if (t < -1e-6 * p->bins || t > p->bins * (1 + 1e-6) || t != t) clamped++;  // not mere rounding
        }
        if (mask && mask[i]) {
            p->pos[b] += 1;
            p->pro[b] += inv_size[p->labels[i]];
        } else {
            p->neg[b] += 1;
        }
    }
    free(inv_size);
    int64_t positives = 0;
    if (mask)
        for (int64_t i = 0; i < hw; i++) positives += mask[i] != 0;
    p->n_pos += positives, p->n_neg += hw - positives, p->n_clamped += clamped, p->n_regions += n_regions;
    return AGPT_OK;
}

Status pixel_metrics_result(const PixelMetrics *p, PixelResult *out, Curve *roc, Curve *pro) {
    AGPT_CHECK_ARG(p && p->pos && out, "pixel_metrics_result: bad arguments");
    Groups g = {p->pos, p->neg, NULL, p->lo, (p->hi - p->lo) / p->bins, p->bins, true};
    AGPT_TRY(binary_from_groups(&g, &out->pixel, roc));
    double P = (double)p->n_pos, N = (double)p->n_neg, ties = 0;
    for (int b = 0; b < p->bins; b++) ties += p->pos[b] * p->neg[b];
    out->auroc_error_bound = P > 0 && N > 0 ? 0.5 * ties / (P * N) : NAN;
    // PRO: at each threshold the mean over all regions of the share of the region at or above it, against the
    // false positive rate over all normal pixels; prepended (0, 0), integrated to FPR 0.3, normalised.
    out->aupro = NAN;
    Curve local = {0};
    Curve *c = pro ? pro : &local;
    c->n = 0;
    Status s = curve_push(c, 0, 0);
    if (p->n_regions > 0 && N > 0) {
        double cum_pro = 0, cum_neg = 0;
        for (int b = p->bins - 1; b >= 0 && s == AGPT_OK; b--) {
            if (p->pos[b] == 0 && p->neg[b] == 0) continue;
            cum_pro += p->pro[b], cum_neg += p->neg[b];
            s = curve_push(c, cum_neg / N, cum_pro / (double)p->n_regions);
        }
        if (s == AGPT_OK) out->aupro = curve_area_to(c, 0.3);
    }
    if (!pro) curve_free(&local);
    return s;
}

// ---- verdicts ----------------------------------------------------------------------------------------------

bool metrics_answer_correct(const char *answer, bool anomalous) {
    if (!answer) return false;
    return anomalous ? strstr(answer, "Yes") != NULL : strstr(answer, "No") != NULL;
}

void verdict_add(VerdictCounts *v, const char *answer, bool anomalous) {
    bool yes = answer && strstr(answer, "Yes");
    if (anomalous) yes ? v->tp++ : v->fn++;
    else yes ? v->fp++ : v->tn++;
    v->correct += metrics_answer_correct(answer, anomalous);
    v->total++;
}

double verdict_accuracy(const VerdictCounts *v) { return v->total ? (double)v->correct / v->total : NAN; }
double verdict_precision(const VerdictCounts *v) { return v->tp + v->fp ? (double)v->tp / (v->tp + v->fp) : NAN; }
double verdict_recall(const VerdictCounts *v) { return v->tp + v->fn ? (double)v->tp / (v->tp + v->fn) : NAN; }
