// safetensors: the model file format (https://github.com/huggingface/safetensors).
//
// Layout: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON (the header), then the data section.
// The header maps each tensor name to {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]}
// (offsets relative to the data section) plus an optional "__metadata__" object of string -> string.
//
// Reading. st_open maps the file read-only and validates the whole header before returning: header size,
// UTF-8, JSON, every field, integral non-negative numbers (< 2^53), shape products without overflow, byte
// sizes equal to numel * dtype size, ranges inside the data section, no overlapping ranges, no duplicate
// names. After that, no accessor can read outside the buffer. The reader accepts gaps between tensors and
// trailing bytes (the official reader does not); it never needs them to be absent.
//
// What agpt can use. Tensors of dtype F32, F16, BF16, I32 or U8 with at most 4 dims become Tensors. Any
// other tensor (F64, I64, BOOL, F8_*, an unknown future dtype, or a 5-D Conv3d weight) does not stop the
// file from opening: it is validated like the others, listed by st_count/st_name, described by st_info,
// and st_get on it fails with AGPT_ERR_UNSUPPORTED saying what it is. So a checkpoint with one odd tensor
// still loads, and the converter can still read that tensor's raw bytes through st_info.
//
// Alignment. st_get returns the pointer into the file as it is. Files written by st_write have every
// tensor aligned to its element size and the data section aligned to 64 bytes; a file from elsewhere may
// not be, so code that needs alignment for vector loads must check it or copy the data (tensor_copy does).
//
// Lifetime. Tensors from st_get view the mapping: they are valid until st_close, and read-only (the file is
// mapped PROT_READ, so writing through one faults: copy first). A SafeTensors is never modified after
// opening, so many threads may read one at once. If another process truncates the file while it is
// mapped, reading the lost pages raises SIGBUS; that is a property of mmap, not of this code.
//
// Writing. st_write writes "<path>.tmp", fsyncs it and renames it over <path>, so a failure at any point
// (a full disk, a bad tensor, a crash) leaves the previous file, if any, untouched. The output follows the
// official format exactly (no gaps, no trailing bytes): Python's safetensors reads it.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/tensor.h"

// Headers larger than this are refused, as the official reader does: a real one is a few MB at most.
#define ST_MAX_HEADER_BYTES 100000000ull
// Dims a file may declare. More than TENSOR_MAX_DIMS makes a tensor unsupported; more than this is refused.
#define ST_MAX_DIMS 8

typedef struct SafeTensors SafeTensors;

// Maps and validates a file. On failure *out is NULL and the message names the file and what is wrong.
Status st_open(const char *path, SafeTensors **out);
// The same validation over a caller-owned buffer, which must outlive the returned handle. Messages say
// "<memory>" where they would name the file.
Status st_open_memory(const void *buf, size_t len, SafeTensors **out);
// Unmaps and frees; NULL is fine.
void st_close(SafeTensors *st);

// Tensors in header order, "__metadata__" excluded.
int st_count(const SafeTensors *st);
const char *st_name(const SafeTensors *st, int i);  // NULL when i is out of range
int st_find(const SafeTensors *st, const char *name);  // index, or -1 when absent
// A CPU tensor viewing the data. Fails with AGPT_ERR_ARG when the name is absent and with
// AGPT_ERR_UNSUPPORTED for a tensor agpt cannot represent (see above).
Status st_get(const SafeTensors *st, const char *name, Tensor *out);

// Everything the header says about tensor i, whether agpt can use it or not.
typedef struct StInfo {
    const char *name;
    const char *dtype;             // as written in the file: "F32", "F64", "F8_E4M3", ...
    bool supported;                // st_get works on it (a dtype we have, at most 4 dims)
    int ndim;                      // 0..ST_MAX_DIMS
    int64_t shape[ST_MAX_DIMS];    // the first ndim are meaningful
    const void *data;              // start of its bytes in the buffer
    size_t nbytes;                 // end - begin
    uint64_t offset;               // begin, relative to the data section
} StInfo;
Status st_info(const SafeTensors *st, int i, StInfo *out);

// "__metadata__" entries, in header order. st_metadata returns NULL for an absent key.
int st_metadata_count(const SafeTensors *st);
const char *st_metadata_key(const SafeTensors *st, int i);  // NULL when i is out of range
const char *st_metadata(const SafeTensors *st, const char *key);

typedef struct StEntry {
    const char *name;
    Tensor tensor;  // on DEV_CPU, contiguous
} StEntry;

// Writes n tensors and n_metadata_pairs metadata pairs given as metadata_kv = {key0, value0, key1, ...}
// ("__metadata__" is written only when pairs are given). Names are stored as given (JSON-escaped) and
// must be unique, non-empty and not "__metadata__". Tensors are laid out largest element size first, so
// each is aligned to its element size; the header is padded with spaces so data starts 64-byte aligned.
Status st_write(const char *path, const StEntry *entries, int n, const char *const *metadata_kv,
                int n_metadata_pairs);
