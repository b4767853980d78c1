// One view over the checkpoint files people have: a PyTorch file (.pth/.pt/.bin, runtime/pth.h), a safetensors
// file, or a Hugging Face model directory (config.json with pytorch_model-*.bin or *.safetensors shards and
// their index). Tensors from every file of a directory form one list; agpt convert reads them one at a time.
//
// A directory is read as HF's from_pretrained does: "model.safetensors.index.json", else
// "pytorch_model.bin.index.json" (its weight_map names each tensor's shard; every shard it names must exist
// and hold the tensors it claims), else a single "model.safetensors" or "pytorch_model.bin", else every
// "*.safetensors" (or, with none, "pytorch_model*.bin") file in name order. Shard names in an index must be
// plain file names inside the directory. A tensor name found in two files is an error.
//
// A file's kind comes from its first bytes, not its extension: a zip archive is a torch.save file (a .bin
// shard is one), an 8-byte length followed by '{' is safetensors. Anything else is refused with what it
// looks like (a legacy torch pickle, a tar, text).
//
// Memory. Files are mapped, not read: opening a 13 GB shard costs nothing. ckpt_read converts one tensor
// into the caller's buffer; ckpt_release then drops the tensor's pages from this process (madvise PAGEOUT), so
// that reading a whole model one tensor at a time keeps at most about one tensor resident.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/tensor.h"

#define CKPT_MAX_DIMS 8
#define CKPT_MAX_FILES 256

typedef struct Checkpoint Checkpoint;

typedef struct CkptTensor {
    const char *name;
    const char *dtype;              // safetensors spelling: "F32", "F16", "BF16", "F64", "I64", "I32", "U8", ...
    bool is_float;                  // F32, F16, BF16 or F64: ckpt_read converts it to any float DType
    int ndim;
    int64_t shape[CKPT_MAX_DIMS];
    int64_t numel;
    int file;                       // index of the file holding it (ckpt_file_path)
} CkptTensor;

Status ckpt_open(const char *path, Checkpoint **out);
void ckpt_close(Checkpoint *c);  // NULL is fine

int ckpt_count(const Checkpoint *c);
int ckpt_find(const Checkpoint *c, const char *name);  // index, or -1 when absent
Status ckpt_tensor(const Checkpoint *c, int i, CkptTensor *out);
const char *ckpt_path(const Checkpoint *c);             // as opened
int ckpt_file_count(const Checkpoint *c);
const char *ckpt_file_path(const Checkpoint *c, int file);
uint64_t ckpt_total_bytes(const Checkpoint *c);         // sum of the tensors' stored bytes

// Tensor i's elements in row-major order, converted to `dtype` (F32, F16 or BF16; rounding to nearest even)
// into dst, which holds at least numel elements of it. A non-float tensor is refused unless dtype equals
// its own type (then it is copied as it is). Non-contiguous torch tensors are gathered through a temporary
// of the tensor's stored size.
Status ckpt_read(const Checkpoint *c, int i, DType dtype, void *dst, size_t dst_nbytes);
// Elements [first, first + count) of a contiguous tensor i (row-major), converted as ckpt_read does, into dst;
// then drops those elements' whole pages from memory. What lets agpt convert stream a tensor in pieces.
// AGPT_ERR_UNSUPPORTED for a non-contiguous tensor (read it whole with ckpt_read).
Status ckpt_read_part(const Checkpoint *c, int i, DType dtype, int64_t first, int64_t count, void *dst);
// The raw stored bytes of tensor i in row-major order (its dtype as `dtype` says) into dst.
Status ckpt_read_raw(const Checkpoint *c, int i, void *dst, size_t dst_nbytes);
// Drops tensor i's mapped pages from this process's memory (they are re-read from disk if needed again).
void ckpt_release(const Checkpoint *c, int i);
