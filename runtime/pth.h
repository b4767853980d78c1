// pth: a reader for PyTorch checkpoints written by torch.save (torch >= 1.6, the zip format): the
// ImageBind .pth, the PandaGPT and AnomalyGPT .pt deltas, and HF pytorch_model*.bin shards. It executes
// nothing: the pickle inside is read by a small machine that knows only the opcodes and globals a state
// dict uses, and refuses anything else (os.system, builtins.eval, an unknown opcode) with a message naming it.
//
// The file. A zip archive (runtime/zip.h) with one top folder, "<prefix>/": "data.pkl" (the pickle),
// "data/<key>" (one entry per storage, raw little-endian elements), "byteorder" ("little"; "big" is refused;
// absent in old files, meaning little) and "version" (not read: every zip-format version stores tensors the
// same way). Entries torch writes are STORED and read in place, ZIP64 included (a 13 GB shard opens in
// milliseconds); a re-zipped archive with DEFLATEd entries is inflated into memory. Legacy files (torch < 1.6
// or _use_new_zipfile_serialization=False: a bare pickle stream starting with the magic number) and the older
// tar format are refused with a message saying so. The pickle machine is runtime/pickle.c.
//
// The pickle. Protocols 2..5: PROTO FRAME EMPTY_{DICT,LIST,TUPLE} MARK TUPLE{,1,2,3} {SHORT_,,8}BINUNICODE
// BINBYTES/SHORT_BINBYTES BININT{,1,2} LONG1 BINFLOAT NEWTRUE NEWFALSE NONE {,LONG_}BINPUT MEMOIZE
// {,LONG_}BINGET SETITEM{,S} APPEND{,S} GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID STOP. Globals:
// collections.OrderedDict, torch._utils._rebuild_tensor_v2, _rebuild_parameter,
// _rebuild_parameter_with_state, torch._tensor._rebuild_from_type_v2 with new_type torch.Tensor (a tensor
// that carried Python attributes), and torch.<T>Storage for T in Float Half BFloat16 Double Long Int Short
// Char Byte Bool. Persistent ids are ('storage', torch.<T>Storage, key, location, numel). BUILD state is
// read and ignored (a state_dict's _metadata, a Parameter's attributes): it never changes a tensor. The
// stack, the memo and the values are bounded by the pickle's length (at most PTH_MAX_PICKLE_BYTES; the
// machine needs up to ~100 bytes per pickle byte while it runs, then frees it all), and nesting by
// 64 levels, so memory stays proportional to the file.
//
// What comes out. Every tensor reachable from the root through dicts, in pickle order: the root dict's
// tensors by their keys ("model.embed_tokens.weight"), and tensors in nested dicts by the keys joined with
// '.': a training checkpoint {"model": state_dict, "epoch": 3} gives "model.<key>" (strip the prefix, or look
// names up with it); {"state_dict": ...} gives "state_dict.<key>". Integer keys are written in decimal.
// Values that are not tensors or dicts (numbers, strings, lists, tuples, None) are skipped, as are tensors
// inside lists or tuples. If two paths give one name, pth_find returns the first. A dict reached twice is
// walked once (the second path is skipped), so a cyclic or shared structure cannot blow up.
//
// Tensors. Every tensor is checked at open: at most PTH_MAX_DIMS dims, sizes and strides >= 0, and every
// element it addresses (storage_offset + sum((size-1)*stride)) inside its storage, whose bytes (numel * element
// size) lie inside the file. Tensors in one storage (a view at an offset) share bytes, as in torch.
// F32, F16, BF16, I32 (IntStorage) and U8 (ByteStorage) map to DType; Long, Double, Bool, Short, Char
// have no DType: they are listed with dtype -1 and their storage name, and pth_copy_contiguous still copies
// their raw elements (so a loader can, e.g., narrow int64 position ids itself). pth_get gives a CPU Tensor
// view for contiguous tensors of a DType with at most TENSOR_MAX_DIMS (4) dims; a 5-D Conv3d weight or a
// non-contiguous tensor is described by pth_info and copied out with pth_copy_contiguous.
//
// Lifetime. Views point into the read-only mapping (or the caller's buffer) and live until pth_close. A
// PthFile is never modified after opening: many threads may read it at once.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/tensor.h"

#define PTH_MAX_DIMS 8
// Limits that keep a hostile file from making the reader allocate far more than the file's size: the pickle
// (a real one is ~200 bytes per tensor), one name, and all names together (nesting joins keys).
#define PTH_MAX_PICKLE_BYTES ((uint64_t)64 << 20)
#define PTH_MAX_NAME_BYTES 65536
#define PTH_MAX_NAME_BYTES_TOTAL (64 << 20)

typedef struct PthFile PthFile;

// Maps and parses a checkpoint. On failure *out is NULL and the message names the file and what is wrong.
Status pth_open(const char *path, PthFile **out);
// The same over a caller-owned buffer that must outlive the handle; messages say "<memory>".
Status pth_open_memory(const void *buf, size_t len, PthFile **out);
void pth_close(PthFile *f);  // NULL is fine

int pth_count(const PthFile *f);
const char *pth_name(const PthFile *f, int i);      // NULL when out of range
int pth_find(const PthFile *f, const char *name);   // index, or -1 when absent

typedef struct PthTensorInfo {
    const char *name;
    const char *storage_type;       // "FloatStorage", "HalfStorage", "LongStorage", ...
    int dtype;                      // DType, or -1 when agpt has no such type
    int elem_size;                  // bytes per element
    bool supported;                 // pth_get works: a DType, contiguous, at most TENSOR_MAX_DIMS dims
    bool contiguous;                // row-major strides (strides of size-1 dims ignored, as torch does)
    bool parameter;                 // pickled as an nn.Parameter
    int ndim;                       // 0..PTH_MAX_DIMS
    int64_t shape[PTH_MAX_DIMS];    // the first ndim are meaningful
    int64_t stride[PTH_MAX_DIMS];   // in elements
    int64_t numel;
    int64_t storage_offset;         // in elements
    const void *storage;            // the whole storage's bytes
    size_t storage_nbytes;
    const void *data;               // the first element: storage + storage_offset * elem_size
    size_t nbytes;                  // numel * elem_size: the tensor's bytes when contiguous
    size_t span_nbytes;             // bytes from data to one past the last element addressed (<= storage's)
} PthTensorInfo;

Status pth_info(const PthFile *f, int i, PthTensorInfo *out);
// A CPU tensor viewing the file. AGPT_ERR_ARG for an absent name; AGPT_ERR_UNSUPPORTED (with what it is)
// for a tensor that is not `supported` (see pth_info).
Status pth_get(const PthFile *f, const char *name, Tensor *out);
// Copies tensor i's elements, in row-major order, into dst (dst_nbytes >= info.nbytes), whatever its
// strides or dtype; elements keep their storage type (int64 stays int64).
Status pth_copy_contiguous(const PthFile *f, int i, void *dst, size_t dst_nbytes);
