// CUDA backend on raw, already validated device pointers. Storage dtype `dt` is DT_F32, DT_F16 or DT_BF16
// for every float tensor of a call (mean/rstd statistics are always f32, positions i32, AdamW state f32);
// accumulation is always fp32. Every call is asynchronous on the engine's stream and returns launch errors.
// Implemented in kernels/cuda/*.cu; declared with C linkage.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "kernels/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

Status cuda_matmul(Engine *e, DType dt, void *c, const void *a, const void *b, const void *bias, int64_t batch,
                   int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_a, int64_t stride_b,
                   int64_t stride_c, float alpha, float beta);
Status cuda_bias_grad(Engine *e, DType dt, void *dbias, const void *dout, int64_t rows, int64_t N);

Status cuda_add(Engine *e, DType dt, void *out, const void *a, const void *b, int64_t n);
Status cuda_scale(Engine *e, DType dt, void *x, int64_t n, float s);
Status cuda_sum_squares(Engine *e, DType dt, double *result, const void *x, int64_t n);  // synchronises

Status cuda_layernorm(Engine *e, DType dt, void *out, float *mean, float *rstd, const void *x, const void *w,
                      const void *b, int64_t rows, int64_t C, float eps);
Status cuda_layernorm_backward(Engine *e, DType dt, void *dx, void *dw, void *db, const void *dout, const void *x,
                               const void *w, const float *mean, const float *rstd, int64_t rows, int64_t C);
Status cuda_rmsnorm(Engine *e, DType dt, void *out, float *rstd, const void *x, const void *w, int64_t rows,
                    int64_t C, float eps);
Status cuda_rmsnorm_backward(Engine *e, DType dt, void *dx, void *dw, const void *dout, const void *x,
                             const void *w, const float *rstd, int64_t rows, int64_t C);
// sum = a + b, then out = norm(sum) (kernels/cuda/norms.cu): one block per row reads a and b once, writes sum
// and out once, keeping the row in registers when it fits (every model width does). sum may alias a or b.
Status cuda_add_layernorm(Engine *e, DType dt, void *sum, void *out, float *mean, float *rstd, const void *a,
                          const void *b, const void *w, const void *bias, int64_t rows, int64_t C, float eps);
Status cuda_add_rmsnorm(Engine *e, DType dt, void *sum, void *out, float *rstd, const void *a, const void *b,
                        const void *w, int64_t rows, int64_t C, float eps);

Status cuda_gelu(Engine *e, DType dt, void *out, const void *x, int64_t n);
Status cuda_gelu_backward(Engine *e, DType dt, void *dx, const void *dout, const void *x, int64_t n);
Status cuda_swiglu(Engine *e, DType dt, void *out, const void *gate, const void *up, int64_t n);
Status cuda_swiglu_backward(Engine *e, DType dt, void *dgate, void *dup, const void *dout, const void *gate,
                            const void *up, int64_t n);
Status cuda_softmax(Engine *e, DType dt, void *out, const void *x, int64_t rows, int64_t C, float scale);
Status cuda_softmax_backward(Engine *e, DType dt, void *dx, const void *dout, const void *y, int64_t rows,
                             int64_t C, float scale);

Status cuda_attention(Engine *e, DType dt, void *out, const void *q, const void *k, const void *v, int64_t B,
                      int64_t Tq, int64_t Tk, int64_t H, int64_t D, bool causal, float scale);
Status cuda_attention_backward(Engine *e, DType dt, void *dq, void *dk, void *dv, const void *dout, const void *q,
                               const void *k, const void *v, int64_t B, int64_t Tq, int64_t Tk, int64_t H,
                               int64_t D, bool causal, float scale);
// Which kernels cuda_attention/cuda_attention_backward use for f16/bf16 with D in {64, 80, 128}: "flash" (the
// default) or "simple" (environment AGPT_ATTENTION=simple, read once). f32 and other D always use "simple".
const char *cuda_attention_impl(void);
// op_attention_decode: q, out [B,1,H,D], k, v [B,S,H,D], lengths i32 [B] on the device. The flash decode where
// cuda_attention would take it for Tq = 1, else a simple-kernel variant reading the length per sequence; either
// way the same arithmetic as cuda_attention(causal) over the first lengths[b] keys. No host value depends on the
// lengths, so a CUDA graph of it stays valid as they change.
Status cuda_attention_decode(Engine *e, DType dt, void *out, const void *q, const void *k, const void *v,
                             const int32_t *lengths, int64_t B, int64_t S, int64_t H, int64_t D, float scale);

// ---- fused flash attention on tensor cores (kernels/cuda/flash_attention.cu) ----
// Same layout and semantics as cuda_attention: f16/bf16 only, D in {64, 80, 128}, every pointer 16-byte aligned;
// anything else is AGPT_ERR_UNSUPPORTED. Tq = 1 takes a split-K decode kernel with partials in e->workspace.
bool cuda_flash_attention_supported(DType dt, int64_t D, int64_t B, int64_t Tq, int64_t Tk, int64_t H);
Status cuda_flash_attention(Engine *e, DType dt, void *out, const void *q, const void *k, const void *v, int64_t B,
                            int64_t Tq, int64_t Tk, int64_t H, int64_t D, bool causal, float scale);
