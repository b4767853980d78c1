// The one op interface. Every op takes the Engine and tensors; it checks shapes, dtypes and devices, then
// dispatches to the CPU backend (kernels/cpu, fp32, the reference) or the CUDA backend (kernels/cuda, f32, f16
// or bf16 storage with fp32 accumulation) according to the engine's device. Every tensor must live on the
// engine's device. model/ code calls only these functions.
//
// Conventions
// - Row ops (norms, activations, softmax) work on the last dimension; all other dims are "rows".
// - Backward: activation gradients (dx, dq, ...) are overwritten; parameter gradients (dw, db) are
//   accumulated (+=), so gradient accumulation over micro-batches needs no extra buffer.
// - Statistics saved for backward (mean, rstd) are f32 [rows] on the engine's device; pass NULL when no
//   backward will follow.
// - `out` may alias an input only where the comment says so.
#pragma once
#include <stdbool.h>

#include "kernels/engine.h"

// out = alpha * op(a) @ op(b) + beta * out (+ bias broadcast over rows)
//   op(a): [M,K] (a is [K,M] when trans_a) or batched [B,M,K]
//   op(b): [K,N] (b is [N,K] when trans_b) or batched [B,K,N]; a 2-D b with a 3-D a is shared by the batch
//   bias: [N] or NULL;   out: [M,N] or [B,M,N]
Status op_matmul(Engine *e, Tensor *out, const Tensor *a, const Tensor *b, const Tensor *bias, bool trans_a,
                 bool trans_b, float alpha, float beta);
// Gradients of out = op(a) @ op(b): da and db overwritten, or accumulated when `accumulate`. Either may be NULL.
Status op_matmul_backward(Engine *e, Tensor *da, Tensor *db, const Tensor *dout, const Tensor *a, const Tensor *b,
                          bool trans_a, bool trans_b, bool accumulate);

// A linear layer as PyTorch stores it: out[..., N] = x[..., K] @ w[N,K]^T + bias[N] (bias may be NULL).
Status op_linear(Engine *e, Tensor *out, const Tensor *x, const Tensor *w, const Tensor *bias);
// CPU, bf16 weights, >= 16 rows: round the activations to bf16 and use avx512_bf16 dot products (PyTorch's bf16
// numerics, up to 2x the f32 rate). Off by default (or AGPT_CPU_BF16_GEMM=1); returns whether it will run.
bool ops_set_cpu_bf16_activations(bool on);
// dx = dout @ w (overwritten; NULL to skip), dw += dout^T @ x, dbias += sum over rows of dout (NULL to skip).
Status op_linear_backward(Engine *e, Tensor *dx, Tensor *dw, Tensor *dbias, const Tensor *dout, const Tensor *x,
                          const Tensor *w);

// out = a + b (same shape; out may alias a or b). The residual add.
Status op_add(Engine *e, Tensor *out, const Tensor *a, const Tensor *b);

// LayerNorm over the last dim: out = (x - mean) * rstd * w + b. w, b: [C].
Status op_layernorm(Engine *e, Tensor *out, Tensor *mean, Tensor *rstd, const Tensor *x, const Tensor *w,
                    const Tensor *b, float eps);
Status op_layernorm_backward(Engine *e, Tensor *dx, Tensor *dw, Tensor *db, const Tensor *dout, const Tensor *x,
                             const Tensor *w, const Tensor *mean, const Tensor *rstd);

// RMSNorm (LLaMA): out = x * rsqrt(mean(x^2) + eps) * w. w: [C].
Status op_rmsnorm(Engine *e, Tensor *out, Tensor *rstd, const Tensor *x, const Tensor *w, float eps);
Status op_rmsnorm_backward(Engine *e, Tensor *dx, Tensor *dw, const Tensor *dout, const Tensor *x, const Tensor *w,
                           const Tensor *rstd);

// Residual add fused with the norm that follows it (the pre-norm blocks' "x = x + branch; n = norm(x)"):
//   sum = a + b   (written: it is the residual stream the next add reads)
//   out = layernorm(sum) * w + bias   /   out = rmsnorm(sum) * w
// exactly op_add then op_layernorm / op_rmsnorm (bit for bit on the CPU; on CUDA the norm reads the sum as
// rounded to the storage dtype, as the unfused pair does), but one pass over memory: a and b are read once, sum
// and out written once. mean/rstd as in op_layernorm/op_rmsnorm (f32 [rows] or NULL), so the backward of the
// unfused norm applies unchanged. sum may alias a or b; out must alias none of a, b, sum.
Status op_add_layernorm(Engine *e, Tensor *sum, Tensor *out, Tensor *mean, Tensor *rstd, const Tensor *a,
                        const Tensor *b, const Tensor *w, const Tensor *bias, float eps);
