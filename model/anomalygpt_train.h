// One training step of AnomalyGPT: the forward of openllama.py::forward with masks (anomalygpt-reference.md
// 3.2, 3.4, 4, 5.4, 6.5) and its backward, over kernels/ops.h, so it runs on the CPU engine and (unverified on a
// GPU so far) on CUDA.
//
//   taps = ImageBind(images)                                  frozen (trained with train_vision)
//   per layer i:  P_i = fc_i(taps_i[1:]);  S_i = 100 (P_i/||P_i||) t^T;  A_i = softmax(upsample(S_i))
//   M = mean_i A_i[:,1]                                       the text map ([B,S,S])
//   pixel loss = sum_i focal(A_i, gt) + dice(A_i[:,1], gt)    only when the examples have masks
//   prompts = PromptLearner(M, or 1 - sim against a reference turned 0/90/180/270 degrees: section 3.4)
//   E = [<s>] "### Human: <Img>" [llama_proj(cls)] "</Img> " [18 prompts] conversation tokens (right-padded, id 2)
//   loss = CE(LLaMA+LoRA(E), answer tokens) + pixel loss
//
// Trained: the decoder (image_decoder.fc.*) and the prompt learner (prompt_learner.*), as the reference; as
// options llama_proj, the LoRA factors, lm_head + model.norm and the ViT's blocks (train_vision: the
// gradients at the taps, from the text maps, and at the image embedding, from the LLM through llama_proj, go
// down the trunk; the few-shot map stays gradient-free, as its reference pass). Gradients are f32 on the engine's device and accumulate (+=) over
// steps until anomaly_train_zero_grad, so gradient accumulation needs no extra buffer.
#pragma once
#include <stdbool.h>

#include "model/llama_lora_train.h"
#include "model/prompt_learner.h"
#include "model/sp_tokenizer.h"
#include "model/vision_model.h"
#include "model/vision_train.h"

#define TRAIN_PREFIX_TOKENS 30  // <s>, 6 of "### Human: <Img>", the image token, 4 of "</Img> ", 18 prompts
#define TRAIN_PAD_ID 2          // right padding (pad = eos), label -100
#define TRAIN_PAD_MULTIPLE 16   // sequence lengths are padded up to a multiple of this

typedef struct AnomalyTrainOptions {
    int max_batch;      // conversations per step (2: an anomaly item is its normal image and its synthetic anomaly)
    bool train_proj;    // also llama_proj (off in the reference)
    bool train_lora;    // also the LoRA factors (off in the reference)
    bool train_head;    // also lm_head and model.norm (not in the reference; for a model trained from scratch)
    bool train_vision;  // also the ViT's blocks (not in the reference; model/vision_train.h)
    int reference_shifts;  // N > 1: the few-shot map's reference also moved as VisionModel.reference_shifts does
                           // at inference (not in the reference)
    bool no_reference_rotations;  // the reference's views not also turned 90/180/270 degrees (the reference's
                                  // training turns them; inference does not)
} AnomalyTrainOptions;

// The patch features of one reference's views, kept from step to step while the ViT is frozen: a class's
// reference is the same image every time, so its views go through the encoder once per run.
typedef struct RefViewsCacheEntry {
    uint64_t key;                // a hash of the reference's normalised pixels
    FewShotRefs refs;
} RefViewsCacheEntry;

#define TRAIN_REF_CACHE_BYTES ((size_t)2 << 30)  // beyond this, further references are encoded every time

