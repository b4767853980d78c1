// The memory a training step needs, computed from the model's dimensions before anything is allocated, so that a
// run that cannot fit is refused at once with the numbers (not by an out-of-memory error an hour in).
//
// What is counted (bytes on the training device; anomalygpt-reference.md 1, 3, 4, 5, 6):
//   frozen weights     ViT-H vision trunk, the decoder / prompt learner / llama_proj / LoRA when not trained,
//                      LLaMA-7B, all in weight_dtype (frozen LoRA is merged into q, k, v, o: no extra bytes),
//                      less the parts that are trained (lm_head and model.norm, the ViT's blocks)
//   trained state      per trained parameter: the compute copy (when compute dtype != f32), the f32 master, the f32
//                      gradient, AdamW's two f32 moments (these two on the host with optimizer_on_host, as the
//                      reference's ZeRO-2 CPU offload does)
//   kept activations   the four ViT taps and the class embedding of every image (the decoder's backward needs them),
//                      the decoder's patch features and maps, the prompt learner's conv stack, and for LLaMA either
//                      every layer's input (recompute: each layer is run again in the backward) or every layer's
//                      full activations, the logits (f32, overwritten by their gradient) and d(input embeddings)
//   transient          the largest of: one ViT block's forward (no gradient flows into the frozen ViT), one LLaMA
//                      layer's activations plus their gradients during its backward (with recompute)
//   workspace          GEMM workspace and slack
// The total is an upper bound of the step's peak (kept + largest transient + the rest), not a measurement.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/dtype.h"
#include "runtime/status.h"

typedef struct MemPlanConfig {
    // ImageBind-H vision trunk (frozen)
    int vit_width, vit_layers, vit_mlp, vit_heads, vit_tokens, vit_patch, image, embed;  // 1280 32 5120 16 257 14 224 1024
    int taps;                    // 4 tapped layers, one decoder linear each
    // prompt learner: 6 convs on the [1,224,224] map
    int prompt_channels[6];      // 4 16 64 256 1024 4096
    int prompt_base;             // 9 learned base prompts
    // LLaMA-7B (Vicuna v0)
    int llm_width, llm_layers, llm_hidden, llm_heads, vocab, lora_rank;  // 4096 32 11008 32 32001 32
    int seq_len;                 // tokens per conversation: the 30-token prefix + max_tgt_len 1024 = 1054
    int micro_batch;             // conversations per micro-step (2: one anomaly item = the normal and the
                                 // synthetic image)
    int images_per_micro;        // images through the ViT per micro-step (2)
    DType weight_dtype;          // frozen weights (F16 on the GPU, as the reference)
    DType compute_dtype;         // activations (F16; F32 on the CPU)
    bool train_decoder, train_prompt, train_proj, train_lora;  // the reference trains decoder + prompt learner
    bool train_head;            // lm_head and model.norm (counted as trained, no longer under the frozen LLaMA)
    bool train_vision;          // the ViT's blocks (counted as trained, no longer under the frozen ViT)
    bool recompute;              // activation recomputation per LLaMA layer
    bool flash_attention;        // no [heads,T,T] scores kept (a fused attention keeps only row statistics)
    bool optimizer_on_host;      // AdamW moments on the host (not counted on the device)
    int optimizer_shards;        // ranks the moments are split over (ZeRO-1; 0 or 1: each rank keeps them all)
    size_t workspace_bytes;      // GEMM workspace and allocator slack
} MemPlanConfig;

#define MEM_PLAN_ITEMS 16

typedef struct MemPlanItem {
    const char *what;
    double bytes;
} MemPlanItem;

typedef struct MemPlan {
    int n;
    MemPlanItem item[MEM_PLAN_ITEMS];  // the breakdown, in the order above
    double trained_params;             // elements trained
    double frozen_params;              // elements frozen
    double peak_bytes;                 // the sum
} MemPlan;

// The reference's run: ViT-H, LLaMA-7B, micro-batch of 2 conversations of 1054 tokens, f16 weights and
// activations, decoder + prompt learner trained, recompute on, fused attention, optimizer on the device.
MemPlanConfig mem_plan_reference_config(void);
Status mem_plan_compute(const MemPlanConfig *cfg, MemPlan *out);
// The breakdown as text lines ("  frozen weights: ViT-H    1.18 GiB"), for the CLI to print.
void mem_plan_format(const MemPlan *plan, char *buf, size_t cap);
// AGPT_OK when the peak fits budget_bytes; otherwise AGPT_ERR_OOM with the peak, the budget and the largest items.
Status mem_plan_check(const MemPlan *plan, double budget_bytes);