Status op_add_rmsnorm(Engine *e, Tensor *sum, Tensor *out, Tensor *rstd, const Tensor *a, const Tensor *b,
                      const Tensor *w, float eps);

// Exact GELU: out = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). out may alias x.
Status op_gelu(Engine *e, Tensor *out, const Tensor *x);
Status op_gelu_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *x);

// SwiGLU (LLaMA MLP): out = silu(gate) * up, silu(g) = g / (1 + exp(-g)). All the same shape.
Status op_swiglu(Engine *e, Tensor *out, const Tensor *gate, const Tensor *up);
Status op_swiglu_backward(Engine *e, Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate,
                          const Tensor *up);

// Row softmax over the last dim: out = softmax(scale * x). out may alias x.
Status op_softmax(Engine *e, Tensor *out, const Tensor *x, float scale);
// dx = scale * y * (dout - sum(dout * y)), y the forward output.
Status op_softmax_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *y, float scale);

// Multi-head attention, heads kept interleaved as the QKV projection writes them:
//   q: [B,Tq,H,D]   k, v: [B,Tk,H,D]   out: [B,Tq,H,D]
// out = softmax(scale * q k^T + mask) v. With `causal`, query i sees keys j <= i + (Tk - Tq), so a decode
// step (Tq = 1) over a cache of Tk keys sees them all. This is the plain reference attention; the fused
// fast kernels come later behind the same call.
Status op_attention(Engine *e, Tensor *out, const Tensor *q, const Tensor *k, const Tensor *v, bool causal,
                    float scale);
Status op_attention_backward(Engine *e, Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                             const Tensor *k, const Tensor *v, bool causal, float scale);

// Rotary position embedding with rotate-half pairing (HF LLaMA): for each head vector x of dim D and
// i < D/2, angle = pos * base^(-2i/D): (x_i, x_{i+D/2}) -> (x_i cos - x_{i+D/2} sin, x_{i+D/2} cos + x_i sin).
//   x, out: [B,T,H,D]   positions: i32 [B,T]. out may alias x.
Status op_rope(Engine *e, Tensor *out, const Tensor *x, const Tensor *positions, float base);
// The rotation is orthogonal, so the backward is the rotation by -angle.
Status op_rope_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *positions, float base);

// dst = src, same dtype and element count, both on the engine's device, in the engine's stream order.
Status op_copy(Engine *e, Tensor *dst, const Tensor *src);

// Dtype conversion on the engine's device (f32, f16, bf16), round to nearest even. Same element count.
Status op_cast(Engine *e, Tensor *out, const Tensor *x);

// AdamW step (decoupled weight decay, PyTorch semantics), in place on f32 param, m and v:
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd p)
// `step` is t, starting at 1.
Status op_adamw(Engine *e, Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1,
                float beta2, float eps, float weight_decay, int step);

// Sum of squares of all elements, accumulated in double on the CPU and in f32 per block then double on the
// device; written to *result on the host. Gradient-norm clipping uses it.
Status op_sum_squares(Engine *e, double *result, const Tensor *x);

// Multiplies every element by s in place (f32/f16/bf16).
Status op_scale(Engine *e, Tensor *x, float s);

// ---- vision path: anomaly maps and patch embedding --------------------------------------------------------

// Rows scaled to unit L2 norm over the last dim: out = x / max(||x||, eps). eps = 0 is plain division, as the
// reference's `x / x.norm(dim=-1, keepdim=True)`. out may alias x.
Status op_l2_normalize(Engine *e, Tensor *out, const Tensor *x, float eps);

// Bilinear resize with align_corners=True (PyTorch F.interpolate(mode="bilinear", align_corners=True)):
//   x [B,C,h,w] -> out [B,C,H,W]; output pixel y samples source row y * (h-1)/(H-1).
Status op_upsample_bilinear(Engine *e, Tensor *out, const Tensor *x);

