// The two physical limits every benchmark reports against, measured in the same run on the same device.
#pragma once
#include "kernels/engine.h"

// Dense matmul rate in this dtype: a square GEMM of side n, the best of a few runs after a warm-up.
Status bench_matmul_rate(Engine *e, DType dt, int n, double *tflops);
// Copy bandwidth: a buffer of n elements copied to another (bytes read + written), the best of a few runs.
Status bench_copy_rate(Engine *e, DType dt, int64_t n, double *gbps);
// Read bandwidth: a buffer of n elements read once (a sum of squares over it), the best of a few runs. A decode
// step only reads its weights, and on some machines reads stream faster than copies.
Status bench_read_rate(Engine *e, DType dt, int64_t n, double *gbps);
// Waits for the engine's stream and, on CUDA, the whole device (runtime copies run on the legacy stream).
Status bench_sync(Engine *e);
