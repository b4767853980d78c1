// CPU backend: fp32 reference implementations on raw, already validated pointers.
// kernels/ops.c checks shapes and calls these; nothing else should.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "runtime/dtype.h"
#include "runtime/status.h"

// c[i] = alpha * op(a[i]) @ op(b[i]) + beta * c[i] + bias, for i < batch; strides in elements between items
// (stride_b = 0 shares b). op(a) is MxK, op(b) is KxN, c is MxN, all row-major.
void cpu_matmul(float *c, const float *a, const float *b, const float *bias, int64_t batch, int64_t M, int64_t N,
                int64_t K, bool trans_a, bool trans_b, int64_t stride_a, int64_t stride_b, int64_t stride_c,
                float alpha, float beta);
// The one mixed-dtype case: a weight operand b stored in bf16 or f16 with f32 a, out and bias (halving the bytes
// a decode step reads); widened to f32 as it is read, f32 accumulation.
Status cpu_matmul_lowp(float *c, const float *a, const void *b, DType b_dtype, const float *bias, int64_t batch,
                       int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t stride_a,
                       int64_t stride_b, int64_t stride_c, float alpha, float beta);
// Opt-in for cpu_matmul_lowp with a bf16 b and M >= 16: round a to bf16 (nearest even, as PyTorch's bf16 matmul
// does) and multiply with avx512_bf16 dot products, f32 accumulation. Off unless AGPT_CPU_BF16_GEMM=1 (read once)
// or set here; returns whether the path will run (on, and the CPU has avx512_bf16).
bool cpu_set_bf16_gemm(bool on);
void cpu_bias_grad(float *dbias, const float *dout, int64_t rows, int64_t N);  // dbias += column sums

void cpu_add(float *out, const float *a, const float *b, int64_t n);
void cpu_scale(float *x, int64_t n, float s);
double cpu_sum_squares(const float *x, int64_t n);

void cpu_layernorm(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                   int64_t rows, int64_t C, float eps);
void cpu_layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                            const float *mean, const float *rstd, int64_t rows, int64_t C);
void cpu_rmsnorm(float *out, float *rstd, const float *x, const float *w, int64_t rows, int64_t C, float eps);
void cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                          const float *rstd, int64_t rows, int64_t C);

void cpu_gelu(float *out, const float *x, int64_t n);
void cpu_gelu_backward(float *dx, const float *dout, const float *x, int64_t n);
void cpu_swiglu(float *out, const float *gate, const float *up, int64_t n);
void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                         int64_t n);
void cpu_softmax(float *out, const float *x, int64_t rows, int64_t C, float scale);
void cpu_softmax_backward(float *dx, const float *dout, const float *y, int64_t rows, int64_t C, float scale);

// q: [B,Tq,H,D], k, v: [B,Tk,H,D], out: [B,Tq,H,D]
void cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t B, int64_t Tq, int64_t Tk,
                   int64_t H, int64_t D, bool causal, float scale);
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                            const float *v, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t D, bool causal,
                            float scale);

// x, out: [B,T,H,D], positions [B,T]; direction +1 rotates forward, -1 backward.
void cpu_rope(float *out, const float *x, const int32_t *positions, int64_t B, int64_t T, int64_t H, int64_t D,
              float base, int direction);

void cpu_adamw(float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1, float beta2,
               float eps, float weight_decay, int step);

// ---- vision path: anomaly maps and patch embedding ----------------------------------------------------------
// cpu_max_dot allocates bounded scratch and so returns a Status; the others cannot fail.

// x, out: [rows, C]; out = x / max(||x||, eps) per row (eps = 0: plain division). out may alias x.
void cpu_l2_normalize(float *out, const float *x, int64_t rows, int64_t C, float eps);
// x [BC,h,w] -> out [BC,H,W]: bilinear, align_corners=True, in PyTorch's float arithmetic.
void cpu_upsample_bilinear(float *out, const float *x, int64_t BC, int64_t h, int64_t w, int64_t H, int64_t W);
// out [B,H,W] += alpha * softmax2_class1(upsample_bilinear(logits [B,2,h,w])): the three ops above in one pass,
// bit for bit equal to them.
void cpu_upsample_softmax2_axpy(float *out, const float *logits, int64_t B, int64_t h, int64_t w, int64_t H,
                                int64_t W, float alpha);
// out[q] = max_r <query[q], refs[r]>: query [Q,D], refs [R,D], R >= 1. GEMMs over blocks of at most 1024
// queries x 2048 references (8 MiB of scratch); AGPT_ERR_OOM when that scratch cannot be had.
Status cpu_max_dot(float *out, const float *query, const float *refs, int64_t Q, int64_t R, int64_t D);
// logits [B,2,N] -> out [B,N]: softmax over the 2 classes, class 1.
void cpu_softmax2_class1(float *out, const float *logits, int64_t B, int64_t N);
void cpu_axpy(float *y, const float *x, int64_t n, float alpha);  // y += alpha * x
void cpu_affine(float *x, int64_t n, float a, float b);            // x = a * x + b
// img [B,C,H,W] -> out [B, (H/p)*(W/p), C*p*p], rows in (py, px) order, columns in (c, i, j) order.
void cpu_im2patches(float *out, const float *img, int64_t B, int64_t C, int64_t H, int64_t W, int64_t p);

// ---- prompt learner: conv stack (kernels/cpu/conv.c) --------------------------------------------------------
// x [B,Cin,H,W], w [Cout,Cin,k,k], bias [Cout] or NULL -> out [B,Cout,H+2pad-k+1,W+2pad-k+1]; stride 1, zero
// padding. im2col + SGEMM with bounded column scratch (16 MiB, or one output row); AGPT_ERR_OOM without it.
Status cpu_conv2d(float *out, const float *x, const float *w, const float *bias, int64_t B, int64_t Cin, int64_t H,
                  int64_t W, int64_t Cout, int64_t k, int64_t pad);
