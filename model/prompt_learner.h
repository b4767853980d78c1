// AnomalyGPT's PromptLearner and llama_proj (anomalygpt-reference.md section 4).
//
// PromptLearner: the anomaly map M [B,1,224,224] goes through meta_net, five times Conv2d(k3, pad 1) + ReLU +
// MaxPool2d(2) (224 -> 112 -> 56 -> 28 -> 14 -> 7) and a final Conv2d(k5, pad 0) without ReLU (7 -> 3), giving
// [B,D,3,3]; reshaped to [B,D,9] and transposed, that is 9 map-derived prompts [B,9,D] (spatial index r*3+c).
// The output is [B,18,D]: the 9 learned base prompts first, then the 9 map-derived prompts.
// llama_proj: Linear(1024 -> 4096, bias) on the L2-normalised ImageBind embedding: the image token [B,1,4096].
//
// Widths are read off the weight shapes (checkpoint key names), so small test configs load the same way.
#pragma once
#include "model/weights.h"
#include "runtime/memory.h"

#define PROMPT_CONVS 6     // meta_net.{0,3,6,9,12,15}
#define PROMPT_BASE 9      // learned base prompts
#define PROMPT_GRID 3      // the final conv's output side: 3 x 3 = 9 map-derived prompts
#define PROMPT_TOKENS 18   // base + map-derived

typedef struct PromptLearner {
    int dim;                          // D = 4096: the LLM width
    int in_channels;                  // 1: the anomaly map
    int channels[PROMPT_CONVS];       // output channels: 4, 16, 64, 256, 1024, D
    int kernel[PROMPT_CONVS];         // 3, 3, 3, 3, 3, 5
    int padding[PROMPT_CONVS];        // 1, 1, 1, 1, 1, 0
    Tensor base_prompts;              // [9, D]                  prompt_learner.base_prompts
    Tensor conv_w[PROMPT_CONVS];      // [C_i, C_{i-1}, k, k]    prompt_learner.meta_net.{3i}.weight
    Tensor conv_b[PROMPT_CONVS];      // [C_i]                   prompt_learner.meta_net.{3i}.bias
    Tensor eye;                       // [9, 9] identity: the [D,9] -> [9,D] transpose as a GEMM (see .c)
} PromptLearner;

Status prompt_learner_load(PromptLearner *p, WeightStore *w);
// Random weights (benchmarks): the same structures as prompt_learner_load makes, uploaded through the store.
// channels: the first five convs' output channels (NULL: the reference's 4, 16, 64, 256, 1024); the last is dim.
Status prompt_learner_init_random(PromptLearner *p, WeightStore *w, int dim, const int *channels, uint64_t seed);

// Arena bytes prompt_learner_forward needs for a batch of maps of H x W pixels.
size_t prompt_learner_arena_bytes(const PromptLearner *p, int batch, int H, int W);

// map [B,1,H,W] (or [B,H,W]; H, W such that the stack ends at 3 x 3, e.g. 224) -> out [B,18,D].
// The map is used as is (the few-shot map lies in [0,2]: never clamp it). Temporaries come from the arena.
Status prompt_learner_forward(Engine *e, const PromptLearner *p, Arena *arena, const Tensor *map, Tensor *out);

typedef struct LlamaProj {
    int in_dim;    // E = 1024: the ImageBind embedding
    int out_dim;   // D = 4096: the LLM width
    Tensor w;      // [D, E]   llama_proj.weight
    Tensor b;      // [D]      llama_proj.bias
} LlamaProj;

Status llama_proj_load(LlamaProj *l, WeightStore *w);
// Random weights (benchmarks): Linear(in_dim -> out_dim, bias).
Status llama_proj_init_random(LlamaProj *l, WeightStore *w, int in_dim, int out_dim, uint64_t seed);

// cls_emb [B,E] (the L2-normalised vision embedding, vision_forward's output) -> out [B,1,D].
Status image_token_forward(Engine *e, const LlamaProj *l, const Tensor *cls_emb, Tensor *out);