// Decode (one query per sequence) over a cache k, v [B,S,H,D] with per-sequence lengths on the device
// (lengths i32 [B], clamped to [0,S]): the split-K decode kernels with a grid sized for S, each sequence taking the
// split count cuda_flash_attention would choose for it alone (B = 1, Tk = its length), so the results are
// bit-identical to that call; surplus splits exit at once. AGPT_ERR_UNSUPPORTED where the flash kernels do
// not apply or the partials of all B sequences do not fit the workspace (cuda_attention_decode then takes the
// simple kernel).
Status cuda_flash_attention_decode(Engine *e, DType dt, void *out, const void *q, const void *k, const void *v,
                                   const int32_t *lengths, int64_t B, int64_t S, int64_t H, int64_t D, float scale);
// The backward keeps 2 * B * H * Tq floats (log-sum-exp, dO.O) in e->workspace; whether they fit:
bool cuda_flash_attention_backward_fits(Engine *e, int64_t B, int64_t Tq, int64_t H);
Status cuda_flash_attention_backward(Engine *e, DType dt, void *dq, void *dk, void *dv, const void *dout,
                                     const void *q, const void *k, const void *v, int64_t B, int64_t Tq, int64_t Tk,
                                     int64_t H, int64_t D, bool causal, float scale);
Status cuda_rope(Engine *e, DType dt, void *out, const void *x, const int32_t *positions, int64_t B, int64_t T,
                 int64_t H, int64_t D, float base, int direction);

Status cuda_cast(Engine *e, void *out, DType out_dt, const void *x, DType x_dt, int64_t n);
Status cuda_adamw(Engine *e, float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step);

// ---- vision path: anomaly maps and patch embedding (kernels/cuda/vision.cu) ----
// x, out: [rows, C]; out = x / max(||x||, eps). out may alias x.
Status cuda_l2_normalize(Engine *e, DType dt, void *out, const void *x, int64_t rows, int64_t C, float eps);
// x [BC,h,w] -> out [BC,H,W], bilinear with align_corners=True.
Status cuda_upsample_bilinear(Engine *e, DType dt, void *out, const void *x, int64_t BC, int64_t h, int64_t w,
                              int64_t H, int64_t W);
// out[q] = max_r <query[q], refs[r]>: query [Q,D], refs [R,D], R >= 1. Dots and max in fp32; per-block partial
// maxima go through e->workspace.
Status cuda_max_dot(Engine *e, DType dt, void *out, const void *query, const void *refs, int64_t Q, int64_t R,
                    int64_t D);
// logits [B,2,N] -> out [B,N]: class-1 probability of the two-class softmax.
Status cuda_softmax2_class1(Engine *e, DType dt, void *out, const void *logits, int64_t B, int64_t N);
Status cuda_axpy(Engine *e, DType dt, void *y, const void *x, int64_t n, float alpha);  // y += alpha * x
// out [B,H,W] += alpha * class-1 softmax of logits [B,2,h,w] resized bilinearly (align_corners=True): one thread
// per output pixel, fp32 throughout, one rounding at the store (kernels/cuda/vision.cu).
Status cuda_upsample_softmax2_axpy(Engine *e, DType dt, void *out, const void *logits, int64_t B, int64_t h,
                                   int64_t w, int64_t H, int64_t W, float alpha);
Status cuda_affine(Engine *e, DType dt, void *x, int64_t n, float a, float b);          // x = a * x + b
// img [B,C,H,W] -> out [B, (H/p)*(W/p), C*p*p], columns in (c, i, j) order.
Status cuda_im2patches(Engine *e, DType dt, void *out, const void *img, int64_t B, int64_t C, int64_t H, int64_t W,
                       int64_t p);

// ---- prompt learner: conv stack (kernels/cuda/conv.cu) ----
// x [B,Cin,H,W], w [Cout,Cin,k,k], bias [Cout] or NULL -> out [B,Cout,H+2pad-k+1,W+2pad-k+1]; stride 1, zero
// padding. An implicit GEMM (no column buffer): fp32 accumulation, one rounding to dt at the store.
Status cuda_conv2d(Engine *e, DType dt, void *out, const void *x, const void *w, const void *bias, int64_t B,
                   int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad);
Status cuda_relu(Engine *e, DType dt, void *out, const void *x, int64_t n);  // out may alias x
// x [BC,H,W] -> out [BC,H/2,W/2], 2x2 windows, floor; a NaN in a window wins.
Status cuda_maxpool2x2(Engine *e, DType dt, void *out, const void *x, int64_t BC, int64_t H, int64_t W);

