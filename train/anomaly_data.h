// The reference's anomaly training samples (anomalygpt-reference.md 6.1, 6.3, 6.4; mvtec.py / visa.py
// __getitem__ and collate, openllama.py forward): one dataset item, a normal training image, becomes one
// micro-step of two conversations:
//   0: the image (Resize((224,224)) bicubic) with a zero mask and the normal answer;
//   1: the image with NSA synthetic anomalies blended in (train/synth.h), gt = label > 0.3, and the
//      "Yes, ..." answer naming the regions' positions (train/conversation_train.h); when synthesis finds no
//      place for a patch, both are the normal conversation and the mask stays zero.
// With probability fewshot_p (1/2 in the reference, per micro-step) both carry the class's reference image, so
// the prompt learner sees the few-shot map (3.4). The reference image of a class is the first of its normal
// training images in name order (the reference takes os.listdir's first, which is filesystem order).
//
// Determinism: every draw of a sample (the source image of the blend, the patches, the few-shot coin) comes from
// the loader's per-sample Rng (train/loader.h), so a sample depends only on (seed, epoch, index). The reference
// blends from the image its worker visited before (prev_idx), which depends on worker scheduling; here the source
// is another training image drawn from the sample's Rng.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "model/anomalygpt_train.h"
#include "model/sp_tokenizer.h"
#include "train/conversation_train.h"
#include "train/dataset.h"
#include "train/synth.h"
#include "train/trainer.h"

#define ANOMALY_SIDE 224
#define ANOMALY_TEXT_MAX 256   // text tokens per conversation kept in a sample (the reference's answers need ~70)
#define SFT_TEXT_MAX TRAIN_MAX_TGT_LEN  // an instruction conversation keeps max_tgt_len tokens (1024)

typedef struct AnomalyClass {
    char name[128];
    SynthParams params;        // patch_ex's arguments and the description sentence
    float *reference;          // [3,S,S] normalised: the class's reference image (inference preprocessing)
} AnomalyClass;

typedef struct AnomalyData {
    int n_items;
    char **paths;              // [n_items] training images: normal ones, then the real defects (supervised)
    int *item_class;           // [n_items] index into classes
    // Supervised training (anomaly_data_add_defects): items [n_normal, n_items) are real anomalous images and
    // masks[i] their ground-truth masks; items [0, n_normal) are normal images (masks NULL or NULL entries).
    int n_normal;
    char **masks;              // [n_items] or NULL
    DatasetFormat mask_format; // the layout the masks come from (its threshold rule)
    AnomalyClass *classes;
    int n_classes;
    const SpTokenizer *tokenizer;  // not owned
    double fewshot_p;          // 0.5: the chance a micro-step uses the few-shot branch
    // The instruction stream (anomaly_data_load_sft; none when n_sft is 0): PandaGPT-style conversations, the
    // first two turns of each.
    int n_sft;
    char **sft_images;         // [n_sft] image paths
    char **sft_human, **sft_gpt;  // [n_sft] the human turn and the gpt turn
} AnomalyData;

// One loader slot: the two conversations of an item.
typedef struct AnomalySample {
    float image[2][3 * ANOMALY_SIDE * ANOMALY_SIDE];  // normalised model inputs
    float mask[2][ANOMALY_SIDE * ANOMALY_SIDE];       // {0,1}
    int32_t ids[2][ANOMALY_TEXT_MAX], targets[2][ANOMALY_TEXT_MAX];
    int n_tokens[2];
    int cls;                   // class index
    int fewshot;               // 1: both use the class's reference
    int n_patches;             // anomalous regions in conversation 1 (synthetic patches, or a real mask's regions)
    // With an instruction stream: one instruction micro-step after the anomaly one (train_mvtec.py's loop).
    int has_sft;
    float sft_image[3 * ANOMALY_SIDE * ANOMALY_SIDE];
    int32_t sft_ids[SFT_TEXT_MAX], sft_targets[SFT_TEXT_MAX];
    int sft_tokens;
} AnomalySample;

