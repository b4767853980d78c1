// Training the ImageBind vision trunk (`agpt train --train vision`; beyond the reference, whose encoder is
// frozen): the forward of model/imagebind.c with every block's activations kept, and the backward from the
// gradients at the four taps and at the image embedding to the transformer blocks' weights.
//
// Trained: the blocks (norms, attention, MLP). Frozen: the patch stem, the CLS token, the position embedding,
// the pre-LayerNorm and the head (its LayerNorm and projection are only passed through), so the gradient stops
// at the first block's input. Written over kernels/ops.h only, f32.
#pragma once
#include "kernels/engine.h"
#include "model/imagebind.h"
#include "model/vit_block.h"
#include "runtime/memory.h"

// What the backward needs from one forward of B images, in one arena of its own.
typedef struct VisionTrainActs {
    int B, layers;
    VitBlockActs *blocks;  // [layers]: block l's saved activations; blocks[l].out is block l+1's input
    Tensor x0;             // [B,T,C]  the first block's input, LN_pre of the tokens
    Tensor cls_rows;       // [B,C]    the last block's CLS rows (the head's input)
    Tensor cls_mean;       // [B]      the head LayerNorm's statistics
    Tensor cls_rstd;       // [B]
    Tensor head;           // [B,E]    the head projection before the L2 normalisation
    Arena arena;
} VisionTrainActs;

Status vision_train_acts_create(VisionTrainActs *a, Engine *e, const VisionEncoder *v, int B);
void vision_train_acts_free(VisionTrainActs *a);

// As vision_forward (the same ops in the same order, so the same numbers): images [B,3,S,S] -> embedding
// [B,E] and taps[i] [B,T,C], keeping what the backward needs in a. scratch: temporaries, released on return.
Status vision_train_forward(Engine *e, const VisionEncoder *v, Arena *scratch, VisionTrainActs *a,
                            const Tensor *images, Tensor *embedding, Tensor taps[VISION_TAPS]);

// Backward of that forward. d_taps[i] [B,T,C]: the gradients at the taps (NULL: none at all);
// d_embedding [B,E]: at the L2-normalised embedding (NULL: none). Block gradients are accumulated (+=) into
// grads[layers]. scratch: temporaries, released on return.
Status vision_train_backward(Engine *e, const VisionEncoder *v, VitBlockWeights *grads, const VisionTrainActs *a,
                             Arena *scratch, const Tensor *d_taps, const Tensor *d_embedding);

// Arena bytes vision_train_backward needs in scratch for B images.
size_t vision_train_scratch_bytes(const VisionEncoder *v, int B);

// The twelve tensors of a block in a fixed order with their state_dict suffixes ("norm_1.weight", ...), so
// callers can walk parameters and gradients alike.
#define VIT_BLOCK_TENSORS 12
Tensor *vit_block_tensor(VitBlockWeights *w, int i, const char **suffix);
