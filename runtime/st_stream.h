// A streaming safetensors writer, for files far larger than memory (agpt convert writes a 14 GB model while
// holding one tensor at a time). The caller declares every tensor up front (name, dtype, shape: the header
// needs all of them), then writes each tensor's bytes, in any order and in as many pieces as it likes, at its
// place in the file. Nothing is visible at the target path until st_stream_finish: the file is written as
// "<path>.tmp", fsynced and renamed, as st_write does; st_stream_abort (or any failure) removes the tmp file
// and leaves an older file at the path untouched.
//
// Layout: the same as st_write (largest element size first, then declaration order; data 64-byte aligned), so
// every tensor is aligned to its element size and Python's safetensors reads the result. Tensors may have up
// to ST_MAX_DIMS dims (a 5-D Conv3d weight) and any dtype name the format knows ("F32", "F16", "BF16",
// "I32", "U8", ...).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "runtime/safetensors.h"

typedef struct StStreamEntry {
    const char *name;       // copied
    const char *dtype;      // format name, e.g. "F16"
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} StStreamEntry;

typedef struct StStream StStream;

// Declares the tensors and metadata (kv = {key0, value0, ...}), creates "<path>.tmp" and writes the header.
// The data section starts zero-filled (a sparse file): a tensor never written reads as zeros.
Status st_stream_open(const char *path, const StStreamEntry *entries, int n, const char *const *kv, int n_pairs,
                      StStream **out);
// Writes nbytes at byte `offset` inside tensor i's data (offset + nbytes <= its size).
Status st_stream_write(StStream *s, int i, size_t offset, const void *data, size_t nbytes);
size_t st_stream_nbytes(const StStream *s, int i);   // tensor i's size in bytes
const char *st_stream_tmp_path(const StStream *s);   // the file being written (readable once all is written)
// fsync, rename over path, fsync the folder; frees s whatever happens.
Status st_stream_finish(StStream *s);
// Removes the tmp file and frees s; NULL is fine.
void st_stream_abort(StStream *s);
