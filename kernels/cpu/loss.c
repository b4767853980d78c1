// Fused cross-entropy: loss and gradient of softmax + negative log-likelihood in one pass per row.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_ops.h"

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