// For each query row, the largest dot product with any reference row: out[q] = max_r <query[q], refs[r]>.
//   query [Q,D], refs [R,D], out [Q]. With rows L2-normalised first (op_l2_normalize, eps 1e-8) this is the
//   few-shot map's max cosine similarity (F.cosine_similarity's normalise-first form).
Status op_max_dot(Engine *e, Tensor *out, const Tensor *query, const Tensor *refs);

// Two-class softmax over dim 1, keeping class 1 ("abnormal"): logits [B,2,N] -> out [B,N],
//   out[b,i] = exp(l1) / (exp(l0) + exp(l1)) computed with the max subtracted, as torch.softmax does.
Status op_softmax2_class1(Engine *e, Tensor *out, const Tensor *logits);

// y += alpha * x (same shape).
Status op_axpy(Engine *e, Tensor *y, const Tensor *x, float alpha);
// The anomaly map's per-layer step in one pass: out += alpha * softmax2_class1(upsample_bilinear(logits)):
//   logits [B,2,h,w] (class 0, class 1 score grids) -> out [B,H,W], accumulated; with alpha = 1/L over the L
//   decoder layers it builds the layer mean. The same arithmetic as op_upsample_bilinear, then op_softmax2_class1
//   on the result seen as [B,2,H*W], then op_axpy (bit for bit on the CPU), but the two upsampled planes and the
//   probabilities never go through memory: each output pixel reads its 2 x 4 grid values and out once. On
//   f16/bf16 it is more accurate than the unfused ops, which round the planes and probabilities to the storage
//   type. out must not alias logits.
Status op_upsample_softmax2_axpy(Engine *e, Tensor *out, const Tensor *logits, float alpha);
// x = a * x + b elementwise, in place.
Status op_affine(Engine *e, Tensor *x, float a, float b);

// Non-overlapping p x p patches of images as rows, for the patch embedding as one GEMM:
//   img [B,C,H,W] -> out [B, (H/p)*(W/p), C*p*p]; patch index py*(W/p) + px; within a row the order is
//   (c, i, j), the order a Conv2d weight [O,C,p,p] flattens in. H and W must be multiples of p.
Status op_im2patches(Engine *e, Tensor *out, const Tensor *img, int patch);

// ---- prompt learner: the anomaly map's conv stack ---------------------------------------------------------

// 2-D convolution, stride 1, zero padding `padding` on every side (PyTorch Conv2d(k, padding=p)):
//   x [B,Cin,H,W], w [Cout,Cin,k,k], bias [Cout] or NULL -> out [B,Cout,H+2p-k+1,W+2p-k+1].
// out must not alias x.
Status op_conv2d(Engine *e, Tensor *out, const Tensor *x, const Tensor *w, const Tensor *bias, int padding);
// out = max(x, 0) elementwise (NaN stays NaN, as torch.relu). out may alias x.
Status op_relu(Engine *e, Tensor *out, const Tensor *x);
// 2x2 max pooling, stride 2, floor (PyTorch MaxPool2d(2)): x [B,C,H,W] -> out [B,C,H/2,W/2]; an odd last
// row or column is dropped. A NaN in a window wins. out must not alias x.
Status op_maxpool2x2(Engine *e, Tensor *out, const Tensor *x);

// ---- training: backward of the vision path and the prompt learner, pixel losses ----------------------------
// f32 on the CPU (the reference: double sums where they are long, deterministic whatever the thread count);
// f32, f16 or bf16 storage on CUDA with f32 math (which results use atomics, and so are not bitwise reproducible
// there, is said per op in kernels/cuda/cuda_ops.h).

// Backward of op_conv2d (stride 1, zero padding p): x [B,Cin,H,W], w [Cout,Cin,k,k], dout [B,Cout,Ho,Wo].
// dx overwritten (NULL: skipped), dw and dbias accumulated (+=; either may be NULL).
Status op_conv2d_backward(Engine *e, Tensor *dx, Tensor *dw, Tensor *dbias, const Tensor *dout, const Tensor *x,
                          const Tensor *w, int padding);
