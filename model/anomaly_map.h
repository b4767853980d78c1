// AnomalyGPT's patch-level decoder and the two anomaly maps (anomalygpt-reference.md section 3), and the text
// prompt ensemble that gives each class name its [normal, abnormal] features (section 2.3).
//
// Zero-shot map, per tapped layer i:  P = fc_i(T_i[1:]) / ||.||;  S = 100 P t^T  ([256,2] -> [2,16,16]);
//   upsample the logits to 224 (bilinear, align_corners); softmax over the 2 classes; keep "abnormal";
//   the map is the mean over the layers. The image score is the map's maximum.
// Few-shot map, per layer: the max cosine similarity of each query patch (raw tapped tokens) to all k*256
//   reference patches; mean over layers; upsample; 1 - sim. It replaces the zero-shot map when references exist.
#pragma once
#include "model/imagebind.h"

typedef struct PatchDecoder {
    int in_dim;                 // C = 1280
    int out_dim;                // E = 1024
    Tensor fc_w[VISION_TAPS];   // [E, C]   image_decoder.fc.{i}.weight
    Tensor fc_b[VISION_TAPS];   // [E]      image_decoder.fc.{i}.bias
} PatchDecoder;

Status decoder_load(PatchDecoder *d, WeightStore *w);
// Random weights (benchmarks): the four Linear(in_dim -> out_dim, bias), uploaded through the store.
Status decoder_init_random(PatchDecoder *d, WeightStore *w, int in_dim, int out_dim, uint64_t seed);

// The 14 normal then 10 abnormal sentences for a class name ('_' read as ' '), in the reference's order:
// for each state, for each template. Writes at most `cap` sentences of up to 256 bytes; returns the count.
#define PROMPT_SENTENCES 24
#define PROMPT_NORMAL 14
int prompt_sentences(const char *class_name, char sentences[][256], int cap);

// Mean of the normalised sentence embeddings per class, renormalised: text_emb [24,E] -> out [2,E].
Status prompt_ensemble(Engine *e, const Tensor *text_emb, Tensor *out);

// Arena bytes anomaly_map_text / anomaly_map_fewshot need.
size_t anomaly_map_arena_bytes(const PatchDecoder *d, int tokens, int image, int refs);

// taps[i] [B,T,C]; text_features [2,E] shared by the batch or [B,2,E] per image -> map [B,S,S].
Status anomaly_map_text(Engine *e, const PatchDecoder *d, Arena *arena, const Tensor taps[VISION_TAPS],
                        const Tensor *text_features, Tensor *map);

// Reference patches for the few-shot map, computed once per product and kept: per layer the L2-normalised
// patch tokens of k normal images, [k*256, C]. The memory is owned here (fewshot_refs_free).
typedef struct FewShotRefs {
    int k;                         // reference images
    Tensor patches[VISION_TAPS];   // [k*N, C], rows normalised (eps 1e-8, as F.cosine_similarity)
    int64_t capacity_rows;         // rows each patches[i]'s storage holds (>= k*N): appends fill it, then double it
} FewShotRefs;

// ref_taps[i] [k,T,C] from vision_forward on the k reference images.
Status fewshot_refs_build(Engine *e, const Tensor ref_taps[VISION_TAPS], FewShotRefs *out);
void fewshot_refs_free(FewShotRefs *r);
// Adds the k2 images of more_taps[i] [k2,T,C] to refs (built or empty): the references of several encoder batches.
// The storage grows by doubling, so n appends copy O(total) rows, not O(n * total).
Status fewshot_refs_append(Engine *e, const Tensor more_taps[VISION_TAPS], FewShotRefs *refs);
// query taps[i] [B,T,C] -> map [B,S,S] = 1 - upsample(mean_i max_r cos).
Status anomaly_map_fewshot(Engine *e, const FewShotRefs *refs, Arena *arena, const Tensor taps[VISION_TAPS],
                           Tensor *map);

// The image score: the map's maximum, per image (read back to the host). scores: [B].
Status anomaly_map_scores(const Tensor *map, float *scores);
