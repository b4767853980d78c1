// agpt convert: the official AnomalyGPT files (anomalygpt-reference.md 8) -> one agpt model file.
//
//   imagebind_huge.pth       ImageBind-H, all modalities: the vision and text parts are kept under their own
//                            names (the 5-D Conv3d stem as it is, in_proj fused: the loader folds the one and
//                            runs the other as one GEMM); audio, depth, thermal and IMU are skipped.
//   Vicuna-7B v0 directory   HF LLaMA names as they are; rotary_emb.inv_freq buffers are skipped; config.json
//                            gives the heads, RMSNorm eps and RoPE base; tokenizer.model is embedded.
//   PandaGPT delta           llama_proj and the LoRA A/B under PEFT 0.3.0's names, kept separate: the loader
//                            merges W + (alpha/r) B A at load for inference, training reads A and B.
//   AnomalyGPT checkpoint    image_decoder and prompt_learner.
// Later files win for a name in two of them (the reference's load order). Any subset converts: ImageBind alone
// gives a vision-only model; an AnomalyGPT checkpoint alone gives a small file to layer over a base model
// (agpt --overlay). Every dimension comes from the tensors' shapes.
//
// Also written: the CLIP BPE merges (embedded), the text features of the reference's 30 class names and any
// extra --class names (when the text encoder and the CLIP merges are there), and metadata: agpt.format, the
// config (vision.taps, vision.heads, text.heads, llama.heads, llama.rms_eps, llama.rope_base, lora.alpha) and
// the sources.
//
// Memory: tensors stream from the mapped inputs to the output in pieces of at most 8M elements through one
// buffer, and the input pages are dropped after each piece, so memory does not grow with the model (a tensor
// that is not contiguous in its file goes through a temporary of its size). Computing the text features then
// loads the text encoder (in f32) from the new file.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "runtime/status.h"
#include "runtime/tensor.h"

#define CONVERT_MAX_CLASSES 64

typedef struct ConvertOptions {
    const char *imagebind;     // file; each source may be NULL
    const char *vicuna;        // HF directory (or a single file)
    const char *pandagpt;      // file
    const char *anomalygpt;    // file
    const char *output;
    DType dtype;               // of matrices (>= 2 dims); vectors and scalars stay f32
    const char *tokenizer;     // LLaMA tokenizer.model; default <vicuna>/tokenizer.model when there
    const char *clip_vocab;    // bpe_simple_vocab_16e6.txt.gz
    const char *classes[CONVERT_MAX_CLASSES];  // extra class names to cache
    int n_classes;
    const char *taps;          // "7,15,23,31"; default: after blocks n/4-1, n/2-1, 3n/4-1, n-1 of n
    int vision_heads, text_heads;  // 0: width / 80 and width / 64 (ImageBind-H's head dims)
    float lora_alpha;          // 0: 32 (PandaGPT's config)
    int threads;               // for the text features; 0: all
    bool no_text_features;
} ConvertOptions;

typedef struct ConvertReport {
    int tensors;               // written
    int skipped;               // input tensors not used (other modalities, buffers)
    int classes;               // text features written
    uint64_t bytes;            // of the output
    uint64_t buffer_bytes;     // the streaming buffer (and the largest whole-tensor temporary, if any)
    uint64_t largest_input_bytes;
    uint64_t peak_rss_stream;  // peak resident memory after streaming the tensors (bytes)
    uint64_t peak_rss;         // peak resident memory at the end (text features included)
    double seconds;
} ConvertReport;

Status convert_run(const ConvertOptions *o, ConvertReport *report);