// dx = dout where y > 0, else 0 (y = relu output or its input; same thing for the mask). dx may alias dout.
// A NaN y passes dout, as PyTorch's threshold_backward (y <= 0 is false for NaN).
Status op_relu_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *y);
// Backward of op_maxpool2x2: each dout element goes to the position of its window's maximum (the first in
// row-major window order on ties, as PyTorch's CPU kernel; a NaN wins as in the forward); every other dx element 0.
// x [B,C,H,W], dout [B,C,H/2,W/2], dx [B,C,H,W] overwritten (odd last row/col get 0).
Status op_maxpool2x2_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *x);
// Backward of op_upsample_bilinear (align_corners=True): dout [B,C,H,W] -> dx [B,C,h,w] overwritten (the transpose
// of the interpolation; on CPU a deterministic gather or per-row scatter, never atomics-order dependent on CPU).
Status op_upsample_bilinear_backward(Engine *e, Tensor *dx, const Tensor *dout);
// Backward of op_l2_normalize (y = x / max(||x||, eps) per row of the last dim): dx overwritten. dx may alias dout.
Status op_l2_normalize_backward(Engine *e, Tensor *dx, const Tensor *dout, const Tensor *x, float eps);
// The reference's pixel losses on one decoder layer's map (anomalygpt-reference.md 6.5) and their gradient:
//   p1 [B,H,W] f32 = the "abnormal" probability (softmax channel 1; channel 0 is 1 - p1), gt [B,H,W] f32 in {0,1}
//   (class 1 where gt > 0.5 for the focal loss; the Dice sums use gt as given).
//   focal = mean over B*H*W pixels of -(1-pt)^2 ln(pt), pt = (1-1e-5) p_g + 1e-5 p_{1-g} + 1e-5 (gamma 2, smooth
//   1e-5, alpha 1)
//   dice  = 1 - mean_b (2 sum(p1 g) + 1) / (sum p1 + sum g + 1)
//   *focal, *dice written (host doubles; either may be NULL); dp1 [B,H,W] f32: dp1 += scale * d(focal + dice)/d p1
//   (accumulated; NULL: no gradient). Note the focal loss in PyTorch sees both channels p0 = 1 - p1 and p1; the
//   gradient w.r.t. p1 here is the total derivative through p0 = 1 - p1.
Status op_pixel_loss(Engine *e, double *focal, double *dice, Tensor *dp1, const Tensor *p1, const Tensor *gt,
                     float scale);
// Backward of the map's per-layer step p1 = softmax2_class1(upsample_bilinear(logits)) given d p1: logits
// [B,2,h,w], dp1 [B,H,W] -> dlogits [B,2,h,w] overwritten. Recomputes p1 from the logits (no upsampled planes in
// memory): with u = upsampled logits, d u1 = dp1 * p1 (1 - p1), d u0 = -d u1, then the upsample transpose.
Status op_upsample_softmax2_backward(Engine *e, Tensor *dlogits, const Tensor *dp1, const Tensor *logits);

// ---- embedding lookup -------------------------------------------------------------------------------------

// Row gather: out[i] = table[ids[i]] for i < N. table [V,C] and out [N,C] share the dtype (f32 on the CPU;
// f32, f16 or bf16 on CUDA) and live on the engine's device; ids is an i32 tensor [N] that is always on the
// host (DEV_CPU), since callers hold token ids there. Every id must be in [0,V): checked on the host, and a bad
// one fails naming the id and its position. On CUDA the ids go to the device through e->workspace with one
// stream-ordered copy (in chunks if they do not fit), then one gather kernel; the caller may reuse the ids
// buffer as soon as the call returns. out must not alias table.
Status op_embedding(Engine *e, Tensor *out, const Tensor *table, const Tensor *ids);

// ---- decode steps over device-side lengths (replayable CUDA graphs) ---------------------------------------
// The ops a decode step needs so that nothing in it depends on host values that change from step to step: the
// token ids, positions and attention lengths are i32 arrays on the engine's device (on the CPU engine that is
// host memory), written before the step (engine_memcpy_async) and read by the kernels. A CUDA graph of these
// ops can then be captured once and replayed unchanged at every position (model/llama.h, KvCache.use_graph).
// (RoPE needs no variant: op_rope already reads its positions from a device tensor.)

// op_embedding with the ids on the engine's device: ids i32 [N], out [N,C], table [V,C]. The ids cannot be
// checked on the host when they live on the GPU: the caller checks them before the upload; on CUDA an id
// outside [0,V) gives a zero row rather than reading out of bounds. On the CPU a bad id fails as in op_embedding.
Status op_embedding_dev(Engine *e, Tensor *out, const Tensor *table, const Tensor *ids);

