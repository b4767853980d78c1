#include "runtime/text.h"

#include <stddef.h>
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
