// The LLaMA language model for training with LoRA kept apart (anomalygpt-reference.md 5.2, 5.4): q, k, v and o
// compute W x + scaling * B (A x) with A [r,C] and B [C,r] separate and scaling = lora_alpha / r, as PEFT does
// in training (dropout 0), and the backward of the HF causal-LM loss gives dA, dB for every layer and the
// gradient at the input embeddings (for the prompt learner and llama_proj). The base weights (embeddings, norms,
// q/k/v/o/MLP, lm_head) are frozen and get no gradient. model/llama.h is the inference model (LoRA merged, KV
// cache); this is the full-sequence training forward and backward, written over kernels/ops.h and
// model/llama_block.h, so it runs on the CPU engine and (untested so far) on CUDA.
//
// Loss (HF LlamaForCausalLM with labels): logits[b,t] predicts labels[b,t+1]; label -100 is ignored; the loss is
// the mean cross-entropy over the targets (or the sum over num_items, HF's num_items_in_batch, for gradient
// accumulation). The loss and d logits come from op_cross_entropy on the engine's device in one pass over the
// logits: only the shifted labels go to the device and the loss (one number per row) comes back.
//
// Weights, from a WeightStore (HF names, as model/llama.h lists them, LoRA not merged):
//   model.embed_tokens.weight [V,C], model.layers.N.*, model.norm.weight [C], lm_head.weight [V,C]
//   LoRA factors for every layer's q_proj, k_proj, v_proj, o_proj under the first of the key forms that has
//   layer 0's q_proj A (X = A or B):
//     base_model.model.model.layers.N.self_attn.P.lora_X.weight                 PEFT save_pretrained
//     base_model.model.model.layers.N.self_attn.P.lora_X.default.weight         a PEFT model's state_dict
//     llama_model.base_model.model.model.layers.N.self_attn.P.lora_X.default.weight   PandaGPT / AnomalyGPT
//     model.layers.N.self_attn.P.lora_X.weight                                  plain
//   metadata "lora.alpha" (default r), "llama.heads" (32), "llama.rms_eps" (1e-6), "llama.rope_base" (10000).
#pragma once
#include <stdint.h>

#include "model/llama_block.h"
#include "model/weights.h"
#include "runtime/memory.h"

typedef struct LlamaLoraTrain {
    LlamaBlockConfig block;     // dim C, heads, hidden I, eps, rope_base
    int layers;                 // L
    int vocab;                  // V
    int rank;                   // r
    float alpha;                // lora_alpha
    float scaling;              // alpha / r
    Tensor embed;               // [V,C]  frozen
    LlamaBlockWeights *layer;   // [L]    frozen base weights, LoRA not merged
    Tensor norm;                // [C]    frozen
    Tensor lm_head;             // [V,C]  frozen
    LlamaLoraWeights *lora;     // [L]    A [r,C], B [C,r]: the trainable factors (store-owned private copies,
                                //        writable in place by an optimizer)
    LlamaLoraWeights *grad;     // [L]    dA [r,C], dB [C,r], accumulated by the backward, in the weights'
                                //        dtype on the engine's device (grad_arena)
    Arena grad_arena;
    // With llama_lora_train_enable_head: lm_head and model.norm trained too (not in the reference: for a model
    // trained from scratch, whose random LLaMA cannot be adapted by LoRA alone). f32 only.
    bool train_head;
    Tensor d_lm_head;           // [V,C]  accumulated by the backward
    Tensor d_norm;              // [C]
    Arena head_arena;
} LlamaLoraTrain;

// Reads the config, the base weights and the LoRA factors from the store (a missing tensor or a wrong shape is
// an error naming it) and allocates zeroed gradients.
Status llama_lora_train_load(LlamaLoraTrain *m, WeightStore *w);
void llama_lora_train_free(LlamaLoraTrain *m);
// Sets every dA, dB (and d lm_head, d norm when trained) to zero (before a step's first micro-batch).
Status llama_lora_train_zero_grad(LlamaLoraTrain *m);
// Makes lm_head and model.norm trainable: zeroed f32 gradients, filled by every later backward.
Status llama_lora_train_enable_head(LlamaLoraTrain *m, Engine *e);

// Activations of a forward kept for the backward, sized for exactly B sequences of T tokens, one device arena
// plus small host buffers (positions, shifted labels).
typedef struct LlamaTrainState {
    int B, T;
    Arena arena;
    Tensor x0;                  // [B,T,C]  the input embeddings (copied in)
    Tensor positions;           // i32 [B,T]  0..T-1 per sequence
    LlamaBlockActs *acts;       // [L]  acts[l].out is layer l+1's input
    LlamaLoraActs *lora_acts;   // [L]
    LlamaBlockScratch scratch;
    LlamaLoraScratch lora_scratch;
    Tensor final_n;             // [B,T,C]  model.norm(last layer's out)
    Tensor final_rstd;          // [B*T]
    Tensor logits;              // [B,T,V]
    Tensor d_logits;            // [B,T,V]  set by llama_lora_train_loss
    Tensor d_n;                 // [B,T,C]  gradient at final_n
    Tensor d_x;                 // [B,T,C]  gradient along the residual stream; after the backward, at x0
    int32_t *host_targets;      // [B*T]  the shifted labels: target of logits[b,t] = labels[b,t+1], -100 at t = T-1
    int32_t *host_positions;    // [B*T]
    float loss;                 // the last llama_lora_train_loss
    int n_targets;              // its number of non-ignored targets
    bool have_dlogits;
} LlamaTrainState;

Status llama_train_state_create(LlamaTrainState *s, Engine *e, const LlamaLoraTrain *m, int B, int T);
void llama_train_state_free(LlamaTrainState *s);
size_t llama_train_state_bytes(const LlamaLoraTrain *m, int B, int T);

// Forward from input embeddings embeds [B,T,C] (the model's dtype, on the engine's device): s->logits [B,T,V].
// Positions are 0..T-1 in every sequence, attention causal (no padding mask: right padding only changes padded
// positions, whose labels are -100).
Status llama_lora_train_forward(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s, const Tensor *embeds);
// The same from token ids (host i32 [B*T]) through the frozen embed_tokens.
Status llama_lora_train_forward_tokens(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s, const int32_t *ids);

// The causal-LM loss of the forward just run: labels host i32 [B*T] (-100 = ignored; others in [0,V)), target
// of logits[b,t] = labels[b,t+1]. *loss = sum of the targets' cross-entropy / num_items, where num_items <= 0
// means this batch's number of targets (HF's mean; with no target the loss and d logits are 0). Writes
// s->d_logits for llama_lora_train_backward. loss may be NULL.
Status llama_lora_train_loss(Engine *e, const LlamaLoraTrain *m, LlamaTrainState *s, const int32_t *labels,
                             int num_items, float *loss);

// Backward of that loss: dA, dB accumulated (+=) into m->grad (skipped when train_lora is false: LoRA frozen,
// as in AnomalyGPT), d lm_head and d norm (+=) when m->train_head, and s->d_x [B,T,C] = d loss / d embeds
// (overwritten).
Status llama_lora_train_backward(Engine *e, LlamaLoraTrain *m, LlamaTrainState *s, bool train_lora);
