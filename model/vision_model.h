// The vision half of AnomalyGPT as one object: load a model file, turn images into anomaly maps and scores.
// What `agpt map` (and later detect and serve) drive. Holds the weights on the engine's device, the activation
// arena sized for its batch, cached class text features and cached few-shot reference patches.
#pragma once
#include <stdbool.h>

#include "model/anomaly_map.h"
#include "model/clip_tokenizer.h"
#include "model/preprocess.h"

#define VISION_MODEL_MAX_CLASSES 256

typedef struct ClassFeatures {
    char name[128];
    char used[128];   // the name whose features these are: name, or "object" for a name the model cannot embed
    Tensor features;  // [2,E] on the device, owned
} ClassFeatures;

typedef struct VisionModel {
    Engine *engine;
    SafeTensors *files[WEIGHT_MAX_FILES];  // opened by vision_model_open, closed by vision_model_close
    int n_files;
    WeightStore weights;
    VisionEncoder vision;
    TextEncoder text;
    bool has_text;              // the file holds the text encoder (else only cached class features are usable)
    const ClipTokenizer *tokenizer;  // for class names not cached in the file: set, or own_tokenizer
    ClipTokenizer *own_tokenizer;    // the vocabulary embedded in the model file, loaded on first need
    PatchDecoder decoder;
    int max_batch;              // images per vision_forward call
    Arena arena;
    Tensor images;              // [max_batch,3,S,S]
    Tensor embedding;           // [max_batch,E]
    Tensor taps[VISION_TAPS];   // [max_batch,T,C]
    ClassFeatures classes[VISION_MODEL_MAX_CLASSES];
    int n_classes;
    FewShotRefs refs;           // k > 0 once references are set
    PreprocessMode mode;        // how images are resized: the reference's inference path by default
    // Options beyond the reference's inference, off by default so that the default reproduces it:
    bool fuse_text_map;         // with references: the mean of the few-shot and the zero-shot maps
    bool augment_rotations;     // references also seen turned by 90, 180 and 270 degrees (as in training)
    int reference_shifts;       // N > 1: each reference also seen moved down and right by (a, b) x patch / N pixels,
                                // 0 <= a, b < N (N x N views; 0 or 1: none), so that a query whose patch grid falls
                                // between the reference's still finds its patches
} VisionModel;

// Opens `path` (and optional layered files searched first, e.g. trained deltas), loads the vision encoder and
// decoder, and the text encoder when present. dtype is the device compute dtype; on the CPU, bf16 or f16 keeps
// the encoders' block matrices in that dtype (f32 arithmetic) and f32 keeps everything in f32.
Status vision_model_open(VisionModel *m, Engine *e, const char *path, const char *const *overlays, int n_overlays,
                         DType dtype, int max_batch);
void vision_model_close(VisionModel *m);

// The CLIP tokenizer used to compute features of class names the file does not cache. Not owned. Without
// one, the vocabulary embedded in the model file (model_file.h) is used when there is one.
void vision_model_set_tokenizer(VisionModel *m, const ClipTokenizer *tokenizer);

// The [2,E] text features of a class name: cached in the model file ("text_features.<name>"), computed
// earlier, or computed now with the text encoder and tokenizer (the prompt ensemble). A name that cannot be had (no text encoder and no cache)
// falls back to "object", as the reference does for names it does not know; *used_name says which was used.
Status vision_model_class_features(VisionModel *m, const char *name, const Tensor **features,
                                   const char **used_name);

// The prompt ensemble of a class name through a text encoder (2.3): its 24 sentences -> features [2,E] (any
// tensor of the engine's device and the encoder's dtype), temporaries from `arena` (class_features_arena_bytes).
// What vision_model_class_features computes for names the file does not cache, and what agpt convert caches.
Status class_features_compute(Engine *e, const TextEncoder *t, const ClipTokenizer *tokenizer, Arena *arena,
                              const char *name, Tensor *features);
size_t class_features_arena_bytes(const TextEncoder *t);

// Sets the few-shot references (k images, any sizes: each is preprocessed like a query). k = 0 clears them,
// returning to the zero-shot text map. With augment_rotations and reference_shifts N, k * 4 * N * N images go
// through the encoder (in batches of max_batch).
Status vision_model_set_references(VisionModel *m, const Image *refs, int k);

// Maps for n images (n <= max_batch): the few-shot map when references are set (fused with the zero-shot map of
// the class when fuse_text_map), else the zero-shot map for the class. maps: host [n][S][S] float32; scores: [n] (each map's maximum).
Status vision_model_map(VisionModel *m, const Image *images, int n, const char *class_name, float *maps,
                        float *scores);
