// Synthetic anomalies for training: NSA's patch_ex as AnomalyGPT calls it (anomalygpt-reference.md 6.4,
// code/datasets/self_sup_tasks.py), on 8-bit RGB images (224 x 224 in training).
//
// One call pastes up to num_patches Poisson-blended patches of a source image into a destination image: per patch
// a gamma-distributed box in the source (on the object, when the class has a background to skip), a random
// rescale, a random position in the destination (overlapping the destination's object by more than
// min_overlap_pct), then seamless_clone (train/seamless_clone.h). The label is the logistic map of the
// median-filtered intensity change; the training target is label > SYNTH_GT_THRESHOLD.
//
// Randomness: every draw goes through SynthDraws, either live from an Rng (synth_draws_for_sample: a sample depends
// only on (seed, sample index), never on threads or on other samples) or replayed from a recorded tape (the golden
// test feeds the draws numpy made, so both sides compute from the same numbers).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "runtime/rng.h"
#include "runtime/status.h"

#define SYNTH_MAX_PATCHES 2     // the answer templates of 6.3 know one or two regions
#define SYNTH_MAX_REGIONS 16    // regions a sample records (Perlin anomalies may have more than two)
#define SYNTH_GT_THRESHOLD 0.3f  // gt = label > 0.3 (openllama.py forward)
#define SYNTH_DESCRIPTION_MAX 1024

// The per-class arguments of patch_ex (mvtec.py / visa.py). dim1 = rows, dim2 = columns.
typedef struct SynthParams {
    double width_lo[2], width_hi[2];  // half-width bounds of a patch, fractions of the side ((lo1, hi1), (lo2, hi2))
    double logistic_k, logistic_x0;   // intensity_logistic_params
    int skip_background;              // 1: only paste on the object (BACKGROUND table)
    double bg_brightness, bg_threshold;  // object pixel: |mean_rgb - brightness| > threshold
    double resize_lo, resize_hi;      // resize_bounds of the patch scale
    int num_patches;                  // 2: the first patch always, the second with p = 1/2
    double min_object_pct;            // 0
    double min_overlap_pct;           // 0.25
    double gamma_shape, gamma_scale, gamma_offset;  // (2, 0.05, 0.03): half-width = (offset + Gamma) * side
    char description[SYNTH_DESCRIPTION_MAX];  // the class sentence of the human turn (6.3)
    // Beyond the reference's setting, off by default: patch_ex's own cutpaste_patch_generation (one patch,
    // area 2-15 % of the image, aspect ratio in (0.3, 1) or (1, 3.3), no rescale and no background skip; still
    // Poisson-blended, as patch_ex does).
    int cutpaste;
    // Beyond the reference, off by default: the patch is copied as it is (CutPaste's plain paste) instead of
    // Poisson-blended. Its colours stay the source's, so a model whose features do not yet see texture (a ViT
    // that is not trained) still sees the anomaly: the default model's recipe uses it (README.md).
    int paste;
    // Beyond the reference, off by default: DRAEM's Perlin-noise anomalies instead of NSA's patches (see
    // synth_perlin). The other parameters are then unused (the description still is).
    int perlin;
} SynthParams;

// The reference's values for the 15 MVTec-AD and 12 VisA classes (VisA: one setting for all); any other name gets
// the VisA setting (no background skip) and the sentence "This is a photo of NAME for anomaly detection, which
// should be without any damage, flaw, defect, scratch, hole or broken part.". *known is 1 for a reference class.
Status synth_params_for_class(const char *class_name, SynthParams *out, int *known);
// Overrides fields of *params from a JSON object; every key is optional, unknown keys are errors:
//   {"width_bounds_pct": [[lo1, hi1], [lo2, hi2]], "intensity_logistic_params": [k, x0],
//    "skip_background": [brightness, threshold] or null, "resize_bounds": [lo, hi], "num_patches": 1 or 2,
//    "min_object_pct": x, "min_overlap_pct": x, "gamma_params": [shape, scale, offset], "description": "...",
//    "cutpaste": false, "blend": "poisson" or "paste"}
Status synth_params_from_json(const char *json_text, SynthParams *params);
Status synth_params_load_json(const char *path, SynthParams *params);
// Checks ranges (bounds ordered and inside (0, 0.5], positive gamma, ...).
Status synth_params_validate(const SynthParams *p);

