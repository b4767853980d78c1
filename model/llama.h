// The LLaMA language model (Vicuna-7B v0 in AnomalyGPT, anomalygpt-reference.md 5.1) for inference: LoRA merged
// at load (5.2), a KV cache, prefill from input embeddings (the AnomalyGPT prefix mixes image, prompt-learner and
// token embeddings, 5.4), decode steps, greedy generation with the reference's stops (5.6).
// Written over kernels/ops.h; every tensor lives on the engine's device in the weights' dtype.
//
// Weights, under HF names (LlamaForCausalLM.state_dict()):
//   model.embed_tokens.weight [V,C]       model.norm.weight [C]       lm_head.weight [V,C] (untied)
//   model.layers.N.input_layernorm.weight [C], post_attention_layernorm.weight [C]
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight [C,C]
//   model.layers.N.mlp.{gate,up}_proj.weight [I,C], mlp.down_proj.weight [C,I]
// The config comes from the shapes (C, I, V, layer count) and metadata: "llama.heads" (default 32),
// "llama.rms_eps" (default 1e-6), "llama.rope_base" (default 10000).
//
// LoRA. When the store holds LoRA factors for layer 0's q_proj, every layer's q, k, v and o must have them, and
// they are merged at load: W' = W + (alpha / r) * B @ A, A [r,in], B [out,r], alpha from metadata "lora.alpha"
// (default r, so the scaling is 1, as in the reference's r = alpha = 32). The key forms recognised, for
// N the layer and P in q_proj, k_proj, v_proj, o_proj (X = A or B), tried in this order:
//   base_model.model.model.layers.N.self_attn.P.lora_X.weight                 PEFT save_pretrained / adapter file
//   base_model.model.model.layers.N.self_attn.P.lora_X.default.weight         a PEFT model's own state_dict
//   llama_model.base_model.model.model.layers.N.self_attn.P.lora_X.default.weight   PandaGPT / AnomalyGPT ckpt
//   model.layers.N.self_attn.P.lora_X.weight                                  plain
// The first form that has layer 0's q_proj A is used for every layer.
//
// Batches: llama_prefill takes sequences of one length; llama_prefill_varlen takes sequences of different
// lengths packed without padding. The cache keeps each sequence's position (seq_pos) and its keys contiguous, so
// attention runs one sequence at a time over its own prefix, and a decode step appends one token to every
// sequence, each at its own position.
#pragma once
#include <stdint.h>

#include "model/llama_block.h"
#include "model/weights.h"
#include "runtime/memory.h"

typedef struct Llama {
    LlamaBlockConfig block;     // dim C (4096), heads (32), hidden I (11008), eps 1e-6, rope_base 10000
    int layers;                 // 32
    int vocab;                  // V = 32001 for Vicuna v0
    Tensor embed;               // [V,C]  model.embed_tokens.weight
    LlamaBlockWeights *layer;   // [layers], q/k/v/o with LoRA merged
    Tensor norm;                // [C]    model.norm.weight
    Tensor lm_head;             // [V,C]
    int lora_rank;              // r of the merged LoRA, 0 when none was found
    float lora_alpha;           // scaling = lora_alpha / lora_rank
} Llama;

// Reads the config and weights from the store (tensors owned by the store; the layer array by the Llama) and
// merges LoRA when present. A missing tensor or a wrong shape is an error naming it.
Status llama_load(Llama *m, WeightStore *w);
// The LLaMA config a store describes: widths from the shapes (HF names), the layer count, the vocabulary rows,
// heads / RMSNorm eps / RoPE base from the metadata (defaults 32, 1e-6, 10000). Shared with training.
Status llama_config_read(const WeightStore *w, LlamaBlockConfig *block, int *layers, int *vocab);
// The LoRA key forms a store may hold (PEFT's with and without the adapter name, PandaGPT's, bare HF): the form
// of layer 0's q_proj A, or -1 without LoRA; and the name of a factor ("A" or "B") in a form.
int llama_lora_form(const WeightStore *w);
void llama_lora_name(char *buf, size_t size, int form, int layer, const char *proj, const char *ab);
void llama_free(Llama *m);

