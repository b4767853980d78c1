// AdamW with PyTorch's semantics (torch.optim.AdamW, foreach=False): decoupled weight decay applied first,
// then the bias-corrected Adam step.
#include <math.h>

#include "kernels/cpu/cpu_ops.h"

void cpu_adamw(float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1, float beta2,
               float eps, float weight_decay, int step) {
    float bc1 = 1.0f - powf(beta1, (float)step);
    float bc2 = 1.0f - powf(beta2, (float)step);
    float step_size = lr / bc1;
    float bc2_sqrt = sqrtf(bc2);
#pragma omp parallel for if (n > 16384)
    for (int64_t i = 0; i < n; i++) {
        float g = grad[i];
        param[i] *= 1.0f - lr * weight_decay;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        param[i] -= step_size * m[i] / denom;
    }
}
