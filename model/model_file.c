#include "model/model_file.h"

#include <stdlib.h>
#include <string.h>

const char *const model_reference_classes[30] = {
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper", "object", "candle", "cashew", "chewinggum", "fryum",
    "macaroni", "pcb", "pipe fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "capsules",
};

Status model_file_check_version(const SafeTensors *st, const char *path) {
    const char *v = st_metadata(st, MODEL_FORMAT_KEY);
    if (!v) return AGPT_OK;
    char *end = NULL;
    long version = strtol(v, &end, 10);
    if (end == v || *end != 0 || version < 1)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s: metadata %s = '%s' is not a format version", path, MODEL_FORMAT_KEY, v);
    if (version > MODEL_FORMAT_VERSION)
        return AGPT_FAIL(AGPT_ERR_FORMAT, "%s is a model file of format %ld; this agpt reads format %d and older: "
                         "update agpt, or convert the model again with this one", path, version, MODEL_FORMAT_VERSION);
    return AGPT_OK;
}

Status model_file_blob(const WeightStore *w, const char *name, const void **data, size_t *n) {
    *data = NULL;
    *n = 0;
    for (int f = 0; f < w->n_files; f++) {
        if (st_find(w->files[f], name) < 0) continue;
        Tensor t;
        Status s = st_get(w->files[f], name, &t);
        if (s == AGPT_OK && (t.dtype != DT_U8 || t.ndim != 1))
            s = AGPT_FAIL(AGPT_ERR_FORMAT, "%s: '%s' should be a 1-D U8 tensor of file bytes", w->file_names[f], name);
        if (s != AGPT_OK) return s;
        *data = t.data;
        *n = (size_t)t.shape[0];
        return AGPT_OK;
    }
    return AGPT_OK;
}
