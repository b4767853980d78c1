#include "runtime/text.h"

#include <stdlib.h>
#include <string.h>

const char *shown(const char *s, char buf[SHOWN_MAX]) {
    size_t i = 0;
    for (; s[i] && i < SHOWN_MAX - 4; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (s[i]) memcpy(buf + i, "...", 3), i += 3;
    buf[i] = 0;
    return buf;
}

size_t utf8_bad_at(const uint8_t *s, size_t n, bool allow_control) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            if (!allow_control && c < 0x20 && c != '\t' && c != '\n' && c != '\r') return i;
            i++;
            continue;
        }
        int len;
        uint32_t cp, min;
        if ((c & 0xe0) == 0xc0) len = 2, cp = c & 0x1f, min = 0x80;
        else if ((c & 0xf0) == 0xe0) len = 3, cp = c & 0x0f, min = 0x800;
        else if ((c & 0xf8) == 0xf0) len = 4, cp = c & 0x07, min = 0x10000;
        else return i;
        if (n - i < (size_t)len) return i;
        for (size_t k = 1; k < (size_t)len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return i;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
        i += (size_t)len;
    }
    return n;
}

bool utf8_valid(const char *s) { return s && utf8_bad_at((const uint8_t *)s, strlen(s), true) == strlen(s); }

char *utf8_lossy(const char *s) {
    size_t n = strlen(s);
    char *out = malloc(n + 1);
    if (!out) return NULL;
    memcpy(out, s, n + 1);
    for (size_t i = 0; i < n;) {
        size_t bad = utf8_bad_at((const uint8_t *)out + i, n - i, true);
        if (bad == n - i) break;
        out[i + bad] = '?';  // one byte at a time: the rest of a broken sequence is looked at again
        i += bad + 1;
    }
    return out;
}