// Builds the data from normal training images and their classes (class names: the reference's 15 MVTec-AD and
// 12 VisA names get its synthesis parameters and descriptions; another name the defaults, overridden by the
// JSON file params_json when given). Reads each class's reference image now (an unreadable one is an error
// naming it). Copies the strings.
Status anomaly_data_init(AnomalyData *d, const char *const *paths, const char *const *class_names, int n,
                         const char *params_json, const SpTokenizer *tokenizer);
void anomaly_data_free(AnomalyData *d);

// Supervised training (the reference's train_supervised, anomalygpt-reference.md 6.3): real anomalous images with
// their masks join the items. Such an item's micro-step pairs a normal training image of its class (drawn from
// the sample's Rng; the reference's supervised loader gives single images, here every micro-step keeps one
// normal and one anomalous conversation) with the defect: the image as training images are read
// (Resize((224,224)) bicubic), its mask squashed the same way (bilinear; > 0.1 of 255, or VisA's > max / 100), and
// the answer naming the
// positions of the centroids of the mask's 8-connected regions, each position once (the reference takes the
// centroids of cv2.findContours' contours and deduplicates them). Every class named must have normal images (the
// pairing and the few-shot reference need them); a defect without a mask is refused (the caller filters them), and
// one whose mask has no anomalous pixel at 224 x 224 stops training with its name when its sample is made (it
// would teach "No" for a defect).
Status anomaly_data_add_defects(AnomalyData *d, const char *const *paths, const char *const *masks,
                                const char *const *class_names, int n, DatasetFormat mask_format);

// The regions of a mask [S][S] (1 = anomalous) for the answer: their count (8-connected components) and the
// centroids (row, col) of the first `cap` in raster order of their first pixel; -1 when out of memory.
int anomaly_mask_regions(const uint8_t *mask, int side, double (*centers)[2], int cap);

// The instruction stream (anomalygpt-reference.md 6.3, sft_dataset.py): a JSON array of {"image_name": NAME,
// "conversation": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}; the first two turns are
// kept, ".jpg" is appended to a name without it, and the image is image_dir/NAME. Every micro-step then also
// trains on one of them (drawn from the sample's Rng; the reference re-draws a permutation each epoch): the
// image (Resize((224,224))), class 'object', no mask, no few-shot, the LLM loss alone. Malformed items and missing
// images are refused in one message (their count and the first few names).
Status anomaly_data_load_sft(AnomalyData *d, const char *json_path, const char *image_dir);

// The loader's callback (LoaderMakeSample): item `index` with the sample's Rng into an AnomalySample.
Status anomaly_make_sample(void *data, int64_t index, Rng *rng, void *out);

// The pair of item `index` (what a sample and a validation example are made of): the image and the image with
// synthetic anomalies as 8-bit RGB [S][S][3], the target mask [S][S] (1 = anomalous) and the regions' centres
// (row, col) for the answer, drawn from rng. *n_patches 0: synthesis found no place (mask all 0).
// A real defect item: the normal image of its class drawn from rng, the defect and its mask, and its regions.
Status anomaly_make_pair(const AnomalyData *d, int64_t index, Rng *rng, uint8_t *normal, uint8_t *anomalous,
                         uint8_t *mask, int *n_patches, double centers[TRAIN_MAX_REGIONS][2]);

// The trainer's step (TrainStepFn): ctx is an AnomalyStepContext.
typedef struct AnomalyStepContext {
    AnomalyTrainModel *model;
    const AnomalyData *data;
} AnomalyStepContext;
// Micro-steps per sample: 2 with an instruction stream (the reference's update of accum micro-steps covers
// accum / 2 anomaly items and accum / 2 instruction samples), else 1. The trainer's micro_per_sample.
Status anomaly_step(void *ctx, const void *sample, TrainLosses *out);
int anomaly_micro_per_sample(const AnomalyData *d);