// Appends one row per sequence to a KV cache laid out as sequence b's position t at row b * max_seq + t:
//   cache [>= B * max_seq, C], rows [B,C], pos i32 [B] on the engine's device: cache[b * max_seq + pos[b]] =
//   rows[b], an exact copy. On the CPU a pos outside [0, max_seq) fails; on CUDA such a row is skipped.
//   rows must not alias cache.
Status op_kv_append(Engine *e, Tensor *cache, const Tensor *rows, const Tensor *pos, int64_t max_seq);

// Decode attention (one query per sequence) over a cache with per-sequence lengths in device memory:
//   q, out: [B,1,H,D]   k, v: [B,S,H,D] (the cache of B sequences of up to S positions)   lengths i32 [B]
// out[b] = softmax(scale * q[b] k[b, 0..L_b)^T) v[b, 0..L_b), L_b = lengths[b] read on the device. Equal, bit
// for bit, to op_attention(causal) of q[b] over the first L_b keys of sequence b, on both backends: on CUDA the
// same kernels run (the flash split-K decode for f16/bf16 with D in {64,80,128}: its grid is sized for S and each
// sequence uses the split count op_attention would choose for it alone, surplus splits exiting; the simple kernel
// otherwise). On the CPU a length outside [1,S] fails; on CUDA it is clamped to [0,S] (0 gives a zero row).
Status op_attention_decode(Engine *e, Tensor *out, const Tensor *q, const Tensor *k, const Tensor *v,
                           const Tensor *lengths, float scale);

// ---- sampling ---------------------------------------------------------------------------------------------

// One next token from logits [V] (f32 on the CPU; f32, f16 or bf16 on CUDA; on the engine's device), written to
// *token on the host. The semantics of model/sampler.h: greedy is the first maximum (torch.argmax) and ignores
// the other arguments; otherwise scores = logits / temperature (skipped at exactly 1.0), top-k (<= 0 disables)
// keeps every score at least the k-th largest, top-p in (0, 1] (1 disables) removes the ascending order's tokens
// while their cumulative probability stays <= 1 - top_p (never the largest), then the inverse CDF of the
// renormalised distribution at `uniform` (in [0,1), drawn by the caller's seeded RNG) picks the token. For the
// same logits and uniform both backends return the token model/sampler.c does (up to float rounding of the
// exponentials at an exact boundary). A NaN logit is AGPT_ERR_ARG. On CUDA one block does the work with
// scratch in e->workspace (a bitonic sort of (score, id) pairs), then the call waits for the token.
Status op_sample(Engine *e, int32_t *token, const Tensor *logits, float temperature, int top_k, float top_p,
                 double uniform, bool greedy);

// ---- losses -----------------------------------------------------------------------------------------------

// Fused cross-entropy, forward and backward in one call (torch.nn.functional.cross_entropy with
// reduction="sum" and ignore_index, plus its gradient): for each row r of logits [..., V] (all leading dims
// are rows R; f32 on the CPU; f32, f16 or bf16 on CUDA; on the engine's device) with target y = targets[r]:
//   loss_r = logsumexp(logits[r]) - logits[r, y]     (max subtracted: any finite magnitude is safe)
//   dlogits[r] = grad_scale * (softmax(logits[r]) - onehot(y))
// Rows whose target equals ignore_index (-100 for the HF loss) count nothing and get dlogits[r] = 0.
// targets is a host i32 tensor with R elements (DEV_CPU, like op_embedding's ids: callers hold labels there);
// every target is ignore_index or in [0,V), checked on the host, a bad one fails naming it and its row.
// *loss_sum (host) = the sum of loss_r over the counted rows: accumulated in double on the CPU; on CUDA each row's
// loss is f32 and the host sums them in double in row order (deterministic), which waits for the stream. The
// caller divides by its count (mean) or passes grad_scale = 1/count. loss_sum may be NULL (no loss: on CUDA
// no wait), dlogits may be NULL (no gradient). dlogits has logits' shape and dtype and may be logits itself
// (the gradient overwrites the logits in place: every row is read completely before it is written); no other
// overlap. A non-finite logit makes that row's loss and gradient NaN (never an error here).
// On CUDA the targets go to the device through e->workspace (one stream-ordered copy per chunk of rows, with
// the per-row losses beside them), then one block per row: an online max/sum pass over V, then the write pass.
Status op_cross_entropy(Engine *e, double *loss_sum, Tensor *dlogits, const Tensor *logits, const Tensor *targets,
                        int32_t ignore_index, float grad_scale);
