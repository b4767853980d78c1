// Fused cross-entropy: loss and gradient of softmax + negative log-likelihood in one pass per row.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"

#define PAR_IF(n) if ((n) > 16384)

// One row: returns its loss; writes d (which may be x itself) when not NULL. x[t] is read before any write.
static double row_cross_entropy(float *d, const float *x, int64_t V, int32_t t, float grad_scale) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < V; i++) mx = fmaxf(mx, x[i]);  // a NaN is skipped here but poisons the sum below
    double sum = 0;
    for (int64_t i = 0; i < V; i++) sum += exp((double)x[i] - mx);
    const double lse = (double)mx + log(sum), xt = x[t];
    if (d) {
        for (int64_t i = 0; i < V; i++) d[i] = (float)(grad_scale * exp((double)x[i] - lse));
        d[t] = (float)(grad_scale * (exp(xt - lse) - 1.0));  // from the saved x[t]: d may alias x
    }
    return ((double)mx - xt) + log(sum);  // = lse - x[t], without cancelling large magnitudes twice
}

Status cpu_cross_entropy(double *loss_sum, float *dlogits, const float *logits, const int32_t *targets,
                         int64_t rows, int64_t V, int32_t ignore_index, float grad_scale) {
    double *row_loss = NULL;
    if (loss_sum) {
        row_loss = malloc((size_t)(rows ? rows : 1) * sizeof(double));
        if (!row_loss) return AGPT_FAIL(AGPT_ERR_OOM, "cross-entropy: no memory for %lld row losses", (long long)rows);
    }
#pragma omp parallel for schedule(static) if (rows * V > 16384 && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        float *d = dlogits ? dlogits + r * V : NULL;
        double l = 0;
        if (targets[r] == ignore_index) {
            if (d) memset(d, 0, (size_t)V * sizeof(float));
        } else {
            l = row_cross_entropy(d, logits + r * V, V, targets[r], grad_scale);
        }
        if (row_loss) row_loss[r] = l;
    }
    if (loss_sum) {
        double s = 0;  // in row order: the same sum for any thread count
        for (int64_t r = 0; r < rows; r++) s += row_loss[r];
        *loss_sum = s;
        free(row_loss);
    }
    return AGPT_OK;
}

// ---- pixel losses of the anomaly maps (reference section 6.5) -------------------------------------------------
// Per pixel with q = p1 and class g = (gt > 0.5): pt = (1 - s) p_g + s p_{1-g} + s with p0 = 1 - q, i.e.
// pt = (1 - 2s) q + 2s for g = 1 and pt = 1 - (1 - 2s) q for g = 0; focal term f = -(1 - pt)^2 ln pt with
// df/dpt = 2 (1 - pt) ln pt - (1 - pt)^2 / pt. Dice per sample b: I = sum q g, S = sum q + sum g,
// dice_b = (2 I + 1) / (S + 1), d(1 - mean_b dice_b)/dq = -(2 g (S + 1) - (2 I + 1)) / (B (S + 1)^2).
// Everything in double; the sums go per image row first (a fixed split), then in row order, so the result does
// not depend on the thread count.
static const double kFocalSmooth = 1e-5;

static inline double focal_pt(double q, double g) {
    return g > 0.5 ? (1.0 - 2.0 * kFocalSmooth) * q + 2.0 * kFocalSmooth : 1.0 - (1.0 - 2.0 * kFocalSmooth) * q;
}

Status cpu_pixel_loss(double *focal, double *dice, float *dp1, const float *p1, const float *gt, int64_t B,
                      int64_t H, int64_t W, float scale) {
    const int64_t rows = B * H, M = B * H * W;
    double *part = malloc((size_t)(rows * 4) * sizeof(double));  // per row: focal, sum q g, sum q, sum g
    double *stat = malloc((size_t)(B * 2) * sizeof(double));      // per sample: I, S
    if (!part || !stat) {
        free(part), free(stat);
        return AGPT_FAIL(AGPT_ERR_OOM, "op_pixel_loss: could not allocate %zu bytes of scratch",
                         (size_t)(rows * 4 + B * 2) * sizeof(double));
    }
#pragma omp parallel for PAR_IF(M)
    for (int64_t r = 0; r < rows; r++) {
        const float *q = p1 + r * W, *g = gt + r * W;
        double f = 0, qg = 0, sq = 0, sg = 0;
        for (int64_t i = 0; i < W; i++) {
            const double pt = focal_pt(q[i], g[i]), om = 1.0 - pt;
            f += -om * om * log(pt);
            qg += (double)q[i] * g[i], sq += q[i], sg += g[i];
        }
        part[4 * r] = f, part[4 * r + 1] = qg, part[4 * r + 2] = sq, part[4 * r + 3] = sg;
    }
    double fsum = 0, dsum = 0;
    for (int64_t b = 0; b < B; b++) {
        double I = 0, S = 0;
        for (int64_t r = b * H; r < (b + 1) * H; r++) {
            fsum += part[4 * r];
            I += part[4 * r + 1], S += part[4 * r + 2] + part[4 * r + 3];
        }
        stat[2 * b] = I, stat[2 * b + 1] = S;
        dsum += (2.0 * I + 1.0) / (S + 1.0);
    }
    if (focal) *focal = fsum / (double)M;
    if (dice) *dice = 1.0 - dsum / (double)B;
    if (dp1) {
#pragma omp parallel for PAR_IF(M)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t b = r / H;
            const double I = stat[2 * b], S1 = stat[2 * b + 1] + 1.0;
            const double dice_c = -1.0 / ((double)B * S1 * S1);
            const float *q = p1 + r * W, *g = gt + r * W;
            float *d = dp1 + r * W;
            for (int64_t i = 0; i < W; i++) {
                const double pt = focal_pt(q[i], g[i]), om = 1.0 - pt;
                const double dfdpt = 2.0 * om * log(pt) - om * om / pt;
                const double dpt = g[i] > 0.5 ? (1.0 - 2.0 * kFocalSmooth) : -(1.0 - 2.0 * kFocalSmooth);
                const double dd = dice_c * (2.0 * g[i] * S1 - (2.0 * I + 1.0));
                d[i] = (float)((double)d[i] + (double)scale * (dfdpt * dpt / (double)M + dd));
            }
        }
    }
    free(part), free(stat);
    return AGPT_OK;
}
