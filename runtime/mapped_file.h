// mapped_file: a whole file mapped read-only into memory (mmap, MAP_PRIVATE + PROT_READ), so the weights
// are shared with the page cache and nothing can write to the file.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

typedef struct MappedFile {
    const uint8_t *data;  // the file's bytes; NULL when nothing is mapped
    size_t size;
} MappedFile;

// Maps the regular, non-empty file at path. kind names what the file should be, for messages ("a
// .safetensors file"). On failure *out is zeroed and the message names the file and what is wrong.
Status mapped_file_open(const char *path, const char *kind, MappedFile *out);
// Unmaps the file and zeroes *m; does nothing when m is NULL or nothing is mapped.
void mapped_file_close(MappedFile *m);
