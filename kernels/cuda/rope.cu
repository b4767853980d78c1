// Rotary position embedding, rotate-half pairing (HF LLaMA), forward (direction +1) and backward (-1).
//   x, out: [B,T,H,D]   positions: i32 [B,T]
// For i < D/2: inv_freq_i = 1 / base^(2i/D) in float, angle = pos * inv_freq_i in float, then
//   (x_i, x_{i+D/2}) -> (x_i cos - x_{i+D/2} sin, x_{i+D/2} cos + x_i sin), sin negated for direction -1.
//
// inv_freq is computed on the host with the very expression the CPU reference uses (glibc powf), and passed
// to the kernel by value as a parameter: no allocation, and the angles are bit-identical to the CPU's. This
// matters: device powf may differ by a few ulp, and at position 1000 a few ulp of inv_freq is ~1e-4 rad,
// which alone would exceed the f32 test tolerance. Only cosf/sinf (2 ulp on the device) then differ.
// Head dims beyond kRopeMaxHalf * 2 fall back to device powf.
//
// One thread per pair: consecutive threads take consecutive i, so both halves are read coalesced. A thread
// reads both elements of its pair before writing them, so out may alias x.
#include <math.h>

#include "kernels/cuda/common.cuh"

#define ROPE_MAX_HALF 256  // 1 KiB of kernel parameters; head dims up to 512 use the host table

struct RopeFreqs {
    float inv_freq[ROPE_MAX_HALF];
};

template <typename T>
__global__ void rope_kernel(T *out, const T *x, const int32_t *positions, int64_t rows, int64_t H, int64_t D,
                            float base, float sign, const __grid_constant__ RopeFreqs freqs) {
    const int64_t half = D / 2, total = rows * half;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = idx / half, i = idx - row * half;  // row = (b * T + t) * H + h
        const float pos = (float)positions[row / H];
        const float inv_freq =
            half <= ROPE_MAX_HALF ? freqs.inv_freq[i] : 1.0f / powf(base, (float)(2 * i) / (float)D);
        const float angle = pos * inv_freq;
        const float c = cosf(angle), s = sign * sinf(angle);
        const T *xr = x + row * D;
        T *outr = out + row * D;
        const float x0 = to_f32(xr[i]), x1 = to_f32(xr[i + half]);
        outr[i] = from_f32<T>(x0 * c - x1 * s);
        outr[i + half] = from_f32<T>(x1 * c + x0 * s);
    }
}

template <typename T>
static Status launch_rope(cudaStream_t s, void *out, const void *x, const int32_t *positions, int64_t rows,
                          int64_t H, int64_t D, float base, float sign, const RopeFreqs &freqs) {
    const int threads = 256;
    rope_kernel<T><<<grid_for(rows * (D / 2), threads), threads, 0, s>>>((T *)out, (const T *)x, positions, rows, H,
                                                                         D, base, sign, freqs);
    CUDA_LAUNCH_CHECK("rope_kernel");
    return AGPT_OK;
}

extern "C" Status cuda_rope(Engine *e, DType dt, void *out, const void *x, const int32_t *positions, int64_t B,
                            int64_t T, int64_t H, int64_t D, float base, int direction) {
    CHECK_FLOAT_DT(dt);
    AGPT_CHECK_ARG(B >= 0 && T >= 0 && H >= 0 && D > 0 && D % 2 == 0,
                   "cuda_rope: bad shape B=%lld T=%lld H=%lld D=%lld (D must be even)", (long long)B, (long long)T,
                   (long long)H, (long long)D);
    AGPT_CHECK_ARG(direction == 1 || direction == -1, "cuda_rope: direction is %d; use +1 or -1", direction);
    const int64_t rows = B * T * H;
    if (rows == 0) return AGPT_OK;
    RopeFreqs freqs;
    const int64_t half = D / 2;
    for (int64_t i = 0; i < ROPE_MAX_HALF; i++)
        freqs.inv_freq[i] = i < half ? 1.0f / powf(base, (float)(2 * i) / (float)D) : 0.0f;
    return DISPATCH_FLOAT(dt, launch_rope, engine_stream(e), out, x, positions, rows, H, D, base,
                          direction > 0 ? 1.0f : -1.0f, freqs);
}
