// text: making names from untrusted files safe to print in a message.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum { SHOWN_MAX = 96 };  // bytes a shown() buffer needs

// Copies s into buf for a message: cut to fit (ending "...") and with control bytes replaced by '?', so a
// message stays one readable line however hostile the file. Returns buf.
const char *shown(const char *s, char buf[SHOWN_MAX]);

// UTF-8 checks, for text that goes into JSON or safetensors headers (whose readers refuse invalid UTF-8).
// utf8_bad_at: the offset of the first byte of s[0..n) that is not valid UTF-8 (overlong forms, surrogates and
// code points past U+10FFFF count as invalid; control bytes too unless allow_control), or n when all is valid.
size_t utf8_bad_at(const uint8_t *s, size_t n, bool allow_control);
bool utf8_valid(const char *s);   // NUL-terminated, control bytes allowed
// A malloc'd copy with every byte that breaks UTF-8 replaced by '?' (NULL when out of memory).
char *utf8_lossy(const char *s);
