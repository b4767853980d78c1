// The dataset layouts agpt reads (one reader per layout, one item type for all): MVTec-AD, VisA (its
// split_csv/1cls.csv), and a plain folder of normal images with optional anomalous images and masks (anomalib's
// Folder layout). agpt eval reads the test split and the few-shot references from them; agpt train reads the
// train split.
//
// Broken trees never crash a reader: an anomalous image without its mask, a CSV row that cannot be used, a class
// asked for that has no test images, an image that does not decode (noted by the caller that decodes it) are
// counted and named (the first few of each kind) in one message, dataset_problems_text. A reader fails only when
// the root cannot be read at all or nothing usable is found.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

typedef enum DatasetFormat { DATASET_MVTEC, DATASET_VISA, DATASET_FOLDER } DatasetFormat;
typedef enum DatasetSplit { DATASET_TRAIN, DATASET_TEST } DatasetSplit;

typedef struct DatasetItem {
    char *image;       // path of the image
    char *mask;        // path of its ground-truth mask; NULL for a normal image or a missing mask
    char *class_name;  // "bottle", "pcb1", the folder layout's --class
    char *defect;      // MVTec's defect folder ("good" for normal), VisA's "Normal"/"Anomaly", "normal"/"abnormal"
    bool anomalous;
    DatasetSplit split;
} DatasetItem;

typedef enum DatasetProblemKind {
    DATASET_MISSING_MASK,   // an anomalous image without a mask: image metrics only
    DATASET_UNREADABLE,     // an image or mask that does not decode (skipped)
    DATASET_EMPTY_CLASS,    // a class with no test images (or not in the tree)
    DATASET_BAD_ROW,        // a CSV row that cannot be used
    DATASET_PROBLEM_KINDS
} DatasetProblemKind;

#define DATASET_NAMED 3  // names kept per kind for the message

typedef struct Dataset {
    DatasetFormat format;
    char *root;                 // the MVTec / VisA root, or the folder layout's normal folder
    DatasetItem *items;
    int n, cap;
    char **classes;             // in the order read (sorted for MVTec, first appearance in the CSV for VisA)
    int n_classes;
    int problems[DATASET_PROBLEM_KINDS];
    char *named[DATASET_PROBLEM_KINDS][DATASET_NAMED];
} Dataset;

// classes: the classes to read (NULL or n_classes 0: every class in the tree).
Status dataset_read_mvtec(const char *root, const char *const *classes, int n_classes, Dataset *out);
Status dataset_read_visa(const char *root, const char *const *classes, int n_classes, Dataset *out);
// normal_dir: the normal images; abnormal_dir (may be NULL): the anomalous ones; masks_dir (may be NULL): their
// masks, named as the image (any of .png/.jpg/.jpeg, or <stem>_mask.png). Every image is a test item; the few-shot
// references are taken from the normal images (dataset_references) and must be left out of the test set.
Status dataset_read_folder(const char *normal_dir, const char *abnormal_dir, const char *masks_dir,
                           const char *class_name, Dataset *out);
void dataset_free(Dataset *d);

// Counts (and names, the first few) one problem.
void dataset_note(Dataset *d, DatasetProblemKind kind, const char *what);
int dataset_problem_count(const Dataset *d);
// "2 anomalous images without a mask (a.png, b.png); 1 class without test images (pcb9)" or "" when none.
void dataset_problems_text(const Dataset *d, char *buf, size_t cap);

// The k normal references of a class for --round r, chosen as the official test scripts choose them:
// MVTec <root>/<class>/train/good/{4r + j:03d}.png, j < k; VisA the class's train rows of 1cls.csv number
// 4r .. 4r + k - 1 (in file order); the folder layout its normal images number 4r .. 4r + k - 1 in name order.
// paths[j] point into the dataset (or a static buffer per j for MVTec: copy them before the next call).
Status dataset_references(const Dataset *d, const char *class_name, int k, int round, const char **paths);

// A ground-truth mask at the map's size [size][size], 1 = anomalous, resized as the reference does per layout:
// MVTec Resize((size, size)) bilinear and > 0.1; VisA Resize(size) (shorter side) + CenterCrop(size), bilinear,
// and > max / 100; the folder layout as VisA's geometry with MVTec's > 0.1 (its images are cropped by the model's
// preprocessing the same way). Bilinear is PIL's (a triangle filter widened when shrinking, antialiased).
Status dataset_load_mask(const char *path, DatasetFormat format, int size, uint8_t *out);
// The same threshold rule per layout, with the geometry of training's images: Resize((size, size)) bilinear for
// every layout (the squash the training images get), so a defect's mask stays on its pixels.
Status dataset_load_mask_squashed(const char *path, DatasetFormat format, int size, uint8_t *out);