void cpu_relu(float *out, const float *x, int64_t n);  // out may alias x
// x [BC,H,W] -> out [BC,H/2,W/2], 2x2 windows, floor.
void cpu_maxpool2x2(float *out, const float *x, int64_t BC, int64_t H, int64_t W);

// ---- embedding lookup (kernels/cpu/embedding.c) -------------------------------------------------------------
// out[i] = table[ids[i]] for i < N: table [V,C], out [N,C]; ids already checked to be in [0,V).
void cpu_embedding(float *out, const float *table, const int32_t *ids, int64_t N, int64_t C);
// cache[b * max_seq + pos[b]] = rows[b] for b < B: cache [B * max_seq, C], rows [B,C]; pos already checked.
void cpu_kv_append(float *cache, const float *rows, const int32_t *pos, int64_t B, int64_t C, int64_t max_seq);
// Decode attention over per-sequence lengths (kernels/cpu/attention.c): q, out [B,1,H,D], k, v [B,S,H,D],
// lengths [B] already checked to be in [1,S]; sequence b is cpu_attention(causal) over its first lengths[b] keys.
void cpu_attention_decode(float *out, const float *q, const float *k, const float *v, const int32_t *lengths,
                          int64_t B, int64_t S, int64_t H, int64_t D, float scale);

// ---- sampling (kernels/cpu/sample.c): the one host implementation, model/sampler.c calls it too ------------
// HF's warpers over logits [V] (f32, V >= 1): scores = logits / temperature (skipped at exactly 1.0); top-k
// (<= 0 or >= V disables) removes every score below the k-th largest; top-p (< 1) removes the ascending order's
// tokens while their cumulative probability is <= 1 - top_p, never the largest. probs [V] gets the renormalised
// distribution (0 for removed tokens); order [V] (ids sorted ascending) and scratch [V] are work space.
// A NaN logit is AGPT_ERR_ARG.
Status cpu_sample_distribution(float *probs, int32_t *order, float *scratch, const float *logits, int64_t V,
                               float temperature, int top_k, float top_p);
// Inverse CDF over probs [V] in id order with uniform in [0,1); the last token with mass takes any remainder.
int32_t cpu_sample_draw(const float *probs, int64_t V, double uniform);
// The first maximum (torch.argmax); a NaN logit is AGPT_ERR_ARG.
Status cpu_sample_greedy(int32_t *token, const float *logits, int64_t V);
// greedy ? cpu_sample_greedy : cpu_sample_distribution then cpu_sample_draw, with malloc'd scratch (OOM fails).
Status cpu_sample(int32_t *token, const float *logits, int64_t V, float temperature, int top_k, float top_p,
                  double uniform, bool greedy);

// ---- losses (kernels/cpu/loss.c) -----------------------------------------------------------------------------
// Fused cross-entropy over logits [rows, V], targets already checked (ignore_index or in [0,V)): per counted row,
// max-subtracted log-sum-exp with the exponentials summed in double; *loss_sum (if not NULL) = the sum of the
// rows' losses in row order, in double; dlogits (if not NULL) = grad_scale * (softmax - onehot), 0 on ignored
// rows. dlogits may equal logits. AGPT_ERR_OOM when the per-row loss scratch (rows doubles) cannot be had.
Status cpu_cross_entropy(double *loss_sum, float *dlogits, const float *logits, const int32_t *targets,
                         int64_t rows, int64_t V, int32_t ignore_index, float grad_scale);

// ---- training: backward of the vision path and the prompt learner, pixel losses -------------------------------
// (kernels/cpu/conv.c, vision.c, loss.c; shapes already checked by kernels/ops.c.) Those that allocate scratch
// return a Status (AGPT_ERR_OOM without it).
// op_conv2d's backward: dx [B,Cin,H,W] overwritten (NULL: skipped), dw [Cout,Cin,k,k] and dbias [Cout] accumulated
// (NULL: skipped). im2col + SGEMM per chunk of output rows; dw and dbias summed in double where the sums are long.
Status cpu_conv2d_backward(float *dx, float *dw, float *dbias, const float *dout, const float *x, const float *w,
                           int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t k, int64_t pad);
void cpu_relu_backward(float *dx, const float *dout, const float *y, int64_t n);  // dx may alias dout
// x [BC,H,W], dout [BC,H/2,W/2] -> dx [BC,H,W] overwritten.
void cpu_maxpool2x2_backward(float *dx, const float *dout, const float *x, int64_t BC, int64_t H, int64_t W);
// dout [BC,H,W] -> dx [BC,h,w] overwritten: the transpose of cpu_upsample_bilinear.
Status cpu_upsample_bilinear_backward(float *dx, const float *dout, int64_t BC, int64_t h, int64_t w, int64_t H,
                                      int64_t W);
void cpu_l2_normalize_backward(float *dx, const float *dout, const float *x, int64_t rows, int64_t C, float eps);
// focal, dice (either may be NULL) and dp1 += scale * the gradient (NULL: none); p1, gt, dp1 [B,H,W].
Status cpu_pixel_loss(double *focal, double *dice, float *dp1, const float *p1, const float *gt, int64_t B,
                      int64_t H, int64_t W, float scale);
// dp1 [B,H,W], logits [B,2,h,w] -> dlogits [B,2,h,w] overwritten.
Status cpu_upsample_softmax2_backward(float *dlogits, const float *dp1, const float *logits, int64_t B, int64_t h,
                                      int64_t w, int64_t H, int64_t W);