// Kinds of recorded draws (the tape's kind codes).
enum { SYNTH_DRAW_RANDINT = 1, SYNTH_DRAW_GAMMA = 2, SYNTH_DRAW_NORMAL = 3, SYNTH_DRAW_UNIFORM = 4 };

typedef struct SynthDraws {
    Rng *rng;                    // live draws; when NULL the tape is replayed
    const int32_t *tape_kind;    // [tape_len]
    const double *tape_value;    // [tape_len]: randint's integer, the other draws' values
    int tape_len, pos;
} SynthDraws;

// r seeded from (seed, index) alone; d draws live from it.
void synth_draws_for_sample(uint64_t seed, uint64_t index, Rng *r, SynthDraws *d);

// One synthetic example.
typedef struct SynthSample {
    int height, width;
    uint8_t *image;  // [height][width][3] the destination with the patches blended in
    uint8_t *mask;   // [height][width] 0/1: patch_ex's mask (each pasted patch's mask over its box)
    float *label;    // [height][width] logistic-intensity label in [0, 1)
    int n_patches;   // patches pasted = len(label_centers); 0 when every patch failed (Perlin: the mask's regions,
                     // at most SYNTH_MAX_REGIONS)
    int box[SYNTH_MAX_REGIONS][4];        // row0, row1, col0, col1 (half-open) of each pasted patch (region)
    double center[SYNTH_MAX_REGIONS][2];  // (row, col) midpoint of the union bounding box of patches 0..i
                                          // (Perlin: each region's centroid)
} SynthSample;

Status synth_sample_alloc(int height, int width, SynthSample *s);
void synth_sample_free(SynthSample *s);

// patch_ex(dest, src, **params) for two [height][width][3] images of the sample's size. A patch that finds no
// place is skipped, as in the reference; a replayed tape that runs out or disagrees is an error.
Status synth_patch_ex(const uint8_t *dest, const uint8_t *src, const SynthParams *p, SynthDraws *draws,
                      SynthSample *out);

// DRAEM's rand_perlin_2d_np: gradient noise of h x w pixels over res_y x res_x lattice cells (h % res_y == 0,
// w % res_x == 0), the lattice's gradient angles angles [(res_y + 1) * (res_x + 1)] in radians, row-major:
// out[i][j] = sqrt(2) lerp(lerp(n00, n10, f(u)), lerp(n01, n11, f(u)), f(v)), (u, v) the pixel's place in its cell,
// f the quintic fade, n the dot products with the four corners' gradients. out [h][w], about [-1, 1].
Status synth_perlin_noise(int h, int w, int res_y, int res_x, const double *angles, double *out);

// DRAEM's anomaly (augment_image in its data_loader.py) on 8-bit images: Perlin noise with 2^a x 2^b cells
// (a, b drawn from 0..5, capped where the side is not divisible), turned by an angle drawn from (-90, 90) degrees
// about the centre (bilinear, 0 outside, as imgaug's Affine), thresholded at 0.5 into the mask; inside it the
// image becomes (1 - beta) src + beta dest, beta drawn from [0, 0.8); the label is the mask. Redrawn up to 10
// times while the mask is empty (then no anomaly: n_patches 0). Not as DRAEM: the anomaly source is src (another
// training image, as NSA's) rather than a DTD texture under three random imgaug augmentations. The draws go
// through d (live or taped: randint a, randint b, uniform angles, uniform angle, uniform beta).
Status synth_perlin(const uint8_t *dest, const uint8_t *src, SynthDraws *d, SynthSample *out);

// The label of patch_ex from the images alone: label_mask = medianBlur(mean_c |mask*(dest - out)| > 1, 5),
// I = median over disk(5) of mean_c |label_mask*(dest - out)| (nearest border, as skimage/scipy),
// label = label_mask / (1 + exp(-k (I - x0))). dest, out [h][w][3]; mask [h][w] 0/1; label [h][w].
Status synth_label(const uint8_t *dest, const uint8_t *out, const uint8_t *mask, int h, int w, double k, double x0,
                   float *label);
// dst [h][w] = 0/1 object mask: medianBlur(|mean_rgb - brightness| > threshold, 7).
Status synth_object_mask(const uint8_t *rgb, int h, int w, double brightness, double threshold, uint8_t *dst);
