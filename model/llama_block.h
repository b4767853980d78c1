// One LLaMA decoder layer (HF LlamaDecoderLayer, as in Vicuna-7B), forward and backward:
//   h = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))      n1 = RMSNorm(x)
//   y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                           n2 = RMSNorm(h)
// No biases, causal attention with scale 1/sqrt(head_dim), RoPE with rotate-half pairing, as many key/value
// heads as query heads (LLaMA-1 / Vicuna have no grouped-query attention).
// Layout batch-first [B,T,C]. Written over kernels/ops.h only; all tensors live on the engine's device.
// No KV cache here: this is the full-sequence (prefill / training) layer.
#pragma once
#include <stddef.h>

#include "kernels/engine.h"
#include "runtime/memory.h"

typedef struct LlamaBlockConfig {
    int dim;           // C: 4096 for Vicuna-7B
    int heads;         // H: 32 (head dim D = C / H = 128)
    int hidden;        // I: the MLP width, 11008
    float eps;         // RMSNorm eps, 1e-6
    float rope_base;   // 10000
} LlamaBlockConfig;

// The layer's parameters under HF names (model.layers.<i>. prefix dropped). The same struct holds gradients.
typedef struct LlamaBlockWeights {
    Tensor input_norm;  // [C]      input_layernorm.weight
    Tensor wq;          // [C, C]   self_attn.q_proj.weight
    Tensor wk;          // [C, C]   self_attn.k_proj.weight
    Tensor wv;          // [C, C]   self_attn.v_proj.weight
    Tensor wo;          // [C, C]   self_attn.o_proj.weight
    Tensor post_norm;   // [C]      post_attention_layernorm.weight
    Tensor w_gate;      // [I, C]   mlp.gate_proj.weight
    Tensor w_up;        // [I, C]   mlp.up_proj.weight
    Tensor w_down;      // [C, I]   mlp.down_proj.weight
} LlamaBlockWeights;

// Everything the forward pass saves for the backward pass, plus the layer output.
typedef struct LlamaBlockActs {
    int B, T;
    Tensor n1;         // [B,T,C]    RMSNorm(x) * input_norm
    Tensor n1_rstd;    // [B*T]
    Tensor q;          // [B,T,H,D]  after RoPE
    Tensor k;          // [B,T,H,D]  after RoPE
    Tensor v;          // [B,T,H,D]
    Tensor att;        // [B,T,H,D]  causal softmax(q k^T / sqrt(D)) v, heads side by side = [B,T,C]
    Tensor h;          // [B,T,C]    x + o_proj(att): the residual stream after attention
    Tensor n2;         // [B,T,C]    RMSNorm(h) * post_norm
    Tensor n2_rstd;    // [B*T]
    Tensor gate;       // [B,T,I]    gate_proj(n2)
    Tensor up;         // [B,T,I]    up_proj(n2)
    Tensor swiglu;     // [B,T,I]    silu(gate) * up
    Tensor out;        // [B,T,C]    the layer output: h + down_proj(swiglu)
} LlamaBlockActs;

// Scratch for one backward pass; not kept between calls, so one can serve every layer.
typedef struct LlamaBlockScratch {
    Tensor d_n;        // [B,T,C]    gradient at n2, then at n1
    Tensor d_h;        // [B,T,C]    gradient at the residual stream after attention
    Tensor d_att;      // [B,T,H,D]
    Tensor d_q;        // [B,T,H,D]  at q after RoPE
    Tensor d_k;        // [B,T,H,D]  at k after RoPE
    Tensor d_v;        // [B,T,H,D]
    Tensor d_qk_pre;   // [B,T,H,D]  dq or dk rotated back (before RoPE)
    Tensor d_tmp;      // [B,T,C]    one branch's share before it is summed
    Tensor d_swiglu;   // [B,T,I]
    Tensor d_gate;     // [B,T,I]
    Tensor d_up;       // [B,T,I]
} LlamaBlockScratch;

Status llama_block_config_check(const LlamaBlockConfig *c);

// Bytes an Arena needs for the carve functions, alignment padding included; sized for f32 activations, so
// they also suffice for f16/bf16.
size_t llama_block_activation_bytes(const LlamaBlockConfig *c, int B, int T);
size_t llama_block_scratch_bytes(const LlamaBlockConfig *c, int B, int T);
// Carve the tensors from an arena on the engine's device; dt is the activation dtype (the weights' dtype).
Status llama_block_acts_carve(const LlamaBlockConfig *c, int B, int T, DType dt, Arena *arena, LlamaBlockActs *a);
Status llama_block_scratch_carve(const LlamaBlockConfig *c, int B, int T, DType dt, Arena *arena,
                                 LlamaBlockScratch *s);