// Keys and values of every layer plus the activations of one step, sized up front for up to max_batch
// sequences of up to max_seq tokens; a prefill of T tokens needs T <= max_seq. One device allocation.
typedef struct KvCache {
    int max_batch, max_seq;
    int batch;                  // sequences in the cache (set by the prefill)
    int pos;                    // tokens in the cache per sequence: the largest of seq_pos (all equal after
                                // llama_prefill; after llama_prefill_varlen each sequence has its own)
    int *seq_pos;               // host [max_batch]: tokens in the cache of sequence b
    DType dtype;
    Arena arena;                // all device tensors below
    Tensor *k, *v;              // [layers] each [max_batch * max_seq, C]: sequence b's position t at row b*max_seq+t
    Tensor x;                   // [max_batch * max_seq, C]  the residual stream of the step's tokens
    Tensor n;                   // [max_batch * max_seq, C]  normed
    Tensor q;                   // [max_batch * max_seq, C]
    Tensor att;                 // [max_batch * max_seq, C]
    Tensor tmp;                 // [max_batch * max_seq, C]  a branch's output before the residual add
    Tensor gate, up, act;       // [max_batch * max_seq, I]
    Tensor last;                // [max_batch, C]  the final norm of each sequence's last token
    Tensor positions;           // i32 [max_batch * max_seq]
    Tensor logits;              // [max_batch, V]  for llama_generate_greedy
    int32_t *host_positions;    // [max_batch * max_seq]
    float *host_logits;         // [max_batch * V]
    void *host_raw;             // [max_batch * V] in the cache dtype, the logits read back
    // Decode steps over device-side state (use_graph). A step's per-position values live in device memory:
    // `step` holds the batch's token ids, positions (seq_pos[b], where the new key goes) and attention lengths
    // (seq_pos[b] + 1), written before the step by one engine_memcpy_async from the pageable `host_step`. The
    // step's ops read them there: the embedding gather (op_embedding_dev), RoPE (op_rope reads device positions),
    // the KV append (op_kv_append writes row b * max_seq + pos[b]) and the decode attention (op_attention_decode
    // reads each sequence's length, so ragged batches need nothing more). No kernel argument then depends on the
    // position, and on CUDA the step is captured as a CUDA graph once per batch size, on its first step, and
    // replayed unchanged at every later position (and after a later prefill of the same batch size). The
    // upload, and the copy of the logits when the caller's tensor is not c->logits, stay outside the graph.
    // Results equal the plain step's bit for bit (the same kernels run: the keys and values of each sequence are
    // projected one row at a time as in the plain step, then appended; the flash decode's grid is sized for
    // max_seq and each sequence uses the split count the plain step would choose).
    // A graph holds the model's weight pointers, the cache's buffers and the engine's workspace: the graphs are
    // dropped and captured anew when llama_decode_step sees another Llama, embed_tokens buffer or engine
    // workspace (kv_cache_drop_graphs does it by hand, e.g. after changing weights in place).
    // On the CPU engine use_graph runs the same device-state path directly (no capture): the CPU tests check it
    // against the plain step.
    bool use_graph;             // off by default; set after kv_cache_create
    Tensor step;                // i32 [3 * max_batch]: tokens at 0, positions at max_batch, lengths at 2 max_batch
    int32_t *host_step;         // [3 * max_batch] pageable staging for `step`
    void **graphs;              // [max_batch]: the instantiated graph for batch size b + 1, NULL until its first step
    void *graph_exec;           // the graph the last step launched (one of `graphs`; not owned separately)
    const void *graph_key[3];   // the Llama, its embed.data and the engine workspace the graphs were captured with
} KvCache;

// Frees the captured decode graphs (the next use_graph step captures anew).
void kv_cache_drop_graphs(KvCache *c);

Status kv_cache_create(KvCache *c, Engine *e, const Llama *m, int max_batch, int max_seq);
void kv_cache_free(KvCache *c);
// Bytes of device memory kv_cache_create allocates.
size_t kv_cache_bytes(const Llama *m, int max_batch, int max_seq);

// Starts B sequences from input embeddings: embeds [B,T,C] -> logits_last [B,V], the logits of each sequence's
// last position. Positions are 0..T-1; the cache is reset first.
Status llama_prefill(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, Tensor *logits_last);
// Starts B sequences of different lengths: embeds [sum lengths, C] holds sequence 0's lengths[0] rows, then
// sequence 1's, ... (packed, no padding); lengths host [B], each 1..max_seq. logits_last [B,V] gets the logits
// of each sequence's last token. Sequence b has positions 0..lengths[b]-1; the cache is reset first. Each
// sequence's logits and later decode steps equal those of running it alone.
Status llama_prefill_varlen(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, const int *lengths, int B,
                            Tensor *logits_last);
// Keeps the first `keep` cached positions of a single sequence and runs `embeds` [1,T,C] after them (positions
// keep .. keep+T-1): a prefill that reuses an unchanged prefix, e.g. the image and the earlier turns of a chat.
Status llama_extend(Engine *e, const Llama *m, KvCache *c, int keep, const Tensor *embeds, Tensor *logits_last);

// Appends one token per sequence (tokens: host [batch], each in [0,V)), each at its sequence's position seq_pos[b],
// and writes its logits [batch,V]. Every sequence must have room (seq_pos[b] < max_seq). With c->use_graph the
// step runs over device-side positions and lengths (KvCache above; on CUDA a graph captured once per batch size).
Status llama_decode_step(Engine *e, const Llama *m, KvCache *c, const int32_t *tokens, Tensor *logits);
// Gathers rows of embed_tokens: ids host [n] -> out [n,C] (any tensor of n*C elements of the model's dtype).
Status llama_embed_tokens(Engine *e, const Llama *m, const int32_t *ids, int n, Tensor *out);

// The reference's stops (5.6): "##" (2277) once generated, or EOS (2).
#define LLAMA_STOP_HASHES 2277
#define LLAMA_EOS 2

// Greedy generation for one sequence: prefill of embeds [1,T,C], then argmax tokens (the first maximum on
// ties, as torch.argmax) until a stop id is generated (it is kept in the output, as HF does), or max_new
// tokens. stop_ids NULL means {2277, 2}; a non-NULL list with n_stop 0 means no stop id. out_ids must hold
// max_new ids; *n_out is the count written. The cache must hold T + max_new - 1 positions.
Status llama_generate_greedy(Engine *e, const Llama *m, KvCache *c, const Tensor *embeds, int max_new,
                             const int32_t *stop_ids, int n_stop, int32_t *out_ids, int *n_out);

// Random weights at any size (benchmarks): hidden C, heads, intermediate I, layers, vocab V, the same structures
// as llama_load makes, uploaded through the store (weights_init with no file). No LoRA. Deterministic per seed.
Status llama_init_random(Llama *m, WeightStore *w, int hidden, int heads, int intermediate, int layers, int vocab,
                         uint64_t seed);
