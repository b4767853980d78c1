// AnomalyGPT assembled (anomalygpt-reference.md 0, 5.4-5.6): image -> anomaly map -> prompt learner, image
// token, LLM input embeddings -> the answer.
//
//   E = [emb(<s>)] + emb("### Human: <Img>") + llama_proj(cls_emb) + emb("</Img> ") + prompts18
//     + emb(tok(prompt_text + "\n### Assistant:"))          (each piece tokenised on its own)
//
// The map is the few-shot map when references are set, else the zero-shot map of the class the prompt text
// names (conversation_class_name); it is both the pixel output and the prompt learner's input. Generation stops
// once "##" (2277) has appeared or at </s>; the answer is the decoded tokens without the last two (normally "\n"
// and "##"), special tokens skipped, as the reference's decode(outputs[0][:-2], skip_special_tokens=True).
#pragma once
#include "model/conversation.h"
#include "model/llama.h"
#include "model/prompt_learner.h"
#include "model/sampler.h"
#include "model/sp_tokenizer.h"
#include "model/vision_model.h"

typedef struct AnomalyGPT {
    VisionModel vision;     // opens the model file(s); its WeightStore holds every weight
    Llama llm;
    PromptLearner prompts;
    LlamaProj proj;
    SpTokenizer *tokenizer; // owned
    KvCache cache;
    int max_seq;            // prefix + answer tokens the cache holds
    int max_batch;          // sequences anomalygpt_ask_batch runs together (the KV cache's batch; 1 by default)
    Arena arena;            // the map on the device, prompt learner temporaries, the input embeddings
    // Option beyond the reference (off by default: the reference re-runs the whole conversation every turn):
    // keep the KV cache of the rows a new turn shares with what the cache already holds. The rows compared are
    // the LLM input embeddings themselves, so a new image, map or history simply shares fewer of them.
    bool reuse_cache;
    // Option beyond the reference: the class whose text features make the zero-shot map (NULL: the reference's
    // rule, the first of its class names the prompt text contains, else 'object'). Not owned.
    const char *map_class;
    void *cached_rows;      // host [max_seq, C] in the compute dtype: the rows fed to the cache, in order
    int cached_len;         // how many of them the cache holds
    // Option beyond the reference (benchmarks): generate exactly max_new tokens, ignoring the "##" and </s>
    // stops, so that every run does the same work whatever the weights say.
    bool ignore_stop;
} AnomalyGPT;

// Opens the model (and layered files), loads every part; the SentencePiece model comes from tokenizer_path,
// or, when it is NULL, from the model file (model_file.h). dtype is the CUDA compute dtype; on the CPU, bf16 or
// f16 keeps the weight matrices (encoder blocks and LLM) in that dtype (f32 arithmetic), f32 keeps all in f32.
Status anomalygpt_open(AnomalyGPT *a, Engine *e, const char *model, const char *const *overlays, int n_overlays,
                       const char *tokenizer_path, DType dtype, int max_seq);
// The same with room for batches: the KV cache holds max_batch sequences of max_seq tokens, the arena max_batch
// LLM inputs, and the vision model encodes max(8, max_batch) images at a time. anomalygpt_open is max_batch 1.
Status anomalygpt_open_batch(AnomalyGPT *a, Engine *e, const char *model, const char *const *overlays,
                             int n_overlays, const char *tokenizer_path, DType dtype, int max_seq, int max_batch);
void anomalygpt_close(AnomalyGPT *a);

// Sizes of an AnomalyGPT built from random weights (benchmarks). anomaly_random_config_full gives the real one:
// ImageBind-H vision (32 x 1280, 16 heads, MLP 5120, patch 14, 224 px, embedding 1024), the decoder 4 x
// (1280 -> 1024), the prompt learner (4, 16, 64, 256, 1024 -> 4096), llama_proj (1024 -> 4096) and LLaMA-7B
// (32 x 4096, 32 heads, MLP 11008, vocab 32001).
typedef struct AnomalyRandomConfig {
    int vision_width, vision_heads, vision_layers, vision_mlp, patch, image, embed;
    int llm_width, llm_heads, llm_hidden, llm_layers, vocab;
    int prompt_channels[PROMPT_CONVS - 1];
    uint64_t seed;
} AnomalyRandomConfig;
void anomaly_random_config_full(AnomalyRandomConfig *cfg);

// An AnomalyGPT of random weights on the engine's device, without a model file: every part at cfg's sizes, no
// text encoder, and random [2,E] text features cached for the class 'object' (the zero-shot map's class for
// prompts that name none; set map_class = "object" to use it for any prompt). The LLaMA tokenizer comes from
// tokenizer_path (required: the prompt needs real token ids). Closed with anomalygpt_close.
Status anomalygpt_init_random(AnomalyGPT *a, Engine *e, const AnomalyRandomConfig *cfg, const char *tokenizer_path,
                              DType dtype, int max_seq);

typedef struct AnomalyAnswer {
    float score;               // the map's maximum
    float *map;                // host [S*S], caller-provided (may be NULL)
    const char *class_name;    // the class whose text features made the map ("" for the few-shot map)
    char *text;                // malloc'd answer (caller frees)
    int32_t tokens[1024];      // generated ids, stop tokens included
    int n_tokens;
    int prefix_tokens;         // length of the LLM input
    int reused_tokens;         // of those, how many came from the cache (reuse_cache)
    double vision_ms;          // preprocessing, encoder, map, prompt learner, input assembly
    double prefill_ms;         // the LLM over the input, to the first logits
    double decode_ms;          // the remaining tokens
} AnomalyAnswer;

// The LLM input for an image and a prompt text: embeds [1,T,C] in the model's arena (valid until the next
// call), the map (host, when map is not NULL) and score, and the class used.
Status anomalygpt_input(AnomalyGPT *a, const Image *image, const char *prompt_text, Tensor *embeds, float *map,
                        float *score, const char **class_name);

// One turn: the prompt text of history + input (conversation_prompt_text), the map, and the answer.
// sampler NULL means greedy. max_new <= 1024.
Status anomalygpt_ask(AnomalyGPT *a, const Image *image, const ConversationTurn *history, int n_history,
                      const char *input, Sampler *sampler, int max_new, AnomalyAnswer *out);

// n inspections at once, each as anomalygpt_ask(a, &images[i], NULL, 0, inputs[i], NULL, max_new, &out[i]) would
// answer it (greedy, no history; the KV cache is not reused before or after): the maps of the images in
// vision_model_map batches (consecutive images whose maps use the same class, up to the vision model's batch),
// the prompt learner and image token per image, one llama_prefill_varlen of the n inputs, then decode steps of
// all n sequences together until each has stopped ("##" or </s>, or max_new; a stopped sequence keeps being fed
// its last token, its logits ignored). out[i].map is caller-provided as in anomalygpt_ask (may be NULL).
// n larger than the model's max_batch runs in slices of max_batch. Timings: each answer gets its slice's stage
// times divided by the slice's size (vision_ms, prefill_ms, decode_ms: the per-image share). On an error every
// out[i].text is NULL (nothing to free).
Status anomalygpt_ask_batch(AnomalyGPT *a, const Image *images, int n, const char *const *inputs, int max_new,
                            AnomalyAnswer *out);
