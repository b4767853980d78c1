// One ImageBind transformer block (BlockWithMasking in ImageBind's transformer.py), forward and backward:
//   x = x + out_proj(attention(LN1(x)));   x = x + fc2(gelu(fc1(LN2(x))))
// pre-LayerNorm (eps 1e-6), nn.MultiheadAttention with a packed in_proj (qkv bias), exact erf GELU, no layer
// scale, no dropout. The same block serves the vision trunk (no mask) and the text trunk (causal mask).
//
// Layout: batch-first [B,T,C]. ImageBind runs its trunk sequence-first [T,B,C]; per token the math is the
// same, so only the loader and the layer taps need to know (a tap [T,B,C] is the transpose of ours).
// Written over kernels/ops.h only, so it runs on any backend; all tensors live on the engine's device.
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "kernels/engine.h"
#include "runtime/memory.h"

typedef struct VitBlockConfig {
    int dim;         // C: 1280 vision, 1024 text
    int heads;       // H: 16 (head dim 80 vision, 64 text)
    int mlp_hidden;  // 4C
    float eps;       // LayerNorm eps, 1e-6
    bool causal;     // text trunk: query i sees keys j <= i
} VitBlockConfig;

// The block's parameters under ImageBind's state_dict names. The same struct holds their gradients.
typedef struct VitBlockWeights {
    Tensor norm_1_w;    // [C]       norm_1.weight
    Tensor norm_1_b;    // [C]       norm_1.bias
    Tensor in_proj_w;   // [3C, C]   attn.in_proj_weight: rows [0,C) Wq, [C,2C) Wk, [2C,3C) Wv
    Tensor in_proj_b;   // [3C]      attn.in_proj_bias, same order
    Tensor out_proj_w;  // [C, C]    attn.out_proj.weight
    Tensor out_proj_b;  // [C]       attn.out_proj.bias
    Tensor norm_2_w;    // [C]       norm_2.weight
    Tensor norm_2_b;    // [C]       norm_2.bias
    Tensor fc1_w;       // [4C, C]   mlp.fc1.weight
    Tensor fc1_b;       // [4C]      mlp.fc1.bias
    Tensor fc2_w;       // [C, 4C]   mlp.fc2.weight
    Tensor fc2_b;       // [C]       mlp.fc2.bias
} VitBlockWeights;

// Everything the forward pass saves for the backward pass, plus the block output.
typedef struct VitBlockActs {
    int B, T;
    Tensor ln1;        // [B,T,C]    LN1(x)
    Tensor ln1_mean;   // [B*T]
    Tensor ln1_rstd;   // [B*T]
    Tensor q;          // [B,T,H,D]  LN1(x) Wq^T + bq
    Tensor k;          // [B,T,H,D]
    Tensor v;          // [B,T,H,D]
    Tensor att;        // [B,T,H,D]  softmax(q k^T / sqrt(D) + mask) v, heads side by side = [B,T,C]
    Tensor res1;       // [B,T,C]    x + out_proj(att): the residual stream after attention
    Tensor ln2;        // [B,T,C]    LN2(res1)
    Tensor ln2_mean;   // [B*T]
    Tensor ln2_rstd;   // [B*T]
    Tensor fc1;        // [B,T,4C]   fc1 output, before GELU
    Tensor gelu;       // [B,T,4C]
    Tensor out;        // [B,T,C]    the block output: res1 + fc2(gelu)
} VitBlockActs;

// Scratch for one backward pass; not kept between calls, so one can serve every block of a trunk.
typedef struct VitBlockScratch {
    Tensor d_ln;      // [B,T,C]    gradient at LN2's output, then at LN1's output
    Tensor d_res1;    // [B,T,C]    gradient at the residual stream after attention
    Tensor d_att;     // [B,T,C]    gradient at the attention output
    Tensor d_q;       // [B,T,H,D]
    Tensor d_k;       // [B,T,H,D]
    Tensor d_v;       // [B,T,H,D]
    Tensor d_tmp;     // [B,T,C]    one branch's share before it is summed
    Tensor d_gelu;    // [B,T,4C]
    Tensor d_fc1;     // [B,T,4C]
} VitBlockScratch;

// Checks the config (dim divisible by heads, positive sizes).
Status vit_block_config_check(const VitBlockConfig *c);

// Bytes an Arena needs for vit_block_acts_carve and vit_block_scratch_carve, alignment padding included.
// Sized for f32 activations, so they also suffice for f16/bf16.
size_t vit_block_activation_bytes(const VitBlockConfig *c, int B, int T);
size_t vit_block_scratch_bytes(const VitBlockConfig *c, int B, int T);
// Carve the tensors from an arena on the engine's device; dt is the activation dtype (the weights' dtype).
Status vit_block_acts_carve(const VitBlockConfig *c, int B, int T, DType dt, Arena *arena, VitBlockActs *a);
Status vit_block_scratch_carve(const VitBlockConfig *c, int B, int T, DType dt, Arena *arena,
                               VitBlockScratch *s);

// Forward: x [B,T,C] -> a->out [B,T,C]; fills every saved activation. x is only read.
Status vit_block_forward(Engine *e, const VitBlockConfig *c, const VitBlockWeights *w, VitBlockActs *a,
                         const Tensor *x);

// Backward of the forward just run on x. dout [B,T,C] is the gradient at a->out. dx [B,T,C] is overwritten
// and may alias dout (it is written last), so a trunk can pass one gradient buffer down its blocks.
// Parameter gradients in g are accumulated (+=), as everywhere in kernels/ops.h; zero them before the first
// micro-batch.
Status vit_block_backward(Engine *e, const VitBlockConfig *c, const VitBlockWeights *w, VitBlockWeights *g,
                          const VitBlockActs *a, VitBlockScratch *s, const Tensor *x, const Tensor *dout,
                          Tensor *dx);
