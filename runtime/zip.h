// zip: the read-only subset of the ZIP format that torch.save (torch >= 1.6) writes, over a buffer in memory.
//
// torch writes every entry STORED (no compression) with its data 64-byte aligned (padding goes in the local
// header's extra field), and switches to ZIP64 records once the archive passes 4 GB (a 13 GB LLaMA shard).
// zip_open reads the End Of Central Directory (ZIP64 EOCD + locator when present) and every central directory
// entry and its local header, and checks that each entry's data lies inside the buffer: after it succeeds, an
// entry's data pointer and size can be used without further checks. STORED entries point into the buffer.
// DEFLATEd entries (not written by torch, but by some re-zipping tools) are inflated with zlib when asked for,
// into memory owned by the Zip, at most ZIP_MAX_INFLATE bytes each, and their CRC-32 is checked. Other methods,
// encryption and multi-disk archives are refused with a message. CRC-32 of STORED entries is not checked: that
// would read every byte of a 13 GB file at open.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

#define ZIP_MAX_INFLATE ((uint64_t)1 << 30)  // a DEFLATEd entry larger than this is refused

typedef struct ZipEntry {
    const char *name;        // NUL-terminated copy of the entry's name
    uint16_t method;         // 0 STORED, 8 DEFLATE
    uint64_t data_offset;    // of the (possibly compressed) data in the buffer; checked
    uint64_t comp_size;      // bytes at data_offset; checked to lie inside the buffer
    uint64_t size;           // uncompressed size
    uint32_t crc32;
} ZipEntry;

typedef struct Zip Zip;

// Parses the archive directory. `what` names the buffer in messages (a path or "<memory>"); it is copied.
Status zip_open(const uint8_t *buf, size_t len, const char *what, Zip **out);
void zip_close(Zip *z);
int zip_count(const Zip *z);
const ZipEntry *zip_entry(const Zip *z, int i);    // NULL when out of range
int zip_find(const Zip *z, const char *name);        // index, or -1 when absent
// The uncompressed bytes of entry i: a pointer into the buffer for STORED entries, else inflated once and
// kept until zip_close. Not thread-safe for DEFLATEd entries (it caches).
Status zip_data(Zip *z, int i, const uint8_t **data, size_t *size);
