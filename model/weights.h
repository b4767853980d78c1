// Loading weights from a safetensors file onto the engine's device in its compute dtype.
// The file may store f32, f16 or bf16; the CPU backend computes in f32, the CUDA backend in the dtype asked
// for. Every loaded tensor is a private copy (aligned, on the device) that the store owns and frees.
#pragma once
#include "kernels/engine.h"
#include "runtime/safetensors.h"

#define WEIGHT_MAX_FILES 8

// Files are searched in the order added, so a small file of trained deltas (decoder, prompt learner, LoRA)
// added before the base model overrides the base's tensors of the same name.
typedef struct WeightStore {
    Engine *engine;
    DType dtype;                                 // compute dtype of the weights on the device
    DType matrix_dtype;                          // of the *_matrix loads: dtype, or bf16/f16 on the CPU
    int n_files;
    const SafeTensors *files[WEIGHT_MAX_FILES];  // not owned
    const char *file_names[WEIGHT_MAX_FILES];    // for messages
    const char *file_name;                       // the first file's name, for messages about the model
    void **allocations;       // everything this store allocated, freed by weights_free
    int n_allocations, cap_allocations;
    size_t bytes;             // total bytes allocated on the device
} WeightStore;

void weights_init(WeightStore *w, Engine *e, DType dtype, const SafeTensors *file, const char *file_name);
// Adds a file searched after those already added.
Status weights_add_file(WeightStore *w, const SafeTensors *file, const char *file_name);
// The metadata value of `key` in the first file that has it, or NULL.
const char *weights_meta(const WeightStore *w, const char *key);
void weights_free(WeightStore *w);

// Loads tensor `name`, checking its shape against `shape` (ndim dims; -1 accepts any size in that dim).
// A missing tensor or a wrong shape is an error naming both.
Status weights_load(WeightStore *w, const char *name, int ndim, const int64_t *shape, Tensor *out);
// printf-style name, for the per-block keys ("...blocks.%d.attn.in_proj_weight").
Status weights_loadf(WeightStore *w, int ndim, const int64_t *shape, Tensor *out, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
// Size of dim `dim` of a tensor in the file (for configs read off shapes); -1 when absent.
int64_t weights_dim(const WeightStore *w, const char *name, int dim);
bool weights_has(const WeightStore *w, const char *name);
// Reads any float tensor of the file (up to ST_MAX_DIMS dims, e.g. a 5-D Conv3d weight) into a new host f32
// buffer (free with mem_host_free), with its shape. For weights that are transformed before use.
Status weights_read_f32(const WeightStore *w, const char *name, float **data, int *ndim, int64_t shape[8]);
// Uploads host f32 data as a new device tensor of the store's dtype, owned by the store.
Status weights_upload(WeightStore *w, const float *host, int ndim, const int64_t *shape, Tensor *out);
// Weight matrices in low precision on the CPU. After weights_set_matrix_dtype(w, DT_BF16) (or DT_F16) on a CPU
// store, the *_matrix loads below keep their tensor in that dtype instead of f32: half the memory and half the
// bytes a decode step reads; op_linear / op_matmul take such a weight with f32 activations. Use them only for
// weights that feed op_linear / op_matmul as the weight operand; norms, biases and embeddings stay f32. On CUDA,
// and by default (matrix dtype = the store's dtype), they are weights_load / weights_loadf / weights_upload.
Status weights_set_matrix_dtype(WeightStore *w, DType dt);
Status weights_load_matrix(WeightStore *w, const char *name, int ndim, const int64_t *shape, Tensor *out);
Status weights_loadf_matrix(WeightStore *w, int ndim, const int64_t *shape, Tensor *out, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
Status weights_upload_matrix(WeightStore *w, const float *host, int ndim, const int64_t *shape, Tensor *out);
// Reads a metadata value as an int, or returns `fallback` when absent; a malformed value is an error.
Status weights_meta_int(const WeightStore *w, const char *key, int fallback, int *out);
// Reads a metadata value as a positive float, or returns `fallback` when absent; a malformed value is an error.
Status weights_meta_float(const WeightStore *w, const char *key, float fallback, float *out);
