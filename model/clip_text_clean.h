// The CLIP text cleanup in front of the BPE tokenizer: steps 1-4 of clean(text) in clip_tokenizer.h (UTF-8 decode,
// ftfy.fix_text, html.unescape twice, whitespace cleaning, str.lower()). Internal to model/: other callers use
// clip_clean_text (clip_tokenizer.h), which returns the same text as UTF-8.
//
// Also the UTF-8 decoder and Unicode character classes that the tokenizer shares with the cleanup (the merges
// file is split as str.split() does; pre-tokens are scanned by the pattern's character classes).
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"

// whitespace_clean(basic_clean(text)).lower() of a NUL-terminated string (any bytes are accepted), as code points
// in a malloc'd array the caller frees (*out may be NULL when *n == 0). Fails only when memory runs out.
Status clip_clean_codepoints(const char *text, uint32_t **out, size_t *n);

// One code point from s[0, n), n >= 1: returns it and sets *len to the bytes used, or CLIP_UTF8_BAD for an
// ill-formed sequence (*len = the bytes that Python's errors="replace" turns into one U+FFFD).
#define CLIP_UTF8_BAD UINT32_MAX
uint32_t clip_utf8_decode_one(const uint8_t *s, size_t n, size_t *len);

// Python's str.isspace().
bool clip_is_py_space(uint32_t cp);
// How the CLIP pre-token pattern classifies cp: UNI_SCAN_OTHER, _LETTER, _NUMBER or _SKIP (unicode_tables.h).
int clip_scan_class(uint32_t cp);
