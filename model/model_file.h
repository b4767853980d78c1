// What an agpt model file holds beyond the weights (DESIGN.md "Models and files"): the format version, the
// tokenizers embedded as byte tensors, and the names of the cached class features. Written by agpt convert
// (model/convert.c), read by the loaders.
#pragma once
#include <stddef.h>

#include "model/weights.h"

// Metadata "agpt.format": the layout version of a converted model file. A loader refuses a file of a newer
// version than it knows; files without the key (hand-made test models, trained delta files) are read as
// version 1.
#define MODEL_FORMAT_KEY "agpt.format"
#define MODEL_FORMAT_VERSION 1

// U8 tensors holding files byte for byte: LLaMA's SentencePiece tokenizer.model and CLIP's BPE merges
// (bpe_simple_vocab_16e6.txt.gz, gzipped as distributed).
#define MODEL_TENSOR_SP_TOKENIZER "tokenizer.sentencepiece"
#define MODEL_TENSOR_CLIP_BPE "tokenizer.clip_bpe"
// "text_features.<class name>": [2,E] f32, normal then abnormal (anomalygpt-reference.md 2.3).
#define MODEL_TEXT_FEATURES_PREFIX "text_features."

// The reference's 30 class names whose text features are precomputed (2.3 `objs`).
extern const char *const model_reference_classes[30];

// Refuses a file written in a newer format than this build reads.
Status model_file_check_version(const SafeTensors *st, const char *path);
// The bytes of an embedded U8 tensor, from the first file of the store that has it. *data views the mapping
// (valid while the files are open); NULL with *n = 0 when no file has it.
Status model_file_blob(const WeightStore *w, const char *name, const void **data, size_t *n);