// Forward: x [B,T,C] -> a->out [B,T,C]. positions: i32 [B,T], the RoPE position of every token (0..T-1 for a
// fresh sequence). x is only read.
Status llama_block_forward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockActs *a,
                           const Tensor *x, const Tensor *positions);

// Backward of the forward just run on x. dout [B,T,C] is the gradient at a->out; dx [B,T,C] is overwritten
// and may alias dout (it is written last). Parameter gradients in g are accumulated (+=).
Status llama_block_backward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w, LlamaBlockWeights *g,
                            const LlamaBlockActs *a, LlamaBlockScratch *s, const Tensor *x,
                            const Tensor *positions, const Tensor *dout, Tensor *dx);

// ---- LoRA kept apart (training) ----------------------------------------------------------------------------
// The same layer with LoRA on q, k, v and o as PEFT computes it in training (anomalygpt-reference.md 5.2):
//   proj(x) = W x + scaling * B (A x),   A [r,C] (lora_A), B [C,r] (lora_B), scaling = lora_alpha / r
// (dropout 0). The base weights are frozen: the backward gives no gradient for them or the norm weights, only
// dA, dB (when asked) and dx.

enum { LLAMA_LORA_Q, LLAMA_LORA_K, LLAMA_LORA_V, LLAMA_LORA_O, LLAMA_LORA_PROJ };

// One layer's factors; the same struct holds their gradients.
typedef struct LlamaLoraWeights {
    Tensor a[LLAMA_LORA_PROJ];  // [r,C]  self_attn.{q,k,v,o}_proj.lora_A.weight
    Tensor b[LLAMA_LORA_PROJ];  // [C,r]  self_attn.{q,k,v,o}_proj.lora_B.weight
} LlamaLoraWeights;

// What the LoRA branch saves for the backward, besides LlamaBlockActs.
typedef struct LlamaLoraActs {
    Tensor u[LLAMA_LORA_PROJ];  // [B,T,r]  A x of each projection (x = n1 for q, k, v; att for o)
} LlamaLoraActs;

// Scratch for the LoRA branch's backward; one can serve every layer.
typedef struct LlamaLoraScratch {
    Tensor d_u;        // [B,T,r]  gradient at A x
    Tensor d_norm;     // [C]      where the frozen norm weights' gradients go (op_rmsnorm_backward always
                       //          writes one); never read
} LlamaLoraScratch;

// Bytes an Arena needs for llama_block_lora_acts_carve plus llama_block_lora_scratch_carve (f32-sized).
size_t llama_block_lora_bytes(const LlamaBlockConfig *c, int rank, int B, int T);
Status llama_block_lora_acts_carve(const LlamaBlockConfig *c, int rank, int B, int T, DType dt, Arena *arena,
                                   LlamaLoraActs *la);
Status llama_block_lora_scratch_carve(const LlamaBlockConfig *c, int rank, int B, int T, DType dt, Arena *arena,
                                      LlamaLoraScratch *ls);

// Forward with LoRA: as llama_block_forward, with q, k, v, o = W x + scaling * B (A x). lora's factors must be
// [r,C] and [C,r] with r the rank la was carved for.
Status llama_block_lora_forward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w,
                                const LlamaLoraWeights *lora, float scaling, LlamaBlockActs *a, LlamaLoraActs *la,
                                const Tensor *x, const Tensor *positions);

// Backward of the forward just run on x. dout [B,T,C] is the gradient at a->out; dx [B,T,C] is overwritten
// and may alias dout. dA and dB are accumulated (+=) into glora, or skipped when glora is NULL (frozen LoRA,
// as in AnomalyGPT, where only dx is wanted). The base and norm weights get no gradient.
Status llama_block_lora_backward(Engine *e, const LlamaBlockConfig *c, const LlamaBlockWeights *w,
                                 const LlamaLoraWeights *lora, float scaling, LlamaLoraWeights *glora,
                                 const LlamaBlockActs *a, const LlamaLoraActs *la, LlamaBlockScratch *s,
                                 LlamaLoraScratch *ls, const Tensor *x, const Tensor *positions, const Tensor *dout,
                                 Tensor *dx);
