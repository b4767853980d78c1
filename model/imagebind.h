// ImageBind's vision and text encoders (the parts AnomalyGPT uses), over kernels/ops.h.
//
// Vision (anomalygpt-reference.md 1.2): patch stem (the Conv3d of kernel (2,p,p) over two identical frames,
// folded into one p x p conv without bias and run as a GEMM over patches), CLS token, positional embedding,
// pre-transformer LayerNorm, N pre-LN blocks with taps, head LayerNorm on CLS, projection, L2 normalise.
// Text (2.2): token and positional embedding, N causal blocks, the end-of-text token, LayerNorm, projection,
// L2 normalise, times the logit scale.
//
// Weights are read under ImageBind's state_dict names (section 8); every dimension comes from the tensors'
// shapes, the head counts and taps from the file's metadata ("vision.heads", "text.heads", "vision.taps";
// defaults 16, 16 and the evenly spaced n/4-1, n/2-1, 3n/4-1, n-1). Activations are batch-first [B,T,C];
// the taps are the residual stream after the tapped blocks, CLS at row 0.
#pragma once
#include "model/vit_block.h"
#include "model/weights.h"

#define VISION_TAPS 4

typedef struct VisionEncoder {
    VitBlockConfig block;       // width C, heads, MLP width, eps 1e-6, not causal
    int layers;                 // 32 for ImageBind-H
    int patch;                  // p = 14
    int image;                  // S = 224
    int grid;                   // S / p = 16
    int tokens;                 // T = grid^2 + 1 = 257
    int embed;                  // E = 1024
    int taps[VISION_TAPS];      // block indices whose outputs are tapped: 7, 15, 23, 31
    Tensor patch_w;             // [C, 3*p*p]  Conv3d weight summed over its 2 frames, flattened (c, i, j)
    Tensor cls;                 // [1,1,C]
    Tensor pos;                 // [1,T,C]
    Tensor pre_ln_w, pre_ln_b;  // [C]
    VitBlockWeights *blocks;    // [layers]
    Tensor head_ln_w, head_ln_b;// [C]
    Tensor head_proj;           // [E, C]
} VisionEncoder;

typedef struct TextEncoder {
    VitBlockConfig block;       // width C, heads, MLP width, eps 1e-6, causal
    int layers;                 // 24
    int context;                // 77
    int vocab;                  // 49408
    int embed;                  // E = 1024
    float logit_scale;          // clip(exp(log_logit_scale), max 100)
    Tensor token_emb;           // [V, C]
    Tensor pos;                 // [1, context, C]
    VitBlockWeights *blocks;    // [layers]
    Tensor head_ln_w, head_ln_b;// [C]
    Tensor proj;                // [E, C]
} TextEncoder;

// Loads from the store's file; the block array is heap-allocated (vision_free / text_free release it; the
// tensors belong to the WeightStore).
Status vision_load(VisionEncoder *v, WeightStore *w);
void vision_free(VisionEncoder *v);
Status text_load(TextEncoder *t, WeightStore *w);
void text_free(TextEncoder *t);

// Random weights of any size (ImageBind-H: 1280, 16, 32, 5120, 14, 224, 1024), for benchmarks. The store needs
// no file: pass one with no tensors or any file; only weights_upload is used.
Status vision_init_random(VisionEncoder *v, WeightStore *w, int width, int heads, int layers, int mlp, int patch,
                          int image, int embed, uint64_t seed);
// Multiply-adds x 2 of one image's forward (ImageBind-H: about 335 GFLOP).
double vision_flops_per_image(const VisionEncoder *v);

// The patch stem: images [B,3,S,S] -> x0 [B,T,C] = LN_pre([CLS; patches W^T] + pos), the first block's input.
// Its temporaries come from arena and are released before it returns.
Status vision_stem(Engine *e, const VisionEncoder *v, Arena *arena, const Tensor *images, Tensor *x0);
// Arena bytes vision_forward needs for B images (its temporaries; outputs are the caller's).
size_t vision_arena_bytes(const VisionEncoder *v, int B);
// images [B,3,S,S] (normalised) -> embedding [B,E] (L2-normalised) and taps[i] [B,T,C]. Temporaries come from
// the arena and are released before returning.
Status vision_forward(Engine *e, const VisionEncoder *v, Arena *arena, const Tensor *images, Tensor *embedding,
                      Tensor taps[VISION_TAPS]);

// Arena bytes text_forward needs for N sentences of up to `context` tokens.
size_t text_arena_bytes(const TextEncoder *t, int N);
// ids: host [N, context] as the CLIP tokenizer writes them (start, tokens, end, zeros) -> out [N,E], each row
// normalised and times the logit scale. Only positions up to the last end token run: the mask is causal, so
// later positions cannot change the result.
Status text_forward(Engine *e, const TextEncoder *t, Arena *arena, const int32_t *ids, int N, Tensor *out);
