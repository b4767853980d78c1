// The torch-pickle machine behind runtime/pth.h (internal to pth.c; see pth.h for what it accepts). It reads
// a data.pkl of protocol 2..5 that builds a dict of tensors, building values but never calling anything: the
// opcodes and globals it knows are listed in pth.h, and anything else is refused with a message naming it.
// Storage bytes come from the caller (pth.c looks them up in the zip), so this file knows nothing of files.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/pth.h"

// torch.<name> storage classes that may appear in a persistent id.
typedef struct PthStorageType {
    const char *name;
    int elem_size;
    int dtype;  // DType, or -1 when agpt has no such type
} PthStorageType;
extern const PthStorageType pth_storage_types[];

// A tensor found in the pickle, checked: every element it addresses lies inside its storage.
typedef struct PthTensor {
    char *name;
    int type;                        // index into pth_storage_types
    bool parameter;
    int ndim;
    int64_t shape[PTH_MAX_DIMS];
    int64_t stride[PTH_MAX_DIMS];
    int64_t numel;
    int64_t offset;                  // storage offset, elements
    const uint8_t *storage;          // checked: storage_nbytes bytes inside the file (or an inflated copy)
    size_t storage_nbytes;
    size_t span_nbytes;              // from the first element to one past the last addressed
    bool contiguous;
} PthTensor;


// Returns the bytes of storage `key` (zip entry <prefix>/data/<key>), or fails with a message.
typedef Status (*PthStorageLoader)(void *ctx, const char *key, const uint8_t **data, size_t *size);

// Runs the pickle and walks its root dict (nested dicts give "outer.inner" names; see pth.h). `what` names
// the pickle in messages ("model.pt: archive/data.pkl"). On success *tensors (malloc'd, [*n], names
// malloc'd) is in pickle order; free it with pth_tensors_free.
Status pth_pickle_load(const uint8_t *pickle, size_t len, const char *what, PthStorageLoader load, void *ctx,
                       PthTensor **tensors, int *n);
void pth_tensors_free(PthTensor *tensors, int n);