// ---- training: backward of the vision path and the prompt learner, pixel losses (kernels/cuda/train_vision.cu) --
// UNVERIFIED ON GPU (written without one; tests/test_ops_cuda.c compares each with the CPU op). No atomics: every
// result is a fixed-order sum, the same bits run to run. fp32 math, one rounding per store.
// dx overwritten, dw and dbias += (each may be NULL). Our tiled implicit GEMMs (no cuDNN backward); dw's pixel
// reduction is split over blocks with f32 partials in e->workspace where the output has few tiles.
Status cuda_conv2d_backward(Engine *e, DType dt, void *dx, void *dw, void *dbias, const void *dout, const void *x,
                            const void *w, int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k,
                            int64_t pad);
Status cuda_relu_backward(Engine *e, DType dt, void *dx, const void *dout, const void *y, int64_t n);
Status cuda_maxpool2x2_backward(Engine *e, DType dt, void *dx, const void *dout, const void *x, int64_t BC, int64_t H,
                                int64_t W);
// dout [BC,H,W] -> dx [BC,h,w]: a gather per source pixel.
Status cuda_upsample_bilinear_backward(Engine *e, DType dt, void *dx, const void *dout, int64_t BC, int64_t h,
                                       int64_t w, int64_t H, int64_t W);
Status cuda_l2_normalize_backward(Engine *e, DType dt, void *dx, const void *dout, const void *x, int64_t rows,
                                  int64_t C, float eps);
// p1, gt, dp1 f32 [B,H,W]; double sums through e->workspace (4 B H + 3 B doubles); waits for the stream only when
// focal or dice is asked for.
Status cuda_pixel_loss(Engine *e, double *focal, double *dice, float *dp1, const float *p1, const float *gt,
                       int64_t B, int64_t H, int64_t W, float scale);
// dp1 f32 [B,H,W], logits [B,2,h,w] (dt) -> dlogits [B,2,h,w] (dt) overwritten.
Status cuda_upsample_softmax2_backward(Engine *e, DType dt, void *dlogits, const float *dp1, const void *logits,
                                       int64_t B, int64_t h, int64_t w, int64_t H, int64_t W);

// ---- embedding lookup (kernels/cuda/embedding.cu) ----
// out[i] = table[ids[i]] for i < N: table [V,C] and out [N,C] on the device; ids_host is i32 host memory, already
// checked to be in [0,V). The ids go through e->workspace (cudaMemcpyAsync on the engine's stream, in chunks when
// they do not fit), then one gather kernel per chunk. ids_host may be reused once the call returns.
Status cuda_embedding(Engine *e, DType dt, void *out, const void *table, const int32_t *ids_host, int64_t N,
                      int64_t C);
// The same gather with the ids already on the device (ids_dev i32 [N]); an id outside [0,V) gives a zero row.
// Launches one kernel and copies nothing, so it can be captured in a CUDA graph.
Status cuda_embedding_dev(Engine *e, DType dt, void *out, const void *table, const int32_t *ids_dev, int64_t N,
                          int64_t C, int64_t V);
// cache[b * max_seq + pos[b]] = rows[b] for b < B (pos i32 [B] on the device); a pos outside [0,max_seq) skips
// its row. One kernel (kernels/cuda/embedding.cu).
Status cuda_kv_append(Engine *e, DType dt, void *cache, const void *rows, const int32_t *pos, int64_t B, int64_t C,
                      int64_t max_seq);

// ---- sampling (kernels/cuda/sample.cu) ----
// One token from logits [V] on the device with the semantics of cpu_sample (kernels/cpu/cpu_ops.h): one block,
// a bitonic sort of (score, id) pairs and double prefix sums in e->workspace (about 24 bytes per token; a
// vocabulary that does not fit is AGPT_ERR_UNSUPPORTED). Writes *token on the host, so it synchronises the
// engine's stream. A NaN logit is AGPT_ERR_ARG.
Status cuda_sample(Engine *e, DType dt, int32_t *token, const void *logits, int64_t V, float temperature,
                   int top_k, float top_p, double uniform, bool greedy);

// ---- losses (kernels/cuda/softmax.cu) ----
// Fused cross-entropy over logits [rows, V] with host i32 targets (already checked: ignore_index or in [0,V)):
// the targets go to e->workspace with the per-row f32 losses beside them (chunks of rows when they do not fit),
// one block per row computes max and sum in one online pass and writes dlogits = grad_scale * (softmax - onehot)
// (0 on ignored rows) in a second; dlogits may equal logits. With loss_sum the row losses come back and are summed
// in double in row order (deterministic; synchronises the stream); loss_sum NULL skips that and the wait.
Status cuda_cross_entropy(Engine *e, DType dt, double *loss_sum, void *dlogits, const void *logits,
                          const int32_t *targets_host, int64_t rows, int64_t V, int32_t ignore_index,
                          float grad_scale);

#ifdef __cplusplus
}
#endif
