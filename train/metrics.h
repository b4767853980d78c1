// Evaluation metrics of agpt eval (pure C, no engine): AUROC, average precision and F1-max of binary scores,
// the per-region-overlap (PRO) curve and its normalised area to FPR 0.3 (the MVTec AD evaluation's AUPRO),
// and the LLM verdicts' accuracy, precision, recall and confusion counts.
//
// Image-level scores (one per image, thousands at most) are exact: sorted, ties grouped as sklearn's
// roc_curve / precision_recall_curve group equal scores into one threshold.
//
// Pixel-level scores (a VisA-sized test set is ~110 M pixels) are counted on a fine histogram over [lo, hi]
// (PixelMetrics): memory is fixed (3 arrays of `bins` doubles, 24 MiB at 2^20 bins) and one pass over each map
// adds it, so the whole set never has to be held or sorted. Every bin acts as one threshold, as if all scores in
// it were tied. The error this causes in the AUROC is bounded exactly and reported (auroc_error_bound):
// |AUROC_hist - AUROC_exact| <= 0.5 * sum_b P_b N_b / (P N) (pairs of a positive and a negative in one bin are
// counted as ties instead of being ordered). Values outside [lo, hi] are counted into the end bins (and in
// n_clamped), so the bound covers them too. Scores that are multiples of (hi - lo) / bins are exact.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "runtime/status.h"

// Points of a curve (ROC: x = FPR, y = TPR; PRO: x = FPR, y = mean region overlap), in threshold order from
// the highest threshold down, starting at (0, 0).
typedef struct Curve {
    int n, cap;
    double *x, *y;
} Curve;
void curve_free(Curve *c);

typedef struct BinaryMetrics {
    double auroc;         // NaN when one class is absent (sklearn raises there)
    double ap;            // average precision, sklearn's sum_k (R_k - R_{k-1}) P_k; NaN without positives
    double f1_max;        // the best F1 over all thresholds; NaN without positives
    double f1_threshold;  // the score at which it is reached (the lower edge of the bin for pixel metrics)
    int64_t n_pos, n_neg;
} BinaryMetrics;

// Exact metrics of n scores with labels (0/1); roc (may be NULL) receives the ROC curve.
Status metrics_binary(const float *score, const uint8_t *label, int64_t n, BinaryMetrics *out, Curve *roc);

// The normalised area under a curve from x = 0 to x_max (trapezoids, the last one cut at x_max by linear
// interpolation), divided by x_max. The curve must start at x = 0 and be non-decreasing in x.
double curve_area_to(const Curve *c, double x_max);

// Pixel metrics over many maps, on a histogram grid.
typedef struct PixelMetrics {
    double lo, hi;
    int bins;
    double *pos, *neg, *pro;  // [bins]: positive and negative pixel counts, summed region weights
    int64_t n_pos, n_neg, n_clamped;
    int64_t n_regions;        // connected components (8-connected) of all masks added
    // The PRO weights are 1 / |region| per pixel, divided by the number of regions only at the end
    int *labels, label_cap;   // scratch for the connected components of one mask
} PixelMetrics;

typedef struct PixelResult {
    BinaryMetrics pixel;
    double aupro;             // normalised area under the PRO curve to FPR 0.3; NaN without regions
    double auroc_error_bound; // the bound above for this histogram
} PixelResult;

Status pixel_metrics_init(PixelMetrics *p, double lo, double hi, int bins);
// One image's map and mask ([h][w]; mask nonzero = anomalous; NULL: all normal).
Status pixel_metrics_add(PixelMetrics *p, const float *map, const uint8_t *mask, int h, int w);
// roc, pro may be NULL.
Status pixel_metrics_result(const PixelMetrics *p, PixelResult *out, Curve *roc, Curve *pro);
void pixel_metrics_free(PixelMetrics *p);

// Connected components of a binary mask, 8-connected (the MVTec AD evaluation labels with a 3x3 structure):
// labels[i] = 0 for background, 1..n for the components in raster order of their first pixel. Returns n.
int metrics_label_components(const uint8_t *mask, int h, int w, int *labels);

// The reference's reading of an answer (code/test_mvtec.py): right when an anomalous image's answer contains
// "Yes" or a normal image's contains "No" (plain case-sensitive substrings, so "Not" and "None" count as "No").
bool metrics_answer_correct(const char *answer, bool anomalous);

// The verdicts as a classifier: predicted anomalous = "Yes" in the answer (the same substring the accuracy reads).
typedef struct VerdictCounts {
    int64_t tp, fp, tn, fn;  // positive = anomalous
    int64_t correct, total;  // the reference's accuracy rule
} VerdictCounts;
void verdict_add(VerdictCounts *v, const char *answer, bool anomalous);
double verdict_accuracy(const VerdictCounts *v);
double verdict_precision(const VerdictCounts *v);  // NaN when nothing was predicted anomalous
double verdict_recall(const VerdictCounts *v);     // NaN without anomalous images