typedef struct AnomalyTrainModel {
    Engine *engine;
    VisionModel vision;          // the encoder (frozen), the decoder (trained), class text features; its store
                                 // holds every weight, private copies that an optimizer may update in place
    PromptLearner prompts;       // trained
    LlamaProj proj;              // frozen unless train_proj
    LlamaLoraTrain llm;          // frozen base; LoRA frozen unless train_lora (its gradients live in llm.grad)
    SpTokenizer *tokenizer;      // owned
    int32_t head_ids[8], n_head; // "### Human: <Img>" tokenised
    int32_t tail_ids[8], n_tail; // "</Img> " tokenised
    AnomalyTrainOptions opt;
    // Gradients, f32 on the engine's device, shaped as their parameters.
    Tensor d_fc_w[VISION_TAPS], d_fc_b[VISION_TAPS];      // [E,C], [E]
    Tensor d_conv_w[PROMPT_CONVS], d_conv_b[PROMPT_CONVS]; // [C_i,C_{i-1},k,k], [C_i]
    Tensor d_base_prompts;                                 // [9,D]
    Tensor d_proj_w, d_proj_b;                             // [D,E], [D] (train_proj)
    Arena grad_arena;
    VitBlockWeights *d_vision;                             // [layers] (train_vision), in vision_grad_arena
    Arena vision_grad_arena;
    // Kept from step to step, so that a step does not map (and fault in) fresh pages: the activations' arena
    // (grown when a step needs more) and the LLM's training state, one per batch size of 1 and more (remade when
    // the sequence length changes; lengths are padded up to a multiple of TRAIN_PAD_MULTIPLE, which changes no
    // number: the padding is right padding without loss, behind a causal mask).
    Arena step_arena;
    LlamaTrainState llm_state[2];
    bool have_llm_state[2];
    VisionTrainActs vision_acts[2];  // train_vision: the encoder's kept activations, per batch size 1 and more
    bool have_vision_acts[2];
    RefViewsCacheEntry *ref_cache;   // [n_ref_cache] (not with train_vision: the features change every update)
    int n_ref_cache;
    size_t ref_cache_bytes;
} AnomalyTrainModel;

// One conversation of a step.
typedef struct AnomalyTrainExample {
    const float *image;            // host [3,S,S]: the model input, normalised (ToTensor + Normalize of the
                                   // dataset's Resize((S,S)) image)
    const float *mask;             // host [S,S] in {0,1}, or NULL: no pixel loss (instruction data)
    const char *class_name;        // whose text features make the zero-shot maps ('object' for instruction data)
    const float *reference;        // NULL, or host [3,S,S] normalised: the few-shot map (against the reference's
                                   // views: its shifts, each in four rotations, as opt says) feeds the prompt
                                   // learner instead of the text map
    const int32_t *ids, *targets;  // [n_tokens] the conversation's text part (train_tokenize)
    int n_tokens;
} AnomalyTrainExample;

typedef struct AnomalyTrainLosses {
    double ce;      // the LLM's mean cross-entropy over the answer tokens of the batch
    double focal;   // summed over the 4 layers (0 without masks)
    double dice;    // summed over the 4 layers (0 without masks)
    int targets;    // answer tokens the cross-entropy averaged over
} AnomalyTrainLosses;

// Opens the model (and layered files searched first, e.g. an earlier run's delta) in f32 for training, and
// allocates zeroed gradients. The SentencePiece model comes from tokenizer_path, or, when NULL, from the file.
Status anomaly_train_open(AnomalyTrainModel *m, Engine *e, const char *model, const char *const *overlays,
                          int n_overlays, const char *tokenizer_path, const AnomalyTrainOptions *opt);
void anomaly_train_close(AnomalyTrainModel *m);
Status anomaly_train_zero_grad(AnomalyTrainModel *m);

// Forward and backward of B (<= opt.max_batch) conversations: the gradient of ce + focal + dice is added into
// every trained tensor's gradient. Either every example has a mask or none has (the reference's batches).
Status anomaly_train_step(AnomalyTrainModel *m, const AnomalyTrainExample *ex, int B, AnomalyTrainLosses *out);

// The trained tensors, their gradients and model-file names, in a fixed order (decoder, prompt learner, then
// llama_proj and the LoRA factors when trained): *n gets the count; at most cap are written.
typedef struct AnomalyTrainTensor {
    char name[128];
    Tensor *param;   // the weight (in the store), updated in place by an optimizer
    Tensor *grad;
} AnomalyTrainTensor;
int anomaly_train_tensors(AnomalyTrainModel *m, AnomalyTrainTensor *out, int cap);
